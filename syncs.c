/*-------------------------------------------------------------------------
 *
 * syncs.c
 *		Sync definitions: the sync named "default", which the phsync.*
 *		settings describe, and those added with phsync_add_sync(), which
 *		live in phsync.syncs; the rules a definition must follow and the
 *		defaults it gets; and how to reach its PostHog project.
 *
 * A sync belongs to the role that added it (the default sync: phsync.role,
 * else the bootstrap superuser), by OID (phsync.syncs.owner is a regrole):
 * a sync never passes to a new role that takes a dropped one's name.  Runs
 * act on its target as that role (see target.c); only it, its members and
 * superusers may change or drop it.
 *
 * phsync.syncs is written only here, as the bootstrap superuser: the
 * functions that manage syncs are granted to roles that have no right on
 * the table itself.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#include "phsync.h"

#define DEFAULT_SYNC "default"

/* a row of phsync.syncs, as text */
typedef struct PhsyncSyncDef
{
	char	   *name;
	Oid			owner;
	char	   *target;
	char	   *preset;			/* NULL with a query */
	char	   *query;			/* NULL with a preset */
	char	   *cursor;
	char	   *conflict;
	char	   *lookback;		/* NULL: re-read everything */
	bool		enabled;
	bool		verify;
	char	   *server;			/* NULL: the settings */
	List	   *events;			/* NIL: every event */
	char	   *schedule;		/* NULL: the global schedule */
	char	   *deletions;		/* keep or mirror */
} PhsyncSyncDef;

/* the lookback of an added sync, unless it says otherwise */
#define DEFAULT_LOOKBACK "10 minutes"

bool
sync_is_default(const PhsyncSync *sync)
{
	return strcmp(sync->name, DEFAULT_SYNC) == 0;
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
	s->name = DEFAULT_SYNC;
	if (phsync_role && phsync_role[0])
	{
		s->owner = get_role_oid(phsync_role, true);
		s->owner_name = pstrdup(phsync_role);
	}
	else
	{
		s->owner = BOOTSTRAP_SUPERUSERID;
		s->owner_name = GetUserNameFromId(BOOTSTRAP_SUPERUSERID, false);
	}
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
	s->mirror = phsync_mirror_deletions;
	return s;
}

/*
 * What the sync expects of its target, for target_examine().
 */
void
sync_target_spec(const PhsyncSync *sync, PhsyncTargetSpec *spec)
{
	memset(spec, 0, sizeof(*spec));
	spec->name = sync->target;
	spec->cursor = sync->cursor;
	spec->cursor_origin = sync_cursor_origin(sync);
	spec->preset = sync->preset;
	spec->update = sync->update;
	spec->owner = sync->owner;
}

/*
 * Where the sync's cursor column is set, for messages.
 */
const char *
sync_cursor_origin(const PhsyncSync *sync)
{
	return sync_is_default(sync) ? "phsync.cursor_column" :
		psprintf("the cursor of sync %s", sync->name);
}

/*
 * The name of role `owner` for messages, also when it is gone.
 */
char *
sync_owner_name(Oid owner)
{
	char	   *name = OidIsValid(owner) ? GetUserNameFromId(owner, true) : NULL;

	return name ? name : psprintf("a dropped role (OID %u)", owner);
}

/*
 * The sync's owner; an error if that role is gone.
 */
Oid
sync_owner(const PhsyncSync *sync)
{
	if (!OidIsValid(sync->owner))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("the role that owned sync %s was dropped", sync->name),
				 errhint("A superuser can give the sync to another role: UPDATE phsync.syncs SET owner = 'role' WHERE name = '%s';",
						 sync->name)));
	return sync->owner;
}

/*
 * Does the current user own a sync owned by `owner`: is it a member of
 * that role, or a superuser (as for tables)?
 */
bool
sync_owned_by_me(Oid owner)
{
	return superuser() || (OidIsValid(owner) && has_privs_of_role(GetUserId(), owner));
}

