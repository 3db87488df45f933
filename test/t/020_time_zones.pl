# Projects outside UTC.  PostHog renders every DateTime in the project's
# time zone with its offset ("2026-11-02T08:34:05.123456+05:30").  The
# built-in timestamptz target holds the right instants; a custom target
# whose cursor is `timestamp without time zone` or that has a `date` column
# holds UTC, so that its watermark is right and later runs skip nothing,
# over many runs with late rows; across a daylight-saving change the
# keyset pages stay in order; phsync_doctor() names the project's time zone.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use JSON::PP;
use FindBin;
use lib "$FindBin::Bin/../perl";
use PhsyncTest;

my $certs = make_certs();
my $k2 = 'phx_second_project_key_0123456789';
my $fake = start_fake(certs => $certs,
	projects => [ [ '1', $API_KEY, 'Asia/Kolkata' ], [ '2', $k2, 'America/Los_Angeles' ] ]);

# ---------- Asia/Kolkata (+05:30) ----------
# the server's own zone is neither UTC nor the project's: nothing may depend on it
my $node = phsync_node('kolkata', $fake, $certs, 'phsync.initial_since' => hours_ago(8),
	'timezone' => 'Europe/Berlin');
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');
$node->safe_psql('postgres', q{
	CREATE TABLE ev_local (uuid uuid PRIMARY KEY, event text, created_at timestamp NOT NULL,
	                       created_day date NOT NULL, ts timestamp);
	SELECT phsync_add_sync('local', 'ev_local', "cursor" => 'created_at', query => $$
	  SELECT uuid, event, created_at, created_at AS created_day, timestamp AS ts FROM events $$);});

my $d = $node->safe_psql('postgres',
	q{SELECT detail FROM phsync_doctor() WHERE item = 'auth'});
is($d, 'the API key runs queries in project 1; its time zone is Asia/Kolkata', 'phsync_doctor() shows the project\'s time zone');

fake_post($fake, '/generate', { count => 1, seed => 1, created_from => iso_ago($node, '7 hours') });
my $sample = fake_get($fake, '/source')->[0][7];
like($sample, qr/\+05:30$/, "the fake renders DateTimes with the offset: $sample");

# the local table equals the source in UTC, column for column
sub local_diff
{
	my $json = encode_json(fake_get($fake, '/source'));
	$json =~ s/\$j\$//g;
	return $node->safe_psql('postgres', qq{
		SET TimeZone = 'Pacific/Auckland';
		WITH src AS (
			SELECT (r->>0)::uuid AS uuid, r->>1 AS event,
			       (r->>7)::timestamptz AT TIME ZONE 'UTC' AS created_at,
			       ((r->>7)::timestamptz AT TIME ZONE 'UTC')::date AS created_day,
			       (r->>2)::timestamptz AT TIME ZONE 'UTC' AS ts
			FROM jsonb_array_elements(\$j\$$json\$j\$::jsonb) r),
		a AS (SELECT * FROM src EXCEPT ALL SELECT * FROM ev_local),
		b AS (SELECT * FROM ev_local EXCEPT ALL SELECT * FROM src)
		SELECT (SELECT count(*) FROM a) || ' ' || (SELECT count(*) FROM b)});
}

# many runs; between them new rows, and late rows (old timestamp, new created_at)
my $total = 1;
for my $round (1 .. 6)
{
	fake_post($fake, '/generate', { count => 40, seed => 200 + $round,
		created_from => iso_ago($node, (7 - $round) . ' hours'), step_ms => 30_000 });
	fake_post($fake, '/events', [ map { { event => 'late', distinct_id => "late-$round-$_",
		timestamp => iso_ago($node, '3 days'), created_at => iso_ago($node, (7 - $round) . ' hours') } } 1 .. 3 ]);
	$total += 43;
	my @runs = split /\n/, $node->safe_psql('postgres',
		q{SELECT sync || ' ' || status FROM phsync_run_now() ORDER BY sync});
	is(join(',', @runs), 'default succeeded,local succeeded', "round $round: both syncs succeed");
	is(local_diff(), '0 0', "round $round: the timestamp/date target equals the source in UTC");
	is(source_equals_target($node, $fake), 0, "round $round: the timestamptz target equals the source");
}
is($node->safe_psql('postgres', 'SELECT count(*) FROM ev_local'), $total, "all $total rows, none skipped by a shifted watermark");
is($node->safe_psql('postgres', q{
	SELECT max(created_at) = (SELECT max(created_at) AT TIME ZONE 'UTC' FROM posthog_events) FROM ev_local}),
	't', 'the timestamp watermark is UTC wall-clock time, the same instant as the timestamptz one');

