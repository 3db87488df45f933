# PostHog's answer in PostHog's shape (issue 23, item 4): the fake's 200
# body has CachedHogQLQueryResponse's fields in the model's order, so
# "types" and "timezone" arrive after the rows; phsync types its keyset
# from the whole answer, so that a Date cursor of a custom query is bound
# as a Date whether "types" came first, last or not at all; the doctor's
# queries each have their own client_query_id.
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

# CachedHogQLQueryResponse in posthog/schema.py at PostHog/posthog commit
# f89852a7ace14828250dd108d959ceff8dd1dafa, in its order (pydantic dumps
# fields in definition order; posthog/api/query.py returns
# model_dump(by_alias=True), so every field is there, null when unset).
my @model = qw(cache_key cache_target_age calculation_trigger clickhouse columns error
	explain hasMore hogql is_cached last_refresh limit metadata modifiers
	next_allowed_client_refresh offset query query_metadata query_status
	resolved_date_range results timezone timings types);
my %required = map { $_ => 1 } qw(cache_key is_cached last_refresh next_allowed_client_refresh results timezone);

# the top-level keys of a JSON object, in the order they appear
sub top_keys
{
	my ($text) = @_;
	my (@keys, $depth, $in_str, $esc, $start);
	$depth = 0;
	for (my $i = 0; $i < length $text; $i++)
	{
		my $c = substr($text, $i, 1);
		if ($in_str)
		{
			if ($esc) { $esc = 0; }
			elsif ($c eq '\\') { $esc = 1; }
			elsif ($c eq '"')
			{
				$in_str = 0;
				my $k = substr($text, $start, $i - $start);
				push @keys, $k if $depth == 1 && substr($text, $i + 1) =~ /^\s*:/;
			}
			next;
		}
		if ($c eq '"') { $in_str = 1; $start = $i + 1; }
		elsif ($c eq '{' || $c eq '[') { $depth++; }
		elsif ($c eq '}' || $c eq ']') { $depth--; }
	}
	return \@keys;
}

# (over HTTP: the test's own client does not take the test CA)
my $plain = start_fake();
fake_post($plain, '/generate', { count => 5, seed => 37 });
for my $q ('SELECT 1 AS one', 'SELECT uuid, event FROM events LIMIT 3')
{
	my $res = fake_query($plain, $q);
	is($res->{status}, 200, "the fake answers $q");
	is_deeply(top_keys($res->{content}), \@model, "its fields are CachedHogQLQueryResponse's, in the model's order: $q");
	ok(!(grep { !defined $res->{json}{$_} } keys %required), 'the required ones are set');
	like($res->{json}{last_refresh}, qr/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/, 'last_refresh is an RFC 3339 time');
}

# A custom query whose cursor is a Date, read in pages of 10,000 by keyset
# (a window of 40 days: no plan), each arriving slowly, so that its first
# 5,000 rows are loaded before PostHog's "types" arrive
my $node = phsync_node('shape', $fake, $certs, 'phsync.page_size' => '10000',
	'phsync.initial_since' => hours_ago(40 * 24));
fake_post($fake, '/generate', { count => 12000, seed => 38, created_from => iso_ago($node, '3 days'), step_ms => 20000 });
$node->safe_psql('postgres', q{
	CREATE EXTENSION phsync;
	CREATE TABLE by_day (day date NOT NULL, uuid uuid NOT NULL, event text, PRIMARY KEY (day, uuid));
	SELECT name FROM phsync_add_sync('by_day', 'by_day', "cursor" => 'day',
		query => 'SELECT toDate(created_at) AS day, uuid, event FROM events');});

for my $case ([ 'PostHog\'s order (types after the rows)', {} ],
	[ 'types first', { types_first => JSON::PP::true } ],
	[ 'no types at all', { send_types => JSON::PP::false } ])
{
	my ($what, $config) = @$case;
	fake_config($fake, { types_first => JSON::PP::false, send_types => JSON::PP::true, send_pause_ms => 20, %$config });
	$node->safe_psql('postgres', 'TRUNCATE by_day');
	fake_post($fake, '/reset', {});
	is($node->safe_psql('postgres', q{SELECT status || ' ' || rows_received FROM phsync_run_now('by_day')}),
		'succeeded 12000', "$what: the run reads the 12,000 rows");
	is($node->safe_psql('postgres', q{SELECT count(*) || ' ' || count(DISTINCT uuid) || ' ' || (count(DISTINCT day) >= 3) FROM by_day}),
		'12000 12000 true', "$what: every row once, over three days or more");
	my @pages = grep { ($_->{body}{query}{query} // '') =~ /after_0/ } @{ fake_requests($fake) };
	ok(@pages >= 1, sprintf('%s: %d page(s) after the first, by keyset', $what, scalar @pages));
	is(scalar(grep { $_->{body}{query}{query} !~ /toDate\(\{after_0\}\)/ } @pages), 0,
		"$what: each binds the Date cursor as a Date");
}
fake_config($fake, { types_first => JSON::PP::false, send_types => JSON::PP::true, send_pause_ms => 0 });

# the doctor: a client_query_id per query, each starting phsync-doctor-
fake_post($fake, '/reset', {});
$node->safe_psql('postgres', 'SELECT count(*) FROM phsync_doctor()');
my @ids = map { $_->{client_query_id} // '' } grep { ($_->{method} // '') eq 'POST' } @{ fake_requests($fake) };
ok(@ids >= 2, sprintf('the doctor asks PostHog %d queries', scalar @ids));
is(scalar(grep { !/^phsync-doctor-\d+-[0-9a-f]{16}$/ } @ids), 0, 'each client_query_id starts phsync-doctor-');
my %seen = map { $_ => 1 } @ids;
is(scalar(keys %seen), scalar(@ids), 'and none is used twice');

done_testing();
