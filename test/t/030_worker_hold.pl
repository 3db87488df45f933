# The worker is never held by one sync, and a run leaves it as it found it:
# - a lock on a target: the run waits at most phsync.lock_timeout, then
#   fails with PostgreSQL's message; other syncs run meanwhile;
# - phsync_cancel() ends a run whatever PostgreSQL waits on (a lock, a
#   trigger's pg_sleep()) within seconds, as pg_cancel_backend() would;
# - a server that throttles for ever fails the run: consecutive 429s count
#   as retries from the second on;
# - session state a target's code leaves behind (an advisory lock) is gone
#   after the run.
# On 0.3 the run waited for as long as the lock was held, phsync_cancel()
# returned true and did nothing, the 429 run never ended (issue 21, items
# 3, 4, 11).
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
my $node = phsync_node('hold', $fake, $certs, 'phsync.lock_timeout' => '1s');
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');
fake_post($fake, '/generate', { count => 20, seed => 30, created_from => iso_ago($node, '1 hour'), step_ms => 60_000 });
$node->safe_psql('postgres', qq{
	@{[ server_sql($fake, $certs) ]}
	CREATE ROLE alice LOGIN;
	CREATE SCHEMA AUTHORIZATION alice;
	GRANT USAGE ON FOREIGN SERVER posthog TO alice;
	GRANT EXECUTE ON FUNCTION phsync_add_sync(text, text, text, text, text, text, interval, boolean, boolean, text, text[], text, text),
	                          phsync_run_now(text), phsync_cancel(bigint), phsync_create_table(text, text, text[]) TO alice;
	SET log_statement = 'none';
	CREATE USER MAPPING FOR alice SERVER posthog OPTIONS (api_key '$API_KEY');
	SET ROLE alice;
	SELECT phsync_create_table('events', 'alice.ev');
	SELECT phsync_add_sync('a1', 'alice.ev', preset => 'events', server => 'posthog');});

my $worker_wait = sub {
	return $node->safe_psql('postgres', "SELECT coalesce(wait_event_type, '') || ':' || coalesce(wait_event, '') FROM pg_stat_activity WHERE backend_type = 'phsync worker'");
};

# ---------- a lock held by the target's owner ----------
my $holder = $node->background_psql('postgres', on_error_stop => 1);
$holder->query_safe('SET ROLE alice; BEGIN; LOCK TABLE alice.ev IN ACCESS EXCLUSIVE MODE');
my $t0 = time();
my ($ret, $out, $err) = $node->psql('postgres', "SELECT status FROM phsync_run_now('a1')");
my $took = time() - $t0;
like($err, qr/ERROR:  canceling statement due to lock timeout\n(.*\n)*CONTEXT:  phsync run \d+ of sync a1/,
	'a run that waits for a lock longer than phsync.lock_timeout fails with PostgreSQL\'s message');
cmp_ok($took, '<', 15, sprintf('in %.1f s, not for as long as the lock is held', $took));
like($node->safe_psql('postgres', "SELECT status || ': ' || error FROM phsync.runs WHERE sync = 'a1' ORDER BY id DESC LIMIT 1"),
	qr/^failed: canceling statement due to lock timeout/, 'the run log says so');
is($node->safe_psql('postgres', "SELECT status FROM phsync_run_now('default')"), 'succeeded', 'other syncs run while the lock is still held');

# ---------- phsync_cancel() of a run waiting for the lock ----------
set_conf($node, 'phsync.lock_timeout' => '0');
poll_until(sub { $node->safe_psql('postgres', "SELECT setting FROM pg_settings WHERE name = 'phsync.lock_timeout'") eq '0' }, 10, 'reload');
my ($o1, $e1) = ('', '');
my $h = IPC::Run::start(['psql', '-XAtq', '-d', $node->connstr('postgres'), '-c',
	"SELECT status FROM phsync_run_now('a1')"], '>', \$o1, '2>', \$e1);
ok(poll_until(sub { $worker_wait->() eq 'Lock:relation' }, 30, 'the worker waits for the lock'), 'with no lock timeout, the run waits for the lock');
my $id = $node->safe_psql('postgres', "SELECT id FROM phsync.runs WHERE sync = 'a1' AND status = 'running'");
$t0 = time();
is($node->safe_psql('postgres', "SET ROLE alice; SELECT phsync_cancel($id)"), 't', 'its owner cancels it');
ok(poll_until(sub { $node->safe_psql('postgres', "SELECT status FROM phsync.runs WHERE id = $id") eq 'cancelled' }, 10, 'cancelled'),
	'the run waiting for a lock is cancelled');
