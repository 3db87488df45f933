/* phsync--0.3--0.4.sql: update phsync from 0.3 to 0.4 */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION phsync UPDATE TO '0.4'" to load this file. \quit

-- ---------- owners by OID: a sync never passes to a new role of the same name ----------

-- a sync whose owner was dropped (by name, in 0.3) stays, disabled and ownerless
UPDATE phsync.syncs SET enabled = false
WHERE pg_catalog.to_regrole(pg_catalog.quote_ident(owner)) IS NULL;
ALTER TABLE phsync.syncs ALTER COLUMN owner DROP DEFAULT;
ALTER TABLE phsync.syncs ALTER COLUMN owner TYPE pg_catalog.regrole
	USING COALESCE(pg_catalog.to_regrole(pg_catalog.quote_ident(owner)), 0::pg_catalog.oid::pg_catalog.regrole);
ALTER TABLE phsync.syncs ALTER COLUMN owner SET DEFAULT pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER));
COMMENT ON COLUMN phsync.syncs.owner IS 'the role that added it, by OID: runs act on the target as this role (a superuser''s sync into another role''s table: as that table''s owner)';

-- ---------- phsync_run_now() runs the caller's own syncs ----------

ALTER FUNCTION @extschema@.phsync_run_now(text) SECURITY INVOKER;
COMMENT ON FUNCTION @extschema@.phsync_run_now(text) IS
	'asks the phsync worker to run every enabled sync of the caller (or the one named, which the caller must own) now, waits and returns their phsync.runs rows';

-- ---------- a schedule per sync; the default sync's switch; health (0.4) ----------

ALTER TABLE phsync.syncs ADD COLUMN schedule text;
ALTER TABLE phsync.syncs DROP CONSTRAINT syncs_preset_check;
ALTER TABLE phsync.syncs ADD CONSTRAINT syncs_preset_check
	CHECK (preset IN ('events', 'persons', 'groups', 'sessions', 'cohorts',
					  'feature_flags', 'experiments', 'surveys', 'cohort_people',
					  'person_distinct_ids'));
COMMENT ON COLUMN phsync.syncs.preset IS 'built-in query: events, persons, groups, sessions, cohorts, feature_flags, experiments, surveys, cohort_people or person_distinct_ids (NULL with a custom query)';
ALTER TABLE phsync.syncs ADD COLUMN deletions text NOT NULL DEFAULT 'keep' CHECK (deletions IN ('keep', 'mirror'));
COMMENT ON COLUMN phsync.syncs.deletions IS 'keep, or mirror: a repair deletes the rows PostHog no longer has in the verified range, and a preset read whole those PostHog no longer lists';
COMMENT ON COLUMN phsync.syncs.schedule IS 'when scheduled runs run it: five cron fields or an interval, in phsync.timezone; NULL: phsync.run_at and phsync.interval';

/*
 * phsync_add_sync() and phsync_alter_sync() take schedule, and
 * phsync_sync_state() returns more, so they are made again (and the view
 * over the last): the grants made on the old ones are made on the new.
 */
SELECT pg_catalog.set_config('phsync_upgrade.grants', COALESCE(pg_catalog.string_agg(g.stmt, ' '), ''), true)
FROM (SELECT pg_catalog.format('GRANT %s ON %s TO %s;', a.privilege_type, o.new_name,
							   CASE WHEN a.grantee OPERATOR(pg_catalog.=) 0 THEN 'PUBLIC'
									ELSE a.grantee::pg_catalog.regrole::pg_catalog.text END) AS stmt
	  FROM (SELECT p.proacl AS acl, p.proowner AS owner,
				   'FUNCTION @extschema@.phsync_add_sync(text, text, text, text, text, text, interval, boolean, boolean, text, text[], text, text)' AS new_name
			FROM pg_catalog.pg_proc p
			WHERE p.oid OPERATOR(pg_catalog.=) '@extschema@.phsync_add_sync(text, text, text, text, text, text, interval, boolean, boolean, text, text[])'::pg_catalog.regprocedure
			UNION ALL
			SELECT p.proacl, p.proowner,
				   'FUNCTION @extschema@.phsync_alter_sync(text, text, text, text, text, text, interval, boolean, boolean, boolean, text, text[], text, text)'
			FROM pg_catalog.pg_proc p
			WHERE p.oid OPERATOR(pg_catalog.=) '@extschema@.phsync_alter_sync(text, text, text, text, text, text, interval, boolean, boolean, boolean, text, text[])'::pg_catalog.regprocedure
			UNION ALL
			SELECT p.proacl, p.proowner, 'FUNCTION @extschema@.phsync_sync_state()'
			FROM pg_catalog.pg_proc p
			WHERE p.oid OPERATOR(pg_catalog.=) '@extschema@.phsync_sync_state()'::pg_catalog.regprocedure
			UNION ALL
			SELECT c.relacl, c.relowner, 'phsync.status'
			FROM pg_catalog.pg_class c
			WHERE c.oid OPERATOR(pg_catalog.=) 'phsync.status'::pg_catalog.regclass) o,
		   pg_catalog.aclexplode(o.acl) a
	  WHERE a.grantee OPERATOR(pg_catalog.<>) o.owner) g;

DROP FUNCTION @extschema@.phsync_add_sync(text, text, text, text, text, text, interval, boolean, boolean, text, text[]);
DROP FUNCTION @extschema@.phsync_alter_sync(text, text, text, text, text, text, interval, boolean, boolean, boolean, text, text[]);
DROP VIEW phsync.status;
DROP FUNCTION @extschema@.phsync_sync_state();

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

REVOKE ALL ON FUNCTION @extschema@.phsync_add_sync(text, text, text, text, text, text, interval, boolean, boolean, text, text[], text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.phsync_alter_sync(text, text, text, text, text, text, interval, boolean, boolean, boolean, text, text[], text, text) FROM PUBLIC;

CREATE FUNCTION @extschema@.phsync_run_now(sync text, wait boolean)
RETURNS SETOF phsync.runs
AS 'MODULE_PATHNAME', 'phsync_run_now'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION @extschema@.phsync_run_now(text, boolean) IS
	'as phsync_run_now(sync); with wait => false, queues the runs (status queued) and returns them at once';

REVOKE ALL ON FUNCTION @extschema@.phsync_run_now(text, boolean) FROM PUBLIC;

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

DO $phsync$
DECLARE
	grants text := pg_catalog.current_setting('phsync_upgrade.grants');
BEGIN
	IF grants OPERATOR(pg_catalog.<>) '' THEN
		EXECUTE grants;
	END IF;
END
$phsync$;

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

-- ---------- exact verification (0.4) ----------

-- a bucket with as many rows as PostHog's and other keys is 'different'
ALTER TABLE phsync.verifications DROP CONSTRAINT verifications_status_check;
ALTER TABLE phsync.verifications ADD CONSTRAINT verifications_status_check
	CHECK (status IN ('ok', 'missing', 'extra', 'different', 'repaired'));
COMMENT ON COLUMN phsync.verifications.status IS 'ok, missing (fewer rows here), extra (more rows here), different (as many rows, other keys), repaired (fetched again, and equal now)';
ALTER TABLE phsync.verifications ADD COLUMN posthog_checksum bigint, ADD COLUMN local_checksum bigint;
COMMENT ON COLUMN phsync.verifications.posthog_checksum IS 'sum of the hashes of PostHog''s distinct keys in the bucket (see docs/syncs.md#verifying-completeness); NULL: counts only';
COMMENT ON COLUMN phsync.verifications.local_checksum IS 'the same sum over the target''s keys';

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
