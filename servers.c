/*-------------------------------------------------------------------------
 *
 * servers.c
 *		Where a PostHog project is and how phsync may talk to it: the
 *		phsync.* settings (the default sync), or a foreign server of the
 *		phsync foreign-data wrapper with a user mapping, as postgres_fdw
 *		keeps its connections:
 *
 *		CREATE SERVER posthog_eu FOREIGN DATA WRAPPER phsync
 *			OPTIONS (host 'https://eu.posthog.com', project_id '12345');
 *		CREATE USER MAPPING FOR alice SERVER posthog_eu
 *			OPTIONS (api_key 'phx_...');
 *
 * A server holds what everyone may see (pg_foreign_server is readable by
 * every role): the host, the project, the CA file, a proxy without a
 * password, and the limits of the PostHog organization behind it (page
 * size, request budget, requests at once).  The key is only ever in a
 * user mapping, whose options PostgreSQL shows only to that user, the
 * server's owner and superusers; a proxy with a password goes there too.
 * The CA file and the proxy are chosen by superusers only: the database
 * server reads the one and connects to the other.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/reloptions.h"
#include "catalog/pg_foreign_data_wrapper.h"
#include "catalog/pg_foreign_server.h"
#include "catalog/pg_foreign_table.h"
#include "catalog/pg_user_mapping.h"
#include "commands/defrem.h"
#include "foreign/foreign.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/syscache.h"

#include "phsync.h"

/* an option: where it may be given */
typedef struct ServerOption
{
	const char *name;
	bool		on_server;
	bool		on_mapping;
	int			min;			/* integer options: range; else min > max */
	int			max;
	int			unit;			/* GUC_UNIT_* for parse_int(), or 0 */
} ServerOption;

static const ServerOption server_options[] = {
	{"host", true, false, 1, 0, 0},
	{"project_id", true, false, 1, 0, 0},
	{"ca_file", true, false, 1, 0, 0},
	{"proxy", true, true, 1, 0, 0},
	{"api_key", false, true, 1, 0, 0},
	{"page_size", true, false, 1, 50000, 0},
	{"max_requests_per_minute", true, false, 0, 1000000, 0},
	{"max_requests_per_hour", true, false, 0, 100000000, 0},
	{"max_concurrent_requests", true, false, 1, 16, 0},
	{"request_timeout", true, false, 100, INT_MAX, GUC_UNIT_MS},
};

static const ServerOption *
find_option(const char *name)
{
	int			i;

	for (i = 0; i < (int) lengthof(server_options); i++)
		if (strcmp(server_options[i].name, name) == 0)
			return &server_options[i];
	return NULL;
}

static char *
valid_options(bool on_server)
{
	StringInfoData buf;
	int			i;

	initStringInfo(&buf);
	for (i = 0; i < (int) lengthof(server_options); i++)
		if (on_server ? server_options[i].on_server : server_options[i].on_mapping)
			appendStringInfo(&buf, "%s%s", buf.len ? ", " : "", server_options[i].name);
	return buf.data;
}

/*
 * The value of an integer option, or an error in PostgreSQL's words.
 */
static int
option_int(const ServerOption *o, const char *value)
{
	int			result;
	const char *hint = NULL;

	if (!parse_int(value, &result, o->unit, &hint) || result < o->min || result > o->max)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid value for option \"%s\": \"%s\"", o->name, value),
				 hint ? errhint("%s", hint) :
				 errhint("It must be a whole number from %d to %d%s.", o->min, o->max,
						 o->unit == GUC_UNIT_MS ? " milliseconds (units such as s and min are accepted)" : "")));
	return result;
}

/*
 * The phsync foreign-data wrapper's validator: options of a server (host,
 * project, limits) and of a user mapping (the key); none anywhere else.
 */
