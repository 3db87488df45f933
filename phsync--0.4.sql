/* phsync--0.4.sql: install script for phsync 0.4 */

-- complain if script is sourced in psql, rather than via CREATE EXTENSION
\echo Use "CREATE EXTENSION phsync" to load this file. \quit

/*
 * The background worker connects to one database (phsync.database); in any
 * other, the extension's objects can exist (a restore into a copy, a test
 * database) but nothing runs there: say so, as a WARNING (CREATE EXTENSION
 * hides a script's NOTICEs).  phsync.database may be a
 * placeholder here when the library is not loaded in this session yet, so
 * fall back to its default.
 */
DO $phsync$
DECLARE
	target_db text := coalesce(current_setting('phsync.database', true), 'postgres');
BEGIN
	IF current_database() OPERATOR(pg_catalog.<>) target_db THEN
		RAISE WARNING 'phsync runs in database "%", not in this one: syncs here do not run', target_db
			USING DETAIL = format('phsync.database is set to "%s". The tables and functions work; the worker never reads this database''s syncs.', target_db),
				  HINT = 'This suits a restored copy. To make phsync run here instead, set phsync.database in postgresql.conf and restart the server.';
	END IF;
END
$phsync$;

/*
 * phsync's tables live in schema phsync.  The functions go in the
 * extension's schema (public unless CREATE EXTENSION ... SCHEMA says
 * otherwise); CREATE EXTENSION phsync SCHEMA phsync puts them beside the
 * tables, in a schema that must then exist already and belong to a
 * superuser (its owner could drop phsync's tables).
 */
DO $phsync$
BEGIN
	IF '@extschema@' OPERATOR(pg_catalog.=) 'phsync' THEN
		IF NOT (SELECT r.rolsuper FROM pg_catalog.pg_namespace n JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) n.nspowner
				WHERE n.nspname OPERATOR(pg_catalog.=) 'phsync') THEN
			RAISE EXCEPTION 'schema "phsync" must belong to a superuser'
				USING ERRCODE = 'insufficient_privilege',
					  DETAIL = 'The owner of the schema could drop or replace phsync''s tables.',
					  HINT = 'ALTER SCHEMA phsync OWNER TO a superuser, or create the extension in another schema.';
		END IF;
	ELSE
		CREATE SCHEMA phsync;
		COMMENT ON SCHEMA phsync IS 'phsync''s tables: sync definitions, run history, rejects, verifications';
	END IF;
END
$phsync$;

CREATE TABLE phsync.runs (
	id				bigserial PRIMARY KEY,
	trigger			text NOT NULL CHECK (trigger IN ('schedule', 'manual', 'backfill', 'verify')),
	started_at		timestamptz NOT NULL DEFAULT pg_catalog.now(),
	finished_at		timestamptz,
	status			text NOT NULL DEFAULT 'running'
					CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
	target			text NOT NULL,
	window_from		timestamptz,
	window_until	timestamptz,
	pages			integer NOT NULL DEFAULT 0,
	rows_received	bigint NOT NULL DEFAULT 0,
	rows_inserted	bigint NOT NULL DEFAULT 0,
	error			text,
	requests		integer NOT NULL DEFAULT 0,
	retries			integer NOT NULL DEFAULT 0,
	rows_rejected	bigint NOT NULL DEFAULT 0,
	sync			text NOT NULL DEFAULT 'default',
	rows_updated	bigint NOT NULL DEFAULT 0,
	verify_mismatches integer,
	resume_from		timestamptz,
	rows_deleted	bigint NOT NULL DEFAULT 0
);
CREATE INDEX runs_trigger_started_at_idx ON phsync.runs (trigger, started_at);
CREATE INDEX runs_sync_id_idx ON phsync.runs (sync, id);

