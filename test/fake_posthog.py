#!/usr/bin/env python3
"""A fake PostHog query API for phsync's tests, demo and benchmark.

It behaves as PostHog's own source says (../shared/posthog-api.md and the
notes quoted there), so that phsync's tests do not pass against a kinder
server than the real one:

  * Every query is parsed by PostHog's real HogQL parser (npm
    @posthog/hogql-parser, run by one long-lived node process,
    test/hogql/parse.mjs).  A query it rejects gets PostHog's 400:
    {"type": "validation_error", "code": "invalid_input", "detail": <the
    parser's message>, "attr": null}.  (In backticks a backtick is written
    twice, `a``b`; the backslash form is a syntax error.)  The fake does not
    start without node and the package: run test/install-deps.sh.
  * The AST is translated to SQLite SQL over the project's dataset, with the
    request's `values` bound as parameters (never pasted): fields and
    chains, aliases (usable in WHERE/GROUP BY/ORDER BY, as in HogQL),
    subqueries in FROM, JOIN ... ON, UNION ALL, WHERE/AND/OR/NOT, comparisons,
    IN with a list, a subquery or an array placeholder, BETWEEN, LIKE/ILIKE,
    arithmetic, DISTINCT, GROUP BY, HAVING, ORDER BY ASC/DESC (NULLS LAST,
    ClickHouse's UUID order), LIMIT; functions toDateTime, toDateTime64,
    parseDateTime64BestEffort, toTimeZone, toDate, toStartOfMinute/Hour/Day/
    Week/Month/Year, now, today, toUnixTimestamp, intDiv, dateDiff,
    toInterval*, JSONExtractString/Raw, JSONHas, toUUID, toString, toInt,
    toFloat, coalesce, ifNull, if, isNull, isNotNull, empty, notEmpty, lower,
    upper, length, trim, abs, round, greatest, least, concat, and, or, not,
    equals... (the operators' function forms); aggregates count(),
    count(x), count(DISTINCT x), countIf, uniq, uniqExact, sum, avg, min,
    max, argMax, argMin, any, groupArray.  Anything else: 400 "Unsupported
    function call 'f(...)'" (the fake's limit, not always PostHog's).
    `properties.$x` (a chain on a JSON text column) is the JSON value as a
    string, as HogQL prints it.  Unknown table: 400 "Unknown table `x`.";
    unknown column: 400 "Unable to resolve field: x"; a placeholder without
    a value: 400 "Global variable not found: x"; OFFSET anywhere: 400
    (personal API keys paginate by key).  toDateTime(<constant or
    placeholder>) keeps microseconds and reads a string without Z/offset in
    the project's time zone; toDateTime(<column>) is whole seconds.
  * Responses: `results`, `columns` (aliases, or the expression printed
    back as HogQL), `types` (ClickHouse types of every column: known for
    every column of every table, computed from the expression otherwise),
    `timezone`, `hogql`, `is_cached`; `hasMore`, `limit`, `offset` only
    when the query has no LIMIT.  Date-times as RFC 3339 in the project's
    time zone ("2026-11-02T03:04:05.123456Z" in UTC,
    "2026-11-02T08:34:05.123456+05:30" elsewhere, DST-correct), the
    fraction dropped when zero; `properties` as JSON text inside a string;
    NaN/Inf as null.  "modifiers": {"convertToProjectTimezone": false}
    gives UTC.  {"query": {"kind": "DatabaseSchemaQuery"}} answers the
    schema of every table below ({"tables": {name: {"type", "id", "name",
    "row_count", "fields": {name: {"name", "hogql_value", "type",
    "schema_valid", "chain", "fields", "id", "table"}}}}, "joins": []}).

Tables (each project has its own):
  events      uuid UUID, event, properties (JSON text), timestamp and
              created_at DateTime64(6, tz), distinct_id, elements_chain,
              $session_id and $window_id (from properties), person_id UUID;
              POST /events applies capture's rule: a timestamp more than 23 h
              after created_at becomes created_at (unless "raw")
  persons     id UUID, created_at DateTime64(3, tz) (stored in ms),
              properties, is_identified Int8 (0/1); persons created more
              than a day in the future are not shown, as in PostHog
  groups      index UInt8 (0-4), key, created_at DateTime64(3, tz),
              updated_at DateTime(tz) (when the version arrived), properties;
              a new version of (index, key) replaces the old
  sessions    computed from events when queried (PostHog's sessions v2),
              one row per properties.$session_id: id, session_id,
              distinct_id (first event's), $start_timestamp, $end_timestamp,
              $session_duration (s), duration, $pageview_count,
              $autocapture_count, $screen_count, $urls, $num_uniq_urls,
              $entry_current_url, $end_current_url, $is_bounce (NULL without
              page/screen/autocapture events, else 1 when at most one of
              them and shorter than 10 s), max_inserted_at (max created_at)
  cohort_people         person_id, cohort_id: current members of each
              dynamic cohort of system.cohorts that is not deleted
  static_cohort_people  person_id, cohort_id
  system.cohorts        id, name, description, deleted (0/1, Int64),
              filters, groups, query (JSON text), created_at,
              last_calculation, version, count, is_static (0/1)
  system.feature_flags  id, key, name, filters, rollout_percentage,
              created_by_id, created_at, deleted (0/1)
  system.experiments    id, name, description, created_by_id, created_at,
              updated_at, filters, parameters, start_date, end_date,
              archived (0/1), feature_flag_id (no deleted column)
  system.surveys        id UUID, name, type, questions, appearance,
              start_date, end_date, created_by_id, created_at (no deleted
              column: a deleted survey is gone)

Settings (command-line flags --row-cap N etc. at start; POST /config with
any subset later; GET /config shows them).  Defaults are PostHog's:
  row_cap 50000             a larger LIMIT is silently cut (older self-hosted
                            PostHog: 10000); no LIMIT: 100 rows + hasMore
  timezone "UTC"            the project's time zone (per project: POST
                            /config?project=ID, or --project ID:KEY:TZ)
  time_scale 1.0            the fake clock runs this many times faster than
                            real time for throttle windows, concurrency
                            waits, Retry-After and execution cost;
                            Retry-After (and the number in the detail) is in
                            real seconds: ceil(fake wait / time_scale)
  throttle_per_minute 240   per API key (PostHog's APIQueriesBurstThrottle),
  throttle_per_hour 2400    ... and APIQueriesSustainedThrottle; DRF's
                            sliding windows; 0 turns one off.  Over a limit:
                            429 {"type": "throttled_error", "code":
                            "throttled", "detail": "Request was throttled.
                            Expected available in N seconds."} with
                            Retry-After N.  Every throttle that lets a
                            request through counts it, as DRF does.
  hogql_throttle_per_hour 0 when set (e.g. 120): a team outside the
                            API-queries programme: HogQLQuery requests get
                            this one throttle instead (other kinds 240/min
                            and 1200/hour), no concurrency limit, and
                            max_execution_seconds_hogql
  concurrency 3             queries executing at once per project
  concurrency_scope "project"  PostHog's limiter key is per team
                            ("api:query:per-team:{team_id}"); "organization"
                            shares the slots between all projects
  concurrency_wait_seconds 30  (fake s) a request over the limit waits this
                            long for a slot, then gets 429 without
                            Retry-After: "Too many queries are running right
                            now — please try again in a moment."
  cost_per_event_us 1.0     execution cost: each query on events is charged
                            (fake µs) for every event whose timestamp lies in
                            the bounds of its WHERE (top-level AND-conjuncts
                            timestamp >=, >, <, <=, = or BETWEEN constants,
                            placeholders or toDateTime() of them, in every
                            SELECT that reads events, subqueries included);
                            unbounded on a side: every event on that side.
                            sessions reads every event.
  max_execution_seconds 10  (fake s) a larger charge: 504 {"type":
                            "server_error", "code": "query_timeout",
                            "detail": "Query timed out. Try a narrower time
                            range."}
  max_execution_seconds_hogql 60  the same outside the programme
  cost_sleep false          sleep charge/time_scale real seconds (holding
                            the slot), as the query would run
  max_window_seconds null   504 for any query whose window
                            ({slice_from}..{slice_until}, else
                            {since}..{until}) is wider
  latency_base_ms 0,        a successful answer takes at least base +
  latency_per_row_us 0      per_row x rows (real time), holding its slot
  gzip true                 answers gzipped when the client accepts it, as
                            PostHog's query POSTs are (GZIP_POST_RESPONSE_ALLOW_LIST
                            in posthog/settings/web.py); false: never
  types_first false         true: "columns", "types" and "timezone" before
                            "results" (a reader must not count on it:
                            PostHog's own order puts them after)
  send_types true           false: "types" is null (the model allows it)
  send_pause_ms 0           a 200's body is sent in pieces of 16 kB, this
                            long apart (a slow network)
  cache_seconds 21600       (fake s) a request whose "refresh" is not
                            "force_blocking" (or force_async/true) gets the
                            answer of an identical earlier query (same query
                            and values) younger than this, with is_cached
                            true, as PostHog's cache does; 0 turns it off
A delay fault holds its slot for at most the execution limit (ClickHouse
kills the query then); the rest of the delay is spent without a slot.

API port (HTTPS with --cert/--key, else HTTP; gzip when asked):
  POST   /api/projects/<id>/query/ (or /api/environments/<id>/query/):
         Bearer key: unknown key 401, a key of another project 403
  DELETE /api/projects/<id>/query/<client_query_id>/: cancel, 200
         {"message": ...} also for unknown ids (PostHog's QueryViewSet.destroy);
         a query still executing or waiting (for a slot, a delay fault, the
         latency model, cost_sleep) gives its slot back at once and its
         connection is closed without an answer (recorded as "cancelled")

Control port (plain HTTP, for tests; ?project=ID picks the project, the
first one by default):
  POST /events          add events (JSON list of objects; "raw": true stores
                        the values verbatim)
  POST /generate        add N events {"count", "seed", "created_from", "step_ms",
                        "events", "whole_seconds"}
  POST /delete          {"uuids": [...]}: drop events (PostHog lost them)
  GET  /source          every event, formatted as the API would return it
  POST /persons         add or replace persons (list of {"id", "created_at",
                        "is_identified", "properties"}; "is_deleted": true
                        removes one)
  POST /persons/delete  {"ids": [...]}
  GET  /persons         every person, formatted as the API would return it
  POST /distinct_ids    [{"distinct_id", "person_id", "version"?, "is_deleted"?}]:
                        rows of raw_person_distinct_ids (version: one more
                        than the distinct id's last, unless given)
  POST /persons/merge   {"from": id, "into": id}: as PostHog merges persons,
                        every distinct id of "from" gets a new version that
                        points to "into", and "from" is deleted; events keep
                        the person_id written on them
  POST /groups          add or replace groups (list of {"index", "key",
                        "created_at", "properties", "updated_at"?})
  POST /groups/delete   {"groups": [[index, key], ...]}
  GET  /groups, GET /sessions, GET /cohort_people, GET /static_cohort_people
  POST /system/<t>      add or replace rows of system.<t> (cohorts,
                        feature_flags, experiments, surveys): a list of
                        objects by column name; JSON columns take JSON;
                        answers {"ids": [...]}
  POST /system/<t>/delete  {"ids": [...], "hard": false}: soft delete sets
                        deleted = 1 (tables that have it); hard removes rows
  GET  /system/<t>      the rows, formatted
  POST /cohort_people   {"cohort_id", "person_ids"}: a recalculation (the new
                        member list replaces the old; version, count and
                        last_calculation of the cohort move on)
  POST /static_cohort_people  {"cohort_id", "person_ids"}
  POST /faults          queue injected failures (JSON list; see Fault)
  POST /config, GET /config   the settings above
  GET  /requests        query requests received (never the key): path,
                        method, project_id, body, client_query_id, start,
                        ready (a 200's answer computed), end, status (HTTP
                        status, or "cancelled"),
                        events_read, cost_seconds, rows, auth_ok, headers
  GET  /cancels         cancels received: {"client_query_id", "project_id",
                        "time", "was_running"}
  POST /reset           forget requests, faults, cancels, throttle
                        history and the query cache ({"data": true} also drops the data of every
                        project, or of ?project=ID)
  POST /synthetic       {"count": N, "seed", "step_ms"}: serve N pre-rendered
                        events (benchmark mode; see Synthetic)
  POST /export_copy     {"path": p}: write the synthetic events as a COPY file
  GET  /stats           {"busy_seconds" (sum of request durations),
                        "busy_union_seconds" (wall time with at least one
                        request in progress), "requests", "max_concurrent"}
  POST /stats/reset

Projects: --project-id/--api-key is the first project; --project ID:KEY[:TZ]
(repeatable) adds more (one key may serve several projects).  Start-up
writes {"api_port", "control_port", "projects"} to --ready-file.
"""

import argparse
import bisect
import datetime as dt
import functools
import gzip
import hashlib
import http.server
import json
import math
import os
import random
import re
import shutil
import socketserver
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid as uuidlib
import zoneinfo

HERE = os.path.dirname(os.path.abspath(__file__))
FUTURE_CUTOFF = dt.timedelta(hours=23)     # rust/capture/src/timestamp.rs
EVENT_COLUMNS = ["uuid", "event", "timestamp", "distinct_id", "person_id",
                 "properties", "elements_chain", "created_at"]
PERSON_COLUMNS = ["id", "created_at", "is_identified", "properties"]
DEFAULT_LIMIT = 100
CANON_RE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}$")
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
ALLOWED_BODY_KEYS = {"query", "refresh", "name", "client_query_id", "async",
                     "filters_override", "variables_override"}
ALLOWED_QUERY_KEYS = {"kind", "query", "values", "filters", "modifiers",
                      "variables", "name", "explain", "response", "version",
                      "connectionId", "tags"}
OFFSET_TEXT = ("OFFSET is not allowed in queries made with a personal API key. "
               "Paginate with a WHERE condition on the sort key instead.")
CONCURRENCY_TEXT = "Too many queries are running right now \u2014 please try again in a moment."
TIMEOUT_TEXT = "Query timed out. Try a narrower time range."

# The fake's settings: PostHog's real values unless a test changes them
# (command line flags at start, POST /config later).
DEFAULT_CONFIG = {
    "row_cap": 50000,
    "timezone": "UTC",              # per project (POST /config?project=ID)
    "time_scale": 1.0,
    "throttle_per_minute": 240,
    "throttle_per_hour": 2400,
    "hogql_throttle_per_hour": 0,
    "concurrency": 3,
    "concurrency_scope": "project",
    "concurrency_wait_seconds": 30.0,
    "cost_per_event_us": 1.0,
    "max_execution_seconds": 10.0,
    "max_execution_seconds_hogql": 60.0,
    "cost_sleep": False,
    "max_window_seconds": None,
    "latency_base_ms": 0.0,
    "latency_per_row_us": 0.0,
    "cache_seconds": 21600.0,
    "gzip": True,
    "types_first": False,
    "send_types": True,
    "send_pause_ms": 0,
}
# PostHog's ExecutionMode values for "refresh" (True/False are the legacy forms)
REFRESH_MODES = {"async", "lazy_async", "blocking", "force_async", "force_blocking", "force_cache",
                 True, False, None}
FRESH_MODES = {"force_blocking", "force_async", True}
PROJECT_KEYS = {"timezone"}


# ---------- PostHog's response ----------

# The fields of CachedHogQLQueryResponse, as posthog/schema.py defines them
# at PostHog/posthog commit f89852a7ace14828250dd108d959ceff8dd1dafa (the
# model is extra="forbid"; True: required).  posthog/api/query.py returns
# model_dump(by_alias=True): every field, in this order, None as null, so
# that "types" and "timezone" come after "results".
CACHED_HOGQL_QUERY_RESPONSE = [
    ("cache_key", True), ("cache_target_age", False), ("calculation_trigger", False),
    ("clickhouse", False), ("columns", False), ("error", False), ("explain", False),
    ("hasMore", False), ("hogql", False), ("is_cached", True), ("last_refresh", True),
    ("limit", False), ("metadata", False), ("modifiers", False),
    ("next_allowed_client_refresh", True), ("offset", False), ("query", False),
    ("query_metadata", False), ("query_status", False), ("resolved_date_range", False),
    ("results", True), ("timezone", True), ("timings", False), ("types", False),
]
RESULTS_MARK = "\u0000phsync-fake-results\u0000"


