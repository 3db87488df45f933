/*-------------------------------------------------------------------------
 *
 * phsync.h
 *		What crosses phsync's source files.
 *
 * The files form layers that only call downward; read them bottom-up.
 * test/layers.sh checks that every call between files goes to a file
 * listed earlier here.
 *
 *	1. foundations
 *	   settings.c	every phsync.* setting and its check hook
 *	   servers.c	where a PostHog project is: the settings, or a foreign
 *					server and a user mapping (the wrapper's validator)
 *	   presets.c	the built-in queries: tables, columns, keys, defaults
 *	   shmem.c		the shared-memory protocol between sessions and the worker
 *	   xact.c		transactions and SPI, recovering from errors
 *	2. talking to PostHog
 *	   schedule.c	when scheduled runs are due
 *	   response.c	reading responses as they arrive: rows, columns, types;
 *					PostHog's text made safe to store
 *	   convert.c	PostHog's values as PostgreSQL's: date-time text
 *	   hogql.c		HogQL text and request bodies, keyset positions
 *	   http.c		the libcurl client: requests in flight, cancelled when given up
 *	   retry.c		what is retried and how; the request budget
 *	3. PostgreSQL's side
 *	   runlog.c		phsync.runs, rejects, verifications, cluster
 *	   target.c		what makes a table an acceptable target; its watermark
 *	   syncs.c		sync definitions: default (settings) and phsync.syncs
 *	   loader.c		rows of a page into the target, through SPI
 *	4. fetching
 *	   fetch.c		a window, page by page: keyset, slices, asking for less
 *	   verify.c		PostHog's counts per bucket against the target's
 *	   query.c		PostHog from SQL in a session: phsync_query(), discovery
 *	5. one run, the doctor, owners
 *	   run.c		one run of a sync (load or verify), its outcome
 *	   doctor.c		phsync_doctor()'s checks
 *	   roles.c		sync owners through DROP ROLE, DROP OWNED, REASSIGN OWNED
 *	6. worker.c		the background worker's loop
 *	7. phsync.c		_PG_init and the SQL-callable functions
 *
 *-------------------------------------------------------------------------
 */
#ifndef PHSYNC_H
#define PHSYNC_H

#include "postgres.h"

#include "access/attnum.h"
#include "access/tupdesc.h"
#include "executor/spi.h"
#include "nodes/pg_list.h"
#include "nodes/primnodes.h"
#include "pgtime.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"

#include "compat.h"

/*
 * PostgreSQL's fmgrprotos.h declares a SQL function called json_object,
 * which clashes with json-c's type of that name.  Give json-c's struct
 * another name (only the C type name changes, not any linked symbol).
 * Include this header after all PostgreSQL headers.
 */
#define json_object phsync_json_object
#include <json.h>

/*
 * The first key of phsync's advisory locks (pg_advisory_xact_lock(class,
 * n)): "phsy".  n = 1: adding a sync; n = 2: queuing a run.
 */
#define PHSYNC_LOCK_CLASS "1885893497"

/* PHSYNC_VERSION comes from phsync.control, through the Makefile */
#ifndef PHSYNC_VERSION
#error "PHSYNC_VERSION must be defined (see the Makefile)"
#endif

/* ==================== 1. foundations ==================== */

/* ---------- settings.c ---------- */
extern char *phsync_database;
extern char *phsync_host;
extern char *phsync_project_id;
extern char *phsync_target_table;
extern char *phsync_query_file;
extern char *phsync_cursor_column;
extern char *phsync_initial_since;
extern char *phsync_run_at;
extern char *phsync_ca_file;
extern char *phsync_proxy;
extern int	phsync_lookback;		/* seconds */
extern int	phsync_interval;		/* seconds */
extern int	phsync_page_size;
extern int	phsync_request_timeout; /* milliseconds */
extern int	phsync_max_retries;
extern int	phsync_retry_base_delay;	/* milliseconds */
extern int	phsync_max_retry_delay; /* milliseconds */
extern int	phsync_max_requests_per_minute;
extern int	phsync_max_requests_per_hour;
extern int	phsync_max_concurrent_requests;
extern int	phsync_max_response_size;	/* kilobytes */
extern int	phsync_on_bad_row;
extern char *phsync_role;
extern int	phsync_history_days;
extern bool phsync_progress_notices;
extern char *phsync_timezone;
extern bool phsync_verify_yesterday;
extern int	phsync_mirror_deletions;	/* phsync.deletions = mirror */
extern double phsync_max_delete_fraction;
extern int	phsync_max_syncs;
extern int	phsync_max_queued_runs;
extern int	phsync_max_verify_buckets;
extern int	phsync_max_backfill_range;	/* minutes */
extern int	phsync_lock_timeout;	/* milliseconds */
extern bool phsync_enabled;		/* scheduled runs run */
extern int	phsync_log_runs;

typedef enum PhsyncLogRuns
{
	PHSYNC_LOG_RUNS_ALL,
	PHSYNC_LOG_RUNS_FAILURES,
	PHSYNC_LOG_RUNS_NONE
} PhsyncLogRuns;

