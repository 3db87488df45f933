# PostHog's row caps and execution cost.  A server that silently cuts a
# LIMIT at 10,000 (older self-hosted PostHog) or 50,000 (today) must not
# make phsync believe a window is exhausted: every row arrives through
# phsync_run_now(), a backfill and verify's repair.  And a backfill of a year
# makes each request read about its own slice of events, not the history
# after it (the fake charges each request for the events its timestamp
# bounds let through).
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use List::Util qw(sum max);
use FindBin;
use lib "$FindBin::Bin/../perl";
use PhsyncTest;

my $certs = make_certs();

# ---------- a 10,000-row cap below phsync.page_size ----------
my $fake = start_fake(certs => $certs, config => { row_cap => 10000 });
my $node = phsync_node('limits', $fake, $certs, 'phsync.page_size' => '50000',
	'phsync.initial_since' => hours_ago(4));
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');

# 26,000 events over the last three hours
fake_post($fake, '/generate', { count => 26000, seed => 19,
	created_from => iso_ago($node, '3 hours'), step_ms => 300 });
like(run_now($node), qr/^succeeded\|\d+\|26000\|26000$/, 'run_now: all 26,000 rows arrive through a 10,000-row cap');
is(source_equals_target($node, $fake), 0, 'the target equals the source');
like(slurp_file($node->logfile), qr/PostHog returned 10000 rows where 50000 were asked: it caps results at 10000 rows/,
	'the cap is learned from a page that stops at it, and logged');
# pages (the plan's count, GROUP BY phsync_bucket, is not one)
my @limits = map { $_->{body}{query}{query} =~ /LIMIT (\d+)\s*$/ ? $1 : () }
  grep { $_->{body}{query}{query} !~ /GROUP BY phsync_bucket/ } @{ fake_requests($fake) };
is(scalar(grep { $_ > 10000 } @limits), 1, 'once learned, no page asks for more than the cap');
is(scalar(grep { $_->{rows} == 10000 } @{ fake_requests($fake) }) >= 2, 1, 'and capped pages were read as full');

# a backfill of the same window into a second table
$node->safe_psql('postgres', q{
	SELECT phsync_create_table('events', 'events_copy');
	SELECT phsync_add_sync('copy', 'events_copy', preset => 'events');});
my ($from, $until) = split /\|/, $node->safe_psql('postgres',
	q{SELECT min(created_at) || '|' || (max(created_at) + interval '1 second') FROM posthog_events});
fake_post($fake, '/reset', {});
my $bf = $node->safe_psql('postgres', "SELECT id FROM phsync_backfill('copy', '$from', '$until')");
poll_until(sub { $node->safe_psql('postgres', "SELECT status FROM phsync.runs WHERE id = $bf") eq 'succeeded' }, 120, 'backfill');
is($node->safe_psql('postgres', "SELECT rows_received || ' ' || rows_inserted FROM phsync.runs WHERE id = $bf"),
	'26000 26000', 'a backfill through the cap gets every row');
is(source_equals_target($node, $fake, 'events_copy'), 0, 'the copy equals the source');

# verify sees rows missing; repair fetches them through the cap
my $gone = $node->safe_psql('postgres', qq{
	WITH d AS (DELETE FROM events_copy WHERE created_at >= '$from'::timestamptz + interval '30 minutes'
	           AND created_at < '$from'::timestamptz + interval '90 minutes' RETURNING 1)
	SELECT count(*) FROM d});
ok($gone > 10000, "deleted $gone rows, more than one capped page");
my $repaired = $node->safe_psql('postgres', qq{
	SELECT string_agg(status, ',') FROM phsync_verify('copy', '$from', '$until', bucket => '1 hour', repair => true)
	WHERE status <> 'ok'});
like($repaired, qr/^repaired(,repaired)*$/, 'verify finds the hours with missing rows and repairs them');
is($node->safe_psql('postgres', q{SELECT rows_inserted || ' ' || verify_mismatches FROM phsync.runs ORDER BY id DESC LIMIT 1}),
	"$gone 0", 'the repair inserted exactly the deleted rows');
is(source_equals_target($node, $fake, 'events_copy'), 0, 'the copy equals the source again');
$node->stop;

# ---------- today's 50,000-row cap, and the cost of a year ----------
my $fake2 = start_fake(certs => $certs);
my $node2 = phsync_node('cost', $fake2, $certs, 'phsync.page_size' => '50000',
	'phsync.initial_since' => hours_ago(2));
$node2->safe_psql('postgres', 'CREATE EXTENSION phsync');

# a steady stream: one event every 10 minutes for a year, ending 3 hours ago
my $year_from = iso_ago($node2, '368 days');
fake_post($fake2, '/generate', { count => 52560, seed => 20, created_from => $year_from, step_ms => 600_000 });
my $year_until = iso_ago($node2, '3 hours');
fake_post($fake2, '/reset', {});
$bf = $node2->safe_psql('postgres', "SELECT id FROM phsync_backfill('default', '$year_from', '$year_until')");
poll_until(sub { $node2->safe_psql('postgres', "SELECT status FROM phsync.runs WHERE id = $bf") eq 'succeeded' }, 300, 'one-year backfill');
is($node2->safe_psql('postgres', "SELECT rows_inserted FROM phsync.runs WHERE id = $bf"), 52560, 'the year arrives');
my @req = grep { $_->{status} == 200 } @{ fake_requests($fake2) };
my $read = sum(map { $_->{events_read} } @req);
my $worst = max(map { $_->{events_read} / max($_->{rows}, 1) } grep { $_->{rows} >= 1000 } @req);
note(sprintf('one-year backfill: %d requests, %d events read for 52,560 rows (%.2fx), worst request read %.2f events per row returned, most events read by one request: %d',
	scalar(@req), $read, $read / 52560, $worst, max(map { $_->{events_read} } @req)));
