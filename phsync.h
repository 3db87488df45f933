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
 *	   presets.c	the built-in queries: tables, columns, keys, defaults
 *	   shmem.c		the shared-memory protocol between sessions and the worker
 *	   xact.c		transactions and SPI, recovering from errors
 *	2. talking to PostHog
 *	   schedule.c	when scheduled runs are due
 *	   hogql.c		HogQL text, request bodies, reading responses
 *	   http.c		the libcurl client
 *	   retry.c		what is retried, backoff, request pacing
 *	3. PostgreSQL's side
 *	   runlog.c		phsync.runs, rejects, verifications, cluster
 *	   target.c		what makes a table an acceptable target; its watermark
 *	   syncs.c		sync definitions: default (settings) and phsync.syncs
 *	   loader.c		rows of a page into the target, through SPI
 *	4. fetching
 *	   fetch.c		a window, page by page: keyset, slices, asking for less
 *	   verify.c		PostHog's counts per bucket against the target's
 *	5. one run, and the doctor
 *	   run.c		one run of a sync (load or verify), its outcome
 *	   doctor.c		phsync_doctor()'s checks
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

/*
 * PostgreSQL's fmgrprotos.h declares a SQL function called json_object,
 * which clashes with json-c's type of that name.  Give json-c's struct
 * another name (only the C type name changes, not any linked symbol).
 * Include this header after all PostgreSQL headers.
 */
#define json_object phsync_json_object
#include <json.h>

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
extern int	phsync_lookback;		/* seconds */
extern int	phsync_interval;		/* seconds */
extern int	phsync_page_size;
extern int	phsync_request_timeout; /* milliseconds */
extern int	phsync_max_retries;
extern int	phsync_retry_base_delay;	/* milliseconds */
extern int	phsync_max_retry_delay; /* milliseconds */
extern int	phsync_max_requests_per_minute;
extern int	phsync_max_response_size;	/* kilobytes */
extern int	phsync_on_bad_row;
extern char *phsync_role;
extern int	phsync_history_days;
extern bool phsync_progress_notices;
extern char *phsync_timezone;
extern bool phsync_verify_yesterday;
extern int	phsync_max_syncs;
extern int	phsync_max_verify_buckets;
extern int	phsync_max_backfill_range;	/* minutes */

typedef enum PhsyncBadRow
{
	PHSYNC_BAD_ROW_REJECT,		/* keep it in phsync.rejects, load the rest */
	PHSYNC_BAD_ROW_FAIL			/* fail the run */
} PhsyncBadRow;

extern void settings_define(void);
extern const char *settings_api_key(void);
extern int	settings_run_at_seconds(void);
extern pg_tz *settings_timezone(void);
extern bool settings_host_ok(const char *host, const char **detail);
extern bool settings_project_id_ok(const char *project_id);

/* ---------- presets.c ---------- */
typedef enum PhsyncPreset
{
	PHSYNC_CUSTOM,				/* the user's HogQL */
	PHSYNC_EVENTS,
	PHSYNC_PERSONS
} PhsyncPreset;

typedef struct PresetColumn
{
	const char *name;
	const char *type;			/* PostgreSQL type (and NOT NULL) */
} PresetColumn;

typedef struct PresetInfo
{
	PhsyncPreset preset;
	const char *name;			/* as users write it */
	const char *hogql_table;	/* the PostHog table it reads */
	const PresetColumn *columns;	/* in the order selected; NULL name ends */
	const char *const *key;		/* the target's primary key; NULL ends */
	const char *cursor;			/* the default cursor column */
	bool		update;			/* default conflict mode is update */
	bool		reread_all;		/* default: no lookback, re-read everything */
	bool		verify;			/* default: verify yesterday after scheduled runs */
} PresetInfo;