typedef enum PhsyncBadRow
{
	PHSYNC_BAD_ROW_REJECT,		/* keep it in phsync.rejects, load the rest */
	PHSYNC_BAD_ROW_FAIL			/* fail the run */
} PhsyncBadRow;

extern void settings_define(void);
extern const char *settings_api_key(void);
extern const char *settings_api_key_exposed(int *mode);
extern int	settings_run_at_seconds(void);
extern pg_tz *settings_timezone(void);
extern bool settings_host_ok(const char *host, const char **detail);
extern bool settings_project_id_ok(const char *project_id);
extern bool settings_proxy_ok(const char *proxy, const char **detail);

/* ---------- servers.c ---------- */
/*
 * Where and how to reach one PostHog project, and where each of those
 * values was set, for hints ("phsync.api_key" or a user mapping).
 */
typedef struct PhsyncEndpoint
{
	const char *host;			/* base URL */
	const char *project_id;
	const char *api_key;
	const char *ca_file;		/* "" for none */
	const char *proxy;			/* NULL or "" for none */
	long		timeout_ms;
	int			max_response_kb;
	int			page_size;		/* most rows a request asks for */
	int			per_minute;		/* request budget (0: none) */
	int			per_hour;
	int			concurrency;	/* requests at once */
	const char *budget_key;		/* whose request budget it spends */
	const char *host_origin;
	const char *key_origin;
	const char *ca_origin;
	const char *query_origin;	/* where the sync's query is, NULL: a preset */
} PhsyncEndpoint;

extern void server_validate_options(List *options, Oid catalog);
extern PhsyncEndpoint *endpoint_from_settings(void);
extern PhsyncEndpoint *endpoint_settings(void);
extern PhsyncEndpoint *endpoint_server(const char *name, Oid role, const char *what);

/* ---------- presets.c ---------- */
typedef enum PhsyncPreset
{
	PHSYNC_CUSTOM,				/* the user's HogQL */
	PHSYNC_EVENTS,
	PHSYNC_PERSONS,
	PHSYNC_GROUPS,
	PHSYNC_SESSIONS,
	PHSYNC_COHORTS,
	PHSYNC_FEATURE_FLAGS,
	PHSYNC_EXPERIMENTS,
	PHSYNC_SURVEYS,
	PHSYNC_COHORT_PEOPLE,
	PHSYNC_PERSON_DISTINCT_IDS
} PhsyncPreset;

/* what a whole re-read does with target rows PostHog no longer has */
typedef enum PhsyncAbsent
{
	PHSYNC_ABSENT_KEEP,			/* nothing */
	PHSYNC_ABSENT_FLAG,			/* set their deleted column */
	PHSYNC_ABSENT_DELETE		/* delete them (a membership that ended) */
} PhsyncAbsent;

typedef struct PresetColumn
{
	const char *name;			/* the target's column */
	const char *type;			/* PostgreSQL type (and NOT NULL, DEFAULT) */
	const char *hogql;			/* what is selected AS name; NULL: the column name */
} PresetColumn;

typedef struct PresetInfo
{
	PhsyncPreset preset;
	const char *name;			/* as users write it */
	const char *hogql_table;	/* the PostHog table (or subquery) it reads */
	const PresetColumn *columns;	/* in the order selected; NULL name ends */
	const char *const *key;		/* the target's primary key; NULL ends */
	const char *cursor;			/* the default cursor column; NULL: none, every
								 * run reads all, keyset on the key */
	bool		update;			/* default conflict mode is update */
	bool		reread_all;		/* default: no lookback, re-read everything */
	bool		verify;			/* default: verify yesterday after scheduled runs */
	const char *bound;			/* HogQL column bounded around each slice too
								 * (events: timestamp), NULL: none */
	int			bound_before_days;	/* the bound's slack before the slice */
	int			bound_after_days;	/* and after it */
	PhsyncAbsent absent;		/* rows a whole re-read does not find */
	bool		event_filter;	/* takes events => ARRAY[...] */
	const char *json_column;	/* properties => draws generated columns from it */
} PresetInfo;

extern const PresetInfo *preset_info(PhsyncPreset preset);
extern const PresetInfo *preset_lookup(const char *name);
extern const char *preset_name(PhsyncPreset preset);
extern const char *preset_list(void);
extern bool preset_has_column(const PresetInfo *p, const char *name);
extern List *preset_create_statements(const PresetInfo *p, const char *qualified, List *properties);

/* ---------- shmem.c ---------- */
#define PHSYNC_MAX_MESSAGE 1024

/* what a session asks the worker for */
typedef enum PhsyncRequestKind
{
	PHSYNC_REQUEST_RUN,			/* phsync_run_now() */
	PHSYNC_REQUEST_VERIFY		/* phsync_verify() */
} PhsyncRequestKind;

typedef struct PhsyncRequest
{
	PhsyncRequestKind kind;
	Oid			requester;		/* who asked: "every sync" means theirs */
	char		sync[NAMEDATALEN];	/* "" for every enabled sync */
	TimestampTz from;			/* verify: [from, to) in buckets */
	TimestampTz to;
	int64		bucket;			/* microseconds */
	bool		repair;
} PhsyncRequest;

