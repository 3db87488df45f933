/*-------------------------------------------------------------------------
 *
 * query.c
 *		PostHog from SQL, in the calling session: one HogQL query's rows
 *		(phsync_query(), as records or as jsonb), its columns and the types
 *		phsync would store them as (phsync_describe()), PostHog's tables
 *		(phsync_tables()), and a target table for a custom query.
 *
 * Whose key: the caller's own user mapping on the server named (the
 * postgres_fdw model: no mapping, no query; USAGE on the server needed);
 * without a server, the phsync.* settings, whose key is for superusers
 * only.  One request, in this session, retried as a run's are: a throttle
 * is waited for, within the statement's own time; Ctrl-C and
 * statement_timeout stop the transfer and cancel the query on PostHog's
 * side (http.c); requests count against the server's budget.
 *
 * PostHog answers 100 rows to a query without LIMIT and at most its cap
 * (50,000; 10,000 on older self-hosted releases) to any: a result that
 * may have been cut says so in a WARNING.  Its rows are right, only maybe
 * not all of them; an error would throw them away.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/regproc.h"
#include "utils/timestamp.h"

#include "phsync.h"

/* PostHog's caps on the rows of one query */
static const int64 row_caps[] = {10000, 50000};

/*
 * The endpoint a session's query goes to: server's, with the caller's
 * user mapping; without a server, the settings (superusers only).
 */
static PhsyncEndpoint *
caller_endpoint(const char *server, const char *fn)
{
	if (server)
		return endpoint_server(server, GetUserId(), psprintf("%s", fn));
	if (!superuser())
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("%s without a server is for superusers", fn),
				 errdetail("Without a server, the query would use phsync.api_key, which only superusers may use."),
				 errhint("Name a phsync server for which you have a user mapping: server => 'posthog'.")));
	return endpoint_settings();
}

/* the body of one of ask()'s attempts */
typedef struct AskBody
{
	const char *hogql;
	const char *values_json;
	const char *name;
} AskBody;

static char *
ask_body(void *arg, char **client_id)
{
	AskBody    *b = (AskBody *) arg;

	*client_id = http_client_id("phsync-query");
	return hogql_adhoc_body(b->hogql, b->values_json, b->name, *client_id);
}

/*
 * Ask PostHog once, retried as every request is (request_with_retries(),
 * a throttle's wait said as a NOTICE; a query too big is final): the
 * complete answer's scan, which the caller frees with scan_free().  hogql
 * NULL: the database schema.
 */
static PhsyncScan *
ask(PhsyncEndpoint *e, const char *hogql, const char *values_json, const char *name)
{
	PhsyncHttp *volatile http = http_open(e);
	PhsyncScan *volatile scan = NULL;
	PhsyncRetryPolicy policy;
	AskBody		b = {hogql, values_json, name};
	PhsyncRequestSpec r = {0};

	retry_policy_for(e, &policy);
	r.http = http;
	r.endpoint = e;
	r.policy = &policy;
	r.body = ask_body;
	r.arg = &b;
	r.throttle_elevel = NOTICE;
	PG_TRY();
	{
		scan = request_with_retries(&r);
	}
	PG_FINALLY();
	{
		http_close(http);
	}
	PG_END_TRY();
	return scan;
}

/*
 * A WARNING when PostHog may have cut the result: hasMore (no LIMIT), or
 * exactly one of its caps of rows.
 */
static void
warn_if_cut(PhsyncScan *scan, int64 nrows)
{
	const char *more = scan_member(scan, "hasMore");
	int			i;

	if (more && strcmp(more, "true") == 0)
	{
		ereport(WARNING,
				(errmsg("PostHog returned only the first %lld rows", (long long) nrows),
				 errdetail("The query has no LIMIT, and PostHog answers such a query with its first rows only."),
				 errhint("Add a LIMIT (PostHog returns at most 50,000 rows a query).")));
		return;
	}
	for (i = 0; i < (int) lengthof(row_caps); i++)
		if (nrows == row_caps[i])
			ereport(WARNING,
					(errmsg("PostHog returned %lld rows, the most it returns for one query: there may be more",
							(long long) nrows),
					 errhint("Narrow the query (a WHERE on time) or page it with ORDER BY and a keyset; a sync reads everything.")));
}

