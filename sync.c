/*-------------------------------------------------------------------------
 *
 * sync.c
 *		One phsync run: read the watermark, fix the window, fetch it page by
 *		page with keyset pagination and load each page in its own
 *		transaction; record the outcome in phsync.runs.
 *
 * HTTP happens outside any transaction, so no snapshot or lock is held
 * while PostHog thinks.  A run that fails half-way keeps every page it
 * committed; the next run resumes from the table's own max(cursor).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "common/pg_prng.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "phsync.h"

/* rows younger than this may still be settling in PostHog */
#define SETTLE_USECS (30 * USECS_PER_SEC)
/* first run on an empty table with no phsync.initial_since */
#define DEFAULT_INITIAL_USECS (30 * USECS_PER_DAY)

/* the narrowest slice of the window phsync shrinks to after a 504/512 */
#define MIN_SPAN_USECS USECS_PER_SEC
/* consecutive successes after which a shrunken request grows back */
#define GROW_AFTER 2

/* a full re-read (no lookback) starts here */
#define REREAD_FROM_USECS (-INT64CONST(946684800) * USECS_PER_SEC)	/* 1970-01-01 */

typedef PhsyncRunState RunState;

/*
 * Begin a worker transaction with SPI and a snapshot (worker_spi's order).
 */
void
phsync_xact_begin(void)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	PushActiveSnapshot(GetTransactionSnapshot());
}

void
phsync_xact_commit(void)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
}

/*
 * Rows are fetched again from the start of a new window or slice.
 */
static void
forget_position(RunState *st)
{
	if (st->page.response)
		json_object_put(st->page.response);
	st->page.response = NULL;
	hogql_keyset_reset(&st->keyset);
}

static void
release_run_state(RunState *st)
{
	forget_position(st);
	http_close(st->http);
	st->http = NULL;
	loader_free(st->loader);
	st->loader = NULL;
}

static void
require_setting(const char *value, const char *name)
{
	if (value == NULL || value[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s is not set", name),
				 errhint("Set %s in postgresql.conf and reload the configuration.", name)));
}

static TimestampTz
initial_since(TimestampTz until)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1];
	bool		isnull;

	if (phsync_initial_since == NULL || phsync_initial_since[0] == '\0')
		return until - DEFAULT_INITIAL_USECS;
	/* the worker's TimeZone is UTC: a value without an offset is UTC */
	values[0] = CStringGetTextDatum(phsync_initial_since);
	if (SPI_execute_with_args("SELECT $1::timestamptz", 1, types, values, NULL,
							  true, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not read phsync.initial_since");
	return DatumGetTimestampTz(SPI_getbinval(SPI_tuptable->vals[0],
											 SPI_tuptable->tupdesc, 1, &isnull));
}

/*
 * Place the slice [chunk_from, chunk_until) of the window: it starts at
 * `from` and is st->span wide (the whole rest of the window when not
 * shrunk).
 */
static void
place_slice(RunState *st, PhsyncQuery *q, TimestampTz from)
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
ask_for_less(RunState *st, PhsyncQuery *q)
{
	/*
	 * Mid-slice, restart from the keyset position's cursor, one microsecond
	 * early: a finer-grained cursor rounded to microseconds must not start
	 * the slice after rows that share the last row's cursor value.
	 */
	TimestampTz from = st->keyset.valid ?
		Max(hogql_keyset_cursor(&st->keyset) - 1, q->chunk_from) : q->chunk_from;

	st->span = Max(Min(st->span, q->until - from) / 2, MIN_SPAN_USECS);
	q->limit = Max(q->limit / 2, Min(100, phsync_page_size));
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
grow_back(RunState *st, PhsyncQuery *q)
{
	if (!q->chunked && q->limit >= phsync_page_size)
		return;
	if (++st->successes < GROW_AFTER)
		return;
	st->successes = 0;
	st->span = (st->span > (q->until - q->since) / 2) ? (q->until - q->since) : st->span * 2;
	q->limit = Min(q->limit * 2, phsync_page_size);
	place_slice(st, q, q->chunk_from);
}

/*
 * Send one query, retrying transient failures; raises when PostHog refuses
 * or the retries are used up.  With hogql NULL, the page of q after the
 * keyset position, asking for less when PostHog says the query is too big;
 * otherwise that fixed text (with {bucket_seconds} = bucket).
 */
json_object *
sync_fetch(RunState *st, PhsyncQuery *q, const char *hogql, int64 bucket)
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
		snprintf(client_id, sizeof(client_id), "phsync-%lld-%d-%016llx",
				 (long long) st->run_id, st->counters.requests + 1,
				 (unsigned long long) pg_prng_uint64(&pg_global_prng_state));
		text = hogql ? hogql : hogql_build(q, &st->keyset);
		body = hogql_request_body(q, text, hogql ? NULL : &st->keyset, bucket,
								  st->name, client_id);

		pace_requests();
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
			http_raise(&res);
		if (retry >= phsync_max_retries)
		{
			ereport(LOG,
					(errmsg("phsync run %lld: giving up on page %d after %d retries",
							(long long) st->run_id, st->counters.pages + 1, retry)));
			http_raise(&res);
		}
		retry++;
		st->counters.retries++;
		if (less && hogql == NULL)
			ask_for_less(st, q);
		retry_wait(st->run_id, retry, &res);
	}
}