extern const PresetInfo *preset_info(PhsyncPreset preset);
extern const PresetInfo *preset_lookup(const char *name);
extern const char *preset_name(PhsyncPreset preset);
extern const char *preset_list(void);
extern bool preset_has_column(const PresetInfo *p, const char *name);
extern List *preset_create_statements(const PresetInfo *p, const char *qualified);

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
	bool		busy;
	int64		run_id;			/* 0 when no run is in progress */
	char		sync[NAMEDATALEN];
	int			pages;
	int64		received;
} PhsyncWorkerState;

extern void shmem_install_hooks(void);
extern bool shmem_available(void);
/* the worker's side */
extern void shmem_worker_attach(void);
extern bool shmem_connect_failed(void);
extern void shmem_set_connect_failed(bool failed);
extern bool shmem_take_request(PhsyncRequest *request);
extern void shmem_answer_request(const PhsyncAnswer *answer);
extern bool shmem_request_cancelled(void);
extern void shmem_set_busy(bool busy);
extern void shmem_set_run(int64 run_id, const char *sync);
extern void shmem_set_progress(int pages, int64 received);
extern void shmem_set_next_due(TimestampTz due);
extern bool shmem_cancel_pending(void);
extern void shmem_check_cancel(void);
/* the sessions' side */
extern void shmem_worker_state(PhsyncWorkerState *state);
extern void shmem_wake_worker(void);
extern uint64 shmem_submit_request(const PhsyncRequest *request, int64 *busy_run);
extern bool shmem_read_answer(uint64 ticket, PhsyncAnswer *answer, bool *worker_absent);
extern void shmem_withdraw_request(uint64 ticket);
extern bool shmem_cancel_run(int64 run_id);

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
extern ErrorData *xact_recover(MemoryContext cxt);

typedef struct PhsyncAsRole
{
	Oid			userid;
	int			sec_context;
	int			nestlevel;
} PhsyncAsRole;

extern void as_role_begin(Oid role, bool restricted, PhsyncAsRole *save);
extern void as_role_end(PhsyncAsRole *save);

/* ==================== 2. talking to PostHog ==================== */

/* ---------- schedule.c ---------- */
extern TimestampTz schedule_slot_after(TimestampTz t);
extern TimestampTz schedule_day_start(TimestampTz t, int days_before);

/* ---------- hogql.c ---------- */
typedef struct PhsyncQuery
{
	PhsyncPreset preset;
	char	   *base;			/* custom query text (PHSYNC_CUSTOM) */
	char	   *cursor;			/* cursor column name */
	int			nkeys;			/* key columns, cursor excluded */
	char	  **keys;
	int			limit;			/* rows per request, now */
	TimestampTz since;			/* the run's window, {since} and {until} */
	TimestampTz until;
	/* a narrower slice of the window, after PostHog said "too big" */
	bool		chunked;
	TimestampTz chunk_from;
	TimestampTz chunk_until;
} PhsyncQuery;

/* keyset position: the last row of the previous page, as PostHog sent it */
typedef struct PhsyncKeyset
{
	bool		valid;
	int			nvalues;		/* 1 + nkeys: cursor first */
	json_object **values;		/* owned references */
	char	  **chtypes;		/* ClickHouse types, or NULL when unknown */
} PhsyncKeyset;

typedef struct PhsyncPage
{
	json_object *response;		/* owns everything below */
	json_object *results;		/* array of row arrays */
	int			nrows;
	int			ncolumns;
	const char **columns;
	const char **chtypes;		/* per column, NULL when unknown */
} PhsyncPage;

extern char *hogql_build(PhsyncQuery *q, PhsyncKeyset *after);
extern char *hogql_count_query(PhsyncQuery *q, const char *distinct_key);
extern char *hogql_request_body(PhsyncQuery *q, const char *hogql,
								PhsyncKeyset *after, int64 bucket,
								const char *name, const char *client_query_id);
