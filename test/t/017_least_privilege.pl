# Least privilege, tried as an attacker with a role in the same database
# would: a sync's code runs as the sync's owner (or, for a superuser's sync
# into another role's table, as that table's owner), never with the
# worker's rights; the status view reads no view; the search path is
# pinned; a poison event is a reject, not a stopped sync; a delegate cannot
# tie up the worker; PostHog's bad bytes never make phsync.runs undumpable.
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
my $node = phsync_node('privilege', $fake, $certs, 'phsync.page_size' => '50');
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');
fake_post($fake, '/generate', { count => 40, seed => 17, created_from => iso_ago($node, '2 hours'), step_ms => 60_000 });
like(run_now($node), qr/^succeeded\|/, 'the default sync loads');
# delegates reach PostHog through a server and a user mapping (the
# settings' key is the superusers'); here one mapping for every role
$node->safe_psql('postgres', server_sql($fake, $certs, public_mapping => 1));

sub psql_as
{
	my ($role, $sql) = @_;
	my ($ret, $out, $err) = $node->psql('postgres', "SET ROLE $role;\n$sql");
	return $ret == 0 ? "OK: $out" : $err;
}
sub super { return $node->safe_psql('postgres', "SELECT rolsuper FROM pg_roles WHERE rolname = '$_[0]'"); }
sub last_of { return $node->safe_psql('postgres', "SELECT status || ': ' || coalesce(error, '') FROM phsync.runs WHERE sync = '$_[0]' ORDER BY id DESC LIMIT 1"); }

my $delegate_grants = q{
	GRANT EXECUTE ON FUNCTION phsync_add_sync(text, text, text, text, text, text, interval, boolean, boolean, text, text[], text, text),
	                          phsync_alter_sync(text, text, text, text, text, text, interval, boolean, boolean, boolean, text, text[], text, text),
	                          phsync_drop_sync(text), phsync_run_now(text),
	                          phsync_backfill(text, timestamptz, timestamptz),
	                          phsync_verify(text, timestamptz, timestamptz, interval, boolean),
	                          phsync_cancel(bigint)
	      TO %s;};

# ---------- a delegate's own target with a trigger that escalates ----------
$node->safe_psql('postgres', qq{
	CREATE ROLE mallory LOGIN;
	CREATE SCHEMA AUTHORIZATION mallory;
	@{[ sprintf($delegate_grants, 'mallory') ]}});
is(psql_as('mallory', q{
	SELECT phsync_create_table('events', 'mallory.loot');
	CREATE FUNCTION mallory.escalate() RETURNS trigger LANGUAGE plpgsql AS $$
	BEGIN
		EXECUTE 'ALTER ROLE mallory SUPERUSER';
		RETURN NEW;
	END $$;
	CREATE TRIGGER escalate BEFORE INSERT ON mallory.loot FOR EACH ROW EXECUTE FUNCTION mallory.escalate();
	SELECT owner FROM phsync_add_sync('loot', 'mallory.loot', preset => 'events', server => 'posthog');}), "OK: loot\nmallory",
	'a delegate adds a sync into its own table, which has a trigger; the sync is the delegate\'s');
psql_as('mallory', "SELECT * FROM phsync_run_now('loot')");
is(super('mallory'), 'f', 'the trigger ran as the delegate: the delegate did not become superuser');
like(last_of('loot'), qr/^failed: (permission denied to alter role|must be superuser to alter superuser roles)/,
	'the run failed on the trigger, with the permission error');
is($node->safe_psql('postgres', 'SELECT count(*) FROM mallory.loot'), '0', 'and inserted nothing');

# the same through COPY ... TO PROGRAM and a column DEFAULT
my $pwned = $node->basedir . '/pwned';
is(psql_as('mallory', qq{
	DROP TRIGGER escalate ON mallory.loot;
	CREATE FUNCTION mallory.shell() RETURNS trigger LANGUAGE plpgsql AS \$\$
	BEGIN
		EXECUTE 'COPY (SELECT 1) TO PROGRAM ''touch $pwned''';
		RETURN NEW;
	END \$\$;
	CREATE TRIGGER shell BEFORE INSERT ON mallory.loot FOR EACH ROW EXECUTE FUNCTION mallory.shell();
	SELECT 1}), "OK: 1", 'a trigger that runs a shell command');
