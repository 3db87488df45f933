# The rest of PostHog's data: cohorts, feature flags, experiments and
# surveys (system tables, read whole on every run, a definition gone from
# PostHog stays flagged deleted), groups and sessions (incremental, with
# updates), cohort membership (ended memberships are deleted); the events
# preset's event filter; generated columns from properties; verify where
# counting by time makes sense, a clear refusal elsewhere.  After each run
# the tables equal the fake's data, row for row.
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
my $fake = start_fake(certs => $certs);
my $node = phsync_node('presets', $fake, $certs, 'phsync.initial_since' => hours_ago(48),
	'phsync.target_table' => '');
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');

sub psql_err
{
	my ($sql) = @_;
	my ($ret, $out, $err) = $node->psql('postgres', $sql);
	return $ret == 0 ? "OK: $out" : $err;
}

# PostHog's rows (as the API renders them) against the table's, with SQL
# expressions over r (the JSON row) for each column compared
sub diff
{
	my ($rows, $table, %cols) = @_;
	my $json = encode_json($rows);
	$json =~ s/\$j\$//g;
	my $src = join(', ', map { "$cols{$_} AS $_" } sort keys %cols);
	my $tgt = join(', ', map { $_ } sort keys %cols);
	return $node->safe_psql('postgres', qq{
		WITH src AS (SELECT $src FROM jsonb_array_elements(\$j\$$json\$j\$::jsonb) r),
		t AS (SELECT $tgt FROM $table)
		SELECT (SELECT count(*) FROM (SELECT * FROM src EXCEPT ALL SELECT * FROM t) a) || ' '
		    || (SELECT count(*) FROM (SELECT * FROM t EXCEPT ALL SELECT * FROM src) b)});
}
sub run_sync
{
	my ($name) = @_;
	return $node->safe_psql('postgres', "SELECT status || ' ' || rows_inserted FROM phsync_run_now('$name')");
}
sub last_counts
{
	my ($name) = @_;
	return $node->safe_psql('postgres', "SELECT rows_inserted || ' ' || rows_updated || ' ' || rows_deleted FROM phsync.runs WHERE sync = '$name' ORDER BY id DESC LIMIT 1");
}

# ---------- cohorts ----------
my $ago = sub { iso_ago($node, $_[0]) };
my $ids = fake_post($fake, '/system/cohorts', [
	{ name => 'paying', description => 'customers', filters => { properties => { type => 'AND' } }, is_static => 0, count => 2, version => 1 },
	{ name => 'beta', filters => {}, is_static => 1 },
	{ name => 'old', filters => {}, is_static => 0 } ])->{ids};
$node->safe_psql('postgres', q{
	SELECT phsync_create_table('cohorts', 'ph_cohorts');
	SELECT phsync_add_sync('cohorts', 'ph_cohorts', preset => 'cohorts');});
is($node->safe_psql('postgres', "SELECT coalesce(cursor_column, '-') || ' ' || conflict || ' ' || coalesce(lookback::text, '-') FROM phsync.syncs WHERE name = 'cohorts'"),
	'- update -', 'cohorts: no cursor, conflict update, read whole');
my %cohort_cols = (id => "(r->>0)::bigint", name => "r->>1", description => "r->>2", deleted => "(r->>3)::int::boolean",
	filters => "(r->>4)::jsonb", query => "(r->>6)::jsonb", is_static => "(r->>11)::int::boolean",
	version => "(r->>9)::bigint", count => "(r->>10)::bigint");
is(run_sync('cohorts'), 'succeeded 3', 'cohorts: the first run loads all three');
is(diff(fake_get($fake, '/system/cohorts'), 'ph_cohorts', %cohort_cols), '0 0', 'cohorts equal PostHog\'s');
# a change, a soft delete, a hard delete
fake_post($fake, '/system/cohorts', [ { id => $ids->[0], name => 'paying customers', description => 'customers',
	filters => { properties => { type => 'OR' } }, is_static => 0, count => 5, version => 2 } ]);