def posthog_response(config, cache_key, timezone, columns, types, results, **fields):
    """A 200 body as PostHog's query runner builds it (query_runner.py: the
    calculation's fields, then is_cached, last_refresh,
    next_allowed_client_refresh (a minute later), cache_key, timezone and
    cache_target_age), in the model's field order, or with columns, types
    and timezone first when the fake's types_first is set."""
    now = dt.datetime.now(UTC)
    body = {name: None for name, _ in CACHED_HOGQL_QUERY_RESPONSE}
    body.update({
        "cache_key": "cache_" + format(abs(hash(cache_key)), "x"),
        "cache_target_age": (now + dt.timedelta(hours=6)).isoformat().replace("+00:00", "Z"),
        "columns": columns, "is_cached": False,
        "last_refresh": now.isoformat().replace("+00:00", "Z"),
        "next_allowed_client_refresh": (now + dt.timedelta(minutes=1)).isoformat().replace("+00:00", "Z"),
        "results": results, "timezone": timezone,
        "timings": [{"k": "./query", "t": 0.01}, {"k": ".", "t": 0.02}], "types": types,
    })
    body.update(fields)
    if not config.get("send_types", True):
        body["types"] = None
    if config.get("types_first"):
        first = {k: body.pop(k) for k in ("columns", "types", "timezone")}
        first.update(body)
        body = first
    return body


def posthog_response_bytes(config, cache_key, timezone, columns, types, rows_json):
    """The same, with the rows already rendered (a list of JSON texts)."""
    text = json.dumps(posthog_response(config, cache_key, timezone, columns, types, RESULTS_MARK))
    head, tail = text.split(json.dumps(RESULTS_MARK))
    return head.encode() + b"[" + b",".join(rows_json) + b"]" + tail.encode()


# ---------- time ----------

UTC = dt.timezone.utc


@functools.lru_cache(maxsize=64)
def get_tz(name):
    if name in (None, "", "UTC", "Etc/UTC"):
        return UTC
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise HogQLError("Unknown time zone: %s" % name)


def parse_time(value, tz=UTC):
    """A date-time -> aware datetime in UTC.  Strings with Z or an offset
    fix the instant; strings without one are read in tz (as ClickHouse's
    parseDateTime64BestEffort with the project's time zone); numbers are
    Unix seconds."""
    if isinstance(value, dt.datetime):
        d = value
    elif isinstance(value, bool):
        raise ValueError("not a date-time")
    elif isinstance(value, (int, float)):
        return dt.datetime.fromtimestamp(value, UTC)
    else:
        s = str(value).strip()
        if CANON_RE.match(s) and tz is UTC:
            return dt.datetime.strptime(s, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC)
        if s[-1:] in ("Z", "z"):
            s = s[:-1] + "+00:00"
        if len(s) == 10:
            s += "T00:00:00"
        d = dt.datetime.fromisoformat(s.replace(" ", "T", 1))
    if d.tzinfo is None:
        d = d.replace(tzinfo=tz)
    return d.astimezone(UTC)


def canon(value, tz=UTC):
    """Canonical sortable text: 'YYYY-MM-DD HH:MM:SS.ffffff' in UTC."""
    if value is None:
        return None
    return parse_time(value, tz).strftime("%Y-%m-%d %H:%M:%S.%f")


def canon_ms(value, tz=UTC):
    """canon() rounded to milliseconds (DateTime64(3) columns)."""
    if value is None:
        return None
    d = parse_time(value, tz)
    us = d.microsecond
    ms = (us + 500) // 1000
    d = d.replace(microsecond=0) + dt.timedelta(milliseconds=ms)
    return d.strftime("%Y-%m-%d %H:%M:%S.%f")


def canon_s(value, tz=UTC):
    if value is None:
        return None
    return parse_time(value, tz).replace(microsecond=0).strftime("%Y-%m-%d %H:%M:%S.%f")


def canon_dt(c):
    return dt.datetime.strptime(c, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC)


