/*-------------------------------------------------------------------------
 *
 * runlog.c
 *		The phsync.runs table: one row per run, written by the worker.
 *
 * runlog_start, runlog_begin_queued, runlog_next_queued, runlog_fail_queued,
 * runlog_finish, runlog_fail_orphans, runlog_day_verified and
 * runlog_prune run in a transaction of their own (the worker's, between
 * runs or pages); the others run inside the caller's, with SPI connected,
 * so that a page's counters commit with its rows.
 *
 * Triggers and statuses are enums in C; their names are the values of
 * phsync.runs.trigger and phsync.verifications.status.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/builtins.h"

#include "phsync.h"

/*
 * The name of a trigger, as phsync.runs.trigger holds it.
 */
const char *
trigger_name(PhsyncTrigger trigger)
{
	switch (trigger)
	{
		case PHSYNC_TRIGGER_SCHEDULE:
			return "schedule";
		case PHSYNC_TRIGGER_MANUAL:
			return "manual";
		case PHSYNC_TRIGGER_BACKFILL:
			return "backfill";
		case PHSYNC_TRIGGER_VERIFY:
			return "verify";
	}
	return "?";					/* keep compiler quiet */
}

static const char *
run_status_name(PhsyncRunStatus status)
{
	switch (status)
	{
		case PHSYNC_RUN_SUCCEEDED:
			return "succeeded";
		case PHSYNC_RUN_FAILED:
			return "failed";
		case PHSYNC_RUN_CANCELLED:
			return "cancelled";
	}
	return "?";					/* keep compiler quiet */
}

static const char *
bucket_status_name(PhsyncBucketStatus status)
{
	switch (status)
	{
		case PHSYNC_BUCKET_OK:
			return "ok";
		case PHSYNC_BUCKET_MISSING:
			return "missing";
		case PHSYNC_BUCKET_EXTRA:
			return "extra";
		case PHSYNC_BUCKET_DIFFERENT:
			return "different";
		case PHSYNC_BUCKET_REPAIRED:
			return "repaired";
	}
	return "?";					/* keep compiler quiet */
}

/*
 * Execute one statement with parameters; error if it does not do what a
 * run-log statement must.
 */
static void
runlog_exec(const char *sql, int nargs, Oid *types, Datum *values,
			const char *nulls, int expected)
{
	int			ret;

	Assert(phsync_spi_connected());
	ret = phsync_spi_exec(sql, nargs, types, values, nulls, false, 0);

	if (ret < 0 || (expected >= 0 && SPI_processed != (uint64) expected))
		elog(ERROR, "phsync run log statement failed: %s", SPI_result_code_string(ret));
}

/*
 * Insert a 'running' row and return its id.  from and to, when given, are
 * the bounds of the run's window (a verification's range).
 */
int64
runlog_start(PhsyncTrigger trigger, const char *sync, const char *target,
			 TimestampTz *from, TimestampTz *to)
{
	Oid			types[5] = {TEXTOID, TEXTOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID};
	Datum		values[5];
	char		nulls[5] = {' ', ' ', ' ', from ? ' ' : 'n', to ? ' ' : 'n'};
	bool		isnull;
	int64		id;
	MemoryContext cxt = xact_begin();

	values[0] = CStringGetTextDatum(trigger_name(trigger));
	values[1] = CStringGetTextDatum(sync);
	values[2] = CStringGetTextDatum(target);
	values[3] = from ? TimestampTzGetDatum(*from) : (Datum) 0;
	values[4] = to ? TimestampTzGetDatum(*to) : (Datum) 0;
	if (phsync_spi_exec("INSERT INTO phsync.runs (trigger, sync, target, window_from, window_until) "
							  "VALUES ($1, $2, $3, $4, $5) RETURNING id",
							  5, types, values, nulls, false, 1) != SPI_OK_INSERT_RETURNING ||
		SPI_processed != 1)
		elog(ERROR, "could not insert into phsync.runs");
	id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
									 SPI_tuptable->tupdesc, 1, &isnull));
	xact_commit(cxt);
	return id;
}

