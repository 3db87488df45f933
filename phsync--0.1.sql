/* phsync--0.1.sql: install script for phsync 0.1 */

-- complain if script is sourced in psql, rather than via CREATE EXTENSION
\echo Use "CREATE EXTENSION phsync" to load this file. \quit

/*
 * The background worker connects to one database (phsync.database); the
 * extension only makes sense there.  Refuse anywhere else, as pg_cron does.
 * phsync.database may be a placeholder here when the library is not loaded
 * in this session yet, so fall back to its default.
 */
DO $phsync$
DECLARE
	target_db text := coalesce(current_setting('phsync.database', true), 'postgres');
BEGIN
	IF current_database() OPERATOR(pg_catalog.<>) target_db THEN
		RAISE EXCEPTION 'can only create extension "phsync" in database "%"', target_db
			USING ERRCODE = 'object_not_in_prerequisite_state',
				  DETAIL = format('phsync.database is set to "%s".', target_db),
				  HINT = format('Create the extension in database "%s", or set phsync.database = ''%s'' in postgresql.conf and restart the server.',
								target_db, current_database());
	END IF;
END
$phsync$;

CREATE SCHEMA phsync;
COMMENT ON SCHEMA phsync IS 'phsync run history';

CREATE TABLE phsync.runs (
	id				bigserial PRIMARY KEY,
	trigger			text NOT NULL CHECK (trigger IN ('schedule', 'manual')),
	started_at		timestamptz NOT NULL DEFAULT pg_catalog.now(),
	finished_at		timestamptz,
	status			text NOT NULL DEFAULT 'running'
					CHECK (status IN ('running', 'succeeded', 'failed')),
	target			text NOT NULL,
	window_from		timestamptz,
	window_until	timestamptz,
	pages			integer NOT NULL DEFAULT 0,
	rows_received	bigint NOT NULL DEFAULT 0,
	rows_inserted	bigint NOT NULL DEFAULT 0,
	error			text,
	requests		integer NOT NULL DEFAULT 0,
	retries			integer NOT NULL DEFAULT 0,
	rows_rejected	bigint NOT NULL DEFAULT 0
);
CREATE INDEX runs_trigger_started_at_idx ON phsync.runs (trigger, started_at);

COMMENT ON TABLE phsync.runs IS 'one row per phsync run, written by the phsync background worker';
COMMENT ON COLUMN phsync.runs.trigger IS 'schedule (phsync.run_at/phsync.interval) or manual (phsync_run_now())';
COMMENT ON COLUMN phsync.runs.status IS 'running, succeeded or failed';
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
COMMENT ON COLUMN phsync.rejects.columns IS 'the query''s column names, in the order of raw_row';
COMMENT ON COLUMN phsync.rejects.raw_row IS 'the row as PostHog sent it: a JSON array in the order of the query''s columns';
COMMENT ON COLUMN phsync.rejects.error IS 'why the target refused it';

-- run history is user data: keep it in pg_dump output
SELECT pg_catalog.pg_extension_config_dump('phsync.runs', '');
SELECT pg_catalog.pg_extension_config_dump('phsync.runs_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('phsync.rejects', '');
SELECT pg_catalog.pg_extension_config_dump('phsync.rejects_id_seq', '');

CREATE FUNCTION @extschema@.phsync_run_now()
RETURNS phsync.runs
AS 'MODULE_PATHNAME', 'phsync_run_now'
LANGUAGE C VOLATILE STRICT
SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION @extschema@.phsync_run_now() IS
	'asks the phsync worker to sync now, waits for the run and returns its phsync.runs row';

REVOKE ALL ON FUNCTION @extschema@.phsync_run_now() FROM PUBLIC;

CREATE FUNCTION @extschema@.phsync_worker_state(
	OUT target text, OUT watermark timestamptz, OUT next_run timestamptz,
	OUT running boolean, OUT run_id bigint, OUT pages integer, OUT rows_received bigint)
AS 'MODULE_PATHNAME', 'phsync_worker_state'
LANGUAGE C VOLATILE STRICT
SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION @extschema@.phsync_worker_state() IS
	'the target''s watermark and the phsync worker''s state (next run, run in progress), for phsync.status';

REVOKE ALL ON FUNCTION @extschema@.phsync_worker_state() FROM PUBLIC;

CREATE VIEW phsync.status AS
SELECT 'default'::text AS sync,
	   true AS enabled,
	   s.target,
	   r.id AS last_run_id,
	   r.status AS last_status,
	   r.started_at AS last_started_at,
	   r.finished_at AS last_finished_at,
	   r.rows_inserted AS last_rows_inserted,
	   r.error AS last_error,
	   s.watermark,
	   pg_catalog.now() - s.watermark AS lag,
	   s.next_run,
	   s.running,
	   s.run_id,
	   s.pages,
	   s.rows_received
FROM @extschema@.phsync_worker_state() s
LEFT JOIN LATERAL (SELECT * FROM phsync.runs WHERE status OPERATOR(pg_catalog.<>) 'running'
				   ORDER BY id DESC LIMIT 1) r ON true;

COMMENT ON VIEW phsync.status IS
	'one row per sync: last finished run, watermark and lag, next scheduled run, run in progress';

CREATE FUNCTION @extschema@.phsync_doctor(
	OUT "check" text, OUT status text, OUT detail text, OUT hint text)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'phsync_doctor'
LANGUAGE C VOLATILE STRICT
SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION @extschema@.phsync_doctor() IS
	'checks phsync''s settings, worker, network, TLS, API key, target and query, one row each';

REVOKE ALL ON FUNCTION @extschema@.phsync_doctor() FROM PUBLIC;
