# Others' syncs are theirs, and the settings' key is the superusers':
# - a sync without a server (phsync.api_key) is added, changed and run only
#   for a superuser;
# - phsync_run_now(name) runs only the caller's own syncs; without a name it
#   runs and reports the caller's; nobody sees another owner's error text;
# - owners are role OIDs: DROP ROLE of an owner is refused, REASSIGN OWNED
#   and DROP OWNED take the syncs along, a new role of the same name gets
#   nothing;
# - only superusers choose where the database server connects (proxy).
# On 0.3 each of these was open (issue 21, items 2, 10, 12, 13).
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
my $node = phsync_node('owners', $fake, $certs);
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');
fake_post($fake, '/generate', { count => 20, seed => 29, created_from => iso_ago($node, '1 hour'), step_ms => 60_000 });

sub as_role
{
	my ($role, $sql) = @_;
	my ($ret, $out, $err) = $node->psql('postgres', "SET ROLE $role;\n$sql");
	return $ret == 0 ? "OK: $out" : $err;
}
my $grants = q{
	GRANT EXECUTE ON FUNCTION phsync_add_sync(text, text, text, text, text, text, interval, boolean, boolean, text, text[], text, text),
	                          phsync_alter_sync(text, text, text, text, text, text, interval, boolean, boolean, boolean, text, text[], text, text),
	                          phsync_drop_sync(text), phsync_run_now(text), phsync_create_table(text, text, text[])
	      TO %s;
	CREATE SCHEMA AUTHORIZATION %s;
	GRANT USAGE ON FOREIGN SERVER posthog TO %s;};
$node->safe_psql('postgres', qq{
	@{[ server_sql($fake, $certs) ]}
	CREATE ROLE alice LOGIN; CREATE ROLE bob LOGIN; CREATE ROLE carol LOGIN;
	@{[ join("\n", map { sprintf($grants, $_, $_, $_) } qw(alice bob carol)) ]}
	SET log_statement = 'none';
	CREATE USER MAPPING FOR alice SERVER posthog OPTIONS (api_key '$API_KEY');
	CREATE USER MAPPING FOR bob SERVER posthog OPTIONS (api_key '$API_KEY');});

# ---------- the settings' key ----------
as_role('alice', "SELECT phsync_create_table('events', 'alice.ev')");
like(as_role('alice', "SELECT phsync_add_sync('a_nokey', 'alice.ev', preset => 'events')"),
	qr/ERROR:  only superusers may add a sync without a server\nDETAIL:  Without a server, the sync would use phsync\.api_key, which only superusers may use\.\nHINT:  Create a user mapping with your own key on a phsync server, and pass server => 'its name'\./,
	'a role that is not a superuser cannot add a sync that would use phsync.api_key');
is(as_role('alice', "SELECT name FROM phsync_add_sync('a1', 'alice.ev', preset => 'events', server => 'posthog')"), 'OK: a1',
	'with a server and her own mapping she can');
like(as_role('alice', "SELECT phsync_alter_sync('a1', server => '')"),
	qr/ERROR:  only superusers may change a sync without a server/, 'nor can she take the server away');
# a superuser's key-using sync handed to alice: refused when it runs
$node->safe_psql('postgres', q{
	CREATE ROLE admin2 SUPERUSER;
	SET ROLE admin2;
	SELECT phsync_create_table('events', 'public.ev2');
	SELECT phsync_add_sync('handed', 'public.ev2', preset => 'events');
	RESET ROLE;
	ALTER TABLE public.ev2 OWNER TO alice;
	REASSIGN OWNED BY admin2 TO alice;
	DROP ROLE admin2;});
is($node->safe_psql('postgres', "SELECT owner FROM phsync.syncs WHERE name = 'handed'"), 'alice', 'REASSIGN OWNED gave alice the sync');
like(as_role('alice', "SELECT status FROM phsync_run_now('handed')"),
	qr/ERROR:  sync handed uses phsync\.api_key, but its owner "alice" is not a superuser/,
	'a sync without a server does not run for an owner who is not a superuser');
is($node->safe_psql('postgres', 'SELECT count(*) FROM public.ev2'), '0', 'and loaded nothing with the key');
as_role('alice', "SELECT phsync_drop_sync('handed')");

# ---------- proxies ----------
like(as_role('carol', "CREATE USER MAPPING FOR carol SERVER posthog OPTIONS (api_key 'phx_c', proxy 'http://169.254.169.254:80')"),
	qr/ERROR:  only superusers may set option "proxy"/, 'a role cannot point the server\'s connection at a proxy of its choice');
like(as_role('alice', "ALTER USER MAPPING FOR alice SERVER posthog OPTIONS (ADD proxy 'http://169.254.169.254:80')"),
	qr/ERROR:  only superusers may set option "proxy"/, 'not in its own mapping either');
