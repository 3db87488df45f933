/*-------------------------------------------------------------------------
 *
 * fetch.c
 *		Fetching a window [since, until) of a sync's query from PostHog and
 *		loading it: slices read in parallel, each page by page with keyset
 *		pagination, while the rows already received are inserted.
 *
 * Overlap.  Keyset pagination needs the last row of page n to ask for
 * page n+1, but not its insertion: a slice asks for its next page as soon
 * as a page has arrived, and its rows are inserted while PostHog computes
 * the next one.  Rows are taken as they arrive, a chunk at a time, each
 * chunk in a transaction of its own; no transaction is open while PostHog
 * is waited for.
 *
 * Slices.  The window is cut into slices of the cursor's range, each read
 * with its own keyset, up to phsync.max_concurrent_requests at once.
 *
 * A plan, where it pays (a cursor, pages of at least 10,000 rows, a window
 * of at most 35 days): one grouped count of the window's rows per bucket
 * (2,000 buckets at most), then slices cut where the counts add up to
 * equal shares of about 90% of a page each, or fewer rows, so that each of
 * the concurrent requests gets one and the last round of them is full
 * (inside a bucket its rows are taken as evenly spread, and the range of
 * buckets holding more than half a slice each is counted once more,
 * finer); together they
 * cover the window, so nothing depends
 * on the counts being exact.  A run of N rows then makes about
 * ceil(N / page) requests and one count, however the rows are spread.
 * The events preset counts first when its window is more than a day wide
 * (instead of probing it a day at a time); otherwise the first page is
 * asked for at once and the rest of the window is counted only if that
 * page comes back full, so that a small run stays one request.
 *
 * Without a plan, a run starts with one slice; once a page comes back
 * full (there is more than one page of data), slices are added from the
 * rest of the window, and when none is left a slice still in progress is
 * split in two.  A planned slice whose page still comes back full (rows
 * arrived, or one bucket holds more than a page) is split the same way.  For
 * the built-in events query, whose requests also bound `timestamp`, a new
 * slice covers at most a day at first, widening while slices come back
 * nearly empty and narrowing when PostHog says a query is too big, so
 * that each request reads what is near its slice, not the history after
 * it.  A 429 for too many concurrent queries lowers the number of slices
 * in flight for the rest of the run.
 *
 * Pages.  Requests start at 10,000 rows (or phsync.page_size, when
 * smaller) and double while they come back full within a quarter of
 * PostHog's 10-second limit, up to phsync.page_size; 504, 512 and our own
 * time limit halve the page and the slice.  PostHog cuts a LIMIT above its
 * cap silently (50,000 today, 10,000 in older self-hosted releases): a page
 * that stops at exactly one of those while more was asked is taken as
 * capped, not as the end of the slice, and the cap is learned for the run.
 *
 * Out of order, safely.  Slices commit independently, so max(cursor) of
 * the target can be ahead of a slice still in progress.  Each chunk's
 * transaction also stores the run's low-water mark (phsync.runs.
 * resume_from): every row of the window before it is loaded.  A run that
 * stops half-way is resumed from there (run.c), never from max(cursor).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>

#include "common/pg_prng.h"
#include "miscadmin.h"
#include "utils/memutils.h"
#include "nodes/pg_list.h"
#include "pgstat.h"
#include "utils/builtins.h"

#include "phsync.h"

/* rows inserted per transaction */
#define CHUNK_ROWS 5000
/* the first page size */
#define FIRST_PAGE 10000
/* a page grows while it takes less than this (PostHog's limit is 10 s) */
#define GROW_SECONDS 2.5
/* the narrowest slice phsync shrinks to after a 504/512 */
#define MIN_SPAN_USECS USECS_PER_SEC
/* a new slice of the built-in events query covers at most this at first */
#define FIRST_SLICE_USECS USECS_PER_DAY
/* a slice in progress is split only when it has this much left */
#define MIN_SPLIT_USECS (60 * USECS_PER_SEC)
/* a window up to this long is planned from a count (a longer backfill adapts) */
#define PLAN_MAX_USECS (35 * USECS_PER_DAY)
/* the plan's count has at most this many buckets */
#define PLAN_BUCKETS 2000
/* a planned slice fills this share of a page: room for rows that arrive meanwhile */
#define PLAN_FILL 0.9
/* the row caps PostHog applies, silently: today's and older releases' */
static const int64 known_caps[] = {10000, 50000};

/* one request of a slice */
typedef struct Request
{
	struct Slice *slice;
	PhsyncTransfer *t;
	int			limit;			/* rows asked */
	bool		executing;		/* PostHog has not begun to answer: it holds a slot */
	TimestampTz from;			/* the slice of the cursor it asked for */
	TimestampTz to;
	int			cursor_col;		/* the cursor's result column; -1 none, -2 not known yet */
	bool		judged;			/* its transfer ended and was looked at */
	PhsyncColumns *cols;		/* its columns, once known */
} Request;

