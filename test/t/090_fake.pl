# The fake PostHog itself, through its HTTP API (no phsync): it must behave
# as PostHog's source says (see the docstring of test/fake_posthog.py), or
# phsync's other tests pass against a kinder server than the real one.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::RealBin/../perl";
use JSON::PP;
use PhsyncTest;
use POSIX qw(_exit);
use Test::More;
use Time::HiRes qw(time usleep);

my $k2 = 'phx_second_project_key';
my $fake = start_fake(projects => [ [ '1', $API_KEY ], [ '2', $k2, 'Asia/Kolkata' ] ]);

sub q_ok
{
	my ($hogql, %o) = @_;
	my $r = fake_query($fake, $hogql, %o);
	diag("$r->{status} $r->{content}") unless $r->{status} == 200;
	return $r->{json};
}

# ---------- PostHog's parser ----------
fake_post($fake, '/generate', { count => 250, seed => 7, created_from => '2026-01-05T00:00:00Z', step_ms => 1000 });
my $r = fake_query($fake, "SELECT uuid AS `a\\`b` FROM events LIMIT 1");
is($r->{status}, 400, 'a backslash-escaped backtick is a syntax error (PostHog\'s parser)');
is_deeply([ @{ $r->{json} }{qw(type code attr)} ], [ 'validation_error', 'invalid_input', undef ], '... as a validation_error body');
like($r->{json}{detail}, qr/no viable alternative|mismatched|extraneous/, '... with the parser\'s message');
my $j = q_ok("SELECT uuid AS `a``b` FROM events LIMIT 1");
is_deeply($j->{columns}, [ 'a`b' ], 'a doubled backtick is a backtick in the name');
$r = fake_query($fake, "SELECT uuid FROM events ORDER BY created_at LIMIT 5 OFFSET 5");
is($r->{status}, 400, 'OFFSET: 400');
like($r->{json}{detail}, qr/^OFFSET is not allowed/, '... with its text');
$r = fake_query($fake, "SELECT uuid FROM events WHERE created_at > {nope}");
is_deeply([ $r->{status}, $r->{json}{detail} ], [ 400, 'Global variable not found: nope' ], 'a placeholder without a value');
$r = fake_query($fake, "SELECT uuid FROM evnts");
is_deeply([ $r->{status}, $r->{json}{detail} ], [ 400, 'Unknown table `evnts`.' ], 'unknown table, in PostHog\'s words');
$r = fake_query($fake, "SELECT nope FROM events");
is_deeply([ $r->{status}, $r->{json}{detail} ], [ 400, 'Unable to resolve field: nope' ], 'unknown column, in PostHog\'s words');

# the AST is evaluated: subqueries, IN with an array placeholder, aggregates, HAVING, ORDER BY DESC
$j = q_ok(q{SELECT event, count() AS n, count(DISTINCT distinct_id) AS users
	FROM (SELECT event, distinct_id FROM events WHERE event IN {names} AND NOT (distinct_id = '')) AS q
	GROUP BY event HAVING n > 10 ORDER BY n DESC, event}, values => { names => [ '$pageview', 'signed_up' ] });
is_deeply([ map { $_->[0] } @{ $j->{results} } ], [ '$pageview', 'signed_up' ], 'IN with an array placeholder, GROUP BY, HAVING, ORDER BY');
is_deeply($j->{types}, [ [ 'event', 'String' ], [ 'n', 'UInt64' ], [ 'users', 'UInt64' ] ], 'types of computed columns');
$j = q_ok(q{SELECT properties.$browser AS b, properties.n AS n, JSONExtractString(properties, 'note') AS note FROM events ORDER BY created_at LIMIT 1});
like($j->{results}[0][0], qr/^(Chrome|Firefox|Safari)$/, 'properties.$browser: the JSON value as a string');
is($j->{results}[0][1], '0', 'properties.n: a number as its JSON text');
is($j->{types}[0][1], 'Nullable(String)', '... typed Nullable(String)');
$j = q_ok(q{SELECT properties['$browser'] AS b, not(equals(event, '')) AS t, uuid FROM events WHERE uuid > toUUID({u}) ORDER BY uuid LIMIT 2},
	values => { u => '00000000-0000-0000-0000-000000000000' });
