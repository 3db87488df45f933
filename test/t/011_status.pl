# Operating phsync: the phsync.status view, progress NOTICEs from
# phsync_run_now(), and history retention.
use strict;
use warnings;

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/../perl";
use PhsyncTest;

my $certs = make_certs();
my $fake = start_fake(certs => $certs);
my $node = phsync_node('status', $fake, $certs, 'phsync.initial_since' => hours_ago(6));
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');
poll_until(sub { $node->safe_psql('postgres', "SELECT query FROM pg_stat_activity WHERE backend_type = 'phsync worker'") =~ /^idle until/ }, 30, 'worker idle');

my $status = sub {
	return $node->safe_psql('postgres', q{
		SELECT concat_ws('|', sync, enabled, target, coalesce(last_status, '-'), coalesce(last_rows_inserted::text, '-'),
		                 watermark IS NOT NULL, next_run IS NOT NULL, running, coalesce(run_id::text, '-'), pages, rows_received)
		FROM phsync.status});
};
is($status->(), 'default|t|public.posthog_events|-|-|f|t|f|-|0|0', 'before any run: no last run, no watermark, a next run');
is($node->safe_psql('postgres', "SELECT next_run = '2029-12-24 00:00:00+00' FROM phsync.status"), 't',
	'next_run is the worker\'s next scheduled slot');

fake_post($fake, '/generate', { count => 25, seed => 1, created_from => iso_ago($node, '10 minutes'), step_ms => 1000 });
like(run_now($node), qr/^succeeded\|\d+\|25\|25$/, 'a run');
is($status->(), 'default|t|public.posthog_events|succeeded|25|t|t|f|-|0|0', 'after it: last run and watermark');
is($node->safe_psql('postgres', q{SELECT watermark = (SELECT max(created_at) FROM posthog_events)
	AND lag BETWEEN interval '9 minutes' AND interval '11 minutes' FROM phsync.status}), 't', 'watermark is max(created_at), lag is now minus it');

# A run in progress: status shows it, and phsync_run_now() sends NOTICEs.
fake_post($fake, '/generate', { count => 25, seed => 2, created_from => iso_ago($node, '2 minutes'), step_ms => 100 });
fake_post($fake, '/faults', [ {}, { delay_ms => 7000 } ]);
my ($out, $err) = ('', '');
my $h = IPC::Run::start(['psql', '-XAtq', '-d', $node->connstr('postgres'), '-c',
	'SELECT status FROM phsync_run_now()'], '>', \$out, '2>', \$err);
ok(poll_until(sub { $status->() =~ /\|t\|\d+\|1\|\d+$/ }, 30, 'status shows the run'), 'while running, status shows the run and its first page');
$h->finish;
like($err, qr/NOTICE:  phsync run \d+: 1 pages, \d+ rows so far/, 'phsync_run_now() reported progress as a NOTICE');
is($out, "succeeded\n", 'and the run succeeded');

fake_post($fake, '/generate', { count => 25, seed => 3, created_from => iso_ago($node, '90 seconds'), step_ms => 100 });
fake_post($fake, '/faults', [ {}, { delay_ms => 7000 } ]);
my ($ret, $o, $e) = $node->psql('postgres', 'SET phsync.progress_notices = off; SELECT status FROM phsync_run_now()');
is($o, 'succeeded', 'with progress_notices off the run succeeds');
unlike($e, qr/NOTICE/, 'quietly');

# History retention: runs older than phsync.history_days go, with their rejects.
my $recent = $node->safe_psql('postgres', "SELECT count(*) FROM phsync.runs");
$node->safe_psql('postgres', q{
	INSERT INTO phsync.runs (trigger, started_at, finished_at, status, target)
	SELECT 'manual', now() - interval '100 days' - i * interval '1 minute', now() - interval '100 days', 'succeeded', 'x'
	FROM generate_series(1, 2500) i;
	INSERT INTO phsync.rejects (run_id, target, columns, raw_row, error)
	SELECT min(id), 'x', '{a}', '[1]', 'old' FROM phsync.runs WHERE target = 'x';});
is($node->safe_psql('postgres', "SELECT count(*) FROM phsync.runs"), $recent + 2500, '2,500 old runs added');
set_conf($node, 'phsync.history_days' => '90');
like(run_now($node), qr/^succeeded/, 'a run');
ok(poll_until(sub { $node->safe_psql('postgres', "SELECT count(*) FROM phsync.runs WHERE target = 'x'") eq '0' }, 30, 'pruning'),
	'runs older than 90 days are deleted');
is($node->safe_psql('postgres', "SELECT count(*) FROM phsync.runs"), $recent + 1, 'recent runs are kept (and the new one)');
is($node->safe_psql('postgres', "SELECT count(*) FROM phsync.rejects WHERE error = 'old'"), '0', 'with their rejects');
ok(slurp_file($node->logfile) =~ /phsync deleted 2500 run\(s\) older than 90 days from phsync.runs/, 'pruning is logged');

done_testing();
