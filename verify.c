/*-------------------------------------------------------------------------
 *
 * verify.c
 *		The completeness check: for each bucket (a day, say) of a range, the
 *		number of rows PostHog has against the number in the target, and
 *		(for a one-column key of a type both sides render alike) the sum of
 *		the keys' hashes, so that a bucket whose rows changed while its
 *		count did not is found; with repair, the buckets that differ are
 *		narrowed down and read again.
 *
 * PostHog is asked with one grouped count() query per chunk of buckets,
 * paced and retried like any page.  The hash of a key is the first four
 * bytes of the MD5 of its text as a little-endian unsigned integer:
 * reinterpretAsUInt32(MD5(toString(key))) in HogQL, the same bytes of
 * md5(key::text) here; each side sums its distinct keys' hashes.  A
 * repair counts a differing bucket again in NARROW_PARTS parts, and those
 * parts that differ in turn, until what differs holds at most a page (and
 * at most NARROW_ROWS: what one request reads); only that is read again.
 * The results go to phsync.verifications, the number of differing buckets
 * to phsync.runs.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "common/int.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"

#include "phsync.h"

/* buckets counted by one request */
#define BUCKETS_PER_REQUEST 31
/* buckets one verification may have */
#define MAX_BUCKETS 100000
/* parts a differing bucket is counted again in, and how deep */
#define NARROW_PARTS 24
#define NARROW_DEPTH 4
/* narrowed no further than this, nor below this many rows (one request) */
#define NARROW_MIN_USECS (60 * USECS_PER_SEC)
#define NARROW_ROWS 10000

typedef struct Buckets
{
	TimestampTz from;
	TimestampTz to;
	int64		width;
	int			n;
	int64	   *posthog;
	int64	   *local;
	int64	   *posthog_sum;	/* NULL: counts only */
	int64	   *local_sum;
	PhsyncBucketStatus *status;
} Buckets;

static void count_local(PhsyncRunState *st, Buckets *b, TimestampTz to);

/*
 * Can the keys of the target be hashed alike on both sides?  One key
 * column, of a type whose text is ClickHouse's toString() (uuid, text,
 * integers).
 */
static bool
keys_hashable(PhsyncTarget *target)
{
	Oid			t;

	if (target->nuniq != 1)
		return false;
	t = target->cols[target->uniq[0]].typid;
	return t == UUIDOID || t == TEXTOID || t == VARCHAROID || t == INT2OID ||
		t == INT4OID || t == INT8OID;
}

static void
buckets_init(Buckets *b, TimestampTz from, TimestampTz to, int64 width, int n, bool sums)
{
	b->from = from;
	b->to = to;
	b->width = width;
	b->n = n;
	b->posthog = palloc0(sizeof(int64) * n);
	b->local = palloc0(sizeof(int64) * n);
	b->posthog_sum = sums ? palloc0(sizeof(int64) * n) : NULL;
	b->local_sum = sums ? palloc0(sizeof(int64) * n) : NULL;
	b->status = palloc0(sizeof(PhsyncBucketStatus) * n);
}

/*
 * Start of bucket i, never past the end of the range (overflow checked:
 * the range may reach the ends of the timestamp range).
 */
static TimestampTz
bucket_start(Buckets *b, int i)
{
	int64		offset;
	TimestampTz start;

	if (pg_mul_s64_overflow((int64) i, b->width, &offset) ||
		pg_add_s64_overflow(b->from, offset, &start) || start > b->to)
		return b->to;
	return start;
}

/*
 * PostHog's counts, a chunk of buckets per request.
 */
static void
count_posthog(PhsyncRunState *st, Buckets *b, TimestampTz to)
{
	PhsyncQuery q = *st->query;
	const char *distinct = NULL;
	int			per_request = BUCKETS_PER_REQUEST;
	int			first;

	/* PostHog may hold the same row twice; the target holds it once */
	if (st->target->nuniq == 1)
		distinct = st->target->cols[st->target->uniq[0]].name;

	for (first = 0; first < b->n; first += per_request)
	{
		q.since = bucket_start(b, first);
		q.until = Min(to, bucket_start(b, first + per_request));
		q.sliced = false;
		if (!fetch_bucket_counts(st, &q, distinct, b->width, b->posthog + first,
								 b->posthog_sum ? b->posthog_sum + first : NULL,
								 Min(per_request, b->n - first), per_request > 1))
		{
			/* too big for PostHog: fewer buckets a request, the same ones again */
			per_request = Max(per_request / 2, 1);
			ereport(LOG,
					(errmsg("phsync run %lld: PostHog says the count is too big; %d buckets a request from now on",
							(long long) st->run_id, per_request)));
			first -= per_request;
			continue;
		}
		st->counters.pages++;
	}
}

/*
 * The target's counts, and sums of its keys' hashes when b has them
 * (inside a transaction with SPI connected).
 */
