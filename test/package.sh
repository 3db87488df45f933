#!/usr/bin/env bash
# Build the Debian package postgresql-15-phsync and check what it installs.
#
# Run as root on Debian 12 from anywhere: installs the packaging tools and
# build dependencies if they are missing, copies the repository (tracked and
# untracked, non-ignored files) into a temporary directory, runs
# "dpkg-buildpackage -us -uc -b" there, and compares the files in the .deb
# with the list expected from the repository (phsync--*.sql, *.c).  The
# repository itself is never written to.
#
# The checked .deb is copied to $PHSYNC_DEB_DIR (default /tmp/phsync-deb),
# ready for "apt install /tmp/phsync-deb/postgresql-15-phsync_*.deb".
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
pgver=15
pkg=postgresql-$pgver-phsync
out=${PHSYNC_DEB_DIR:-/tmp/phsync-deb}
start=$SECONDS

die() { echo "package.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (installs packages with apt-get)"

# 1. tools and build dependencies
. "$here/test/apt-ensure.sh"
apt_ensure build-essential debhelper dpkg-dev fakeroot git postgresql-server-dev-all \
	"postgresql-server-dev-$pgver" libcurl4-openssl-dev libjson-c-dev libisal-dev

tmp=$(mktemp -d /tmp/phsync-package.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
src=$tmp/phsync            # dpkg-buildpackage writes the .deb into $tmp
mkdir "$src" "$tmp/root"

# 2. copy the tree (what git would commit: tracked + untracked, not ignored;
# files deleted in the working tree are skipped) and build the package there
git -c safe.directory="$here" -C "$here" ls-files -z -co --exclude-standard |
	while IFS= read -r -d '' f; do
		if [ -e "$here/$f" ] || [ -L "$here/$f" ]; then printf '%s\0' "$f"; fi
	done |
	tar -C "$here" --null -T - -cf - | tar -C "$src" -xf -
[ -f "$src/debian/control" ] || die "no debian/control in $here"

echo "package.sh: dpkg-buildpackage -us -uc -b in $src"
if ! (cd "$src" && dpkg-buildpackage -us -uc -b) >"$tmp/build.log" 2>&1; then
	tail -n 60 "$tmp/build.log" >&2
	die "dpkg-buildpackage failed (last 60 lines above)"
fi

version=$(cd "$src" && dpkg-parsechangelog -S Version)
arch=$(dpkg --print-architecture)
deb=$tmp/${pkg}_${version}_$arch.deb
[ -f "$deb" ] || die "expected $deb, found: $(cd "$tmp" && echo ./*.deb)"

# 3. control fields and contents
field() { dpkg-deb -f "$deb" "$1"; }
fail=0
[ "$(field Package)" = "$pkg" ] || { echo "Package is '$(field Package)', expected $pkg"; fail=1; }
[ "$(field Version)" = "$version" ] || { echo "Version is '$(field Version)', expected $version"; fail=1; }
depends=$(field Depends)
for d in "postgresql-$pgver" libcurl libjson-c; do
	grep -Eq "(^|[ ,])$d" <<<"$depends" || { echo "Depends lacks $d: $depends"; fail=1; }
done
dpkg-deb -x "$deb" "$tmp/root"

# 4. file list: everything but usr/share/doc/$pkg/ must be exactly this
lib=usr/lib/postgresql/$pgver/lib
ext=usr/share/postgresql/$pgver/extension
{
	echo "$lib/phsync.so"
	echo "$ext/phsync.control"
	# bitcode for JIT: PGXS installs it because PostgreSQL 15 is built --with-llvm
	echo "$lib/bitcode/phsync.index.bc"
	(cd "$here" && ls -- *.c) | sed -e "s|\.c\$|.bc|; s|^|$lib/bitcode/phsync/|"
	(cd "$here" && ls -- phsync--*.sql) | sed -e "s|^|$ext/|"
} | LC_ALL=C sort >"$tmp/expected"
(cd "$tmp/root" && find . ! -type d ! -path "./usr/share/doc/$pkg/*" | sed -e 's|^\./||') |
	LC_ALL=C sort >"$tmp/actual"
if ! diff -u --label expected --label "files in $(basename "$deb")" "$tmp/expected" "$tmp/actual"; then
	echo "(- expected but missing from the package, + in the package but not expected)"
	fail=1
fi
# 5. one version: phsync.control's default_version is the version; the
# package, META.json and the newest install script must agree with it
extver=$(sed -n "s/^default_version *= *'\(.*\)'/\1/p" "$here/phsync.control")
[ "${version%%-*}" = "$extver.0" ] || { echo "debian/changelog says ${version%%-*}, phsync.control $extver"; fail=1; }
grep -q "\"version\": \"$extver.0\"" "$here/META.json" || { echo "META.json does not say version $extver.0"; fail=1; }
grep -q "\"file\": \"phsync--$extver.sql\"" "$here/META.json" || { echo "META.json does not name phsync--$extver.sql"; fail=1; }
[ -f "$here/phsync--$extver.sql" ] || { echo "no install script phsync--$extver.sql"; fail=1; }
grep -q "^## $extver" "$here/CHANGELOG.md" || { echo "CHANGELOG.md has no section for $extver"; fail=1; }
[ "$fail" = 0 ] || die "package check failed: $deb"

mkdir -p "$out"
rm -f "$out/$pkg"_*.deb
cp "$deb" "$out/"
echo "package.sh: $(wc -l <"$tmp/actual") files (+ docs), Depends: $depends"
echo "package ok: $out/$(basename "$deb") ($((SECONDS - start))s)"
