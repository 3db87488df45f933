#!/usr/bin/env bash
# phsync demo: install everything, start a throwaway PostgreSQL with phsync
# preloaded and the bundled fake PostHog (HTTPS, with a CA made here, and a
# few thousand sample events), run a sync and show what arrived.
#
# Run as root on Debian 12.  PHSYNC_DEMO_KEEP=1 leaves both servers running
# and prints how to connect.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "run test/demo.sh as root (it installs packages)" >&2; exit 1; }
# PG_CONFIG: the PostgreSQL to use (as for run-all.sh; default Debian's 15)
"$here/test/install-deps.sh"
export PATH="$("${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}" --bindir):$PATH"

demo=$(mktemp -d /tmp/phsync-demo.XXXXXX)
chown postgres:postgres "$demo"
as_pg() { runuser -u postgres -- "$@"; }
port=54329
fake_pid=
cleanup() {
	if [ "${PHSYNC_DEMO_KEEP:-0}" != 1 ]; then
		as_pg pg_ctl -D "$demo/data" -m fast stop >/dev/null 2>&1 || true
		[ -n "$fake_pid" ] && kill "$fake_pid" 2>/dev/null || true
		# a data directory and a CA's private key: nothing stays behind
		rm -rf "$demo"
	fi
}
trap cleanup EXIT

echo "== making a test CA and a certificate for 127.0.0.1"
cd "$demo"
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj "/CN=phsync demo CA" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=127.0.0.1" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\n' > ext.cnf
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 2 -extfile ext.cnf 2>/dev/null
chmod 644 ca.crt server.crt server.key

echo "== starting the fake PostHog with 5000 sample events"
python3 "$here/test/fake_posthog.py" --cert server.crt --key server.key \
	--api-key phx_demo_key --project-id 12345 --demo-events 5000 \
	--ready-file "$demo/fake.json" > "$demo/fake.log" 2>&1 &
fake_pid=$!
for _ in $(seq 100); do [ -e "$demo/fake.json" ] && break; sleep 0.1; done
api_port=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['api_port'])" "$demo/fake.json")

echo "== starting PostgreSQL with phsync preloaded (port $port)"
as_pg initdb -D "$demo/data" -A trust >/dev/null
cat >> "$demo/data/postgresql.conf" <<CONF
port = $port
unix_socket_directories = '$demo'
listen_addresses = ''
shared_preload_libraries = 'phsync'
phsync.database = 'analytics'
phsync.host = 'https://127.0.0.1:$api_port'
phsync.project_id = '12345'
phsync.api_key = 'phx_demo_key'
phsync.ca_file = '$demo/ca.crt'
CONF
as_pg pg_ctl -D "$demo/data" -l "$demo/postgres.log" -w start >/dev/null
psql_() { as_pg psql -X -h "$demo" -p $port "$@"; }
psql_ -d postgres -qc "CREATE DATABASE analytics"
psql_ -d analytics -qc "CREATE EXTENSION phsync"

echo "== SELECT * FROM phsync_run_now();"
psql_ -d analytics -x -c "SELECT * FROM phsync_run_now()"
echo "== a few of the rows that arrived"
psql_ -d analytics -c "SELECT uuid, event, created_at, distinct_id, properties->>'\$browser' AS browser
                        FROM posthog_events ORDER BY created_at DESC LIMIT 5"
psql_ -d analytics -c "SELECT event, count(*) FROM posthog_events GROUP BY event ORDER BY 2 DESC"
echo "== a second run finds nothing new"
psql_ -d analytics -c "SELECT id, trigger, status, pages, rows_received, rows_inserted FROM phsync_run_now()"

if [ "${PHSYNC_DEMO_KEEP:-0}" = 1 ]; then
	echo "Left running. Connect with: runuser -u postgres -- psql -h $demo -p $port analytics"
fi
