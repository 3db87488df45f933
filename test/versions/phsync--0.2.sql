/* phsync--0.2.sql: install script for phsync 0.2 */

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
	trigger			text NOT NULL CHECK (trigger IN ('schedule', 'manual', 'backfill', 'verify')),
	started_at		timestamptz NOT NULL DEFAULT pg_catalog.now(),
	finished_at		timestamptz,
	status			text NOT NULL DEFAULT 'running'
					CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
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
	verify_mismatches integer
);
CREATE INDEX runs_trigger_started_at_idx ON phsync.runs (trigger, started_at);
CREATE INDEX runs_sync_id_idx ON phsync.runs (sync, id);

COMMENT ON TABLE phsync.runs IS 'one row per phsync run, written by the phsync background worker';
COMMENT ON COLUMN phsync.runs.trigger IS 'schedule (phsync.run_at/phsync.interval), manual (phsync_run_now()), backfill (phsync_backfill()) or verify (phsync_verify(), or the scheduled check of the previous day)';
COMMENT ON COLUMN phsync.runs.status IS 'queued (a backfill waiting for the worker), running, succeeded or failed';
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
COMMENT ON COLUMN phsync.runs.rows_updated IS 'existing rows rewritten because their values changed (conflict => ''update'')';
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
COMMENT ON COLUMN phsync.rejects.columns IS 'the query''s column names, in the order of raw_row';
COMMENT ON COLUMN phsync.rejects.raw_row IS 'the row as PostHog sent it: a JSON array in the order of the query''s columns';
COMMENT ON COLUMN phsync.rejects.error IS 'why the target refused it';

-- run history is user data: keep it in pg_dump output
SELECT pg_catalog.pg_extension_config_dump('phsync.runs', '');
SELECT pg_catalog.pg_extension_config_dump('phsync.runs_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('phsync.rejects', '');
SELECT pg_catalog.pg_extension_config_dump('phsync.rejects_id_seq', '');

CREATE FUNCTION @extschema@.phsync_doctor(
	OUT "check" text, OUT status text, OUT detail text, OUT hint text)
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
	preset			text CHECK (preset IN ('events', 'persons')),
	query			text,
	cursor_column	text NOT NULL,
	conflict		text NOT NULL DEFAULT 'nothing' CHECK (conflict IN ('nothing', 'update')),
	lookback		interval,
	enabled			boolean NOT NULL DEFAULT true,
	verify			boolean NOT NULL DEFAULT false,
	created_at		timestamptz NOT NULL DEFAULT pg_catalog.now(),
	CHECK ((preset IS NULL) OPERATOR(pg_catalog.<>) (query IS NULL))
);

COMMENT ON TABLE phsync.syncs IS 'syncs added with phsync_add_sync(); the sync named default comes from the phsync.* settings';
COMMENT ON COLUMN phsync.syncs.target IS 'target table, schema-qualified';
COMMENT ON COLUMN phsync.syncs.preset IS 'built-in query: events or persons (NULL with a custom query)';
COMMENT ON COLUMN phsync.syncs.query IS 'custom HogQL query (NULL with a preset)';
COMMENT ON COLUMN phsync.syncs.cursor_column IS 'timestamp or date column whose max() is the watermark';
COMMENT ON COLUMN phsync.syncs.conflict IS 'nothing: skip rows already there; update: rewrite them when their values changed';
COMMENT ON COLUMN phsync.syncs.lookback IS 'how far before the watermark each run starts reading; NULL: re-read everything every run';
COMMENT ON COLUMN phsync.syncs.verify IS 'scheduled runs also verify the previous day (phsync_verify) and record it in phsync.runs';

CREATE TABLE phsync.verifications (
	run_id			bigint NOT NULL REFERENCES phsync.runs (id) ON DELETE CASCADE,
	bucket			timestamptz NOT NULL,
	bucket_until	timestamptz NOT NULL,
	posthog_count	bigint NOT NULL,
	local_count		bigint NOT NULL,
	status			text NOT NULL CHECK (status IN ('ok', 'missing', 'extra', 'repaired')),
	PRIMARY KEY (run_id, bucket)
);

COMMENT ON TABLE phsync.verifications IS 'per-bucket row counts compared by verify runs';
COMMENT ON COLUMN phsync.verifications.status IS 'ok, missing (fewer rows here), extra (more rows here), repaired (missing rows fetched again)';

