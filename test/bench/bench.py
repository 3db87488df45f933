#!/usr/bin/env python3
"""phsync benchmark driver (see bench.sh).

One PostgreSQL, one fake PostHog over HTTPS on loopback that answers like a
real query: 0.4 s + 60 us per row returned, 3 queries of a project at once,
PostHog's throttles (240 a minute, 2,400 an hour).  N synthetic events
(realistic: 0.5-2 KB nested properties with unicode and escapes).  phsync
runs at its default settings.  Into identical empty tables (same primary
key and cursor index):

  1. phsync: phsync_run_now() from an empty table;
  2. COPY of the same rows from a local file (the physical limit);
  3. the naive way: one prepared INSERT ... ON CONFLICT DO NOTHING per row,
     one transaction per page of 10,000, from a Python client reading the
     same API one page after the other.

Reported: wall clock against max(PostHog's busy time, the worker's CPU)
(PostHog's busy time: the union of the intervals in which some request was
being computed, from its arrival to its answer being ready); rows/s; the
speed-up over the naive script; CPU per row against COPY's (COPY's backend
CPU / the worker's CPU, same rows); the worker's peak anonymous memory
(RssAnon: its heap, not shared buffers) over idle at N and 4N; a run with
nothing new; and a simulated one-year backfill (a steady stream: requests,
rows per request, requests per hour, 429s).  The phsync table must equal
the COPY table row for row.
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
CLK_TCK = os.sysconf("SC_CLK_TCK")


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw).stdout


class Fake:
    def __init__(self, work, fake_py, config):
        ready = os.path.join(work, "fake.json")
        cmd = [sys.executable, fake_py, "--cert", f"{work}/server.crt", "--key", f"{work}/server.key",
               "--api-key", "phx_bench", "--project-id", "1", "--ready-file", ready]
        for k, v in config.items():
            cmd += ["--" + k.replace("_", "-"), str(v)]
        self.proc = subprocess.Popen(cmd, stdout=open(f"{work}/fake.log", "w"), stderr=subprocess.STDOUT)
        for _ in range(600):
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
        return json.load(urllib.request.urlopen(self.control + path, timeout=600))

    def query(self, body):
        req = urllib.request.Request(self.api + "/api/projects/1/query/", json.dumps(body).encode(),
                                     {"Content-Type": "application/json",
                                      "Authorization": "Bearer phx_bench"})
        return json.load(urllib.request.urlopen(req, context=self.ctx, timeout=600))

    def reset(self):
        """Forget requests and throttle history (not the data)."""
        self.post("/reset", {})
        self.post("/stats/reset", {})

    def server_busy(self):
        """Seconds in which PostHog was computing some request (union of
        [arrival, answer ready]), the requests, and the 429s."""
        reqs = [r for r in self.get("/requests") if r.get("method") == "POST"]
        spans = sorted((r["start"], r.get("ready") or r["end"]) for r in reqs)
        busy, cur_s, cur_e = 0.0, None, None
        for s, e in spans:
            if cur_e is None or s > cur_e:
                if cur_e is not None:
                    busy += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        if cur_e is not None:
            busy += cur_e - cur_s
        return busy, reqs


def most_in_window(times, seconds):
    """The most of the sorted times that lie in any window of that length."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] < t - seconds:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def proc_cpu(pid):
    """utime + stime of a process, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


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


def profile(pid, path):
    """perf record of a process into path until stopped (None: no profile)."""
    return subprocess.Popen(["perf", "record", "-g", "-q", "-p", str(pid), "-o", path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) if path else None


def stop_profile(prof):
    if prof:
        prof.send_signal(2)
        prof.wait()


class Run:
    """One measured phsync run (phsync_run_now() or a backfill)."""

    def __init__(self, cur, fake, sql, sample=True, perf=None):
        pid = worker_pid(cur)
        prof = profile(pid, perf)
        self.idle = rss_anon(pid)
        sampler = Sampler(pid)
        if sample:
            sampler.start()
        fake.reset()
        cpu0 = proc_cpu(pid)
        fcpu0 = proc_cpu(fake.proc.pid)
        t0 = time.perf_counter()
        called = time.time()
        cur.execute(sql)
        self.row = cur.fetchone()
        self.wall = time.perf_counter() - t0
        self.cpu = proc_cpu(pid) - cpu0
        # the fake's own CPU (rendering, gzip, TLS) shares this machine's
        # cores with the worker; a real PostHog's does not
        self.fake_cpu = proc_cpu(fake.proc.pid) - fcpu0
        stop_profile(prof)
        sampler.stop = True
        if sample:
            sampler.join()
        self.peak = sampler.peak
        self.server, self.requests = fake.server_busy()
        # from the call to the first request's arrival (one machine, one clock)
        self.first_request = min((q["start"] for q in self.requests), default=called) - called
        self.sizes = [q.get("rows") for q in sorted(self.requests, key=lambda q: q["start"])]
        if self.row[0] != "succeeded":
            sys.exit(f"phsync run failed: {self.row}")

    @property
    def overlap(self):
        return self.wall / max(self.server, self.cpu)


BUILTIN = ("SELECT uuid, event, timestamp, distinct_id, person_id, properties, elements_chain, created_at\n"
           "FROM events\nWHERE created_at >= toDateTime({since}) AND created_at < toDateTime({until})\n"
           "  AND timestamp >= toDateTime({timestamp_since})")


def naive(fake, conn, rows_wanted, page_size=10000):
    """What home-made scripts do: page through the API, INSERT row by row."""
    cur = conn.cursor()
    cur.execute("PREPARE ins(uuid, text, timestamptz, text, uuid, jsonb, text, timestamptz) AS "
                "INSERT INTO naive_events VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING")
    conn.commit()
    fake.reset()
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
    return done, time.perf_counter() - t0


def set_conf(cur, **settings):
    for k, v in settings.items():
        if v is None:
            cur.execute(f"ALTER SYSTEM RESET phsync.{k}")
        else:
            cur.execute(f"ALTER SYSTEM SET phsync.{k} = %s", (str(v),))
    cur.execute("SELECT pg_reload_conf()")
    time.sleep(0.5)


def synthetic(fake, count, seed, step_ms):
    """Serve count events ending 5 minutes ago; returns the first created_at."""
    t0 = time.perf_counter()
    syn = fake.post("/synthetic", {"count": count, "seed": seed, "step_ms": step_ms})
    print(f"   rendered {count} events in {time.perf_counter() - t0:.1f} s", flush=True)
    return syn["first"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--fake", required=True)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--naive-rows", type=int, default=0, help="default: min(rows, 100000)")
    ap.add_argument("--no-4n", action="store_true", help="skip the 4N run")
    ap.add_argument("--year-rows", type=int, default=1_000_000,
                    help="events in the simulated one-year backfill (0: skip it)")
    ap.add_argument("--verify-rows", type=int, default=0,
                    help="events over 30 days, copied, then one of them deleted here: verify and repair the "
                    "30 days against reading them (0: skip it)")
    ap.add_argument("--timeline", action="store_true", help="print the requests of the run at N")
    ap.add_argument("--perf", help="record a profile of the worker during the run at N into this file "
                    "(and of COPY's backend into FILE.copy)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="measure the run at N and COPY this many times, in pairs (default 3)")
    ap.add_argument("--no-gzip", action="store_true",
                    help="the fake answers uncompressed (PostHog gzips; this shows phsync's own CPU without inflating)")
    ap.add_argument("--first-window", choices=["default", "hour"], default="default",
                    help="the run's window: phsync's default first window (30 days), or from an hour "
                    "before the data (as 0.3 was measured: no count, a first page of 10,000)")
    ap.add_argument("--latency-base-ms", type=float, default=400)
    ap.add_argument("--latency-per-row-us", type=float, default=60)
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

    # PostHog's defaults (caps, throttles, 3 slots) plus the latency model
    fake = Fake(work, args.fake, {"latency_base_ms": args.latency_base_ms,
                                  "latency_per_row_us": args.latency_per_row_us,
                                  "gzip": "false" if args.no_gzip else "true"})
    print(f"== {n} synthetic events", flush=True)
    first = synthetic(fake, n, 1, 10)

    data = f"{work}/data"
    sh("initdb", "-D", data, "-A", "trust")
    with open(f"{data}/postgresql.conf", "a") as f:
        f.write(f"""
