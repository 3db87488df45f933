/*-------------------------------------------------------------------------
 *
 * loader.c
 *		Inserting the rows of PostHog's pages into a target through SPI.
 *
 * A page is inserted in batches of rows, each one execution of a prepared
 *		INSERT INTO target (c1, ...) VALUES ($1, ...), (...), ...
 *		ON CONFLICT DO NOTHING
 * whose parameters have the target columns' own types: each value is
 * converted once, by its column type's input function, here in C, in a
 * per-row memory context so that the garbage of conversion (jsonb input
 * makes plenty) never piles up.  (An INSERT ... SELECT FROM unnest() of
 * arrays was 4x slower: the function scan materialises every row into a
 * tuplestore, which spills to disk past work_mem.)  While batches are
 * all new rows, they go in without ON CONFLICT, which costs an index probe
 * and a WAL record per row (see insert_plain()).
 *
 * Without the executor.  Where COPY would skip it too (a plain table: no
 * triggers, rules, row-level security, CHECK constraints, partition
 * bound, or defaults for columns PostHog does not send), such a batch of
 * new rows goes in with table_multi_insert() and its index entries, as
 * COPY FROM does: one WAL record per page instead of one per row.  A
 * duplicate key raises as the plain INSERT would (the batch then takes ON
 * CONFLICT); a NULL in a NOT NULL column sends the batch to the plain
 * INSERT, whose error the bad-row hunt reads.  Everything else takes the
 * executor, so what other roles control runs as it always did.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/relation.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_index.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/date.h"
#include "utils/datum.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/regproc.h"
#include "utils/resowner.h"
#include "utils/syscache.h"
#include "utils/typcache.h"
#include "utils/hsearch.h"
#include "utils/varlena.h"

#include "phsync.h"

/* rows per INSERT execution; also bounded by the 65535 parameters a
 * statement may have */
#define BATCH_ROWS 1000

struct PhsyncLoader
{
	PhsyncTarget *target;
	bool		update;			/* ON CONFLICT DO UPDATE rows that changed */
	PhsyncBadRow on_bad_row;
	Oid			writer;			/* the role inserts run as */
	int		   *keycols;		/* update: result column of each unique key column */
	int			ncolumns;		/* result columns, all mapped */
	int		   *colmap;			/* result column -> index in target->cols */
	FmgrInfo   *input;			/* per result column */
	int			batch_rows;		/* rows of a full batch */
	SPIPlanPtr	batch_plan;		/* INSERT of batch_rows rows */
	SPIPlanPtr	plain_plan;		/* the same without ON CONFLICT */
	SPIPlanPtr	single_plan;	/* INSERT of one row (bad-row hunting) */
	bool		optimistic;		/* the last batch met no conflict: try plain */
	bool		direct_logged;	/* the first batch without the executor was logged */
	StringInfoData *seen;		/* tracking: per unique key column, every
								 * key received, NUL-separated */
	int64		nseen;
	PhsyncRow  *row;			/* a decoded row, reused */
	Datum		columns;		/* the result columns' names, for rejects */
	MemoryContext cxt;
};

/*
 * Map the result columns of a response to target columns.  A result
 * column the target does not have is an error, raised before anything is
 * inserted.  Allocated in the current memory context; no SPI needed.
 */
PhsyncLoader *
loader_create(PhsyncTarget *target, PhsyncColumns *cols, bool update,
			  PhsyncBadRow on_bad_row)
{
	PhsyncLoader *loader = palloc0(sizeof(PhsyncLoader));
	int			i,
				j;

	loader->target = target;
	loader->update = update;
	loader->optimistic = true;
	loader->on_bad_row = on_bad_row;
	loader->writer = target->writer;
	Assert(OidIsValid(loader->writer));
	loader->cxt = CurrentMemoryContext;
	loader->ncolumns = cols->ncolumns;
	loader->colmap = palloc(sizeof(int) * Max(cols->ncolumns, 1));
	loader->input = palloc0(sizeof(FmgrInfo) * Max(cols->ncolumns, 1));
	loader->batch_rows = Max(1, Min(BATCH_ROWS, 65535 / Max(cols->ncolumns, 1)));
	loader->row = row_alloc(cols->ncolumns);
	for (i = 0; i < cols->ncolumns; i++)
	{
		int			c = target_column(target, cols->names[i]);

		if (c < 0)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_COLUMN),
					 errmsg("column \"%s\" returned by the query does not exist in table %s",
							cols->names[i], target->display),
					 errhint("Add the column to the table, or rename or drop it in the query.")));
		for (j = 0; j < i; j++)
			if (loader->colmap[j] == c)
				ereport(ERROR,
						(errcode(ERRCODE_DUPLICATE_COLUMN),
						 errmsg("the query returns column \"%s\" more than once", cols->names[i])));
		loader->colmap[i] = c;
		fmgr_info_cxt(target->cols[c].typinput, &loader->input[i], loader->cxt);
	}
	/* the result column of each unique key column, when the result has it */
	{
		loader->keycols = palloc(sizeof(int) * target->nuniq);
		for (j = 0; j < target->nuniq; j++)
		{
			for (i = 0; i < cols->ncolumns; i++)
				if (loader->colmap[i] == target->uniq[j])
					break;
			if (i == cols->ncolumns && update)
				ereport(ERROR,
						(errcode(ERRCODE_UNDEFINED_COLUMN),
						 errmsg("the query does not return column \"%s\" of the unique key of table %s",
								target->cols[target->uniq[j]].name, target->display),
						 errdetail("With conflict => 'update', rows are matched on the whole unique key.")));
			loader->keycols[j] = i < cols->ncolumns ? i : -1;
		}
	}
	{
		Datum	   *names = palloc(sizeof(Datum) * Max(cols->ncolumns, 1));

		for (i = 0; i < cols->ncolumns; i++)
			names[i] = CStringGetTextDatum(cols->names[i]);
		loader->columns = PointerGetDatum(construct_array(names, cols->ncolumns, TEXTOID,
														  -1, false, TYPALIGN_INT));
	}
	return loader;
}

