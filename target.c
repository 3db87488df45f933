/*-------------------------------------------------------------------------
 *
 * target.c
 *		What makes a table an acceptable target, in one place: the worker
 *		before a run, phsync_add_sync() and phsync_alter_sync() before they
 *		store a definition, and phsync_doctor() all ask target_examine().
 *		Also creating a preset's table, and reading a target's watermark.
 *
 * A target is acceptable when it is an ordinary or partitioned table,
 * neither temporary nor a system or phsync table; the role that writes
 * into it (see below) may SELECT and INSERT (and UPDATE, for conflict =>
 * 'update'), which is checked before every run, not only when the sync is
 * added;
 * its cursor column exists and is a timestamptz, timestamp or date; it has
 * a primary key or a usable unique index (valid, immediate, not partial,
 * on plain columns that are not generated); and it has every column of
 * its preset.
 *
 * Who writes: a sync acts on its target as its owner, the role that added
 * it, so the target's triggers, defaults and policies run with that role's
 * rights and its privileges and row-level security apply.  One exception:
 * a superuser's sync into a table that another role owns acts as that
 * table's owner, as autovacuum and REFRESH MATERIALIZED VIEW do: code the
 * table's owner controls never runs as a superuser.  Every partition of a
 * partitioned target, at any depth, must belong to the table's owner too:
 * the rows are routed into partitions with the writer's rights, so another
 * role's trigger on one of them would run with rights that role lacks.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/relation.h"
#include "catalog/catalog.h"
#include "catalog/namespace.h"
#include "catalog/pg_inherits.h"
#include "catalog/pg_class.h"
#include "catalog/pg_index.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "storage/lmgr.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/reltrigger.h"
#include "utils/regproc.h"
#include "utils/syscache.h"

#include "phsync.h"

/*
 * A target name as phsync reads it: schema-qualified, or in public, so
 * that the worker, the doctor and the status view, which run with other
 * search paths, find the same table.
 */
RangeVar *
target_rangevar(const char *name)
{
	RangeVar   *rv = makeRangeVarFromNameList(phsync_qualified_name_list(name));

	if (rv->schemaname == NULL)
		rv->schemaname = "public";
	return rv;
}

static void
problem(PhsyncProblem *p, int sqlerrcode, const char *message, const char *detail,
		const char *hint)
{
	p->sqlerrcode = sqlerrcode;
	p->message = message;
	p->detail = detail;
	p->hint = hint;
}

/*
 * Raise a problem target_examine() found.
 */
void
target_raise(const PhsyncProblem *p)
{
	ereport(ERROR,
			(errcode(p->sqlerrcode),
			 errmsg_internal("%s", p->message),
			 p->detail ? errdetail_internal("%s", p->detail) : 0,
			 p->hint ? errhint("%s", p->hint) : 0));
	pg_unreachable();
}

/*
 * The unique key phsync relies on: the primary key, else the first valid,
 * immediate, non-partial unique index on plain columns.  Returns the
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

/*
 * Does an index of rel start with column attnum?
 */
static bool
has_index_on(Relation rel, AttrNumber attnum)
{
	List	   *indexes = RelationGetIndexList(rel);
	ListCell   *lc;
	bool		found = false;

	foreach(lc, indexes)
	{
		HeapTuple	tup = SearchSysCache1(INDEXRELID, ObjectIdGetDatum(lfirst_oid(lc)));

		if (!HeapTupleIsValid(tup))
			continue;
		if (((Form_pg_index) GETSTRUCT(tup))->indnkeyatts > 0 &&
			((Form_pg_index) GETSTRUCT(tup))->indkey.values[0] == attnum)
			found = true;
		ReleaseSysCache(tup);
	}
	list_free(indexes);
	return found;
}

/*
 * The index in target->cols of the column of that name, -1 if none.
 */
int
target_column(PhsyncTarget *target, const char *name)
{
	int			i;

	for (i = 0; i < target->ncols; i++)
		if (strcmp(target->cols[i].name, name) == 0)
			return i;
	return -1;
}

static void
column_info(PhsyncColumn *col, Form_pg_attribute att)
{
	col->name = pstrdup(NameStr(att->attname));
	col->attnum = att->attnum;
	col->typid = att->atttypid;
	col->typmod = att->atttypmod;
	getTypeInputInfo(col->typid, &col->typinput, &col->typioparam);
	get_typlenbyval(col->typid, &col->typlen, &col->typbyval);
}

