# docs/operations.md as a DBA would follow it: every block the page marks
# <!-- ops: NAME --> (all of its SQL and shell blocks) is run as written,
# in the page's order, against one server with the fake PostHog, and the
# data is checked after each: paused and resumed schedules, a paused sync,
# its own schedules, runs now and queued, a cancel, both kinds of key
# rotation, the log setting, a dump restored into another database, and a
# sync removed.  The only text replaced is the key placeholder 'phx_...'.
# Also checks install.md's word on dropping phsync.database (WITH (FORCE)).
use strict;
use warnings;

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/../perl";
use PhsyncTest;

my $page = slurp_file("$FindBin::Bin/../../docs/operations.md");
my @blocks;
while ($page =~ /<!-- ops: ([\w-]+) -->\n```(sql|sh)\n(.*?)```\n<!-- \/ops -->/gs)
{
	push @blocks, { name => $1, lang => $2, text => $3 };
}
my $fences = () = $page =~ /^```(?:sql|sh)$/mg;
is(scalar(@blocks), $fences, 'every SQL and shell block of docs/operations.md is marked to run');
is(join(',', map { $_->{name} } @blocks),
	'pause-all,resume-all,pause-one,resume-one,schedule-cron,schedule-interval,schedule-global,'
	  . 'run-now,run-queue,cancel,rotate-setting,rotate-mapping,logs,restore-dump,restore-check,'
	  . 'restore-drop,remove,remove-default',
	'the page\'s tasks, in order');

my $certs = make_certs();
my $fake = start_fake(certs => $certs);
my $node = phsync_node('docs_ops', $fake, $certs, 'phsync.database' => 'analytics',
	'phsync.initial_since' => hours_ago(6));
$node->safe_psql('postgres', 'CREATE DATABASE analytics');
fake_post($fake, '/generate', { count => 20, seed => 34, created_from => iso_ago($node, '2 hours'), step_ms => 60_000 });
my $url = $fake->{url};
my $ca = $certs->{ca};
# what the page assumes: a sync web_events, and a role analytics with a
# user mapping (its key not yet the right one) on server posthog_eu
$node->safe_psql('analytics', qq{
	CREATE EXTENSION phsync;
	SELECT phsync_create_table('events', 'web_events');
	SELECT name FROM phsync_add_sync('web_events', 'web_events', preset => 'events');
	CREATE ROLE analytics LOGIN;
	GRANT phsync_user TO analytics;
	CREATE SERVER posthog_eu FOREIGN DATA WRAPPER phsync OPTIONS (host '$url', project_id '1', ca_file '$ca');
	GRANT USAGE ON FOREIGN SERVER posthog_eu TO analytics;
	SET log_statement = 'none';
	CREATE USER MAPPING FOR analytics SERVER posthog_eu OPTIONS (api_key 'phx_revoked_mapping_key_000000');});

sub q1 { return $node->safe_psql($_[1] // 'analytics', $_[0]); }

sub sql_err
{
	my ($sql, $db) = @_;
	my ($ret, $out, $err) = $node->psql($db // 'analytics', $sql);
	return $ret == 0 ? "OK: $out" : "ERROR: $err";
}
my $health = sub { q1("SELECT string_agg(sync || ':' || health, ',' ORDER BY sync) FROM phsync.status") };
my $sync_row = sub { q1("SELECT enabled::text || '|' || coalesce(schedule, 'global') FROM phsync.syncs WHERE name = 'web_events'") };
my $started_logged = sub {
	my ($id) = @_;
	return slurp_file($node->logfile) =~ /phsync run $id \(manual of sync web_events\) started/;
};
my $workdir = PostgreSQL::Test::Utils::tempdir();
my ($restore_err, $run_now_id, $cancel_id);

# what to prepare before a block (what the page's reader would have), and
# what to check after it
my %before = (
	'cancel' => sub {
		fake_post($fake, '/faults', [ { delay_ms => 20_000 } ]);
		$cancel_id = q1("SELECT id FROM phsync_run_now('web_events', wait => false)");
		ok(poll_until(sub { q1("SELECT status FROM phsync.runs WHERE id = $cancel_id") eq 'running' }, 10, 'slow run'),
			'(a slow run of web_events is running)');
	},
	'rotate-setting' => sub {
		set_conf($node, 'phsync.api_key' => 'phx_revoked_settings_key_00000');
		ok(poll_until(sub { sql_err("SELECT status FROM phsync_run_now('web_events')") =~ /HTTP status 401/ }, 15, 'revoked key'),
			'(the settings\' key in postgresql.conf is revoked: runs fail with 401)');
	},
	'rotate-mapping' => sub {
		like(sql_err("SET ROLE analytics; SELECT x FROM phsync_query('SELECT 1 AS x', server => 'posthog_eu') AS t(x int)"),
			qr/HTTP status 401/, '(analytics\'s user mapping holds a revoked key)');
	},
);
my %after = (
	'pause-all' => sub {
		ok(poll_until(sub { q1('SHOW phsync.enabled') eq 'off' }, 10, 'phsync.enabled off'), 'pause-all: SHOW phsync.enabled is off');
		is($health->(), 'default:paused,web_events:paused', 'pause-all: every sync is paused in phsync.status');
		is(q1('SELECT count(*) FROM phsync.status WHERE next_run IS NOT NULL'), '0', 'pause-all: no next run');
		ok(poll_until(sub { q1("SELECT query FROM pg_stat_activity WHERE backend_type = 'phsync worker'")
			  eq 'idle, scheduled runs paused (phsync.enabled is off)' }, 10, 'worker paused'),
			'pause-all: the worker says so in pg_stat_activity');
	},
	'resume-all' => sub {
		ok(poll_until(sub { q1('SHOW phsync.enabled') eq 'on' }, 10, 'phsync.enabled on'), 'resume-all: SHOW phsync.enabled is on');
		is($health->(), 'default:ok,web_events:ok', 'resume-all: the syncs are no longer paused');
		is(q1('SELECT count(*) FROM phsync.status WHERE next_run IS NULL'), '0', 'resume-all: each has a next run');
	},
	'pause-one' => sub {
		is($sync_row->(), 'false|global', 'pause-one: web_events is disabled');
		is(q1('SELECT enabled FROM phsync.default_sync'), 'f', 'pause-one: so is the default sync');
		is($health->(), 'default:disabled,web_events:disabled', 'pause-one: phsync.status says disabled');
	},
	'resume-one' => sub {
		is($sync_row->(), 'true|global', 'resume-one: web_events is enabled');
		is(q1('SELECT enabled FROM phsync.default_sync'), 't', 'resume-one: so is the default sync');
		is($health->(), 'default:ok,web_events:ok', 'resume-one: phsync.status says ok');
	},
	'schedule-cron' => sub {
		is($sync_row->(), 'true|*/15 * * * *', 'schedule-cron: phsync.syncs.schedule has the cron expression');
		is(q1(q{SELECT schedule || '|' || (extract(minute FROM next_run)::int % 15 = 0 AND extract(second FROM next_run) = 0
		                                  AND next_run > now() AND next_run <= now() + interval '15 minutes')
		        FROM phsync.status WHERE sync = 'web_events'}),
			'*/15 * * * *|true', 'schedule-cron: its next run is the next quarter of an hour');
	},
	'schedule-interval' => sub {
		is($sync_row->(), 'true|15 minutes', 'schedule-interval: phsync.syncs.schedule is the interval');
	},
	'schedule-global' => sub {
		is($sync_row->(), 'true|global', 'schedule-global: web_events follows the global schedule again');
		is(q1("SELECT (schedule IS NULL AND next_run = phsync_next_run(now()))::text FROM phsync.status WHERE sync = 'web_events'"),
			'true', 'schedule-global: its next run is the global one');
	},
	'run-now' => sub {
		$run_now_id = q1("SELECT max(id) FROM phsync.runs WHERE sync = 'web_events'");
		is(q1("SELECT trigger || '|' || status || '|' || rows_inserted FROM phsync.runs WHERE id = $run_now_id"),
			'manual|succeeded|20', 'run-now: a manual run of web_events loaded the 20 events');
		is(target_count($node, 'web_events', 'analytics'), '20', 'run-now: they are in the table');
		ok($started_logged->($run_now_id), 'run-now: with phsync.log_runs = all the run\'s start is logged');
	},
	'run-queue' => sub {
		ok(poll_until(sub { q1("SELECT count(*) FROM phsync.runs WHERE status IN ('queued', 'running')") eq '0' }, 20, 'queued runs'),
			'run-queue: the queued runs are carried out');
		is(q1("SELECT string_agg(DISTINCT sync || ':' || trigger || ':' || status, ',') FROM phsync.runs WHERE id > $run_now_id"),
			'default:manual:succeeded,web_events:manual:succeeded', 'run-queue: runs of web_events and of every enabled sync, all succeeded');
		is(target_count($node, 'posthog_events', 'analytics'), '20', 'run-queue: the default sync loaded its table too');
	},
	'cancel' => sub {
		ok(poll_until(sub { q1("SELECT status FROM phsync.runs WHERE id = $cancel_id") eq 'cancelled' }, 10, 'cancelled'),
			'cancel: the running run is cancelled');
		is(q1("SELECT count(*) FROM phsync.runs WHERE status IN ('queued', 'running')"), '0', 'cancel: nothing is left running');
	},
	'rotate-setting' => sub {
		ok(poll_until(sub { sql_err("SELECT status FROM phsync_run_now('web_events')") eq 'OK: succeeded' }, 15, 'new key'),
			'rotate-setting: runs succeed with the new key, without a restart');
		like(q1("SELECT sourcefile FROM pg_file_settings WHERE name = 'phsync.api_key' AND applied"),
			qr/postgresql\.auto\.conf$/, 'rotate-setting: the key in effect is in postgresql.auto.conf');
		is(sprintf('%o', (stat($node->data_dir . '/postgresql.auto.conf'))[2] & 07777), '600',
			'rotate-setting: which only the server\'s account can read');
	},
	'rotate-mapping' => sub {
		is(sql_err("SET ROLE analytics; SELECT x FROM phsync_query('SELECT 1 AS x', server => 'posthog_eu') AS t(x int)"),
			'OK: 1', 'rotate-mapping: analytics\'s queries work with the new key');
	},
	'logs' => sub {
		ok(poll_until(sub { q1('SHOW phsync.log_runs') eq 'failures' }, 10, 'log_runs'), 'logs: SHOW phsync.log_runs is failures');
		# the worker reads the setting between runs: a run or two may still be logged
		ok(poll_until(sub {
			my $id = q1("SELECT id FROM phsync_run_now('web_events')");
			return !$started_logged->($id) && slurp_file($node->logfile) !~ /phsync run $id \(sync web_events\) into/;
		}, 10, 'a quiet run'), 'logs: a run that succeeds is no longer logged');
	},
	'restore-dump' => sub {
		is(q1("SELECT count(*) FROM pg_database WHERE datname = 'analytics_copy'", 'postgres'), '1', 'restore-dump: the copy exists');
		like(slurp_file($node->logfile), qr/WARNING:  phsync runs in database "analytics", not in this one: syncs here do not run/,
			'restore-dump: CREATE EXTENSION in the copy warned (in the server log)');
	},
	'restore-check' => sub {
		my $syncs = "SELECT string_agg(name || ':' || enabled || ':' || coalesce(schedule, '') || ':' || owner, ',' ORDER BY name) FROM phsync.syncs";
		is(q1($syncs, 'analytics_copy'), q1($syncs), 'restore-check: the copy has the syncs');
		my $runs = 'SELECT count(*) || \'|\' || max(id) FROM phsync.runs';
		is(q1($runs, 'analytics_copy'), q1($runs), 'restore-check: and the run history');
		is(q1("SELECT srvname FROM pg_foreign_server", 'analytics_copy'), 'posthog_eu', 'restore-check: and the server');
		is(q1("SELECT status || '|' || detail FROM phsync_doctor() WHERE item = 'worker'", 'analytics_copy'),
			'warning|phsync runs in database "analytics", not in this one: the syncs here do not run',
			'restore-check: the doctor says the syncs there do not run');
		like(sql_err('SELECT * FROM phsync_run_now()', 'analytics_copy'), qr/ERROR:  phsync runs in database "analytics", not in this one/,
			'restore-check: nor does phsync_run_now()');
	},
	'restore-drop' => sub {
		is(q1("SELECT count(*) FROM pg_database WHERE datname = 'analytics_copy'", 'postgres'), '0', 'restore-drop: the copy is gone');
	},
	'remove' => sub {
		is(q1("SELECT count(*) FROM phsync.syncs WHERE name = 'web_events'"), '0', 'remove: the sync is gone');
		is(q1("SELECT to_regclass('web_events') IS NULL"), 't', 'remove: so is its table');
		ok(q1("SELECT count(*) FROM phsync.runs WHERE sync = 'web_events'") > 0, 'remove: its run history stays');
		is($health->(), 'default:ok', 'remove: phsync.status lists the default sync only');
	},
	'remove-default' => sub {
		ok(poll_until(sub { q1('SELECT count(*) FROM phsync.status') eq '0' }, 10, 'default gone'),
			'remove-default: with phsync.target_table empty there is no default sync');
		like(sql_err("SELECT status FROM phsync_run_now('default')"), qr/sync "default" does not exist/,
			'remove-default: and it cannot be run');
	},
);

for my $b (@blocks)
{
	my $name = $b->{name};
	my $check = $after{$name};
	ok($check, "block $name has a check in this test") or next;
	$before{$name}->() if $before{$name};
	(my $text = $b->{text}) =~ s/'phx_\.\.\.'/'$API_KEY'/g;
	if ($b->{lang} eq 'sh')
	{
		local $ENV{PGHOST} = $node->host;
		local $ENV{PGPORT} = $node->port;
		my $out;
		my $ok = IPC::Run::run([ 'bash', '-e', '-c', "cd '$workdir'\n$text" ], '<', \undef, '>', \$out, '2>', \$restore_err);
		ok($ok, "block $name runs") or diag($restore_err);
	}
	else
	{
		my ($ret, $out, $err) = $node->psql('analytics', $text);
		is($ret, 0, "block $name runs") or diag($err);
	}
	$check->();
}

# install.md: the worker is connected to phsync.database, so dropping it
# takes WITH (FORCE); the worker then waits for it as at a first start
$node->safe_psql('postgres', 'DROP DATABASE analytics WITH (FORCE)');
is(q1("SELECT count(*) FROM pg_database WHERE datname = 'analytics'", 'postgres'), '0', 'DROP DATABASE ... WITH (FORCE) of phsync.database');
ok(poll_until(sub { q1("SELECT query FROM pg_stat_activity WHERE backend_type = 'phsync worker'", 'postgres')
	  eq 'waiting for database "analytics" to be created' }, 20, 'worker waiting'),
	'the worker waits for its database again');

done_testing();
