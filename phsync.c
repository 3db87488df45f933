/*-------------------------------------------------------------------------
 *
 * phsync.c
 *		Entry point of phsync: _PG_init and the SQL-callable functions.
 *
 * Functions that need the worker (phsync_run_now(), phsync_verify()) hand
 * it a request through shared memory and wait for its answer; a failure
 * is raised here as the worker's run raised it (message, detail, hint),
 * with the run in the context.  The others work in the calling session.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/reloptions.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/namespace.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_type.h"
#include "common/int.h"
#include "commands/dbcommands.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/latch.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/regproc.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"
#include "utils/wait_event.h"

#include "phsync.h"

PG_MODULE_MAGIC;

/* at most one progress NOTICE this often from phsync_run_now() */
#define PROGRESS_NOTICE_MS 5000
/* how long phsync_run_now() waits for a worker that is not there */
#define WORKER_WAIT_MS 60000

PG_FUNCTION_INFO_V1(phsync_run_now);
PG_FUNCTION_INFO_V1(phsync_backfill);
PG_FUNCTION_INFO_V1(phsync_verify);
PG_FUNCTION_INFO_V1(phsync_sync_state);
PG_FUNCTION_INFO_V1(phsync_next_run);
PG_FUNCTION_INFO_V1(phsync_next_run_of);
PG_FUNCTION_INFO_V1(phsync_doctor);
PG_FUNCTION_INFO_V1(phsync_add_sync);
PG_FUNCTION_INFO_V1(phsync_alter_sync);
PG_FUNCTION_INFO_V1(phsync_drop_sync);
PG_FUNCTION_INFO_V1(phsync_create_table);
PG_FUNCTION_INFO_V1(phsync_cancel);
PG_FUNCTION_INFO_V1(phsync_fdw_validator);
PG_FUNCTION_INFO_V1(phsync_query);
PG_FUNCTION_INFO_V1(phsync_query_json);
PG_FUNCTION_INFO_V1(phsync_describe);
PG_FUNCTION_INFO_V1(phsync_tables);
PG_FUNCTION_INFO_V1(phsync_create_table_for_query);

void		_PG_init(void);

/*
 * Module load: settings always; the worker and shared memory only when
 * loaded through shared_preload_libraries, and the worker not in the
 * servers pg_upgrade starts.
 */
void
_PG_init(void)
{
	settings_define();
	if (!process_shared_preload_libraries_in_progress)
		return;
	shmem_install_hooks();
	roles_install_hook();
	/* pg_upgrade's servers (-b) must not sync: no worker then */
	if (!IsBinaryUpgrade)
		worker_register();
}

/* ---------- arguments ---------- */

static void
require_arg(FunctionCallInfo fcinfo, int arg, const char *name)
{
	if (PG_ARGISNULL(arg))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", name)));
}

/* a text[] argument as a list of strings (NIL when NULL); no null elements */
static List *
text_array_arg(FunctionCallInfo fcinfo, int arg, const char *name)
{
	Datum	   *elems;
	bool	   *nulls;
	int			n,
				i;
	List	   *result = NIL;

	if (PG_ARGISNULL(arg))
		return NIL;
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(arg), TEXTOID, -1, false, TYPALIGN_INT,
					  &elems, &nulls, &n);
	for (i = 0; i < n; i++)
	{
		if (nulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("%s must not hold nulls", name)));
		result = lappend(result, TextDatumGetCString(elems[i]));
	}
	return result;
}

static char *
text_arg(FunctionCallInfo fcinfo, int arg)
{
	return PG_ARGISNULL(arg) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(arg));
}

/*
 * An interval in microseconds: days and smaller units only, overflow
 * checked.
 */
static int64
interval_usecs(Interval *iv, const char *what)
{
	int64		days;
	int64		result;

	if (iv->month != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be given in days, hours or smaller units, not months", what)));
	if (pg_mul_s64_overflow((int64) iv->day, USECS_PER_DAY, &days) ||
		pg_add_s64_overflow(days, iv->time, &result))
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("%s is out of range", what)));
	return result;
}

/*
 * to - from in microseconds, overflow checked.
 */
static int64
range_usecs(TimestampTz from, TimestampTz to)
{
	int64		diff;

	if (pg_sub_s64_overflow(to, from, &diff))
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("the range from \"from\" to \"to\" is too long")));
	return diff;
}

/*
 * Run fn() with phsync's own tables readable and writable: they belong to
 * the superuser who created the extension, and the SQL functions that
 * need them are not SECURITY DEFINER, so that they know who calls them.
 */