/*
 * The role a sync owned by `owner` acts as on rel (see the top of this
 * file).
 */
static Oid
target_writer(Oid owner, Relation rel)
{
	Oid			relowner = rel->rd_rel->relowner;

	if (owner != relowner && superuser_arg(owner))
		return relowner;
	return owner;
}

/*
 * A partition of rel (at any depth) that does not belong to rel's owner,
 * or InvalidOid.  Locks every partition (AccessShareLock), as the insert
 * would.
 */
static Oid
foreign_partition(Relation rel, Oid *owner)
{
	List	   *parts;
	ListCell   *lc;
	Oid			found = InvalidOid;

	if (rel->rd_rel->relkind != RELKIND_PARTITIONED_TABLE)
		return InvalidOid;
	parts = find_all_inheritors(RelationGetRelid(rel), AccessShareLock, NULL);
	foreach(lc, parts)
	{
		HeapTuple	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(lfirst_oid(lc)));

		if (!HeapTupleIsValid(tup))
			continue;			/* dropped meanwhile */
		*owner = ((Form_pg_class) GETSTRUCT(tup))->relowner;
		ReleaseSysCache(tup);
		if (*owner != rel->rd_rel->relowner)
		{
			found = lfirst_oid(lc);
			break;
		}
	}
	list_free(parts);
	return found;
}

/*
 * A trigger on rel or one of its partitions whose function belongs to
 * neither rel's owner nor a superuser: its owner could change what the
 * function does, and the sync runs it with the rights of rel's owner.
 * Fills in the problem and returns true when there is one.
 */
static bool
foreign_trigger(Relation rel, PhsyncProblem *p)
{
	List	   *rels = rel->rd_rel->relkind == RELKIND_PARTITIONED_TABLE ?
		find_all_inheritors(RelationGetRelid(rel), AccessShareLock, NULL) :
		list_make1_oid(RelationGetRelid(rel));
	Oid			relowner = rel->rd_rel->relowner;
	ListCell   *lc;
	bool		found = false;

	foreach(lc, rels)
	{
		Relation	r = try_relation_open(lfirst_oid(lc), AccessShareLock);

		if (r == NULL)
			continue;			/* dropped meanwhile */
		for (int i = 0; !found && r->trigdesc && i < r->trigdesc->numtriggers; i++)
		{
			Trigger    *t = &r->trigdesc->triggers[i];
			HeapTuple	tup;
			Oid			fowner;

			if (t->tgisinternal)
				continue;
			tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(t->tgfoid));
			if (!HeapTupleIsValid(tup))
				continue;
			fowner = ((Form_pg_proc) GETSTRUCT(tup))->proowner;
			ReleaseSysCache(tup);
			if (fowner == relowner || superuser_arg(fowner))
				continue;
			problem(p, ERRCODE_INSUFFICIENT_PRIVILEGE,
					psprintf("trigger \"%s\" on table %s runs function %s of role \"%s\", not of the table's owner \"%s\"",
							 t->tgname,
							 quote_qualified_identifier(get_namespace_name(RelationGetNamespace(r)),
														RelationGetRelationName(r)),
							 format_procedure_qualified(t->tgfoid),
							 GetUserNameFromId(fowner, false), GetUserNameFromId(relowner, false)),
					psprintf("A sync writes into the table with the rights of its owner; role \"%s\" could change what the function does.",
							 GetUserNameFromId(fowner, false)),
					psprintf("ALTER FUNCTION %s OWNER TO %s;", format_procedure_qualified(t->tgfoid),
							 quote_identifier(GetUserNameFromId(relowner, false))));
			found = true;
		}
		relation_close(r, NoLock);
		if (found)
			break;
	}
	list_free(rels);
	return found;
}

/*
 * The privileges a writer lacks on the table ("SELECT and INSERT"), or
 * NULL when it has them all.  Each is asked on its own: all must be held.
 */
static char *
missing_privileges(Oid relid, Oid writer, bool update)
{
	bool		ok = pg_class_aclcheck(relid, writer, ACL_SELECT) == ACLCHECK_OK &&
		pg_class_aclcheck(relid, writer, ACL_INSERT) == ACLCHECK_OK &&
		(!update || pg_class_aclcheck(relid, writer, ACL_UPDATE) == ACLCHECK_OK);

	if (ok)
		return NULL;
	return update ? "SELECT, INSERT and UPDATE" : "SELECT and INSERT";
}

