# Operating phsync: run_at in a time zone across daylight-saving changes,
# and pg_dump/pg_restore keeping sync definitions and history without
# starting a run.
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
my $node = phsync_node('operating', $fake, $certs);
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');

# ---------- time zones, with PostgreSQL's own zone data ----------
# The runs from `from`, as local times, following phsync_next_run().
sub schedule
{
	my ($tz, $from, $n) = @_;
	return $node->safe_psql('postgres', qq{
		WITH RECURSIVE r(i, t) AS (
			SELECT 1, phsync_next_run('$from')
			UNION ALL SELECT i + 1, phsync_next_run(t) FROM r WHERE i < $n)
		SELECT string_agg(to_char(t AT TIME ZONE '$tz', 'MM-DD HH24:MI') || ' (' || to_char(t AT TIME ZONE 'UTC', 'HH24:MI') || 'Z)', ', ' ORDER BY i) FROM r});
}

set_conf($node, 'phsync.interval' => '1d', 'phsync.run_at' => '02:30', 'phsync.timezone' => 'America/New_York');
is(schedule('America/New_York', '2026-03-06 00:00 America/New_York', 4),
	'03-06 02:30 (07:30Z), 03-07 02:30 (07:30Z), 03-08 03:00 (07:00Z), 03-09 02:30 (06:30Z)',
	'New York, spring forward: 02:30 does not exist on March 8, the run happens once, at 03:00');
set_conf($node, 'phsync.run_at' => '01:30');
is(schedule('America/New_York', '2026-10-31 00:00 America/New_York', 3),
	'10-31 01:30 (05:30Z), 11-01 01:30 (06:30Z), 11-02 01:30 (06:30Z)',
	'New York, fall back: 01:30 happens twice on November 1, the run happens once (at the second, as PostgreSQL reads 01:30)');
set_conf($node, 'phsync.run_at' => '02:30', 'phsync.timezone' => 'Europe/Berlin');
is(schedule('Europe/Berlin', '2026-03-28 00:00 UTC', 3),
	'03-28 02:30 (01:30Z), 03-29 03:00 (01:00Z), 03-30 02:30 (00:30Z)',
	'Berlin, spring forward');
is(schedule('Europe/Berlin', '2026-10-24 00:00 UTC', 3),
	'10-24 02:30 (00:30Z), 10-25 02:30 (01:30Z), 10-26 02:30 (01:30Z)',
	'Berlin, fall back: once on October 25');
set_conf($node, 'phsync.interval' => '2d', 'phsync.timezone' => 'Asia/Kolkata', 'phsync.run_at' => '06:00');
is(schedule('Asia/Kolkata', '2026-11-20 00:00 UTC', 2), '11-20 06:00 (00:30Z), 11-22 06:00 (00:30Z)',
	'every two days at 06:00 in a half-hour zone');
set_conf($node, 'phsync.interval' => '6h', 'phsync.timezone' => 'UTC', 'phsync.run_at' => '01:00');
is(schedule('UTC', '2026-11-20 00:00 UTC', 3), '11-20 01:00 (01:00Z), 11-20 07:00 (07:00Z), 11-20 13:00 (13:00Z)',
	'a sub-day interval counts from run_at');
my ($ret, $out, $err) = $node->psql('postgres', "SELECT phsync_next_run('infinity')");
like($err, qr/ERROR:  timestamp out of range/, 'phsync_next_run(infinity) is an error, not an endless loop');
($ret, $out, $err) = $node->psql('postgres', "ALTER SYSTEM SET phsync.timezone = 'Mars/Olympus'");
like($err, qr/invalid value for parameter "phsync.timezone": "Mars\/Olympus"\nDETAIL:  phsync.timezone must be a time zone name such as UTC or Europe\/Paris\./,
	'an unknown zone is refused');
# the worker publishes the same next run
set_conf($node, 'phsync.interval' => '1d', 'phsync.timezone' => 'Pacific/Auckland', 'phsync.run_at' => '04:15');
poll_until(sub { $node->safe_psql('postgres', "SELECT next_run = phsync_next_run(now()) FROM phsync.status WHERE sync = 'default'") eq 't' }, 30,
	'the worker\'s next run');
