# Several PostHog projects through PostgreSQL's own catalogs: foreign
# servers of the phsync wrapper (host, project, limits) and user mappings
# (the key).  Two servers synced side by side, each table equal to its
# project; a missing mapping, a wrong key and a dropped server each fail
# their sync with a clear error while the other goes on; the validator's
# refusals; the key in no log line, error, run row, doctor row, nor in
# pg_user_mappings for other roles; pg_dump and pg_restore keep servers,
# mappings and syncs.
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
	projects => [ [ '1', $API_KEY ], [ '2', $k2, 'Asia/Kolkata' ] ]);
my $node = phsync_node('servers', $fake, $certs, 'phsync.initial_since' => hours_ago(3));
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');

sub psql_err
{
	my ($sql, $role) = @_;
	my ($ret, $out, $err) = $node->psql('postgres', ($role ? "SET ROLE $role;\n" : '') . $sql);
	return $ret == 0 ? "OK: $out" : $err;
}

# ---------- the validator ----------
my $ca = $certs->{ca};
my $url = $fake->{url};
like(psql_err("CREATE SERVER s FOREIGN DATA WRAPPER phsync OPTIONS (host 'http://example.com', project_id '1')"),
	qr/ERROR:  invalid value for option "host": "http:\/\/example.com"\nDETAIL:  Plain http:\/\/ is only allowed to a loopback address; use https:\/\//,
	'a plain http host is refused (loopback http stays allowed)');
like(psql_err("CREATE SERVER s FOREIGN DATA WRAPPER phsync OPTIONS (host 'https://eu.posthog.com', project_id 'twelve')"),
	qr/ERROR:  invalid value for option "project_id": "twelve"\nDETAIL:  A PostHog project ID is a number/,
	'a project that is not a number is refused');
like(psql_err("CREATE SERVER s FOREIGN DATA WRAPPER phsync OPTIONS (host 'https://eu.posthog.com', project_id '1', api_key 'phx_x')"),
	qr/ERROR:  option "api_key" belongs in a user mapping, not on a server\nDETAIL:  Every role may read a server's options\.\nHINT:  CREATE USER MAPPING FOR <role> SERVER <server> OPTIONS \(api_key '\.\.\.'\);/,
	'an api_key on a server is refused, with the statement that belongs');
like(psql_err("CREATE SERVER s FOREIGN DATA WRAPPER phsync OPTIONS (hots 'https://eu.posthog.com', project_id '1')"),
	qr/ERROR:  invalid option "hots"\nHINT:  Valid options in this context are: host, project_id, ca_file, proxy, page_size, max_requests_per_minute, max_requests_per_hour, max_concurrent_requests, request_timeout/,
	'an unknown option is refused, naming the valid ones');
like(psql_err("CREATE SERVER s FOREIGN DATA WRAPPER phsync OPTIONS (host 'https://eu.posthog.com')"),
	qr/ERROR:  a phsync server needs options "host" and "project_id"/, 'a server needs a project');
like(psql_err("CREATE SERVER s FOREIGN DATA WRAPPER phsync OPTIONS (host 'https://eu.posthog.com', project_id '1', page_size '60000')"),
	qr/ERROR:  invalid value for option "page_size": "60000"\nHINT:  It must be a whole number from 1 to 50000\./,
	'limits are checked');
like(psql_err("CREATE SERVER s FOREIGN DATA WRAPPER phsync OPTIONS (host 'https://eu.posthog.com', project_id '1', proxy 'http://u:secret\@proxy:3128')"),
	qr/ERROR:  a proxy with a user or password belongs in a user mapping/, 'a proxy password is not put where everyone reads it');
$node->safe_psql('postgres', "CREATE SERVER s FOREIGN DATA WRAPPER phsync OPTIONS (host 'https://eu.posthog.com', project_id '1')");
like(psql_err("CREATE USER MAPPING FOR CURRENT_USER SERVER s"),
	qr/ERROR:  a user mapping for a phsync server needs option "api_key"/, 'a user mapping needs a key');
like(psql_err("CREATE USER MAPPING FOR CURRENT_USER SERVER s OPTIONS (api_key 'k', host 'x')"),
	qr/ERROR:  invalid option "host"\nHINT:  Valid options in this context are: proxy, api_key/, 'a user mapping takes the key (and a proxy) only');