extern TimestampTz hogql_keyset_cursor(PhsyncKeyset *keyset);
extern void hogql_read_page(json_object *response, PhsyncPage *page);
extern void hogql_keyset_from_last_row(PhsyncPage *page, PhsyncQuery *q,
									   PhsyncKeyset *keyset);
extern void hogql_keyset_reset(PhsyncKeyset *keyset);
extern char *phsync_format_timestamp(TimestampTz ts);
extern char *foreign_text(const char *s, int len);
extern char *hogql_read_query_file(const char *path);

/* ---------- http.c ---------- */

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
	long		timeout_ms;
	int			max_response_kb;
	const char *host_origin;
	const char *key_origin;
	const char *ca_origin;
	const char *query_origin;	/* where the sync's query is, NULL: a preset */
} PhsyncEndpoint;

typedef struct PhsyncHttp PhsyncHttp;

/* what one request came to; nothing is raised by http_post */
typedef struct PhsyncHttpResult
{
	json_object *json;			/* the parsed body of a 200, owned by caller */
	long		status;			/* HTTP status, 0 if no response */
	int			curl_code;		/* CURLE_OK if the transfer completed */
	bool		bad_body;		/* 200 but the body is not complete JSON */
	bool		too_large;		/* aborted at phsync.max_response_size */
	double		retry_after;	/* seconds from Retry-After, -1 if absent */
	char	   *detail;			/* PostHog's detail, curl's error, or why */
} PhsyncHttpResult;

/* a failed request, explained */
typedef struct PhsyncHttpError
{
	int			sqlerrcode;
	const char *category;		/* auth, permission, network, timeout, query, response */
	const char *message;
	const char *detail;
	const char *hint;
} PhsyncHttpError;

extern char *http_query_url(const PhsyncEndpoint *endpoint);
extern PhsyncHttp *http_open(const PhsyncEndpoint *endpoint);
extern void http_close(PhsyncHttp *http);
extern void http_set_timeout(PhsyncHttp *http, long timeout_ms);
extern void http_post(PhsyncHttp *http, const char *url, const char *body,
					  PhsyncHttpResult *result);
extern void http_explain(const PhsyncEndpoint *endpoint, PhsyncHttpResult *result,
						 PhsyncHttpError *e);
extern void http_raise(const PhsyncEndpoint *endpoint, PhsyncHttpResult *result) pg_attribute_noreturn();
extern int	http_probe(const char *url, const char *ca_file, long timeout_ms,
					   char **detail);

/* ---------- retry.c ---------- */
typedef struct PhsyncRetryPolicy
{
	int			max_retries;
	int			base_delay_ms;
	int			max_delay_ms;
	int			per_minute;		/* requests started per minute, 0: no limit */
} PhsyncRetryPolicy;

extern bool retry_is_transient(PhsyncHttpResult *result, bool *ask_for_less);
extern void retry_wait(const PhsyncRetryPolicy *policy, int64 run_id, int retry,
					   PhsyncHttpResult *result);
extern void retry_pace(const PhsyncRetryPolicy *policy);
extern void phsync_sleep(long ms);

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
} PhsyncCounters;

extern const char *trigger_name(PhsyncTrigger trigger);
extern int64 runlog_start(PhsyncTrigger trigger, const char *sync, const char *target,
						  TimestampTz *from, TimestampTz *to);
extern Datum runlog_queue_backfill(const char *sync, const char *target,
								   TimestampTz from, TimestampTz to, TupleDesc tupdesc);
extern void runlog_begin_queued(int64 run_id);
extern bool runlog_next_queued(int64 *run_id, char **sync, TimestampTz *from,
							   TimestampTz *to);
extern void runlog_fail_queued(int64 run_id, const char *error);
extern void runlog_verified(int64 run_id, TimestampTz bucket, TimestampTz until,
							int64 posthog, int64 local, PhsyncBucketStatus status);