like($j->{results}[0][0], qr/^(Chrome|Firefox|Safari)$/, "properties['\$browser'] and the operators' function forms");
ok(lc(substr($j->{results}[0][2], 19)) le lc(substr($j->{results}[1][2], 19)), 'UUIDs in ClickHouse\'s order (second half first)');

# ---------- without force_blocking, PostHog's cache may answer ----------
my $cq = q{SELECT count() FROM events WHERE event = 'cached'};
fake_post($fake, '/events', [ { event => 'cached' } ]);
$j = q_ok($cq, body => { refresh => 'blocking' });
fake_post($fake, '/events', [ { event => 'cached' } ]);
$j = q_ok($cq, body => { refresh => 'blocking' });
is_deeply([ $j->{results}[0][0], $j->{is_cached} ], [ 1, JSON::PP::true ], 'refresh blocking: an identical query is answered from the cache');
$j = q_ok($cq);
is_deeply([ $j->{results}[0][0], $j->{is_cached} ], [ 2, JSON::PP::false ], 'force_blocking: run afresh');
is(fake_query($fake, $cq, body => { refresh => 'sometimes' })->{status}, 400, 'an unknown refresh mode: 400');

# ---------- row limits ----------
$j = q_ok("SELECT uuid FROM events");
is_deeply([ scalar @{ $j->{results} }, $j->{hasMore}, $j->{limit}, $j->{offset} ], [ 100, JSON::PP::true, 100, 0 ],
	'no LIMIT: 100 rows, hasMore, limit and offset');
$j = q_ok("SELECT uuid FROM events LIMIT 100");
ok(exists $j->{hasMore} && !defined $j->{hasMore} && !defined $j->{limit}, 'an explicit LIMIT: hasMore and limit are null (PostHog dumps every field)');
$j = q_ok("SELECT a.uuid FROM events AS a CROSS JOIN events AS b LIMIT 60000");
is(scalar @{ $j->{results} }, 50000, 'LIMIT 60000 is silently cut to 50,000');
fake_config($fake, { row_cap => 10000 });
$j = q_ok("SELECT a.uuid FROM events AS a CROSS JOIN events AS b LIMIT 60000");
is(scalar @{ $j->{results} }, 10000, 'row_cap 10000 (older self-hosted PostHog): cut to 10,000');
fake_config($fake, { row_cap => 50000 });

# ---------- time zones ----------
fake_post($fake, '/events', [
	{ uuid => '00000000-0000-4000-8000-00000000a001', created_at => '2026-03-08T09:30:00.5Z', timestamp => '2026-03-08T09:30:00Z', event => 'dst' },
	{ uuid => '00000000-0000-4000-8000-00000000a002', created_at => '2026-03-08T10:30:00Z', timestamp => '2026-03-08T10:30:00.123456Z', event => 'dst' } ]);
my $dst = q{SELECT created_at, timestamp, toDateTime({t}) AS t FROM events WHERE event = 'dst' ORDER BY created_at LIMIT 10};
$j = q_ok($dst, values => { t => '2026-03-08 01:00:00' });
is_deeply($j->{results}, [ [ '2026-03-08T09:30:00.500000Z', '2026-03-08T09:30:00Z', '2026-03-08T01:00:00Z' ],
	[ '2026-03-08T10:30:00Z', '2026-03-08T10:30:00.123456Z', '2026-03-08T01:00:00Z' ] ], 'UTC: Z, the fraction dropped when zero');
