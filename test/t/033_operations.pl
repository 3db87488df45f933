# Operating phsync as a DBA (issue 22): a schedule per sync, pause with
# phsync.enabled, the default sync paused and rescheduled from SQL, manual
# runs queued without waiting, health in phsync.status, NOTIFY phsync at
# the end of every run, owners who see only their own syncs (row-level
# security and the phsync_user group role), and a worker role without its
# grants diagnosed instead of restarting.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes;
use FindBin;
use lib "$FindBin::Bin/../perl";
use PhsyncTest;

my $certs = make_certs();
my $fake = start_fake(certs => $certs);
my $node = phsync_node('ops', $fake, $certs, 'phsync.initial_since' => hours_ago(6));
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');
fake_post($fake, '/generate', { count => 30, seed => 7, created_from => iso_ago($node, '2 hours'), step_ms => 60_000 });

sub psql_err
{
	my ($sql, $role) = @_;
	my ($ret, $out, $err) = $node->psql('postgres', ($role ? "SET ROLE $role;\n" : '') . $sql);
	return $ret == 0 ? "OK: $out" : $err;
}
my $scheduled = sub {
	return $node->safe_psql('postgres', "SELECT count(*) FROM phsync.runs WHERE trigger = 'schedule' AND sync = '$_[0]'");
};

# ---------- 1. a schedule per sync ----------
$node->safe_psql('postgres', q{
	SELECT phsync_create_table('events', 'fast_events');
	SELECT name FROM phsync_add_sync('fast', 'fast_events', preset => 'events', schedule => '2 seconds');});
like(psql_err("SELECT phsync_add_sync('bad', 'fast_events', schedule => '61 * * * *')"),
	qr/ERROR:  invalid schedule "61 \* \* \* \*"\nDETAIL:  The minute field "61" is outside 0-59\.\nHINT:  Use five cron fields/,
	'a wrong cron expression is refused, saying which field');
ok(poll_until(sub { $scheduled->('fast') >= 2 }, 30, 'two scheduled runs of fast'),
	'a sync with its own schedule runs by itself, again and again');
is($scheduled->('default'), '0', 'while the default sync keeps the global schedule (years away here)');
is($node->safe_psql('postgres', q{
	SELECT string_agg(sync || ':' || coalesce(schedule, 'global') || ':' ||
	                  (CASE WHEN sync = 'fast' THEN next_run <= now() + interval '3 seconds'
	                        ELSE next_run = phsync_next_run(now()) END)::text, ',' ORDER BY sync)
	FROM phsync.status}), 'default:global:true,fast:2 seconds:true', 'phsync.status shows each sync\'s schedule and next run');
is($node->safe_psql('postgres', "SELECT count(*) FROM fast_events"), '30', 'and its runs load the rows');

# the scheduled verification of a day runs once, whatever the interval
$node->safe_psql('postgres', "SELECT phsync_alter_sync('fast', verify => true)");
my $runs_before = $scheduled->('fast');
ok(poll_until(sub { $scheduled->('fast') >= $runs_before + 3 }, 30, 'three more runs'), 'three more scheduled runs');
is($node->safe_psql('postgres', "SELECT count(*) FROM phsync.runs WHERE sync = 'fast' AND trigger = 'verify'"), '1',
	'the previous day is verified once, not at every run');

# ---------- 2. pause ----------
set_conf($node, 'phsync.enabled' => 'off');
ok(poll_until(sub { $node->safe_psql('postgres', "SELECT query FROM pg_stat_activity WHERE backend_type = 'phsync worker'")
	  eq 'idle, scheduled runs paused (phsync.enabled is off)' }, 30, 'paused'), 'phsync.enabled = off pauses the schedule');
my $paused_at = $scheduled->('fast');
is($node->safe_psql('postgres', "SELECT health || '|' || (next_run IS NULL) FROM phsync.status WHERE sync = 'fast'"), 'paused|true',
	'phsync.status says paused, with no next run');
like(run_now($node, 'postgres', 'fast'), qr/^succeeded\|/, 'a manual run still runs while paused');
# an absence cannot be polled for: wait out more than two of its periods
Time::HiRes::sleep(5);
is($scheduled->('fast'), $paused_at, 'and no scheduled run starts for two of its periods and more');
set_conf($node, 'phsync.enabled' => 'on');
ok(poll_until(sub { $scheduled->('fast') > $paused_at }, 30, 'resumed'), 'phsync.enabled = on resumes it');
$node->safe_psql('postgres', "SELECT phsync_alter_sync('fast', enabled => false)");

