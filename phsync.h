/*-------------------------------------------------------------------------
 *
 * phsync.h
 *		Declarations shared between phsync's source files.
 *
 * Each concern lives in its own file:
 *	phsync.c	 _PG_init, settings (GUCs) and SQL-callable functions
 *	scheduler.c  background worker: shared state, latch loop, due times
 *	sync.c		 one run: window, page loop, error recording
 *	http.c		 libcurl client for PostHog's query API
 *	hogql.c		 HogQL text and request body; reading the response
 *	load.c		 target table: creation, inspection, inserting pages via SPI
 *	runlog.c	 the phsync.runs table
 *	retry.c		 the retry policy and request pacing
 *	doctor.c	 phsync_doctor(): configuration and connectivity checks
 *	syncs.c		 sync definitions: the default one (settings) and phsync.syncs
 *	verify.c	 completeness check: PostHog's counts against the target's
 *	schedule.c	 when scheduled runs are due (phsync.run_at in phsync.timezone)
 *
 *-------------------------------------------------------------------------
 */
#ifndef PHSYNC_H
#define PHSYNC_H

#include "postgres.h"

#include "access/attnum.h"
#include "nodes/primnodes.h"
#include "storage/latch.h"
#include "storage/spin.h"
#include "utils/timestamp.h"

/*
 * PostgreSQL's fmgrprotos.h declares a SQL function called json_object,
 * which clashes with json-c's type of that name.  Give json-c's struct
 * another name (only the C type name changes, not any linked symbol).
 * Include this header after all PostgreSQL headers.
 */
#define json_object phsync_json_object
#include <json.h>

#define PHSYNC_VERSION "0.2"

/* ---------- settings (phsync.c) ---------- */
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

typedef enum PhsyncBadRow
{
	PHSYNC_BAD_ROW_REJECT,		/* keep it in phsync.rejects, load the rest */
	PHSYNC_BAD_ROW_FAIL			/* fail the run */
} PhsyncBadRow;

extern const char *phsync_api_key(void);
extern int	phsync_run_at_seconds(void);
extern struct pg_tz *phsync_tz(void);

/* ---------- shared state and worker (scheduler.c) ---------- */
#define PHSYNC_MAX_MESSAGE 1024

/* what the worker answers a session's request with */
typedef struct PhsyncAnswer
{
	int64		run_id;			/* the first run it made */
	int64		last_run_id;	/* and the last */
	int64		failed_run_id;	/* the one whose error it reports */
	bool		ok;
	int			sqlerrcode;
	char		message[PHSYNC_MAX_MESSAGE];
	char		hint[PHSYNC_MAX_MESSAGE];
} PhsyncAnswer;

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

typedef struct PhsyncShared
{
	slock_t		mutex;
	pid_t		worker_pid;		/* 0 while no worker is attached */
	Latch	   *worker_latch;
	uint64		requests;		/* manual runs asked for */
	PhsyncRequest request;		/* what the last one asked for */
	uint64		requests_done;	/* manual runs finished (or refused) */
	uint64		request_taken;	/* the request the worker is running, or 0 */
	Latch	   *requester_latch;	/* whom to wake when a manual run ends */
	bool		running;		/* a run is in progress */
	int64		running_run_id; /* its phsync.runs id, once known */
	char		running_sync[NAMEDATALEN];	/* and its sync */
	int			progress_pages; /* and how far it got */
	int64		progress_received;
	TimestampTz next_due;		/* next scheduled run, 0 if unknown */
	/* outcome of the last manual run, for phsync_run_now() */
	uint64		result_request; /* the request it answers */
	bool		result_unread;	/* its caller has not read it yet */
	int			requester_pid;	/* that caller */
	PhsyncAnswer result;
} PhsyncShared;

extern PhsyncShared *phsync_shared;

extern void phsync_shmem_init(void);
extern void phsync_register_worker(void);
extern PGDLLEXPORT void phsync_worker_main(Datum main_arg);

/* ---------- when runs are due (schedule.c) ---------- */
extern TimestampTz schedule_slot_after(TimestampTz t);
extern TimestampTz schedule_day_start(TimestampTz t, int days_before);

/* ---------- sync definitions (syncs.c) ---------- */
typedef enum PhsyncPreset
{
	PHSYNC_CUSTOM,				/* the user's HogQL */
	PHSYNC_EVENTS,
	PHSYNC_PERSONS
} PhsyncPreset;

