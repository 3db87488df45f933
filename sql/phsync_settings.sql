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
