# Several syncs: definitions added in SQL (and refused when invalid), the
# persons preset with conflict => 'update', a "latest row per key" query
# whose pages hold the same key twice, a custom daily aggregate kept fresh,
# run_now() for all syncs or one, a failing sync that does not stop the
# others, and scheduled runs of every enabled sync.
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
my $node = phsync_node('syncs', $fake, $certs, 'phsync.page_size' => '10');
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');

sub psql_err
{
	my ($sql) = @_;
	my ($ret, $out, $err) = $node->psql('postgres', $sql);
	return $ret == 0 ? "OK: $out" : $err;
}

# ---------- definitions refused when added ----------
$node->safe_psql('postgres', q{
	CREATE TABLE loose (id uuid, created_at timestamptz, is_identified boolean, properties jsonb);
	CREATE TABLE keyed (id uuid PRIMARY KEY, created_at timestamptz, is_identified boolean, properties jsonb);});
like(psql_err("SELECT phsync_add_sync('p', 'keyed', preset => 'people')"),
	qr/ERROR:  unknown preset "people"\nHINT:  The presets are events, persons, groups, sessions, cohorts, feature_flags, experiments, surveys, cohort_people and person_distinct_ids; anything else needs query => a HogQL query\./,
	'unknown preset refused');
# the install script's CHECK on phsync.syncs.preset names the library's presets (presets.c), in its order
{
	my ($names) = psql_err("SELECT phsync_add_sync('p', 'keyed', preset => 'people')") =~ /The presets are (.*?); anything/;
	my @lib = split /, | and /, $names;
	my $def = $node->safe_psql('postgres', q{SELECT pg_get_constraintdef(oid) FROM pg_constraint
		WHERE conrelid = 'phsync.syncs'::regclass AND pg_get_constraintdef(oid) LIKE '%preset%ANY%'});
	my @sql = $def =~ /'(\w+)'::text/g;
	is(join(' ', @sql), 'events persons groups sessions cohorts feature_flags experiments surveys cohort_people person_distinct_ids',
		'the install script\'s CHECK on phsync.syncs.preset lists the presets') or diag($def);
	is_deeply(\@sql, \@lib, '... the library\'s, in its order');
}
like(psql_err("SELECT phsync_add_sync('p', 'nowhere', preset => 'persons')"),
	qr/ERROR:  target table nowhere does not exist\nHINT:  Create it first, with a primary key or unique constraint, for example: SELECT phsync_create_table\('persons', 'nowhere'\)\./,
	'missing target refused, with the helper to create it');
like(psql_err("SELECT phsync_add_sync('p', 'loose', preset => 'persons')"),
	qr/ERROR:  target table public.loose has no primary key or unique constraint\nDETAIL:  phsync skips or updates rows it already has with ON CONFLICT, which needs a unique key\.\nHINT:  Add one on the columns that identify a row, for example: ALTER TABLE public.loose ADD PRIMARY KEY \(id\);/,
	'target without a unique key refused');
like(psql_err("SELECT phsync_add_sync('p', 'keyed', preset => 'persons', cursor => 'seen_at')"),
	qr/ERROR:  cursor column "seen_at" does not exist in table public.keyed/, 'cursor that is not a column refused');
like(psql_err("SELECT phsync_add_sync('p', 'keyed', preset => 'persons', cursor => 'properties')"),
	qr/ERROR:  cursor column "properties" of table public.keyed must be of type timestamptz, timestamp or date, not jsonb/,
	'cursor of the wrong type refused');
like(psql_err("SELECT phsync_add_sync('default', 'keyed', preset => 'persons')"),
	qr/ERROR:  the sync named "default" is configured by the phsync\.\* settings in postgresql\.conf/,
	'"default" is reserved');
like(psql_err("SELECT phsync_add_sync('Bad Name', 'keyed', preset => 'persons')"),
	qr/ERROR:  invalid sync name "Bad Name"/, 'invalid name refused');