/* a slice [from, to) of the window, read with its own keyset */
typedef struct Slice
{
	TimestampTz from;
	TimestampTz to;
	PhsyncKeyset next;			/* where its next page starts */
	List	   *requests;		/* oldest first: answered with rows left, then in flight */
	bool		asked;			/* a request was made */
	bool		more;			/* the last page was full: ask again */
	bool		exhausted;		/* nothing more to ask */
	PhsyncRetryState retry;		/* of the request being retried */
	TimestampTz retry_at;		/* not before then */
	int			pages;
	int64		page_span;		/* how far its last full page moved it (0: unknown) */
	TimestampTz committed;		/* cursor of the last row loaded */
	bool		committed_any;
} Slice;

/* a window being fetched */
typedef struct Fetch
{
	PhsyncRunState *st;
	MemoryContext cxt;			/* slices, requests, keysets: the window's */
	PhsyncQuery q;				/* the window; each request sets its slice */
	List	   *slices;			/* by from */
	TimestampTz next_start;		/* no slice covers [next_start, until) yet */
	int64		width;			/* of a new slice; 0: the rest of the window */
	bool		expand;			/* a page came back full: several slices */
	bool		planned;		/* a plan was made (or tried): never twice */
	bool		plan_pending;	/* the first page came back full: plan the rest */
	int			inflight;		/* requests PostHog has not begun to answer */
	int			open;			/* requests not judged yet (inflight or arriving) */
	long		wait_ms;		/* nothing to do before this (budget, retries) */
} Fetch;

/*
 * What the run does, for pg_stat_activity: "fetching page n" while it
 * waits for PostHog's answer to its nth page, "loading page n" while it
 * inserts rows of it.
 */
static void
report(PhsyncRunState *st, const char *what, int page)
{
	pgstat_report_activity(STATE_RUNNING,
						   psprintf("sync %s: %s page %d, %lld rows so far%s",
									st->sync->name, what, page,
									(long long) st->counters.received,
									st->counters.retries ? psprintf(" (%d retries)", st->counters.retries) : ""));
}

/* ---------- requests ---------- */

static char *
new_client_id(PhsyncRunState *st)
{
	return psprintf("phsync-%lld-%d-%016llx",
					(long long) st->run_id, st->counters.requests + 1,
					(unsigned long long) pg_prng_uint64(&pg_global_prng_state));
}

/*
 * May a request start now?  The budget, and a throttle's wait.
 */
static bool
may_start(Fetch *f)
{
	long		wait;

	if (budget_take(f->st->endpoint.budget_key, f->st->policy.per_minute,
					f->st->policy.per_hour, &wait))
		return true;
	f->wait_ms = Min(f->wait_ms, wait);
	return false;
}

/*
 * Ask PostHog for the next page of slice s.
 */
static void
start_request(Fetch *f, Slice *s)
{
	PhsyncRunState *st = f->st;
	PhsyncQuery q = f->q;
	Request    *r = MemoryContextAllocZero(f->cxt, sizeof(Request));
	char	   *client_id = new_client_id(st);
	MemoryContext old;

	q.limit = st->limit;
	q.sliced = s->from > q.since || s->to < q.until;
	q.slice_from = s->from;
	q.slice_until = s->to;
	r->slice = s;
	r->limit = q.limit;
	r->from = s->from;
	r->to = s->to;
	r->cursor_col = -2;
	r->t = http_start(st->http,
					  hogql_request_body(&q, hogql_build(&q, &s->next), &s->next, 0,
										 st->name, client_id),
					  client_id);
	old = MemoryContextSwitchTo(f->cxt);
	s->requests = lappend(s->requests, r);
	MemoryContextSwitchTo(old);
	s->asked = true;
	s->more = false;
	st->counters.requests++;
	r->executing = true;
	f->inflight++;
	f->open++;
	shmem_set_waiting(0);
}

/* ---------- slices ---------- */

static Slice *
new_slice(Fetch *f, TimestampTz from, TimestampTz to)
{
	Slice	   *s = MemoryContextAllocZero(f->cxt, sizeof(Slice));
	MemoryContext old;
	ListCell   *lc;
	int			i = 0;

	s->from = from;
	s->to = to;
	/* keep the list ordered by from */
	foreach(lc, f->slices)
	{
		if (((Slice *) lfirst(lc))->from > from)
			break;
		i++;
	}
	old = MemoryContextSwitchTo(f->cxt);
	f->slices = list_insert_nth(f->slices, i, s);
	MemoryContextSwitchTo(old);
	return s;
}

/*
 * Where slice s stands: the cursor of its next page's position, or its
 * start.
 */
static TimestampTz
slice_position(Slice *s)
{
	return s->next.valid ? Max(s->from, hogql_keyset_cursor(&s->next)) : s->from;
}

static bool
slice_idle(Slice *s, TimestampTz now)
{
	ListCell   *lc;

	if (s->exhausted || (s->asked && !s->more) || s->retry_at > now)
		return false;
	foreach(lc, s->requests)
		if (!((Request *) lfirst(lc))->judged)
			return false;		/* one in flight already */
	return true;
}