static void
as_phsync(void (*fn) (void *), void *arg)
{
	PhsyncAsRole save;

	as_role_begin(BOOTSTRAP_SUPERUSERID, false, &save);
	fn(arg);
	as_role_end(&save);
}

/*
 * The sync of that name, read with phsync's rights (SPI connected).
 */
typedef struct FindSync
{
	const char *name;
	PhsyncSync *sync;
} FindSync;

static void
find_sync_fn(void *arg)
{
	FindSync   *f = (FindSync *) arg;

	f->sync = linitial(sync_list(f->name, false));
}

static PhsyncSync *
find_sync(const char *name)
{
	FindSync	f = {name, NULL};

	as_phsync(find_sync_fn, &f);
	return f.sync;
}

/*
 * The current user must own sync (be a member of its owner) or be a
 * superuser.
 */
static void
check_sync_owner(PhsyncSync *sync, const char *what)
{
	sync_check_owner(sync->name, sync->owner, what);
}

/*
 * A sync without a cursor (a preset read whole on every run) has nothing
 * to backfill or verify by time.
 */
static void
require_cursor(PhsyncSync *sync, const char *what)
{
	if (sync->cursor)
		return;
	ereport(ERROR,
			(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
			 errmsg("sync %s has no cursor to %s by", sync->name, what),
			 errdetail("The %s preset is read whole on every run: after each run the table equals PostHog's.",
					   preset_name(sync->preset))));
}

static void
check_range(TimestampTz from, TimestampTz to)
{
	if (TIMESTAMP_NOT_FINITE(from) || TIMESTAMP_NOT_FINITE(to))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("\"from\" and \"to\" must be finite timestamps")));
	if (to <= from)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("\"from\" must be before \"to\"")));
}

/* ---------- asking the worker ---------- */

/*
 * Can the worker be asked from here?
 */
static void
check_callable_here(void)
{
	char	   *dbname;
	char		problem[PHSYNC_MAX_MESSAGE];
	char		fix[PHSYNC_MAX_MESSAGE];

	if (!shmem_available())
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("phsync is not loaded through shared_preload_libraries"),
				 errhint("Add phsync to shared_preload_libraries in postgresql.conf and restart the server.")));
	if (RecoveryInProgress())
		ereport(ERROR,
				(errcode(ERRCODE_READ_ONLY_SQL_TRANSACTION),
				 errmsg("phsync cannot run during recovery"),
				 errhint("Call phsync_run_now() on the primary server.")));
	dbname = get_database_name(MyDatabaseId);
	if (dbname == NULL || strcmp(dbname, phsync_database) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("phsync runs in database \"%s\", not in this one", phsync_database),
				 errhint("Connect to database \"%s\", or set phsync.database and restart the server.",
						 phsync_database)));
	/* the worker would only answer with it, or never take the run */
	if (shmem_role_problem(problem, fix))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("%s", problem),
				 errdetail("The phsync worker runs no sync until it has them."),
				 errhint("%s", fix)));
}

/*
 * Error context while phsync_run_now() waits: a cancel (statement_timeout,
 * Ctrl-C) of the statement cancels the run it waits for too.
 */
static void
wait_context(void *arg)
{
	PhsyncWorkerState w;

	shmem_worker_state(&w);
	if (w.run_id)
		errcontext("while waiting for phsync run %lld, which is cancelled with this statement",
				   (long long) w.run_id);
	else
		errcontext("while waiting for the phsync worker to start a run");
}

/*
 * Wait until the worker has answered request `ticket`.
 */
static void
wait_for_answer(uint64 ticket, PhsyncAnswer *answer)
{
	ErrorContextCallback errcallback;
	TimestampTz last_notice = GetCurrentTimestamp();
	TimestampTz absent_since = 0;
	int			noticed_pages = 0;

	errcallback.callback = wait_context;
	errcallback.arg = NULL;
	errcallback.previous = error_context_stack;
	error_context_stack = &errcallback;

	for (;;)
	{
		bool		worker_absent;

		if (shmem_read_answer(ticket, answer, &worker_absent))
			break;

		/* the postmaster restarts a dead worker within seconds */
		if (!worker_absent)
			absent_since = 0;
		else if (absent_since == 0)
			absent_since = GetCurrentTimestamp();
		else if (TimestampDifferenceExceeds(absent_since, GetCurrentTimestamp(), WORKER_WAIT_MS))
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("the phsync worker is not running"),
					 errhint("The server log says why it does not start.")));

		if (phsync_progress_notices &&
			TimestampDifferenceExceeds(last_notice, GetCurrentTimestamp(), PROGRESS_NOTICE_MS))
		{
			PhsyncWorkerState w;

			shmem_worker_state(&w);
			if (w.run_id && w.pages > noticed_pages)
			{
				ereport(NOTICE,
						(errmsg("phsync run %lld: %d pages, %lld rows so far",
								(long long) w.run_id, w.pages, (long long) w.received)));
				noticed_pages = w.pages;
			}
			last_notice = GetCurrentTimestamp();
		}

		(void) WaitLatch(MyLatch,
						 WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 1000L, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
	error_context_stack = errcallback.previous;
}