like(psql_err("SELECT phsync_add_sync('p', 'keyed', preset => 'events')"),
	qr/ERROR:  table public.keyed lacks column\(s\) uuid, event, "timestamp", distinct_id, person_id, elements_chain of the events preset/,
	'target without the preset\'s columns refused');
like(psql_err("SELECT phsync_add_sync('p', 'keyed', preset => 'persons', conflict => 'replace')"),
	qr/ERROR:  invalid conflict mode "replace"/, 'unknown conflict mode refused');
like(psql_err("SELECT phsync_add_sync('p', 'pg_catalog.pg_authid', query => 'SELECT 1', \"cursor\" => 'rolvaliduntil', conflict => 'update')"),
	qr/ERROR:  target pg_catalog.pg_authid is a system or phsync table/, 'a system catalog is refused as a target');
$node->safe_psql('postgres', q{
	CREATE ROLE sync_admin LOGIN;
	GRANT EXECUTE ON FUNCTION phsync_add_sync(text, text, text, text, text, text, interval, boolean, boolean, text, text[], text, text) TO sync_admin;
	GRANT SELECT ON keyed TO sync_admin;
	CREATE SERVER elsewhere FOREIGN DATA WRAPPER phsync OPTIONS (host 'http://127.0.0.1:9', project_id '1');
	CREATE USER MAPPING FOR sync_admin SERVER elsewhere OPTIONS (api_key 'phx_sync_admin');
	GRANT USAGE ON FOREIGN SERVER elsewhere TO sync_admin;});
like(psql_err("SET SESSION AUTHORIZATION sync_admin; SELECT phsync_add_sync('p', 'keyed', preset => 'persons')"),
	qr/ERROR:  only superusers may add a sync without a server\nDETAIL:  Without a server, the sync would use phsync\.api_key, which only superusers may use\./,
	'a role that is not a superuser may not use the settings\' key');
like(psql_err("SET SESSION AUTHORIZATION sync_admin; SELECT phsync_add_sync('p', 'keyed', preset => 'persons', server => 'elsewhere')"), qr/ERROR:  permission denied for table public.keyed\nDETAIL:  The sync writes into it as sync_admin, who needs SELECT, INSERT and UPDATE on it\./,
	'a role allowed to add syncs may only target tables it may write itself');
is($node->safe_psql('postgres', 'SELECT count(*) FROM phsync.syncs'), 0, 'nothing was added');

# ---------- persons ----------
is($node->safe_psql('postgres', "SELECT phsync_create_table('persons', 'people')"), 'people',
	'phsync_create_table makes a persons table');
is($node->safe_psql('postgres', q{
	SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod), ', ' ORDER BY a.attnum)
	FROM pg_attribute a WHERE a.attrelid = 'people'::regclass AND a.attnum > 0}),
	'id uuid, created_at timestamp with time zone, is_identified boolean, properties jsonb',
	'with the preset\'s columns');
is($node->safe_psql('postgres', q{
	SELECT string_agg(pg_get_indexdef(indexrelid), '; ' ORDER BY indexrelid) FROM pg_index WHERE indrelid = 'people'::regclass}),
	'CREATE UNIQUE INDEX people_pkey ON public.people USING btree (id); CREATE INDEX people_created_at_idx ON public.people USING btree (created_at)',
	'its key and cursor index');
is($node->safe_psql('postgres', q{
	SELECT row(name, target, preset, query, cursor_column, conflict, lookback, enabled, verify)
	FROM phsync_add_sync('persons', 'people', preset => 'persons')}),
	'(persons,public.people,persons,,created_at,update,,t,f)',
	'the persons preset updates and re-reads every person by default');

my @persons;
for my $i (1 .. 25)
{
	push @persons, { id => sprintf('00000000-0000-4000-8000-%012d', $i),
		created_at => iso_ago($node, (100 - $i) . ' hours'),
		is_identified => ($i % 3 == 0 ? JSON::PP::true : JSON::PP::false),
		properties => { email => "user$i\@example.com", plan => 'free' } };
}
fake_post($fake, '/persons', \@persons);