is($node->safe_psql('postgres', "SELECT to_char(next_run AT TIME ZONE 'Pacific/Auckland', 'HH24:MI') FROM phsync.status"),
	'04:15', 'phsync.status shows the next run at run_at in phsync.timezone');
set_conf($node, 'phsync.interval' => '3650d', 'phsync.timezone' => 'UTC', 'phsync.run_at' => '00:00');

# ---------- pg_dump / pg_restore ----------
$node->safe_psql('postgres', q{
	SELECT phsync_create_table('persons', 'people');
	SELECT phsync_add_sync('persons', 'people', preset => 'persons');
	INSERT INTO phsync.runs (trigger, status, target, started_at, finished_at)
	VALUES ('schedule', 'succeeded', 'public.posthog_events', now() - interval '3 days', now() - interval '3 days');});
# a backfill still queued in the dump: the worker is busy with a slow one
fake_post($fake, '/faults', [ { delay_ms => 20000 } ]);
$node->safe_psql('postgres', "SELECT phsync_backfill('default', now() - interval '2 days', now() - interval '1 day')");
poll_until(sub { $node->safe_psql('postgres', "SELECT count(*) FROM phsync.runs WHERE trigger = 'backfill' AND status = 'running'") == 1 }, 30, 'slow backfill');
$node->safe_psql('postgres', "SELECT phsync_backfill('default', now() - interval '4 days', now() - interval '3 day')");
my $dump = PostgreSQL::Test::Utils::tempdir() . '/phsync.dump';
$node->command_ok([ 'pg_dump', '-Fc', '-f', $dump, '-d', $node->connstr('postgres') ], 'pg_dump of a database with phsync');
my $history = $node->safe_psql('postgres', q{SELECT string_agg(id || ':' || trigger || ':' || status, ',' ORDER BY id) FROM phsync.runs});

my $restored = phsync_node('restored', $fake, $certs, 'phsync.interval' => '1d', 'phsync.run_at' => '00:00');
$restored->command_ok([ 'pg_restore', '-d', $restored->connstr('postgres'), $dump ], 'pg_restore into a new server');
is($restored->safe_psql('postgres', q{SELECT name || ' ' || target || ' ' || preset || ' ' || conflict FROM phsync.syncs}),
	'persons public.people persons update', 'the sync definitions are restored');
# the worker has taken the restored database over once the queued backfill is dealt with
poll_until(sub { $restored->safe_psql('postgres', "SELECT count(*) FROM phsync.runs WHERE status IN ('queued', 'running')") == 0 }, 30,
	'the worker sees the restored history');
my $max = $restored->safe_psql('postgres', 'SELECT max(id) FROM phsync.runs');
poll_until(sub { $restored->safe_psql('postgres', "SELECT query FROM pg_stat_activity WHERE backend_type = 'phsync worker'") =~ /^idle until/ }, 30,
	'worker idle');
is($restored->safe_psql('postgres', q{SELECT string_agg(id || ':' || trigger || ':' || CASE WHEN status IN ('queued', 'running') THEN 'failed' ELSE status END, ',' ORDER BY id) FROM phsync.runs}),
	$history =~ s/:(queued|running)/:failed/gr, 'the run history is restored (what was queued or running there is marked failed here)');
like($restored->safe_psql('postgres', q{SELECT error FROM phsync.runs WHERE trigger = 'backfill' ORDER BY id DESC LIMIT 1}),
	qr/^queued before this database was restored; call phsync_backfill\(\) again to run it here$/, 'the queued backfill is not carried out');
is($restored->safe_psql('postgres', "SELECT max(id) FROM phsync.runs"), $max, 'restoring started no run, although a scheduled run is 3 days old');
is($restored->safe_psql('postgres', "SELECT next_run = date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' + interval '1 day' FROM phsync.status WHERE sync = 'default'"),
	't', 'the next scheduled run is the next slot');
like(run_now($restored), qr/^succeeded\|/, 'and a manual run works on the restored database');

done_testing();
