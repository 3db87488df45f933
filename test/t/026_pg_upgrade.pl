# pg_upgrade with phsync installed, the way people move to a new major: a
# cluster of the oldest supported major (15) with syncs (the default events
# sync, a persons sync on a foreign server with a user mapping), run history
# and rejects is checked and upgraded to the major under test, started with
# phsync preloaded, and the next run continues from the tables' watermarks:
# no row lost or doubled, syncs, mappings and history kept, and the history
# is taken over as this database's own (not as a restore's).
#
# The old major is PHSYNC_UPGRADE_FROM (a pg_config; default Debian's 15,
# which test/run-all.sh installs), with phsync installed in it.  The test
# is skipped when that is the major under test, or is not there.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use File::Basename qw(dirname);
use FindBin;
use lib "$FindBin::Bin/../perl";
use PhsyncTest;

my $old_config = $ENV{PHSYNC_UPGRADE_FROM} // '/usr/lib/postgresql/15/bin/pg_config';
plan skip_all => "no PostgreSQL to upgrade from ($old_config)" unless -x $old_config;
my $old_bindir = `$old_config --bindir`;
chomp $old_bindir;
my $old_libdir = `$old_config --pkglibdir`;
chomp $old_libdir;
my ($old_major) = `$old_config --version` =~ /PostgreSQL (\d+)/;
my ($new_major) = `pg_config --version` =~ /PostgreSQL (\d+)/;
plan skip_all => "the major under test is $new_major, the one to upgrade from too"
  if $old_major == $new_major;
plan skip_all => "phsync is not installed in PostgreSQL $old_major ($old_libdir)"
  unless -f "$old_libdir/phsync.so";

my $certs = make_certs();
my $fake = start_fake(certs => $certs);
# (data checksums on both sides: 18 turns them on by default)
my %conf = ('phsync.initial_since' => hours_ago(30), initdb_extra => ['--data-checksums']);
my $old = phsync_node('old', $fake, $certs, %conf, install_path => dirname($old_bindir));
my $url = $fake->{url};
my $ca = $certs->{ca};
like($old->safe_psql('postgres', 'SELECT version()'), qr/^PostgreSQL $old_major\./, "the old cluster runs PostgreSQL $old_major");

# ---------- the old cluster: syncs, a server, history, rejects ----------
$old->safe_psql('postgres', qq{
	CREATE EXTENSION phsync;
	CREATE SERVER posthog FOREIGN DATA WRAPPER phsync OPTIONS (host '$url', project_id '1', ca_file '$ca');
	CREATE USER MAPPING FOR CURRENT_USER SERVER posthog OPTIONS (api_key '$API_KEY');
	SELECT phsync_create_table('persons', 'people');
	SELECT name FROM phsync_add_sync('people', 'people', preset => 'persons', server => 'posthog');
});
fake_post($fake, '/generate', { count => 30, seed => 26, created_from => iso_ago($old, '20 hours'), step_ms => 600_000 });
my $t = iso_ago($old, '2 hours');
fake_post($fake, '/events', [ { raw => 1, uuid => 'not-a-uuid', event => 'bad uuid', properties => '{}',
	timestamp => $t, created_at => $t } ]);
fake_post($fake, '/persons', [ map { { id => sprintf('00000000-0000-4000-8000-%012d', $_),
	created_at => iso_ago($old, "$_ hours"), properties => { n => $_ } } } 1 .. 5 ]);
is($old->safe_psql('postgres', q{SELECT string_agg(sync || ':' || status || ':' || rows_inserted || ':' || rows_rejected, ' ' ORDER BY id)
	FROM phsync_run_now()}), 'default:succeeded:30:1 people:succeeded:5:0', 'the old cluster syncs both');
