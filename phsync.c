/*-------------------------------------------------------------------------
 *
 * phsync.c
 *		Entry point of phsync: _PG_init, the settings and the SQL-callable
 *		functions.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>

#include "access/htup_details.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/namespace.h"
#include "commands/dbcommands.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/latch.h"
#include "storage/procarray.h"
#include "nodes/makefuncs.h"
#include "utils/builtins.h"
#include "utils/tuplestore.h"
#include "utils/lsyscache.h"
#include "utils/regproc.h"
#include "utils/timestamp.h"
#include "utils/guc.h"
#include "pgtime.h"
#include "utils/varlena.h"
#include "utils/wait_event.h"

#include "phsync.h"

PG_MODULE_MAGIC;

char	   *phsync_database = NULL;
char	   *phsync_host = NULL;
char	   *phsync_project_id = NULL;
char	   *phsync_target_table = NULL;
char	   *phsync_query_file = NULL;
char	   *phsync_cursor_column = NULL;
char	   *phsync_initial_since = NULL;
char	   *phsync_run_at = NULL;
char	   *phsync_ca_file = NULL;
int			phsync_lookback = 600;
int			phsync_interval = 86400;
int			phsync_page_size = 10000;
int			phsync_request_timeout = 60000;
int			phsync_max_retries = 5;
int			phsync_retry_base_delay = 1000;
int			phsync_max_retry_delay = 300000;
int			phsync_max_requests_per_minute = 30;
int			phsync_max_response_size = 256 * 1024;
int			phsync_on_bad_row = PHSYNC_BAD_ROW_REJECT;
char	   *phsync_role = NULL;
int			phsync_history_days = 90;
bool		phsync_progress_notices = true;
char	   *phsync_timezone = NULL;
bool		phsync_verify_yesterday = true;

/* at most one progress NOTICE this often from phsync_run_now() */
#define PROGRESS_NOTICE_MS 5000
/* how long phsync_run_now() waits for a worker that is not there */
#define WORKER_WAIT_MS 60000

static const struct config_enum_entry on_bad_row_options[] = {
	{"reject", PHSYNC_BAD_ROW_REJECT, false},
	{"fail", PHSYNC_BAD_ROW_FAIL, false},
	{NULL, 0, false}
};

/*
 * The API key.  The GUC variable itself only ever holds API_KEY_MASK: when a
 * reload changes a setting, PostgreSQL logs "parameter ... changed to ..."
 * with the new text, but only if the stored value differs from the old one.
 * Storing the same mask whatever the key is keeps the key out of the log; the
 * real key travels in the check hook's "extra" and lands in api_key_value.
 */
#define API_KEY_MASK "********"
static char *api_key_shown = NULL;
static char *api_key_value = NULL;

static int	run_at_seconds = 2 * 3600;
static pg_tz *schedule_tz = NULL;

PG_FUNCTION_INFO_V1(phsync_run_now);
PG_FUNCTION_INFO_V1(phsync_backfill);
PG_FUNCTION_INFO_V1(phsync_verify);
PG_FUNCTION_INFO_V1(phsync_sync_state);
PG_FUNCTION_INFO_V1(phsync_next_run);
PG_FUNCTION_INFO_V1(phsync_worker_state);
PG_FUNCTION_INFO_V1(phsync_doctor);

void		_PG_init(void);

/*
 * The real API key ("" when unset).
 */
const char *
phsync_api_key(void)
{
	return api_key_value ? api_key_value : "";
}

/*
 * phsync.run_at as seconds after midnight (in phsync.timezone).
 */
int
phsync_run_at_seconds(void)
{
	return run_at_seconds;
}

/*
 * phsync.timezone.
 */
pg_tz *
phsync_tz(void)
{
	if (schedule_tz == NULL)
		schedule_tz = pg_tzset("UTC");
	return schedule_tz;
}

/* ---------- check and assign hooks ---------- */

