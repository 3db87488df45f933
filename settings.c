/*-------------------------------------------------------------------------
 *
 * settings.c
 *		Every phsync.* setting: its definition, its check hook, and the few
 *		values derived from it.
 *
 * This is the bottom layer: everything above may read the variables
 * declared in phsync.h, but the HTTP, retry and HogQL code below the run
 * layer gets them passed in as arguments, so that syncs with their own
 * connection (a foreign server) use the same code.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>
#include <limits.h>
#include <sys/stat.h>

#include "miscadmin.h"
#include "pgtime.h"
#include "utils/guc.h"
#include "utils/guc_tables.h"
#include "utils/varlena.h"

#include "phsync.h"

char	   *phsync_database = NULL;
char	   *phsync_host = NULL;
char	   *phsync_project_id = NULL;
char	   *phsync_target_table = NULL;
char	   *phsync_query_file = NULL;
char	   *phsync_cursor_column = NULL;
char	   *phsync_initial_since = NULL;
char	   *phsync_run_at = NULL;
char	   *phsync_ca_file = NULL;
char	   *phsync_proxy = NULL;
int			phsync_lookback = 600;
int			phsync_interval = 86400;
int			phsync_page_size = 50000;
int			phsync_request_timeout = 90000;
int			phsync_max_retries = 5;
int			phsync_retry_base_delay = 1000;
int			phsync_max_retry_delay = 300000;
int			phsync_max_requests_per_minute = 240;
int			phsync_max_requests_per_hour = 2400;
int			phsync_max_concurrent_requests = 2;
int			phsync_max_response_size = 256 * 1024;
int			phsync_on_bad_row = PHSYNC_BAD_ROW_REJECT;
char	   *phsync_role = NULL;
int			phsync_history_days = 90;
bool		phsync_progress_notices = true;
char	   *phsync_timezone = NULL;
bool		phsync_verify_yesterday = true;
int			phsync_mirror_deletions = 0;	/* phsync.deletions, an enum: 1 is mirror */
double		phsync_max_delete_fraction = 0.1;
int			phsync_max_syncs = 100;
int			phsync_max_queued_runs = 100;
int			phsync_max_verify_buckets = 1000;
int			phsync_max_backfill_range = 5 * 366 * 24 * 60;
int			phsync_lock_timeout = 60 * 1000;
bool		phsync_enabled = true;
int			phsync_log_runs = PHSYNC_LOG_RUNS_ALL;

/* phsync.deletions: keep (false) or mirror (true) */
static const struct config_enum_entry deletions_options[] = {
	{"keep", false, false},
	{"mirror", true, false},
	{NULL, 0, false}
};

static const struct config_enum_entry log_runs_options[] = {
	{"all", PHSYNC_LOG_RUNS_ALL, false},
	{"failures", PHSYNC_LOG_RUNS_FAILURES, false},
	{"none", PHSYNC_LOG_RUNS_NONE, false},
	{NULL, 0, false}
};

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

/*
 * The real API key ("" when unset).
 */
const char *
settings_api_key(void)
{
	return api_key_value ? api_key_value : "";
}

/*
 * phsync.run_at as seconds after midnight (in phsync.timezone).
 */
int
settings_run_at_seconds(void)
{
	return run_at_seconds;
}

/*
 * phsync.timezone.
 */
pg_tz *
settings_timezone(void)
{
	if (schedule_tz == NULL)
		schedule_tz = pg_tzset("UTC");
	return schedule_tz;
}

/*
 * Is s a PostHog base URL phsync may talk to?  https://, or http:// to a
 * loopback address (tests); no user, query or fragment.  On failure,
 * *detail says why (a full sentence).  Shared by phsync.host and the
 * foreign servers' host option.
 */
bool
settings_host_ok(const char *s, const char **detail)
{
	const char *host;
	size_t		hostlen;
	bool		https;

	if (strncmp(s, "https://", 8) == 0)
		https = true;
	else if (strncmp(s, "http://", 7) == 0)
		https = false;
	else
	{
		*detail = "The host must start with https://.";
		return false;
	}
	host = s + (https ? 8 : 7);
	if (*host == '[')
		hostlen = strcspn(host, "]") + 1;
	else
		hostlen = strcspn(host, ":/?#");
	if (hostlen == 0 || strpbrk(host, "?#@ \t\r\n") != NULL)
	{
		*detail = "The host must be a base URL such as https://eu.posthog.com, without user, query or fragment.";
		return false;
	}
	if (!https &&
		!(hostlen == 9 && strncmp(host, "localhost", 9) == 0) &&
		!(hostlen == 5 && strncmp(host, "[::1]", 5) == 0) &&
		!(hostlen >= 4 && strncmp(host, "127.", 4) == 0 &&
		  strspn(host, "0123456789.") == hostlen))
	{
		*detail = "Plain http:// is only allowed to a loopback address; use https://.";
		return false;
	}
	return true;
}

/*
 * Is s a PostHog project id (digits only; empty allowed: "not set")?
 */
