# A standby runs no phsync worker and refuses phsync_run_now(); once
# promoted, the worker starts and syncs.
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
my $primary = phsync_node('primary', $fake, $certs, 'phsync.initial_since' => '2026-01-01',
	allows_streaming => 1);
$primary->safe_psql('postgres', 'CREATE EXTENSION phsync');
fake_post($fake, '/generate', { count => 12, seed => 5, created_from => iso_ago($primary, '1 hour'), step_ms => 1000 });
like(run_now($primary), qr/^succeeded\|\d+\|12\|12$/, 'the primary syncs');

$primary->backup('b');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'b', has_streaming => 1);
$standby->start;
$primary->wait_for_catchup($standby);

is($standby->safe_psql('postgres', 'SELECT count(*) FROM posthog_events'), '12', 'the standby has the rows by replication');
is($standby->safe_psql('postgres', "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'phsync worker'"), '0',
	'no phsync worker on the standby');
my ($ret, $out, $err) = $standby->psql('postgres', 'SELECT phsync_run_now()');
like($err, qr/ERROR:  phsync cannot run during recovery\nHINT:  Call phsync_run_now\(\) on the primary server\./, 'phsync_run_now() on a standby: clear error');

$primary->stop;
$standby->promote;
ok(poll_until(sub { $standby->safe_psql('postgres', "SELECT query FROM pg_stat_activity WHERE backend_type = 'phsync worker'") =~ /^idle until/ }, 60, 'worker after promotion'),
	'after promotion the worker starts');
fake_post($fake, '/generate', { count => 3, seed => 6, created_from => iso_ago($standby, '2 minutes'), step_ms => 1000 });
like(run_now($standby), qr/^succeeded\|\d+\|\d+\|3$/, 'and syncs from where the primary left off');
is(source_equals_target($standby, $fake), 0, 'target equals source');

done_testing();