/*
 * The owner of a queued run: its sync's, the bootstrap superuser for the
 * default sync (and for a sync dropped since).  In SQL, for a row r of
 * phsync.runs joined with phsync.syncs s on the sync's name.
 */
#define QUEUED_OWNER "COALESCE(s.owner::pg_catalog.oid, 10::pg_catalog.oid)"

/*
 * Refuse to queue one more run of sync when its owner has
 * phsync.max_queued_runs queued already.  Under a transaction-level lock,
 * counting the rows of the caller's statement too (not read-only: a
 * read-only query sees only the statement's snapshot), so that neither one
 * statement nor concurrent sessions get past it.
 */
static void
check_queue_quota(Datum sync)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {sync};
	bool		isnull;
	Oid			owner;
	int64		queued;

	if (phsync_spi_exec("SELECT pg_catalog.pg_advisory_xact_lock(" PHSYNC_LOCK_CLASS ", 2)",
						0, NULL, NULL, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not lock phsync's queue");
	if (phsync_spi_exec("WITH o AS (SELECT COALESCE((SELECT owner::pg_catalog.oid FROM phsync.syncs "
						"WHERE name = $1), 10::pg_catalog.oid) AS owner) "
						"SELECT o.owner, (SELECT pg_catalog.count(*) FROM phsync.runs r "
						"LEFT JOIN phsync.syncs s ON s.name = r.sync "
						"WHERE r.status = 'queued' AND " QUEUED_OWNER " = o.owner) FROM o",
						1, types, values, NULL, false, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not count the queued runs");
	owner = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	queued = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	if (queued >= phsync_max_queued_runs)
	{
		const char *name = GetUserNameFromId(owner, true);

		ereport(ERROR,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("role \"%s\" already has %lld queued phsync runs, the most phsync.max_queued_runs allows",
						name ? name : "?", (long long) queued),
				 errhint("Wait for them to run, cancel some with phsync_cancel(), or ask a superuser to raise phsync.max_queued_runs.")));
	}
}

/*
 * Queue a backfill of [from, to) (inside the caller's transaction): a run
 * in status 'queued', which the worker takes after the caller commits.
 * Returns its row, shaped as tupdesc.
 */
Datum
runlog_queue(PhsyncTrigger trigger, const char *sync, const char *target,
			 const TimestampTz *from, const TimestampTz *to, TupleDesc tupdesc)
{
	Oid			types[5] = {TEXTOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID, TEXTOID};
	Datum		values[5];
	char		nulls[5] = {' ', ' ', from ? ' ' : 'n', to ? ' ' : 'n', ' '};

	Assert(phsync_spi_connected());
	values[0] = CStringGetTextDatum(sync);
	check_queue_quota(values[0]);
	values[1] = CStringGetTextDatum(target);
	values[2] = from ? TimestampTzGetDatum(*from) : (Datum) 0;
	values[3] = to ? TimestampTzGetDatum(*to) : (Datum) 0;
	values[4] = CStringGetTextDatum(trigger_name(trigger));
	if (phsync_spi_exec("INSERT INTO phsync.runs (trigger, status, sync, target, window_from, window_until) "
							  "VALUES ($5, 'queued', $1, $2, $3, $4) RETURNING *",
							  5, types, values, nulls, false, 1) != SPI_OK_INSERT_RETURNING ||
		SPI_processed != 1)
		elog(ERROR, "could not queue a run of sync \"%s\"", sync);
	return PointerGetDatum(SPI_returntuple(SPI_tuptable->vals[0], tupdesc));
}

/*
 * A queued run (a backfill) starts now.
 */
void
runlog_begin_queued(int64 run_id)
{
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum(run_id)};
	MemoryContext cxt = xact_begin();

	runlog_exec("UPDATE phsync.runs SET status = 'running', started_at = now() "
				"WHERE id = $1 AND status = 'queued'", 1, types, values, NULL, 1);
	xact_commit(cxt);
}

/*
 * The next queued run: its id, sync, bounds and owner.  Owners in turn:
 * the oldest run of the first owner after *owner (by OID, wrapping), so
 * that one owner's queue never keeps another's runs waiting behind all of
 * it.  False when none is queued.
 */
bool
runlog_next_queued(int64 *run_id, bool *manual, char **sync, TimestampTz *from, TimestampTz *to,
				   Oid *owner)
{
	bool		found;
	Oid			types[1] = {OIDOID};
	Datum		values[1] = {ObjectIdGetDatum(*owner)};
	MemoryContext cxt = xact_begin();

	/* a backfill queued before this cluster took the database over came with a restore */
	runlog_exec("UPDATE phsync.runs SET status = 'failed', finished_at = clock_timestamp(), "
				"error = 'queued before this database was restored; call phsync_backfill() again to run it here' "
				"WHERE status = 'queued' AND started_at < (SELECT min(registered_at) FROM phsync.cluster)",
				0, NULL, NULL, NULL, -1);
	if (phsync_spi_exec("SELECT r.id, r.sync, r.window_from, r.window_until, " QUEUED_OWNER ", "
						"r.trigger = 'manual' "
						"FROM phsync.runs r LEFT JOIN phsync.syncs s ON s.name = r.sync "
						"WHERE r.status = 'queued' "
						"ORDER BY " QUEUED_OWNER " <= $1, " QUEUED_OWNER ", r.id LIMIT 1",
						1, types, values, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read phsync.runs");
	found = SPI_processed == 1;
	if (found)
	{
		HeapTuple	tup = SPI_tuptable->vals[0];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;

		*run_id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		*sync = MemoryContextStrdup(cxt, SPI_getvalue(tup, desc, 2));
		*from = DatumGetTimestampTz(SPI_getbinval(tup, desc, 3, &isnull));
		*to = DatumGetTimestampTz(SPI_getbinval(tup, desc, 4, &isnull));
		*owner = DatumGetObjectId(SPI_getbinval(tup, desc, 5, &isnull));
		*manual = DatumGetBool(SPI_getbinval(tup, desc, 6, &isnull));
	}
	xact_commit(cxt);
	return found;
}

/*
 * A queued run that cannot be carried out (its sync is gone) fails.
 */
void
runlog_fail_queued(int64 run_id, const char *error)
{
	Oid			types[2] = {INT8OID, TEXTOID};
	Datum		values[2] = {Int64GetDatum(run_id), CStringGetTextDatum(error)};
	MemoryContext cxt = xact_begin();

	runlog_exec("UPDATE phsync.runs SET status = 'failed', started_at = now(), "
				"finished_at = clock_timestamp(), error = $2 WHERE id = $1",
				2, types, values, NULL, -1);
	xact_commit(cxt);
}

void
runlog_set_window(int64 run_id, TimestampTz from, TimestampTz until)
{
	Oid			types[3] = {INT8OID, TIMESTAMPTZOID, TIMESTAMPTZOID};
	Datum		values[3] = {Int64GetDatum(run_id), TimestampTzGetDatum(from),
	TimestampTzGetDatum(until)};

	runlog_exec("UPDATE phsync.runs SET window_from = $2, window_until = $3 WHERE id = $1",
				3, types, values, NULL, 1);
}

#define COUNTERS_SET "pages = $2, requests = $3, retries = $4, rows_received = $5, " \
	"rows_inserted = $6, rows_rejected = $7, rows_updated = $8, rows_deleted = $9"
#define NCOUNTERS 9				/* $1 (the run) and $2 .. $9 */

static void
counter_args(int64 run_id, PhsyncCounters *c, Oid *types, Datum *values)
{
	types[0] = INT8OID;
	values[0] = Int64GetDatum(run_id);
	types[1] = INT4OID;
	values[1] = Int32GetDatum(c->pages);
	types[2] = INT4OID;
	values[2] = Int32GetDatum(c->requests);
	types[3] = INT4OID;
	values[3] = Int32GetDatum(c->retries);
	types[4] = INT8OID;
	values[4] = Int64GetDatum(c->received);
	types[5] = INT8OID;
	values[5] = Int64GetDatum(c->inserted);
	types[6] = INT8OID;
	values[6] = Int64GetDatum(c->rejected);
	types[7] = INT8OID;
	values[7] = Int64GetDatum(c->updated);
	types[8] = INT8OID;
	values[8] = Int64GetDatum(c->deleted);
}

/*
 * Store the run's counters (inside the transaction that loads rows, so
 * that they are what the table holds).
 */
void
runlog_progress(int64 run_id, PhsyncCounters *c)
{
	Oid			types[NCOUNTERS];
	Datum		values[NCOUNTERS];

	counter_args(run_id, c, types, values);
	runlog_exec("UPDATE phsync.runs SET " COUNTERS_SET " WHERE id = $1",
				NCOUNTERS, types, values, NULL, 1);
}

/*
 * The same, with the run's low-water mark: every row of its window before
 * it is loaded.  One UPDATE per chunk loaded.
 */
void
runlog_progress_resume(int64 run_id, PhsyncCounters *c, TimestampTz resume_from)
{
	Oid			types[NCOUNTERS + 1];
	Datum		values[NCOUNTERS + 1];

	counter_args(run_id, c, types, values);
	types[NCOUNTERS] = TIMESTAMPTZOID;
	values[NCOUNTERS] = TimestampTzGetDatum(resume_from);
	runlog_exec("UPDATE phsync.runs SET " COUNTERS_SET ", resume_from = $10 WHERE id = $1",
				NCOUNTERS + 1, types, values, NULL, 1);
}

/*
 * Where a run of sync must start so that nothing an earlier run left half
 * done is skipped: the low-water mark of the sync's last finished run of
 * the same kind, when that run did not succeed (several slices commit out
 * of order, so the target's max(cursor) may be past rows it lacks).  For
 * a backfill, only a backfill whose range holds that mark within [from,
 * to) counts.  False when there is no such run.
 */
bool
runlog_resume_point(const char *sync, bool backfill, TimestampTz from, TimestampTz to,
					TimestampTz *resume_from)
{
	Oid			types[4] = {TEXTOID, BOOLOID, TIMESTAMPTZOID, TIMESTAMPTZOID};
	Datum		values[4] = {CStringGetTextDatum(sync), BoolGetDatum(backfill),
	TimestampTzGetDatum(from), TimestampTzGetDatum(to)};
	bool		isnull;

	runlog_exec("SELECT resume_from FROM ("
				"SELECT status, resume_from FROM phsync.runs "
				"WHERE sync = $1 AND status IN ('succeeded', 'failed', 'cancelled') "
				"AND CASE WHEN $2 THEN trigger = 'backfill' ELSE trigger IN ('schedule', 'manual') END "
				"ORDER BY id DESC LIMIT 1) last "
				"WHERE status <> 'succeeded' AND resume_from IS NOT NULL "
				"AND (NOT $2 OR (resume_from >= $3 AND resume_from < $4))",
				4, types, values, NULL, -1);
	if (SPI_processed != 1)
		return false;
	*resume_from = DatumGetTimestampTz(SPI_getbinval(SPI_tuptable->vals[0],
													 SPI_tuptable->tupdesc, 1, &isnull));
	return !isnull;
}

/*
 * Keep a row the target refused, as PostHog sent it, with the reason
 * (inside the page's transaction).
 */
void
runlog_reject(int64 run_id, const char *target, Datum columns, const char *row,
			  const char *error)
{
	Oid			types[5] = {INT8OID, TEXTOID, TEXTARRAYOID, TEXTOID, TEXTOID};
	Datum		values[5];

	values[0] = Int64GetDatum(run_id);
	values[1] = CStringGetTextDatum(target);
	values[2] = columns;
	values[3] = CStringGetTextDatum(row);
	values[4] = CStringGetTextDatum(error);
	runlog_exec("INSERT INTO phsync.rejects (run_id, target, columns, raw_row, error) "
				"VALUES ($1, $2, $3, $4, $5)", 5, types, values, NULL, 1);
}

/*
 * One bucket of a verification (inside the caller's transaction).
 */
void
runlog_verified(int64 run_id, TimestampTz bucket, TimestampTz until,
				int64 posthog, int64 local, const int64 *posthog_sum,
				const int64 *local_sum, PhsyncBucketStatus status)
{
	Oid			types[8] = {INT8OID, TIMESTAMPTZOID, TIMESTAMPTZOID, INT8OID, INT8OID, TEXTOID,
	INT8OID, INT8OID};
	Datum		values[8];
	char		nulls[8] = {' ', ' ', ' ', ' ', ' ', ' ', 'n', 'n'};

	values[0] = Int64GetDatum(run_id);
	values[1] = TimestampTzGetDatum(bucket);
	values[2] = TimestampTzGetDatum(until);
	values[3] = Int64GetDatum(posthog);
	values[4] = Int64GetDatum(local);
	values[5] = CStringGetTextDatum(bucket_status_name(status));
	values[6] = values[7] = (Datum) 0;
	if (posthog_sum)
	{
		values[6] = Int64GetDatum(*posthog_sum);
		values[7] = Int64GetDatum(*local_sum);
		nulls[6] = nulls[7] = ' ';
	}
	runlog_exec("INSERT INTO phsync.verifications (run_id, bucket, bucket_until, posthog_count, local_count, status, "
				"posthog_checksum, local_checksum) "
				"VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (run_id, bucket) DO UPDATE "
				"SET posthog_count = EXCLUDED.posthog_count, local_count = EXCLUDED.local_count, "
				"status = EXCLUDED.status, posthog_checksum = EXCLUDED.posthog_checksum, "
				"local_checksum = EXCLUDED.local_checksum", 8, types, values, nulls, 1);
}

/*
 * How many buckets of a verification differ (inside the caller's
 * transaction).
 */
void
runlog_set_mismatches(int64 run_id, int mismatches)
{
	Oid			types[2] = {INT8OID, INT4OID};
	Datum		values[2] = {Int64GetDatum(run_id), Int32GetDatum(mismatches)};

	runlog_exec("UPDATE phsync.runs SET verify_mismatches = $2 WHERE id = $1",
				2, types, values, NULL, 1);
}

/*
 * Mark the run succeeded, failed or cancelled, with its error and final
 * counters.
 */
void
runlog_finish(int64 run_id, PhsyncRunStatus status, const char *error, PhsyncCounters *c)
{
	Oid			types[NCOUNTERS + 2];
	Datum		values[NCOUNTERS + 2];
	char		nulls[NCOUNTERS + 2];
	MemoryContext cxt = xact_begin();

	memset(nulls, ' ', sizeof(nulls));
	counter_args(run_id, c, types, values);
	types[NCOUNTERS] = TEXTOID;
	values[NCOUNTERS] = CStringGetTextDatum(run_status_name(status));
	types[NCOUNTERS + 1] = TEXTOID;
	values[NCOUNTERS + 1] = error ? CStringGetTextDatum(error) : (Datum) 0;
	nulls[NCOUNTERS + 1] = error ? ' ' : 'n';
	runlog_exec("UPDATE phsync.runs SET " COUNTERS_SET ", status = $10, error = $11, "
				"finished_at = clock_timestamp() WHERE id = $1",
				NCOUNTERS + 2, types, values, nulls, 1);

	/*
	 * The push signal, delivered when the run's row commits.  Every role
	 * connected to the database may LISTEN: no error text, which may
	 * quote data; phsync.runs has it for those who may see the run.
	 */
	runlog_exec("SELECT pg_catalog.pg_notify('phsync', pg_catalog.json_build_object("
				"'sync', sync, 'run_id', id, 'trigger', trigger, 'status', status, "
				"'rows_received', rows_received, 'rows_inserted', rows_inserted, "
				"'rows_updated', rows_updated, 'rows_deleted', rows_deleted, "
				"'rows_rejected', rows_rejected, 'verify_mismatches', verify_mismatches)::pg_catalog.text) "
				"FROM phsync.runs WHERE id = $1",
				1, types, values, nulls, -1);
	xact_commit(cxt);
}

/*
 * When each sync's last scheduled run started (since this cluster took
 * the history over), or with `succeeded`, its last successful run that was
 * not a verification, as a list of PhsyncLastStart in the caller's memory
 * context; and when this cluster took the history over (0: never).  Needs
 * SPI connected.
 */
List *
runlog_last_starts(bool succeeded, TimestampTz *owned_since)
{
	MemoryContext cxt = CurrentMemoryContext;
	List	   *result = NIL;
	bool		isnull;
	uint64		i;

	runlog_exec("SELECT min(registered_at) FROM phsync.cluster", 0, NULL, NULL, NULL, 1);
	*owned_since = DatumGetTimestampTz(SPI_getbinval(SPI_tuptable->vals[0],
													 SPI_tuptable->tupdesc, 1, &isnull));
	if (isnull)
		*owned_since = 0;
	runlog_exec(succeeded ?
				"SELECT sync, max(started_at) FROM phsync.runs WHERE status = 'succeeded' "
				"AND trigger <> 'verify' GROUP BY sync" :
				"SELECT sync, max(started_at) FROM phsync.runs WHERE trigger = 'schedule' "
				"AND started_at >= coalesce((SELECT min(registered_at) FROM phsync.cluster), '-infinity') "
				"GROUP BY sync", 0, NULL, NULL, NULL, -1);
	for (i = 0; i < SPI_processed; i++)
	{
		MemoryContext old = MemoryContextSwitchTo(cxt);
		PhsyncLastStart *l = palloc(sizeof(PhsyncLastStart));

		l->sync = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
		l->at = DatumGetTimestampTz(SPI_getbinval(SPI_tuptable->vals[i],
												  SPI_tuptable->tupdesc, 2, &isnull));
		result = lappend(result, l);
		MemoryContextSwitchTo(old);
	}
	return result;
}

/* sync's start in a list of runlog_last_starts() (0: none) */
TimestampTz
runlog_last_start(List *starts, const char *sync)
{
	ListCell   *lc;

	foreach(lc, starts)
	{
		PhsyncLastStart *l = lfirst(lc);

		if (strcmp(l->sync, sync) == 0)
			return l->at;
	}
	return 0;
}

/*
 * Whether sync has a successful verification of exactly [from, to), in a
 * transaction of its own: the scheduled check of a day runs once.
 */
bool
runlog_day_verified(const char *sync, TimestampTz from, TimestampTz to)
{
	Oid			types[3] = {TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID};
	Datum		values[3] = {CStringGetTextDatum(sync), TimestampTzGetDatum(from), TimestampTzGetDatum(to)};
	bool		found;
	MemoryContext cxt = xact_begin();

	runlog_exec("SELECT 1 FROM phsync.runs WHERE sync = $1 AND trigger = 'verify' "
				"AND status = 'succeeded' AND window_from = $2 AND window_until = $3 LIMIT 1",
				3, types, values, NULL, -1);
	found = SPI_processed > 0;
	xact_commit(cxt);
	return found;
}

/*
 * The sync of run run_id (inside the caller's transaction), and whether it
 * is queued.  False when there is no such run, or it is over.
 */
bool
runlog_run_sync(int64 run_id, char **sync, bool *queued)
{
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum(run_id)};

	runlog_exec("SELECT sync, status FROM phsync.runs WHERE id = $1 "
				"AND status IN ('queued', 'running')", 1, types, values, NULL, -1);
	if (SPI_processed != 1)
		return false;
	*sync = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	*queued = strcmp(SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2), "queued") == 0;
	return true;
}

/*
 * Cancel a queued run before it starts (inside the caller's transaction).
 * False when it is not queued any more.
 */
bool
runlog_cancel_queued(int64 run_id)
{
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum(run_id)};

	runlog_exec("UPDATE phsync.runs SET status = 'cancelled', finished_at = pg_catalog.clock_timestamp(), "
				"error = 'cancelled by phsync_cancel() before it started' "
				"WHERE id = $1 AND status = 'queued'", 1, types, values, NULL, -1);
	return SPI_processed == 1;
}