# the default sync: enabled and schedule from SQL, the rest in the settings
is($node->safe_psql('postgres', "SELECT name || '|' || schedule FROM phsync_alter_sync('default', schedule => '1 second')"),
	'default|1 second', 'phsync_alter_sync(\'default\', schedule => ...) works');
ok(poll_until(sub { $scheduled->('default') >= 1 }, 30, 'default scheduled'), 'and the default sync runs on it');
$node->safe_psql('postgres', "SELECT phsync_alter_sync('default', enabled => false, schedule => '')");
is($node->safe_psql('postgres', "SELECT coalesce(schedule, 'global') || '|' || health FROM phsync.status WHERE sync = 'default'"),
	'global|disabled', 'paused with enabled => false, back on the global schedule with schedule => \'\'');
like(psql_err("SELECT phsync_alter_sync('default', lookback => '1 hour')"),
	qr/HINT:  Set phsync\.lookback and reload; phsync_alter_sync\('default', \.\.\.\) changes only enabled and schedule\./,
	'its other fields are the settings\', and the error names the setting');
$node->safe_psql('postgres', "SELECT phsync_alter_sync('default', enabled => true)");

# ---------- 3. manual runs queue; wait => false returns at once ----------
my $queued = $node->safe_psql('postgres', "SELECT id || '|' || status || '|' || trigger FROM phsync_run_now('fast', wait => false)");
like($queued, qr/^\d+\|queued\|manual$/, 'phsync_run_now(..., wait => false) returns the queued run at once');
my ($qid) = split /\|/, $queued;
ok(poll_until(sub { $node->safe_psql('postgres', "SELECT status FROM phsync.runs WHERE id = $qid") eq 'succeeded' }, 30, 'queued run'),
	'and the worker runs it');
$node->safe_psql('postgres', "BEGIN; SELECT phsync_run_now('fast', wait => false); ROLLBACK;");
is($node->safe_psql('postgres', "SELECT count(*) FROM phsync.runs WHERE status = 'queued'"), '0',
	'a caller that rolls back (a cancel, a statement timeout) leaves nothing queued');

# ---------- 4. health and NOTIFY phsync ----------
fake_post($fake, '/generate', { count => 4, seed => 8, created_from => iso_ago($node, '30 minutes'), step_ms => 1000,
	bad_timestamps => 2 }) ;
my ($ret, $out, $err) = $node->psql('postgres', "LISTEN phsync;\nSELECT status FROM phsync_run_now('fast');\nSELECT 1;");
like($out, qr/Asynchronous notification "phsync" with payload "\{"sync" : "fast", "run_id" : \d+, "trigger" : "manual", "status" : "succeeded", "rows_received" : \d+/,
	'LISTEN phsync hears the end of a run, with its sync, run, status and rows');
unlike($out, qr/"error"/, 'and no error text (every role may LISTEN)');
is($node->safe_psql('postgres', "SELECT health FROM phsync.status WHERE sync = 'fast'"), 'disabled',
	'a disabled sync is disabled whatever its last run did');
$node->safe_psql('postgres', "SELECT phsync_alter_sync('fast', enabled => true, schedule => '0 0 1 1 *')");
is($node->safe_psql('postgres', "SELECT health || '|' || last_rows_rejected FROM phsync.status WHERE sync = 'fast'"), 'ok|0',
	'enabled again, after a clean run: ok');
$node->safe_psql('postgres', "UPDATE phsync.runs SET rows_rejected = 3 WHERE id = (SELECT last_run_id FROM phsync.status WHERE sync = 'fast')");
is($node->safe_psql('postgres', "SELECT health || '|' || last_rows_rejected FROM phsync.status WHERE sync = 'fast'"), 'degraded|3',
	'phsync.status shows the last run\'s rejects, and health degraded');
$node->safe_psql('postgres', "UPDATE phsync.runs SET status = 'failed', error = 'boom' WHERE id = (SELECT last_run_id FROM phsync.status WHERE sync = 'fast')");
is($node->safe_psql('postgres', "SELECT health FROM phsync.status WHERE sync = 'fast'"), 'failing', 'a failed last run: failing');
$node->safe_psql('postgres', q{
	SELECT phsync_alter_sync('fast', schedule => '1 hour');
	DELETE FROM phsync.runs WHERE sync = 'fast';
	UPDATE phsync.syncs SET created_at = now() - interval '3 hours' WHERE name = 'fast';});
is($node->safe_psql('postgres', "SELECT health FROM phsync.status WHERE sync = 'fast'"), 'stale',
	'no success for two scheduled periods: stale');