fake_post($fake, '/system/cohorts/delete', { ids => [ $ids->[1] ] });
fake_post($fake, '/system/cohorts/delete', { ids => [ $ids->[2] ], hard => JSON::PP::true });
is(run_sync('cohorts'), 'succeeded 0', 'cohorts: the next run inserts nothing new');
is(last_counts('cohorts'), '0 3 0', 'and updates three: the changed one, the one PostHog flags deleted, the one it dropped');
is($node->safe_psql('postgres', "SELECT string_agg(id || ' ' || name || ' ' || deleted, ',' ORDER BY id) FROM ph_cohorts"),
	"$ids->[0] paying customers false,$ids->[1] beta true,$ids->[2] old true",
	'the change is there once; deleted definitions stay, flagged');
is(diff(fake_get($fake, '/system/cohorts'), "ph_cohorts WHERE id <> $ids->[2]", %cohort_cols), '0 0',
	'the rows PostHog still has equal its rows');

# ---------- feature flags ----------
my $flags = fake_post($fake, '/system/feature_flags', [
	{ key => 'new-checkout', name => 'New checkout', filters => { groups => [ { rollout_percentage => 50 } ] }, rollout_percentage => 50 },
	{ key => 'dark-mode', name => 'Dark mode', filters => {}, rollout_percentage => undef } ])->{ids};
$node->safe_psql('postgres', q{
	SELECT phsync_create_table('feature_flags', 'ph_flags');
	SELECT phsync_add_sync('flags', 'ph_flags', preset => 'feature_flags');});
my %flag_cols = (id => "(r->>0)::bigint", key => "r->>1", name => "r->>2", filters => "(r->>3)::jsonb",
	rollout_percentage => "(r->>4)::bigint", deleted => "(r->>7)::int::boolean");
is(run_sync('flags'), 'succeeded 2', 'feature flags: first run');
is(diff(fake_get($fake, '/system/feature_flags'), 'ph_flags', %flag_cols), '0 0', 'feature flags equal PostHog\'s');
fake_post($fake, '/system/feature_flags', [ { id => $flags->[0], key => 'new-checkout', name => 'New checkout',
	filters => { groups => [ { rollout_percentage => 100 } ] }, rollout_percentage => 100 } ]);
fake_post($fake, '/system/feature_flags/delete', { ids => [ $flags->[1] ] });
run_sync('flags');
is(last_counts('flags'), '0 2 0', 'a rollout change and a deletion: two rows updated, none added');
is(diff(fake_get($fake, '/system/feature_flags'), 'ph_flags', %flag_cols), '0 0', 'equal again (the deleted flag is set)');

# ---------- experiments and surveys: PostHog removes the row, phsync flags it ----------
my $exps = fake_post($fake, '/system/experiments', [
	{ name => 'checkout test', feature_flag_id => $flags->[0], filters => {}, parameters => { variants => 2 }, archived => 0,
	  start_date => $ago->('3 days'), updated_at => $ago->('1 day') },
	{ name => 'pricing test', feature_flag_id => $flags->[0], filters => {}, archived => 0, updated_at => $ago->('1 day') } ])->{ids};
my $surveys = fake_post($fake, '/system/surveys', [
	{ name => 'NPS', type => 'popover', questions => [ { type => 'rating' } ] },
	{ name => 'Churn', type => 'api', questions => [] } ])->{ids};
$node->safe_psql('postgres', q{
	SELECT phsync_create_table('experiments', 'ph_experiments');
	SELECT phsync_add_sync('experiments', 'ph_experiments', preset => 'experiments');
	SELECT phsync_create_table('surveys', 'ph_surveys');
	SELECT phsync_add_sync('surveys', 'ph_surveys', preset => 'surveys');});
is(run_sync('experiments') . ', ' . run_sync('surveys'), 'succeeded 2, succeeded 2', 'experiments and surveys: first runs');
my %exp_cols = (id => "(r->>0)::bigint", name => "r->>1", feature_flag_id => "(r->>11)::bigint",
	parameters => "(r->>7)::jsonb", archived => "(r->>10)::int::boolean", updated_at => "(r->>5)::timestamptz");
