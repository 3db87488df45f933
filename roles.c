/*-------------------------------------------------------------------------
 *
 * roles.c
 *		Sync owners as PostgreSQL treats the owners of objects: DROP ROLE of
 *		a role that owns a sync is refused, DROP OWNED BY drops its syncs
 *		and REASSIGN OWNED BY gives them to the new owner.
 *
 * A sync is owned by a role OID (phsync.syncs.owner is a regrole), so it
 * never passes to a new role that takes a dropped one's name.  PostgreSQL
 * does not know that a row of phsync.syncs depends on a role, so a
 * ProcessUtility hook does what its dependency checks would:
 *
 *	- DROP ROLE, in phsync.database: refused when phsync.syncs (or the
 *	  default sync, through phsync.role) names the role, listing the
 *	  syncs, as PostgreSQL lists a role's objects.  In another database,
 *	  which cannot read phsync.syncs, the worker's list of owners in shared
 *	  memory answers; it is refreshed after every committed change of
 *	  phsync.syncs, so a DROP ROLE elsewhere in the moment after a sync is
 *	  added may still pass: that sync then has a dropped owner and does not
 *	  run until a superuser gives it to another role.
 *	- DROP OWNED BY and REASSIGN OWNED BY act on the objects of the
 *	  current database: in phsync.database, on the syncs too, after
 *	  PostgreSQL's own checks (the caller needs the privileges of the
 *	  roles) have passed.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_type.h"
#include "commands/dbcommands.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "tcop/utility.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"

#include "phsync.h"

static ProcessUtility_hook_type prev_utility_hook = NULL;

/*
 * Is this session in phsync.database, with the extension there?
 */
static bool
syncs_are_here(void)
{
	char	   *dbname = get_database_name(MyDatabaseId);

	return dbname && strcmp(dbname, phsync_database) == 0 &&
		OidIsValid(get_extension_oid("phsync", true));
}

/*
 * The names of the syncs role owns, for an error's detail ("" when none).
 * In phsync.database, with SPI connected.
 */
static char *
syncs_of(Oid role)
{
	Oid			types[1] = {OIDOID};
	Datum		values[1] = {ObjectIdGetDatum(role)};
	PhsyncAsRole save;
	StringInfoData buf;
	uint64		i;

	initStringInfo(&buf);
	if (phsync_role && phsync_role[0] && get_role_oid(phsync_role, true) == role)
		appendStringInfoString(&buf, "owner of sync default (phsync.role)");
	as_role_begin(BOOTSTRAP_SUPERUSERID, false, &save);
	if (phsync_spi_exec("SELECT name FROM phsync.syncs WHERE owner OPERATOR(pg_catalog.=) $1::pg_catalog.regrole ORDER BY name",
						1, types, values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read phsync.syncs");
	as_role_end(&save);
	for (i = 0; i < SPI_processed; i++)
		appendStringInfo(&buf, "%sowner of sync %s", buf.len ? "\n" : "",
						 SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1));
	return buf.data;
}

/*
 * DROP ROLE: refuse a role that owns a sync, as PostgreSQL refuses one
 * that owns objects.
 */
static void
check_drop_role(DropRoleStmt *stmt)
{
	bool		here = syncs_are_here();
	ListCell   *lc;

	if (here)
		phsync_spi_connect();
	foreach(lc, stmt->roles)
	{
		Oid			role = get_rolespec_oid(lfirst(lc), true);
		char	   *what = NULL;

		if (!OidIsValid(role))
			continue;			/* PostgreSQL says it does not exist (or skips it) */
		if (here)
			what = syncs_of(role);
		else if (shmem_owns_syncs(role))
			what = psprintf("owner of syncs in database %s", phsync_database);
		if (what && what[0])
			ereport(ERROR,
					(errcode(ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST),
					 errmsg("role \"%s\" cannot be dropped because some objects depend on it",
							GetUserNameFromId(role, false)),
					 errdetail("%s", what),
					 errhint("DROP OWNED BY or REASSIGN OWNED BY in database %s drops its syncs or gives them to another role; so does phsync_drop_sync().",
							 phsync_database)));
	}
	if (here)
		phsync_spi_finish();
}

/*
 * DROP OWNED BY (newrole InvalidOid) or REASSIGN OWNED BY ... TO newrole,
 * in phsync.database: the same for the syncs.  Called after PostgreSQL
 * did it for the database's objects, whose checks have passed.
 */
static void
owned_syncs(List *roles, Oid newrole)
{
	ListCell   *lc;
	PhsyncAsRole save;

	phsync_spi_connect();
	as_role_begin(BOOTSTRAP_SUPERUSERID, false, &save);
	foreach(lc, roles)
	{
		Oid			role = get_rolespec_oid(lfirst(lc), false);
		Oid			types[2] = {OIDOID, OIDOID};
		Datum		values[2] = {ObjectIdGetDatum(role), ObjectIdGetDatum(newrole)};

		if (phsync_spi_exec(OidIsValid(newrole) ?
							"UPDATE phsync.syncs SET owner = $2::pg_catalog.regrole "
							"WHERE owner OPERATOR(pg_catalog.=) $1::pg_catalog.regrole" :
							"DELETE FROM phsync.syncs WHERE owner OPERATOR(pg_catalog.=) $1::pg_catalog.regrole",
							2, types, values, NULL, false, 0) < 0)
			elog(ERROR, "could not change the owners in phsync.syncs");
		if (SPI_processed > 0 && OidIsValid(newrole))
			ereport(NOTICE,
					(errmsg("%d sync(s) of role \"%s\" now belong to role \"%s\"",
							(int) SPI_processed, GetUserNameFromId(role, false),
							GetUserNameFromId(newrole, false))));
		else if (SPI_processed > 0)
			ereport(NOTICE,
					(errmsg("%d sync(s) of role \"%s\" dropped",
							(int) SPI_processed, GetUserNameFromId(role, false))));
	}
	as_role_end(&save);
	phsync_spi_finish();
	shmem_owners_changing();
}

static void
phsync_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
			   ProcessUtilityContext context, ParamListInfo params,
			   QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *stmt = pstmt->utilityStmt;

	if (IsA(stmt, DropRoleStmt))
		check_drop_role((DropRoleStmt *) stmt);

	if (prev_utility_hook)
		prev_utility_hook(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);

	/*
	 * The worker waits for its database: it connects as soon as CREATE
	 * DATABASE commits.  (Not so for CREATE EXTENSION: pg_restore creates
	 * the extension long before the tables' keys, and a worker that took
	 * the database over at once would run restored queued runs into them;
	 * a session's first call wakes the worker anyway.)
	 */
	if (IsA(stmt, CreatedbStmt) && strcmp(((CreatedbStmt *) stmt)->dbname, phsync_database) == 0 &&
		shmem_available())
		shmem_wake_worker_at_commit();

	if (IsA(stmt, DropOwnedStmt) && syncs_are_here())
		owned_syncs(((DropOwnedStmt *) stmt)->roles, InvalidOid);
	else if (IsA(stmt, ReassignOwnedStmt) && syncs_are_here())
		owned_syncs(((ReassignOwnedStmt *) stmt)->roles,
					get_rolespec_oid(((ReassignOwnedStmt *) stmt)->newrole, false));
}