/*
 * May the current user change, drop, backfill or cancel the sync owned by
 * `owner`?  (what: "to backfill it"; "" to change or drop it.)
 */
void
sync_check_owner(const char *name, Oid owner, const char *what)
{
	if (sync_owned_by_me(owner))
		return;
	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("must be owner of sync %s%s%s", name, what[0] ? " " : "", what),
			 errdetail("Sync %s belongs to role \"%s\".", name, sync_owner_name(owner))));
}

/*
 * How to reach the sync's PostHog project: its server, with the user
 * mapping of the sync's owner; or the phsync.* settings (also with sync
 * NULL: the settings' connection, with no query).  Raises when something
 * is missing.  Needs a transaction.
 */
PhsyncEndpoint *
sync_endpoint(const PhsyncSync *sync)
{
	PhsyncEndpoint *e;

	if (sync && sync->server)
	{
		char	   *what = psprintf("sync %s", sync->name);

		e = endpoint_server(sync->server, sync_owner(sync), what);
	}
	else
	{
		/* the settings' key is for superusers (and the settings' own sync) */
		if (sync && !sync_is_default(sync) && !superuser_arg(sync_owner(sync)))
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("sync %s uses phsync.api_key, but its owner \"%s\" is not a superuser",
							sync->name, sync->owner_name),
					 errdetail("Only superusers may use the key in the settings."),
					 errhint("Give it a server with a user mapping of its owner: SELECT phsync_alter_sync('%s', server => '...');",
							 sync->name)));
		e = endpoint_settings();
	}
	if (sync == NULL)
		e->query_origin = NULL;
	else if (sync->query_file)
		e->query_origin = "phsync.query_file";
	else if (sync->preset == PHSYNC_CUSTOM)
		e->query_origin = psprintf("the query of sync %s", sync->name);
	return e;
}

/* a text[] column as a list of strings (NIL for NULL or empty) */
static List *
text_array_list(HeapTuple tup, TupleDesc desc, int col)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tup, desc, col, &isnull);
	Datum	   *elems;
	bool	   *nulls;
	int			n,
				i;
	List	   *result = NIL;

	if (isnull)
		return NIL;
	deconstruct_array(DatumGetArrayTypeP(d), TEXTOID, -1, false, TYPALIGN_INT,
					  &elems, &nulls, &n);
	for (i = 0; i < n; i++)
		if (!nulls[i])
			result = lappend(result, TextDatumGetCString(elems[i]));
	return result;
}

/* a list of strings as a text[] */
static Datum
text_list_array(List *list)
{
	Datum	   *elems = palloc(sizeof(Datum) * Max(list_length(list), 1));
	ListCell   *lc;

	foreach(lc, list)
		elems[foreach_current_index(lc)] = CStringGetTextDatum(lfirst(lc));
	return PointerGetDatum(construct_array(elems, list_length(list), TEXTOID, -1, false, TYPALIGN_INT));
}

static char *
text_or_null(HeapTuple tup, TupleDesc desc, int col)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tup, desc, col, &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

/*
 * What phsync_alter_sync('default', ...) set: whether the default sync runs
 * and its schedule (phsync.default_sync), into def.  Needs SPI connected.
 */