/* what the worker answers, an error as it was raised */
typedef struct PhsyncAnswer
{
	uint64		ticket;			/* the request it answers */
	int64		run_id;			/* the first run it made */
	int64		last_run_id;	/* and the last */
	int64		failed_run_id;	/* the one whose error it reports */
	char		failed_sync[NAMEDATALEN];
	bool		ok;
	int			sqlerrcode;
	char		message[PHSYNC_MAX_MESSAGE];
	char		detail[PHSYNC_MAX_MESSAGE];
	char		hint[PHSYNC_MAX_MESSAGE];
} PhsyncAnswer;

/* what the worker is doing, as sessions see it */
typedef struct PhsyncWorkerState
{
	pid_t		pid;			/* 0 when no worker is attached */
	TimestampTz next_due;		/* 0 when not known */
	TimestampTz schedule_base;	/* when it started or re-read its settings */
	bool		busy;
	int64		run_id;			/* 0 when no run is in progress */
	char		sync[NAMEDATALEN];
	int			pages;
	int64		received;
	TimestampTz waiting_until;	/* it waits for PostHog's throttle until then */
} PhsyncWorkerState;

/* the roles that own syncs, as shared memory lists them (roles.c) */
#define PHSYNC_MAX_OWNERS 1024

/* a request budget: requests started per second over the last hour */
#define PHSYNC_BUDGET_SECONDS 3600
#define PHSYNC_BUDGETS 16

typedef struct PhsyncBudget
{
	char		key[NAMEDATALEN];	/* whose: "settings", or a server */
	int64		second;			/* the last second counted (0: unused) */
	int32		minute;			/* requests in the last 60 seconds */
	int32		hour;			/* requests in the last 3600 seconds */
	TimestampTz closed_until;	/* a throttle said wait until then */
	uint16		counts[PHSYNC_BUDGET_SECONDS];	/* per second, a ring */
} PhsyncBudget;

extern void shmem_install_hooks(void);
extern bool shmem_available(void);
/* the worker's side */
extern void shmem_worker_attach(void);
extern bool shmem_connect_failed(void);
extern void shmem_set_connect_failed(bool failed);
extern bool shmem_worker_starting(void);
extern void shmem_worker_restart_planned(void);
extern void shmem_worker_waiting(void);
extern bool shmem_take_request(PhsyncRequest *request);
extern void shmem_answer_request(const PhsyncAnswer *answer);
extern bool shmem_request_cancelled(void);
extern void shmem_set_busy(bool busy);
extern void shmem_set_run(int64 run_id, const char *sync);
extern void shmem_set_progress(int pages, int64 received);
extern void shmem_set_next_due(TimestampTz due);
extern void shmem_set_schedule_base(TimestampTz base);
extern void shmem_set_role_problem(const char *problem, const char *fix);
extern bool shmem_role_problem(char *problem, char *fix);
extern bool roles_worker_lacks(char **problem, char **fix);
extern void shmem_set_waiting(TimestampTz until);
extern bool shmem_cancel_pending(void);
extern void shmem_check_cancel(void);
extern const char *shmem_cancel_reason(void);
extern void shmem_worker_cancellable(bool cancellable);
extern void phsync_check_interrupts(void);
extern bool phsync_interrupt_pending(void);
/* the sessions' side */
extern void shmem_worker_state(PhsyncWorkerState *state);
extern void shmem_wake_worker(void);
extern uint64 shmem_submit_request(const PhsyncRequest *request, int64 *busy_run, int *ahead);
extern bool shmem_read_answer(uint64 ticket, PhsyncAnswer *answer, bool *worker_absent);
extern void shmem_withdraw_request(uint64 ticket);
extern bool shmem_cancel_run(int64 run_id);
extern void shmem_owners_changing(void);
extern void shmem_wake_worker_at_commit(void);
extern bool shmem_take_owners_changed(void);
extern void shmem_publish_owners(const Oid *owners, int n, bool overflow);
extern bool shmem_owns_syncs(Oid role);
extern PhsyncBudget *shmem_budget_lock(const char *key);
extern void shmem_budget_unlock(void);
extern TimestampTz shmem_budget_closed_until(const char *key);

/* ---------- xact.c ---------- */
extern void phsync_spi_connect(void);
extern void phsync_spi_finish(void);
extern bool phsync_spi_connected(void);
extern int	phsync_spi_exec(const char *sql, int nargs, Oid *types, Datum *values,
							const char *nulls, bool read_only, long count);
extern int	phsync_spi_exec_plan(SPIPlanPtr plan, Datum *values, const char *nulls,
								 bool read_only, long count);
extern SPIPlanPtr phsync_spi_prepare(const char *sql, int nargs, Oid *types);
extern MemoryContext xact_begin(void);
extern void xact_commit(MemoryContext cxt);
extern void xact_set_async_commit(void);
extern ErrorData *xact_recover(MemoryContext cxt);

typedef struct PhsyncAsRole
{
	Oid			userid;
	int			sec_context;
	int			nestlevel;
} PhsyncAsRole;

extern void xact_reset_session(void);
extern void as_role_begin(Oid role, bool restricted, PhsyncAsRole *save);
extern void as_role_end(PhsyncAsRole *save);

/* ==================== 2. talking to PostHog ==================== */

/* ---------- schedule.c ---------- */
extern TimestampTz schedule_slot_after(TimestampTz t);

