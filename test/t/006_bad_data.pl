# Bad data is decided per row: good rows load, each refused row is kept as
# PostHog sent it in phsync.rejects with the reason, and the run says how
# many.  phsync.on_bad_row = fail fails the run instead, inserting nothing
# of that page.
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
my $node = phsync_node('bad', $fake, $certs, 'phsync.page_size' => '100',
	'phsync.initial_since' => hours_ago(6));
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');

my $t = iso_ago($node, '5 minutes');
my @good = map { { uuid => sprintf('00000000-0000-4000-8000-%012d', $_), event => "good$_",
	created_at => $t, distinct_id => "d$_", properties => { i => $_ } } } 1 .. 8;
# (raw rows' timestamps must lie within the bounds the built-in query puts
# on `timestamp`, which the fake compares as text)
my $bad_time = substr($t, 0, 10) . 'T25:00:00Z';
fake_post($fake, '/events', [ @good,
	# a uuid PostgreSQL refuses
	{ raw => 1, uuid => 'not-a-uuid', event => 'bad uuid', properties => '{}',
	  timestamp => $t, created_at => $t },
	# a timestamp PostgreSQL refuses
	{ raw => 1, uuid => '00000000-0000-4000-8000-000000000107', event => 'bad time', properties => '{}',
	  timestamp => $bad_time, created_at => $t },
	# properties that are not JSON
	{ raw => 1, uuid => '00000000-0000-4000-8000-000000000108', event => 'bad json', properties => '{oops',
	  timestamp => $t, created_at => $t },
	# \u0000 inside properties: jsonb refuses it, phsync strips it (as PostHog's exports do)
	{ uuid => '00000000-0000-4000-8000-000000000109', event => 'nul', created_at => $t,
	  properties => { note => "a\x{0}b", "x\\u0000" => 'kept' } },
]);
# In ClickHouse's order, rows 7 and 8 of the response are good7 and good8:
# make one too short and give the other invalid UTF-8.
fake_post_raw($fake, '/faults', qq{[{"row_patch": [{"index": 7, "row": ["00000000-0000-4000-8000-000000000007", "too few"]},
	{"index": 8, "row": ["00000000-0000-4000-8000-000000000008", "bad utf8 \\ud800", null, "d", null, "{}", "", "$t"]}]}]});

like(run_now($node), qr/^succeeded\|1\|12\|7$/, 'the run succeeds: 12 rows received, 7 inserted');
is($node->safe_psql('postgres', 'SELECT rows_rejected FROM phsync.runs ORDER BY id DESC LIMIT 1'), '5', 'five rows rejected');
is($node->safe_psql('postgres', q{SELECT string_agg(event, ',' ORDER BY event) FROM posthog_events}),
	'good1,good2,good3,good4,good5,good6,nul', 'the good rows loaded, the NUL one too');
is($node->safe_psql('postgres', q{SELECT properties::text FROM posthog_events WHERE event = 'nul'}),
	'{"note": "ab", "x\\\\u0000": "kept"}', '\u0000 escapes stripped from properties; an escaped backslash before u0000 kept');
my $rejects = $node->safe_psql('postgres', q{
	SELECT r.error FROM phsync.rejects r JOIN phsync.runs u ON u.id = r.run_id ORDER BY r.id});
my %why = map { $_ => 1 } split /\n/, $rejects;
ok($why{'PostHog sent a row with 2 values, expected 8'}, 'wrong number of values: rejected with the reason');
ok($why{'invalid byte sequence for encoding "UTF8": 0xed 0xa0 0x80'}, 'invalid UTF-8: rejected');
ok($why{'invalid input syntax for type uuid: "not-a-uuid"'}, 'bad uuid: rejected');
ok($why{qq{date/time field value out of range: "$bad_time"}}, 'bad timestamp: rejected');
is($node->safe_psql('postgres', q{SELECT count(*) FROM phsync.rejects WHERE error LIKE 'invalid input syntax for type json%'}),
	'1', 'properties that are not JSON: rejected');
is($node->safe_psql('postgres', q{SELECT columns[1] || ' ' || (raw_row::json->>0) FROM phsync.rejects WHERE raw_row LIKE '%not-a-uuid%'}),
	'uuid not-a-uuid', 'the raw row and its column names are kept');
like($node->safe_psql('postgres', q{SELECT raw_row FROM phsync.rejects WHERE error LIKE 'invalid byte%'}),
	qr/"bad utf8 \?\?\?"/, 'invalid bytes in a kept raw row become ?');

# Replaying a fixed reject (the README's recipe, on the bad timestamp).
$node->safe_psql('postgres', qq{
	UPDATE phsync.rejects SET raw_row = replace(raw_row, '$bad_time', '2026-11-20T00:00:00Z')
	WHERE raw_row LIKE '%$bad_time%';} . q{
	WITH replay AS (
		DELETE FROM phsync.rejects r WHERE target = 'public.posthog_events'
		  AND error LIKE 'date/time field value out of range%'
		RETURNING (SELECT jsonb_object_agg(c, v) FROM unnest(r.columns, ARRAY(SELECT json_array_elements_text(r.raw_row::json))) AS x(c, v)) AS obj)
	INSERT INTO public.posthog_events
	SELECT (jsonb_populate_record(NULL::public.posthog_events, obj)).* FROM replay
	ON CONFLICT DO NOTHING;});