sub persons_equal
{
	my $json = JSON::PP::encode_json(fake_get($fake, '/persons'));
	return $node->safe_psql('postgres', qq{
		WITH src AS (SELECT (r->>0)::uuid AS id, (r->>1)::timestamptz AS created_at,
		                    (r->>2)::boolean AS is_identified, (r->>3)::jsonb AS properties
		             FROM jsonb_array_elements(\$j\$$json\$j\$::jsonb) r)
		SELECT (SELECT count(*) FROM (SELECT * FROM src EXCEPT ALL SELECT * FROM people) a)
		     + (SELECT count(*) FROM (SELECT * FROM people EXCEPT ALL SELECT * FROM src) b)});
}

is($node->safe_psql('postgres', q{
	SELECT status, rows_received, rows_inserted, rows_updated FROM phsync_run_now('persons')}),
	'succeeded|25|25|0', 'persons: first run inserts every person');
is(persons_equal(), 0, 'people equals PostHog\'s persons, every column');
my $before = $node->safe_psql('postgres', q{SELECT string_agg(id || '/' || xmin::text || '/' || ctid::text, ';' ORDER BY id) FROM people});

# three people change (one becomes identified), one is new
$persons[1]{properties}{plan} = 'paid';
$persons[4]{is_identified} = JSON::PP::true;
$persons[9]{properties} = { email => 'new@example.com' };
fake_post($fake, '/persons', [ @persons[1, 4, 9],
	{ id => '00000000-0000-4000-8000-000000000026', created_at => iso_ago($node, '1 hour'),
	  is_identified => JSON::PP::false, properties => {} } ]);
is($node->safe_psql('postgres', q{
	SELECT status, rows_received, rows_inserted, rows_updated FROM phsync_run_now('persons')}),
	'succeeded|26|1|3', 'persons: a re-read updates exactly the 3 changed people and adds the new one');
is(persons_equal(), 0, 'people equals PostHog\'s persons again');
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM people WHERE id || '/' || xmin::text || '/' || ctid::text = ANY (string_to_array($$} . $before . q{$$, ';'))}),
	22, 'the 22 unchanged people were not rewritten (same xmin and ctid: no dead tuples)');
is($node->safe_psql('postgres', q{
	SELECT status, rows_received, rows_inserted, rows_updated FROM phsync_run_now('persons')}),
	'succeeded|26|0|0', 'an identical re-read writes nothing');

# ---------- the same key twice in a page: last one wins ----------
$node->safe_psql('postgres', q{
	CREATE TABLE last_seen (distinct_id text PRIMARY KEY, seen_at timestamptz NOT NULL, event text);
	CREATE INDEX ON last_seen (seen_at);});
$node->safe_psql('postgres', q{
	SELECT phsync_add_sync('last_seen', 'last_seen', cursor => 'seen_at', conflict => 'update',
		query => 'SELECT distinct_id, created_at AS seen_at, event FROM events;')});
my $t0 = iso_ago($node, '1 day');
my @events;
for my $i (0 .. 36)
{
	push @events, { uuid => sprintf('10000000-0000-4000-8000-%012d', $i), event => "e$i",
		distinct_id => 'user-' . ($i % 4), created_at => $t0 =~ s/:\d\d\.\d+Z$/sprintf(':%02d.000000Z', $i)/er };
}
fake_post($fake, '/events', \@events);
is($node->safe_psql('postgres', q{
	SELECT status, pages, rows_received, rows_inserted + rows_updated FROM phsync_run_now('last_seen')}),
	'succeeded|4|37|16', 'each page held each of the 4 users 2 or 3 times: one write per user and page');
is($node->safe_psql('postgres', 'SELECT string_agg(distinct_id || \'=\' || event, \',\' ORDER BY distinct_id) FROM last_seen'),
	'user-0=e36,user-1=e33,user-2=e34,user-3=e35', 'each user keeps its last event');

# ---------- a custom daily aggregate, kept fresh ----------
$node->safe_psql('postgres', q{
	CREATE TABLE daily_counts (day timestamptz, event text, n bigint NOT NULL, PRIMARY KEY (day, event));});
