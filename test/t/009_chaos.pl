# Chaos: a seeded random schedule of faults over many runs (HTTP errors,
# slow, truncated and garbled responses, kill -9 of the worker, immediate
# server restarts) while new and late events keep arriving.  After every
# round the target holds only source rows, never one twice; at the end,
# once the faults clear, it equals the source row for row.  Requests are
# concurrent (three at once) and overlap the inserts.
#
# PHSYNC_CHAOS_SEED=n reruns one schedule; PHSYNC_CHAOS_ROUNDS=n sets its length.
use strict;
use warnings;

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/../perl";
use PhsyncTest;

my $seed = $ENV{PHSYNC_CHAOS_SEED} // 20261123;
my $rounds = $ENV{PHSYNC_CHAOS_ROUNDS} // 14;
srand($seed);
note("chaos seed $seed, $rounds rounds");

my $certs = make_certs();
my $fake = start_fake(certs => $certs);
my $node = phsync_node('chaos', $fake, $certs, restart_after_crash => 'on',
	'phsync.page_size' => '7', 'phsync.max_retries' => '3',
	'phsync.retry_base_delay' => '10ms', 'phsync.max_retry_delay' => '200ms',
	'phsync.request_timeout' => '20s',
	# overlapped and concurrent requests, as by default (and more)
	'phsync.max_concurrent_requests' => '3');
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');

my $activity = sub {
	my $a = eval { $node->safe_psql('postgres',
		"SELECT query FROM pg_stat_activity WHERE backend_type = 'phsync worker'") };
	return $a // '';
};
my $worker_up = sub { poll_until(sub { $activity->() =~ /idle until/ }, 60, 'worker up') };

my @fault_kinds = (
	sub { { status => 503, detail => 'ClickHouse at capacity' } },
	sub { { status => 500, detail => 'Code: 159. Timeout exceeded' } },
	sub { { status => 429, retry_after => 0, detail => 'throttled' } },
	sub { { status => 429, detail => 'too many concurrent queries' } },
	sub { { status => 504, detail => 'Query timed out' } },
	sub { { status => 512, detail => 'Estimated too slow' } },
	sub { { truncate => 40 + int(rand(200)) } },
	sub { { reset => JSON::PP::true } },
	sub { { delay_ms => 200 + int(rand(400)) } },
	sub { { raw_body => '{"results": [[' } },
);

my %outcomes;
for my $round (1 .. $rounds)
{
	# new events, some of them "late": client timestamps days old
	my $n = 5 + int(rand(16));
	my @events;
	for my $i (1 .. $n)
	{
		my $created = iso_ago($node, (60 + int(rand(40))) . ' seconds');
		my $late = rand() < 0.3;
		push @events, { uuid => sprintf('%08x-%04x-4%03x-8%03x-%012x', $round, $i, rand(4096), rand(4096), int(rand(2**40))),
			event => $late ? 'late' : 'chaos', distinct_id => "r$round",
			created_at => $created,
			timestamp => $late ? iso_ago($node, (1 + int(rand(5))) . ' days') : $created,
			properties => { round => $round, i => $i } };
	}
	fake_post($fake, '/events', \@events);

	my $scenario = rand();
	if ($scenario < 0.6)
	{
		my @faults = map { $fault_kinds[ int(rand(@fault_kinds)) ]->() } 1 .. int(rand(5));
		fake_post($fake, '/faults', \@faults);
		my $r = run_now($node);
		$outcomes{ $r =~ /^succeeded/ ? 'succeeded' : 'failed' }++;
		note("round $round: " . scalar(@faults) . " faults: " . (split /\n/, $r)[0]);
	}
	else
	{
		# a run that hangs on a later page, then a crash
		fake_post($fake, '/faults', [ {}, { delay_ms => 20_000 } ]);
		my ($out, $err) = ('', '');
		my $h = IPC::Run::start(['psql', '-XAtq', '-d', $node->connstr('postgres'), '-c',
			'SELECT status FROM phsync_run_now()'], '>', \$out, '2>', \$err);
		poll_until(sub { $activity->() =~ /fetching page 2/ }, 30, "round $round: run on page 2");
		if ($scenario < 0.8)
		{
			my $pid = $node->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'phsync worker'");
			kill 'KILL', $pid;
			note("round $round: kill -9 of the worker");
			$outcomes{'kill -9'}++;
		}
		else
		{
			$node->stop('immediate');
			$node->start;
			note("round $round: immediate restart");
			$outcomes{'restart'}++;
		}
		$h->finish;
		fake_post($fake, '/reset');
		$worker_up->();
	}

	# invariant after every round: only source rows, none twice (uuid is the key)
	my $src = PhsyncTest::fake_get($fake, '/source');
	my %in_source = map { $_->[0] => 1 } @$src;
	my @target = split /\n/, $node->safe_psql('postgres', 'SELECT uuid FROM posthog_events');
	my @strangers = grep { !$in_source{$_} } @target;
	is(scalar(@strangers), 0, "round $round: every target row is a source row");
}
note(join(', ', map { "$_: $outcomes{$_}" } sort keys %outcomes));

# The faults clear; runs catch up.
fake_post($fake, '/reset');
my $final = run_now($node);
like($final, qr/^succeeded\|/, 'with the faults gone, the next run succeeds');
is(source_equals_target($node, $fake), 0, 'and the target equals the source, row for row');
is($node->safe_psql('postgres', 'SELECT count(*) FROM posthog_events'),
	scalar(@{ PhsyncTest::fake_get($fake, '/source') }), 'the same number of rows');
is($node->safe_psql('postgres', "SELECT count(*) FROM phsync.runs WHERE status = 'running'"), '0', 'no run is left "running"');
is($node->safe_psql('postgres', "SELECT count(*) FROM phsync.runs WHERE status = 'failed' AND (error IS NULL OR error = '')"), '0',
	'every failed run says why');
is($node->safe_psql('postgres', "SELECT count(*) FROM phsync.runs WHERE status = 'succeeded' AND rows_received < rows_inserted"), '0',
	'counters are coherent');

# A run that reported success is on disk.  Its loads commit without waiting
# for the WAL flush, its last commit waits: with the WAL writer asleep for a
# minute, an immediate stop right after the run loses none of its rows.
$node->append_conf('postgresql.conf', "wal_writer_delay = '10s'");
$node->reload;
fake_post($fake, '/events', [ map { { uuid => sprintf('ffffffff-0000-4000-8000-%012d', $_), event => 'durable',
	distinct_id => 'd', created_at => iso_ago($node, '90 seconds'), timestamp => iso_ago($node, '90 seconds'),
	properties => { i => $_ } } } 1 .. 40 ]);
like(run_now($node), qr/^succeeded\|/, 'a run loads 40 more rows');
my $count = $node->safe_psql('postgres', 'SELECT count(*) FROM posthog_events');
$node->stop('immediate');
$node->start;
is($node->safe_psql('postgres', 'SELECT count(*) FROM posthog_events'), $count,
	'an immediate stop right after a successful run loses none of its rows');
is($node->safe_psql('postgres', 'SELECT status FROM phsync.runs ORDER BY id DESC LIMIT 1'), 'succeeded',
	'nor its run-log row');
is(source_equals_target($node, $fake), 0, 'the target still equals the source');

done_testing();