like(psql_err("ALTER SERVER s OPTIONS (DROP project_id)"),
	qr/ERROR:  a phsync server needs options "host" and "project_id"/, 'ALTER SERVER is checked too');
$node->safe_psql('postgres', 'DROP SERVER s');

# ---------- two servers, two projects, two keys ----------
fake_post($fake, '/generate', { count => 30, seed => 31, created_from => iso_ago($node, '2 hours'), step_ms => 60_000 });
fake_post($fake, '/generate?project=2', { count => 20, seed => 32, created_from => iso_ago($node, '2 hours'), step_ms => 90_000 });
$node->safe_psql('postgres', qq{
	CREATE ROLE alice LOGIN;
	CREATE ROLE bob LOGIN;
	CREATE SERVER posthog_us FOREIGN DATA WRAPPER phsync
		OPTIONS (host '$url', project_id '1', ca_file '$ca');
	CREATE SERVER posthog_eu FOREIGN DATA WRAPPER phsync
		OPTIONS (host '$url', project_id '2', ca_file '$ca', max_concurrent_requests '1', page_size '7');
	GRANT USAGE ON FOREIGN SERVER posthog_us, posthog_eu TO alice;
	GRANT CREATE ON SCHEMA public TO alice;
	GRANT EXECUTE ON FUNCTION phsync_add_sync(text, text, text, text, text, text, interval, boolean, boolean, text, text[], text, text),
	                          phsync_alter_sync(text, text, text, text, text, text, interval, boolean, boolean, boolean, text, text[], text, text),
	                          phsync_run_now(text)
	      TO alice;});
# the keys: not through the statement log (as for a postgres_fdw password)
$node->safe_psql('postgres', qq{
	SET log_statement = 'none';
	CREATE USER MAPPING FOR alice SERVER posthog_us OPTIONS (api_key '$API_KEY');
	CREATE USER MAPPING FOR alice SERVER posthog_eu OPTIONS (api_key '$k2');});

like(psql_err("SELECT phsync_add_sync('us', 'us_events', preset => 'events', server => 'nowhere')", 'alice'),
	qr/ERROR:  server "nowhere" of sync us does not exist/, 'a sync on a server that does not exist is refused');
$node->safe_psql('postgres', q{
	SET ROLE alice;
	SELECT phsync_create_table('events', 'us_events');
	SELECT phsync_create_table('events', 'eu_events');
	SELECT phsync_add_sync('us', 'us_events', preset => 'events', server => 'posthog_us');
	SELECT phsync_add_sync('eu', 'eu_events', preset => 'events', server => 'posthog_eu');});
is($node->safe_psql('postgres', "SELECT string_agg(name || ' ' || owner || ' ' || coalesce(server, '-'), ',' ORDER BY name) FROM phsync.syncs"),
	'eu alice posthog_eu,us alice posthog_us', 'phsync.syncs keeps each sync\'s server');

sub runs { return join(',', split /\n/, $node->safe_psql('postgres',
	q{SELECT sync || ' ' || status FROM phsync_run_now() ORDER BY sync})); }
sub run_error { return $node->safe_psql('postgres', "SELECT error FROM phsync.runs WHERE sync = '$_[0]' ORDER BY id DESC LIMIT 1"); }
sub project_diff
{
	my ($project, $table) = @_;
	my $json = encode_json(fake_get($fake, "/source?project=$project"));
	$json =~ s/\$j\$//g;
	return $node->safe_psql('postgres', qq{
		WITH src AS (SELECT (r->>0)::uuid AS uuid, (r->>7)::timestamptz AS created_at, r->>1 AS event
		             FROM jsonb_array_elements(\$j\$$json\$j\$::jsonb) r),
		t AS (SELECT uuid, created_at, event FROM $table)
		SELECT (SELECT count(*) FROM (SELECT * FROM src EXCEPT ALL SELECT * FROM t) a)
		     + (SELECT count(*) FROM (SELECT * FROM t EXCEPT ALL SELECT * FROM src) b)});
}

is(runs(), 'default succeeded,eu succeeded,us succeeded', 'the default sync (settings) and two server syncs run side by side');
is(project_diff(1, 'us_events'), 0, 'us_events equals project 1');
is(project_diff(2, 'eu_events'), 0, 'eu_events equals project 2');
is($node->safe_psql('postgres', 'SELECT count(*) FROM us_events') . ' ' . $node->safe_psql('postgres', 'SELECT count(*) FROM eu_events'),
	'30 20', '30 and 20 rows');
