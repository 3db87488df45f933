#!/usr/bin/env bash
# Run TAP tests with every PostgreSQL server process under valgrind memcheck
# (the worker included), then summarise the reports (TESTDATADIR: 16 and
# later put temporary data there, not under TESTDIR).  As root, after
# ./test/run-all.sh has installed everything.  Slow: pick a few tests.
#
#   ./test/valgrind.sh test/t/013_syncs.pl test/t/014_backfill_verify.pl
#
# A wrapper "postgres" runs the real one under valgrind; pg_ctl is copied
# next to it (pg_ctl starts the postgres found beside itself), the other
# programs are linked.  prove runs directly, because PGXS's installcheck puts
# the real bin directory first in PATH.  Reports go to $vg/logs, one file
# per process.  PostgreSQL's own known-benign reports (uninitialised padding
# written by XLogFlush and by the relcache init file) are counted apart.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
# PG_CONFIG: the PostgreSQL to run (as for run-all.sh; default Debian's 15)
bin=$("${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}" --bindir)
pgxs_src=$(dirname "$(dirname "$("$bin/pg_config" --pgxs)")")
[ $# -gt 0 ] || { echo "usage: $0 test/t/NNN_name.pl ..." >&2; exit 2; }
. "$here/test/apt-ensure.sh"
apt_ensure valgrind

vg=$(mktemp -d /tmp/phsync-valgrind.XXXXXX)
mkdir -p "$vg/bin" "$vg/logs" "$vg/tree"
chmod 777 "$vg/logs"
for f in "$bin"/*; do
	b=$(basename "$f")
	case $b in
		postgres) ;;
		pg_ctl) cp "$f" "$vg/bin/" ;;
		*) ln -s "$f" "$vg/bin/$b" ;;
	esac
done
cat > "$vg/bin/postgres" <<WRAP
#!/bin/sh
case "\$1" in -V|--version) exec $bin/postgres "\$@";; esac
exec valgrind --quiet --num-callers=30 --log-file=$vg/logs/%p.log $bin/postgres "\$@"
WRAP
chmod 755 "$vg/bin/postgres"
chmod -R a+rX "$vg"

tar -C "$here" --exclude=.git --exclude=tmp_check --exclude=tmp_check_regress -cf - . | tar -C "$vg/tree" -xf -
mkdir -p "$vg/tree/tmp_check"
chown -R postgres:postgres "$vg/tree"
status=0
(cd "$vg/tree" && runuser -u postgres -- env TESTDIR="$vg/tree" TESTDATADIR="$vg/tree/tmp_check" TESTLOGDIR="$vg/tree/tmp_check/log" PATH="$vg/bin:$bin:$PATH" \
	PGPORT=65432 PG_TEST_TIMEOUT_DEFAULT=600 \
	PG_REGRESS="$pgxs_src/test/regress/pg_regress" \
	prove -I "$pgxs_src/test/perl/" -I ./ "$@") || status=$?

cd "$vg/logs"
logs=$(find . -name '*.log' | wc -l)
reports=$(cat ./*.log 2>/dev/null | grep -c '^==[0-9]*== [A-Z]' || true)
# a report is benign when one of its frames is PostgreSQL's WAL or relcache-init write
benign=$(cat ./*.log 2>/dev/null | awk '
	/^==[0-9]*== [A-Z]/ { if (inrep && ok) n++; inrep = ($0 ~ /Syscall param/); ok = 0; next }
	inrep && /XLogFlush|RelationCacheInitializePhase3|write_relcache_init_file/ { ok = 1 }
	END { if (inrep && ok) n++; print n + 0 }')
echo "valgrind: $logs process logs, $reports reports ($benign in PostgreSQL's known-benign WAL/relcache writes), logs in $vg/logs"
grep -l 'phsync\|json_\|curl_' ./*.log 2>/dev/null | while read -r f; do
	if grep -q 'Invalid \|Conditional jump\|Use of uninitialised' "$f"; then
		echo "valgrind: phsync, libcurl or json-c in a report: $vg/logs/$f"; status=1
	fi
done
exit $status
