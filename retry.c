/*-------------------------------------------------------------------------
 *
 * retry.c
 *		What phsync does when a request fails, and how many requests it
 *		may start: the retry policy and the request budget.
 *
 * Failures (retry_classify), and what retry_step() makes of them:
 *	- 429 with Retry-After (PostHog's throttles: 240 a minute and 2,400 an
 *	  hour for API queries, or 120 an hour for HogQL outside that
 *	  programme): a wait, not a failure.  The budget is closed until then
 *	  for every request to the same PostHog key, and the wait does not use
 *	  up a retry; but a request throttled again right after its wait uses
 *	  one from then on, so that a server that throttles for ever fails the
 *	  run after phsync.max_retries waits instead of holding it.
 *	- 429 without Retry-After: the project's concurrent queries (3) are all
 *	  taken.  The caller runs fewer requests at once, and retries after a
 *	  backoff (counted once it runs one at a time).
 *	- 504, 512 and our own time limit: the query was too big: the caller
 *	  asks for less (a narrower slice, a smaller page) and retries.
 *	- 500, 502, 503, connection failures, resets, truncated or unreadable
 *	  bodies: transient: retried up to max_retries times per request, after
 *	  base * 2^(n-1) with jitter, at most max_delay (phsync.max_retries,
 *	  phsync.retry_base_delay, phsync.max_retry_delay).
 *	- Everything else (400, 401, 402, 403, 404, TLS verification, a
 *	  response too large): fails at once.
 *
 * The budget (budget_take): PostHog counts requests per key in a sliding
 * minute and a sliding hour.  phsync keeps the same two windows, per
 * second, in shared memory, one budget per key (the settings' key, or a
 * foreign server's), shared by the worker and sessions: a request starts
 * only while both windows have room and no throttle closed the budget.  A
 * small daily run goes at full speed; a long backfill averages what the
 * hour allows instead of being throttled.
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
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "phsync.h"

/* the longest wait a throttle can ask for: PostHog's longest window */
#define MAX_THROTTLE_WAIT_MS (3600 * 1000L)

/*
 * Sleep ms milliseconds, waking for interrupts (which are acted on) and
 * for a cancelled run.
 */
void
phsync_sleep(long ms)
{
	TimestampTz end = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), ms);

	for (;;)
	{
		long		left;

		phsync_check_interrupts();
		left = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), end);
		if (left <= 0)
			break;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 Min(left, 1000L), PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

/*
 * What to do about a failed request (see the top of this file).
 */
PhsyncRetry
retry_classify(PhsyncHttpResult *result)
{
	if (result->too_large)
		return PHSYNC_RETRY_NO; /* the same request would be as large */

	if (result->curl_code != CURLE_OK)
	{
		switch ((CURLcode) result->curl_code)
		{
			case CURLE_OPERATION_TIMEDOUT:
				return PHSYNC_RETRY_LESS;
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
				return PHSYNC_RETRY_BACKOFF;
			default:
				/* TLS verification, bad URL, unsupported protocol... */
				return PHSYNC_RETRY_NO;
		}
	}

	switch (result->status)
	{
		case 200:
			/* truncated or garbled: ask again */
			return result->bad_body ? PHSYNC_RETRY_BACKOFF : PHSYNC_RETRY_NO;
		case 504:
		case 512:
			return PHSYNC_RETRY_LESS;
		case 429:
			return result->retry_after >= 0 ? PHSYNC_RETRY_THROTTLED : PHSYNC_RETRY_BUSY;
		case 500:
		case 502:
		case 503:
			return PHSYNC_RETRY_BACKOFF;
		default:
			return PHSYNC_RETRY_NO;
	}
}

/*
 * What to do about a failed request, as the top of this file says: give
 * up, or ask again after step->wait_ms, having closed the budget
 * (throttled), run fewer requests at once (fewer_at_once, only when the
 * caller may: RETRY_MAY_RUN_FEWER) or asked for less (ask_for_less: only
 * with RETRY_MAY_ASK_LESS; without it a query too big is final).  state
 * holds the request's history: retries used, and whether its last
 * failure was a throttle.  The one rule for every request phsync makes.
 */
