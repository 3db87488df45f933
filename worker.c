/*-------------------------------------------------------------------------
 *
 * worker.c
 *		The phsync background worker: its start, and its loop, which reads
 *		as the steps it takes, in order of precedence:
 *
 *			wait for the extension -> take over the run history ->
 *			serve a session's request -> run a queued backfill ->
 *			run the scheduled syncs when due -> sleep until due
 *
 *		Each step is a function below; a step that did something starts
 *		the loop over, so a request is never kept waiting behind a queue.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "commands/dbcommands.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/acl.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "phsync.h"

/* how often to look again for a missing database or extension */
#define POLL_MS 5000L
/* a role found fine is checked again after this long (or a reload) */
#define ROLE_RECHECK_USECS (60 * USECS_PER_SEC)
/* the pause before starting again after a failure (with bgw_restart_time 1 s) */
#define FAILED_START_PAUSE_MS 4000L
/* the longest single sleep: bounds the effect of a jump of the clock */
#define MAX_SLEEP_MS (10 * 60 * 1000L)

/*
 * When the worker started or last re-read its settings: with no scheduled
 * run in phsync.runs yet, the first slot after this is due.  (It must not be
 * "now", or the due time would slide forward as time passes.)
 */
static TimestampTz schedule_base = 0;

/*
 * When this worker last started a scheduled run, of any sync (the
 * take-over sets it too) and of each (schedule_attempts).  A run that fails
 * before it could even write its phsync.runs row (no INSERT right, disk
 * full) leaves no trace there; without this the same past slot would be
 * due again at once, for ever.
 */
static TimestampTz last_schedule_attempt = 0;

typedef struct ScheduleAttempt
{
	char		sync[NAMEDATALEN];	/* the hash key */
	TimestampTz at;
} ScheduleAttempt;

static HTAB *schedule_attempts = NULL;

/* the run history was taken over since the extension appeared */
static bool took_over = false;

/*
 * Register the one static worker (from _PG_init, while preloading).  It
 * starts once recovery is over, so a standby never runs it; the postmaster
 * restarts it if it dies.
 */
void
worker_register(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	/* at once when it planned to start again; after a failure see worker_start() */
	worker.bgw_restart_time = 1;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "phsync");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "phsync_worker_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "phsync worker");
	snprintf(worker.bgw_type, BGW_MAXLEN, "phsync worker");
	RegisterBackgroundWorker(&worker);
}

static void
report_activity(const char *fmt,...) pg_attribute_printf(1, 2);

static void
report_activity(const char *fmt,...)
{
	char		buf[256];
	va_list		ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	pgstat_report_activity(STATE_IDLE, buf);
}

/*
 * Sleep on the latch until woken or ms have passed.  The table statistics
 * of the last transactions are flushed first, so that they show (and
 * autovacuum sees them) while the worker waits.
 */
static void
nap(long ms)
{
	if (!IsTransactionState())
		pgstat_report_stat(true);
	(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
					 ms, PG_WAIT_EXTENSION);
	ResetLatch(MyLatch);
}

/*
 * Connected to no database: sleep until phsync.database exists, then exit so
 * that the postmaster starts us again and we connect to it.  Quiet: nothing
 * is logged while waiting.
 */
static void
wait_for_database(void)
{
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	report_activity("waiting for database \"%s\" to be created", phsync_database);
	/* CREATE DATABASE wakes us (roles.c), the poll is a fallback */
	shmem_worker_waiting();

	for (;;)
	{
		bool		exists;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		StartTransactionCommand();
		exists = OidIsValid(get_database_oid(phsync_database, true));
		if (!exists)
			roles_publish_owners(false);
		CommitTransactionCommand();
		if (exists)
		{
			shmem_set_connect_failed(false);
			ereport(LOG,
					(errmsg("phsync worker found database \"%s\" and restarts to connect to it",
							phsync_database)));
			shmem_worker_restart_planned();
			proc_exit(1);
		}
		nap(POLL_MS);
	}
}