psql_as('mallory', "SELECT * FROM phsync_run_now('loot')");
ok(!-e $pwned, 'COPY TO PROGRAM did not run');
like(last_of('loot'), qr/^failed: .*(pg_execute_server_program|must be superuser)/, 'the run failed on it');
is(psql_as('mallory', q{
	DROP TRIGGER shell ON mallory.loot;
	CREATE FUNCTION mallory.dflt() RETURNS int LANGUAGE plpgsql AS $$
	BEGIN
		EXECUTE 'ALTER ROLE mallory SUPERUSER';
		RETURN 1;
	END $$;
	ALTER TABLE mallory.loot ADD COLUMN x int DEFAULT mallory.dflt();
	SELECT 1}), "OK: 1", 'a column default that escalates');
psql_as('mallory', "SELECT * FROM phsync_run_now('loot')");
is(super('mallory'), 'f', 'the default ran as the delegate');

# ... and the daily scheduled run does not do it either
my $at = $node->safe_psql('postgres', "SELECT to_char(now() AT TIME ZONE 'UTC' + interval '3 seconds', 'HH24:MI:SS')");
my $mark = $node->safe_psql('postgres', 'SELECT max(id) FROM phsync.runs');
set_conf($node, 'phsync.interval' => '1d', 'phsync.run_at' => $at);
ok(poll_until(sub { $node->safe_psql('postgres', "SELECT count(*) FROM phsync.runs WHERE id > $mark AND trigger = 'schedule' AND sync = 'loot' AND status <> 'running'") eq '1' }, 60, 'scheduled run'),
	'a scheduled run of the delegate\'s sync');
is(super('mallory'), 'f', 'the scheduled run did not make the delegate superuser');
set_conf($node, 'phsync.interval' => '3650d', 'phsync.run_at' => '00:00');
$node->safe_psql('postgres', 'ALTER TABLE mallory.loot DROP COLUMN x');

# ---------- an admin's sync into a table another role owns ----------
$node->safe_psql('postgres', q{
	CREATE ROLE bob LOGIN;
	CREATE SCHEMA AUTHORIZATION bob;
	SET ROLE bob;
	SELECT phsync_create_table('events', 'bob.events');
	RESET ROLE;
	SELECT phsync_add_sync('bobs', 'bob.events', preset => 'events');});
is($node->safe_psql('postgres', "SELECT owner FROM phsync.syncs WHERE name = 'bobs'"), $node->safe_psql('postgres', 'SELECT current_user'),
	'the superuser who added it owns the sync');
like(run_now($node), qr/succeeded/, 'it runs');
is(psql_as('bob', q{
	CREATE FUNCTION bob.escalate() RETURNS trigger LANGUAGE plpgsql AS $$
	BEGIN
		EXECUTE 'ALTER ROLE bob SUPERUSER';
		RETURN NEW;
	END $$;
	CREATE TRIGGER escalate BEFORE INSERT ON bob.events FOR EACH ROW EXECUTE FUNCTION bob.escalate();
	SELECT 1}), "OK: 1", 'the table\'s owner adds a trigger that escalates');
fake_post($fake, '/generate', { count => 3, seed => 18, created_from => iso_ago($node, '20 minutes'), step_ms => 60_000 });
$node->psql('postgres', "SELECT * FROM phsync_run_now('bobs')");
is(super('bob'), 'f', 'the superuser\'s sync ran as the table\'s owner: bob did not become superuser');
like(last_of('bobs'), qr/^failed: (permission denied to alter role|must be superuser)/, 'the run failed on bob\'s trigger');
$node->safe_psql('postgres', 'DROP TRIGGER escalate ON bob.events');

# ---------- the status view never reads a view ----------
$node->safe_psql('postgres', q{
	CREATE ROLE monitor LOGIN;
	GRANT USAGE ON SCHEMA phsync TO monitor;
	GRANT SELECT ON phsync.status TO monitor;
	GRANT EXECUTE ON FUNCTION phsync_sync_state() TO monitor;
	GRANT pg_read_all_stats TO monitor;});
