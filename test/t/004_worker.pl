# The worker's life: waiting for its database and extension, the schedule
# and SIGHUP, restarts that neither repeat nor skip a run, kill -9 during a
# run, one run at a time, and phsync_run_now() without preloading.
use strict;
use warnings;

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use FindBin;
use lib "$FindBin::Bin/../perl";
use PhsyncTest;

my $certs = make_certs();
my $fake = start_fake(certs => $certs);

# Server started with the settings, database created later.
my $node = phsync_node('worker', $fake, $certs, 'phsync.database' => 'analytics',
	restart_after_crash => 'on');
my $activity = sub {
	return $node->safe_psql('postgres',
		"SELECT coalesce(datname, '-') || '|' || query FROM pg_stat_activity WHERE backend_type = 'phsync worker'");
};
ok(poll_until(sub { $activity->() eq '-|waiting for database "analytics" to be created' }, 30, 'worker waiting for its database'),
	'without its database the worker waits, connected to none');
my $log = slurp_file($node->logfile);
my $fatals = () = $log =~ /database "analytics" does not exist/g;
is($fatals, 1, 'one FATAL about the missing database, then quiet');

# CREATE DATABASE, CREATE EXTENSION, and a run right away.  The worker is
# woken by both (no poll, no restart delay): the first request leaves
# within a moment of the call (on 0.3: 5 to 10 s of polls and restart).
my $t0 = $node->safe_psql('postgres',
	"SELECT to_char(now() - interval '3 hours', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')");
fake_post($fake, '/generate', { count => 35, seed => 11, created_from => $t0, step_ms => 60_000 });
fake_post($fake, '/reset');
my $created = time();
$node->safe_psql('postgres', 'CREATE DATABASE analytics');
ok(poll_until(sub { $activity->() =~ /^analytics\|waiting for CREATE EXTENSION/ }, 30, 'worker in its database'),
	'the worker connects to the new database');
my $connected = time() - $created;
$node->safe_psql('analytics', 'CREATE EXTENSION phsync');
my $called = time();
like(run_now($node, 'analytics'), qr/^succeeded\|\d+\|35\|35$/, 'phsync_run_now() works right after CREATE EXTENSION, no restart');
my $first = fake_requests($fake)->[0]{start} - $called;
note(sprintf('CREATE DATABASE to connected: %.2f s; call to first request: %.2f s', $connected, $first));
cmp_ok($connected, '<', 4, 'CREATE DATABASE wakes the waiting worker: it connects without a poll and a restart delay');
cmp_ok($first, '<', 2, 'the first request leaves at once after CREATE EXTENSION');
like($activity->(), qr/^analytics\|idle until \d{4}-/, 'worker shows in pg_stat_activity as "phsync worker", idle until its next run');

# The schedule: run_at a few seconds from now, changed with SIGHUP.
my $at = $node->safe_psql('postgres', "SELECT to_char(now() AT TIME ZONE 'UTC' + interval '3 seconds', 'HH24:MI:SS')");
fake_post($fake, '/generate', { count => 3, seed => 12, created_from => $node->safe_psql('postgres',
	"SELECT to_char(now() - interval '2 minutes', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"), step_ms => 1000 });
$node->append_conf('postgresql.conf', "phsync.run_at = '$at'\nphsync.interval = '1d'\n");
$node->reload;
ok(poll_until(sub { $node->safe_psql('analytics', "SELECT count(*) FROM phsync.runs WHERE trigger = 'schedule' AND status = 'succeeded'") eq '1' }, 60, 'scheduled run'),
	'the scheduled run fires by itself after a SIGHUP changed run_at');
is($node->safe_psql('analytics', "SELECT rows_inserted FROM phsync.runs WHERE trigger = 'schedule'"), '3', 'and syncs the new rows');
my $next = $node->safe_psql('postgres', "SELECT to_char(current_date + 1 + '$at'::time, 'YYYY-MM-DD HH24:MI:SS')");
$next = $node->safe_psql('postgres', "SELECT to_char((now() AT TIME ZONE 'UTC')::date + 1 + '$at'::time, 'YYYY-MM-DD HH24:MI:SS')");
ok(poll_until(sub { $activity->() eq "analytics|idle until $next+00" }, 30, 'next due'), "then waits until the same time tomorrow ($next)");

# A restart neither repeats the run nor skips the next one.
$node->restart;
ok(poll_until(sub { $activity->() eq "analytics|idle until $next+00" }, 30, 'after restart'), 'after a restart, still due tomorrow');
is($node->safe_psql('analytics', "SELECT count(*) FROM phsync.runs WHERE trigger = 'schedule'"), '1', 'no repeated run');

