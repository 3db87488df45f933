# Quotas that hold under concurrency, and owners served in turn:
# - phsync.max_syncs holds within one statement;
# - phsync.max_queued_runs bounds one owner's queued backfills, within one
#   statement too;
# - one owner's queue never keeps another owner's runs waiting behind it:
#   queued runs are taken owner by owner, and a session's phsync_run_now()
#   waits (told so) for the run in progress only, then goes first.
# On 0.3: 3,005 syncs with max_syncs = 100; 2,000 queued backfills kept
# another role's phsync_run_now() out (issue 21, items 5 and 6).
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
my $node = phsync_node('quotas', $fake, $certs, 'phsync.max_syncs' => '10', 'phsync.max_queued_runs' => '5');
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');
fake_post($fake, '/generate', { count => 20, seed => 31, created_from => iso_ago($node, '3 hours'), step_ms => 60_000 });
my $grants = q{
	CREATE ROLE %1$s LOGIN;
	CREATE SCHEMA AUTHORIZATION %1$s;
	GRANT USAGE ON FOREIGN SERVER posthog TO %1$s;
	GRANT EXECUTE ON FUNCTION phsync_add_sync(text, text, text, text, text, text, interval, boolean, boolean, text, text[], text, text),
	                          phsync_run_now(text), phsync_backfill(text, timestamptz, timestamptz),
	                          phsync_create_table(text, text, text[]) TO %1$s;
	SET log_statement = 'none';
	CREATE USER MAPPING FOR %1$s SERVER posthog OPTIONS (api_key '%2$s');
	SET ROLE %1$s;
	SELECT phsync_create_table('events', '%1$s.ev');
	SELECT phsync_add_sync('%1$s', '%1$s.ev', preset => 'events', server => 'posthog');
	RESET ROLE;};
$node->safe_psql('postgres', qq{
	@{[ server_sql($fake, $certs) ]}
	@{[ sprintf($grants, 'alice', $API_KEY) ]}
	@{[ sprintf($grants, 'bob', $API_KEY) ]}});

sub err_of
{
	my ($sql) = @_;
	my ($ret, $out, $err) = $node->psql('postgres', $sql);
	return $ret == 0 ? "OK: $out" : $err;
}

# ---------- max_syncs in one statement ----------
like(err_of("SET ROLE alice; SELECT count(phsync_add_sync('mx_' || g, 'alice.ev', preset => 'events', server => 'posthog')) FROM generate_series(1, 30) g"),
	qr/ERROR:  phsync already has 10 syncs, the most phsync\.max_syncs allows/,
	'adding 30 syncs in one statement stops at phsync.max_syncs');
is($node->safe_psql('postgres', 'SELECT count(*) FROM phsync.syncs'), '2', 'and the statement added none');
is(err_of("SET ROLE alice; SELECT count(phsync_add_sync('mx_' || g, 'alice.ev', preset => 'events', server => 'posthog')) FROM generate_series(1, 8) g"),
	'OK: 8', 'up to the limit, they are added');
like(err_of("SELECT phsync_add_sync('mx_9', 'alice.ev', preset => 'events', server => 'posthog')"),
	qr/ERROR:  phsync already has 10 syncs/, 'and one more is refused');
$node->safe_psql('postgres', "SELECT phsync_drop_sync(name) FROM phsync.syncs WHERE name LIKE 'mx\\_%'");

# ---------- max_queued_runs ----------
# alice's backfills wait behind a run that hangs on PostHog
fake_post($fake, '/faults', [ { delay_ms => 6000 } ]);
my ($o, $e) = ('', '');
my $h = IPC::Run::start(['psql', '-XAtq', '-d', $node->connstr('postgres'), '-c',
	"SELECT status FROM phsync_run_now('default')"], '>', \$o, '2>', \$e);
poll_until(sub { $node->safe_psql('postgres', "SELECT count(*) FROM phsync.runs WHERE status = 'running'") eq '1' }, 30, 'a run in progress');
my ($from, $to) = (iso_ago($node, '4 hours'), iso_ago($node, '2 hours'));
like(err_of("SET ROLE alice; SELECT count(phsync_backfill('alice', '$from', '$to')) FROM generate_series(1, 2000)"),
	qr/ERROR:  role "alice" already has 5 queued phsync runs, the most phsync\.max_queued_runs allows\nHINT:  Wait for them to run, cancel some with phsync_cancel\(\), or ask a superuser to raise phsync\.max_queued_runs\./,
	'2,000 backfills in one statement are refused past phsync.max_queued_runs');
is($node->safe_psql('postgres', "SELECT count(*) FROM phsync.runs WHERE status = 'queued'"), '0', 'the statement queued none');
is(err_of("SET ROLE alice; SELECT count(phsync_backfill('alice', '$from', '$to')) FROM generate_series(1, 5)"), 'OK: 5',
	'alice queues five');
like(err_of("SET ROLE alice; SELECT phsync_backfill('alice', '$from', '$to')"), qr/ERROR:  role "alice" already has 5 queued/,
	'a sixth is refused');
is(err_of("SET ROLE bob; SELECT count(phsync_backfill('bob', '$from', '$to')) FROM generate_series(1, 2)"), 'OK: 2',
	'the quota is per owner: bob still queues his');

# ---------- turns ----------
# bob asks for a run while the worker is busy: he waits for the run in
# progress only, then goes before every queued backfill
my ($bo, $be) = ('', '');
my $hb = IPC::Run::start(['psql', '-XAtq', '-d', $node->connstr('postgres'), '-c',
	"SET ROLE bob; SELECT status FROM phsync_run_now('bob')"], '>', \$bo, '2>', \$be);
$h->finish;
$hb->finish;
like($be, qr/NOTICE:  the phsync worker is busy; this request is queued\nDETAIL:  Run \d+ is in progress\./, 'bob is told his request waits');
is($bo, "succeeded\n", 'and his run succeeds');
ok(poll_until(sub { $node->safe_psql('postgres', "SELECT count(*) FROM phsync.runs WHERE status IN ('queued', 'running')") eq '0' }, 60, 'queue drained'),
	'the queued backfills all run');
is($node->safe_psql('postgres', q{
	SELECT string_agg(CASE WHEN trigger = 'manual' THEN 'run_now:' ELSE '' END || sync, ',' ORDER BY started_at)
	FROM phsync.runs WHERE sync IN ('alice', 'bob')}),
	'run_now:bob,alice,bob,alice,bob,alice,alice,alice',
	'bob\'s manual run went first, then the owners\' backfills took turns');

done_testing();