fake_config($fake, { timezone => 'America/Los_Angeles' });
$j = q_ok($dst, values => { t => '2026-03-08 01:00:00' });
is_deeply($j->{results}, [ [ '2026-03-08T01:30:00.500000-08:00', '2026-03-08T01:30:00-08:00', '2026-03-08T01:00:00-08:00' ],
	[ '2026-03-08T03:30:00-07:00', '2026-03-08T03:30:00.123456-07:00', '2026-03-08T01:00:00-08:00' ] ],
	'America/Los_Angeles: -08:00 before the DST change, -07:00 after; a value without offset is read in the project\'s zone');
is_deeply([ $j->{timezone}, $j->{types}[0][1] ], [ 'America/Los_Angeles', "DateTime64(6, 'America/Los_Angeles')" ], 'timezone and types follow');
$j = q_ok($dst, values => { t => '2026-03-08T01:00:00Z' });
is($j->{results}[0][2], '2026-03-07T17:00:00-08:00', 'a value with Z fixes the instant');
$j = q_ok($dst, body => { query => { kind => 'HogQLQuery', query => $dst, values => { t => '2026-03-08T01:00:00Z' },
	modifiers => { convertToProjectTimezone => JSON::PP::false } } });
is($j->{results}[0][0], '2026-03-08T09:30:00.500000Z', 'convertToProjectTimezone false: UTC');
fake_config($fake, { timezone => 'UTC' });
fake_post($fake, '/events?project=2', [ { created_at => '2026-11-02T03:04:05.123456Z', event => 'k' } ]);
$j = q_ok("SELECT created_at FROM events", key => $k2, project => 2);
is_deeply([ $j->{results}[0][0], $j->{types}[0][1], $j->{timezone} ],
	[ '2026-11-02T08:34:05.123456+05:30', "DateTime64(6, 'Asia/Kolkata')", 'Asia/Kolkata' ], 'Asia/Kolkata: +05:30');

# ---------- two projects, two keys ----------
is(fake_query($fake, "SELECT 1", key => $k2, project => 1)->{status}, 403, 'a key reads only its own project (403)');
is(fake_query($fake, "SELECT 1", key => 'phx_nobody', project => 1)->{status}, 401, 'an unknown key: 401');
$j = q_ok("SELECT count() FROM events", key => $k2, project => 2);
is($j->{results}[0][0], 1, 'each project has its own events');
is(scalar @{ fake_get($fake, '/source?project=2') }, 1, 'control endpoints take ?project=');

# ---------- persons ----------
fake_post($fake, '/persons', [ { id => '00000000-0000-4000-8000-000000000001', created_at => '2026-01-02T03:04:05.123456Z',
	is_identified => JSON::PP::true, properties => { email => 'a@example.com' } } ]);
$j = q_ok("SELECT id, created_at, is_identified, properties FROM persons");
is_deeply($j->{results}[0], [ '00000000-0000-4000-8000-000000000001', '2026-01-02T03:04:05.123000Z', 1, '{"email":"a@example.com"}' ],
	'persons: is_identified 0/1, created_at in milliseconds, properties as JSON text');
is_deeply([ map { $_->[1] } @{ $j->{types} } ], [ 'UUID', "DateTime64(3, 'UTC')", 'Int8', 'String' ], 'persons: PostHog\'s types');

fake_post($fake, '/persons', [ { id => '00000000-0000-4000-8000-000000000099', created_at => '2099-01-01T00:00:00Z' } ]);
is_deeply(q_ok("SELECT count() FROM persons WHERE id = '00000000-0000-4000-8000-000000000099'")->{results}, [ [0] ],
	'a person created more than a day in the future is not shown');
fake_post($fake, '/events', [ { event => 'future', created_at => '2026-04-01T00:00:00Z', timestamp => '2026-04-02T00:00:01Z' },
	{ event => 'future', created_at => '2026-04-01T00:00:00Z', timestamp => '2026-04-01T22:00:00Z' } ]);
is_deeply(q_ok("SELECT timestamp FROM events WHERE event = 'future' ORDER BY timestamp")->{results},
	[ ['2026-04-01T00:00:00Z'], ['2026-04-01T22:00:00Z'] ], 'capture: a timestamp over 23 h ahead becomes the ingestion time');

