# Core sync: first run, idempotent second run, late events, many rows sharing
# one cursor value across page boundaries, and what goes over the wire.
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
my $node = phsync_node('sync', $fake, $certs, 'phsync.lookback' => '10min');
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');

# 35 events, one every 5 minutes, starting two days ago
my $t0 = $node->safe_psql('postgres',
	"SELECT to_char(now() - interval '2 days', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')");
fake_post($fake, '/generate', { count => 35, seed => 1, created_from => $t0, step_ms => 300_000 });

# First run: creates the table and loads the whole window, 10 rows a page.
# The built-in query reads slices of created_at, each bounding `timestamp`
# too: the first covers a day, and each nearly empty one doubles the next
# (1, 2, 4, 8 days, then the rest of the 30 days, where the rows are).
is(run_now($node), 'succeeded|8|35|35', 'first run loads all 35 rows: 4 pages of rows after 4 empty slices');
is(source_equals_target($node, $fake), 0, 'target equals the source, every column');
is($node->safe_psql('postgres', q{
	SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod), ', ' ORDER BY a.attnum)
	FROM pg_attribute a WHERE a.attrelid = 'public.posthog_events'::regclass AND a.attnum > 0}),
	'uuid uuid, event text, timestamp timestamp with time zone, distinct_id text, '
	  . 'person_id uuid, properties jsonb, elements_chain text, created_at timestamp with time zone',
	'built-in target table has the expected columns');
is($node->safe_psql('postgres', q{
	SELECT string_agg(pg_get_indexdef(indexrelid), '; ' ORDER BY indexrelid)
	FROM pg_index WHERE indrelid = 'public.posthog_events'::regclass}),
	'CREATE UNIQUE INDEX posthog_events_pkey ON public.posthog_events USING btree (uuid); '
	  . 'CREATE INDEX posthog_events_created_at_idx ON public.posthog_events USING btree (created_at)',
	'primary key on uuid and an index on the cursor column');
is($node->safe_psql('postgres',
	"SELECT jsonb_typeof(properties) || ' ' || (properties->>'note') FROM posthog_events LIMIT 1"),
	'object café "quoted" \\ back', 'properties arrive as a jsonb object, escapes intact');

my $run = last_run($node);
is($run->{trigger}, 'manual', 'run is recorded as manual');
ok($run->{window_from} && $run->{window_until}, 'run records its window');
is($node->safe_psql('postgres', "SELECT window_until < now() - interval '29 seconds' AND window_until > now() - interval '5 minutes' FROM phsync.runs WHERE id = $run->{id}"),
	't', 'window ends 30 seconds before the run started');
is($node->safe_psql('postgres', "SELECT now() - window_from BETWEEN interval '30 days' AND interval '30 days 5 minutes' FROM phsync.runs WHERE id = $run->{id}"),
	't', 'first window starts 30 days back');

