/*-------------------------------------------------------------------------
 *
 * scheduler.c
 *		The phsync background worker: shared state, waiting for its database
 *		and extension, the latch loop, and when the next scheduled run is due.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "executor/spi.h"
#include "commands/dbcommands.h"
#include "commands/extension.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "phsync.h"

PhsyncShared *phsync_shared = NULL;

/*
 * Shared state that survives worker restarts (but not a crash reset, which
 * re-creates shared memory): whether the last attempt to connect to
 * phsync.database ended the worker.  If so, the next start waits for the
 * database to exist without connecting, instead of failing again and again.
 */
typedef struct PhsyncBoot
{
	bool		connect_failed;
} PhsyncBoot;

static PhsyncBoot *phsync_boot = NULL;

/*
 * When the worker started or last re-read its settings: with no scheduled
 * run in phsync.runs yet, the first slot after this is due.  (It must not be
 * "now", or the due time would slide forward as time passes.)
 */
static TimestampTz schedule_base = 0;

/*
 * When this worker last started a scheduled run.  A run that fails before
 * it could even write its phsync.runs row (no INSERT right, disk full)
 * leaves no trace there; without this the same past slot would be due again
 * at once, for ever.
 */
static TimestampTz last_schedule_attempt = 0;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* how often to look again for a missing database or extension */
#define PHSYNC_POLL_MS 5000L
/* the longest single sleep: bounds the effect of a jump of the clock */
#define PHSYNC_MAX_SLEEP_MS (10 * 60 * 1000L)

static void
phsync_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(PhsyncShared)) +
						   MAXALIGN(sizeof(PhsyncBoot)));
}

static void
phsync_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	phsync_shared = ShmemInitStruct("phsync", sizeof(PhsyncShared), &found);
	if (!found)
	{
		memset(phsync_shared, 0, sizeof(PhsyncShared));
		SpinLockInit(&phsync_shared->mutex);
	}
	phsync_boot = ShmemInitStruct("phsync boot", sizeof(PhsyncBoot), &found);
	if (!found)
		memset(phsync_boot, 0, sizeof(PhsyncBoot));
	LWLockRelease(AddinShmemInitLock);
}

/*
 * Install the shared memory hooks (called from _PG_init while preloading).
 */
void
phsync_shmem_init(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = phsync_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = phsync_shmem_startup;
}

/*
 * Register the one static worker.  It starts once recovery is over, so a
 * standby never runs it; the postmaster restarts it if it dies.
 */
void
phsync_register_worker(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 5;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "phsync");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "phsync_worker_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "phsync worker");
	snprintf(worker.bgw_type, BGW_MAXLEN, "phsync worker");
	RegisterBackgroundWorker(&worker);
}

/*
 * When the next scheduled run is due: the first slot after the last
 * scheduled run recorded in phsync.runs, so that a restart neither repeats
 * a run nor skips one, and runs missed while the server was down collapse
 * into one at start-up.  With no scheduled run yet, the first slot from the
 * worker's start or its last reload of the settings.
 */
static TimestampTz
next_due(void)
{
	TimestampTz last;
	TimestampTz owned_since;

	if (runlog_last_scheduled(&last, &owned_since))
		return schedule_slot_after(Max(last, last_schedule_attempt));
	/* none yet here: the first slot after the worker started or took over */
	return schedule_slot_after(Max(Max(schedule_base - 1, owned_since), last_schedule_attempt));
}

/* ---------- catalog probes ---------- */

/*
 * Is extension phsync there, and at the library's version?  *version gets
 * the installed version (palloc'd), NULL when there is none.
 */