/*
 * Keep the key of every row received from now on (a whole re-read: the
 * rows the target has and these keys lack are gone from PostHog).
 */
void
loader_track_keys(PhsyncLoader *loader)
{
	MemoryContext old = MemoryContextSwitchTo(loader->cxt);
	int			j;

	for (j = 0; j < loader->target->nuniq; j++)
		if (loader->keycols[j] < 0)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_COLUMN),
					 errmsg("the query does not return column \"%s\" of the unique key of table %s",
							loader->target->cols[loader->target->uniq[j]].name, loader->target->display)));
	loader->seen = palloc0(sizeof(StringInfoData) * Max(loader->target->nuniq, 1));
	for (j = 0; j < loader->target->nuniq; j++)
		initStringInfo(&loader->seen[j]);
	MemoryContextSwitchTo(old);
}

/* forget the keys tracked so far (a repair, range by range) */
void
loader_reset_seen(PhsyncLoader *loader)
{
	int			j;

	if (loader == NULL || loader->seen == NULL)
		return;
	for (j = 0; j < loader->target->nuniq; j++)
		resetStringInfo(&loader->seen[j]);
	loader->nseen = 0;
}

static void
track_keys(PhsyncLoader *loader, const char **rows, int count)
{
	int			r,
				j;

	for (r = 0; r < count; r++)
	{
		if (!row_decode(rows[r], loader->row))
			continue;
		for (j = 0; j < loader->target->nuniq; j++)
		{
			int			c = loader->keycols[j];

			if (loader->row->values[c] == NULL)
				break;
		}
		if (j < loader->target->nuniq)
			continue;			/* a null key: the row cannot be in the target */
		for (j = 0; j < loader->target->nuniq; j++)
		{
			int			c = loader->keycols[j];

			appendBinaryStringInfo(&loader->seen[j], loader->row->values[c], (int) loader->row->lens[c]);
			appendStringInfoChar(&loader->seen[j], '\0');
		}
		loader->nseen++;
	}
}

/*
 * The keys tracked (loader_track_keys()), one text[] per unique key
 * column of the target, in its order; empty arrays without a loader.
 */
Datum *
loader_seen_keys(PhsyncLoader *loader, PhsyncTarget *target)
{
	Datum	   *arrays = palloc(sizeof(Datum) * Max(target->nuniq, 1));
	int			j;

	for (j = 0; j < target->nuniq; j++)
	{
		Datum	   *elems = palloc(sizeof(Datum) * Max(loader ? loader->nseen : 0, 1));
		int64		n = 0;

		if (loader && loader->seen)
		{
			const char *p = loader->seen[j].data;
			const char *end = p + loader->seen[j].len;

			while (p < end)
			{
				elems[n++] = CStringGetTextDatum(p);
				p += strlen(p) + 1;
			}
		}
		arrays[j] = PointerGetDatum(construct_array(elems, (int) n, TEXTOID, -1, false, TYPALIGN_INT));
	}
	return arrays;
}

/*
 * Do later responses have the columns of the one the loader was made for?
 */
bool
loader_matches(PhsyncLoader *loader, PhsyncColumns *cols)
{
	int			i;

	if (cols->ncolumns != loader->ncolumns)
		return false;
	for (i = 0; i < cols->ncolumns; i++)
		if (strcmp(cols->names[i], loader->target->cols[loader->colmap[i]].name) != 0)
			return false;
	return true;
}