/*
 * The worker waits for a lock at most phsync.lock_timeout: a target's
 * owner who holds a lock on it keeps the worker no longer than that.
 */
static void
apply_lock_timeout(void)
{
	char		value[32];

	snprintf(value, sizeof(value), "%d", phsync_lock_timeout);
	SetConfigOption("lock_timeout", value, PGC_SUSET, PGC_S_OVERRIDE);
}

/*
 * A WARNING, at start and after a reload that changes it, when the file
 * that sets phsync.api_key can be read by other users of the machine.
 */
static void
warn_exposed_key(void)
{
	static char warned[MAXPGPATH] = "";
	int			mode = 0;
	const char *file = settings_api_key_exposed(&mode);

	if (file == NULL)
		warned[0] = '\0';
	else if (strcmp(file, warned) != 0)
	{
		strlcpy(warned, file, sizeof(warned));
		ereport(WARNING,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("phsync.api_key is set in a file other users can read"),
				 errdetail("The file is \"%s\", mode %04o.", file, mode),
				 errhint("Set the key with ALTER SYSTEM SET phsync.api_key (postgresql.auto.conf is readable by the server's user only) and remove it from that file, or make the file unreadable to others (chmod o-r).")));
	}
}

/*
 * Start: signals, the connection to phsync.database as phsync.role (or,
 * when the last attempt failed because it does not exist, a quiet wait for
 * it), and the session settings every run relies on.
 */
static void
worker_start(void)
{
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	/*
	 * After an error that ended the last worker (phsync.role cannot log
	 * in, say), start again at the pace of old (bgw_restart_time was 5 s):
	 * an error repeats at most every 5 seconds in the log.  A restart the
	 * worker planned (it found its database) goes on at once.
	 */
	if (shmem_worker_starting())
	{
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 FAILED_START_PAUSE_MS, PG_WAIT_EXTENSION);
		CHECK_FOR_INTERRUPTS();
	}

	if (shmem_connect_failed())
		wait_for_database();	/* does not return */

	/* If this fails (no such database), the next start waits quietly. */
	shmem_set_connect_failed(true);
	BackgroundWorkerInitializeConnection(phsync_database,
										 phsync_role[0] ? phsync_role : NULL, 0);
	shmem_set_connect_failed(false);

	/* phsync speaks UTC to PostHog; make timestamp text unambiguous too */
	SetConfigOption("TimeZone", "UTC", PGC_SUSET, PGC_S_OVERRIDE);
	/* no object a user creates may stand in for a built-in one */
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("application_name", "phsync worker", PGC_USERSET, PGC_S_OVERRIDE);

	shmem_worker_attach();
	/* a cancel (SIGINT) stops runs only: see shmem_worker_cancellable() */
	shmem_worker_cancellable(false);
	apply_lock_timeout();
	schedule_base = GetCurrentTimestamp();
	shmem_set_schedule_base(schedule_base);
	warn_exposed_key();
}

/*
 * Is extension phsync there, and at the library's version?  *version gets
 * the installed version, NULL when there is none.
 */
static bool
extension_ready(char **version)
{
	MemoryContext cxt = xact_begin();

	*version = NULL;
	if (phsync_spi_exec("SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'phsync'",
						0, NULL, NULL, NULL, true, 1) == SPI_OK_SELECT && SPI_processed == 1)
		*version = MemoryContextStrdup(cxt, SPI_getvalue(SPI_tuptable->vals[0],
														 SPI_tuptable->tupdesc, 1));
	xact_commit(cxt);
	return *version && strcmp(*version, PHSYNC_VERSION) == 0;
}

/*
 * An answer that carries an error given here, not by a run.
 */
static void
answer_error(PhsyncAnswer *answer, int sqlerrcode, const char *message, const char *hint)
{
	memset(answer, 0, sizeof(*answer));
	answer->sqlerrcode = sqlerrcode;
	strlcpy(answer->message, message, sizeof(answer->message));
	strlcpy(answer->hint, hint ? hint : "", sizeof(answer->hint));
}