void
server_validate_options(List *options, Oid catalog)
{
	ListCell   *lc;
	bool		host = false,
				project = false,
				key = false;

	foreach(lc, options)
	{
		DefElem    *def = lfirst(lc);
		const ServerOption *o = find_option(def->defname);
		char	   *value = defGetString(def);
		const char *detail;

		if (catalog == ForeignServerRelationId && o && strcmp(o->name, "api_key") == 0)
			ereport(ERROR,
					(errcode(ERRCODE_FDW_INVALID_OPTION_NAME),
					 errmsg("option \"api_key\" belongs in a user mapping, not on a server"),
					 errdetail("Every role may read a server's options."),
					 errhint("CREATE USER MAPPING FOR <role> SERVER <server> OPTIONS (api_key '...');")));
		if (o == NULL ||
			!((catalog == ForeignServerRelationId && o->on_server) ||
			  (catalog == UserMappingRelationId && o->on_mapping)))
		{
			if (catalog == ForeignServerRelationId || catalog == UserMappingRelationId)
				ereport(ERROR,
						(errcode(ERRCODE_FDW_INVALID_OPTION_NAME),
						 errmsg("invalid option \"%s\"", def->defname),
						 errhint("Valid options in this context are: %s",
								 valid_options(catalog == ForeignServerRelationId))));
			ereport(ERROR,
					(errcode(ERRCODE_FDW_INVALID_OPTION_NAME),
					 errmsg("invalid option \"%s\"", def->defname),
					 errhint("The phsync foreign-data wrapper takes options on servers and user mappings only.")));
		}

		if (strcmp(o->name, "host") == 0)
		{
			if (!settings_host_ok(value, &detail))
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("invalid value for option \"host\": \"%s\"", value),
						 errdetail("%s", detail)));
			host = true;
		}
		else if (strcmp(o->name, "project_id") == 0)
		{
			if (value[0] == '\0' || !settings_project_id_ok(value))
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("invalid value for option \"project_id\": \"%s\"", value),
						 errdetail("A PostHog project ID is a number, as in the project's URL.")));
			project = true;
		}
		else if (strcmp(o->name, "api_key") == 0)
		{
			if (value[0] == '\0')
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("option \"api_key\" must not be empty")));
			key = true;
		}
		else if (strcmp(o->name, "ca_file") == 0)
		{
			/* a file the server reads: as for phsync.ca_file */
			if (!superuser())
				ereport(ERROR,
						(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
						 errmsg("only superusers may set option \"ca_file\""),
						 errdetail("The CA file is read by the database server's own account.")));
		}
		else if (strcmp(o->name, "proxy") == 0)
		{
			/* where the database server connects: as for phsync.proxy */
			if (!superuser())
				ereport(ERROR,
						(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
						 errmsg("only superusers may set option \"proxy\""),
						 errdetail("The database server itself connects to the proxy, which could be any address its network reaches.")));
			if (!settings_proxy_ok(value, &detail))
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("invalid value for option \"proxy\""),
						 errdetail("%s", detail)));
			if (catalog == ForeignServerRelationId && strchr(value, '@') != NULL)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("a proxy with a user or password belongs in a user mapping"),
						 errdetail("Every role may read a server's options.")));
		}
		else if (o->min <= o->max)
			(void) option_int(o, value);
	}

	if (catalog == ForeignServerRelationId && (!host || !project))
		ereport(ERROR,
				(errcode(ERRCODE_FDW_OPTION_NAME_NOT_FOUND),
				 errmsg("a phsync server needs options \"host\" and \"project_id\""),
				 errhint("For example: OPTIONS (host 'https://eu.posthog.com', project_id '12345').")));
	if (catalog == UserMappingRelationId && !key)
		ereport(ERROR,
				(errcode(ERRCODE_FDW_OPTION_NAME_NOT_FOUND),
				 errmsg("a user mapping for a phsync server needs option \"api_key\"")));
}

/* ---------- endpoints ---------- */

/*
 * The phsync.* settings' endpoint, whether or not they are complete (the
 * doctor shows what is missing).
 */
PhsyncEndpoint *
endpoint_from_settings(void)
{
	PhsyncEndpoint *e = palloc0(sizeof(PhsyncEndpoint));

	e->host = pstrdup(phsync_host);
	e->project_id = pstrdup(phsync_project_id ? phsync_project_id : "");
	e->api_key = settings_api_key();
	e->ca_file = pstrdup(phsync_ca_file ? phsync_ca_file : "");
	e->proxy = pstrdup(phsync_proxy ? phsync_proxy : "");
	e->timeout_ms = phsync_request_timeout;
	e->max_response_kb = phsync_max_response_size;
	e->page_size = phsync_page_size;
	e->per_minute = phsync_max_requests_per_minute;
	e->per_hour = phsync_max_requests_per_hour;
	e->concurrency = phsync_max_concurrent_requests;
	e->budget_key = "settings";
	e->host_origin = "phsync.host";
	e->key_origin = "phsync.api_key";
	e->ca_origin = "phsync.ca_file";
	return e;
}

/*
 * The settings' endpoint, complete: raises when the project or the key is
 * not set.
 */
PhsyncEndpoint *
endpoint_settings(void)
{
	if (phsync_project_id == NULL || phsync_project_id[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("phsync.project_id is not set"),
				 errhint("Set phsync.project_id in postgresql.conf and reload the configuration.")));
	if (settings_api_key()[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("phsync.api_key is not set"),
				 errhint("Set it with ALTER SYSTEM SET phsync.api_key = '...' and SELECT pg_reload_conf() (postgresql.auto.conf is readable by the server's user only).")));
	return endpoint_from_settings();
}

/*
 * The phsync server named `name`, or an error that says what is wrong
 * (whose is `what`: "sync x", "phsync_query()").
 */