static bool
is_key_column(PhsyncTarget *target, int col)
{
	int			i;

	for (i = 0; i < target->nuniq; i++)
		if (target->uniq[i] == col)
			return true;
	return false;
}

/*
 * ON CONFLICT DO NOTHING; or, to update, DO UPDATE of the columns the query
 * returns, only where a value differs (an identical re-read writes
 * nothing), returning whether each row was inserted or updated.  Types
 * without an equality operator (json) are compared as text.
 */
static void
append_conflict_clause(PhsyncLoader *loader, StringInfo sql)
{
	PhsyncTarget *target = loader->target;
	StringInfoData set,
				mine,
				theirs;
	int			c;

	if (!loader->update)
	{
		appendStringInfoString(sql, " ON CONFLICT DO NOTHING");
		return;
	}
	appendStringInfoString(sql, " ON CONFLICT (");
	for (c = 0; c < target->nuniq; c++)
		appendStringInfo(sql, "%s%s", c ? ", " : "",
						 quote_identifier(target->cols[target->uniq[c]].name));
	appendStringInfoChar(sql, ')');

	initStringInfo(&set);
	initStringInfo(&mine);
	initStringInfo(&theirs);
	for (c = 0; c < loader->ncolumns; c++)
	{
		PhsyncColumn *col = &target->cols[loader->colmap[c]];
		const char *name = quote_identifier(col->name);
		TypeCacheEntry *tce = lookup_type_cache(col->typid, TYPECACHE_EQ_OPR);
		const char *cast = OidIsValid(tce->eq_opr) ? "" : "::text";

		if (is_key_column(target, loader->colmap[c]))
			continue;
		appendStringInfo(&set, "%s%s = EXCLUDED.%s", set.len ? ", " : "", name, name);
		appendStringInfo(&mine, "%sphsync_t.%s%s", mine.len ? ", " : "", name, cast);
		appendStringInfo(&theirs, "%sEXCLUDED.%s%s", theirs.len ? ", " : "", name, cast);
	}
	if (set.len == 0)
		appendStringInfoString(sql, " DO NOTHING");
	else
		appendStringInfo(sql, " DO UPDATE SET %s WHERE ROW(%s) IS DISTINCT FROM ROW(%s)",
						 set.data, mine.data, theirs.data);
	/* xmax is 0 in a row version this statement inserted */
	appendStringInfoString(sql, " RETURNING phsync_t.xmax = 0");
}

/*
 * The INSERT of nrows rows, prepared (and kept when keep is true); plain:
 * without its ON CONFLICT clause.
 */
static SPIPlanPtr
loader_plan(PhsyncLoader *loader, int nrows, bool keep, bool plain)
{
	PhsyncTarget *target = loader->target;
	int			ncols = loader->ncolumns;
	StringInfoData sql;
	Oid		   *argtypes = palloc(sizeof(Oid) * ncols * nrows);
	SPIPlanPtr	plan;
	int			r,
				c;

	initStringInfo(&sql);
	appendStringInfo(&sql, "INSERT INTO %s AS phsync_t (", target->display);
	for (c = 0; c < ncols; c++)
		appendStringInfo(&sql, "%s%s", c ? ", " : "",
						 quote_identifier(target->cols[loader->colmap[c]].name));
	appendStringInfoString(&sql, ") VALUES ");
	for (r = 0; r < nrows; r++)
	{
		appendStringInfoString(&sql, r ? ", (" : "(");
		for (c = 0; c < ncols; c++)
		{
			argtypes[r * ncols + c] = target->cols[loader->colmap[c]].typid;
			appendStringInfo(&sql, "%s$%d", c ? ", " : "", r * ncols + c + 1);
		}
		appendStringInfoChar(&sql, ')');
	}
	if (!plain)
		append_conflict_clause(loader, &sql);

	plan = phsync_spi_prepare(sql.data, ncols * nrows, argtypes);
	if (plan == NULL)
		elog(ERROR, "could not prepare insert into %s: %s", target->display,
			 SPI_result_code_string(SPI_result));
	if (keep && SPI_keepplan(plan) != 0)
		elog(ERROR, "could not keep the insert plan");
	pfree(sql.data);
	pfree(argtypes);
	return plan;
}

/*
 * Remove \u0000 escapes from JSON text: jsonb refuses them and PostHog's own
 * exports strip them too.  An escaped backslash followed by "u0000" is text,
 * not an escape, and is kept.
 */