/*
 * Hand a request to the worker, wait for its answer and raise the run's
 * error if it failed, as the run raised it (postgres_fdw relays a remote
 * error the same way): same SQLSTATE, message, detail and hint, with the
 * run in the context.
 */
static void
submit_request(PhsyncRequest *request, PhsyncAnswer *answer)
{
	uint64		ticket;
	int64		busy_run;
	int			ahead;

	check_callable_here();
	ticket = shmem_submit_request(request, &busy_run, &ahead);
	if (ticket == 0)
		ereport(ERROR,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("too many sessions are waiting for the phsync worker"),
				 errhint("Wait for their runs to end; SELECT * FROM phsync.runs ORDER BY id DESC shows their progress.")));
	if (busy_run != 0 && ahead == 0)
		ereport(NOTICE,
				(errmsg("the phsync worker is busy; this request is queued"),
				 errdetail("Run %lld is in progress.", (long long) busy_run)));
	else if (ahead > 0)
		ereport(NOTICE,
				(errmsg("the phsync worker is busy; this request is queued"),
				 errdetail_plural("%d earlier request waits.", "%d earlier requests wait.",
								  ahead, ahead)));

	PG_TRY();
	{
		wait_for_answer(ticket, answer);
	}
	PG_CATCH();
	{
		shmem_withdraw_request(ticket);
		PG_RE_THROW();
	}
	PG_END_TRY();

	if (!answer->ok)
		ereport(ERROR,
				(errcode(answer->sqlerrcode ? answer->sqlerrcode : ERRCODE_INTERNAL_ERROR),
				 errmsg_internal("%s", answer->message),
				 answer->detail[0] ? errdetail_internal("%s", answer->detail) : 0,
				 answer->hint[0] ? errhint("%s", answer->hint) : 0,
				 answer->failed_run_id ?
				 errcontext("phsync run %lld of sync %s", (long long) answer->failed_run_id,
							answer->failed_sync) : 0));
}

/*
 * Rows of a query with two int8 parameters into the function's result set
 * (the runs committed in the worker; a fresh snapshot sees them), read
 * with phsync's rights.
 */
static void
return_rows(FunctionCallInfo fcinfo, const char *sql, int64 arg1, int64 arg2)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Oid			argtypes[2] = {INT8OID, INT8OID};
	Datum		args[2] = {Int64GetDatum(arg1), Int64GetDatum(arg2)};
	PhsyncAsRole save;
	uint64		i;
	int			ret;

	InitMaterializedSRF(fcinfo, 0);
	phsync_spi_connect();
	as_role_begin(BOOTSTRAP_SUPERUSERID, false, &save);
	ret = phsync_spi_exec(sql, 2, argtypes, args, NULL, false, 0);
	as_role_end(&save);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read the results of phsync run %lld", (long long) arg1);
	if (SPI_processed == 0 && arg1 != 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("phsync run %lld finished, but its results are not visible", (long long) arg1),
				 errhint("Call it in a READ COMMITTED transaction.")));
	for (i = 0; i < SPI_processed; i++)
		tuplestore_puttuple(rsinfo->setResult, SPI_tuptable->vals[i]);
	phsync_spi_finish();
}

/*
 * phsync_run_now(wait => false): queue a manual run of each sync in
 * phsync.runs (the caller's transaction: a rollback, a cancel or a
 * statement timeout queues nothing) and return those rows.
 */
typedef struct QueueRuns
{
	const char *only;
	Oid			requester;
	ReturnSetInfo *rsinfo;
} QueueRuns;

static void
queue_runs(void *arg)
{
	QueueRuns  *q = (QueueRuns *) arg;
	ListCell   *lc;

	(void) runlog_claim_cluster();
	foreach(lc, sync_runnable_by(sync_list(q->only, true), q->requester))
	{
		PhsyncSync *s = lfirst(lc);
		HeapTupleHeader row;
		HeapTupleData tuple;

		row = DatumGetHeapTupleHeader(runlog_queue(PHSYNC_TRIGGER_MANUAL, s->name, s->target,
												   NULL, NULL, q->rsinfo->setDesc));
		tuple.t_len = HeapTupleHeaderGetDatumLength(row);
		ItemPointerSetInvalid(&tuple.t_self);
		tuple.t_tableOid = InvalidOid;
		tuple.t_data = row;
		tuplestore_puttuple(q->rsinfo->setResult, &tuple);
	}
}