/* a sync's own schedule (schedule.c) */
typedef enum PhsyncScheduleKind
{
	PHSYNC_SCHEDULE_GLOBAL,		/* phsync.run_at and phsync.interval */
	PHSYNC_SCHEDULE_CRON,
	PHSYNC_SCHEDULE_INTERVAL
} PhsyncScheduleKind;

typedef struct PhsyncSchedule
{
	PhsyncScheduleKind kind;
	uint64		minutes;		/* cron: a bit per allowed value */
	uint32		hours;
	uint32		mdays;
	uint16		months;
	uint8		wdays;			/* bit 0: Sunday */
	bool		mday_star;		/* the day-of-month field was "*" */
	bool		wday_star;
	int64		interval;		/* interval: seconds */
} PhsyncSchedule;

extern void schedule_parse(const char *text, PhsyncSchedule *s);
extern TimestampTz schedule_sync_due(const char *schedule, TimestampTz last, TimestampTz attempt,
									 TimestampTz base);
extern TimestampTz schedule_period(const char *schedule, TimestampTz t);

/* when a sync's last (scheduled or successful) run started (runlog_last_starts()) */
typedef struct PhsyncLastStart
{
	char	   *sync;
	TimestampTz at;
} PhsyncLastStart;

extern List *runlog_last_starts(bool succeeded, TimestampTz *owned_since);
extern TimestampTz runlog_last_start(List *starts, const char *sync);
extern bool runlog_day_verified(const char *sync, TimestampTz from, TimestampTz to);
extern TimestampTz schedule_next(const PhsyncSchedule *s, TimestampTz t);
extern TimestampTz schedule_day_start(TimestampTz t, int days_before);

/* ---------- response.c ---------- */
typedef enum PhsyncValueKind
{
	PHSYNC_VALUE_NULL,
	PHSYNC_VALUE_STRING,
	PHSYNC_VALUE_NUMBER,
	PHSYNC_VALUE_TRUE,
	PHSYNC_VALUE_FALSE,
	PHSYNC_VALUE_JSON,			/* an array or object, as JSON text */
	PHSYNC_VALUE_BAD_TEXT		/* a string that is not valid UTF-8 */
} PhsyncValueKind;

typedef struct PhsyncScan PhsyncScan;

/* a row's values, decoded: arrays of `capacity` entries the caller owns */
typedef struct PhsyncRow
{
	int			capacity;
	int			nvalues;
	const char **values;		/* NUL-terminated text; NULL for JSON null */
	uint32	   *lens;
	uint8	   *kinds;			/* PhsyncValueKind */
} PhsyncRow;

extern char *foreign_text(const char *s, int len);
extern PhsyncScan *scan_create(void);
extern void scan_free(PhsyncScan *s);
extern void scan_trim(void);
extern bool scan_feed(PhsyncScan *s, const char *p, size_t len);
extern bool scan_complete(PhsyncScan *s);
extern const char *scan_error(PhsyncScan *s);
extern size_t scan_buffered(PhsyncScan *s);
extern int64 scan_rows(PhsyncScan *s);
extern int64 scan_pending(PhsyncScan *s);
extern const char *scan_member(PhsyncScan *s, const char *name);
extern bool scan_next_row(PhsyncScan *s, const char **encoded);
extern const char *scan_last_row(PhsyncScan *s);
extern void scan_release(PhsyncScan *s);
extern bool row_decode(const char *encoded, PhsyncRow *row);
extern PhsyncRow *row_alloc(int capacity);
extern char *row_value_json(PhsyncRow *row, int i);
extern char *row_json(const char *encoded);

/* the shape of a response: its columns and their ClickHouse types */
typedef struct PhsyncColumns
{
	int			ncolumns;
	char	  **names;
	char	  **chtypes;		/* NULL when PostHog did not say */
	char	   *timezone;		/* the project's, NULL when not sent */
} PhsyncColumns;

extern PhsyncColumns *scan_columns(PhsyncScan *s);
extern const char *pg_type_for_clickhouse(const char *chtype, const char *column);
extern const char *pg_type_for_schema_field(const char *fieldtype, const char *column);

/* ---------- convert.c ---------- */
extern bool convert_timestamp(const char *s, size_t len, TimestampTz *result, bool *date_only,
							  bool *exact);

/* ---------- hogql.c ---------- */

/* the values of a row that position the next page (keyset pagination) */
typedef struct PhsyncKeyset
{
	bool		valid;
	bool		has_cursor;		/* json[0] is the cursor's (else keys only) */
	int			nvalues;		/* 1 + nkeys: cursor first; nkeys without one */
	char	  **json;			/* each value as JSON text, as PostHog sent it */
	char	  **chtypes;		/* ClickHouse types, or NULL when unknown */
	TimestampTz cursor;			/* json[0] read as an instant (has_cursor) */
} PhsyncKeyset;