/*
 * Check the table spec names against the rules at the top of this file
 * and describe it.  Returns NULL with *p filled in when it is not
 * acceptable (ERRCODE_UNDEFINED_TABLE: it does not exist).  The result is
 * allocated in the current memory context; SPI need not be connected.
 */
PhsyncTarget *
target_examine(const PhsyncTargetSpec *spec, PhsyncProblem *p)
{
	RangeVar   *rv;
	Oid			relid;
	Relation	rel;
	TupleDesc	desc;
	PhsyncTarget *target;
	AttrNumber *keyatts = NULL;
	const PresetInfo *preset = preset_info(spec->preset);
	char	   *nspname;
	char	   *lacking;
	Oid			part;
	Oid			part_owner = InvalidOid;
	int			nkeys;
	int			i;
	StringInfoData missing;

	memset(p, 0, sizeof(*p));
	rv = target_rangevar(spec->name);
	relid = RangeVarGetRelid(rv, AccessShareLock, true);
	if (!OidIsValid(relid))
	{
		problem(p, ERRCODE_UNDEFINED_TABLE,
				psprintf("target table %s does not exist", spec->name), NULL,
				spec->suggest_preset ?
				psprintf("Create it first, with a primary key or unique constraint, for example: SELECT phsync_create_table(%s, %s).",
						 quote_literal_cstr(spec->suggest_preset), quote_literal_cstr(spec->name)) :
				"Create it first, with a primary key or unique constraint.");
		return NULL;
	}

	rel = relation_open(relid, NoLock);
	nspname = get_namespace_name(RelationGetNamespace(rel));
	target = palloc0(sizeof(PhsyncTarget));
	target->relid = relid;
	target->display = quote_qualified_identifier(nspname, RelationGetRelationName(rel));

	if (rel->rd_rel->relkind != RELKIND_RELATION &&
		rel->rd_rel->relkind != RELKIND_PARTITIONED_TABLE)
		problem(p, ERRCODE_WRONG_OBJECT_TYPE,
				psprintf("target %s is not a table", target->display), NULL, NULL);
	else if (rel->rd_rel->relpersistence == RELPERSISTENCE_TEMP)
		problem(p, ERRCODE_WRONG_OBJECT_TYPE,
				psprintf("target %s is a temporary table", target->display),
				"The worker runs in a session of its own, which cannot see another session's temporary tables.",
				NULL);
	else if (IsCatalogNamespace(RelationGetNamespace(rel)) ||
			 strcmp(nspname, "information_schema") == 0 ||
			 strcmp(nspname, "phsync") == 0)
		problem(p, ERRCODE_INSUFFICIENT_PRIVILEGE,
				psprintf("target %s is a system or phsync table", target->display), NULL, NULL);
	else if (OidIsValid(spec->owner) &&
			 (lacking = missing_privileges(relid, target_writer(spec->owner, rel), spec->update)) != NULL)
		problem(p, ERRCODE_INSUFFICIENT_PRIVILEGE,
				psprintf("permission denied for table %s", target->display),
				psprintf("The sync writes into it as %s, who needs %s on it.",
						 GetUserNameFromId(target_writer(spec->owner, rel), false), lacking),
				NULL);
	else if (OidIsValid(part = foreign_partition(rel, &part_owner)))
		problem(p, ERRCODE_INSUFFICIENT_PRIVILEGE,
				psprintf("partition %s of table %s belongs to role \"%s\", not to the table's owner \"%s\"",
						 quote_qualified_identifier(get_namespace_name(get_rel_namespace(part)), get_rel_name(part)),
						 target->display, GetUserNameFromId(part_owner, false),
						 GetUserNameFromId(rel->rd_rel->relowner, false)),
				"A sync writes into every partition with one role's rights; code that another role controls on a partition (a trigger, a default) would run with them.",
				psprintf("ALTER TABLE %s OWNER TO %s;",
						 quote_qualified_identifier(get_namespace_name(get_rel_namespace(part)), get_rel_name(part)),
						 quote_identifier(GetUserNameFromId(rel->rd_rel->relowner, false))));
	else
		(void) foreign_trigger(rel, p);
	if (p->message)
	{
		relation_close(rel, NoLock);
		return NULL;
	}

	desc = RelationGetDescr(rel);
	target->cols = palloc0(sizeof(PhsyncColumn) * Max(desc->natts, 1));
	for (i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);

		if (!att->attisdropped && !att->attgenerated)
			column_info(&target->cols[target->ncols++], att);
	}

	target->cursor = spec->cursor ? target_column(target, spec->cursor) : -1;
	nkeys = find_unique_key(rel, &keyatts);
	if (spec->cursor == NULL)
	{
		/* a preset without a cursor: every run reads all, by key */
		if (nkeys == 0)
			problem(p, ERRCODE_INVALID_TABLE_DEFINITION,
					psprintf("target table %s has no primary key or unique constraint", target->display),
					"phsync skips or updates rows it already has with ON CONFLICT, which needs a unique key.",
					psprintf("phsync_create_table(%s, ...) creates a table with the preset's key.",
							 quote_literal_cstr(preset ? preset->name : "")));
	}
	else if (target->cursor < 0)
		problem(p, ERRCODE_UNDEFINED_COLUMN,
				psprintf("cursor column \"%s\" does not exist in table %s", spec->cursor, target->display),
				psprintf("The cursor column is named by %s.", spec->cursor_origin),
				"The cursor is the timestamp or date column whose max() is the watermark, for example created_at.");
	else if (target->cols[target->cursor].typid != TIMESTAMPTZOID &&
			 target->cols[target->cursor].typid != TIMESTAMPOID &&
			 target->cols[target->cursor].typid != DATEOID)
		problem(p, ERRCODE_DATATYPE_MISMATCH,
				psprintf("cursor column \"%s\" of table %s must be of type timestamptz, timestamp or date, not %s",
						 spec->cursor, target->display,
						 format_type_be(target->cols[target->cursor].typid)),
				psprintf("The cursor column is named by %s.", spec->cursor_origin), NULL);
	else if (nkeys == 0)
		problem(p, ERRCODE_INVALID_TABLE_DEFINITION,
				psprintf("target table %s has no primary key or unique constraint", target->display),
				"phsync skips or updates rows it already has with ON CONFLICT, which needs a unique key.",
				psprintf("Add one on the columns that identify a row, for example: ALTER TABLE %s ADD PRIMARY KEY (%s);",
						 target->display, preset ? quote_identifier(preset->key[0]) : "uuid"));
	if (p->message)
	{
		relation_close(rel, NoLock);
		return NULL;
	}

	target->keys = palloc(sizeof(int) * nkeys);
	target->uniq = palloc(sizeof(int) * nkeys);
	target->nuniq = nkeys;
	for (i = 0; i < nkeys; i++)
	{
		int			c;

		for (c = 0; c < target->ncols; c++)
			if (target->cols[c].attnum == keyatts[i])
				break;
		if (c == target->ncols)
		{
			problem(p, ERRCODE_INVALID_TABLE_DEFINITION,
					psprintf("the unique key of table %s includes a generated column", target->display),
					"phsync inserts the key columns, and generated columns cannot be inserted.", NULL);
			relation_close(rel, NoLock);
			return NULL;
		}
		target->uniq[i] = c;
		if (c != target->cursor)
			target->keys[target->nkeys++] = c;
	}

	initStringInfo(&missing);
	for (i = 0; preset && preset->columns[i].name; i++)
		if (target_column(target, preset->columns[i].name) < 0)
			appendStringInfo(&missing, "%s%s", missing.len ? ", " : "",
							 quote_identifier(preset->columns[i].name));
	if (missing.len > 0)
	{
		problem(p, ERRCODE_UNDEFINED_COLUMN,
				psprintf("table %s lacks column(s) %s of the %s preset",
						 target->display, missing.data, preset->name), NULL,
				psprintf("phsync_create_table(%s, ...) creates a table with every column of the preset.",
						 quote_literal_cstr(preset->name)));
		relation_close(rel, NoLock);
		return NULL;
	}

	target->cursor_indexed = target->cursor < 0 ||
		has_index_on(rel, target->cols[target->cursor].attnum);
	target->writer = OidIsValid(spec->owner) ? target_writer(spec->owner, rel) : InvalidOid;
	relation_close(rel, NoLock);
	return target;
}

