# Security: the API key stays out of every log even at debug5; the worker
# can run as a role with only the rights it needs; hostile identifiers do
# what they say and nothing else.
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
my $node = phsync_node('security', $fake, $certs, log_min_messages => 'debug5',
	'phsync.initial_since' => '2026-01-01');
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');
fake_post($fake, '/generate', { count => 12, seed => 8, created_from => iso_ago($node, '1 hour'), step_ms => 1000 });

# The key at debug5: change it twice with reloads, fail once with it, succeed once.
set_conf($node, 'phsync.api_key' => 'phx_other_key_that_fails_9876');
like(run_now($node), qr/HTTP status 401/, 'a wrong key fails');
set_conf($node, 'phsync.api_key' => $API_KEY);
like(run_now($node), qr/^succeeded\|\d+\|12\|12$/, 'the right key works');
my $log = slurp_file($node->logfile);
my $debug_lines = () = $log =~ /DEBUG:  /g;
ok($debug_lines > 100, "the log really is at debug level ($debug_lines DEBUG lines)");
ok($log !~ /\Q$API_KEY\E/, 'the API key is nowhere in a debug5 server log');
ok($log !~ /phx_other_key_that_fails_9876/, 'nor the other key');
ok($log !~ /Authorization|Bearer/i, 'no request header is logged');
like($log, qr/parameter "phsync.page_size"|phsync/, 'the log does have phsync lines');

# A role with just the rights it needs.
$node->safe_psql('postgres', q{
	CREATE ROLE phsync_runner LOGIN;
	GRANT USAGE ON SCHEMA phsync TO phsync_runner;
	GRANT SELECT, INSERT, UPDATE ON phsync.runs, phsync.rejects TO phsync_runner;
	GRANT USAGE ON SEQUENCE phsync.runs_id_seq, phsync.rejects_id_seq TO phsync_runner;
	GRANT SELECT ON phsync.syncs TO phsync_runner;
	GRANT INSERT, UPDATE ON phsync.verifications TO phsync_runner;
	GRANT SELECT, INSERT, DELETE ON phsync.cluster TO phsync_runner;
	GRANT SELECT ON public.posthog_events TO phsync_runner;});
$node->append_conf('postgresql.conf', "phsync.role = 'phsync_runner'\n");
$node->restart;
fake_post($fake, '/generate', { count => 5, seed => 9, created_from => iso_ago($node, '2 minutes'), step_ms => 1000 });
like(run_now($node), qr/ERROR:  permission denied for table public.posthog_events\nDETAIL:  The sync writes into it as phsync_runner, who needs SELECT and INSERT on it\.\nCONTEXT:  phsync run \d+ of sync default/,
	'without INSERT on the target: a clear error');
is($node->safe_psql('postgres', 'SELECT count(*) FROM posthog_events'), '12', 'nothing inserted');
is($node->safe_psql('postgres', "SELECT usename FROM pg_stat_activity WHERE backend_type = 'phsync worker'"),
	'phsync_runner', 'the worker runs as phsync.role');
ok(slurp_file($node->logfile) =~ /WARNING:  phsync could not delete old runs: permission denied for table runs/,
	'without DELETE on phsync.runs, history retention warns and the worker carries on');
$node->safe_psql('postgres', 'GRANT DELETE ON phsync.runs, phsync.rejects TO phsync_runner');
$node->safe_psql('postgres', 'GRANT INSERT ON public.posthog_events TO phsync_runner');
like(run_now($node), qr/^succeeded\|\d+\|\d+\|5$/, 'with INSERT and SELECT on the target, the run succeeds');
is(source_equals_target($node, $fake), 0, 'target equals source');

# A scheduled run that cannot even write its phsync.runs row: one attempt,
# then the next slot, not a loop retrying the same past slot.
$node->safe_psql('postgres', 'REVOKE INSERT ON phsync.runs FROM phsync_runner');
my ($at, $tomorrow) = split /\|/, $node->safe_psql('postgres', q{
	SELECT to_char(t, 'HH24:MI:SS') || '|' || to_char(t::date + 1 + t::time, 'YYYY-MM-DD HH24:MI:SS')
	FROM (SELECT now() AT TIME ZONE 'UTC' + interval '2 seconds' AS t) s});
set_conf($node, 'phsync.interval' => '1d', 'phsync.run_at' => $at);
ok(poll_until(sub { $node->safe_psql('postgres', "SELECT query FROM pg_stat_activity WHERE backend_type = 'phsync worker'") eq "idle until $tomorrow+00" }, 30, 'next slot'),
	'after a scheduled run that could not start, the worker waits for the next slot');
my $attempts = () = slurp_file($node->logfile) =~ /ERROR:  permission denied for table runs/g;
is($attempts, 1, 'exactly one attempt was made');
$node->safe_psql('postgres', 'GRANT INSERT ON phsync.runs TO phsync_runner');
set_conf($node, 'phsync.interval' => '3650d', 'phsync.run_at' => '00:00');

# Hostile identifiers: a table name with quotes, a semicolon and unicode.
$node->append_conf('postgresql.conf', "phsync.role = ''\n");
$node->restart;
set_conf($node, 'phsync.target_table' => 'public."we;ird ""t"" ✓; DROP TABLE posthog_events"');
like(run_now($node), qr/^succeeded\|\d+\|17\|17$/, 'a quoted name with ; and unicode is just a name');
is($node->safe_psql('postgres', q{SELECT count(*) FROM public."we;ird ""t"" ✓; DROP TABLE posthog_events"}), '17', 'the table was created and loaded');
is($node->safe_psql('postgres', "SELECT count(*) FROM posthog_events"), '17', 'and posthog_events is still there');

# A custom query with a cursor column whose name needs quoting in HogQL too.
$node->safe_psql('postgres', q{CREATE TABLE "odd ""cols""" ("seen `at`" timestamptz NOT NULL, "who's" text, PRIMARY KEY ("who's", "seen `at`"))});
open my $fh, '>', $node->data_dir . '/odd.hogql' or die;
print $fh "SELECT created_at AS `seen ``at```, distinct_id AS `who's` FROM events\n";
close $fh;
set_conf($node, 'phsync.target_table' => '"odd ""cols"""', 'phsync.query_file' => 'odd.hogql',
	'phsync.cursor_column' => 'seen `at`');
like(run_now($node), qr/^succeeded\|\d+\|17\|17$/, 'quoted column names round-trip through HogQL');
like(fake_requests($fake)->[-1]{body}{query}{query}, qr/ORDER BY `seen ``at```, `who's`/,
	'identifiers are quoted as HogQL quotes them (a backtick written twice), values are not in the text');

done_testing();
