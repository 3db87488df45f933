# PostHog from SQL: phsync_query() (records, with a column definition
# list) and phsync_query_json(), placeholders, Ctrl-C/statement_timeout
# that cancel the query on PostHog's side, PostHog's row caps said out
# loud, and the postgres_fdw security model (the caller's own user
# mapping; none, no query).  Discovery: phsync_describe(), phsync_tables(),
# and the round trip describe -> phsync_create_table() -> add the sync ->
# run -> the table equals what PostHog computes.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use JSON::PP;
use FindBin;
use lib "$FindBin::Bin/../perl";
use PhsyncTest;

my $certs = make_certs();
my $fake = start_fake(certs => $certs, config => { row_cap => 10000 });
my $node = phsync_node('query', $fake, $certs, 'phsync.initial_since' => hours_ago(30));
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');
my $url = $fake->{url};
my $ca = $certs->{ca};

sub psql_err
{
	my ($sql, $role) = @_;
	my ($ret, $out, $err) = $node->psql('postgres', ($role ? "SET ROLE $role;\n" : '') . $sql);
	return $ret == 0 ? "OK: $out" . ($err ? "\n$err" : '') : $err;
}

fake_post($fake, '/generate', { count => 40, seed => 41, created_from => iso_ago($node, '20 hours'), step_ms => 1_200_000 });
my @source = @{ fake_get($fake, '/source') };
my %per_event;
$per_event{ $_->[1] }++ for @source;

# ---------- records and jsonb, as a superuser with the settings ----------
is($node->safe_psql('postgres', q{
	SELECT string_agg(event || '=' || n, ',' ORDER BY event)
	FROM phsync_query('SELECT event, count() AS n FROM events GROUP BY event') AS t(event text, n bigint)}),
	join(',', map { "$_=$per_event{$_}" } sort keys %per_event), 'phsync_query(): rows typed by the column definition list');
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM phsync_query('SELECT uuid, created_at, properties FROM events ORDER BY created_at LIMIT 1000')
	  AS t(uuid uuid, created_at timestamptz, properties jsonb)
	WHERE properties ? '$browser'}), 40, 'uuid, timestamptz and jsonb columns');
is($node->safe_psql('postgres', qq{
	SELECT created_at = '$source[0][7]'::timestamptz AT TIME ZONE 'UTC'
	FROM phsync_query('SELECT created_at FROM events ORDER BY created_at LIMIT 1') AS t(created_at timestamp)}),
	't', 'a timestamp column gets UTC');
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM phsync_query('SELECT uuid FROM events WHERE event = {e} LIMIT 1000', "values" => '{"e": "$pageview"}')
	  AS t(uuid uuid)}), $per_event{'$pageview'}, 'values fill {placeholders}');
is($node->safe_psql('postgres', q{
	SELECT string_agg(j->>'event', ',' ORDER BY j->>'created_at')
	FROM phsync_query_json('SELECT event, created_at FROM events ORDER BY created_at LIMIT 3') j}),
	join(',', map { $_->[1] } @source[0 .. 2]), 'phsync_query_json(): one object per row');
like($node->safe_psql('postgres', q{SELECT phsync_query_json('SELECT 1 AS one, ''a'' AS s, [1, 2] AS arr, NULL AS nothing')::text}),
	qr/^\{"s": "a", "arr": \[1, 2\], "one": 1, "nothing": null\}$/, 'JSON values keep their JSON types');
like(psql_err(q{SELECT * FROM phsync_query('SELECT event, count() AS n FROM events GROUP BY event') AS t(event text)}),
	qr/ERROR:  the column definition list has 1 columns, the query returns 2/, 'a wrong column definition list is refused');
like(psql_err(q{SELECT * FROM phsync_query('SELECT nope FROM events') AS t(x text)}),
	qr/ERROR:  PostHog request failed with HTTP status 400\nDETAIL:  Unable to resolve field: nope/, 'PostHog\'s own error for a bad query');
like(psql_err(q{SELECT * FROM phsync_query('SELECT 1', "values" => '[1]') AS t(x int)}),
	qr/ERROR:  values must be a JSON object/, 'values must be an object');