static bool
extension_ready(char **version)
{
	MemoryContext cxt = CurrentMemoryContext;

	*version = NULL;
	phsync_xact_begin();
	if (SPI_execute("SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'phsync'",
					true, 1) == SPI_OK_SELECT && SPI_processed == 1)
		*version = MemoryContextStrdup(cxt, SPI_getvalue(SPI_tuptable->vals[0],
														 SPI_tuptable->tupdesc, 1));
	phsync_xact_commit();
	MemoryContextSwitchTo(cxt);
	return *version && strcmp(*version, PHSYNC_VERSION) == 0;
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
 * Connected to no database: sleep until phsync.database exists, then exit so
 * that the postmaster starts us again and we connect to it.  Quiet: nothing
 * is logged while waiting.
 */
static void
wait_for_database(void)
{
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	report_activity("waiting for database \"%s\" to be created", phsync_database);

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
		CommitTransactionCommand();
		if (exists)
		{
			phsync_boot->connect_failed = false;
			ereport(LOG,
					(errmsg("phsync worker found database \"%s\" and restarts to connect to it",
							phsync_database)));
			proc_exit(1);
		}
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 PHSYNC_POLL_MS, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

/*
 * Store the answer to request (with the spinlock held) and return the
 * latch of whoever asked, to be set once the lock is released.  A caller
 * that gave up waiting reads nothing, so nobody waits for it to.
 */
static Latch *
store_answer(uint64 request, PhsyncOutcome *outcome)
{
	PhsyncAnswer *a = &phsync_shared->result;
	Latch	   *requester = phsync_shared->requester_latch;

	phsync_shared->result_request = request;
	phsync_shared->result_unread = requester != NULL;
	a->run_id = outcome->run_id;
	a->last_run_id = outcome->last_run_id;
	a->failed_run_id = outcome->failed_run_id;
	a->ok = outcome->ok;
	a->sqlerrcode = outcome->sqlerrcode;
	strlcpy(a->message, outcome->message ? outcome->message : "", PHSYNC_MAX_MESSAGE);
	strlcpy(a->hint, outcome->hint ? outcome->hint : "", PHSYNC_MAX_MESSAGE);
	if (phsync_shared->requests_done < request)
		phsync_shared->requests_done = request;
	phsync_shared->request_taken = 0;
	phsync_shared->requester_latch = NULL;
	return requester;
}

/*
 * Worker exit (shutdown, pg_terminate_backend, FATAL): leave shared state
 * clean, and answer a manual run cut short, so that its caller gets an
 * error instead of waiting for a run that will never end.
 */
static void
detach_from_shared(int code, Datum arg)
{
	Latch	   *requester = NULL;

	SpinLockAcquire(&phsync_shared->mutex);
	if (phsync_shared->request_taken)
	{
		PhsyncOutcome cut = {0};

		cut.run_id = cut.last_run_id = cut.failed_run_id = phsync_shared->running_run_id;
		cut.sqlerrcode = ERRCODE_ADMIN_SHUTDOWN;
		cut.message = "the phsync worker stopped before the run finished";
		cut.hint = "The next run resumes from the table's watermark; call phsync_run_now() again.";
		requester = store_answer(phsync_shared->request_taken, &cut);
	}
	phsync_shared->worker_pid = 0;
	phsync_shared->worker_latch = NULL;
	phsync_shared->running = false;
	phsync_shared->running_run_id = 0;
	SpinLockRelease(&phsync_shared->mutex);
	if (requester)
		SetLatch(requester);
}

/*
 * Answer the manual request we took, and wake whoever asked.
 */
static void
answer_request(uint64 request, PhsyncOutcome *outcome)
{
	Latch	   *requester;

	SpinLockAcquire(&phsync_shared->mutex);
	phsync_shared->running = false;
	phsync_shared->running_run_id = 0;
	requester = store_answer(request, outcome);
	SpinLockRelease(&phsync_shared->mutex);
	if (requester)
		SetLatch(requester);
}

/*
 * Take a pending manual request, if any, marking a run as in progress.
 * Returns the request number, 0 if none.
 */
static uint64
take_request(PhsyncRequest *what)
{
	uint64		request = 0;

	SpinLockAcquire(&phsync_shared->mutex);
	if (phsync_shared->requests > phsync_shared->requests_done)
	{
		request = phsync_shared->requests;
		*what = phsync_shared->request;
		phsync_shared->request_taken = request;
		phsync_shared->running = true;
	}
	SpinLockRelease(&phsync_shared->mutex);
	return request;
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
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		AbortOutOfAnyTransaction();
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
set_running(bool running)
{
	SpinLockAcquire(&phsync_shared->mutex);
	phsync_shared->running = running;
	if (!running)
		phsync_shared->running_run_id = 0;
	SpinLockRelease(&phsync_shared->mutex);
}

/*
 * The syncs a job is about (sync_list() in a transaction of its own); on
 * an error (no such sync), false with the error in outcome.
 */
static bool
load_syncs(const char *only, List **syncs, PhsyncOutcome *outcome)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile bool ok = true;

	PG_TRY();
	{
		phsync_xact_begin();
		MemoryContextSwitchTo(cxt);
		*syncs = sync_list(only, true);
		phsync_xact_commit();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		EmitErrorReport();
		edata = CopyErrorData();
		FlushErrorState();
		AbortOutOfAnyTransaction();
		outcome->ok = false;
		outcome->sqlerrcode = edata->sqlerrcode;
		outcome->message = edata->message;
		outcome->hint = edata->hint;
		ok = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
	return ok;
}

/*
 * Add one run's outcome to that of a series: the first and last run, and
 * the first failure.
 */
static void
add_outcome(PhsyncOutcome *total, PhsyncOutcome *one)
{
	if (one->run_id)
	{
		if (total->run_id == 0)
			total->run_id = one->run_id;
		total->last_run_id = one->run_id;
	}
	if (!one->ok && total->ok)
	{
		total->ok = false;
		total->failed_run_id = one->run_id;
		total->sqlerrcode = one->sqlerrcode;
		total->message = one->message;
		total->hint = one->hint;
	}
}

/*
 * Run the enabled syncs (or the one named), one after the other, each in
 * its own phsync.runs row; a failure does not stop the others.  Scheduled
 * runs then verify the previous day of the syncs that ask for it.
 */
static void
run_syncs(const char *trigger, const char *only, PhsyncOutcome *total)
{
	List	   *syncs = NIL;
	ListCell   *lc;
	int			failed = 0;

	memset(total, 0, sizeof(*total));
	total->ok = true;
	if (!load_syncs(only, &syncs, total))
		return;

	foreach(lc, syncs)
	{
		PhsyncSync *sync = lfirst(lc);
		PhsyncJob	job = {0};
		PhsyncOutcome outcome;

		job.trigger = trigger;
		job.sync = sync;
		phsync_run(&job, &outcome);
		if (!outcome.ok)
			failed++;
		add_outcome(total, &outcome);

		if (strcmp(trigger, "schedule") == 0 && sync->verify && outcome.ok)
		{
			PhsyncJob	check = {0};
			PhsyncOutcome verified;

			check.trigger = "verify";
			check.sync = sync;
			check.bounded = true;
			check.from = schedule_day_start(GetCurrentTimestamp(), 1);
			check.to = schedule_day_start(GetCurrentTimestamp(), 0);
			check.bucket = check.to - check.from;
			phsync_run(&check, &verified);
		}
	}
	if (failed > 1)
		total->message = psprintf("%s (and %d more of the %d syncs failed; see phsync.runs)",
								  total->message, failed - 1, list_length(syncs));
}

/*
 * Carry out a session's request: a manual run or a verification.
 */
static void
carry_out(PhsyncRequest *what, PhsyncOutcome *outcome)
{
	List	   *syncs;
	PhsyncJob	job = {0};

	if (what->kind == PHSYNC_REQUEST_RUN)
	{
		run_syncs("manual", what->sync[0] ? what->sync : NULL, outcome);
		return;
	}

	memset(outcome, 0, sizeof(*outcome));
	if (!load_syncs(what->sync, &syncs, outcome))
		return;
	job.trigger = "verify";
	job.sync = linitial(syncs);
	job.bounded = true;
	job.from = what->from;
	job.to = what->to;
	job.bucket = what->bucket;
	job.repair = what->repair;
	phsync_run(&job, outcome);
	outcome->last_run_id = outcome->failed_run_id = outcome->run_id;
}

/*
 * Carry out the oldest queued backfill, if there is one.
 */
static bool
run_queued(void)
{
	int64		run_id;
	char	   *sync;
	TimestampTz from;
	TimestampTz to;
	List	   *syncs;
	PhsyncOutcome outcome = {0};
	PhsyncJob	job = {0};

	if (!runlog_next_queued(&run_id, &sync, &from, &to))
		return false;
	if (!load_syncs(sync, &syncs, &outcome))
	{
		runlog_fail_queued(run_id, outcome.message);
		return true;
	}
	job.trigger = "backfill";
	job.sync = linitial(syncs);
	job.run_id = run_id;
	job.bounded = true;
	job.from = from;
	job.to = to;
	set_running(true);
	phsync_run(&job, &outcome);
	set_running(false);
	return true;
}

static void
claim(void *arg)
{
	*(bool *) arg = runlog_claim_cluster();
}

/*
 * runlog_claim_cluster(), as housekeeping: if the worker's role may not
 * write phsync.cluster, a WARNING, and the history is taken as its own.
 */
static bool
claim_cluster(void)
{
	bool		claimed = false;

	if (!housekeeping(claim, &claimed, "record which cluster owns the run history",
					  "The worker's role needs SELECT, INSERT and DELETE on phsync.cluster; without it a restored database may catch up on a scheduled run."))
		return false;
	return claimed;
}

/*
 * Entry point of the background worker.
 */
void
phsync_worker_main(Datum main_arg)
{
	bool		orphans_checked = false;
	MemoryContext loop_cxt;
	PhsyncRequest what;
	char	   *version;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	if (phsync_boot->connect_failed)
		wait_for_database();	/* does not return */

	/* If this fails (no such database), the next start waits quietly. */
	phsync_boot->connect_failed = true;
	BackgroundWorkerInitializeConnection(phsync_database,
										 phsync_role[0] ? phsync_role : NULL, 0);
	phsync_boot->connect_failed = false;

	/* phsync speaks UTC to PostHog; make timestamp text unambiguous too */
	SetConfigOption("TimeZone", "UTC", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("application_name", "phsync worker", PGC_USERSET, PGC_S_OVERRIDE);

	SpinLockAcquire(&phsync_shared->mutex);
	phsync_shared->worker_pid = MyProcPid;
	phsync_shared->worker_latch = MyLatch;
	phsync_shared->running = false;
	phsync_shared->running_run_id = 0;
	SpinLockRelease(&phsync_shared->mutex);
	on_shmem_exit(detach_from_shared, (Datum) 0);

	schedule_base = GetCurrentTimestamp();
	loop_cxt = AllocSetContextCreate(TopMemoryContext, "phsync worker loop",
									 ALLOCSET_DEFAULT_SIZES);

	for (;;)
	{
		uint64		request;
		TimestampTz due;
		TimestampTz now;
		long		sleep_ms;

		MemoryContextReset(loop_cxt);
		MemoryContextSwitchTo(loop_cxt);
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			schedule_base = GetCurrentTimestamp();
		}

		if (!extension_ready(&version))
		{
			/*
			 * A request can only come from a session that sees the
			 * extension, so it must not have committed CREATE EXTENSION yet
			 * (or the extension is older than the library).
			 */
			request = take_request(&what);
			if (request)
			{
				PhsyncOutcome outcome = {0};

				outcome.sqlerrcode = ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE;
				if (version)
				{
					outcome.message = psprintf("extension \"phsync\" is at version %s, but the library is version %s",
											   version, PHSYNC_VERSION);
					outcome.hint = "ALTER EXTENSION phsync UPDATE;";
				}
				else
				{
					outcome.message = "the phsync worker does not see extension \"phsync\" yet";
					outcome.hint = "Commit the transaction that ran CREATE EXTENSION phsync before calling phsync_run_now().";
				}
				answer_request(request, &outcome);
			}
			orphans_checked = false;
			SpinLockAcquire(&phsync_shared->mutex);
			phsync_shared->next_due = 0;
			SpinLockRelease(&phsync_shared->mutex);
			if (version)
				report_activity("waiting for ALTER EXTENSION phsync UPDATE (version %s installed, library %s)",
								version, PHSYNC_VERSION);
			else
				report_activity("waiting for CREATE EXTENSION phsync in database \"%s\"",
								phsync_database);
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 PHSYNC_POLL_MS, PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
			continue;
		}

		if (!orphans_checked)
		{
			int			n = runlog_fail_orphans();

			if (n > 0)
				ereport(LOG,
						(errmsg("phsync marked %d interrupted run(s) as failed", n)));
			orphans_checked = true;
			if (claim_cluster())
			{
				/*
				 * New here (installed, or restored from a dump): scheduled
				 * runs recorded elsewhere are not runs this server missed.
				 */
				last_schedule_attempt = GetCurrentTimestamp();
				ereport(LOG,
						(errmsg("phsync worker took over database \"%s\"; the next scheduled run is the next slot",
								phsync_database)));
			}
			prune_history();
		}

		request = take_request(&what);
		if (request)
		{
			PhsyncOutcome outcome = {0};

			carry_out(&what, &outcome);
			answer_request(request, &outcome);
			prune_history();
			continue;
		}

		if (run_queued())
			continue;

		due = next_due();
		MemoryContextSwitchTo(loop_cxt);
		now = GetCurrentTimestamp();
		if (due <= now)
		{
			PhsyncOutcome outcome = {0};

			set_running(true);
			last_schedule_attempt = now;
			run_syncs("schedule", NULL, &outcome);
			set_running(false);
			prune_history();
			continue;
		}

		SpinLockAcquire(&phsync_shared->mutex);
		phsync_shared->next_due = due;
		SpinLockRelease(&phsync_shared->mutex);

		report_activity("idle until %s", timestamptz_to_str(due));
		sleep_ms = (long) Min((due - now + 999) / 1000, PHSYNC_MAX_SLEEP_MS);
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 sleep_ms, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}