/*
 * Create a target table for a preset, with its key and an index on its
 * cursor column (and on `cursor`, when another column is the sync's), as
 * the current user, who owns it.  Needs SPI connected.
 */
void
target_create(PhsyncPreset preset, const char *name, const char *cursor, List *properties)
{
	const PresetInfo *p = preset_info(preset);
	RangeVar   *rv = target_rangevar(name);
	char	   *qualified = quote_qualified_identifier(rv->schemaname, rv->relname);
	List	   *statements;
	ListCell   *lc;

	Assert(phsync_spi_connected());
	if (p == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("a table for a custom query cannot be created from a preset")));
	statements = preset_create_statements(p, qualified, properties);
	if (cursor && (p->cursor == NULL || strcmp(cursor, p->cursor) != 0))
		statements = lappend(statements,
							 psprintf("CREATE INDEX ON %s (%s)", qualified, quote_identifier(cursor)));
	foreach(lc, statements)
	{
		if (phsync_spi_exec(lfirst(lc), 0, NULL, NULL, NULL, false, 0) != SPI_OK_UTILITY)
			elog(ERROR, "could not create table %s", qualified);
	}
	CommandCounterIncrement();
}

/*
 * After a whole re-read: the target's rows whose key is not among `keys`
 * (a text[] per unique key column, in target->uniq's order) are gone from
 * PostHog.  Flag them (deleted = true) or delete them; returns how many.
 * With from and to, only rows whose cursor is in [*from, *to) (the range
 * that was read); with count_only, they are counted, not changed (and the
 * total of rows in that range or table goes to *total).  As the role the
 * sync acts as, under SECURITY_RESTRICTED_OPERATION (the target's triggers
 * run).  Needs SPI connected, in a transaction.
 */