my %survey_cols = (id => "r->>0", name => "r->>1", type => "r->>2", questions => "(r->>3)::jsonb");
is(diff(fake_get($fake, '/system/experiments'), 'ph_experiments', %exp_cols), '0 0', 'experiments equal PostHog\'s');
is(diff(fake_get($fake, '/system/surveys'), 'ph_surveys', %survey_cols), '0 0', 'surveys equal PostHog\'s');
fake_post($fake, '/system/experiments', [ { id => $exps->[0], name => 'checkout test', feature_flag_id => $flags->[0],
	filters => {}, parameters => { variants => 2 }, archived => 1, start_date => $ago->('3 days'), updated_at => $ago->('1 minute') } ]);
fake_post($fake, '/system/experiments/delete', { ids => [ $exps->[1] ], hard => JSON::PP::true });
fake_post($fake, '/system/surveys/delete', { ids => [ $surveys->[1] ], hard => JSON::PP::true });
run_sync('experiments');
run_sync('surveys');
is($node->safe_psql('postgres', "SELECT string_agg(name || ' ' || archived || ' ' || deleted, ',' ORDER BY id) FROM ph_experiments"),
	'checkout test true false,pricing test false true', 'an archived experiment updates; a removed one stays, flagged deleted by phsync');
is($node->safe_psql('postgres', "SELECT string_agg(name || ' ' || deleted, ',' ORDER BY name) FROM ph_surveys"),
	'Churn true,NPS false', 'a removed survey stays, flagged deleted');
fake_post($fake, '/system/surveys', [ { id => $surveys->[1], name => 'Churn', type => 'api', questions => [] } ]);
run_sync('surveys');
is($node->safe_psql('postgres', "SELECT deleted FROM ph_surveys WHERE name = 'Churn'"), 'f', 'and is unflagged when it comes back');

# ---------- groups ----------
fake_post($fake, '/groups', [
	{ index => 0, key => 'acme', created_at => $ago->('30 days'), updated_at => $ago->('2 hours'), properties => { plan => 'free', seats => 3 } },
	{ index => 0, key => 'globex', created_at => $ago->('20 days'), updated_at => $ago->('2 hours'), properties => { plan => 'pro' } },
	{ index => 1, key => 'acme', created_at => $ago->('10 days'), updated_at => $ago->('2 hours'), properties => {} } ]);
$node->safe_psql('postgres', q{
	SELECT phsync_create_table('groups', 'ph_groups', properties => ARRAY['plan']);
	SELECT phsync_add_sync('groups', 'ph_groups', preset => 'groups');});
my %group_cols = (group_type_index => "(r->>0)::smallint", group_key => "r->>1", updated_at => "(r->>3)::timestamptz",
	properties => "(r->>4)::jsonb");
is(run_sync('groups'), 'succeeded 3', 'groups: first run');
is(diff(fake_get($fake, '/groups'), 'ph_groups', %group_cols), '0 0', 'groups equal PostHog\'s');
fake_post($fake, '/groups', [ { index => 0, key => 'acme', created_at => $ago->('30 days'), updated_at => $ago->('1 minute'),
	properties => { plan => 'pro', seats => 12 } } ]);
run_sync('groups');
is(last_counts('groups'), '0 1 0', 'a new version of a group: one row updated, none added');
is(diff(fake_get($fake, '/groups'), 'ph_groups', %group_cols), '0 0', 'equal again');
is($node->safe_psql('postgres', q{SELECT plan FROM ph_groups WHERE group_type_index = 0 AND group_key = 'acme'}), 'pro',
	'its generated plan column follows');

# ---------- sessions ----------
my @session_events;
for my $s (1 .. 3)
{
	for my $i (1 .. 4)
	{
		push @session_events, { event => $i == 4 ? '$autocapture' : '$pageview', distinct_id => "user-$s",
			timestamp => $ago->((60 - $s * 10 - $i) . ' minutes'), created_at => $ago->((60 - $s * 10 - $i) . ' minutes'),
			properties => { '$session_id' => "session-$s", '$current_url' => "https://example.com/$s/$i" } };
	}
}
fake_post($fake, '/events', \@session_events);
$node->safe_psql('postgres', q{
	SELECT phsync_create_table('sessions', 'ph_sessions');
	SELECT phsync_add_sync('sessions', 'ph_sessions', preset => 'sessions');});
