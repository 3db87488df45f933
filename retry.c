/*-------------------------------------------------------------------------
 *
 * retry.c
 *		The retry policy and request pacing.
 *
 * Transient failures (429, 500, 502, 503, 504, 512, connection failures,
 * timeouts, resets, truncated or unreadable bodies) are retried up to
 * max_retries times per request (phsync.max_retries), with exponential
 * backoff and jitter; a 429's Retry-After is honoured (capped by
 * phsync.max_retry_delay).  504, 512 and our own timeout mean "the query
 * was too big": the caller is told to ask for less.  Everything else
 * (400, 401, 402, 403, 404, TLS verification) fails at once.
 *
 * Requests are spaced so that at most per_minute start in any minute
 * (phsync.max_requests_per_minute), so a long backfill stays under PostHog's rate limits
 * instead of being throttled.
 *
 * All waits are on the process latch: a cancel or shutdown ends them.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <curl/curl.h>
#include <math.h>

#include "common/pg_prng.h"
#include "miscadmin.h"
#include "storage/latch.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "phsync.h"

/* when the last request started, for pacing (per process) */
static TimestampTz last_request_start = 0;

/*
 * Sleep ms milliseconds, waking for interrupts (which are acted on).
 */
void
phsync_sleep(long ms)
{
	TimestampTz end = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), ms);

	for (;;)
	{
		long		left;

		CHECK_FOR_INTERRUPTS();
		shmem_check_cancel();
		left = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), end);
		if (left <= 0)
			break;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 left, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

/*
 * Is this failure worth another try?  *ask_for_less is set when PostHog
 * (or our own timeout) says the query was too expensive.
 */
bool
retry_is_transient(PhsyncHttpResult *result, bool *ask_for_less)
{
	*ask_for_less = false;

	if (result->too_large)
		return false;			/* the same request would be as large */

	if (result->curl_code != CURLE_OK)
	{
		switch ((CURLcode) result->curl_code)
		{
			case CURLE_OPERATION_TIMEDOUT:
				*ask_for_less = true;
				return true;
			case CURLE_COULDNT_RESOLVE_HOST:
			case CURLE_COULDNT_CONNECT:
			case CURLE_SEND_ERROR:
			case CURLE_RECV_ERROR:
			case CURLE_GOT_NOTHING:
			case CURLE_PARTIAL_FILE:
			case CURLE_HTTP2:
			case CURLE_HTTP2_STREAM:
			case CURLE_BAD_CONTENT_ENCODING:
			case CURLE_WRITE_ERROR:
				return true;
			default:
				/* TLS verification, bad URL, unsupported protocol... */
				return false;
		}
	}

	switch (result->status)
	{
		case 200:
			return result->bad_body;	/* truncated or garbled: ask again */
		case 504:
		case 512:
			*ask_for_less = true;
			return true;
		case 429:
		case 500:
		case 502:
		case 503:
			return true;
		default:
			return false;
	}
}

/*
 * Wait before retry number `retry` (1-based): Retry-After when PostHog gave
 * one, else base * 2^(retry-1) with "equal jitter" (half fixed, half
 * random), never more than the policy's longest delay.  Logged.
 */
void
retry_wait(const PhsyncRetryPolicy *policy, int64 run_id, int retry,
		   PhsyncHttpResult *result)
{
	double		ms;
	char		what[64];

	if (result->retry_after >= 0)
		ms = result->retry_after * 1000.0;
	else
	{
		double		full = (double) policy->base_delay_ms * pow(2.0, Min(retry - 1, 30));

		full = Min(full, (double) policy->max_delay_ms);
		ms = full / 2 + pg_prng_double(&pg_global_prng_state) * full / 2;
	}
	ms = Min(ms, (double) policy->max_delay_ms);

	if (result->curl_code != CURLE_OK || result->too_large)
		snprintf(what, sizeof(what), "request failed");
	else if (result->status != 200)
		snprintf(what, sizeof(what), "PostHog answered HTTP %ld", result->status);
	else
		snprintf(what, sizeof(what), "PostHog's response was unreadable");

	ereport(LOG,
			(errmsg("phsync run %lld: %s, retrying in %.1f s (retry %d of %d)",
					(long long) run_id, what, ms / 1000.0, retry, policy->max_retries),
			 errdetail("%s", result->detail)));
	phsync_sleep((long) ms);
}

/*
 * Wait until the next request may start under the policy's per_minute (0:
 * no limit), and note its start.
 */
void
retry_pace(const PhsyncRetryPolicy *policy)
{
	if (policy->per_minute > 0 && last_request_start != 0)
	{
		long		spacing = 60000L / policy->per_minute;
		TimestampTz next = TimestampTzPlusMilliseconds(last_request_start, spacing);
		long		wait = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), next);

		if (wait > 0)
		{
			elog(DEBUG1, "phsync: pacing requests, waiting %ld ms", wait);
			phsync_sleep(wait);
		}
	}
	last_request_start = GetCurrentTimestamp();
}
