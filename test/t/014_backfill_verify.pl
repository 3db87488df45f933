# Backfills (queued, resumable, idempotent), the completeness check with
# repair, the scheduled check of yesterday, and a range-partitioned target.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/../perl";
use PhsyncTest;

my $certs = make_certs();
my $fake = start_fake(certs => $certs);
my $node = phsync_node('backfill', $fake, $certs, 'phsync.page_size' => '20');
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');

# 10 days of events, one every 40 minutes, whole seconds
my $start = $node->safe_psql('postgres',
	q{SELECT to_char(date_trunc('day', now() AT TIME ZONE 'UTC') - interval '10 days', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')});
fake_post($fake, '/generate', { count => 360, seed => 11, created_from => $start, step_ms => 2_400_000, whole_seconds => 1 });
my $day = sub { $node->safe_psql('postgres', "SELECT (date_trunc('day', now() AT TIME ZONE 'UTC') - interval '$_[0] days') AT TIME ZONE 'UTC'") };
my $d3 = $day->(3);
my $d10 = $day->(10);

# regular runs only go back to phsync.initial_since
set_conf($node, 'phsync.initial_since' => $d3 =~ s/\+00$//r);
like(run_now($node), qr/^succeeded\|/, 'first run');
is($node->safe_psql('postgres', "SELECT min(created_at) >= '$d3' FROM posthog_events"), 't', 'it starts at phsync.initial_since');
my $recent = target_count($node);

# ---------- backfill ----------
# it fails half-way: two pages pass, the third request is refused
fake_post($fake, '/reset', {});
fake_post($fake, '/faults', [ { delay_ms => 1, count => 2 }, { status => 400, detail => 'Injected refusal' } ]);
my $queued = $node->safe_psql('postgres', "SELECT id || ' ' || status || ' ' || trigger FROM phsync_backfill('default', '$d10', '$d3')");
like($queued, qr/^\d+ queued backfill$/, 'phsync_backfill() queues a run and returns its row');
my ($bf1) = split / /, $queued;
poll_until(sub { $node->safe_psql('postgres', "SELECT status FROM phsync.runs WHERE id = $bf1") eq 'failed' }, 60, 'backfill fails');
is($node->safe_psql('postgres', "SELECT rows_inserted FROM phsync.runs WHERE id = $bf1"), 36,
	'it loaded two pages before failing (the first day: a slice of 36 rows, pages of 20)');
my $progress = $node->safe_psql('postgres', "SELECT max(created_at) FROM posthog_events WHERE created_at < '$d3'");

fake_post($fake, '/reset', {});
my $bf2 = $node->safe_psql('postgres', "SELECT id FROM phsync_backfill('default', '$d10', '$d3')");
poll_until(sub { $node->safe_psql('postgres', "SELECT status FROM phsync.runs WHERE id = $bf2") eq 'succeeded' }, 60, 'backfill resumes');
my $since = fake_requests($fake)->[0]{body}{query}{values}{since};
is($node->safe_psql('postgres', "SELECT '$since'::timestamptz = greatest('$d10'::timestamptz, '$progress'::timestamptz - interval '10 minutes')"),
	't', 'the second backfill starts at its progress, max(created_at) in the range, less the lookback');
is($node->safe_psql('postgres', "SELECT trigger || ' ' || window_from || ' ' || window_until FROM phsync.runs WHERE id = $bf2"),
	"backfill $d10 $d3", 'the run row keeps the range asked for');
is(source_equals_target($node, $fake), 0, 'after the backfill the table holds every event, once');
is($node->safe_psql('postgres', "SELECT (SELECT rows_inserted FROM phsync.runs WHERE id = $bf1) + (SELECT rows_inserted FROM phsync.runs WHERE id = $bf2)"),
	target_count($node) - $recent, 'the two backfills inserted the older rows exactly once between them');
my $bf3 = $node->safe_psql('postgres', "SELECT id FROM phsync_backfill('default', '$d10', '$d3')");
poll_until(sub { $node->safe_psql('postgres', "SELECT status FROM phsync.runs WHERE id = $bf3") eq 'succeeded' }, 60, 'backfill again');
is($node->safe_psql('postgres', "SELECT rows_inserted FROM phsync.runs WHERE id = $bf3"), 0, 'running it again inserts nothing');

my ($ret, $out, $err) = $node->psql('postgres', "SELECT phsync_backfill('nope', '$d10', '$d3')");
like($err, qr/ERROR:  sync "nope" does not exist/, 'backfill of an unknown sync: clear error');
($ret, $out, $err) = $node->psql('postgres', "SELECT phsync_backfill('default', '$d3', '$d10')");
like($err, qr/ERROR:  "from" must be before "to"/, 'backfill of an empty range: clear error');
($ret, $out, $err) = $node->psql('postgres', "BEGIN; SELECT phsync_backfill('default', '$d10', '$d3'); ROLLBACK;");
is($node->safe_psql('postgres', "SELECT count(*) FROM phsync.runs WHERE status = 'queued'"), 0, 'a rolled-back backfill is not queued');

# ---------- verify and repair ----------
my $d5 = $day->(5);
my $d7 = $day->(7);
my $deleted = $node->safe_psql('postgres', qq{
	WITH d AS (DELETE FROM posthog_events
	           WHERE (created_at >= '$d7' AND created_at < '$d7'::timestamptz + interval '1 day' AND extract(minute FROM created_at)::int % 3 = 0)
	              OR (created_at >= '$d5' AND created_at < '$d5'::timestamptz + interval '1 day' AND extract(hour FROM created_at) < 6)
	           RETURNING created_at)
	SELECT count(*) FILTER (WHERE created_at < '$d5') || ' ' || count(*) FILTER (WHERE created_at >= '$d5') FROM d});
my ($gone7, $gone5) = split / /, $deleted;
ok($gone7 > 0 && $gone5 > 0, "deleted $gone7 rows on one day and $gone5 on another");

my %per_day;
for my $e (@{ fake_get($fake, '/source') })
{
	$per_day{ substr($e->[7], 0, 10) }++;
}
my $verify = $node->safe_psql('postgres', qq{
	SELECT string_agg(to_char(bucket AT TIME ZONE 'UTC', 'YYYY-MM-DD') || ' ' || posthog_count || ' ' || local_count || ' ' || status, ',' ORDER BY bucket)
	FROM phsync_verify('default', '$d10', '$d3')});
my @want;
my @days = split /\n/, $node->safe_psql('postgres',
	"SELECT to_char(d, 'YYYY-MM-DD') FROM generate_series('$d10'::timestamptz, '$d3'::timestamptz - interval '1 day', '1 day') d");
for my $i (0 .. $#days)
{
	my $n = $per_day{ $days[$i] } // 0;
	my $local = $n - ($i == 3 ? $gone7 : $i == 5 ? $gone5 : 0);
	push @want, "$days[$i] $n $local " . ($local == $n ? 'ok' : 'missing');
}
is($verify, join(',', @want), 'verify reports exactly the two days with deleted rows, with both counts');
is($node->safe_psql('postgres', q{SELECT trigger || ' ' || status || ' ' || verify_mismatches FROM phsync.runs ORDER BY id DESC LIMIT 1}),
	'verify succeeded 2', 'the verification is a phsync.runs row with its number of differing buckets');

my $repair = $node->safe_psql('postgres', qq{
	SELECT string_agg(to_char(bucket AT TIME ZONE 'UTC', 'YYYY-MM-DD') || ' ' || status, ',' ORDER BY bucket)
	FROM phsync_verify('default', '$d10', '$d3', repair => true) WHERE status <> 'ok'});
is($repair, "$days[3] repaired,$days[5] repaired", 'repair fetches the two days again');
is($node->safe_psql('postgres', q{SELECT rows_inserted || ' ' || verify_mismatches FROM phsync.runs ORDER BY id DESC LIMIT 1}),
	($gone7 + $gone5) . ' 0', 'and restores exactly the deleted rows');
is(source_equals_target($node, $fake), 0, 'the table equals PostHog again');

# hourly buckets, and a row PostHog no longer has
my $lost = fake_get($fake, '/source')->[200];
fake_post($fake, '/delete', { uuids => [ $lost->[0] ] });
is($node->safe_psql('postgres', qq{
	SELECT string_agg(to_char(bucket AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24') || ' ' || posthog_count || ' ' || local_count || ' ' || status, ',')
	FROM phsync_verify('default', '$d10', '$d3', bucket => '1 hour') WHERE status <> 'ok'}),
	$node->safe_psql('postgres', "SELECT to_char(date_trunc('hour', '$lost->[7]'::timestamptz) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24')")
	  . ' ' . ($node->safe_psql('postgres', "SELECT count(*) FROM posthog_events WHERE date_trunc('hour', created_at) = date_trunc('hour', '$lost->[7]'::timestamptz)") - 1)
	  . ' ' . $node->safe_psql('postgres', "SELECT count(*) FROM posthog_events WHERE date_trunc('hour', created_at) = date_trunc('hour', '$lost->[7]'::timestamptz)")
	  . ' extra',
	'hourly buckets; a row PostHog lost shows as extra');
($ret, $out, $err) = $node->psql('postgres', "SELECT * FROM phsync_verify('default', '$d10', '$d3', bucket => '1 month')");
like($err, qr/ERROR:  bucket must be given in days, hours or smaller units, not months/, 'month buckets refused');
($ret, $out, $err) = $node->psql('postgres', "SELECT * FROM phsync_verify('default', '-infinity', 'infinity')");
like($err, qr/ERROR:  "from" and "to" must be finite timestamps/, 'infinite bounds refused');
($ret, $out, $err) = $node->psql('postgres', "SELECT * FROM phsync_verify('default', '$d10', '$d3', bucket => '1.5 seconds')");
like($err, qr/ERROR:  bucket must be a whole number of seconds/, 'fractional buckets refused');

# ---------- the scheduled run verifies yesterday ----------
my $at = $node->safe_psql('postgres', "SELECT to_char(now() AT TIME ZONE 'UTC' + interval '3 seconds', 'HH24:MI:SS')");
my $last = $node->safe_psql('postgres', 'SELECT max(id) FROM phsync.runs');
set_conf($node, 'phsync.verify' => 'on', 'phsync.interval' => '1d', 'phsync.run_at' => $at);
poll_until(sub { $node->safe_psql('postgres', "SELECT count(*) FROM phsync.runs WHERE id > $last AND status <> 'running'") == 2 }, 60,
	'scheduled run and verification');
my $d1 = $day->(1);
my $d0 = $day->(0);
is($node->safe_psql('postgres', "SELECT string_agg(trigger || ' ' || status || ' ' || coalesce(verify_mismatches::text, '-'), ',' ORDER BY id) FROM phsync.runs WHERE id > $last"),
	'schedule succeeded -,verify succeeded 0', 'a scheduled run of the events sync is followed by a check');
is($node->safe_psql('postgres', "SELECT window_from || ' ' || window_until FROM phsync.runs WHERE trigger = 'verify' ORDER BY id DESC LIMIT 1"),
	"$d1 $d0", 'of yesterday, midnight to midnight');
is($node->safe_psql('postgres', "SELECT last_verify_mismatches FROM phsync.status WHERE sync = 'default'"), 0,
	'phsync.status shows the last verification');
set_conf($node, 'phsync.interval' => '3650d', 'phsync.run_at' => '00:00');

# ---------- a range-partitioned target ----------
$node->safe_psql('postgres', qq{
	CREATE TABLE events_by_day (LIKE posthog_events, PRIMARY KEY (uuid, "timestamp")) PARTITION BY RANGE ("timestamp");
	CREATE INDEX ON events_by_day (created_at);
	CREATE TABLE events_old PARTITION OF events_by_day FOR VALUES FROM (MINVALUE) TO ('$d5');
	CREATE TABLE events_new PARTITION OF events_by_day FOR VALUES FROM ('$d5') TO (MAXVALUE);
	SELECT phsync_add_sync('by_day', 'events_by_day', preset => 'events', lookback => '10 minutes');});
is($node->safe_psql('postgres', "SELECT id FROM phsync_backfill('by_day', '$d10', '$d0')") > 0, 1, 'backfill into the partitioned table');
poll_until(sub { $node->safe_psql('postgres', "SELECT status FROM phsync.runs WHERE trigger = 'backfill' AND sync = 'by_day'") eq 'succeeded' }, 60, 'partitioned backfill');
is(source_equals_target($node, $fake, 'events_by_day'), 0, 'the partitioned table holds every event');
is($node->safe_psql('postgres', qq{SELECT count(*) FROM events_old WHERE "timestamp" >= '$d5'}) + $node->safe_psql('postgres', qq{SELECT count(*) FROM events_new WHERE "timestamp" < '$d5'}),
	0, 'each row is in its partition');
my $reqs = fake_requests($fake);
like($reqs->[-1]{body}{query}{query}, qr/ORDER BY created_at, uuid, timestamp\n/, 'the key includes the partition key, and phsync pages by it');
like($node->safe_psql('postgres', "SELECT status || ' ' || rows_inserted FROM phsync_run_now('by_day')"), qr/^succeeded 0$/,
	'a regular run of the partitioned sync adds nothing twice');
done_testing();