/*
 * Step 1: until extension phsync exists at the library's version, answer
 * any request with why not, and wait.  Returns whether it is ready.
 */
static bool
wait_for_extension(void)
{
	PhsyncRequest request;
	char	   *version;

	if (extension_ready(&version))
		return true;
	/* no syncs here: DROP ROLE elsewhere need not wait for them */
	StartTransactionCommand();
	roles_publish_owners(false);
	CommitTransactionCommand();
	(void) shmem_take_owners_changed();

	/*
	 * A request can only come from a session that sees the extension, so
	 * that session has not committed CREATE EXTENSION yet (or the extension
	 * is older than the library).
	 */
	if (shmem_take_request(&request))
	{
		PhsyncAnswer answer;

		if (version)
			answer_error(&answer, ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
						 psprintf("extension \"phsync\" is at version %s, but the library is version %s",
								  version, PHSYNC_VERSION),
						 "ALTER EXTENSION phsync UPDATE;");
		else
			answer_error(&answer, ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
						 "the phsync worker does not see extension \"phsync\" yet",
						 "Commit the transaction that ran CREATE EXTENSION phsync before calling phsync_run_now().");
		shmem_answer_request(&answer);
	}
	took_over = false;
	shmem_set_next_due(0);
	if (version)
		report_activity("waiting for ALTER EXTENSION phsync UPDATE (version %s installed, library %s)",
						version, PHSYNC_VERSION);
	else
		report_activity("waiting for CREATE EXTENSION phsync in database \"%s\"",
						phsync_database);
	nap(POLL_MS);
	return false;
}

/* what the worker's role lacked when last checked ("" : nothing) */
static char role_problem_logged[PHSYNC_MAX_MESSAGE] = "";
/* a reload happened since check_role() last looked */
static bool role_reload_seen = false;

/*
 * check_role() found a problem: log it once, publish it, answer a pending
 * request with it, and nap.
 */
static void
role_wait(const char *problem, const char *fix)
{
	char	   *hint = psprintf("As a superuser: %s", fix);
	PhsyncRequest request;

	if (strcmp(problem, role_problem_logged) != 0)
	{
		/* an ERROR in the log, as a failed run's; the worker goes on */
		PG_TRY();
		{
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("%s", problem),
					 errdetail("The phsync worker runs no sync until it has them."),
					 errhint("%s", hint)));
		}
		PG_CATCH();
		{
			EmitErrorReport();
			FlushErrorState();
		}
		PG_END_TRY();
		strlcpy(role_problem_logged, problem, PHSYNC_MAX_MESSAGE);
	}
	shmem_set_role_problem(problem, hint);
	if (shmem_take_request(&request))
	{
		PhsyncAnswer answer;

		answer_error(&answer, ERRCODE_INSUFFICIENT_PRIVILEGE, problem, hint);
		shmem_answer_request(&answer);
	}
	took_over = false;
	shmem_set_next_due(0);
	report_activity("waiting for phsync.role \"%s\" to get its privileges", phsync_role);
	nap(POLL_MS);
}

/*
 * Step 1b: does the worker's role (phsync.role) have what it needs on
 * phsync's objects?  If not, log it once, as an ERROR line with the GRANTs
 * that fix it, publish it (sessions fail at once with it, the doctor
 * reports it), answer any request with it, and wait: a GRANT does not wake
 * the worker, so it checks again every few seconds.  A role found fine is
 * checked again when the extension reappears, after a reload and once a
 * minute, not at every turn of the loop.  Returns whether the role is fine.
 */