$node->safe_psql('postgres', q{
	SELECT phsync_add_sync('daily', 'daily_counts', cursor => 'day', conflict => 'update', lookback => '1 day',
		query => $$SELECT toStartOfDay(created_at) AS day, event, count() AS n
FROM events
WHERE created_at >= toDateTime({since}) AND created_at < toDateTime({until})
GROUP BY day, event$$)});
fake_post($fake, '/generate', { count => 300, seed => 5, created_from => iso_ago($node, '3 days'), step_ms => 600_000,
	events => ['$pageview', 'signed_up'] });

sub source_daily
{
	my %want;
	for my $e (@{ fake_get($fake, '/source') })
	{
		my $day = substr($e->[7], 0, 10);
		$want{"$day|$e->[1]"}++;
	}
	return \%want;
}

sub daily_equal
{
	my %want = %{ source_daily() };
	my $want = join(',', map { "$_=$want{$_}" } sort keys %want);
	my $got = $node->safe_psql('postgres', q{
		SELECT string_agg(to_char(day AT TIME ZONE 'UTC', 'YYYY-MM-DD') || '|' || event || '=' || n, ',' ORDER BY 1)
		FROM (SELECT day, event, n FROM daily_counts ORDER BY day, event) d});
	is($got, $want, $_[0]);
}
like($node->safe_psql('postgres', q{SELECT status || ' ' || rows_updated FROM phsync_run_now('daily')}),
	qr/^succeeded 0$/, 'daily counts: first run');
daily_equal('daily counts equal PostHog\'s, per day and event');
# more events today: today's partial counts grow, and a new event name appears
my %old = %{ source_daily() };
fake_post($fake, '/generate', { count => 7, seed => 6, created_from => iso_ago($node, '10 minutes'), step_ms => 1000,
	events => ['$pageview', 'signed_up', 'purchase'] });
my %new = %{ source_daily() };
my $added = grep { !exists $old{$_} } keys %new;
my $changed = grep { exists $old{$_} && $old{$_} != $new{$_} } keys %new;
is($node->safe_psql('postgres', q{SELECT rows_inserted || ' ' || rows_updated FROM phsync_run_now('daily')}),
	"$added $changed", "the next run adds the $added new (day, event) count(s) and updates the $changed that grew, nothing else");
ok($added >= 1, 'the new event name made a new row');
daily_equal('daily counts still equal PostHog\'s');

# ---------- every sync at once; one failing does not stop the others ----------
$node->safe_psql('postgres', q{
	CREATE TABLE broken (uuid uuid PRIMARY KEY, created_at timestamptz);
	SELECT phsync_add_sync('broken', 'broken', query => 'SELECT uuid, created_at FROM no_such_table');});
my $mark = $node->safe_psql('postgres', 'SELECT max(id) FROM phsync.runs');
my ($ret, $out, $err) = $node->psql('postgres', 'SELECT sync, status FROM phsync_run_now()');
like($err, qr/ERROR:  PostHog request failed with HTTP status 400\nDETAIL:  Unknown table `no_such_table`\.\nHINT:  Check the HogQL query \(the query of sync broken\)\.\nCONTEXT:  phsync run \d+ of sync broken/,
	'run_now() raises the failing sync\'s error');
is($node->safe_psql('postgres', q{
	SELECT string_agg(sync || ':' || status, ',' ORDER BY id) FROM phsync.runs WHERE id > } . $mark),
	'default:succeeded,broken:failed,daily:succeeded,last_seen:succeeded,persons:succeeded',
	'every enabled sync ran, one after the other, each in its own run row');
is(source_equals_target($node, $fake), 0, 'the default sync loaded every event meanwhile');

# disable the broken one: run_now() returns a row per sync
$node->safe_psql('postgres', "SELECT phsync_alter_sync('broken', enabled => false)");
is($node->safe_psql('postgres', 'SELECT string_agg(sync || \':\' || status, \',\') FROM phsync_run_now()'),
	'default:succeeded,daily:succeeded,last_seen:succeeded,persons:succeeded',
	'run_now() returns one row per enabled sync');