# ---------- PostHog's caps, said out loud ----------
is(psql_err(q{SELECT count(*) FROM phsync_query('SELECT uuid FROM events') AS t(uuid uuid)}),
	'OK: 40', 'no LIMIT, and all rows fit in PostHog\'s 100: no warning');
fake_post($fake, '/generate', { count => 10060, seed => 42, created_from => iso_ago($node, '10 hours'), step_ms => 1000 });
like(psql_err(q{SELECT count(*) FROM phsync_query('SELECT uuid FROM events') AS t(uuid uuid)}),
	qr/^OK: 100\n(psql:<stdin>:\d+: )?WARNING:  PostHog returned only the first 100 rows\nDETAIL:  The query has no LIMIT/, 'no LIMIT: PostHog\'s 100 rows, with a WARNING');
like(psql_err(q{SELECT count(*) FROM phsync_query('SELECT uuid FROM events LIMIT 20000') AS t(uuid uuid)}),
	qr/^OK: 10000\n(psql:<stdin>:\d+: )?WARNING:  PostHog returned 10000 rows, the most it returns for one query: there may be more/,
	'a LIMIT above the server\'s cap: 10,000 rows and a WARNING that names the cap');

# ---------- cancel ----------
fake_post($fake, '/reset', {});
fake_post($fake, '/faults', [ { delay_ms => 60_000 } ]);
my $t0 = time();
like(psql_err(q{SET statement_timeout = '1s'; SELECT * FROM phsync_query('SELECT 1') AS t(x int)}),
	qr/ERROR:  canceling statement due to statement timeout/, 'statement_timeout stops a slow query');