static char *
strip_json_nul_escapes(const char *s)
{
	char	   *out;
	char	   *o;
	const char *p;

	if (strstr(s, "\\u0000") == NULL)
		return (char *) s;
	out = palloc(strlen(s) + 1);
	o = out;
	for (p = s; *p; p++)
	{
		if (p[0] == '\\' && p[1] == 'u' && strncmp(p + 2, "0000", 4) == 0)
		{
			p += 5;
			continue;
		}
		if (p[0] == '\\' && p[1] != '\0')
			*o++ = *p++;
		*o++ = *p;
	}
	*o = '\0';
	return out;
}

/*
 * The text of value c of a decoded row for a column of type typid (NULL:
 * SQL NULL): UTF-8 made the database's encoding, \u0000 escapes dropped
 * from JSON; a value that is not text (a lone surrogate) is an error about
 * the row.
 */
static char *
value_text(PhsyncRow *row, int c, Oid typid, const char *colname)
{
	char	   *text = (char *) row->values[c];

	switch (row->kinds[c])
	{
		case PHSYNC_VALUE_NULL:
			return NULL;
		case PHSYNC_VALUE_BAD_TEXT:
			/* PostgreSQL's own message for bytes that are not UTF-8 */
			pg_verifymbstr(text, (int) row->lens[c], false);
			ereport(ERROR,
					(errcode(ERRCODE_UNTRANSLATABLE_CHARACTER),
					 errmsg("value for column \"%s\" holds a \\u escape of a lone Unicode surrogate", colname)));
			break;
		case PHSYNC_VALUE_STRING:
		case PHSYNC_VALUE_JSON:
			/* (an array or object is JSON text, checked as UTF-8 by the scanner) */
			if (GetDatabaseEncoding() != PG_UTF8)
				text = pg_any_to_server(text, (int) row->lens[c], PG_UTF8);
			if (typid == JSONBOID || typid == JSONOID)
				text = strip_json_nul_escapes(text);
			return text;
		case PHSYNC_VALUE_TRUE:
		case PHSYNC_VALUE_FALSE:
		case PHSYNC_VALUE_NUMBER:
		default:
			break;
	}
	return text;
}

/*
 * Value c of a decoded row as a Datum of type typid (*isnull for SQL
 * NULL), by the type's input function.  PostHog writes date-times in the
 * project's time zone with its offset (2026-11-02T08:34:05+05:30): a
 * timestamp without time zone takes the same instant in UTC, and a date
 * the UTC date of a date-time (a plain date stays as it is), whatever the
 * session's TimeZone; timestamptz keeps the instant by itself.  Shared by
 * the loader and phsync_query().
 */
Datum
value_datum(PhsyncRow *row, int c, Oid typid, int32 typmod, FmgrInfo *input,
			Oid typioparam, const char *colname, bool *isnull)
{
	char	   *text = value_text(row, c, typid, colname);
	TimestampTz instant;

	*isnull = (text == NULL);
	if (text == NULL)
		return InputFunctionCall(input, NULL, typioparam, typmod);
	switch (typid)
	{
		case TIMESTAMPOID:
			/* a timestamp is the same count of microseconds as its UTC instant */
			return DirectFunctionCall3(timestamptz_in, CStringGetDatum(text),
									   ObjectIdGetDatum(InvalidOid), Int32GetDatum(typmod));
		case DATEOID:
			if (strlen(text) <= 10)
				break;			/* a plain date */
			instant = DatumGetTimestampTz(DirectFunctionCall3(timestamptz_in, CStringGetDatum(text),
															  ObjectIdGetDatum(InvalidOid),
															  Int32GetDatum(-1)));
			if (TIMESTAMP_NOT_FINITE(instant))
				break;
			/* the UTC date: the instant read as a timestamp (UTC) */
			return DirectFunctionCall1(timestamp_date, TimestampGetDatum(instant));
		default:
			break;
	}
	return InputFunctionCall(input, text, typioparam, typmod);
}

/* rows being inserted: rows[first .. first + n) of the chunk */
typedef struct PageValues
{
	PhsyncLoader *loader;
	const char **encoded;		/* the chunk's rows, as the scanner keeps them */
	int		   *rows;			/* indexes into encoded, to insert in order */
	Datum	   *values;			/* one batch: row-major, ncols per row */
	char	   *nulls;
	MemoryContext rowcxt;		/* conversion garbage of one row */
	int			first;
	int			n;
	uint64		inserted;
	uint64		updated;
} PageValues;

/*
 * Convert row r of the chunk into slot `slot` of the batch.  The input
 * functions run in a per-row context; only the values are kept.
 */
