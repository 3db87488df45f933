# phsync_doctor(): one row per check, in the order a person debugs, each
# failure shown in turn against the fake PostHog; it never hangs and never
# shows the key.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use FindBin;
use lib "$FindBin::Bin/../perl";
use PhsyncTest;

my $certs = make_certs();
my $fake = start_fake(certs => $certs);
my $node = phsync_node('doctor', $fake, $certs);
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');
poll_until(sub { $node->safe_psql('postgres', "SELECT query FROM pg_stat_activity WHERE backend_type = 'phsync worker'") =~ /^idle until/ }, 30, 'worker idle');

my @all_output;
sub doctor
{
	my $out = $node->safe_psql('postgres',
		q{SELECT item || '|' || status || '|' || coalesce(detail, '') || '|' || coalesce(hint, '') FROM phsync_doctor()});
	push @all_output, $out;
	return { map { my @f = split /\|/, $_, 4; ($f[0] => { status => $f[1], detail => $f[2], hint => $f[3] }) } split /\n/, $out };
}

my $order = $node->safe_psql('postgres', q{SELECT string_agg(item, ',') FROM phsync_doctor()});
is($order, 'settings,worker,dns,tcp,tls,auth,target,query', 'checks come in the order a person debugs');
my $d = doctor();
is(join(',', map { $d->{$_}{status} } qw(settings worker dns tcp tls auth target query)),
	'ok,ok,ok,ok,ok,ok,ok,ok', 'all ok against a working PostHog');
like($d->{worker}{detail}, qr/^pid \d+, next scheduled run at /, 'worker: pid and next run');
is($d->{tls}{detail}, 'handshake done, certificate verified', 'tls: verified');
is($d->{auth}{detail}, 'the API key runs queries in project 1; its time zone is UTC', 'auth: the key works');
is($d->{target}{detail}, 'public.posthog_events does not exist yet; the first run creates it', 'target: to be created');
is($d->{query}{detail}, 'PostHog accepts the built-in events query', 'query: accepted');

# auth: a wrong key
set_conf($node, 'phsync.api_key' => 'phx_wrong_doctor_key');
$d = doctor();
is($d->{auth}{status} . ': ' . $d->{auth}{detail}, 'error: auth: HTTP 401: Incorrect authentication credentials.', 'wrong key: auth error');
is($d->{auth}{hint}, 'Check phsync.api_key: PostHog does not accept it.', 'with a hint');
is($d->{query}{status}, 'warning', 'query not checked');
set_conf($node, 'phsync.api_key' => $API_KEY);

# permission: a project the key cannot see
set_conf($node, 'phsync.project_id' => '7');
$d = doctor();
is($d->{auth}{detail}, "permission: HTTP 403: You don't have access to the project.", 'other project: permission error');
set_conf($node, 'phsync.project_id' => '1');

# tls: no CA for the test certificate
set_conf($node, 'phsync.ca_file' => '');
$d = doctor();
is($d->{tls}{status} . ': ' . $d->{tls}{detail}, 'error: network: TLS: SSL certificate problem: unable to get local issuer certificate', 'unknown CA: tls error');
is($d->{tcp}{status}, 'ok', 'while TCP is fine');
is($d->{auth}{status}, 'warning', 'auth not checked');
set_conf($node, 'phsync.ca_file' => $certs->{ca});

# network: nothing listens on the port
my $closed = $fake->{url} =~ s/:\d+$/:9/r;
set_conf($node, 'phsync.host' => $closed);
$d = doctor();
is($d->{dns}{status}, 'ok', 'dns fine');
like($d->{tcp}{status} . ': ' . $d->{tcp}{detail}, qr/^error: network: Failed to connect to 127\.0\.0\.1 port 9/, 'closed port: tcp error');
is($d->{tls}{detail}, 'not checked: no TCP connection', 'tls not checked');
set_conf($node, 'phsync.host' => $fake->{url});

# timeout: PostHog does not answer; the doctor does not wait for it
fake_post($fake, '/faults', [ { delay_ms => 30_000 } ]);
my $t0 = time();
$d = doctor();
my $took = time() - $t0;
like($d->{auth}{status} . ': ' . $d->{auth}{detail}, qr/^error: timeout: No answer from PostHog within 5000 ms\./, 'no answer: timeout error');
cmp_ok($took, '<', 15, sprintf('the doctor returned in %.1f s, not 30', $took));
fake_post($fake, '/reset');

# target: the worker's own rules (one definition of an acceptable target):
# without the preset's columns, without a unique key; without a cursor index
$node->safe_psql('postgres', 'CREATE TABLE loose (created_at timestamptz, uuid uuid)');
set_conf($node, 'phsync.target_table' => 'loose');
$d = doctor();
is($d->{target}{status} . ': ' . $d->{target}{detail}, 'error: target table public.loose has no primary key or unique constraint', 'no unique key: error');
$node->safe_psql('postgres', 'ALTER TABLE loose ADD PRIMARY KEY (uuid)');
$d = doctor();
is($d->{target}{status} . ': ' . $d->{target}{detail},
	'error: table public.loose lacks column(s) event, "timestamp", distinct_id, person_id, properties, elements_chain of the events preset',
	'without the columns of the built-in query: error');
$node->safe_psql('postgres', 'ALTER TABLE loose ADD event text, ADD "timestamp" timestamptz, ADD distinct_id text, '
	  . 'ADD person_id uuid, ADD properties jsonb, ADD elements_chain text');
$d = doctor();
is($d->{target}{status} . ': ' . $d->{target}{detail}, 'warning: public.loose has a unique key, but no index that starts with "created_at"', 'no cursor index: warning');
is($d->{target}{hint}, 'Without one, every run reads the whole table for max(created_at): CREATE INDEX ON public.loose (created_at);', 'with the fix');

# query: HogQL PostHog refuses
open my $fh, '>', $node->data_dir . '/bad.hogql' or die;
print $fh "SELECT uuid, created_at FROM evnts\n";
close $fh;
set_conf($node, 'phsync.query_file' => 'bad.hogql');
$d = doctor();
like($d->{query}{status} . ': ' . $d->{query}{detail}, qr/^error: query: HTTP 400: Unknown table `evnts`\./, 'bad query: PostHog\'s detail');
set_conf($node, 'phsync.query_file' => '', 'phsync.target_table' => 'public.posthog_events');

# settings: no project
set_conf($node, 'phsync.project_id' => '');
$d = doctor();
is($d->{settings}{status} . ': ' . $d->{settings}{detail}, 'error: phsync.project_id is not set', 'missing project: settings error');
is($d->{auth}{detail}, 'not checked: phsync.project_id or phsync.api_key is not set', 'auth not checked');

unlike(join("\n", @all_output), qr/\Q$API_KEY\E|phx_wrong_doctor_key/, 'the key is never shown');

# not preloaded
my $plain = PostgreSQL::Test::Cluster->new('plain');
$plain->init;
$plain->start;
$plain->safe_psql('postgres', 'CREATE EXTENSION phsync');
is($plain->safe_psql('postgres', q{SELECT status || ': ' || detail FROM phsync_doctor() WHERE item = 'worker'}),
	'error: phsync is not loaded through shared_preload_libraries', 'not preloaded: worker error');

done_testing();