static bool
check_api_key(char **newval, void **extra, GucSource source)
{
	char	   *key = malloc(strlen(*newval) + 1);
	char	   *mask = malloc(sizeof(API_KEY_MASK));

	if (key == NULL || mask == NULL)
	{
		free(key);
		free(mask);
		return false;
	}
	strcpy(key, *newval);
	strcpy(mask, API_KEY_MASK);
	free(*newval);
	*newval = mask;
	*extra = key;
	return true;
}

static void
assign_api_key(const char *newval, void *extra)
{
	api_key_value = (char *) extra;
}

/*
 * Parse "HH:MM" or "HH:MM:SS" into seconds; -1 if malformed.
 */
static int
parse_time_of_day(const char *s)
{
	int			h,
				m,
				sec = 0,
				n = 0;

	if (sscanf(s, "%2d:%2d%n", &h, &m, &n) != 2)
		return -1;
	if (s[n] == ':')
	{
		int			n2 = 0;

		if (sscanf(s + n + 1, "%2d%n", &sec, &n2) != 1 || n2 != 2)
			return -1;
		n += 1 + n2;
	}
	if (s[n] != '\0' || n < 5 || h < 0 || h > 23 || m < 0 || m > 59 ||
		sec < 0 || sec > 59)
		return -1;
	return h * 3600 + m * 60 + sec;
}

static bool
check_run_at(char **newval, void **extra, GucSource source)
{
	int		   *secs;
	int			v = parse_time_of_day(*newval);

	if (v < 0)
	{
		GUC_check_errdetail("phsync.run_at must be a time of day (in phsync.timezone), as HH:MM or HH:MM:SS.");
		return false;
	}
	secs = malloc(sizeof(int));
	if (secs == NULL)
		return false;
	*secs = v;
	*extra = secs;
	return true;
}

static void
assign_run_at(const char *newval, void *extra)
{
	run_at_seconds = *(int *) extra;
}

static bool
check_timezone(char **newval, void **extra, GucSource source)
{
	pg_tz	  **tz = malloc(sizeof(pg_tz *));

	if (tz == NULL)
		return false;
	*tz = pg_tzset(*newval);
	if (*tz == NULL || !pg_tz_acceptable(*tz))
	{
		free(tz);
		GUC_check_errdetail("phsync.timezone must be a time zone name such as UTC or Europe/Paris.");
		return false;
	}
	*extra = tz;
	return true;
}

static void
assign_timezone(const char *newval, void *extra)
{
	schedule_tz = *(pg_tz **) extra;
}

static bool
check_project_id(char **newval, void **extra, GucSource source)
{
	const char *p;

	for (p = *newval; *p; p++)
	{
		if (!isdigit((unsigned char) *p))
		{
			GUC_check_errdetail("phsync.project_id must be the numeric id of a PostHog project.");
			return false;
		}
	}
	return true;
}

static bool
check_host(char **newval, void **extra, GucSource source)
{
	const char *s = *newval;
	const char *host;
	size_t		hostlen;
	bool		https;

	if (strncmp(s, "https://", 8) == 0)
		https = true;
	else if (strncmp(s, "http://", 7) == 0)
		https = false;
	else
	{
		GUC_check_errdetail("phsync.host must start with https://.");
		return false;
	}
	host = s + (https ? 8 : 7);
	if (*host == '[')
		hostlen = strcspn(host, "]") + 1;
	else
		hostlen = strcspn(host, ":/?#");
	if (hostlen == 0 || strpbrk(host, "?#@ \t\r\n") != NULL)
	{
		GUC_check_errdetail("phsync.host must be a base URL such as https://eu.posthog.com, without user, query or fragment.");
		return false;
	}
	if (!https &&
		!(hostlen == 9 && strncmp(host, "localhost", 9) == 0) &&
		!(hostlen == 5 && strncmp(host, "[::1]", 5) == 0) &&
		!(hostlen >= 4 && strncmp(host, "127.", 4) == 0 &&
		  strspn(host, "0123456789.") == hostlen))
	{
		GUC_check_errdetail("Plain http:// is only allowed to a loopback address; use https://.");
		return false;
	}
	return true;
}