/*
 * phsync_run_now(sync text DEFAULT NULL) RETURNS SETOF phsync.runs
 * phsync_run_now(sync text, wait boolean) RETURNS SETOF phsync.runs
 *
 * Asks the worker to run every enabled sync the caller owns (every one,
 * for superusers), or the one named, which the caller must own; waits for
 * the runs to end and returns their rows.  If a run failed, raises its
 * error.
 */
Datum
phsync_run_now(PG_FUNCTION_ARGS)
{
	PhsyncRequest request;
	PhsyncAnswer answer;

	memset(&request, 0, sizeof(request));
	request.kind = PHSYNC_REQUEST_RUN;
	request.requester = GetUserId();
	if (!PG_ARGISNULL(0))
	{
		PhsyncSync *sync;

		strlcpy(request.sync, text_to_cstring(PG_GETARG_TEXT_PP(0)), NAMEDATALEN);
		/* another owner's sync (its key, its errors) is not the caller's to run */
		phsync_spi_connect();
		sync = find_sync(request.sync);
		phsync_spi_finish();
		check_sync_owner(sync, "to run it");
	}
	if (PG_NARGS() > 1 && !PG_ARGISNULL(1) && !PG_GETARG_BOOL(1))
	{
		QueueRuns	q;

		check_callable_here();
		InitMaterializedSRF(fcinfo, 0);
		q.only = request.sync[0] ? request.sync : NULL;
		q.requester = request.requester;
		q.rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
		phsync_spi_connect();
		as_phsync(queue_runs, &q);
		phsync_spi_finish();
		shmem_wake_worker_at_commit();
		return (Datum) 0;
	}
	submit_request(&request, &answer);
	return_rows(fcinfo, "SELECT * FROM phsync.runs WHERE id BETWEEN $1 AND $2 "
				"AND trigger = 'manual' ORDER BY id",
				answer.run_id, answer.last_run_id);
	return (Datum) 0;
}

/*
 * phsync_verify(sync, from, to, bucket, repair) RETURNS TABLE (bucket,
 * posthog_count, local_count, status)
 *
 * The caller must be able to read the target (the counts per bucket show
 * what it holds), and to repair, own the sync.  At most
 * phsync.max_verify_buckets buckets.
 */
Datum
phsync_verify(PG_FUNCTION_ARGS)
{
	PhsyncRequest request;
	PhsyncAnswer answer;
	PhsyncSync *sync;
	Oid			relid;
	int64		span;
	int64		nbuckets;

	require_arg(fcinfo, 0, "sync");
	require_arg(fcinfo, 1, "from");
	require_arg(fcinfo, 2, "to");
	require_arg(fcinfo, 3, "bucket");
	memset(&request, 0, sizeof(request));
	request.kind = PHSYNC_REQUEST_VERIFY;
	strlcpy(request.sync, text_to_cstring(PG_GETARG_TEXT_PP(0)), NAMEDATALEN);
	request.from = PG_GETARG_TIMESTAMPTZ(1);
	request.to = PG_GETARG_TIMESTAMPTZ(2);
	request.bucket = interval_usecs(PG_GETARG_INTERVAL_P(3), "bucket");
	request.repair = !PG_ARGISNULL(4) && PG_GETARG_BOOL(4);
	if (request.bucket < USECS_PER_SEC)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("bucket must be at least one second")));
	check_range(request.from, request.to);
	if (request.bucket % USECS_PER_SEC != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("bucket must be a whole number of seconds")));
	/* PostHog counts in whole seconds: so do the bounds */
	request.from -= ((request.from % USECS_PER_SEC) + USECS_PER_SEC) % USECS_PER_SEC;
	if (request.to % USECS_PER_SEC != 0)
		request.to += USECS_PER_SEC - ((request.to % USECS_PER_SEC) + USECS_PER_SEC) % USECS_PER_SEC;
	span = range_usecs(request.from, request.to);
	nbuckets = span / request.bucket + (span % request.bucket != 0);
	if (nbuckets > phsync_max_verify_buckets)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("a verification may have at most %d buckets, not %lld",
						phsync_max_verify_buckets, (long long) nbuckets),
				 errhint("Use a wider bucket or a shorter range, or raise phsync.max_verify_buckets.")));
	request.bucket = Min(request.bucket, span);

	phsync_spi_connect();
	sync = find_sync(request.sync);
	phsync_spi_finish();
	require_cursor(sync, "verify");
	relid = RangeVarGetRelid(target_rangevar(sync->target), NoLock, true);
	if (OidIsValid(relid) && pg_class_aclcheck(relid, GetUserId(), ACL_SELECT) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for table %s", sync->target),
				 errdetail("A verification shows how many rows the target holds per bucket; it needs SELECT on it.")));
	if (request.repair)
		check_sync_owner(sync, "to repair it");
	submit_request(&request, &answer);
	return_rows(fcinfo, "SELECT bucket, posthog_count, local_count, status "
				"FROM phsync.verifications WHERE run_id = $1 AND $2 IS NOT NULL ORDER BY bucket",
				answer.run_id, answer.run_id);
	return (Datum) 0;
}