# ---------- the schema query ----------
$j = q_ok(undef, kind => 'DatabaseSchemaQuery');
ok($j->{tables}{$_}, "schema has $_") for qw(events persons groups sessions cohort_people system.cohorts system.feature_flags system.experiments system.surveys);
is_deeply($j->{tables}{'system.cohorts'}{fields}{deleted}, { name => 'deleted', hogql_value => 'deleted', type => 'integer',
	schema_valid => JSON::PP::true, chain => undef, fields => undef, id => undef, table => undef }, 'a field, every key');
is($j->{tables}{events}{fields}{'$session_id'}{hogql_value}, '`$session_id`', '$ names are backquoted');
is_deeply([ $j->{tables}{events}{fields}{properties}{type}, $j->{tables}{events}{fields}{timestamp}{type},
	$j->{tables}{'system.cohorts'}{type}, $j->{tables}{events}{type} ], [ 'json', 'datetime', 'system', 'posthog' ], 'field and table types');
ok(!exists $j->{tables}{events}{fields}{team_id}, 'no team_id');
is_deeply($j->{joins}, [], 'joins: []');

# ---------- PostHog's other tables ----------
my $ids = fake_post($fake, '/system/cohorts', [ { id => 7, name => 'Power users', filters => { properties => {} }, is_static => JSON::PP::false },
	{ id => 8, name => 'Imported', is_static => JSON::PP::true } ])->{ids};
is_deeply($ids, [ 7, 8 ], 'cohorts added');
fake_post($fake, '/cohort_people', { cohort_id => 7,
	person_ids => [ '00000000-0000-4000-8000-000000000011', '00000000-0000-4000-8000-000000000012' ] });
fake_post($fake, '/static_cohort_people', { cohort_id => 8, person_ids => [ '00000000-0000-4000-8000-000000000013' ] });
$j = q_ok("SELECT person_id, cohort_id FROM cohort_people ORDER BY person_id");
is_deeply($j->{results}, [ [ '00000000-0000-4000-8000-000000000011', 7 ], [ '00000000-0000-4000-8000-000000000012', 7 ] ], 'cohort_people: the current members');
fake_post($fake, '/cohort_people', { cohort_id => 7, person_ids => [ '00000000-0000-4000-8000-000000000012' ] });
$j = q_ok("SELECT person_id FROM cohort_people");
is_deeply($j->{results}, [ [ '00000000-0000-4000-8000-000000000012' ] ], 'a recalculation replaces the members (a removal)');
$j = q_ok("SELECT id, name, deleted, is_static, version, count, filters FROM system.cohorts ORDER BY id");
is_deeply($j->{results}[0], [ 7, 'Power users', 0, 0, 2, 1, '{"properties":{}}' ], 'system.cohorts: flags 0/1, version and count move, filters as JSON text');
is($j->{types}[2][1], 'Nullable(Int64)', 'deleted is an integer (toInt)');
$j = q_ok("SELECT person_id, cohort_id FROM static_cohort_people");
is_deeply($j->{results}, [ [ '00000000-0000-4000-8000-000000000013', 8 ] ], 'static_cohort_people');
fake_post($fake, '/system/cohorts/delete', { ids => [7] });
is_deeply(q_ok("SELECT deleted FROM system.cohorts WHERE id = 7")->{results}, [ [1] ], 'soft delete: deleted = 1');
is_deeply(q_ok("SELECT count() FROM cohort_people")->{results}, [ [0] ], '... and its members leave cohort_people');
fake_post($fake, '/system/cohorts/delete', { ids => [7], hard => JSON::PP::true });
is_deeply(q_ok("SELECT id FROM system.cohorts")->{results}, [ [8] ], 'hard delete removes the row');