static void
convert_row(PageValues *pv, int r, int slot)
{
	PhsyncLoader *loader = pv->loader;
	int			ncols = loader->ncolumns;
	Datum	   *values = pv->values + slot * ncols;
	char	   *nulls = pv->nulls + slot * ncols;
	MemoryContext batchcxt;
	int			c;

	if (!row_decode(pv->encoded[r], loader->row))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("PostHog sent a row with %d values, expected %d",
						loader->row->nvalues, ncols)));

	batchcxt = MemoryContextSwitchTo(pv->rowcxt);
	for (c = 0; c < ncols; c++)
	{
		PhsyncColumn *col = &loader->target->cols[loader->colmap[c]];
		bool		isnull;
		Datum		d = value_datum(loader->row, c, col->typid, col->typmod, &loader->input[c],
									col->typioparam, col->name, &isnull);

		nulls[c] = isnull ? 'n' : ' ';
		if (isnull || col->typbyval)
			values[c] = d;
		else
		{
			MemoryContextSwitchTo(batchcxt);
			values[c] = datumCopy(d, false, col->typlen);
			MemoryContextSwitchTo(pv->rowcxt);
		}
	}
	MemoryContextSwitchTo(batchcxt);
	MemoryContextReset(pv->rowcxt);
}

/*
 * Run fn(arg) in a subtransaction.  NULL when it succeeds; on an error,
 * the subtransaction is rolled back, and the error returned when
 * expected() accepts it (the caller frees it), raised again otherwise (so
 * these nest: a row error in an inner one reaches the outer one).
 */
static ErrorData *
in_subtransaction(void (*fn) (void *), void *arg, bool (*expected) (int sqlerrcode))
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	ErrorData  *volatile caught = NULL;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcxt);
	PG_TRY();
	{
		fn(arg);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(oldcxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
		if (!expected(edata->sqlerrcode))
			ReThrowError(edata);
		caught = edata;
	}
	PG_END_TRY();
	return caught;
}

static bool
is_conflict(int sqlerrcode)
{
	return sqlerrcode == ERRCODE_UNIQUE_VIOLATION || sqlerrcode == ERRCODE_EXCLUSION_VIOLATION;
}

/*
 * May the converted batch go in without the executor (see the top of this
 * file)?  Asked of the relation at each batch: its definition may change
 * between transactions.
 */
static bool
direct_ok(PageValues *pv, Relation rel, int nrows)
{
	PhsyncLoader *loader = pv->loader;
	TupleDesc	desc = RelationGetDescr(rel);
	bool	   *sent = palloc0(sizeof(bool) * desc->natts);
	bool		ok = true;
	int			c,
				r;

	if (rel->rd_rel->relkind != RELKIND_RELATION || rel->rd_rel->relispartition ||
		rel->trigdesc != NULL || rel->rd_rel->relhasrules || rel->rd_rel->relrowsecurity ||
		(desc->constr && desc->constr->num_check > 0) ||
		pg_class_aclcheck(RelationGetRelid(rel), GetUserId(), ACL_INSERT) != ACLCHECK_OK)
		return false;
	for (c = 0; c < loader->ncolumns; c++)
		sent[loader->target->cols[loader->colmap[c]].attnum - 1] = true;
	for (c = 0; c < desc->natts && ok; c++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, c);

		if (att->attisdropped)
			continue;
		if (!sent[c])
			ok = !att->atthasdef && !att->attidentity && !att->attgenerated && !att->attnotnull;
		else if (att->attgenerated)
			ok = false;
	}
	/* a NULL for a NOT NULL column: the executor's error, for the bad-row hunt */
	for (c = 0; c < loader->ncolumns && ok; c++)
	{
		if (!TupleDescAttr(desc, loader->target->cols[loader->colmap[c]].attnum - 1)->attnotnull)
			continue;
		for (r = 0; r < nrows && ok; r++)
			ok = pv->nulls[r * loader->ncolumns + c] != 'n';
	}
	pfree(sent);
	return ok;
}

/*
 * Insert the converted batch as COPY FROM does: table_multi_insert(), then
 * each row's index entries (a duplicate key raises).  False when the
 * target is not plain enough (direct_ok()).
 */