# ---------- 5. owners see their own: RLS and phsync_user ----------
$node->safe_psql('postgres', qq{
	@{[ server_sql($fake, $certs) ]}
	CREATE ROLE alice LOGIN; CREATE ROLE bob LOGIN;
	GRANT phsync_user TO alice, bob;
	CREATE SCHEMA AUTHORIZATION alice; CREATE SCHEMA AUTHORIZATION bob;
	GRANT USAGE ON FOREIGN SERVER posthog TO alice, bob;
	SET log_statement = 'none';
	CREATE USER MAPPING FOR alice SERVER posthog OPTIONS (api_key '$API_KEY');
	CREATE USER MAPPING FOR bob SERVER posthog OPTIONS (api_key '$API_KEY');});
for my $who (qw(alice bob))
{
	is(psql_err("SELECT phsync_create_table('events', '$who.ev'); SELECT name FROM phsync_add_sync('${who}_ev', '$who.ev', server => 'posthog', schedule => '0 3 * * *'); SELECT status FROM phsync_run_now('${who}_ev');", $who),
		"OK: ev\n${who}_ev\nsucceeded", "GRANT phsync_user TO $who is the whole delegation: $who adds and runs a sync");
}
is(psql_err(q{SELECT string_agg(name, ',') FROM phsync.syncs;
	SELECT string_agg(DISTINCT sync, ',') FROM phsync.runs;
	SELECT string_agg(sync || ':' || health, ',') FROM phsync.status;
	SELECT count(*) FROM phsync.rejects r JOIN phsync.runs u ON u.id = r.run_id WHERE u.sync <> 'alice_ev';}, 'alice'),
	"OK: alice_ev\nalice_ev\nalice_ev:ok\n0", 'alice sees her sync, its runs and its status row, and nobody else\'s');
is($node->safe_psql('postgres', "SELECT string_agg(name, ',' ORDER BY name) FROM phsync.syncs"), 'alice_ev,bob_ev,fast',
	'a superuser sees every sync');
like(psql_err("SELECT phsync_drop_sync('bob_ev')", 'alice'), qr/ERROR:  must be owner of sync bob_ev/, 'and alice cannot touch bob\'s');

# ---------- 6. a worker role without its grants: diagnosed, no restart loop ----------
$node->safe_psql('postgres', 'CREATE ROLE bare_runner LOGIN');
$node->append_conf('postgresql.conf', "phsync.role = 'bare_runner'\n");
$node->restart;
my $doctor = sub { $node->safe_psql('postgres', "SELECT status || '|' || detail FROM phsync_doctor() WHERE item = 'worker'") };
ok(poll_until(sub { $doctor->() =~ /^error\|phsync\.role "bare_runner" lacks USAGE on schema phsync; SELECT on table phsync\.runs; SELECT on table phsync\.syncs; the worker runs no sync until it has them$/ }, 30, 'doctor'),
	'phsync_doctor() names what the worker\'s role lacks');
my $pid = $node->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'phsync worker'");
like(psql_err("SELECT phsync_backfill('fast', now() - interval '1 hour', now())"),
	qr/ERROR:  phsync\.role "bare_runner" lacks USAGE on schema phsync; .*\nDETAIL:  The phsync worker runs no sync until it has them\.\nHINT:  As a superuser: GRANT USAGE ON SCHEMA phsync TO bare_runner; GRANT SELECT ON phsync\.runs TO bare_runner; GRANT SELECT ON phsync\.syncs TO bare_runner;/,
	'phsync_backfill() fails at once with it, and the GRANTs that fix it');
like(psql_err("SELECT phsync_run_now()"), qr/ERROR:  phsync\.role "bare_runner" lacks/, 'so does phsync_run_now()');
# docs/security.md's block for a worker role, for this role (which exists)
my ($grants) = slurp_file("$FindBin::Bin/../../docs/security.md")
  =~ /<!-- phsync.role grants: begin -->\n```sql\n(.*?)```\n<!-- phsync.role grants: end -->/s;
ok($grants && $grants =~ s/^CREATE ROLE phsync_runner LOGIN;\n//m, 'docs/security.md has the phsync.role grants');
$grants =~ s/\bphsync_runner\b/bare_runner/g;
$node->safe_psql('postgres', $grants);
ok(poll_until(sub { $doctor->() =~ /^ok\|/ }, 30, 'granted'), 'after the GRANTs the worker goes on by itself');
is($node->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'phsync worker'"), $pid,
	'the same worker process throughout: no restart loop');
my $logged = () = slurp_file($node->logfile) =~ /ERROR:  phsync\.role "bare_runner" lacks/g;
is($logged, 3, 'the server log has the problem once from the worker (and once per refused call)');

done_testing();