ok(time() - $t0 < 10, sprintf('at once (%.1f s), not after the 60 s PostHog takes', time() - $t0));
ok(poll_until(sub { @{ fake_get($fake, '/cancels') } == 1 }, 10, 'cancel'), 'and cancels it on PostHog\'s side');
my ($slow) = grep { ($_->{status} // '') eq 'cancelled' } @{ fake_requests($fake) };
is(fake_get($fake, '/cancels')->[0]{client_query_id}, $slow->{client_query_id}, 'the very query that was running');

# ---------- who may ask ----------
$node->safe_psql('postgres', qq{
	CREATE ROLE carol LOGIN;
	CREATE ROLE dave LOGIN;
	CREATE SERVER posthog FOREIGN DATA WRAPPER phsync OPTIONS (host '$url', project_id '1', ca_file '$ca');
	GRANT USAGE ON FOREIGN SERVER posthog TO carol, dave;
	GRANT EXECUTE ON FUNCTION phsync_query(text, text, jsonb), phsync_query_json(text, text, jsonb),
	                          phsync_describe(text, text, jsonb), phsync_tables(text),
	                          phsync_create_table(text, text, text[], text, text, jsonb) TO carol, dave;
	GRANT EXECUTE ON FUNCTION phsync_add_sync(text, text, text, text, text, text, interval, boolean, boolean, text, text[], text, text) TO carol;
	GRANT CREATE ON SCHEMA public TO carol;
	SET log_statement = 'none';
	CREATE USER MAPPING FOR carol SERVER posthog OPTIONS (api_key '$API_KEY');});
like(psql_err(q{SELECT * FROM phsync_query('SELECT 1') AS t(x int)}, 'carol'),
	qr/ERROR:  phsync_query\(\) without a server is for superusers\nDETAIL:  Without a server, the query would use phsync.api_key/,
	'without a server, only superusers (the settings\' key is theirs)');
is(psql_err(q{SELECT x FROM phsync_query('SELECT 1 AS x', server => 'posthog') AS t(x int)}, 'carol'),
	'OK: 1', 'carol asks with her own user mapping');
like(psql_err(q{SELECT x FROM phsync_query('SELECT 1 AS x', server => 'posthog') AS t(x int)}, 'dave'),
	qr/ERROR:  user mapping not found for user "dave", server "posthog"/, 'dave has no user mapping: no query');
$node->safe_psql('postgres', 'CREATE ROLE erin LOGIN');
like(psql_err(q{SELECT x FROM phsync_query('SELECT 1 AS x', server => 'posthog') AS t(x int)}, 'erin'),
	qr/ERROR:  permission denied for function phsync_query/, 'phsync_query() is not granted to PUBLIC');
$node->safe_psql('postgres', q{SET log_statement = 'none'; CREATE USER MAPPING FOR dave SERVER posthog OPTIONS (api_key 'phx_daves_wrong_key_000000000')});
my $e = psql_err(q{SELECT x FROM phsync_query('SELECT 1 AS x', server => 'posthog') AS t(x int)}, 'dave');
like($e, qr/HTTP status 401.*\n.*HINT:  Check the api_key of the user mapping for dave on server posthog/s, 'a wrong key: clear error');
unlike($e . slurp_file($node->logfile), qr/phx_daves_wrong_key|\Q$API_KEY\E/, 'no key in the error or the log');

# ---------- discovery ----------
my $hourly = q{SELECT toStartOfHour(created_at) AS hour, event, count() AS n
FROM events
WHERE created_at >= toDateTime({since}) AND created_at < toDateTime({until})
GROUP BY hour, event};
my $q = $hourly =~ s/'/''/gr;
is($node->safe_psql('postgres', "SET ROLE carol; SELECT string_agg(name || ' ' || posthog_type || ' ' || postgres_type, ', ') FROM phsync_describe('$q', server => 'posthog')"),
	"hour DateTime('UTC') timestamptz, event String text, n UInt64 numeric",
	'phsync_describe(): names, PostHog\'s types and the PostgreSQL types phsync stores them as');
is($node->safe_psql('postgres', q{SELECT string_agg(name || ' ' || postgres_type, ', ') FROM phsync_describe('SELECT uuid, timestamp, properties FROM events')}),
	'uuid uuid, timestamp timestamptz, properties jsonb', 'uuid, date-time, and JSON text');
is($node->safe_psql('postgres', q{SELECT string_agg(name || ' ' || posthog_type || ' ' || postgres_type, ', ') FROM phsync_describe('SELECT is_identified FROM persons')}),
	'is_identified Int8 smallint', 'small integers (persons is empty: the types come anyway)');
my %tables = map { my @f = split /\|/; ("$f[0].$f[1]" => "$f[2] " . ($f[3] // '')) } split /\n/,
  $node->safe_psql('postgres', q{SET ROLE carol; SELECT table_name || '|' || column_name || '|' || posthog_type || '|' || coalesce(postgres_type, '') FROM phsync_tables('posthog')});
is($tables{'events.created_at'}, 'datetime timestamptz', 'phsync_tables(): events.created_at');
is($tables{'events.properties'}, 'json jsonb', 'events.properties');
is($tables{'persons.is_identified'}, 'boolean boolean', 'persons.is_identified (a boolean to PostHog\'s schema, 0/1 in answers)');
is($tables{'events.person'}, 'lazy_table ', 'a lazy join is listed without a PostgreSQL type');

# the round trip: a table for the query, a sync into it, a run
like(psql_err("SELECT phsync_create_table('hourly', query => '$q', key => ARRAY['hour', 'nope'], server => 'posthog')", 'carol'),
	qr/ERROR:  key column "nope" is not among the query's columns/, 'a key column the query lacks is refused');
is(psql_err("SELECT phsync_create_table('hourly', query => '$q', key => ARRAY['hour', 'event'], server => 'posthog')", 'carol'),
	'OK: hourly', 'phsync_create_table() for the query');
is($node->safe_psql('postgres', q{
	SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END, ', ' ORDER BY a.attnum)
	FROM pg_attribute a WHERE a.attrelid = 'hourly'::regclass AND a.attnum > 0}),
	'hour timestamp with time zone not null, event text not null, n numeric', 'its columns and types');
is($node->safe_psql('postgres', q{
	SELECT string_agg(pg_get_indexdef(indexrelid), '; ' ORDER BY indexrelid) FROM pg_index WHERE indrelid = 'hourly'::regclass}),
	'CREATE UNIQUE INDEX hourly_pkey ON public.hourly USING btree (hour, event); CREATE INDEX hourly_hour_idx ON public.hourly USING btree (hour)',
	'the key and a cursor index on hour');
is($node->safe_psql('postgres', "SELECT owner FROM (SELECT relowner::regrole::text AS owner FROM pg_class WHERE oid = 'hourly'::regclass) o"),
	'carol', 'the table is carol\'s');
$node->safe_psql('postgres', qq{
	SET ROLE carol;
	SELECT phsync_add_sync('hourly', 'hourly', query => '$q', "cursor" => 'hour', conflict => 'update',
	                       lookback => '1 day', server => 'posthog');});
is($node->safe_psql('postgres', q{SELECT status FROM phsync_run_now('hourly')}), 'succeeded', 'the sync runs');
my %want;
for my $ev (@{ fake_get($fake, '/source') })
{
	my $h = substr($ev->[7], 0, 13);
	$want{"$h $ev->[1]"}++;
}
my %got = map { my ($h, $ev, $n) = split /\|/; ("$h $ev" => $n) } split /\n/,
  $node->safe_psql('postgres', q{SELECT to_char(hour AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24') || '|' || event || '|' || n FROM hourly});
is_deeply(\%got, \%want, 'the table holds PostHog\'s hourly counts, hour by hour and event by event');

# ---------- the documentation's examples, as written ----------
# README.md and every page of docs/, in that order
my @pages = ("$FindBin::Bin/../../README.md", sort glob("$FindBin::Bin/../../docs/*.md"));
my $readme = join("\n", map { slurp_file($_) } @pages);
my @examples = $readme =~ /<!-- example: (\w+)[^>]*-->\n```sql\n(.*?)```\n<!-- \/example -->/gs;
my %example = @examples;
is(join(',', sort keys %example), 'daily,discovery,flatten,persons,query', 'the documentation\'s runnable examples');
is(scalar(@examples) / 2, 5, 'each name once');
my @hogql = $readme =~ /<!-- hogql[^>]*-->\n```sql\n(.*?)```\n<!-- \/example -->/gs;
is(scalar(@hogql), 2, 'and its HogQL blocks');
my $readme_node = phsync_node('readme', $fake, $certs);
$readme_node->safe_psql('postgres', qq{
	CREATE EXTENSION phsync;
	CREATE SERVER posthog_eu FOREIGN DATA WRAPPER phsync OPTIONS (host '$url', project_id '1', ca_file '$ca');
	SET log_statement = 'none';
	CREATE USER MAPPING FOR CURRENT_USER SERVER posthog_eu OPTIONS (api_key '$API_KEY');});
for my $name (qw(query discovery persons daily flatten))
{
	my ($ret, $out, $err) = $readme_node->psql('postgres', $example{$name});
	is($ret, 0, "the documentation's $name example runs") or diag($err);
}
ok($readme_node->safe_psql('postgres', 'SELECT count(*) FROM hourly') > 0, 'its hourly table fills');
is($readme_node->safe_psql('postgres', q{SELECT status FROM phsync_run_now('daily')}), 'succeeded', 'its daily aggregate runs');
ok($readme_node->safe_psql('postgres', 'SELECT count(*) FROM daily_counts') > 0, 'and fills');

# the HogQL blocks parse (PostHog's parser) and run (the fake), with a value
# for each placeholder
my $plain = start_fake();
my %sample = (events => [ '$pageview', 'signed_up' ], after_1 => '00000000-0000-4000-8000-000000000000');
for my $i (0 .. $#hogql)
{
	my $text = $hogql[$i] =~ s/^--[^\n]*\n//r;
	my %values = map { $_ => $sample{$_} // '2026-11-01T00:00:00Z' } $text =~ /\{(\w+)\}/g;
	my $res = fake_query($plain, $text, values => \%values);
	is($res->{status}, 200, "the documentation's HogQL block $i is valid HogQL") or diag($res->{content});
}

done_testing();