# Runs missed while the server was down happen once at start-up.
# (history made three days ago, on a server that has had the database since before then)
$node->safe_psql('analytics', "UPDATE phsync.runs SET started_at = started_at - interval '3 days' WHERE trigger = 'schedule';
	UPDATE phsync.cluster SET registered_at = registered_at - interval '4 days'");
$node->restart;
ok(poll_until(sub { $activity->() eq "analytics|idle until $next+00" }, 30, 'catch-up run'), 'catch-up run done, next due tomorrow');
is($node->safe_psql('analytics', "SELECT count(*) FROM phsync.runs WHERE trigger = 'schedule'"), '2', 'three missed days make one run');

# One run at a time: a slow page keeps the first run busy.
$node->append_conf('postgresql.conf', "phsync.run_at = '00:00'\nphsync.interval = '3650d'\n");
$node->reload;
fake_post($fake, '/faults', [ { delay_ms => 3000 } ]);
my ($out1, $err1) = ('', '');
my $h = IPC::Run::start(['psql', '-XAtq', '-d', $node->connstr('analytics'), '-c',
	'SELECT status FROM phsync_run_now()'], '>', \$out1, '2>', \$err1);
poll_until(sub { $activity->() =~ /fetching page 1/ }, 30, 'first run in progress');
my ($ret, $out, $err) = $node->psql('analytics', 'SELECT status FROM phsync_run_now()');
$h->finish;
is($out1, "succeeded\n", 'the first run completes');
like($err, qr/NOTICE:  the phsync worker is busy; this request is queued\nDETAIL:  Run \d+ is in progress\./,
	'a second caller is told it waits');
is($out, 'succeeded', 'and gets its own run once the first is over');
is($node->safe_psql('analytics', "SELECT count(*) FROM phsync.runs r1 JOIN phsync.runs r2 ON r2.id = r1.id + 1 "
	. "WHERE r2.started_at >= r1.finished_at AND r2.id = (SELECT max(id) FROM phsync.runs)"), '1',
	'one run at a time: the second started after the first finished');

# kill -9 of the worker in the middle of a run.
my $t1 = $node->safe_psql('postgres',
	"SELECT to_char(now() - interval '80 seconds', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')");
fake_post($fake, '/generate', { count => 40, seed => 13, created_from => $t1, step_ms => 1000 });
fake_post($fake, '/faults', [ { count => 2 }, { delay_ms => 30_000 } ]);
($out1, $err1) = ('', '');
$h = IPC::Run::start(['psql', '-XAtq', '-d', $node->connstr('analytics'), '-c',
	'SELECT status FROM phsync_run_now()'], '>', \$out1, '2>', \$err1);
poll_until(sub { $activity->() =~ /fetching page 3/ }, 30, 'run at page 3');
my $pid = $node->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'phsync worker'");
my $partial = target_count($node, undef, 'analytics');
ok($partial > 35, "two pages committed before the crash ($partial rows)");
kill 'KILL', $pid;
$h->finish;
like($err1, qr/server closed the connection unexpectedly|terminating connection/, 'the waiting caller sees the crash');
ok(poll_until(sub { my $a = eval { $activity->() } // ''; $a =~ /^analytics\|idle until/ }, 60, 'worker back'), 'the postmaster restarts the worker');
like($node->safe_psql('analytics', "SELECT status || '|' || error FROM phsync.runs WHERE status <> 'succeeded' ORDER BY id DESC LIMIT 1"),
	qr/^failed\|the phsync worker stopped before the run finished/, 'the interrupted run is marked failed');
fake_post($fake, '/reset');
like(run_now($node, 'analytics'), qr/^succeeded\|/, 'the next run succeeds');
is(source_equals_target($node, $fake, undef, 'analytics'), 0, 'and the table equals the source exactly');

# Not preloaded: a clear error with a hint.
my $plain = PostgreSQL::Test::Cluster->new('plain');
$plain->init;
$plain->start;
$plain->safe_psql('postgres', 'CREATE EXTENSION phsync');
($ret, $out, $err) = $plain->psql('postgres', 'SELECT phsync_run_now()');
like($err, qr/ERROR:  phsync is not loaded through shared_preload_libraries\nHINT:  Add phsync to shared_preload_libraries in postgresql.conf and restart the server\./,
	'not preloaded: clear error with a hint');

done_testing();