COMMENT ON TABLE phsync.runs IS 'one row per phsync run, written by the phsync background worker';
COMMENT ON COLUMN phsync.runs.id IS 'run id, as phsync_run_now() notices and log lines name it';
COMMENT ON COLUMN phsync.runs.started_at IS 'when the run started (queued backfills: when they were queued, until they start)';
COMMENT ON COLUMN phsync.runs.finished_at IS 'when the run ended; NULL while it is queued or running';
COMMENT ON COLUMN phsync.runs.trigger IS 'schedule (phsync.run_at/phsync.interval), manual (phsync_run_now()), backfill (phsync_backfill()) or verify (phsync_verify(), or the scheduled check of the previous day)';
COMMENT ON COLUMN phsync.runs.status IS 'queued (a backfill waiting for the worker), running, succeeded, failed or cancelled (phsync_cancel(), or its caller gave up)';
COMMENT ON COLUMN phsync.runs.target IS 'target table of the run';
COMMENT ON COLUMN phsync.runs.window_from IS 'start of the window read from PostHog (inclusive)';
COMMENT ON COLUMN phsync.runs.window_until IS 'end of the window read from PostHog (exclusive), fixed when the run started';
COMMENT ON COLUMN phsync.runs.pages IS 'PostHog result pages loaded';
COMMENT ON COLUMN phsync.runs.rows_received IS 'rows PostHog returned';
COMMENT ON COLUMN phsync.runs.rows_inserted IS 'rows inserted into the target (duplicates are skipped)';
COMMENT ON COLUMN phsync.runs.error IS 'why the run failed';
COMMENT ON COLUMN phsync.runs.requests IS 'HTTP requests made to PostHog, retries included';
COMMENT ON COLUMN phsync.runs.retries IS 'requests that were retries after a transient failure';
COMMENT ON COLUMN phsync.runs.rows_rejected IS 'rows the target refused, kept in phsync.rejects';
COMMENT ON COLUMN phsync.runs.verify_mismatches IS 'verify runs: buckets whose PostHog and local counts differ (after any repair)';
COMMENT ON COLUMN phsync.runs.rows_updated IS 'existing rows rewritten because their values changed (conflict => ''update''), or flagged deleted because PostHog no longer has them';
COMMENT ON COLUMN phsync.runs.rows_deleted IS 'rows deleted because PostHog no longer has them (cohort_people: memberships that ended)';
COMMENT ON COLUMN phsync.runs.resume_from IS 'every row of the window before this is loaded (slices commit out of order): a run that stops half-way is resumed from here';
COMMENT ON COLUMN phsync.runs.sync IS 'the sync that ran: default (the phsync.* settings) or a name from phsync.syncs';

CREATE TABLE phsync.rejects (
	id				bigserial PRIMARY KEY,
	run_id			bigint NOT NULL REFERENCES phsync.runs (id) ON DELETE CASCADE,
	rejected_at		timestamptz NOT NULL DEFAULT pg_catalog.now(),
	target			text NOT NULL,
	columns			text[] NOT NULL,
	raw_row			text NOT NULL,
	error			text NOT NULL
);
CREATE INDEX rejects_run_id_idx ON phsync.rejects (run_id);

COMMENT ON TABLE phsync.rejects IS 'rows the target refused (dead letters), kept as PostHog sent them';
COMMENT ON COLUMN phsync.rejects.id IS 'reject id';
COMMENT ON COLUMN phsync.rejects.run_id IS 'the run that received the row';
COMMENT ON COLUMN phsync.rejects.rejected_at IS 'when the target refused it';
COMMENT ON COLUMN phsync.rejects.target IS 'the target table that refused it';
COMMENT ON COLUMN phsync.rejects.columns IS 'the query''s column names, in the order of raw_row';
COMMENT ON COLUMN phsync.rejects.raw_row IS 'the row as PostHog sent it: a JSON array in the order of the query''s columns';
COMMENT ON COLUMN phsync.rejects.error IS 'why the target refused it';

-- run history is user data: keep it in pg_dump output
SELECT pg_catalog.pg_extension_config_dump('phsync.runs', '');
SELECT pg_catalog.pg_extension_config_dump('phsync.runs_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('phsync.rejects', '');
SELECT pg_catalog.pg_extension_config_dump('phsync.rejects_id_seq', '');

CREATE FUNCTION @extschema@.phsync_doctor(
	OUT item text, OUT status text, OUT detail text, OUT hint text)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'phsync_doctor'
LANGUAGE C VOLATILE STRICT
SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION @extschema@.phsync_doctor() IS
	'checks phsync''s settings, worker, network, TLS, API key, target and query, one row each';

REVOKE ALL ON FUNCTION @extschema@.phsync_doctor() FROM PUBLIC;

-- ---------- sync definitions (0.2) ----------

CREATE TABLE phsync.syncs (
	name			text PRIMARY KEY
					CHECK (name ~ '^[a-z_][a-z0-9_]{0,62}$' AND name OPERATOR(pg_catalog.<>) 'default'),
	target			text NOT NULL,
	preset			text CHECK (preset IN ('events', 'persons', 'groups', 'sessions', 'cohorts',
										   'feature_flags', 'experiments', 'surveys', 'cohort_people',
										   'person_distinct_ids')),
	query			text,
	cursor_column	text,
	conflict		text NOT NULL DEFAULT 'nothing' CHECK (conflict IN ('nothing', 'update')),
	lookback		interval,
	enabled			boolean NOT NULL DEFAULT true,
	verify			boolean NOT NULL DEFAULT false,
	created_at		timestamptz NOT NULL DEFAULT pg_catalog.now(),
	CHECK ((preset IS NULL) OPERATOR(pg_catalog.<>) (query IS NULL)),
	owner			pg_catalog.regrole NOT NULL DEFAULT pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER)),
	server			name,
	events			text[],
	schedule		text,
	deletions		text NOT NULL DEFAULT 'keep' CHECK (deletions IN ('keep', 'mirror'))
);

