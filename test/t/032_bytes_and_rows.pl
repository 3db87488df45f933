# Every byte stored is valid, and every row is checked against its slice,
# as a malicious (or broken) PostHog server would test it:
# - invalid UTF-8 and raw NUL bytes inside nested JSON values (a jsonb
#   column, a text column) send the row to phsync.rejects; pg_dump of the
#   table reloads;
# - a row whose cursor lies outside the slice asked for (in 2999), or does
#   not parse, is a reject with the reason; the rest of the page loads and
#   the watermark never moves past what was asked.
# On 0.3 the bytes were stored as they came (the dump did not reload, a NUL
# cut a value short), the 2999 row moved the watermark to 2999, and "not a
# timestamp" failed every run (issue 21, items 7, 8, 9).
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use JSON::PP;
use FindBin;
use lib "$FindBin::Bin/../perl";
use PhsyncTest;

my $certs = make_certs();
my $fake = start_fake(certs => $certs);
my $node = phsync_node('bytes', $fake, $certs, 'phsync.initial_since' => hours_ago(2), 'phsync.page_size' => '100');
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');
fake_post($fake, '/generate', { count => 10, seed => 32, created_from => iso_ago($node, '1 hour'), step_ms => 60_000 });

my $t = iso_ago($node, '30 minutes');
my $row = sub {
	my ($n, %over) = @_;
	my @r = (sprintf('00000000-0000-4000-8000-%012d', 320 + $n), "patched$n", $t, "d$n", undef, '{}', '', $t);
	my %col = (event => 1, properties => 5, elements_chain => 6, created_at => 7);
	$r[$col{$_}] = $over{$_} for keys %over;
	return \@r;
};
# rows 0, 3, 4 and 9 of the first page replaced by a malicious server
my $patches = [
	{ index => 0, row => $row->(0, created_at => '2999-01-01T00:00:00Z') },
	{ index => 3, row => $row->(3, properties => { note => "bad \x{d800} byte" }) },
	{ index => 4, row => $row->(4, elements_chain => [ 'aNULHEREbcd' ]) },
	{ index => 9, row => $row->(9, created_at => 'not a timestamp') },
];
my $faults = JSON::PP->new->canonical->encode([ { row_patch => $patches, bytes_replace => [ [ 'NULHERE', "\x{0}" ] ] } ]);
# (a lone surrogate cannot go through Perl's encoder: write its escape by hand)
$faults =~ s/bad \x{d800} byte/bad \\ud800 byte/;
fake_post_raw($fake, '/faults', $faults);

like(run_now($node), qr/^succeeded\|1\|10\|6$/, 'the run succeeds: 10 rows received, 6 loaded');
my %why = map { my ($u, $e) = split /\t/; ($u => $e) } split /\n/, $node->safe_psql('postgres',
	q{SELECT raw_row::json->>0, error FROM phsync.rejects ORDER BY id}, extra_params => [ '-F', "\t" ]);
like($why{'00000000-0000-4000-8000-000000000320'}, qr/^PostHog sent a row phsync does not load: its cursor "2999-01-01T00:00:00Z" is outside the slice asked for, from .* to /,
	'a cursor in 2999 is a reject, with the slice it was asked from');
like($why{'00000000-0000-4000-8000-000000000329'}, qr/^PostHog sent a row phsync does not load: its cursor "not a timestamp" is not a date-time/,
	'a cursor that does not parse is a reject');
is($why{'00000000-0000-4000-8000-000000000323'}, 'invalid byte sequence for encoding "UTF8": 0xed 0xa0 0x80',
	'invalid UTF-8 inside a nested JSON value (jsonb column) is a reject');
is($why{'00000000-0000-4000-8000-000000000324'}, 'invalid byte sequence for encoding "UTF8": 0x00',
	'a raw NUL inside a nested JSON value (text column) is a reject, not a value cut short');
is(scalar(keys %why), 4, 'four rejects, nothing else');
is($node->safe_psql('postgres', "SELECT max(created_at) < now() FROM posthog_events"), 't', 'the watermark did not move to 2999');
is($node->safe_psql('postgres', "SELECT count(*) FROM posthog_events WHERE event LIKE 'patched%'"), '0', 'no patched row was stored');

# the next run sees what arrived since: the watermark was not poisoned
fake_post($fake, '/generate', { count => 5, seed => 33, created_from => iso_ago($node, '5 minutes'), step_ms => 1000 });
# (it reads again from the watermark less phsync.lookback: the ten first
# events too, and loads the four the malicious server had hidden)
is(run_now($node), 'succeeded|1|15|9', 'the next run loads the five new events, and the four hidden before');
is($node->safe_psql('postgres', 'SELECT count(*) FROM posthog_events'), '15', 'every event is there');

# what is stored dumps and reloads
my $dump = $node->basedir . '/events.sql';
$node->command_ok([ 'pg_dump', '-d', $node->connstr('postgres'), '-t', 'public.posthog_events', '-f', $dump ], 'pg_dump of the target');
$node->safe_psql('postgres', 'CREATE DATABASE restored');
$node->command_ok([ 'psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('restored'), '-f', $dump ],
	'reloads without an error');
is($node->safe_psql('restored', 'SELECT count(*) FROM posthog_events'), target_count($node), 'every row of it');
copy_round_trip($node, 'phsync.rejects', 'rejects_copy', 'the rejects copied out', 'and loaded back');

done_testing();
