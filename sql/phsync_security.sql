-- The API key is for superusers only; the functions are not for PUBLIC;
-- the extension lives in phsync.database only.
-- (CONTEXT lines differ between majors: 18 names the script and line)
\set SHOW_CONTEXT never
SHOW phsync.api_key;

CREATE ROLE phsync_reader LOGIN;
SET ROLE phsync_reader;
-- refused with 42501 (insufficient_privilege); the wording changed in 16
\set VERBOSITY sqlstate
SHOW phsync.api_key;
SELECT current_setting('phsync.api_key');
\set VERBOSITY default
SELECT count(*) FROM pg_settings WHERE name = 'phsync.api_key';
SELECT phsync_run_now();
SELECT * FROM phsync_doctor();
SELECT * FROM phsync_sync_state();
SELECT phsync_add_sync('x', 'public.t');
SELECT phsync_alter_sync('x', enabled => false);
SELECT phsync_drop_sync('x');
SELECT phsync_backfill('default', now() - interval '1 day', now());
SELECT * FROM phsync_verify('default', now() - interval '1 day', now());
SELECT count(*) FROM phsync.syncs;
SELECT count(*) FROM phsync.runs;
SELECT count(*) FROM phsync.status;
RESET ROLE;

-- granting EXECUTE is enough to run a sync (the function reads phsync.runs
-- with its owner's rights)
SELECT has_function_privilege('phsync_reader', 'phsync_run_now(text)', 'EXECUTE');
GRANT EXECUTE ON FUNCTION phsync_run_now(text) TO phsync_reader;
SELECT has_function_privilege('phsync_reader', 'phsync_run_now(text)', 'EXECUTE');
REVOKE EXECUTE ON FUNCTION phsync_run_now(text) FROM phsync_reader;
DROP ROLE phsync_reader;

-- CREATE EXTENSION outside phsync.database works, with a WARNING (a restore
-- into a copy); nothing runs there
CREATE DATABASE phsync_elsewhere;
\c phsync_elsewhere
CREATE EXTENSION phsync;
SELECT count(*) FROM phsync_run_now();
\c contrib_regression
DROP DATABASE phsync_elsewhere;
