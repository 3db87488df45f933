# PhsyncTest: shared helpers for phsync's TAP tests.
#
# Starts the fake PostHog server (test/fake_posthog.py) over HTTPS with a CA
# made for the test, talks to its control port, sets up PostgreSQL nodes with
# phsync preloaded, and compares the target table with the fake's dataset.
package PhsyncTest;

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use HTTP::Tiny;
use IPC::Run;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

use Exporter 'import';
our @EXPORT = qw(make_certs start_fake fake_post fake_post_raw fake_get fake_requests
  fake_config fake_query
  set_conf iso_ago hours_ago
  phsync_node poll_until source_equals_target target_count run_now
  last_run server_sql copy_round_trip $API_KEY);

our $API_KEY = 'phx_secret_test_key_0123456789';
my $srcdir = abs_path(dirname(__FILE__) . '/../..');
my @fakes;

# A CA and a server certificate for IP 127.0.0.1 only (so that "localhost"
# reaches the server but does not match the certificate), made with openssl.
sub make_certs
{
	my $dir = PostgreSQL::Test::Utils::tempdir();
	my $run = sub {
		my @cmd = @_;
		my ($out, $err);
		IPC::Run::run(\@cmd, '>', \$out, '2>', \$err)
		  or die "openssl failed: @cmd\n$err";
	};
	open my $ext, '>', "$dir/ext.cnf" or die;
	print $ext "subjectAltName=IP:127.0.0.1\n"
	  . "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
	  . "extendedKeyUsage=serverAuth\n";
	close $ext;
	$run->('openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes',
		'-keyout', "$dir/ca.key", '-out', "$dir/ca.crt", '-days', '2',
		'-subj', '/CN=phsync test CA');
	$run->('openssl', 'req', '-newkey', 'rsa:2048', '-nodes',
		'-keyout', "$dir/server.key", '-out', "$dir/server.csr",
		'-subj', '/CN=127.0.0.1');
	$run->('openssl', 'x509', '-req', '-in', "$dir/server.csr",
		'-CA', "$dir/ca.crt", '-CAkey', "$dir/ca.key", '-CAcreateserial',
		'-out', "$dir/server.crt", '-days', '2', '-extfile', "$dir/ext.cnf");
	# the same, expired yesterday
	$run->('openssl', 'x509', '-req', '-in', "$dir/server.csr",
		'-CA', "$dir/ca.crt", '-CAkey', "$dir/ca.key", '-CAcreateserial',
		'-out', "$dir/expired.crt", '-days', '-1', '-extfile', "$dir/ext.cnf");
	chmod 0644, "$dir/ca.crt", "$dir/server.crt", "$dir/server.key", "$dir/expired.crt";
	return { dir => $dir, ca => "$dir/ca.crt", cert => "$dir/server.crt",
		key => "$dir/server.key", expired => "$dir/expired.crt" };
}