/*
 * The sync's query, its target and the HTTP handle: everything a run needs
 * before its window is known.  The target is created when it is the
 * default sync's built-in events table.
 */
static void
run_prepare(RunState *st)
{
	PhsyncSync *sync = st->sync;
	PhsyncQuery *q = palloc0(sizeof(PhsyncQuery));
	int			i;

	require_setting(phsync_project_id, "phsync.project_id");
	require_setting(phsync_api_key(), "phsync.api_key");

	q->preset = sync->preset;
	q->cursor = pstrdup(sync->cursor);
	q->limit = phsync_page_size;
	if (sync->preset == PHSYNC_CUSTOM)
		q->base = sync->query_file ? hogql_read_query_file(sync->query_file) : sync->query;

	phsync_xact_begin();
	MemoryContextSwitchTo(st->cxt);
	st->target = target_prepare(sync->target, q->cursor,
								strcmp(sync->name, "default") == 0 ? sync->preset : PHSYNC_CUSTOM);
	phsync_xact_commit();
	MemoryContextSwitchTo(st->cxt);

	q->nkeys = st->target->nkeys;
	q->keys = palloc(sizeof(char *) * Max(q->nkeys, 1));
	for (i = 0; i < q->nkeys; i++)
		q->keys[i] = st->target->cols[st->target->keys[i]].name;
	st->query = q;
	st->url = http_query_url();
	st->name = psprintf("phsync %s", sync->name);
	st->http = http_open();
}

/*
 * Where a run starts reading.  A scheduled or manual run: from the
 * watermark (max(cursor)) less the lookback, or everything when the sync
 * re-reads all.  A backfill: from its own progress, max(cursor) inside
 * [from, to), so that an interrupted one resumes and a repeated one adds
 * nothing twice.
 */
static TimestampTz
window_start(RunState *st, PhsyncJob *job, TimestampTz until)
{
	TimestampTz watermark;
	TimestampTz since;

	phsync_xact_begin();
	if (job->bounded)
		since = target_watermark(st->target, &job->from, &job->to, &watermark) ?
			Max(job->from, watermark - st->sync->lookback) : job->from;
	else if (st->sync->reread_all)
		since = REREAD_FROM_USECS;
	else if (target_watermark(st->target, NULL, NULL, &watermark))
		since = watermark - st->sync->lookback;
	else
		since = initial_since(until);
	phsync_xact_commit();
	MemoryContextSwitchTo(st->cxt);
	return since;
}

/*
 * Fetch [since, until) page by page and load each page in its own
 * transaction.  Errors propagate to phsync_run.
 */