-- sync definitions and verification results are user data: keep them in pg_dump output
SELECT pg_catalog.pg_extension_config_dump('phsync.syncs', '');
SELECT pg_catalog.pg_extension_config_dump('phsync.verifications', '');

/*
 * The table a target name means to phsync: schema-qualified, or in public.
 * NULL when it does not exist.
 */
CREATE FUNCTION phsync.target_regclass(target text)
RETURNS regclass
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	parts text[] := parse_ident(target);
BEGIN
	IF array_length(parts, 1) = 1 THEN
		parts := ARRAY['public'] || parts;
	ELSIF array_length(parts, 1) <> 2 THEN
		RAISE EXCEPTION 'invalid target table name "%"', target
			USING ERRCODE = 'invalid_name',
				  HINT = 'Give a table name, optionally schema-qualified.';
	END IF;
	RETURN to_regclass(format('%I.%I', parts[1], parts[2]));
END
$$;

COMMENT ON FUNCTION phsync.target_regclass(text) IS
	'the table a target name means to phsync (unqualified names are in public), NULL if it does not exist';

/*
 * Check a sync definition against its target; returns the target's
 * schema-qualified name.  Errors say what is wrong and how to fix it.
 */
CREATE FUNCTION phsync.check_sync(name text, target text, preset text, query text,
								  cursor_column text, conflict text)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	rel regclass;
	kind "char";
	cursor_type regtype;
	missing text;