/* the query text with trailing semicolons and spaces dropped */
static char *
query_text(const char *q)
{
	char	   *s = pstrdup(q);
	int			len = strlen(s);

	while (len > 0 && strchr(" \t\r\n;", s[len - 1]))
		s[--len] = '\0';
	if (len == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the query is empty")));
	return s;
}

/*
 * The rows of a query into a tuplestore of tupdesc's shape (phsync_query)
 * or of one jsonb column (as_json: an object per row).
 */
void
query_rows(const char *server, const char *hogql, const char *values_json, bool as_json,
		   Tuplestorestate *store, TupleDesc tupdesc)
{
	PhsyncEndpoint *e = caller_endpoint(server, as_json ? "phsync_query_json()" : "phsync_query()");
	PhsyncScan *scan = ask(e, query_text(hogql), values_json, "phsync query");
	PhsyncColumns *cols = NULL;
	MemoryContext rowcxt = AllocSetContextCreate(CurrentMemoryContext, "phsync query row",
												 ALLOCSET_DEFAULT_SIZES);
	FmgrInfo   *input = NULL;
	Oid		   *ioparams = NULL;
	PhsyncRow  *row;
	const char *encoded;
	int64		nrows = 0;
	int			i;

	PG_TRY();
	{
		cols = scan_columns(scan);
		if (!as_json)
		{
			if (tupdesc->natts != cols->ncolumns)
				ereport(ERROR,
						(errcode(ERRCODE_DATATYPE_MISMATCH),
						 errmsg("the column definition list has %d columns, the query returns %d",
								tupdesc->natts, cols->ncolumns),
						 errdetail("The query returns: %s.", cols->ncolumns ? cols->names[0] : "nothing"),
						 errhint("phsync_describe() lists the columns of a query and their types.")));
			input = palloc(sizeof(FmgrInfo) * tupdesc->natts);
			ioparams = palloc(sizeof(Oid) * tupdesc->natts);
			for (i = 0; i < tupdesc->natts; i++)
			{
				Oid			func;

				getTypeInputInfo(TupleDescAttr(tupdesc, i)->atttypid, &func, &ioparams[i]);
				fmgr_info(func, &input[i]);
			}
		}
		row = row_alloc(cols->ncolumns);
		while (scan_next_row(scan, &encoded))
		{
			MemoryContext old = MemoryContextSwitchTo(rowcxt);

			CHECK_FOR_INTERRUPTS();
			if (!row_decode(encoded, row) || row->nvalues != cols->ncolumns)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
						 errmsg("PostHog sent a row with %d values, expected %d", row->nvalues, cols->ncolumns)));
			if (as_json)
			{
				StringInfoData buf;
				Datum		d;
				bool		isnull = false;

				initStringInfo(&buf);
				appendStringInfoChar(&buf, '{');
				for (i = 0; i < cols->ncolumns; i++)
				{
					if (i)
						appendStringInfoChar(&buf, ',');
					escape_json(&buf, cols->names[i]);
					appendStringInfoChar(&buf, ':');
					appendStringInfoString(&buf, row_value_json(row, i));
				}
				appendStringInfoChar(&buf, '}');
				d = DirectFunctionCall1(jsonb_in, CStringGetDatum(buf.data));
				tuplestore_putvalues(store, tupdesc, &d, &isnull);
			}
			else
			{
				Datum	   *values = palloc(sizeof(Datum) * tupdesc->natts);
				bool	   *nulls = palloc(sizeof(bool) * tupdesc->natts);

				for (i = 0; i < tupdesc->natts; i++)
				{
					Form_pg_attribute att = TupleDescAttr(tupdesc, i);

					values[i] = value_datum(row, i, att->atttypid, att->atttypmod, &input[i],
											ioparams[i], NameStr(att->attname), &nulls[i]);
				}
				tuplestore_putvalues(store, tupdesc, values, nulls);
			}
			MemoryContextSwitchTo(old);
			MemoryContextReset(rowcxt);
			nrows++;
		}
		warn_if_cut(scan, nrows);
	}
	PG_FINALLY();
	{
		scan_free(scan);
	}
	PG_END_TRY();
	MemoryContextDelete(rowcxt);
}

