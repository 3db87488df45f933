#!/usr/bin/env python3
"""A fake PostHog query API for phsync's tests and demo.

It *evaluates* the HogQL it receives: the query text is translated to SQLite
SQL and run against a dataset of events held in SQLite, with the request's
`values` bound as SQL parameters.  It behaves as ../shared/posthog-api.md
describes PostHog: bearer key check, OFFSET rejected, LIMIT capped at 50,000
(100 without a LIMIT), timestamps as RFC 3339 with the fraction dropped when
zero, `properties` as JSON text inside a string, ClickHouse's UUID order,
errors as {"type", "code", "detail", "attr"}.

Two listeners on 127.0.0.1:
  * the API (HTTPS with --cert/--key, else plain HTTP): POST /api/projects/<id>/query/
  * a control port (plain HTTP) for tests:
      POST /events      add events (JSON list of objects)
      POST /generate    add N synthetic events {"count", "seed", "created_from", "step_ms", ...}
      POST /faults      queue injected failures (JSON list; see Fault below)
      POST /config      {"max_window_seconds": N}: answer 504 to any query whose
                        window ({chunk_from}..{chunk_until}, else {since}..{until})
                        is wider, as PostHog does when a query runs too long
      GET  /requests    the query requests received (never the API key)
      POST /reset       forget requests and faults ({"data": true} also drops events)
      GET  /source      every event, formatted as the API would return it
      POST /persons     add or replace persons (JSON list of {"id", "created_at",
                        "is_identified", "properties"}): a person's new version
                        replaces the old one, as PostHog's persons table shows it
      POST /delete      {"uuids": [...]}: drop events (PostHog lost them)
      GET  /persons     every person, formatted as the API would return it
      POST /synthetic   {"count": N, "seed", "step_ms"}: serve N pre-rendered events
                        (benchmark mode; see Synthetic)
      POST /export_copy {"path": p}: write the synthetic events as a COPY file
      GET  /stats       {"busy_seconds", "requests"}: time spent answering queries

Start-up writes {"api_port": ..., "control_port": ...} to --ready-file.
"""

import argparse
import bisect
import datetime as dt
import gzip
import http.server
import json
import random
import re
import socketserver
import sqlite3
import ssl
import sys
import threading
import time
import uuid as uuidlib

EVENT_COLUMNS = ["uuid", "event", "timestamp", "distinct_id", "person_id",
                 "properties", "elements_chain", "created_at"]
PERSON_COLUMNS = ["id", "created_at", "is_identified", "properties"]
KNOWN_TYPES = {
    "id": "UUID",
    "is_identified": "Bool",
    "uuid": "UUID",
    "event": "String",
    "timestamp": "DateTime64(6, 'UTC')",
    "distinct_id": "String",
    "person_id": "UUID",
    "properties": "String",
    "elements_chain": "String",
    "created_at": "DateTime64(6, 'UTC')",
}
MAX_LIMIT = 50000
DEFAULT_LIMIT = 100
CANON_RE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}$")
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
ALLOWED_BODY_KEYS = {"query", "refresh", "name", "client_query_id", "async",
                     "filters_override", "variables_override"}
ALLOWED_QUERY_KEYS = {"kind", "query", "values", "filters", "modifiers",
                      "variables", "name", "explain"}


# ---------- time ----------

def parse_time(value):
    """RFC 3339 / 'YYYY-MM-DD HH:MM:SS[.f]' / 'YYYY-MM-DD' -> aware datetime (UTC)."""
    if isinstance(value, dt.datetime):
        d = value
    else:
        s = str(value).strip()
        if CANON_RE.match(s):
            return dt.datetime.strptime(s, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=dt.timezone.utc)
        s = s.replace("z", "Z")
        if s.endswith("Z"):
            s = s[:-1] + "+00:00"
        if len(s) == 10:
            s += "T00:00:00+00:00"
        d = dt.datetime.fromisoformat(s.replace(" ", "T", 1))
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.timezone.utc)
    return d.astimezone(dt.timezone.utc)