BEGIN
	IF name IS NULL OR name !~ '^[a-z_][a-z0-9_]{0,62}$' THEN
		RAISE EXCEPTION 'invalid sync name "%"', name
			USING ERRCODE = 'invalid_name',
				  HINT = 'Use lower-case letters, digits and underscores, starting with a letter.';
	END IF;
	IF name = 'default' THEN
		RAISE EXCEPTION 'the sync named "default" is configured by the phsync.* settings in postgresql.conf'
			USING ERRCODE = 'invalid_name',
				  HINT = 'Choose another name.';
	END IF;
	IF (preset IS NULL) = (query IS NULL) THEN
		RAISE EXCEPTION 'a sync needs either a preset or a query, not both'
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'Pass preset => ''events'' or ''persons'', or query => a HogQL query.';
	END IF;
	IF preset IS NOT NULL AND preset NOT IN ('events', 'persons') THEN
		RAISE EXCEPTION 'unknown preset "%"', preset
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'The presets are events and persons; anything else needs query => a HogQL query.';
	END IF;
	IF query IS NOT NULL AND btrim(query, E' \t\r\n;') = '' THEN
		RAISE EXCEPTION 'the query of sync "%" is empty', name
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
	IF conflict IS NULL OR conflict NOT IN ('nothing', 'update') THEN
		RAISE EXCEPTION 'invalid conflict mode "%"', conflict
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'Use nothing (skip rows already there) or update (rewrite rows whose values changed).';
	END IF;

	rel := phsync.target_regclass(target);
	IF rel IS NULL THEN
		RAISE EXCEPTION 'target table % does not exist', target
			USING ERRCODE = 'undefined_table',
				  HINT = format('Create it first, with a primary key or unique constraint%s.',
								CASE WHEN preset IS NOT NULL
									 THEN format(', for example: SELECT phsync_create_table(%L, %L)', preset, target)
									 ELSE '' END);
	END IF;
	SELECT relkind INTO kind FROM pg_class WHERE oid = rel;
	IF kind NOT IN ('r', 'p') THEN
		RAISE EXCEPTION 'target % is not a table', rel
			USING ERRCODE = 'wrong_object_type';
	END IF;
	IF (SELECT relnamespace FROM pg_class WHERE oid = rel) IN
	   ('pg_catalog'::regnamespace, 'information_schema'::regnamespace, 'phsync'::regnamespace) THEN
		RAISE EXCEPTION 'target % is a system or phsync table', rel
			USING ERRCODE = 'insufficient_privilege';
	END IF;
	-- the worker writes with its own rights: the caller must have them too
	-- (has_table_privilege() with a list is true when any one is held: ask each)
	IF NOT (has_table_privilege(session_user, rel, 'SELECT') AND has_table_privilege(session_user, rel, 'INSERT')
			AND (conflict <> 'update' OR has_table_privilege(session_user, rel, 'UPDATE'))) THEN
		RAISE EXCEPTION 'permission denied for table %', rel
			USING ERRCODE = 'insufficient_privilege',
				  DETAIL = format('The sync would write into it; %s needs %s on it.', session_user,
								  CASE conflict WHEN 'update' THEN 'SELECT, INSERT and UPDATE' ELSE 'SELECT and INSERT' END);
	END IF;

	SELECT atttypid INTO cursor_type FROM pg_attribute
	 WHERE attrelid = rel AND attname = cursor_column AND attnum > 0 AND NOT attisdropped;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'cursor column "%" does not exist in table %', cursor_column, rel
			USING ERRCODE = 'undefined_column',
				  HINT = 'The cursor is the timestamp or date column whose max() is the watermark, for example created_at.';
	END IF;
	IF cursor_type NOT IN ('timestamptz'::regtype, 'timestamp'::regtype, 'date'::regtype) THEN
		RAISE EXCEPTION 'cursor column "%" of table % must be of type timestamptz, timestamp or date, not %',
			cursor_column, rel, cursor_type
			USING ERRCODE = 'datatype_mismatch';
	END IF;

	IF NOT EXISTS (SELECT 1 FROM pg_index
				   WHERE indrelid = rel AND indisunique AND indimmediate AND indisvalid AND indisready
				     AND indpred IS NULL AND indexprs IS NULL) THEN
		RAISE EXCEPTION 'target table % has no primary key or unique constraint', rel
			USING ERRCODE = 'invalid_table_definition',
				  DETAIL = 'phsync skips or updates rows it already has with ON CONFLICT, which needs a unique key.',
				  HINT = format('Add one on the columns that identify a row, for example: ALTER TABLE %s ADD PRIMARY KEY (%s);',
								rel, CASE preset WHEN 'persons' THEN 'id' ELSE 'uuid' END);
	END IF;

	SELECT string_agg(quote_ident(c), ', ') INTO missing
	  FROM unnest(CASE preset
				  WHEN 'events' THEN ARRAY['uuid', 'event', 'timestamp', 'distinct_id', 'person_id',
										   'properties', 'elements_chain', 'created_at']
				  WHEN 'persons' THEN ARRAY['id', 'created_at', 'is_identified', 'properties']
				  ELSE ARRAY[]::text[] END) AS c
	 WHERE NOT EXISTS (SELECT 1 FROM pg_attribute
					   WHERE attrelid = rel AND attname = c AND attnum > 0 AND NOT attisdropped);
	IF missing IS NOT NULL THEN
		RAISE EXCEPTION 'table % lacks column(s) % of the % preset', rel, missing, preset
			USING ERRCODE = 'undefined_column',
				  HINT = format('phsync_create_table(%L, ...) creates a table with every column of the preset.', preset);
	END IF;

	RETURN rel::text;
END
$$;

COMMENT ON FUNCTION phsync.check_sync(text, text, text, text, text, text) IS
	'checks a sync definition against its target table; returns the schema-qualified target';

CREATE FUNCTION @extschema@.phsync_add_sync(
	name text, target text,
	query text DEFAULT NULL, preset text DEFAULT NULL, "cursor" text DEFAULT NULL,
	conflict text DEFAULT NULL, lookback interval DEFAULT NULL,
	enabled boolean DEFAULT true, verify boolean DEFAULT NULL)
RETURNS phsync.syncs
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	p text := CASE WHEN query IS NULL THEN coalesce(preset, 'events') ELSE preset END;
	q text := nullif(rtrim(query, E' \t\r\n;'), '');
	result phsync.syncs;
