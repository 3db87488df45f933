/*-------------------------------------------------------------------------
 *
 * hogql.c
 *		HogQL query text and request bodies; reading PostHog's responses.
 *
 * Every value (window bounds, keyset position) reaches PostHog as a HogQL
 * "values" placeholder; only identifiers, quoted, are written into the text.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>
#include <sys/stat.h>

#include "common/string.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "port/pg_bswap.h"
#include "storage/fd.h"
#include "utils/datetime.h"
#include "utils/fmgrprotos.h"

#include "phsync.h"

/*
 * The built-in events query also bounds `timestamp`, ClickHouse's sort
 * key, on both sides of the slice of created_at it reads, so that each
 * request reads what is near its slice, not all the history after it.
 * Below: events that arrive late, up to 7 days after they happened
 * (PostHog's batch exports make the same trade).  Above: PostHog's capture
 * replaces a timestamp more than 23 hours after the moment it receives an
 * event with that moment, which is before the event's created_at: a day is
 * enough.  The sessions preset bounds `$start_timestamp` the same way, with
 * 3 days before (PostHog's own SESSION_BUFFER_DAYS for its pushdown).
 */
bool
hogql_bounds_timestamp(PhsyncQuery *q)
{
	const PresetInfo *p = preset_info(q->preset);

	return p && p->bound && q->cursor && strcmp(q->cursor, p->bound) != 0;
}

/* the keyset's i-th column: the cursor first, when there is one */
static const char *
keyset_column(PhsyncQuery *q, int i)
{
	if (q->cursor)
		return i == 0 ? q->cursor : q->keys[i - 1];
	return q->keys[i];
}

#define QUERY_FILE_MAX (1024 * 1024)

/*
 * Words PostHog's HogQL parser reads as something else than a name (a
 * constant, an operator, a clause), found by parsing queries with them
 * where phsync writes names, plus the clause keywords, to be safe.
 */
static const char *const hogql_keywords[] = {
	"all", "and", "any", "array", "as", "asc", "between", "by", "case", "cast",
	"desc", "distinct", "else", "end", "except", "false", "fn", "from", "group",
	"having", "ilike", "in", "inf", "intersect", "interval", "is", "join", "let",
	"like", "limit", "nan", "not", "null", "offset", "on", "or", "order", "select",
	"then", "true", "union", "using", "when", "where", "while", "with", NULL
};

/*
 * Append a name for HogQL: bare when it is a plain identifier that is not
 * a keyword, otherwise in backticks, where HogQL writes a backtick twice
 * and a backslash escaped (` -> ``, \ -> \\), as PostHog's grammar reads
 * them.
 */
static void
append_ident(StringInfo buf, const char *name)
{
	const char *p;
	bool		plain = (isalpha((unsigned char) name[0]) || name[0] == '_');
	int			i;

	for (p = name; *p && plain; p++)
		if (!isalnum((unsigned char) *p) && *p != '_')
			plain = false;
	for (i = 0; plain && hogql_keywords[i]; i++)
		if (pg_strcasecmp(name, hogql_keywords[i]) == 0)
			plain = false;
	if (plain)
	{
		appendStringInfoString(buf, name);
		return;
	}
	appendStringInfoChar(buf, '`');
	for (p = name; *p; p++)
	{
		if (*p == '`')
			appendStringInfoChar(buf, '`');
		else if (*p == '\\')
			appendStringInfoChar(buf, '\\');
		appendStringInfoChar(buf, *p);
	}
	appendStringInfoChar(buf, '`');
}

/*
 * The ClickHouse type without Nullable(...) / LowCardinality(...) around it.
 */
static const char *
base_type(const char *chtype, char *buf, size_t buflen)
{
	for (;;)
	{
		size_t		len = strlen(chtype);

		size_t		skip = 0;

		if (strncmp(chtype, "Nullable(", 9) == 0 && chtype[len - 1] == ')')
			skip = 9;
		else if (strncmp(chtype, "LowCardinality(", 15) == 0 && chtype[len - 1] == ')')
			skip = 15;
		if (skip)
		{
			size_t		n = Min(buflen - 1, len - skip - 1);

			/* chtype may already point into buf: the copy may overlap */
			memmove(buf, chtype + skip, n);
			buf[n] = '\0';
			chtype = buf;
		}
		else
			return chtype;
	}
}