typedef struct QueueBackfill
{
	const char *sync;
	const char *target;
	TimestampTz from;
	TimestampTz to;
	TupleDesc	tupdesc;
	Datum		result;
} QueueBackfill;

static void
queue_backfill(void *arg)
{
	QueueBackfill *q = (QueueBackfill *) arg;

	/* queued here, by this cluster: the worker must not take it for a restored one */
	(void) runlog_claim_cluster();
	q->result = runlog_queue(PHSYNC_TRIGGER_BACKFILL, q->sync, q->target, &q->from, &q->to, q->tupdesc);
}

/*
 * phsync_backfill(sync, from, to) RETURNS phsync.runs
 *
 * Queues a backfill: a phsync.runs row in status 'queued', which the worker
 * carries out after the caller commits.  Returns that row.  Only the
 * sync's owner may, over at most phsync.max_backfill_range.
 */
Datum
phsync_backfill(PG_FUNCTION_ARGS)
{
	char	   *sync;
	TimestampTz from;
	TimestampTz to;
	TupleDesc	tupdesc;
	PhsyncSync *s;
	QueueBackfill q;
	Datum		result;

	require_arg(fcinfo, 0, "sync");
	require_arg(fcinfo, 1, "from");
	require_arg(fcinfo, 2, "to");
	sync = text_to_cstring(PG_GETARG_TEXT_PP(0));
	from = PG_GETARG_TIMESTAMPTZ(1);
	to = PG_GETARG_TIMESTAMPTZ(2);
	check_callable_here();
	check_range(from, to);
	if (range_usecs(from, to) / (USECS_PER_SEC * 60) > phsync_max_backfill_range)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("a backfill may cover at most %d days", phsync_max_backfill_range / (24 * 60)),
				 errhint("Split the range into several backfills, or raise phsync.max_backfill_range.")));
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	phsync_spi_connect();
	q.sync = sync;
	q.from = from;
	q.to = to;
	q.tupdesc = tupdesc;
	s = find_sync(sync);
	check_sync_owner(s, "to backfill it");
	require_cursor(s, "backfill");
	q.target = s->target;
	as_phsync(queue_backfill, &q);
	phsync_spi_finish();
	result = q.result;

	shmem_wake_worker_at_commit();
	PG_RETURN_DATUM(result);
}

/*
 * phsync_sync_state() RETURNS SETOF (sync, enabled, target, watermark,
 * next_run, running, run_id, pages, rows_received, target_problem,
 * waiting_until)
 *
 * What the phsync.status view needs from outside phsync.runs: each sync's
 * watermark (max(cursor) of its target, NULL while it is empty or not an
 * acceptable target, and then target_problem says why) and the worker's
 * shared state.
 */