/*
 * Runs still 'running' when the worker starts were cut short by a crash or
 * a shutdown: nothing is running them any more.
 */
int
runlog_fail_orphans(void)
{
	int			n;
	MemoryContext cxt = xact_begin();

	runlog_exec("UPDATE phsync.runs SET status = 'failed', finished_at = clock_timestamp(), "
				"error = 'the phsync worker stopped before the run finished (crash or shutdown)' "
				"|| CASE trigger WHEN 'backfill' THEN '; call phsync_backfill() again to resume it' ELSE '' END "
				"WHERE status = 'running'", 0, NULL, NULL, NULL, -1);
	n = (int) SPI_processed;
	xact_commit(cxt);
	return n;
}

/*
 * Make this cluster the owner of the database's run history (inside the
 * caller's transaction), and say how it came to be here:
 *	- OURS: it already was (a restart, a standby promoted, a base backup:
 *	  the same system identifier);
 *	- NEW: phsync.cluster is empty: a new install, or a database restored
 *	  from a dump (the table's rows are not dumped), whose history
 *	  (scheduled runs, queued backfills) happened elsewhere;
 *	- UPGRADED: it names another cluster: the data files themselves were
 *	  moved, which only pg_upgrade does (a physical copy keeps the
 *	  identifier), so the history is this database's own and stays so.
 */