ok($read <= 1.5 * 52560, sprintf('PostHog reads each event about once: %.2fx the year in total', $read / 52560));
ok($worst <= 2, sprintf('every full request reads about its own rows: at most %.2f events per row returned', $worst));

# a burst larger than one 50,000-row page, in the last hour
fake_post($fake2, '/reset', { data => JSON::PP::true });
fake_post($fake2, '/generate', { count => 60000, seed => 21, created_from => iso_ago($node2, '70 minutes'), step_ms => 60 });
like(run_now($node2), qr/^succeeded\|\d+\|60000\|60000$/, 'run_now: a 60,000-row hour arrives through the 50,000-row cap');
is($node2->safe_psql('postgres', "SELECT count(*) FROM posthog_events WHERE created_at > now() - interval '2 hours'"), 60000,
	'every row of the burst is there');
my @pages = map { $_->{rows} } grep { $_->{status} == 200 } @{ fake_requests($fake2) };
ok(max(@pages) <= 50000, 'no page is larger than the cap: ' . join(' ', @pages));

# ---------- a plan, not a geometric tail ----------
# 120,000 rows over a day, unevenly: 20,000 spread over 22 hours, then a
# burst of 100,000 in the last 50 minutes.  A window of more than a day is
# counted first, then read in slices of about a page each.
fake_post($fake2, '/reset', { data => JSON::PP::true });
fake_post($fake2, '/generate', { count => 20000, seed => 22, created_from => iso_ago($node2, '23 hours'), step_ms => 3960 });
fake_post($fake2, '/generate', { count => 100000, seed => 23, created_from => iso_ago($node2, '55 minutes'), step_ms => 30 });
$node2->safe_psql('postgres', q{
	SELECT phsync_create_table('events', 'uneven');
	SELECT name FROM phsync_add_sync('uneven', 'uneven', preset => 'events');});
fake_post($fake2, '/reset', {});
my $day_from = iso_ago($node2, '24 hours 30 minutes');
$bf = $node2->safe_psql('postgres', "SELECT id FROM phsync_backfill('uneven', '$day_from', now())");
poll_until(sub { $node2->safe_psql('postgres', "SELECT status FROM phsync.runs WHERE id = $bf") eq 'succeeded' }, 120, 'uneven backfill');
is($node2->safe_psql('postgres', "SELECT rows_received || ' ' || rows_inserted || ' ' || (SELECT count(DISTINCT uuid) FROM uneven) FROM phsync.runs WHERE id = $bf"),
	'120000 120000 120000', 'the 120,000 unevenly spread rows arrive');
my @asked = @{ fake_requests($fake2) };
my @counts = grep { $_->{body}{query}{query} =~ /GROUP BY phsync_bucket/ } @asked;
my @data = map { $_->{rows} } grep { $_->{body}{query}{query} !~ /GROUP BY phsync_bucket/ } @asked;
note('requests for 120,000 uneven rows: one count, then pages of ' . join(' ', @data));
ok(@asked <= 6, sprintf('in at most 6 requests: %d', scalar(@asked)));
is(scalar(@counts), 1, 'one of them the grouped count, first') && is($asked[0]{body}{query}{query} =~ /GROUP BY phsync_bucket/ ? 1 : 0, 1, 'before any page');
is(scalar(grep { $_ == 0 } @data), 0, 'no request comes back empty');
ok(!(grep { $_->{status} != 200 } @asked), 'and none is refused');

# A burst in a wide window: 60,000 rows within 10 minutes of a 30-day
# backfill fall into one bucket of the count (21 minutes wide), which cannot
# be cut; phsync counts that bucket again, finer, and cuts the burst in two
# even halves: two counts, two pages, neither full.
fake_post($fake2, '/reset', { data => JSON::PP::true });
fake_post($fake2, '/generate', { count => 60000, seed => 24, created_from => iso_ago($node2, '3 days'), step_ms => 10 });
$node2->safe_psql('postgres', q{
	SELECT phsync_create_table('events', 'burst');
	SELECT name FROM phsync_add_sync('burst', 'burst', preset => 'events');});
fake_post($fake2, '/reset', {});
$bf = $node2->safe_psql('postgres', "SELECT id FROM phsync_backfill('burst', now() - interval '30 days', now())");
poll_until(sub { $node2->safe_psql('postgres', "SELECT status FROM phsync.runs WHERE id = $bf") eq 'succeeded' }, 120, 'burst backfill');
is($node2->safe_psql('postgres', "SELECT rows_received || ' ' || (SELECT count(DISTINCT uuid) FROM burst) FROM phsync.runs WHERE id = $bf"),
	'60000 60000', 'the 60,000 rows of the burst arrive');
@asked = @{ fake_requests($fake2) };
@counts = grep { $_->{body}{query}{query} =~ /GROUP BY phsync_bucket/ } @asked;
@data = map { $_->{rows} } grep { $_->{body}{query}{query} !~ /GROUP BY phsync_bucket/ } @asked;
note('requests for a burst of 60,000: ' . join(' ', map { $_->{rows} } @asked));
is(scalar(@counts), 2, 'two counts: the window, then the burst\'s bucket finer');
is(scalar(@data), 2, 'then two pages');
ok(!(grep { $_ < 25000 || $_ > 35000 } @data), 'of about half the burst each: ' . join(' ', @data));

done_testing();
