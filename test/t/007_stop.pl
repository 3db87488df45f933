# Stopping and cancelling: SIGTERM, pg_terminate_backend() and a fast
# shutdown end an in-flight HTTP transfer at once, not after the request
# timeout; a cancelled phsync_run_now() returns promptly and cancels its
# run; and a run holds no lock on the target between pages.
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
my $node = phsync_node('stop', $fake, $certs, 'phsync.request_timeout' => '5min',
	'phsync.initial_since' => hours_ago(6), restart_after_crash => 'on');
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');
fake_post($fake, '/generate', { count => 25, seed => 3, created_from => iso_ago($node, '10 minutes'), step_ms => 1000 });
is(run_now($node), 'succeeded|3|25|25', 'a first run loads 25 rows in 3 pages');
fake_post($fake, '/generate', { count => 25, seed => 4, created_from => iso_ago($node, '5 minutes'), step_ms => 1000 });

my $worker_pid = sub {
	return $node->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'phsync worker'");
};
my $activity = sub {
	return $node->safe_psql('postgres', "SELECT query FROM pg_stat_activity WHERE backend_type = 'phsync worker'");
};
# start a run in the background; its second request hangs for two minutes
my ($out, $err);
my $start_slow_run = sub {
	fake_post($fake, '/reset');
	fake_post($fake, '/faults', [ {}, { delay_ms => 120_000 } ]);
	($out, $err) = ('', '');
	my $h = IPC::Run::start(['psql', '-XAtq', '-d', $node->connstr('postgres'), '-c',
		'SELECT status FROM phsync_run_now()'], '>', \$out, '2>', \$err);
	poll_until(sub { $activity->() =~ /fetching page 2/ }, 30, 'run waiting on page 2');
	return $h;
};

# Users are not blocked between pages: the run holds no lock while it waits.
my $h = $start_slow_run->();
is($node->safe_psql('postgres', 'BEGIN; LOCK TABLE posthog_events IN ACCESS EXCLUSIVE MODE NOWAIT; INSERT INTO posthog_events (uuid, created_at) VALUES (gen_random_uuid(), now() - interval \'1 day\'); ROLLBACK; SELECT 1'),
	'1', 'while a run waits for PostHog, the target can be locked and written');

# A cancelled phsync_run_now() returns promptly; the run goes on.
my $t0 = time();
my ($ret, $o, $e) = $node->psql('postgres', 'SET statement_timeout = 500; SELECT phsync_run_now()');
my $took = time() - $t0;
like($e, qr/NOTICE:  the phsync worker is busy; this request is queued\n.*ERROR:  canceling statement due to statement timeout/s,
	'a second caller waits in the queue, and its statement timeout ends the wait');
cmp_ok($took, '<', 5, sprintf('promptly (%.1f s)', $took));

# pg_terminate_backend() on the worker, mid-transfer
fake_post($fake, '/reset');
my $pid = $worker_pid->();
$t0 = time();
$node->safe_psql('postgres', "SELECT pg_terminate_backend($pid)");
ok(poll_until(sub { $worker_pid->() ne $pid }, 30, 'worker gone'), 'pg_terminate_backend ends the worker');
$took = time() - $t0;
cmp_ok($took, '<', 10, sprintf('within seconds (%.1f s), not after the 2-minute transfer', $took));
$h->finish;
like($err, qr/ERROR:  the phsync worker stopped before the run finished\nHINT:  The next run resumes from the table's watermark; call phsync_run_now\(\) again\.\nCONTEXT:  phsync run \d+ of sync default/,
	'the waiting caller gets an error, not a silent re-run');
ok(poll_until(sub { ($activity->() // '') =~ /idle until/ }, 30, 'worker back'), 'the postmaster starts it again');
like($node->safe_psql('postgres', "SELECT status || ': ' || error FROM phsync.runs ORDER BY id DESC LIMIT 1"),
	qr/^failed: the phsync worker stopped before the run finished/, 'the interrupted run is marked failed');

# A caller cancelled mid-run that stays connected (a pooled connection) does
# not keep everyone else out once the run is over.
fake_post($fake, '/faults', [ {}, { delay_ms => 3000 } ]);
my $pooled = $node->background_psql('postgres', on_error_stop => 0);
$pooled->query_safe('SET statement_timeout = 1000');
$pooled->query('SELECT phsync_run_now()');
ok(poll_until(sub { $node->safe_psql('postgres', "SELECT status FROM phsync.runs ORDER BY id DESC LIMIT 1") eq 'cancelled' }, 30, 'slow run ends'),
	'the run of the cancelled caller is cancelled too');
like(run_now($node), qr/^succeeded\|/, 'another session can run right after, while the cancelled one is still connected');
$pooled->quit;

# statement_timeout on the caller while the worker runs: prompt, clear message
fake_post($fake, '/faults', [ {}, { delay_ms => 120_000 } ]);
$t0 = time();
($ret, $o, $e) = $node->psql('postgres', 'SET statement_timeout = 1000; SELECT phsync_run_now()');
$took = time() - $t0;
like($e, qr/ERROR:  canceling statement due to statement timeout\nCONTEXT:  while waiting for phsync run \d+, which is cancelled with this statement/,
	'a cancelled phsync_run_now() says its run is cancelled too');
cmp_ok($took, '<', 10, sprintf('and returns promptly (%.1f s)', $took));
$t0 = time();
ok(poll_until(sub { $node->safe_psql('postgres', "SELECT status FROM phsync.runs ORDER BY id DESC LIMIT 1") eq 'cancelled' }, 10, 'cancelled'),
	'the run stops: its transfer is abandoned, not waited for');
cmp_ok(time() - $t0, '<', 3, sprintf('within seconds (%.1f s), not after the 2-minute transfer', time() - $t0));
like($node->safe_psql('postgres', "SELECT error FROM phsync.runs ORDER BY id DESC LIMIT 1"),
	qr/^phsync run \d+ was cancelled: The session that asked for it stopped waiting/, 'and its row says why');

# a fast shutdown during the transfer
$h = $start_slow_run->();
$t0 = time();
$node->stop('fast');
$took = time() - $t0;
cmp_ok($took, '<', 10, sprintf('pg_ctl stop -m fast mid-transfer takes %.1f s, not minutes', $took));
$node->start;
ok(poll_until(sub { ($activity->() // '') =~ /idle until/ }, 30, 'worker up'), 'after a restart the worker is up');
fake_post($fake, '/reset');
like(run_now($node), qr/^succeeded\|/, 'the next run succeeds');
is(source_equals_target($node, $fake), 0, 'and the table equals the source');

done_testing();