int64
target_absent(PhsyncTarget *target, PhsyncAbsent mode, Datum *keys,
			  const TimestampTz *from, const TimestampTz *to, bool count_only,
			  int64 *total)
{
	StringInfoData sql;
	StringInfoData match;
	StringInfoData names;
	StringInfoData range;
	Oid		   *types = palloc(sizeof(Oid) * (target->nuniq + 2));
	Datum	   *values = palloc(sizeof(Datum) * (target->nuniq + 2));
	int			nargs = target->nuniq;
	PhsyncAsRole save;
	int			ret;
	int			j;

	if (mode == PHSYNC_ABSENT_KEEP)
		return 0;
	initStringInfo(&match);
	initStringInfo(&names);
	initStringInfo(&range);
	for (j = 0; j < target->nuniq; j++)
	{
		PhsyncColumn *col = &target->cols[target->uniq[j]];

		types[j] = TEXTARRAYOID;
		values[j] = keys[j];
		appendStringInfo(&names, "%sk%d", j ? ", " : "", j);
		appendStringInfo(&match, "%st.%s OPERATOR(pg_catalog.=) CAST(u.k%d AS %s)",
						 j ? " AND " : "", quote_identifier(col->name), j,
						 format_type_be(col->typid));
	}
	if (from)
	{
		const char *c = quote_identifier(target->cols[target->cursor].name);

		Assert(target->cursor >= 0 && to);
		types[nargs] = TIMESTAMPTZOID;
		values[nargs] = TimestampTzGetDatum(*from);
		types[nargs + 1] = TIMESTAMPTZOID;
		values[nargs + 1] = TimestampTzGetDatum(*to);
		appendStringInfo(&range, " AND t.%s OPERATOR(pg_catalog.>=) $%d AND t.%s OPERATOR(pg_catalog.<) $%d",
						 c, nargs + 1, c, nargs + 2);
		nargs += 2;
	}
	initStringInfo(&sql);
	if (count_only)
		appendStringInfo(&sql, "SELECT pg_catalog.count(*) FILTER (WHERE NOT EXISTS (SELECT FROM ROWS FROM (");
	else if (mode == PHSYNC_ABSENT_FLAG)
		appendStringInfo(&sql, "UPDATE %s AS t SET deleted = true WHERE t.deleted IS NOT TRUE AND NOT EXISTS (SELECT FROM ROWS FROM (",
						 target->display);
	else
		appendStringInfo(&sql, "DELETE FROM %s AS t WHERE NOT EXISTS (SELECT FROM ROWS FROM (", target->display);
	for (j = 0; j < target->nuniq; j++)
		appendStringInfo(&sql, "%spg_catalog.unnest($%d)", j ? ", " : "", j + 1);
	appendStringInfo(&sql, ") AS u(%s) WHERE %s)", names.data, match.data);
	if (count_only)
		appendStringInfo(&sql, "), pg_catalog.count(*) FROM %s AS t WHERE true%s", target->display, range.data);
	else
		appendStringInfoString(&sql, range.data);

	Assert(phsync_spi_connected());
	as_role_begin(target->writer, true, &save);
	ret = phsync_spi_exec(sql.data, nargs, types, values, NULL, count_only, 0);
	as_role_end(&save);
	if (count_only)
	{
		bool		isnull;

		if (ret != SPI_OK_SELECT || SPI_processed != 1)
			elog(ERROR, "could not count rows gone from PostHog in %s", target->display);
		*total = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
		return DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	}
	if (ret != SPI_OK_UPDATE && ret != SPI_OK_DELETE)
		elog(ERROR, "could not mark rows gone from PostHog in %s: %s", target->display,
			 SPI_result_code_string(ret));
	return (int64) SPI_processed;
}