typedef struct PhsyncQuery
{
	PhsyncPreset preset;
	char	   *base;			/* custom query text (PHSYNC_CUSTOM) */
	char	   *cursor;			/* cursor column name; NULL: none (read all, by key) */
	int			nkeys;			/* key columns, cursor excluded */
	char	  **keys;
	char	  **events;			/* events preset: only these event names, or NULL */
	int			nevents;
	int			limit;			/* rows per request */
	TimestampTz since;			/* the run's window, {since} and {until} */
	TimestampTz until;
	/* the slice of the window one request reads, when it is narrower */
	bool		sliced;
	TimestampTz slice_from;
	TimestampTz slice_until;
} PhsyncQuery;

extern bool hogql_bounds_timestamp(PhsyncQuery *q);
extern char *hogql_build(PhsyncQuery *q, PhsyncKeyset *after);
extern char *hogql_count_query(PhsyncQuery *q, const char *distinct_key, bool keysum);
extern char *hogql_adhoc_body(const char *hogql, const char *values_json, const char *name,
							  const char *client_query_id);
extern char *hogql_request_body(PhsyncQuery *q, const char *hogql,
								PhsyncKeyset *after, int64 bucket,
								const char *name, const char *client_query_id);
extern TimestampTz hogql_keyset_cursor(PhsyncKeyset *keyset);
extern void hogql_keyset_reset(PhsyncKeyset *keyset);
extern void hogql_keyset_from_row(PhsyncKeyset *keyset, PhsyncQuery *q, PhsyncColumns *cols,
								  const char *encoded);
extern char *phsync_format_timestamp(TimestampTz ts);
extern char *hogql_read_query_file(const char *path);

/* ---------- http.c ---------- */


typedef struct PhsyncHttp PhsyncHttp;
typedef struct PhsyncTransfer PhsyncTransfer;

/* what one request came to; nothing is raised by http_result() */
typedef struct PhsyncHttpResult
{
	bool		ok;				/* a 200 with a complete body */
	long		status;			/* HTTP status, 0 if no response */
	int			curl_code;		/* CURLE_OK if the transfer completed */
	bool		bad_body;		/* 200 but the body is not complete JSON */
	bool		bad_encoding;	/* ... not complete gzip, or not gzip at all */
	bool		too_large;		/* aborted at phsync.max_response_size */
	double		retry_after;	/* seconds from Retry-After, -1 if absent */
	double		seconds;		/* PostHog's time: to the first byte of the answer */
	char	   *detail;			/* PostHog's detail, curl's error, or why */
} PhsyncHttpResult;

/* a failed request, explained */
typedef struct PhsyncHttpError
{
	int			sqlerrcode;
	const char *category;		/* auth, permission, network, timeout, query, response, throttled */
	const char *message;
	const char *detail;
	const char *hint;
} PhsyncHttpError;

extern PhsyncHttp *http_open(const PhsyncEndpoint *endpoint);
extern void http_close(PhsyncHttp *http);
extern void http_set_timeout(PhsyncHttp *http, long timeout_ms);
extern char *http_client_id(const char *prefix);
extern PhsyncTransfer *http_start(PhsyncHttp *http, const char *body,
								  const char *client_query_id);
extern void http_poll(PhsyncHttp *http, long timeout_ms);
extern bool http_done(PhsyncTransfer *t);
extern bool http_paused(PhsyncTransfer *t);
extern PhsyncScan *http_scan(PhsyncTransfer *t);
extern PhsyncScan *http_take_scan(PhsyncTransfer *t);
extern bool http_answering(PhsyncTransfer *t);
extern void http_resume(PhsyncTransfer *t);
extern void http_result(PhsyncTransfer *t, PhsyncHttpResult *result);
extern void http_finish(PhsyncTransfer *t);
extern PhsyncTransfer *http_request(PhsyncHttp *http, const char *body,
									const char *client_query_id, PhsyncHttpResult *result);
extern void http_explain(const PhsyncEndpoint *endpoint, PhsyncHttpResult *result,
						 PhsyncHttpError *e);
extern pg_noreturn void http_raise(const PhsyncEndpoint *endpoint, PhsyncHttpResult *result);
extern int	http_probe(const PhsyncEndpoint *endpoint, const char *url, long timeout_ms,
					   char **detail);

/* ---------- retry.c ---------- */
typedef struct PhsyncRetryPolicy
{
	int			max_retries;
	int			base_delay_ms;
	int			max_delay_ms;
	int			per_minute;		/* requests started per minute, 0: no limit */
	int			per_hour;		/* and per hour */
} PhsyncRetryPolicy;

typedef enum PhsyncRetry
{
	PHSYNC_RETRY_NO,			/* fail */
	PHSYNC_RETRY_BACKOFF,		/* transient: retry after a backoff */
	PHSYNC_RETRY_LESS,			/* too big: ask for less, retry */
	PHSYNC_RETRY_THROTTLED,		/* 429 with Retry-After: wait, not a failure */
	PHSYNC_RETRY_BUSY			/* 429 without: too many concurrent queries */
} PhsyncRetry;

/* a request's retries so far (retry_step) */
typedef struct PhsyncRetryState
{
	int			retries;		/* retries used */
	bool		throttled;		/* its last failure was a throttle */
} PhsyncRetryState;

/* what to do about a failure (retry_step) */
typedef struct PhsyncRetryStep
{
	bool		give_up;		/* raise its error */
	long		wait_ms;		/* else ask again after this long */
	bool		counted;		/* it used up a retry */
	bool		throttled;		/* a throttle: close the budget for wait_ms */
	bool		fewer_at_once;	/* too many queries at once: run fewer */
	bool		ask_for_less;	/* too big: ask for less */
} PhsyncRetryStep;

