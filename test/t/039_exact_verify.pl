# Exact verification (issue 23, item 1): a bucket is compared by its count
# and by the sum of its distinct keys' hashes, computed alike by PostHog
# (reinterpretAsUInt32(MD5(toString(key)))) and PostgreSQL (the same four
# bytes of md5(key::text)); a bucket whose rows changed while its count did
# not is "different", and a repair narrows it down to the hours that differ
# and reads only those again.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Digest::MD5 qw(md5);
use FindBin;
use lib "$FindBin::Bin/../perl";
use PhsyncTest;

my $certs = make_certs();
my $fake = start_fake(certs => $certs);
my $node = phsync_node('exact', $fake, $certs, 'phsync.page_size' => '1000',
	'phsync.initial_since' => hours_ago(5 * 24));
my $d0 = $node->safe_psql('postgres',
	q{SELECT to_char(date_trunc('day', now() AT TIME ZONE 'UTC') - interval '4 days', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')});
# the three days, as YYYY-MM-DD
my @days = split /\n/, $node->safe_psql('postgres',
	"SELECT to_char(d AT TIME ZONE 'UTC', 'YYYY-MM-DD') FROM generate_series('$d0'::timestamptz, '$d0'::timestamptz + interval '2 days', '1 day') d");
my $day = sub { $days[ $_[0] ] };
# 6,000 events over three days, one every 43.2 s: 2,000 a day
fake_post($fake, '/generate', { count => 6000, seed => 39, created_from => $d0, step_ms => 43200 });
$node->safe_psql('postgres', q{
	CREATE EXTENSION phsync;
	SELECT phsync_create_table('events', 'ev');
	SELECT name FROM phsync_add_sync('ev', 'ev', preset => 'events');});
is($node->safe_psql('postgres', q{SELECT status || ' ' || rows_inserted FROM phsync_run_now('ev')}), 'succeeded 6000',
	'the three days are copied');

# the hash, computed a third way (Perl): the first four bytes of the MD5 of
# the key's text, little-endian
my %sum;
for my $e (@{ fake_get($fake, '/source') })
{
	$sum{ substr($e->[7], 0, 10) } += unpack('V', md5($e->[0]));
}
my $range = "'ev', '$d0', '$d0'::timestamptz + interval '3 days'";
my $verify = sub {
	my ($extra) = @_;
	$node->safe_psql('postgres', qq{SELECT count(*) FROM phsync_verify($range$extra)});
	return $node->safe_psql('postgres', q{
		SELECT string_agg(to_char(bucket AT TIME ZONE 'UTC', 'YYYY-MM-DD') || ' ' || posthog_count || ' ' || local_count
		                  || ' ' || status, ',' ORDER BY bucket)
		FROM phsync.verifications WHERE run_id = (SELECT max(id) FROM phsync.runs)});
};
is($verify->(''), join(',', map { $day->($_) . ' 2000 2000 ok' } 0 .. 2), 'all three days are equal');
is($node->safe_psql('postgres', q{
	SELECT string_agg(to_char(bucket AT TIME ZONE 'UTC', 'YYYY-MM-DD') || ' ' || posthog_checksum || ' ' || local_checksum, ',' ORDER BY bucket)
	FROM phsync.verifications WHERE run_id = (SELECT max(id) FROM phsync.runs)}),
	join(',', map { my $d = $day->($_); "$d $sum{$d} $sum{$d}" } 0 .. 2),
	'PostHog\'s checksum, the target\'s and one computed here are the same number, for each day');

# the second day: one event deleted, one arrived late, the same count
my ($gone) = grep { substr($_->[7], 0, 10) eq $day->(1) } @{ fake_get($fake, '/source') };
fake_post($fake, '/delete', { uuids => [ $gone->[0] ] });
my $late_at = $node->safe_psql('postgres', "SELECT to_char(('$d0'::timestamptz + interval '1 day 20 hours 10 minutes') AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')");
my $late = '00000000-0000-4000-8000-000000000039';
fake_post($fake, '/events', [ { raw => 1, uuid => $late, event => 'late', properties => '{}', timestamp => $late_at,
	distinct_id => 'late', person_id => undef, elements_chain => '', created_at => $late_at } ]);
is($verify->(''), join(',', $day->(0) . ' 2000 2000 ok', $day->(1) . ' 2000 2000 different', $day->(2) . ' 2000 2000 ok'),
	'the day whose rows changed, with its count unchanged, is different');
is($node->safe_psql('postgres', q{SELECT verify_mismatches FROM phsync.runs ORDER BY id DESC LIMIT 1}), '1',
	'and counts as a mismatch');

# repair: the day is counted again by the hour, and only the hours that
# differ are read again
my $log_from = -s $node->logfile;
fake_post($fake, '/reset', {});
is($verify->(', repair => true'), join(',', $day->(0) . ' 2000 2000 ok', $day->(1) . ' 2000 2001 extra', $day->(2) . ' 2000 2000 ok'),
	'after the repair the late event is here; the deleted one is kept (deletions are kept by default)');
is($node->safe_psql('postgres', "SELECT count(*) FROM ev WHERE uuid = '$late'"), '1', 'the late event was fetched');
my $run = $node->safe_psql('postgres', q{SELECT rows_inserted || ' ' || requests || ' ' || (rows_received < 400) FROM phsync.runs ORDER BY id DESC LIMIT 1});
my @asked = @{ fake_requests($fake) };
my @counts = grep { $_->{body}{query}{query} =~ /phsync_keysum/ } @asked;
note(sprintf('repair: %d requests (%d counts), rows of each: %s', scalar @asked, scalar @counts, join(' ', map { $_->{rows} } @asked)));
is($run, '1 ' . scalar(@asked) . ' true', 'it inserted the one row, in the requests the run counts, reading far less than the day');
is(scalar(@counts), 2, 'two counts: the three days, then the differing day by the hour');
ok(@asked <= 4, sprintf('%d requests in all (at most 4: two counts, two hours)', scalar @asked));
like(slurp_file($node->logfile, $log_from), qr/phsync run \d+: repairing 1 bucket\(s\) of sync ev took ${\ (scalar(@asked) - 1)} request\(s\)/,
	'the log says how many requests the repair took (after the first count)');
like(slurp_file($node->logfile, $log_from), qr/repairing sync ev from \S+T\d\d:00:00Z to \S+T\d\d:00:00Z/,
	'each range read again is an hour of the day');

# ---------- deletions => 'mirror' ----------
is($node->safe_psql('postgres', q{SELECT deletions FROM phsync.syncs WHERE name = 'ev'}), 'keep', 'deletions are kept by default');
my ($ret, $out, $err) = $node->psql('postgres', q{SELECT phsync_alter_sync('ev', deletions => 'all')});
like($err, qr/ERROR:  invalid deletions mode "all"\nHINT:  Use keep .* or mirror/, 'an unknown deletions mode: clear error');
($ret, $out, $err) = $node->psql('postgres', q{SELECT phsync_alter_sync('default', deletions => 'mirror')});
like($err, qr/HINT:  Set phsync.deletions and reload/, 'the default sync\'s is the setting phsync.deletions');
$node->safe_psql('postgres', q{SELECT phsync_alter_sync('ev', deletions => 'mirror')});
is($verify->(', repair => true'), join(',', $day->(0) . ' 2000 2000 ok', $day->(1) . ' 2000 2000 repaired', $day->(2) . ' 2000 2000 ok'),
	'mirror: the repair deletes the event PostHog no longer has, and the day is equal again');
is($node->safe_psql('postgres', "SELECT count(*) FROM ev WHERE uuid = '$gone->[0]'"), '0', 'the deleted event is gone here too');
is($node->safe_psql('postgres', q{SELECT rows_deleted || ' ' || rows_inserted FROM phsync.runs ORDER BY id DESC LIMIT 1}), '1 0',
	'counted in phsync.runs.rows_deleted');
is($verify->(''), join(',', map { $day->($_) . ' 2000 2000 ok' } 0 .. 2), 'and verification finds the three days equal');

# nothing is deleted on a failed answer: the re-read of the differing hour fails
my @day3 = grep { substr($_->[7], 0, 10) eq $day->(2) } @{ fake_get($fake, '/source') };
fake_post($fake, '/delete', { uuids => [ $day3[100][0] ] });
fake_post($fake, '/faults', [ { pass => JSON::PP::true, count => 2 }, { status => 400, detail => 'Injected failure' } ]);
($ret, $out, $err) = $node->psql('postgres', qq{SELECT count(*) FROM phsync_verify($range, repair => true)});
like($err, qr/Injected failure/, 'a repair whose read fails fails');
is($node->safe_psql('postgres', "SELECT count(*) FROM ev WHERE uuid = '$day3[100][0]'"), '1', 'and deletes nothing');
is($node->safe_psql('postgres', q{SELECT status || ' ' || rows_deleted FROM phsync.runs ORDER BY id DESC LIMIT 1}), 'failed 0',
	'its run failed, with no row deleted');

# more than phsync.max_delete_fraction (10%) of a day: the repair stops and says so
fake_post($fake, '/delete', { uuids => [ map { $day3[$_][0] } 200 .. 449 ] });
my $n3 = scalar(@day3) - 251;
$log_from = -s $node->logfile;
is($verify->(', repair => true'), join(',', $day->(0) . ' 2000 2000 ok', $day->(1) . ' 2000 2000 ok', $day->(2) . " $n3 2000 extra"),
	'251 of a day\'s 2,000 rows gone: the day stays extra');
like(slurp_file($node->logfile, $log_from), qr/WARNING:  phsync run \d+: not deleting the 251 rows of public.ev from \S+ to \S+ that PostHog no longer has\n.*DETAIL:  They are more than phsync.max_delete_fraction \(0.1\) of the 2000 rows of the verified bucket./,
	'a WARNING says how many it did not delete, and why');
is($node->safe_psql('postgres', q{SELECT count(*) FROM ev}), '6000', 'nothing was deleted');
set_conf($node, 'phsync.max_delete_fraction' => '0.2');
is($verify->(', repair => true'), join(',', $day->(0) . ' 2000 2000 ok', $day->(1) . ' 2000 2000 ok', $day->(2) . " $n3 $n3 repaired"),
	'with phsync.max_delete_fraction = 0.2 the repair deletes them');
is($node->safe_psql('postgres', q{SELECT rows_deleted FROM phsync.runs ORDER BY id DESC LIMIT 1}), '251', 'all 251');
is(source_equals_target($node, $fake, 'ev'), 0, 'the table equals PostHog\'s events again');

# re-processing: PostHog writes an event again under the same uuid (it then
# holds two copies); distinct keys are counted and summed, so the day is equal
my $again = fake_get($fake, '/source')->[10];
fake_post($fake, '/events', [ { raw => 1, uuid => $again->[0], event => $again->[1], timestamp => $again->[2],
	distinct_id => $again->[3], person_id => $again->[4], properties => $again->[5], elements_chain => $again->[6],
	created_at => $again->[7] } ]);
is(scalar(grep { $_->[0] eq $again->[0] } @{ fake_get($fake, '/source') }), 2, 'PostHog holds one event twice');
is($verify->(''), join(',', $day->(0) . ' 2000 2000 ok', $day->(1) . ' 2000 2000 ok', $day->(2) . " $n3 $n3 ok"),
	'and the copy still verifies as equal');

# ---------- persons: kept, or mirrored by the whole re-read ----------
my @people = map { sprintf('00000000-0000-4000-8000-%012d', $_) } 1 .. 20;
fake_post($fake, '/persons', [ map { { id => $_, created_at => iso_ago($node, '2 days'), properties => {} } } @people ]);
$node->safe_psql('postgres', q{
	SELECT phsync_create_table('persons', 'people_kept');
	SELECT phsync_create_table('persons', 'people_mirrored');
	SELECT name FROM phsync_add_sync('people_kept', 'people_kept', preset => 'persons');
	SELECT name FROM phsync_add_sync('people_mirrored', 'people_mirrored', preset => 'persons', deletions => 'mirror');});
is($node->safe_psql('postgres', q{SELECT string_agg(status || ' ' || rows_inserted, ',' ORDER BY sync) FROM phsync_run_now() WHERE sync LIKE 'people%'}),
	'succeeded 20,succeeded 20', 'both persons syncs copy the 20 persons');
fake_post($fake, '/persons/delete', { ids => [ @people[3, 7] ] });
is($node->safe_psql('postgres', q{SELECT string_agg(sync || ' ' || rows_deleted, ',' ORDER BY sync) FROM phsync_run_now() WHERE sync LIKE 'people%'}),
	'people_kept 0,people_mirrored 2', 'two persons deleted in PostHog: the mirroring sync deletes them, the other keeps them');
is($node->safe_psql('postgres', q{SELECT (SELECT count(*) FROM people_kept) || ' ' || (SELECT count(*) FROM people_mirrored)}), '20 18',
	'20 kept, 18 mirrored');
fake_post($fake, '/persons/delete', { ids => [ @people[0 .. 4] ] });
$log_from = -s $node->logfile;
is($node->safe_psql('postgres', q{SELECT rows_deleted FROM phsync_run_now('people_mirrored')}), '0',
	'4 more of 18 (over phsync.max_delete_fraction, 0.2): none deleted');
like(slurp_file($node->logfile, $log_from), qr/not deleting the 4 rows of public.people_mirrored in the window read that PostHog no longer has\n.*DETAIL:  They are more than phsync.max_delete_fraction \(0.2\) of the 18 rows there./, 'and the log says so');

done_testing();