# (the refused row was kept in phsync.rejects; PostHog drops it too, so that
# the tables can be compared with PostHog's data)
fake_post($fake, '/delete', { uuids => ['not-a-uuid'] });
is(source_equals_target($old, $fake), 0, 'the old cluster holds exactly PostHog\'s events');
my $history = $old->safe_psql('postgres', 'SELECT count(*) FROM phsync.runs');
my $version = $old->safe_psql('postgres', q{SELECT extversion FROM pg_extension WHERE extname = 'phsync'});
my $registered = $old->safe_psql('postgres', 'SELECT registered_at FROM phsync.cluster');
ok($registered ne '', 'the old cluster owns the run history');
# Debian 12's PostgreSQL 15.20 writes an attribute option pg_attver on every
# column it creates, which the 16, 17 and 18 releases here refuse: the
# restore of the schema fails on any table (pg_upgrade --check does not
# see it).  The README's upgrade steps remove it first, from the columns of
# user relations only; the old cluster does not run again.
my $doc = slurp_file("$FindBin::Bin/../../docs/install.md");
my ($cleanup) = $doc =~ /```sql\n((?:(?!```).)*pg_attver(?:(?!```).)*)```/s;
ok($cleanup, 'docs/install.md has the step that removes pg_attver');
$old->safe_psql('postgres', $cleanup);
is($old->safe_psql('postgres', q{SELECT count(*) FROM pg_attribute WHERE attrelid >= 16384 AND attoptions::text LIKE '%pg_attver=%'}),
	'0', 'no column of a user relation carries pg_attver');
$old->stop;

# ---------- pg_upgrade --check, then pg_upgrade ----------
my $new = phsync_node('new', $fake, $certs, %conf, start => 0);
my $dir = PostgreSQL::Test::Utils::tempdir();
my @upgrade = ('pg_upgrade', '--no-sync', '-d', $old->data_dir, '-D', $new->data_dir,
	'-b', $old_bindir, '-B', $new->config_data('--bindir'),
	'-s', $new->host, '-p', $old->port, '-P', $new->port);
chdir $dir;
command_ok([ @upgrade, '--check' ], "pg_upgrade --check from $old_major to $new_major");
command_ok(\@upgrade, "pg_upgrade from $old_major to $new_major");
$new->start;
like($new->safe_psql('postgres', 'SELECT version()'), qr/^PostgreSQL $new_major\./, "the upgraded cluster runs PostgreSQL $new_major");

# ---------- everything kept ----------
is($new->safe_psql('postgres', q{SELECT extversion FROM pg_extension WHERE extname = 'phsync'}),
	$version, 'the extension came along at its version');
is($new->safe_psql('postgres', q{SELECT name || ' ' || preset || ' ' || server FROM phsync.syncs}),
	'people persons posthog', 'the sync is kept');
is($new->safe_psql('postgres', q{SELECT srvname || ' ' || array_to_string(umoptions, ',') FROM pg_user_mappings}),
	"posthog api_key=$API_KEY", 'the server and its user mapping are kept');
is($new->safe_psql('postgres', 'SELECT count(*) FROM phsync.runs'), $history, 'the run history is kept');
is($new->safe_psql('postgres', q{SELECT count(*) FROM phsync.rejects WHERE raw_row LIKE '%not-a-uuid%'}),
	'1', 'the rejects are kept');
poll_until(sub { $new->log_contains('phsync worker took over database "postgres" after pg_upgrade') }, 60,
	'the worker to take the history over');
is($new->safe_psql('postgres', 'SELECT registered_at FROM phsync.cluster'), $registered,
	'the history is taken over as this database\'s own, not as a restore\'s');
is($new->safe_psql('postgres', 'SELECT system_identifier = (SELECT system_identifier FROM pg_control_system()) FROM phsync.cluster'),
	't', 'under the new cluster\'s identifier');

# ---------- the next run continues from the watermark ----------
fake_post($fake, '/generate', { count => 20, seed => 27, created_from => iso_ago($new, '50 minutes'), step_ms => 60_000 });
fake_post($fake, '/persons', [ map { { id => sprintf('00000000-0000-4000-8000-%012d', $_),
	created_at => iso_ago($new, "30 minutes"), properties => { n => $_ } } } 6 .. 7 ]);
is($new->safe_psql('postgres', q{SELECT string_agg(sync || ':' || status || ':' || rows_inserted, ' ' ORDER BY id)
	FROM phsync_run_now()}), 'default:succeeded:20 people:succeeded:2', 'the next run loads only what is new');
is(source_equals_target($new, $fake), 0, 'the events table equals PostHog\'s: no row lost or doubled');
is($new->safe_psql('postgres', q{SELECT count(*) || ' ' || count(DISTINCT id) FROM people}), '7 7', 'every person once');

done_testing();
