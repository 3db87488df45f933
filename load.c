/*-------------------------------------------------------------------------
 *
 * load.c
 *		The target table: creating the built-in one, finding its unique key
 *		and cursor column, and inserting PostHog's rows through SPI.
 *
 * A page is inserted with one statement,
 *		INSERT INTO target (c1, ...) SELECT * FROM unnest($1, ...)
 *		ON CONFLICT DO NOTHING
 * whose parameters are arrays of the target columns' own types: each value
 * is converted once, by its column type's input function, here in C.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/relation.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_index.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/regproc.h"
#include "utils/syscache.h"
#include "utils/varlena.h"

#include "phsync.h"

struct PhsyncLoader
{
	PhsyncTarget *target;
	int			ncolumns;		/* result columns, all mapped */
	int		   *colmap;			/* result column -> index in target->cols */
	FmgrInfo   *input;			/* per result column */
	SPIPlanPtr	plan;
	MemoryContext cxt;
};

/* the built-in events table; its columns match phsync_builtin_columns */
static const char *builtin_table_sql =
"CREATE TABLE %s (\n"
"	uuid uuid PRIMARY KEY,\n"
"	event text,\n"
"	\"timestamp\" timestamptz,\n"
"	distinct_id text,\n"
"	person_id uuid,\n"
"	properties jsonb,\n"
"	elements_chain text,\n"
"	created_at timestamptz NOT NULL\n"
")";

static bool
is_builtin_column(const char *name)
{
	int			i;

	for (i = 0; phsync_builtin_columns[i]; i++)
		if (strcmp(phsync_builtin_columns[i], name) == 0)
			return true;
	return false;
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
	col->arraytypid = get_array_type(col->typid);
	if (!OidIsValid(col->arraytypid))
		col->arraytypid = get_array_type(getBaseType(col->typid));
	if (OidIsValid(col->arraytypid))
		get_typlenbyvalalign(get_element_type(col->arraytypid),
							 &col->typlen, &col->typbyval, &col->typalign);
	return col;
}

/*
 * Find (or, for the built-in events query, create) the target table and
 * describe it.  Runs inside a transaction with SPI connected; the result is
 * allocated in the caller's current memory context (pass it in cxt, since
 * SPI switches contexts).
 */
PhsyncTarget *
target_prepare(const char *name, const char *cursor, bool builtin)
{
	MemoryContext cxt = CurrentMemoryContext;
	List	   *names;
	RangeVar   *rv;
	Oid			relid;
	Relation	rel;
	TupleDesc	desc;
	PhsyncTarget *target;
	AttrNumber *keyatts = NULL;
	int			nkeys;
	int			i;
	char	   *qualified;

	names = stringToQualifiedNameList(name);
	rv = makeRangeVarFromNameList(names);
	qualified = rv->schemaname ?
		quote_qualified_identifier(rv->schemaname, rv->relname) :
		pstrdup(quote_identifier(rv->relname));
	relid = RangeVarGetRelid(rv, AccessShareLock, true);

	if (!OidIsValid(relid))
	{
		if (!builtin)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_TABLE),
					 errmsg("target table %s does not exist", qualified),
					 errhint("With a custom query (phsync.query_file), create the target table first, with a primary key or unique constraint.")));
		if (!is_builtin_column(cursor))
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_COLUMN),
					 errmsg("phsync.cursor_column \"%s\" is not a column of the built-in events query", cursor),
					 errhint("Use created_at (the default) or timestamp.")));
		if (SPI_execute(psprintf(builtin_table_sql, qualified), false, 0) != SPI_OK_UTILITY ||
			SPI_execute(psprintf("CREATE INDEX ON %s (%s)", qualified, quote_identifier(cursor)),
						false, 0) != SPI_OK_UTILITY)
			elog(ERROR, "could not create target table %s", qualified);
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
	for (i = 0; i < nkeys; i++)
	{
		int			c;

		for (c = 0; c < target->ncols; c++)
			if (target->cols[c].attnum == keyatts[i])
				break;
		if (c != target->cursor)
			target->keys[target->nkeys++] = c;
	}

	relation_close(rel, AccessShareLock);
	return target;
}

/*
 * max(cursor) of the target, the watermark.  False when the table is empty.
 */
