# Transient failures are retried politely; permanent ones are not; a query
# "too big" for PostHog is split until it fits; requests are paced.  After
# each fault the target equals the source and phsync.runs tells the truth.
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
my $node = phsync_node('retries', $fake, $certs, 'phsync.max_retries' => '4',
	'phsync.initial_since' => hours_ago(6));
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');

my $batch = 0;
sub add_rows
{
	my ($n) = @_;
	$batch++;
	fake_post($fake, '/generate', { count => $n, seed => 100 + $batch,
		created_from => iso_ago($node, (120 - $batch) . ' seconds'), step_ms => 100 });
}
sub run_row { return $node->safe_psql('postgres',
	"SELECT status || '|' || requests || '|' || retries || '|' || rows_inserted FROM phsync.runs ORDER BY id DESC LIMIT 1"); }

# 503, 500, 502 and a 429 without Retry-After, then success.
add_rows(15);
fake_post($fake, '/faults', [ { status => 503, detail => 'ClickHouse at capacity' },
	{ status => 500 }, { status => 502, body => '<html>bad gateway</html>' }, { status => 429 } ]);
like(run_now($node), qr/^succeeded\|2\|15\|15$/, '5xx and 429 are retried, the run succeeds');
is(run_row(), 'succeeded|6|4|15', 'phsync.runs counts 6 requests, 4 of them retries');
is(source_equals_target($node, $fake), 0, 'target equals source');
ok(slurp_file($node->logfile) =~ qr/phsync run \d+: PostHog answered HTTP 503, retrying in [\d.]+ s \(retry 1 of 4\)\n.*DETAIL:  ClickHouse at capacity/,
	'each retry is logged with PostHog\'s detail');

# Retry-After is honoured.
add_rows(5);
fake_post($fake, '/reset');
fake_post($fake, '/faults', [ { status => 429, retry_after => 1, detail => 'Request was throttled.' } ]);
like(run_now($node), qr/^succeeded\|/, '429 with Retry-After: retried');
my $reqs = fake_requests($fake);
cmp_ok($reqs->[1]{time} - $reqs->[0]{time}, '>=', 0.95, 'the retry waited the Retry-After second');

# Network faults: connection reset, truncated body, garbage JSON.
add_rows(12);
fake_post($fake, '/faults', [ { reset => JSON::PP::true }, { truncate => 100 },
	{ raw_body => '{"results": [[1, 2' }, { raw_body => 'not json at all' } ]);
like(run_now($node), qr/^succeeded\|/, 'reset, truncated and garbled responses are retried');
like(run_row(), qr/^succeeded\|\d+\|4\|12$/, 'four retries counted');
is(source_equals_target($node, $fake), 0, 'target equals source');

# The body's encoding (phsync inflates PostHog's gzip itself): a stream
# whose CRC does not match, and an encoding phsync did not ask for, are
# retried like a garbled body; when they persist the run says why.
add_rows(9);
fake_post($fake, '/faults', [ { gzip_crc => JSON::PP::true }, { content_encoding => 'br' } ]);
like(run_now($node), qr/^succeeded\|/, 'a gzip checksum that does not match and an encoding not asked for are retried');
like(run_row(), qr/^succeeded\|\d+\|2\|9$/, 'two retries counted');
is(source_equals_target($node, $fake), 0, 'target equals source');
fake_post($fake, '/faults', [ { gzip_crc => JSON::PP::true, count => 5 } ]);
like(run_now($node), qr/ERROR:  PostHog sent a response that could not be decoded\nDETAIL:  Its gzip stream is corrupt \(the checksum does not match\) after \d+ bytes\./,
	'a corrupt gzip stream that persists: the run fails and says so');
fake_post($fake, '/faults', [ { content_encoding => 'br', count => 5 } ]);
like(run_now($node), qr/ERROR:  PostHog sent a response that could not be decoded\nDETAIL:  It came with Content-Encoding "br"; phsync asks for gzip only\./,
	'an encoding not asked for: the run fails and names it');
like(run_now($node), qr/^succeeded\|/, 'once PostHog answers well again the next run succeeds');

# Give-up: a 500 that does not clear.
add_rows(7);
fake_post($fake, '/faults', [ { status => 500, detail => 'Code: 241. Memory limit exceeded', count => 5 } ]);
like(run_now($node), qr/ERROR:  PostHog request failed with HTTP status 500\nDETAIL:  Code: 241\. Memory limit exceeded/, 'retries used up: the run fails with the last detail');
is(run_row(), 'failed|5|4|0', 'phsync.max_retries = 4: five requests, four retries');
ok(slurp_file($node->logfile) =~ qr/giving up on page 1 after 4 retries/, 'the give-up is logged');
like(run_now($node), qr/^succeeded\|/, 'once PostHog recovers the next run loads the rows');
is(source_equals_target($node, $fake), 0, 'target equals source');