static bool
looks_like_uuid(const char *s)
{
	int			i;

	if (strlen(s) != 36)
		return false;
	for (i = 0; i < 36; i++)
	{
		if (i == 8 || i == 13 || i == 18 || i == 23)
		{
			if (s[i] != '-')
				return false;
		}
		else if (!isxdigit((unsigned char) s[i]))
			return false;
	}
	return true;
}

static bool
looks_like_timestamp(const char *s)
{
	return strlen(s) >= 19 && isdigit((unsigned char) s[0]) && s[4] == '-' &&
		s[7] == '-' && (s[10] == 'T' || s[10] == ' ') && s[13] == ':';
}

/* "2026-01-02" followed by the JSON string's closing quote: a Date */
static bool
looks_like_date(const char *s)
{
	return strlen(s) >= 11 && isdigit((unsigned char) s[0]) && s[4] == '-' &&
		s[7] == '-' && s[10] == '"';
}

/*
 * Append placeholder {name}, wrapped in the conversion its column's type
 * needs so that ClickHouse compares like with like.
 */
static void
append_typed_placeholder(StringInfo buf, const char *name, const char *chtype,
						 const char *json)
{
	const char *fn = NULL;

	if (chtype)
	{
		char		tbuf[128];
		const char *t = base_type(chtype, tbuf, sizeof(tbuf));

		if (strncmp(t, "DateTime", 8) == 0)
			fn = "toDateTime";
		else if (strncmp(t, "Date", 4) == 0)
			fn = "toDate";
		else if (strcmp(t, "UUID") == 0)
			fn = "toUUID";
	}
	else if (json[0] == '"')
	{
		/* a JSON string: its text, without quotes (no escapes matter here) */
		const char *s = json + 1;

		if (strlen(s) > 36 && s[36] == '"' && looks_like_uuid(pnstrdup(s, 36)))
			fn = "toUUID";
		else if (looks_like_timestamp(s))
			fn = "toDateTime";
		else if (looks_like_date(s))
			fn = "toDate";
	}
	if (fn)
		appendStringInfo(buf, "%s({%s})", fn, name);
	else
		appendStringInfo(buf, "{%s}", name);
}

/*
 * FROM and WHERE of every query: the preset's table or the custom query as
 * a subquery, the window on the cursor column, the slice of it, and for
 * the events preset the bounds on `timestamp` and the event names.
 */
static void
append_from_where(StringInfo buf, PhsyncQuery *q)
{
	if (q->preset == PHSYNC_CUSTOM)
		appendStringInfo(buf, "FROM (\n%s\n) AS phsync_q\nWHERE ", q->base);
	else
		appendStringInfo(buf, "FROM %s\nWHERE ", preset_info(q->preset)->hogql_table);

	/* without a cursor, every row, always */
	if (q->cursor == NULL)
	{
		appendStringInfoString(buf, "true");
		return;
	}
	append_ident(buf, q->cursor);
	appendStringInfoString(buf, " >= toDateTime({since}) AND ");
	append_ident(buf, q->cursor);
	appendStringInfoString(buf, " < toDateTime({until})");
	if (hogql_bounds_timestamp(q))
	{
		const char *bound = preset_info(q->preset)->bound;

		appendStringInfo(buf, "\n  AND %s >= toDateTime({timestamp_since}) AND %s < toDateTime({timestamp_until})",
						 bound, bound);
	}
	if (q->preset == PHSYNC_EVENTS && q->nevents > 0)
		appendStringInfoString(buf, "\n  AND event IN {events}");
	if (q->sliced)
	{
		appendStringInfoString(buf, "\n  AND ");
		append_ident(buf, q->cursor);
		appendStringInfoString(buf, " >= toDateTime({slice_from}) AND ");
		append_ident(buf, q->cursor);
		appendStringInfoString(buf, " < toDateTime({slice_until})");
	}
}

