# The worker reports the table statistics of its transactions itself (a
# background worker must), so the synced table's counters move during a
# run, show right after it, and autovacuum's analyze sees the rows.
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
# the window starts just before the rows: one slice, a request per page
use POSIX qw(strftime);
my $node = phsync_node('statistics', $fake, $certs, 'phsync.page_size' => '1000',
	'phsync.initial_since' => strftime('%Y-%m-%dT%H:%M:%SZ', gmtime(time() - 4 * 3600)),
	autovacuum_naptime => '1s');
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');
fake_post($fake, '/generate', { count => 5000, seed => 16, created_from => iso_ago($node, '3 hours'), step_ms => 1000 });

my $stat = sub {
	return $node->safe_psql('postgres', qq{
		SELECT coalesce((SELECT $_[0] FROM pg_stat_user_tables WHERE relid = 'public.posthog_events'::regclass), 0)});
};

# PostgreSQL flushes a backend's statistics at most once a second: the
# third page comes 1.5 s after the first, then the fourth request hangs
# (pages of 1000 rows: phsync.page_size is below the first page size)
fake_post($fake, '/faults', [ {}, {}, { delay_ms => 1500 }, { delay_ms => 6000 } ]);
my $h = $node->background_psql('postgres');
$h->query_until(qr/started/, "\\echo started\nSELECT status FROM phsync_run_now();\n");
ok(poll_until(sub { $node->safe_psql('postgres', "SELECT to_regclass('public.posthog_events') IS NOT NULL") eq 't'
		  && $stat->('n_tup_ins') == 3000 }, 5, 'counters during the run'),
	'during a run, pg_stat_user_tables counts the pages committed so far (3000 rows)');
is($node->safe_psql('postgres', "SELECT status FROM phsync.runs ORDER BY id DESC LIMIT 1"), 'running',
	'while the run is still going');
$h->quit;
ok(poll_until(sub { $node->safe_psql('postgres', "SELECT status FROM phsync.runs ORDER BY id DESC LIMIT 1") eq 'succeeded' }, 30, 'run end'),
	'the run ends');

ok(poll_until(sub { $stat->('n_tup_ins') == 5000 && $stat->('n_live_tup') == 5000 }, 5, 'counters after the run'),
	'right after the run, n_tup_ins and n_live_tup are 5000');
ok(poll_until(sub { $node->safe_psql('postgres', q{
		SELECT last_autoanalyze IS NOT NULL FROM pg_stat_user_tables WHERE relid = 'public.posthog_events'::regclass}) eq 't' }, 30, 'autoanalyze'),
	'autoanalyze ran on the synced table');
ok(poll_until(sub { $node->safe_psql('postgres', "SELECT reltuples::int FROM pg_class WHERE oid = 'public.posthog_events'::regclass") eq '5000' }, 30, 'reltuples'),
	'and the planner knows its size (reltuples 5000)');

done_testing();
