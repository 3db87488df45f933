# Building from source (issue 22, item 10): -Werror only in the project's
# own builds (PHSYNC_WERROR=1), so that a user's newer compiler cannot
# break the build on a new warning; the install line users copy has
# pkg-config (without it the build stops at json.h).  test/demo.sh's
# clean-up is checked by run-all.sh, which runs it as root.
use strict;
use warnings;

use PostgreSQL::Test::Utils;
use Test::More;
use FindBin;

my $top = "$FindBin::Bin/../..";

# what make would run for one object, rebuilt, with and without PHSYNC_WERROR
sub compile_line
{
	my (%env) = @_;
	local %ENV = %ENV;
	delete $ENV{PHSYNC_WERROR};
	$ENV{$_} = $env{$_} for keys %env;
	my $out = `make -s -n -B -C '$top' settings.o 2>&1`;
	return join("\n", grep { /settings\.c/ } split /\n/, $out);
}
my $user = compile_line();
like($user, qr/-Wall -Wextra/, 'a user\'s build compiles with -Wall -Wextra');
unlike($user, qr/-Werror(?![=\w])/, 'but without -Werror (PostgreSQL\'s own -Werror=vla aside)');
like(compile_line(PHSYNC_WERROR => '1'), qr/-Werror(?![=\w])/, 'the project\'s own builds (PHSYNC_WERROR=1) with it');

for my $page ('README.md', 'docs/install.md')
{
	my ($line) = slurp_file("$top/$page") =~ /^(apt-get install build-essential[^\n]*(?:\\\n[^\n]*)*)/m;
	like($line // '', qr/\bpkg-config\b/, "$page: the install line has pkg-config");
}

done_testing();