/*
 * Accept what a person writes for a point in time: YYYY-MM-DD, optionally
 * followed by a time (T or space) and a zone (Z or +HH[:MM]).  The value is
 * converted by timestamptz input at run time; this only catches typos early
 * (and, unlike the datetime parser, needs no time zone set up, which the
 * postmaster may not have yet while reading postgresql.conf).
 */
static bool
check_initial_since(char **newval, void **extra, GucSource source)
{
	const char *s = *newval;
	int			y,
				mo,
				d,
				n = 0;

	if (*s == '\0')
		return true;
	if (sscanf(s, "%4d-%2d-%2d%n", &y, &mo, &d, &n) != 3 || n != 10 ||
		mo < 1 || mo > 12 || d < 1 || d > 31)
	{
		GUC_check_errdetail("phsync.initial_since must be a timestamp such as 2026-01-01 or 2026-01-01T00:00:00Z.");
		return false;
	}
	s += n;
	if (*s == 'T' || *s == ' ')
	{
		s++;
		if (strspn(s, "0123456789:.") < 5 || parse_time_of_day(pnstrdup(s, 5)) < 0)
		{
			GUC_check_errdetail("phsync.initial_since must be a timestamp such as 2026-01-01 or 2026-01-01T00:00:00Z.");
			return false;
		}
		s += strspn(s, "0123456789:.");
		if (*s == 'Z' || *s == 'z')
			s++;
		else if (*s == '+' || *s == '-')
			s += 1 + strspn(s + 1, "0123456789:");
	}
	if (*s != '\0')
	{
		GUC_check_errdetail("phsync.initial_since must be a timestamp such as 2026-01-01 or 2026-01-01T00:00:00Z.");
		return false;
	}
	return true;
}

static bool
check_target_table(char **newval, void **extra, GucSource source)
{
	char	   *copy = pstrdup(*newval);
	List	   *names;
	bool		ok;

	if (**newval == '\0')
		return true;			/* the default sync is off */
	ok = SplitIdentifierString(copy, '.', &names);
	if (!ok || list_length(names) < 1 || list_length(names) > 2)
	{
		GUC_check_errdetail("phsync.target_table must be a table name, optionally schema-qualified.");
		return false;
	}
	return true;
}

static bool
check_cursor_column(char **newval, void **extra, GucSource source)
{
	if (**newval == '\0')
	{
		GUC_check_errdetail("phsync.cursor_column must name a column of the target table.");
		return false;
	}
	return true;
}

/*
 * Module load: settings always; the worker and shared memory only when
 * loaded through shared_preload_libraries.
 */