static bool
check_role(void)
{
	static TimestampTz checked_fine = 0;
	TimestampTz now = GetCurrentTimestamp();
	MemoryContext cxt = CurrentMemoryContext;
	char	   *problem = NULL;
	char	   *fix = NULL;

	if (role_reload_seen)
		checked_fine = 0;
	role_reload_seen = false;
	if (took_over && checked_fine != 0 && now - checked_fine < ROLE_RECHECK_USECS)
		return true;

	PG_TRY();
	{
		MemoryContext xcxt = xact_begin();

		if (!roles_worker_lacks(&problem, &fix))
			problem = NULL;
		xact_commit(xcxt);
	}
	PG_CATCH();
	{
		ErrorData  *edata = xact_recover(cxt);

		problem = edata->message;
		fix = "Check phsync.role's privileges on schema phsync and its tables.";
	}
	PG_END_TRY();

	if (problem == NULL)
	{
		if (role_problem_logged[0])
			ereport(LOG,
					(errmsg("phsync.role \"%s\" has the privileges phsync needs now",
							phsync_role)));
		role_problem_logged[0] = '\0';
		shmem_set_role_problem(NULL, NULL);
		checked_fine = now;
		return true;
	}
	checked_fine = 0;
	role_wait(problem, fix);
	return false;
}


/*
 * Housekeeping: run fn(); if it fails (say, phsync.role lacks a right), a
 * WARNING "phsync could not <what>: <error>" with the hint, never the end
 * of the worker.  Returns whether fn() ran to the end.
 */
static bool
housekeeping(void (*fn) (void *), void *arg, const char *what, const char *hint)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile bool ok = true;

	PG_TRY();
	{
		fn(arg);
	}
	PG_CATCH();
	{
		ErrorData  *edata = xact_recover(cxt);

		ereport(WARNING,
				(errcode(edata->sqlerrcode),
				 errmsg("phsync could not %s: %s", what, edata->message),
				 errhint("%s", hint)));
		FreeErrorData(edata);
		ok = false;
	}
	PG_END_TRY();
	return ok;
}

static void
prune_runs(void *arg)
{
	int64		n = runlog_prune(phsync_history_days);

	if (n > 0)
		ereport(LOG,
				(errmsg("phsync deleted %lld run(s) older than %d days from phsync.runs",
						(long long) n, phsync_history_days)));
}

/*
 * Keep phsync.history_days of run history.
 */
static void
prune_history(void)
{
	(void) housekeeping(prune_runs, NULL, "delete old runs",
						"The worker's role needs DELETE on phsync.runs and phsync.rejects; phsync.history_days = 0 keeps all history.");
}

static void
claim(void *arg)
{
	MemoryContext cxt = xact_begin();

	*(PhsyncClaim *) arg = runlog_claim_cluster();
	xact_commit(cxt);
}

/*
 * Step 2, once per appearance of the extension: runs left "running" by a
 * crash are failed, and if this cluster is new to the run history
 * (installed, or restored from a dump), scheduled runs recorded elsewhere
 * are not runs this server missed.
 */
static void
take_over_history(void)
{
	int			n = runlog_fail_orphans();
	PhsyncClaim claimed = PHSYNC_CLAIM_OURS;

	if (n > 0)
		ereport(LOG,
				(errmsg("phsync marked %d interrupted run(s) as failed", n)));
	if (!housekeeping(claim, &claimed, "record which cluster owns the run history",
					  "The worker's role needs SELECT, INSERT and DELETE on phsync.cluster; without it a restored database may catch up on a scheduled run."))
		claimed = PHSYNC_CLAIM_OURS;
	if (claimed == PHSYNC_CLAIM_NEW)
	{
		last_schedule_attempt = GetCurrentTimestamp();
		ereport(LOG,
				(errmsg("phsync worker took over database \"%s\"; the next scheduled run is the next slot",
						phsync_database)));
	}
	else if (claimed == PHSYNC_CLAIM_UPGRADED)
		ereport(LOG,
				(errmsg("phsync worker took over database \"%s\" after pg_upgrade; its run history and queued runs are kept",
						phsync_database)));
	prune_history();
	took_over = true;
}

static void
read_owners(void *arg)
{
	MemoryContext cxt = xact_begin();

	roles_publish_owners(true);
	xact_commit(cxt);
}

/*
 * Publish the roles that own syncs (roles.c), after a change of
 * phsync.syncs.
 */