void
retry_step(const PhsyncRetryPolicy *policy, PhsyncRetryState *state,
		   PhsyncHttpResult *result, int flags, PhsyncRetryStep *step)
{
	PhsyncRetry kind = retry_classify(result);
	bool		throttled_before = state->throttled;

	memset(step, 0, sizeof(*step));
	state->throttled = false;
	switch (kind)
	{
		case PHSYNC_RETRY_NO:
			step->give_up = true;
			return;
		case PHSYNC_RETRY_THROTTLED:
			step->throttled = true;
			step->wait_ms = retry_throttle_ms(result);
			state->throttled = true;
			/* the first throttle of a request is a wait; the next ones count */
			if (!throttled_before)
				return;
			break;
		case PHSYNC_RETRY_BUSY:
			if (flags & RETRY_MAY_RUN_FEWER)
			{
				step->fewer_at_once = true;
				step->wait_ms = retry_delay_ms(policy, 1, result);
				return;
			}
			break;
		case PHSYNC_RETRY_LESS:
			if (!(flags & RETRY_MAY_ASK_LESS))
			{
				step->give_up = true;
				return;
			}
			step->ask_for_less = true;
			break;
		case PHSYNC_RETRY_BACKOFF:
			break;
	}
	/* a retry that counts */
	if (state->retries >= policy->max_retries)
	{
		step->give_up = true;
		return;
	}
	state->retries++;
	step->counted = true;
	if (!step->throttled)
		step->wait_ms = retry_delay_ms(policy, state->retries, result);
}

/*
 * The retry policy for requests to endpoint e: the phsync.* retry
 * settings and e's request budget.
 */
void
retry_policy_for(const PhsyncEndpoint *e, PhsyncRetryPolicy *policy)
{
	policy->max_retries = phsync_max_retries;
	policy->base_delay_ms = phsync_retry_base_delay;
	policy->max_delay_ms = phsync_max_retry_delay;
	policy->per_minute = e->per_minute;
	policy->per_hour = e->per_hour;
}

/*
 * How long to wait before retry number `retry` (1-based) of a transient
 * failure: Retry-After when PostHog gave one, else base * 2^(retry-1)
 * with "equal jitter" (half fixed, half random), never more than the
 * policy's longest delay.
 */
long
retry_delay_ms(const PhsyncRetryPolicy *policy, int retry, PhsyncHttpResult *result)
{
	double		ms;

	if (result->retry_after >= 0)
		ms = result->retry_after * 1000.0;
	else
	{
		double		full = (double) policy->base_delay_ms * pow(2.0, Min(retry - 1, 30));

		full = Min(full, (double) policy->max_delay_ms);
		ms = full / 2 + pg_prng_double(&pg_global_prng_state) * full / 2;
	}
	return (long) Min(ms, (double) policy->max_delay_ms);
}

/*
 * How long a throttle asked to wait (its Retry-After, at most an hour).
 */
long
retry_throttle_ms(PhsyncHttpResult *result)
{
	return (long) Min(Max(result->retry_after, 0) * 1000.0, (double) MAX_THROTTLE_WAIT_MS);
}

/*
 * What happened, in a few words, for the log (the detail goes beside it).
 */
char *
retry_describe(PhsyncHttpResult *result)
{
	if (result->curl_code != CURLE_OK || result->too_large)
		return pstrdup("request failed");
	if (result->status != 200)
		return psprintf("PostHog answered HTTP %ld", result->status);
	return pstrdup("PostHog's response was unreadable");
}

/* ---------- one request, waited for ---------- */

/*
 * One request whose answer is waited for (verify's counts, a query from
 * SQL), under the budget and retry_step(): returns its complete scan,
 * which the caller frees with scan_free(); NULL when PostHog says the
 * query is too big and the caller may ask for less (RETRY_MAY_ASK_LESS).
 * Every other failure is raised once it is final.  Each attempt gets its
 * body (and client_query_id) from r->body.
 */
PhsyncScan *
request_with_retries(const PhsyncRequestSpec *r)
{
	PhsyncRetryState state = {0};

	for (;;)
	{
		PhsyncHttpResult res;
		PhsyncRetryStep step;
		PhsyncTransfer *t;
		char	   *client_id;
		char	   *body;
		long		wait;

		phsync_check_interrupts();
		if (!budget_take(r->endpoint->budget_key, r->policy->per_minute, r->policy->per_hour, &wait))
		{
			phsync_sleep(wait);
			continue;
		}
		body = r->body(r->arg, &client_id);
		if (r->requests)
			(*r->requests)++;
		t = http_request(r->http, body, client_id, &res);
		if (res.ok)
		{
			/* keep the scan, drop the transfer */
			PhsyncScan *scan = http_take_scan(t);

			http_finish(t);
			return scan;
		}
		http_finish(t);
		retry_step(r->policy, &state, &res, r->flags, &step);
		if (step.give_up)
			http_raise(r->endpoint, &res);
		if (step.ask_for_less)
			return NULL;
		if (step.throttled)
		{
			budget_close(r->endpoint->budget_key,
						 TimestampTzPlusMilliseconds(GetCurrentTimestamp(), step.wait_ms));
			if (r->throttled)
				(*r->throttled)++;
			ereport(r->throttle_elevel,
					(errmsg("PostHog throttles requests; waiting %.0f s", step.wait_ms / 1000.0),
					 errdetail("%s", res.detail)));
		}
		if (step.counted && r->retries)
			(*r->retries)++;
		phsync_sleep(step.wait_ms);
	}
}