void
sync_load_window(RunState *st, TimestampTz since, TimestampTz until)
{
	PhsyncQuery q = *st->query;

	q.since = since;
	q.until = until;
	q.limit = phsync_page_size;
	forget_position(st);
	st->span = q.until - q.since;
	st->successes = 0;
	place_slice(st, &q, q.since);

	while (q.since < q.until)
	{
		json_object *response;
		int64		before = st->counters.inserted + st->counters.updated;

		response = sync_fetch(st, &q, NULL, 0);
		hogql_read_page(response, &st->page);
		st->counters.pages++;
		st->counters.received += st->page.nrows;

		if (st->loader == NULL)
			st->loader = loader_create(st->target, &st->page, st->sync->update);
		else if (!loader_matches(st->loader, &st->page))
			ereport(ERROR,
					(errcode(ERRCODE_DATA_EXCEPTION),
					 errmsg("PostHog returned different columns on page %d", st->counters.pages)));

		pgstat_report_activity(STATE_RUNNING,
							   psprintf("sync %s: page %d, %lld rows, window %s to %s",
										st->sync->name, st->counters.pages,
										(long long) st->counters.received,
										phsync_format_timestamp(q.since),
										phsync_format_timestamp(q.until)));
		phsync_xact_begin();
		loader_insert(st->loader, &st->page, st->run_id, &st->counters);
		runlog_progress(st->run_id, &st->counters);
		phsync_xact_commit();
		MemoryContextSwitchTo(st->cxt);

		SpinLockAcquire(&phsync_shared->mutex);
		phsync_shared->progress_pages = st->counters.pages;
		phsync_shared->progress_received = st->counters.received;
		SpinLockRelease(&phsync_shared->mutex);

		elog(DEBUG1, "phsync run %lld: page %d, %d rows received, %lld written",
			 (long long) st->run_id, st->counters.pages, st->page.nrows,
			 (long long) (st->counters.inserted + st->counters.updated - before));

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
	forget_position(st);
}

/*
 * The body of a run; errors propagate to phsync_run.
 */
static void
run_body(RunState *st, PhsyncJob *job)
{
	TimestampTz started = GetCurrentTimestamp();
	TimestampTz until = started - SETTLE_USECS;
	TimestampTz since;

	run_prepare(st);
	if (strcmp(job->trigger, "verify") == 0)
	{
		verify_run(st, job);
		return;
	}
	if (job->bounded)
		until = Min(until, job->to);
	since = window_start(st, job, until);

	if (!job->bounded)
	{
		/* a backfill's row keeps the range it was asked for */
		phsync_xact_begin();
		runlog_set_window(st->run_id, since, Max(since, until));
		phsync_xact_commit();
		MemoryContextSwitchTo(st->cxt);
	}

	if (since < until)
		sync_load_window(st, since, until);

	ereport(LOG,
			(errmsg("phsync run %lld (sync %s) into %s: %s to %s, %d pages, %lld rows received, %lld inserted, %lld updated, %lld rejected, %d retries, %.1f s",
					(long long) st->run_id, st->sync->name, st->target->display,
					phsync_format_timestamp(since), phsync_format_timestamp(until),
					st->counters.pages, (long long) st->counters.received,
					(long long) st->counters.inserted, (long long) st->counters.updated,
					(long long) st->counters.rejected, st->counters.retries,
					(double) (GetCurrentTimestamp() - started) / USECS_PER_SEC)));
}

/*
 * Carry out one job: a run of one sync (scheduled, manual or a backfill)
 * or a verification.  Never raises an error (except FATAL on shutdown): a
 * failure is logged, recorded in phsync.runs and described in outcome.
 */
void
phsync_run(PhsyncJob *job, PhsyncOutcome *outcome)
{
	MemoryContext run_cxt;
	MemoryContext outer = CurrentMemoryContext;
	RunState	st;

	memset(outcome, 0, sizeof(*outcome));
	memset(&st, 0, sizeof(st));
	run_cxt = AllocSetContextCreate(TopMemoryContext, "phsync run",
									ALLOCSET_DEFAULT_SIZES);
	MemoryContextSwitchTo(run_cxt);
	st.cxt = run_cxt;
	st.sync = job->sync;

	PG_TRY();
	{
		if (job->run_id)
			runlog_begin_queued(job->run_id);
		else
			job->run_id = runlog_start(job->trigger, job->sync->name, job->sync->target,
									   job->bounded ? &job->from : NULL,
									   job->bounded ? &job->to : NULL);
		st.run_id = job->run_id;
		outcome->run_id = st.run_id;
		SpinLockAcquire(&phsync_shared->mutex);
		phsync_shared->running_run_id = st.run_id;
		strlcpy(phsync_shared->running_sync, job->sync->name, NAMEDATALEN);
		phsync_shared->progress_pages = 0;
		phsync_shared->progress_received = 0;
		SpinLockRelease(&phsync_shared->mutex);
		ereport(LOG,
				(errmsg("phsync run %lld (%s of sync %s) started",
						(long long) st.run_id, job->trigger, job->sync->name)));
		MemoryContextSwitchTo(run_cxt);

		run_body(&st, job);
		release_run_state(&st);
		runlog_finish(st.run_id, true, NULL, &st.counters);
		outcome->ok = true;
	}
	PG_CATCH();
	{
		ErrorData  *edata;
		char	   *error;

		HOLD_INTERRUPTS();
		EmitErrorReport();
		MemoryContextSwitchTo(outer);
		edata = CopyErrorData();
		FlushErrorState();
		AbortOutOfAnyTransaction();
		release_run_state(&st);
		RESUME_INTERRUPTS();

		error = edata->detail ?
			psprintf("%s: %s", edata->message, edata->detail) :
			pstrdup(edata->message);
		outcome->ok = false;
		outcome->sqlerrcode = edata->sqlerrcode;
		outcome->message = error;
		outcome->hint = edata->hint ? pstrdup(edata->hint) : NULL;
		FreeErrorData(edata);
	}
	PG_END_TRY();

	/*
	 * Record the failure outside the catch block: if even that fails (the
	 * database refuses writes, say), the worker must go on; the run stays
	 * "running" and is marked failed when the worker next starts.
	 */
	if (!outcome->ok && outcome->run_id != 0)
	{
		PG_TRY();
		{
			runlog_finish(outcome->run_id, false, outcome->message, &st.counters);
		}
		PG_CATCH();
		{
			MemoryContextSwitchTo(outer);
			EmitErrorReport();
			FlushErrorState();
			AbortOutOfAnyTransaction();
		}
		PG_END_TRY();
	}

	SpinLockAcquire(&phsync_shared->mutex);
	phsync_shared->running_run_id = 0;
	phsync_shared->running_sync[0] = '\0';
	SpinLockRelease(&phsync_shared->mutex);
	MemoryContextSwitchTo(outer);
	MemoryContextDelete(run_cxt);
	pgstat_report_activity(STATE_IDLE, NULL);
}
