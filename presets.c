/*-------------------------------------------------------------------------
 *
 * presets.c
 *		The built-in queries ("presets"): which PostHog table each reads,
 *		its columns and their PostgreSQL types, its key and cursor, and the
 *		defaults a sync of it gets.  Defined here once; the HogQL text, the
 *		target checks and phsync_create_table() all read this table.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>

#include "lib/stringinfo.h"
#include "utils/builtins.h"

#include "phsync.h"

/*
 * What each reads, as PostHog's source defines it (posthog/hogql/database/
 * schema/: events.py, persons.py, groups.py, sessions_v2.py, system.py,
 * cohort_people.py).  A system table's flags (deleted, archived,
 * is_static) come as 0/1, its JSON columns as JSON text.
 */
static const PresetColumn events_columns[] = {
	{"uuid", "uuid", NULL},
	{"event", "text", NULL},
	{"timestamp", "timestamptz", NULL},
	{"distinct_id", "text", NULL},
	{"person_id", "uuid", NULL},
	{"properties", "jsonb", NULL},
	{"elements_chain", "text", NULL},
	{"created_at", "timestamptz NOT NULL", NULL},
	{NULL, NULL, NULL}
};
static const char *const events_key[] = {"uuid", NULL};

static const PresetColumn persons_columns[] = {
	{"id", "uuid", NULL},
	{"created_at", "timestamptz NOT NULL", NULL},
	{"is_identified", "boolean", NULL},
	{"properties", "jsonb", NULL},
	{NULL, NULL, NULL}
};
static const char *const persons_key[] = {"id", NULL};

/* groups: the latest version of each (type index, key); updated_at is
 * when that version arrived */
static const PresetColumn groups_columns[] = {
	{"group_type_index", "smallint", "`index`"},
	{"group_key", "text", "`key`"},
	{"created_at", "timestamptz", NULL},
	{"updated_at", "timestamptz NOT NULL", NULL},
	{"properties", "jsonb", NULL},
	{NULL, NULL, NULL}
};
static const char *const groups_key[] = {"group_type_index", "group_key", NULL};

/* sessions (v2 and v3 alike): aggregates over the session's events so far */
static const PresetColumn sessions_columns[] = {
	{"session_id", "text", NULL},
	{"distinct_id", "text", NULL},
	{"start_timestamp", "timestamptz", "`$start_timestamp`"},
	{"end_timestamp", "timestamptz", "`$end_timestamp`"},
	{"session_duration", "bigint", "`$session_duration`"},
	{"pageview_count", "bigint", "`$pageview_count`"},
	{"autocapture_count", "bigint", "`$autocapture_count`"},
	{"screen_count", "bigint", "`$screen_count`"},
	{"num_uniq_urls", "bigint", "`$num_uniq_urls`"},
	{"urls", "jsonb", "`$urls`"},
	{"entry_current_url", "text", "`$entry_current_url`"},
	{"end_current_url", "text", "`$end_current_url`"},
	{"is_bounce", "boolean", "`$is_bounce`"},
	{"max_inserted_at", "timestamptz NOT NULL", NULL},
	{NULL, NULL, NULL}
};
static const char *const sessions_key[] = {"session_id", NULL};

static const PresetColumn cohorts_columns[] = {
	{"id", "bigint", NULL},
	{"name", "text", NULL},
	{"description", "text", NULL},
	{"filters", "jsonb", NULL},
	{"query", "jsonb", NULL},
	{"groups", "jsonb", NULL},
	{"is_static", "boolean", NULL},
	{"version", "bigint", NULL},
	{"count", "bigint", NULL},
	{"last_calculation", "timestamptz", NULL},
	{"created_at", "timestamptz", NULL},
	{"deleted", "boolean NOT NULL DEFAULT false", NULL},
	{NULL, NULL, NULL}
};
static const char *const id_key[] = {"id", NULL};

/* created_by_id exists in recent releases only: left out */
static const PresetColumn feature_flags_columns[] = {
	{"id", "bigint", NULL},
	{"key", "text", "`key`"},
	{"name", "text", NULL},
	{"filters", "jsonb", NULL},
	{"rollout_percentage", "bigint", NULL},
	{"created_at", "timestamptz", NULL},
	{"deleted", "boolean NOT NULL DEFAULT false", NULL},
	{NULL, NULL, NULL}
};

/* no deleted column in PostHog: phsync flags what is gone */
static const PresetColumn experiments_columns[] = {
	{"id", "bigint", NULL},
	{"name", "text", NULL},
	{"description", "text", NULL},
	{"feature_flag_id", "bigint", NULL},
	{"filters", "jsonb", NULL},
	{"parameters", "jsonb", NULL},
	{"start_date", "timestamptz", NULL},
	{"end_date", "timestamptz", NULL},
	{"archived", "boolean", NULL},
	{"created_at", "timestamptz", NULL},
	{"updated_at", "timestamptz", NULL},
	{"deleted", "boolean NOT NULL DEFAULT false", "0"},
	{NULL, NULL, NULL}
};

