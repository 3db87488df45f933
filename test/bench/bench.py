#!/usr/bin/env python3
"""phsync benchmark driver (see bench.sh).

One PostgreSQL, one fake PostHog over HTTPS on loopback, N synthetic events
(realistic: 0.5-2 KB nested properties with unicode and escapes).  Into
identical empty tables (same primary key and cursor index):

  1. phsync: phsync_run_now() from an empty table (HTTP, parse, insert);
  2. COPY of the same rows from a local file (the physical limit);
  3. the naive way: one prepared INSERT ... ON CONFLICT DO NOTHING per row,
     one transaction per page, from a Python client reading the same API.

The fake server pre-renders its rows and reports the time it spent
answering; "own" times subtract it, so the figures are phsync's.  Peak
memory is the worker's anonymous resident memory (RssAnon: its own heap,
not shared buffers), sampled every 10 ms.  At the end the phsync table must
equal the COPY table row for row.
"""
import argparse
import json
import os
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

import psycopg2

PORT = 54391


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw).stdout


class Fake:
    def __init__(self, work, fake_py):
        ready = os.path.join(work, "fake.json")
        self.proc = subprocess.Popen(
            [sys.executable, fake_py, "--cert", f"{work}/server.crt", "--key", f"{work}/server.key",
             "--api-key", "phx_bench", "--project-id", "1", "--ready-file", ready],
            stdout=open(f"{work}/fake.log", "w"), stderr=subprocess.STDOUT)
        for _ in range(300):
            if os.path.exists(ready):
                break
            time.sleep(0.05)
        info = json.load(open(ready))
        self.api = f"https://127.0.0.1:{info['api_port']}"
        self.control = f"http://127.0.0.1:{info['control_port']}"
        self.ctx = ssl.create_default_context(cafile=f"{work}/ca.crt")

    def post(self, path, data):
        req = urllib.request.Request(self.control + path, json.dumps(data).encode(),
                                     {"Content-Type": "application/json"})
        return json.load(urllib.request.urlopen(req, timeout=3600))

    def get(self, path):
        return json.load(urllib.request.urlopen(self.control + path, timeout=60))

    def busy(self):
        return self.get("/stats")["busy_seconds"]

    def query(self, body):
        req = urllib.request.Request(self.api + "/api/projects/1/query/", json.dumps(body).encode(),
                                     {"Content-Type": "application/json",
                                      "Authorization": "Bearer phx_bench"})
        return json.load(urllib.request.urlopen(req, context=self.ctx, timeout=600))


