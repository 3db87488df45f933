/*-------------------------------------------------------------------------
 *
 * fetch.c
 *		Fetching a window [since, until) of a sync's query from PostHog,
 *		page by page with keyset pagination, and loading each page in its
 *		own transaction; asking for less when PostHog says a query is too
 *		big.
 *
 * HTTP happens outside any transaction, so no snapshot or lock is held
 * while PostHog thinks.  A run that fails half-way keeps every page it
 * committed; the next run resumes from the table's own max(cursor).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/pg_prng.h"
#include "miscadmin.h"
#include "pgstat.h"

#include "phsync.h"

/* the narrowest slice of the window phsync shrinks to after a 504/512 */
#define MIN_SPAN_USECS USECS_PER_SEC
/* consecutive successes after which a shrunken request grows back */
#define GROW_AFTER 2

/*
 * Rows are fetched again from the start of a new window or slice.
 */
void
fetch_forget(PhsyncRunState *st)
{
	if (st->page.response)
		json_object_put(st->page.response);
	st->page.response = NULL;
	hogql_keyset_reset(&st->keyset);
}

/*
 * Place the slice [chunk_from, chunk_until) of the window: it starts at
 * `from` and is st->span wide (the whole rest of the window when not
 * shrunk).
 */
static void
place_slice(PhsyncRunState *st, PhsyncQuery *q, TimestampTz from)
{
	q->chunk_from = from;
	q->chunk_until = (st->span >= q->until - from) ? q->until : from + st->span;
	q->chunked = (q->chunk_from > q->since || q->chunk_until < q->until);
}

/*
 * PostHog said the query was too big: halve the slice of the window and
 * the page.  Mid-slice, the new slice starts at the keyset position's
 * cursor, so no row after it is skipped.
 */
static void
ask_for_less(PhsyncRunState *st, PhsyncQuery *q)
{
	/*
	 * Mid-slice, restart from the keyset position's cursor, one microsecond
	 * early: a finer-grained cursor rounded to microseconds must not start
	 * the slice after rows that share the last row's cursor value.
	 */
	TimestampTz from = st->keyset.valid ?
		Max(hogql_keyset_cursor(&st->keyset) - 1, q->chunk_from) : q->chunk_from;

	st->span = Max(Min(st->span, q->until - from) / 2, MIN_SPAN_USECS);
	q->limit = Max(q->limit / 2, Min(100, st->page_size));
	st->successes = 0;
	place_slice(st, q, from);
	ereport(LOG,
			(errmsg("phsync run %lld: asking PostHog for less: %lld s of the window, %d rows a page",
					(long long) st->run_id, (long long) (st->span / USECS_PER_SEC), q->limit)));
}

/*
 * After enough successes in a row, grow a shrunken request back.
 */
static void
grow_back(PhsyncRunState *st, PhsyncQuery *q)
{
	if (!q->chunked && q->limit >= st->page_size)
		return;
	if (++st->successes < GROW_AFTER)
		return;
	st->successes = 0;
	st->span = (st->span > (q->until - q->since) / 2) ? (q->until - q->since) : st->span * 2;
	q->limit = Min(q->limit * 2, st->page_size);
	place_slice(st, q, q->chunk_from);
}

/*
 * Send one query, retrying transient failures; raises when PostHog refuses
 * or the retries are used up.  With hogql NULL, the page of q after the
 * keyset position, asking for less when PostHog says the query is too big;
 * otherwise that fixed text (with {bucket_seconds} = bucket).
 */
