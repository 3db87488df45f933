/* phsync--0.2--0.3.sql: upgrade from phsync 0.2 to 0.3 */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION phsync UPDATE TO '0.3'" to load this file. \quit

COMMENT ON SCHEMA phsync IS 'phsync''s tables: sync definitions, run history, rejects, verifications';

-- phsync_doctor()'s first column was "check", a reserved word
DROP FUNCTION @extschema@.phsync_doctor();
CREATE FUNCTION @extschema@.phsync_doctor(
	OUT item text, OUT status text, OUT detail text, OUT hint text)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'phsync_doctor'
LANGUAGE C VOLATILE STRICT
SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION @extschema@.phsync_doctor() IS
	'checks phsync''s settings, worker, network, TLS, API key, target and query, one row each';

REVOKE ALL ON FUNCTION @extschema@.phsync_doctor() FROM PUBLIC;

-- sync definitions are checked by the library, as the worker checks them;
-- a sync has an owner and may name a foreign server
ALTER TABLE phsync.syncs ADD COLUMN owner name NOT NULL DEFAULT CURRENT_USER;
COMMENT ON COLUMN phsync.syncs.owner IS 'the role that added it: runs act on the target as this role (a superuser''s sync into another role''s table: as that table''s owner)';
ALTER TABLE phsync.syncs ADD COLUMN server name;
ALTER TABLE phsync.syncs ADD COLUMN events text[];
COMMENT ON COLUMN phsync.syncs.events IS 'events preset: only these event names (NULL: every event)';
-- more presets; those read whole have no cursor
ALTER TABLE phsync.syncs DROP CONSTRAINT syncs_preset_check;
ALTER TABLE phsync.syncs ADD CONSTRAINT syncs_preset_check
	CHECK (preset IN ('events', 'persons', 'groups', 'sessions', 'cohorts',
					  'feature_flags', 'experiments', 'surveys', 'cohort_people'));
ALTER TABLE phsync.syncs ALTER COLUMN cursor_column DROP NOT NULL;
COMMENT ON COLUMN phsync.syncs.preset IS 'built-in query: events, persons, groups, sessions, cohorts, feature_flags, experiments, surveys or cohort_people (NULL with a custom query)';
COMMENT ON COLUMN phsync.syncs.cursor_column IS 'timestamp or date column whose max() is the watermark; NULL for a preset read whole on every run';
COMMENT ON COLUMN phsync.syncs.server IS 'the phsync foreign server of its PostHog project (the key: the owner''s user mapping); NULL: the phsync.* settings';

DROP FUNCTION @extschema@.phsync_add_sync(text, text, text, text, text, text, interval, boolean, boolean);
CREATE FUNCTION @extschema@.phsync_add_sync(
	name text, target text,
	query text DEFAULT NULL, preset text DEFAULT NULL, "cursor" text DEFAULT NULL,
	conflict text DEFAULT NULL, lookback interval DEFAULT NULL,
	enabled boolean DEFAULT true, verify boolean DEFAULT NULL, server text DEFAULT NULL,
	events text[] DEFAULT NULL)
RETURNS phsync.syncs
AS 'MODULE_PATHNAME', 'phsync_add_sync'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION @extschema@.phsync_add_sync(text, text, text, text, text, text, interval, boolean, boolean, text, text[]) IS
	'adds a sync (a preset or a HogQL query into a target table); scheduled runs run every enabled sync';
REVOKE ALL ON FUNCTION @extschema@.phsync_add_sync(text, text, text, text, text, text, interval, boolean, boolean, text, text[]) FROM PUBLIC;

DROP FUNCTION @extschema@.phsync_alter_sync(text, text, text, text, text, text, interval, boolean, boolean, boolean);
CREATE FUNCTION @extschema@.phsync_alter_sync(
	name text, target text DEFAULT NULL,
	query text DEFAULT NULL, preset text DEFAULT NULL, "cursor" text DEFAULT NULL,
	conflict text DEFAULT NULL, lookback interval DEFAULT NULL,
	enabled boolean DEFAULT NULL, verify boolean DEFAULT NULL,
	reread_all boolean DEFAULT false, server text DEFAULT NULL, events text[] DEFAULT NULL)
RETURNS phsync.syncs
AS 'MODULE_PATHNAME', 'phsync_alter_sync'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION @extschema@.phsync_alter_sync(text, text, text, text, text, text, interval, boolean, boolean, boolean, text, text[]) IS
	'changes a sync; arguments left NULL keep their value (reread_all => true sets lookback to NULL: re-read everything)';
REVOKE ALL ON FUNCTION @extschema@.phsync_alter_sync(text, text, text, text, text, text, interval, boolean, boolean, boolean, text, text[]) FROM PUBLIC;

CREATE OR REPLACE FUNCTION @extschema@.phsync_drop_sync(name text)
RETURNS void
AS 'MODULE_PATHNAME', 'phsync_drop_sync'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;

DROP FUNCTION @extschema@.phsync_create_table(text, text);
CREATE FUNCTION @extschema@.phsync_create_table(preset text, table_name text, properties text[] DEFAULT NULL)
RETURNS regclass
AS 'MODULE_PATHNAME', 'phsync_create_table'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION @extschema@.phsync_create_table(text, text, text[]) IS
	'creates a target table for a preset with its unique key and cursor index; properties => ARRAY[...] adds a generated column for each of those keys of its properties';

