# Persons as PostHog shows them today (issue 23, item 3): the
# person_distinct_ids preset copies the latest version of each distinct id,
# a merge moves the merged person's distinct ids (updated by version) and
# deletes the person, and the view in docs/syncs.md gives a merged
# person's events to the survivor.
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
my $node = phsync_node('merge', $fake, $certs, 'phsync.page_size' => '100', 'phsync.initial_since' => hours_ago(48),
	'phsync.max_delete_fraction' => '0.5');
my ($a, $b, $c) = map { sprintf('00000000-0000-4000-8000-0000000000a%d', $_) } 1 .. 3;
fake_post($fake, '/persons', [ map { { id => $_, created_at => iso_ago($node, '1 day'), properties => {} } } $a, $b, $c ]);
fake_post($fake, '/distinct_ids', [ { distinct_id => 'known', person_id => $a }, { distinct_id => 'anon-1', person_id => $b },
	{ distinct_id => 'anon-2', person_id => $b }, { distinct_id => 'other', person_id => $c } ]);
my $t = iso_ago($node, '2 hours');
fake_post($fake, '/events', [ map { { raw => 1, uuid => sprintf('00000000-0000-4000-8000-0000000000e%d', $_->[0]),
	event => '$pageview', properties => '{}', timestamp => $t, distinct_id => $_->[1], person_id => $_->[2],
	elements_chain => '', created_at => $t } } [ 1, 'known', $a ], [ 2, 'anon-1', $b ], [ 3, 'anon-2', $b ], [ 4, 'other', $c ] ]);

$node->safe_psql('postgres', q{
	CREATE EXTENSION phsync;
	SELECT phsync_create_table('events', 'posthog_events');
	SELECT phsync_create_table('persons', 'people');
	SELECT name FROM phsync_add_sync('people', 'people', preset => 'persons', deletions => 'mirror');});
is($node->safe_psql('postgres', q{SELECT string_agg(sync || ' ' || rows_inserted, ',' ORDER BY sync) FROM phsync_run_now()}),
	'default 4,people 3', 'the events (the default sync) and the persons are copied');

# the documentation's block, as written
my $docs = slurp_file("$FindBin::Bin/../../docs/syncs.md");
my ($view) = $docs =~ /<!-- merge: [^>]*-->\n```sql\n(.*?)```\n<!-- \/merge -->/s;
ok($view, 'docs/syncs.md has the merge example');
my ($ret, $out, $err) = $node->psql('postgres', $view);
is($ret, 0, 'it runs') or diag($err);
is($node->safe_psql('postgres', q{SELECT string_agg(distinct_id || ' ' || person_id || ' ' || version, ',' ORDER BY distinct_id) FROM person_ids}),
	"anon-1 $b 1,anon-2 $b 1,known $a 1,other $c 1", 'person_distinct_ids: each distinct id, its person and version');
is($node->safe_psql('postgres', q{SELECT count(*) FROM events_today WHERE current_person_id = person_id}), '4',
	'before a merge, every event\'s person is the one written on it');

# PostHog merges b into a: its distinct ids move (version 2), b is deleted
fake_post($fake, '/persons/merge', { from => $b, into => $a });
is($node->safe_psql('postgres', q{SELECT string_agg(sync || ' ' || rows_updated || ' ' || rows_deleted, ',' ORDER BY sync) FROM phsync_run_now() WHERE sync <> 'default'}),
	'people 0 1,person_ids 2 0', 'the next runs: two distinct ids updated, the merged person deleted (mirror)');
is($node->safe_psql('postgres', q{SELECT string_agg(distinct_id || ' ' || person_id || ' ' || version, ',' ORDER BY distinct_id) FROM person_ids}),
	"anon-1 $a 2,anon-2 $a 2,known $a 1,other $c 1", 'the moved distinct ids point to the survivor, at their new version');
is($node->safe_psql('postgres', "SELECT count(*) FROM people WHERE id = '$b'"), '0', 'the merged person is gone');
is($node->safe_psql('postgres', "SELECT count(*) FROM posthog_events WHERE person_id = '$b'"), '2',
	'the copied events keep the person_id they were written with');
is($node->safe_psql('postgres', q{SELECT string_agg(distinct_id || ' ' || current_person_id, ',' ORDER BY distinct_id) FROM events_today}),
	"anon-1 $a,anon-2 $a,known $a,other $c", 'the view gives the merged person\'s events to the survivor');

# a distinct id PostHog deleted is deleted
fake_post($fake, '/distinct_ids', [ { distinct_id => 'other', person_id => $c, is_deleted => JSON::PP::true } ]);
is($node->safe_psql('postgres', q{SELECT rows_deleted FROM phsync_run_now('person_ids')}), '1', 'a deleted distinct id is deleted');
is($node->safe_psql('postgres', q{SELECT count(*) FROM person_ids WHERE distinct_id = 'other'}), '0', 'and gone from the table');

done_testing();