/* id: an integer in older releases, a UUID in newer ones: text holds both */
static const PresetColumn surveys_columns[] = {
	{"id", "text", NULL},
	{"name", "text", NULL},
	{"type", "text", NULL},
	{"questions", "jsonb", NULL},
	{"appearance", "jsonb", NULL},
	{"start_date", "timestamptz", NULL},
	{"end_date", "timestamptz", NULL},
	{"created_at", "timestamptz", NULL},
	{"deleted", "boolean NOT NULL DEFAULT false", "0"},
	{NULL, NULL, NULL}
};

/* current members of dynamic cohorts (their latest calculation) and of
 * static ones */
static const PresetColumn cohort_people_columns[] = {
	{"cohort_id", "bigint", NULL},
	{"person_id", "uuid", NULL},
	{NULL, NULL, NULL}
};
static const char *const cohort_people_key[] = {"cohort_id", "person_id", NULL};

/*
 * which person each distinct id belongs to today: PostHog's own
 * person_distinct_ids (posthog/hogql/database/schema/person_distinct_ids.py)
 * is this argMax over raw_person_distinct_ids, without the version
 */
static const PresetColumn person_distinct_ids_columns[] = {
	{"distinct_id", "text", NULL},
	{"person_id", "uuid", NULL},
	{"version", "bigint", NULL},
	{NULL, NULL, NULL}
};
static const char *const person_distinct_ids_key[] = {"distinct_id", NULL};

static const PresetInfo presets[] = {
	{PHSYNC_EVENTS, "events", "events", events_columns, events_key, "created_at",
	false, false, true, "timestamp", 7, 1, PHSYNC_ABSENT_KEEP, true, "properties"},
	{PHSYNC_PERSONS, "persons", "persons", persons_columns, persons_key, "created_at",
	true, true, false, NULL, 0, 0, PHSYNC_ABSENT_KEEP, false, "properties"},
	{PHSYNC_GROUPS, "groups", "groups", groups_columns, groups_key, "updated_at",
	true, false, false, NULL, 0, 0, PHSYNC_ABSENT_KEEP, false, "properties"},
	/* a session is bounded by its start, PostHog's own pushdown: 3 days */
	{PHSYNC_SESSIONS, "sessions", "sessions", sessions_columns, sessions_key, "max_inserted_at",
	true, false, false, "`$start_timestamp`", 3, 1, PHSYNC_ABSENT_KEEP, false, NULL},
	{PHSYNC_COHORTS, "cohorts", "system.cohorts", cohorts_columns, id_key, NULL,
	true, true, false, NULL, 0, 0, PHSYNC_ABSENT_FLAG, false, NULL},
	{PHSYNC_FEATURE_FLAGS, "feature_flags", "system.feature_flags", feature_flags_columns, id_key, NULL,
	true, true, false, NULL, 0, 0, PHSYNC_ABSENT_FLAG, false, NULL},
	{PHSYNC_EXPERIMENTS, "experiments", "system.experiments", experiments_columns, id_key, NULL,
	true, true, false, NULL, 0, 0, PHSYNC_ABSENT_FLAG, false, NULL},
	{PHSYNC_SURVEYS, "surveys", "system.surveys", surveys_columns, id_key, NULL,
	true, true, false, NULL, 0, 0, PHSYNC_ABSENT_FLAG, false, NULL},
	{PHSYNC_COHORT_PEOPLE, "cohort_people",
		"(SELECT cohort_id, person_id FROM cohort_people\n"
		" UNION ALL SELECT cohort_id, person_id FROM static_cohort_people) AS phsync_members",
		cohort_people_columns, cohort_people_key, NULL,
	true, true, false, NULL, 0, 0, PHSYNC_ABSENT_DELETE, false, NULL},
	{PHSYNC_PERSON_DISTINCT_IDS, "person_distinct_ids",
		"(SELECT pdi.distinct_id AS distinct_id, argMax(pdi.person_id, pdi.version) AS person_id,\n"
		" max(pdi.version) AS version FROM raw_person_distinct_ids AS pdi GROUP BY pdi.distinct_id\n"
		" HAVING argMax(pdi.is_deleted, pdi.version) = 0) AS phsync_pdi",
		person_distinct_ids_columns, person_distinct_ids_key, NULL,
	true, true, false, NULL, 0, 0, PHSYNC_ABSENT_DELETE, false, NULL},
};

#define NPRESETS ((int) lengthof(presets))

/*
 * The definition of a preset (NULL for PHSYNC_CUSTOM).
 */
