/*-------------------------------------------------------------------------
 *
 * run.c
 *		One run of one sync: record it in phsync.runs, decide its window
 *		(or carry out a verification), fetch and load, and record how it
 *		ended.  A failure never escapes: it is logged, stored in
 *		phsync.runs and handed back as the error it was.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

#include "phsync.h"

/* rows younger than this may still be settling in PostHog */
#define SETTLE_USECS (30 * USECS_PER_SEC)
/* first run on an empty table with no phsync.initial_since */
#define DEFAULT_INITIAL_USECS (30 * USECS_PER_DAY)
/* a full re-read (no lookback) starts here */
#define REREAD_FROM_USECS (-INT64CONST(946684800) * USECS_PER_SEC)	/* 1970-01-01 */

/*
 * phsync.initial_since as a timestamp (SPI connected), or 30 days before
 * until when it is empty.
 */
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
	if (phsync_spi_exec("SELECT $1::pg_catalog.timestamptz", 1, types, values, NULL,
							  true, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not read phsync.initial_since");
	return DatumGetTimestampTz(SPI_getbinval(SPI_tuptable->vals[0],
											 SPI_tuptable->tupdesc, 1, &isnull));
}

/*
 * The target of the run: examined, and, for the default sync with a
 * preset, created when missing.  Raises when it is not acceptable.  Its
 * name is looked up as the sync's owner, whose schemas the worker's own
 * role may not even see.
 */
static PhsyncTarget *
open_target(PhsyncSync *sync)
{
	PhsyncTargetSpec spec;
	PhsyncProblem problem;
	PhsyncTarget *target;
	PhsyncAsRole save;

	sync_target_spec(sync, &spec);
	spec.owner = sync_owner(sync);
	as_role_begin(spec.owner, true, &save);
	target = target_examine(&spec, &problem);
	if (target == NULL && problem.sqlerrcode == ERRCODE_UNDEFINED_TABLE &&
		sync_is_default(sync) && sync->preset != PHSYNC_CUSTOM)
	{
		const PresetInfo *preset = preset_info(sync->preset);

		if (!preset_has_column(preset, sync->cursor))
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_COLUMN),
					 errmsg("phsync.cursor_column \"%s\" is not a column of the built-in %s query",
							sync->cursor, preset->name),
					 errhint("Use created_at (the default) or timestamp.")));
		target_create(sync->preset, sync->target, sync->cursor, NIL);
		ereport(LOG,
				(errmsg("phsync created target table %s", sync->target)));
		target = target_examine(&spec, &problem);
	}
	as_role_end(&save);
	if (target == NULL)
		target_raise(&problem);
	return target;
}

/*
 * The sync's query, its target and its connection: everything a run needs
 * before its window is known.
 */
static void
run_prepare(PhsyncRunState *st)
{
	PhsyncSync *sync = st->sync;
	PhsyncQuery *q = palloc0(sizeof(PhsyncQuery));
	MemoryContext cxt;
	int			i;

	cxt = xact_begin();
	st->endpoint = *sync_endpoint(sync);
	st->target = open_target(sync);
	xact_commit(cxt);

	retry_policy_for(&st->endpoint, &st->policy);
	st->page_size = st->endpoint.page_size;
	st->concurrency = st->endpoint.concurrency;
	st->on_bad_row = phsync_on_bad_row;

	q->preset = sync->preset;
	q->cursor = sync->cursor ? pstrdup(sync->cursor) : NULL;
	q->limit = st->page_size;
	if (sync->events != NIL)
	{
		ListCell   *lc;

		q->nevents = list_length(sync->events);
		q->events = palloc(sizeof(char *) * q->nevents);
		foreach(lc, sync->events)
			q->events[foreach_current_index(lc)] = pstrdup(lfirst(lc));
	}
	/*
	 * A preset read whole notices what PostHog no longer has (with
	 * deletions => 'mirror', also one re-read whole by its cursor: persons)
	 */
	st->track_keys = preset_info(sync->preset) &&
		((q->cursor == NULL && preset_info(sync->preset)->absent != PHSYNC_ABSENT_KEEP) ||
		 (sync->mirror && (q->cursor == NULL || sync->reread_all)));
	if (sync->preset == PHSYNC_CUSTOM)
		q->base = sync->query_file ? hogql_read_query_file(sync->query_file) : sync->query;

	q->nkeys = st->target->nkeys;
	q->keys = palloc(sizeof(char *) * Max(q->nkeys, 1));
	for (i = 0; i < q->nkeys; i++)
		q->keys[i] = st->target->cols[st->target->keys[i]].name;
	st->query = q;
	st->name = psprintf("phsync %s", sync->name);
	st->http = http_open(&st->endpoint);
}

