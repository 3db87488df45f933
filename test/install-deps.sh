#!/usr/bin/env bash
# Install what phsync needs to build and test on Debian 12, then build and
# install phsync itself.  Run as root.  Idempotent: quick when all is there.
#
# PG_CONFIG: the PostgreSQL to build against and install into (any major
# phsync supports: 15 to 18).  Unset, Debian's own PostgreSQL 15 is
# installed with apt and used.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

. "$here/test/apt-ensure.sh"
packages=(build-essential libcurl4-openssl-dev libjson-c-dev libisal-dev pkg-config
	libipc-run-perl python3 openssl ca-certificates)
if [ -z "${PG_CONFIG:-}" ]; then
	packages+=(postgresql-15 postgresql-server-dev-15)
	PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
fi
apt_ensure "${packages[@]}"
[ -x "$PG_CONFIG" ] || { echo "install-deps.sh: PG_CONFIG=$PG_CONFIG is not an executable pg_config" >&2; exit 1; }

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

# PHSYNC_ASSERTS=1 (the test command sets it) turns Assert() checks on;
# PHSYNC_WERROR=1 makes warnings errors (the project's own builds)
flags=(PG_CONFIG="$PG_CONFIG" ${PHSYNC_ASSERTS:+PHSYNC_ASSERTS=1} ${PHSYNC_WERROR:+PHSYNC_WERROR=1})
make -C "$here" -s "${flags[@]}"
make -C "$here" -s "${flags[@]}" install
# the released versions' scripts, for test/t/027_versions.pl
make -C "$here" -s "${flags[@]}" install-test-versions