is(psql_as('mallory', q{
	DROP TABLE mallory.loot;
	CREATE FUNCTION mallory.rows() RETURNS TABLE (uuid uuid, created_at timestamptz) LANGUAGE plpgsql AS $$
	BEGIN
		EXECUTE 'ALTER ROLE mallory SUPERUSER';
		RETURN QUERY SELECT gen_random_uuid(), now();
	END $$;
	CREATE VIEW mallory.loot AS SELECT * FROM mallory.rows();
	SELECT 1}), "OK: 1", 'the delegate replaces its target with a view over a function that escalates');
is(psql_as('monitor', "SELECT target_problem FROM phsync.status WHERE sync = 'loot'"), 'OK: target mallory.loot is not a table',
	'a monitor reading phsync.status sees the problem');
is(super('mallory'), 'f', 'and the view was not read: the delegate did not become superuser');
$node->safe_psql('postgres', q{DROP VIEW mallory.loot; SET ROLE mallory; SELECT phsync_create_table('events', 'mallory.loot');});

# ---------- temporary tables ----------
$node->safe_psql('postgres', q{
	CREATE TABLE public.accounts (uuid uuid PRIMARY KEY, created_at timestamptz NOT NULL, event text, owner text);
	INSERT INTO public.accounts VALUES ('00000000-0000-4000-8000-000000000001', now(), 'salary', 'alice');
	GRANT SELECT, INSERT, UPDATE ON public.accounts TO mallory;});
like(psql_as('mallory', q{
	CREATE TEMP TABLE accounts (uuid uuid PRIMARY KEY, created_at timestamptz NOT NULL, event text, owner text);
	SELECT phsync_add_sync('acct', 'pg_temp.accounts', query => 'SELECT uuid, created_at, event FROM events', conflict => 'update', server => 'posthog')}),
	qr/ERROR:  target pg_temp_\d+\.accounts is a temporary table\nDETAIL:  The worker runs in a session of its own/,
	'a temporary table is refused as a target');
is($node->safe_psql('postgres', "SELECT string_agg(event || '/' || owner, ',') FROM public.accounts"), 'salary/alice',
	'and public.accounts, which has the same name, is untouched');
is(psql_as('mallory', q{SELECT target FROM phsync_add_sync('acct', 'accounts', query => 'SELECT uuid, created_at, event FROM events', server => 'posthog')}),
	'OK: public.accounts', 'targets are stored schema-qualified');
$node->safe_psql('postgres', "SELECT phsync_drop_sync('acct')");

# ---------- privileges checked at every run; row-level security applies ----------
$node->safe_psql('postgres', q{
	CREATE TABLE public.shared (uuid uuid PRIMARY KEY, event text, "timestamp" timestamptz, distinct_id text,
		person_id uuid, properties jsonb, elements_chain text, created_at timestamptz NOT NULL);
	CREATE INDEX ON public.shared (created_at);
	GRANT SELECT, INSERT ON public.shared TO mallory;});
is(psql_as('mallory', "SELECT name FROM phsync_add_sync('shared', 'public.shared', preset => 'events', server => 'posthog')"), 'OK: shared',
	'a delegate with INSERT adds a sync into a table it does not own');
$node->safe_psql('postgres', 'REVOKE INSERT ON public.shared FROM mallory');
$node->psql('postgres', "SELECT * FROM phsync_run_now('shared')");
like(last_of('shared'), qr/^failed: permission denied for table public.shared: The sync writes into it as mallory/,
	'INSERT revoked after the sync was added: the next run fails');
is($node->safe_psql('postgres', 'SELECT count(*) FROM public.shared'), '0', 'and writes nothing');
$node->safe_psql('postgres', q{
	GRANT INSERT ON public.shared TO mallory;
	ALTER TABLE public.shared ENABLE ROW LEVEL SECURITY;
	CREATE POLICY readable ON public.shared FOR SELECT USING (true);
	CREATE POLICY no_blocked ON public.shared FOR INSERT WITH CHECK (distinct_id <> 'blocked');});
fake_post($fake, '/events', [ { uuid => '00000000-0000-4000-8000-0000000000bb', event => 'x', distinct_id => 'blocked',
	created_at => iso_ago($node, '10 minutes') } ]);
