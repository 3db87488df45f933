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
my $day = sub {
	$node->safe_psql('postgres', "SELECT to_char(('$d0'::timestamptz + interval '$_[0] days') AT TIME ZONE 'UTC', 'YYYY-MM-DD')");
};
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

done_testing();