# Permanent failures are not retried.
for my $status (400, 401, 402, 403)
{
	fake_post($fake, '/faults', [ { status => $status, detail => "refused $status" } ]);
	like(run_now($node), qr/HTTP status $status\nDETAIL:  refused $status/, "$status fails at once");
	is(run_row(), 'failed|1|0|0', "$status: one request, no retry");
}

# No redirect is followed (the key must not travel elsewhere).
fake_post($fake, '/reset');
fake_post($fake, '/faults', [ { status => 302, detail => 'moved' } ]);
like(run_now($node), qr/HTTP status 302/, 'a redirect is an error');
is(scalar(@{ fake_requests($fake) }), 1, 'and is not followed');

# A query too big for PostHog: 504 for any window over 10 minutes.  Two
# hours of history arrive through slices that shrink until they fit.
$node->safe_psql('postgres', 'TRUNCATE posthog_events');
fake_post($fake, '/reset', { data => JSON::PP::true });
fake_post($fake, '/generate', { count => 240, seed => 7, created_from => iso_ago($node, '2 hours'), step_ms => 29_000 });
set_conf($node, 'phsync.initial_since' => iso_ago($node, '3 hours'), 'phsync.max_retries' => '10',
	'phsync.page_size' => '50');
fake_post($fake, '/config', { max_window_seconds => 600 });
like(run_now($node), qr/^succeeded\|\d+\|240\|240$/, 'a backfill too big for one query completes');
is(source_equals_target($node, $fake), 0, 'target equals source');
$reqs = fake_requests($fake);
my @sliced = grep { exists $_->{body}{query}{values}{slice_from} } @$reqs;
ok(scalar(@sliced) > 5, 'requests were sliced (' . scalar(@sliced) . ' of ' . scalar(@$reqs) . ')');
like($sliced[-1]{body}{query}{query}, qr/created_at >= toDateTime\(\{slice_from\}\) AND created_at < toDateTime\(\{slice_until\}\)/,
	'slices bound the cursor through placeholders');
ok(!(grep { $_->{body}{query}{query} =~ /LIMIT (\d+)$/ && $1 > 50 } @$reqs), 'the page never grew past page_size');
ok(slurp_file($node->logfile) =~ qr/asking PostHog for less: \d+ s of the window, 50 rows a page/, 'shrinking is logged');
fake_post($fake, '/config', { max_window_seconds => undef });

# The request budget: at most 3 requests in any minute.  A run that needs
# more waits for the minute to pass, without failing.  (No spacing before
# the budget is spent: a small run goes at full speed.)
fake_post($fake, '/reset');
add_rows(40);
set_conf($node, 'phsync.max_requests_per_minute' => '3', 'phsync.page_size' => '10');
my $bg = $node->background_psql('postgres', on_error_stop => 0);
$bg->query_until(qr/go/, "\\echo go\nSELECT status FROM phsync_run_now();\n");
ok(poll_until(sub { $node->safe_psql('postgres', "SELECT query FROM pg_stat_activity WHERE backend_type = 'phsync worker'") =~ /waiting to fetch page 4/ }, 30, 'budget'),
	'after three requests the run waits for the budget');
$reqs = fake_requests($fake);
is(scalar(@$reqs), 3, 'three requests, and no fourth within the minute');
cmp_ok($reqs->[-1]{time} - $reqs->[0]{time}, '<', 1, 'the three went at full speed');
is($node->safe_psql('postgres', "SELECT status FROM phsync.runs ORDER BY id DESC LIMIT 1"), 'running', 'the run is waiting, not failed');
$node->safe_psql('postgres', "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query LIKE '%phsync_run_now()%' AND backend_type = 'client backend' AND pid <> pg_backend_pid()");
ok(poll_until(sub { $node->safe_psql('postgres', "SELECT status FROM phsync.runs ORDER BY id DESC LIMIT 1") eq 'cancelled' }, 10, 'cancelled'),
	'its caller gave up: the run is cancelled');
$bg->quit;

# A response larger than phsync.max_response_size is refused, not retried.
set_conf($node, 'phsync.max_response_size' => '64kB', 'phsync.page_size' => '1000', 'phsync.max_requests_per_minute' => '0');
$node->safe_psql('postgres', 'TRUNCATE posthog_events');
fake_post($fake, '/reset');
like(run_now($node), qr/ERROR:  PostHog response too large\nDETAIL:  The response was larger than phsync.max_response_size \(64 kB\)\.\nHINT:  Lower phsync.page_size, or raise phsync.max_response_size\.\nCONTEXT:  phsync run \d+ of sync default/,
	'oversized response: clear error');
is(run_row(), 'failed|1|0|0', 'not retried, nothing inserted');

done_testing();