void
_PG_init(void)
{
	/*
	 * phsync.database only matters to the worker, which exists only when
	 * preloaded; PostgreSQL refuses to define a PGC_POSTMASTER setting after
	 * start-up, so a session that merely loads the library gets it as a
	 * reloadable one (CREATE EXTENSION still reads it).
	 */
	DefineCustomStringVariable("phsync.database",
							   "Database the phsync background worker connects to.",
							   NULL, &phsync_database, "postgres",
							   process_shared_preload_libraries_in_progress ?
							   PGC_POSTMASTER : PGC_SIGHUP,
							   0, NULL, NULL, NULL);
	DefineCustomStringVariable("phsync.host",
							   "PostHog base URL (US, EU or self-hosted).",
							   NULL, &phsync_host, "https://us.posthog.com",
							   PGC_SIGHUP, 0, check_host, NULL, NULL);
	DefineCustomStringVariable("phsync.project_id",
							   "PostHog project id.",
							   NULL, &phsync_project_id, "",
							   PGC_SIGHUP, 0, check_project_id, NULL, NULL);
	DefineCustomStringVariable("phsync.api_key",
							   "PostHog personal API key (needs the Query Read scope).",
							   "Shown as " API_KEY_MASK " whatever its value.",
							   &api_key_shown, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   check_api_key, assign_api_key, NULL);
	DefineCustomStringVariable("phsync.target_table",
							   "Table the synced rows go into.",
							   NULL, &phsync_target_table, "public.posthog_events",
							   PGC_SIGHUP, 0, check_target_table, NULL, NULL);
	DefineCustomStringVariable("phsync.query_file",
							   "File holding a custom HogQL query; empty means the built-in events query.",
							   "Absolute, or relative to the data directory.",
							   &phsync_query_file, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomStringVariable("phsync.cursor_column",
							   "Column of the target table whose max() is the watermark.",
							   NULL, &phsync_cursor_column, "created_at",
							   PGC_SIGHUP, 0, check_cursor_column, NULL, NULL);
	DefineCustomIntVariable("phsync.lookback",
							"How far before the watermark each run starts re-reading.",
							NULL, &phsync_lookback, 600, 0, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomStringVariable("phsync.initial_since",
							   "Where the first run starts when the target is empty; empty means 30 days before the run.",
							   NULL, &phsync_initial_since, "",
							   PGC_SIGHUP, 0, check_initial_since, NULL, NULL);
	DefineCustomStringVariable("phsync.run_at",
							   "Time of day (UTC) of the scheduled run, HH:MM.",
							   NULL, &phsync_run_at, "02:00",
							   PGC_SIGHUP, 0, check_run_at, assign_run_at, NULL);
	DefineCustomIntVariable("phsync.interval",
							"Time between scheduled runs, counted from phsync.run_at.",
							NULL, &phsync_interval, 86400, 60, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("phsync.page_size",
							"Rows per PostHog request.",
							NULL, &phsync_page_size, 10000, 1, 50000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("phsync.request_timeout",
							"Limit for one HTTP request.",
							NULL, &phsync_request_timeout, 60000, 100, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomStringVariable("phsync.ca_file",
							   "Extra CA bundle for TLS verification.",
							   NULL, &phsync_ca_file, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);

	DefineCustomIntVariable("phsync.max_retries",
							"Retries of one request after a transient failure.",
							NULL, &phsync_max_retries, 5, 0, 100,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("phsync.retry_base_delay",
							"First backoff delay; it doubles with each retry (with jitter).",
							NULL, &phsync_retry_base_delay, 1000, 1, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("phsync.max_retry_delay",
							"Longest wait before a retry, Retry-After included.",
							NULL, &phsync_max_retry_delay, 300000, 1, 24 * 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("phsync.max_requests_per_minute",
							"Most PostHog requests phsync starts in a minute; 0 means no limit.",
							NULL, &phsync_max_requests_per_minute, 30, 0, 60000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("phsync.max_response_size",
							"Largest PostHog response accepted (after decompression).",
							NULL, &phsync_max_response_size, 256 * 1024, 64, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_KB, NULL, NULL, NULL);
	DefineCustomEnumVariable("phsync.on_bad_row",
							 "What to do with a row the target refuses: reject (keep it in phsync.rejects) or fail the run.",
							 NULL, &phsync_on_bad_row, PHSYNC_BAD_ROW_REJECT,
							 on_bad_row_options, PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("phsync.role",
							   "Role the worker runs as; empty means the bootstrap superuser.",
							   NULL, &phsync_role, "",
							   process_shared_preload_libraries_in_progress ?
							   PGC_POSTMASTER : PGC_SIGHUP,
							   0, NULL, NULL, NULL);

	DefineCustomIntVariable("phsync.history_days",
							"Days of run history kept in phsync.runs (and phsync.rejects); 0 keeps all.",
							NULL, &phsync_history_days, 90, 0, 100000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomBoolVariable("phsync.progress_notices",
							 "Whether phsync_run_now() reports progress as NOTICEs while it waits.",
							 NULL, &phsync_progress_notices, true,
							 PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("phsync.timezone",
							   "Time zone of phsync.run_at.",
							   "Daylight-saving changes are followed: a run_at that does not exist that day runs at the first valid time after it, one that exists twice runs once.",
							   &phsync_timezone, "UTC",
							   PGC_SIGHUP, 0, check_timezone, assign_timezone, NULL);
	DefineCustomBoolVariable("phsync.verify",
							 "Whether scheduled runs of the default sync also verify the previous day.",
							 "Only with the built-in events query; added syncs have their own verify flag.",
							 &phsync_verify_yesterday, true,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);

	MarkGUCPrefixReserved("phsync");

	if (!process_shared_preload_libraries_in_progress)
		return;

	phsync_shmem_init();
	phsync_register_worker();
}

/* ---------- phsync_run_now() ---------- */

static void
check_callable_here(void)
{
	char	   *dbname;

	if (phsync_shared == NULL)
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
}

/*
 * Withdraw a request the worker has not taken yet (the caller was cancelled
 * before the run started): nobody is waiting for it any more.
 */
static void
withdraw_request(uint64 my_request)
{
	SpinLockAcquire(&phsync_shared->mutex);
	if (phsync_shared->result_request == my_request)
		phsync_shared->result_unread = false;
	if (phsync_shared->requests == my_request &&
		phsync_shared->requests_done < my_request &&
		phsync_shared->requester_latch == MyLatch &&
		phsync_shared->request_taken != my_request)
	{
		phsync_shared->requests_done = my_request;
		phsync_shared->requester_latch = NULL;
	}
	else if (phsync_shared->requester_latch == MyLatch)
		phsync_shared->requester_latch = NULL;
	SpinLockRelease(&phsync_shared->mutex);
}

/*
 * Error context while phsync_run_now() waits: a cancel (statement_timeout,
 * Ctrl-C) stops the waiting, not a run the worker has started.
 */
static void
run_now_wait_context(void *arg)
{
	int64		run_id;

	SpinLockAcquire(&phsync_shared->mutex);
	run_id = phsync_shared->running_run_id;
	SpinLockRelease(&phsync_shared->mutex);
	if (run_id)
		errcontext("while waiting for phsync run %lld, which goes on in the background",
				   (long long) run_id);
	else
		errcontext("while waiting for the phsync worker to start a run");
}

/*
 * Wait until the worker has answered request my_request.
 */
static void
wait_for_run(uint64 my_request, PhsyncAnswer *answer)
{
	ErrorContextCallback errcallback;
	TimestampTz last_notice = GetCurrentTimestamp();
	TimestampTz absent_since = 0;
	int			noticed_pages = 0;
	bool		worker_absent;

	errcallback.callback = run_now_wait_context;
	errcallback.arg = NULL;
	errcallback.previous = error_context_stack;
	error_context_stack = &errcallback;

	for (;;)
	{
		bool		done;

		SpinLockAcquire(&phsync_shared->mutex);
		done = phsync_shared->requests_done >= my_request &&
			phsync_shared->result_request == my_request;
		worker_absent = phsync_shared->worker_pid == 0 &&
			phsync_shared->request_taken != my_request;
		if (done)
		{
			phsync_shared->result_unread = false;
			*answer = phsync_shared->result;
		}
		SpinLockRelease(&phsync_shared->mutex);
		if (done)
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
			int64		run_id;
			int			pages;
			int64		received;

			SpinLockAcquire(&phsync_shared->mutex);
			run_id = phsync_shared->running_run_id;
			pages = phsync_shared->progress_pages;
			received = phsync_shared->progress_received;
			SpinLockRelease(&phsync_shared->mutex);
			if (run_id && pages > noticed_pages)
			{
				ereport(NOTICE,
						(errmsg("phsync run %lld: %d pages, %lld rows so far",
								(long long) run_id, pages, (long long) received)));
				noticed_pages = pages;
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
 * error if it failed (same SQLSTATE and hint as in the worker).
 */
static void
submit_request(PhsyncRequest *request, PhsyncAnswer *answer)
{
	volatile uint64 my_request = 0;
	int64		busy_run = 0;
	int			unread_pid;
	bool		busy;
	Latch	   *worker_latch;

	check_callable_here();

	/* an answer its caller never read, because that backend is gone */
	SpinLockAcquire(&phsync_shared->mutex);
	unread_pid = phsync_shared->result_unread ? phsync_shared->requester_pid : 0;
	SpinLockRelease(&phsync_shared->mutex);
	if (unread_pid != 0 && BackendPidGetProc(unread_pid) == NULL)
	{
		SpinLockAcquire(&phsync_shared->mutex);
		if (phsync_shared->requester_pid == unread_pid)
			phsync_shared->result_unread = false;
		SpinLockRelease(&phsync_shared->mutex);
	}

	SpinLockAcquire(&phsync_shared->mutex);
	busy = phsync_shared->running ||
		phsync_shared->requests != phsync_shared->requests_done ||
		phsync_shared->result_unread;
	if (busy)
		busy_run = phsync_shared->running_run_id;
	else
	{
		my_request = ++phsync_shared->requests;
		phsync_shared->request = *request;
		phsync_shared->requester_latch = MyLatch;
		phsync_shared->requester_pid = MyProcPid;
	}
	worker_latch = phsync_shared->worker_latch;
	SpinLockRelease(&phsync_shared->mutex);

	if (busy)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_IN_USE),
				 errmsg("a phsync run is already in progress"),
				 busy_run ? errdetail("Run %lld has not finished yet.", (long long) busy_run) : 0,
				 errhint("Wait for it to end; SELECT * FROM phsync.runs ORDER BY id DESC shows its progress.")));

	if (worker_latch)
		SetLatch(worker_latch);

	PG_TRY();
	{
		wait_for_run(my_request, answer);
	}
	PG_CATCH();
	{
		withdraw_request(my_request);
		PG_RE_THROW();
	}
	PG_END_TRY();

	if (!answer->ok)
		ereport(ERROR,
				(errcode(answer->sqlerrcode ? answer->sqlerrcode : ERRCODE_INTERNAL_ERROR),
				 errmsg_internal("%s", answer->message),
				 answer->run_id ? errdetail("phsync run %lld failed.", (long long) answer->failed_run_id) : 0,
				 answer->hint[0] ? errhint("%s", answer->hint) : 0));
}

/*
 * Rows of a query (one int8 parameter) into the function's result set.
 */
static void
return_rows(FunctionCallInfo fcinfo, const char *sql, int64 arg1, int64 arg2)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Oid			argtypes[2] = {INT8OID, INT8OID};
	Datum		args[2] = {Int64GetDatum(arg1), Int64GetDatum(arg2)};
	uint64		i;

	InitMaterializedSRF(fcinfo, 0);
	/* the runs committed in the worker; a fresh snapshot sees them */
	SPI_connect();
	if (SPI_execute_with_args(sql, 2, argtypes, args, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read the results of phsync run %lld", (long long) arg1);
	if (SPI_processed == 0 && arg1 != 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("phsync run %lld finished, but its results are not visible", (long long) arg1),
				 errhint("Call it in a READ COMMITTED transaction.")));
	for (i = 0; i < SPI_processed; i++)
		tuplestore_puttuple(rsinfo->setResult, SPI_tuptable->vals[i]);
	SPI_finish();
}

/*
 * phsync_run_now(sync text DEFAULT NULL) RETURNS SETOF phsync.runs
 *
 * Asks the worker to run every enabled sync, or the one named, waits for
 * the runs to end and returns their rows.  If a run failed, raises its
 * error.
 */
Datum
phsync_run_now(PG_FUNCTION_ARGS)
{
	PhsyncRequest request;
	PhsyncAnswer	answer;

	memset(&request, 0, sizeof(request));
	request.kind = PHSYNC_REQUEST_RUN;
	/* version 0.1 declared it without the argument */
	if (PG_NARGS() > 0 && !PG_ARGISNULL(0))
		strlcpy(request.sync, text_to_cstring(PG_GETARG_TEXT_PP(0)), NAMEDATALEN);
	submit_request(&request, &answer);
	return_rows(fcinfo, "SELECT * FROM phsync.runs WHERE id BETWEEN $1 AND $2 "
				"AND trigger = 'manual' ORDER BY id",
				answer.run_id, answer.last_run_id);
	return (Datum) 0;
}

static int64
interval_usecs(Interval *iv, const char *what)
{
	if (iv->month != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be given in days, hours or smaller units, not months", what)));
	return iv->time + (int64) iv->day * USECS_PER_DAY;
}

static void
require_arg(FunctionCallInfo fcinfo, int arg, const char *name)
{
	if (PG_ARGISNULL(arg))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", name)));
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

/*
 * phsync_verify(sync, from, to, bucket, repair) RETURNS TABLE (bucket,
 * posthog_count, local_count, status)
 */
Datum
phsync_verify(PG_FUNCTION_ARGS)
{
	PhsyncRequest request;
	PhsyncAnswer	answer;

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
	submit_request(&request, &answer);
	return_rows(fcinfo, "SELECT bucket, posthog_count, local_count, status "
				"FROM phsync.verifications WHERE run_id = $1 AND $2 IS NOT NULL ORDER BY bucket",
				answer.run_id, answer.run_id);
	return (Datum) 0;
}

/* wake the worker when the transaction that queued a backfill commits */
static bool wake_registered = false;
static bool wake_pending = false;

static void
wake_worker_at_commit(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_COMMIT && wake_pending && phsync_shared)
	{
		Latch	   *latch;

		SpinLockAcquire(&phsync_shared->mutex);
		latch = phsync_shared->worker_latch;
		SpinLockRelease(&phsync_shared->mutex);
		if (latch)
			SetLatch(latch);
	}
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT)
		wake_pending = false;
}

/*
 * phsync_backfill(sync, from, to) RETURNS phsync.runs
 *
 * Queues a backfill: a phsync.runs row in status 'queued', which the worker
 * carries out after the caller commits.  Returns that row.
 */
Datum
phsync_backfill(PG_FUNCTION_ARGS)
{
	char	   *sync;
	TimestampTz from;
	TimestampTz to;
	Oid			types[4] = {TEXTOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID};
	Datum		values[4];
	char	   *target = NULL;
	TupleDesc	tupdesc;
	Datum		result;

	require_arg(fcinfo, 0, "sync");
	require_arg(fcinfo, 1, "from");
	require_arg(fcinfo, 2, "to");
	sync = text_to_cstring(PG_GETARG_TEXT_PP(0));
	from = PG_GETARG_TIMESTAMPTZ(1);
	to = PG_GETARG_TIMESTAMPTZ(2);
	check_callable_here();
	check_range(from, to);
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	SPI_connect();
	{
		List	   *syncs = sync_list(sync, false);

		target = ((PhsyncSync *) linitial(syncs))->target;
	}
	/* queued here, by this cluster: the worker must not take it for a restored one */
	(void) runlog_claim_cluster_spi();
	values[0] = CStringGetTextDatum(sync);
	values[1] = CStringGetTextDatum(target);
	values[2] = TimestampTzGetDatum(from);
	values[3] = TimestampTzGetDatum(to);
	if (SPI_execute_with_args("INSERT INTO phsync.runs (trigger, status, sync, target, window_from, window_until) "
							  "VALUES ('backfill', 'queued', $1, $2, $3, $4) RETURNING *",
							  4, types, values, NULL, false, 1) != SPI_OK_INSERT_RETURNING ||
		SPI_processed != 1)
		elog(ERROR, "could not queue the backfill");
	result = PointerGetDatum(SPI_returntuple(SPI_tuptable->vals[0], tupdesc));
	SPI_finish();

	if (!wake_registered)
	{
		RegisterXactCallback(wake_worker_at_commit, NULL);
		wake_registered = true;
	}
	wake_pending = true;
	PG_RETURN_DATUM(result);
}

/*
 * phsync_sync_state() RETURNS SETOF (sync, enabled, target, watermark,
 * next_run, running, run_id, pages, rows_received)
 *
 * What the phsync.status view needs from outside phsync.runs: each sync's
 * watermark (max(cursor) of its target, NULL while it does not exist or is
 * empty) and the worker's shared state.
 */
Datum
phsync_sync_state(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	List	   *syncs;
	ListCell   *lc;
	TimestampTz next_due = 0;
	char		running_sync[NAMEDATALEN] = "";
	bool		running = false;
	int64		run_id = 0;
	int			pages = 0;
	int64		received = 0;

	InitMaterializedSRF(fcinfo, 0);
	if (phsync_shared)
	{
		SpinLockAcquire(&phsync_shared->mutex);
		next_due = phsync_shared->next_due;
		running = phsync_shared->running && phsync_shared->running_sync[0];
		if (running)
		{
			strlcpy(running_sync, phsync_shared->running_sync, NAMEDATALEN);
			run_id = phsync_shared->running_run_id;
			pages = phsync_shared->progress_pages;
			received = phsync_shared->progress_received;
		}
		SpinLockRelease(&phsync_shared->mutex);
	}

	SPI_connect();
	syncs = sync_list(NULL, false);
	foreach(lc, syncs)
	{
		PhsyncSync *s = lfirst(lc);
		Datum		values[9];
		bool		nulls[9] = {false, false, false, true, true, false, true, false, false};
		bool		mine = running && strcmp(running_sync, s->name) == 0;
		Oid			relid;
		TimestampTz watermark;

		values[0] = CStringGetTextDatum(s->name);
		values[1] = BoolGetDatum(s->enabled);
		values[2] = CStringGetTextDatum(s->target);
		relid = RangeVarGetRelid(target_rangevar(s->target), AccessShareLock, true);
		if (OidIsValid(relid) && get_attnum(relid, s->cursor) != InvalidAttrNumber &&
			relation_watermark(relid, s->cursor, NULL, NULL, &watermark))
		{
			values[3] = TimestampTzGetDatum(watermark);
			nulls[3] = false;
		}
		if (next_due != 0 && s->enabled)
		{
			values[4] = TimestampTzGetDatum(next_due);
			nulls[4] = false;
		}
		values[5] = BoolGetDatum(mine);
		if (mine && run_id)
		{
			values[6] = Int64GetDatum(run_id);
			nulls[6] = false;
		}
		values[7] = Int32GetDatum(mine ? pages : 0);
		values[8] = Int64GetDatum(mine ? received : 0);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	SPI_finish();
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
 * phsync_worker_state(): a function of version 0.1, which the library keeps
 * only so that the 0.1 install script can be run before updating.
 */
Datum
phsync_worker_state(PG_FUNCTION_ARGS)
{
	ereport(ERROR,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
			 errmsg("extension phsync needs to be updated"),
			 errhint("ALTER EXTENSION phsync UPDATE;")));
	PG_RETURN_NULL();
}

static void
doctor_emit(void *arg, const char *check, const char *status, const char *detail,
			const char *hint)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) arg;
	Datum		values[4];
	bool		nulls[4] = {false, false, detail == NULL, hint == NULL};

	values[0] = CStringGetTextDatum(check);
	values[1] = CStringGetTextDatum(status);
	values[2] = detail ? CStringGetTextDatum(detail) : (Datum) 0;
	values[3] = hint ? CStringGetTextDatum(hint) : (Datum) 0;
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
}

/*
 * phsync_doctor() RETURNS TABLE (check, status, detail, hint)
 */
Datum
phsync_doctor(PG_FUNCTION_ARGS)
{
	InitMaterializedSRF(fcinfo, 0);
	doctor_run(doctor_emit, fcinfo->resultinfo);
	return (Datum) 0;
}