/*
 * Where a run starts reading.  A scheduled or manual run: from the
 * watermark (max(cursor)) less the lookback, or everything when the sync
 * re-reads all.  A backfill: from its own progress, max(cursor) inside
 * [from, to), so that an interrupted one resumes and a repeated one adds
 * nothing twice.  Either way, no later than where the last such run that
 * did not finish had loaded everything (its slices committed out of
 * order, so max(cursor) can be past rows it lacks; see fetch.c).
 */
static TimestampTz
window_start(PhsyncRunState *st, PhsyncJob *job, TimestampTz until)
{
	TimestampTz watermark;
	TimestampTz since;
	TimestampTz resume;
	MemoryContext cxt = xact_begin();

	if (job->bounded)
		since = target_watermark(st->target, &job->from, &job->to, &watermark) ?
			Max(job->from, watermark - st->sync->lookback) : job->from;
	else if (st->sync->reread_all)
		since = REREAD_FROM_USECS;
	else if (target_watermark(st->target, NULL, NULL, &watermark))
		since = watermark - st->sync->lookback;
	else
		since = initial_since(until);
	if (!st->sync->reread_all &&
		runlog_resume_point(st->sync->name, job->bounded, job->from, job->to, &resume) &&
		resume - st->sync->lookback < since)
	{
		ereport(phsync_log_runs == PHSYNC_LOG_RUNS_ALL ? LOG : DEBUG1,
				(errmsg("phsync run %lld resumes where the last unfinished run of sync %s had loaded everything: %s",
						(long long) st->run_id, st->sync->name, phsync_format_timestamp(resume))));
		since = resume - st->sync->lookback;
		if (job->bounded)
			since = Max(job->from, since);
	}
	xact_commit(cxt);
	return since;
}

/*
 * Let go of the run's connection, loader and position.
 */
static void
release(PhsyncRunState *st)
{
	http_close(st->http);
	st->http = NULL;
	scan_trim();
	loader_free(st->loader);
	st->loader = NULL;
}

/*
 * After a whole re-read of a preset: what the target has and PostHog no
 * longer does is flagged deleted (definitions) or deleted (memberships);
 * with deletions => 'mirror', deleted whatever the preset, within the
 * window read when the preset has a cursor, and only as far as
 * phsync.max_delete_fraction allows (target_mirror_deletions()).  Only
 * after a complete read: an error, a cap or a page cut short ends the run
 * before this.
 */
static void
mark_absent(PhsyncRunState *st, TimestampTz since, TimestampTz until)
{
	PhsyncAbsent mode = st->sync->mirror ? PHSYNC_ABSENT_DELETE : preset_info(st->sync->preset)->absent;
	MemoryContext cxt = xact_begin();
	Datum	   *keys = loader_seen_keys(st->loader, st->target);
	bool		ranged = st->target->cursor >= 0;
	int64		n;

	if (st->sync->mirror)
	{
		n = target_mirror_deletions(st->target, keys, ranged ? &since : NULL, ranged ? &until : NULL,
									-1, st->run_id, ranged ? "in the window read" : "read whole");
		n = Max(n, 0);
	}
	else
		n = target_absent(st->target, mode, keys, NULL, NULL, false, NULL);
	if (mode == PHSYNC_ABSENT_FLAG)
		st->counters.updated += n;
	else
		st->counters.deleted += n;
	runlog_progress(st->run_id, &st->counters);
	xact_commit(cxt);
	if (n > 0)
		ereport(phsync_log_runs == PHSYNC_LOG_RUNS_ALL ? LOG : DEBUG1,
				(errmsg("phsync run %lld: %lld row(s) of %s are gone from PostHog: %s",
						(long long) st->run_id, (long long) n, st->target->display,
						mode == PHSYNC_ABSENT_FLAG ? "flagged deleted" : "deleted")));
}

/*
 * The body of a run; errors propagate to run_job().
 */
static void
run_body(PhsyncRunState *st, PhsyncJob *job)
{
	TimestampTz started = GetCurrentTimestamp();
	TimestampTz until = started - SETTLE_USECS;
	TimestampTz since;

	run_prepare(st);
	if (job->trigger == PHSYNC_TRIGGER_VERIFY)
	{
		verify_run(st, job->from, job->to, job->bucket, job->repair);
		return;
	}
	if (job->bounded)
		until = Min(until, job->to);
	since = window_start(st, job, until);

	if (!job->bounded)
	{
		/* a backfill's row keeps the range it was asked for */
		MemoryContext cxt = xact_begin();

		runlog_set_window(st->run_id, since, Max(since, until));
		xact_commit(cxt);
	}

	if (since < until)
		fetch_window(st, since, until);
	/* only after a read: no keys seen is not "PostHog has none" */
	if (st->track_keys && since < until)
		mark_absent(st, since, until);

	ereport(phsync_log_runs == PHSYNC_LOG_RUNS_ALL ? LOG : DEBUG1,
			(errmsg("phsync run %lld (sync %s) into %s: %s to %s, %d pages, %lld rows received, %lld inserted, %lld updated, %lld deleted, %lld rejected, %d retries, %d throttle waits, %.1f s",
					(long long) st->run_id, st->sync->name, st->target->display,
					phsync_format_timestamp(since), phsync_format_timestamp(until),
					st->counters.pages, (long long) st->counters.received,
					(long long) st->counters.inserted, (long long) st->counters.updated,
					(long long) st->counters.deleted,
					(long long) st->counters.rejected, st->counters.retries,
					st->counters.throttled,
					(double) (GetCurrentTimestamp() - started) / USECS_PER_SEC)));
}

