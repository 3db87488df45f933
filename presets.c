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

#include "lib/stringinfo.h"
#include "utils/builtins.h"

#include "phsync.h"

static const PresetColumn events_columns[] = {
	{"uuid", "uuid"},
	{"event", "text"},
	{"timestamp", "timestamptz"},
	{"distinct_id", "text"},
	{"person_id", "uuid"},
	{"properties", "jsonb"},
	{"elements_chain", "text"},
	{"created_at", "timestamptz NOT NULL"},
	{NULL, NULL}
};
static const char *const events_key[] = {"uuid", NULL};

static const PresetColumn persons_columns[] = {
	{"id", "uuid"},
	{"created_at", "timestamptz NOT NULL"},
	{"is_identified", "boolean"},
	{"properties", "jsonb"},
	{NULL, NULL}
};
static const char *const persons_key[] = {"id", NULL};

static const PresetInfo presets[] = {
	{PHSYNC_EVENTS, "events", "events", events_columns, events_key, "created_at",
	false, false, true},
	{PHSYNC_PERSONS, "persons", "persons", persons_columns, persons_key, "created_at",
	true, true, false},
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
 * The statements that create a target table for the preset, named
 * `qualified` (already quoted): its columns, its key and an index on its
 * cursor column.
 */
List *
preset_create_statements(const PresetInfo *p, const char *qualified)
{
	StringInfoData buf;
	const PresetColumn *c;
	const char *const *k;

	initStringInfo(&buf);
	appendStringInfo(&buf, "CREATE TABLE %s (", qualified);
	for (c = p->columns; c->name; c++)
		appendStringInfo(&buf, "\n\t%s %s,", quote_identifier(c->name), c->type);
	appendStringInfoString(&buf, "\n\tPRIMARY KEY (");
	for (k = p->key; *k; k++)
		appendStringInfo(&buf, "%s%s", k == p->key ? "" : ", ", quote_identifier(*k));
	appendStringInfoString(&buf, ")\n)");
	return list_make2(buf.data,
					  psprintf("CREATE INDEX ON %s (%s)", qualified, quote_identifier(p->cursor)));
}