fake_post($fake, '/system/feature_flags', [ { id => 1, key => 'beta', name => 'Beta', filters => { groups => [] }, rollout_percentage => 50 } ]);
$j = q_ok("SELECT id, key, rollout_percentage, deleted, filters FROM system.feature_flags");
is_deeply($j->{results}, [ [ 1, 'beta', 50, 0, '{"groups":[]}' ] ], 'system.feature_flags');
fake_post($fake, '/system/experiments', [ { id => 3, name => 'Exp', filters => {}, feature_flag_id => 1, archived => JSON::PP::true,
	start_date => '2026-01-01T00:00:00Z', updated_at => '2026-01-02T00:00:00Z' } ]);
$j = q_ok("SELECT id, archived, start_date, end_date, feature_flag_id FROM system.experiments");
is_deeply($j->{results}, [ [ 3, 1, '2026-01-01T00:00:00Z', undef, 1 ] ], 'system.experiments');
$ids = fake_post($fake, '/system/surveys', [ { name => 'NPS', type => 'popover', questions => [ { type => 'rating' } ] } ])->{ids};
$j = q_ok("SELECT id, name, questions FROM system.surveys");
is_deeply($j->{results}, [ [ $ids->[0], 'NPS', '[{"type":"rating"}]' ] ], 'system.surveys: a UUID id');
is($j->{types}[0][1], 'UUID', '... typed UUID');
is(fake_query($fake, "SELECT deleted FROM system.surveys")->{status}, 400, 'system.surveys has no deleted column');

fake_post($fake, '/groups', [ { index => 0, key => 'acme', created_at => '2026-01-01T00:00:00.123Z', properties => { plan => 'free' } } ]);
fake_post($fake, '/groups', [ { index => 0, key => 'acme', created_at => '2026-01-01T00:00:00.123Z', properties => { plan => 'paid' } } ]);
$j = q_ok("SELECT index, key, created_at, updated_at, properties.plan FROM groups");
is(scalar @{ $j->{results} }, 1, 'groups: a new version replaces the old');
is_deeply([ @{ $j->{results}[0] }[ 0, 1, 2, 4 ] ], [ 0, 'acme', '2026-01-01T00:00:00.123000Z', 'paid' ], '... with its properties');
like($j->{results}[0][3], qr/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/, 'updated_at: when it arrived, whole seconds');

fake_post($fake, '/events', [
	{ created_at => '2026-02-01T10:00:00Z', timestamp => '2026-02-01T10:00:00Z', event => '$pageview', distinct_id => 'u1',
	  properties => { '$session_id' => 's-1', '$current_url' => 'https://x/a' } },
	{ created_at => '2026-02-01T10:00:05Z', timestamp => '2026-02-01T10:00:05Z', event => '$pageview', distinct_id => 'u1',
	  properties => { '$session_id' => 's-1', '$current_url' => 'https://x/b' } } ]);
my $sq = q{SELECT session_id, distinct_id, $start_timestamp, $end_timestamp, $session_duration, $pageview_count, $entry_current_url, $end_current_url, $is_bounce FROM sessions WHERE session_id = 's-1'};
$j = q_ok($sq);
is_deeply($j->{results}, [ [ 's-1', 'u1', '2026-02-01T10:00:00Z', '2026-02-01T10:00:05Z', 5, 2, 'https://x/a', 'https://x/b', 0 ] ], 'sessions from events');
fake_post($fake, '/events', [ { created_at => '2026-02-01T10:20:00Z', timestamp => '2026-02-01T10:20:00Z', event => '$autocapture',
	distinct_id => 'u1', properties => { '$session_id' => 's-1' } } ]);
$j = q_ok($sq);
is_deeply([ @{ $j->{results}[0] }[ 3, 4 ] ], [ '2026-02-01T10:20:00Z', 1200 ], 'a session changes as events arrive');
is_deeply(q_ok(q{SELECT $session_id FROM events WHERE event = '$autocapture' AND $session_id = 's-1'})->{results}, [ ['s-1'] ], 'events.$session_id');