my %session_cols = (session_id => "r->>1", distinct_id => "r->>2", start_timestamp => "(r->>3)::timestamptz",
	end_timestamp => "(r->>4)::timestamptz", pageview_count => "(r->>10)::bigint", autocapture_count => "(r->>11)::bigint",
	urls => "(r->>6)::jsonb", max_inserted_at => "(r->>5)::timestamptz");
is(run_sync('sessions'), 'succeeded 3', 'sessions: first run, one row per session');
is(diff(fake_get($fake, '/sessions'), 'ph_sessions', %session_cols), '0 0', 'sessions equal PostHog\'s aggregates');
# session 3 goes on
fake_post($fake, '/events', [ map { { event => '$pageview', distinct_id => 'user-3', timestamp => $ago->('1 minute'),
	created_at => $ago->('1 minute'), properties => { '$session_id' => 'session-3', '$current_url' => "https://example.com/3/more$_" } } } 1 .. 2 ]);
run_sync('sessions');
is(last_counts('sessions'), '0 1 0', 'a session that went on: its row is updated, not duplicated');
is(diff(fake_get($fake, '/sessions'), 'ph_sessions', %session_cols), '0 0', 'equal again');
is($node->safe_psql('postgres', q{SELECT pageview_count FROM ph_sessions WHERE session_id = 'session-3'}), 5, 'with its new page views');

# ---------- cohort membership ----------
my @people = map { sprintf('00000000-0000-4000-8000-%012d', $_) } 1 .. 6;
fake_post($fake, '/persons', [ map { { id => $_, created_at => $ago->('5 days'), properties => {} } } @people ]);
my ($dynamic) = @{ fake_post($fake, '/system/cohorts', [ { name => 'active', filters => {}, is_static => 0 } ])->{ids} };
fake_post($fake, '/cohort_people', { cohort_id => $dynamic, person_ids => [ @people[0 .. 2] ] });
fake_post($fake, '/static_cohort_people', { cohort_id => $ids->[1], person_ids => [ $people[3] ] });
$node->safe_psql('postgres', q{
	SELECT phsync_create_table('cohort_people', 'ph_members');
	SELECT phsync_add_sync('members', 'ph_members', preset => 'cohort_people');});
is(run_sync('members'), 'succeeded 4', 'cohort_people: dynamic and static members');
is(diff([ @{ fake_get($fake, '/cohort_people') }, @{ fake_get($fake, '/static_cohort_people') } ], 'ph_members',
	person_id => "(r->>0)::uuid", cohort_id => "(r->>1)::bigint"), '0 0', 'the memberships equal PostHog\'s');
# a recalculation: person 1 leaves, person 5 joins
fake_post($fake, '/cohort_people', { cohort_id => $dynamic, person_ids => [ @people[1 .. 2], $people[4] ] });
run_sync('members');
is(last_counts('members'), '1 0 1', 'a recalculation: one membership added, the ended one deleted (rows_deleted)');
is(diff([ @{ fake_get($fake, '/cohort_people') }, @{ fake_get($fake, '/static_cohort_people') } ], 'ph_members',
	person_id => "(r->>0)::uuid", cohort_id => "(r->>1)::bigint"), '0 0', 'equal again');

# ---------- the events preset's event filter ----------
fake_post($fake, '/generate', { count => 40, seed => 51, created_from => $ago->('3 hours'), step_ms => 60_000 });
$node->safe_psql('postgres', q{
	SELECT phsync_create_table('events', 'ph_signups', properties => ARRAY['$browser', '$current_url', 'n']);
	SELECT phsync_add_sync('signups', 'ph_signups', preset => 'events', events => ARRAY['signed_up', '$pageview']);});
fake_post($fake, '/reset', {});
run_sync('signups');
my @want = grep { $_->[1] eq 'signed_up' || $_->[1] eq '$pageview' } @{ fake_get($fake, '/source') };
is($node->safe_psql('postgres', q{SELECT string_agg(DISTINCT event, ',' ORDER BY event) FROM ph_signups}), '$pageview,signed_up',
	'only the named events are loaded');
