# The worker as a least-privilege role, created exactly as docs/security.md
# says (the block is read from it): every kind of run works with those
# grants, and a delegate's trigger gets the delegate's rights, not the
# worker role's.
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
my $node = phsync_node('worker_role', $fake, $certs, 'phsync.page_size' => '20', 'phsync.verify' => 'on');
$node->safe_psql('postgres', q{CREATE EXTENSION phsync; SELECT phsync_create_table('events', 'public.posthog_events');});

# the documentation's block, word for word
my $security = slurp_file("$FindBin::Bin/../../docs/security.md");
my ($grants) = $security =~ /<!-- phsync.role grants: begin -->\n```sql\n(.*?)```\n<!-- phsync.role grants: end -->/s;
ok($grants, 'docs/security.md has the phsync.role grants');
$node->safe_psql('postgres', $grants);
$node->append_conf('postgresql.conf', "phsync.role = 'phsync_runner'\n");
$node->restart;
ok(poll_until(sub { $node->safe_psql('postgres', "SELECT usename FROM pg_stat_activity WHERE backend_type = 'phsync worker'") eq 'phsync_runner' }, 30, 'worker'),
	'the worker runs as phsync_runner');

# yesterday and today, with a row the target refuses
my $yesterday = $node->safe_psql('postgres', "SELECT to_char(date_trunc('day', now() AT TIME ZONE 'UTC') - interval '1 day' + interval '1 hour', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')");
fake_post($fake, '/generate', { count => 30, seed => 31, created_from => $yesterday, step_ms => 600_000 });
fake_post($fake, '/events', [ { raw => 1, uuid => 'not-a-uuid', event => 'bad', properties => '{}', timestamp => iso_ago($node, '20 minutes'),
	distinct_id => 'x', person_id => undef, elements_chain => '', created_at => iso_ago($node, '20 minutes') } ]);

like(run_now($node), qr/^succeeded\|\d+\|31\|30$/, 'a manual run: 30 rows in, one refused');
is($node->safe_psql('postgres', 'SELECT count(*) FROM phsync.rejects'), '1', 'the refused row is kept in phsync.rejects');

$node->safe_psql('postgres', 'DELETE FROM posthog_events WHERE created_at < (SELECT min(created_at) + interval \'2 hours\' FROM posthog_events)');
# a backfill's progress is max(cursor) inside its range: the range ends where the table's rows begin
my $bf = $node->safe_psql('postgres', "SELECT id FROM phsync_backfill('default', now() - interval '3 days', (SELECT min(created_at) FROM posthog_events))");
ok(poll_until(sub { $node->safe_psql('postgres', "SELECT status FROM phsync.runs WHERE id = $bf") eq 'succeeded' }, 60, 'backfill'),
	'a backfill');
is($node->safe_psql('postgres', 'SELECT count(*) FROM posthog_events'), '30', 'brings the deleted rows back');

like($node->safe_psql('postgres', q{SELECT string_agg(status, ',') FROM phsync_verify('default', date_trunc('day', now()) - interval '1 day', date_trunc('day', now()) + interval '1 day')}),
	qr/^(ok|missing),(ok|missing)$/, 'a verification, which writes phsync.verifications with ON CONFLICT DO UPDATE');

my $mark = $node->safe_psql('postgres', 'SELECT max(id) FROM phsync.runs');
my $at = $node->safe_psql('postgres', "SELECT to_char(now() AT TIME ZONE 'UTC' + interval '3 seconds', 'HH24:MI:SS')");
set_conf($node, 'phsync.interval' => '1d', 'phsync.run_at' => $at);
ok(poll_until(sub { $node->safe_psql('postgres', "SELECT string_agg(trigger || ':' || status, ',' ORDER BY id) FROM phsync.runs WHERE id > $mark") eq 'schedule:succeeded,verify:succeeded' }, 60, 'scheduled'),
	'a scheduled run, and its check of yesterday');
set_conf($node, 'phsync.interval' => '3650d', 'phsync.run_at' => '00:00');
unlike(slurp_file($node->logfile), qr/WARNING:  phsync could not/, 'history pruning and the cluster claim work with these grants');

# a delegate's trigger runs with the delegate's rights, not the runner's
$node->safe_psql('postgres', server_sql($fake, $certs, public_mapping => 1));
$node->safe_psql('postgres', q{
	CREATE ROLE mallory LOGIN;
	CREATE SCHEMA AUTHORIZATION mallory;
	GRANT EXECUTE ON FUNCTION phsync_add_sync(text, text, text, text, text, text, interval, boolean, boolean, text, text[], text, text),
	                          phsync_run_now(text) TO mallory;
	SET ROLE mallory;
	SELECT phsync_create_table('events', 'mallory.bait');
	CREATE TABLE mallory.stolen (n bigint, tried text);
	CREATE FUNCTION mallory.grab() RETURNS trigger LANGUAGE plpgsql AS $$
	BEGIN
		BEGIN
			INSERT INTO mallory.stolen SELECT count(*), 'read' FROM public.posthog_events;
		EXCEPTION WHEN insufficient_privilege THEN NULL;
		END;
		BEGIN
			INSERT INTO public.posthog_events (uuid, event, created_at) VALUES (gen_random_uuid(), 'forged', now());
			INSERT INTO mallory.stolen VALUES (1, 'forged');
		EXCEPTION WHEN insufficient_privilege THEN NULL;
		END;
		BEGIN
			DELETE FROM phsync.runs;
			INSERT INTO mallory.stolen VALUES (1, 'deleted runs');
		EXCEPTION WHEN insufficient_privilege THEN NULL;
		END;
		RETURN NEW;
	END $$;
	CREATE TRIGGER grab BEFORE INSERT ON mallory.bait FOR EACH ROW EXECUTE FUNCTION mallory.grab();
	SELECT phsync_add_sync('bait', 'mallory.bait', preset => 'events', server => 'posthog');
	-- what phsync 0.2's README told each target's owner to grant the worker's role
	GRANT USAGE ON SCHEMA mallory TO phsync_runner;
	GRANT SELECT, INSERT ON mallory.bait, mallory.stolen TO phsync_runner;});
my $runs = $node->safe_psql('postgres', 'SELECT count(*) FROM phsync.runs');
like($node->safe_psql('postgres', "SET ROLE mallory; SELECT status FROM phsync_run_now('bait')"), qr/^succeeded$/,
	'the delegate\'s sync runs (its trigger swallows its own errors)');
is($node->safe_psql('postgres', 'SELECT count(*) FROM mallory.bait'), '30', 'and loads its rows');
is($node->safe_psql('postgres', 'SELECT count(*) FROM mallory.stolen'), '0',
	'but the trigger could not read posthog_events, forge a row there, or delete run history');
is($node->safe_psql('postgres', "SELECT count(*) FROM posthog_events WHERE event = 'forged'"), '0', 'no forged row');
is($node->safe_psql('postgres', 'SELECT count(*) FROM phsync.runs'), $runs + 1, 'the run history is whole');

done_testing();
