/*-------------------------------------------------------------------------
 *
 * doctor.c
 *		phsync_doctor(): the checks a person makes when phsync does not
 *		work, in the order they would make them, one row each.
 *
 * settings, worker, dns, tcp, tls, auth, then per sync: server (a sync
 * on a foreign server: its host and its owner's key), target, query.
 * Every network
 * step has a short timeout, so the doctor never hangs; a step that cannot
 * be made because an earlier one failed says so.  Details start with the
 * category users see elsewhere (auth, network, timeout, permission).  The
 * API key is never shown.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <curl/curl.h>
#include <netdb.h>
#include <sys/socket.h>

#include "commands/dbcommands.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "catalog/pg_authid.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "phsync.h"

/* limit for each network check */
#define DOCTOR_TIMEOUT_MS 5000L

typedef struct Doctor
{
	DoctorRow	emit;
	void	   *arg;
	bool		reachable;		/* host resolves and accepts connections */
	bool		configured;		/* project and key set */
	PhsyncEndpoint *endpoint;	/* the settings' connection, once configured */
} Doctor;

static void
row(Doctor *d, const char *item, const char *status, const char *detail,
	const char *hint)
{
	d->emit(d->arg, item, status, detail, hint);
}

/*
 * host and port of phsync.host, for DNS and TCP.
 */
static void
split_host(char **host, int *port, bool *https)
{
	const char *s = phsync_host;
	const char *p;
	size_t		len;

	*https = strncmp(s, "https://", 8) == 0;
	s += *https ? 8 : 7;
	if (*s == '[')
	{
		len = strcspn(s + 1, "]");
		*host = pnstrdup(s + 1, len);
		p = s + 1 + len + 1;
	}
	else
	{
		len = strcspn(s, ":/");
		*host = pnstrdup(s, len);
		p = s + len;
	}
	*port = (*p == ':') ? atoi(p + 1) : (*https ? 443 : 80);
}

static const char *
curl_category(int rc)
{
	return rc == CURLE_OPERATION_TIMEDOUT ? "timeout" : "network";
}

static void
check_settings(Doctor *d)
{
	const char *missing = NULL;

	if (phsync_project_id[0] == '\0')
		missing = "phsync.project_id";
	else if (settings_api_key()[0] == '\0')
		missing = "phsync.api_key";
	d->configured = (missing == NULL);
	d->endpoint = endpoint_from_settings();
	if (missing)
		row(d, "settings", "error", psprintf("%s is not set", missing),
			strcmp(missing, "phsync.api_key") == 0 ?
			"Set it with ALTER SYSTEM SET phsync.api_key = '...' and SELECT pg_reload_conf() (postgresql.auto.conf is readable by the server's user only)." :
			psprintf("Set %s in postgresql.conf and reload the configuration.", missing));
	else
	{
		int			mode;
		const char *file = settings_api_key_exposed(&mode);

		/* the file's name only to those who may read pg_settings.sourcefile */
		if (file)
			row(d, "settings", "warning",
				has_privs_of_role(GetUserId(), ROLE_PG_READ_ALL_SETTINGS) ?
				psprintf("phsync.api_key is set in a file other users can read (\"%s\", mode %04o)", file, mode) :
				"phsync.api_key is set in a file other users can read",
				"Set the key with ALTER SYSTEM SET phsync.api_key (postgresql.auto.conf is readable by the server's user only) and remove it from that file, or make the file unreadable to others (chmod o-r).");
	}
	if (!missing)
		row(d, "settings", "ok",
			psprintf("host %s, project %s, target %s, cursor %s%s%s",
					 phsync_host, phsync_project_id, phsync_target_table,
					 phsync_cursor_column,
					 phsync_query_file[0] ? ", query file " : "",
					 phsync_query_file),
			NULL);
}