/*
 * Split the slice in progress with the most left in two; the new half is
 * returned (not started), NULL when no slice is worth splitting.
 */
static Slice *
split_slice(Fetch *f)
{
	Slice	   *best = NULL;
	int64		best_left = 2 * MIN_SPLIT_USECS;
	ListCell   *lc;
	TimestampTz mid;
	Slice	   *half;

	foreach(lc, f->slices)
	{
		Slice	   *s = lfirst(lc);
		int64		left;

		if (s->exhausted || !s->asked)
			continue;
		/* a planned slice is split only when a page of it came back full */
		if (f->planned && s->page_span == 0)
			continue;
		left = s->to - slice_position(s);
		/* worth it only when at least two more pages look left */
		if (s->page_span > 0 && left < 2 * s->page_span)
			continue;
		if (left > best_left)
		{
			best = s;
			best_left = left;
		}
	}
	if (best == NULL || f->q.cursor == NULL)
		return NULL;			/* without a cursor there is nothing to split by */
	mid = slice_position(best) + best_left / 2;
	half = new_slice(f, mid, best->to);
	best->to = mid;
	return half;
}

/* ---------- the plan ---------- */

/*
 * PostHog's count of q's rows per bucket of `bucket` microseconds from
 * q->since: counts[0 .. n-1] (zero where PostHog lists no bucket), and
 * when sums is not NULL the sums of its distinct keys' hashes
 * (hogql_count_query()).  Returns false, counting nothing, when PostHog
 * says the query is too big and may_ask_less allows the caller to ask for
 * less.  Shared with verify.c.
 */
bool
fetch_bucket_counts(PhsyncRunState *st, PhsyncQuery *q, const char *distinct_key,
					int64 bucket, int64 *counts, int64 *sums, int n, bool may_ask_less)
{
	PhsyncScan *scan = fetch_once(st, q, hogql_count_query(q, distinct_key, sums != NULL),
								  bucket, may_ask_less);
	int			ncols = sums ? 3 : 2;
	PhsyncRow  *row = row_alloc(ncols);
	const char *encoded;

	if (scan == NULL)
		return false;
	memset(counts, 0, sizeof(int64) * n);
	if (sums)
		memset(sums, 0, sizeof(int64) * n);
	while (scan_next_row(scan, &encoded))
	{
		int64		i;
		int			c;

		if (!row_decode(encoded, row))
			c = 0;
		else
			for (c = 0; c < ncols && row->kinds[c] == PHSYNC_VALUE_NUMBER; c++)
				;
		if (c < ncols)
		{
			scan_free(scan);
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
					 errmsg("PostHog sent a count row phsync cannot read")));
		}
		i = strtoll(row->values[0], NULL, 10);
		if (i >= 0 && i < n)
		{
			counts[i] = strtoll(row->values[1], NULL, 10);
			if (sums)
				sums[i] = strtoll(row->values[2], NULL, 10);
		}
	}
	scan_free(scan);
	return true;
}

/* is a plan of [from, until) worth a count? */
static bool
may_plan(Fetch *f, TimestampTz from)
{
	return !f->planned && f->q.cursor != NULL && f->st->page_size >= FIRST_PAGE &&
		f->q.until - from > USECS_PER_SEC && f->q.until - from <= PLAN_MAX_USECS;
}

/*
 * Plan [from, until) of the window (see the top of this file).  `first`,
 * when not NULL, is the slice whose first page came back full, at
 * position `from`: it keeps [its start, the first cut).  When PostHog finds
 * the count too big the window is read without a plan.
 */
/* a bucket of a plan's count: rows in [from, to) */
typedef struct PlanBucket
{
	TimestampTz from;
	TimestampTz to;
	int64		rows;
} PlanBucket;

/*
 * PostHog's count of [from, until) in at most PLAN_BUCKETS buckets of whole
 * seconds: *n buckets, palloc'd; NULL when PostHog says it is too big.
 */
static PlanBucket *
count_range(Fetch *f, TimestampTz from, TimestampTz until, int *n)
{
	PhsyncQuery q = f->q;
	int64		span = until - from;
	int64		width = (span / PLAN_BUCKETS / USECS_PER_SEC + 1) * USECS_PER_SEC;
	int			nb = (int) (span / width + (span % width != 0));
	int64	   *counts = palloc(sizeof(int64) * nb);
	PlanBucket *b;
	int			i;

	q.since = from;
	q.until = until;
	q.sliced = false;
	if (!fetch_bucket_counts(f->st, &q, NULL, width, counts, NULL, nb, true))
		return NULL;
	b = palloc(sizeof(PlanBucket) * nb);
	for (i = 0; i < nb; i++)
	{
		b[i].from = from + i * width;
		b[i].to = Min(b[i].from + width, until);
		b[i].rows = counts[i];
	}
	pfree(counts);
	*n = nb;
	return b;
}