my %by_project;
$by_project{ $_->{project_id} }{ $_->{auth_ok} ? 'ok' : 'bad' }++ for @{ fake_requests($fake) };
ok($by_project{2}{ok} >= 3 && !$by_project{2}{bad}, "project 2 was asked with its own key ($by_project{2}{ok} requests, pages of 7: the server's page_size)");

# ---------- a missing user mapping ----------
fake_post($fake, '/generate', { count => 5, seed => 33, created_from => iso_ago($node, '5 minutes'), step_ms => 1000 });
$node->safe_psql('postgres', 'DROP USER MAPPING FOR alice SERVER posthog_eu');
my ($ret, $out, $err) = $node->psql('postgres', q{SELECT sync || ' ' || status FROM phsync_run_now() ORDER BY sync});
like($err, qr/ERROR:  user mapping not found for user "alice", server "posthog_eu"\nDETAIL:  This is for sync eu; the key of server posthog_eu is in the user mapping of the role that uses it\.\nHINT:  CREATE USER MAPPING FOR alice SERVER posthog_eu OPTIONS \(api_key '\.\.\.'\);/,
	'no user mapping: the eu sync fails with PostgreSQL\'s words and the fix');
is($node->safe_psql('postgres', "SELECT status FROM phsync.runs WHERE sync = 'us' ORDER BY id DESC LIMIT 1"), 'succeeded', 'the us sync is not affected');
is(project_diff(1, 'us_events'), 0, 'and got the new rows');

# ---------- a wrong key ----------
$node->safe_psql('postgres', q{SET log_statement = 'none'; CREATE USER MAPPING FOR alice SERVER posthog_eu OPTIONS (api_key 'phx_wrong_key_0000000000000000')});
($ret, $out, $err) = $node->psql('postgres', q{SELECT sync || ' ' || status FROM phsync_run_now('eu')});
like($err, qr/ERROR:  .*401.*\n(DETAIL:  .*\n)?HINT:  Check the api_key of the user mapping for alice on server posthog_eu: PostHog does not accept it\./,
	'a wrong key: an authentication error whose hint names the user mapping');
unlike($err, qr/phx_wrong_key/, 'the error does not show the key');
$node->safe_psql('postgres', qq{SET log_statement = 'none'; ALTER USER MAPPING FOR alice SERVER posthog_eu OPTIONS (SET api_key '$k2')});
is(runs(), 'default succeeded,eu succeeded,us succeeded', 'with the right key again, all succeed');

# ---------- the doctor checks every server in use ----------
my $doctor = $node->safe_psql('postgres', q{SELECT string_agg(item || '|' || status || '|' || coalesce(detail, ''), E'\n') FROM phsync_doctor() WHERE item = 'server'});
like($doctor, qr/^server\|ok\|sync eu: server posthog_eu: the API key of the user mapping for alice runs queries in project 2 at \Q$url\E; its time zone is Asia\/Kolkata$/m,
	'phsync_doctor() checks the eu server with alice\'s key');
like($doctor, qr/^server\|ok\|sync us: server posthog_us: .* project 1 .*; its time zone is UTC$/m, 'and the us server');

# ---------- a proxy ----------
$node->safe_psql('postgres', q{ALTER SERVER posthog_eu OPTIONS (ADD proxy 'http://127.0.0.1:9')});
($ret, $out, $err) = $node->psql('postgres', q{SELECT status FROM phsync_run_now('eu')});
like($err, qr/ERROR:  could not reach PostHog at .*\nDETAIL:  .*127\.0\.0\.1 port 9/, 'a server\'s proxy is used (here: one that is not there)');
$node->safe_psql('postgres', q{ALTER SERVER posthog_eu OPTIONS (DROP proxy)});

# ---------- a server dropped under a sync ----------
$node->safe_psql('postgres', 'DROP SERVER posthog_eu CASCADE');
($ret, $out, $err) = $node->psql('postgres', q{SELECT sync || ' ' || status FROM phsync_run_now() ORDER BY sync});
like($err, qr/ERROR:  server "posthog_eu" of sync eu does not exist\nHINT:  Create it with CREATE SERVER posthog_eu FOREIGN DATA WRAPPER phsync/,
	'a dropped server: the eu sync fails, saying so');
