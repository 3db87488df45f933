#!/usr/bin/env perl
# Check the documentation: README.md stays an operator's page (under 300
# lines), and every relative link in README.md and docs/*.md points to a
# file that exists, and every #anchor to a heading of that file, by
# GitHub's rules (lower case; what is not a letter, digit, space, "-" or
# "_" dropped; spaces to "-"; a repeated heading gets -1, -2, ...).
#
# Usage: test/docs.pl [dir]   (the repository root; default: this tree)
use strict;
use warnings;
use File::Basename qw(dirname);
use File::Spec;

my $root = $ARGV[0] // File::Spec->rel2abs(dirname(__FILE__) . '/..');
my @files = ('README.md', map { "docs/" . (File::Spec->splitpath($_))[2] } sort glob("$root/docs/*.md"));
my $failed = 0;
my %anchors;

sub fail
{
	print STDERR "docs.pl: @_\n";
	$failed = 1;
	return;
}

sub slurp
{
	my ($path) = @_;
	open my $fh, '<:encoding(UTF-8)', $path or return undef;
	local $/;
	my $text = <$fh>;
	close $fh;
	return $text;
}

# text outside fenced code blocks, line by line
sub prose_lines
{
	my ($text) = @_;
	my @out;
	my $fence;
	for my $line (split /\n/, $text)
	{
		if ($line =~ /^\s*(```+|~~~+)/)
		{
			if (!defined $fence) { $fence = $1; }
			elsif (substr($1, 0, 1) eq substr($fence, 0, 1)) { undef $fence; }
			push @out, '';
			next;
		}
		push @out, defined $fence ? '' : $line;
	}
	return @out;
}

sub anchors_of
{
	my ($path) = @_;
	return $anchors{$path} if $anchors{$path};
	my %seen;
	my %set;
	my $text = slurp($path) // '';
	for my $line (prose_lines($text))
	{
		next unless $line =~ /^#{1,6}\s+(.*?)\s*#*\s*$/;
		my $slug = lc $1;
		$slug =~ s/\[([^\]]*)\]\([^)]*\)/$1/g;    # a link in a heading: its text
		$slug =~ s/<[^>]*>//g;                      # inline HTML
		$slug =~ s/[^\w\- ]//g;
		$slug =~ s/ /-/g;
		my $n = $seen{$slug}++;
		$set{ $n ? "$slug-$n" : $slug } = 1;
	}
	return $anchors{$path} = \%set;
}

for my $file (@files)
{
	my $path = "$root/$file";
	my $text = slurp($path);
	defined $text or fail("$file: cannot read it"), next;
	if ($file eq 'README.md')
	{
		my $lines = () = $text =~ /\n/g;
		fail("README.md has $lines lines; it must stay under 300 (move depth to docs/)") if $lines >= 300;
	}
	my $n = 0;
	for my $line (prose_lines($text))
	{
		$n++;
		(my $prose = $line) =~ s/`[^`]*`//g;    # code spans are not links
		while ($prose =~ /\]\(([^)\s]+)(?:\s+"[^"]*")?\)/g)
		{
			my $target = $1;
			next if $target =~ m{^[a-z][a-z0-9+.-]*:}i;    # https:, mailto:
			my ($file_part, $anchor) = split /#/, $target, 2;
			my $dest = $file_part eq '' ? $path
			  : File::Spec->catfile(dirname($path), $file_part);
			if ($file_part ne '' && !-e $dest)
			{
				fail("$file:$n: link to $target: no file $file_part");
				next;
			}
			next unless defined $anchor;
			if (-d $dest || $dest !~ /\.md$/)
			{
				fail("$file:$n: link to $target: an anchor into something that is not a Markdown file");
				next;
			}
			fail("$file:$n: link to $target: no heading with anchor #$anchor in " . ($file_part || $file))
			  unless anchors_of($dest)->{$anchor};
		}
	}
}

if ($failed)
{
	print STDERR "docs.pl: documentation checks FAILED\n";
	exit 1;
}
printf "docs.pl: %d files, README.md under 300 lines, every relative link and anchor resolves\n", scalar @files;
exit 0;