static void
default_overrides(PhsyncSync *def)
{
	MemoryContext cxt = CurrentMemoryContext;

	if (phsync_spi_exec("SELECT enabled, schedule FROM phsync.default_sync",
						0, NULL, NULL, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read phsync.default_sync");
	if (SPI_processed == 1)
	{
		HeapTuple	tup = SPI_tuptable->vals[0];
		bool		isnull;
		MemoryContext old;

		def->enabled = DatumGetBool(SPI_getbinval(tup, SPI_tuptable->tupdesc, 1, &isnull));
		old = MemoryContextSwitchTo(cxt);
		def->schedule = text_or_null(tup, SPI_tuptable->tupdesc, 2);
		MemoryContextSwitchTo(old);
	}
}

/*
 * The syncs, in the order runs take them: default first, then by name.
 * With `only`, just that one (an error if there is no such sync).  Needs
 * SPI connected; the list is allocated in the caller's memory context.
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

	Assert(phsync_spi_connected());
	if (def && (only == NULL || strcmp(only, DEFAULT_SYNC) == 0))
	{
		default_overrides(def);
		if (def->enabled || !enabled_only || only != NULL)
			result = lappend(result, def);
	}

	values[0] = only ? CStringGetTextDatum(only) : (Datum) 0;
	if (phsync_spi_exec("SELECT name, target, preset, query, cursor_column, conflict, "
						"pg_catalog.date_part('epoch', lookback), enabled, verify, owner::pg_catalog.oid, server, events, "
						"schedule, created_at, deletions FROM phsync.syncs WHERE $1 IS NULL OR name = $1 ORDER BY name",
						1, types, values, nulls, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read phsync.syncs");

	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		MemoryContext old = MemoryContextSwitchTo(cxt);
		PhsyncSync *s = palloc0(sizeof(PhsyncSync));
		const PresetInfo *preset;
		bool		isnull;
		Datum		d;

		s->name = text_or_null(tup, desc, 1);
		s->target = text_or_null(tup, desc, 2);
		preset = preset_lookup(text_or_null(tup, desc, 3));
		s->preset = preset ? preset->preset : PHSYNC_CUSTOM;
		s->query = text_or_null(tup, desc, 4);
		s->cursor = text_or_null(tup, desc, 5);
		s->update = strcmp(text_or_null(tup, desc, 6), "update") == 0;
		d = SPI_getbinval(tup, desc, 7, &isnull);
		s->reread_all = isnull;
		s->lookback = isnull ? 0 : (int64) (DatumGetFloat8(d) * USECS_PER_SEC);
		s->enabled = DatumGetBool(SPI_getbinval(tup, desc, 8, &isnull));
		s->verify = DatumGetBool(SPI_getbinval(tup, desc, 9, &isnull));
		s->owner = DatumGetObjectId(SPI_getbinval(tup, desc, 10, &isnull));
		if (!SearchSysCacheExists1(AUTHOID, ObjectIdGetDatum(s->owner)))
		{
			s->owner_name = sync_owner_name(s->owner);
			s->owner = InvalidOid;	/* dropped meanwhile */
		}
		else
			s->owner_name = GetUserNameFromId(s->owner, false);
		s->server = SPI_getvalue(tup, desc, 11);
		s->events = text_array_list(tup, desc, 12);
		s->schedule = text_or_null(tup, desc, 13);
		s->created_at = DatumGetTimestampTz(SPI_getbinval(tup, desc, 14, &isnull));
		s->mirror = strcmp(text_or_null(tup, desc, 15), "mirror") == 0;
		if (s->enabled || !enabled_only || only != NULL)
			result = lappend(result, s);
		MemoryContextSwitchTo(old);
	}

	if (only && result == NIL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("sync \"%s\" does not exist", only),
				 strcmp(only, DEFAULT_SYNC) == 0 ?
				 errhint("phsync.target_table is empty, which turns the default sync off.") :
				 errhint("SELECT name FROM phsync.syncs lists the syncs.")));
	return result;
}

/*
 * The syncs of a list that `requester` may run: those it owns (or is a
 * member of the owner of), every one for a superuser or requester 0 (the
 * worker's schedule).
 */
List *
sync_runnable_by(List *syncs, Oid requester)
{
	ListCell   *lc;

	if (!OidIsValid(requester) || superuser_arg(requester))
		return syncs;
	foreach(lc, syncs)
	{
		PhsyncSync *s = lfirst(lc);

		if (!OidIsValid(s->owner) || !has_privs_of_role(requester, s->owner))
			syncs = foreach_delete_current(syncs, lc);
	}
	return syncs;
}

/* ---------- adding, changing and dropping syncs ---------- */

/*
 * Run one statement on phsync.syncs as the bootstrap superuser, who owns
 * it (the caller may only have EXECUTE on the function that got here).
 */
