/*-------------------------------------------------------------------------
 *
 * syncs.c
 *		Sync definitions: the sync named "default", which the phsync.*
 *		settings describe, and those added with phsync_add_sync(), which
 *		live in phsync.syncs.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "phsync.h"

const char *
preset_name(PhsyncPreset preset)
{
	switch (preset)
	{
		case PHSYNC_EVENTS:
			return "events";
		case PHSYNC_PERSONS:
			return "persons";
		default:
			return "custom";
	}
}

/*
 * The default sync, from the settings; NULL when phsync.target_table is
 * empty (the default sync is off).
 */
PhsyncSync *
sync_default(void)
{
	PhsyncSync *s;

	if (phsync_target_table == NULL || phsync_target_table[0] == '\0')
		return NULL;
	s = palloc0(sizeof(PhsyncSync));
	s->name = "default";
	s->target = pstrdup(phsync_target_table);
	s->cursor = pstrdup(phsync_cursor_column);
	if (phsync_query_file && phsync_query_file[0])
	{
		s->preset = PHSYNC_CUSTOM;
		s->query_file = pstrdup(phsync_query_file);
	}
	else
		s->preset = PHSYNC_EVENTS;
	s->lookback = (int64) phsync_lookback * USECS_PER_SEC;
	s->enabled = true;
	s->verify = phsync_verify_yesterday && s->preset == PHSYNC_EVENTS;
	return s;
}

static char *
text_or_null(HeapTuple tup, TupleDesc desc, int col)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tup, desc, col, &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

/*
 * The syncs, in the order runs take them: default first, then by name.
 * With `only`, just that one (an error if there is no such sync).  Needs a
 * transaction with SPI connected; the list is allocated in the caller's
 * memory context (SPI calls leave SPI's own current, so switch back).
 */
List *
sync_list(const char *only, bool enabled_only)
{
	MemoryContext cxt = CurrentMemoryContext;
	List	   *result = NIL;
	PhsyncSync *def = sync_default();
	Oid			types[1] = {TEXTOID};
	Datum		values[1];
	char		nulls[1] = {only ? ' ' : 'n'};
	uint64		i;

	if (def && (only == NULL || strcmp(only, "default") == 0))
		result = lappend(result, def);

	values[0] = only ? CStringGetTextDatum(only) : (Datum) 0;
	if (SPI_execute_with_args("SELECT name, target, preset, query, cursor_column, conflict, "
							  "extract(epoch FROM lookback)::float8, enabled, verify "
							  "FROM phsync.syncs WHERE $1 IS NULL OR name = $1 ORDER BY name",
							  1, types, values, nulls, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read phsync.syncs");

	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		MemoryContext old = MemoryContextSwitchTo(cxt);
		PhsyncSync *s = palloc0(sizeof(PhsyncSync));
		char	   *preset;
		char	   *conflict;
		bool		isnull;
		Datum		d;

		s->name = text_or_null(tup, desc, 1);
		s->target = text_or_null(tup, desc, 2);
		preset = text_or_null(tup, desc, 3);
		s->query = text_or_null(tup, desc, 4);
		s->cursor = text_or_null(tup, desc, 5);
		conflict = text_or_null(tup, desc, 6);
		s->preset = preset == NULL ? PHSYNC_CUSTOM :
			strcmp(preset, "persons") == 0 ? PHSYNC_PERSONS : PHSYNC_EVENTS;
		s->update = strcmp(conflict, "update") == 0;
		d = SPI_getbinval(tup, desc, 7, &isnull);
		s->reread_all = isnull;
		s->lookback = isnull ? 0 : (int64) (DatumGetFloat8(d) * USECS_PER_SEC);
		s->enabled = DatumGetBool(SPI_getbinval(tup, desc, 8, &isnull));
		s->verify = DatumGetBool(SPI_getbinval(tup, desc, 9, &isnull));
		if (s->enabled || !enabled_only || only != NULL)
			result = lappend(result, s);
		MemoryContextSwitchTo(old);
	}

	if (only && result == NIL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("sync \"%s\" does not exist", only),
				 strcmp(only, "default") == 0 ?
				 errhint("phsync.target_table is empty, which turns the default sync off.") :
				 errhint("SELECT name FROM phsync.syncs lists the syncs.")));
	return result;
}