/*
 * A query's columns: name, PostHog's (ClickHouse) type, the PostgreSQL
 * type phsync stores it as.  The query runs with {since} an hour ago and
 * {until} now unless values says otherwise (a sync's query uses them),
 * and returns at most one row.
 */
PhsyncColumns *
query_describe(const char *server, const char *hogql, const char *values_json)
{
	PhsyncEndpoint *e = caller_endpoint(server, "phsync_describe()");
	StringInfoData values;
	TimestampTz now = GetCurrentTimestamp();
	char	   *wrapped = psprintf("SELECT * FROM (\n%s\n) AS phsync_describe LIMIT 1", query_text(hogql));
	PhsyncScan *scan;
	PhsyncColumns *cols;

	/* default since/until, then the caller's values (a later key wins) */
	initStringInfo(&values);
	appendStringInfo(&values, "{\"since\": \"%s\", \"until\": \"%s\"",
					 phsync_format_timestamp(now - USECS_PER_HOUR), phsync_format_timestamp(now));
	if (values_json)
	{
		const char *inner = strchr(values_json, '{');
		const char *end = strrchr(values_json, '}');

		if (inner == NULL || end == NULL || end < inner)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("values must be a JSON object")));
		if (end - inner > 1 && strspn(inner + 1, " \t\r\n") < (size_t) (end - inner - 1))
			appendStringInfo(&values, ", %.*s", (int) (end - inner - 1), inner + 1);
	}
	appendStringInfoChar(&values, '}');

	scan = ask(e, wrapped, values.data, "phsync describe");
	PG_TRY();
	{
		cols = scan_columns(scan);
	}
	PG_FINALLY();
	{
		scan_free(scan);
	}
	PG_END_TRY();
	return cols;
}

/*
 * PostHog's tables and their columns (a DatabaseSchemaQuery): one row per
 * column, (table, column, PostHog's field type, PostgreSQL type or NULL
 * for what is not a column, such as a lazy join).
 */
void
query_tables(const char *server, Tuplestorestate *store, TupleDesc tupdesc)
{
	PhsyncEndpoint *e = caller_endpoint(server, "phsync_tables()");
	PhsyncScan *scan = ask(e, NULL, NULL, "phsync tables");
	json_object *volatile tables = NULL;
	struct json_object_iterator tit;
	struct json_object_iterator tend;

	PG_TRY();
	{
		const char *text = scan_member(scan, "tables");

		tables = text ? json_tokener_parse(text) : NULL;
		if (tables == NULL || !json_object_is_type(tables, json_type_object))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
					 errmsg("PostHog's schema has no \"tables\" object")));
		tit = json_object_iter_begin(tables);
		tend = json_object_iter_end(tables);
		for (; !json_object_iter_equal(&tit, &tend); json_object_iter_next(&tit))
		{
			const char *tname = json_object_iter_peek_name(&tit);
			json_object *tval = json_object_iter_peek_value(&tit);
			json_object *fields = NULL;
			struct json_object_iterator fit;
			struct json_object_iterator fend;

			if (!json_object_is_type(tval, json_type_object) ||
				!json_object_object_get_ex(tval, "fields", &fields) ||
				!json_object_is_type(fields, json_type_object))
				continue;
			fit = json_object_iter_begin(fields);
			fend = json_object_iter_end(fields);
			for (; !json_object_iter_equal(&fit, &fend); json_object_iter_next(&fit))
			{
				const char *fname = json_object_iter_peek_name(&fit);
				json_object *fval = json_object_iter_peek_value(&fit);
				json_object *type = NULL;
				const char *ftype = NULL;
				const char *pgtype;
				Datum		values[4];
				bool		nulls[4] = {false, false, false, false};

				if (json_object_is_type(fval, json_type_object) &&
					json_object_object_get_ex(fval, "type", &type) &&
					json_object_is_type(type, json_type_string))
					ftype = json_object_get_string(type);
				pgtype = pg_type_for_schema_field(ftype, fname);
				values[0] = CStringGetTextDatum(foreign_text(tname, strlen(tname)));
				values[1] = CStringGetTextDatum(foreign_text(fname, strlen(fname)));
				if (ftype)
					values[2] = CStringGetTextDatum(foreign_text(ftype, strlen(ftype)));
				else
					nulls[2] = true;
				if (pgtype)
					values[3] = CStringGetTextDatum(pgtype);
				else
					nulls[3] = true;
				tuplestore_putvalues(store, tupdesc, values, nulls);
			}
		}
	}
	PG_FINALLY();
	{
		if (tables)
			json_object_put(tables);
		scan_free(scan);
	}
	PG_END_TRY();
}