bool
target_watermark(PhsyncTarget *target, TimestampTz *watermark)
{
	bool		isnull = true;
	char	   *sql;

	sql = psprintf("SELECT max(%s)::timestamptz FROM %s",
				   quote_identifier(target->cols[target->cursor].name),
				   target->display);
	if (SPI_execute(sql, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read the watermark of %s", target->display);
	if (SPI_processed == 1)
		*watermark = DatumGetTimestampTz(SPI_getbinval(SPI_tuptable->vals[0],
													   SPI_tuptable->tupdesc, 1,
													   &isnull));
	return !isnull;
}

/*
 * Map the result columns of a page to target columns.  A result column the
 * target does not have is an error, raised before anything is inserted.
 * Allocated in the current memory context; no SPI needed.
 */
PhsyncLoader *
loader_create(PhsyncTarget *target, PhsyncPage *page)
{
	PhsyncLoader *loader = palloc0(sizeof(PhsyncLoader));
	int			i,
				j;

	loader->target = target;
	loader->cxt = CurrentMemoryContext;
	loader->ncolumns = page->ncolumns;
	loader->colmap = palloc(sizeof(int) * page->ncolumns);
	loader->input = palloc0(sizeof(FmgrInfo) * page->ncolumns);
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

static void
loader_prepare_plan(PhsyncLoader *loader)
{
	PhsyncTarget *target = loader->target;
	StringInfoData sql;
	Oid		   *argtypes = palloc(sizeof(Oid) * loader->ncolumns);
	int			i;

	initStringInfo(&sql);
	appendStringInfo(&sql, "INSERT INTO %s (", target->display);
	for (i = 0; i < loader->ncolumns; i++)
		appendStringInfo(&sql, "%s%s", i ? ", " : "",
						 quote_identifier(target->cols[loader->colmap[i]].name));
	appendStringInfoString(&sql, ") SELECT * FROM unnest(");
	for (i = 0; i < loader->ncolumns; i++)
	{
		PhsyncColumn *col = &target->cols[loader->colmap[i]];

		if (!OidIsValid(col->arraytypid))
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("column \"%s\" of table %s has a type without an array type",
							col->name, target->display)));
		argtypes[i] = col->arraytypid;
		appendStringInfo(&sql, "%s$%d", i ? ", " : "", i + 1);
	}
	appendStringInfoString(&sql, ") ON CONFLICT DO NOTHING");

	loader->plan = SPI_prepare(sql.data, loader->ncolumns, argtypes);
	if (loader->plan == NULL)
		elog(ERROR, "could not prepare insert into %s: %s", target->display,
			 SPI_result_code_string(SPI_result));
	if (SPI_keepplan(loader->plan) != 0)
		elog(ERROR, "could not keep the insert plan");
}

/*
 * Text of one JSON value for a type input function; NULL for JSON null.
 * Strings are checked to be valid in the database encoding (and converted
 * to it): PostHog sends UTF-8.
 */
static char *
json_value_text(json_object *v)
{
	switch (json_object_get_type(v))
	{
		case json_type_null:
			return NULL;
		case json_type_string:
			{
				const char *s = json_object_get_string(v);
				int			len = json_object_get_string_len(v);

				if ((int) strlen(s) != len)
					ereport(ERROR,
							(errcode(ERRCODE_UNTRANSLATABLE_CHARACTER),
							 errmsg("PostHog sent a string containing a NUL character")));
				return pg_any_to_server(s, len, PG_UTF8);
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

/*
 * Insert one page.  Runs inside the page's transaction with SPI connected;
 * returns the number of rows inserted (duplicates are skipped).
 */
uint64
loader_insert(PhsyncLoader *loader, PhsyncPage *page)
{
	PhsyncTarget *target = loader->target;
	int			ncols = loader->ncolumns;
	int			nrows = page->nrows;
	Datum	  **values;
	bool	  **nulls;
	Datum	   *args;
	int			r,
				c;
	int			ret;

	if (nrows == 0)
		return 0;
	if (loader->plan == NULL)
		loader_prepare_plan(loader);

	values = palloc(sizeof(Datum *) * ncols);
	nulls = palloc(sizeof(bool *) * ncols);
	for (c = 0; c < ncols; c++)
	{
		values[c] = palloc(sizeof(Datum) * nrows);
		nulls[c] = palloc(sizeof(bool) * nrows);
	}

	for (r = 0; r < nrows; r++)
	{
		json_object *row = json_object_array_get_idx(page->results, r);

		if (!json_object_is_type(row, json_type_array) ||
			(int) json_object_array_length(row) != ncols)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
					 errmsg("PostHog sent a row with %d values, expected %d",
							json_object_is_type(row, json_type_array) ?
							(int) json_object_array_length(row) : 0, ncols)));
		for (c = 0; c < ncols; c++)
		{
			PhsyncColumn *col = &target->cols[loader->colmap[c]];
			char	   *text = json_value_text(json_object_array_get_idx(row, c));

			values[c][r] = InputFunctionCall(&loader->input[c], text,
											 col->typioparam, col->typmod);
			nulls[c][r] = (text == NULL);
		}
		if ((r & 1023) == 0)
			CHECK_FOR_INTERRUPTS();
	}

	args = palloc(sizeof(Datum) * ncols);
	for (c = 0; c < ncols; c++)
	{
		PhsyncColumn *col = &target->cols[loader->colmap[c]];
		int			dims[1] = {nrows};
		int			lbs[1] = {1};

		args[c] = PointerGetDatum(construct_md_array(values[c], nulls[c], 1, dims, lbs,
													 get_element_type(col->arraytypid),
													 col->typlen, col->typbyval,
													 col->typalign));
	}

	ret = SPI_execute_plan(loader->plan, args, NULL, false, 0);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "insert into %s failed: %s", target->display,
			 SPI_result_code_string(ret));
	return SPI_processed;
}

void
loader_free(PhsyncLoader *loader)
{
	if (loader && loader->plan)
	{
		SPI_freeplan(loader->plan);
		loader->plan = NULL;
	}
}