def rss_anon(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Sampler(threading.Thread):
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, False

    def run(self):
        while not self.stop:
            self.peak = max(self.peak, rss_anon(self.pid))
            time.sleep(0.01)


def worker_pid(cur):
    cur.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'phsync worker'")
    return cur.fetchone()[0]


def timed_run(cur, fake, sample=True):
    """phsync_run_now(): (wall s, server s, run row, peak RssAnon, idle RssAnon)."""
    pid = worker_pid(cur)
    idle = rss_anon(pid)
    sampler = Sampler(pid)
    if sample:
        sampler.start()
    fake.post("/stats/reset", {})
    t0 = time.perf_counter()
    cur.execute("SELECT status, pages, rows_received, rows_inserted, error FROM phsync_run_now()")
    row = cur.fetchone()
    wall = time.perf_counter() - t0
    sampler.stop = True
    if sample:
        sampler.join()
    if row[0] != "succeeded":
        sys.exit(f"phsync run failed: {row}")
    return wall, fake.busy(), row, sampler.peak, idle


BUILTIN = ("SELECT uuid, event, timestamp, distinct_id, person_id, properties, elements_chain, created_at\n"
           "FROM events\nWHERE created_at >= toDateTime({since}) AND created_at < toDateTime({until})\n"
           "  AND timestamp >= toDateTime({timestamp_since})")


def naive(fake, conn, rows_wanted, page_size):
    """What home-made scripts do: page through the API, INSERT row by row."""
    cur = conn.cursor()
    cur.execute("PREPARE ins(uuid, text, timestamptz, text, uuid, jsonb, text, timestamptz) AS "
                "INSERT INTO naive_events VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING")
    conn.commit()
    fake.post("/stats/reset", {})
    after = None
    done = 0
    t0 = time.perf_counter()
    while done < rows_wanted:
        q = BUILTIN
        values = {"since": "2020-01-01T00:00:00Z", "until": "2100-01-01T00:00:00Z",
                  "timestamp_since": "2019-12-25T00:00:00Z"}
        if after:
            q += "\n  AND ((created_at > toDateTime({after_0})) OR (created_at = toDateTime({after_0}) AND uuid > toUUID({after_1})))"
            values["after_0"], values["after_1"] = after
        q += "\nORDER BY created_at, uuid\nLIMIT %d" % min(page_size, rows_wanted - done)
        res = fake.query({"query": {"kind": "HogQLQuery", "query": q, "values": values},
                          "refresh": "force_blocking", "name": "naive"})
        rows = res["results"]
        if not rows:
            break
        for r in rows:
            cur.execute("EXECUTE ins(%s, %s, %s, %s, %s, %s, %s, %s)", r)
        conn.commit()
        done += len(rows)
        after = (rows[-1][7], rows[-1][0])
    wall = time.perf_counter() - t0
    return done, wall, fake.busy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--fake", required=True)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--naive-rows", type=int, default=0, help="default: min(rows, 100000)")
    ap.add_argument("--page-size", type=int, default=10000)
    ap.add_argument("--no-4n", action="store_true", help="skip the 4N runs")
    args = ap.parse_args()
    n = args.rows
    naive_rows = args.naive_rows or min(n, 100_000)
    work = args.work

    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{work}/ca.key",
       "-out", f"{work}/ca.crt", "-days", "2", "-subj", "/CN=phsync bench CA")
    sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{work}/server.key",
       "-out", f"{work}/server.csr", "-subj", "/CN=127.0.0.1")
    open(f"{work}/ext.cnf", "w").write("subjectAltName=IP:127.0.0.1\n")
    sh("openssl", "x509", "-req", "-in", f"{work}/server.csr", "-CA", f"{work}/ca.crt", "-CAkey",
       f"{work}/ca.key", "-CAcreateserial", "-out", f"{work}/server.crt", "-days", "2",
       "-extfile", f"{work}/ext.cnf")

    print(f"== rendering {n} synthetic events", flush=True)
    fake = Fake(work, args.fake)
    t0 = time.perf_counter()
    syn = fake.post("/synthetic", {"count": n, "seed": 1})
    print(f"   {time.perf_counter() - t0:.1f} s", flush=True)

    data = f"{work}/data"
    sh("initdb", "-D", data, "-A", "trust")
    with open(f"{data}/postgresql.conf", "a") as f:
        f.write(f"""
port = {PORT}
unix_socket_directories = '{work}'
listen_addresses = ''
shared_buffers = 1GB
max_wal_size = 8GB
checkpoint_timeout = 30min
shared_preload_libraries = 'phsync'
phsync.host = '{fake.api}'
phsync.project_id = '1'
phsync.api_key = 'phx_bench'
phsync.ca_file = '{work}/ca.crt'
phsync.page_size = {args.page_size}
phsync.initial_since = '2020-01-01'
phsync.max_requests_per_minute = 0
phsync.run_at = '00:00'
phsync.interval = '3650d'
""")
    sh("pg_ctl", "-D", data, "-l", f"{work}/postgres.log", "-w", "start")
    try:
        conn = psycopg2.connect(host=work, port=PORT, dbname="postgres")
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute("CREATE EXTENSION phsync")
        for _ in range(100):
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'phsync worker' "
                        "AND query LIKE 'idle until%'")
            if cur.fetchone()[0]:
                break
            time.sleep(0.1)

        print("== phsync_run_now() from an empty table", flush=True)
        wall, server, row, peak, idle = timed_run(cur, fake)
        own = wall - server
        cur.execute("SELECT pg_total_relation_size('posthog_events')")
        print(f"   {row[1]} pages, {row[2]} rows, wall {wall:.1f} s, server {server:.1f} s, phsync {own:.1f} s", flush=True)

        cur.execute("CREATE TABLE copy_events (LIKE posthog_events INCLUDING ALL)")
        cur.execute("CREATE TABLE naive_events (LIKE posthog_events INCLUDING ALL)")
        copy_file = f"{work}/events.copy"
        fake.post("/export_copy", {"path": copy_file})
        payload = os.path.getsize(copy_file)
        cur.execute("CHECKPOINT")
        print("== COPY of the same rows", flush=True)
        t0 = time.perf_counter()
        cur.execute(f"COPY copy_events FROM '{copy_file}'")
        copy_s = time.perf_counter() - t0
        print(f"   {copy_s:.1f} s", flush=True)

        print(f"== naive per-row INSERT ({naive_rows} rows)", flush=True)
        nconn = psycopg2.connect(host=work, port=PORT, dbname="postgres")
        naive_done, naive_wall, naive_server = naive(fake, nconn, naive_rows, args.page_size)
        naive_own = naive_wall - naive_server
        print(f"   wall {naive_wall:.1f} s, server {naive_server:.1f} s", flush=True)

        # correctness: phsync's table equals COPY's, row for row
        cur.execute("SELECT count(*) FROM posthog_events")
        got = cur.fetchone()[0]
        cur.execute("SELECT (SELECT count(*) FROM (SELECT * FROM posthog_events EXCEPT ALL SELECT * FROM copy_events) a)"
                    " + (SELECT count(*) FROM (SELECT * FROM copy_events EXCEPT ALL SELECT * FROM posthog_events) b)")
        diff = cur.fetchone()[0]

        # a run with nothing new (lookback 0: only the last row is re-read)
        cur.execute("ALTER SYSTEM SET phsync.lookback = 0")
        cur.execute("SELECT pg_reload_conf()")
        time.sleep(0.5)
        nn_wall, nn_server, nn_row, _, _ = timed_run(cur, fake, sample=False)

        res4 = None
        if not args.no_4n:
            print(f"== 4N: rendering {4 * n} events, then phsync from an empty table", flush=True)
            cur.execute("ALTER SYSTEM RESET phsync.lookback")
            cur.execute("SELECT pg_reload_conf()")
            cur.execute("DROP TABLE posthog_events, copy_events, naive_events")
            fake.post("/synthetic", {"count": 4 * n, "seed": 2})
            w4, s4, r4, p4, i4 = timed_run(cur, fake)
            print(f"   {r4[2]} rows, wall {w4:.1f} s, server {s4:.1f} s, phsync {w4 - s4:.1f} s", flush=True)
            cur.execute("SELECT count(*) FROM posthog_events")
            got4 = cur.fetchone()[0]
            cur.execute("ALTER SYSTEM SET phsync.lookback = 0")
            cur.execute("SELECT pg_reload_conf()")
            time.sleep(0.5)
            nn4_wall, nn4_server, _, _, _ = timed_run(cur, fake, sample=False)
            res4 = (w4, s4, r4, p4, i4, got4, nn4_wall, nn4_server)

        mb = payload / 1e6
        print()
        print(f"phsync benchmark: N = {n} events, {mb:.0f} MB as COPY text ({payload / n:.0f} B/row), "
              f"page_size {args.page_size}, {os.cpu_count()} cores")
        print(f"{'method':<34}{'rows':>9}{'seconds':>9}{'rows/s':>10}{'MB/s':>8}{'vs COPY':>9}")
        copy_rate = n / copy_s
        for name, rows, secs in [("phsync, own work (server excluded)", n, own),
                                 ("phsync, wall clock", n, wall),
                                 ("COPY from a local file", n, copy_s),
                                 ("naive per-row INSERT, own work", naive_done, naive_own)]:
            rate = rows / secs
            print(f"{name:<34}{rows:>9}{secs:>9.2f}{rate:>10.0f}{rate * payload / n / 1e6:>8.1f}{rate / copy_rate:>9.2f}")
        print()
        print(f"worker memory (RssAnon): idle {idle / 2**20:.1f} MB, peak at N {peak / 2**20:.1f} MB "
              f"(+{(peak - idle) / 2**20:.1f} MB)", end="")
        if res4:
            print(f", peak at 4N {res4[3] / 2**20:.1f} MB (+{(res4[3] - res4[4]) / 2**20:.1f} MB), "
                  f"4N/N {res4[3] / peak:.2f}")
        else:
            print()
        print(f"run with nothing new at N: wall {nn_wall * 1000:.0f} ms, server {nn_server * 1000:.0f} ms, "
              f"phsync {1000 * (nn_wall - nn_server):.0f} ms ({nn_row[2]} row re-read)")
        if res4:
            print(f"run with nothing new at 4N: wall {res4[6] * 1000:.0f} ms, server {res4[7] * 1000:.0f} ms, "
                  f"phsync {1000 * (res4[6] - res4[7]):.0f} ms")
        ok = got == n and diff == 0 and (res4 is None or res4[5] == 4 * n)
        print(f"check: phsync table has {got} rows, {diff} differ from COPY's"
              + (f"; 4N table has {res4[5]} rows" if res4 else "") + (": OK" if ok else ": MISMATCH"))
        if not ok:
            sys.exit(1)
    finally:
        sh("pg_ctl", "-D", data, "-m", "fast", "stop")
        fake.proc.kill()


if __name__ == "__main__":
    main()