static void
check_worker(Doctor *d)
{
	PhsyncWorkerState w;
	char		problem[PHSYNC_MAX_MESSAGE];
	char		fix[PHSYNC_MAX_MESSAGE];
	char	   *dbname;

	if (!shmem_available())
	{
		row(d, "worker", "error", "phsync is not loaded through shared_preload_libraries",
			"Add phsync to shared_preload_libraries in postgresql.conf and restart the server.");
		return;
	}
	shmem_worker_state(&w);
	dbname = get_database_name(MyDatabaseId);
	if (dbname && strcmp(dbname, phsync_database) != 0)
		row(d, "worker", "warning",
			psprintf("phsync runs in database \"%s\", not in this one: the syncs here do not run",
					 phsync_database),
			"This suits a restored copy. To make phsync run here instead, set phsync.database and restart the server.");
	else if (w.pid == 0)
		row(d, "worker", "error", "the phsync worker is not running",
			"The server log says why; it restarts within seconds after a crash.");
	else if (shmem_role_problem(problem, fix))
		row(d, "worker", "error", psprintf("%s; the worker runs no sync until it has them", problem),
			pstrdup(fix));
	else
		row(d, "worker", "ok",
			w.next_due ? psprintf("pid %d, next scheduled run at %s", (int) w.pid,
								  timestamptz_to_str(w.next_due)) :
			psprintf("pid %d", (int) w.pid), NULL);
}

static void
check_network(Doctor *d)
{
	char	   *host;
	int			port;
	bool		https;
	struct addrinfo hints;
	struct addrinfo *res = NULL;
	int			rc;
	char	   *detail;
	char		addr[NI_MAXHOST];

	split_host(&host, &port, &https);
	memset(&hints, 0, sizeof(hints));
	hints.ai_socktype = SOCK_STREAM;
	rc = getaddrinfo(host, NULL, &hints, &res);
	if (rc != 0)
	{
		row(d, "dns", "error", psprintf("network: could not resolve \"%s\": %s", host, gai_strerror(rc)),
			"Check phsync.host.");
		row(d, "tcp", "warning", "not checked: the host does not resolve", NULL);
		if (https)
			row(d, "tls", "warning", "not checked: the host does not resolve", NULL);
		return;
	}
	if (getnameinfo(res->ai_addr, res->ai_addrlen, addr, sizeof(addr), NULL, 0, NI_NUMERICHOST) != 0)
		strlcpy(addr, "?", sizeof(addr));
	freeaddrinfo(res);
	row(d, "dns", "ok", psprintf("%s resolves to %s", host, addr), NULL);

	/* TCP alone: connect-only to the same host and port over plain http */
	rc = http_probe(d->endpoint,
					psprintf("http://%s%s%s:%d/", strchr(host, ':') ? "[" : "", host,
							 strchr(host, ':') ? "]" : "", port),
					DOCTOR_TIMEOUT_MS, &detail);
	if (rc != CURLE_OK)
	{
		row(d, "tcp", "error", psprintf("%s: %s", curl_category(rc), detail),
			"Check phsync.host, the port, and any firewall between this server and PostHog.");
		if (https)
			row(d, "tls", "warning", "not checked: no TCP connection", NULL);
		return;
	}
	row(d, "tcp", "ok", psprintf("connected to %s port %d", host, port), NULL);

	if (https)
	{
		rc = http_probe(d->endpoint, phsync_host, DOCTOR_TIMEOUT_MS, &detail);
		if (rc != CURLE_OK)
		{
			row(d, "tls", "error", psprintf("%s: TLS: %s", curl_category(rc), detail),
				"For a self-hosted PostHog with its own CA, set phsync.ca_file.");
			return;
		}
		row(d, "tls", "ok", "handshake done, certificate verified", NULL);
	}
	d->reachable = true;
}

/*
 * POST a HogQL query with a short timeout; a row for the outcome, whose
 * detail starts with the category errors have elsewhere (auth, network...).
 */
static bool
ask_posthog(Doctor *d, const char *item, PhsyncEndpoint *endpoint, PhsyncQuery *q,
			const char *hogql, const char *ok_detail)
{
	PhsyncHttp *http;
	PhsyncHttpResult res;
	PhsyncHttpError e;
	char	   *body;
	char	   *volatile timezone = NULL;
	/* each query its own id: PostHog cancels by it (phsync-doctor-... to find them) */
	char	   *client_id = http_client_id("phsync-doctor");

	q->until = GetCurrentTimestamp();
	q->since = q->until - USECS_PER_HOUR;
	body = hogql_request_body(q, hogql, NULL, 0, "phsync doctor", client_id);

	http = http_open(endpoint);
	http_set_timeout(http, DOCTOR_TIMEOUT_MS);
	PG_TRY();
	{
		PhsyncTransfer *t = http_request(http, body, client_id, &res);

		if (res.ok)
			timezone = scan_columns(http_scan(t))->timezone;
		http_finish(t);
	}
	PG_FINALLY();
	{
		http_close(http);
	}
	PG_END_TRY();

	if (res.ok)
	{
		/* the first answer says the project's time zone */
		row(d, item, "ok", timezone && (strcmp(item, "auth") == 0 || strcmp(item, "server") == 0) ?
			psprintf("%s; its time zone is %s", ok_detail, timezone) : ok_detail, NULL);
		return true;
	}
	http_explain(endpoint, &res, &e);
	if (res.curl_code != CURLE_OK)
		row(d, item, "error", psprintf("%s: %s", e.category, e.detail), e.hint);
	else
		row(d, item, "error", psprintf("%s: HTTP %ld: %s", e.category, res.status, e.detail), e.hint);
	return false;
}

