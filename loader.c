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
 * tuplestore, which spills to disk past work_mem.)
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/relation.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_index.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "utils/array.h"
#include "utils/builtins.h"
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
	SPIPlanPtr	single_plan;	/* INSERT of one row (bad-row hunting) */
	MemoryContext cxt;
};

/*
 * Map the result columns of a page to target columns.  A result column the
 * target does not have is an error, raised before anything is inserted.
 * Allocated in the current memory context; no SPI needed.
 */
PhsyncLoader *
loader_create(PhsyncTarget *target, PhsyncPage *page, bool update,
			  PhsyncBadRow on_bad_row)
{
	PhsyncLoader *loader = palloc0(sizeof(PhsyncLoader));
	int			i,
				j;

	loader->target = target;
	loader->update = update;
	loader->on_bad_row = on_bad_row;
	loader->writer = target->writer;
	Assert(OidIsValid(loader->writer));
	loader->cxt = CurrentMemoryContext;
	loader->ncolumns = page->ncolumns;
	loader->colmap = palloc(sizeof(int) * page->ncolumns);
	loader->input = palloc0(sizeof(FmgrInfo) * page->ncolumns);
	loader->batch_rows = Max(1, Min(BATCH_ROWS, 65535 / Max(page->ncolumns, 1)));
	for (i = 0; i < page->ncolumns; i++)
	{
		int			c = target_column(target, page->columns[i]);

		if (c < 0)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_COLUMN),
					 errmsg("column \"%s\" returned by the query does not exist in table %s",
							page->columns[i], target->display),
					 errhint("Add the column to the table, or rename or drop it in the query.")));
		for (j = 0; j < i; j++)
			if (loader->colmap[j] == c)
				ereport(ERROR,
						(errcode(ERRCODE_DUPLICATE_COLUMN),
						 errmsg("the query returns column \"%s\" more than once", page->columns[i])));
		loader->colmap[i] = c;
		fmgr_info_cxt(target->cols[c].typinput, &loader->input[i], loader->cxt);
	}
	if (update)
	{
		/* rows are matched (and deduplicated) on the whole unique key */
		loader->keycols = palloc(sizeof(int) * target->nuniq);
		for (j = 0; j < target->nuniq; j++)
		{
			for (i = 0; i < page->ncolumns; i++)
				if (loader->colmap[i] == target->uniq[j])
					break;
			if (i == page->ncolumns)
				ereport(ERROR,
						(errcode(ERRCODE_UNDEFINED_COLUMN),
						 errmsg("the query does not return column \"%s\" of the unique key of table %s",
								target->cols[target->uniq[j]].name, target->display),
						 errdetail("With conflict => 'update', rows are matched on the whole unique key.")));
			loader->keycols[j] = i;
		}
	}
	return loader;
}

/*
 * Do later pages have the columns of the one the loader was made for?
 */
