#!/usr/bin/env bash
# Install what phsync needs to build and test on Debian 12, then build and
# install phsync itself.  Run as root.  Idempotent: quick when all is there.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

. "$here/test/apt-ensure.sh"
apt_ensure build-essential postgresql-15 postgresql-server-dev-15 \
	libcurl4-openssl-dev libjson-c-dev pkg-config libipc-run-perl python3 openssl ca-certificates

# PHSYNC_PG_BIN: another PostgreSQL 15 tree (a relocated copy), for side-by-side work
pgbin=${PHSYNC_PG_BIN:-/usr/lib/postgresql/15/bin}
export PATH="$pgbin:$PATH"
# PHSYNC_ASSERTS=1 (the test command sets it) turns Assert() checks on
make -C "$here" -s PG_CONFIG="$pgbin/pg_config" ${PHSYNC_ASSERTS:+PHSYNC_ASSERTS=1}
make -C "$here" -s PG_CONFIG="$pgbin/pg_config" ${PHSYNC_ASSERTS:+PHSYNC_ASSERTS=1} install