/*
 * The HogQL for one page: the window on the cursor column, the keyset
 * condition (rows after the last row of the previous page), the order and
 * the limit.  A custom query is wrapped as a subquery.
 */
char *
hogql_build(PhsyncQuery *q, PhsyncKeyset *after)
{
	StringInfoData buf;
	const PresetInfo *preset = preset_info(q->preset);
	int			i;

	initStringInfo(&buf);
	if (preset == NULL)
		appendStringInfoString(&buf, "SELECT *\n");
	else
	{
		appendStringInfoString(&buf, "SELECT ");
		for (i = 0; preset->columns[i].name; i++)
		{
			if (i > 0)
				appendStringInfoString(&buf, ", ");
			if (preset->columns[i].hogql)
				appendStringInfo(&buf, "%s AS ", preset->columns[i].hogql);
			append_ident(&buf, preset->columns[i].name);
		}
		appendStringInfoChar(&buf, '\n');
	}
	append_from_where(&buf, q);

	if (after && after->valid)
	{
		int			n;

		/* (c > v0) OR (c = v0 AND k1 > v1) OR ... */
		appendStringInfoString(&buf, "\n  AND (");
		for (n = 0; n < after->nvalues; n++)
		{
			if (n > 0)
				appendStringInfoString(&buf, "\n    OR ");
			appendStringInfoChar(&buf, '(');
			for (i = 0; i <= n; i++)
			{
				char		pname[32];

				snprintf(pname, sizeof(pname), "after_%d", i);
				if (i > 0)
					appendStringInfoString(&buf, " AND ");
				append_ident(&buf, keyset_column(q, i));
				appendStringInfoString(&buf, i < n ? " = " : " > ");
				append_typed_placeholder(&buf, pname, after->chtypes[i], after->json[i]);
			}
			appendStringInfoChar(&buf, ')');
		}
		appendStringInfoChar(&buf, ')');
	}

	appendStringInfoString(&buf, "\nORDER BY ");
	for (i = 0; i < (q->cursor ? 1 : 0) + q->nkeys; i++)
	{
		if (i > 0)
			appendStringInfoString(&buf, ", ");
		append_ident(&buf, keyset_column(q, i));
	}
	appendStringInfo(&buf, "\nLIMIT %d", q->limit);
	return buf.data;
}

/*
 * The HogQL that counts the rows of the window per bucket: bucket n covers
 * [since + n * {bucket_seconds}, since + (n + 1) * {bucket_seconds}).
 * With a one-column key, distinct keys are counted (PostHog may hold the
 * same event twice; the target holds it once); with keysum, also the sum
 * of the distinct keys' hashes (the first four bytes of the MD5 of the
 * key's text, read as a little-endian UInt32: verify.c computes the same
 * in PostgreSQL), so that a bucket whose rows changed and whose count did
 * not is found.
 */
char *
hogql_count_query(PhsyncQuery *q, const char *distinct_key, bool keysum)
{
	StringInfoData buf;

	Assert(!keysum || distinct_key);
	initStringInfo(&buf);
	appendStringInfoString(&buf, "SELECT intDiv(toUnixTimestamp(toDateTime(");
	append_ident(&buf, q->cursor);
	appendStringInfoString(&buf, ")) - toUnixTimestamp(toDateTime({since})), {bucket_seconds}) AS phsync_bucket, ");
	if (distinct_key)
	{
		appendStringInfoString(&buf, "count(DISTINCT ");
		append_ident(&buf, distinct_key);
		appendStringInfoString(&buf, ") AS phsync_count");
	}
	else
		appendStringInfoString(&buf, "count() AS phsync_count");
	if (keysum)
	{
		appendStringInfoString(&buf, ", sum(DISTINCT reinterpretAsUInt32(MD5(toString(");
		append_ident(&buf, distinct_key);
		appendStringInfoString(&buf, ")))) AS phsync_keysum");
	}
	appendStringInfoChar(&buf, '\n');
	append_from_where(&buf, q);
	appendStringInfoString(&buf, "\nGROUP BY phsync_bucket\nORDER BY phsync_bucket\nLIMIT 50000");
	return buf.data;
}

