# A request phsync gives up on is cancelled on PostHog's side
# (DELETE /api/projects/{id}/query/{client_query_id}/), so that it does
# not hold one of the project's query slots until PostHog's own limit: on
# phsync's own timeout, when the worker is terminated, and when the caller
# of phsync_run_now() is cancelled.  A request PostHog answered in full is
# never cancelled.
use strict;
use warnings;

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/../perl";
use PhsyncTest;

my $certs = make_certs();
my $fake = start_fake(certs => $certs);
my $node = phsync_node('cancel_remote', $fake, $certs, 'phsync.request_timeout' => '1s',
	'phsync.initial_since' => hours_ago(2));
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');
fake_post($fake, '/generate', { count => 25, seed => 5, created_from => iso_ago($node, '30 minutes'), step_ms => 1000 });

# the request whose client_query_id PostHog was asked to cancel
sub cancelled_ids { return [ map { $_->{client_query_id} } @{ fake_get($fake, '/cancels') } ]; }
sub slow_request_id
{
	my ($r) = grep { ($_->{status} // '') eq 'cancelled' } @{ fake_requests($fake) };
	return $r ? $r->{client_query_id} : undef;
}

# ---------- a normal run cancels nothing ----------
is(run_now($node), 'succeeded|3|25|25', 'a normal run');
is_deeply(cancelled_ids(), [], 'requests answered in full are not cancelled');

# ---------- phsync's own timeout ----------
fake_post($fake, '/generate', { count => 5, seed => 6, created_from => iso_ago($node, '5 minutes'), step_ms => 1000 });
fake_post($fake, '/reset', {});
fake_post($fake, '/faults', [ { delay_ms => 8000 } ]);
like(run_now($node), qr/^succeeded\|\d+\|\d+\|5$/, 'the run gives the slow request up after 1 s, asks again and succeeds');
my $slow = slow_request_id();
ok($slow, 'PostHog saw the first request end without an answer');
is_deeply(cancelled_ids(), [ $slow ], 'and was asked to cancel exactly that query');
ok(fake_get($fake, '/cancels')->[0]{was_running}, 'while it was still running');
like(slurp_file($node->logfile), qr/No answer from PostHog within 1000 ms/, 'the timeout is logged');

# ---------- the worker is terminated mid-request ----------
set_conf($node, 'phsync.request_timeout' => '5min');
fake_post($fake, '/reset', {});
fake_post($fake, '/faults', [ { delay_ms => 60_000 } ]);
my ($out, $err) = ('', '');
my $h = IPC::Run::start(['psql', '-XAtq', '-d', $node->connstr('postgres'), '-c',
	'SELECT status FROM phsync_run_now()'], '>', \$out, '2>', \$err);
poll_until(sub { grep { !defined $_->{status} } @{ fake_requests($fake) } }, 30, 'a request in flight');
my ($inflight) = map { $_->{client_query_id} } grep { !defined $_->{status} } @{ fake_requests($fake) };
my $pid = $node->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'phsync worker'");
$node->safe_psql('postgres', "SELECT pg_terminate_backend($pid)");
$h->finish;
ok(poll_until(sub { @{ cancelled_ids() } == 1 }, 10, 'cancel on SIGTERM'), 'a terminated worker cancels its request');
is_deeply(cancelled_ids(), [ $inflight ], 'the one it was waiting for');
poll_until(sub { $node->safe_psql('postgres', q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'phsync worker' AND query LIKE 'idle until%'}) }, 30, 'worker back');

# ---------- the caller of phsync_run_now() is cancelled ----------
fake_post($fake, '/reset', {});
fake_post($fake, '/faults', [ { delay_ms => 60_000 } ]);
my ($ret, $o, $e) = $node->psql('postgres', 'SET statement_timeout = 2000; SELECT phsync_run_now()');
like($e, qr/canceling statement due to statement timeout/, 'the caller is cancelled by its statement_timeout');
poll_until(sub { $node->safe_psql('postgres', 'SELECT status FROM phsync.runs ORDER BY id DESC LIMIT 1') eq 'cancelled' }, 30, 'run cancelled');
ok(poll_until(sub { @{ cancelled_ids() } == 1 }, 10, 'cancel of the run'), 'its run is cancelled, and so is its request on PostHog\'s side');
is($node->safe_psql('postgres', 'SELECT count(*) FROM phsync.runs WHERE status = \'running\''), 0, 'nothing is left running');
my ($r) = grep { defined $_->{client_query_id} && $_->{client_query_id} eq cancelled_ids()->[0] } @{ fake_requests($fake) };
is($r->{status}, 'cancelled', 'the request PostHog was asked to cancel is the one that was running');

# ---------- a request that never reached PostHog is not cancelled ----------
fake_post($fake, '/reset', {});
set_conf($node, 'phsync.host' => 'https://127.0.0.1:9', 'phsync.max_retries' => '0');
like(run_now($node), qr/ERROR:  could not reach PostHog at https:\/\/127.0.0.1:9\nDETAIL:  Failed to connect/, 'a refused connection fails the run');
unlike(slurp_file($node->logfile), qr/could not cancel PostHog query/, 'and sends no cancel for a request never sent');

done_testing();
