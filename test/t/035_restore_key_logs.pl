# Operating phsync as a DBA (issue 22), the rest: a dump of the phsync
# database restores into another database (syncs inert there, the doctor
# says so), the worker and the doctor warn when the file that sets
# phsync.api_key can be read by other users, and phsync.log_runs sets how
# much a run logs.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
use FindBin;
use lib "$FindBin::Bin/../perl";
use PhsyncTest;

my $certs = make_certs();
my $fake = start_fake(certs => $certs);
my $node = phsync_node('restore', $fake, $certs, 'phsync.initial_since' => hours_ago(6));
my $url = $fake->{url};
my $ca = $certs->{ca};
$node->safe_psql('postgres', qq{
	CREATE EXTENSION phsync;
	SELECT phsync_create_table('events', 'public.posthog_events');
	CREATE SERVER posthog_eu FOREIGN DATA WRAPPER phsync OPTIONS (host '$url', project_id '1', ca_file '$ca');
	SET log_statement = 'none';
	CREATE USER MAPPING FOR CURRENT_USER SERVER posthog_eu OPTIONS (api_key '$API_KEY');
	RESET log_statement;
	SELECT phsync_create_table('events', 'eu_events');
	SELECT name FROM phsync_add_sync('eu', 'eu_events', preset => 'events', server => 'posthog_eu', schedule => '\@yearly');});
fake_post($fake, '/generate', { count => 12, seed => 35, created_from => iso_ago($node, '2 hours'), step_ms => 300_000 });

sub log_since
{
	my ($offset) = @_;
	return slurp_file($node->logfile, $offset);
}

# what the worker logged since $offset (the lines of its pid)
sub worker_log
{
	my ($offset) = @_;
	my $pid = $node->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'phsync worker'");
	return join("\n", grep { /\[$pid\] / } split /\n/, log_since($offset));
}

# a manual run of the default sync, as "status|pages|rows_received|rows_inserted"
sub run_default
{
	my ($ret, $out, $err) = $node->psql('postgres',
		"SELECT status, pages, rows_received, rows_inserted FROM phsync_run_now('default')");
	return $ret == 0 ? $out : "ERROR: $err";
}

# ---------- phsync.log_runs ----------
my $offset = -s $node->logfile;
like(run_default(), qr/^succeeded\|\d+\|12\|12$/, 'a run with phsync.log_runs = all (the default)');
like(worker_log($offset), qr/LOG:  phsync run \d+ \(sync default\) into public\.posthog_events: .*12 rows received, 12 inserted/,
	'logs its summary');

set_conf($node, 'phsync.log_runs' => 'failures');
$offset = -s $node->logfile;
is($node->safe_psql('postgres', "SELECT status FROM phsync_run_now('eu')"), 'succeeded', 'with failures, a run that succeeds');
fake_post($fake, '/faults', [ { status => 400, detail => 'Unknown table `evnts`.' } ]);
like(run_default(), qr/HTTP status 400/, 'and one that fails');
my $log = worker_log($offset);
unlike($log, qr/phsync run \d+ \(sync eu\)/, 'logs nothing of the success');
like($log, qr/ERROR:  PostHog request failed with HTTP status 400\n[^\n]*DETAIL:  Unknown table `evnts`\./, 'and the failure');

set_conf($node, 'phsync.log_runs' => 'none');
$offset = -s $node->logfile;
fake_post($fake, '/faults', [ { status => 400, detail => 'Unknown table `evnts`.' } ]);
like(run_default(), qr/HTTP status 400/, 'with none, a failed run still fails its caller');
is($node->safe_psql('postgres', "SELECT status FROM phsync.runs WHERE sync = 'default' ORDER BY id DESC LIMIT 1"), 'failed', 'and is recorded in phsync.runs');
unlike(worker_log($offset), qr/Unknown table|phsync run \d+/, 'but the worker logs nothing of it');
set_conf($node, 'phsync.log_runs' => 'all');