is($node->safe_psql('postgres', "SELECT status FROM phsync.runs WHERE sync = 'us' ORDER BY id DESC LIMIT 1"), 'succeeded', 'the us sync goes on');
like($node->safe_psql('postgres', q{SELECT detail FROM phsync_doctor() WHERE item = 'server' AND status = 'error'}),
	qr/^sync eu: server posthog_eu: server "posthog_eu" of sync eu does not exist$/, 'the doctor shows it');
like(psql_err(q{SELECT phsync_alter_sync('eu', server => '')}, 'alice'),
	qr/ERROR:  only superusers may change a sync without a server\nDETAIL:  Without a server, the sync would use phsync.api_key, which only superusers may use\./,
	'a delegate\'s sync cannot go back to the settings (server => \'\'): their key is the superusers\'');

# ---------- the key stays secret ----------
$node->safe_psql('postgres', qq{
	CREATE SERVER posthog_eu FOREIGN DATA WRAPPER phsync OPTIONS (host '$url', project_id '2', ca_file '$ca');
	GRANT USAGE ON FOREIGN SERVER posthog_eu TO alice, bob;
	SET log_statement = 'none';
	CREATE USER MAPPING FOR alice SERVER posthog_eu OPTIONS (api_key '$k2');});
is($node->safe_psql('postgres', q{SET ROLE bob; SELECT coalesce(umoptions::text, 'hidden') FROM pg_user_mappings WHERE usename = 'alice' ORDER BY srvname}),
	"hidden\nhidden", 'pg_user_mappings hides alice\'s keys from bob');
like($node->safe_psql('postgres', q{SET ROLE alice; SELECT umoptions::text FROM pg_user_mappings WHERE usename = 'alice' AND srvname = 'posthog_eu'}),
	qr/api_key=/, 'while alice sees her own');
$node->safe_psql('postgres', q{SELECT phsync_alter_sync('eu', server => 'posthog_eu')});
is(runs(), 'default succeeded,eu succeeded,us succeeded', 'all runs succeed again');
my $log = slurp_file($node->logfile);
my $everything = $log . $node->safe_psql('postgres', q{SELECT string_agg(r::text, E'\n') FROM phsync.runs r})
  . $node->safe_psql('postgres', q{SELECT string_agg(d::text, E'\n') FROM phsync_doctor() d});
unlike($everything, qr/\Q$k2\E|\Q$API_KEY\E/, 'no key in the server log, phsync.runs or the doctor\'s output');

# ---------- pg_dump and pg_restore ----------
# into another cluster's database of the same name (the extension lives in
# phsync.database only); roles are global objects, outside the dump
my $dump = PostgreSQL::Test::Utils::tempdir() . '/servers.dump';
$node->command_ok([ 'pg_dump', '-Fc', '-f', $dump, '-d', $node->connstr('postgres') ], 'pg_dump');
my $copy = phsync_node('servers_restored', $fake, $certs);
$copy->safe_psql('postgres', 'CREATE ROLE alice LOGIN; CREATE ROLE bob LOGIN');
$copy->command_ok([ 'pg_restore', '-d', $copy->connstr('postgres'), $dump ], 'pg_restore');
is($copy->safe_psql('postgres', q{SELECT string_agg(srvname || ' ' || array_to_string(ARRAY(SELECT unnest(srvoptions) ORDER BY 1), ' '), E'\n' ORDER BY srvname) FROM pg_foreign_server}),
	"posthog_eu ca_file=$ca host=$url project_id=2\nposthog_us ca_file=$ca host=$url project_id=1",
	'the servers are restored');
is($copy->safe_psql('postgres', q{SELECT string_agg(srvname || ' ' || usename, ',' ORDER BY srvname) FROM pg_user_mappings}),
	'posthog_eu alice,posthog_us alice', 'the user mappings too');
is($copy->safe_psql('postgres', q{SELECT string_agg(name || ' ' || coalesce(server, '-'), ',' ORDER BY name) FROM phsync.syncs}),
	'eu posthog_eu,us posthog_us', 'and the syncs with their servers');
is(join(',', split /\n/, $copy->safe_psql('postgres', q{SELECT sync || ' ' || status FROM phsync_run_now() ORDER BY sync})),
	'default succeeded,eu succeeded,us succeeded', 'the restored copy runs them');

done_testing();
