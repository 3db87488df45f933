#!/usr/bin/env bash
# Install what phsync needs to build and test on Debian 12, then build and
# install phsync itself.  Run as root.  Idempotent: quick when all is there.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

pkgs=(build-essential postgresql-15 postgresql-server-dev-15
      libcurl4-openssl-dev libjson-c-dev libipc-run-perl python3 openssl
      ca-certificates)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "phsync: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

export PATH="/usr/lib/postgresql/15/bin:$PATH"
make -C "$here" -s PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
make -C "$here" -s PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config install