COMMENT ON TABLE phsync.syncs IS 'syncs added with phsync_add_sync(); the sync named default comes from the phsync.* settings';
COMMENT ON COLUMN phsync.syncs.name IS 'the sync''s name: lower-case letters, digits and underscores';
COMMENT ON COLUMN phsync.syncs.deletions IS 'keep, or mirror: a repair deletes the rows PostHog no longer has in the verified range, and a preset read whole those PostHog no longer lists';
COMMENT ON COLUMN phsync.syncs.enabled IS 'whether scheduled runs and phsync_run_now() run it';
COMMENT ON COLUMN phsync.syncs.created_at IS 'when it was added';
COMMENT ON COLUMN phsync.syncs.owner IS 'the role that added it, by OID: runs act on the target as this role (a superuser''s sync into another role''s table: as that table''s owner)';
COMMENT ON COLUMN phsync.syncs.target IS 'target table, schema-qualified';
COMMENT ON COLUMN phsync.syncs.preset IS 'built-in query: events, persons, groups, sessions, cohorts, feature_flags, experiments, surveys, cohort_people or person_distinct_ids (NULL with a custom query)';
COMMENT ON COLUMN phsync.syncs.query IS 'custom HogQL query (NULL with a preset)';
COMMENT ON COLUMN phsync.syncs.cursor_column IS 'timestamp or date column whose max() is the watermark; NULL for a preset read whole on every run';
COMMENT ON COLUMN phsync.syncs.events IS 'events preset: only these event names (NULL: every event)';
COMMENT ON COLUMN phsync.syncs.conflict IS 'nothing: skip rows already there; update: rewrite them when their values changed';
COMMENT ON COLUMN phsync.syncs.lookback IS 'how far before the watermark each run starts reading; NULL: re-read everything every run';
COMMENT ON COLUMN phsync.syncs.verify IS 'scheduled runs also verify the previous day (phsync_verify) and record it in phsync.runs';
COMMENT ON COLUMN phsync.syncs.schedule IS 'when scheduled runs run it: five cron fields or an interval, in phsync.timezone; NULL: phsync.run_at and phsync.interval';
COMMENT ON COLUMN phsync.syncs.server IS 'the phsync foreign server of its PostHog project (the key: the owner''s user mapping); NULL: the phsync.* settings';

CREATE TABLE phsync.verifications (
	run_id			bigint NOT NULL REFERENCES phsync.runs (id) ON DELETE CASCADE,
	bucket			timestamptz NOT NULL,
	bucket_until	timestamptz NOT NULL,
	posthog_count	bigint NOT NULL,
	local_count		bigint NOT NULL,
	status			text NOT NULL CHECK (status IN ('ok', 'missing', 'extra', 'different', 'repaired')),
	posthog_checksum bigint,
	local_checksum	bigint,
	PRIMARY KEY (run_id, bucket)
);

COMMENT ON TABLE phsync.verifications IS 'per-bucket row counts compared by verify runs';
COMMENT ON COLUMN phsync.verifications.run_id IS 'the verify run';
COMMENT ON COLUMN phsync.verifications.bucket IS 'start of the bucket (inclusive)';
COMMENT ON COLUMN phsync.verifications.bucket_until IS 'end of the bucket (exclusive)';
COMMENT ON COLUMN phsync.verifications.posthog_count IS 'rows PostHog has in the bucket (distinct keys when the key has one column)';
COMMENT ON COLUMN phsync.verifications.local_count IS 'rows the target has in the bucket';
COMMENT ON COLUMN phsync.verifications.posthog_checksum IS 'sum of the hashes of PostHog''s distinct keys in the bucket (see docs/syncs.md#verifying-completeness); NULL: counts only';
COMMENT ON COLUMN phsync.verifications.local_checksum IS 'the same sum over the target''s keys';
COMMENT ON COLUMN phsync.verifications.status IS 'ok, missing (fewer rows here), extra (more rows here), different (as many rows, other keys), repaired (fetched again, and equal now)';