static void
count_local(PhsyncRunState *st, Buckets *b, TimestampTz to)
{
	const char *col = quote_identifier(st->target->cols[st->target->cursor].name);
	Oid			types[3] = {TIMESTAMPTZOID, TIMESTAMPTZOID, FLOAT8OID};
	PhsyncAsRole save;
	Datum		values[3] = {TimestampTzGetDatum(b->from), TimestampTzGetDatum(to),
	Float8GetDatum((double) b->width / USECS_PER_SEC)};
	char	   *sql;
	uint64		r;

	Assert(phsync_spi_connected());
	/* with sums: the little-endian UInt32 of md5's first four bytes, as HogQL's */
	sql = psprintf("SELECT pg_catalog.floor(pg_catalog.date_part('epoch', t.%s::pg_catalog.timestamptz OPERATOR(pg_catalog.-) $1) "
				   "OPERATOR(pg_catalog./) $3)::pg_catalog.int8, pg_catalog.count(*)%s FROM %s AS t%s "
				   "WHERE t.%s OPERATOR(pg_catalog.>=) $1 AND t.%s OPERATOR(pg_catalog.<) $2 GROUP BY 1",
				   col,
				   b->local_sum ?
				   ", pg_catalog.sum(DISTINCT CAST(pg_catalog.concat('x00000000', pg_catalog.substr(m.h, 7, 2), "
				   "pg_catalog.substr(m.h, 5, 2), pg_catalog.substr(m.h, 3, 2), pg_catalog.substr(m.h, 1, 2)) "
				   "AS pg_catalog.bit(64))::pg_catalog.int8)::pg_catalog.int8" : "",
				   st->target->display,
				   b->local_sum ?
				   psprintf(" CROSS JOIN LATERAL (SELECT pg_catalog.md5(t.%s::pg_catalog.text) AS h) AS m",
							quote_identifier(st->target->cols[st->target->uniq[0]].name)) : "",
				   col, col);
	/* read as the sync reads its target (see target.c) */
	as_role_begin(st->target->writer, true, &save);
	if (phsync_spi_exec(sql, 3, types, values, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not count the rows of %s", st->target->display);
	as_role_end(&save);
	memset(b->local, 0, sizeof(int64) * b->n);
	if (b->local_sum)
		memset(b->local_sum, 0, sizeof(int64) * b->n);
	for (r = 0; r < SPI_processed; r++)
	{
		bool		isnull;
		int64		i = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[r],
													SPI_tuptable->tupdesc, 1, &isnull));

		if (i < 0 || i >= b->n)
			continue;
		b->local[i] = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[r],
												  SPI_tuptable->tupdesc, 2, &isnull));
		if (b->local_sum)
		{
			Datum		d = SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 3, &isnull);

			b->local_sum[i] = isnull ? 0 : DatumGetInt64(d);
		}
	}
}

static PhsyncBucketStatus
compare(Buckets *b, int i)
{
	if (b->posthog[i] != b->local[i])
		return b->local[i] < b->posthog[i] ? PHSYNC_BUCKET_MISSING : PHSYNC_BUCKET_EXTRA;
	if (b->posthog_sum && b->posthog_sum[i] != b->local_sum[i])
		return PHSYNC_BUCKET_DIFFERENT;
	return PHSYNC_BUCKET_OK;
}

/*
 * Repair [from, to), which PostHog says holds `rows` rows and which
 * differs: read it again when it holds at most a page (or cannot be
 * narrowed further), else count it again in parts and repair the runs of
 * parts that differ.
 */
static void
repair_range(PhsyncRunState *st, TimestampTz from, TimestampTz to, int64 rows,
			 bool sums, int64 scope, int depth)
{
	int			page = st->cap > 0 ? Min(st->page_size, st->cap) : st->page_size;
	Buckets		b;
	int64		width;
	MemoryContext cxt;
	int			i;

	if (rows <= Min(page, NARROW_ROWS) || depth >= NARROW_DEPTH || to - from <= NARROW_MIN_USECS)
	{
		ereport(LOG,
				(errmsg("phsync run %lld: repairing sync %s from %s to %s",
						(long long) st->run_id, st->sync->name,
						phsync_format_timestamp(from), phsync_format_timestamp(to))));
		loader_reset_seen(st->loader);
		fetch_window(st, from, to);
		if (st->sync->mirror)
		{
			/* the read was complete (else an error): what it lacks is gone */
			int64		n;

			cxt = xact_begin();
			n = target_mirror_deletions(st->target, loader_seen_keys(st->loader, st->target),
										&from, &to, scope, st->run_id,
										psprintf("from %s to %s", phsync_format_timestamp(from),
												 phsync_format_timestamp(to)));

			st->counters.deleted += Max(n, 0);
			xact_commit(cxt);
		}
		return;
	}
	/* parts of whole seconds (PostHog's buckets are) */
	width = (to - from + NARROW_PARTS * USECS_PER_SEC - 1) / (NARROW_PARTS * USECS_PER_SEC) * USECS_PER_SEC;
	buckets_init(&b, from, to, width, (int) ((to - from) / width + ((to - from) % width != 0)), sums);
	count_posthog(st, &b, to);
	cxt = xact_begin();
	count_local(st, &b, to);
	xact_commit(cxt);
	for (i = 0; i < b.n; i++)
	{
		int			last = i;
		int64		n = b.posthog[i];

		if (compare(&b, i) == PHSYNC_BUCKET_OK)
			continue;
		while (last + 1 < b.n && compare(&b, last + 1) != PHSYNC_BUCKET_OK)
			n += b.posthog[++last];
		/* every part differs: counting finer would not narrow it */
		repair_range(st, bucket_start(&b, i), bucket_start(&b, last + 1), n, sums, scope,
					 i == 0 && last == b.n - 1 ? NARROW_DEPTH : depth + 1);
		i = last;
	}
}

