#!/usr/bin/env bash
# phsync benchmark: phsync against PostgreSQL's COPY and a naive per-row
# insert, on the same synthetic PostHog events, on this machine.
#
#   ./test/bench/bench.sh                  # N = 1,000,000 (and 4N)
#   ./test/bench/bench.sh --rows 200000    # a quicker look
#   ... --repeat 5      # the run at N and COPY as 5 pairs (default 3), median reported
#   PHSYNC_BENCH_KEEP=1 ./test/bench/bench.sh ...   # keep the work directory
#
# Run as root on Debian 12 (installs what it needs).  Not part of the tests.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
# PG_CONFIG: the PostgreSQL to measure (as for run-all.sh; default Debian's 15)
"$here/test/install-deps.sh"
pgbin=$("${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}" --bindir)
dpkg-query -W -f='${Status}' python3-psycopg2 2>/dev/null | grep -q "install ok installed" || \
	{ apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-psycopg2 >/dev/null; }
work=$(mktemp -d /tmp/phsync-bench.XXXXXX)
chown postgres:postgres "$work"
# a million events leave gigabytes of cluster and COPY file: kept only on request
[ -n "${PHSYNC_BENCH_KEEP:-}" ] || trap 'rm -rf "$work"' EXIT
runuser -u postgres -- env PATH="$pgbin:$PATH" \
	python3 "$here/test/bench/bench.py" --work "$work" --fake "$here/test/fake_posthog.py" "$@"
