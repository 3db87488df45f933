# PostHog's refusals (400, 401, 403) and TLS failures: failed runs that carry
# PostHog's detail and a hint, nothing inserted, and the API key nowhere in
# the server log or the run log.
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
my $node = phsync_node('errors', $fake, $certs, log_min_messages => 'debug1');
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');
my $t0 = $node->safe_psql('postgres',
	"SELECT to_char(now() - interval '1 hour', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')");
fake_post($fake, '/generate', { count => 5, seed => 5, created_from => $t0, step_ms => 1000 });

sub set_and_reload
{
	my ($name, $value) = @_;
	$node->append_conf('postgresql.conf', "$name = '$value'\n");
	$node->reload;
	# the worker reloads on SIGHUP; wait until a new session sees the value
	poll_until(sub { $node->safe_psql('postgres', "SHOW $name") eq ($name eq 'phsync.api_key' ? '********' : $value) }, 30, "reload of $name");
}

# 401: a wrong key
set_and_reload('phsync.api_key', 'phx_wrong_key_abcdef');
like(run_now($node), qr/ERROR:  PostHog request failed with HTTP status 401\nDETAIL:  Incorrect authentication credentials\.\nHINT:  Check phsync.api_key: PostHog does not accept it\.\nCONTEXT:  phsync run \d+ of sync default/,
	'401: error with PostHog detail and a hint');
my $run = last_run($node);
is($run->{status}, 'failed', '401 run failed');
is($run->{error}, 'PostHog request failed with HTTP status 401: Incorrect authentication credentials.', '401 detail in phsync.runs');
is(target_count($node), 0, 'nothing inserted');

# 403: a project the key cannot see
set_and_reload('phsync.api_key', $API_KEY);
set_and_reload('phsync.project_id', '2');
like(run_now($node), qr/ERROR:  PostHog request failed with HTTP status 403\nDETAIL:  You don't have access to the project\.\nHINT:  Check that phsync.api_key has the "Query Read" scope and access to project \d+\.\nCONTEXT:  phsync run \d+ of sync default/,
	'403: error with PostHog detail and a hint');
set_and_reload('phsync.project_id', '1');

# 400: HogQL PostHog refuses (here: an OFFSET in a custom query)
open my $fh, '>', $node->data_dir . '/bad.hogql' or die;
print $fh "SELECT uuid, created_at FROM events ORDER BY created_at LIMIT 5 OFFSET 5\n";
close $fh;
set_and_reload('phsync.query_file', 'bad.hogql');
like(run_now($node), qr/ERROR:  PostHog request failed with HTTP status 400\nDETAIL:  OFFSET is not allowed.*\nHINT:  Check the HogQL query \(phsync.query_file\)\.\nCONTEXT:  phsync run \d+ of sync default/,
	'400: error with PostHog detail and a hint');
is(last_run($node)->{status}, 'failed', '400 run failed');
set_and_reload('phsync.query_file', '');

# injected 400 with PostHog's body shape, as for an unknown field
fake_post($fake, '/faults', [ { status => 400, detail => 'Unknown table `evnts`.' } ]);
like(run_now($node), qr/HTTP status 400\nDETAIL:  Unknown table `evnts`\./, 'injected 400 detail reaches the user');

# unsettable key: superuser sees only the mask
is($node->safe_psql('postgres', 'SHOW phsync.api_key'), '********', 'SHOW gives a mask even to superusers');

# TLS: without our CA the certificate cannot be verified
set_and_reload('phsync.ca_file', '');
like(run_now($node), qr/ERROR:  could not reach PostHog at https:\/\/127\.0\.0\.1:\d+\nDETAIL:  SSL certificate problem: unable to get local issuer certificate\nHINT:  The TLS certificate could not be verified; phsync.ca_file can add a CA\.\nCONTEXT:  phsync run \d+ of sync default/,
	'unknown CA: verification error');
is(target_count($node), 0, 'nothing inserted');

# TLS: right CA, wrong host name (the certificate names 127.0.0.1 only)
set_and_reload('phsync.ca_file', $certs->{ca});
my $other = $fake->{url} =~ s/127\.0\.0\.1/localhost/r;
set_and_reload('phsync.host', $other);
like(run_now($node), qr/ERROR:  could not reach PostHog at https:\/\/localhost:\d+\nDETAIL:  SSL: no alternative certificate subject name matches target host name 'localhost'/,
	'wrong host name: verification error');
is(target_count($node), 0, 'nothing inserted');

# TLS: right CA, right name, but expired
my $stale = start_fake(certs => $certs, expired => 1);
set_and_reload('phsync.host', $stale->{url});
like(run_now($node), qr/ERROR:  could not reach PostHog at https:\/\/127\.0\.0\.1:\d+\nDETAIL:  SSL certificate problem: certificate has expired/,
	'expired certificate: verification error');
is(target_count($node), 0, 'nothing inserted');
set_and_reload('phsync.host', $fake->{url});

# and now it works
like(run_now($node), qr/^succeeded\|\d+\|5\|5$/, 'with the right settings the run succeeds');

# the key is in no log line and no run row
$node->safe_psql('postgres', 'SELECT 1');
my $log = slurp_file($node->logfile);
unlike($log, qr/\Q$API_KEY\E/, 'API key not in the server log');
unlike($log, qr/phx_wrong_key_abcdef/, 'the wrong key neither');
like($log, qr/phsync run \d+ \(sync default\) into public.posthog_events: \S+ to \S+, \d+ pages, 5 rows received, 5 inserted/, 'runs are logged');
is($node->safe_psql('postgres', "SELECT count(*) FROM phsync.runs WHERE error LIKE '%phx_%' OR target LIKE '%phx_%'"), 0, 'API key not in phsync.runs');
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%phx_secret%' AND pid <> pg_backend_pid()"), 0, 'nor in pg_stat_activity');

done_testing();