/* what the caller of retry_step() can do */
#define RETRY_MAY_RUN_FEWER 0x01	/* lower the requests it has in flight */
#define RETRY_MAY_ASK_LESS	0x02	/* ask for a smaller part */

/* one request whose answer is waited for (request_with_retries) */
typedef struct PhsyncRequestSpec
{
	PhsyncHttp *http;
	const PhsyncEndpoint *endpoint;
	const PhsyncRetryPolicy *policy;
	/* the body of one attempt, and its client_query_id */
	char	   *(*body) (void *arg, char **client_query_id);
	void	   *arg;
	int			flags;			/* RETRY_MAY_ASK_LESS: NULL when too big */
	int			throttle_elevel;	/* how a throttle's wait is reported */
	int		   *requests;		/* counters to add to, or NULL */
	int		   *retries;
	int		   *throttled;
} PhsyncRequestSpec;

extern void phsync_sleep(long ms);
extern void retry_policy_for(const PhsyncEndpoint *e, PhsyncRetryPolicy *policy);
extern PhsyncRetry retry_classify(PhsyncHttpResult *result);
extern void retry_step(const PhsyncRetryPolicy *policy, PhsyncRetryState *state,
					   PhsyncHttpResult *result, int flags, PhsyncRetryStep *step);
extern PhsyncScan *request_with_retries(const PhsyncRequestSpec *r);
extern long retry_delay_ms(const PhsyncRetryPolicy *policy, int retry, PhsyncHttpResult *result);
extern long retry_throttle_ms(PhsyncHttpResult *result);
extern char *retry_describe(PhsyncHttpResult *result);
extern bool budget_take(const char *key, int per_minute, int per_hour, long *wait_ms);
extern void budget_close(const char *key, TimestampTz until);

/* ==================== 3. PostgreSQL's side ==================== */

/* ---------- runlog.c ---------- */
typedef enum PhsyncTrigger
{
	PHSYNC_TRIGGER_SCHEDULE,
	PHSYNC_TRIGGER_MANUAL,
	PHSYNC_TRIGGER_BACKFILL,
	PHSYNC_TRIGGER_VERIFY
} PhsyncTrigger;

typedef enum PhsyncRunStatus
{
	PHSYNC_RUN_SUCCEEDED,
	PHSYNC_RUN_FAILED,
	PHSYNC_RUN_CANCELLED
} PhsyncRunStatus;

typedef enum PhsyncBucketStatus
{
	PHSYNC_BUCKET_OK,
	PHSYNC_BUCKET_MISSING,
	PHSYNC_BUCKET_EXTRA,
	PHSYNC_BUCKET_DIFFERENT,	/* the same count, other rows */
	PHSYNC_BUCKET_REPAIRED
} PhsyncBucketStatus;

/* what a run did, as phsync.runs shows it */
typedef struct PhsyncCounters
{
	int			pages;
	int			requests;
	int			retries;
	int64		received;
	int64		inserted;
	int64		updated;
	int64		rejected;
	int64		deleted;		/* rows PostHog no longer has, deleted here */
	int			throttled;		/* waits for PostHog's throttles */
} PhsyncCounters;

extern const char *trigger_name(PhsyncTrigger trigger);
extern int64 runlog_start(PhsyncTrigger trigger, const char *sync, const char *target,
						  TimestampTz *from, TimestampTz *to);
extern Datum runlog_queue(PhsyncTrigger trigger, const char *sync, const char *target,
						  const TimestampTz *from, const TimestampTz *to, TupleDesc tupdesc);
extern void runlog_begin_queued(int64 run_id);
extern bool runlog_next_queued(int64 *run_id, bool *manual, char **sync, TimestampTz *from,
							   TimestampTz *to, Oid *owner);
extern List *sync_runnable_by(List *syncs, Oid requester);
extern void runlog_fail_queued(int64 run_id, const char *error);
extern void runlog_verified(int64 run_id, TimestampTz bucket, TimestampTz until,
							int64 posthog, int64 local, const int64 *posthog_sum,
							const int64 *local_sum, PhsyncBucketStatus status);
extern void runlog_set_mismatches(int64 run_id, int mismatches);
extern void runlog_set_window(int64 run_id, TimestampTz from, TimestampTz until);
extern void runlog_progress(int64 run_id, PhsyncCounters *c);
extern void runlog_progress_resume(int64 run_id, PhsyncCounters *c, TimestampTz resume_from);
extern bool runlog_resume_point(const char *sync, bool backfill, TimestampTz from,
								TimestampTz to, TimestampTz *resume_from);
extern void runlog_reject(int64 run_id, const char *target, Datum columns,
						  const char *row, const char *error);
extern void runlog_finish(int64 run_id, PhsyncRunStatus status, const char *error,
						  PhsyncCounters *c);