like(psql_err("SELECT * FROM phsync_run_now('nope')"), qr/ERROR:  sync "nope" does not exist/,
	'run_now(name) of an unknown sync: clear error');

# the status view has one row per sync
is($node->safe_psql('postgres', q{
	SELECT string_agg(sync || ':' || enabled || ':' || target || ':' || coalesce(last_status, '-'), ',' ORDER BY sync)
	FROM phsync.status}),
	'broken:false:public.broken:failed,daily:true:public.daily_counts:succeeded,default:true:public.posthog_events:succeeded,last_seen:true:public.last_seen:succeeded,persons:true:public.people:succeeded',
	'phsync.status: one row per sync');

# phsync_doctor() checks every enabled sync's target and query
is($node->safe_psql('postgres', q{
	SELECT string_agg(item || ' ' || status || ' ' || detail, E'\n' ORDER BY detail, item)
	FROM phsync_doctor() WHERE item IN ('target', 'query') AND detail LIKE 'sync %'}),
	join("\n",
		'query ok sync daily: PostHog accepts the query',
		'target ok sync daily: public.daily_counts has a unique key and an index on "day"',
		'query ok sync last_seen: PostHog accepts the query',
		'target ok sync last_seen: public.last_seen has a unique key and an index on "seen_at"',
		'query ok sync persons: PostHog accepts the built-in persons query',
		'target ok sync persons: public.people has a unique key and an index on "created_at"'),
	'phsync_doctor() has a target and a query row for each enabled sync');

# dropping a sync keeps its table
my $kept = $node->safe_psql('postgres', "SELECT count(*) FROM last_seen");
$node->safe_psql('postgres', "SELECT phsync_drop_sync('last_seen')");
is($node->safe_psql('postgres', "SELECT count(*) FROM last_seen"), $kept, 'phsync_drop_sync() leaves the table and its rows');
like(psql_err("SELECT phsync_drop_sync('last_seen')"), qr/ERROR:  sync "last_seen" does not exist/, 'dropping twice: clear error');
like(psql_err("SELECT phsync_alter_sync('default', target => 'elsewhere')"),
	qr/ERROR:  the sync named "default" is configured by the phsync\.\* settings.*\nHINT:  Set phsync\.target_table and reload; phsync_alter_sync\('default', \.\.\.\) changes only enabled and schedule\./s,
	'the default sync\'s target is changed in postgresql.conf, and the error names the setting');
is($node->safe_psql('postgres', "SELECT name || '|' || enabled FROM phsync_alter_sync('default', enabled => false)"),
	'default|false', 'but it can be disabled from SQL');
is($node->safe_psql('postgres', "SELECT enabled || '|' || health FROM phsync.status WHERE sync = 'default'"),
	'false|disabled', 'and phsync.status says so');
$node->safe_psql('postgres', "SELECT phsync_alter_sync('default', enabled => true)");

# ---------- the schedule runs every enabled sync ----------
my $at = $node->safe_psql('postgres', "SELECT to_char(now() AT TIME ZONE 'UTC' + interval '3 seconds', 'HH24:MI:SS')");
my $last = $node->safe_psql('postgres', 'SELECT max(id) FROM phsync.runs');
set_conf($node, 'phsync.interval' => '1d', 'phsync.run_at' => $at);
poll_until(sub { $node->safe_psql('postgres', "SELECT count(*) FROM phsync.runs WHERE id > $last AND status <> 'running'") == 3 }, 60,
	'the scheduled runs');
is($node->safe_psql('postgres', "SELECT string_agg(trigger || ':' || sync || ':' || status, ',' ORDER BY id) FROM phsync.runs WHERE id > $last"),
	'schedule:default:succeeded,schedule:daily:succeeded,schedule:persons:succeeded',
	'a scheduled run runs every enabled sync, each in its own row');

# the default sync can be turned off
set_conf($node, 'phsync.target_table' => '');
is($node->safe_psql('postgres', 'SELECT string_agg(sync, \',\') FROM phsync_run_now()'), 'daily,persons',
	'phsync.target_table = \'\' turns the default sync off');

done_testing();