static void
plan_window(Fetch *f, Slice *first, TimestampTz from)
{
	PhsyncRunState *st = f->st;
	int			n;
	PlanBucket *b;
	int			page = st->cap > 0 ? Min(st->page_size, st->cap) : st->page_size;
	int64		total = 0;
	int64		per_slice;
	int64		acc = 0;
	int64		nslices;
	int			made = 0;
	int			lo = -1;
	int			hi = -1;
	TimestampTz start;
	int			i;

	f->planned = true;
	b = count_range(f, from, f->q.until, &n);
	if (b == NULL)
	{
		ereport(LOG,
				(errmsg("phsync run %lld: PostHog says counting the window is too big; reading it without a plan",
						(long long) st->run_id)));
		return;
	}
	for (i = 0; i < n; i++)
		total += b[i].rows;
	f->next_start = f->q.until;
	if (total == 0 && first == NULL)
		return;					/* nothing there: no request at all */

	/* pages of about PLAN_FILL of a page, or one per request at once */
	nslices = (int64) ceil(total / (PLAN_FILL * page));
	nslices = Max(nslices, Min(st->concurrency, (total + FIRST_PAGE - 1) / FIRST_PAGE));
	nslices = Max(nslices, 1);
	/* whole rounds of concurrent requests: none left to run alone at the end */
	if (nslices > st->concurrency)
		nslices = (nslices + st->concurrency - 1) / st->concurrency * st->concurrency;
	per_slice = (total + nslices - 1) / nslices;

	/*
	 * Buckets of more than half a slice (a burst, or a wide window's rows in
	 * a few minutes) would be cut blind: count their range again, finer.
	 */
	for (i = 0; nslices > 1 && i < n; i++)
		if (b[i].rows > per_slice / 2 && b[i].to - b[i].from > USECS_PER_SEC)
		{
			if (lo < 0)
				lo = i;
			hi = i;
		}
	if (lo >= 0)
	{
		int			nfine;
		PlanBucket *fine = count_range(f, b[lo].from, b[hi].to, &nfine);

		if (fine)
		{
			PlanBucket *all = palloc(sizeof(PlanBucket) * (n - (hi - lo + 1) + nfine));

			memcpy(all, b, sizeof(PlanBucket) * lo);
			memcpy(all + lo, fine, sizeof(PlanBucket) * nfine);
			memcpy(all + lo + nfine, b + hi + 1, sizeof(PlanBucket) * (n - hi - 1));
			n = n - (hi - lo + 1) + nfine;
			b = all;
			total = 0;
			for (i = 0; i < n; i++)
				total += b[i].rows;
			per_slice = (total + nslices - 1) / nslices;
		}
	}
	st->limit = page;

	start = first ? first->from : from;
	/* its range is cut anew: split it only if a page of it is full again */
	if (first)
		first->page_span = 0;

	/*
	 * Cut k falls where the counts reach k / nslices of the total; inside a
	 * bucket the rows are taken as evenly spread, so that a bucket holding
	 * more than a slice (a burst, or a window wide for its rows) is still cut.
	 * The last slice takes the rest.
	 */
	for (i = 0; i < n && made < nslices - 1; i++)
	{
		while (made < nslices - 1 && acc + b[i].rows > per_slice * (made + 1))
		{
			int64		want = per_slice * (made + 1) - acc;
			TimestampTz cut = b[i].from +
				(TimestampTz) ((double) (b[i].to - b[i].from) * want / b[i].rows);

			if (cut <= start || cut >= f->q.until)
				break;
			if (first)
				first->to = cut;
			else
				(void) new_slice(f, start, cut);
			first = NULL;
			made++;
			start = cut;
		}
		acc += b[i].rows;
	}
	if (first == NULL)
		(void) new_slice(f, start, f->q.until);
	made++;
	ereport(DEBUG1,
			(errmsg("phsync run %lld: PostHog counts %lld rows from %s; %d slices of about %lld rows",
					(long long) st->run_id, (long long) total, phsync_format_timestamp(from),
					made, (long long) per_slice)));
}

/*
 * Start as many requests as the run may have in flight.
 */