/*
 * RFC 3339 text of a timestamp, in UTC, with the fraction only when it is
 * not zero (as PostHog writes them).
 */
char *
phsync_format_timestamp(TimestampTz ts)
{
	struct pg_tm tm;
	fsec_t		fsec;

	if (TIMESTAMP_NOT_FINITE(ts) || timestamp2tm(ts, NULL, &tm, &fsec, NULL, NULL) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("timestamp out of range")));
	if (fsec != 0)
		return psprintf("%04d-%02d-%02dT%02d:%02d:%02d.%06dZ",
						tm.tm_year, tm.tm_mon, tm.tm_mday,
						tm.tm_hour, tm.tm_min, tm.tm_sec, (int) fsec);
	return psprintf("%04d-%02d-%02dT%02d:%02d:%02dZ",
					tm.tm_year, tm.tm_mon, tm.tm_mday,
					tm.tm_hour, tm.tm_min, tm.tm_sec);
}

static void
add_timestamp(json_object *values, const char *name, TimestampTz ts)
{
	json_object_object_add(values, name, json_object_new_string(phsync_format_timestamp(ts)));
}

/*
 * A request around `query` (which it takes over): refresh=force_blocking
 * (no stale cache), a name, and a client_query_id to cancel it by.
 * Palloc'd text.
 */
static char *
request_body(json_object *query, const char *name, const char *client_query_id)
{
	json_object *root = json_object_new_object();
	char	   *result;

	json_object_object_add(root, "query", query);
	json_object_object_add(root, "refresh", json_object_new_string("force_blocking"));
	json_object_object_add(root, "name", json_object_new_string(name));
	json_object_object_add(root, "client_query_id", json_object_new_string(client_query_id));
	result = pstrdup(json_object_to_json_string_ext(root, JSON_C_TO_STRING_PLAIN));
	json_object_put(root);
	return result;
}

/*
 * The JSON body of a query from SQL (phsync_query() and its kin): kind
 * HogQLQuery with the caller's HogQL and values (a JSON object's text, or
 * NULL), or DatabaseSchemaQuery (hogql NULL).  Palloc'd.
 */
char *
hogql_adhoc_body(const char *hogql, const char *values_json, const char *name,
				 const char *client_query_id)
{
	json_object *query = json_object_new_object();

	if (hogql)
	{
		json_object *values = values_json ? json_tokener_parse(values_json) : NULL;

		if (values_json && (values == NULL || !json_object_is_type(values, json_type_object)))
		{
			if (values)
				json_object_put(values);
			json_object_put(query);
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("values must be a JSON object"),
					 errhint("For example: values => '{\"since\": \"2026-11-01T00:00:00Z\"}'")));
		}
		json_object_object_add(query, "kind", json_object_new_string("HogQLQuery"));
		json_object_object_add(query, "query", json_object_new_string(hogql));
		json_object_object_add(query, "values", values ? values : json_object_new_object());
	}
	else
		json_object_object_add(query, "kind", json_object_new_string("DatabaseSchemaQuery"));
	return request_body(query, name, client_query_id);
}

/*
 * The JSON body of a query request: the HogQL, every value as a
 * placeholder, refresh=force_blocking (no stale cache), a name and a
 * client_query_id (to cancel it by).  Palloc'd.
 */