extern void runlog_set_mismatches(int64 run_id, int mismatches);
extern void runlog_set_window(int64 run_id, TimestampTz from, TimestampTz until);
extern void runlog_progress(int64 run_id, PhsyncCounters *c);
extern void runlog_reject(int64 run_id, const char *target, Datum columns,
						  const char *row, const char *error);
extern void runlog_finish(int64 run_id, PhsyncRunStatus status, const char *error,
						  PhsyncCounters *c);
extern bool runlog_run_sync(int64 run_id, char **sync, bool *queued);
extern bool runlog_cancel_queued(int64 run_id);
extern int	runlog_fail_orphans(void);
extern int64 runlog_prune(int days);
extern bool runlog_last_scheduled(TimestampTz *last, TimestampTz *owned_since);
extern bool runlog_claim_cluster(void);

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
	int			cursor;			/* index into cols */
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
extern void target_raise(const PhsyncProblem *problem) pg_attribute_noreturn();
extern int	target_column(PhsyncTarget *target, const char *name);
extern void target_create(PhsyncPreset preset, const char *name, const char *cursor);
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
} PhsyncSyncArgs;

/* a row of phsync.syncs, as text */
typedef struct PhsyncSyncDef
{
	char	   *name;
	char	   *owner;
	char	   *target;
	char	   *preset;			/* NULL with a query */
	char	   *query;			/* NULL with a preset */
	char	   *cursor;
	char	   *conflict;
	char	   *lookback;		/* NULL: re-read everything */
	bool		enabled;
	bool		verify;
} PhsyncSyncDef;

extern bool sync_is_default(const PhsyncSync *sync);
extern PhsyncSync *sync_default(void);
extern List *sync_list(const char *only, bool enabled_only);
extern const char *sync_cursor_origin(const PhsyncSync *sync);
extern Oid	sync_owner(const PhsyncSync *sync);
extern void sync_check_owner(const char *name, const char *owner);
extern PhsyncEndpoint *sync_endpoint(const PhsyncSync *sync);
extern void sync_check_name(const char *name);
extern Datum sync_add(const PhsyncSyncArgs *args, TupleDesc tupdesc);
extern Datum sync_alter(const PhsyncSyncArgs *args, TupleDesc tupdesc);
extern void sync_drop(const char *name);

/* ---------- loader.c ---------- */
typedef struct PhsyncLoader PhsyncLoader;

extern PhsyncLoader *loader_create(PhsyncTarget *target, PhsyncPage *page,
								   bool update, PhsyncBadRow on_bad_row);
extern bool loader_matches(PhsyncLoader *loader, PhsyncPage *page);
extern void loader_insert(PhsyncLoader *loader, PhsyncPage *page,
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
	int			page_size;		/* rows per request, at most */
	PhsyncBadRow on_bad_row;
	PhsyncTarget *target;
	PhsyncQuery *query;			/* the sync's query, window not set */
	PhsyncHttp *http;
	char	   *url;
	char	   *name;			/* the request name PostHog sees */
	PhsyncPage	page;
	PhsyncKeyset keyset;
	PhsyncLoader *loader;
	PhsyncCounters counters;
	MemoryContext cxt;
	/* asking for less after "too big" answers */
	int64		span;			/* width of the slice of the window */
	int			successes;		/* in a row, since the last shrink */
} PhsyncRunState;

extern void fetch_window(PhsyncRunState *st, TimestampTz since, TimestampTz until);
extern json_object *fetch_json(PhsyncRunState *st, PhsyncQuery *q,
							   const char *hogql, int64 bucket);
extern void fetch_forget(PhsyncRunState *st);

/* ---------- verify.c ---------- */
extern void verify_run(PhsyncRunState *st, TimestampTz from, TimestampTz to,
					   int64 bucket, bool repair);

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

/* ==================== 6. worker.c ==================== */
extern void worker_register(void);
extern PGDLLEXPORT void phsync_worker_main(Datum main_arg);

#endif							/* PHSYNC_H */
