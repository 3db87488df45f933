#!/usr/bin/env bash
# Install everything phsync needs, build it, and run every test:
# pg_regress (SQL surface) and the TAP suite (worker, fake PostHog).
#
# As root (a fresh Debian 12 machine, CI): installs the packages, builds and
# installs phsync, then runs the tests as the "postgres" user in a copy of
# the tree (initdb refuses to run as root).  As another user: expects phsync
# to be installed already and runs the tests in place.
#
# As root, it also builds the Debian package (test/package.sh) and checks
# its file list.
#
# PHSYNC_TAP_TESTS="test/t/001_sync.pl" runs only those TAP tests (and no
# pg_regress, no package), for quick iterations.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
# PHSYNC_PG_BIN: another PostgreSQL 15 tree (a relocated copy), for side-by-side work
pgbin=${PHSYNC_PG_BIN:-/usr/lib/postgresql/15/bin}
export PATH="$pgbin:$PATH"
tests=${PHSYNC_TAP_TESTS:-test/t/*.pl}
only=()
[ -n "${PHSYNC_TAP_TESTS:-}" ] && only=(REGRESS=)

# the tests run against a build with Assert() checks on
export PHSYNC_ASSERTS=${PHSYNC_ASSERTS-1}

if [ "$(id -u)" = 0 ]; then
	"$here/test/install-deps.sh"
	work=$(mktemp -d /tmp/phsync-test.XXXXXX)
	tar -C "$here" --exclude=.git --exclude=tmp_check --exclude=tmp_check_regress \
		--exclude=results -cf - . | tar -C "$work" -xf -
	chown -R postgres:postgres "$work"
	echo "phsync: running the tests as postgres in $work"
	status=0
	runuser -u postgres -- env PATH="$PATH" make -C "$work" -s installcheck \
		PG_CONFIG="$pgbin/pg_config" PROVE_TESTS="$tests" "${only[@]}" || status=$?
else
	work=$here
	status=0
	make -C "$work" -s installcheck PG_CONFIG="$pgbin/pg_config" \
		PROVE_TESTS="$tests" "${only[@]}" || status=$?
fi

# every call between files goes downward (see phsync.h)
if [ $status -eq 0 ]; then
	"$here/test/layers.sh" "$here" || status=$?
fi

if [ $status -ne 0 ]; then
	[ -f "$work/regression.diffs" ] && cat "$work/regression.diffs"
	for f in "$work"/tmp_check/log/regress_log_*; do
		[ -f "$f" ] || continue
		if grep -q "^not ok" "$f"; then
			echo "===== $f (tail)"; tail -n 60 "$f"
		fi
	done
	echo "phsync: tests FAILED (logs in $work/tmp_check/log)"
	exit $status
fi
if [ "$(id -u)" = 0 ] && [ -z "${PHSYNC_TAP_TESTS:-}" ]; then
	"$here/test/package.sh"
fi
# the copy the tests ran in (a cluster per test) is kept only when they fail
[ "$work" != "$here" ] && rm -rf "$work"
echo "phsync: all tests passed"