cmp_ok(time() - $t0, '<', 5, sprintf('within seconds (%.1f s)', time() - $t0));
$h->finish;
like($e1, qr/ERROR:  phsync run $id was cancelled\nDETAIL:  phsync_cancel\(\) was called for it\./, 'the caller is told why');
$holder->query_safe('COMMIT');
$holder->quit;

# ---------- a trigger that sleeps, and one that takes a session lock ----------
$node->safe_psql('postgres', q{
	SET ROLE alice;
	CREATE FUNCTION alice.slow() RETURNS trigger LANGUAGE plpgsql AS $$
	BEGIN
		PERFORM pg_advisory_lock(4242);
		IF NEW.event = 'sleepy' THEN PERFORM pg_sleep(120); END IF;
		RETURN NEW;
	END $$;
	CREATE TRIGGER slow BEFORE INSERT ON alice.ev FOR EACH ROW EXECUTE FUNCTION alice.slow();});
is($node->safe_psql('postgres', "SELECT status FROM phsync_run_now('a1')"), 'succeeded', 'a run through a trigger that takes a session-level advisory lock');
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE a.backend_type = 'phsync worker' AND l.locktype = 'advisory'"),
	'0', 'the worker holds no advisory lock after the run');
is($node->safe_psql('postgres', 'SELECT pg_try_advisory_lock(4242)'), 't', 'another session can take it');
$node->safe_psql('postgres', 'SELECT pg_advisory_unlock_all()');

fake_post($fake, '/events', [ { uuid => '00000000-0000-4000-8000-000000000301', event => 'sleepy',
	created_at => iso_ago($node, '1 minute'), distinct_id => 'd' } ]);
($o1, $e1) = ('', '');
$h = IPC::Run::start(['psql', '-XAtq', '-d', $node->connstr('postgres'), '-c',
	"SELECT status FROM phsync_run_now('a1')"], '>', \$o1, '2>', \$e1);
ok(poll_until(sub { $worker_wait->() eq 'Timeout:PgSleep' }, 30, 'the trigger sleeps'), 'the trigger sleeps in the worker');
$id = $node->safe_psql('postgres', "SELECT id FROM phsync.runs WHERE sync = 'a1' AND status = 'running'");
$t0 = time();
$node->safe_psql('postgres', "SELECT phsync_cancel($id)");
ok(poll_until(sub { $node->safe_psql('postgres', "SELECT status FROM phsync.runs WHERE id = $id") eq 'cancelled' }, 10, 'cancelled'),
	'phsync_cancel() stops a run inside a target\'s trigger');
cmp_ok(time() - $t0, '<', 5, sprintf('within seconds (%.1f s), not after the trigger\'s 2 minutes', time() - $t0));
$h->finish;
$node->safe_psql('postgres', 'DROP TRIGGER slow ON alice.ev');

# ---------- a server that throttles for ever ----------
fake_post($fake, '/faults', [ { status => 429, retry_after => '1', detail => 'Request was throttled. Expected available in 1 seconds.', count => 1000 } ]);
$node->append_conf('postgresql.conf', "phsync.max_retries = 2\n");
$node->reload;
poll_until(sub { $node->safe_psql('postgres', "SELECT setting FROM pg_settings WHERE name = 'phsync.max_retries'") eq '2' }, 10, 'reload');
$t0 = time();
($ret, $out, $err) = $node->psql('postgres', "SELECT status FROM phsync_run_now('a1')");
like($err, qr/ERROR:  PostHog request failed with HTTP status 429/, 'a server that throttles every request fails the run');
cmp_ok(time() - $t0, '<', 30, sprintf('after %.1f s', time() - $t0));
is($node->safe_psql('postgres', "SELECT requests || ' requests, ' || retries || ' retries' FROM phsync.runs WHERE sync = 'a1' ORDER BY id DESC LIMIT 1"),
	'4 requests, 2 retries', 'the first 429 is a wait, the next two are retries, then it gives up');
fake_post($fake, '/reset');
fake_post($fake, '/faults', [ { status => 429, retry_after => '1', detail => 'Request was throttled. Expected available in 1 seconds.' } ]);
is($node->safe_psql('postgres', "SELECT status FROM phsync_run_now('a1')"), 'succeeded', 'one 429 stays a wait');

done_testing();
