/*-------------------------------------------------------------------------
 *
 * verify.c
 *		The completeness check: for each bucket (a day, say) of a range, the
 *		number of rows PostHog has against the number in the target, and,
 *		with repair, fetching the buckets that differ again.
 *
 * PostHog is asked with one grouped count() query per chunk of buckets,
 * paced and retried like any page.  The results go to
 * phsync.verifications, the number of differing buckets to phsync.runs.
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

typedef struct Buckets
{
	TimestampTz from;
	TimestampTz to;
	int64		width;
	int			n;
	int64	   *posthog;
	int64	   *local;
	PhsyncBucketStatus *status;
} Buckets;

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
 * The target's counts (inside a transaction with SPI connected).
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
	sql = psprintf("SELECT pg_catalog.floor(pg_catalog.date_part('epoch', %s::pg_catalog.timestamptz OPERATOR(pg_catalog.-) $1) "
				   "OPERATOR(pg_catalog./) $3)::pg_catalog.int8, pg_catalog.count(*) "
				   "FROM %s WHERE %s OPERATOR(pg_catalog.>=) $1 AND %s OPERATOR(pg_catalog.<) $2 GROUP BY 1",
				   col, st->target->display, col, col);
	/* read as the sync reads its target (see target.c) */
	as_role_begin(st->target->writer, true, &save);
	if (phsync_spi_exec(sql, 3, types, values, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not count the rows of %s", st->target->display);
	as_role_end(&save);
	memset(b->local, 0, sizeof(int64) * b->n);
	for (r = 0; r < SPI_processed; r++)
	{
		bool		isnull;
		int64		i = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[r],
													SPI_tuptable->tupdesc, 1, &isnull));

		if (i >= 0 && i < b->n)
			b->local[i] = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[r],
													  SPI_tuptable->tupdesc, 2, &isnull));
	}
}

static PhsyncBucketStatus
compare(int64 posthog, int64 local)
{
	return posthog == local ? PHSYNC_BUCKET_OK :
		(local < posthog ? PHSYNC_BUCKET_MISSING : PHSYNC_BUCKET_EXTRA);
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

	b.from = from;
	b.to = to;
	b.width = bucket;
	b.n = (int) nbuckets;
	b.posthog = palloc0(sizeof(int64) * b.n);
	b.local = palloc0(sizeof(int64) * b.n);
	b.status = palloc0(sizeof(PhsyncBucketStatus) * b.n);

	count_posthog(st, &b, to);
	cxt = xact_begin();
	count_local(st, &b, to);
	xact_commit(cxt);

	for (i = 0; i < b.n; i++)
		b.status[i] = compare(b.posthog[i], b.local[i]);

	for (i = 0; repair && i < b.n; i++)
	{
		int			last = i;

		if (b.status[i] == PHSYNC_BUCKET_OK)
			continue;
		/* one window for a run of differing buckets */
		while (last + 1 < b.n && b.status[last + 1] != PHSYNC_BUCKET_OK)
			last++;
		ereport(LOG,
				(errmsg("phsync run %lld: repairing sync %s from %s to %s",
						(long long) st->run_id, st->sync->name,
						phsync_format_timestamp(bucket_start(&b, i)),
						phsync_format_timestamp(bucket_start(&b, last + 1)))));
		fetch_window(st, bucket_start(&b, i), bucket_start(&b, last + 1));
		i = last;
	}

	cxt = xact_begin();
	if (repair)
		count_local(st, &b, to);
	for (i = 0; i < b.n; i++)
	{
		PhsyncBucketStatus now = compare(b.posthog[i], b.local[i]);

		if (b.status[i] != PHSYNC_BUCKET_OK && now == PHSYNC_BUCKET_OK)
			now = PHSYNC_BUCKET_REPAIRED;
		else if (now != PHSYNC_BUCKET_OK)
			mismatches++;
		runlog_verified(st->run_id, bucket_start(&b, i), bucket_start(&b, i + 1),
						b.posthog[i], b.local[i], now);
	}
	runlog_set_mismatches(st->run_id, mismatches);
	runlog_progress(st->run_id, &st->counters);
	xact_commit(cxt);

	ereport(mismatches ? WARNING : LOG,
			(errmsg("phsync run %lld verified sync %s from %s to %s: %d of %d bucket(s) differ",
					(long long) st->run_id, st->sync->name,
					phsync_format_timestamp(from), phsync_format_timestamp(to),
					mismatches, b.n)));
}