-- sync definitions and verification results are user data: keep them in pg_dump output
SELECT pg_catalog.pg_extension_config_dump('phsync.syncs', '');
SELECT pg_catalog.pg_extension_config_dump('phsync.verifications', '');

/*
 * Sync definitions are managed by C functions that are not SECURITY
 * DEFINER: a sync belongs to the role that adds it, whose rights on the
 * target are checked; they write phsync.syncs themselves.
 */
CREATE FUNCTION @extschema@.phsync_add_sync(
	name text, target text,
	query text DEFAULT NULL, preset text DEFAULT NULL, "cursor" text DEFAULT NULL,
	conflict text DEFAULT NULL, lookback interval DEFAULT NULL,
	enabled boolean DEFAULT true, verify boolean DEFAULT NULL, server text DEFAULT NULL,
	events text[] DEFAULT NULL, schedule text DEFAULT NULL, deletions text DEFAULT NULL)
RETURNS phsync.syncs
AS 'MODULE_PATHNAME', 'phsync_add_sync'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION @extschema@.phsync_add_sync(text, text, text, text, text, text, interval, boolean, boolean, text, text[], text, text) IS
	'adds a sync (a preset or a HogQL query into a target table); scheduled runs run every enabled sync';

CREATE FUNCTION @extschema@.phsync_alter_sync(
	name text, target text DEFAULT NULL,
	query text DEFAULT NULL, preset text DEFAULT NULL, "cursor" text DEFAULT NULL,
	conflict text DEFAULT NULL, lookback interval DEFAULT NULL,
	enabled boolean DEFAULT NULL, verify boolean DEFAULT NULL,
	reread_all boolean DEFAULT false, server text DEFAULT NULL, events text[] DEFAULT NULL,
	schedule text DEFAULT NULL, deletions text DEFAULT NULL)
