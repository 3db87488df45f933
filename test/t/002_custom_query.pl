# Custom HogQL from phsync.query_file into a custom table with a composite
# unique key; targets phsync refuses, with nothing inserted.
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
my $node = phsync_node('custom', $fake, $certs,
	'phsync.target_table' => 'analytics."Page Views"',
	'phsync.query_file' => 'pageviews.hogql',
	'phsync.cursor_column' => 'seen_at',
	'phsync.page_size' => '4');
$node->safe_psql('postgres', q{
	CREATE EXTENSION phsync;
	CREATE SCHEMA analytics;
	CREATE TABLE analytics."Page Views" (
		who text NOT NULL,
		what text NOT NULL,
		seen_at timestamptz NOT NULL,
		browser text,
		loaded_at timestamptz DEFAULT now(),
		UNIQUE (who, seen_at, what));
	CREATE INDEX ON analytics."Page Views" (seen_at);});

# The query uses {since} itself and renames columns; phsync wraps it.
open my $fh, '>', $node->data_dir . '/pageviews.hogql' or die;
print $fh <<'HOGQL';
-- page views and sign-ups, one row per person and moment
SELECT distinct_id AS who, event AS what, created_at AS seen_at,
       JSONExtractString(properties, '$browser') AS browser
FROM events
WHERE event IN ('$pageview', 'signed_up') AND created_at >= toDateTime({since});
HOGQL
close $fh;

my $t0 = $node->safe_psql('postgres',
	"SELECT to_char(now() - interval '1 day', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')");
# two events per second, 4 event names in turn: half are page views or sign-ups
fake_post($fake, '/generate', { count => 30, seed => 3, created_from => $t0, step_ms => 500 });

my $expected = 15;
is(run_now($node), "succeeded|4|$expected|$expected", 'custom query loads 15 rows in pages of 4');
my $src = fake_get($fake, '/source');
my @want = sort map { join('|', $_->[3], $_->[1], $_->[7] =~ s/T/ /r =~ s/Z$//r) }
  grep { $_->[1] eq '$pageview' || $_->[1] eq 'signed_up' } @$src;
my @got = split /\n/, $node->safe_psql('postgres', q{
	SELECT who || '|' || what || '|' || to_char(seen_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')
	         || CASE WHEN extract(microseconds FROM seen_at)::int % 1000000 <> 0
	                 THEN to_char(seen_at AT TIME ZONE 'UTC', '.US') ELSE '' END
	FROM analytics."Page Views" ORDER BY 1});
@want = sort @want;
is_deeply(\@got, \@want, 'exactly the matching events, keyed by (who, seen_at, what)');
is($node->safe_psql('postgres', q{SELECT count(*) FROM analytics."Page Views" WHERE browser IN ('Chrome', 'Firefox', 'Safari') AND loaded_at IS NOT NULL}),
	$expected, 'computed column mapped by name; unselected column took its default');

my $reqs = fake_requests($fake);
like($reqs->[1]{body}{query}{query}, qr/^SELECT \*\nFROM \(\n-- page views.*\n\) AS phsync_q\nWHERE seen_at >= toDateTime\(\{since\}\) AND seen_at < toDateTime\(\{until\}\)/s,
	'custom query is wrapped, the trailing semicolon dropped');
like($reqs->[1]{body}{query}{query}, qr/ORDER BY seen_at, who, what\nLIMIT 4$/, 'ordered by cursor then the rest of the unique key');
like(run_now($node), qr/^succeeded\|\d+\|\d+\|0$/, 'second run adds nothing');

# A result column the table lacks: the run fails before inserting anything.
$node->safe_psql('postgres', q{TRUNCATE analytics."Page Views"});
open $fh, '>', $node->data_dir . '/pageviews.hogql' or die;
print $fh "SELECT distinct_id AS who, event AS what, created_at AS seen_at, uuid AS event_uuid FROM events\n";
close $fh;
like(run_now($node), qr/^ERROR: .*ERROR:  column "event_uuid" returned by the query does not exist in table analytics."Page Views"\nHINT:  Add the column to the table, or rename or drop it in the query\.\nCONTEXT:  phsync run \d+ of sync default/,
	'unknown result column: clear error naming it');
is($node->safe_psql('postgres', q{SELECT count(*) FROM analytics."Page Views"}), 0, 'nothing inserted');
is(last_run($node)->{status}, 'failed', 'run recorded as failed');

# A target without a unique key.
$node->safe_psql('postgres', q{
	CREATE TABLE public.loose (who text, what text, seen_at timestamptz);});
$node->append_conf('postgresql.conf', "phsync.target_table = 'public.loose'\n");
$node->reload;
poll_until(sub { $node->safe_psql('postgres', 'SHOW phsync.target_table') eq 'public.loose' }, 30, 'reload');
# the worker reloads on SIGHUP too; give it the same view
like(run_now($node), qr/ERROR:  target table public.loose has no primary key or unique constraint\nDETAIL:  phsync skips or updates rows it already has with ON CONFLICT, which needs a unique key\.\nHINT:  Add one on the columns that identify a row, for example: ALTER TABLE public.loose ADD PRIMARY KEY \(uuid\);\nCONTEXT:  phsync run \d+ of sync default/,
	'target without a unique key: clear error with a fix');
is($node->safe_psql('postgres', 'SELECT count(*) FROM public.loose'), 0, 'nothing inserted');
like(last_run($node)->{error}, qr/^target table public.loose has no primary key or unique constraint: phsync skips or updates rows/, 'the run row tells why');

# A custom target that does not exist.
$node->append_conf('postgresql.conf', "phsync.target_table = 'public.nowhere'\n");
$node->reload;
poll_until(sub { $node->safe_psql('postgres', 'SHOW phsync.target_table') eq 'public.nowhere' }, 30, 'reload');
like(run_now($node), qr/ERROR:  target table public.nowhere does not exist/, 'missing custom target: clear error');
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_class WHERE relname = 'nowhere'"), 0, 'and it is not created');

done_testing();