static int
catalog_exec(const char *sql, int nargs, Oid *types, Datum *values,
			 const char *nulls, bool read_only)
{
	PhsyncAsRole save;
	int			ret;

	as_role_begin(BOOTSTRAP_SUPERUSERID, false, &save);
	ret = phsync_spi_exec(sql, nargs, types, values, nulls, read_only, 0);
	as_role_end(&save);
	if (ret < 0)
		elog(ERROR, "could not access phsync.syncs: %s", SPI_result_code_string(ret));
	return ret;
}

static bool
sync_exists(const char *name)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(name)};

	catalog_exec("SELECT 1 FROM phsync.syncs WHERE name = $1",
				 1, types, values, NULL, true);
	return SPI_processed > 0;
}

/*
 * A sync name is lower-case letters, digits and underscores, starting with
 * a letter or an underscore, and is not "default".
 */
void
sync_check_name(const char *name)
{
	const char *p;
	bool		ok = name && name[0] && strlen(name) < NAMEDATALEN &&
		(islower((unsigned char) name[0]) || name[0] == '_');

	for (p = name; ok && *p; p++)
		if (!(islower((unsigned char) *p) || isdigit((unsigned char) *p) || *p == '_') ||
			IS_HIGHBIT_SET(*p))
			ok = false;
	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_NAME),
				 errmsg("invalid sync name \"%s\"", name ? name : ""),
				 errhint("Use lower-case letters, digits and underscores, starting with a letter.")));
	if (strcmp(name, DEFAULT_SYNC) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_NAME),
				 errmsg("the sync named \"default\" is configured by the phsync.* settings in postgresql.conf"),
				 errhint("Choose another name.")));
}

/*
 * A mode given as one of two words: a copy of it, or an error with hint.
 */
static char *
check_mode(const char *what, const char *value, const char *one, const char *other,
		   const char *hint)
{
	if (strcmp(value, one) != 0 && strcmp(value, other) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid %s mode \"%s\"", what, value),
				 errhint("%s", hint)));
	return pstrdup(value);
}

/*
 * The definition args describes, complete and checked: args' fields that
 * are not given (NULL) keep old's value (when changing a sync), or take
 * the defaults of the sync's preset (when adding one).  Errors say what is
 * wrong and how to fix it.  Needs SPI connected.
 */