PhsyncClaim
runlog_claim_cluster(void)
{
	runlog_exec("SELECT system_identifier OPERATOR(pg_catalog.=) "
				"(SELECT system_identifier FROM pg_catalog.pg_control_system()) "
				"FROM phsync.cluster", 0, NULL, NULL, NULL, -1);
	if (SPI_processed > 0)
	{
		bool		isnull;

		if (DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull)))
			return PHSYNC_CLAIM_OURS;
		/* (as DELETE and INSERT: the worker's role has those rights) */
		runlog_exec("WITH old AS (DELETE FROM phsync.cluster RETURNING registered_at) "
					"INSERT INTO phsync.cluster (system_identifier, registered_at) "
					"SELECT system_identifier, (SELECT pg_catalog.min(registered_at) FROM old) "
					"FROM pg_catalog.pg_control_system()",
					0, NULL, NULL, NULL, 1);
		return PHSYNC_CLAIM_UPGRADED;
	}
	runlog_exec("INSERT INTO phsync.cluster (system_identifier) "
				"SELECT system_identifier FROM pg_catalog.pg_control_system()",
				0, NULL, NULL, NULL, 1);
	return PHSYNC_CLAIM_NEW;
}

/*
 * Delete runs (and, by cascade, their rejects) that started more than
 * `days` days ago, a thousand at a time, each batch in its own transaction
 * so that nothing is locked for long.  Returns how many went.
 */
int64
runlog_prune(int days)
{
	Oid			types[1] = {INT4OID};
	Datum		values[1] = {Int32GetDatum(days)};
	int64		total = 0;
	uint64		n;

	if (days <= 0)
		return 0;
	do
	{
		MemoryContext cxt;

		CHECK_FOR_INTERRUPTS();
		cxt = xact_begin();
		runlog_exec("DELETE FROM phsync.runs WHERE id IN ("
					"SELECT id FROM phsync.runs WHERE status <> 'running' "
					"AND started_at < now() - make_interval(days => $1) ORDER BY id LIMIT 1000)",
					1, types, values, NULL, -1);
		n = SPI_processed;
		total += n;
		xact_commit(cxt);
	} while (n == 1000);
	return total;
}
