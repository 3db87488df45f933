# PostHog's throttles and its query slots.  A 429 with Retry-After is a
# wait, not a failure: it does not use up phsync.max_retries, it is logged
# once per run, phsync.status shows the run waiting and until when, and a
# backfill that needs more requests than PostHog's hour allows pauses and
# finishes.  A 429 without Retry-After (too many queries of the project
# running; a 4th waits 30 s for one of 3 slots first) makes phsync ask with
# fewer requests at once.  The fake's clock runs fast: no test waits for
# real hours.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use List::Util qw(max);
use FindBin;
use lib "$FindBin::Bin/../perl";
use PhsyncTest;

my $certs = make_certs();

# ---------- the 120/hour HogQL throttle, an hour lasting 30 seconds ----------
my $fake = start_fake(certs => $certs, config => { hogql_throttle_per_hour => 120, time_scale => 120 });
my $node = phsync_node('throttles', $fake, $certs, 'phsync.max_retries' => '1',
	'phsync.initial_since' => hours_ago(1));
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');

# 1,300 events a day and a half ago: at 10 rows a page, more pages than the hour allows
fake_post($fake, '/generate', { count => 1300, seed => 21, created_from => iso_ago($node, '40 hours'), step_ms => 60_000 });
my ($from, $to) = (iso_ago($node, '41 hours'), iso_ago($node, '10 hours'));
my $bf = $node->safe_psql('postgres', "SELECT id FROM phsync_backfill('default', '$from', '$to')");

my $waiting = poll_until(sub { $node->safe_psql('postgres',
	q{SELECT waiting_until FROM phsync.status WHERE sync = 'default' AND waiting_until > now()}) }, 120,
	'the run waits for the throttle');
ok($waiting, "phsync.status shows the run waiting, until $waiting");
like($node->safe_psql('postgres', q{SELECT query FROM pg_stat_activity WHERE backend_type = 'phsync worker'}),
	qr/^sync default: waiting to fetch page \d+/, 'and so does pg_stat_activity');
poll_until(sub { $node->safe_psql('postgres', "SELECT status FROM phsync.runs WHERE id = $bf") ne 'running' }, 180, 'backfill ends');
is($node->safe_psql('postgres', "SELECT status || ' ' || rows_inserted || ' ' || retries FROM phsync.runs WHERE id = $bf"),
	'succeeded 1300 0', 'the backfill pauses and finishes: every row, and no retry used up by a 429');
is(source_equals_target($node, $fake), 0, 'the target equals the source');
my @req = @{ fake_requests($fake) };
my $throttled = grep { $_->{status} == 429 } @req;
ok($throttled >= 1, "PostHog throttled $throttled requests");
my $ok = grep { $_->{status} == 200 } @req;
ok($ok > 120, "$ok requests succeeded, more than the hour allows");
my $log = slurp_file($node->logfile);
my @waits = $log =~ /(phsync run $bf: PostHog throttles requests; waiting \d+ s, until [^\n]+\n[^\n]*DETAIL:  Request was throttled\. Expected available in \d+ seconds\.)/g;
is(scalar(@waits), 1, 'the wait is logged once, with PostHog\'s detail');
like($log, qr/phsync run $bf .*, 0 retries, $throttled throttle waits,/, 'the run\'s summary counts every wait');
my ($wait_s) = $waits[0] =~ /waiting (\d+) s/;
ok($wait_s > 5, "the first wait is most of the (scaled) hour: $wait_s s");
is($node->safe_psql('postgres', q{SELECT waiting_until FROM phsync.status WHERE sync = 'default'}), '',
	'once the run is over, nothing is waiting');
$node->stop;

# ---------- three query slots per project ----------
# (a query holds its slot 0.6 s; a 4th waits 30 fake seconds, 0.3 s, for one)
my $fake2 = start_fake(certs => $certs,
	config => { time_scale => 100, latency_base_ms => 600, throttle_per_minute => 0, throttle_per_hour => 0 });
my $node2 = phsync_node('slots', $fake2, $certs, 'phsync.max_concurrent_requests' => '4',
	'phsync.initial_since' => hours_ago(4), 'phsync.max_retries' => '1');
$node2->safe_psql('postgres', 'CREATE EXTENSION phsync');
fake_post($fake2, '/generate', { count => 600, seed => 22, created_from => iso_ago($node2, '3 hours'), step_ms => 15_000 });
like(run_now($node2), qr/^succeeded\|\d+\|\d+\|600$/, 'four at once against three slots: every row arrives');
is(source_equals_target($node2, $fake2), 0, 'the target equals the source');
my @r2 = @{ fake_requests($fake2) };
my @busy = grep { $_->{status} == 429 } @r2;
ok(@busy >= 1, scalar(@busy) . ' request(s) waited for a slot and got 429 without Retry-After');
like(slurp_file($node2->logfile), qr/PostHog has too many queries of this project running; 3 at once from now on/,
	'phsync asks with one request fewer at once');
is($node2->safe_psql('postgres', q{SELECT retries FROM phsync.runs ORDER BY id DESC LIMIT 1}), 0,
	'a full slot is not a retry');

# overlapping requests after the drop: at most three in flight at any moment
my @after = sort { $a->[0] <=> $b->[0] } map { [ $_->{start}, $_->{end} ] } grep { $_->{status} == 200 } @r2;
my $most = 0;
for my $r (@after)
{
	my $n = grep { $_->[0] <= $r->[0] && $_->[1] > $r->[0] } @after;
	$most = max($most, $n);
}
ok($most >= 2, "requests overlapped: up to $most answered at once");

done_testing();
