/*-------------------------------------------------------------------------
 *
 * load.c
 *		The target table: creating the built-in one, finding its unique key
 *		and cursor column, and inserting PostHog's rows through SPI.
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
 * A target name as the worker reads it: schema-qualified, or in public (the
 * worker's search_path is the default one), so that phsync_doctor() and
 * phsync.status, which run elsewhere, find the same table.
 */
RangeVar *
target_rangevar(const char *name)
{
	RangeVar   *rv = makeRangeVarFromNameList(stringToQualifiedNameList(name));

	if (rv->schemaname == NULL)
		rv->schemaname = "public";
	return rv;
}

/*
 * max(cursor)::timestamptz of a table, with SPI connected; with bounds,
 * only among rows whose cursor is in [*from, *to).  False when there is no
 * such row.
 */
bool
relation_watermark(Oid relid, const char *cursor, TimestampTz *from,
				   TimestampTz *to, TimestampTz *watermark)
{
	bool		isnull = true;
	const char *col = quote_identifier(cursor);
	Oid			types[2] = {TIMESTAMPTZOID, TIMESTAMPTZOID};
	Datum		values[2] = {from ? TimestampTzGetDatum(*from) : 0, to ? TimestampTzGetDatum(*to) : 0};
	char	   *sql = psprintf("SELECT max(%s)::timestamptz FROM %s%s",
							   col,
							   quote_qualified_identifier(get_namespace_name(get_rel_namespace(relid)),
														  get_rel_name(relid)),
							   from ? psprintf(" WHERE %s >= $1 AND %s < $2", col, col) : "");

	if (SPI_execute_with_args(sql, from ? 2 : 0, types, values, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read the watermark of %s", get_rel_name(relid));
	if (SPI_processed == 1)
		*watermark = DatumGetTimestampTz(SPI_getbinval(SPI_tuptable->vals[0],
													   SPI_tuptable->tupdesc, 1,
													   &isnull));
	return !isnull;
}

static bool
is_preset_column(PhsyncPreset preset, const char *name)
{
	const char *const *columns = preset_columns(preset);
	int			i;

	for (i = 0; columns && columns[i]; i++)
		if (strcmp(columns[i], name) == 0)
			return true;
	return false;
}

/*
 * Create a preset's target table with phsync_create_table(), the function
 * users call for the same purpose (found in the extension's schema).
 */
static void
create_preset_table(PhsyncPreset preset, const char *qualified)
{
	Oid			types[2] = {TEXTOID, TEXTOID};
	Datum		values[2];
	char	   *schema;

	if (SPI_execute("SELECT n.nspname FROM pg_catalog.pg_extension e "
					"JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace "
					"WHERE e.extname = 'phsync'", true, 1) != SPI_OK_SELECT ||
		SPI_processed != 1)
		elog(ERROR, "could not find the schema of extension phsync");
	schema = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	values[0] = CStringGetTextDatum(preset_name(preset));
	values[1] = CStringGetTextDatum(qualified);
	if (SPI_execute_with_args(psprintf("SELECT %s.phsync_create_table($1, $2)",
									   quote_identifier(schema)),
							  2, types, values, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not create target table %s", qualified);
}

static int
find_column(PhsyncTarget *target, const char *name)
{
	int			i;

	for (i = 0; i < target->ncols; i++)
		if (strcmp(target->cols[i].name, name) == 0)
			return i;
	return -1;
}

/*
 * Pick the unique key phsync relies on: the primary key, else the first
 * valid, immediate, non-partial unique index on plain columns.  Returns the
 * number of key columns, 0 if there is none; attnums are filled in.
 */
static int
find_unique_key(Relation rel, AttrNumber **attnums)
{
	List	   *indexes = RelationGetIndexList(rel);
	ListCell   *lc;
	Oid			chosen = InvalidOid;
	int			nkeys = 0;

	foreach(lc, indexes)
	{
		Oid			indexoid = lfirst_oid(lc);
		HeapTuple	tup = SearchSysCache1(INDEXRELID, ObjectIdGetDatum(indexoid));
		Form_pg_index idx;
		bool		usable;
		int			i;

		if (!HeapTupleIsValid(tup))
			continue;
		idx = (Form_pg_index) GETSTRUCT(tup);
		usable = idx->indisunique && idx->indimmediate &&
			idx->indisvalid && idx->indisready &&
			heap_attisnull(tup, Anum_pg_index_indpred, NULL) &&
			heap_attisnull(tup, Anum_pg_index_indexprs, NULL);
		if (usable && (!OidIsValid(chosen) || idx->indisprimary))
		{
			chosen = indexoid;
			nkeys = idx->indnkeyatts;
			*attnums = palloc(sizeof(AttrNumber) * nkeys);
			for (i = 0; i < nkeys; i++)
				(*attnums)[i] = idx->indkey.values[i];
		}
		ReleaseSysCache(tup);
		if (usable && idx->indisprimary)
			break;
	}
	list_free(indexes);
	return nkeys;
}

static PhsyncColumn *
column_info(PhsyncColumn *col, Form_pg_attribute att)
{
	col->name = pstrdup(NameStr(att->attname));
	col->attnum = att->attnum;
	col->typid = att->atttypid;
	col->typmod = att->atttypmod;
	getTypeInputInfo(col->typid, &col->typinput, &col->typioparam);
	get_typlenbyval(col->typid, &col->typlen, &col->typbyval);
	return col;
}

/*
 * Find (or, with create set, create for the preset) the target table and
 * describe it.  Runs inside a transaction with SPI connected; the result is
 * allocated in the caller's current memory context (pass it in cxt, since
 * SPI switches contexts).
 */
PhsyncTarget *
target_prepare(const char *name, const char *cursor, PhsyncPreset create)
{
	MemoryContext cxt = CurrentMemoryContext;
	RangeVar   *rv;
	Oid			relid;
	Relation	rel;
	TupleDesc	desc;
	PhsyncTarget *target;
	AttrNumber *keyatts = NULL;
	int			nkeys;
	int			i;
	char	   *qualified;

	rv = target_rangevar(name);
	qualified = quote_qualified_identifier(rv->schemaname, rv->relname);
	relid = RangeVarGetRelid(rv, AccessShareLock, true);

	if (!OidIsValid(relid))
	{
		if (create == PHSYNC_CUSTOM)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_TABLE),
					 errmsg("target table %s does not exist", qualified),
					 errhint("Create the target table first, with a primary key or unique constraint (phsync_create_table() makes one for a preset).")));
		if (!is_preset_column(create, cursor))
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_COLUMN),
					 errmsg("phsync.cursor_column \"%s\" is not a column of the built-in events query", cursor),
					 errhint("Use created_at (the default) or timestamp.")));
		create_preset_table(create, qualified);
		if (strcmp(cursor, "created_at") != 0 &&
			SPI_execute(psprintf("CREATE INDEX ON %s (%s)", qualified, quote_identifier(cursor)),
						false, 0) != SPI_OK_UTILITY)
			elog(ERROR, "could not index target table %s", qualified);
		ereport(LOG,
				(errmsg("phsync created target table %s", qualified)));
		CommandCounterIncrement();
		relid = RangeVarGetRelid(rv, AccessShareLock, false);
	}

	rel = relation_open(relid, AccessShareLock);
	if (rel->rd_rel->relkind != RELKIND_RELATION &&
		rel->rd_rel->relkind != RELKIND_PARTITIONED_TABLE)
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("target %s is not a table", qualified)));

	target = MemoryContextAllocZero(cxt, sizeof(PhsyncTarget));
	target->relid = relid;
	target->display = MemoryContextStrdup(cxt,
										  quote_qualified_identifier(get_namespace_name(RelationGetNamespace(rel)),
																	 RelationGetRelationName(rel)));
	desc = RelationGetDescr(rel);
	target->cols = MemoryContextAllocZero(cxt, sizeof(PhsyncColumn) * desc->natts);
	for (i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		MemoryContext old;

		if (att->attisdropped || att->attgenerated)
			continue;
		old = MemoryContextSwitchTo(cxt);
		column_info(&target->cols[target->ncols++], att);
		MemoryContextSwitchTo(old);
	}

	target->cursor = find_column(target, cursor);
	if (target->cursor < 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("column \"%s\" named by phsync.cursor_column does not exist in table %s",
						cursor, target->display)));
	if (target->cols[target->cursor].typid != TIMESTAMPTZOID &&
		target->cols[target->cursor].typid != TIMESTAMPOID &&
		target->cols[target->cursor].typid != DATEOID)
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("cursor column \"%s\" of table %s must be of type timestamptz, timestamp or date",
						cursor, target->display)));

	nkeys = find_unique_key(rel, &keyatts);
	if (nkeys == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TABLE_DEFINITION),
				 errmsg("target table %s has no primary key or unique constraint", target->display),
				 errdetail("phsync skips rows it already has with ON CONFLICT DO NOTHING, which needs a unique key."),
				 errhint("Add one on the columns that identify a row, for example: ALTER TABLE %s ADD PRIMARY KEY (uuid);",
						 target->display)));

	target->keys = MemoryContextAlloc(cxt, sizeof(int) * nkeys);
	target->uniq = MemoryContextAlloc(cxt, sizeof(int) * nkeys);
	target->nuniq = nkeys;
	for (i = 0; i < nkeys; i++)
	{
		int			c;

		for (c = 0; c < target->ncols; c++)
			if (target->cols[c].attnum == keyatts[i])
				break;
		if (c == target->ncols)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_TABLE_DEFINITION),
					 errmsg("the unique key of table %s includes a generated column", target->display),
					 errdetail("phsync inserts the key columns, and generated columns cannot be inserted.")));
		target->uniq[i] = c;
		if (c != target->cursor)
			target->keys[target->nkeys++] = c;
	}

	relation_close(rel, AccessShareLock);
	return target;
}