/*
 * The text phsync.runs.error holds for an error: its message, and its
 * detail after a colon.
 */
static char *
error_text(ErrorData *edata)
{
	return edata->detail ? psprintf("%s: %s", edata->message, edata->detail) :
		pstrdup(edata->message);
}

/*
 * In run_job()'s catch: log the run's error (unless phsync.log_runs is
 * none) and return a copy of it.  A
 * run stopped by its cancel's SIGINT (phsync_cancel(), or the session that
 * asked for it giving up) ends inside PostgreSQL with "canceling statement
 * due to user request": it says which run and why instead, as
 * shmem_check_cancel() does, and is logged as a LOG, not an ERROR.
 */
static ErrorData *
run_error(MemoryContext cxt, int64 run_id)
{
	const char *why = shmem_cancel_reason();
	ErrorData  *edata;

	if (why == NULL || geterrcode() != ERRCODE_QUERY_CANCELED)
	{
		/* phsync.runs and the caller still get it under log_runs = none */
		if (phsync_log_runs != PHSYNC_LOG_RUNS_NONE)
			EmitErrorReport();
		return xact_recover(cxt);
	}
	edata = xact_recover(cxt);
	if (edata->message && strncmp(edata->message, "canceling statement", 19) == 0)
	{
		edata->message = psprintf("phsync run %lld was cancelled", (long long) run_id);
		edata->detail = pstrdup(why);
	}
	ereport(phsync_log_runs == PHSYNC_LOG_RUNS_NONE ? DEBUG1 : LOG,
			(errcode(edata->sqlerrcode),
			 errmsg_internal("%s", edata->message),
			 edata->detail ? errdetail_internal("%s", edata->detail) : 0));
	return edata;
}

/*
 * Carry out one job: a run of one sync (scheduled, manual or a backfill)
 * or a verification.  Never raises an error (except FATAL on shutdown): a
 * failure is logged, recorded in phsync.runs and handed back in outcome,
 * allocated in the caller's memory context.
 */
void
run_job(PhsyncJob *job, PhsyncOutcome *outcome)
{
	MemoryContext outer = CurrentMemoryContext;
	MemoryContext run_cxt;
	PhsyncRunState st;

	memset(outcome, 0, sizeof(*outcome));
	memset(&st, 0, sizeof(st));
	/* see shmem_worker_cancellable(); a stale cancel is not this run's */
	shmem_worker_cancellable(true);
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
		shmem_set_run(st.run_id, job->sync->name);
		ereport(phsync_log_runs == PHSYNC_LOG_RUNS_ALL ? LOG : DEBUG1,
				(errmsg("phsync run %lld (%s of sync %s) started",
						(long long) st.run_id, trigger_name(job->trigger), job->sync->name)));

		run_body(&st, job);
		release(&st);
		runlog_finish(st.run_id, PHSYNC_RUN_SUCCEEDED, NULL, &st.counters);
		outcome->ok = true;
	}
	PG_CATCH();
	{
		HOLD_INTERRUPTS();
		outcome->error = run_error(outer, st.run_id);
		release(&st);
		RESUME_INTERRUPTS();
		outcome->ok = false;
	}
	PG_END_TRY();
	shmem_worker_cancellable(false);

	/*
	 * Record the failure outside the catch block: if even that fails (the
	 * database refuses writes, say), the worker must go on; the run stays
	 * "running" and is marked failed when the worker next starts.
	 */
	if (!outcome->ok && outcome->run_id != 0)
	{
		PG_TRY();
		{
			runlog_finish(outcome->run_id,
						  outcome->error->sqlerrcode == ERRCODE_QUERY_CANCELED ?
						  PHSYNC_RUN_CANCELLED : PHSYNC_RUN_FAILED,
						  error_text(outcome->error), &st.counters);
		}
		PG_CATCH();
		{
			EmitErrorReport();
			FreeErrorData(xact_recover(outer));
		}
		PG_END_TRY();
	}

	/* what the target's code left in the session goes with the run */
	xact_reset_session();
	shmem_set_run(0, NULL);
	MemoryContextSwitchTo(outer);
	MemoryContextDelete(run_cxt);
	pgstat_report_activity(STATE_IDLE, NULL);
}