/*
 * fn(arg), or NULL with *failure (and *hint, when asked for) set to the
 * error it raised: for lookups that fail without side effects (a query
 * file, a server, a user mapping), so the doctor reports and goes on.
 */
static void *
call_or_null(void *(*fn) (void *), void *arg, char **failure, char **hint)
{
	MemoryContext cxt = CurrentMemoryContext;
	void	   *volatile result = NULL;

	PG_TRY();
	{
		result = fn(arg);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		*failure = pstrdup(edata->message);
		if (hint)
			*hint = edata->hint ? pstrdup(edata->hint) : NULL;
		FreeErrorData(edata);
		result = NULL;
	}
	PG_END_TRY();
	return result;
}

static void *
read_query_file(void *path)
{
	return hogql_read_query_file((const char *) path);
}

static void *
endpoint_of(void *sync)
{
	return sync_endpoint((PhsyncSync *) sync);
}

/*
 * The target of one sync, as the worker will find it.  Returns it, NULL
 * when it is missing or not acceptable.
 */
static PhsyncTarget *
check_target(Doctor *d, PhsyncSync *sync, const char *prefix)
{
	PhsyncTargetSpec spec;
	PhsyncProblem problem;
	PhsyncTarget *target;

	sync_target_spec(sync, &spec);
	if (!OidIsValid(sync->owner))
	{
		row(d, "target", "error",
			psprintf("%sthe role that owned the sync was dropped (%s)", prefix, sync->owner_name),
			NULL);
		return NULL;
	}
	target = target_examine(&spec, &problem);
	if (target == NULL && problem.sqlerrcode == ERRCODE_UNDEFINED_TABLE &&
		sync_is_default(sync) && sync->preset != PHSYNC_CUSTOM)
		row(d, "target", "ok", psprintf("%s%s does not exist yet; the first run creates it",
										prefix, sync->target), NULL);
	else if (target == NULL)
		row(d, "target", "error", psprintf("%s%s", prefix, problem.message),
			problem.hint ? problem.hint : problem.detail);
	else if (sync->cursor == NULL)
		row(d, "target", "ok",
			psprintf("%s%s has a unique key (the %s preset is read whole on every run)",
					 prefix, target->display, preset_name(sync->preset)), NULL);
	else if (!target->cursor_indexed)
		row(d, "target", "warning",
			psprintf("%s%s has a unique key, but no index that starts with \"%s\"",
					 prefix, target->display, sync->cursor),
			psprintf("Without one, every run reads the whole table for max(%s): CREATE INDEX ON %s (%s);",
					 sync->cursor, target->display, quote_identifier(sync->cursor)));
	else
		row(d, "target", "ok",
			psprintf("%s%s has a unique key and an index on \"%s\"", prefix, target->display,
					 sync->cursor), NULL);
	return target;
}

/*
 * A sync's server: reachable with its owner's key?  One row per server
 * and owner (the first sync that uses them says it).
 */
static bool
check_server(Doctor *d, PhsyncSync *sync, PhsyncEndpoint **endpoint, List **seen)
{
	const char *prefix = psprintf("sync %s: server %s: ", sync->name, sync->server);
	char	   *failure = NULL;
	char	   *hint = NULL;
	char	   *key = psprintf("%s/%s", sync->server, sync->owner_name);
	PhsyncQuery q;
	ListCell   *lc;
	bool		ok;

	*endpoint = call_or_null(endpoint_of, sync, &failure, &hint);
	if (*endpoint == NULL)
	{
		row(d, "server", "error", psprintf("%s%s", prefix, failure), hint);
		return false;
	}
	foreach(lc, *seen)
	{
		char	   *k = lfirst(lc);

		if (strcmp(k, key) == 0)
			return true;
	}
	memset(&q, 0, sizeof(q));
	q.cursor = sync->cursor;
	q.preset = PHSYNC_CUSTOM;
	q.base = "SELECT 1";
	ok = ask_posthog(d, "server", *endpoint, &q, "SELECT 1",
					 psprintf("%sthe API key of the user mapping for %s runs queries in project %s at %s",
							  prefix, sync->owner_name, (*endpoint)->project_id, (*endpoint)->host));
	if (ok)
		*seen = lappend(*seen, key);
	return ok;
}