Datum
phsync_sync_state(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	PhsyncWorkerState w;
	List	   *syncs;
	List	   *scheduled;
	List	   *succeeded;
	TimestampTz owned_since;
	TimestampTz now = GetCurrentTimestamp();
	ListCell   *lc;

	InitMaterializedSRF(fcinfo, 0);
	memset(&w, 0, sizeof(w));
	if (shmem_available())
		shmem_worker_state(&w);

	phsync_spi_connect();
	syncs = sync_list(NULL, false);
	scheduled = runlog_last_starts(false, &owned_since);
	succeeded = runlog_last_starts(true, &owned_since);
	foreach(lc, syncs)
	{
		PhsyncSync *s = lfirst(lc);
		Datum		values[15];
		bool		nulls[15] = {false, false, false, true, true, false, true, false, false, true, true,
		false, true, false, false};
		TimestampTz since;
		bool		mine = w.run_id != 0 && strcmp(w.sync, s->name) == 0;
		PhsyncTargetSpec spec;
		PhsyncProblem problem;
		PhsyncTarget *target;
		TimestampTz watermark;

		values[0] = CStringGetTextDatum(s->name);
		values[1] = BoolGetDatum(s->enabled);
		values[2] = CStringGetTextDatum(s->target);

		/*
		 * The watermark, read as the worker reads it (as the role the sync
		 * acts as, restricted), and only from a target the worker would
		 * accept: a view or a function in its place is reported, not run.
		 */
		sync_target_spec(s, &spec);
		target = OidIsValid(s->owner) ? target_examine(&spec, &problem) : NULL;
		if (target && target_watermark(target, NULL, NULL, &watermark))
		{
			values[3] = TimestampTzGetDatum(watermark);
			nulls[3] = false;
		}
		if (target == NULL)
		{
			values[9] = CStringGetTextDatum(OidIsValid(s->owner) ? problem.message :
											psprintf("the role that owned the sync was dropped (%s)",
													 s->owner_name));
			nulls[9] = false;
		}
		/* the worker's own rule (schedule_sync_due()), from what it published */
		if (w.pid != 0 && s->enabled && phsync_enabled)
		{
			TimestampTz base = Max(Max(w.schedule_base - 1, owned_since), s->created_at);

			values[4] = TimestampTzGetDatum(schedule_sync_due(s->schedule,
															  runlog_last_start(scheduled, s->name),
															  0, base));
			nulls[4] = false;
		}
		values[11] = ObjectIdGetDatum(sync_is_default(s) || !OidIsValid(s->owner) ?
									  BOOTSTRAP_SUPERUSERID : s->owner);
		if (s->schedule)
		{
			values[12] = CStringGetTextDatum(s->schedule);
			nulls[12] = false;
		}

		/* stale: no success for two of its scheduled periods */
		since = runlog_last_start(succeeded, s->name);
		if (since == 0)
			since = sync_is_default(s) ? owned_since : s->created_at;
		values[13] = BoolGetDatum(since != 0 && !mine &&
								  now - since > 2 * schedule_period(s->schedule, since));
		values[14] = BoolGetDatum(!phsync_enabled);
		values[5] = BoolGetDatum(mine);
		if (mine)
		{
			values[6] = Int64GetDatum(w.run_id);
			nulls[6] = false;
		}
		values[7] = Int32GetDatum(mine ? w.pages : 0);
		values[8] = Int64GetDatum(mine ? w.received : 0);
		if (mine && w.waiting_until > GetCurrentTimestamp())
		{
			values[10] = TimestampTzGetDatum(w.waiting_until);
			nulls[10] = false;
		}
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	phsync_spi_finish();
	return (Datum) 0;
}

/*
 * phsync_next_run(after timestamptz) RETURNS timestamptz
 */
Datum
phsync_next_run(PG_FUNCTION_ARGS)
{
	PG_RETURN_TIMESTAMPTZ(schedule_slot_after(PG_GETARG_TIMESTAMPTZ(0)));
}

/*
 * phsync_next_run(after timestamptz, schedule text) RETURNS timestamptz
 */
Datum
phsync_next_run_of(PG_FUNCTION_ARGS)
{
	PhsyncSchedule s;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	schedule_parse(PG_ARGISNULL(1) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(1)), &s);
	PG_RETURN_TIMESTAMPTZ(schedule_next(&s, PG_GETARG_TIMESTAMPTZ(0)));
}

static void
doctor_emit(void *arg, const char *item, const char *status, const char *detail,
			const char *hint)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) arg;
	Datum		values[4];
	bool		nulls[4] = {false, false, detail == NULL, hint == NULL};

	values[0] = CStringGetTextDatum(item);
	values[1] = CStringGetTextDatum(status);
	values[2] = detail ? CStringGetTextDatum(detail) : (Datum) 0;
	values[3] = hint ? CStringGetTextDatum(hint) : (Datum) 0;
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
}

/*
 * phsync_doctor() RETURNS TABLE (item, status, detail, hint)
 */
Datum
phsync_doctor(PG_FUNCTION_ARGS)
{
	InitMaterializedSRF(fcinfo, 0);
	doctor_run(doctor_emit, fcinfo->resultinfo);
	return (Datum) 0;
}

/* ---------- sync definitions ---------- */

/*
 * The arguments phsync_add_sync() and phsync_alter_sync() share: name,
 * target, query, preset, cursor, conflict, lookback, enabled, verify; and
 * server, at position server_arg.
 */