static bool
start_requests(Fetch *f)
{
	PhsyncRunState *st = f->st;
	TimestampTz now;
	bool		started = false;

	if (f->plan_pending)
	{
		Slice	   *first = linitial(f->slices);

		f->plan_pending = false;
		plan_window(f, first, slice_position(first));
	}
	now = GetCurrentTimestamp();

	/*
	 * At most `concurrency` queries executing at PostHog (each holds one of
	 * the project's query slots), and as many more whose answers are
	 * arriving: the next page of a slice can only be asked once its last
	 * row is in, so the other slices keep PostHog busy meanwhile.  (One at
	 * a time means one: no request while another's answer arrives.)
	 */
	while (f->inflight < st->concurrency &&
		   f->open < (st->concurrency > 1 ? 2 * st->concurrency : 1))
	{
		Slice	   *s = NULL;
		ListCell   *lc;

		foreach(lc, f->slices)
		{
			Slice	   *c = lfirst(lc);

			if (slice_idle(c, now))
			{
				s = c;
				break;
			}
			if (c->retry_at > now)
				f->wait_ms = Min(f->wait_ms, TimestampDifferenceMilliseconds(now, c->retry_at) + 1);
		}
		if (s == NULL && f->next_start < f->q.until && (f->expand || f->slices == NIL))
		{
			/* a slice of width, or the rest when less than half as much would be left */
			TimestampTz to = f->width > 0 && f->width + f->width / 2 < f->q.until - f->next_start ?
				f->next_start + f->width : f->q.until;

			s = new_slice(f, f->next_start, to);
			f->next_start = to;
		}
		if (s == NULL && f->expand && f->next_start >= f->q.until)
			s = split_slice(f);
		if (s == NULL || !may_start(f))
			break;
		start_request(f, s);
		started = true;
	}
	return started;
}

/* ---------- judging answers ---------- */

/*
 * Was a page of nrows rows, asked for r->limit, full?  A page that stops
 * at one of PostHog's known caps while more was asked is capped: that cap
 * is the most PostHog returns, for the rest of the run.
 */
static bool
page_full(PhsyncRunState *st, Request *r, int64 nrows)
{
	int			i;

	if (nrows >= r->limit)
		return true;
	for (i = 0; i < (int) lengthof(known_caps); i++)
	{
		if (nrows == known_caps[i])
		{
			if (st->cap != nrows)
				ereport(LOG,
						(errmsg("phsync run %lld: PostHog returned %lld rows where %d were asked: it caps results at %lld rows, so pages are that size now",
								(long long) st->run_id, (long long) nrows, r->limit, (long long) nrows)));
			st->cap = (int) nrows;
			st->limit = Min(st->limit, st->cap);
			return true;
		}
	}
	return false;
}

/*
 * PostHog said the query was too big: halve the page, and the part of the
 * slice left (the other half becomes a slice of its own), and make new
 * slices no wider.
 */
static void
ask_for_less(Fetch *f, Slice *s)
{
	PhsyncRunState *st = f->st;
	TimestampTz pos = slice_position(s);
	int64		half = Max((s->to - pos) / 2, MIN_SPAN_USECS);

	st->limit = Max(st->limit / 2, Min(100, st->page_size));
	/* without a cursor, only the page can be smaller */
	if (f->q.cursor && pos + half < s->to)
	{
		(void) new_slice(f, pos + half, s->to);
		s->to = pos + half;
	}
	if (hogql_bounds_timestamp(&f->q))
		f->width = Max(MIN_SPAN_USECS, f->width > 0 ? Min(f->width, half) : half);
	ereport(LOG,
			(errmsg("phsync run %lld: asking PostHog for less: %lld s of the window, %d rows a page",
					(long long) st->run_id, (long long) (half / USECS_PER_SEC), st->limit)));
}

/*
 * A request ended: judge it.  On success the slice's next position is its
 * last row, and the page size may grow; on failure the slice retries
 * later, as the retry policy says, or the run fails.
 */