/*
 * Create a target table for a custom query: its columns with the types
 * phsync_describe() gives, the key as primary key, and an index on the
 * cursor (by default created_at, else the first date-time or date
 * column).  As the caller, who owns it.  Returns its OID.
 */
Oid
query_create_table(const char *name, const char *server, const char *hogql,
				   const char *values_json, List *keys, const char *cursor)
{
	PhsyncColumns *cols = query_describe(server, hogql, values_json);
	RangeVar   *rv = target_rangevar(name);
	char	   *qualified = quote_qualified_identifier(rv->schemaname, rv->relname);
	StringInfoData sql;
	ListCell   *lc;
	const char *cur = NULL;
	int			i;
	Oid			relid;

	if (keys == NIL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("a target needs a key"),
				 errhint("Pass key => ARRAY['column', ...]: the columns that tell rows apart.")));
	foreach(lc, keys)
	{
		for (i = 0; i < cols->ncolumns; i++)
			if (strcmp(cols->names[i], lfirst(lc)) == 0)
				break;
		if (i == cols->ncolumns)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_COLUMN),
					 errmsg("key column \"%s\" is not among the query's columns", (char *) lfirst(lc)),
					 errhint("phsync_describe() lists the query's columns; name them with AS.")));
	}
	/* the cursor: given, else created_at, else the first date-time or date */
	for (i = 0; i < cols->ncolumns && cur == NULL; i++)
	{
		const char *t = pg_type_for_clickhouse(cols->chtypes[i], cols->names[i]);
		bool		temporal = strcmp(t, "timestamptz") == 0 || strcmp(t, "date") == 0;

		if (cursor && strcmp(cols->names[i], cursor) == 0)
		{
			if (!temporal)
				ereport(ERROR,
						(errcode(ERRCODE_DATATYPE_MISMATCH),
						 errmsg("cursor column \"%s\" is %s, not a date-time or a date", cursor, t)));
			cur = cursor;
		}
	}
	if (cursor && cur == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("cursor column \"%s\" is not among the query's columns", cursor)));
	for (i = 0; i < cols->ncolumns && cur == NULL; i++)
		if (strcmp(cols->names[i], "created_at") == 0 &&
			strcmp(pg_type_for_clickhouse(cols->chtypes[i], cols->names[i]), "timestamptz") == 0)
			cur = cols->names[i];
	for (i = 0; i < cols->ncolumns && cur == NULL; i++)
	{
		const char *t = pg_type_for_clickhouse(cols->chtypes[i], cols->names[i]);

		if (strcmp(t, "timestamptz") == 0 || strcmp(t, "date") == 0)
			cur = cols->names[i];
	}
	if (cur == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the query returns no date-time or date column to be the cursor"),
				 errhint("A sync's watermark is max() of such a column; add one, such as created_at.")));

	initStringInfo(&sql);
	appendStringInfo(&sql, "CREATE TABLE %s (", qualified);
	for (i = 0; i < cols->ncolumns; i++)
		appendStringInfo(&sql, "%s%s %s", i ? ", " : "", quote_identifier(cols->names[i]),
						 pg_type_for_clickhouse(cols->chtypes[i], cols->names[i]));
	appendStringInfoString(&sql, ", PRIMARY KEY (");
	foreach(lc, keys)
		appendStringInfo(&sql, "%s%s", foreach_current_index(lc) ? ", " : "",
						 quote_identifier(lfirst(lc)));
	appendStringInfoString(&sql, "))");

	phsync_spi_connect();
	if (phsync_spi_exec(sql.data, 0, NULL, NULL, NULL, false, 0) != SPI_OK_UTILITY ||
		phsync_spi_exec(psprintf("CREATE INDEX ON %s (%s)", qualified, quote_identifier(cur)),
						0, NULL, NULL, NULL, false, 0) != SPI_OK_UTILITY)
		elog(ERROR, "could not create table %s", qualified);
	CommandCounterIncrement();
	relid = RangeVarGetRelid(rv, NoLock, false);
	phsync_spi_finish();
	return relid;
}