# What went over the wire
my $reqs = fake_requests($fake);
is(scalar(@$reqs), 8, 'eight requests for eight pages');
is(join(',', map { $_->{rows} // 0 } @$reqs), '0,0,0,0,10,10,10,5', 'rows per request');
my %ids;
for my $r (@$reqs)
{
	$ids{ $r->{body}{client_query_id} }++;
}
is(scalar(keys %ids), 8, 'each request has its own client_query_id');
ok(!(grep { ($_->{body}{refresh} // '') ne 'force_blocking' } @$reqs), 'every request sends refresh=force_blocking');
ok(!(grep { !$_->{auth_ok} } @$reqs), 'every request carries the bearer key');
ok(!(grep { ($_->{accept_encoding} // '') !~ /gzip/ } @$reqs), 'every request accepts gzip');
ok(!(grep { ($_->{body}{name} // '') ne 'phsync default' } @$reqs), 'every request is named after its sync');
my @slices = map { [ $_->{body}{query}{values}{slice_from}, $_->{body}{query}{values}{slice_until} ] } @$reqs;
is(scalar(grep { !defined $_->[0] } @slices), 0, 'every request reads a slice');
my $q2 = $reqs->[5]{body}{query};
like($q2->{query}, qr/created_at >= toDateTime\(\{since\}\) AND created_at < toDateTime\(\{until\}\)/, 'window on created_at through placeholders');
like($q2->{query}, qr/timestamp >= toDateTime\(\{timestamp_since\}\) AND timestamp < toDateTime\(\{timestamp_until\}\)/, 'timestamp bounded too, on both sides');
like($q2->{query}, qr/created_at > toDateTime\(\{after_0\}\)\)\s+OR \(created_at = toDateTime\(\{after_0\}\) AND uuid > toUUID\(\{after_1\}\)\)/,
	'keyset condition on (created_at, uuid) through placeholders');
unlike($q2->{query}, qr/OFFSET|\d{4}-\d\d-\d\d/i, 'no OFFSET and no literal timestamps in the HogQL text');
# the source is in ClickHouse order: row 10 is the last row of page 1
is($q2->{values}{after_1}, fake_get($fake, '/source')->[9][0],
	'keyset position is the uuid of the last row of the previous page');
like($q2->{query}, qr/ORDER BY created_at, uuid\s+LIMIT 10$/, 'ordered by cursor then key, limited to the page size');

# Second run: nothing new, nothing duplicated.
fake_post($fake, '/reset');
my $before = last_run($node);
like(run_now($node), qr/^succeeded\|\d+\|\d+\|0$/, 'second run inserts nothing');
is(target_count($node), 35, 'still 35 rows');
$run = last_run($node);
is($node->safe_psql('postgres', "SELECT window_from = (SELECT max(created_at) FROM posthog_events) - interval '10 minutes' FROM phsync.runs WHERE id = $run->{id}"),
	't', 'second window starts at the watermark minus the lookback');
is($run->{rows_received}, 3, 'the lookback re-read the last 10 minutes only (3 rows, start inclusive)');

# Later rows, including an event whose timestamp is 3 days old but that
# PostHog ingested just now: the created_at cursor does not lose it.
my $new = $node->safe_psql('postgres',
	"SELECT to_char(now() - interval '1 minute', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')");
my $old = $node->safe_psql('postgres',
	"SELECT to_char(now() - interval '3 days', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')");
fake_post($fake, '/events', [
	{ uuid => '00000000-0000-4000-8000-00000000000a', event => 'late', timestamp => $old,
	  created_at => $new, distinct_id => 'mobile', properties => { offline => JSON::PP::true } },
	{ uuid => '00000000-0000-4000-8000-00000000000b', event => 'fresh',
	  created_at => $new, distinct_id => 'web', properties => {} } ]);
like(run_now($node), qr/^succeeded\|\d+\|\d+\|2$/, 'third run inserts the two new rows');
is(source_equals_target($node, $fake), 0, 'target equals the source after the late event');
is($node->safe_psql('postgres', "SELECT event, \"timestamp\" < now() - interval '2 days' FROM posthog_events WHERE uuid = '00000000-0000-4000-8000-00000000000a'"),
	'late|t', 'the late event arrived with its old timestamp');

# 25 rows sharing one created_at: pages of 10 cut through them; every row
# arrives exactly once.  Timestamps without a fraction, as PostHog sends them.
my $same = $node->safe_psql('postgres',
	"SELECT to_char(date_trunc('second', now()) - interval '40 seconds', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')");
fake_post($fake, '/generate', { count => 25, seed => 7, created_from => $same, step_ms => 0, whole_seconds => 1 });
like(run_now($node), qr/^succeeded\|\d+\|\d+\|25$/, '25 rows with one cursor value are inserted');
is(source_equals_target($node, $fake), 0, 'target equals the source: each of them exactly once');
is(target_count($node), 62, '62 rows in all');

# A bigger page size is one request for everything new.
$node->append_conf('postgresql.conf', "phsync.page_size = 50000\n");
$node->reload;
fake_post($fake, '/reset');
fake_post($fake, '/generate', { count => 120, seed => 9, created_from => $t0, step_ms => 1000 });
like(run_now($node), qr/^succeeded\|1\|\d+\|0$/, 'rows older than the watermark minus lookback are not re-read');
is(scalar(@{ fake_requests($fake) }), 1, 'one request with page_size 50000');

done_testing();