static void
judge(Fetch *f, Request *r)
{
	PhsyncRunState *st = f->st;
	Slice	   *s = r->slice;
	PhsyncHttpResult res;
	PhsyncRetryStep step;
	TimestampTz now = GetCurrentTimestamp();

	r->judged = true;
	f->open--;
	if (r->executing)
	{
		r->executing = false;
		f->inflight--;
	}
	http_result(r->t, &res);
	if (res.ok)
	{
		PhsyncScan *scan = http_scan(r->t);
		int64		nrows = scan_rows(scan);
		MemoryContext old = MemoryContextSwitchTo(f->cxt);

		/*
		 * Read the columns again from the whole answer: PostHog sends "types"
		 * and "timezone" after the rows, so those read at its first chunk
		 * may lack them, and the keyset is typed by them.
		 */
		r->cols = scan_columns(scan);
		if (r->cols->timezone && st->timezone == NULL)
			st->timezone = MemoryContextStrdup(st->cxt, r->cols->timezone);
		st->counters.pages++;
		s->pages++;
		memset(&s->retry, 0, sizeof(s->retry));
		if (nrows > 0 && page_full(st, r, nrows))
		{
			TimestampTz before = slice_position(s);

			hogql_keyset_from_row(&s->next, &f->q, r->cols, scan_last_row(scan));
			if (f->q.cursor)
				s->page_span = Max(hogql_keyset_cursor(&s->next) - before, 1);
			MemoryContextSwitchTo(old);
			s->more = true;
			/* split while this page was asked for: past its end is done */
			if (hogql_keyset_cursor(&s->next) >= s->to)
				s->exhausted = true;
			f->expand = true;
			/* the first page of the only slice was full: plan the rest */
			if (s->pages == 1 && !s->exhausted && list_length(f->slices) == 1 &&
				s->from == f->q.since && s->to == f->q.until &&
				may_plan(f, hogql_keyset_cursor(&s->next)))
				f->plan_pending = true;
			if (res.seconds < GROW_SECONDS && st->limit < st->page_size &&
				(st->cap == 0 || st->limit < st->cap) && r->limit == st->limit)
				st->limit = Min(st->limit * 2, st->cap ? Min(st->cap, st->page_size) : st->page_size);
		}
		else
		{
			MemoryContextSwitchTo(old);
			s->exhausted = true;
			/* nearly empty in one page: new slices may be wider */
			if (s->pages == 1 && f->width > 0 && nrows < r->limit / 2)
				f->width = Min(f->width * 2, f->q.until - f->q.since);
		}
		return;
	}

	/* failed: the slice asks again from the same position, later */
	s->more = true;
	retry_step(&st->policy, &s->retry, &res,
			   RETRY_MAY_ASK_LESS | (st->concurrency > 1 ? RETRY_MAY_RUN_FEWER : 0), &step);
	if (step.give_up)
	{
		if (s->retry.retries > 0)
			ereport(LOG,
					(errmsg("phsync run %lld: giving up on page %d after %d retries",
							(long long) st->run_id, st->counters.pages + 1, s->retry.retries)));
		http_raise(&st->endpoint, &res);
	}
	s->retry_at = TimestampTzPlusMilliseconds(now, step.wait_ms);
	if (step.throttled)
	{
		/* a wait, not a failure: the budget is closed meanwhile */
		budget_close(st->endpoint.budget_key, s->retry_at);
		shmem_set_waiting(s->retry_at);
		ereport(st->throttle_logged ? DEBUG1 : LOG,
				(errmsg("phsync run %lld: PostHog throttles requests; waiting %.0f s, until %s",
						(long long) st->run_id, step.wait_ms / 1000.0, timestamptz_to_str(s->retry_at)),
				 errdetail("%s", res.detail),
				 st->throttle_logged ? 0 : errhint("Further waits of this run are logged at DEBUG1.")));
		st->throttle_logged = true;
		st->counters.throttled++;
	}
	if (step.fewer_at_once)
	{
		st->concurrency--;
		ereport(LOG,
				(errmsg("phsync run %lld: PostHog has too many queries of this project running; %d at once from now on",
						(long long) st->run_id, st->concurrency)));
	}
	if (step.ask_for_less)
		ask_for_less(f, s);
	if (step.counted)
	{
		st->counters.retries++;
		ereport(LOG,
				(errmsg("phsync run %lld: %s, retrying in %.1f s (retry %d of %d)",
						(long long) st->run_id, retry_describe(&res), step.wait_ms / 1000.0,
						s->retry.retries, st->policy.max_retries),
				 errdetail("%s", res.detail)));
	}
}

/*
 * Note requests PostHog began to answer, and judge every one that ended.
 */
static void
judge_ended(Fetch *f)
{
	ListCell   *lc;

	foreach(lc, f->slices)
	{
		Slice	   *s = lfirst(lc);
		ListCell   *rc;

		foreach(rc, s->requests)
		{
			Request    *r = lfirst(rc);

			if (r->executing && http_answering(r->t))
			{
				/* PostHog's part is done: its slot is free */
				r->executing = false;
				f->inflight--;
			}
			if (!r->judged && http_done(r->t))
				judge(f, r);
		}
	}
}

/* ---------- loading ---------- */

/*
 * Every row of the window before this is loaded: the low-water mark.
 */
static TimestampTz
low_water(Fetch *f)
{
	TimestampTz mark = f->next_start;
	ListCell   *lc;

	foreach(lc, f->slices)
	{
		Slice	   *s = lfirst(lc);

		mark = Min(mark, s->committed_any ? Max(s->from, s->committed) : s->from);
	}
	return mark;
}

/* what a row's cursor says about it (check_row) */
typedef enum RowCheck
{
	ROW_LOAD,					/* inside the slice: load it */
	ROW_OTHER_HALF,				/* past a split made after asking: the other half's */
	ROW_BAD						/* outside what was asked, or not a date-time */
} RowCheck;

/*
 * Check the cursor of an encoded row against what request r asked for
 * (every row, not only the last: a server that sends a row of 2999 first
 * must not move the watermark there).  *cursor gets its instant; *why, for
 * a bad row, the reason.
 */