static bool
insert_direct(PageValues *pv, int nrows)
{
	PhsyncLoader *loader = pv->loader;
	Relation	rel = table_open(loader->target->relid, RowExclusiveLock);
	TupleDesc	desc = RelationGetDescr(rel);
	EState	   *estate;
	ResultRelInfo *rri;
	TupleTableSlot **slots;
	BulkInsertState bistate;
	int			r,
				c;

	if (!direct_ok(pv, rel, nrows))
	{
		table_close(rel, NoLock);
		return false;
	}
	estate = CreateExecutorState();
	rri = makeNode(ResultRelInfo);
	InitResultRelInfo(rri, rel, 1, NULL, 0);
	ExecOpenIndices(rri, false);
	/*
	 * The slots share an unpinned copy of the descriptor: a thousand pins of
	 * the relation's own would each be a resource owner entry.
	 */
	desc = CreateTupleDescCopy(desc);
	slots = palloc(sizeof(TupleTableSlot *) * nrows);
	for (r = 0; r < nrows; r++)
	{
		TupleTableSlot *slot = MakeSingleTupleTableSlot(desc, table_slot_callbacks(rel));

		ExecClearTuple(slot);
		memset(slot->tts_isnull, true, sizeof(bool) * desc->natts);
		for (c = 0; c < loader->ncolumns; c++)
		{
			int			att = loader->target->cols[loader->colmap[c]].attnum - 1;

			slot->tts_values[att] = pv->values[r * loader->ncolumns + c];
			slot->tts_isnull[att] = pv->nulls[r * loader->ncolumns + c] == 'n';
		}
		ExecStoreVirtualTuple(slot);
		slots[r] = slot;
	}
	bistate = GetBulkInsertState();
	table_multi_insert(rel, slots, nrows, GetCurrentCommandId(true), 0, bistate);
	FreeBulkInsertState(bistate);
	for (r = 0; r < nrows; r++)
	{
		ResetPerTupleExprContext(estate);
		if (rri->ri_NumIndices > 0)
			(void) phsync_insert_index_tuples(rri, slots[r], estate);
		ExecDropSingleTupleTableSlot(slots[r]);
	}
	ExecCloseIndices(rri);
	FreeExecutorState(estate);
	FreeTupleDesc(desc);
	table_close(rel, NoLock);
	CommandCounterIncrement();
	if (!loader->direct_logged)
		elog(DEBUG1, "phsync: rows go into %s with table_multi_insert(), without the executor",
			 loader->target->display);
	loader->direct_logged = true;
	return true;
}

/* one execution of the plain INSERT on the converted batch */
static void
exec_plain(void *arg)
{
	PageValues *pv = (PageValues *) arg;
	int			ret;

	if (insert_direct(pv, pv->loader->batch_rows))
		return;
	ret = phsync_spi_exec_plan(pv->loader->plain_plan, pv->values, pv->nulls, false, 0);

	if (ret != SPI_OK_INSERT)
		elog(ERROR, "insert into %s failed: %s", pv->loader->target->display,
			 SPI_result_code_string(ret));
}

/*
 * Insert the converted batch with the plain INSERT, in a subtransaction:
 * false (and nothing inserted) when a row is already there, which the
 * batch's ON CONFLICT statement then skips or updates.  A plain INSERT
 * skips ON CONFLICT's speculative insertion (an index probe before each
 * row, a second WAL record after it); after a conflict the loader stays
 * with ON CONFLICT until a whole batch is new again, so a re-read
 * (lookback, verify's repair) costs one wasted attempt.
 */
static bool
insert_plain(PageValues *pv)
{
	ErrorData  *conflict = in_subtransaction(exec_plain, pv, is_conflict);

	if (conflict == NULL)
		return true;
	FreeErrorData(conflict);
	return false;
}

/*
 * Convert and insert rows [first, first + n), a batch at a time, as the
 * role the sync acts as (see target.c): the target's column types' input
 * functions, its triggers and defaults run with that role's rights, under
 * SECURITY_RESTRICTED_OPERATION.
 */