# verify counts by the cursor in UTC on both kinds of target
my ($vf, $vt) = split /\|/, $node->safe_psql('postgres',
	q{SELECT date_trunc('hour', min(created_at)) || '|' || date_trunc('hour', max(created_at)) + interval '1 hour' FROM posthog_events});
is($node->safe_psql('postgres', "SELECT count(*) FROM phsync_verify('local', '$vf', '$vt', bucket => '1 hour') WHERE status <> 'ok'"),
	0, 'verify of the timestamp target: every hour matches');
$node->stop;

# ---------- America/Los_Angeles, across the end of daylight saving time ----------
# 2026-11-01 09:00 UTC: 02:00 PDT (-07:00) becomes 01:00 PST (-08:00), so
# the wall-clock hour 01:00-02:00 happens twice
my $node2 = phsync_node('los_angeles', $fake, $certs, 'phsync.project_id' => '2',
	'phsync.api_key' => $k2, 'phsync.initial_since' => '2026-11-01T06:00:00Z');
$node2->safe_psql('postgres', 'CREATE EXTENSION phsync');
fake_post($fake, '/generate?project=2', { count => 720, seed => 33,
	created_from => '2026-11-01T07:00:00Z', step_ms => 20_000 });
$node2->safe_psql('postgres', q{
	CREATE TABLE ev_local (uuid uuid PRIMARY KEY, event text, created_at timestamp NOT NULL,
	                       created_day date NOT NULL, ts timestamp);
	SELECT phsync_add_sync('local', 'ev_local', "cursor" => 'created_at', query => $$
	  SELECT uuid, event, created_at, created_at AS created_day, timestamp AS ts FROM events $$);});
my @offsets = map { $_->[7] =~ /([+-]\d\d:\d\d)$/ ? $1 : 'Z' } @{ fake_get($fake, '/source?project=2') };
my %seen;
$seen{$_}++ for @offsets;
is(join(' ', map { "$_=$seen{$_}" } sort keys %seen), '-07:00=360 -08:00=360', 'half the rows before the change, half after');
is(join(',', split /\n/, $node2->safe_psql('postgres', q{SELECT sync || ' ' || status || ' ' || rows_inserted FROM phsync_run_now() ORDER BY sync})),
	'default succeeded 720,local succeeded 720', 'both syncs read the 720 rows in pages of 10 through the repeated hour');
my $json = encode_json(fake_get($fake, '/source?project=2'));
$json =~ s/\$j\$//g;
is($node2->safe_psql('postgres', qq{
	WITH src AS (SELECT (r->>0)::uuid AS uuid, (r->>7)::timestamptz AT TIME ZONE 'UTC' AS created_at
	             FROM jsonb_array_elements(\$j\$$json\$j\$::jsonb) r)
	SELECT count(*) FROM src FULL JOIN ev_local USING (uuid)
	WHERE src.created_at IS DISTINCT FROM ev_local.created_at}), 0,
	'the timestamp target holds each row\'s UTC time, none shifted by an hour');
is($node2->safe_psql('postgres', q{SELECT min(created_at) || ' ' || max(created_at) FROM ev_local}),
	'2026-11-01 07:00:00 2026-11-01 10:59:40', 'from 07:00 to 10:59:40 UTC');
is($node2->safe_psql('postgres', q{SELECT count(*) FROM ev_local WHERE created_day <> '2026-11-01'}), 0,
	'the date column holds the UTC date');

done_testing();