static RowCheck
check_row(Fetch *f, Request *r, const char *encoded, PhsyncRow *row,
		  TimestampTz *cursor, char **why)
{
	Slice	   *s = r->slice;
	const char *v;
	bool		date_only;
	bool		exact;
	int64		slack;

	if (r->cursor_col < 0 || !row_decode(encoded, row))
		return ROW_LOAD;		/* no cursor; or malformed: the loader refuses it */
	v = row->values[r->cursor_col];
	if (v == NULL)
		return ROW_LOAD;		/* null: the cursor column's NOT NULL refuses it */
	if (row->kinds[r->cursor_col] != PHSYNC_VALUE_STRING ||
		!convert_timestamp(v, row->lens[r->cursor_col], cursor, &date_only, &exact))
	{
		*why = psprintf("its cursor %s is not a date-time", row_value_json(row, r->cursor_col));
		return ROW_BAD;
	}
	/* a Date is compared at midnight, in the project's time zone: a day's slack */
	slack = date_only ? USECS_PER_DAY : 0;
	if (*cursor < r->from - slack || *cursor >= r->to + slack)
	{
		*why = psprintf("its cursor %s is outside the slice asked for, from %s to %s",
						row_value_json(row, r->cursor_col), phsync_format_timestamp(r->from),
						phsync_format_timestamp(r->to));
		return ROW_BAD;
	}
	if (*cursor >= s->to && !date_only)
		return ROW_OTHER_HALF;
	return ROW_LOAD;
}

/*
 * Take a chunk of rows of request r and load them in a transaction of
 * their own, with the run's counters and low-water mark.  A row whose
 * cursor is outside what was asked goes to phsync.rejects instead; one
 * past a split of its slice is left to the other half, which reads it.
 */
static void
load_chunk(Fetch *f, Request *r)
{
	PhsyncRunState *st = f->st;
	Slice	   *s = r->slice;
	PhsyncScan *scan = http_scan(r->t);
	const char **rows = palloc(sizeof(char *) * CHUNK_ROWS);
	const char **bad = palloc(sizeof(char *) * CHUNK_ROWS);
	char	  **why = palloc(sizeof(char *) * CHUNK_ROWS);
	int			n = 0;
	int			nbad = 0;
	int			i;
	const char *encoded;
	PhsyncRow  *row;
	MemoryContext cxt;
	TimestampTz last = 0;
	bool		any = false;

	if (r->cols == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(f->cxt);

		r->cols = scan_columns(scan);
		MemoryContextSwitchTo(old);
	}
	if (r->cursor_col == -2)
	{
		r->cursor_col = -1;
		for (i = 0; f->q.cursor && i < r->cols->ncolumns; i++)
			if (strcmp(r->cols->names[i], f->q.cursor) == 0)
				r->cursor_col = i;
	}
	if (st->loader == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(st->cxt);

		st->loader = loader_create(st->target, r->cols, st->sync->update, st->on_bad_row);
		if (st->track_keys)
			loader_track_keys(st->loader);
		MemoryContextSwitchTo(old);
	}
	else if (!loader_matches(st->loader, r->cols))
		ereport(ERROR,
				(errcode(ERRCODE_DATA_EXCEPTION),
				 errmsg("PostHog returned different columns on page %d", st->counters.pages)));

	row = row_alloc(r->cols->ncolumns);
	for (i = 0; i < CHUNK_ROWS && scan_next_row(scan, &encoded); i++)
	{
		TimestampTz cursor = 0;
		char	   *reason = NULL;

		switch (check_row(f, r, encoded, row, &cursor, &reason))
		{
			case ROW_LOAD:
				rows[n++] = encoded;
				if (r->cursor_col >= 0 && row->values[r->cursor_col])
				{
					last = any ? Max(last, cursor) : cursor;
					any = true;
				}
				break;
			case ROW_BAD:
				bad[nbad] = encoded;
				why[nbad++] = reason;
				break;
			case ROW_OTHER_HALF:
				break;
		}
	}
	if (i == 0)
		return;
	if (n == 0 && nbad == 0)
	{
		scan_release(scan);
		http_resume(r->t);
		return;
	}
	st->counters.received += n + nbad;

	report(st, "loading", st->counters.pages);
	cxt = xact_begin();
	/* the run's last commit is synchronous: see xact_set_async_commit() */
	xact_set_async_commit();
	loader_insert(st->loader, rows, n, st->run_id, &st->counters);
	for (i = 0; i < nbad; i++)
		loader_reject(st->loader, bad[i], why[i], st->run_id, &st->counters);
	if (any)
	{
		s->committed = s->committed_any ? Max(s->committed, last) : last;
		s->committed_any = true;
	}
	runlog_progress_resume(st->run_id, &st->counters, low_water(f));
	xact_commit(cxt);
	scan_release(scan);
	http_resume(r->t);
	shmem_set_progress(st->counters.pages, st->counters.received);
	elog(DEBUG1, "phsync run %lld: %d rows loaded, %d refused", (long long) st->run_id, n, nbad);
}

/*
 * The request whose rows are due to be loaded: a slice's oldest request
 * with rows, once a chunk is there (or it ended, or it is paused: its
 * buffer is full); the one with the most rows first.
 */