/*
 * Mirror PostHog's deletions: delete the rows of [*from, *to) (or the
 * whole table, when from is NULL) whose key is not among `keys`, the keys
 * of a complete read of that range, unless they are more than
 * phsync.max_delete_fraction of the rows there (or of `scope` rows, when
 * it is not negative: the verified bucket a repaired range is part of):
 * then nothing is deleted, a WARNING says so, and -1 is returned.  `what`
 * names the range for it.
 */
int64
target_mirror_deletions(PhsyncTarget *target, Datum *keys, const TimestampTz *from,
						const TimestampTz *to, int64 scope, int64 run_id, const char *what)
{
	int64		total;
	int64		gone = target_absent(target, PHSYNC_ABSENT_DELETE, keys, from, to, true, &total);

	if (gone == 0)
		return 0;
	if (scope >= 0)
		total = scope;
	if ((double) gone > phsync_max_delete_fraction * (double) total)
	{
		ereport(WARNING,
				(errmsg("phsync run %lld: not deleting the %lld rows of %s %s that PostHog no longer has",
						(long long) run_id, (long long) gone, target->display, what),
				 errdetail("They are more than phsync.max_delete_fraction (%g) of the %lld rows %s.",
						   phsync_max_delete_fraction, (long long) total,
						   scope >= 0 ? "of the verified bucket" : "there"),
				 errhint("If PostHog did delete them, raise phsync.max_delete_fraction for one run and repair again.")));
		return -1;
	}
	return target_absent(target, PHSYNC_ABSENT_DELETE, keys, from, to, false, NULL);
}

/*
 * max(cursor)::timestamptz of a table, with SPI connected; with bounds,
 * only among rows whose cursor is in [*from, *to).  False when there is no
 * such row.
 */
static bool
relation_watermark(Oid relid, const char *cursor, TimestampTz *from,
				   TimestampTz *to, TimestampTz *watermark)
{
	bool		isnull = true;
	const char *col = quote_identifier(cursor);
	Oid			types[2] = {TIMESTAMPTZOID, TIMESTAMPTZOID};
	Datum		values[2] = {from ? TimestampTzGetDatum(*from) : 0, to ? TimestampTzGetDatum(*to) : 0};
	char	   *relname;
	char	   *nspname;
	char	   *sql;

	/* the target may have been dropped since the run examined it */
	LockRelationOid(relid, AccessShareLock);
	relname = get_rel_name(relid);
	nspname = relname ? get_namespace_name(get_rel_namespace(relid)) : NULL;
	if (relname == NULL || nspname == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("the target table of the run was dropped while it ran")));
	sql = psprintf("SELECT pg_catalog.max(%s)::pg_catalog.timestamptz FROM %s%s",
				   col, quote_qualified_identifier(nspname, relname),
				   from ? psprintf(" WHERE %s OPERATOR(pg_catalog.>=) $1 AND %s OPERATOR(pg_catalog.<) $2",
								   col, col) : "");

	Assert(phsync_spi_connected());
	if (phsync_spi_exec(sql, from ? 2 : 0, types, values, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read the watermark of %s", relname);
	if (SPI_processed == 1)
		*watermark = DatumGetTimestampTz(SPI_getbinval(SPI_tuptable->vals[0],
													   SPI_tuptable->tupdesc, 1,
													   &isnull));
	return !isnull;
}

/*
 * max(cursor) of the target, the watermark (within [*from, *to) when
 * given), read as the role the sync acts as (under
 * SECURITY_RESTRICTED_OPERATION: the table's policies may call code).
 * False when there is no row.
 */
bool
target_watermark(PhsyncTarget *target, TimestampTz *from, TimestampTz *to,
				 TimestampTz *watermark)
{
	PhsyncAsRole save;
	bool		found;

	Assert(OidIsValid(target->writer));
	if (target->cursor < 0)
		return false;			/* no cursor, no watermark */
	as_role_begin(target->writer, true, &save);
	found = relation_watermark(target->relid, target->cols[target->cursor].name,
							   from, to, watermark);
	as_role_end(&save);
	return found;
}