is($node->safe_psql('postgres', 'SELECT count(*) FROM ph_signups'), scalar(@want), 'all of them: ' . scalar(@want));
my $req = fake_requests($fake)->[0];
is_deeply($req->{body}{query}{values}{events}, [ 'signed_up', '$pageview' ], 'the names travel as a values placeholder');
like($req->{body}{query}{query}, qr/AND event IN \{events\}/, 'not pasted into the query');
like(psql_err(q{SELECT phsync_add_sync('x', 'ph_members', preset => 'cohort_people', events => ARRAY['a'])}),
	qr/ERROR:  only the events preset takes events => ARRAY\[\.\.\.\]/, 'other presets refuse an event filter');

# ---------- generated columns from properties ----------
is($node->safe_psql('postgres', q{
	SELECT string_agg(attname || ' ' || pg_get_expr(d.adbin, d.adrelid), ', ' ORDER BY attnum)
	FROM pg_attribute a JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
	WHERE a.attrelid = 'ph_signups'::regclass AND a.attgenerated = 's'}),
	q{browser (properties ->> '$browser'::text), current_url (properties ->> '$current_url'::text), n (properties ->> 'n'::text)},
	'phsync_create_table(properties => ...) adds a generated column per property');
is($node->safe_psql('postgres', q{SELECT count(*) FROM ph_signups WHERE browser IS DISTINCT FROM properties->>'$browser' OR n::int <> (properties->>'n')::int}),
	0, 'the generated values are right after loading');
my $with_browser = grep { defined JSON::PP->new->decode($_->[5])->{'$browser'} } @want;
is($node->safe_psql('postgres', q{SELECT count(*) FROM ph_signups WHERE browser IN ('Chrome', 'Firefox', 'Safari')}), $with_browser,
	"and usable like any column ($with_browser rows have a browser)");
like(psql_err(q{SELECT phsync_create_table('sessions', 'x', properties => ARRAY['a'])}),
	qr/ERROR:  the sessions preset has no properties to take columns from/, 'a preset without properties refuses them');

# ---------- verify where counting by time makes sense ----------
my ($vfrom, $vto) = ($ago->('4 hours'), $ago->('0 minutes'));
is($node->safe_psql('postgres', "SELECT count(*) FROM phsync_verify('signups', '$vfrom', '$vto', bucket => '1 hour') WHERE status <> 'ok'"),
	0, 'verify of a filtered events sync counts the same events');
is($node->safe_psql('postgres', "SELECT count(*) FROM phsync_verify('sessions', '$vfrom', '$vto', bucket => '1 hour') WHERE status <> 'ok'"),
	0, 'verify of sessions');
is($node->safe_psql('postgres', "SELECT count(*) FROM phsync_verify('groups', '$vfrom', '$vto', bucket => '1 hour') WHERE status <> 'ok'"),
	0, 'verify of groups');
like(psql_err("SELECT * FROM phsync_verify('cohorts', '$vfrom', '$vto')"),
	qr/ERROR:  sync cohorts has no cursor to verify by\nDETAIL:  The cohorts preset is read whole on every run: after each run the table equals PostHog's\./,
	'verify of a preset read whole: a clear refusal');
like(psql_err("SELECT phsync_backfill('members', '$vfrom', '$vto')"),
	qr/ERROR:  sync members has no cursor to backfill by/, 'so is a backfill');
like(psql_err(q{SELECT phsync_add_sync('x', 'ph_cohorts', preset => 'cohorts', "cursor" => 'created_at')}),
	qr/ERROR:  the cohorts preset has no cursor/, 'a cursor for a preset read whole is refused');
like(psql_err(q{SELECT phsync_add_sync('x', 'ph_cohorts', preset => 'cohorts', verify => true)}),
	qr/ERROR:  the cohorts preset cannot be verified/, 'so is scheduled verification');

# the doctor and the status view know them
like($node->safe_psql('postgres', q{SELECT detail FROM phsync_doctor() WHERE item = 'target' AND detail LIKE 'sync members:%'}),
	qr/^sync members: public.ph_members has a unique key \(the cohort_people preset is read whole on every run\)$/, 'phsync_doctor()');
is($node->safe_psql('postgres', q{SELECT coalesce(watermark::text, '-') || ' ' || coalesce(target_problem, '-') FROM phsync.status WHERE sync = 'members'}),
	'- -', 'phsync.status: no watermark, no problem');

done_testing();