extern bool runlog_run_sync(int64 run_id, char **sync, bool *queued);
extern bool runlog_cancel_queued(int64 run_id);
extern int	runlog_fail_orphans(void);
extern int64 runlog_prune(int days);
typedef enum PhsyncClaim
{
	PHSYNC_CLAIM_OURS,			/* this cluster's history already */
	PHSYNC_CLAIM_NEW,			/* a new install, or a restore: history from elsewhere */
	PHSYNC_CLAIM_UPGRADED		/* pg_upgrade moved the database here */
} PhsyncClaim;

extern PhsyncClaim runlog_claim_cluster(void);

/* ---------- target.c ---------- */
typedef struct PhsyncColumn
{
	char	   *name;
	AttrNumber	attnum;
	Oid			typid;
	int32		typmod;
	Oid			typinput;
	Oid			typioparam;
	int16		typlen;
	bool		typbyval;
} PhsyncColumn;

typedef struct PhsyncTarget
{
	Oid			relid;
	char	   *display;		/* schema.table, quoted as needed */
	int			ncols;
	PhsyncColumn *cols;
	int			cursor;			/* index into cols; -1: none (a preset read whole) */
	int			nkeys;			/* unique key columns, cursor excluded */
	int		   *keys;			/* indexes into cols */
	int			nuniq;			/* all the unique key's columns, in order */
	int		   *uniq;			/* indexes into cols */
	bool		cursor_indexed; /* an index starts with the cursor column */
	Oid			writer;			/* the role a sync acts as on it (0: not asked) */
} PhsyncTarget;

/* why a table is not an acceptable target */
typedef struct PhsyncProblem
{
	int			sqlerrcode;
	const char *message;
	const char *detail;
	const char *hint;
} PhsyncProblem;

/* what is being asked of the target */
typedef struct PhsyncTargetSpec
{
	const char *name;			/* as given */
	const char *cursor;
	const char *cursor_origin;	/* for messages: a setting, or the sync */
	PhsyncPreset preset;		/* its columns must be there (custom: none) */
	bool		update;			/* conflict => 'update' */
	Oid			owner;			/* the sync's owner, or 0: no privilege check */
	const char *suggest_preset; /* for the hint when it does not exist */
} PhsyncTargetSpec;

extern RangeVar *target_rangevar(const char *name);
extern PhsyncTarget *target_examine(const PhsyncTargetSpec *spec, PhsyncProblem *problem);
extern pg_noreturn void target_raise(const PhsyncProblem *problem);
extern int	target_column(PhsyncTarget *target, const char *name);
extern int64 target_absent(PhsyncTarget *target, PhsyncAbsent mode, Datum *keys,
						   const TimestampTz *from, const TimestampTz *to, bool count_only,
						   int64 *total);
extern int64 target_mirror_deletions(PhsyncTarget *target, Datum *keys, const TimestampTz *from,
									 const TimestampTz *to, int64 scope, int64 run_id,
									 const char *what);
extern void target_create(PhsyncPreset preset, const char *name, const char *cursor,
						  List *properties);
extern bool target_watermark(PhsyncTarget *target, TimestampTz *from,
							 TimestampTz *to, TimestampTz *watermark);

/* ---------- syncs.c ---------- */
typedef struct PhsyncSync
{
	char	   *name;			/* "default" for the settings' sync */
	char	   *owner_name;		/* the role that added it (default: phsync.role) */
	Oid			owner;			/* 0 when that role does not exist any more */
	char	   *target;
	PhsyncPreset preset;
	char	   *query;			/* custom query text */
	char	   *query_file;		/* default sync: custom query read at run time */
	char	   *cursor;
	bool		update;			/* conflict => 'update' */
	bool		reread_all;		/* no lookback: read everything every run */
	int64		lookback;		/* microseconds */
	bool		enabled;
	bool		verify;			/* scheduled runs verify the previous day */
	char	   *server;			/* foreign server; NULL: the phsync.* settings */
	List	   *events;			/* events preset: only these event names (NIL: all) */
	char	   *schedule;		/* its own schedule; NULL: the global one */
	bool		mirror;			/* deletions => 'mirror' */
	TimestampTz created_at;		/* 0 for the default sync */
} PhsyncSync;

/* phsync_add_sync()'s and phsync_alter_sync()'s arguments; NULL: not given */
typedef struct PhsyncSyncArgs
{
	char	   *name;
	char	   *target;
	char	   *query;
	char	   *preset;
	char	   *cursor;
	char	   *conflict;
	char	   *lookback;		/* interval, as text */
	bool		has_enabled;
	bool		enabled;
	bool		has_verify;
	bool		verify;
	bool		reread_all;
	char	   *server;			/* '' : back to the settings */
	bool		has_events;
	List	   *events;			/* empty: every event */
	char	   *schedule;		/* '' : back to the global schedule */
	char	   *deletions;		/* keep or mirror */
} PhsyncSyncArgs;

extern bool sync_is_default(const PhsyncSync *sync);
extern PhsyncSync *sync_default(void);
extern List *sync_list(const char *only, bool enabled_only);
extern const char *sync_cursor_origin(const PhsyncSync *sync);
extern void sync_target_spec(const PhsyncSync *sync, PhsyncTargetSpec *spec);
extern Oid	sync_owner(const PhsyncSync *sync);
extern char *sync_owner_name(Oid owner);
extern bool sync_owned_by_me(Oid owner);
extern void sync_check_owner(const char *name, Oid owner, const char *what);
extern PhsyncEndpoint *sync_endpoint(const PhsyncSync *sync);
extern void sync_check_name(const char *name);
extern Datum sync_add(const PhsyncSyncArgs *args, TupleDesc tupdesc);
extern Datum sync_alter(const PhsyncSyncArgs *args, TupleDesc tupdesc);
extern void sync_drop(const char *name);