/* ---------- the request budget ---------- */

/*
 * Advance a budget's windows to second now_s: seconds that leave the
 * minute or the hour stop counting.
 */
static void
budget_advance(PhsyncBudget *b, int64 now_s)
{
	int64		s;

	if (b->second == 0 || now_s - b->second >= PHSYNC_BUDGET_SECONDS)
	{
		memset(b->counts, 0, sizeof(b->counts));
		b->minute = b->hour = 0;
		b->second = now_s;
		return;
	}
	for (s = b->second + 1; s <= now_s; s++)
	{
		/* second s - 60 leaves the minute; s - 3600 (same slot as s) the hour */
		b->minute -= b->counts[(s - 60) % PHSYNC_BUDGET_SECONDS];
		b->hour -= b->counts[s % PHSYNC_BUDGET_SECONDS];
		b->counts[s % PHSYNC_BUDGET_SECONDS] = 0;
	}
	b->second = Max(b->second, now_s);
}

/*
 * When (second) the oldest of the requests counted in the last `window`
 * seconds leaves it.
 */
static int64
budget_frees_at(PhsyncBudget *b, int64 now_s, int window)
{
	int64		s;

	for (s = now_s - window + 1; s <= now_s; s++)
		if (b->counts[((s % PHSYNC_BUDGET_SECONDS) + PHSYNC_BUDGET_SECONDS) % PHSYNC_BUDGET_SECONDS] > 0)
			return s + window;
	return now_s + 1;
}

/*
 * May a request under budget `key` start now?  If so it is counted and
 * true returned; if not, *wait_ms says how long until one may.
 */
static bool
budget_try(PhsyncBudget *b, int per_minute, int per_hour, long *wait_ms)
{
	TimestampTz now = GetCurrentTimestamp();
	int64		now_s = now / USECS_PER_SEC;
	int64		free_s = 0;

	if (now < b->closed_until)
	{
		*wait_ms = Max(1, (b->closed_until - now) / 1000);
		return false;
	}
	budget_advance(b, now_s);
	if (per_minute > 0 && b->minute >= per_minute)
		free_s = Max(free_s, budget_frees_at(b, now_s, 60));
	if (per_hour > 0 && b->hour >= per_hour)
		free_s = Max(free_s, budget_frees_at(b, now_s, PHSYNC_BUDGET_SECONDS));
	if (free_s > 0)
	{
		*wait_ms = Max(1, free_s * 1000 - now / 1000);
		return false;
	}
	b->counts[now_s % PHSYNC_BUDGET_SECONDS]++;
	b->minute++;
	b->hour++;
	return true;
}

/*
 * budget_try() on the shared budget for key (or a process-local one when
 * phsync is not preloaded).
 */
bool
budget_take(const char *key, int per_minute, int per_hour, long *wait_ms)
{
	static PhsyncBudget *local = NULL;
	PhsyncBudget *b;
	bool		ok;

	*wait_ms = 0;
	if (per_minute <= 0 && per_hour <= 0)
	{
		/* no limit, but a throttle's wait still holds */
		TimestampTz until = shmem_budget_closed_until(key);

		if (until > GetCurrentTimestamp())
		{
			*wait_ms = Max(1, (until - GetCurrentTimestamp()) / 1000);
			return false;
		}
		return true;
	}
	b = shmem_budget_lock(key);
	if (b == NULL)
	{
		if (local == NULL)
			local = MemoryContextAllocZero(TopMemoryContext, sizeof(PhsyncBudget));
		return budget_try(local, per_minute, per_hour, wait_ms);
	}
	ok = budget_try(b, per_minute, per_hour, wait_ms);
	shmem_budget_unlock();
	return ok;
}

/*
 * A throttle said to wait until `until`: no request under key starts
 * before then.
 */
void
budget_close(const char *key, TimestampTz until)
{
	PhsyncBudget *b = shmem_budget_lock(key);

	if (b == NULL)
		return;
	b->closed_until = Max(b->closed_until, until);
	shmem_budget_unlock();
}