BEGIN
	IF query IS NOT NULL AND q IS NULL THEN
		q := query;				-- let check_sync say it is empty
	END IF;
	IF EXISTS (SELECT 1 FROM phsync.syncs s WHERE s.name = phsync_add_sync.name) THEN
		RAISE EXCEPTION 'sync "%" already exists', name
			USING ERRCODE = 'duplicate_object',
				  HINT = 'Use phsync_alter_sync() to change it.';
	END IF;
	INSERT INTO phsync.syncs (name, target, preset, query, cursor_column, conflict, lookback, enabled, verify)
	VALUES (name,
			phsync.check_sync(name, target, p, q, coalesce("cursor", 'created_at'),
							  coalesce(conflict, CASE p WHEN 'persons' THEN 'update' ELSE 'nothing' END)),
			p, q, coalesce("cursor", 'created_at'),
			coalesce(conflict, CASE p WHEN 'persons' THEN 'update' ELSE 'nothing' END),
			CASE WHEN lookback IS NOT NULL THEN lookback
				 WHEN p = 'persons' THEN NULL
				 ELSE interval '10 minutes' END,
			enabled, coalesce(verify, p IS NOT DISTINCT FROM 'events'))
	RETURNING * INTO result;
	RETURN result;
END
$$;

COMMENT ON FUNCTION @extschema@.phsync_add_sync(text, text, text, text, text, text, interval, boolean, boolean) IS
	'adds a sync (a preset or a HogQL query into a target table); scheduled runs run every enabled sync';

CREATE FUNCTION @extschema@.phsync_alter_sync(
	name text, target text DEFAULT NULL,
	query text DEFAULT NULL, preset text DEFAULT NULL, "cursor" text DEFAULT NULL,
	conflict text DEFAULT NULL, lookback interval DEFAULT NULL,
	enabled boolean DEFAULT NULL, verify boolean DEFAULT NULL,
	reread_all boolean DEFAULT false)
RETURNS phsync.syncs
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	s phsync.syncs;
BEGIN
	IF name = 'default' THEN
		RAISE EXCEPTION 'the sync named "default" is configured by the phsync.* settings in postgresql.conf'
			USING ERRCODE = 'object_not_in_prerequisite_state',
				  HINT = 'Change the settings and reload; phsync.target_table = '''' turns the default sync off.';
	END IF;
	SELECT * INTO s FROM phsync.syncs WHERE syncs.name = phsync_alter_sync.name FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'sync "%" does not exist', name
			USING ERRCODE = 'undefined_object';
	END IF;
	IF query IS NOT NULL THEN
		s.query := coalesce(nullif(rtrim(query, E' \t\r\n;'), ''), query);
		s.preset := NULL;
	ELSIF preset IS NOT NULL THEN
		s.preset := preset;
		s.query := NULL;
	END IF;
	s.target := coalesce(target, s.target);
	s.cursor_column := coalesce("cursor", s.cursor_column);
	s.conflict := coalesce(conflict, s.conflict);
	IF reread_all THEN
		s.lookback := NULL;
	ELSIF lookback IS NOT NULL THEN
		s.lookback := lookback;
	END IF;
	s.enabled := coalesce(enabled, s.enabled);
	s.verify := coalesce(verify, s.verify);
	s.target := phsync.check_sync(s.name, s.target, s.preset, s.query, s.cursor_column, s.conflict);
	UPDATE phsync.syncs SET target = s.target, preset = s.preset, query = s.query,
		   cursor_column = s.cursor_column, conflict = s.conflict, lookback = s.lookback,
		   enabled = s.enabled, verify = s.verify
	 WHERE syncs.name = s.name
	RETURNING * INTO s;
	RETURN s;
END
$$;

COMMENT ON FUNCTION @extschema@.phsync_alter_sync(text, text, text, text, text, text, interval, boolean, boolean, boolean) IS
	'changes a sync; arguments left NULL keep their value (reread_all => true sets lookback to NULL: re-read everything)';

CREATE FUNCTION @extschema@.phsync_drop_sync(name text)
RETURNS void
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF name = 'default' THEN
		RAISE EXCEPTION 'the sync named "default" is configured by the phsync.* settings in postgresql.conf'
			USING ERRCODE = 'object_not_in_prerequisite_state',
				  HINT = 'Set phsync.target_table = '''' and reload to turn it off.';
	END IF;
	DELETE FROM phsync.syncs WHERE syncs.name = phsync_drop_sync.name;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'sync "%" does not exist', name
			USING ERRCODE = 'undefined_object';
	END IF;
END
$$;

COMMENT ON FUNCTION @extschema@.phsync_drop_sync(text) IS
	'removes a sync; its target table and its run history stay';

/*
 * Not SECURITY DEFINER: the table belongs to whoever creates it (the
 * worker's role, when the worker creates the default sync's table).
 */