/* ---------- loader.c ---------- */
typedef struct PhsyncLoader PhsyncLoader;

extern Datum value_datum(PhsyncRow *row, int c, Oid typid, int32 typmod, FmgrInfo *input,
					   Oid typioparam, const char *colname, bool *isnull);
extern void loader_track_keys(PhsyncLoader *loader);
extern void loader_reset_seen(PhsyncLoader *loader);
extern Datum *loader_seen_keys(PhsyncLoader *loader, PhsyncTarget *target);
extern PhsyncLoader *loader_create(PhsyncTarget *target, PhsyncColumns *cols,
								   bool update, PhsyncBadRow on_bad_row);
extern bool loader_matches(PhsyncLoader *loader, PhsyncColumns *cols);
extern void loader_insert(PhsyncLoader *loader, const char **rows, int nrows,
						  int64 run_id, PhsyncCounters *counters);
extern void loader_reject(PhsyncLoader *loader, const char *encoded, const char *why,
						  int64 run_id, PhsyncCounters *counters);
extern void loader_free(PhsyncLoader *loader);

/* ==================== 4. fetching ==================== */

/* ---------- fetch.c ---------- */

/* a run in progress: its resources and counters (fetch.c, verify.c, run.c) */
typedef struct PhsyncRunState
{
	int64		run_id;
	PhsyncSync *sync;
	PhsyncEndpoint endpoint;
	PhsyncRetryPolicy policy;
	int			page_size;		/* rows per request, at most (phsync.page_size) */
	int			limit;			/* rows per request now (0: not started) */
	int			cap;			/* PostHog's row cap, once seen (0: unknown) */
	int			concurrency;	/* requests in flight at most, now */
	PhsyncBadRow on_bad_row;
	PhsyncTarget *target;
	PhsyncQuery *query;			/* the sync's query, window not set */
	PhsyncHttp *http;
	char	   *name;			/* the request name PostHog sees */
	PhsyncLoader *loader;
	PhsyncCounters counters;
	char	   *timezone;		/* the project's, as PostHog said */
	bool		throttle_logged;	/* a throttle wait was logged at LOG */
	bool		track_keys;		/* a whole re-read: keep every key received */
	MemoryContext cxt;
} PhsyncRunState;

extern void fetch_window(PhsyncRunState *st, TimestampTz since, TimestampTz until);
extern PhsyncScan *fetch_once(PhsyncRunState *st, PhsyncQuery *q, const char *hogql,
							  int64 bucket, bool may_ask_less);
extern bool fetch_bucket_counts(PhsyncRunState *st, PhsyncQuery *q, const char *distinct_key,
								int64 bucket, int64 *counts, int64 *sums, int n,
								bool may_ask_less);

/* ---------- verify.c ---------- */
extern void verify_run(PhsyncRunState *st, TimestampTz from, TimestampTz to,
					   int64 bucket, bool repair);

/* ---------- query.c ---------- */
extern void query_rows(const char *server, const char *hogql, const char *values_json, bool as_json,
					   Tuplestorestate *store, TupleDesc tupdesc);
extern PhsyncColumns *query_describe(const char *server, const char *hogql, const char *values_json);
extern void query_tables(const char *server, Tuplestorestate *store, TupleDesc tupdesc);
extern Oid	query_create_table(const char *name, const char *server, const char *hogql,
							   const char *values_json, List *keys, const char *cursor);

/* ==================== 5. one run, and the doctor ==================== */

/* ---------- run.c ---------- */

/* a run to carry out */
typedef struct PhsyncJob
{
	PhsyncTrigger trigger;
	PhsyncSync *sync;
	int64		run_id;			/* a queued run (backfill), or 0 */
	bool		bounded;		/* backfill and verify: within [from, to) */
	TimestampTz from;
	TimestampTz to;
	int64		bucket;			/* verify: bucket width, microseconds */
	bool		repair;			/* verify: fetch differing buckets again */
} PhsyncJob;

/* how it went: an error as it was raised */
typedef struct PhsyncOutcome
{
	int64		run_id;			/* 0 if not even the run row could be made */
	bool		ok;
	ErrorData  *error;			/* when not ok */
} PhsyncOutcome;

extern void run_job(PhsyncJob *job, PhsyncOutcome *outcome);

/* ---------- doctor.c ---------- */
typedef void (*DoctorRow) (void *arg, const char *item, const char *status,
						   const char *detail, const char *hint);
extern void doctor_run(DoctorRow emit, void *arg);

/* ---------- roles.c ---------- */
extern void roles_install_hook(void);
extern void roles_publish_owners(bool extension_here);

/* ==================== 6. worker.c ==================== */
extern void worker_register(void);
extern PGDLLEXPORT void phsync_worker_main(Datum main_arg);

#endif							/* PHSYNC_H */