char *
hogql_request_body(PhsyncQuery *q, const char *hogql, PhsyncKeyset *after,
				   int64 bucket, const char *name, const char *client_query_id)
{
	json_object *query = json_object_new_object();
	json_object *values = json_object_new_object();

	json_object_object_add(query, "kind", json_object_new_string("HogQLQuery"));
	json_object_object_add(query, "query", json_object_new_string(hogql));
	add_timestamp(values, "since", q->since);
	add_timestamp(values, "until", q->until);
	if (bucket > 0)
		json_object_object_add(values, "bucket_seconds",
							   json_object_new_int64(bucket / USECS_PER_SEC));
	if (hogql_bounds_timestamp(q))
	{
		TimestampTz from = q->sliced ? q->slice_from : q->since;
		TimestampTz to = q->sliced ? q->slice_until : q->until;
		const PresetInfo *p = preset_info(q->preset);

		/* past the keyset position, created_at is at least its cursor */
		if (after && after->valid)
			from = Max(from, hogql_keyset_cursor(after));
		add_timestamp(values, "timestamp_since", from - p->bound_before_days * USECS_PER_DAY);
		add_timestamp(values, "timestamp_until", to + p->bound_after_days * USECS_PER_DAY);
	}
	if (q->preset == PHSYNC_EVENTS && q->nevents > 0)
	{
		json_object *events = json_object_new_array();
		int			i;

		for (i = 0; i < q->nevents; i++)
			json_object_array_add(events, json_object_new_string(q->events[i]));
		json_object_object_add(values, "events", events);
	}
	if (q->sliced)
	{
		add_timestamp(values, "slice_from", q->slice_from);
		add_timestamp(values, "slice_until", q->slice_until);
	}
	if (after && after->valid)
	{
		int			i;

		for (i = 0; i < after->nvalues; i++)
		{
			char		pname[32];
			json_object *v = json_tokener_parse(after->json[i]);

			snprintf(pname, sizeof(pname), "after_%d", i);
			json_object_object_add(values, pname, v ? v : json_object_new_string(after->json[i]));
		}
	}
	json_object_object_add(query, "values", values);
	return request_body(query, name, client_query_id);
}

void
hogql_keyset_reset(PhsyncKeyset *keyset)
{
	int			i;

	for (i = 0; keyset->json && i < keyset->nvalues; i++)
	{
		if (keyset->json[i])
			pfree(keyset->json[i]);
		if (keyset->chtypes[i])
			pfree(keyset->chtypes[i]);
	}
	if (keyset->json)
	{
		pfree(keyset->json);
		pfree(keyset->chtypes);
	}
	memset(keyset, 0, sizeof(*keyset));
}

static int
result_column(PhsyncColumns *cols, const char *name)
{
	int			i;

	for (i = 0; i < cols->ncolumns; i++)
		if (strcmp(cols->names[i], name) == 0)
			return i;
	ereport(ERROR,
			(errcode(ERRCODE_UNDEFINED_COLUMN),
			 errmsg("the query's results have no column \"%s\"", name),
			 errhint("A custom query must return the cursor column and every column of the target's unique key.")));
	return -1;					/* keep compiler quiet */
}

/*
 * A cursor value of a row as an instant; when it is not a date-time (a row
 * phsync refuses, see fetch.c), where the position was before: the
 * position only moves on what it can read.
 */
static TimestampTz
cursor_instant(PhsyncRow *row, int col, PhsyncKeyset *before)
{
	TimestampTz t;
	bool		date_only;
	bool		exact;

	if (row->kinds[col] == PHSYNC_VALUE_STRING &&
		convert_timestamp(row->values[col], row->lens[col], &t, &date_only, &exact))
		return t;
	return before->valid && before->has_cursor ? before->cursor : DT_NOBEGIN;
}

/*
 * Keyset position for the next page: the cursor and key values of the
 * last row, exactly as PostHog sent them (PostgreSQL's idea of order does
 * not matter: ClickHouse orders UUIDs differently), replacing keyset.
 * Errors if the position did not move forward, which would otherwise loop
 * forever.
 */