static PhsyncSyncDef *
sync_resolve(const PhsyncSyncArgs *args, const PhsyncSyncDef *old)
{
	PhsyncSyncDef *d = palloc0(sizeof(PhsyncSyncDef));
	const PresetInfo *preset;
	char	   *query = NULL;
	PhsyncTargetSpec spec;
	PhsyncTarget *target;
	PhsyncProblem problem;

	if (old)
		*d = *old;
	else
		d->owner = GetUserId();
	d->name = pstrdup(args->name);
	if (old == NULL)
		sync_check_name(d->name);

	/* a preset or a query; adding with neither means the events preset */
	if (args->query && args->preset && old == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("a sync needs either a preset or a query, not both"),
				 errhint("Pass preset => 'events' or 'persons', or query => a HogQL query.")));
	if (args->query)
	{
		int			len = strlen(args->query);

		query = pnstrdup(args->query, len);
		while (len > 0 && strchr(" \t\r\n;", query[len - 1]))
			query[--len] = '\0';
		if (len == 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("the query of sync \"%s\" is empty", d->name)));
		d->query = query;
		d->preset = NULL;
	}
	else if (args->preset || old == NULL)
	{
		const char *name = args->preset ? args->preset : "events";

		if (preset_lookup(name) == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("unknown preset \"%s\"", name),
					 errhint("The presets are %s; anything else needs query => a HogQL query.",
							 preset_list())));
		d->preset = pstrdup(name);
		d->query = NULL;
	}
	preset = preset_lookup(d->preset);

	if (args->conflict)
		d->conflict = check_mode("conflict", args->conflict, "nothing", "update",
								 "Use nothing (skip rows already there) or update (rewrite rows whose values changed).");
	else if (old == NULL)
		d->conflict = (preset && preset->update) ? "update" : "nothing";

	if (args->cursor)
		d->cursor = pstrdup(args->cursor);
	else if (old == NULL || args->preset || args->query)
		d->cursor = preset ? (char *) preset->cursor :
			(old && old->cursor ? old->cursor : "created_at");
	if (preset && preset->cursor == NULL && d->cursor)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the %s preset has no cursor", preset->name),
				 errdetail("Every run reads all of PostHog's %s, in the order of the key.", preset->name)));

	if (args->reread_all)
		d->lookback = NULL;
	else if (args->lookback)
		d->lookback = args->lookback;
	else if (old == NULL || args->preset)
		d->lookback = (preset && preset->reread_all) ? NULL : DEFAULT_LOOKBACK;
	if (preset && preset->cursor == NULL && d->lookback)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the %s preset takes no lookback", preset->name),
				 errdetail("Every run reads all of PostHog's %s.", preset->name)));

	/* events => ARRAY[...]: the events preset only; an empty array: all */
	if (args->has_events)
		d->events = args->events;
	if (d->events != NIL && !(preset && preset->event_filter))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("only the events preset takes events => ARRAY[...]"),
				 errhint("A custom query filters events in its own WHERE clause.")));

	if (args->has_enabled)
		d->enabled = args->enabled;
	else if (old == NULL)
		d->enabled = true;
	if (args->has_verify)
		d->verify = args->verify;
	else if (old == NULL || args->preset)
		d->verify = preset && preset->verify;
	if (d->verify && d->cursor == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the %s preset cannot be verified", preset ? preset->name : "custom"),
				 errdetail("Verification counts rows per time bucket of the cursor, and it has none; every run reads it whole.")));

	/* its own schedule ('' for the global one), checked here */
	if (args->schedule)
		d->schedule = args->schedule[0] ? pstrdup(args->schedule) : NULL;
	if (d->schedule)
	{
		PhsyncSchedule parsed;

		schedule_parse(d->schedule, &parsed);
		(void) schedule_next(&parsed, GetCurrentTimestamp());	/* never runs? */
	}

	/* what a repair or a whole re-read does with rows PostHog no longer has */
	if (args->deletions)
		d->deletions = check_mode("deletions", args->deletions, "keep", "mirror",
								  "Use keep (rows PostHog no longer has stay) or mirror (a repair or a whole re-read deletes them).");
	else if (old == NULL)
		d->deletions = "keep";

	/* the PostHog project: a server ('' for the settings) */
	if (args->server)
		d->server = args->server[0] ? pstrdup(args->server) : NULL;
	if (d->server)
		(void) endpoint_server(d->server, d->owner, psprintf("sync %s", d->name));
	else if (!superuser())
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("only superusers may %s a sync without a server", old ? "change" : "add"),
				 errdetail("Without a server, the sync would use phsync.api_key, which only superusers may use."),
				 errhint("Create a user mapping with your own key on a phsync server, and pass server => 'its name'.")));

	/* the target: one definition of acceptable, the worker's too */
	memset(&spec, 0, sizeof(spec));
	spec.name = args->target ? args->target : d->target;
	spec.cursor = d->cursor;
	spec.cursor_origin = "the sync's cursor";
	spec.preset = preset ? preset->preset : PHSYNC_CUSTOM;
	spec.update = strcmp(d->conflict, "update") == 0;
	spec.owner = d->owner;
	spec.suggest_preset = preset ? preset->name : NULL;
	target = target_examine(&spec, &problem);
	if (target == NULL)
		target_raise(&problem);
	d->target = target->display;
	return d;
}

/*
 * The stored definition of sync `name` (NULL if there is none).
 */