typedef struct PhsyncSync
{
	char	   *name;			/* "default" for the settings' sync */
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

extern List *sync_list(const char *only, bool enabled_only);
extern PhsyncSync *sync_default(void);
extern const char *preset_name(PhsyncPreset preset);

/* ---------- HTTP (http.c) ---------- */
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

extern PhsyncHttp *http_open(void);
extern void http_close(PhsyncHttp *http);
extern void http_post(PhsyncHttp *http, const char *url, const char *body,
					  PhsyncHttpResult *result);
extern void http_raise(PhsyncHttpResult *result) pg_attribute_noreturn();
extern void http_set_timeout(PhsyncHttp *http, long timeout_ms);
extern int	http_probe(const char *url, long timeout_ms, char **detail);
extern char *http_query_url(void);

/* ---------- retry policy and pacing (retry.c) ---------- */
extern bool retry_is_transient(PhsyncHttpResult *result, bool *ask_for_less);
extern void retry_wait(int64 run_id, int retry, PhsyncHttpResult *result);
extern void pace_requests(void);
extern void phsync_sleep(long ms);

/* ---------- HogQL (hogql.c) ---------- */
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

extern const char *const *preset_columns(PhsyncPreset preset);
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
extern char *hogql_read_query_file(const char *path);

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

/* ---------- target table (load.c) ---------- */
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
} PhsyncTarget;

typedef struct PhsyncLoader PhsyncLoader;

extern PhsyncTarget *target_prepare(const char *name, const char *cursor,
									PhsyncPreset create);
extern bool target_watermark(PhsyncTarget *target, TimestampTz *from,
							 TimestampTz *to, TimestampTz *watermark);
extern RangeVar *target_rangevar(const char *name);
extern bool relation_watermark(Oid relid, const char *cursor, TimestampTz *from,
							   TimestampTz *to, TimestampTz *watermark);
extern PhsyncLoader *loader_create(PhsyncTarget *target, PhsyncPage *page,
								   bool update);
extern bool loader_matches(PhsyncLoader *loader, PhsyncPage *page);
extern void loader_insert(PhsyncLoader *loader, PhsyncPage *page,
						  int64 run_id, PhsyncCounters *counters);
extern void loader_free(PhsyncLoader *loader);
extern const char *target_check(const char *name, const char *cursor,
								bool builtin, char **detail, char **hint,
								char ***keys, int *nkeys);

/* ---------- one run (sync.c) ---------- */
typedef struct PhsyncOutcome
{
	int64		run_id;			/* 0 if not even the run row could be made */
	int64		last_run_id;	/* several runs (every sync): the last one */
	int64		failed_run_id;	/* the run whose error message is */
	bool		ok;
	int			sqlerrcode;
	char	   *message;		/* the run's error, NULL on success */
	char	   *hint;
} PhsyncOutcome;

/* a run to carry out */
typedef struct PhsyncJob
{
	const char *trigger;		/* schedule, manual, backfill, verify */
	PhsyncSync *sync;
	int64		run_id;			/* a queued run (backfill), or 0 */
	bool		bounded;		/* backfill and verify: within [from, to) */
	TimestampTz from;
	TimestampTz to;
	int64		bucket;			/* verify: bucket width, microseconds */
	bool		repair;			/* verify: fetch differing buckets again */
} PhsyncJob;

extern void phsync_run(PhsyncJob *job, PhsyncOutcome *outcome);

/* a run in progress: its resources and counters (sync.c, verify.c) */
typedef struct PhsyncRunState
{
	int64		run_id;
	PhsyncSync *sync;
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

extern void sync_load_window(PhsyncRunState *st, TimestampTz since,
							 TimestampTz until);
extern json_object *sync_fetch(PhsyncRunState *st, PhsyncQuery *q,
							   const char *hogql, int64 bucket);

/* ---------- completeness check (verify.c) ---------- */
extern void verify_run(PhsyncRunState *st, PhsyncJob *job);
extern void phsync_xact_begin(void);
extern void phsync_xact_commit(void);

/* ---------- phsync_doctor() (doctor.c) ---------- */
typedef void (*DoctorRow) (void *arg, const char *check, const char *status,
						   const char *detail, const char *hint);
extern void doctor_run(DoctorRow emit, void *arg);

/* ---------- phsync.runs (runlog.c) ---------- */
extern int64 runlog_start(const char *trigger, const char *sync, const char *target,
						  TimestampTz *from, TimestampTz *to);
extern void runlog_begin_queued(int64 run_id);
extern bool runlog_next_queued(int64 *run_id, char **sync, TimestampTz *from,
							   TimestampTz *to);
extern void runlog_fail_queued(int64 run_id, const char *error);
extern void runlog_verified(int64 run_id, TimestampTz bucket, TimestampTz until,
							int64 posthog, int64 local, const char *status);
extern void runlog_set_mismatches(int64 run_id, int mismatches);
extern void runlog_set_window(int64 run_id, TimestampTz from, TimestampTz until);

extern void runlog_progress(int64 run_id, PhsyncCounters *c);
extern void runlog_reject(int64 run_id, const char *target, Datum columns,
						  const char *row, const char *error);
extern void runlog_finish(int64 run_id, bool ok, const char *error,
						  PhsyncCounters *c);
extern int	runlog_fail_orphans(void);
extern int64 runlog_prune(int days);
extern bool runlog_last_scheduled(TimestampTz *last, TimestampTz *owned_since);
extern bool runlog_claim_cluster(void);
extern bool runlog_claim_cluster_spi(void);

#endif							/* PHSYNC_H */