is($node->safe_psql('postgres', q{SELECT "timestamp" FROM posthog_events WHERE event = 'bad time'}),
	'2026-11-20 00:00:00+00', 'a fixed reject can be replayed from phsync.rejects');

# A custom table: a numeric column refuses text, a CHECK refuses a value.
$node->safe_psql('postgres', q{
	CREATE TABLE counts (day date NOT NULL, event text NOT NULL, n bigint CHECK (n >= 0),
		PRIMARY KEY (day, event));});
open my $fh, '>', $node->data_dir . '/counts.hogql' or die;
print $fh "SELECT toDate(created_at) AS day, event, count() AS n FROM events GROUP BY day, event\n";
close $fh;
set_conf($node, 'phsync.target_table' => 'public.counts', 'phsync.query_file' => 'counts.hogql',
	'phsync.cursor_column' => 'day', 'phsync.initial_since' => '2026-01-01');
fake_post($fake, '/faults', [ { row_patch => { index => 0, row => [ substr($t, 0, 10), 'x', 'many' ] } } ]);
like(run_now($node), qr/^succeeded\|1\|\d+\|\d+$/, 'custom target: the run succeeds');
is($node->safe_psql('postgres', q{SELECT error FROM phsync.rejects WHERE target = 'public.counts'}),
	'invalid input syntax for type bigint: "many"', 'text in a bigint column: rejected');
fake_post($fake, '/faults', [ { row_patch => { index => 0, row => [ '2026-11-01', 'neg', -1 ] } } ]);
$node->safe_psql('postgres', 'TRUNCATE counts');
like(run_now($node), qr/^succeeded/, 'again');
like($node->safe_psql('postgres', q{SELECT error FROM phsync.rejects WHERE target = 'public.counts' ORDER BY id DESC LIMIT 1}),
	qr/^new row for relation "counts" violates check constraint "counts_n_check"/, 'a CHECK violation: rejected');

# Full batches of new rows go in with a plain INSERT: a refused row in one,
# and rows already there (a re-read), still end as they should.
set_conf($node, 'phsync.page_size' => '5000');
$node->safe_psql('postgres', q{
	SELECT phsync_create_table('events', 'big');
	ALTER TABLE big ADD CONSTRAINT big_not_forbidden CHECK (event <> 'forbidden');
	SELECT phsync_add_sync('big', 'big', preset => 'events');});
fake_post($fake, '/generate', { count => 2500, seed => 61, created_from => iso_ago($node, '4 hours'), step_ms => 1000 });
fake_post($fake, '/events', [ map { { event => 'forbidden', distinct_id => "f$_", created_at => iso_ago($node, (200 - $_ * 30) . ' minutes') } } 1 .. 3 ]);
$node->safe_psql('postgres', 'TRUNCATE phsync.rejects');
my $source = scalar @{ fake_get($fake, '/source') };
is($node->safe_psql('postgres', q{SELECT status FROM phsync_run_now('big')}), 'succeeded', 'a large page with refused rows: the run succeeds');
my $refused = $node->safe_psql('postgres', q{SELECT count(*) FROM phsync.rejects WHERE target = 'public.big'});
is($node->safe_psql('postgres', q{SELECT count(*) FROM phsync.rejects WHERE target = 'public.big' AND error LIKE 'new row for relation "big" violates check constraint%'}),
	3, 'the three rows the CHECK refuses are rejected');
is($node->safe_psql('postgres', 'SELECT count(*) FROM big'), $source - $refused, "every other row is in ($source received, $refused refused)");
$node->safe_psql('postgres', q{DELETE FROM big WHERE event = 'good1' OR distinct_id IN (SELECT distinct_id FROM big ORDER BY created_at LIMIT 100)});
my $gone = $source - $refused - $node->safe_psql('postgres', 'SELECT count(*) FROM big');
$node->safe_psql('postgres', q{SELECT phsync_alter_sync('big', reread_all => true)});
is($node->safe_psql('postgres', q{SELECT status || ' ' || rows_inserted FROM phsync_run_now('big')}), "succeeded $gone",
	"a re-read of rows mostly there: exactly the $gone missing ones are inserted");
is($node->safe_psql('postgres', 'SELECT count(*) FROM big'), $source - $refused, 'and the table is whole again');
$node->safe_psql('postgres', q{SELECT phsync_drop_sync('big')});
set_conf($node, 'phsync.page_size' => '100');

# phsync.on_bad_row = fail: the run fails on the bad row, that page inserts nothing.
set_conf($node, 'phsync.on_bad_row' => 'fail');
$node->safe_psql('postgres', 'TRUNCATE counts');
fake_post($fake, '/faults', [ { row_patch => { index => 0, row => [ '2026-11-01', 'x', 'many' ] } } ]);
like(run_now($node), qr/ERROR:  invalid input syntax for type bigint: "many"\nCONTEXT:  phsync run \d+ of sync default/, 'fail mode: the run fails with the row\'s error');
is($node->safe_psql('postgres', 'SELECT count(*) FROM counts'), '0', 'nothing of the page inserted');
like(run_now($node), qr/^succeeded/, 'the next run (no bad row) succeeds');

done_testing();