static void
sync_args(FunctionCallInfo fcinfo, PhsyncSyncArgs *args, int server_arg)
{
	memset(args, 0, sizeof(*args));
	require_arg(fcinfo, 0, "name");
	args->name = text_arg(fcinfo, 0);
	args->target = text_arg(fcinfo, 1);
	args->query = text_arg(fcinfo, 2);
	args->preset = text_arg(fcinfo, 3);
	args->cursor = text_arg(fcinfo, 4);
	args->conflict = text_arg(fcinfo, 5);
	if (!PG_ARGISNULL(6))
		args->lookback = DatumGetCString(DirectFunctionCall1(interval_out, PG_GETARG_DATUM(6)));
	args->has_enabled = !PG_ARGISNULL(7);
	args->enabled = args->has_enabled && PG_GETARG_BOOL(7);
	args->has_verify = !PG_ARGISNULL(8);
	args->verify = args->has_verify && PG_GETARG_BOOL(8);
	args->server = text_arg(fcinfo, server_arg);
	args->has_events = !PG_ARGISNULL(server_arg + 1);
	args->events = text_array_arg(fcinfo, server_arg + 1, "events");
	args->schedule = text_arg(fcinfo, server_arg + 2);
	args->deletions = text_arg(fcinfo, server_arg + 3);
}

static TupleDesc
result_tupdesc(FunctionCallInfo fcinfo)
{
	TupleDesc	tupdesc;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	return tupdesc;
}

/*
 * phsync_add_sync(name, target, query, preset, cursor, conflict, lookback,
 * enabled, verify, server) RETURNS phsync.syncs
 *
 * Not SECURITY DEFINER: the sync belongs to the role that calls it, whose
 * rights on the target are checked.
 */
Datum
phsync_add_sync(PG_FUNCTION_ARGS)
{
	PhsyncSyncArgs args;
	TupleDesc	tupdesc = result_tupdesc(fcinfo);
	Datum		result;

	sync_args(fcinfo, &args, 9);	/* server, events, schedule, deletions */
	require_arg(fcinfo, 1, "target");
	phsync_spi_connect();
	result = sync_add(&args, tupdesc);
	phsync_spi_finish();
	PG_RETURN_DATUM(result);
}

/*
 * phsync_alter_sync(name, target, query, preset, cursor, conflict,
 * lookback, enabled, verify, reread_all, server) RETURNS phsync.syncs
 */
Datum
phsync_alter_sync(PG_FUNCTION_ARGS)
{
	PhsyncSyncArgs args;
	TupleDesc	tupdesc = result_tupdesc(fcinfo);
	Datum		result;

	sync_args(fcinfo, &args, 10);
	args.reread_all = !PG_ARGISNULL(9) && PG_GETARG_BOOL(9);
	phsync_spi_connect();
	result = sync_alter(&args, tupdesc);
	phsync_spi_finish();
	PG_RETURN_DATUM(result);
}

/*
 * phsync_drop_sync(name) RETURNS void
 */
Datum
phsync_drop_sync(PG_FUNCTION_ARGS)
{
	require_arg(fcinfo, 0, "name");
	phsync_spi_connect();
	sync_drop(text_arg(fcinfo, 0));
	phsync_spi_finish();
	PG_RETURN_VOID();
}

/*
 * phsync_create_table(preset, table_name, properties) RETURNS regclass
 *
 * Not SECURITY DEFINER: the table belongs to whoever creates it.
 */
Datum
phsync_create_table(PG_FUNCTION_ARGS)
{
	char	   *preset = text_arg(fcinfo, 0);
	char	   *name = text_arg(fcinfo, 1);
	const PresetInfo *p = preset_lookup(preset);
	Oid			relid;

	require_arg(fcinfo, 1, "table_name");
	if (p == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unknown preset \"%s\"", preset ? preset : ""),
				 errhint("The presets are %s.", preset_list())));
	phsync_spi_connect();
	target_create(p->preset, name, NULL, text_array_arg(fcinfo, 2, "properties"));
	phsync_spi_finish();
	relid = RangeVarGetRelid(target_rangevar(name), NoLock, false);
	PG_RETURN_OID(relid);
}

/* ---------- PostHog from SQL ---------- */

/*
 * phsync_fdw_validator(options text[], catalog oid): the phsync
 * foreign-data wrapper's options (see servers.c).
 */
Datum
phsync_fdw_validator(PG_FUNCTION_ARGS)
{
	server_validate_options(untransformRelOptions(PG_GETARG_DATUM(0)), PG_GETARG_OID(1));
	PG_RETURN_VOID();
}

/* the jsonb argument arg as JSON text, or NULL */
static char *
jsonb_arg(FunctionCallInfo fcinfo, int arg)
{
	Jsonb	   *j;

	if (PG_ARGISNULL(arg))
		return NULL;
	j = PG_GETARG_JSONB_P(arg);
	if (!JB_ROOT_IS_OBJECT(j))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("values must be a JSON object"),
				 errhint("For example: values => '{\"since\": \"2026-11-01T00:00:00Z\"}'")));
	return JsonbToCString(NULL, &j->root, VARSIZE(j));
}