static void
insert_rows(void *arg)
{
	PageValues *pv = (PageValues *) arg;
	PhsyncLoader *loader = pv->loader;
	MemoryContext batchcxt = AllocSetContextCreate(CurrentMemoryContext,
												   "phsync insert batch",
												   ALLOCSET_DEFAULT_SIZES);
	MemoryContext oldcxt = CurrentMemoryContext;
	int			done = 0;
	PhsyncAsRole save;

	as_role_begin(loader->writer, true, &save);
	pv->inserted = 0;
	pv->updated = 0;
	pv->rowcxt = AllocSetContextCreate(CurrentMemoryContext, "phsync row",
									   ALLOCSET_DEFAULT_SIZES);
	while (done < pv->n)
	{
		int			nrows = Min(pv->n - done, loader->batch_rows);
		SPIPlanPtr	plan;
		int			r,
					ret;
		uint64		before;

		phsync_check_interrupts();
		MemoryContextSwitchTo(batchcxt);
		for (r = 0; r < nrows; r++)
			convert_row(pv, pv->rows[pv->first + done + r], r);

		/* new rows, as most are: a plain INSERT, cheaper than ON CONFLICT's */
		if (nrows == loader->batch_rows && loader->optimistic)
		{
			if (loader->plain_plan == NULL)
				loader->plain_plan = loader_plan(loader, nrows, true, true);
			if (insert_plain(pv))
			{
				pv->inserted += nrows;
				MemoryContextSwitchTo(oldcxt);
				MemoryContextReset(batchcxt);
				done += nrows;
				continue;
			}
			loader->optimistic = false;
		}

		if (nrows == loader->batch_rows)
		{
			if (loader->batch_plan == NULL)
				loader->batch_plan = loader_plan(loader, nrows, true, false);
			plan = loader->batch_plan;
		}
		else if (nrows == 1)
		{
			if (loader->single_plan == NULL)
				loader->single_plan = loader_plan(loader, 1, true, false);
			plan = loader->single_plan;
		}
		else
			plan = loader_plan(loader, nrows, false, false);

		before = pv->inserted;
		ret = phsync_spi_exec_plan(plan, pv->values, pv->nulls, false, 0);
		if (ret == SPI_OK_INSERT)
			pv->inserted += SPI_processed;
		else if (ret == SPI_OK_INSERT_RETURNING)
		{
			uint64		i;

			for (i = 0; i < SPI_processed; i++)
			{
				bool		isnull;

				if (DatumGetBool(SPI_getbinval(SPI_tuptable->vals[i],
											   SPI_tuptable->tupdesc, 1, &isnull)))
					pv->inserted++;
				else
					pv->updated++;
			}
			SPI_freetuptable(SPI_tuptable);
		}
		else
			elog(ERROR, "insert into %s failed: %s", loader->target->display,
				 SPI_result_code_string(ret));
		if (plan != loader->batch_plan && plan != loader->single_plan)
			SPI_freeplan(plan);
		/* every row of a full batch was new: the next may be too */
		if (plan == loader->batch_plan && pv->inserted - before == (uint64) nrows)
			loader->optimistic = true;
		MemoryContextSwitchTo(oldcxt);
		MemoryContextReset(batchcxt);
		done += nrows;
	}
	MemoryContextDelete(pv->rowcxt);
	MemoryContextDelete(batchcxt);
	as_role_end(&save);
}

/*
 * Is this an error about the row's data (SQLSTATE class 22, data
 * exception, or 23, integrity constraint violation, or a value too big or
 * too deep to take: 54000 program_limit_exceeded, 54001
 * statement_too_complex, such as a properties object nested 100,000
 * deep), rather than about the table, the session or the server?  Such a
 * row must not stop a sync: anyone can send PostHog an event.
 */
static bool
is_row_error(int sqlerrcode)
{
	int			category = ERRCODE_TO_CATEGORY(sqlerrcode);

	return category == ERRCODE_DATA_EXCEPTION ||
		category == ERRCODE_INTEGRITY_CONSTRAINT_VIOLATION ||
		sqlerrcode == ERRCODE_PROGRAM_LIMIT_EXCEEDED ||
		sqlerrcode == ERRCODE_STATEMENT_TOO_COMPLEX;
}

/*
 * Run fn(arg) in a subtransaction.  Returns NULL on success; on an error
 * about the row's data, rolls the subtransaction back and returns the error
 * text; any other error is raised again.
 */
static char *
try_in_subtransaction(void (*fn) (void *), void *arg)
{
	ErrorData  *edata = in_subtransaction(fn, arg, is_row_error);
	char	   *failure;

	if (edata == NULL)
		return NULL;
	failure = edata->detail ? psprintf("%s: %s", edata->message, edata->detail) :
		pstrdup(edata->message);
	FreeErrorData(edata);
	return failure;
}

/*
 * The rows of a chunk to insert, in order.  To update, a key that occurs
 * more than once keeps only its last row: one INSERT ... ON CONFLICT DO
 * UPDATE may not touch the same row twice (the next chunk's statement may:
 * the last row wins across chunks too).  Keys are compared as PostHog
 * wrote them.
 */
