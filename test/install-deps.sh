#!/usr/bin/env bash
# Install what phsync needs to build and test on Debian 12, then build and
# install phsync itself.  Run as root.  Idempotent: quick when all is there.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

. "$here/test/apt-ensure.sh"
apt_ensure build-essential postgresql-15 postgresql-server-dev-15 \
	libcurl4-openssl-dev libjson-c-dev libisal-dev pkg-config libipc-run-perl python3 openssl ca-certificates

# The fake PostHog parses HogQL with PostHog's own parser (npm
# @posthog/hogql-parser, pinned in test/hogql/package-lock.json): node and npm.
if ! command -v node >/dev/null 2>&1; then
	apt_ensure nodejs npm
fi
if [ ! -f "$here/test/hogql/node_modules/.package-lock.json" ] ||
	! cmp -s "$here/test/hogql/package-lock.json" "$here/test/hogql/.installed-lock" 2>/dev/null; then
	npm ci --prefix "$here/test/hogql" --no-audit --no-fund --loglevel=error
	cp "$here/test/hogql/package-lock.json" "$here/test/hogql/.installed-lock"
fi

# PHSYNC_PG_BIN: another PostgreSQL 15 tree (a relocated copy), for side-by-side work
pgbin=${PHSYNC_PG_BIN:-/usr/lib/postgresql/15/bin}
export PATH="$pgbin:$PATH"
# PHSYNC_ASSERTS=1 (the test command sets it) turns Assert() checks on
make -C "$here" -s PG_CONFIG="$pgbin/pg_config" ${PHSYNC_ASSERTS:+PHSYNC_ASSERTS=1}
make -C "$here" -s PG_CONFIG="$pgbin/pg_config" ${PHSYNC_ASSERTS:+PHSYNC_ASSERTS=1} install