CREATE FUNCTION @extschema@.phsync_create_table(preset text, table_name text)
RETURNS regclass
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	parts text[] := parse_ident(table_name);
	qualified text;
BEGIN
	IF array_length(parts, 1) = 1 THEN
		parts := ARRAY['public'] || parts;
	ELSIF array_length(parts, 1) <> 2 THEN
		RAISE EXCEPTION 'invalid table name "%"', table_name
			USING ERRCODE = 'invalid_name';
	END IF;
	qualified := format('%I.%I', parts[1], parts[2]);
	IF preset = 'events' THEN
		EXECUTE format('CREATE TABLE %s (
	uuid uuid PRIMARY KEY,
	event text,
	"timestamp" timestamptz,
	distinct_id text,
	person_id uuid,
	properties jsonb,
	elements_chain text,
	created_at timestamptz NOT NULL
)', qualified);
	ELSIF preset = 'persons' THEN
		EXECUTE format('CREATE TABLE %s (
	id uuid PRIMARY KEY,
	created_at timestamptz NOT NULL,
	is_identified boolean,
	properties jsonb
)', qualified);
	ELSE
		RAISE EXCEPTION 'unknown preset "%"', preset
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'The presets are events and persons.';
	END IF;
	EXECUTE format('CREATE INDEX ON %s (created_at)', qualified);
	RETURN qualified::regclass;
END
$$;

COMMENT ON FUNCTION @extschema@.phsync_create_table(text, text) IS
	'creates a target table for a preset (events or persons) with its unique key and cursor index';

CREATE FUNCTION @extschema@.phsync_run_now(sync text DEFAULT NULL)
RETURNS SETOF phsync.runs
AS 'MODULE_PATHNAME', 'phsync_run_now'
LANGUAGE C VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION @extschema@.phsync_run_now(text) IS
	'asks the phsync worker to run every enabled sync (or the one named) now, waits and returns their phsync.runs rows';

REVOKE ALL ON FUNCTION @extschema@.phsync_run_now(text) FROM PUBLIC;

CREATE FUNCTION @extschema@.phsync_backfill(sync text, "from" timestamptz, "to" timestamptz)
RETURNS phsync.runs
AS 'MODULE_PATHNAME', 'phsync_backfill'
LANGUAGE C VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION @extschema@.phsync_backfill(text, timestamptz, timestamptz) IS
	'queues a load of [from, to) for a sync; resumes from the target''s max(cursor) inside the range';

REVOKE ALL ON FUNCTION @extschema@.phsync_backfill(text, timestamptz, timestamptz) FROM PUBLIC;

CREATE FUNCTION @extschema@.phsync_verify(sync text, "from" timestamptz, "to" timestamptz,
										  bucket interval DEFAULT '1 day', repair boolean DEFAULT false)
RETURNS TABLE (bucket timestamptz, posthog_count bigint, local_count bigint, status text)
AS 'MODULE_PATHNAME', 'phsync_verify'
LANGUAGE C VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

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
	OUT rows_received bigint)
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
	   v.verify_mismatches AS last_verify_mismatches
FROM @extschema@.phsync_sync_state() s
LEFT JOIN LATERAL (SELECT * FROM phsync.runs
				   WHERE runs.sync OPERATOR(pg_catalog.=) s.sync
					 AND runs.status IN ('succeeded', 'failed')
					 AND runs.trigger OPERATOR(pg_catalog.<>) 'verify'
				   ORDER BY id DESC LIMIT 1) r ON true
LEFT JOIN LATERAL (SELECT runs.verify_mismatches FROM phsync.runs
				   WHERE runs.sync OPERATOR(pg_catalog.=) s.sync
					 AND runs.status OPERATOR(pg_catalog.=) 'succeeded'
					 AND runs.trigger OPERATOR(pg_catalog.=) 'verify'
				   ORDER BY id DESC LIMIT 1) v ON true;

COMMENT ON VIEW phsync.status IS
	'one row per sync: last finished run, watermark and lag, next scheduled run, run in progress, last verification';

REVOKE ALL ON FUNCTION @extschema@.phsync_add_sync(text, text, text, text, text, text, interval, boolean, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.phsync_alter_sync(text, text, text, text, text, text, interval, boolean, boolean, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.phsync_drop_sync(text) FROM PUBLIC;

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