static int
chunk_rows(PhsyncLoader *loader, const char **encoded, int nrows, int *rows)
{
	HTAB	   *seen;
	HASHCTL		ctl;
	int			n = 0;
	int			r,
				i;
	StringInfoData key;

	if (!loader->update)
	{
		for (r = 0; r < nrows; r++)
			rows[r] = r;
		return nrows;
	}

	ctl.keysize = NAMEDATALEN * 4;
	ctl.entrysize = ctl.keysize;
	ctl.hcxt = CurrentMemoryContext;
	seen = hash_create("phsync chunk keys", nrows, &ctl,
					   HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
	initStringInfo(&key);
	/* from the last row back: the first one seen is the one kept */
	for (r = nrows - 1; r >= 0; r--)
	{
		char		hkey[NAMEDATALEN * 4];
		bool		found;

		if (!row_decode(encoded[r], loader->row))
		{
			rows[n++] = r;		/* malformed: let conversion refuse it */
			continue;
		}
		resetStringInfo(&key);
		for (i = 0; i < loader->target->nuniq; i++)
		{
			int			c = loader->keycols[i];

			appendStringInfo(&key, "%d:", (int) loader->row->kinds[c]);
			if (loader->row->values[c])
				appendBinaryStringInfo(&key, loader->row->values[c], (int) loader->row->lens[c]);
			appendStringInfoChar(&key, '\x1f');
		}
		/* long keys are told apart by their hash and length */
		if (key.len >= (int) sizeof(hkey) || memchr(key.data, '\0', key.len) != NULL)
			snprintf(hkey, sizeof(hkey), "%08x:%d:%.*s",
					 hash_bytes((unsigned char *) key.data, key.len), key.len,
					 (int) sizeof(hkey) - 32, key.data);
		else
			strlcpy(hkey, key.data, sizeof(hkey));
		hash_search(seen, hkey, HASH_ENTER, &found);
		if (!found)
			rows[n++] = r;
	}
	hash_destroy(seen);
	/* back into order */
	for (i = 0; i < n / 2; i++)
	{
		int			t = rows[i];

		rows[i] = rows[n - 1 - i];
		rows[n - 1 - i] = t;
	}
	return n;
}

/*
 * Insert a chunk of rows (encoded, as the scanner keeps them).  Runs
 * inside the chunk's transaction with SPI connected; adds the rows
 * inserted (duplicates are skipped), updated and rejected to the counters.
 *
 * With phsync.on_bad_row = reject, the page is tried whole in a
 * subtransaction; if a row's data is refused, the rows are tried one by one
 * and each refused row goes to phsync.rejects, so one bad row never blocks
 * the others.  With "fail", the first bad row fails the run.
 */
void
loader_insert(PhsyncLoader *loader, const char **rows, int count, int64 run_id,
			  PhsyncCounters *counters)
{
	PageValues	pv;
	int			nrows;
	int			r;
	int64		refused = 0;

	if (count == 0)
		return;
	if (loader->seen)
		track_keys(loader, rows, count);

	memset(&pv, 0, sizeof(pv));
	pv.loader = loader;
	pv.encoded = rows;
	pv.rows = palloc(sizeof(int) * count);
	nrows = chunk_rows(loader, rows, count, pv.rows);
	pv.values = palloc(sizeof(Datum) * loader->ncolumns * loader->batch_rows);
	pv.nulls = palloc(sizeof(char) * loader->ncolumns * loader->batch_rows);
	pv.first = 0;
	pv.n = nrows;

	Assert(phsync_spi_connected());
	if (loader->on_bad_row == PHSYNC_BAD_ROW_FAIL)
		insert_rows(&pv);
	else if (try_in_subtransaction(insert_rows, &pv) != NULL)
	{
		uint64		inserted = 0;
		uint64		updated = 0;

		/* some row is bad: find it (them) one row at a time */
		for (r = 0; r < nrows; r++)
		{
			char	   *failure;

			phsync_check_interrupts();
			pv.first = r;
			pv.n = 1;
			failure = try_in_subtransaction(insert_rows, &pv);
			if (failure == NULL)
			{
				inserted += pv.inserted;
				updated += pv.updated;
				continue;
			}
			runlog_reject(run_id, loader->target->display, loader->columns,
						  row_json(rows[pv.rows[r]]), failure);
			refused++;
		}
		pv.inserted = inserted;
		pv.updated = updated;
		ereport(LOG,
				(errmsg("phsync run %lld: %lld row(s) refused by %s, kept in phsync.rejects",
						(long long) run_id, (long long) refused, loader->target->display)));
	}
	counters->inserted += pv.inserted;
	counters->updated += pv.updated;
	counters->rejected += refused;
}

/*
 * Keep a row in phsync.rejects that was refused before it reached the
 * target (why: a full sentence's start, "its cursor ... is ..."), in the
 * chunk's transaction; with phsync.on_bad_row = fail, fail the run
 * instead.
 */
void
loader_reject(PhsyncLoader *loader, const char *encoded, const char *why, int64 run_id,
			  PhsyncCounters *counters)
{
	if (loader->on_bad_row == PHSYNC_BAD_ROW_FAIL)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_EXCEPTION),
				 errmsg("PostHog sent a row phsync does not load: %s", why),
				 errdetail("The row: %s", row_json(encoded))));
	runlog_reject(run_id, loader->target->display, loader->columns, row_json(encoded),
				  psprintf("PostHog sent a row phsync does not load: %s", why));
	counters->rejected++;
}

void
loader_free(PhsyncLoader *loader)
{
	if (loader == NULL)
		return;
	if (loader->batch_plan)
		SPI_freeplan(loader->batch_plan);
	if (loader->single_plan)
		SPI_freeplan(loader->single_plan);
	if (loader->plain_plan)
		SPI_freeplan(loader->plain_plan);
	loader->batch_plan = loader->single_plan = loader->plain_plan = NULL;
}
