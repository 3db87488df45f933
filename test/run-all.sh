#!/usr/bin/env bash
# Install everything phsync needs, build it, and run every test:
# pg_regress (SQL surface) and the TAP suite (worker, fake PostHog).
#
#   ./test/run-all.sh                                          Debian's PostgreSQL 15
#   PG_CONFIG=/opt/postgresql/17/bin/pg_config ./test/run-all.sh   any other one
#
# PG_CONFIG names the PostgreSQL to test against (15, 16, 17 or 18, built
# with TAP support: its Perl test modules and pg_regress); unset, Debian's
# own PostgreSQL 15 is installed with apt and used.
#
# As root (a fresh Debian 12 machine, CI): installs the packages, builds and
# installs phsync into that PostgreSQL, then runs the tests as the
# "postgres" user in a copy of the tree (initdb refuses to run as root).
# As another user: expects phsync to be installed already and runs the
# tests in place.  As root with Debian's 15, it also builds the Debian
# package (test/package.sh) and checks its file list.
#
# PHSYNC_TAP_TESTS="test/t/001_sync.pl" runs only those TAP tests (and no
# pg_regress, no package), for quick iterations.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
debian_pg_config=/usr/lib/postgresql/15/bin/pg_config
pg_config=${PG_CONFIG:-$debian_pg_config}
tests=${PHSYNC_TAP_TESTS:-test/t/*.pl}
only=()
[ -n "${PHSYNC_TAP_TESTS:-}" ] && only=(REGRESS=)

# the project's own builds: Assert() checks on, warnings are errors
export PHSYNC_ASSERTS=${PHSYNC_ASSERTS-1}
export PHSYNC_WERROR=${PHSYNC_WERROR-1}

if [ "$(id -u)" = 0 ]; then
	PG_CONFIG=${PG_CONFIG:-} "$here/test/install-deps.sh"
fi
pgbin=$("$pg_config" --bindir)
major=$("$pg_config" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')
export PATH="$pgbin:$PATH"
echo "phsync: testing against $("$pg_config" --version) ($pg_config)"

if [ "$(id -u)" = 0 ]; then
	id postgres >/dev/null 2>&1 ||
		useradd --system --create-home --home-dir /var/lib/postgresql --shell /bin/bash postgres
	work=$(mktemp -d /tmp/phsync-test.XXXXXX)
	tar -C "$here" --exclude=.git --exclude=tmp_check --exclude=tmp_check_regress \
		--exclude=results -cf - . | tar -C "$work" -xf -
	chown -R postgres:postgres "$work"
	echo "phsync: running the tests as postgres in $work"
	status=0
	runuser -u postgres -- env PATH="$PATH" make -C "$work" -s installcheck \
		PG_CONFIG="$pg_config" PROVE_TESTS="$tests" "${only[@]}" || status=$?
else
	work=$here
	status=0
	make -C "$work" -s installcheck PG_CONFIG="$pg_config" \
		PROVE_TESTS="$tests" "${only[@]}" || status=$?
fi

# every call between files goes downward (see phsync.h)
if [ $status -eq 0 ]; then
	"$here/test/layers.sh" "$here" || status=$?
fi
# README.md under 300 lines; every link and anchor in README.md and docs/ resolves
if [ $status -eq 0 ]; then
	"$here/test/docs.pl" "$here" || status=$?
fi

if [ $status -ne 0 ]; then
	[ -f "$work/regression.diffs" ] && cat "$work/regression.diffs"
	for f in "$work"/tmp_check/log/regress_log_*; do
		[ -f "$f" ] || continue
		if grep -q "^not ok" "$f"; then
			echo "===== $f (tail)"; tail -n 60 "$f"
		fi
	done
	echo "phsync: tests FAILED on PostgreSQL $major (logs in $work/tmp_check/log)"
	exit $status
fi
if [ "$(id -u)" = 0 ] && [ -z "${PHSYNC_TAP_TESTS:-}" ] && [ "$pg_config" = "$debian_pg_config" ]; then
	"$here/test/package.sh"
	# the newcomer's command: rows arrive, and nothing is left in /tmp
	before=$(ls -d /tmp/phsync-demo.* 2>/dev/null | sort || true)
	demo_out=$("$here/test/demo.sh" 2>&1) || { echo "$demo_out"; echo "phsync: test/demo.sh FAILED"; exit 1; }
	after=$(ls -d /tmp/phsync-demo.* 2>/dev/null | sort || true)
	if ! grep -q '^rows_inserted *| *[1-9]' <<<"$demo_out" || [ "$before" != "$after" ]; then
		echo "$demo_out"; echo "phsync: test/demo.sh loaded no rows or left /tmp/phsync-demo.* behind"; exit 1
	fi
	echo "phsync: test/demo.sh loaded rows and cleaned up"
fi
# the copy the tests ran in (a cluster per test) is kept only when they fail
[ "$work" != "$here" ] && rm -rf "$work"
echo "phsync: all tests passed on PostgreSQL $major"