/*
 * Install the hook (from _PG_init, in every backend of a server that
 * preloads phsync).
 */
void
roles_install_hook(void)
{
	prev_utility_hook = ProcessUtility_hook;
	ProcessUtility_hook = phsync_utility;
}

/*
 * In the worker: publish the roles that own syncs, for DROP ROLE in other
 * databases (an empty list when the extension is not there).  In a
 * transaction with SPI connected.
 */
void
roles_publish_owners(bool extension_here)
{
	Oid			owners[PHSYNC_MAX_OWNERS];
	int			n = 0;
	bool		overflow = false;
	uint64		i;

	Assert(!extension_here || phsync_spi_connected());
	/* the default sync's */
	if (phsync_role && phsync_role[0] && OidIsValid(get_role_oid(phsync_role, true)))
		owners[n++] = get_role_oid(phsync_role, true);
	if (extension_here)
	{
		if (phsync_spi_exec("SELECT DISTINCT owner::pg_catalog.oid FROM phsync.syncs",
							0, NULL, NULL, NULL, true, 0) != SPI_OK_SELECT)
			elog(ERROR, "could not read phsync.syncs");
		for (i = 0; i < SPI_processed; i++)
		{
			bool		isnull;

			if (n == PHSYNC_MAX_OWNERS)
			{
				overflow = true;
				break;
			}
			owners[n++] = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[i],
														 SPI_tuptable->tupdesc, 1, &isnull));
		}
	}
	shmem_publish_owners(owners, n, overflow);
}

/*
 * Whether the role the worker runs as (phsync.role) lacks a privilege
 * without which the worker can do nothing at all (read phsync's schema,
 * its syncs and its run history): then *problem names what it lacks and
 * *fix holds the GRANTs (as a superuser) that give it.  The other rights of
 * the block in docs/security.md are each needed by one kind of work only (writing a run,
 * retention, verification), which fails or warns on its own and lets the
 * rest go on.  A superuser lacks nothing.  Needs SPI connected.
 */
bool
roles_worker_lacks(char **problem, char **fix)
{
	bool		isnull;
	Datum		d;

	if (superuser())
		return false;
	if (phsync_spi_exec("WITH needed (kind, object, privileges) AS (VALUES "
						"('SCHEMA', 'phsync', 'USAGE'), "
						"('TABLE', 'phsync.runs', 'SELECT'), "
						"('TABLE', 'phsync.syncs', 'SELECT')), "
						"missing AS (SELECT n.kind, n.object, "
						"  pg_catalog.string_agg(p, ', ' ORDER BY o) AS privileges "
						"  FROM needed n, pg_catalog.unnest(pg_catalog.string_to_array(n.privileges, ', ')) "
						"       WITH ORDINALITY AS u (p, o) "
						"  WHERE NOT CASE n.kind "
						"    WHEN 'SCHEMA' THEN pg_catalog.has_schema_privilege(n.object, p) "
						/* by OID: a name in a schema without USAGE would be an error */
						"    ELSE pg_catalog.has_table_privilege((SELECT c.oid FROM pg_catalog.pg_class c "
						"      WHERE c.relnamespace = 'phsync'::pg_catalog.regnamespace "
						"        AND c.relname = pg_catalog.split_part(n.object, '.', 2)), p) END "
						"  GROUP BY n.kind, n.object) "
						"SELECT pg_catalog.string_agg(privileges || ' on ' || pg_catalog.lower(kind) || ' ' || object, '; '), "
						"pg_catalog.string_agg(pg_catalog.format('GRANT %s ON %s%s TO %I;', privileges, "
						"  CASE kind WHEN 'TABLE' THEN '' ELSE kind || ' ' END, object, current_user), ' ') "
						"FROM missing",
						0, NULL, NULL, NULL, true, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not check the privileges of the phsync worker's role");
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	if (isnull)
		return false;
	*problem = psprintf("phsync.role \"%s\" lacks %s", GetUserNameFromId(GetUserId(), false),
						TextDatumGetCString(d));
	*fix = TextDatumGetCString(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	return true;
}