bool
loader_matches(PhsyncLoader *loader, PhsyncPage *page)
{
	int			i;

	if (page->ncolumns != loader->ncolumns)
		return false;
	for (i = 0; i < page->ncolumns; i++)
		if (strcmp(page->columns[i], loader->target->cols[loader->colmap[i]].name) != 0)
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
 * The INSERT of nrows rows, prepared (and kept when keep is true).
 */
static SPIPlanPtr
loader_plan(PhsyncLoader *loader, int nrows, bool keep)
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
 * Text of one JSON value for a type input function; NULL for JSON null.
 * Strings are checked to be valid in the database encoding (and converted
 * to it): PostHog sends UTF-8.
 */
static char *
json_value_text(json_object *v, PhsyncColumn *col)
{
	switch (json_object_get_type(v))
	{
		case json_type_null:
			return NULL;
		case json_type_string:
			{
				const char *s = json_object_get_string(v);
				int			len = json_object_get_string_len(v);
				char	   *text;

				if ((int) strlen(s) != len)
					ereport(ERROR,
							(errcode(ERRCODE_UNTRANSLATABLE_CHARACTER),
							 errmsg("value for column \"%s\" contains a NUL character", col->name)));
				text = pg_any_to_server(s, len, PG_UTF8);
				if (col->typid == JSONBOID || col->typid == JSONOID)
					text = strip_json_nul_escapes(text);
				return text;
			}
		case json_type_boolean:
			return json_object_get_boolean(v) ? "true" : "false";
		case json_type_int:
		case json_type_double:
			return (char *) json_object_get_string(v);
		default:
			return (char *) json_object_to_json_string_ext(v, JSON_C_TO_STRING_PLAIN);
	}
}

/* a page being inserted: rows[first .. first + n) of the page */
typedef struct PageValues
{
	PhsyncLoader *loader;
	PhsyncPage *page;
	int		   *rows;			/* page rows to insert, in order */
	Datum	   *values;			/* one batch: row-major, ncols per row */
	char	   *nulls;
	MemoryContext rowcxt;		/* conversion garbage of one row */
	int			first;
	int			n;
	uint64		inserted;
	uint64		updated;
} PageValues;

/*
 * Convert row r of the page into slot `slot` of the batch.  The input
 * functions run in a per-row context; only the values are kept.
 */
static void
convert_row(PageValues *pv, int r, int slot)
{
	PhsyncLoader *loader = pv->loader;
	json_object *row = json_object_array_get_idx(pv->page->results, r);
	int			ncols = loader->ncolumns;
	Datum	   *values = pv->values + slot * ncols;
	char	   *nulls = pv->nulls + slot * ncols;
	MemoryContext batchcxt;
	int			c;

	if (!json_object_is_type(row, json_type_array) ||
		(int) json_object_array_length(row) != ncols)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("PostHog sent a row with %d values, expected %d",
						json_object_is_type(row, json_type_array) ?
						(int) json_object_array_length(row) : 0, ncols)));

	batchcxt = MemoryContextSwitchTo(pv->rowcxt);
	for (c = 0; c < ncols; c++)
	{
		PhsyncColumn *col = &loader->target->cols[loader->colmap[c]];
		char	   *text = json_value_text(json_object_array_get_idx(row, c), col);
		Datum		d = InputFunctionCall(&loader->input[c], text,
										  col->typioparam, col->typmod);

		nulls[c] = text ? ' ' : 'n';
		if (text == NULL || col->typbyval)
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

		CHECK_FOR_INTERRUPTS();
		shmem_check_cancel();
		MemoryContextSwitchTo(batchcxt);
		for (r = 0; r < nrows; r++)
			convert_row(pv, pv->rows[pv->first + done + r], r);

		if (nrows == loader->batch_rows)
		{
			if (loader->batch_plan == NULL)
				loader->batch_plan = loader_plan(loader, nrows, true);
			plan = loader->batch_plan;
		}
		else if (nrows == 1)
		{
			if (loader->single_plan == NULL)
				loader->single_plan = loader_plan(loader, 1, true);
			plan = loader->single_plan;
		}
		else
			plan = loader_plan(loader, nrows, false);

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
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	char	   *volatile failure = NULL;

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
		if (!is_row_error(edata->sqlerrcode))
		{
			FreeErrorData(edata);
			PG_RE_THROW();
		}
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
		failure = edata->detail ?
			psprintf("%s: %s", edata->message, edata->detail) :
			pstrdup(edata->message);
		FreeErrorData(edata);
	}
	PG_END_TRY();
	return failure;
}

/*
 * A row as PostHog sent it, as valid text for phsync.rejects (bytes that
 * are not UTF-8 become '?').
 */
static char *
raw_row_text(json_object *row)
{
	const char *s = row ? json_object_to_json_string_ext(row, JSON_C_TO_STRING_PLAIN) : "null";

	return foreign_text(s, (int) strlen(s));
}

static Datum
page_columns_array(PhsyncPage *page)
{
	Datum	   *names = palloc(sizeof(Datum) * Max(page->ncolumns, 1));
	int			i;

	for (i = 0; i < page->ncolumns; i++)
		names[i] = CStringGetTextDatum(page->columns[i]);
	return PointerGetDatum(construct_array(names, page->ncolumns, TEXTOID, -1, false, TYPALIGN_INT));
}