json_object *
fetch_json(PhsyncRunState *st, PhsyncQuery *q, const char *hogql, int64 bucket)
{
	int			retry = 0;

	for (;;)
	{
		PhsyncHttpResult res;
		char		client_id[64];
		const char *text;
		char	   *body;
		bool		less;

		CHECK_FOR_INTERRUPTS();
		shmem_check_cancel();
		snprintf(client_id, sizeof(client_id), "phsync-%lld-%d-%016llx",
				 (long long) st->run_id, st->counters.requests + 1,
				 (unsigned long long) pg_prng_uint64(&pg_global_prng_state));
		text = hogql ? hogql : hogql_build(q, &st->keyset);
		body = hogql_request_body(q, text, hogql ? NULL : &st->keyset, bucket,
								  st->name, client_id);

		retry_pace(&st->policy);
		pgstat_report_activity(STATE_RUNNING,
							   psprintf("sync %s: %s page %d, %lld rows so far%s",
										st->sync->name, hogql ? "counting," : "fetching",
										st->counters.pages + 1,
										(long long) st->counters.received,
										retry ? psprintf(" (retry %d)", retry) : ""));
		http_post(st->http, st->url, body, &res);
		st->counters.requests++;
		if (res.json)
			return res.json;

		if (!retry_is_transient(&res, &less))
			http_raise(&st->endpoint, &res);
		if (retry >= st->policy.max_retries)
		{
			ereport(LOG,
					(errmsg("phsync run %lld: giving up on page %d after %d retries",
							(long long) st->run_id, st->counters.pages + 1, retry)));
			http_raise(&st->endpoint, &res);
		}
		retry++;
		st->counters.retries++;
		if (less && hogql == NULL)
			ask_for_less(st, q);
		retry_wait(&st->policy, st->run_id, retry, &res);
	}
}

/*
 * Load one page in its own transaction, together with the run's counters.
 */
static void
load_page(PhsyncRunState *st, PhsyncQuery *q)
{
	MemoryContext cxt;
	int64		before = st->counters.inserted + st->counters.updated;

	if (st->loader == NULL)
		st->loader = loader_create(st->target, &st->page, st->sync->update, st->on_bad_row);
	else if (!loader_matches(st->loader, &st->page))
		ereport(ERROR,
				(errcode(ERRCODE_DATA_EXCEPTION),
				 errmsg("PostHog returned different columns on page %d", st->counters.pages)));

	pgstat_report_activity(STATE_RUNNING,
						   psprintf("sync %s: page %d, %lld rows, window %s to %s",
									st->sync->name, st->counters.pages,
									(long long) st->counters.received,
									phsync_format_timestamp(q->since),
									phsync_format_timestamp(q->until)));
	cxt = xact_begin();
	loader_insert(st->loader, &st->page, st->run_id, &st->counters);
	runlog_progress(st->run_id, &st->counters);
	xact_commit(cxt);
	shmem_set_progress(st->counters.pages, st->counters.received);

	elog(DEBUG1, "phsync run %lld: page %d, %d rows received, %lld written",
		 (long long) st->run_id, st->counters.pages, st->page.nrows,
		 (long long) (st->counters.inserted + st->counters.updated - before));
}

/*
 * Fetch [since, until) page by page and load each page in its own
 * transaction.  Errors propagate to the caller.
 */
void
fetch_window(PhsyncRunState *st, TimestampTz since, TimestampTz until)
{
	PhsyncQuery q = *st->query;

	q.since = since;
	q.until = until;
	q.limit = st->page_size;
	fetch_forget(st);
	st->span = q.until - q.since;
	st->successes = 0;
	place_slice(st, &q, q.since);

	while (q.since < q.until)
	{
		json_object *response = fetch_json(st, &q, NULL, 0);

		hogql_read_page(response, &st->page);
		st->counters.pages++;
		st->counters.received += st->page.nrows;
		load_page(st, &q);

		if (st->page.nrows >= q.limit)
		{
			/* a full page: there may be more in this slice */
			hogql_keyset_from_last_row(&st->page, &q, &st->keyset);
			grow_back(st, &q);
		}
		else if (q.chunk_until >= q.until)
			break;				/* a short page at the end of the window */
		else
		{
			/* a short page ends a slice: on to the next one, from its end */
			TimestampTz next_from = q.chunk_until;

			hogql_keyset_reset(&st->keyset);
			grow_back(st, &q);
			place_slice(st, &q, next_from);
		}
		json_object_put(st->page.response);
		st->page.response = NULL;
	}
	fetch_forget(st);
}