# Start the fake PostHog; returns a hash with url, api_port, control_port.
# Options: certs (from make_certs; plain HTTP without), expired (serve the
# expired certificate), project_id, api_key, projects => [[id, key], ...]
# (several projects: the first is the default one, a third element is its
# time zone), config => { setting => value, ... } (the fake's settings, see
# the docstring of test/fake_posthog.py: row_cap, timezone, time_scale,
# throttle_per_minute, concurrency, ...).
sub start_fake
{
	my (%opt) = @_;
	my $dir = PostgreSQL::Test::Utils::tempdir();
	my $ready = "$dir/ready.json";
	my @projects = @{ $opt{projects} // [] };
	my ($pid, $key) = @projects
	  ? @{ $projects[0] }[ 0, 1 ]
	  : ($opt{project_id} // '1', $opt{api_key} // $API_KEY);
	my @cmd = ('python3', "$srcdir/test/fake_posthog.py",
		'--ready-file', $ready,
		'--api-key', $key,
		'--project-id', $pid);
	for my $p (@projects)
	{
		push @cmd, '--project', join(':', grep { defined } @$p);
	}
	my %config = %{ $opt{config} // {} };
	for my $k (sort keys %config)
	{
		(my $flag = $k) =~ tr/_/-/;
		my $v = $config{$k};
		next unless defined $v;
		$v = $v ? 'true' : 'false' if JSON::PP::is_bool($v);
		push @cmd, "--$flag", $v;
	}
	push @cmd, '--cert', $opt{expired} ? $opt{certs}{expired} : $opt{certs}{cert},
	  '--key', $opt{certs}{key}
	  if $opt{certs};
	my $log = "$PostgreSQL::Test::Utils::log_path/fake_posthog_" . scalar(@fakes) . ".log";
	my $h = IPC::Run::start(\@cmd, '<', \undef, '>', $log, '2>&1');
	my $deadline = time() + 30;
	while (!-e $ready)
	{
		die "fake PostHog did not start (see $log)" if time() > $deadline || !$h->pumpable;
		usleep(50_000);
	}
	open my $fh, '<', $ready or die;
	my $info = decode_json(do { local $/; <$fh> });
	close $fh;
	my $scheme = $opt{certs} ? 'https' : 'http';
	my $fake = { handle => $h, %$info,
		url => "$scheme://127.0.0.1:$info->{api_port}" };
	push @fakes, $fake;
	return $fake;
}

END
{
	# reaping the child would clobber the test's exit status
	local $?;
	for my $f (@fakes)
	{
		eval { $f->{handle}->kill_kill; };
	}
}

my $http = HTTP::Tiny->new(timeout => 60);

sub fake_post
{
	my ($fake, $path, $data) = @_;
	my $res = $http->post("http://127.0.0.1:$fake->{control_port}$path",
		{ content => encode_json($data // {}),
		  headers => { 'Content-Type' => 'application/json' } });
	die "fake control $path failed: $res->{status} $res->{content}" unless $res->{success};
	return decode_json($res->{content});
}

# POST JSON text as is (for what Perl's encoder will not produce, such as
# a lone surrogate that becomes invalid UTF-8 on the wire).
sub fake_post_raw
{
	my ($fake, $path, $text) = @_;
	my $res = $http->post("http://127.0.0.1:$fake->{control_port}$path",
		{ content => $text, headers => { 'Content-Type' => 'application/json' } });
	die "fake control $path failed: $res->{status} $res->{content}" unless $res->{success};
	return decode_json($res->{content});
}

sub fake_get
{
	my ($fake, $path) = @_;
	my $res = $http->get("http://127.0.0.1:$fake->{control_port}$path");
	die "fake control $path failed: $res->{status}" unless $res->{success};
	return decode_json($res->{content});
}

sub fake_requests { return fake_get($_[0], '/requests'); }

# The fake's settings: fake_config($fake) reads them, fake_config($fake,
# { name => value, ... }) changes some (and returns them all).
sub fake_config
{
	my ($fake, $settings) = @_;
	return fake_get($fake, '/config') unless $settings;
	return fake_post($fake, '/config', $settings);
}

# A query straight to the fake's API (no phsync): returns the HTTP::Tiny
# response with {json} decoded when it is JSON.  Options: key, project,
# values, body (extra top-level fields; refresh is force_blocking unless
# given), kind, method ('DELETE' with client_query_id cancels), headers.
my $api_http;
sub fake_query
{
	my ($fake, $hogql, %o) = @_;
	$api_http //= HTTP::Tiny->new(timeout => 120, verify_SSL => 0);
	my $project = $o{project} // '1';
	my $url = "$fake->{url}/api/projects/$project/query/";
	my %headers = ('Content-Type' => 'application/json',
		'Authorization' => 'Bearer ' . ($o{key} // $API_KEY), %{ $o{headers} // {} });
	my $res;
	if (($o{method} // 'POST') eq 'DELETE')
	{
		$res = $api_http->request('DELETE', $url . $o{client_query_id} . '/', { headers => \%headers });
	}
	else
	{
		my $body = { query => { kind => $o{kind} // 'HogQLQuery',
				(defined $hogql ? (query => $hogql) : ()),
				(defined $hogql ? (values => $o{values} // {}) : ()) },
			refresh => 'force_blocking', %{ $o{body} // {} } };
		$res = $api_http->post($url, { content => encode_json($body), headers => \%headers });
	}
	$res->{json} = eval { decode_json($res->{content}) } if ($res->{headers}{'content-type'} // '') =~ /json/;
	return $res;
}

# SQL that creates a phsync server pointed at the fake (name => 'posthog',
# project => 1); public_mapping => 1 also lets every role use it with the
# test key (USAGE and a PUBLIC user mapping, the statement kept out of the log).
sub server_sql
{
	my ($fake, $certs, %o) = @_;
	my $name = $o{name} // 'posthog';
	my $project = $o{project} // 1;
	my $sql = "CREATE SERVER $name FOREIGN DATA WRAPPER phsync OPTIONS "
	  . "(host '$fake->{url}', project_id '$project', ca_file '$certs->{ca}');\n";
	$sql .= "GRANT USAGE ON FOREIGN SERVER $name TO PUBLIC;\nSET log_statement = 'none';\n"
	  . "CREATE USER MAPPING FOR PUBLIC SERVER $name OPTIONS (api_key '$API_KEY');\n"
	  if $o{public_mapping};
	return $sql;
}

# What pg_dump writes (COPY text) loads back: \copy $table out to a file,
# then into a new table like it ($copy), as a restore would (COPY FROM
# checks the encoding).  $out and $in name the two assertions.
sub copy_round_trip
{
	my ($node, $table, $copy, $out, $in) = @_;
	my $file = $node->basedir . "/$copy.copy";
	my @psql = ('psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres'), '-c');
	$node->command_ok([ @psql, "\\copy $table TO '$file'" ], $out);
	$node->safe_psql('postgres', "CREATE TABLE $copy (LIKE $table)");
	$node->command_ok([ @psql, "\\copy $copy FROM '$file'" ], $in);
	return;
}

# A node with phsync preloaded and pointed at the fake.  Extra settings are
# appended as given (name => value, quoted here); allows_streaming => 1 makes
# a primary a standby can be made from; install_path => dir runs another
# PostgreSQL installation (dir/bin/postgres, for pg_upgrade); initdb_extra
# => [...] passes options to initdb; start => 0 leaves it stopped.
sub phsync_node
{
	my ($name, $fake, $certs, %settings) = @_;
	my $install = delete $settings{install_path};
	my $node = PostgreSQL::Test::Cluster->new($name, $install ? (install_path => $install) : ());
	my $streaming = delete $settings{allows_streaming};
	my $start = delete $settings{start} // 1;
	my $extra = delete $settings{initdb_extra};
	$node->init($streaming ? (allows_streaming => 1) : (), $extra ? (extra => $extra) : ());
	my %conf = (
		shared_preload_libraries => 'phsync',
		'phsync.host' => $fake ? $fake->{url} : 'https://127.0.0.1:9',
		'phsync.project_id' => '1',
		'phsync.api_key' => $API_KEY,
		'phsync.page_size' => '10',
		# fast retries and no request budget, unless a test wants them
		'phsync.max_requests_per_minute' => '0',
		'phsync.max_requests_per_hour' => '0',
		# one request at a time, so that tests can count pages; the tests of
		# throughput and the chaos test turn concurrency on
		'phsync.max_concurrent_requests' => '1',
		'phsync.retry_base_delay' => '10ms',
		'phsync.max_retry_delay' => '2s',
		# keep the schedule out of the way unless a test wants it
		'phsync.run_at' => '00:00',
		'phsync.interval' => '3650d',
		# scheduled verification of yesterday only where a test asks for it
		'phsync.verify' => 'off',
		%settings);
	$conf{'phsync.ca_file'} = $certs->{ca} if $certs && !exists $settings{'phsync.ca_file'};
	$node->append_conf('postgresql.conf',
		join('', map { my $v = $conf{$_}; $v =~ s/'/''/g; "$_ = '$v'\n" } sort keys %conf));
	$node->start if $start;
	return $node;
}

# Append settings and reload; wait until a new session sees the last one
# (the worker reloads on the same SIGHUP).
sub set_conf
{
	my ($node, %settings) = @_;
	my $conf = '';
	for my $k (sort keys %settings)
	{
		(my $v = $settings{$k}) =~ s/'/''/g;
		$conf .= "$k = '$v'\n";
	}
	$node->append_conf('postgresql.conf', $conf);
	$node->reload;
	my ($k) = (sort keys %settings)[-1];
	my $want = $k eq 'phsync.api_key' ? '********' : $settings{$k};
	poll_until(sub { $node->safe_psql('postgres', "SELECT current_setting('$k')") eq $want }, 30, "reload of $k")
	  unless $want =~ /^\d+(ms|s|min|h|d|kB|MB)$/;
	# the worker handles SIGHUP between runs; one more moment for it
	return;
}

# RFC 3339 text of now() minus an interval, from the node's clock.
sub iso_ago
{
	my ($node, $interval) = @_;
	return $node->safe_psql('postgres',
		"SELECT to_char((now() - interval '$interval') AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')");
}

# RFC 3339 text of now minus $h hours, from this machine's clock: for a
# phsync.initial_since just before a test's rows, so that a first run's
# window is one slice (a run over a long window reads it in slices, the
# first a day wide, and a test that counts requests would count those).
sub hours_ago
{
	my ($h) = @_;
	my @t = gmtime(time() - $h * 3600);
	return sprintf('%04d-%02d-%02dT%02d:%02d:%02dZ', $t[5] + 1900, $t[4] + 1, $t[3], $t[2], $t[1], $t[0]);
}

# Call $code until it returns true, at most $timeout seconds.
sub poll_until
{
	my ($code, $timeout, $what) = @_;
	$timeout //= 60;
	my $deadline = time() + $timeout;
	while (time() <= $deadline)
	{
		my $r = $code->();
		return $r if $r;
		usleep(100_000);
	}
	fail("timed out waiting for $what");
	return;
}

# SELECT * FROM phsync_run_now(), as "status|pages|rows_received|rows_inserted".
sub run_now
{
	my ($node, $db) = @_;
	my ($ret, $out, $err) = $node->psql($db // 'postgres',
		"SELECT status, pages, rows_received, rows_inserted FROM phsync_run_now()");
	return $ret == 0 ? $out : "ERROR: $err";
}

# The last phsync.runs row, as a hashref.
sub last_run
{
	my ($node, $db) = @_;
	my $out = $node->safe_psql($db // 'postgres',
		"SELECT row_to_json(r) FROM phsync.runs r ORDER BY id DESC LIMIT 1");
	return $out eq '' ? undef : decode_json($out);
}

sub target_count
{
	my ($node, $table, $db) = @_;
	return $node->safe_psql($db // 'postgres', "SELECT count(*) FROM " . ($table // 'posthog_events'));
}

# Does the target hold exactly the fake's events, row for row (every column,
# duplicates counted)?  Returns the number of differing rows (0 when equal).
sub source_equals_target
{
	my ($node, $fake, $table, $db) = @_;
	$table //= 'posthog_events';
	my $json = encode_json(fake_get($fake, '/source'));
	$json =~ s/\$phsync_json\$//g;
	my $diff = $node->safe_psql($db // 'postgres', qq{
		WITH src AS (
			SELECT r->>0 AS uuid, r->>1 AS event, (r->>2)::timestamptz AS ts,
			       r->>3 AS distinct_id, r->>4 AS person_id,
			       (r->>5)::jsonb AS properties, r->>6 AS elements_chain,
			       (r->>7)::timestamptz AS created_at
			FROM jsonb_array_elements(\$phsync_json\$$json\$phsync_json\$::jsonb) r),
		tgt AS (
			SELECT uuid::text, event, "timestamp", distinct_id, person_id::text,
			       properties, elements_chain, created_at
			FROM $table),
		a AS (SELECT * FROM src EXCEPT ALL SELECT * FROM tgt),
		b AS (SELECT * FROM tgt EXCEPT ALL SELECT * FROM src)
		SELECT (SELECT count(*) FROM a) + (SELECT count(*) FROM b)});
	return $diff + 0;
}

1;