static PhsyncSyncDef *
sync_fetch_def(const char *name)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(name)};
	PhsyncSyncDef *d;
	HeapTuple	tup;
	TupleDesc	desc;
	bool		isnull;

	catalog_exec("SELECT name, target, preset, query, cursor_column, conflict, "
				 "lookback::pg_catalog.text, enabled, verify, owner::pg_catalog.oid, server, events, schedule, "
				 "deletions FROM phsync.syncs "
				 "WHERE name = $1 FOR UPDATE",
				 1, types, values, NULL, false);
	if (SPI_processed == 0)
		return NULL;
	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	d = palloc0(sizeof(PhsyncSyncDef));
	d->name = text_or_null(tup, desc, 1);
	d->target = text_or_null(tup, desc, 2);
	d->preset = text_or_null(tup, desc, 3);
	d->query = text_or_null(tup, desc, 4);
	d->cursor = text_or_null(tup, desc, 5);
	d->conflict = text_or_null(tup, desc, 6);
	d->lookback = text_or_null(tup, desc, 7);
	d->enabled = DatumGetBool(SPI_getbinval(tup, desc, 8, &isnull));
	d->verify = DatumGetBool(SPI_getbinval(tup, desc, 9, &isnull));
	d->owner = DatumGetObjectId(SPI_getbinval(tup, desc, 10, &isnull));
	d->server = SPI_getvalue(tup, desc, 11);
	d->events = text_array_list(tup, desc, 12);
	d->schedule = text_or_null(tup, desc, 13);
	d->deletions = text_or_null(tup, desc, 14);
	return d;
}

/*
 * Write d into phsync.syncs (insert or update) and return the row.
 */
static Datum
sync_store(const PhsyncSyncDef *d, bool insert, TupleDesc tupdesc)
{
	Oid			types[14] = {TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID,
	TEXTOID, BOOLOID, BOOLOID, OIDOID, TEXTOID, TEXTARRAYOID, TEXTOID, TEXTOID};
	Datum		values[14];
	char		nulls[14] = {' ', ' ', d->preset ? ' ' : 'n', d->query ? ' ' : 'n', d->cursor ? ' ' : 'n', ' ',
	d->lookback ? ' ' : 'n', ' ', ' ', ' ', d->server ? ' ' : 'n', d->events ? ' ' : 'n',
	d->schedule ? ' ' : 'n', ' '};

	values[0] = CStringGetTextDatum(d->name);
	values[1] = CStringGetTextDatum(d->target);
	values[2] = d->preset ? CStringGetTextDatum(d->preset) : (Datum) 0;
	values[3] = d->query ? CStringGetTextDatum(d->query) : (Datum) 0;
	values[4] = d->cursor ? CStringGetTextDatum(d->cursor) : (Datum) 0;
	values[5] = CStringGetTextDatum(d->conflict);
	values[6] = d->lookback ? CStringGetTextDatum(d->lookback) : (Datum) 0;
	values[7] = BoolGetDatum(d->enabled);
	values[8] = BoolGetDatum(d->verify);
	values[9] = ObjectIdGetDatum(d->owner);
	values[10] = d->server ? CStringGetTextDatum(d->server) : (Datum) 0;
	values[11] = d->events ? text_list_array(d->events) : (Datum) 0;
	values[12] = d->schedule ? CStringGetTextDatum(d->schedule) : (Datum) 0;
	values[13] = CStringGetTextDatum(d->deletions);
	catalog_exec(insert ?
				 "INSERT INTO phsync.syncs (name, target, preset, query, cursor_column, conflict, "
				 "lookback, enabled, verify, owner, server, events, schedule, deletions) "
				 "VALUES ($1, $2, $3, $4, $5, $6, $7::pg_catalog.interval, $8, $9, $10::pg_catalog.regrole, "
				 "$11::pg_catalog.name, $12, $13, $14) RETURNING *" :
				 "UPDATE phsync.syncs SET target = $2, preset = $3, query = $4, cursor_column = $5, "
				 "conflict = $6, lookback = $7::pg_catalog.interval, enabled = $8, verify = $9, "
				 "server = $11::pg_catalog.name, events = $12, schedule = $13, deletions = $14 "
				 "WHERE name = $1 RETURNING *",
				 14, types, values, nulls, false);
	if (SPI_processed != 1)
		elog(ERROR, "could not write sync \"%s\" into phsync.syncs", d->name);
	return PointerGetDatum(SPI_returntuple(SPI_tuptable->vals[0], tupdesc));
}