bool
settings_project_id_ok(const char *s)
{
	for (; *s; s++)
		if (!isdigit((unsigned char) *s))
			return false;
	return true;
}

/*
 * Is s usable as a proxy URL (for phsync.proxy and a server's proxy
 * option)?  *detail says why not.
 */
bool
settings_proxy_ok(const char *s, const char **detail)
{
	if (strpbrk(s, " \t\r\n") != NULL)
	{
		*detail = "A proxy is a URL such as http://proxy.example.com:3128.";
		return false;
	}
	return true;
}

/* ---------- check and assign hooks ---------- */

static bool
check_proxy(char **newval, void **extra, GucSource source)
{
	const char *detail;

	if (*newval && !settings_proxy_ok(*newval, &detail))
	{
		GUC_check_errdetail("%s", detail);
		return false;
	}
	return true;
}

/*
 * The key goes into *extra, the mask into *newval.  Both are PostgreSQL's
 * to free from now on, so they come from phsync_guc_malloc() (compat.h),
 * as does the old *newval it frees.
 */
static bool
check_api_key(char **newval, void **extra, GucSource source)
{
	char	   *key = phsync_guc_malloc(strlen(*newval) + 1);
	char	   *mask = phsync_guc_malloc(sizeof(API_KEY_MASK));

	if (key == NULL || mask == NULL)
	{
		if (key)
			phsync_guc_free(key);
		if (mask)
			phsync_guc_free(mask);
		return false;
	}
	strcpy(key, *newval);
	strcpy(mask, API_KEY_MASK);
	explicit_bzero(*newval, strlen(*newval));
	phsync_guc_free(*newval);
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
 * The file that sets phsync.api_key, when users other than the file's
 * owner and group can read it (Debian's postgresql.conf is 0644); NULL
 * when the key is unset, set elsewhere (ALTER SYSTEM's postgresql.auto.conf
 * is 0600) or in a file others cannot read.  *mode gets the file's mode.
 */
const char *
settings_api_key_exposed(int *mode)
{
	struct config_generic *rec = phsync_find_setting("phsync.api_key");
	struct stat st;

	if (settings_api_key()[0] == '\0' || rec == NULL ||
		rec->source != PGC_S_FILE || rec->sourcefile == NULL ||
		stat(rec->sourcefile, &st) != 0 || (st.st_mode & S_IROTH) == 0)
		return NULL;
	*mode = (int) (st.st_mode & 07777);
	return rec->sourcefile;
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
	secs = phsync_guc_malloc(sizeof(int));
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
	pg_tz	  **tz = phsync_guc_malloc(sizeof(pg_tz *));

	if (tz == NULL)
		return false;
	*tz = pg_tzset(*newval);
	if (*tz == NULL || !pg_tz_acceptable(*tz))
	{
		phsync_guc_free(tz);
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
	if (!settings_project_id_ok(*newval))
	{
		GUC_check_errdetail("phsync.project_id must be the numeric id of a PostHog project.");
		return false;
	}
	return true;
}

static bool
check_host(char **newval, void **extra, GucSource source)
{
	const char *detail;

	if (!settings_host_ok(*newval, &detail))
	{
		GUC_check_errdetail("%s", detail);
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
	bool		ok = true;

	if (*s == '\0')
		return true;
	if (sscanf(s, "%4d-%2d-%2d%n", &y, &mo, &d, &n) != 3 || n != 10 ||
		mo < 1 || mo > 12 || d < 1 || d > 31)
		ok = false;
	else
	{
		s += n;
		if (*s == 'T' || *s == ' ')
		{
			char		hhmm[6];

			s++;
			strlcpy(hhmm, s, sizeof(hhmm));
			if (strspn(s, "0123456789:.") < 5 || parse_time_of_day(hhmm) < 0)
				ok = false;
			else
			{
				s += strspn(s, "0123456789:.");
				if (*s == 'Z' || *s == 'z')
					s++;
				else if (*s == '+' || *s == '-')
					s += 1 + strspn(s + 1, "0123456789:");
			}
		}
		if (*s != '\0')
			ok = false;
	}
	if (!ok)
		GUC_check_errdetail("phsync.initial_since must be a timestamp such as 2026-01-01 or 2026-01-01T00:00:00Z.");
	return ok;
}

static bool
check_target_table(char **newval, void **extra, GucSource source)
{
	char	   *copy;
	List	   *names;
	bool		ok;

	if (**newval == '\0')
		return true;			/* the default sync is off */
	copy = pstrdup(*newval);
	ok = SplitIdentifierString(copy, '.', &names) &&
		list_length(names) >= 1 && list_length(names) <= 2;
	list_free(names);
	pfree(copy);
	if (!ok)
		GUC_check_errdetail("phsync.target_table must be a table name, optionally schema-qualified.");
	return ok;
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
 * Define every setting (from _PG_init).
 *
 * phsync.database and phsync.role only matter to the worker, which exists
 * only when preloaded; PostgreSQL refuses to define a PGC_POSTMASTER
 * setting after start-up, so a session that merely loads the library gets
 * them as reloadable ones (CREATE EXTENSION still reads phsync.database).
 */
void
settings_define(void)
{
	GucContext	startup = process_shared_preload_libraries_in_progress ?
		PGC_POSTMASTER : PGC_SIGHUP;

	DefineCustomStringVariable("phsync.database",
							   "Database the phsync background worker connects to.",
							   NULL, &phsync_database, "postgres",
							   startup, 0, NULL, NULL, NULL);
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
							   "Time of day (in phsync.timezone) of the scheduled run, HH:MM.",
							   NULL, &phsync_run_at, "02:00",
							   PGC_SIGHUP, 0, check_run_at, assign_run_at, NULL);
	DefineCustomIntVariable("phsync.interval",
							"Time between scheduled runs, counted from phsync.run_at.",
							NULL, &phsync_interval, 86400, 60, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("phsync.page_size",
							"Most rows per PostHog request.",
							"Pages start at 10000 rows (or this, when smaller) and grow to this while PostHog answers quickly.",
							&phsync_page_size, 50000, 1, 50000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("phsync.request_timeout",
							"How long phsync waits for PostHog's answer to start, or for more of it.",
							"Past it, the request is given up and cancelled on PostHog's side.  The default is above PostHog's own limits: 30 s waiting for a query slot plus 60 s of execution.",
							&phsync_request_timeout, 90000, 100, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomStringVariable("phsync.proxy",
							   "Proxy the default sync reaches PostHog through (empty: none).",
							   "For example http://proxy.example.com:3128.  Proxy variables of the server's environment are never used.",
							   &phsync_proxy, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, check_proxy, NULL, NULL);
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
							"Most PostHog requests phsync starts in any minute; 0 means no limit.",
							"PostHog's limit for API queries is 240 a minute, per key.",
							&phsync_max_requests_per_minute, 240, 0, 60000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("phsync.max_requests_per_hour",
							"Most PostHog requests phsync starts in any hour; 0 means no limit.",
							"PostHog's limit for API queries is 2400 an hour, per key; 120 for HogQL outside that programme.",
							&phsync_max_requests_per_hour, 2400, 0, 1000000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("phsync.max_concurrent_requests",
							"Most PostHog requests a run has in flight at once.",
							"PostHog runs 3 queries of a project at once; the default leaves one for PostHog's own users.",
							&phsync_max_concurrent_requests, 2, 1, 32,
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
							   startup, 0, NULL, NULL, NULL);
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

	DefineCustomEnumVariable("phsync.deletions",
							 "What the default sync does with rows PostHog no longer has: keep or mirror.",
							 "mirror: a repair deletes the rows PostHog no longer has in the range it verified.",
							 &phsync_mirror_deletions, false, deletions_options,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);

	DefineCustomRealVariable("phsync.max_delete_fraction",
							 "The largest share of a bucket (or of a table read whole) that mirroring deletions may delete in one run.",
							 "A repair or a whole re-read that would delete more deletes nothing and says so.",
							 &phsync_max_delete_fraction, 0.1, 0.0, 1.0,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);

	DefineCustomBoolVariable("phsync.enabled",
							 "Whether scheduled runs run.",
							 "Off pauses every sync's schedule; phsync_run_now(), backfills and verifications still run.",
							 &phsync_enabled, true,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomEnumVariable("phsync.log_runs",
							 "Which runs the worker logs: all (start and end of each), failures, or none.",
							 "A failed run is always in phsync.runs and in the NOTIFY phsync payload.",
							 &phsync_log_runs, PHSYNC_LOG_RUNS_ALL, log_runs_options,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("phsync.max_syncs",
							"Most syncs phsync_add_sync() accepts.",
							NULL, &phsync_max_syncs, 100, 0, 100000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("phsync.max_queued_runs",
							"Most queued runs (backfills) one role's syncs may have waiting.",
							"The worker serves owners in turn, so a long queue delays only its owner.",
							&phsync_max_queued_runs, 100, 1, 100000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("phsync.max_verify_buckets",
							"Most buckets one phsync_verify() may count.",
							"Each 31 buckets cost one PostHog request.",
							&phsync_max_verify_buckets, 1000, 1, 100000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("phsync.max_backfill_range",
							"Longest range one phsync_backfill() may cover.",
							NULL, &phsync_max_backfill_range, 5 * 366 * 24 * 60, 1, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_MIN, NULL, NULL, NULL);

	DefineCustomIntVariable("phsync.lock_timeout",
							"Longest wait of a run for a lock on a table; 0 waits for ever.",
							"A target's owner who holds a lock on it (LOCK TABLE, a long ALTER TABLE) makes the run fail after this long instead of holding the worker, and every other sync, behind it.",
							&phsync_lock_timeout, 60 * 1000, 0, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);

	MarkGUCPrefixReserved("phsync");
}
