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