const PresetInfo *
preset_info(PhsyncPreset preset)
{
	int			i;

	for (i = 0; i < NPRESETS; i++)
		if (presets[i].preset == preset)
			return &presets[i];
	return NULL;
}

/*
 * The preset of that name, NULL if there is none.
 */
const PresetInfo *
preset_lookup(const char *name)
{
	int			i;

	for (i = 0; name && i < NPRESETS; i++)
		if (strcmp(presets[i].name, name) == 0)
			return &presets[i];
	return NULL;
}

/*
 * A preset's name as users write it ("custom" for a query of their own).
 */
const char *
preset_name(PhsyncPreset preset)
{
	const PresetInfo *p = preset_info(preset);

	return p ? p->name : "custom";
}

/*
 * "events and persons": the presets, for messages.
 */
const char *
preset_list(void)
{
	StringInfoData buf;
	int			i;

	initStringInfo(&buf);
	for (i = 0; i < NPRESETS; i++)
		appendStringInfo(&buf, "%s%s", i == 0 ? "" : i == NPRESETS - 1 ? " and " : ", ",
						 presets[i].name);
	return buf.data;
}

/*
 * Does the preset select a column of that name?
 */
bool
preset_has_column(const PresetInfo *p, const char *name)
{
	const PresetColumn *c;

	for (c = p->columns; c->name; c++)
		if (strcmp(c->name, name) == 0)
			return true;
	return false;
}

/*
 * The column name a generated column for property `key` gets: lower-case
 * letters, digits and underscores, without a leading $ (so $browser is
 * browser).
 */
static char *
property_column_name(const char *key)
{
	StringInfoData buf;
	const char *k = key;

	initStringInfo(&buf);
	while (*k == '$')
		k++;
	for (; *k; k++)
	{
		unsigned char c = (unsigned char) *k;

		if (isalnum(c) && !IS_HIGHBIT_SET(c))
			appendStringInfoChar(&buf, (char) tolower(c));
		else if (buf.len > 0 && buf.data[buf.len - 1] != '_')
			appendStringInfoChar(&buf, '_');
	}
	while (buf.len > 0 && buf.data[buf.len - 1] == '_')
		buf.data[--buf.len] = '\0';
	if (buf.len == 0 || isdigit((unsigned char) buf.data[0]))
		return psprintf("property_%s", buf.data);
	return buf.data;
}

/*
 * The statements that create a target table for the preset, named
 * `qualified` (already quoted): its columns, its key and an index on its
 * cursor column; with properties (a list of keys of its JSON column), a
 * generated column for each (`browser text GENERATED ALWAYS AS
 * (properties ->> '$browser') STORED`).
 */
List *
preset_create_statements(const PresetInfo *p, const char *qualified, List *properties)
{
	StringInfoData buf;
	const PresetColumn *c;
	const char *const *k;
	ListCell   *lc;
	List	   *names = NIL;
	List	   *result;

	if (properties != NIL && p->json_column == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the %s preset has no properties to take columns from", p->name),
				 errhint("Presets with properties: events, persons and groups.")));
	initStringInfo(&buf);
	appendStringInfo(&buf, "CREATE TABLE %s (", qualified);
	for (c = p->columns; c->name; c++)
	{
		appendStringInfo(&buf, "\n\t%s %s,", quote_identifier(c->name), c->type);
		names = lappend(names, (char *) c->name);
	}
	foreach(lc, properties)
	{
		const char *key = lfirst(lc);
		char	   *name = property_column_name(key);
		ListCell   *nc;

		if (key[0] == '\0')
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("a property key must not be empty")));
		foreach(nc, names)
		{
			if (strcmp(lfirst(nc), name) == 0)
			{
				name = psprintf("%s_%s", p->json_column, name);
				break;
			}
		}
		foreach(nc, names)
		{
			if (strcmp(lfirst(nc), name) == 0)
				ereport(ERROR,
						(errcode(ERRCODE_DUPLICATE_COLUMN),
						 errmsg("property \"%s\" would make a second column \"%s\"", key, name)));
		}
		names = lappend(names, name);
		appendStringInfo(&buf, "\n\t%s text GENERATED ALWAYS AS (%s ->> %s) STORED,",
						 quote_identifier(name), quote_identifier(p->json_column),
						 quote_literal_cstr(key));
	}
	appendStringInfoString(&buf, "\n\tPRIMARY KEY (");
	for (k = p->key; *k; k++)
		appendStringInfo(&buf, "%s%s", k == p->key ? "" : ", ", quote_identifier(*k));
	appendStringInfoString(&buf, ")\n)");
	result = list_make1(buf.data);
	if (p->cursor)
		result = lappend(result, psprintf("CREATE INDEX ON %s (%s)", qualified,
										  quote_identifier(p->cursor)));
	return result;
}