RETURNS phsync.syncs
AS 'MODULE_PATHNAME', 'phsync_alter_sync'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION @extschema@.phsync_alter_sync(text, text, text, text, text, text, interval, boolean, boolean, boolean, text, text[], text, text) IS
	'changes a sync; arguments left NULL keep their value (reread_all => true sets lookback to NULL: re-read everything; schedule => '''' follows the global schedule again); the default sync takes enabled and schedule';

CREATE FUNCTION @extschema@.phsync_drop_sync(name text)
RETURNS void
AS 'MODULE_PATHNAME', 'phsync_drop_sync'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION @extschema@.phsync_drop_sync(text) IS
	'removes a sync; its target table and its run history stay';

/*
 * Not SECURITY DEFINER: the table belongs to whoever creates it (the
 * worker's role, when the worker creates the default sync's table).  The
 * presets' shapes are defined once, in the library (presets.c).
 */
CREATE FUNCTION @extschema@.phsync_create_table(preset text, table_name text, properties text[] DEFAULT NULL)
RETURNS regclass
AS 'MODULE_PATHNAME', 'phsync_create_table'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION @extschema@.phsync_create_table(text, text, text[]) IS
	'creates a target table for a preset with its unique key and cursor index; properties => ARRAY[...] adds a generated column for each of those keys of its properties';

/* not SECURITY DEFINER: the syncs it runs are the caller's own */
CREATE FUNCTION @extschema@.phsync_run_now(sync text DEFAULT NULL)
RETURNS SETOF phsync.runs
AS 'MODULE_PATHNAME', 'phsync_run_now'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION @extschema@.phsync_run_now(text) IS
	'asks the phsync worker to run every enabled sync of the caller (or the one named, which the caller must own) now, waits and returns their phsync.runs rows';

REVOKE ALL ON FUNCTION @extschema@.phsync_run_now(text) FROM PUBLIC;

CREATE FUNCTION @extschema@.phsync_run_now(sync text, wait boolean)
RETURNS SETOF phsync.runs
AS 'MODULE_PATHNAME', 'phsync_run_now'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION @extschema@.phsync_run_now(text, boolean) IS
	'as phsync_run_now(sync); with wait => false, queues the runs (status queued) and returns them at once';

REVOKE ALL ON FUNCTION @extschema@.phsync_run_now(text, boolean) FROM PUBLIC;

CREATE FUNCTION @extschema@.phsync_backfill(sync text, "from" timestamptz, "to" timestamptz)
RETURNS phsync.runs
AS 'MODULE_PATHNAME', 'phsync_backfill'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION @extschema@.phsync_backfill(text, timestamptz, timestamptz) IS
	'queues a load of [from, to) for a sync; resumes from the target''s max(cursor) inside the range';

REVOKE ALL ON FUNCTION @extschema@.phsync_backfill(text, timestamptz, timestamptz) FROM PUBLIC;

CREATE FUNCTION @extschema@.phsync_verify(sync text, "from" timestamptz, "to" timestamptz,
										  bucket interval DEFAULT '1 day', repair boolean DEFAULT false)
RETURNS TABLE (bucket timestamptz, posthog_count bigint, local_count bigint, status text)
AS 'MODULE_PATHNAME', 'phsync_verify'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION @extschema@.phsync_verify(text, timestamptz, timestamptz, interval, boolean) IS
	'compares PostHog''s row count with the target''s, per bucket of [from, to); repair => true fetches the buckets that differ again';

REVOKE ALL ON FUNCTION @extschema@.phsync_verify(text, timestamptz, timestamptz, interval, boolean) FROM PUBLIC;

CREATE FUNCTION @extschema@.phsync_next_run(after timestamptz DEFAULT pg_catalog.now())
RETURNS timestamptz
AS 'MODULE_PATHNAME', 'phsync_next_run'
LANGUAGE C STABLE STRICT;

COMMENT ON FUNCTION @extschema@.phsync_next_run(timestamptz) IS
	'the first scheduled run after a moment, by phsync.run_at, phsync.interval and phsync.timezone';

CREATE FUNCTION @extschema@.phsync_sync_state(
	OUT sync text, OUT enabled boolean, OUT target text, OUT watermark timestamptz,
	OUT next_run timestamptz, OUT running boolean, OUT run_id bigint, OUT pages integer,
	OUT rows_received bigint, OUT target_problem text, OUT waiting_until timestamptz,
	OUT owner oid, OUT schedule text, OUT stale boolean, OUT paused boolean)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'phsync_sync_state'
LANGUAGE C VOLATILE STRICT
SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION @extschema@.phsync_sync_state() IS
	'each sync''s target watermark and the phsync worker''s state (next run, run in progress), for phsync.status';

REVOKE ALL ON FUNCTION @extschema@.phsync_sync_state() FROM PUBLIC;

CREATE VIEW phsync.status AS
SELECT s.sync,
	   s.enabled,
	   s.target,
	   r.id AS last_run_id,
	   r.status AS last_status,
	   r.started_at AS last_started_at,
	   r.finished_at AS last_finished_at,
	   r.rows_inserted AS last_rows_inserted,
	   r.error AS last_error,
	   s.watermark,
	   pg_catalog.now() OPERATOR(pg_catalog.-) s.watermark AS lag,
	   s.next_run,
	   s.running,
	   s.run_id,
	   s.pages,
	   s.rows_received,
	   v.verify_mismatches AS last_verify_mismatches,
	   s.target_problem,
	   s.waiting_until,
	   CASE WHEN NOT s.enabled THEN 'disabled'
			WHEN s.paused THEN 'paused'
			WHEN r.status OPERATOR(pg_catalog.=) 'failed' THEN 'failing'
			WHEN r.rows_rejected OPERATOR(pg_catalog.>) 0 OR v.verify_mismatches OPERATOR(pg_catalog.>) 0 THEN 'degraded'
			WHEN s.stale THEN 'stale'
			ELSE 'ok' END AS health,
	   r.rows_rejected AS last_rows_rejected,
	   s.schedule
FROM @extschema@.phsync_sync_state() s
LEFT JOIN LATERAL (SELECT * FROM phsync.runs
				   WHERE runs.sync OPERATOR(pg_catalog.=) s.sync
					 AND runs.status IN ('succeeded', 'failed', 'cancelled')
					 AND runs.trigger OPERATOR(pg_catalog.<>) 'verify'
				   ORDER BY id DESC LIMIT 1) r ON true
LEFT JOIN LATERAL (SELECT runs.verify_mismatches FROM phsync.runs
				   WHERE runs.sync OPERATOR(pg_catalog.=) s.sync
					 AND runs.status OPERATOR(pg_catalog.=) 'succeeded'
					 AND runs.trigger OPERATOR(pg_catalog.=) 'verify'
				   ORDER BY id DESC LIMIT 1) v ON true
-- a role sees the syncs it owns (the default sync is the superusers'), pg_read_all_stats every one
WHERE pg_catalog.pg_has_role(s.owner, 'USAGE')
   OR pg_catalog.pg_has_role('pg_read_all_stats', 'USAGE');

COMMENT ON VIEW phsync.status IS
	'one row per sync: last finished run, watermark and lag, next scheduled run, run in progress, last verification';
COMMENT ON COLUMN phsync.status.sync IS 'the sync: default, or a name from phsync.syncs';
COMMENT ON COLUMN phsync.status.enabled IS 'whether scheduled runs run it';
COMMENT ON COLUMN phsync.status.target IS 'its target table';
COMMENT ON COLUMN phsync.status.last_run_id IS 'its last finished run that was not a verification';
COMMENT ON COLUMN phsync.status.last_status IS 'how that run ended: succeeded, failed or cancelled';
COMMENT ON COLUMN phsync.status.last_started_at IS 'when that run started';
COMMENT ON COLUMN phsync.status.last_finished_at IS 'when that run ended';
COMMENT ON COLUMN phsync.status.last_rows_inserted IS 'rows that run inserted';
COMMENT ON COLUMN phsync.status.last_error IS 'why that run failed';
COMMENT ON COLUMN phsync.status.watermark IS 'max() of the target''s cursor column: where the next run starts (less the lookback)';
COMMENT ON COLUMN phsync.status.lag IS 'now() - watermark';
COMMENT ON COLUMN phsync.status.next_run IS 'when the next scheduled run is due';
COMMENT ON COLUMN phsync.status.running IS 'whether a run of this sync is in progress';
COMMENT ON COLUMN phsync.status.run_id IS 'the run in progress';
COMMENT ON COLUMN phsync.status.pages IS 'pages the run in progress has loaded';
COMMENT ON COLUMN phsync.status.rows_received IS 'rows the run in progress has received';
COMMENT ON COLUMN phsync.status.last_verify_mismatches IS 'buckets that differed in its last verification';
COMMENT ON COLUMN phsync.status.waiting_until IS 'the run in progress waits for PostHog''s throttle (HTTP 429) until then';
COMMENT ON COLUMN phsync.status.health IS 'ok; degraded (its last run rejected rows, or its last verification found buckets that differ); failing (its last run failed); stale (no success for two scheduled periods); paused (phsync.enabled is off); disabled';
COMMENT ON COLUMN phsync.status.last_rows_rejected IS 'rows its last finished run rejected (phsync.rejects)';
COMMENT ON COLUMN phsync.status.schedule IS 'its own schedule; NULL: phsync.run_at and phsync.interval';
COMMENT ON COLUMN phsync.status.target_problem IS 'why the target is not read (it does not exist, is not a table, the sync''s owner may not write it...); NULL when it is fine';

REVOKE ALL ON FUNCTION @extschema@.phsync_add_sync(text, text, text, text, text, text, interval, boolean, boolean, text, text[], text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.phsync_alter_sync(text, text, text, text, text, text, interval, boolean, boolean, boolean, text, text[], text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.phsync_drop_sync(text) FROM PUBLIC;

CREATE FUNCTION @extschema@.phsync_cancel(run_id bigint)
RETURNS boolean
AS 'MODULE_PATHNAME', 'phsync_cancel'
LANGUAGE C VOLATILE STRICT
SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION @extschema@.phsync_cancel(bigint) IS
	'cancels a queued or running run (the sync''s owner and superusers may); a running one stops within a second';

REVOKE ALL ON FUNCTION @extschema@.phsync_cancel(bigint) FROM PUBLIC;

/*
 * Which cluster this database's phsync worker has run in.  Not dumped: after
 * a restore (or a new install) it is empty, which tells the worker that the
 * restored history is not its own, so it neither catches up on scheduled
 * runs "missed" before the dump nor carries out backfills queued there.
 */
CREATE TABLE phsync.cluster (
	system_identifier bigint NOT NULL,
	registered_at	timestamptz NOT NULL DEFAULT pg_catalog.now()
);

COMMENT ON TABLE phsync.cluster IS 'the cluster whose worker owns this run history (empty after a restore until the worker starts)';
COMMENT ON COLUMN phsync.cluster.system_identifier IS 'pg_control_system().system_identifier of that cluster';
COMMENT ON COLUMN phsync.cluster.registered_at IS 'when it took the run history over';

-- ---------- PostHog projects as foreign servers; PostHog from SQL (0.3) ----------

CREATE FUNCTION @extschema@.phsync_fdw_validator(text[], oid)
RETURNS void
AS 'MODULE_PATHNAME', 'phsync_fdw_validator'
LANGUAGE C STRICT;

COMMENT ON FUNCTION @extschema@.phsync_fdw_validator(text[], oid) IS
	'checks the options of phsync servers (host, project_id, limits) and user mappings (api_key)';

CREATE FOREIGN DATA WRAPPER phsync VALIDATOR @extschema@.phsync_fdw_validator;

COMMENT ON FOREIGN DATA WRAPPER phsync IS
	'PostHog projects: a server holds the host and project, a user mapping the API key';

/*
 * In the calling session, with the caller's own user mapping (without a
 * server: the phsync.* settings, for superusers only).  Not granted to
 * PUBLIC.
 */
CREATE FUNCTION @extschema@.phsync_query(query text, server text DEFAULT NULL, "values" jsonb DEFAULT NULL)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'phsync_query'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION @extschema@.phsync_query(text, text, jsonb) IS
	'runs one HogQL query on PostHog and returns its rows (give a column definition list)';

CREATE FUNCTION @extschema@.phsync_query_json(query text, server text DEFAULT NULL, "values" jsonb DEFAULT NULL)
RETURNS SETOF jsonb
AS 'MODULE_PATHNAME', 'phsync_query_json'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION @extschema@.phsync_query_json(text, text, jsonb) IS
	'runs one HogQL query on PostHog and returns each row as a jsonb object';

CREATE FUNCTION @extschema@.phsync_describe(query text, server text DEFAULT NULL, "values" jsonb DEFAULT NULL)
RETURNS TABLE (name text, posthog_type text, postgres_type text)
AS 'MODULE_PATHNAME', 'phsync_describe'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION @extschema@.phsync_describe(text, text, jsonb) IS
	'the columns a HogQL query returns, with PostHog''s type and the PostgreSQL type phsync stores each as';

CREATE FUNCTION @extschema@.phsync_tables(server text DEFAULT NULL)
RETURNS TABLE (table_name text, column_name text, posthog_type text, postgres_type text)
AS 'MODULE_PATHNAME', 'phsync_tables'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION @extschema@.phsync_tables(text) IS
	'PostHog''s HogQL tables and their columns (postgres_type NULL: not a column, such as a lazy join)';

CREATE FUNCTION @extschema@.phsync_create_table(name text, query text, key text[],
											   "cursor" text DEFAULT NULL, server text DEFAULT NULL,
											   "values" jsonb DEFAULT NULL)
RETURNS regclass
AS 'MODULE_PATHNAME', 'phsync_create_table_for_query'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION @extschema@.phsync_create_table(text, text, text[], text, text, jsonb) IS
	'creates a target table for a custom HogQL query: its columns and types, the key, a cursor index';

REVOKE ALL ON FUNCTION @extschema@.phsync_query(text, text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.phsync_query_json(text, text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.phsync_describe(text, text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.phsync_tables(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.phsync_create_table(text, text, text[], text, text, jsonb) FROM PUBLIC;

CREATE FUNCTION @extschema@.phsync_next_run(after timestamptz, schedule text)
RETURNS timestamptz
AS 'MODULE_PATHNAME', 'phsync_next_run_of'
LANGUAGE C STABLE;

COMMENT ON FUNCTION @extschema@.phsync_next_run(timestamptz, text) IS
	'the first run of a schedule (five cron fields or an interval, in phsync.timezone; NULL: the global one) after a moment';

-- ---------- the default sync's switch and schedule (0.4) ----------

/*
 * The default sync is defined by the phsync.* settings; only whether it
 * runs and when are set from SQL (phsync_alter_sync('default', ...)), and
 * kept here.  One row at most.  Readable by every role that may read
 * phsync's schema (the worker's role among them).
 */
CREATE TABLE phsync.default_sync (
	only_row		boolean PRIMARY KEY DEFAULT true CHECK (only_row),
	enabled			boolean NOT NULL DEFAULT true,
	schedule		text
);

COMMENT ON TABLE phsync.default_sync IS 'the default sync''s enabled and schedule, set with phsync_alter_sync(''default'', ...); its other fields are the phsync.* settings';
COMMENT ON COLUMN phsync.default_sync.only_row IS 'always true: the table has one row at most';
COMMENT ON COLUMN phsync.default_sync.enabled IS 'whether scheduled runs and phsync_run_now() run the default sync';
COMMENT ON COLUMN phsync.default_sync.schedule IS 'its own schedule (cron or interval); NULL: phsync.run_at and phsync.interval';

SELECT pg_catalog.pg_extension_config_dump('phsync.default_sync', '');
GRANT SELECT ON phsync.default_sync TO PUBLIC;

-- ---------- owners see their own syncs and runs (0.4) ----------

/*
 * As pg_cron does for cron.job: a role sees the rows of the syncs it owns
 * (or is a member of the owner of); the default sync's runs, and those of
 * dropped syncs, are the superusers'.  A role that may update phsync.runs
 * (the worker's role, phsync.role) sees every row: it runs every sync.
 * Superusers and the tables' owner bypass these policies.  Writing is
 * decided by privileges alone (nobody but the worker's role has them).
 */
ALTER TABLE phsync.syncs ENABLE ROW LEVEL SECURITY;
ALTER TABLE phsync.runs ENABLE ROW LEVEL SECURITY;
ALTER TABLE phsync.rejects ENABLE ROW LEVEL SECURITY;
ALTER TABLE phsync.verifications ENABLE ROW LEVEL SECURITY;

CREATE POLICY owner_reads ON phsync.syncs FOR SELECT
	USING (pg_catalog.pg_has_role(owner, 'USAGE')
		   OR pg_catalog.has_table_privilege('phsync.runs', 'UPDATE'));
CREATE POLICY owner_reads ON phsync.runs FOR SELECT
	USING (pg_catalog.has_table_privilege('phsync.runs', 'UPDATE')
		   OR EXISTS (SELECT FROM phsync.syncs s WHERE s.name OPERATOR(pg_catalog.=) runs.sync));
CREATE POLICY owner_reads ON phsync.rejects FOR SELECT
	USING (pg_catalog.has_table_privilege('phsync.runs', 'UPDATE')
		   OR EXISTS (SELECT FROM phsync.runs r WHERE r.id OPERATOR(pg_catalog.=) rejects.run_id));
CREATE POLICY owner_reads ON phsync.verifications FOR SELECT
	USING (pg_catalog.has_table_privilege('phsync.runs', 'UPDATE')
		   OR EXISTS (SELECT FROM phsync.runs r WHERE r.id OPERATOR(pg_catalog.=) verifications.run_id));
CREATE POLICY writer_inserts ON phsync.runs FOR INSERT WITH CHECK (true);
CREATE POLICY writer_updates ON phsync.runs FOR UPDATE USING (true);
CREATE POLICY writer_deletes ON phsync.runs FOR DELETE USING (true);
CREATE POLICY writer_inserts ON phsync.rejects FOR INSERT WITH CHECK (true);
CREATE POLICY writer_updates ON phsync.rejects FOR UPDATE USING (true);
CREATE POLICY writer_deletes ON phsync.rejects FOR DELETE USING (true);
CREATE POLICY writer_inserts ON phsync.verifications FOR INSERT WITH CHECK (true);
CREATE POLICY writer_updates ON phsync.verifications FOR UPDATE USING (true);
CREATE POLICY writer_deletes ON phsync.verifications FOR DELETE USING (true);

-- ---------- phsync_user: every grant a delegate needs (0.4) ----------

/*
 * GRANT phsync_user TO alice is the whole delegation: alice manages and
 * runs her own syncs (with her own user mapping on a phsync server, whose
 * USAGE its owner grants), queries PostHog and reads her syncs' history.
 * Roles are the cluster's: the role is created when absent and stays when
 * the extension is dropped.
 */
DO $phsync$
BEGIN
	IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'phsync_user') THEN
		CREATE ROLE phsync_user NOLOGIN;
		COMMENT ON ROLE phsync_user IS 'phsync''s delegates: GRANT phsync_user TO a role that may manage and run its own syncs';
	END IF;
END
$phsync$;

GRANT USAGE ON SCHEMA phsync TO phsync_user;
GRANT SELECT ON phsync.syncs, phsync.runs, phsync.rejects, phsync.verifications, phsync.status TO phsync_user;
GRANT EXECUTE ON FUNCTION
	@extschema@.phsync_add_sync(text, text, text, text, text, text, interval, boolean, boolean, text, text[], text, text),
	@extschema@.phsync_alter_sync(text, text, text, text, text, text, interval, boolean, boolean, boolean, text, text[], text, text),
	@extschema@.phsync_drop_sync(text),
	@extschema@.phsync_run_now(text),
	@extschema@.phsync_run_now(text, boolean),
	@extschema@.phsync_backfill(text, timestamptz, timestamptz),
	@extschema@.phsync_verify(text, timestamptz, timestamptz, interval, boolean),
	@extschema@.phsync_cancel(bigint),
	@extschema@.phsync_sync_state(),
	@extschema@.phsync_query(text, text, jsonb),
	@extschema@.phsync_query_json(text, text, jsonb),
	@extschema@.phsync_describe(text, text, jsonb),
	@extschema@.phsync_tables(text),
	@extschema@.phsync_create_table(text, text, text[]),
	@extschema@.phsync_create_table(text, text, text[], text, text, jsonb)
	TO phsync_user;