void
hogql_keyset_from_row(PhsyncKeyset *keyset, PhsyncQuery *q, PhsyncColumns *cols,
					  const char *encoded)
{
	PhsyncRow  *row = row_alloc(cols->ncolumns);
	PhsyncKeyset next;
	bool		same = keyset->valid;
	int			i;

	if (!row_decode(encoded, row))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("PostHog sent a row with %d values, expected %d",
						row->nvalues, cols->ncolumns)));
	memset(&next, 0, sizeof(next));
	next.valid = true;
	next.has_cursor = q->cursor != NULL;
	next.nvalues = (q->cursor ? 1 : 0) + q->nkeys;
	next.json = palloc0(sizeof(char *) * next.nvalues);
	next.chtypes = palloc0(sizeof(char *) * next.nvalues);
	for (i = 0; i < next.nvalues; i++)
	{
		int			col = result_column(cols, keyset_column(q, i));

		if (row->kinds[col] == PHSYNC_VALUE_NULL)
			ereport(ERROR,
					(errcode(ERRCODE_NOT_NULL_VIOLATION),
					 errmsg("column \"%s\" is null in PostHog's results", cols->names[col]),
					 errdetail("phsync pages through results by the cursor column and the unique key, so they must not be null.")));
		next.json[i] = row_value_json(row, col);
		next.chtypes[i] = cols->chtypes[col] ? pstrdup(cols->chtypes[col]) : NULL;
		if (same && (keyset->nvalues != next.nvalues || strcmp(keyset->json[i], next.json[i]) != 0))
			same = false;
	}
	if (same)
	{
		StringInfoData buf;

		initStringInfo(&buf);
		for (i = 0; i < next.nvalues; i++)
			appendStringInfo(&buf, "%s%s", i ? ", " : "", next.json[i]);
		ereport(ERROR,
				(errcode(ERRCODE_DATA_EXCEPTION),
				 errmsg("PostHog returned a page that does not move past the previous one"),
				 errdetail("The last row of two pages in a row has the same cursor and key: %s", buf.data),
				 errhint("Check that the target's unique key really is unique in PostHog's results.")));
	}
	if (next.has_cursor)
		next.cursor = cursor_instant(row, result_column(cols, q->cursor), keyset);
	hogql_keyset_reset(keyset);
	*keyset = next;
}

/*
 * The cursor value of a keyset position, as a timestamp (the cursor column
 * is a timestamp or a date), read once when the position was taken.
 */
TimestampTz
hogql_keyset_cursor(PhsyncKeyset *keyset)
{
	if (!keyset->has_cursor)
		return DT_NOBEGIN;		/* no time order: every position is the start */
	return keyset->cursor;
}

/*
 * Read a custom HogQL query from a file (absolute, or relative to the data
 * directory).  Trailing white space and a final semicolon are dropped, since
 * the query is wrapped in a subquery.
 */
char *
hogql_read_query_file(const char *path)
{
	char	   *full;
	FILE	   *f;
	StringInfoData buf;
	char		chunk[8192];
	size_t		n;

	full = is_absolute_path(path) ? pstrdup(path) : psprintf("%s/%s", DataDir, path);
	f = AllocateFile(full, "r");
	if (f == NULL)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not open query file \"%s\": %m", full),
				 errhint("Check phsync.query_file.")));
	initStringInfo(&buf);
	while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0)
	{
		if (buf.len + n > QUERY_FILE_MAX)
		{
			FreeFile(f);
			ereport(ERROR,
					(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
					 errmsg("query file \"%s\" is larger than %d bytes", full, QUERY_FILE_MAX)));
		}
		appendBinaryStringInfo(&buf, chunk, (int) n);
	}
	if (ferror(f))
	{
		FreeFile(f);
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not read query file \"%s\": %m", full)));
	}
	FreeFile(f);

	pg_verifymbstr(buf.data, buf.len, false);
	while (buf.len > 0 && (isspace((unsigned char) buf.data[buf.len - 1]) ||
						   buf.data[buf.len - 1] == ';'))
		buf.data[--buf.len] = '\0';
	if (buf.len == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("query file \"%s\" is empty", full)));
	return buf.data;
}