/*
 * phsync_add_sync(): check the definition and store it.  Needs SPI.
 */
Datum
sync_add(const PhsyncSyncArgs *args, TupleDesc tupdesc)
{
	PhsyncSyncDef *d;
	bool		isnull;

	Assert(phsync_spi_connected());
	sync_check_name(args->name);
	if (sync_exists(args->name))
		ereport(ERROR,
				(errcode(ERRCODE_DUPLICATE_OBJECT),
				 errmsg("sync \"%s\" already exists", args->name),
				 errhint("Use phsync_alter_sync() to change it.")));
	/*
	 * One add at a time (the lock is the transaction's), and a count that
	 * sees every committed sync and this statement's own (read_only would
	 * use the statement's snapshot, blind to both): so phsync.max_syncs
	 * holds across sessions and within one statement that adds many.
	 */
	catalog_exec("SELECT pg_catalog.pg_advisory_xact_lock(" PHSYNC_LOCK_CLASS ", 1)",
				 0, NULL, NULL, NULL, false);
	catalog_exec("SELECT pg_catalog.count(*) FROM phsync.syncs", 0, NULL, NULL, NULL, false);
	if (DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull)) >=
		phsync_max_syncs)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("phsync already has %d syncs, the most phsync.max_syncs allows", phsync_max_syncs),
				 errhint("Drop syncs you no longer need, or raise phsync.max_syncs.")));
	d = sync_resolve(args, NULL);
	shmem_owners_changing();
	return sync_store(d, true, tupdesc);
}

static void
refuse_default(const char *name, const char *hint)
{
	if (strcmp(name, DEFAULT_SYNC) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("the sync named \"default\" is configured by the phsync.* settings in postgresql.conf"),
				 errhint("%s", hint)));
}

/*
 * phsync_alter_sync('default', ...): enabled and schedule, kept in
 * phsync.default_sync; the rest of the default sync is the settings', and
 * the error for each says which.  Superusers only (it runs with the
 * settings' key).  Returns the default sync as a phsync.syncs row.
 */