def canon(value):
    """Canonical sortable text: 'YYYY-MM-DD HH:MM:SS.ffffff' in UTC."""
    if value is None:
        return None
    return parse_time(value).strftime("%Y-%m-%d %H:%M:%S.%f")


def rfc3339(canonical):
    """PostHog's format: fraction dropped when it is zero."""
    d = dt.datetime.strptime(canonical, "%Y-%m-%d %H:%M:%S.%f")
    if d.microsecond:
        return d.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return d.strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------- SQLite functions mirroring the ClickHouse ones HogQL exposes ----------

def f_to_datetime(v):
    if v is None:
        return None
    try:
        return canon(v)
    except (ValueError, TypeError):
        return None


def f_to_date(v):
    c = f_to_datetime(v)
    return c[:10] if c else None


def f_start_of(unit):
    def f(v):
        c = f_to_datetime(v)
        if c is None:
            return None
        if unit == "hour":
            return c[:13] + ":00:00.000000"
        return c[:10] + " 00:00:00.000000"
    return f


def f_json_extract_string(doc, key):
    """ClickHouse's JSONExtractString: '' when missing or not a string."""
    try:
        v = json.loads(doc).get(key)
    except (ValueError, TypeError, AttributeError):
        return ""
    return v if isinstance(v, str) else ""


def f_to_uuid(v):
    return None if v is None else str(v).lower()


def chuuid_collation(a, b):
    """ClickHouse compares the second 64-bit half of a UUID first."""
    def key(s):
        s = s.lower()
        return (s[19:], s[:18]) if len(s) == 36 else ("", s)
    ka, kb = key(a), key(b)
    return (ka > kb) - (ka < kb)


FUNCTIONS = {
    "todatetime": "ch_datetime",
    "todatetime64": "ch_datetime",
    "parsedatetime64besteffort": "ch_datetime",
    "todate": "ch_date",
    "touuid": "ch_uuid",
    "tostartofhour": "ch_start_of_hour",
    "tostartofday": "ch_start_of_day",
    "now": "ch_now",
    "jsonextractstring": "ch_json_extract_string",
    "tounixtimestamp": "ch_unix_timestamp",
    "intdiv": "ch_int_div",
}