/*
 * The rows of a page to insert, in order.  To update, a key that occurs
 * more than once keeps only its last row: one INSERT ... ON CONFLICT DO
 * UPDATE may not touch the same row twice.  Keys are compared as PostHog
 * wrote them.
 */
static int
page_rows(PhsyncLoader *loader, PhsyncPage *page, int *rows)
{
	HTAB	   *seen;
	HASHCTL		ctl;
	int			n = 0;
	int			r,
				i;
	StringInfoData key;

	if (!loader->update)
	{
		for (r = 0; r < page->nrows; r++)
			rows[r] = r;
		return page->nrows;
	}

	ctl.keysize = NAMEDATALEN * 4;
	ctl.entrysize = ctl.keysize;
	ctl.hcxt = CurrentMemoryContext;
	seen = hash_create("phsync page keys", page->nrows, &ctl,
					   HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
	initStringInfo(&key);
	/* from the last row back: the first one seen is the one kept */
	for (r = page->nrows - 1; r >= 0; r--)
	{
		json_object *row = json_object_array_get_idx(page->results, r);
		char		hkey[NAMEDATALEN * 4];
		bool		found;

		if (!json_object_is_type(row, json_type_array) ||
			(int) json_object_array_length(row) != loader->ncolumns)
		{
			rows[n++] = r;		/* malformed: let conversion refuse it */
			continue;
		}
		resetStringInfo(&key);
		for (i = 0; i < loader->target->nuniq; i++)
			appendStringInfo(&key, "%s\x1f",
							 json_object_to_json_string_ext(json_object_array_get_idx(row, loader->keycols[i]),
															JSON_C_TO_STRING_PLAIN));
		/* long keys are told apart by their hash and length */
		if (key.len >= (int) sizeof(hkey))
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
	/* back into page order */
	for (i = 0; i < n / 2; i++)
	{
		int			t = rows[i];

		rows[i] = rows[n - 1 - i];
		rows[n - 1 - i] = t;
	}
	return n;
}

/*
 * Insert one page.  Runs inside the page's transaction with SPI connected;
 * adds the rows inserted (duplicates are skipped), updated and rejected to
 * the counters.
 *
 * With phsync.on_bad_row = reject, the page is tried whole in a
 * subtransaction; if a row's data is refused, the rows are tried one by one
 * and each refused row goes to phsync.rejects, so one bad row never blocks
 * the others.  With "fail", the first bad row fails the run.
 */
void
loader_insert(PhsyncLoader *loader, PhsyncPage *page, int64 run_id,
			  PhsyncCounters *counters)
{
	PageValues	pv;
	int			nrows;
	int			r;
	int64		refused = 0;
	Datum		columns = (Datum) 0;

	if (page->nrows == 0)
		return;

	memset(&pv, 0, sizeof(pv));
	pv.loader = loader;
	pv.page = page;
	pv.rows = palloc(sizeof(int) * page->nrows);
	nrows = page_rows(loader, page, pv.rows);
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

			CHECK_FOR_INTERRUPTS();
			shmem_check_cancel();
			pv.first = r;
			pv.n = 1;
			failure = try_in_subtransaction(insert_rows, &pv);
			if (failure == NULL)
			{
				inserted += pv.inserted;
				updated += pv.updated;
				continue;
			}
			if (columns == (Datum) 0)
				columns = page_columns_array(page);
			runlog_reject(run_id, loader->target->display, columns,
						  raw_row_text(json_object_array_get_idx(page->results, pv.rows[r])),
						  failure);
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

void
loader_free(PhsyncLoader *loader)
{
	if (loader == NULL)
		return;
	if (loader->batch_plan)
		SPI_freeplan(loader->batch_plan);
	if (loader->single_plan)
		SPI_freeplan(loader->single_plan);
	loader->batch_plan = loader->single_plan = NULL;
}
