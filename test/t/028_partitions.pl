# A run never executes code that a role other than the target's owner
# controls: every partition it may write (at any depth) belongs to the
# target's owner, or the target is refused, when the sync is added and
# before every run.  (On 0.3, mallory's BEFORE INSERT trigger on her
# partition of a superuser's table ran with the worker's rights.)
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
my $node = phsync_node('partitions', $fake, $certs);
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');
fake_post($fake, '/generate', { count => 30, seed => 28, created_from => iso_ago($node, '1 hour'), step_ms => 60_000 });

like(run_now($node), qr/^succeeded\|/, 'the default sync makes its table');
$node->safe_psql('postgres', 'TRUNCATE posthog_events');

sub err_of
{
	my ($sql) = @_;
	my ($ret, $out, $err) = $node->psql('postgres', $sql);
	return $ret == 0 ? "OK: $out" : $err;
}
sub mallory_is_super { return $node->safe_psql('postgres', "SELECT rolsuper FROM pg_roles WHERE rolname = 'mallory'"); }

# a superuser's partitioned table, one partition of which mallory owns,
# with a trigger that would make her a superuser
my $d = $node->safe_psql('postgres', "SELECT (now() - interval '1 day')::date");
$node->safe_psql('postgres', qq{
	CREATE ROLE mallory LOGIN;
	CREATE TABLE parted (LIKE posthog_events, PRIMARY KEY (uuid, "timestamp")) PARTITION BY RANGE ("timestamp");
	CREATE TABLE parted_old PARTITION OF parted FOR VALUES FROM (MINVALUE) TO ('$d');
	CREATE TABLE parted_new (LIKE parted);
	CREATE FUNCTION escalate() RETURNS trigger LANGUAGE plpgsql AS \$\$
	BEGIN
		EXECUTE 'ALTER ROLE mallory SUPERUSER';
		RETURN NEW;
	END \$\$;
	ALTER FUNCTION escalate() OWNER TO mallory;
	CREATE TRIGGER escalate BEFORE INSERT ON parted_new FOR EACH ROW EXECUTE FUNCTION escalate();
	ALTER TABLE parted_new OWNER TO mallory;
	ALTER TABLE parted ATTACH PARTITION parted_new FOR VALUES FROM ('$d') TO (MAXVALUE);});

like(err_of("SELECT phsync_add_sync('parted', 'parted', preset => 'events')"),
	qr/ERROR:  partition public\.parted_new of table public\.parted belongs to role "mallory", not to the table's owner "\w+"\nDETAIL:  .*\nHINT:  ALTER TABLE public\.parted_new OWNER TO/,
	'a sync into a table with another role\'s partition is refused, naming the partition and its owner');
is($node->safe_psql('postgres', 'SELECT count(*) FROM phsync.syncs'), '0', 'nothing was added');

# the partition given back: the sync is added; then a second level appears
$node->safe_psql('postgres', q{
	ALTER TABLE parted DETACH PARTITION parted_new;
	ALTER TABLE parted_new OWNER TO CURRENT_USER;
	ALTER TABLE parted ATTACH PARTITION parted_new FOR VALUES FROM ('} . $d . q{') TO (MAXVALUE);});
# its trigger still runs mallory's function, which she may change at will
like(err_of("SELECT phsync_add_sync('parted', 'parted', preset => 'events')"),
	qr/ERROR:  trigger "escalate" on table public\.parted_new runs function public\.escalate\(\) of role "mallory", not of the table's owner "\w+"\nDETAIL:  A sync writes into the table with the rights of its owner; role "mallory" could change what the function does\.\nHINT:  ALTER FUNCTION public\.escalate\(\) OWNER TO/,
	'a trigger that runs another role\'s function is refused too');
$node->safe_psql('postgres', q{
	DROP TRIGGER escalate ON parted_new;
	SELECT phsync_add_sync('parted', 'parted', preset => 'events');});
like(err_of("SELECT status FROM phsync_run_now('parted')"), qr/^OK: succeeded/, 'with every partition its owner\'s, the sync runs');
is($node->safe_psql('postgres', 'SELECT count(*) FROM parted_new'), '30', 'and loads its rows');

# mallory's table attached two levels down, after the sync was added
$node->safe_psql('postgres', qq{
	ALTER TABLE parted DETACH PARTITION parted_new;
	CREATE TABLE parted_mid (LIKE parted) PARTITION BY RANGE ("timestamp");
	CREATE TABLE parted_deep (LIKE parted);
	CREATE TRIGGER escalate BEFORE INSERT ON parted_deep FOR EACH ROW EXECUTE FUNCTION escalate();
	ALTER TABLE parted_deep OWNER TO mallory;
	ALTER TABLE parted_mid ATTACH PARTITION parted_deep FOR VALUES FROM ('$d') TO (MAXVALUE);
	ALTER TABLE parted ATTACH PARTITION parted_mid FOR VALUES FROM ('$d') TO (MAXVALUE);
	TRUNCATE parted;});
like(err_of("SELECT status FROM phsync_run_now('parted')"),
	qr/ERROR:  partition public\.parted_deep of table public\.parted belongs to role "mallory", not to the table's owner/,
	'before every run: another role\'s partition at any depth refuses the run');
is(mallory_is_super(), 'f', 'mallory\'s trigger never ran with the worker\'s rights');
is($node->safe_psql('postgres', 'SELECT count(*) FROM parted'), '0', 'and nothing was written');
like($node->safe_psql('postgres', "SELECT status || ': ' || error FROM phsync.runs WHERE sync = 'parted' ORDER BY id DESC LIMIT 1"),
	qr/^failed: partition public\.parted_deep of table public\.parted belongs to role "mallory"/,
	'the run log says why');

# a non-superuser's own table with a partition of a third role: the same
$node->safe_psql('postgres', q{
	CREATE ROLE alice LOGIN;
	CREATE SCHEMA AUTHORIZATION alice;
	CREATE TABLE alice.ev (LIKE posthog_events, PRIMARY KEY (uuid, "timestamp")) PARTITION BY RANGE ("timestamp");
	ALTER TABLE alice.ev OWNER TO alice;
	CREATE TABLE alice.ev_all (LIKE alice.ev);
	ALTER TABLE alice.ev_all OWNER TO mallory;
	ALTER TABLE alice.ev ATTACH PARTITION alice.ev_all DEFAULT;});
like(err_of("SELECT phsync_add_sync('alices', 'alice.ev', preset => 'events')"),
	qr/ERROR:  partition alice\.ev_all of table alice\.ev belongs to role "mallory", not to the table's owner "alice"/,
	'a superuser\'s sync into alice\'s table (run as alice) is refused too when mallory owns a partition');

# the target dropped: a clear error, not a crash
$node->safe_psql('postgres', q{DROP TABLE parted;});
like(err_of("SELECT status FROM phsync_run_now('parted')"),
	qr/ERROR:  .*parted.*(does not exist|was dropped)/, 'a sync whose target is gone fails with an error naming it');
is($node->safe_psql('postgres', 'SELECT count(*) FROM pg_stat_activity WHERE backend_type = \'phsync worker\''), '1',
	'and the worker lives on');

done_testing();