static void
publish_owners(void)
{
	(void) housekeeping(read_owners, NULL, "read the owners of syncs",
						"The worker's role needs SELECT on phsync.syncs.");
}

/*
 * The syncs a job is about (sync_list() in a transaction of its own), of
 * those `requester` owns unless it is 0 or a superuser; on an error (no
 * such sync), NIL with the error in outcome.
 */
static List *
load_syncs(const char *only, Oid requester, PhsyncOutcome *outcome)
{
	MemoryContext cxt = CurrentMemoryContext;
	List	   *volatile syncs = NIL;

	PG_TRY();
	{
		MemoryContext xcxt = xact_begin();

		syncs = sync_runnable_by(sync_list(only, true), requester);
		xact_commit(xcxt);
	}
	PG_CATCH();
	{
		EmitErrorReport();
		outcome->ok = false;
		outcome->error = xact_recover(cxt);
		syncs = NIL;
	}
	PG_END_TRY();
	return syncs;
}

/*
 * Add one run's outcome to the answer for a series of runs: the first and
 * last run, and the first failure.
 */
static void
add_outcome(PhsyncAnswer *answer, PhsyncOutcome *one, const char *sync)
{
	if (one->run_id)
	{
		if (answer->run_id == 0)
			answer->run_id = one->run_id;
		answer->last_run_id = one->run_id;
	}
	if (!one->ok && answer->ok)
	{
		answer->ok = false;
		answer->failed_run_id = one->run_id;
		strlcpy(answer->failed_sync, sync ? sync : "", NAMEDATALEN);
		answer->sqlerrcode = one->error->sqlerrcode;
		strlcpy(answer->message, one->error->message ? one->error->message : "",
				PHSYNC_MAX_MESSAGE);
		strlcpy(answer->detail, one->error->detail ? one->error->detail : "",
				PHSYNC_MAX_MESSAGE);
		strlcpy(answer->hint, one->error->hint ? one->error->hint : "",
				PHSYNC_MAX_MESSAGE);
	}
}

/*
 * Run syncs one after the other, each in its own phsync.runs row; a
 * failure does not stop the others.  Scheduled runs then verify the
 * previous day of the syncs that ask for it, once per day.
 */
static void
run_sync_list(PhsyncTrigger trigger, List *syncs, PhsyncAnswer *answer)
{
	ListCell   *lc;
	int			nfailed = 0;

	memset(answer, 0, sizeof(*answer));
	answer->ok = true;
	foreach(lc, syncs)
	{
		PhsyncSync *sync = lfirst(lc);
		PhsyncJob	job = {0};
		PhsyncOutcome outcome;

		/* the session that asked gave up: no more of its runs */
		if (trigger == PHSYNC_TRIGGER_MANUAL && shmem_request_cancelled())
			break;

		job.trigger = trigger;
		job.sync = sync;
		run_job(&job, &outcome);
		if (!outcome.ok)
			nfailed++;
		add_outcome(answer, &outcome, sync->name);

		if (trigger == PHSYNC_TRIGGER_SCHEDULE && sync->verify && outcome.ok)
		{
			PhsyncJob	check = {0};
			PhsyncOutcome verified;

			check.trigger = PHSYNC_TRIGGER_VERIFY;
			check.sync = sync;
			check.bounded = true;
			check.from = schedule_day_start(GetCurrentTimestamp(), 1);
			check.to = schedule_day_start(GetCurrentTimestamp(), 0);
			check.bucket = check.to - check.from;
			if (!runlog_day_verified(sync->name, check.from, check.to))
				run_job(&check, &verified);
		}
	}
	if (nfailed > 1)
	{
		char	   *more = psprintf("%s (and %d more of the %d syncs failed; see phsync.runs)",
									answer->message, nfailed - 1, list_length(syncs));

		strlcpy(answer->message, more, PHSYNC_MAX_MESSAGE);
	}
}

/*
 * A session's run of the enabled syncs it owns (or the one named).
 */