# ---------- throttles, in fake time ----------
fake_post($fake, '/reset', {});
fake_config($fake, { time_scale => 60, throttle_per_minute => 2, throttle_per_hour => 1000 });
q_ok("SELECT 1") for 1 .. 2;
$r = fake_query($fake, "SELECT 1");
is($r->{status}, 429, '3rd query in a (fake) minute: 429');
is_deeply([ @{ $r->{json} }{qw(type code)} ], [ 'throttled_error', 'throttled' ], '... throttled_error');
is($r->{headers}{'retry-after'}, 1, '... Retry-After in real seconds (60 fake s / time_scale 60)');
like($r->{json}{detail}, qr/^Request was throttled\. Expected available in 1 second\.$/, '... and the detail');
fake_post($fake, '/reset', {});
fake_config($fake, { throttle_per_minute => 0, throttle_per_hour => 2 });
q_ok("SELECT 1") for 1 .. 2;
$r = fake_query($fake, "SELECT 1");
ok($r->{status} == 429 && $r->{headers}{'retry-after'} >= 55 && $r->{headers}{'retry-after'} <= 60,
	'hourly throttle: Retry-After most of an (scaled) hour') or diag("$r->{status} $r->{headers}{'retry-after'}");
fake_post($fake, '/reset', {});
fake_config($fake, { throttle_per_hour => 2400, throttle_per_minute => 240, hogql_throttle_per_hour => 2 });
q_ok("SELECT 1") for 1 .. 2;
$r = fake_query($fake, "SELECT 1");
ok($r->{status} == 429 && $r->{headers}{'retry-after'} >= 55, 'hogql_throttle_per_hour: the 120/hour kind') or diag($r->{status});
fake_post($fake, '/reset', {});
fake_config($fake, { time_scale => 1, hogql_throttle_per_hour => 0 });

# ---------- concurrency: 3 slots, the 4th waits, then 429 without Retry-After ----------
sub in_child
{
	my ($file, $code) = @_;
	my $pid = fork();
	die "fork: $!" unless defined $pid;
	if ($pid == 0)
	{
		my $t0 = time();
		my $res = $code->();
		open my $fh, '>', $file or _exit(1);
		print $fh encode_json({ status => $res->{status}, retry_after => $res->{headers}{'retry-after'},
			detail => $res->{json} ? $res->{json}{detail} : undef, seconds => time() - $t0 });
		close $fh;
		_exit(0);
	}
	return $pid;
}
sub child_result
{
	my ($pid, $file) = @_;
	waitpid($pid, 0);
	open my $fh, '<', $file or return {};
	my $res = decode_json(do { local $/; <$fh> });
	return $res;
}
my $dir = PostgreSQL::Test::Utils::tempdir();
fake_config($fake, { concurrency_wait_seconds => 1 });
fake_post($fake, '/faults', [ { delay_ms => 3000, count => 3 } ]);
my @kids = map { my $i = $_; [ in_child("$dir/c$i", sub { fake_query($fake, "SELECT $i", body => { client_query_id => "slot-$i" }) }), "$dir/c$i" ] } 1 .. 3;
poll_until(sub { fake_get($fake, '/stats')->{max_concurrent} >= 3 }, 10, 'three queries running');
usleep(200_000);
my $t0 = time();
$r = fake_query($fake, "SELECT 4");
my $waited = time() - $t0;
is($r->{status}, 429, 'the 4th concurrent query: 429');
ok(!defined $r->{headers}{'retry-after'}, '... without Retry-After');
like($r->{json}{detail}, qr/^Too many queries are running right now/, '... "too many queries"');
ok($waited >= 0.9, "... after waiting for a slot (${waited}s)");
is_deeply([ map { child_result(@$_)->{status} } @kids ], [ 200, 200, 200 ], 'the three running ones succeed');