static Request *
next_to_load(Fetch *f)
{
	Request    *best = NULL;
	int64		best_rows = 0;
	ListCell   *lc;

	foreach(lc, f->slices)
	{
		Slice	   *s = lfirst(lc);
		Request    *r;
		PhsyncScan *scan;
		int64		pending;

		if (s->requests == NIL)
			continue;
		r = linitial(s->requests);
		scan = http_scan(r->t);
		if (scan == NULL || scan_member(scan, "columns") == NULL)
			continue;
		pending = scan_pending(scan);
		if (pending == 0 ||
			(pending < CHUNK_ROWS && !http_done(r->t) && !http_paused(r->t) &&
			 scan_buffered(scan) < 8 * 1024 * 1024))
			continue;
		if (pending > best_rows)
		{
			best = r;
			best_rows = pending;
		}
	}
	return best;
}

/*
 * Drop requests that are judged and fully loaded, and slices that are
 * done.
 */
static void
tidy(Fetch *f)
{
	ListCell   *lc;

	foreach(lc, f->slices)
	{
		Slice	   *s = lfirst(lc);

		while (s->requests != NIL)
		{
			Request    *r = linitial(s->requests);
			PhsyncScan *scan = http_scan(r->t);

			if (!r->judged || (scan && scan_pending(scan) > 0 && scan_member(scan, "columns")))
				break;
			http_finish(r->t);
			s->requests = list_delete_first(s->requests);
			pfree(r);
		}
		if (s->exhausted && s->requests == NIL)
		{
			hogql_keyset_reset(&s->next);
			f->slices = foreach_delete_current(f->slices, lc);
			pfree(s);
		}
	}
}

/*
 * Fetch [since, until) and load it (see the top of this file).  Errors
 * propagate to the caller, whose cleanup (http_close()) cancels what is
 * still in flight.
 */
void
fetch_window(PhsyncRunState *st, TimestampTz since, TimestampTz until)
{
	Fetch		f;
	MemoryContext outer = CurrentMemoryContext;
	MemoryContext loop_cxt;

	memset(&f, 0, sizeof(f));
	f.st = st;
	f.cxt = AllocSetContextCreate(outer, "phsync window", ALLOCSET_DEFAULT_SIZES);
	loop_cxt = AllocSetContextCreate(outer, "phsync window step", ALLOCSET_DEFAULT_SIZES);
	f.q = *st->query;
	f.q.since = since;
	f.q.until = until;
	f.next_start = since;
	f.width = hogql_bounds_timestamp(&f.q) ? FIRST_SLICE_USECS : 0;
	if (st->limit == 0)
		st->limit = Min(FIRST_PAGE, st->page_size);
	/* the events preset would probe a wide window a day at a time: count it */
	if (hogql_bounds_timestamp(&f.q) && until - since > FIRST_SLICE_USECS && may_plan(&f, since))
		plan_window(&f, NULL, since);

	while (f.next_start < until || f.slices != NIL)
	{
		Request    *r;

		MemoryContextReset(loop_cxt);
		MemoryContextSwitchTo(loop_cxt);
		phsync_check_interrupts();
		f.wait_ms = 100;
		(void) start_requests(&f);
		http_poll(st->http, 0);
		judge_ended(&f);
		/* the next pages are asked for before loading what came */
		(void) start_requests(&f);
		r = next_to_load(&f);
		if (r)
			load_chunk(&f, r);
		tidy(&f);
		if (r == NULL && (f.next_start < until || f.slices != NIL))
		{
			report(st, f.open > 0 ? "fetching" : "waiting to fetch", st->counters.pages + 1);
			http_poll(st->http, Max(f.wait_ms, 1));
			judge_ended(&f);
		}
	}
	MemoryContextSwitchTo(outer);
	MemoryContextDelete(loop_cxt);
	MemoryContextDelete(f.cxt);
}

/* the body of one of fetch_once()'s attempts */
typedef struct OnceBody
{
	PhsyncRunState *st;
	PhsyncQuery *q;
	const char *hogql;
	int64		bucket;
} OnceBody;

static char *
once_body(void *arg, char **client_id)
{
	OnceBody   *b = (OnceBody *) arg;

	*client_id = new_client_id(b->st);
	report(b->st, "counting,", b->st->counters.pages + 1);
	return hogql_request_body(b->q, b->hogql, NULL, b->bucket, b->st->name, *client_id);
}

/*
 * One request with a fixed HogQL text (verify's counts), retried as every
 * request is (request_with_retries()): returns its complete scan, which
 * the caller frees with scan_free(); NULL when PostHog says it is too big
 * and the caller may ask for less.  (No slices, no pages: the answer is small.)
 */
PhsyncScan *
fetch_once(PhsyncRunState *st, PhsyncQuery *q, const char *hogql, int64 bucket,
		   bool may_ask_less)
{
	OnceBody	b = {st, q, hogql, bucket};
	PhsyncRequestSpec r = {0};

	r.http = st->http;
	r.endpoint = &st->endpoint;
	r.policy = &st->policy;
	r.body = once_body;
	r.arg = &b;
	r.flags = may_ask_less ? RETRY_MAY_ASK_LESS : 0;
	r.throttle_elevel = LOG;
	r.requests = &st->counters.requests;
	r.retries = &st->counters.retries;
	r.throttled = &st->counters.throttled;
	return request_with_retries(&r);
}