def now_canon():
    return dt.datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def render_dt(c, tzname="UTC", seconds_only=False):
    """PostHog's format: RFC 3339 in the project's time zone, Z for UTC,
    the fraction dropped when it is zero."""
    d = canon_dt(c)
    tz = get_tz(tzname)
    if tz is not UTC:
        d = d.astimezone(tz)
    us = 0 if seconds_only else d.microsecond
    text = d.strftime("%Y-%m-%dT%H:%M:%S")
    if us:
        text += ".%06d" % us
    off = d.utcoffset() or dt.timedelta(0)
    if not off:
        return text + "Z"
    secs = int(off.total_seconds())
    sign = "+" if secs >= 0 else "-"
    secs = abs(secs)
    return text + "%s%02d:%02d" % (sign, secs // 3600, secs % 3600 // 60)


def rfc3339(canonical):
    return render_dt(canonical)


class HogQLError(Exception):
    pass


class QueryTooBig(Exception):
    pass


# ---------- ClickHouse types ----------

def base_type(t):
    while t:
        m = re.match(r"^(Nullable|LowCardinality)\((.*)\)$", t)
        if not m:
            return t
        t = m.group(2)
    return t


def is_dt(t):
    return bool(t) and base_type(t).startswith("DateTime")


def is_date(t):
    return bool(t) and base_type(t) == "Date"


def is_uuid(t):
    return bool(t) and base_type(t) == "UUID"


def is_string(t):
    return bool(t) and base_type(t) in ("String", "FixedString")


def is_float(t):
    return bool(t) and base_type(t).startswith(("Float", "Decimal"))


def is_array(t):
    return bool(t) and base_type(t).startswith("Array(")


def dt_type(precision, tzname):
    return "DateTime('%s')" % tzname if precision == 0 else "DateTime64(%d, '%s')" % (precision, tzname)


def dt_parts(t):
    """(precision, tz) of a DateTime type."""
    b = base_type(t)
    m = re.match(r"^DateTime64\((\d+)(?:,\s*'([^']*)')?\)$", b)
    if m:
        return int(m.group(1)), m.group(2) or "UTC"
    m = re.match(r"^DateTime(?:\('([^']*)'\))?$", b)
    if m:
        return 0, m.group(1) or "UTC"
    return 6, "UTC"


def with_tz(t, tzname):
    p, _ = dt_parts(t)
    nt = dt_type(p, tzname)
    return "Nullable(%s)" % nt if t.startswith("Nullable(") else nt


def int_type(v):
    if v >= 0:
        for bits in (8, 16, 32, 64):
            if v < 2 ** bits:
                return "UInt%d" % bits
        return "UInt64"
    for bits in (8, 16, 32, 64):
        if v >= -(2 ** (bits - 1)):
            return "Int%d" % bits
    return "Int64"


def type_of(name, values):
    """A type for a column the fake cannot type from the query: from its values."""
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


SCHEMA_KIND = [
    # (test on the ClickHouse type, DatabaseSchemaQuery field type)
    (lambda b: b.startswith("DateTime"), "datetime"),
    (lambda b: b == "Date", "date"),
    (lambda b: b == "Bool", "boolean"),
    (lambda b: b.startswith(("Int", "UInt")), "integer"),
    (lambda b: b.startswith("Float"), "float"),
    (lambda b: b.startswith("Decimal"), "decimal"),
    (lambda b: b.startswith("Array"), "array"),
]


# ---------- SQLite functions mirroring the ClickHouse ones HogQL exposes ----------

def _guard(fn):
    @functools.wraps(fn)
    def f(*a):
        try:
            return fn(*a)
        except (ValueError, TypeError, OverflowError, HogQLError):
            return None
    return f


@_guard
def f_dt(v, tzname="UTC"):
    """parseDateTime64BestEffort(v, 6, tz): microseconds kept."""
    if v is None:
        return None
    return canon(v, get_tz(tzname))


@_guard
def f_dt_sec(v, tzname="UTC"):
    """toDateTime(v): whole seconds."""
    if v is None:
        return None
    return canon_s(v, get_tz(tzname))


@_guard
def f_date_of_dt(c, tzname="UTC"):
    """toDate(<date-time>): its date in the value's time zone."""
    if c is None:
        return None
    return canon_dt(c).astimezone(get_tz(tzname)).strftime("%Y-%m-%d")


@_guard
def f_date_of_str(s):
    if s is None:
        return None
    return dt.date.fromisoformat(str(s).strip()[:10]).isoformat()


@_guard
def f_start_of(c, unit, tzname="UTC"):
    """toStartOfHour/Day/...(x): in x's time zone (HogQL wraps fields in
    toTimeZone(field, project tz)), as a UTC instant."""
    if c is None:
        return None
    tz = get_tz(tzname)
    d = canon_dt(c).astimezone(tz)
    if unit == "minute":
        d = d.replace(second=0, microsecond=0)
    elif unit == "hour":
        d = d.replace(minute=0, second=0, microsecond=0)
    elif unit == "day":
        d = d.replace(hour=0, minute=0, second=0, microsecond=0)
    elif unit == "week":     # toStartOfWeek: Sunday
        d = d.replace(hour=0, minute=0, second=0, microsecond=0)
        d = d - dt.timedelta(days=(d.weekday() + 1) % 7)
    elif unit == "month":
        d = d.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    elif unit == "year":
        d = d.replace(month=1, day=1, hour=0, minute=0, second=0, microsecond=0)
    if tz is not UTC:
        # wall clock -> instant, DST-correct
        d = d.replace(tzinfo=None).replace(tzinfo=tz)
    return d.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


@_guard
def f_unix_timestamp(c):
    if c is None:
        return None
    return int(canon_dt(canon(c)).timestamp() // 1)


def f_int_div(a, b):
    if a is None or b is None:
        return None
    if int(b) == 0:
        raise ValueError("Division by zero")
    q = abs(int(a)) // abs(int(b))
    return q if (int(a) >= 0) == (int(b) > 0) else -q


@_guard
def f_dt_add(c, seconds):
    if c is None or seconds is None:
        return None
    return (canon_dt(c) + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%d %H:%M:%S.%f")


DIFF_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 7 * 86400}


@_guard
def f_date_diff(unit, a, b):
    if a is None or b is None:
        return None
    unit = str(unit).lower().rstrip("s")
    if unit not in DIFF_UNITS:
        raise ValueError(unit)
    da, db = canon_dt(canon(a)), canon_dt(canon(b))
    n = DIFF_UNITS[unit]
    # ClickHouse counts boundaries crossed
    return int(db.timestamp() // n - da.timestamp() // n)


@_guard
def f_dt_text(c, tzname, precision):
    if c is None:
        return None
    d = canon_dt(c).astimezone(get_tz(tzname))
    text = d.strftime("%Y-%m-%d %H:%M:%S")
    if precision:
        text += "." + ("%06d" % d.microsecond)[:precision]
    return text


def _json_path(doc, keys):
    try:
        v = json.loads(doc)
    except (ValueError, TypeError):
        return None, False
    for k in keys:
        if isinstance(v, dict) and str(k) in v:
            v = v[str(k)]
        elif isinstance(v, list) and isinstance(k, int) and 1 <= k <= len(v):
            v = v[k - 1]
        else:
            return None, False
    return v, True


def f_prop(doc, *keys):
    """HogQL properties.a.b: the JSON value as a string (strings unquoted,
    anything else as its JSON text), NULL when missing or null."""
    if doc is None:
        return None
    v, found = _json_path(doc, keys)
    if not found or v is None:
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v, ensure_ascii=False, separators=(",", ":"))


def f_json_extract_string(doc, *keys):
    """ClickHouse's JSONExtractString: '' when missing or not a string."""
    if doc is None:
        return ""
    v, found = _json_path(doc, keys)
    return v if found and isinstance(v, str) else ""


def f_json_extract_raw(doc, *keys):
    if doc is None:
        return ""
    v, found = _json_path(doc, keys)
    return json.dumps(v, ensure_ascii=False, separators=(",", ":")) if found else ""


def f_json_has(doc, *keys):
    if doc is None:
        return 0
    return 1 if _json_path(doc, keys)[1] else 0


def f_to_uuid(v):
    if v is None:
        return None
    s = str(v).strip().lower()
    return s if UUID_RE.match(s) else None


def f_ilike(a, pattern):
    if a is None or pattern is None:
        return None
    rx = "".join(".*" if ch == "%" else "." if ch == "_" else re.escape(ch) for ch in str(pattern))
    return 1 if re.fullmatch(rx, str(a), re.I | re.S) else 0


def f_match(a, pattern):
    if a is None or pattern is None:
        return None
    return 1 if re.search(str(pattern), str(a)) else 0


def f_to_string(v):
    if v is None:
        return None
    if isinstance(v, float) and v == int(v):
        return str(int(v))
    return str(v)


def f_md5(v):
    """MD5(s): a FixedString(16), kept here as its hex"""
    if v is None:
        return None
    return hashlib.md5(str(v).encode("utf-8")).hexdigest()


def f_u32_le(v):
    """reinterpretAsUInt32 of a FixedString (hex here): its first 4 bytes, little-endian"""
    if v is None:
        return None
    return int.from_bytes(bytes.fromhex(v)[:4], "little")


def key_hash_u32(s):
    return f_u32_le(f_md5(s))


def chuuid_key(s):
    s = s.lower()
    return (s[19:], s[:18]) if len(s) == 36 else ("", s)


def chuuid_collation(a, b):
    """ClickHouse compares the second 64-bit half of a UUID first."""
    ka, kb = chuuid_key(a), chuuid_key(b)
    return (ka > kb) - (ka < kb)


class ArgAgg:
    """argMax / argMin (keeps the first value on ties, as a scan would)."""
    sign = 1
    skip_null = False

    def __init__(self):
        self.best = None
        self.value = None
        self.seen = False

    def step(self, value, key):
        if key is None or (self.skip_null and value is None):
            return
        if not self.seen or (key > self.best if self.sign > 0 else key < self.best):
            self.best, self.value, self.seen = key, value, True

    def finalize(self):
        return self.value


class ArgMax(ArgAgg):
    sign = 1


class ArgMin(ArgAgg):
    sign = -1


class ArgMaxNN(ArgMax):
    skip_null = True


class ArgMinNN(ArgMin):
    skip_null = True


class AnyAgg:
    def __init__(self):
        self.v = None

    def step(self, v):
        if self.v is None:
            self.v = v

    def finalize(self):
        return self.v


def setup_connection(db):
    db.create_collation("CHUUID", chuuid_collation)
    fns = [
        ("ch_dt", 2, f_dt), ("ch_dt_sec", 2, f_dt_sec), ("ch_date_of_dt", 2, f_date_of_dt),
        ("ch_date_of_str", 1, f_date_of_str), ("ch_start_of", 3, f_start_of),
        ("ch_unix_timestamp", 1, f_unix_timestamp), ("ch_int_div", 2, f_int_div),
        ("ch_dt_add", 2, f_dt_add), ("ch_date_diff", 3, f_date_diff), ("ch_dt_text", 3, f_dt_text),
        ("ch_prop", -1, f_prop), ("ch_json_extract_string", -1, f_json_extract_string),
        ("ch_json_extract_raw", -1, f_json_extract_raw), ("ch_json_has", -1, f_json_has),
        ("ch_uuid", 1, f_to_uuid), ("ch_ilike", 2, f_ilike), ("ch_match", 2, f_match),
        ("ch_to_string", 1, f_to_string), ("ch_md5", 1, f_md5), ("ch_u32_le", 1, f_u32_le),
    ]
    for name, n, fn in fns:
        db.create_function(name, n, fn, deterministic=True)
    db.create_function("ch_now", 0, now_canon)
    db.create_aggregate("ch_argmax", 2, ArgMax)
    db.create_aggregate("ch_argmin", 2, ArgMin)
    db.create_aggregate("ch_argmax_nn", 2, ArgMaxNN)
    db.create_aggregate("ch_argmin_nn", 2, ArgMinNN)
    db.create_aggregate("ch_any", 1, AnyAgg)
    db.execute("PRAGMA case_sensitive_like = ON")


# ---------- the tables the fake serves ----------

class Col:
    """One HogQL column: its SQLite expression (on the table's alias), its
    ClickHouse type ({tz} is the query's time zone), whether it is JSON
    text (properties.x works on it)."""

    def __init__(self, name, chtype, json_=False, sql=None, hidden=False, schema=None):
        self.name = name
        self.chtype = chtype
        self.json = json_
        self.sql = sql or '"%s"' % name
        self.hidden = hidden
        self.schema = schema

    def type_for(self, tzname):
        return self.chtype.replace("{tz}", "'%s'" % tzname)


class Table:
    def __init__(self, name, sqlname, cols, kind="posthog", scanned=False, description=None):
        self.name = name
        self.sqlname = sqlname
        self.cols = {c.name: c for c in cols}
        self.order = [c.name for c in cols if not c.hidden]
        self.kind = kind
        self.scanned = scanned    # the events table: queries on it are charged


DT6 = "DateTime64(6, {tz})"
NDT6 = "Nullable(DateTime64(6, {tz}))"
TABLES = {t.name: t for t in [
    Table("events", "events", [
        Col("uuid", "UUID"), Col("event", "String"), Col("properties", "String", json_=True),
        Col("timestamp", DT6), Col("distinct_id", "String"), Col("elements_chain", "String"),
        Col("created_at", DT6), Col("$session_id", "String"), Col("$window_id", "String"),
        Col("person_id", "UUID"),
    ], scanned=True),
    Table("persons", "persons_visible", [
        Col("id", "UUID"), Col("created_at", "DateTime64(3, {tz})"),
        Col("properties", "String", json_=True), Col("is_identified", "Int8", schema="boolean"),
    ]),
    # person_distinct_ids is PostHog's argMax of this by version, without
    # the deleted (posthog/hogql/database/schema/person_distinct_ids.py)
    Table("raw_person_distinct_ids", "raw_person_distinct_ids", [
        Col("distinct_id", "String"), Col("person_id", "UUID"), Col("version", "Int64"),
        Col("is_deleted", "Int8", schema="boolean"),
    ]),
    Table("person_distinct_ids", "person_distinct_ids_current", [
        Col("distinct_id", "String"), Col("person_id", "UUID"),
    ]),
    Table("groups", "groups", [
        Col("index", "UInt8"), Col("key", "String"), Col("created_at", "DateTime64(3, {tz})"),
        Col("updated_at", "DateTime({tz})"), Col("properties", "String", json_=True),
    ]),
    Table("sessions", "sessions", [
        Col("id", "String"), Col("session_id", "String"), Col("distinct_id", "String"),
        Col("$start_timestamp", DT6), Col("$end_timestamp", DT6),
        Col("max_inserted_at", DT6), Col("$urls", "Array(String)"),
        Col("$num_uniq_urls", "UInt64"), Col("$entry_current_url", "Nullable(String)"),
        Col("$end_current_url", "Nullable(String)"),
        Col("$pageview_count", "UInt64"), Col("$autocapture_count", "UInt64"),
        Col("$screen_count", "UInt64"), Col("$session_duration", "Int64"),
        Col("duration", "Int64", sql='"$session_duration"'),
        Col("$is_bounce", "Nullable(UInt8)", schema="boolean"),
    ], scanned=True),
    Table("cohort_people", "cohort_people", [
        Col("person_id", "UUID", schema="string"), Col("cohort_id", "Int64"),
    ]),
    Table("static_cohort_people", "static_cohort_people", [
        Col("person_id", "UUID", schema="string"), Col("cohort_id", "Int64"),
    ]),
    Table("system.cohorts", "system_cohorts", [
        Col("id", "Int64"), Col("name", "Nullable(String)"), Col("description", "Nullable(String)"),
        Col("deleted", "Nullable(Int64)"), Col("filters", "Nullable(String)", json_=True),
        Col("groups", "Nullable(String)", json_=True), Col("query", "Nullable(String)", json_=True),
        Col("created_at", NDT6), Col("last_calculation", NDT6),
        Col("version", "Nullable(Int64)"), Col("count", "Nullable(Int64)"),
        Col("is_static", "Nullable(Int64)"),
    ], kind="system"),
    Table("system.feature_flags", "system_feature_flags", [
        Col("id", "Int64"), Col("key", "String"), Col("name", "String"),
        Col("filters", "String", json_=True), Col("rollout_percentage", "Nullable(Int64)"),
        Col("created_by_id", "Nullable(Int64)"), Col("created_at", DT6),
        Col("deleted", "Nullable(Int64)"),
    ], kind="system"),
    Table("system.experiments", "system_experiments", [
        Col("id", "Int64"), Col("name", "String"), Col("description", "Nullable(String)"),
        Col("created_by_id", "Nullable(Int64)"), Col("created_at", DT6), Col("updated_at", DT6),
        Col("filters", "String", json_=True), Col("parameters", "Nullable(String)", json_=True),
        Col("start_date", NDT6), Col("end_date", NDT6), Col("archived", "Nullable(Int64)"),
        Col("feature_flag_id", "Int64"),
    ], kind="system"),
    Table("system.surveys", "system_surveys", [
        Col("id", "UUID"), Col("name", "String"), Col("type", "String"),
        Col("questions", "Nullable(String)", json_=True), Col("appearance", "Nullable(String)", json_=True),
        Col("start_date", NDT6), Col("end_date", NDT6), Col("created_by_id", "Nullable(Int64)"),
        Col("created_at", DT6),
    ], kind="system"),
]}
# flags stored as 0/1 (PostHog: toInt(_flag)); JSON text columns; date-times
SYSTEM_FLAGS = {"deleted", "archived", "is_static"}

SCHEMA_SQL = """
CREATE TABLE events (
    uuid TEXT COLLATE CHUUID NOT NULL, event TEXT, properties TEXT, timestamp TEXT,
    distinct_id TEXT, person_id TEXT COLLATE CHUUID, elements_chain TEXT,
    created_at TEXT NOT NULL, "$session_id" TEXT, "$window_id" TEXT);
CREATE INDEX events_created ON events (created_at, uuid);
CREATE INDEX events_ts ON events (timestamp);
CREATE INDEX events_session ON events ("$session_id");
CREATE TABLE persons (
    id TEXT COLLATE CHUUID PRIMARY KEY, created_at TEXT NOT NULL,
    is_identified INTEGER, properties TEXT);
CREATE TABLE raw_person_distinct_ids (
    distinct_id TEXT NOT NULL, person_id TEXT COLLATE CHUUID NOT NULL, version INTEGER NOT NULL,
    is_deleted INTEGER NOT NULL DEFAULT 0);
CREATE VIEW person_distinct_ids_current AS
SELECT distinct_id, ch_argmax(person_id, version) AS person_id FROM raw_person_distinct_ids
GROUP BY distinct_id HAVING ch_argmax(is_deleted, version) = 0;
CREATE TABLE groups (
    "index" INTEGER NOT NULL, key TEXT NOT NULL, created_at TEXT, updated_at TEXT,
    properties TEXT, PRIMARY KEY ("index", key));
CREATE TABLE cohort_members (cohort_id INTEGER NOT NULL, person_id TEXT COLLATE CHUUID NOT NULL);
CREATE TABLE static_cohort_people (person_id TEXT COLLATE CHUUID NOT NULL, cohort_id INTEGER NOT NULL);
CREATE TABLE system_cohorts (
    id INTEGER PRIMARY KEY, name TEXT, description TEXT, deleted INTEGER DEFAULT 0,
    filters TEXT, "groups" TEXT, query TEXT, created_at TEXT, last_calculation TEXT,
    version INTEGER, count INTEGER, is_static INTEGER DEFAULT 0);
CREATE TABLE system_feature_flags (
    id INTEGER PRIMARY KEY, key TEXT, name TEXT, filters TEXT, rollout_percentage INTEGER,
    created_by_id INTEGER, created_at TEXT, deleted INTEGER DEFAULT 0);
CREATE TABLE system_experiments (
    id INTEGER PRIMARY KEY, name TEXT, description TEXT, created_by_id INTEGER,
    created_at TEXT, updated_at TEXT, filters TEXT, parameters TEXT, start_date TEXT,
    end_date TEXT, archived INTEGER DEFAULT 0, feature_flag_id INTEGER);
CREATE TABLE system_surveys (
    id TEXT COLLATE CHUUID PRIMARY KEY, name TEXT, type TEXT, questions TEXT, appearance TEXT,
    start_date TEXT, end_date TEXT, created_by_id INTEGER, created_at TEXT);
-- PostHog's sessions (v2) are computed from the events when a query runs
CREATE VIEW sessions AS
SELECT "$session_id" AS id, "$session_id" AS session_id,
       ch_argmin(distinct_id, timestamp) AS distinct_id,
       min(timestamp) AS "$start_timestamp", max(timestamp) AS "$end_timestamp",
       max(created_at) AS max_inserted_at,
       json_group_array(DISTINCT json_extract(properties, '$."$current_url"'))
           FILTER (WHERE json_extract(properties, '$."$current_url"') IS NOT NULL) AS "$urls",
       count(DISTINCT json_extract(properties, '$."$current_url"')) AS "$num_uniq_urls",
       ch_argmin_nn(json_extract(properties, '$."$current_url"'), timestamp) AS "$entry_current_url",
       ch_argmax_nn(json_extract(properties, '$."$current_url"'), timestamp) AS "$end_current_url",
       count(DISTINCT CASE WHEN event = '$pageview' THEN uuid END) AS "$pageview_count",
       count(DISTINCT CASE WHEN event = '$autocapture' THEN uuid END) AS "$autocapture_count",
       count(DISTINCT CASE WHEN event = '$screen' THEN uuid END) AS "$screen_count",
       ch_date_diff('second', min(timestamp), max(timestamp)) AS "$session_duration",
       CASE WHEN count(DISTINCT CASE WHEN event IN ('$pageview', '$screen', '$autocapture') THEN uuid END) = 0
            THEN NULL
            WHEN count(DISTINCT CASE WHEN event IN ('$pageview', '$screen', '$autocapture') THEN uuid END) <= 1
                 AND ch_date_diff('second', min(timestamp), max(timestamp)) < 10 THEN 1
            ELSE 0 END AS "$is_bounce"
FROM events WHERE "$session_id" IS NOT NULL AND "$session_id" != ''
GROUP BY "$session_id";
-- PostHog's persons table drops persons created more than a day in the future
CREATE VIEW persons_visible AS
SELECT * FROM persons WHERE created_at <= ch_dt_add(ch_now(), 86400);
-- current members of each dynamic cohort that is not deleted
CREATE VIEW cohort_people AS
SELECT DISTINCT m.person_id AS person_id, m.cohort_id AS cohort_id
FROM cohort_members m JOIN system_cohorts c ON c.id = m.cohort_id
WHERE coalesce(c.deleted, 0) = 0 AND coalesce(c.is_static, 0) = 0;
"""


# ---------- PostHog's parser, through node ----------

class Parser:
    """One long-lived node process running PostHog's own HogQL parser
    (test/hogql/parse.mjs, @posthog/hogql-parser).  ASTs are cached by text:
    phsync sends the same query text with other values."""

    def __init__(self, node=None):
        hogql = os.path.join(HERE, "hogql")
        node = node or os.environ.get("PHSYNC_NODE") or shutil.which("node") or shutil.which("nodejs")
        if not node:
            raise SystemExit("fake_posthog: node is not installed; the fake parses HogQL with PostHog's "
                             "parser (@posthog/hogql-parser). Run test/install-deps.sh as root "
                             "(apt nodejs npm, then npm ci --prefix test/hogql).")
        pkg = os.path.join(hogql, "node_modules", "@posthog", "hogql-parser", "package.json")
        if not os.path.exists(pkg):
            raise SystemExit("fake_posthog: %s is missing; run: npm ci --prefix %s" % (pkg, hogql))
        self.cmd = [node, os.path.join(hogql, "parse.mjs")]
        self.cwd = hogql
        self.lock = threading.Lock()
        self.cache = {}
        self.n = 0
        self.start()

    def start(self):
        try:
            self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        except OSError as e:
            raise SystemExit("fake_posthog: cannot run %s: %s; run test/install-deps.sh" % (self.cmd[0], e))
        line = self.proc.stdout.readline()
        try:
            ready = json.loads(line).get("ready")
        except (ValueError, AttributeError):
            ready = False
        if not ready:
            raise SystemExit("fake_posthog: the HogQL parser did not start (%s): %r; run "
                             "test/install-deps.sh" % (" ".join(self.cmd), line[:500]))

    def parse(self, text):
        with self.lock:
            ast = self.cache.get(text)
            if ast is not None:
                return ast
            line = b""
            for attempt in (1, 2):
                self.n += 1
                try:
                    self.proc.stdin.write((json.dumps({"id": self.n, "query": text}) + "\n").encode("utf-8"))
                    self.proc.stdin.flush()
                    line = self.proc.stdout.readline()
                except OSError:
                    line = b""
                if line:
                    break
                self.start()        # the node process died: once more with a new one
            if not line:
                raise HogQLError("the fake's HogQL parser process died")
            ast = json.loads(line)["ast"]
            if len(self.cache) > 2000:
                self.cache.clear()
            self.cache[text] = ast
            return ast


# ---------- HogQL AST -> SQLite ----------

class E:
    """A translated expression."""
    __slots__ = ("sql", "type", "json", "items", "agg")

    def __init__(self, sql, type_=None, json_=False, items=None, agg=False):
        self.sql = sql
        self.type = type_
        self.json = json_
        self.items = items
        self.agg = agg


class Source:
    def __init__(self, alias, sqlalias, cols, table=None):
        self.alias = alias
        self.sqlalias = sqlalias
        self.cols = cols          # name -> E
        self.order = list(cols)
        self.table = table


class Ctx:
    def __init__(self):
        self.sources = []
        self.alias_nodes = {}
        self.alias_done = {}
        self.resolving = set()


COMPARE_SQL = {"==": "=", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
ARITH_NAME = {"+": "plus", "-": "minus", "*": "multiply", "/": "divide", "%": "modulo"}
COMPARE_NAME = {"==": "equals", "!=": "notEquals", "<": "less", "<=": "lessOrEquals", ">": "greater",
                ">=": "greaterOrEquals", "like": "like", "ilike": "ilike", "not like": "notLike",
                "not ilike": "notILike", "in": "in", "not in": "notIn", "=~": "match"}
OP_FUNCTIONS = dict([(v, ("CompareOperation", k)) for k, v in COMPARE_NAME.items()] +
                    [(v, ("ArithmeticOperation", k)) for k, v in ARITH_NAME.items()])
INTERVALS = {"toIntervalSecond": 1, "toIntervalMinute": 60, "toIntervalHour": 3600,
             "toIntervalDay": 86400, "toIntervalWeek": 7 * 86400}
IDENT_RE = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]*$")


def placeholder_name(node):
    e = node.get("expr") or node.get("field")
    if isinstance(e, dict):
        return ".".join(str(x) for x in e.get("chain") or [])
    return str(e)


def hogql_text(node):
    """The column name PostHog gives an expression without an alias: the
    expression printed back as HogQL."""
    n = node.get("node")
    if n == "Alias":
        return node["alias"]
    if n == "Field":
        chain = [str(c) for c in node["chain"]]
        if chain == ["*"]:
            return "*"
        return ".".join(c if IDENT_RE.match(c) else "`%s`" % c.replace("`", "``") for c in chain)
    if n == "Constant":
        v = node.get("value")
        if v is None:
            return "NULL"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return "'%s'" % v.replace("\\", "\\\\").replace("'", "\\'")
        return str(v)
    if n == "Call":
        args = ", ".join(hogql_text(a) for a in node.get("args") or [])
        return "%s(%s%s)" % (node["name"], "DISTINCT " if node.get("distinct") else "", args)
    if n == "ArithmeticOperation":
        return "%s(%s, %s)" % (ARITH_NAME.get(node["op"], node["op"]), hogql_text(node["left"]),
                               hogql_text(node["right"]))
    if n == "CompareOperation":
        return "%s(%s, %s)" % (COMPARE_NAME.get(node["op"], node["op"]), hogql_text(node["left"]),
                               hogql_text(node["right"]))
    if n == "Placeholder":
        return "{%s}" % placeholder_name(node)
    if n in ("And", "Or"):
        return "%s(%s)" % (n.lower(), ", ".join(hogql_text(e) for e in node["exprs"]))
    if n == "Not":
        return "not(%s)" % hogql_text(node["expr"])
    if n == "ArrayAccess":
        return "%s[%s]" % (hogql_text(node["array"]), hogql_text(node["property"]))
    if n in ("Tuple", "Array"):
        inner = ", ".join(hogql_text(e) for e in node["exprs"])
        return "tuple(%s)" % inner if n == "Tuple" else "[%s]" % inner
    return n


class Translator:
    """Translates one parsed SelectQuery to SQLite SQL with its values bound
    as parameters, typing every output column as ClickHouse would."""

    def __init__(self, values, tzname, config=None, text=None):
        self.values = values
        self.tz = tzname
        self.config = config or {}    # the fake's settings (the answer's shape)
        self.text = text
        self.params = {}
        self.pn = 0
        self.tn = 0
        self.scans = []           # (lo, hi) canonical bounds on timestamp per events read
        self.had_limit = False

    def param(self, v):
        name = "p%d" % self.pn
        self.pn += 1
        self.params[name] = v
        return ":" + name

    # ----- queries -----
    def query(self, node, top=False, row_cap=None):
        kind = node.get("node")
        if kind == "SelectSetQuery":
            sql, cols = self.select(node["initial_select_query"])
            for sub in node.get("subsequent_select_queries") or []:
                op = (sub.get("set_operator") or "UNION ALL").upper()
                if op not in ("UNION ALL", "UNION DISTINCT", "INTERSECT", "EXCEPT", "INTERSECT DISTINCT",
                              "EXCEPT DISTINCT"):
                    raise HogQLError("Unsupported set operator: %s" % op)
                s2, _ = self.select(sub["select_query"])
                sql = "%s %s %s" % (sql, op if op == "UNION ALL" else op.replace(" DISTINCT", ""), s2)
            if top:
                sql = "SELECT * FROM (%s) %s" % (sql, self.limit_sql(None, top, row_cap))
            return sql, cols
        if kind != "SelectQuery":
            raise HogQLError("Expected a SELECT query, got %s" % kind)
        return self.select(node, top, row_cap)

    def limit_sql(self, node, top, row_cap):
        if node is None:
            if top:
                return "LIMIT %d" % (DEFAULT_LIMIT + 1)
            return ""
        n = self.const_value(node)
        if isinstance(n, bool) or not isinstance(n, int):
            raise HogQLError("LIMIT must be a constant integer")
        if top:
            self.had_limit = True
            n = min(n, row_cap)
        return "LIMIT %d" % n

    def select(self, node, top=False, row_cap=None):
        if node.get("offset") is not None:
            raise HogQLError(OFFSET_TEXT)
        for k in ("ctes", "prewhere", "qualify", "window_exprs", "array_join_op", "limit_by"):
            if node.get(k):
                raise HogQLError("The fake PostHog does not support %s in a query" % k.upper())
        ctx = Ctx()
        from_sql = self.from_clause(node.get("select_from"), ctx)
        for item in node.get("select") or []:
            if item.get("node") == "Alias":
                ctx.alias_nodes[item["alias"]] = item["expr"]
        outs = []
        cols = []
        for item in node.get("select") or []:
            if item.get("node") == "Field" and item["chain"][-1] == "*":
                srcs = ctx.sources
                if len(item["chain"]) > 1:
                    srcs = [s for s in ctx.sources if s.alias == item["chain"][0]]
                    if not srcs:
                        raise HogQLError("Unable to resolve field: %s" % item["chain"][0])
                if not srcs:
                    raise HogQLError("Cannot select * without a FROM clause")
                for s in srcs:
                    for name in s.order:
                        e = s.cols[name]
                        outs.append('%s AS "%s"' % (e.sql, name.replace('"', '""')))
                        cols.append((name, e.type, e.json))
                continue
            if item.get("node") == "Alias":
                name = item["alias"]
                e = self.alias(name, ctx)
            else:
                e = self.expr(item, ctx)
                if item.get("node") == "Field" and not e.sql.startswith("ch_prop("):
                    name = str(item["chain"][-1])
                else:
                    name = hogql_text(item)
            outs.append('%s AS "%s"' % (e.sql, name.replace('"', '""')))
            cols.append((name, e.type, e.json))
        sql = "SELECT %s%s" % ("DISTINCT " if node.get("distinct") else "", ", ".join(outs) or "1")
        if from_sql:
            sql += " FROM " + from_sql
        where = node.get("where")
        if where is not None:
            sql += " WHERE " + self.expr(where, ctx).sql
        for s in ctx.sources:
            if s.table is not None and s.table.scanned:
                self.scans.append(self.bounds(where, s) if s.table.name == "events" else (None, None))
        if node.get("group_by"):
            sql += " GROUP BY " + ", ".join(self.expr(g, ctx).sql for g in node["group_by"])
        if node.get("having") is not None:
            sql += " HAVING " + self.expr(node["having"], ctx).sql
        if node.get("order_by"):
            terms = []
            for o in node["order_by"]:
                e = self.expr(o["expr"], ctx)
                terms.append("%s%s %s NULLS LAST" % (e.sql, " COLLATE CHUUID" if is_uuid(e.type) else "",
                                                     "DESC" if o.get("order") == "DESC" else "ASC"))
            sql += " ORDER BY " + ", ".join(terms)
        lim = self.limit_sql(node.get("limit"), top, row_cap)
        if lim:
            sql += " " + lim
        return sql, cols

    def from_clause(self, j, ctx):
        parts = []
        first = True
        while j:
            if j.get("node") != "JoinExpr":
                raise HogQLError("Unsupported FROM clause")
            t = j["table"]
            alias = j.get("alias")
            sqlalias = "t%d" % self.tn
            self.tn += 1
            if t.get("node") == "Field":
                tname = ".".join(str(x) for x in t["chain"])
                table = TABLES.get(tname)
                if table is None:
                    raise HogQLError("Unknown table `%s`." % tname)
                cols = {}
                for name in table.order:
                    c = table.cols[name]
                    cols[name] = E("%s.%s" % (sqlalias, c.sql), c.type_for(self.tz), c.json)
                src = Source(alias or str(t["chain"][-1]), sqlalias, cols, table)
                text = "%s AS %s" % (table.sqlname, sqlalias)
            elif t.get("node") in ("SelectQuery", "SelectSetQuery"):
                sub_sql, sub_cols = self.query(t)
                cols = {}
                for name, type_, js in sub_cols:
                    cols[name] = E('%s."%s"' % (sqlalias, name.replace('"', '""')), type_, js)
                src = Source(alias, sqlalias, cols)
                text = "(%s) AS %s" % (sub_sql, sqlalias)
            elif t.get("node") == "Placeholder":
                raise HogQLError("Placeholders are not allowed as table names")
            else:
                raise HogQLError("Unsupported table expression: %s" % t.get("node"))
            ctx.sources.append(src)
            if first:
                parts.append(text)
            else:
                jt = (j.get("join_type") or "JOIN").upper()
                jt = re.sub(r"\b(GLOBAL|ANY|ALL|ASOF|SEMI|ANTI)\b", "", jt).split()
                jt = " ".join(jt) or "JOIN"
                on = ""
                cons = j.get("constraint")
                if cons:
                    if (cons.get("constraint_type") or "ON").upper() == "USING":
                        raise HogQLError("JOIN ... USING is not supported by the fake PostHog")
                    on = " ON " + self.expr(cons["expr"], ctx).sql
                elif "CROSS" not in jt:
                    raise HogQLError("JOIN needs an ON clause")
                parts.append("%s %s%s" % (jt, text, on))
            first = False
            j = j.get("next_join")
        return " ".join(parts)

    # ----- the cost model: bounds on events.timestamp -----
    def bounds(self, where, src):
        lo = hi = None
        conj = []

        def flat(n):
            if n is None:
                return
            if n.get("node") == "And":
                for e in n["exprs"]:
                    flat(e)
            else:
                conj.append(n)
        flat(where)

        def is_ts(n):
            if n.get("node") != "Field":
                return False
            ch = n["chain"]
            return ch == ["timestamp"] or (len(ch) == 2 and ch[0] == src.alias and ch[1] == "timestamp")

        for c in conj:
            pairs = []
            if c.get("node") == "CompareOperation" and c["op"] in (">", ">=", "<", "<=", "=="):
                op = c["op"]
                if is_ts(c["left"]):
                    pairs.append((op, c["right"]))
                elif is_ts(c["right"]):
                    pairs.append(({">": "<", ">=": "<=", "<": ">", "<=": ">=", "==": "=="}[op], c["left"]))
            elif c.get("node") == "BetweenExpr" and not c.get("negated") and is_ts(c["expr"]):
                pairs += [(">=", c["low"]), ("<=", c["high"])]
            for op, other in pairs:
                try:
                    v = canon(self.const_value(other, as_time=True), get_tz(self.tz))
                except (HogQLError, ValueError, TypeError):
                    continue
                if op in (">", ">=", "=="):
                    lo = v if lo is None else max(lo, v)
                if op in ("<", "<=", "=="):
                    hi = v if hi is None else min(hi, v)
        return lo, hi

    def const_value(self, n, as_time=False):
        """The value of a constant expression: a constant, a placeholder, or
        a date-time conversion of one."""
        kind = n.get("node")
        if kind == "Constant":
            return n.get("value")
        if kind == "Placeholder":
            name = placeholder_name(n)
            if name not in self.values:
                raise HogQLError("Global variable not found: %s" % name)
            return self.values[name]
        if kind == "Call" and n["name"] in ("toDateTime", "toDateTime64", "parseDateTime64BestEffort",
                                            "parseDateTimeBestEffort", "toTimeZone") and n.get("args"):
            v = self.const_value(n["args"][0])
            return canon(v, get_tz(self.tz))
        raise HogQLError("not a constant")

    # ----- expressions -----
    def alias(self, name, ctx):
        if name in ctx.alias_done:
            return ctx.alias_done[name]
        ctx.resolving.add(name)
        try:
            e = self.expr(ctx.alias_nodes[name], ctx)
        finally:
            ctx.resolving.discard(name)
        ctx.alias_done[name] = e
        return e

    def field(self, chain, ctx):
        chain = [c for c in chain]
        name = str(chain[0])
        col = None
        rest = []
        if name in ctx.alias_nodes and name not in ctx.resolving:
            col, rest = self.alias(name, ctx), chain[1:]
        else:
            if len(chain) >= 2:
                for s in ctx.sources:
                    if s.alias == name or (s.table is not None and s.table.name == name):
                        if str(chain[1]) not in s.cols:
                            raise HogQLError("Unable to resolve field: %s" % chain[1])
                        col, rest = s.cols[str(chain[1])], chain[2:]
                        break
            if col is None:
                for s in ctx.sources:
                    if name in s.cols:
                        col, rest = s.cols[name], chain[1:]
                        break
        if col is None:
            raise HogQLError("Unable to resolve field: %s" % name)
        if not rest:
            return col
        if not col.json:
            raise HogQLError("Unable to resolve field: %s" % ".".join(str(c) for c in chain))
        keys = ", ".join(self.param(k) for k in rest)
        return E("ch_prop(%s, %s)" % (col.sql, keys), "Nullable(String)", True)

    def expr(self, n, ctx):
        kind = n.get("node")
        if kind == "Constant":
            v = n.get("value")
            if v is None:
                return E("NULL", "Nullable(Nothing)")
            if isinstance(v, bool):
                return E("1" if v else "0", "Bool")
            if isinstance(v, int):
                return E(str(v), int_type(v))
            if isinstance(v, float):
                return E(self.param(v), "Float64")
            return E(self.param(str(v)), "String")
        if kind == "Placeholder":
            name = placeholder_name(n)
            if name not in self.values:
                raise HogQLError("Global variable not found: %s" % name)
            return self.value_expr(self.values[name])
        if kind == "Field":
            return self.field(n["chain"], ctx)
        if kind == "Alias":
            return self.expr(n["expr"], ctx)
        if kind in ("And", "Or"):
            parts = [self.expr(e, ctx) for e in n["exprs"]]
            return E("(%s)" % (" %s " % kind.upper()).join(p.sql for p in parts), "UInt8",
                     agg=any(p.agg for p in parts))
        if kind == "Not":
            e = self.expr(n["expr"], ctx)
            return E("(NOT %s)" % e.sql, "UInt8", agg=e.agg)
        if kind == "CompareOperation":
            return self.compare(n["op"], self.expr(n["left"], ctx), n["right"], ctx)
        if kind == "BetweenExpr":
            e = self.expr(n["expr"], ctx)
            lo = self.coerce(e, self.expr(n["low"], ctx))
            hi = self.coerce(e, self.expr(n["high"], ctx))
            return E("(%s %sBETWEEN %s AND %s)" % (e.sql, "NOT " if n.get("negated") else "", lo.sql, hi.sql),
                     "UInt8")
        if kind == "ArithmeticOperation":
            return self.arith(n["op"], self.expr(n["left"], ctx), self.expr(n["right"], ctx))
        if kind in ("Tuple", "Array"):
            items = [self.expr(e, ctx) for e in n["exprs"]]
            t = items[0].type if items else "Nothing"
            return E("json_array(%s)" % ", ".join(i.sql for i in items), "Array(%s)" % t, items=items)
        if kind == "Call":
            return self.call(n, ctx)
        if kind == "ArrayAccess":
            # properties['$x'] on JSON text; arr[i] (1-based) on an array
            a = self.expr(n["array"], ctx)
            k = self.expr(n["property"], ctx)
            if a.json:
                inner = a.sql
                if inner.startswith("ch_prop(") and inner.endswith(")"):
                    return E("%s, %s)" % (inner[:-1], k.sql), "Nullable(String)", True)
                return E("ch_prop(%s, %s)" % (a.sql, k.sql), "Nullable(String)", True)
            if is_array(a.type):
                inner = base_type(a.type)[6:-1]
                return E("json_extract(%s, '$[' || (%s - 1) || ']')" % (a.sql, k.sql), inner, agg=a.agg)
            raise HogQLError("Can not access a property of a non-JSON, non-array value")
        if kind in ("SelectQuery", "SelectSetQuery"):
            sql, cols = self.query(n)
            return E("(%s)" % sql, cols[0][1] if cols else None, items=None)
        raise HogQLError("The fake PostHog does not support %s expressions" % kind)

    def value_expr(self, v):
        if v is None:
            return E("NULL", "Nullable(Nothing)")
        if isinstance(v, bool):
            return E("1" if v else "0", "Bool")
        if isinstance(v, int):
            return E(self.param(v), int_type(v))
        if isinstance(v, float):
            return E(self.param(v), "Float64")
        if isinstance(v, (list, tuple)):
            items = [self.value_expr(x) for x in v]
            t = items[0].type if items else "Nothing"
            return E("json_array(%s)" % ", ".join(i.sql for i in items), "Array(%s)" % t, items=items)
        if isinstance(v, dict):
            return E(self.param(json.dumps(v)), "String")
        return E(self.param(str(v)), "String")

    def coerce(self, target, e):
        """ClickHouse converts a string compared with a date-time or a UUID."""
        if is_dt(target.type) and (is_string(e.type) or e.type == "Nullable(Nothing)") and e.sql != "NULL":
            _, tzname = dt_parts(target.type)
            return E("ch_dt(%s, '%s')" % (e.sql, tzname), target.type)
        if is_uuid(target.type) and is_string(e.type):
            return E("ch_uuid(%s)" % e.sql, "UUID")
        return e

    def compare(self, op, left, right_node, ctx):
        if op in ("in", "not in", "globalIn", "globalNotIn"):
            neg = "not" in op.lower()
            r = self.expr(right_node, ctx) if right_node.get("node") not in ("SelectQuery", "SelectSetQuery") \
                else None
            if r is None:
                sub, _ = self.query(right_node)
                rhs = "(%s)" % sub
            elif r.items is not None:
                rhs = "(%s)" % ", ".join(self.coerce(left, i).sql for i in r.items)
            else:
                rhs = "(%s)" % self.coerce(left, r).sql
            coll = " COLLATE CHUUID" if is_uuid(left.type) else ""
            return E("(%s%s %sIN %s)" % (left.sql, coll, "NOT " if neg else "", rhs), "UInt8", agg=left.agg)
        right = self.expr(right_node, ctx)
        if op in COMPARE_SQL:
            right = self.coerce(left, right)
            left = self.coerce(right, left)
            coll = " COLLATE CHUUID" if is_uuid(left.type) or is_uuid(right.type) else ""
            return E("(%s%s %s %s)" % (left.sql, coll, COMPARE_SQL[op], right.sql), "UInt8",
                     agg=left.agg or right.agg)
        if op in ("like", "not like"):
            return E("(%s %sLIKE %s)" % (left.sql, "NOT " if op == "not like" else "", right.sql), "UInt8")
        if op in ("ilike", "not ilike"):
            return E("(%sch_ilike(%s, %s))" % ("NOT " if op == "not ilike" else "", left.sql, right.sql), "UInt8")
        if op in ("=~", "!~", "=~*", "!~*"):
            pat = right.sql if "*" not in op else "'(?i)' || %s" % right.sql
            return E("(%sch_match(%s, %s))" % ("NOT " if op.startswith("!") else "", left.sql, pat), "UInt8")
        raise HogQLError("Unsupported comparison operator: %s" % op)

    def arith(self, op, a, b):
        if b.type == "IntervalSecond" and is_dt(a.type) and op in ("+", "-"):
            return E("ch_dt_add(%s, %s%s)" % (a.sql, "-" if op == "-" else "", b.sql), a.type)
        if a.type == "IntervalSecond" and is_dt(b.type) and op == "+":
            return E("ch_dt_add(%s, %s)" % (b.sql, a.sql), b.type)
        fl = is_float(a.type) or is_float(b.type)
        agg = a.agg or b.agg
        if op == "/":
            return E("(CAST(%s AS REAL) / %s)" % (a.sql, b.sql), "Float64", agg=agg)
        if op == "%":
            return E("(%s %% %s)" % (a.sql, b.sql), "Float64" if fl else "Int64", agg=agg)
        return E("(%s %s %s)" % (a.sql, op, b.sql), "Float64" if fl else "Int64", agg=agg)

    def call(self, n, ctx):
        name = n["name"]
        raw = n.get("args") or []
        # HogQL's function forms of the operators: not(x), equals(a, b), plus(a, b)...
        low = name.lower()
        if low in ("and", "or") and raw:
            return self.expr({"node": low.capitalize(), "exprs": raw}, ctx)
        if low == "not" and len(raw) == 1:
            return self.expr({"node": "Not", "expr": raw[0]}, ctx)
        if name in OP_FUNCTIONS and len(raw) == 2:
            kind, op = OP_FUNCTIONS[name]
            return self.expr({"node": kind, "op": op, "left": raw[0], "right": raw[1]}, ctx)
        if n.get("params"):
            raise HogQLError("Parametric function calls are not supported by the fake PostHog: %s" % name)
        raw = n.get("args") or []
        fn = FUNCTIONS.get(name) or FUNCTIONS_CI.get(name.lower())
        if fn is None:
            raise HogQLError("Unsupported function call '%s(...)'" % name)
        return fn(self, n, raw, ctx)


# ----- functions: name -> handler(translator, node, raw args, ctx) -> E -----

def _args(tr, raw, ctx, lo, hi=None):
    hi = lo if hi is None else hi
    if not lo <= len(raw) <= hi:
        raise HogQLError("Function takes %s arguments" % (lo if lo == hi else "%d to %d" % (lo, hi)))
    return [tr.expr(a, ctx) for a in raw]


def _const_str(tr, node):
    v = tr.const_value(node)
    if not isinstance(v, str):
        raise HogQLError("Expected a constant string")
    return v


def fn_to_datetime(tr, n, raw, ctx):
    if not raw:
        raise HogQLError("toDateTime needs an argument")
    tzname = tr.tz
    if len(raw) >= 2 and n["name"] in ("toDateTime", "parseDateTimeBestEffort"):
        tzname = _const_str(tr, raw[1])
        get_tz(tzname)
    if n["name"] in ("toDateTime64", "parseDateTime64BestEffort") and len(raw) >= 3:
        tzname = _const_str(tr, raw[2])
        get_tz(tzname)
    a = tr.expr(raw[0], ctx)
    if raw[0].get("node") in ("Constant", "Placeholder") or n["name"] in ("toDateTime64",
                                                                       "parseDateTime64BestEffort"):
        # HogQL: parseDateTime64BestEffort(s, 6, tz): microseconds kept
        if is_dt(a.type):
            return E(a.sql, with_tz(a.type, tzname))
        return E("ch_dt(%s, '%s')" % (a.sql, tzname), dt_type(6, tzname))
    if is_dt(a.type):
        return E("ch_dt_sec(%s, 'UTC')" % a.sql, dt_type(0, tzname), agg=a.agg)
    return E("ch_dt_sec(%s, '%s')" % (a.sql, tzname), dt_type(0, tzname), agg=a.agg)


def fn_to_timezone(tr, n, raw, ctx):
    a = _args(tr, raw[:1], ctx, 1)[0]
    tzname = _const_str(tr, raw[1])
    get_tz(tzname)
    if not is_dt(a.type):
        a = E("ch_dt(%s, '%s')" % (a.sql, tr.tz), dt_type(6, tr.tz))
    return E(a.sql, with_tz(a.type, tzname), agg=a.agg)


def fn_to_date(tr, n, raw, ctx):
    a = _args(tr, raw, ctx, 1)[0]
    if is_dt(a.type):
        return E("ch_date_of_dt(%s, '%s')" % (a.sql, dt_parts(a.type)[1]), "Date", agg=a.agg)
    if is_date(a.type):
        return a
    return E("ch_date_of_str(%s)" % a.sql, "Nullable(Date)", agg=a.agg)


def fn_start_of(unit):
    def f(tr, n, raw, ctx):
        a = _args(tr, raw, ctx, 1, 2)[0]
        tzname = dt_parts(a.type)[1] if is_dt(a.type) else tr.tz
        if len(raw) == 2:
            tzname = _const_str(tr, raw[1])
        if not is_dt(a.type):
            a = E("ch_dt(%s, '%s')" % (a.sql, tzname), dt_type(6, tzname))
        t = "Date" if unit in ("month", "year", "week") else dt_type(0, tzname)
        sql = "ch_start_of(%s, '%s', '%s')" % (a.sql, unit, tzname)
        if t == "Date":
            sql = "ch_date_of_dt(%s, '%s')" % (sql, tzname)
        return E(sql, t, agg=a.agg)
    return f


def fn_now(tr, n, raw, ctx):
    return E("ch_now()", dt_type(6, tr.tz))


def fn_today(tr, n, raw, ctx):
    return E("ch_date_of_dt(ch_now(), '%s')" % tr.tz, "Date")


def fn_unix(tr, n, raw, ctx):
    a = _args(tr, raw, ctx, 1)[0]
    return E("ch_unix_timestamp(%s)" % a.sql, "UInt32", agg=a.agg)


def fn_int_div(tr, n, raw, ctx):
    a, b = _args(tr, raw, ctx, 2)
    return E("ch_int_div(%s, %s)" % (a.sql, b.sql), "Int64", agg=a.agg or b.agg)


def fn_json(kind, type_):
    def f(tr, n, raw, ctx):
        args = _args(tr, raw, ctx, 1, 10)
        return E("%s(%s)" % (kind, ", ".join(a.sql for a in args)), type_)
    return f


def fn_to_uuid(tr, n, raw, ctx):
    a = _args(tr, raw, ctx, 1)[0]
    return E("ch_uuid(%s)" % a.sql, "Nullable(UUID)", agg=a.agg)


def fn_to_string(tr, n, raw, ctx):
    a = _args(tr, raw, ctx, 1)[0]
    if is_dt(a.type):
        p, tzname = dt_parts(a.type)
        return E("ch_dt_text(%s, '%s', %d)" % (a.sql, tzname, p), "String", agg=a.agg)
    return E("ch_to_string(%s)" % a.sql, "String", agg=a.agg)


def fn_md5(tr, n, raw, ctx):
    a = _args(tr, raw, ctx, 1)[0]
    return E("ch_md5(%s)" % a.sql, "FixedString(16)", agg=a.agg)


def fn_reinterpret_u32(tr, n, raw, ctx):
    a = _args(tr, raw, ctx, 1)[0]
    if a.type != "FixedString(16)":
        raise HogQLError("the fake evaluates reinterpretAsUInt32 of MD5() only")
    return E("ch_u32_le(%s)" % a.sql, "UInt32", agg=a.agg)


def fn_cast(sqltype, chtype):
    def f(tr, n, raw, ctx):
        a = _args(tr, raw, ctx, 1)[0]
        return E("CAST(%s AS %s)" % (a.sql, sqltype), chtype, agg=a.agg)
    return f


def fn_simple(sqlname, type_=None, lo=1, hi=1):
    def f(tr, n, raw, ctx):
        args = _args(tr, raw, ctx, lo, hi)
        t = type_ if type_ is not None else (args[0].type if args else None)
        return E("%s(%s)" % (sqlname, ", ".join(a.sql for a in args)), t,
                 args[0].json if args and type_ is None else False, agg=any(a.agg for a in args))
    return f


def fn_if(tr, n, raw, ctx):
    c, a, b = _args(tr, raw, ctx, 3)
    b = tr.coerce(a, b)
    return E("(CASE WHEN %s THEN %s ELSE %s END)" % (c.sql, a.sql, b.sql), a.type if a.sql != "NULL" else b.type,
             agg=c.agg or a.agg or b.agg)


def fn_is_null(neg):
    def f(tr, n, raw, ctx):
        a = _args(tr, raw, ctx, 1)[0]
        return E("(%s IS %sNULL)" % (a.sql, "NOT " if neg else ""), "UInt8", agg=a.agg)
    return f


def fn_empty(neg):
    def f(tr, n, raw, ctx):
        a = _args(tr, raw, ctx, 1)[0]
        sql = "(coalesce(%s, '') = '')" % a.sql
        return E("(NOT %s)" % sql if neg else sql, "UInt8", agg=a.agg)
    return f


def fn_concat(tr, n, raw, ctx):
    args = _args(tr, raw, ctx, 1, 100)
    return E("(%s)" % " || ".join("coalesce(ch_to_string(%s), '')" % a.sql for a in args), "String",
             agg=any(a.agg for a in args))


def fn_date_diff(tr, n, raw, ctx):
    u, a, b = _args(tr, raw, ctx, 3)
    return E("ch_date_diff(%s, %s, %s)" % (u.sql, a.sql, b.sql), "Int64", agg=a.agg or b.agg)


def fn_interval(tr, n, raw, ctx):
    a = _args(tr, raw, ctx, 1)[0]
    return E("(%s * %d)" % (a.sql, INTERVALS[n["name"]]), "IntervalSecond")


def fn_dt_shift(sign, unit):
    def f(tr, n, raw, ctx):
        a, k = _args(tr, raw, ctx, 2)
        return E("ch_dt_add(%s, %s(%s) * %d)" % (a.sql, "-" if sign < 0 else "", k.sql, unit), a.type)
    return f


# aggregates
def agg_count(tr, n, raw, ctx):
    if not raw or (len(raw) == 1 and raw[0].get("node") == "Field" and raw[0]["chain"] == ["*"]):
        if n.get("distinct"):
            raise HogQLError("count(DISTINCT) needs an argument")
        return E("count(*)", "UInt64", agg=True)
    args = _args(tr, raw, ctx, 1)
    coll = " COLLATE CHUUID" if is_uuid(args[0].type) else ""
    return E("count(%s%s%s)" % ("DISTINCT " if n.get("distinct") else "", args[0].sql, coll), "UInt64", agg=True)


def agg_uniq(tr, n, raw, ctx):
    args = _args(tr, raw, ctx, 1)
    return E("count(DISTINCT %s)" % args[0].sql, "UInt64", agg=True)


def agg_count_if(tr, n, raw, ctx):
    c = _args(tr, raw, ctx, 1)[0]
    return E("count(CASE WHEN %s THEN 1 END)" % c.sql, "UInt64", agg=True)


def agg_sum(tr, n, raw, ctx):
    a = _args(tr, raw, ctx, 1)[0]
    t = "Float64" if is_float(a.type) else ("UInt64" if base_type(a.type or "").startswith("UInt") else "Int64")
    return E("coalesce(sum(%s%s), 0)" % ("DISTINCT " if n.get("distinct") else "", a.sql), t, agg=True)


def agg_avg(tr, n, raw, ctx):
    a = _args(tr, raw, ctx, 1)[0]
    return E("avg(%s)" % a.sql, "Float64", agg=True)


def agg_minmax(sqlname):
    def f(tr, n, raw, ctx):
        a = _args(tr, raw, ctx, 1)[0]
        coll = " COLLATE CHUUID" if is_uuid(a.type) else ""
        return E("%s(%s%s)" % (sqlname, a.sql, coll), a.type, a.json, agg=True)
    return f


def agg_arg(sqlname):
    def f(tr, n, raw, ctx):
        a, b = _args(tr, raw, ctx, 2)
        return E("%s(%s, %s)" % (sqlname, a.sql, b.sql), a.type, a.json, agg=True)
    return f


def agg_any(tr, n, raw, ctx):
    a = _args(tr, raw, ctx, 1)[0]
    return E("ch_any(%s)" % a.sql, a.type, a.json, agg=True)


def agg_group_array(tr, n, raw, ctx):
    a = _args(tr, raw, ctx, 1)[0]
    return E("json_group_array(%s%s) FILTER (WHERE %s IS NOT NULL)"
             % ("DISTINCT " if n.get("distinct") else "", a.sql, a.sql),
             "Array(%s)" % base_type(a.type or "String"), agg=True)


FUNCTIONS = {
    "toDateTime": fn_to_datetime, "toDateTime64": fn_to_datetime,
    "parseDateTime64BestEffort": fn_to_datetime, "parseDateTimeBestEffort": fn_to_datetime,
    "toTimeZone": fn_to_timezone, "toDate": fn_to_date,
    "toStartOfMinute": fn_start_of("minute"), "toStartOfHour": fn_start_of("hour"),
    "toStartOfDay": fn_start_of("day"), "toStartOfWeek": fn_start_of("week"),
    "toStartOfMonth": fn_start_of("month"), "toStartOfYear": fn_start_of("year"),
    "now": fn_now, "now64": fn_now, "today": fn_today,
    "toUnixTimestamp": fn_unix, "intDiv": fn_int_div,
    "JSONExtractString": fn_json("ch_json_extract_string", "String"),
    "JSONExtractRaw": fn_json("ch_json_extract_raw", "String"),
    "JSONHas": fn_json("ch_json_has", "UInt8"),
    "toUUID": fn_to_uuid, "toString": fn_to_string,
    "MD5": fn_md5, "reinterpretAsUInt32": fn_reinterpret_u32,
    "toInt": fn_cast("INTEGER", "Nullable(Int64)"), "toInt64": fn_cast("INTEGER", "Int64"),
    "toFloat": fn_cast("REAL", "Nullable(Float64)"), "toFloat64": fn_cast("REAL", "Float64"),
    "coalesce": fn_simple("coalesce", None, 1, 100), "ifNull": fn_simple("coalesce", None, 2, 2),
    "if": fn_if, "isNull": fn_is_null(False), "isNotNull": fn_is_null(True),
    "empty": fn_empty(False), "notEmpty": fn_empty(True),
    "lower": fn_simple("lower", "String"), "upper": fn_simple("upper", "String"),
    "length": fn_simple("length", "UInt64"), "trim": fn_simple("trim", "String"),
    "abs": fn_simple("abs"), "round": fn_simple("round", "Float64", 1, 2),
    "greatest": fn_simple("max", None, 2, 100), "least": fn_simple("min", None, 2, 100),
    "concat": fn_concat, "dateDiff": fn_date_diff,
    "toIntervalSecond": fn_interval, "toIntervalMinute": fn_interval, "toIntervalHour": fn_interval,
    "toIntervalDay": fn_interval, "toIntervalWeek": fn_interval,
    "addSeconds": fn_dt_shift(1, 1), "addMinutes": fn_dt_shift(1, 60), "addHours": fn_dt_shift(1, 3600),
    "addDays": fn_dt_shift(1, 86400), "subtractSeconds": fn_dt_shift(-1, 1),
    "subtractMinutes": fn_dt_shift(-1, 60), "subtractHours": fn_dt_shift(-1, 3600),
    "subtractDays": fn_dt_shift(-1, 86400),
    "count": agg_count, "countIf": agg_count_if, "uniq": agg_uniq, "uniqExact": agg_uniq,
    "sum": agg_sum, "avg": agg_avg, "min": agg_minmax("min"), "max": agg_minmax("max"),
    "argMax": agg_arg("ch_argmax"), "argMin": agg_arg("ch_argmin"), "any": agg_any,
    "groupArray": agg_group_array,
}
# HogQL accepts these in any case (SQL's aggregates)
FUNCTIONS_CI = {k.lower(): v for k, v in FUNCTIONS.items()
                if k in ("count", "sum", "avg", "min", "max", "coalesce", "if", "lower", "upper",
                         "length", "abs", "round", "greatest", "least", "concat", "trim")}


# ---------- the benchmark's dataset ----------

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
    gzip_crc: answer the real result gzipped, with a wrong CRC in the trailer
    content_encoding: answer the real result uncompressed, but labelled with
               this Content-Encoding (one the client did not ask for, say)
    bytes_replace: [[a, b], ...]: replace text a by b in the body's bytes,
               after it is rendered (b may hold a raw NUL or, as a lone
               surrogate, bytes that are not UTF-8: a server that breaks
               JSON's rules)
    pass: true: no failure (the requests it counts are answered for real,
          so that the failure queued after it meets a later request)
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
        self.gzip_crc = spec.get("gzip_crc", False)
        self.content_encoding = spec.get("content_encoding")
        self.bytes_replace = spec.get("bytes_replace") or []
        self.count = spec.get("count", 1)
        self.pass_through = spec.get("pass", False)


def us_of(canonical):
    d = canon_dt(canonical)
    return (d - EPOCH) // dt.timedelta(microseconds=1)


EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)


def uuid_key(s):
    """ClickHouse's UUID order as bytes: the second 64-bit half first."""
    h = s.replace("-", "").lower()
    return bytes.fromhex(h[16:] + h[:16])


class Synthetic:
    """N realistic events, rendered once, for the benchmark.

    Event i is created at base + i * step (so created_at is unique and the
    order is by i), with a client timestamp up to 5 s earlier and properties
    of 0.5 to 2 KB (nested, unicode, escapes).  Queries still go through
    PostHog's parser: any `SELECT <the 8 event columns> FROM events WHERE
    <conditions on created_at, timestamp, uuid, ...> ORDER BY created_at,
    uuid LIMIT n` is served by bisecting to the lower bound on created_at
    and evaluating the WHERE row by row until LIMIT rows are found, so the
    server costs milliseconds a page and the benchmark measures phsync.
    Rows are rendered in UTC (the project's time zone is not applied).
    """

    WORDS = ["alpha", "caf\u00e9", "\u65e5\u672c\u8a9e", "na\u00efve", "emoji \U0001f680",
             'say "hi"', "back\\slash", "tab\tand\nnewline", "plain", "checkout"]

    def __init__(self, count, seed=1, base=None, step_ms=50):
        import array
        self.count = count
        self.step = dt.timedelta(milliseconds=step_ms)
        self.base = parse_time(base) if base else \
            dt.datetime.now(UTC) - self.step * count - dt.timedelta(minutes=5)
        rng = random.Random(seed)
        self.created_us = array.array("q")
        self.ts_us = array.array("q")
        self.uuid_keys = bytearray()
        self.key_hash = array.array("L")    # key_hash_u32() of each uuid
        self.rows = []
        self.first = self.last = None
        names = ["$pageview", "$autocapture", "$pageleave", "signed_up", "purchase", "$identify"]
        for i in range(count):
            created = self.base + self.step * i
            c = created.strftime("%Y-%m-%d %H:%M:%S.%f")
            tsd = created - dt.timedelta(seconds=rng.random() * 5)
            if i % 3 == 0:
                tsd = tsd.replace(microsecond=0)   # some timestamps without a fraction
            ts = tsd.strftime("%Y-%m-%d %H:%M:%S.%f")
            props = self.properties(rng, i)
            u = str(uuidlib.UUID(int=rng.getrandbits(128), version=4))
            row = [u, names[i % len(names)], rfc3339(ts), "user-%d" % rng.randint(1, 50000),
                   str(uuidlib.UUID(int=rng.getrandbits(128), version=4)),
                   json.dumps(props, ensure_ascii=False, separators=(",", ":")),
                   "", rfc3339(c)]
            self.created_us.append((created - EPOCH) // dt.timedelta(microseconds=1))
            self.ts_us.append((tsd - EPOCH) // dt.timedelta(microseconds=1))
            self.uuid_keys += uuid_key(u)
            self.key_hash.append(key_hash_u32(u))
            if i == 0:
                self.first = c
            self.last = c
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

    # ----- the WHERE, compiled to Python closures on a row index -----
    def compile(self, n, tr):
        """-> (kind, fn(i)); kind is 'dt' (µs), 'uuid' (key bytes), 'const' or 'val'."""
        kind = n.get("node")
        if kind in ("Constant", "Placeholder"):
            v = tr.const_value(n)
            return "const", (lambda i, v=v: v)
        if kind == "Call" and n["name"] in ("toDateTime", "toDateTime64", "parseDateTime64BestEffort",
                                            "toTimeZone") and n.get("args"):
            k, f = self.compile(n["args"][0], tr)
            if k == "const":
                v = us_of(canon(f(0)))
                return "dtconst", (lambda i, v=v: v)
            if k == "dt":
                if n["name"] == "toDateTime":
                    return "dt", (lambda i, f=f: f(i) // 1000000 * 1000000)
                return k, f
            raise HogQLError("the synthetic dataset cannot evaluate %s of this argument" % n["name"])
        if kind == "Call" and n["name"] == "toUUID" and n.get("args"):
            k, f = self.compile(n["args"][0], tr)
            if k == "const":
                v = uuid_key(str(f(0)))
                return "uuidconst", (lambda i, v=v: v)
            return k, f
        if kind == "Field":
            name = n["chain"][-1] if len(n["chain"]) <= 2 else None
            if name == "created_at":
                return "dt", self.created_us.__getitem__
            if name == "timestamp":
                return "dt", self.ts_us.__getitem__
            if name == "uuid":
                keys = self.uuid_keys
                return "uuid", (lambda i: bytes(keys[16 * i:16 * i + 16]))
            if name in EVENT_COLUMNS:
                idx = EVENT_COLUMNS.index(name)
                return "val", (lambda i: json.loads(self.rows[i])[idx])
            raise HogQLError("Unable to resolve field: %s" % ".".join(str(c) for c in n["chain"]))
        if kind in ("And", "Or"):
            fs = [self.compile(e, tr)[1] for e in n["exprs"]]
            if kind == "And":
                return "val", (lambda i: all(f(i) for f in fs))
            return "val", (lambda i: any(f(i) for f in fs))
        if kind == "Not":
            f = self.compile(n["expr"], tr)[1]
            return "val", (lambda i: not f(i))
        if kind == "BetweenExpr":
            f = self.compile({"node": "And", "exprs": [
                {"node": "CompareOperation", "op": ">=", "left": n["expr"], "right": n["low"]},
                {"node": "CompareOperation", "op": "<=", "left": n["expr"], "right": n["high"]}]}, tr)[1]
            if n.get("negated"):
                return "val", (lambda i: not f(i))
            return "val", f
        if kind == "CompareOperation":
            op = n["op"]
            lk, lf = self.compile(n["left"], tr)
            if op in ("in", "not in"):
                r = n["right"]
                if r.get("node") == "Placeholder":
                    vals = tr.const_value(r)
                    vals = vals if isinstance(vals, list) else [vals]
                elif r.get("node") in ("Tuple", "Array"):
                    vals = [tr.const_value(e) for e in r["exprs"]]
                else:
                    vals = [tr.const_value(r)]
                vals = set(self.convert(lk, v) for v in vals)
                if op == "in":
                    return "val", (lambda i: lf(i) in vals)
                return "val", (lambda i: lf(i) not in vals)
            rk, rf = self.compile(n["right"], tr)
            if rk in ("const", "dtconst", "uuidconst") and lk in ("dt", "uuid"):
                v = self.convert(lk, rf(0))
                rf = (lambda i, v=v: v)
            if lk in ("const", "dtconst", "uuidconst") and rk in ("dt", "uuid"):
                v = self.convert(rk, lf(0))
                lf = (lambda i, v=v: v)
            import operator
            cmp = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
                   ">": operator.gt, ">=": operator.ge}.get(op)
            if cmp is None:
                raise HogQLError("the synthetic dataset cannot evaluate %s" % op)
            return "val", (lambda i: cmp(lf(i), rf(i)))
        raise HogQLError("the synthetic dataset cannot evaluate %s" % kind)

    @staticmethod
    def convert(kind, v):
        if kind == "dt" and not isinstance(v, int):
            return us_of(canon(v))
        if kind == "uuid" and isinstance(v, str):
            return uuid_key(v)
        return v

    def created_bounds(self, where, tr):
        """The created_at bounds (µs, None: open) of the top-level conjuncts."""
        lo = hi = None
        conj = []

        def flat(n):
            if n is not None and n.get("node") == "And":
                for e in n["exprs"]:
                    flat(e)
            elif n is not None:
                conj.append(n)
        flat(where)
        for c in conj:
            if c.get("node") == "CompareOperation" and c["left"].get("chain") == ["created_at"] \
                    and c["op"] in (">", ">=", "<", "<=", "=="):
                try:
                    v = us_of(canon(tr.const_value(c["right"])))
                except (HogQLError, ValueError, TypeError):
                    continue
                if c["op"] in (">", ">=", "=="):
                    lo = v if lo is None else max(lo, v)
                if c["op"] in ("<", "<=", "=="):
                    hi = v if hi is None else min(hi, v)
        return lo, hi

    def count_query(self, ast, tr):
        """phsync's grouped count (its plan, verify): rows per bucket of
        {bucket_seconds} from {since}, by created_at alone (phsync's bounds
        on timestamp are days wide, and a synthetic timestamp is within 5 s
        of its created_at), so that counting a million rows stays cheap."""
        lo, hi = self.created_bounds(ast.get("where"), tr)
        since_s = us_of(canon(tr.values["since"])) // 1000000
        width = int(tr.values["bucket_seconds"])
        start = bisect.bisect_left(self.created_us, lo) if lo is not None else 0
        end = bisect.bisect_left(self.created_us, hi) if hi is not None else self.count
        keysum = len(ast.get("select") or []) == 3
        results = []
        k = 0
        while start < end:
            edge = bisect.bisect_left(self.created_us, (since_s + (k + 1) * width) * 1000000, start, end)
            if edge > start:
                results.append([k, edge - start] +
                               ([sum(set(self.key_hash[start:edge]))] if keysum else []))
            start = edge
            k += 1
        names = ["phsync_bucket", "phsync_count"] + (["phsync_keysum"] if keysum else [])
        types = [["phsync_bucket", "Int64"], ["phsync_count", "UInt64"]] + \
            ([["phsync_keysum", "UInt64"]] if keysum else [])
        body = posthog_response_bytes(tr.config, tr.text, "UTC", names, types,
                                      [json.dumps(r).encode() for r in results])
        return body, len(results), sum(r[1] for r in results)

    def query(self, ast, tr, row_cap):
        """(body bytes, rows, events_read)"""
        if ast.get("node") != "SelectQuery":
            raise HogQLError("the synthetic dataset only serves phsync's events query")
        if ast.get("offset") is not None:
            raise HogQLError(OFFSET_TEXT)
        if [s.get("alias") for s in ast.get("select") or []] in (["phsync_bucket", "phsync_count"],
                                                                 ["phsync_bucket", "phsync_count", "phsync_keysum"]):
            return self.count_query(ast, tr)
        sel = [s.get("chain") for s in ast.get("select") or []]
        sf = ast.get("select_from") or {}
        if sel != [[c] for c in EVENT_COLUMNS] or (sf.get("table") or {}).get("chain") != ["events"] \
                or sf.get("next_join") or ast.get("group_by") or ast.get("having") or ast.get("distinct"):
            raise HogQLError("the synthetic dataset only serves SELECT %s FROM events WHERE ..."
                             % ", ".join(EVENT_COLUMNS))
        order = [(o["expr"].get("chain"), o.get("order")) for o in ast.get("order_by") or []]
        if order != [(["created_at"], "ASC"), (["uuid"], "ASC")]:
            raise HogQLError("the synthetic dataset only serves ORDER BY created_at, uuid")
        limit = DEFAULT_LIMIT
        if ast.get("limit") is not None:
            limit = min(int(tr.const_value(ast["limit"])), row_cap)
        where = ast.get("where")
        pred = self.compile(where, tr)[1] if where is not None else (lambda i: True)
        # bounds on created_at (bisect) and timestamp (cost) from the top-level conjuncts
        src = Source("events", "t", {}, TABLES["events"])
        lo, hi = self.created_bounds(where, tr)
        start = bisect.bisect_left(self.created_us, lo) if lo is not None else 0
        end = bisect.bisect_right(self.created_us, hi) if hi is not None else self.count
        picked = []
        i = start
        while i < end and len(picked) < limit:
            if pred(i):
                picked.append(i)
            i += 1
        tlo, thi = tr.bounds(where, src)
        a = bisect.bisect_left(self.created_us, us_of(tlo)) if tlo else 0
        b = bisect.bisect_right(self.created_us, us_of(thi) + 5000000) if thi else self.count
        body = posthog_response_bytes(tr.config, tr.text, "UTC", EVENT_COLUMNS,
                                      [[c, TABLES["events"].cols[c].type_for("UTC")] for c in EVENT_COLUMNS],
                                      [self.rows[k] for k in picked])
        return body, len(picked), max(0, b - a)

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


# ---------- one project's data ----------

def json_text(v):
    if v is None or isinstance(v, str):
        return v
    return json.dumps(v, ensure_ascii=False, separators=(",", ":"))


class Project:
    """A PostHog project: its own dataset (an SQLite database) and time zone."""

    def __init__(self, pid, key, tzname="UTC"):
        self.id = str(pid)
        self.key = key
        self.timezone = tzname
        self.lock = threading.Lock()
        self.db = sqlite3.connect(":memory:", check_same_thread=False)
        setup_connection(self.db)
        self.db.executescript(SCHEMA_SQL)
        self.synthetic = None

    def execute(self, sql, params=()):
        with self.lock:
            cur = self.db.execute(sql, params)
            rows = cur.fetchall()
            self.db.commit()
            return cur, rows

    # ----- events -----
    def add_events(self, events):
        rows = []
        for e in events:
            if e.get("raw"):
                # stored verbatim: lets a test send values PostgreSQL refuses
                props = e.get("properties")
                rows.append(tuple(e.get(c) for c in
                                  ["uuid", "event", "properties", "timestamp", "distinct_id",
                                   "person_id", "elements_chain"]) + (canon(e["created_at"]),
                                                                      None, None))
                continue
            props = e.get("properties", {})
            pd = props if isinstance(props, dict) else None
            if not isinstance(props, str):
                props = json_text(props)
            else:
                try:
                    pd = json.loads(props)
                except ValueError:
                    pd = None
            created = e.get("created_at") or dt.datetime.now(UTC)
            ts = e.get("timestamp") or created
            if parse_time(ts) - parse_time(created) > FUTURE_CUTOFF:
                # capture: a timestamp more than 23 h ahead of the server becomes the server's time
                ts = created
            sid = e.get("$session_id", (pd or {}).get("$session_id") if isinstance(pd, dict) else None)
            wid = e.get("$window_id", (pd or {}).get("$window_id") if isinstance(pd, dict) else None)
            rows.append((
                str(e.get("uuid") or uuidlib.uuid4()),
                e.get("event", "$pageview"),
                props,
                canon(ts),
                e.get("distinct_id", "anonymous"),
                e.get("person_id"),
                e.get("elements_chain", ""),
                canon(created),
                None if sid is None else str(sid),
                None if wid is None else str(wid),
            ))
        with self.lock:
            self.db.executemany("INSERT INTO events (uuid, event, properties, timestamp, distinct_id, "
                                "person_id, elements_chain, created_at, \"$session_id\", \"$window_id\") "
                                "VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
            self.db.commit()
        return len(rows)

    def generate(self, spec):
        rng = random.Random(spec.get("seed", 1))
        n = int(spec["count"])
        start = parse_time(spec.get("created_from") or (dt.datetime.now(UTC) - dt.timedelta(days=2)))
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

    def delete_events(self, uuids):
        with self.lock:
            n = self.db.executemany("DELETE FROM events WHERE uuid = ?", [(u,) for u in uuids]).rowcount
            self.db.commit()
        return n

    # ----- persons -----
    def add_persons(self, persons):
        rows, gone = [], []
        for p in persons:
            pid = str(p.get("id") or uuidlib.uuid4())
            if p.get("is_deleted"):
                gone.append((pid,))
                continue
            rows.append((pid, canon_ms(p["created_at"]), 1 if p.get("is_identified") else 0,
                         json_text(p.get("properties", {}))))
        with self.lock:
            self.db.executemany("INSERT OR REPLACE INTO persons VALUES (?,?,?,?)", rows)
            self.db.executemany("DELETE FROM persons WHERE id = ?", gone)
            self.db.commit()
        return len(rows)

    def add_distinct_ids(self, rows):
        with self.lock:
            for r in rows:
                v = r.get("version")
                if v is None:
                    v = (self.db.execute("SELECT max(version) FROM raw_person_distinct_ids WHERE distinct_id = ?",
                                         (r["distinct_id"],)).fetchone()[0] or 0) + 1
                self.db.execute("INSERT INTO raw_person_distinct_ids VALUES (?,?,?,?)",
                                (r["distinct_id"], str(r["person_id"]), int(v), 1 if r.get("is_deleted") else 0))
            self.db.commit()
        return len(rows)

    def merge_persons(self, from_id, into_id):
        with self.lock:
            ids = [r[0] for r in self.db.execute(
                "SELECT distinct_id FROM person_distinct_ids_current WHERE person_id = ?", (from_id,))]
        self.add_distinct_ids([{"distinct_id": d, "person_id": into_id} for d in ids])
        self.delete_persons([from_id])
        return len(ids)

    def delete_persons(self, ids):
        with self.lock:
            n = self.db.executemany("DELETE FROM persons WHERE id = ?", [(i,) for i in ids]).rowcount
            self.db.commit()
        return n

    # ----- groups -----
    def add_groups(self, groups):
        rows = []
        now = canon_s(dt.datetime.now(UTC))
        for g in groups:
            idx = int(g["index"])
            if not 0 <= idx <= 4:
                raise HogQLError("group index must be 0 to 4")
            rows.append((idx, str(g["key"]), canon_ms(g.get("created_at") or dt.datetime.now(UTC)),
                         canon_s(g["updated_at"]) if g.get("updated_at") else now,
                         json_text(g.get("properties", {}))))
        with self.lock:
            self.db.executemany('INSERT OR REPLACE INTO groups ("index", key, created_at, updated_at, '
                                'properties) VALUES (?,?,?,?,?)', rows)
            self.db.commit()
        return len(rows)

    def delete_groups(self, keys):
        with self.lock:
            n = self.db.executemany('DELETE FROM groups WHERE "index" = ? AND key = ?',
                                    [(int(i), str(k)) for i, k in keys]).rowcount
            self.db.commit()
        return n

    # ----- system tables -----
    def upsert_system(self, name, rows_in):
        table = TABLES.get("system." + name)
        if table is None:
            raise HogQLError("Unknown system table: %s" % name)
        rows = []
        for r in rows_in:
            row = {}
            for cname, c in table.cols.items():
                if cname == "duration":
                    continue
                v = r.get(cname)
                if cname == "id" and v is None:
                    v = str(uuidlib.uuid4()) if is_uuid(c.chtype) else None
                if cname in SYSTEM_FLAGS:
                    v = 1 if v else 0
                elif c.json:
                    v = json_text(v)
                elif is_dt(c.chtype) and v is not None:
                    v = canon(v)
                elif cname == "created_at" and v is None:
                    v = now_canon()
                elif isinstance(v, bool):
                    v = int(v)
                row[cname] = v
            if row.get("created_at") is None and "created_at" in table.cols:
                row["created_at"] = now_canon()
            rows.append(row)
        n = 0
        with self.lock:
            for row in rows:
                keys = list(row)
                cur = self.db.execute('INSERT OR REPLACE INTO %s (%s) VALUES (%s)' % (
                    table.sqlname, ", ".join('"%s"' % k for k in keys), ", ".join("?" * len(keys))),
                    [row[k] for k in keys])
                if row.get("id") is None:
                    row["id"] = cur.lastrowid
                n += 1
            self.db.commit()
        return [r["id"] for r in rows]

    def delete_system(self, name, ids, hard):
        table = TABLES.get("system." + name)
        if table is None:
            raise HogQLError("Unknown system table: %s" % name)
        if not hard and "deleted" not in table.cols:
            raise HogQLError("system.%s has no deleted column: PostHog removes the row (use hard)" % name)
        with self.lock:
            if hard:
                n = self.db.executemany("DELETE FROM %s WHERE id = ?" % table.sqlname,
                                        [(i,) for i in ids]).rowcount
            else:
                n = self.db.executemany("UPDATE %s SET deleted = 1 WHERE id = ?" % table.sqlname,
                                        [(i,) for i in ids]).rowcount
            self.db.commit()
        return n

    def set_cohort_members(self, cohort_id, person_ids, static=False):
        """A recalculation: the new member list replaces the old one; the
        cohort's version, count and last_calculation move on."""
        cohort_id = int(cohort_id)
        with self.lock:
            if static:
                self.db.execute("DELETE FROM static_cohort_people WHERE cohort_id = ?", (cohort_id,))
                self.db.executemany("INSERT INTO static_cohort_people VALUES (?, ?)",
                                    [(str(p), cohort_id) for p in person_ids])
            else:
                self.db.execute("DELETE FROM cohort_members WHERE cohort_id = ?", (cohort_id,))
                self.db.executemany("INSERT INTO cohort_members VALUES (?, ?)",
                                    [(cohort_id, str(p)) for p in person_ids])
            self.db.execute("UPDATE system_cohorts SET version = coalesce(version, 0) + 1, count = ?, "
                            "last_calculation = ? WHERE id = ?",
                            (len(set(person_ids)), now_canon(), cohort_id))
            self.db.commit()
        return len(person_ids)

    # ----- views for tests -----
    def rendered(self, sql, columns, types):
        with self.lock:
            rows = self.db.execute(sql).fetchall()
        return [[render_value(v, t) for v, t in zip(r, types)] for r in rows]

    def persons(self):
        t = TABLES["persons"]
        return self.rendered("SELECT %s FROM persons_visible ORDER BY created_at, id COLLATE CHUUID"
                             % ", ".join(PERSON_COLUMNS),
                             PERSON_COLUMNS, [t.cols[c].type_for(self.timezone) for c in PERSON_COLUMNS])

    def source(self):
        t = TABLES["events"]
        return self.rendered("SELECT %s FROM events ORDER BY created_at, uuid COLLATE CHUUID"
                             % ", ".join(EVENT_COLUMNS),
                             EVENT_COLUMNS, [t.cols[c].type_for(self.timezone) for c in EVENT_COLUMNS])

    def table_rows(self, name):
        t = TABLES[name]
        cols = t.order
        return self.rendered("SELECT %s FROM %s" % (", ".join(t.cols[c].sql for c in cols), t.sqlname),
                             cols, [t.cols[c].type_for(self.timezone) for c in cols])

    def clear(self):
        with self.lock:
            for t in ("events", "persons", "groups", "cohort_members", "static_cohort_people",
                      "system_cohorts", "system_feature_flags", "system_experiments", "system_surveys"):
                self.db.execute("DELETE FROM %s" % t)
            self.db.commit()

    def row_count(self, sqlname):
        with self.lock:
            return self.db.execute("SELECT count(*) FROM %s" % sqlname).fetchone()[0]

    def events_between(self, lo, hi):
        q, p = "SELECT count(*) FROM events", []
        cond = []
        if lo is not None:
            cond.append("timestamp >= ?")
            p.append(lo)
        if hi is not None:
            cond.append("timestamp <= ?")
            p.append(hi)
        if cond:
            q += " WHERE " + " AND ".join(cond)
        with self.lock:
            return self.db.execute(q, p).fetchone()[0]


def render_value(v, t):
    """One value of a response, as PostHog's JSON renderer writes it."""
    if v is None:
        return None
    if t:
        b = base_type(t)
        if b.startswith("DateTime"):
            if isinstance(v, str) and CANON_RE.match(v):
                p, tzname = dt_parts(b)
                return render_dt(v, tzname, p == 0)
            return v
        if b == "Bool":
            return bool(v)
        if b.startswith("Array("):
            try:
                items = json.loads(v) if isinstance(v, str) else v
            except ValueError:
                return v
            inner = b[6:-1]
            return [render_value(x, inner) for x in items] if isinstance(items, list) else items
        if b.startswith(("Int", "UInt")) and isinstance(v, float) and v == int(v):
            return int(v)
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return None
    return v


# ---------- limits: the fake's clock, throttles, query slots ----------

class Clock:
    """Fake time: runs time_scale times faster than real time."""

    def __init__(self):
        self.real0 = time.monotonic()
        self.fake0 = 0.0
        self.scale = 1.0

    def now(self):
        return self.fake0 + (time.monotonic() - self.real0) * self.scale

    def set_scale(self, scale):
        f = self.now()
        self.real0, self.fake0, self.scale = time.monotonic(), f, float(scale)


class InFlight:
    """A query request being answered: what a cancel can reach."""

    def __init__(self, rec, project, cqid):
        self.rec = rec
        self.project = project
        self.cqid = cqid
        self.cancelled = threading.Event()
        self.slot = None
        self.done = False

    def sleep(self, seconds):
        """Sleep (real seconds); True if cancelled meanwhile."""
        if seconds <= 0:
            return self.cancelled.is_set()
        return self.cancelled.wait(seconds)


class Cancelled(Exception):
    pass


class ServerState:
    def __init__(self, projects, config):
        self.projects = projects            # id -> Project, first is the default
        self.default_project = next(iter(projects))
        self.config = dict(DEFAULT_CONFIG)
        self.config.update(config)
        self.clock = Clock()
        self.clock.set_scale(self.config["time_scale"])
        self.lock = threading.Lock()
        self.slot_cond = threading.Condition(self.lock)
        self.running = {}                   # slot scope -> set of InFlight
        self.inflight = []
        self.faults = []
        self.requests = []
        self.cancels = []
        self.throttle_history = {}
        self.cache = {}
        self.parser = None
        self.reset_stats()

    def reset_stats(self):
        self.busy = 0.0
        self.served = 0
        self.active = 0
        self.union = 0.0
        self.union_start = None
        self.max_concurrent = 0

    def stats(self):
        with self.lock:
            union = self.union + (time.perf_counter() - self.union_start if self.union_start else 0.0)
            return {"busy_seconds": self.busy, "busy_union_seconds": union,
                    "requests": self.served, "max_concurrent": self.max_concurrent}

    def enter(self):
        with self.lock:
            self.active += 1
            self.max_concurrent = max(self.max_concurrent, self.active)
            if self.active == 1:
                self.union_start = time.perf_counter()

    def leave(self, seconds):
        with self.lock:
            self.busy += seconds
            self.served += 1
            self.active -= 1
            if self.active == 0 and self.union_start is not None:
                self.union += time.perf_counter() - self.union_start
                self.union_start = None

    def project_keys(self, key):
        return [p for p in self.projects.values() if p.key == key]

    # ----- config -----
    def get_config(self, project):
        with self.lock:
            c = dict(self.config)
        c["timezone"] = project.timezone
        c["projects"] = {p.id: {"timezone": p.timezone} for p in self.projects.values()}
        return c

    def set_config(self, arg, project):
        if not isinstance(arg, dict):
            raise HogQLError("POST /config takes a JSON object")
        unknown = set(arg) - set(DEFAULT_CONFIG)
        if unknown:
            raise HogQLError("unknown settings: %s" % ", ".join(sorted(unknown)))
        if "timezone" in arg:
            get_tz(arg["timezone"])
        if arg.get("concurrency_scope", "project") not in ("project", "organization"):
            raise HogQLError("concurrency_scope is project or organization")
        with self.lock:
            for k, v in arg.items():
                if k == "timezone":
                    project.timezone = v or "UTC"
                elif k == "time_scale":
                    if not v or float(v) <= 0:
                        raise HogQLError("time_scale must be > 0")
                    self.config[k] = float(v)
                    self.clock.set_scale(float(v))
                else:
                    self.config[k] = v
            self.slot_cond.notify_all()

    # ----- throttles (PersonalApiKeyRateThrottle, per key, in fake time) -----
    def throttle(self, key, kind):
        """None, or the wait in fake seconds (DRF's SimpleRateThrottle)."""
        import collections
        c = self.config
        if c["hogql_throttle_per_hour"]:
            if kind == "HogQLQuery":
                rates = [("query", c["hogql_throttle_per_hour"], 3600)]
            else:
                rates = [("clickhouse_burst", 240, 60), ("clickhouse_sustained", 1200, 3600)]
        else:
            rates = [("api_queries_burst", c["throttle_per_minute"], 60),
                     ("api_queries_sustained", c["throttle_per_hour"], 3600)]
        with self.lock:
            now = self.clock.now()
            waits = []
            for scope, num, duration in rates:
                if not num:
                    continue
                h = self.throttle_history.setdefault((key, scope), collections.deque())
                while h and h[-1] <= now - duration:
                    h.pop()
                if len(h) >= num:
                    waits.append(duration - (now - h[-1]))
                else:
                    h.appendleft(now)
            return max(waits) if waits else None

    # ----- concurrency (posthog/clickhouse/client/limit.py) -----
    def limits_apply(self):
        return not self.config["hogql_throttle_per_hour"]

    def acquire(self, fl):
        """Wait for a slot up to concurrency_wait_seconds (fake time)."""
        scope = fl.project.id if self.config["concurrency_scope"] == "project" else "organization"
        with self.slot_cond:
            deadline = self.clock.now() + float(self.config["concurrency_wait_seconds"])
            while True:
                running = self.running.setdefault(scope, set())
                limit = self.config["concurrency"]
                if not limit or len(running) < limit:
                    running.add(fl)
                    fl.slot = scope
                    return True
                if fl.cancelled.is_set():
                    raise Cancelled()
                left = (deadline - self.clock.now()) / self.clock.scale
                if left <= 0:
                    return False
                fl.rec["waited_for_slot"] = True
                self.slot_cond.wait(min(left, 0.05))

    def release(self, fl):
        with self.slot_cond:
            if fl.slot is not None:
                self.running.get(fl.slot, set()).discard(fl)
                fl.slot = None
                self.slot_cond.notify_all()

    def cancel(self, project, cqid, dequeue_only=False):
        with self.lock:
            hits = [f for f in self.inflight if f.project is project and f.cqid == cqid and not f.done]
            known = any(r.get("client_query_id") == cqid and r.get("project_id") == project.id
                        for r in self.requests)
            self.cancels.append({"client_query_id": cqid, "project_id": project.id, "time": time.time(),
                                 "was_running": bool(hits), "dequeue_only": dequeue_only})
        if dequeue_only:
            return "Only tried to dequeue, not cancelling query on clickhouse"
        for f in hits:
            f.cancelled.set()
            self.release(f)
        if not hits and known:
            return "Query already complete"
        return "Cancelled query on clickhouse"

    # ----- PostHog's query cache (posthog/caching): used unless refresh forces a run -----
    @staticmethod
    def cache_key(project, body):
        return project.id + "\0" + json.dumps(body.get("query"), sort_keys=True)

    def cached(self, project, body):
        if body.get("refresh") in FRESH_MODES or not self.config["cache_seconds"]:
            return None
        with self.lock:
            hit = self.cache.get(self.cache_key(project, body))
            if hit is None or self.clock.now() - hit[0] > float(self.config["cache_seconds"]):
                return None
            out = json.loads(hit[1])
        out["is_cached"] = True
        return out

    def store(self, project, body, result):
        if not self.config["cache_seconds"]:
            return
        with self.lock:
            if len(self.cache) > 500:
                self.cache.clear()
            self.cache[self.cache_key(project, body)] = (self.clock.now(), json.dumps(result))

    def next_fault(self):
        with self.lock:
            if not self.faults:
                return None
            f = self.faults[0]
            f.count -= 1
            if f.count <= 0:
                self.faults.pop(0)
            return f

    # ----- queries -----
    def check_body(self, body):
        if not isinstance(body, dict):
            raise HogQLError("Request body must be a JSON object")
        extra = set(body) - ALLOWED_BODY_KEYS
        if extra:
            raise HogQLError("Extra inputs are not permitted: %s" % ", ".join(sorted(extra)))
        if body.get("refresh") not in REFRESH_MODES:
            raise HogQLError("refresh: Input should be 'async', 'lazy_async', 'blocking', 'force_async', "
                             "'force_blocking' or 'force_cache'")
        query = body.get("query")
        if not isinstance(query, dict) or query.get("kind") not in ("HogQLQuery", "DatabaseSchemaQuery"):
            raise HogQLError("query.kind must be HogQLQuery or DatabaseSchemaQuery")
        extra = set(query) - ALLOWED_QUERY_KEYS
        if extra:
            raise HogQLError("Extra inputs are not permitted: query.%s" % ", ".join(sorted(extra)))
        return query

    def run_query(self, project, query):
        """-> (result dict or raw bytes, rows, events_read)"""
        if query.get("kind") == "DatabaseSchemaQuery":
            return schema_response(project), 0, 0
        values = query.get("values") or {}
        if not isinstance(values, dict):
            raise HogQLError("values must be an object")
        text = query.get("query")
        if not isinstance(text, str):
            raise HogQLError("query.query must be a string")
        mw = self.config["max_window_seconds"]
        if mw is not None:
            lo = values.get("slice_from", values.get("chunk_from", values.get("since")))
            hi = values.get("slice_until", values.get("chunk_until", values.get("until")))
            if lo and hi and (parse_time(hi) - parse_time(lo)).total_seconds() > mw:
                raise QueryTooBig()
        ast = self.parser.parse(text)
        if ast.get("error"):
            raise HogQLError(ast.get("message") or "Syntax error")
        modifiers = query.get("modifiers") or {}
        tzname = project.timezone if modifiers.get("convertToProjectTimezone", True) else "UTC"
        tr = Translator(values, tzname, self.config, text)
        row_cap = int(self.config["row_cap"])
        if project.synthetic is not None:
            body, n, read = project.synthetic.query(ast, tr, row_cap)
            return body, n, read
        sql, cols = tr.query(ast, top=True, row_cap=row_cap)
        try:
            cur, rows = project.execute(sql, tr.params)
        except sqlite3.Error as e:
            raise HogQLError("Query error: %s" % e)
        read = 0
        for lo, hi in tr.scans:
            read += project.events_between(lo, hi)
        names = [c[0] for c in cols]
        more = {}
        if not tr.had_limit:
            more = {"hasMore": len(rows) > DEFAULT_LIMIT, "limit": DEFAULT_LIMIT, "offset": 0}
            rows = rows[:DEFAULT_LIMIT]
        types = []
        for i, (name, t, _) in enumerate(cols):
            if not t or t in ("Nullable(Nothing)", "Nothing") or "Nothing" in t:
                t = type_of(name, [r[i] for r in rows])
            types.append(t)
        result = posthog_response(self.config, project.id + text, project.timezone, names,
                                  [[n, t] for n, t in zip(names, types)],
                                  [[render_value(v, t) for v, t in zip(r, types)] for r in rows],
                                  hogql=text, query=text, **more)
        return result, len(rows), read


def schema_field_type(c):
    if c.schema:
        return c.schema
    b = base_type(c.chtype.replace("{tz}", "'UTC'"))
    if c.json:
        return "json"
    for test, name in SCHEMA_KIND:
        if test(b):
            return name
    return "string"


def schema_response(project):
    """DatabaseSchemaQuery: every table the fake serves (team_id left out)."""
    def field(name, type_, **kw):
        d = {"name": name, "hogql_value": name if re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name)
             else "`%s`" % name.replace("`", "``"),
             "type": type_, "schema_valid": True, "chain": None, "fields": None, "id": None, "table": None}
        d.update(kw)
        return d
    tables = {}
    for t in TABLES.values():
        fields = {n: field(n, schema_field_type(t.cols[n])) for n in t.order}
        if t.name == "events":
            fields["person"] = field("person", "lazy_table", table="persons", id="person",
                                     fields=list(TABLES["persons"].order))
        tables[t.name] = {"type": t.kind, "id": t.name, "name": t.name, "row_count": None,
                          "fields": fields}
    return {"tables": tables, "joins": []}


# ---------- HTTP ----------

def make_handler(state, kind):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "fake-posthog/2"

        def log_message(self, fmt, *args):
            pass

        def encode(self, data, fault=None):
            """(body bytes, gzipped?) of an answer, faults applied: the work of
            PostHog's serializer and its gzip, done before the first byte."""
            for a, b in (fault.bytes_replace if fault else []):
                data = data.replace(a.encode("utf-8"), b.encode("utf-8", "surrogatepass"))
            gz = (state.config["gzip"] or (fault and fault.gzip_crc)) and \
                "gzip" in (self.headers.get("Accept-Encoding") or "")
            if fault and fault.content_encoding:
                gz = False
            if gz:
                data = gzip.compress(data, compresslevel=1)
                if fault and fault.gzip_crc:
                    # the trailer: CRC-32 (4 bytes), then the length
                    data = data[:-8] + bytes(b ^ 0x5A for b in data[-8:-4]) + data[-4:]
            return data, gz

        def encode_json(self, obj, fault=None):
            # surrogatepass: a test can make us send invalid UTF-8, as a broken
            # upstream might
            return self.encode(json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass"), fault)

        def send_encoded(self, status, encoded, headers=None, fault=None):
            data, gz = encoded
            truncate = fault.truncate if fault else None
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            if gz:
                self.send_header("Content-Encoding", "gzip")
            elif fault and fault.content_encoding:
                self.send_header("Content-Encoding", fault.content_encoding)
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
            pause = float(state.config.get("send_pause_ms") or 0) / 1000.0
            if pause > 0 and status == 200:
                # a slow network: the answer in pieces
                for i in range(0, len(data), 16384):
                    self.wfile.write(data[i:i + 16384])
                    self.wfile.flush()
                    time.sleep(pause)
                return
            self.wfile.write(data)

        def send_bytes(self, status, data, headers=None, fault=None):
            self.send_encoded(status, self.encode(data, fault), headers, fault)

        def send_json(self, status, obj, headers=None, fault=None):
            self.send_encoded(status, self.encode_json(obj, fault), headers, fault)

        def read_body(self):
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def error(self, status, detail, type_="validation_error", code="invalid_input", headers=None):
            self.send_json(status, {"type": type_, "code": code, "detail": detail, "attr": None}, headers)

        def drop(self):
            self.close_connection = True
            try:
                self.connection.shutdown(2)
            except OSError:
                pass

        # ----- API -----
        def auth(self, pid):
            """The project, or None after answering 401/403."""
            auth = self.headers.get("Authorization") or ""
            key = auth[7:] if auth.startswith("Bearer ") else None
            mine = state.project_keys(key) if key else []
            if not mine:
                self.error(401, "Incorrect authentication credentials.",
                           "authentication_error", "authentication_failed")
                return None, key
            project = state.projects.get(pid)
            if project is None or project not in mine:
                self.error(403, "You don't have access to the project.",
                           "authentication_error", "permission_denied")
                return None, key
            return project, key

        def api(self, method):
            t0 = time.perf_counter()
            if method == "POST":
                state.enter()
            rec = {"time": time.time(), "start": time.time(), "path": self.path, "method": method}
            try:
                if method == "POST":
                    self.api_post(rec)
                elif method == "DELETE":
                    self.api_delete(rec)
                else:
                    self.read_body()
                    rec["status"] = 405
                    self.error(405, "Method \"%s\" not allowed." % method, "invalid_request",
                               "method_not_allowed")
            finally:
                rec["end"] = time.time()
                if method == "POST":
                    state.leave(time.perf_counter() - t0)

        def api_delete(self, rec):
            self.read_body()
            u = urllib.parse.urlsplit(self.path)
            m = re.match(r"^/api/(projects|environments)/([^/]+)/query/([^/]+)/?$", u.path)
            if not m:
                rec["status"] = 404
                return self.error(404, "Not found.", "invalid_request", "not_found")
            project, _ = self.auth(m.group(2))
            if project is None:
                return
            qs = urllib.parse.parse_qs(u.query)
            msg = state.cancel(project, urllib.parse.unquote(m.group(3)),
                               qs.get("dequeue_only", ["false"])[0] == "true")
            rec["status"] = 200
            self.send_json(200, {"message": msg})

        def api_post(self, rec):
            raw = self.read_body()
            m = re.match(r"^/api/(projects|environments)/([^/?]+)/query/?(\?.*)?$", self.path)
            try:
                body = json.loads(raw.decode("utf-8"))
            except ValueError:
                body = None
            auth = self.headers.get("Authorization") or ""
            key = auth[7:] if auth.startswith("Bearer ") else None
            rec.update({
                "project_id": m.group(2) if m else None,
                "auth_ok": bool(key and state.project_keys(key)),
                "accept_encoding": self.headers.get("Accept-Encoding"),
                "content_type": self.headers.get("Content-Type"),
                "user_agent": self.headers.get("User-Agent"),
                "body": body,
                "client_query_id": body.get("client_query_id") if isinstance(body, dict) else None,
                "status": None,
            })
            with state.lock:
                state.requests.append(rec)
            if not m:
                rec["status"] = 404
                return self.error(404, "Not found.", "invalid_request", "not_found")
            project, key = self.auth(m.group(2))
            if project is None:
                rec["status"] = 401 if not rec["auth_ok"] else 403
                return
            qkind = body.get("query", {}).get("kind") if isinstance(body, dict) and \
                isinstance(body.get("query"), dict) else None
            wait = state.throttle(key, qkind)
            if wait is not None:
                secs = max(1, math.ceil(wait / state.clock.scale))
                rec["status"] = 429
                return self.error(429, "Request was throttled. Expected available in %d second%s."
                                  % (secs, "" if secs == 1 else "s"), "throttled_error", "throttled",
                                  {"Retry-After": secs})
            fl = InFlight(rec, project, rec["client_query_id"])
            with state.lock:
                state.inflight.append(fl)
            try:
                status, out = self.answer(rec, fl, project, body)
            except Cancelled:
                rec["status"] = "cancelled"
                status = None
            finally:
                fl.done = True
                state.release(fl)
                with state.lock:
                    state.inflight.remove(fl)
            if status is None:
                if rec["status"] is None:
                    rec["status"] = "cancelled"
                return self.drop()
            rec["status"] = status
            out()

        def answer(self, rec, fl, project, body):
            """(status, function that sends the answer); runs holding a slot."""
            c = state.config
            qkind = body.get("query", {}).get("kind") if isinstance(body, dict) and \
                isinstance(body.get("query"), dict) else None
            if state.limits_apply() and qkind != "DatabaseSchemaQuery":
                ok = state.acquire(fl)
                if not ok:
                    return 429, lambda: self.error(429, CONCURRENCY_TEXT, "throttled_error", "throttled")
            max_exec = float(c["max_execution_seconds"] if state.limits_apply()
                             else c["max_execution_seconds_hogql"])
            fault = state.next_fault()
            if fault and fault.pass_through:
                fault = None        # {"pass": true, "count": n}: the next n answers are real
            if fault and fault.delay_ms:
                # the query can hold its slot no longer than its execution limit
                delay = fault.delay_ms / 1000.0
                held = min(delay, max_exec / state.clock.scale)
                if fl.sleep(held):
                    raise Cancelled()
                state.release(fl)
                if fl.sleep(delay - held):
                    raise Cancelled()
            if fault and fault.reset:
                return "reset", self.drop
            if fault and fault.raw_body is not None:
                data = fault.raw_body.encode("utf-8", "surrogatepass")

                def send_raw():
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                return 200, send_raw
            if fault and fault.status:
                headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
                if fault.body is not None:
                    return fault.status, lambda: self.send_json(fault.status, fault.body, headers)
                return fault.status, lambda: self.error(fault.status, fault.detail, fault.type, fault.code,
                                                        headers)
            if body is None:
                return 400, lambda: self.error(400, "Malformed JSON body.", "validation_error", "parse_error")
            t0 = time.perf_counter()
            try:
                query = state.check_body(body)
                cached = state.cached(project, body)
                if cached is not None:
                    # without force_blocking PostHog may answer from its cache, however old
                    rec["cached"] = True
                    return 200, lambda: self.send_json(200, cached)
                result, nrows, read = state.run_query(project, query)
            except HogQLError as e:
                msg = str(e)
                return 400, lambda: self.error(400, msg)
            except QueryTooBig:
                return 504, lambda: self.error(504, TIMEOUT_TEXT, "server_error", "query_timeout")
            charge = read * float(c["cost_per_event_us"]) / 1e6      # fake seconds
            rec["events_read"] = read
            rec["cost_seconds"] = charge
            rec["rows"] = nrows
            if charge > max_exec:
                if fl.sleep(max_exec / state.clock.scale if c["cost_sleep"] else 0):
                    raise Cancelled()
                return 504, lambda: self.error(504, TIMEOUT_TEXT, "server_error", "query_timeout")
            if c["cost_sleep"] and fl.sleep(charge / state.clock.scale):
                raise Cancelled()
            send_fault = None if isinstance(result, bytes) else fault
            if isinstance(result, bytes):
                encoded = self.encode(result)
            else:
                state.store(project, body, result)
                if fault and fault.row_patch:
                    patches = fault.row_patch
                    for p in (patches if isinstance(patches, list) else [patches]):
                        if p["index"] < len(result["results"]):
                            result["results"][p["index"]] = p["row"]
                encoded = self.encode_json(result, fault)
            # the latency model is PostHog's time to its first byte: rendering
            # and gzipping the answer happen within it, as PostHog's do
            want = (float(c["latency_base_ms"]) / 1000.0 + float(c["latency_per_row_us"]) * nrows / 1e6)
            if want > 0 and fl.sleep(want - (time.perf_counter() - t0)):
                raise Cancelled()
            rec["ready"] = time.time()     # PostHog's work is done; sending starts
            return 200, lambda: self.send_encoded(200, encoded, fault=send_fault)

        # ----- control -----
        def control(self, method):
            raw = self.read_body() if method == "POST" else b""
            u = urllib.parse.urlsplit(self.path)
            path = u.path.rstrip("/") or "/"
            qs = urllib.parse.parse_qs(u.query)
            try:
                arg = json.loads(raw.decode("utf-8")) if raw else None
            except ValueError:
                return self.error(400, "Malformed JSON body.")
            pid = qs.get("project", [None])[0]
            project = state.projects.get(pid or state.default_project)
            if project is None:
                return self.error(404, "No project %s" % pid, "invalid_request", "not_found")
            try:
                return self.control_inner(method, path, arg, project, pid)
            except HogQLError as e:
                return self.error(400, str(e))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                return self.error(400, "bad control request: %s: %s" % (type(e).__name__, e))

        def control_inner(self, method, path, arg, project, pid):
            ok = lambda obj: self.send_json(200, obj)   # noqa: E731
            m = re.match(r"^/system/([a-z_]+)(/delete)?$", path)
            if m:
                if method == "GET" and not m.group(2):
                    return ok(project.table_rows("system." + m.group(1)))
                if method == "POST" and m.group(2):
                    return ok({"deleted": project.delete_system(m.group(1), arg["ids"], bool(arg.get("hard")))})
                if method == "POST":
                    return ok({"ids": project.upsert_system(m.group(1), arg)})
            routes = {
                ("POST", "/events"): lambda: ok({"inserted": project.add_events(arg)}),
                ("POST", "/generate"): lambda: ok({"inserted": project.generate(arg)}),
                ("POST", "/persons"): lambda: ok({"inserted": project.add_persons(arg)}),
                ("POST", "/persons/delete"): lambda: ok({"deleted": project.delete_persons(arg["ids"])}),
                ("POST", "/distinct_ids"): lambda: ok({"added": project.add_distinct_ids(arg)}),
                ("POST", "/persons/merge"): lambda: ok({"moved": project.merge_persons(arg["from"], arg["into"])}),
                ("GET", "/persons"): lambda: ok(project.persons()),
                ("POST", "/delete"): lambda: ok({"deleted": project.delete_events(arg["uuids"])}),
                ("GET", "/source"): lambda: ok(project.source()),
                ("POST", "/groups"): lambda: ok({"inserted": project.add_groups(arg)}),
                ("POST", "/groups/delete"): lambda: ok({"deleted": project.delete_groups(arg["groups"])}),
                ("GET", "/groups"): lambda: ok(project.table_rows("groups")),
                ("GET", "/sessions"): lambda: ok(project.table_rows("sessions")),
                ("POST", "/cohort_people"): lambda: ok({"members": project.set_cohort_members(
                    arg["cohort_id"], arg["person_ids"])}),
                ("GET", "/cohort_people"): lambda: ok(project.table_rows("cohort_people")),
                ("POST", "/static_cohort_people"): lambda: ok({"members": project.set_cohort_members(
                    arg["cohort_id"], arg["person_ids"], static=True)}),
                ("GET", "/static_cohort_people"): lambda: ok(project.table_rows("static_cohort_people")),
                ("GET", "/stats"): lambda: ok(state.stats()),
                ("GET", "/config"): lambda: ok(state.get_config(project)),
                ("GET", "/cancels"): lambda: ok(list(state.cancels)),
                ("GET", "/requests"): lambda: ok(list(state.requests)),
            }
            fn = routes.get((method, path))
            if fn:
                return fn()
            if method == "POST" and path == "/faults":
                with state.lock:
                    state.faults.extend(Fault(s) for s in arg)
                return ok({"queued": len(arg)})
            if method == "POST" and path == "/config":
                state.set_config(arg or {}, project)
                return ok(state.get_config(project))
            if method == "POST" and path == "/synthetic":
                syn = Synthetic(arg["count"], arg.get("seed", 1), arg.get("base"), arg.get("step_ms", 50))
                project.synthetic = syn
                return ok({"count": syn.count, "first": syn.first, "last": syn.last})
            if method == "POST" and path == "/export_copy":
                project.synthetic.export_copy(arg["path"])
                return ok({"ok": True})
            if method == "POST" and path == "/stats/reset":
                with state.lock:
                    state.reset_stats()
                return ok({"ok": True})
            if method == "POST" and path == "/reset":
                with state.lock:
                    state.requests = []
                    state.faults = []
                    state.cancels = []
                    state.throttle_history = {}
                    state.cache = {}
                if arg and arg.get("data"):
                    for p in ([project] if pid else state.projects.values()):
                        p.clear()
                return ok({"ok": True})
            return self.error(404, "Not found.", "invalid_request", "not_found")

        def do_POST(self):
            if kind == "api":
                return self.api("POST")
            return self.control("POST")

        def do_GET(self):
            if kind == "api":
                return self.api("GET")
            return self.control("GET")

        def do_DELETE(self):
            if kind == "api":
                return self.api("DELETE")
            return self.control("DELETE")

    return Handler


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--control-port", type=int, default=0)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--api-key", default="phx_test_key")
    ap.add_argument("--project-id", default="1")
    ap.add_argument("--project", action="append", default=[], metavar="ID:KEY[:TZ]",
                    help="another project and its key (repeatable); the first project is "
                         "--project-id/--api-key")
    ap.add_argument("--demo-events", type=int, default=0,
                    help="start with this many synthetic events from the last two days")
    ap.add_argument("--ready-file")
    ap.add_argument("--node", help="the node binary (default: node on PATH, or $PHSYNC_NODE)")
    for k, v in DEFAULT_CONFIG.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            ap.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "on", "yes"), default=v)
        elif k in ("timezone", "concurrency_scope"):
            ap.add_argument(flag, default=v)
        elif k == "max_window_seconds":
            ap.add_argument(flag, type=float, default=v)
        else:
            ap.add_argument(flag, type=type(v), default=v)
    args = ap.parse_args()

    config = {k: getattr(args, k) for k in DEFAULT_CONFIG}
    get_tz(config["timezone"])
    projects = {}
    specs = [(args.project_id, args.api_key, config["timezone"])]
    for spec in args.project:
        parts = spec.split(":", 2)
        if len(parts) < 2:
            ap.error("--project takes ID:KEY[:TZ]")
        specs.append((parts[0], parts[1], parts[2] if len(parts) > 2 else config["timezone"]))
    for pid, key, tzname in specs:
        get_tz(tzname)
        if str(pid) in projects:        # --project with the first project's id: its key
            projects[str(pid)].key, projects[str(pid)].timezone = key, tzname
        else:
            projects[str(pid)] = Project(pid, key, tzname)
    state = ServerState(projects, config)
    state.parser = Parser(args.node)
    first = projects[state.default_project]
    if args.demo_events:
        first.generate({"count": args.demo_events, "seed": 42,
                        "step_ms": int(2 * 86400 * 1000 / max(args.demo_events, 1))})

    api = Server(("127.0.0.1", args.port), make_handler(state, "api"))
    if args.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        api.socket = ctx.wrap_socket(api.socket, server_side=True)
    control = Server(("127.0.0.1", args.control_port), make_handler(state, "control"))
    for srv in (api, control):
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    info = {"api_port": api.server_address[1], "control_port": control.server_address[1],
            "projects": list(projects)}
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(info, f)
        os.rename(tmp, args.ready_file)
    print(json.dumps(info), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
