# Two ways into a target (issue 24): a plain table takes batches of new rows
# with table_multi_insert(), without the executor, as COPY FROM does; a
# target with a trigger takes the executor, and its trigger runs as the
# sync's owner.  Both hold the same rows; a duplicate key or a NULL in a
# NOT NULL column sends a batch back to the executor's statements.
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
my $node = phsync_node('paths', $fake, $certs, 'phsync.page_size' => '5000', 'phsync.initial_since' => hours_ago(3));
$node->safe_psql('postgres', qq{
	CREATE EXTENSION phsync;
	@{[ server_sql($fake, $certs) ]}
	CREATE ROLE alice LOGIN;
	GRANT phsync_user TO alice;
	CREATE SCHEMA AUTHORIZATION alice;
	GRANT USAGE ON FOREIGN SERVER posthog TO alice;
	SET log_statement = 'none';
	CREATE USER MAPPING FOR alice SERVER posthog OPTIONS (api_key '$API_KEY');});
# 6,000 events over 100 minutes, and one without an event name (the targets' NOT NULL
# refuses it), 25 minutes ago: a first chunk of 5,000 good rows, then a
# second with the bad one among the last good ones (so that its hour is
# always inside the range verified below)
fake_post($fake, '/generate', { count => 6000, seed => 36, created_from => iso_ago($node, '2 hours'), step_ms => 1000 });
fake_post($fake, '/events', [ { raw => 1, uuid => '00000000-0000-4000-8000-000000000036', event => undef, properties => '{}',
	timestamp => iso_ago($node, '25 minutes'), distinct_id => 'x', person_id => undef, elements_chain => '',
	created_at => iso_ago($node, '25 minutes') } ]);

$node->safe_psql('postgres', q{
	SET ROLE alice;
	SELECT phsync_create_table('events', 'alice.plain_ev');
	SELECT phsync_create_table('events', 'alice.trig_ev');
	ALTER TABLE alice.plain_ev ALTER COLUMN event SET NOT NULL;
	ALTER TABLE alice.trig_ev ALTER COLUMN event SET NOT NULL;
	CREATE TABLE alice.audit (who name, n int);
	CREATE FUNCTION alice.audit() RETURNS trigger LANGUAGE plpgsql AS
	  $$BEGIN INSERT INTO alice.audit VALUES (current_user, 1); RETURN NEW; END$$;
	CREATE TRIGGER audit BEFORE INSERT ON alice.trig_ev FOR EACH ROW EXECUTE FUNCTION alice.audit();
	SELECT name FROM phsync_add_sync('plain', 'alice.plain_ev', preset => 'events', server => 'posthog');
	SELECT name FROM phsync_add_sync('trig', 'alice.trig_ev', preset => 'events', server => 'posthog');});

set_conf($node, 'log_min_messages' => 'debug1');
my $offset = -s $node->logfile;
my $run = sub {
	my ($sync) = @_;
	return $node->safe_psql('postgres', "SET ROLE alice; SELECT status || '|' || rows_received || '|' || rows_inserted || '|' || rows_rejected FROM phsync_run_now('$sync')");
};
is($run->('plain'), 'succeeded|6001|6000|1', 'the plain table: 6,000 rows in, the one without an event name refused');
is($run->('trig'), 'succeeded|6001|6000|1', 'the table with a trigger: the same');
my $log = slurp_file($node->logfile, $offset);
set_conf($node, 'log_min_messages' => 'warning');
like($log, qr/phsync: rows go into alice\.plain_ev with table_multi_insert\(\), without the executor/,
	'the plain table took the batches without the executor');
unlike($log, qr/rows go into alice\.trig_ev with table_multi_insert/, 'the one with a trigger did not');
is($node->safe_psql('postgres', q{SELECT (SELECT count(*) FROM (SELECT * FROM alice.plain_ev EXCEPT ALL SELECT * FROM alice.trig_ev) a)
	+ (SELECT count(*) FROM (SELECT * FROM alice.trig_ev EXCEPT ALL SELECT * FROM alice.plain_ev) b)}), '0',
	'both hold the same rows');
is($node->safe_psql('postgres', 'SELECT count(*) FROM alice.plain_ev'), '6000', 'each of them once');
is($node->safe_psql('postgres', q{SELECT string_agg(DISTINCT who::text, ',') || ' ' || sum(n) FROM alice.audit}), 'alice 6000',
	'the trigger ran once a row, as the sync\'s owner');
like($node->safe_psql('postgres', q{SELECT string_agg(target || ': ' || error, E'\n' ORDER BY target) FROM phsync.rejects}),
	qr/^alice\.plain_ev: null value in column "event"[^\n]*\nalice\.trig_ev: null value in column "event"[^\n]*$/,
	'the refused row is in phsync.rejects, for each target, with the executor\'s error');

# rows already there: the batch's duplicate key sends it to ON CONFLICT
my $gone = $node->safe_psql('postgres', q{
	WITH d AS (DELETE FROM alice.plain_ev WHERE created_at < (SELECT min(created_at) + interval '30 minutes' FROM alice.plain_ev) RETURNING 1)
	SELECT count(*) FROM d});
ok($gone > 1000, "deleted $gone rows at the start of the window");
my ($from, $until) = split /\|/, $node->safe_psql('postgres',
	q{SELECT date_trunc('hour', min(created_at)) || '|' || date_trunc('hour', max(created_at)) + interval '1 hour' FROM alice.trig_ev});
like($node->safe_psql('postgres', "SET ROLE alice; SELECT string_agg(DISTINCT status, ',') FROM phsync_verify('plain', '$from', '$until', bucket => '1 hour', repair => true) WHERE status <> 'ok'"),
	qr/^missing,repaired$/, 'verify repairs the hours with deleted rows (the refused row\'s hour stays missing)');
is($node->safe_psql('postgres', "SELECT rows_inserted FROM phsync.runs WHERE sync = 'plain' ORDER BY id DESC LIMIT 1"), $gone,
	'the repair re-reads whole hours and inserts exactly the rows that were missing');
is($node->safe_psql('postgres', q{SELECT count(*) FROM (SELECT * FROM alice.trig_ev EXCEPT ALL SELECT * FROM alice.plain_ev) b}), '0',
	'and the tables are equal again');

done_testing();