$node->psql('postgres', "SELECT * FROM phsync_run_now('shared')");
like(last_of('shared'), qr/^failed: new row violates row-level security policy for table "shared"/,
	'row-level security applies to the sync as to its owner');
is($node->safe_psql('postgres', "SELECT count(*) FROM public.shared WHERE distinct_id = 'blocked'"), '0',
	'the row the policy forbids is not there');
$node->safe_psql('postgres', "DROP POLICY no_blocked ON public.shared; CREATE POLICY all_rows ON public.shared FOR INSERT WITH CHECK (true);");
$node->psql('postgres', "SELECT * FROM phsync_run_now('shared')");
like(last_of('shared'), qr/^succeeded/, 'with a policy that allows the rows, the run succeeds');

# ---------- the search path is pinned ----------
$node->safe_psql('postgres', q{
	GRANT CREATE ON SCHEMA public TO mallory;
	SET ROLE mallory;
	CREATE FUNCTION public.sneaky_div(numeric, double precision) RETURNS numeric LANGUAGE plpgsql AS $$
	BEGIN
		EXECUTE 'ALTER ROLE mallory SUPERUSER';
		RETURN $1 / $2::numeric;
	END $$;
	CREATE OPERATOR public./ (LEFTARG = numeric, RIGHTARG = double precision, FUNCTION = public.sneaky_div);});
my $day = $node->safe_psql('postgres', "SELECT date_trunc('day', now())");
like($node->safe_psql('postgres', qq{SELECT string_agg(status, ',') FROM phsync_verify('default', '$day'::timestamptz - interval '1 day', '$day'::timestamptz + interval '1 day')}),
	qr/^(ok|missing|extra)/, 'a verification with an operator / (numeric, double precision) in public');
is(super('mallory'), 'f', 'the verification did not use it');
$node->safe_psql('postgres', 'DROP OPERATOR public./ (numeric, double precision); REVOKE CREATE ON SCHEMA public FROM mallory');

# ---------- a poison event ----------
my $deep = ('{"a":' x 100_000) . '1' . ('}' x 100_000);
my $t = iso_ago($node, '5 minutes');
fake_post($fake, '/events', [
	{ raw => 1, uuid => '00000000-0000-4000-8000-00000000dead', event => 'poison', properties => $deep,
	  timestamp => $t, distinct_id => 'anyone', person_id => undef, elements_chain => '', created_at => $t },
	{ uuid => '00000000-0000-4000-8000-00000000beef', event => 'fine', distinct_id => 'someone', created_at => $t } ]);
like(run_now($node), qr/succeeded/, 'an event whose properties nest 100,000 deep does not stop the sync');
is($node->safe_psql('postgres', "SELECT count(*) FROM posthog_events WHERE uuid = '00000000-0000-4000-8000-00000000beef'"), '1',
	'the other rows load');
like($node->safe_psql('postgres', "SELECT error FROM phsync.rejects WHERE raw_row LIKE '%00000000dead%'"),
	qr/stack depth limit exceeded/, 'the poison row is kept in phsync.rejects, with why');

# ---------- a delegate cannot tie up or bloat the worker ----------
like(psql_as('mallory', "SELECT * FROM phsync_verify('shared', now() - interval '99990 seconds', now(), '1 second')"),
	qr/ERROR:  a verification may have at most 1000 buckets, not 9999\d\nHINT:  Use a wider bucket or a shorter range, or raise phsync.max_verify_buckets\./,
	'a verification of 99,990 one-second buckets is refused');
like(psql_as('mallory', "SELECT * FROM phsync_verify('shared', '4713-01-01 BC', '294276-12-31', '1000000 days')"),
	qr/ERROR:  the range from "from" to "to" is too long/, 'a range past the ends of int64 is refused, not overflowed');
like(psql_as('mallory', "SELECT * FROM phsync_verify('shared', now() - interval '1 day', now(), '2147483647 days')"),
	qr/ERROR:  bucket is out of range/, 'a bucket past int64 is refused');
like(psql_as('mallory', "SELECT * FROM phsync_backfill('shared', '2000-01-01', '2026-01-01')"),
	qr/ERROR:  a backfill may cover at most 1830 days/, 'a backfill over 26 years is refused');