/*
 * After a repair: count the target again, from the first bucket that
 * differed to the last (not the whole range: the target's checksums cost a
 * read of every row).  In a transaction with SPI connected.
 */
static void
recount(PhsyncRunState *st, Buckets *b)
{
	int			lo = -1;
	int			hi = -1;
	int			i;
	Buckets		sub;

	for (i = 0; i < b->n; i++)
		if (b->status[i] != PHSYNC_BUCKET_OK)
		{
			if (lo < 0)
				lo = i;
			hi = i;
		}
	if (lo < 0)
		return;
	buckets_init(&sub, bucket_start(b, lo), bucket_start(b, hi + 1), b->width, hi - lo + 1,
				 b->local_sum != NULL);
	count_local(st, &sub, sub.to);
	memcpy(b->local + lo, sub.local, sizeof(int64) * sub.n);
	if (b->local_sum)
		memcpy(b->local_sum + lo, sub.local_sum, sizeof(int64) * sub.n);
}

/*
 * Verify [from, to) of the run's sync in buckets of `bucket`
 * microseconds; with repair, fetch the buckets that differ again and count
 * anew.
 */
void
verify_run(PhsyncRunState *st, TimestampTz from, TimestampTz to, int64 bucket,
		   bool repair)
{
	Buckets		b;
	int64		span;
	int64		nbuckets;
	int			mismatches = 0;
	int			differed = 0;
	int			requests;
	bool		sums;
	MemoryContext cxt;
	int			i;

	if (bucket <= 0 || to <= from || pg_sub_s64_overflow(to, from, &span))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("nothing to verify: the range is empty or too long, or the bucket is not positive")));
	nbuckets = span / bucket + (span % bucket != 0);
	if (nbuckets > MAX_BUCKETS)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("a verification may have at most %d buckets, not %lld",
						MAX_BUCKETS, (long long) nbuckets),
				 errhint("Use a wider bucket or a shorter range.")));

	sums = keys_hashable(st->target);
	buckets_init(&b, from, to, bucket, (int) nbuckets, sums);
	count_posthog(st, &b, to);
	cxt = xact_begin();
	count_local(st, &b, to);
	xact_commit(cxt);

	for (i = 0; i < b.n; i++)
		b.status[i] = compare(&b, i);

	/* mirroring deletions: a repaired range's keys are kept while it is read */
	if (repair && st->sync->mirror)
		st->track_keys = true;
	requests = st->counters.requests;
	for (i = 0; repair && i < b.n; i++)
	{
		int			last = i;
		int64		n = b.posthog[i];
		int64		scope = b.local[i];

		if (b.status[i] == PHSYNC_BUCKET_OK)
			continue;
		/* one range for a run of differing buckets */
		while (last + 1 < b.n && b.status[last + 1] != PHSYNC_BUCKET_OK)
		{
			n += b.posthog[++last];
			scope += b.local[last];
		}
		repair_range(st, bucket_start(&b, i), bucket_start(&b, last + 1), n, sums, scope, 0);
		i = last;
	}
	requests = st->counters.requests - requests;

	cxt = xact_begin();
	if (repair)
		recount(st, &b);
	for (i = 0; i < b.n; i++)
	{
		PhsyncBucketStatus now = compare(&b, i);

		if (b.status[i] != PHSYNC_BUCKET_OK && now == PHSYNC_BUCKET_OK)
			now = PHSYNC_BUCKET_REPAIRED;
		else if (now != PHSYNC_BUCKET_OK)
			mismatches++;
		if (b.status[i] != PHSYNC_BUCKET_OK)
			differed++;
		runlog_verified(st->run_id, bucket_start(&b, i), bucket_start(&b, i + 1),
						b.posthog[i], b.local[i], sums ? &b.posthog_sum[i] : NULL,
						sums ? &b.local_sum[i] : NULL, now);
	}
	runlog_set_mismatches(st->run_id, mismatches);
	runlog_progress(st->run_id, &st->counters);
	xact_commit(cxt);

	if (repair && differed > 0)
		ereport(LOG,
				(errmsg("phsync run %lld: repairing %d bucket(s) of sync %s took %d request(s)",
						(long long) st->run_id, differed, st->sync->name, requests)));
	ereport(mismatches ? WARNING : LOG,
			(errmsg("phsync run %lld verified sync %s from %s to %s: %d of %d bucket(s) differ",
					(long long) st->run_id, st->sync->name,
					phsync_format_timestamp(from), phsync_format_timestamp(to),
					mismatches, b.n)));
}