static void
run_syncs(PhsyncTrigger trigger, const char *only, Oid requester, PhsyncAnswer *answer)
{
	PhsyncOutcome failed = {0};
	List	   *syncs;

	syncs = load_syncs(only, requester, &failed);
	if (!failed.ok && failed.error)
	{
		memset(answer, 0, sizeof(*answer));
		answer->ok = true;
		add_outcome(answer, &failed, NULL);
		return;
	}
	run_sync_list(trigger, syncs, answer);
}

/*
 * A session's verification: one verify run.
 */
static void
run_verify(PhsyncRequest *request, PhsyncAnswer *answer)
{
	PhsyncOutcome outcome = {0};
	PhsyncJob	job = {0};
	List	   *syncs;

	memset(answer, 0, sizeof(*answer));
	answer->ok = true;
	syncs = load_syncs(request->sync, InvalidOid, &outcome);
	if (syncs != NIL)
	{
		job.trigger = PHSYNC_TRIGGER_VERIFY;
		job.sync = linitial(syncs);
		job.bounded = true;
		job.from = request->from;
		job.to = request->to;
		job.bucket = request->bucket;
		job.repair = request->repair;
		run_job(&job, &outcome);
	}
	add_outcome(answer, &outcome, request->sync);
}

/*
 * Step 3: carry out a session's request, if one is pending.
 */
static bool
serve_request(void)
{
	PhsyncRequest request;
	PhsyncAnswer answer;

	if (!shmem_take_request(&request))
		return false;
	if (request.kind == PHSYNC_REQUEST_RUN)
		run_syncs(PHSYNC_TRIGGER_MANUAL, request.sync[0] ? request.sync : NULL, request.requester,
				  &answer);
	else
		run_verify(&request, &answer);
	shmem_answer_request(&answer);
	prune_history();
	return true;
}

/* whose queued run the worker carried out last: owners are served in turn */
static Oid	queue_owner_served = InvalidOid;

/*
 * Step 4: carry out the next queued backfill, if there is one (the oldest
 * of the next owner's, see runlog_next_queued()).
 */
static bool
run_queued(void)
{
	int64		run_id;
	bool		manual;
	char	   *sync;
	TimestampTz from;
	TimestampTz to;
	List	   *syncs;
	PhsyncOutcome outcome = {0};
	PhsyncJob	job = {0};

	if (!runlog_next_queued(&run_id, &manual, &sync, &from, &to, &queue_owner_served))
		return false;
	syncs = load_syncs(sync, InvalidOid, &outcome);
	if (syncs == NIL)
	{
		runlog_fail_queued(run_id, outcome.error->message);
		return true;
	}
	/* phsync_run_now(wait => false) queues manual runs: unbounded */
	job.trigger = manual ? PHSYNC_TRIGGER_MANUAL : PHSYNC_TRIGGER_BACKFILL;
	job.sync = linitial(syncs);
	job.run_id = run_id;
	job.bounded = !manual;
	job.from = from;
	job.to = to;
	shmem_set_busy(true);
	run_job(&job, &outcome);
	shmem_set_busy(false);
	return true;
}

/* when this worker last tried sync's scheduled run (0: not since it started) */
static TimestampTz
attempted(const char *sync)
{
	char		key[NAMEDATALEN] = {0};
	ScheduleAttempt *a;

	strlcpy(key, sync, NAMEDATALEN);
	a = schedule_attempts ? hash_search(schedule_attempts, key, HASH_FIND, NULL) : NULL;
	return Max(a ? a->at : 0, last_schedule_attempt);
}

static void
set_attempted(const char *sync, TimestampTz at)
{
	char		key[NAMEDATALEN] = {0};
	ScheduleAttempt *a;

	if (schedule_attempts == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = NAMEDATALEN;
		ctl.entrysize = sizeof(ScheduleAttempt);
		schedule_attempts = hash_create("phsync schedule attempts", 64, &ctl,
										HASH_ELEM | HASH_STRINGS);
	}
	strlcpy(key, sync, NAMEDATALEN);
	a = hash_search(schedule_attempts, key, HASH_ENTER, NULL);
	a->at = at;
}

