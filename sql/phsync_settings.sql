-- Settings: defaults, units, and invalid values refused when set.
SELECT name, setting, unit, context, boot_val, min_val, max_val
FROM pg_settings WHERE name LIKE 'phsync.%' AND name NOT IN ('phsync.host', 'phsync.run_at', 'phsync.interval')
ORDER BY name;

SHOW phsync.lookback;
SHOW phsync.request_timeout;

-- invalid values are rejected with PostgreSQL's usual messages
ALTER SYSTEM SET phsync.page_size = 0;
ALTER SYSTEM SET phsync.page_size = 50001;
-- (the range is in pg_settings above; 17 added units to this message)
\set VERBOSITY sqlstate
ALTER SYSTEM SET phsync.interval = '30s';
ALTER SYSTEM SET phsync.lookback = '-1';
\set VERBOSITY default
ALTER SYSTEM SET phsync.lookback = '10 parsecs';
ALTER SYSTEM SET phsync.run_at = '25:00';
ALTER SYSTEM SET phsync.run_at = 'noon';
ALTER SYSTEM SET phsync.project_id = '12a';
ALTER SYSTEM SET phsync.host = 'ftp://eu.posthog.com';
ALTER SYSTEM SET phsync.host = 'http://eu.posthog.com';
ALTER SYSTEM SET phsync.host = 'https://user@eu.posthog.com';
ALTER SYSTEM SET phsync.initial_since = 'last tuesday';
ALTER SYSTEM SET phsync.initial_since = '2026-13-01';
ALTER SYSTEM SET phsync.target_table = 'a.b.c';
ALTER SYSTEM SET phsync.cursor_column = '';

-- these are accepted
ALTER SYSTEM SET phsync.host = 'http://127.0.0.1:8000';
ALTER SYSTEM SET phsync.host = 'https://eu.posthog.com/';
ALTER SYSTEM SET phsync.run_at = '23:59:30';
ALTER SYSTEM SET phsync.initial_since = '2026-01-01T00:00:00.5+01:00';
ALTER SYSTEM SET phsync.initial_since = '2026-01-01';
ALTER SYSTEM SET phsync.interval = '1min';
ALTER SYSTEM RESET ALL;

-- settings are reloadable, not per session
SET phsync.page_size = 10;
SET phsync.database = 'other';

-- a sync's own schedule: five cron fields or an interval (phsync.timezone is UTC here)
SELECT s, phsync_next_run('2026-12-07 10:17:30+00', s) AT TIME ZONE 'UTC' AS next
FROM unnest(ARRAY['*/15 * * * *', '30 3 * * *', '0 9 * * mon-fri', '0 0 1 * *',
                  '0 12 13 * 5', '@hourly', '@weekly', '15 minutes', '1 day', '90 seconds']) s;
-- Sunday is 0 or 7; a schedule of NULL is the global one (phsync.run_at 02:00, daily)
SELECT phsync_next_run('2026-12-07 10:00+00', '0 6 * * 7') = phsync_next_run('2026-12-07 10:00+00', '0 6 * * 0') AS sunday,
       phsync_next_run('2026-12-07 10:00+00', NULL) = phsync_next_run('2026-12-07 10:00+00') AS global;
SELECT phsync_next_run(now(), '61 * * * *');
SELECT phsync_next_run(now(), '* * *');
SELECT phsync_next_run(now(), '1 month');
SELECT phsync_next_run(now(), '0 0 30 2 *');