like(psql_as('mallory', "SELECT * FROM phsync_backfill('default', now() - interval '1 day', now())"),
	qr/ERROR:  must be owner of sync default to backfill it/, 'a delegate cannot backfill another\'s sync');
$node->safe_psql('postgres', "REVOKE SELECT ON public.shared FROM mallory");
like(psql_as('mallory', "SELECT * FROM phsync_verify('shared', now() - interval '1 day', now())"),
	qr/ERROR:  permission denied for table public.shared\nDETAIL:  A verification shows how many rows the target holds per bucket/,
	'a caller without SELECT on the target cannot verify it');
$node->safe_psql('postgres', "GRANT SELECT ON public.shared TO mallory");
set_conf($node, 'phsync.max_syncs' => '3');
like(psql_as('mallory', "SELECT phsync_add_sync('one_too_many', 'mallory.loot', preset => 'events', server => 'posthog')"),
	qr/ERROR:  phsync already has 3 syncs, the most phsync.max_syncs allows/, 'phsync.max_syncs bounds the number of syncs');
set_conf($node, 'phsync.max_syncs' => '100');

# phsync_cancel(): the owner and superusers; within a second
fake_post($fake, '/reset');
fake_post($fake, '/faults', [ { delay_ms => 120_000 } ]);
my $bg = $node->background_psql('postgres', on_error_stop => 0);
$bg->query_until(qr/go/, "\\echo go\nSELECT * FROM phsync_run_now('shared');\n");
ok(poll_until(sub { $node->safe_psql('postgres', "SELECT count(*) FROM phsync.runs WHERE sync = 'shared' AND status = 'running'") eq '1' }, 30, 'slow run'),
	'a run that hangs on PostHog');
my $id = $node->safe_psql('postgres', "SELECT id FROM phsync.runs WHERE sync = 'shared' AND status = 'running'");
like(psql_as('bob', "SELECT phsync_cancel($id)"), qr/ERROR:  permission denied for function phsync_cancel/,
	'a role without the grant cannot cancel');
$node->safe_psql('postgres', sprintf($delegate_grants, 'bob'));
like(psql_as('bob', "SELECT phsync_cancel($id)"), qr/ERROR:  must be owner of sync shared to cancel its runs/,
	'nor a role that does not own the sync');
my $t0 = time();
is(psql_as('mallory', "SELECT phsync_cancel($id)"), 'OK: t', 'its owner cancels it');
ok(poll_until(sub { $node->safe_psql('postgres', "SELECT status FROM phsync.runs WHERE id = $id") eq 'cancelled' }, 10, 'cancelled'),
	'the run is cancelled');
cmp_ok(time() - $t0, '<', 2, sprintf('within a second or so (%.1f s), not after the 2-minute request', time() - $t0));
like($node->safe_psql('postgres', "SELECT error FROM phsync.runs WHERE id = $id"), qr/^phsync run $id was cancelled: phsync_cancel\(\) was called for it\./,
	'and says why');
$bg->quit;
is(psql_as('mallory', "SELECT phsync_cancel($id)"), 'OK: f', 'cancelling it again: false');

# ---------- PostHog's invalid UTF-8 ----------
fake_post($fake, '/reset');
fake_post_raw($fake, '/faults', '[{"status": 400, "detail": "bad byte \udcff here"}]');
like(run_now($node), qr/ERROR:  PostHog request failed with HTTP status 400\nDETAIL:  bad byte \?\?\? here/,
	'a detail with bytes that are not UTF-8 (a lone surrogate) is shown with ? instead');
is($node->safe_psql('postgres', "SELECT error FROM phsync.runs WHERE sync = 'default' ORDER BY id DESC LIMIT 1"),
	'PostHog request failed with HTTP status 400: bad byte ??? here', 'and stored so');
copy_round_trip($node, 'phsync.runs', 'runs_copy', 'the run history copied out', 'and loaded back, as a restore would');
is($node->safe_psql('postgres', 'SELECT (SELECT count(*) FROM runs_copy) = (SELECT count(*) FROM phsync.runs)'), 't', 'every row of it');

done_testing();