/* the syncs whose scheduled run is due, and when the next one is */
typedef struct DueSyncs
{
	List	   *due;
	TimestampTz next;
} DueSyncs;

/*
 * Which enabled syncs are due (schedule_sync_due(): each sync's own
 * schedule, or the global one, from its last scheduled run).
 */
static void
find_due(void *arg)
{
	DueSyncs   *d = (DueSyncs *) arg;
	MemoryContext cxt = xact_begin();
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz owned_since;
	List	   *syncs = sync_list(NULL, true);
	List	   *starts = runlog_last_starts(false, &owned_since);
	ListCell   *lc;

	d->due = NIL;
	d->next = DT_NOEND;
	foreach(lc, syncs)
	{
		PhsyncSync *s = lfirst(lc);
		TimestampTz base = Max(Max(schedule_base - 1, owned_since), s->created_at);
		TimestampTz due = schedule_sync_due(s->schedule, runlog_last_start(starts, s->name),
											attempted(s->name), base);

		if (due <= now)
			d->due = lappend(d->due, s);
		else
			d->next = Min(d->next, due);
	}
	xact_commit(cxt);
}

/*
 * Step 5: run the syncs whose schedule says so (none while phsync.enabled
 * is off).  Otherwise publish when the next one is, and return that time
 * in *due.
 */
static bool
run_due(TimestampTz *due)
{
	PhsyncAnswer answer;
	DueSyncs	d = {0};
	ListCell   *lc;

	*due = DT_NOEND;
	if (!phsync_enabled)
	{
		shmem_set_next_due(0);
		return false;
	}
	if (!housekeeping(find_due, &d, "read which syncs are due",
					  "The worker's role needs SELECT on phsync.syncs, phsync.runs and phsync.cluster."))
		return false;
	if (d.due == NIL)
	{
		*due = d.next;
		shmem_set_next_due(d.next == DT_NOEND ? 0 : d.next);
		return false;
	}
	foreach(lc, d.due)
		set_attempted(((PhsyncSync *) lfirst(lc))->name, GetCurrentTimestamp());
	shmem_set_busy(true);
	run_sync_list(PHSYNC_TRIGGER_SCHEDULE, d.due, &answer);
	shmem_set_busy(false);
	prune_history();
	return true;
}

/*
 * Step 6: sleep until the next run is due (or a session wakes us).
 */
static void
sleep_until(TimestampTz due)
{
	long		ms = (long) Min((due - GetCurrentTimestamp() + 999) / 1000, MAX_SLEEP_MS);

	if (due == DT_NOEND)
		report_activity(phsync_enabled ? "idle, no sync to schedule" :
						"idle, scheduled runs paused (phsync.enabled is off)");
	else
		report_activity("idle until %s", timestamptz_to_str(due));
	nap(Max(ms, 1));
}

/*
 * Entry point of the background worker.
 */
void
phsync_worker_main(Datum main_arg)
{
	MemoryContext loop_cxt;

	worker_start();
	loop_cxt = AllocSetContextCreate(TopMemoryContext, "phsync worker loop",
									 ALLOCSET_DEFAULT_SIZES);
	for (;;)
	{
		TimestampTz due;

		MemoryContextReset(loop_cxt);
		MemoryContextSwitchTo(loop_cxt);
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			apply_lock_timeout();
			warn_exposed_key();
			role_reload_seen = true;
			schedule_base = GetCurrentTimestamp();
			shmem_set_schedule_base(schedule_base);
		}

		if (!wait_for_extension())
			continue;
		if (!check_role())
			continue;
		if (!took_over)
			take_over_history();
		if (shmem_take_owners_changed())
			publish_owners();
		if (serve_request())
			continue;
		if (run_queued())
			continue;
		if (run_due(&due))
			continue;
		sleep_until(due);
	}
}