# ---------- the key in a file other users can read ----------
my $conf = $node->data_dir . '/postgresql.conf';
my $settings_rows = sub {
	return $node->safe_psql('postgres', "SELECT string_agg(status || '|' || detail, E'\\n' ORDER BY status) FROM phsync_doctor() WHERE item = 'settings'");
};
like($settings_rows->(), qr/^ok\|host /, 'postgresql.conf at mode 0600: the doctor is content');
chmod 0644, $conf or die "chmod: $!";
$offset = -s $node->logfile;
$node->restart;
ok(poll_until(sub { log_since($offset) =~ /WARNING:  phsync\.api_key is set in a file other users can read\n.*DETAIL:  The file is "\Q$conf\E", mode 0644\.\n.*HINT:  Set the key with ALTER SYSTEM SET phsync\.api_key/ }, 30, 'warning'),
	'at mode 0644 the worker warns at start, naming the file');
like($settings_rows->(), qr/^ok\|host .*\nwarning\|phsync\.api_key is set in a file other users can read \("\Q$conf\E", mode 0644\)$/,
	'and the doctor reports it');
unlike(slurp_file($node->logfile), qr/\Q$API_KEY\E/, 'the key itself appears nowhere in the log');

# the quick start's way: ALTER SYSTEM (postgresql.auto.conf, 0600), the line gone from postgresql.conf
(my $text = slurp_file($conf)) =~ s/^phsync\.api_key = .*\n//mg;
open(my $fh, '>', $conf) or die $!;
print $fh $text;
close $fh;
$node->safe_psql('postgres', "SET log_statement = 'none'; ALTER SYSTEM SET phsync.api_key = '$API_KEY'; SELECT pg_reload_conf();");
ok(poll_until(sub { $settings_rows->() =~ /^ok\|host [^\n]*$/ }, 30, 'doctor'), 'with the key set by ALTER SYSTEM the warning goes');
is($node->safe_psql('postgres', "SELECT sourcefile ~ 'postgresql\\.auto\\.conf\$' FROM pg_settings WHERE name = 'phsync.api_key'"), 't',
	'the key now comes from postgresql.auto.conf');
like(run_default(), qr/^succeeded\|/, 'and runs still authenticate with it');
my @auto = stat($node->data_dir . '/postgresql.auto.conf');
is(sprintf('%04o', $auto[2] & 07777), '0600', 'postgresql.auto.conf is readable by its owner only');

# ---------- a restore into another database ----------
my $census = q{SELECT (SELECT string_agg(name || ':' || coalesce(server, '-'), ',' ORDER BY name) FROM phsync.syncs) || ' ' ||
	(SELECT count(*) FROM phsync.runs) || ' ' || (SELECT count(*) FROM posthog_events) || ' ' ||
	(SELECT string_agg(srvname, ',') FROM pg_foreign_server) || ' ' || (SELECT count(*) FROM pg_user_mappings)};
my $original = $node->safe_psql('postgres', $census);
my $dump = $node->basedir . '/analytics.dump';
$node->command_ok([ 'pg_dump', '-Fc', '-d', $node->connstr('postgres'), '-f', $dump ], 'pg_dump of the phsync database');
$node->safe_psql('postgres', 'CREATE DATABASE analytics_copy');
my ($stdout, $stderr) = ('', '');
my $ok = IPC::Run::run([ 'pg_restore', '--exit-on-error', '-d', $node->connstr('analytics_copy'), $dump ], '>', \$stdout, '2>', \$stderr);
ok($ok, 'pg_restore -d analytics_copy restores without an error') or diag($stderr);
is($node->safe_psql('analytics_copy', $census), $original,
	'syncs, run history, targets, servers and user mappings are all there');
like($node->safe_psql('analytics_copy', "SELECT status || '|' || detail FROM phsync_doctor() WHERE item = 'worker'"),
	qr/^warning\|phsync runs in database "postgres", not in this one: the syncs here do not run$/,
	'the doctor there says its syncs are inert');
my $runs = $node->safe_psql('analytics_copy', 'SELECT count(*) FROM phsync.runs');
$node->safe_psql('analytics_copy', "SELECT name FROM phsync_alter_sync('eu', schedule => '1 second')");
like(run_default(), qr/^succeeded\|/, 'the worker goes on in the original database');
is($node->safe_psql('analytics_copy', 'SELECT count(*) FROM phsync.runs'), $runs, 'and runs nothing in the copy');

done_testing();
