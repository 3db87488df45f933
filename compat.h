/*-------------------------------------------------------------------------
 *
 * compat.h
 *		What differs between the PostgreSQL majors phsync supports (15, 16,
 *		17 and 18), in one place: the code calls the names below, never
 *		#if PG_VERSION_NUM itself.
 *
 * Include after postgres.h (phsync.h does).
 *
 *-------------------------------------------------------------------------
 */
#ifndef PHSYNC_COMPAT_H
#define PHSYNC_COMPAT_H

#include "utils/guc.h"

#if PG_VERSION_NUM < 150000 || PG_VERSION_NUM >= 190000
#error "phsync supports PostgreSQL 15, 16, 17 and 18"
#endif

/*
 * A function that does not return: 18 spells it pg_noreturn, before the
 * declaration (C11's _Noreturn); before 18, pg_attribute_noreturn() is
 * GCC's attribute, which may stand there too.
 */
#ifndef pg_noreturn
#define pg_noreturn pg_attribute_noreturn()
#endif

/*
 * Memory of a GUC check hook's *newval and *extra.  From 16 on PostgreSQL
 * owns them and frees them with guc_free() (pfree in its own context):
 * what a hook puts there must come from guc_malloc(); before 16 they are
 * malloc'd and freed with free().  Both report an error at elevel and
 * return NULL when out of memory.
 */
#if PG_VERSION_NUM >= 160000
#define phsync_guc_malloc(size) guc_malloc(LOG, (size))
#define phsync_guc_free(p) guc_free(p)
#else
#define phsync_guc_malloc(size) malloc(size)
#define phsync_guc_free(p) free(p)
#endif

/* USAGE on a foreign server: object_aclcheck() from 16 on */
#if PG_VERSION_NUM >= 160000
#define phsync_server_aclcheck(serverid, roleid, mode) \
	object_aclcheck(ForeignServerRelationId, (serverid), (roleid), (mode))
#else
#define phsync_server_aclcheck(serverid, roleid, mode) \
	pg_foreign_server_aclcheck((serverid), (roleid), (mode))
#endif

/* a qualified name; 16 added a soft-error context (NULL: raise) */
#if PG_VERSION_NUM >= 160000
#define phsync_qualified_name_list(s) stringToQualifiedNameList((s), NULL)
#else
#define phsync_qualified_name_list(s) stringToQualifiedNameList(s)
#endif

/* index entries of a new row (no ON CONFLICT): 16 added onlySummarizing */
#if PG_VERSION_NUM >= 160000
#define phsync_insert_index_tuples(rri, slot, estate) \
	ExecInsertIndexTuples((rri), (slot), (estate), false, false, NULL, NIL, false)
#else
#define phsync_insert_index_tuples(rri, slot, estate) \
	ExecInsertIndexTuples((rri), (slot), (estate), false, false, NULL, NIL)
#endif

/* is this process a background worker?  17 made it a function */
#if PG_VERSION_NUM >= 170000
#define phsync_am_background_worker() AmBackgroundWorkerProcess()
#else
#define phsync_am_background_worker() IsBackgroundWorker
#endif

/*
 * A setting's record (its source file, say), by name; NULL when there is
 * none.  find_option() is exported from 16 on; 15 has the array only.
 * For the files that include utils/guc_tables.h before phsync.h (its names
 * would clash elsewhere).
 */
#ifdef GUC_TABLES_H
#if PG_VERSION_NUM >= 160000
#define phsync_find_setting(name) find_option((name), false, true, ERROR)
#else
static inline struct config_generic *
phsync_find_setting(const char *name)
{
	struct config_generic **vars = get_guc_variables();
	int			n = GetNumConfigOptions();

	for (int i = 0; i < n; i++)
		if (pg_strcasecmp(vars[i]->name, name) == 0)
			return vars[i];
	return NULL;
}
#endif
#endif							/* GUC_TABLES_H */

#endif							/* PHSYNC_COMPAT_H */