# ---------- cancel ----------
fake_post($fake, '/faults', [ { delay_ms => 8000 } ]);
my $kid = in_child("$dir/cancel", sub { fake_query($fake, "SELECT 1", body => { client_query_id => 'to-cancel' }) });
poll_until(sub { grep { ($_->{client_query_id} // '') eq 'to-cancel' } @{ fake_requests($fake) } }, 10, 'the query arrives');
usleep(200_000);
$r = fake_query($fake, undef, method => 'DELETE', client_query_id => 'to-cancel');
is($r->{status}, 200, 'DELETE .../query/<client_query_id>/: 200');
ok(defined $r->{json}{message}, '... with a message');
my $c = child_result($kid, "$dir/cancel");
ok($c->{seconds} < 5, 'the cancelled query stops at once (its connection is closed)') or diag(explain $c);
$r = fake_query($fake, undef, method => 'DELETE', client_query_id => 'never-seen');
is($r->{status}, 200, 'an unknown id: 200 too');
my $cancels = fake_get($fake, '/cancels');
is_deeply([ map { "$_->{client_query_id}:" . ($_->{was_running} ? 1 : 0) . ":$_->{project_id}" } @$cancels ],
	[ 'to-cancel:1:1', 'never-seen:0:1' ], 'cancels are recorded');
my ($rec) = grep { ($_->{client_query_id} // '') eq 'to-cancel' } @{ fake_requests($fake) };
is($rec->{status}, 'cancelled', 'the request is recorded as cancelled');
fake_post($fake, '/reset', {});
is_deeply(fake_get($fake, '/cancels'), [], 'reset clears the cancels');

# ---------- execution cost ----------
my $total = q_ok("SELECT count() FROM events")->{results}[0][0];
my %win = (a => '2026-01-05T00:00:00Z', b => '2026-01-05T00:00:30Z');
my $in_win = q_ok(q{SELECT count() FROM events WHERE timestamp >= {a} AND timestamp <= {b}}, values => \%win)->{results}[0][0];
fake_config($fake, { cost_per_event_us => 100000 });     # 0.1 fake s an event: 10 s = 100 events
$r = fake_query($fake, "SELECT count() FROM events");
is_deeply([ $r->{status}, $r->{json}{code}, $r->{json}{detail} ], [ 504, 'query_timeout', 'Query timed out. Try a narrower time range.' ],
	'a query reading every event: 504');
$r = fake_query($fake, q{SELECT count() FROM events WHERE timestamp >= toDateTime({a})}, values => \%win);
is($r->{status}, 504, 'bounded on one side only: still every later event, 504');
$j = q_ok(q{SELECT count() FROM (SELECT uuid FROM events WHERE timestamp >= toDateTime({a}) AND timestamp < toDateTime({b}))},
	values => \%win);
ok(defined $j, 'bounded on timestamp on both sides (in a subquery): cheap enough');
my $reqs = fake_requests($fake);
is_deeply([ $reqs->[-3]{events_read}, $reqs->[-1]{events_read} ], [ $total, $in_win ],
	'events_read recorded: every event; the slice');
ok(abs($reqs->[-1]{cost_seconds} - $in_win * 0.1) < 1e-6, '... and the charge, in fake seconds');
fake_config($fake, { cost_per_event_us => 1 });

# ---------- latency model and stats ----------
fake_post($fake, '/stats/reset', {});
fake_config($fake, { latency_base_ms => 300 });
$t0 = time();
q_ok("SELECT 1");
ok(time() - $t0 >= 0.29, 'latency_base_ms delays the answer');
fake_config($fake, { latency_base_ms => 0 });
my $st = fake_get($fake, '/stats');
ok($st->{requests} == 1 && $st->{busy_seconds} >= 0.29 && $st->{busy_union_seconds} >= 0.29 && $st->{max_concurrent} == 1, 'stats')
  or diag(explain $st);

# ---------- answers gzipped, as PostHog's query POSTs are ----------
$r = fake_query($fake, "SELECT 1", headers => { 'Accept-Encoding' => 'gzip' });
is_deeply([ $r->{status}, $r->{headers}{'content-encoding'} ], [ 200, 'gzip' ], 'an answer is gzipped when the client accepts gzip');
$r = fake_query($fake, "SELECT 1");
ok(!defined $r->{headers}{'content-encoding'} && $r->{json}{results}[0][0] == 1, '... and plain when it does not');
fake_config($fake, { gzip => JSON::PP::false });
$r = fake_query($fake, "SELECT 1", headers => { 'Accept-Encoding' => 'gzip' });
ok(!defined $r->{headers}{'content-encoding'} && $r->{json}{results}[0][0] == 1, 'gzip => false: plain whatever the client accepts');
fake_config($fake, { gzip => JSON::PP::true });

# ---------- settings from the command line ----------
my $other = start_fake(config => { row_cap => 10000, timezone => 'Asia/Kolkata', throttle_per_minute => 0 });
my $cfg = fake_get($other, '/config');
is_deeply([ @$cfg{qw(row_cap timezone throttle_per_minute throttle_per_hour concurrency)} ], [ 10000, 'Asia/Kolkata', 0, 2400, 3 ], 'flags at start, PostHog\'s defaults otherwise');

# ---------- the benchmark's synthetic mode still parses ----------
fake_post($other, '/synthetic', { count => 300, seed => 3, step_ms => 10000 });
my $head = "SELECT uuid, event, timestamp, distinct_id, person_id, properties, elements_chain, created_at\nFROM events\n"
  . "WHERE created_at >= toDateTime({since}) AND created_at < toDateTime({until})\n  AND timestamp >= toDateTime({timestamp_since})";
my %v = (since => '2020-01-01T00:00:00Z', until => '2100-01-01T00:00:00Z', timestamp_since => '2019-12-25T00:00:00Z');
$r = fake_query($other, "$head\nORDER BY created_at, uuid\nLIMIT 200", values => \%v);
my $p1 = $r->{json}{results};
is(scalar @$p1, 200, 'synthetic: a page');
$r = fake_query($other, "$head\n  AND ((created_at > toDateTime({after_0})) OR (created_at = toDateTime({after_0}) AND uuid > toUUID({after_1})))"
	. "\nORDER BY created_at, uuid\nLIMIT 200", values => { %v, after_0 => $p1->[-1][7], after_1 => $p1->[-1][0] });
my $p2 = $r->{json}{results};
ok(@$p2 == 100 && $p2->[0][7] gt $p1->[-1][7], 'synthetic: the keyset OR-chain gives the rest');
$r = fake_query($other, "$head\n  AND timestamp < toDateTime({ts_until})\nORDER BY created_at, uuid\nLIMIT 50000",
	values => { %v, ts_until => $p1->[9][2] });
is(scalar @{ $r->{json}{results} }, 9, 'synthetic: an upper bound on timestamp is evaluated');
# phsync's grouped count (a plan), buckets of 10 minutes from the first row's second
(my $first_s = $p1->[0][7]) =~ s/\.\d+Z$/Z/;
$r = fake_query($other, "SELECT intDiv(toUnixTimestamp(toDateTime(created_at)) - toUnixTimestamp(toDateTime({since})), {bucket_seconds}) AS phsync_bucket, "
	. "count() AS phsync_count\nFROM events\nWHERE created_at >= toDateTime({since}) AND created_at < toDateTime({until})\n"
	. "  AND timestamp >= toDateTime({timestamp_since})\nGROUP BY phsync_bucket\nORDER BY phsync_bucket\nLIMIT 50000",
	values => { %v, since => $first_s, bucket_seconds => 600 });
is(join(',', map { "$_->[0]:$_->[1]" } @{ $r->{json}{results} }), '0:60,1:60,2:60,3:60,4:60', 'synthetic: the grouped count, bucket by bucket');
is(fake_query($other, "SELECT uuid FROM events LIMIT 1")->{status}, 400, 'synthetic: other shapes get 400');
is(fake_query($other, "SELECT uuid FROM events WHERE `a\`b` = 1")->{status}, 400, 'synthetic: the parser still decides');

done_testing();