static ForeignServer *
server_lookup(const char *name, const char *what)
{
	ForeignServer *server = GetForeignServerByName(name, true);
	ForeignDataWrapper *fdw;

	if (server == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("server \"%s\" of %s does not exist", name, what),
				 errhint("Create it with CREATE SERVER %s FOREIGN DATA WRAPPER phsync OPTIONS (host '...', project_id '...').",
						 quote_identifier(name))));
	fdw = GetForeignDataWrapper(server->fdwid);
	if (strcmp(fdw->fdwname, "phsync") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("server \"%s\" is not a phsync server", name),
				 errdetail("Its foreign-data wrapper is %s.", fdw->fdwname)));
	return server;
}

static char *
option_value(List *options, const char *name)
{
	ListCell   *lc;

	foreach(lc, options)
	{
		DefElem    *def = lfirst(lc);

		if (strcmp(def->defname, name) == 0)
			return defGetString(def);
	}
	return NULL;
}

/*
 * Has role a user mapping for the server, its own or PUBLIC's?
 * (GetUserMapping() raises when there is none.)
 */
static bool
has_user_mapping(Oid role, Oid serverid)
{
	HeapTuple	tp;

	tp = SearchSysCache2(USERMAPPINGUSERSERVER, ObjectIdGetDatum(role), ObjectIdGetDatum(serverid));
	if (!HeapTupleIsValid(tp))
		tp = SearchSysCache2(USERMAPPINGUSERSERVER, ObjectIdGetDatum(InvalidOid), ObjectIdGetDatum(serverid));
	if (!HeapTupleIsValid(tp))
		return false;
	ReleaseSysCache(tp);
	return true;
}

/*
 * The endpoint of server `name` for `role`: its options, and the key of
 * the role's user mapping (or PUBLIC's).  The role needs USAGE on the
 * server, as for a foreign table.  Errors never show the key.
 */
PhsyncEndpoint *
endpoint_server(const char *name, Oid role, const char *what)
{
	ForeignServer *server = server_lookup(name, what);
	UserMapping *um = NULL;
	PhsyncEndpoint *e = endpoint_from_settings();
	char	   *rolename = GetUserNameFromId(role, true);
	char	   *v;
	int			i;

	if (phsync_server_aclcheck(server->serverid, role, ACL_USAGE) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("role \"%s\" may not use server \"%s\"", rolename ? rolename : "?", name),
				 errdetail("This is for %s.", what),
				 errhint("GRANT USAGE ON FOREIGN SERVER %s TO %s;", quote_identifier(name),
						 rolename ? quote_identifier(rolename) : "...")));
	if (has_user_mapping(role, server->serverid))
		um = GetUserMapping(role, server->serverid);
	if (um == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("user mapping not found for user \"%s\", server \"%s\"",
						rolename ? rolename : "?", name),
				 errdetail("This is for %s; the key of server %s is in the user mapping of the role that uses it.", what, name),
				 errhint("CREATE USER MAPPING FOR %s SERVER %s OPTIONS (api_key '...');",
						 rolename ? quote_identifier(rolename) : "...", quote_identifier(name))));

	e->host = option_value(server->options, "host");
	e->project_id = option_value(server->options, "project_id");
	if (e->host == NULL || e->project_id == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_FDW_OPTION_NAME_NOT_FOUND),
				 errmsg("server \"%s\" lacks option \"host\" or \"project_id\"", name)));
	e->host = pstrdup(e->host);
	e->project_id = pstrdup(e->project_id);
	v = option_value(um->options, "api_key");
	e->api_key = v ? pstrdup(v) : "";
	v = option_value(server->options, "ca_file");
	e->ca_file = pstrdup(v ? v : "");
	v = option_value(um->options, "proxy");
	if (v == NULL)
		v = option_value(server->options, "proxy");
	e->proxy = pstrdup(v ? v : "");
	for (i = 0; i < (int) lengthof(server_options); i++)
	{
		const ServerOption *o = &server_options[i];

		if (o->min > o->max || (v = option_value(server->options, o->name)) == NULL)
			continue;
		if (strcmp(o->name, "page_size") == 0)
			e->page_size = option_int(o, v);
		else if (strcmp(o->name, "max_requests_per_minute") == 0)
			e->per_minute = option_int(o, v);
		else if (strcmp(o->name, "max_requests_per_hour") == 0)
			e->per_hour = option_int(o, v);
		else if (strcmp(o->name, "max_concurrent_requests") == 0)
			e->concurrency = option_int(o, v);
		else if (strcmp(o->name, "request_timeout") == 0)
			e->timeout_ms = option_int(o, v);
	}
	e->budget_key = psprintf("server %s", name);
	e->host_origin = psprintf("the host option of server %s", name);
	e->key_origin = psprintf("the api_key of the user mapping for %s on server %s",
							 rolename ? rolename : "?", name);
	e->ca_origin = psprintf("the ca_file option of server %s", name);
	return e;
}