/* the rows of one query, in the set the caller's context expects */
static Datum
query_set(FunctionCallInfo fcinfo, bool as_json)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	require_arg(fcinfo, 0, "query");
	InitMaterializedSRF(fcinfo, MAT_SRF_USE_EXPECTED_DESC);
	query_rows(text_arg(fcinfo, 1), text_arg(fcinfo, 0), jsonb_arg(fcinfo, 2), as_json,
			   rsinfo->setResult, rsinfo->setDesc);
	return (Datum) 0;
}

/*
 * phsync_query(query, server, values) RETURNS SETOF record: one HogQL
 * query's rows, typed by the caller's column definition list.
 */
Datum
phsync_query(PG_FUNCTION_ARGS)
{
	return query_set(fcinfo, false);
}

/*
 * phsync_query_json(query, server, values) RETURNS SETOF jsonb: each row
 * as an object, column name to value.
 */
Datum
phsync_query_json(PG_FUNCTION_ARGS)
{
	return query_set(fcinfo, true);
}

/*
 * phsync_describe(query, server, values) RETURNS TABLE (name,
 * posthog_type, postgres_type)
 */
Datum
phsync_describe(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	PhsyncColumns *cols;
	int			i;

	require_arg(fcinfo, 0, "query");
	InitMaterializedSRF(fcinfo, 0);
	cols = query_describe(text_arg(fcinfo, 1), text_arg(fcinfo, 0), jsonb_arg(fcinfo, 2));
	for (i = 0; i < cols->ncolumns; i++)
	{
		Datum		values[3];
		bool		nulls[3] = {false, false, false};

		values[0] = CStringGetTextDatum(cols->names[i]);
		if (cols->chtypes[i])
			values[1] = CStringGetTextDatum(cols->chtypes[i]);
		else
			nulls[1] = true;
		values[2] = CStringGetTextDatum(pg_type_for_clickhouse(cols->chtypes[i], cols->names[i]));
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/*
 * phsync_tables(server) RETURNS TABLE (table_name, column_name,
 * posthog_type, postgres_type)
 */
Datum
phsync_tables(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	InitMaterializedSRF(fcinfo, 0);
	query_tables(text_arg(fcinfo, 0), rsinfo->setResult, rsinfo->setDesc);
	return (Datum) 0;
}

/*
 * phsync_create_table(name, query, key, cursor, server, values) RETURNS
 * regclass: a target for a custom query.  Not SECURITY DEFINER.
 */
Datum
phsync_create_table_for_query(PG_FUNCTION_ARGS)
{
	List	   *keys;

	require_arg(fcinfo, 0, "name");
	require_arg(fcinfo, 1, "query");
	keys = text_array_arg(fcinfo, 2, "key");
	PG_RETURN_OID(query_create_table(text_arg(fcinfo, 0), text_arg(fcinfo, 4), text_arg(fcinfo, 1),
									 jsonb_arg(fcinfo, 5), keys, text_arg(fcinfo, 3)));
}

/* ---------- cancelling ---------- */

typedef struct CancelRun
{
	int64		run_id;
	char	   *sync;
	bool		found;
	bool		queued;
	bool		cancelled;
} CancelRun;

static void
find_run(void *arg)
{
	CancelRun  *c = (CancelRun *) arg;

	c->found = runlog_run_sync(c->run_id, &c->sync, &c->queued);
}

static void
cancel_queued(void *arg)
{
	CancelRun  *c = (CancelRun *) arg;

	c->cancelled = runlog_cancel_queued(c->run_id);
}

/*
 * phsync_cancel(run_id bigint) RETURNS boolean
 *
 * Cancels a queued or running run; the sync's owner and superusers may.
 * A running one stops within a second (its committed pages stay, and the
 * next run resumes from them); a queued one never starts.  Returns false,
 * with a WARNING, when that run is neither.
 */
Datum
phsync_cancel(PG_FUNCTION_ARGS)
{
	CancelRun	c;
	PhsyncSync *sync;

	memset(&c, 0, sizeof(c));
	c.run_id = PG_GETARG_INT64(0);
	phsync_spi_connect();
	as_phsync(find_run, &c);
	if (c.found)
	{
		sync = superuser() ? NULL : find_sync(c.sync);
		/* find_sync() raises for a sync dropped meanwhile: superusers only */
		if (sync)
			check_sync_owner(sync, "to cancel its runs");
		if (c.queued)
			as_phsync(cancel_queued, &c);
		else
			c.cancelled = shmem_available() && shmem_cancel_run(c.run_id);
	}
	phsync_spi_finish();
	if (!c.cancelled)
		ereport(WARNING,
				(errmsg("phsync run %lld is not queued or running", (long long) c.run_id)));
	PG_RETURN_BOOL(c.cancelled);
}
