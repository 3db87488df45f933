# ALTER EXTENSION phsync UPDATE from every released version (each
# installed from its own script, kept in test/versions/): the result has
# exactly the objects of a fresh install of the library's version, the
# history of the old version is kept, and until the update the worker says
# what to do.  The test suite runs on every supported major, so each path
# is tested on each.
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
my $node = phsync_node('versions', $fake, $certs, 'phsync.initial_since' => hours_ago(3));

# every object of the extension, its definition, comment and privileges
my $catalog = q{
	WITH objs AS (
		SELECT classid, objid FROM pg_depend
		WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
		  AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'phsync')),
	rels AS (SELECT objid AS oid FROM objs WHERE classid = 'pg_class'::regclass)
	SELECT line FROM (
		SELECT 'object ' || pg_describe_object(classid, objid, 0) || ' -- '
		       || coalesce(obj_description(objid, classid::regclass::name), '') AS line FROM objs
		UNION ALL
		SELECT 'function ' || p.oid::regprocedure || ' ' || pg_get_functiondef(p.oid)
		       || ' acl ' || coalesce(p.proacl::text, 'default')
		FROM pg_proc p JOIN objs ON objs.classid = 'pg_proc'::regclass AND objs.objid = p.oid
		UNION ALL
		SELECT 'column ' || a.attrelid::regclass || ' #' || a.attnum || ' ' || a.attname || ' '
		       || format_type(a.atttypid, a.atttypmod) || ' notnull=' || a.attnotnull
		       || ' default=' || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
		       || ' -- ' || coalesce(col_description(a.attrelid, a.attnum), '')
		FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
		WHERE a.attrelid IN (SELECT oid FROM rels) AND a.attnum > 0 AND NOT a.attisdropped
		UNION ALL
		SELECT 'constraint ' || conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid)
		FROM pg_constraint WHERE conrelid IN (SELECT oid FROM rels)
		UNION ALL
		SELECT 'index ' || pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid IN (SELECT oid FROM rels)
		UNION ALL
		SELECT 'view ' || oid::regclass || ' ' || pg_get_viewdef(oid) FROM pg_class
		WHERE oid IN (SELECT oid FROM rels) AND relkind = 'v'
		UNION ALL
		SELECT 'relation ' || oid::regclass || ' ' || relkind::text || ' acl ' || coalesce(relacl::text, 'default')
		       || ' rls ' || relrowsecurity
		FROM pg_class WHERE oid IN (SELECT oid FROM rels)
		UNION ALL
		SELECT 'policy ' || polrelid::regclass || ' ' || polname || ' ' || polcmd::text || ' '
		       || coalesce(pg_get_expr(polqual, polrelid), '') || ' ' || coalesce(pg_get_expr(polwithcheck, polrelid), '')
		FROM pg_policy WHERE polrelid IN (SELECT oid FROM rels)
		UNION ALL
		SELECT 'config ' || array_to_string(extconfig::regclass[], ',') || ' ' || array_to_string(extcondition, ',')
		       || ' version ' || extversion FROM pg_extension WHERE extname = 'phsync') s
	ORDER BY line};

my $library = $node->safe_psql('postgres', q{SELECT default_version FROM pg_available_extensions WHERE name = 'phsync'});
$node->safe_psql('postgres', 'CREATE EXTENSION phsync');
my $fresh = $node->safe_psql('postgres', $catalog);
like($fresh, qr/version \Q$library\E$/m, "a fresh install is version $library");

# the released versions, whose install scripts test/versions/ keeps and
# test/install-deps.sh installs (make install-test-versions)
my $sharedir = `pg_config --sharedir`;
chomp $sharedir;
my @versions = sort map { m{/phsync--([0-9.]+)\.sql$} ? ($1) : () } glob("$FindBin::Bin/../versions/phsync--*.sql");
ok(@versions > 0, 'released versions to update from: ' . join(', ', @versions));
for my $v (@versions)
{
	BAIL_OUT("phsync--$v.sql is not installed in $sharedir/extension: make install-test-versions")
	  unless -f "$sharedir/extension/phsync--$v.sql";
}

for my $v (@versions)
{
	$node->safe_psql('postgres', qq{
		DROP EXTENSION phsync CASCADE;
		CREATE EXTENSION phsync VERSION '$v';
		INSERT INTO phsync.runs (trigger, status, target, rows_inserted) VALUES ('manual', 'succeeded', 'public.posthog_events', 42);});
	is($node->safe_psql('postgres', q{SELECT extversion FROM pg_extension WHERE extname = 'phsync'}), $v,
		"installed at $v from its own script");
	my ($ret, $out, $err) = $node->psql('postgres', 'SELECT * FROM phsync_run_now()');
	like($err, qr/ERROR:  extension "phsync" is at version \Q$v\E, but the library is version \Q$library\E\nHINT:  ALTER EXTENSION phsync UPDATE;/,
		"with $v installed, the worker asks for the update");
	$node->safe_psql('postgres', 'ALTER EXTENSION phsync UPDATE');
	is($node->safe_psql('postgres', $catalog), $fresh,
		"ALTER EXTENSION phsync UPDATE from $v yields exactly the objects of a fresh $library install");
	is($node->safe_psql('postgres', "SELECT sync || ' ' || rows_inserted || ' ' || rows_updated FROM phsync.runs"), 'default 42 0',
		"the $v history is kept");
	like(run_now($node), qr/^succeeded\|/, "after the update from $v the worker runs again");
}

done_testing();