port = {PORT}
unix_socket_directories = '{work}'
listen_addresses = ''
shared_buffers = 512MB
max_wal_size = 8GB
checkpoint_timeout = 30min
wal_init_zero = off
# autovacuum would vacuum and analyze one table while the other is being
# measured, on the same two cores
autovacuum = off
shared_preload_libraries = 'phsync'
phsync.host = '{fake.api}'
phsync.project_id = '1'
phsync.api_key = 'phx_bench'
phsync.ca_file = '{work}/ca.crt'
phsync.run_at = '00:00'
phsync.interval = '3650d'
phsync.verify = off
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
        # touch every shared buffer once, so that neither phsync nor COPY pays
        # for the first use of the memory
        cur.execute("CREATE UNLOGGED TABLE warm AS SELECT repeat('x', 900) AS x FROM generate_series(1, 600000)")
        cur.execute("DROP TABLE warm")
        # the first run reads phsync's default first window (30 days, as a
        # daily run's is over a day): a plan from one count; --first-window
        # hour starts it an hour before the data, as 0.3 was measured
        if args.first_window == "hour":
            cur.execute("SELECT %s::timestamptz - interval '1 hour'", (first,))
            set_conf(cur, initial_since=cur.fetchone()[0].isoformat())

        run_sql = "SELECT status, pages, rows_received, rows_inserted, error FROM phsync_run_now()"
        copy_file = f"{work}/events.copy"
        fake.post("/export_copy", {"path": copy_file})
        payload = os.path.getsize(copy_file)
        cur.execute("SELECT pg_backend_pid()")
        bpid = cur.fetchone()[0]

        # The machine's speed wanders (COPY of the same rows has taken from
        # 6.8 to 10.3 s of CPU within an hour), so the run at N is measured
        # as pairs, phsync then COPY, each from an empty table after a
        # checkpoint; a pair's two measurements are a minute apart, and the
        # report gives every pair and the median.
        pairs = []
        for i in range(args.repeat):
            if i:
                cur.execute("TRUNCATE posthog_events, copy_events")
            cur.execute("CHECKPOINT")
            print(f"== pair {i + 1} of {args.repeat}: phsync_run_now() from an empty table, default settings",
                  flush=True)
            r = Run(cur, fake, run_sql, perf=args.perf if i == 0 else None)
            print(f"   {r.row[1]} pages, {r.row[3]} rows, wall {r.wall:.1f} s, PostHog busy {r.server:.1f} s, "
                  f"worker CPU {r.cpu:.1f} s; first request {r.first_request:.2f} s after the call; "
                  f"{len(r.sizes)} requests, rows of each: {' '.join(str(x) for x in r.sizes)}", flush=True)
            if args.timeline and i == 0:
                t0 = min(q["start"] for q in r.requests)
                for q in sorted(r.requests, key=lambda q: q["start"]):
                    print(f"   {q['start'] - t0:7.2f} {(q.get('ready') or q['end']) - t0:7.2f} {q['end'] - t0:7.2f} "
                          f"{q.get('status')} {q.get('rows')} {q['client_query_id']}")
            if i == 0:
                # phsync's run made its target; COPY's is the same
                cur.execute("CREATE TABLE copy_events (LIKE posthog_events INCLUDING ALL)")
                cur.execute("CREATE TABLE naive_events (LIKE posthog_events INCLUDING ALL)")
            cur.execute("CHECKPOINT")
            print(f"== pair {i + 1} of {args.repeat}: COPY of the same rows", flush=True)
            prof = profile(bpid, args.perf + ".copy" if args.perf and i == 0 else None)
            cpu0 = proc_cpu(bpid)
            t0 = time.perf_counter()
            cur.execute(f"COPY copy_events FROM '{copy_file}'")
            copy_s = time.perf_counter() - t0
            copy_cpu = proc_cpu(bpid) - cpu0
            stop_profile(prof)
            print(f"   {copy_s:.1f} s, backend CPU {copy_cpu:.1f} s; CPU per row, COPY / phsync: "
                  f"{copy_cpu / r.cpu:.2f}", flush=True)
            pairs.append((r, copy_s, copy_cpu))
        # the pair with the median CPU ratio stands for the run at N
        by_ratio = sorted(pairs, key=lambda p: p[2] / p[0].cpu)
        r1, copy_s, copy_cpu = by_ratio[len(by_ratio) // 2]
        walls = sorted(p[0].overlap for p in pairs)
        peak = max(pairs, key=lambda p: p[0].peak - p[0].idle)[0]

        print(f"== naive per-row INSERT ({naive_rows} rows)", flush=True)
        nconn = psycopg2.connect(host=work, port=PORT, dbname="postgres")
        naive_done, naive_wall = naive(fake, nconn, naive_rows)
        print(f"   wall {naive_wall:.1f} s", flush=True)

        # correctness: phsync's table equals COPY's, row for row
        cur.execute("SELECT count(*) FROM posthog_events")
        got = cur.fetchone()[0]
        cur.execute("SELECT (SELECT count(*) FROM (SELECT * FROM posthog_events EXCEPT ALL SELECT * FROM copy_events) a)"
                    " + (SELECT count(*) FROM (SELECT * FROM copy_events EXCEPT ALL SELECT * FROM posthog_events) b)")
        diff = cur.fetchone()[0]

        # a run with nothing new (lookback 0: only the last row is re-read)
        set_conf(cur, lookback=0)
        nn = Run(cur, fake, run_sql, sample=False)
        set_conf(cur, lookback=None)

        r4 = None
        got4 = None
        if not args.no_4n:
            print(f"== 4N: {4 * n} events, phsync from an empty table", flush=True)
            cur.execute("DROP TABLE posthog_events, copy_events, naive_events")
            first4 = synthetic(fake, 4 * n, 2, 10)
            if args.first_window == "hour":
                cur.execute("SELECT %s::timestamptz - interval '1 hour'", (first4,))
                set_conf(cur, initial_since=cur.fetchone()[0].isoformat())
            r4 = Run(cur, fake, run_sql)
            print(f"   {r4.row[3]} rows, wall {r4.wall:.1f} s, PostHog busy {r4.server:.1f} s, "
                  f"worker CPU {r4.cpu:.1f} s", flush=True)
            cur.execute("SELECT count(*) FROM posthog_events")
            got4 = cur.fetchone()[0]

        year = None
        if args.year_rows:
            m = args.year_rows
            print(f"== one-year backfill: {m} events, one every {365 * 86400 / m:.0f} s", flush=True)
            cur.execute("DROP TABLE IF EXISTS posthog_events, copy_events, naive_events")
            step_ms = 365 * 86400 * 1000 // m
            yfirst = synthetic(fake, m, 3, step_ms)
            set_conf(cur, initial_since=None)
            cur.execute("SELECT phsync_create_table('events', 'public.posthog_events')")
            cur.execute("SELECT %s::timestamptz, %s::timestamptz + interval '366 days'", (yfirst, yfirst))
            y_from, y_to = cur.fetchone()
            # a backfill is queued: time it until it ends
            pid = worker_pid(cur)
            fake.reset()
            cpu0 = proc_cpu(pid)
            t0 = time.perf_counter()
            cur.execute("SELECT id FROM phsync_backfill('default', %s, %s)", (y_from, y_to))
            bid = cur.fetchone()[0]
            while True:
                cur.execute("SELECT status, rows_inserted, requests FROM phsync.runs WHERE id = %s", (bid,))
                st, yrows, yreq = cur.fetchone()
                if st not in ("queued", "running"):
                    break
                time.sleep(0.2)
            ywall = time.perf_counter() - t0
            ycpu = proc_cpu(pid) - cpu0
            ybusy, yreqs = fake.server_busy()
            if st != "succeeded":
                sys.exit(f"one-year backfill {st}")
            throttled = [r for r in yreqs if r.get("status") == 429]
            ok_reqs = [r for r in yreqs if r.get("status") == 200]
            starts = sorted(r["start"] for r in yreqs)
            per_hour = most_in_window(starts, 3600)
            per_minute = most_in_window(starts, 60)
            year = (m, ywall, ycpu, ybusy, len(yreqs), yreq, yrows, len(ok_reqs), len(throttled),
                    per_hour, per_minute)

        verify = None
        if args.verify_rows:
            m = args.verify_rows
            print(f"== verification: {m} events over 30 days, copied, then one deleted here", flush=True)
            cur.execute("DROP TABLE IF EXISTS posthog_events, copy_events, naive_events")
            vfirst = synthetic(fake, m, 4, 30 * 86400 * 1000 // m)
            cur.execute("SELECT phsync_create_table('events', 'public.posthog_events')")
            cur.execute("SELECT date_trunc('day', %s::timestamptz), date_trunc('day', %s::timestamptz) + interval '31 days'",
                        (vfirst, vfirst))
            v_from, v_to = cur.fetchone()

            def timed(sql, params):
                fake.reset()
                t0 = time.perf_counter()
                cur.execute(sql, params)
                rid = cur.fetchone()[0]
                while True:
                    cur.execute("SELECT status, requests, rows_received, rows_inserted FROM phsync.runs WHERE id = %s",
                                (rid,))
                    row = cur.fetchone()
                    if row[0] not in ("queued", "running"):
                        break
                    time.sleep(0.2)
                if row[0] != "succeeded":
                    sys.exit(f"verification benchmark: run {rid} {row[0]}")
                return time.perf_counter() - t0, row[1], row[2], row[3], rid

            read = timed("SELECT id FROM phsync_backfill('default', %s, %s)", (v_from, v_to))
            cur.execute("DELETE FROM posthog_events WHERE uuid = (SELECT uuid FROM posthog_events "
                        "ORDER BY created_at OFFSET %s LIMIT 1) RETURNING created_at", (m // 2,))
            gone_at = cur.fetchone()[0]
            t0 = time.perf_counter()
            fake.reset()
            cur.execute("SELECT count(*) FILTER (WHERE status = 'repaired'), count(*) FILTER (WHERE status <> 'ok') "
                        "FROM phsync_verify('default', %s, %s, repair => true)", (v_from, v_to))
            repaired, differ = cur.fetchone()
            vwall = time.perf_counter() - t0
            cur.execute("SELECT requests, rows_received, rows_inserted FROM phsync.runs ORDER BY id DESC LIMIT 1")
            vreq, vrecv, vins = cur.fetchone()
            cur.execute("SELECT count(*) FROM posthog_events")
            vcount = cur.fetchone()[0]
            verify = (m, read, vwall, vreq, vrecv, vins, repaired, differ, vcount, gone_at)

        mb = payload / 1e6
        print()
        print(f"phsync benchmark: N = {n} events, {mb:.0f} MB as COPY text ({payload / n:.0f} B/row), "
              f"{os.cpu_count()} cores; PostHog model {args.latency_base_ms / 1000:.1f} s + "
              f"{args.latency_per_row_us:.0f} us/row, 3 slots, 240/min and 2,400/h, "
              f"{'uncompressed' if args.no_gzip else 'gzipped'}; phsync defaults, first window: " + ("from an hour before the data" if args.first_window == "hour" else "30 days (the default)"))
        print(f"{'':<38}{'rows':>9}{'wall s':>8}{'rows/s':>9}{'PostHog s':>10}{'CPU s':>7}{'wall/max':>9}")
        runs = [(f"phsync_run_now() at N, pair {i + 1}", p[0]) for i, p in enumerate(pairs)]
        for name, r in runs + ([("phsync_run_now() at 4N", r4)] if r4 else []):
            print(f"{name:<38}{r.row[3]:>9}{r.wall:>8.1f}{r.row[3] / r.wall:>9.0f}{r.server:>10.1f}"
                  f"{r.cpu:>7.1f}{r.overlap:>9.2f}")
        print(f"{'naive per-row script':<38}{naive_done:>9}{naive_wall:>8.1f}{naive_done / naive_wall:>9.0f}")
        for i, (_, cs, cc) in enumerate(pairs):
            name = f"COPY from a local file, pair {i + 1}"
            print(f"{name:<38}{n:>9}{cs:>8.1f}{n / cs:>9.0f}{'':>10}{cc:>7.1f}")
        print()
        med_wall = sorted(p[0].wall for p in pairs)[len(pairs) // 2]
        speedup = (n / med_wall) / (naive_done / naive_wall)
        cpu_ratio = copy_cpu / r1.cpu
        each = ", ".join(f"{w:.2f}" for w in walls)
        print(f"wall / max(PostHog busy, worker CPU): {walls[len(walls) // 2]:.2f} at N"
              + f" (median of {len(walls)}: {each})"
              + (f", {r4.overlap:.2f} at 4N" if r4 else "") + " (target <= 1.3)")
        print(f"the fake's own CPU during the run: {r1.fake_cpu:.1f} s at N"
              + (f", {r4.fake_cpu:.1f} s at 4N" if r4 else "")
              + f"; worker + fake over {os.cpu_count()} cores: {(r1.cpu + r1.fake_cpu) / os.cpu_count():.1f} s at N"
              + (f", {(r4.cpu + r4.fake_cpu) / os.cpu_count():.1f} s at 4N" if r4 else ""))
        print(f"speed-up over the naive script: {speedup:.1f}x (target >= 3 at 100,000, >= 5 at 1,000,000)")
        print(f"requests per run at N: {', '.join(str(len(p[0].sizes)) for p in pairs)} "
              f"(ceil(N / 50,000) = {-(-n // 50000)}); rows of each, pair 1: {' '.join(str(x) for x in pairs[0][0].sizes)}"
              + (f"; at 4N: {len(r4.sizes)} requests" if r4 else ""))
        print(f"from the call to the first request: {', '.join(f'{p[0].first_request:.2f}' for p in pairs)} s")
        ratios = ", ".join(f"{c / r.cpu:.2f}" for r, _, c in pairs)
        print(f"CPU per row, COPY / phsync: {cpu_ratio:.2f} (median of {len(pairs)} pairs: {ratios})"
              " (target >= 1.0)")
        print(f"worker memory (RssAnon): idle {peak.idle / 2**20:.1f} MB, peak at N {peak.peak / 2**20:.1f} MB "
              f"(+{(peak.peak - peak.idle) / 2**20:.1f} MB, the most of {len(pairs)} runs)", end="")
        if r4:
            print(f", peak at 4N {r4.peak / 2**20:.1f} MB (+{(r4.peak - r4.idle) / 2**20:.1f} MB over "
                  f"{r4.idle / 2**20:.1f} MB idle after the runs at N), "
                  f"4N/N {r4.peak / peak.peak:.2f} (target: +64 MB at most over idle, 4N/N within 10%)")
        else:
            print()
        print(f"run with nothing new at N: wall {nn.wall * 1000:.0f} ms, PostHog {nn.server * 1000:.0f} ms, "
              f"{len(nn.requests)} request(s)")
        if year:
            m, ywall, ycpu, ybusy, nreq, yreq, yrows, nok, n429, per_hour, per_minute = year
            print(f"one-year backfill of a steady stream ({m} events): {nreq} requests ({n429} answered 429), "
                  f"{yrows / max(nok, 1):.0f} rows per request, {ywall:.1f} s wall; "
                  f"most requests in any hour {per_hour} (PostHog allows 2,400), in any minute {per_minute} "
                  f"(PostHog allows 240); PostHog busy {ybusy:.1f} s, worker CPU {ycpu:.1f} s")
        if verify:
            m, read, vwall, vreq, vrecv, vins, repaired, differ, vcount, gone_at = verify
            print(f"30 days of {m} events: reading them {read[0]:.1f} s, {read[1]} requests, {read[2]} rows; "
                  f"one deleted here ({gone_at}): verify with repair {vwall:.1f} s, {vreq} requests, "
                  f"{vrecv} rows read again, {vins} inserted, {repaired} bucket repaired of {differ} that differed")
        ok = got == n and diff == 0 and (r4 is None or got4 == 4 * n) and \
            (year is None or (year[6] == year[0] and year[8] == 0)) and \
            (verify is None or (verify[8] == verify[0] and verify[5] == 1 and verify[6] == 1))
        print(f"check: phsync table has {got} rows, {diff} differ from COPY's"
              + (f"; 4N table has {got4} rows" if r4 else "")
              + (f"; the year has {year[6]} rows" if year else "") + (": OK" if ok else ": MISMATCH"))
        if not ok:
            sys.exit(1)
    finally:
        sh("pg_ctl", "-D", data, "-m", "fast", "stop")
        fake.proc.kill()


if __name__ == "__main__":
    main()