/*
 * max(cursor) of the target, the watermark (within [*from, *to) when
 * given).  False when there is no row.
 */
bool
target_watermark(PhsyncTarget *target, TimestampTz *from, TimestampTz *to,
				 TimestampTz *watermark)
{
	return relation_watermark(target->relid, target->cols[target->cursor].name,
							  from, to, watermark);
}

/*
 * Map the result columns of a page to target columns.  A result column the
 * target does not have is an error, raised before anything is inserted.
 * Allocated in the current memory context; no SPI needed.
 */
PhsyncLoader *
loader_create(PhsyncTarget *target, PhsyncPage *page, bool update)
{
	PhsyncLoader *loader = palloc0(sizeof(PhsyncLoader));
	int			i,
				j;

	loader->target = target;
	loader->update = update;
	loader->cxt = CurrentMemoryContext;
	loader->ncolumns = page->ncolumns;
	loader->colmap = palloc(sizeof(int) * page->ncolumns);
	loader->input = palloc0(sizeof(FmgrInfo) * page->ncolumns);
	loader->batch_rows = Max(1, Min(BATCH_ROWS, 65535 / Max(page->ncolumns, 1)));
	for (i = 0; i < page->ncolumns; i++)
	{
		int			c = find_column(target, page->columns[i]);

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

	plan = SPI_prepare(sql.data, ncols * nrows, argtypes);
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
 * Convert and insert rows [first, first + n), a batch at a time.
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

		ret = SPI_execute_plan(plan, pv->values, pv->nulls, false, 0);
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
}

/*
 * Is this an error about the row's data (SQLSTATE class 22, data
 * exception, or 23, integrity constraint violation), rather than about the
 * table, the session or the server?
 */
static bool
is_row_error(int sqlerrcode)
{
	int			category = ERRCODE_TO_CATEGORY(sqlerrcode);

	return category == ERRCODE_DATA_EXCEPTION ||
		category == ERRCODE_INTEGRITY_CONSTRAINT_VIOLATION;
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
	int			len = (int) strlen(s);
	char	   *out = palloc(len + 1);
	int			i = 0;

	while (i < len)
	{
		int			l = pg_encoding_verifymbchar(PG_UTF8, s + i, len - i);

		if (l <= 0)
		{
			out[i++] = '?';
			continue;
		}
		memcpy(out + i, s + i, l);
		i += l;
	}
	out[len] = '\0';
	return pg_any_to_server(out, len, PG_UTF8);
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

	if (phsync_on_bad_row == PHSYNC_BAD_ROW_FAIL)
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

/*
 * Inspect a target without creating or changing anything (phsync_doctor()).
 * Returns "ok", "warning" or "error", with a detail and maybe a hint; the
 * key columns (cursor excluded) are returned when the table exists.
 */
const char *
target_check(const char *name, const char *cursor, bool builtin,
			 char **detail, char **hint, char ***keys, int *nkeys)
{
	RangeVar   *rv = target_rangevar(name);
	Oid			relid;
	Relation	rel;
	AttrNumber *keyatts = NULL;
	AttrNumber	cursor_att;
	int			n,
				i;
	bool		indexed = false;
	List	   *indexes;
	ListCell   *lc;
	char	   *display;

	*hint = NULL;
	*keys = NULL;
	*nkeys = 0;
	relid = RangeVarGetRelid(rv, AccessShareLock, true);
	display = quote_qualified_identifier(rv->schemaname, rv->relname);
	if (!OidIsValid(relid))
	{
		if (builtin)
		{
			*detail = psprintf("%s does not exist yet; the first run creates it", display);
			return "ok";
		}
		*detail = psprintf("%s does not exist", display);
		*hint = "With a custom query, create the target first, with a primary key or unique constraint.";
		return "error";
	}

	rel = relation_open(relid, AccessShareLock);
	cursor_att = get_attnum(relid, cursor);
	if (cursor_att == InvalidAttrNumber)
	{
		relation_close(rel, AccessShareLock);
		*detail = psprintf("%s has no column \"%s\" (phsync.cursor_column)", display, cursor);
		return "error";
	}
	n = find_unique_key(rel, &keyatts);
	if (n == 0)
	{
		relation_close(rel, AccessShareLock);
		*detail = psprintf("%s has no primary key or unique constraint", display);
		*hint = "phsync skips rows it already has with ON CONFLICT DO NOTHING, which needs one.";
		return "error";
	}
	*keys = palloc(sizeof(char *) * n);
	for (i = 0; i < n; i++)
		if (keyatts[i] != cursor_att)
			(*keys)[(*nkeys)++] = get_attname(relid, keyatts[i], false);

	indexes = RelationGetIndexList(rel);
	foreach(lc, indexes)
	{
		HeapTuple	tup = SearchSysCache1(INDEXRELID, ObjectIdGetDatum(lfirst_oid(lc)));

		if (HeapTupleIsValid(tup))
		{
			Form_pg_index idx = (Form_pg_index) GETSTRUCT(tup);

			if (idx->indnkeyatts > 0 && idx->indkey.values[0] == cursor_att)
				indexed = true;
			ReleaseSysCache(tup);
		}
	}
	relation_close(rel, AccessShareLock);
	if (!indexed)
	{
		*detail = psprintf("%s has a unique key, but no index that starts with \"%s\"", display, cursor);
		*hint = psprintf("Without one, every run reads the whole table for max(%s): CREATE INDEX ON %s (%s);",
						 cursor, display, quote_identifier(cursor));
		return "warning";
	}
	*detail = psprintf("%s has a unique key and an index on \"%s\"", display, cursor);
	return "ok";
}