def f_unix_timestamp(v):
    c = f_to_datetime(v)
    if c is None:
        return None
    d = dt.datetime.strptime(c, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=dt.timezone.utc)
    return int(d.timestamp() // 1)


def f_int_div(a, b):
    if a is None or b is None:
        return None
    if int(b) == 0:
        raise ValueError("Division by zero")
    return int(a) // int(b)


class HogQLError(Exception):
    pass


class QueryTooBig(Exception):
    pass


TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<comment>--[^\n]*)
  | (?P<string>'(?:[^'\\]|\\.)*')
  | (?P<bquote>`(?:[^`\\]|\\.)*`)
  | (?P<dquote>"(?:[^"\\]|\\.)*")
  | (?P<placeholder>\{\s*[A-Za-z_][A-Za-z0-9_]*\s*\})
  | (?P<number>\d+(?:\.\d+)?)
  | (?P<ident>[A-Za-z_$][A-Za-z0-9_$]*)
  | (?P<op>[<>!=]=|<>|[-+*/%(),.<>=;\[\]:])
""", re.X)


def tokenize(text):
    pos, out = 0, []
    while pos < len(text):
        m = TOKEN_RE.match(text, pos)
        if not m:
            raise HogQLError("Syntax error at position %d: unexpected %r" % (pos, text[pos]))
        kind = m.lastgroup
        if kind not in ("ws", "comment"):
            out.append((kind, m.group()))
        pos = m.end()
    return out


def translate(text, values):
    """HogQL text -> (SQLite SQL, params, had_limit)."""
    tokens = tokenize(text)
    params = {}
    out = []
    depth = 0
    top_limit_at = None
    for i, (kind, tok) in enumerate(tokens):
        low = tok.lower()
        if kind == "ident" and low == "offset":
            raise HogQLError("OFFSET is not allowed in queries made with a personal API key. "
                             "Paginate with a WHERE condition on the sort key instead.")
        if kind == "placeholder":
            name = tok.strip("{} \t")
            if name not in values:
                raise HogQLError("Placeholder {%s} is not available in this context. "
                                 "You can only use placeholders for values passed in \"values\"." % name)
            value = values[name]
            if isinstance(value, (dict, list)):
                raise HogQLError("Placeholder {%s} must be a scalar value" % name)
            params["p_" + name] = value
            out.append(":p_" + name)
            continue
        if kind == "op":
            if tok == "(":
                depth += 1
            elif tok == ")":
                depth -= 1
            elif tok == ";":
                raise HogQLError("Multiple statements are not allowed")
        if kind == "ident":
            nxt = tokens[i + 1][1] if i + 1 < len(tokens) else ""
            if nxt == "(" and low in FUNCTIONS:
                out.append(FUNCTIONS[low])
                continue
            if nxt == "(" and low == "count":
                out.append("count")
                continue
            if low == "limit" and depth == 0:
                top_limit_at = len(out)
        if kind == "dquote":
            tok = '"' + tok[1:-1].replace('\\"', '""') + '"'
        if kind == "bquote":
            tok = '"' + tok[1:-1].replace("\\`", "`").replace("\\\\", "\\").replace('"', '""') + '"'
        out.append(tok)
    # count() -> count(*)
    sql = " ".join(out).replace("count ( )", "count(*)")
    had_limit = top_limit_at is not None
    if had_limit:
        head = " ".join(out[:top_limit_at]).replace("count ( )", "count(*)")
        rest = out[top_limit_at + 1:]
        if not rest or not rest[0].isdigit():
            raise HogQLError("LIMIT must be a number")
        n = min(int(rest[0]), MAX_LIMIT)
        sql = head + " LIMIT %d " % n + " ".join(rest[1:])
    else:
        sql = sql + " LIMIT %d" % (DEFAULT_LIMIT + 1)
    return sql, params, had_limit


def type_of(name, values):
    if name in KNOWN_TYPES:
        return KNOWN_TYPES[name]
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool):
            return "Bool"
        if isinstance(v, int):
            return "UInt64" if v >= 0 else "Int64"
        if isinstance(v, float):
            return "Float64"
        if isinstance(v, str) and CANON_RE.match(v):
            return "DateTime64(6, 'UTC')"
        if isinstance(v, str) and UUID_RE.match(v):
            return "UUID"
        if isinstance(v, str) and re.match(r"^\d{4}-\d\d-\d\d$", v):
            return "Date"
        return "String"
    return "Nullable(Nothing)"


def render_value(v, column=None):
    if column == "is_identified" and v is not None:
        return bool(v)
    if isinstance(v, str) and CANON_RE.match(v):
        return rfc3339(v)
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return None
    return v


class Fault:
    """One injected failure, applied to the next query request(s).

    status: HTTP status to answer (with a PostHog error body built from
            detail/type/code, or `body` verbatim)
    retry_after: Retry-After header value
    delay_ms: wait this long before answering (status or not)
    truncate: answer the real result but cut the body after this many bytes
    reset: close the connection without answering
    raw_body: answer 200 with this text verbatim (malformed JSON, say)
    row_patch: {"index": i, "row": [...]} (or a list of them): replace row i
               of the real result
    count: how many requests it applies to (default 1)
    """

    def __init__(self, spec):
        self.status = spec.get("status")
        self.detail = spec.get("detail", "Injected failure")
        self.type = spec.get("type", "server_error" if (self.status or 0) >= 500 else "validation_error")
        self.code = spec.get("code", "injected")
        self.body = spec.get("body")
        self.retry_after = spec.get("retry_after")
        self.delay_ms = spec.get("delay_ms", 0)
        self.truncate = spec.get("truncate")
        self.reset = spec.get("reset", False)
        self.raw_body = spec.get("raw_body")
        self.row_patch = spec.get("row_patch")
        self.count = spec.get("count", 1)


BUILTIN_HEAD = ("SELECT uuid, event, timestamp, distinct_id, person_id, properties, "
                "elements_chain, created_at\nFROM events\nWHERE created_at >= toDateTime({since}) "
                "AND created_at < toDateTime({until})")


class Synthetic:
    """N realistic events, rendered once, for the benchmark.

    Event i is created at base + i * step (so created_at is unique and the
    order is by i), with a client timestamp up to 5 s earlier and properties
    of 0.5 to 2 KB (nested, unicode, escapes).  Only the query phsync builds
    for the built-in events sync is served (window, keyset, slices, LIMIT),
    by bisection: the server costs milliseconds a page, so the benchmark
    measures phsync.  Anything else is answered 400.
    """

    WORDS = ["alpha", "caf\u00e9", "\u65e5\u672c\u8a9e", "na\u00efve", "emoji \U0001f680",
             'say "hi"', "back\\slash", "tab\tand\nnewline", "plain", "checkout"]

    def __init__(self, count, seed=1, base=None, step_ms=50):
        self.count = count
        self.step = dt.timedelta(milliseconds=step_ms)
        self.base = parse_time(base) if base else \
            dt.datetime.now(dt.timezone.utc) - self.step * count - dt.timedelta(minutes=5)
        rng = random.Random(seed)
        self.created = []
        self.rows = []
        names = ["$pageview", "$autocapture", "$pageleave", "signed_up", "purchase", "$identify"]
        for i in range(count):
            created = self.base + self.step * i
            c = created.strftime("%Y-%m-%d %H:%M:%S.%f")
            ts = (created - dt.timedelta(seconds=rng.random() * 5)).strftime("%Y-%m-%d %H:%M:%S.%f")
            if i % 3 == 0:
                ts = ts[:20] + "000000"   # some timestamps without a fraction
            props = self.properties(rng, i)
            row = [str(uuidlib.UUID(int=rng.getrandbits(128), version=4)),
                   names[i % len(names)], rfc3339(ts), "user-%d" % rng.randint(1, 50000),
                   str(uuidlib.UUID(int=rng.getrandbits(128), version=4)),
                   json.dumps(props, ensure_ascii=False, separators=(",", ":")),
                   "", rfc3339(c)]
            self.created.append(c)
            self.rows.append(json.dumps(row, ensure_ascii=False).encode("utf-8"))

    def properties(self, rng, i):
        if not hasattr(self, "pool"):
            # pieces of about 110 bytes of JSON each, drawn from for every row
            self.pool = [("prop_%d" % k,
                          {"text": " ".join(rng.choice(self.WORDS) for _ in range(6)),
                           "values": [rng.randint(0, 10 ** 6) for _ in range(4)]})
                         for k in range(400)]
        props = {"$browser": rng.choice(["Chrome", "Firefox", "Safari", "Edge"]),
                 "$os": rng.choice(["Mac OS X", "Windows", "Linux", "iOS", "Android"]),
                 "$current_url": "https://example.com/p/%d?q=%s" % (i, rng.choice(self.WORDS)),
                 "n": i, "price": round(rng.random() * 100, 2), "flag": rng.random() < 0.5,
                 "$set": {"plan": rng.choice(["free", "pro", "team"]), "seats": rng.randint(1, 90)}}
        # about 300 bytes so far; 0.5 to 2 KB in all
        for k, v in rng.sample(self.pool, rng.randint(2, 16)):
            props[k] = v
        return props

    def query(self, text, values):
        if not text.startswith(BUILTIN_HEAD):
            raise HogQLError("the synthetic dataset only serves phsync's built-in events query")
        m = re.search(r"\nLIMIT (\d+)$", text)
        limit = min(int(m.group(1)), MAX_LIMIT) if m else DEFAULT_LIMIT
        lo = canon(values["since"])
        hi = canon(values["until"])
        if "chunk_from" in values:
            lo = max(lo, canon(values["chunk_from"]))
            hi = min(hi, canon(values["chunk_until"]))
        start = bisect.bisect_left(self.created, lo)
        if "after_0" in values:
            # created_at is unique here, so the keyset is "after this created_at"
            start = max(start, bisect.bisect_right(self.created, canon(values["after_0"])))
        end = min(bisect.bisect_left(self.created, hi), start + limit)
        body = (b'{"columns":' + json.dumps(EVENT_COLUMNS).encode() +
                b',"types":' + json.dumps([[c, KNOWN_TYPES[c]] for c in EVENT_COLUMNS]).encode() +
                b',"is_cached":false,"results":[' + b",".join(self.rows[start:end]) + b"]}")
        return body

    def export_copy(self, path):
        """The same rows as a COPY text file, for the benchmark's reference."""
        def esc(v):
            if v is None:
                return "\\N"
            return (str(v).replace("\\", "\\\\").replace("\n", "\\n")
                    .replace("\t", "\\t").replace("\r", "\\r"))
        with open(path, "w", encoding="utf-8") as f:
            for raw in self.rows:
                f.write("\t".join(esc(v) for v in json.loads(raw)) + "\n")


class State:
    def __init__(self, api_key, project_id):
        self.api_key = api_key
        self.project_id = str(project_id)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(":memory:", check_same_thread=False)
        self.db.create_collation("CHUUID", chuuid_collation)
        self.db.create_function("ch_datetime", 1, f_to_datetime, deterministic=True)
        self.db.create_function("ch_date", 1, f_to_date, deterministic=True)
        self.db.create_function("ch_uuid", 1, f_to_uuid, deterministic=True)
        self.db.create_function("ch_start_of_hour", 1, f_start_of("hour"), deterministic=True)
        self.db.create_function("ch_start_of_day", 1, f_start_of("day"), deterministic=True)
        self.db.create_function("ch_json_extract_string", 2, f_json_extract_string, deterministic=True)
        self.db.create_function("ch_unix_timestamp", 1, f_unix_timestamp, deterministic=True)
        self.db.create_function("ch_int_div", 2, f_int_div, deterministic=True)
        self.db.create_function("ch_now", 0, lambda: canon(dt.datetime.now(dt.timezone.utc)))
        self.db.execute("""CREATE TABLE events (
            uuid TEXT COLLATE CHUUID NOT NULL,
            event TEXT, properties TEXT, timestamp TEXT, distinct_id TEXT,
            person_id TEXT, elements_chain TEXT, created_at TEXT NOT NULL)""")
        self.db.execute("CREATE INDEX events_created ON events (created_at, uuid)")
        self.db.execute("""CREATE TABLE persons (
            id TEXT COLLATE CHUUID PRIMARY KEY, created_at TEXT NOT NULL,
            is_identified BOOLEAN, properties TEXT)""")
        self.faults = []
        self.requests = []
        self.max_window = None
        self.synthetic = None
        self.busy = 0.0
        self.served = 0

    # ----- data -----
    def add_events(self, events):
        rows = []
        for e in events:
            if e.get("raw"):
                # stored verbatim: lets a test send values PostgreSQL refuses
                rows.append(tuple(e.get(c) for c in
                                  ["uuid", "event", "properties", "timestamp", "distinct_id",
                                   "person_id", "elements_chain"]) + (canon(e["created_at"]),))
                continue
            props = e.get("properties", {})
            if not isinstance(props, str):
                props = json.dumps(props, ensure_ascii=False, separators=(",", ":"))
            created = e.get("created_at") or dt.datetime.now(dt.timezone.utc)
            rows.append((
                str(e.get("uuid") or uuidlib.uuid4()),
                e.get("event", "$pageview"),
                props,
                canon(e.get("timestamp") or created),
                e.get("distinct_id", "anonymous"),
                e.get("person_id"),
                e.get("elements_chain", ""),
                canon(created),
            ))
        with self.lock:
            self.db.executemany("INSERT INTO events VALUES (?,?,?,?,?,?,?,?)", rows)
            self.db.commit()
        return len(rows)

    def generate(self, spec):
        rng = random.Random(spec.get("seed", 1))
        n = int(spec["count"])
        start = parse_time(spec.get("created_from") or
                           (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=2)))
        step = dt.timedelta(milliseconds=spec.get("step_ms", 1000))
        names = spec.get("events", ["$pageview", "$autocapture", "signed_up", "$pageleave"])
        events = []
        for i in range(n):
            created = start + step * i
            if spec.get("whole_seconds"):
                created = created.replace(microsecond=0)
            events.append({
                "uuid": str(uuidlib.UUID(int=rng.getrandbits(128), version=4)),
                "event": names[i % len(names)],
                "properties": {"$browser": rng.choice(["Chrome", "Firefox", "Safari"]),
                               "$current_url": "https://example.com/p/%d" % rng.randint(1, 500),
                               "n": i, "note": "caf\u00e9 \"quoted\" \\ back"},
                "timestamp": created - dt.timedelta(seconds=rng.randint(0, 5)),
                "distinct_id": "user-%d" % rng.randint(1, 1000),
                "person_id": str(uuidlib.UUID(int=rng.getrandbits(128), version=4)),
                "elements_chain": "",
                "created_at": created,
            })
        return self.add_events(events)

    def add_persons(self, persons):
        rows = []
        for p in persons:
            props = p.get("properties", {})
            if not isinstance(props, str):
                props = json.dumps(props, ensure_ascii=False, separators=(",", ":"))
            rows.append((str(p.get("id") or uuidlib.uuid4()), canon(p["created_at"]),
                         1 if p.get("is_identified") else 0, props))
        with self.lock:
            self.db.executemany("INSERT OR REPLACE INTO persons VALUES (?,?,?,?)", rows)
            self.db.commit()
        return len(rows)

    def delete_events(self, uuids):
        with self.lock:
            n = self.db.executemany("DELETE FROM events WHERE uuid = ?", [(u,) for u in uuids]).rowcount
            self.db.commit()
        return n

    def persons(self):
        with self.lock:
            rows = self.db.execute("SELECT %s FROM persons ORDER BY created_at, id"
                                   % ", ".join(PERSON_COLUMNS)).fetchall()
        return [[render_value(v, c) for v, c in zip(r, PERSON_COLUMNS)] for r in rows]

    def source(self):
        with self.lock:
            cur = self.db.execute("SELECT %s FROM events ORDER BY created_at, uuid"
                                  % ", ".join(EVENT_COLUMNS))
            rows = cur.fetchall()
        return [[render_value(v) for v in r] for r in rows]

    # ----- queries -----
    def run_query(self, body):
        if not isinstance(body, dict):
            raise HogQLError("Request body must be a JSON object")
        extra = set(body) - ALLOWED_BODY_KEYS
        if extra:
            raise HogQLError("Extra inputs are not permitted: %s" % ", ".join(sorted(extra)))
        query = body.get("query")
        if not isinstance(query, dict) or query.get("kind") != "HogQLQuery":
            raise HogQLError("query.kind must be HogQLQuery")
        extra = set(query) - ALLOWED_QUERY_KEYS
        if extra:
            raise HogQLError("Extra inputs are not permitted: query.%s" % ", ".join(sorted(extra)))
        values = query.get("values") or {}
        if self.max_window is not None:
            lo = values.get("chunk_from", values.get("since"))
            hi = values.get("chunk_until", values.get("until"))
            if lo and hi and (parse_time(hi) - parse_time(lo)).total_seconds() > self.max_window:
                raise QueryTooBig()
        sql, params, had_limit = translate(query.get("query", ""), values)
        with self.lock:
            try:
                cur = self.db.execute(sql, params)
                rows = cur.fetchall()
            except sqlite3.Error as e:
                raise HogQLError("Query error: %s" % e)
            columns = [d[0] for d in cur.description]
        result = {"columns": columns, "hogql": query.get("query"), "is_cached": False,
                  "timezone": "UTC", "query_status": None}
        if not had_limit:
            result["hasMore"] = len(rows) > DEFAULT_LIMIT
            rows = rows[:DEFAULT_LIMIT]
            result["limit"] = DEFAULT_LIMIT
            result["offset"] = 0
        result["types"] = [[c, type_of(c, [r[i] for r in rows])] for i, c in enumerate(columns)]
        result["results"] = [[render_value(v, c) for v, c in zip(r, columns)] for r in rows]
        return result

    def next_fault(self):
        with self.lock:
            if not self.faults:
                return None
            f = self.faults[0]
            f.count -= 1
            if f.count <= 0:
                self.faults.pop(0)
            return f


def make_handler(state, kind):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "fake-posthog/1"

        def log_message(self, fmt, *args):
            pass

        def send_json(self, status, obj, headers=None, truncate=None):
            # surrogatepass: a test can make us send invalid UTF-8, as a broken
            # upstream might
            data = json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
            gz = "gzip" in (self.headers.get("Accept-Encoding") or "")
            if gz:
                data = gzip.compress(data, compresslevel=1)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            if gz:
                self.send_header("Content-Encoding", "gzip")
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            self.send_header("Content-Length", str(len(data)))
            if truncate is not None:
                self.send_header("Connection", "close")
            self.end_headers()
            if truncate is not None:
                self.wfile.write(data[:truncate])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(data)

        def read_body(self):
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def error(self, status, detail, type_="validation_error", code="invalid_input", headers=None):
            self.send_json(status, {"type": type_, "code": code, "detail": detail, "attr": None},
                           headers)

        # ----- API -----
        def api_post(self):
            t0 = time.perf_counter()
            try:
                self.api_post_inner()
            finally:
                with state.lock:
                    state.busy += time.perf_counter() - t0
                    state.served += 1

        def send_raw_json(self, data):
            if "gzip" in (self.headers.get("Accept-Encoding") or ""):
                data = gzip.compress(data, compresslevel=1)
                gz = True
            else:
                gz = False
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            if gz:
                self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def api_post_inner(self):
            raw = self.read_body()
            m = re.match(r"^/api/(projects|environments)/([^/]+)/query/?$", self.path)
            try:
                body = json.loads(raw.decode("utf-8"))
            except ValueError:
                body = None
            auth = self.headers.get("Authorization") or ""
            with state.lock:
                state.requests.append({
                    "time": time.time(),
                    "path": self.path,
                    "auth_ok": auth == "Bearer " + state.api_key,
                    "accept_encoding": self.headers.get("Accept-Encoding"),
                    "content_type": self.headers.get("Content-Type"),
                    "user_agent": self.headers.get("User-Agent"),
                    "body": body,
                })
            if not m:
                return self.error(404, "Not found.", "invalid_request", "not_found")
            if auth != "Bearer " + state.api_key:
                return self.error(401, "Incorrect authentication credentials.",
                                  "authentication_error", "authentication_failed")
            if m.group(2) != state.project_id:
                return self.error(403, "You don't have access to the project.",
                                  "authentication_error", "permission_denied")
            fault = state.next_fault()
            if fault and fault.delay_ms:
                time.sleep(fault.delay_ms / 1000.0)
            if fault and fault.reset:
                self.close_connection = True
                try:
                    self.connection.shutdown(2)
                except OSError:
                    pass
                return
            if fault and fault.raw_body is not None:
                data = fault.raw_body.encode("utf-8", "surrogatepass")
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            if fault and fault.status:
                headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
                if fault.body is not None:
                    return self.send_json(fault.status, fault.body, headers)
                return self.error(fault.status, fault.detail, fault.type, fault.code, headers)
            if body is None:
                return self.error(400, "Malformed JSON body.", "validation_error", "parse_error")
            if state.synthetic is not None:
                try:
                    q = body["query"]
                    return self.send_raw_json(state.synthetic.query(q["query"], q.get("values") or {}))
                except (HogQLError, KeyError) as e:
                    return self.error(400, str(e))
            try:
                result = state.run_query(body)
            except HogQLError as e:
                return self.error(400, str(e))
            except QueryTooBig:
                return self.error(504, "Query timed out. Try a narrower time range.",
                                  "server_error", "query_timeout")
            if fault and fault.row_patch:
                patches = fault.row_patch
                for p in (patches if isinstance(patches, list) else [patches]):
                    if p["index"] < len(result["results"]):
                        result["results"][p["index"]] = p["row"]
            self.send_json(200, result, truncate=fault.truncate if fault else None)

        # ----- control -----
        def control(self, method):
            raw = self.read_body() if method == "POST" else b""
            arg = json.loads(raw.decode("utf-8")) if raw else None
            if method == "POST" and self.path == "/events":
                return self.send_json(200, {"inserted": state.add_events(arg)})
            if method == "POST" and self.path == "/generate":
                return self.send_json(200, {"inserted": state.generate(arg)})
            if method == "POST" and self.path == "/faults":
                with state.lock:
                    state.faults.extend(Fault(s) for s in arg)
                return self.send_json(200, {"queued": len(arg)})
            if method == "POST" and self.path == "/config":
                with state.lock:
                    if "max_window_seconds" in arg:
                        state.max_window = arg["max_window_seconds"]
                return self.send_json(200, {"ok": True})
            if method == "POST" and self.path == "/synthetic":
                syn = Synthetic(arg["count"], arg.get("seed", 1), arg.get("base"), arg.get("step_ms", 50))
                with state.lock:
                    state.synthetic = syn
                return self.send_json(200, {"count": syn.count, "first": syn.created[0] if syn.count else None,
                                            "last": syn.created[-1] if syn.count else None})
            if method == "POST" and self.path == "/export_copy":
                state.synthetic.export_copy(arg["path"])
                return self.send_json(200, {"ok": True})
            if method == "GET" and self.path == "/stats":
                with state.lock:
                    return self.send_json(200, {"busy_seconds": state.busy, "requests": state.served})
            if method == "POST" and self.path == "/stats/reset":
                with state.lock:
                    state.busy = 0.0
                    state.served = 0
                return self.send_json(200, {"ok": True})
            if method == "GET" and self.path == "/requests":
                with state.lock:
                    reqs = list(state.requests)
                return self.send_json(200, reqs)
            if method == "POST" and self.path == "/reset":
                with state.lock:
                    state.requests = []
                    state.faults = []
                    if arg and arg.get("data"):
                        state.db.execute("DELETE FROM events")
                        state.db.execute("DELETE FROM persons")
                        state.db.commit()
                return self.send_json(200, {"ok": True})
            if method == "GET" and self.path == "/source":
                return self.send_json(200, state.source())
            if method == "POST" and self.path == "/persons":
                return self.send_json(200, {"inserted": state.add_persons(arg)})
            if method == "GET" and self.path == "/persons":
                return self.send_json(200, state.persons())
            if method == "POST" and self.path == "/delete":
                return self.send_json(200, {"deleted": state.delete_events(arg["uuids"])})
            return self.error(404, "Not found.", "invalid_request", "not_found")

        def do_POST(self):
            if kind == "api":
                return self.api_post()
            return self.control("POST")

        def do_GET(self):
            if kind == "api":
                self.read_body()
                return self.error(405, "Method \"GET\" not allowed.", "invalid_request", "method_not_allowed")
            return self.control("GET")

    return Handler


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--control-port", type=int, default=0)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--api-key", default="phx_test_key")
    ap.add_argument("--project-id", default="1")
    ap.add_argument("--demo-events", type=int, default=0,
                    help="start with this many synthetic events from the last two days")
    ap.add_argument("--ready-file")
    args = ap.parse_args()

    state = State(args.api_key, args.project_id)
    if args.demo_events:
        state.generate({"count": args.demo_events, "seed": 42,
                        "step_ms": int(2 * 86400 * 1000 / max(args.demo_events, 1))})

    api = Server(("127.0.0.1", args.port), make_handler(state, "api"))
    if args.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        api.socket = ctx.wrap_socket(api.socket, server_side=True)
    control = Server(("127.0.0.1", args.control_port), make_handler(state, "control"))
    for srv in (api, control):
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    info = {"api_port": api.server_address[1], "control_port": control.server_address[1]}
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(info, f)
        import os
        os.rename(tmp, args.ready_file)
    print(json.dumps(info), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