/*
 * The target and the query of one sync.  Rows about a sync other than the
 * default one say which.  A sync with a server is checked against it
 * first.
 */
static void
check_target_and_query(Doctor *d, PhsyncSync *sync, bool authenticated, List **seen)
{
	const char *prefix = sync_is_default(sync) ? "" : psprintf("sync %s: ", sync->name);
	PhsyncEndpoint *endpoint = NULL;
	PhsyncTarget *target;
	PhsyncQuery q;
	char	   *hogql;
	int			i;

	if (sync->server)
		authenticated = check_server(d, sync, &endpoint, seen);
	target = check_target(d, sync, prefix);
	if (!authenticated)
	{
		row(d, "query", "warning",
			psprintf("%snot checked: PostHog did not answer a query", prefix), NULL);
		return;
	}
	memset(&q, 0, sizeof(q));
	q.preset = sync->preset;
	q.cursor = sync->cursor;
	q.limit = 0;
	q.base = sync->query;
	if (target)
	{
		q.nkeys = target->nkeys;
		q.keys = palloc(sizeof(char *) * Max(q.nkeys, 1));
		for (i = 0; i < q.nkeys; i++)
			q.keys[i] = target->cols[target->keys[i]].name;
	}
	if (sync->query_file)
	{
		char	   *failure = NULL;

		q.base = call_or_null(read_query_file, sync->query_file, &failure, NULL);
		if (q.base == NULL)
		{
			row(d, "query", "error", failure, "Check phsync.query_file.");
			return;
		}
	}
	hogql = hogql_build(&q, NULL);
	if (endpoint == NULL)
	{
		char	   *failure = NULL;
		char	   *hint = NULL;

		endpoint = call_or_null(endpoint_of, sync, &failure, &hint);
		if (endpoint == NULL)
		{
			row(d, "query", "error", psprintf("%s%s", prefix, failure), hint);
			return;
		}
	}
	(void) ask_posthog(d, "query", endpoint, &q, hogql,
					   sync->query_file ? "PostHog accepts the query in phsync.query_file" :
					   sync->preset == PHSYNC_CUSTOM ? psprintf("%sPostHog accepts the query", prefix) :
					   psprintf("%sPostHog accepts the built-in %s query", prefix,
								preset_name(sync->preset)));
}

/*
 * Every sync's target and query; the list of syncs needs the extension.
 */
static void
check_syncs(Doctor *d, bool authenticated)
{
	List	   *syncs = NIL;
	List	   *seen = NIL;
	ListCell   *lc;

	phsync_spi_connect();
	if (OidIsValid(get_extension_oid("phsync", true)))
		syncs = sync_list(NULL, true);
	else if (sync_default())
		syncs = list_make1(sync_default());
	if (syncs == NIL)
		row(d, "target", "warning", "no sync is enabled",
			"phsync.target_table is empty and phsync.syncs has no enabled sync.");
	foreach(lc, syncs)
		check_target_and_query(d, lfirst(lc), authenticated, &seen);
	phsync_spi_finish();
}

/*
 * Run every check, emitting a row for each.
 */
void
doctor_run(DoctorRow emit, void *arg)
{
	Doctor		d;
	bool		authenticated = false;

	memset(&d, 0, sizeof(d));
	d.emit = emit;
	d.arg = arg;

	check_settings(&d);
	check_worker(&d);
	check_network(&d);
	if (d.reachable && d.configured)
	{
		PhsyncQuery q;

		memset(&q, 0, sizeof(q));
		q.cursor = phsync_cursor_column;
		q.preset = PHSYNC_CUSTOM;	/* no {timestamp_since} */
		q.base = "SELECT 1";
		authenticated = ask_posthog(&d, "auth", d.endpoint, &q, "SELECT 1",
									psprintf("the API key runs queries in project %s", phsync_project_id));
	}
	else
		row(&d, "auth", "warning",
			d.configured ? "not checked: PostHog is not reachable" :
			"not checked: phsync.project_id or phsync.api_key is not set", NULL);
	check_syncs(&d, authenticated);
}