DROP FUNCTION phsync.check_sync(text, text, text, text, text, text);
DROP FUNCTION phsync.target_regclass(text);

-- every table and column is documented
COMMENT ON COLUMN phsync.runs.id IS 'run id, as phsync_run_now() notices and log lines name it';
COMMENT ON COLUMN phsync.runs.started_at IS 'when the run started (queued backfills: when they were queued, until they start)';
COMMENT ON COLUMN phsync.runs.finished_at IS 'when the run ended; NULL while it is queued or running';
COMMENT ON COLUMN phsync.rejects.id IS 'reject id';
COMMENT ON COLUMN phsync.rejects.run_id IS 'the run that received the row';
COMMENT ON COLUMN phsync.rejects.rejected_at IS 'when the target refused it';
COMMENT ON COLUMN phsync.rejects.target IS 'the target table that refused it';
COMMENT ON COLUMN phsync.syncs.name IS 'the sync''s name: lower-case letters, digits and underscores';
COMMENT ON COLUMN phsync.syncs.enabled IS 'whether scheduled runs and phsync_run_now() run it';
COMMENT ON COLUMN phsync.syncs.created_at IS 'when it was added';
COMMENT ON COLUMN phsync.verifications.run_id IS 'the verify run';
COMMENT ON COLUMN phsync.verifications.bucket IS 'start of the bucket (inclusive)';
COMMENT ON COLUMN phsync.verifications.bucket_until IS 'end of the bucket (exclusive)';
COMMENT ON COLUMN phsync.verifications.posthog_count IS 'rows PostHog has in the bucket (distinct keys when the key has one column)';
COMMENT ON COLUMN phsync.verifications.local_count IS 'rows the target has in the bucket';
COMMENT ON COLUMN phsync.cluster.system_identifier IS 'pg_control_system().system_identifier of that cluster';
COMMENT ON COLUMN phsync.cluster.registered_at IS 'when it took the run history over';


-- a run's low-water mark: slices commit out of order
ALTER TABLE phsync.runs ADD COLUMN resume_from timestamptz;
ALTER TABLE phsync.runs ADD COLUMN rows_deleted bigint NOT NULL DEFAULT 0;
COMMENT ON COLUMN phsync.runs.rows_deleted IS 'rows deleted because PostHog no longer has them (cohort_people: memberships that ended)';
COMMENT ON COLUMN phsync.runs.rows_updated IS 'existing rows rewritten because their values changed (conflict => ''update''), or flagged deleted because PostHog no longer has them';
COMMENT ON COLUMN phsync.runs.resume_from IS 'every row of the window before this is loaded (slices commit out of order): a run that stops half-way is resumed from here';

-- a run can be cancelled
ALTER TABLE phsync.runs DROP CONSTRAINT runs_status_check;
ALTER TABLE phsync.runs ADD CONSTRAINT runs_status_check
	CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled'));
COMMENT ON COLUMN phsync.runs.status IS 'queued (a backfill waiting for the worker), running, succeeded, failed or cancelled (phsync_cancel(), or its caller gave up)';

-- phsync_backfill() and phsync_verify() check who calls them
CREATE OR REPLACE FUNCTION @extschema@.phsync_backfill(sync text, "from" timestamptz, "to" timestamptz)
RETURNS phsync.runs
AS 'MODULE_PATHNAME', 'phsync_backfill'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;

CREATE OR REPLACE FUNCTION @extschema@.phsync_verify(sync text, "from" timestamptz, "to" timestamptz,
										  bucket interval DEFAULT '1 day', repair boolean DEFAULT false)
RETURNS TABLE (bucket timestamptz, posthog_count bigint, local_count bigint, status text)
AS 'MODULE_PATHNAME', 'phsync_verify'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;

-- phsync.status says why a target is not read
DROP VIEW phsync.status;
DROP FUNCTION @extschema@.phsync_sync_state();
CREATE FUNCTION @extschema@.phsync_sync_state(
	OUT sync text, OUT enabled boolean, OUT target text, OUT watermark timestamptz,
	OUT next_run timestamptz, OUT running boolean, OUT run_id bigint, OUT pages integer,
	OUT rows_received bigint, OUT target_problem text, OUT waiting_until timestamptz)
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
	   s.waiting_until
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
				   ORDER BY id DESC LIMIT 1) v ON true;

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
COMMENT ON COLUMN phsync.status.target_problem IS 'why the target is not read (it does not exist, is not a table, the sync''s owner may not write it...); NULL when it is fine';

CREATE FUNCTION @extschema@.phsync_cancel(run_id bigint)
RETURNS boolean
AS 'MODULE_PATHNAME', 'phsync_cancel'
LANGUAGE C VOLATILE STRICT
SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION @extschema@.phsync_cancel(bigint) IS
	'cancels a queued or running run (the sync''s owner and superusers may); a running one stops within a second';

REVOKE ALL ON FUNCTION @extschema@.phsync_cancel(bigint) FROM PUBLIC;

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