is($node->safe_psql('postgres', "SET log_statement = 'none'; ALTER USER MAPPING FOR bob SERVER posthog OPTIONS (ADD proxy 'http://127.0.0.1:9'); SELECT 1"),
	'1', 'a superuser may');
$node->safe_psql('postgres', "ALTER USER MAPPING FOR bob SERVER posthog OPTIONS (DROP proxy)");

# ---------- running others' syncs ----------
as_role('bob', "SELECT phsync_create_table('events', 'bob.ev')");
as_role('bob', "SELECT phsync_add_sync('b1', 'bob.ev', preset => 'events', server => 'posthog')");
as_role('bob', "SELECT phsync_add_sync('b_off', 'bob.ev', preset => 'events', server => 'posthog', enabled => false)");
like(as_role('alice', "SELECT status FROM phsync_run_now('b1')"),
	qr/ERROR:  must be owner of sync b1 to run it\nDETAIL:  Sync b1 belongs to role "bob"\./, 'alice cannot run bob\'s sync');
like(as_role('alice', "SELECT status FROM phsync_run_now('b_off')"),
	qr/ERROR:  must be owner of sync b_off to run it/, 'nor his disabled one');
is($node->safe_psql('postgres', "SELECT count(*) FROM phsync.runs WHERE sync LIKE 'b%'"), '0', 'neither ran');
is(as_role('bob', "SELECT status FROM phsync_run_now('b_off')"), 'OK: succeeded', 'bob runs his disabled sync by name');
# bob's sync fails (his mapping is gone); alice's call neither runs it nor shows its error
$node->safe_psql('postgres', 'DROP USER MAPPING FOR bob SERVER posthog');
my $alice_all = as_role('alice', "SELECT string_agg(sync || ':' || status, ',' ORDER BY sync) FROM phsync_run_now()");
is($alice_all, 'OK: a1:succeeded', 'phsync_run_now() runs and reports only the caller\'s syncs');
is($node->safe_psql('postgres', "SELECT count(*) FROM phsync.runs WHERE sync = 'b1'"), '0', 'bob\'s sync did not run for alice');
my ($r, $o, $e) = $node->psql('postgres', "SELECT sync FROM phsync_run_now()");
like($e, qr/ERROR:  .*user mapping.*\n(.*\n)*CONTEXT:  phsync run \d+ of sync b1/, 'a superuser\'s call runs every enabled sync, and sees bob\'s error');
is($node->safe_psql('postgres', "SELECT count(*) FROM phsync.runs WHERE sync = 'b1'"), '1', 'bob\'s sync ran for the superuser');
$node->safe_psql('postgres', "SET log_statement = 'none'; CREATE USER MAPPING FOR bob SERVER posthog OPTIONS (api_key '$API_KEY')");

# ---------- owners are OIDs ----------
$node->safe_psql('postgres', 'ALTER ROLE carol RENAME TO carol_old');
as_role('carol_old', "SELECT phsync_create_table('events', 'carol.ev')");
$node->safe_psql('postgres', "SET log_statement = 'none'; CREATE USER MAPPING FOR carol_old SERVER posthog OPTIONS (api_key '$API_KEY')");
as_role('carol_old', "SELECT phsync_add_sync('c1', 'carol.ev', preset => 'events', server => 'posthog')");
$node->safe_psql('postgres', 'ALTER ROLE carol_old RENAME TO carol');
is($node->safe_psql('postgres', "SELECT owner FROM phsync.syncs WHERE name = 'c1'"), 'carol', 'a renamed owner keeps the sync');
like(as_role('postgres', 'DROP ROLE carol'),
	qr/ERROR:  role "carol" cannot be dropped because some objects depend on it\nDETAIL:  .*sync c1.*\nHINT:  DROP OWNED BY or REASSIGN OWNED BY/s,
	'DROP ROLE of a sync\'s owner is refused, naming the sync');
$node->safe_psql('postgres', 'REASSIGN OWNED BY carol TO bob');
is($node->safe_psql('postgres', "SELECT owner FROM phsync.syncs WHERE name = 'c1'"), 'bob', 'REASSIGN OWNED BY carol TO bob gives bob her syncs');
$node->safe_psql('postgres', 'DROP OWNED BY carol; DROP ROLE carol; CREATE ROLE carol LOGIN');
is($node->safe_psql('postgres', "SELECT count(*) FROM phsync.syncs WHERE owner::text = 'carol'"), '0', 'a new carol owns nothing');
my ($ret, $out, $err) = $node->psql('postgres', 'DROP OWNED BY bob');
like($err, qr/NOTICE:  3 sync\(s\) of role "bob" dropped/, 'DROP OWNED BY bob drops his syncs, and says so');
is($node->safe_psql('postgres', "SELECT string_agg(name, ',' ORDER BY name) FROM phsync.syncs"), 'a1', 'only alice\'s sync is left');

done_testing();