static Datum
default_alter(const PhsyncSyncArgs *args, TupleDesc tupdesc)
{
	static const struct
	{
		size_t		offset;
		const char *setting;
	}			settings_fields[] = {
		{offsetof(PhsyncSyncArgs, target), "phsync.target_table"},
		{offsetof(PhsyncSyncArgs, query), "phsync.query_file"},
		{offsetof(PhsyncSyncArgs, preset), "phsync.query_file"},
		{offsetof(PhsyncSyncArgs, cursor), "phsync.cursor_column"},
		{offsetof(PhsyncSyncArgs, conflict), NULL},
		{offsetof(PhsyncSyncArgs, lookback), "phsync.lookback"},
		{offsetof(PhsyncSyncArgs, server), "phsync.host, phsync.project_id and phsync.api_key"},
	};
	Oid			types[2] = {BOOLOID, TEXTOID};
	Datum		values[2];
	char		nulls[2] = {' ', ' '};
	PhsyncSync *def = sync_default();
	PhsyncSchedule parsed;
	Datum		row[15];
	bool		rownulls[15];
	int			i;

	for (i = 0; i < (int) lengthof(settings_fields); i++)
		if (*(char **) ((char *) args + settings_fields[i].offset) != NULL)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("the sync named \"default\" is configured by the phsync.* settings in postgresql.conf"),
					 settings_fields[i].setting ?
					 errhint("Set %s and reload; phsync_alter_sync('default', ...) changes only enabled and schedule.",
							 settings_fields[i].setting) :
					 errhint("The default sync skips rows already there; phsync_alter_sync('default', ...) changes only enabled and schedule.")));
	if (args->has_verify || args->reread_all || args->has_events || args->deletions)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("the sync named \"default\" is configured by the phsync.* settings in postgresql.conf"),
				 errhint("Set %s and reload; phsync_alter_sync('default', ...) changes only enabled and schedule.",
						 args->has_verify ? "phsync.verify" :
						 args->reread_all ? "phsync.lookback" :
						 args->deletions ? "phsync.deletions" : "phsync.query_file")));
	if (!superuser())
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("only superusers may change the default sync"),
				 errdetail("It runs with phsync.api_key, the superusers' key.")));
	if (def == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("sync \"default\" does not exist"),
				 errhint("phsync.target_table is empty, which turns the default sync off.")));
	default_overrides(def);
	if (args->has_enabled)
		def->enabled = args->enabled;
	if (args->schedule)
		def->schedule = args->schedule[0] ? pstrdup(args->schedule) : NULL;
	schedule_parse(def->schedule, &parsed);
	(void) schedule_next(&parsed, GetCurrentTimestamp());

	values[0] = BoolGetDatum(def->enabled);
	values[1] = def->schedule ? CStringGetTextDatum(def->schedule) : (Datum) 0;
	nulls[1] = def->schedule ? ' ' : 'n';
	catalog_exec("INSERT INTO phsync.default_sync (enabled, schedule) VALUES ($1, $2) "
				 "ON CONFLICT (only_row) DO UPDATE SET enabled = $1, schedule = $2",
				 2, types, values, nulls, false);

	/* the default sync, shaped as a row of phsync.syncs */
	memset(rownulls, true, sizeof(rownulls));
	Assert(tupdesc->natts == 15);
	row[0] = CStringGetTextDatum(DEFAULT_SYNC);
	row[1] = CStringGetTextDatum(def->target);
	row[2] = CStringGetTextDatum("events");
	row[4] = CStringGetTextDatum(def->cursor);
	row[5] = CStringGetTextDatum("nothing");
	row[7] = BoolGetDatum(def->enabled);
	row[8] = BoolGetDatum(def->verify);
	row[10] = ObjectIdGetDatum(OidIsValid(def->owner) ? def->owner : BOOTSTRAP_SUPERUSERID);
	row[13] = values[1];
	rownulls[0] = rownulls[1] = rownulls[4] = rownulls[5] = rownulls[7] = rownulls[8] = rownulls[10] = false;
	rownulls[2] = def->preset != PHSYNC_EVENTS;
	rownulls[13] = def->schedule == NULL;
	row[14] = CStringGetTextDatum(def->mirror ? "mirror" : "keep");
	rownulls[14] = false;
	shmem_wake_worker_at_commit();
	return HeapTupleGetDatum(heap_form_tuple(tupdesc, row, rownulls));
}

/*
 * phsync_alter_sync(): arguments not given keep their value.  Needs SPI.
 */
Datum
sync_alter(const PhsyncSyncArgs *args, TupleDesc tupdesc)
{
	PhsyncSyncDef *old;

	Assert(phsync_spi_connected());
	if (strcmp(args->name, DEFAULT_SYNC) == 0)
		return default_alter(args, tupdesc);
	old = sync_fetch_def(args->name);
	if (old == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("sync \"%s\" does not exist", args->name)));
	sync_check_owner(old->name, old->owner, "");
	return sync_store(sync_resolve(args, old), false, tupdesc);
}

/*
 * phsync_drop_sync(): the definition goes; its table and history stay.
 */
void
sync_drop(const char *name)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(name)};

	PhsyncSyncDef *old;

	Assert(phsync_spi_connected());
	refuse_default(name, "Set phsync.target_table = '' and reload to turn it off.");
	old = sync_fetch_def(name);
	if (old == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("sync \"%s\" does not exist", name)));
	sync_check_owner(old->name, old->owner, "");
	catalog_exec("DELETE FROM phsync.syncs WHERE name = $1", 1, types, values, NULL, false);
	shmem_owners_changing();
}
