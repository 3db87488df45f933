/*-------------------------------------------------------------------------
 *
 * http.c
 *		libcurl client for PostHog's query API.
 *
 * One PhsyncHttp (one curl handle) serves a whole run, so the connection is
 * kept alive across pages.  The response body is fed to json-c's tokener as
 * it arrives, so the raw body is never held in memory as a whole.  Nothing
 * here ereports from inside a libcurl callback: callbacks set a flag and
 * return an abort code, and the error is raised once curl has returned.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <curl/curl.h>

#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/memutils.h"

#include "phsync.h"

/* how much of an error body to keep for the error message */
#define RAW_PREFIX_MAX 1024

struct PhsyncHttp
{
	CURL	   *curl;
	const PhsyncEndpoint *endpoint;
	long		timeout_ms;
	char		errbuf[CURL_ERROR_SIZE];
	/* per request */
	json_tokener *tok;
	json_object *parsed;
	enum json_tokener_error tok_error;
	bool		json_done;
	bool		json_failed;
	bool		too_large;
	size_t		limit;
	double		retry_after;
	size_t		received;
	char		raw[RAW_PREFIX_MAX + 1];
	size_t		rawlen;
};

static bool curl_initialized = false;

/*
 * libcurl write callback: feed the chunk to the JSON tokener.
 */
static size_t
http_write(char *data, size_t size, size_t nmemb, void *userdata)
{
	PhsyncHttp *http = (PhsyncHttp *) userdata;
	size_t		len = size * nmemb;

	/* bytes after decompression: a gzip bomb is caught too */
	http->received += len;
	if (http->received > http->limit)
	{
		http->too_large = true;
		return 0;				/* makes curl abort with CURLE_WRITE_ERROR */
	}
	if (http->rawlen < RAW_PREFIX_MAX)
	{
		size_t		n = Min(len, RAW_PREFIX_MAX - http->rawlen);

		memcpy(http->raw + http->rawlen, data, n);
		http->rawlen += n;
		http->raw[http->rawlen] = '\0';
	}

	if (http->json_done || http->json_failed)
		return len;				/* trailing bytes: ignored, or already bad */

	http->parsed = json_tokener_parse_ex(http->tok, data, (int) len);
	http->tok_error = json_tokener_get_error(http->tok);
	if (http->parsed != NULL)
		http->json_done = true;
	else if (http->tok_error != json_tokener_continue)
		http->json_failed = true;
	return len;
}

/*
 * libcurl progress callback (at least once a second): abort the transfer
 * when PostgreSQL wants us to stop (SIGTERM, cancel) or the run was
 * cancelled, so that a slow request never delays either.
 */
static int
http_progress(void *clientp, curl_off_t dltotal, curl_off_t dlnow,
			  curl_off_t ultotal, curl_off_t ulnow)
{
	return (ProcDiePending || QueryCancelPending || shmem_cancel_pending()) ? 1 : 0;
}

#define SETOPT(h, opt, val) \
	do { \
		CURLcode	rc_ = curl_easy_setopt((h), (opt), (val)); \
		if (rc_ != CURLE_OK) \
			ereport(ERROR, \
					(errcode(ERRCODE_INTERNAL_ERROR), \
					 errmsg("could not set libcurl option %s", #opt), \
					 errdetail("%s", curl_easy_strerror(rc_)))); \
	} while (0)

/*
 * The query endpoint of a host and project (the host was checked when it
 * was set: https://, or http:// to loopback).
 */
char *
http_query_url(const PhsyncEndpoint *endpoint)
{
	size_t		len = strlen(endpoint->host);

	while (len > 0 && endpoint->host[len - 1] == '/')
		len--;
	return psprintf("%.*s/api/projects/%s/query/", (int) len, endpoint->host,
					endpoint->project_id);
}

/*
 * A new libcurl easy handle (initialising libcurl on first use).
 */
static CURL *
new_curl_handle(void)
{
	CURL	   *curl;

	if (!curl_initialized)
	{
		if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
			ereport(ERROR,
					(errcode(ERRCODE_INTERNAL_ERROR),
					 errmsg("could not initialize libcurl")));
		curl_initialized = true;
	}
	curl = curl_easy_init();
	if (curl == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not create a libcurl handle")));
	return curl;
}

/*
 * What every connection phsync makes shares: https (or http to loopback)
 * only, TLS verified against the system CAs plus the endpoint's CA file,
 * no redirects, no signals, a time limit, and a progress callback that
 * lets a cancel or shutdown abort the transfer.
 */
static void
set_transport_options(CURL *curl, char *errbuf, const char *ca_file,
					  long timeout_ms)
{
	SETOPT(curl, CURLOPT_ERRORBUFFER, errbuf);
	SETOPT(curl, CURLOPT_NOSIGNAL, 1L);
	SETOPT(curl, CURLOPT_FOLLOWLOCATION, 0L);
	SETOPT(curl, CURLOPT_PROTOCOLS_STR, "https,http");
	SETOPT(curl, CURLOPT_SSL_VERIFYPEER, 1L);
	SETOPT(curl, CURLOPT_SSL_VERIFYHOST, 2L);
	if (ca_file && ca_file[0])
		SETOPT(curl, CURLOPT_CAINFO, ca_file);
	SETOPT(curl, CURLOPT_TIMEOUT_MS, timeout_ms);
	SETOPT(curl, CURLOPT_CONNECTTIMEOUT_MS, Min(timeout_ms, 30000L));
	SETOPT(curl, CURLOPT_NOPROGRESS, 0L);
	SETOPT(curl, CURLOPT_XFERINFOFUNCTION, http_progress);
}

/*
 * A curl handle for PostHog's query API, kept for a whole run.  The
 * endpoint must outlive it.
 */
PhsyncHttp *
http_open(const PhsyncEndpoint *endpoint)
{
	PhsyncHttp *http = MemoryContextAllocZero(TopMemoryContext, sizeof(PhsyncHttp));

	http->endpoint = endpoint;
	http->timeout_ms = endpoint->timeout_ms;
	PG_TRY();
	{
		http->curl = new_curl_handle();
	}
	PG_CATCH();
	{
		pfree(http);
		PG_RE_THROW();
	}
	PG_END_TRY();
	return http;
}

/*
 * Use another time limit for this handle's requests (phsync_doctor()).
 */
void
http_set_timeout(PhsyncHttp *http, long timeout_ms)
{
	http->timeout_ms = timeout_ms;
}

/*
 * Connect to url and stop there: TCP for http://, TCP and a verified TLS
 * handshake for https://.  Returns curl's code; *detail gets its message.
 */
int
http_probe(const char *url, const char *ca_file, long timeout_ms, char **detail)
{
	CURL	   *curl = new_curl_handle();
	char		errbuf[CURL_ERROR_SIZE];
	volatile CURLcode rc = CURLE_OK;

	errbuf[0] = '\0';
	PG_TRY();
	{
		SETOPT(curl, CURLOPT_URL, url);
		SETOPT(curl, CURLOPT_CONNECT_ONLY, 1L);
		set_transport_options(curl, errbuf, ca_file, timeout_ms);
		rc = curl_easy_perform(curl);
	}
	PG_FINALLY();
	{
		curl_easy_cleanup(curl);
	}
	PG_END_TRY();
	CHECK_FOR_INTERRUPTS();
	shmem_check_cancel();
	*detail = pstrdup(errbuf[0] ? errbuf : curl_easy_strerror(rc));
	return (int) rc;
}

void
http_close(PhsyncHttp *http)
{
	if (http == NULL)
		return;
	if (http->tok)
		json_tokener_free(http->tok);
	if (http->parsed)
		json_object_put(http->parsed);
	if (http->curl)
		curl_easy_cleanup(http->curl);
	pfree(http);
}

/*
 * PostHog's "detail" from an error body, else the start of the raw body.
 * Palloc'd.
 */
static char *
error_detail(PhsyncHttp *http)
{
	json_object *detail;

	if (http->parsed &&
		json_object_is_type(http->parsed, json_type_object) &&
		json_object_object_get_ex(http->parsed, "detail", &detail) &&
		json_object_is_type(detail, json_type_string))
		return foreign_text(json_object_get_string(detail), json_object_get_string_len(detail));
	if (http->rawlen > 0)
		return foreign_text(http->raw, (int) http->rawlen);
	return pstrdup("The response had no body.");
}

/*
 * libcurl header callback: remember Retry-After (seconds; an HTTP date is
 * treated as absent, which means "back off").
 */
static size_t
http_header(char *data, size_t size, size_t nitems, void *userdata)
{
	PhsyncHttp *http = (PhsyncHttp *) userdata;
	size_t		len = size * nitems;

	if (len > 12 && pg_strncasecmp(data, "Retry-After:", 12) == 0)
	{
		char		buf[32];
		char	   *end;
		double		v;
		size_t		n = Min(sizeof(buf) - 1, len - 12);

		/* curl's header data is not NUL-terminated */
		memcpy(buf, data + 12, n);
		buf[n] = '\0';
		v = strtod(buf, &end);
		if (end != buf && v >= 0)
			http->retry_after = v;
	}
	return len;
}

/*
 * POST a query body to url.  Never raises for what the network or PostHog
 * do: the outcome is described in *result, for the retry policy to judge
 * (and http_raise to report).  Only a cancel or shutdown interrupts.
 */
void
http_post(PhsyncHttp *http, const char *url, const char *body,
		  PhsyncHttpResult *result)
{
	struct curl_slist *headers = NULL;
	char	   *auth;
	volatile CURLcode rc = CURLE_OK;
	long		status = 0;
	const char *key = http->endpoint->api_key;

	memset(result, 0, sizeof(*result));
	result->retry_after = -1;

	if (strpbrk(key, "\r\n") != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the PostHog API key contains a line break"),
				 errhint("Check %s.", http->endpoint->key_origin)));

	curl_easy_reset(http->curl);
	http->errbuf[0] = '\0';
	if (http->tok)
		json_tokener_free(http->tok);
	http->tok = json_tokener_new_ex(JSON_TOKENER_DEFAULT_DEPTH);
	if (http->tok == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory")));
	if (http->parsed)
		json_object_put(http->parsed);
	http->parsed = NULL;
	http->json_done = false;
	http->json_failed = false;
	http->too_large = false;
	http->limit = (size_t) http->endpoint->max_response_kb * 1024;
	http->received = 0;
	http->rawlen = 0;
	http->raw[0] = '\0';
	http->retry_after = -1;

	auth = psprintf("Authorization: Bearer %s", key);
	headers = curl_slist_append(headers, "Content-Type: application/json");
	headers = curl_slist_append(headers, "Accept: application/json");
	headers = curl_slist_append(headers, auth);

	PG_TRY();
	{
		SETOPT(http->curl, CURLOPT_URL, url);
		SETOPT(http->curl, CURLOPT_POST, 1L);
		SETOPT(http->curl, CURLOPT_POSTFIELDS, body);
		SETOPT(http->curl, CURLOPT_HTTPHEADER, headers);
		SETOPT(http->curl, CURLOPT_USERAGENT, "phsync/" PHSYNC_VERSION);
		SETOPT(http->curl, CURLOPT_ACCEPT_ENCODING, "");
		set_transport_options(http->curl, http->errbuf, http->endpoint->ca_file,
							  http->timeout_ms);
		SETOPT(http->curl, CURLOPT_WRITEFUNCTION, http_write);
		SETOPT(http->curl, CURLOPT_WRITEDATA, http);
		SETOPT(http->curl, CURLOPT_HEADERFUNCTION, http_header);
		SETOPT(http->curl, CURLOPT_HEADERDATA, http);

		rc = curl_easy_perform(http->curl);
	}
	PG_FINALLY();
	{
		curl_slist_free_all(headers);
		/* the header held the key: do not leave it in freed memory */
		explicit_bzero(auth, strlen(auth));
		pfree(auth);
	}
	PG_END_TRY();

	/* a cancel or shutdown made the progress callback abort: act on it */
	CHECK_FOR_INTERRUPTS();
	shmem_check_cancel();

	curl_easy_getinfo(http->curl, CURLINFO_RESPONSE_CODE, &status);
	result->status = status;
	result->curl_code = (int) rc;
	result->retry_after = http->retry_after;

	if (http->too_large)
	{
		result->too_large = true;
		result->detail = psprintf("The response was larger than phsync.max_response_size (%d kB).",
								  http->endpoint->max_response_kb);
		return;
	}
	if (rc != CURLE_OK)
	{
		result->detail = pstrdup(http->errbuf[0] ? http->errbuf : curl_easy_strerror(rc));
		return;
	}
	if (status != 200)
	{
		result->detail = error_detail(http);
		return;
	}
	if (!http->json_done)
	{
		result->bad_body = true;
		result->detail = psprintf("%s after %zu bytes.",
								  http->json_failed ? json_tokener_error_desc(http->tok_error) :
								  "the body ended early", http->received);
		result->detail[0] = pg_toupper((unsigned char) result->detail[0]);
		return;
	}
	result->json = http->parsed;
	http->parsed = NULL;
}

/*
 * What a failed request comes to, in PostgreSQL's terms: an errcode, a
 * message, PostHog's detail or curl's message as the detail, a hint that
 * names where the endpoint's settings are (postgresql.conf, or a foreign
 * server and its user mapping), and a category (auth, permission,
 * network, timeout, query, response) for phsync_doctor().
 */
void
http_explain(const PhsyncEndpoint *endpoint, PhsyncHttpResult *result,
			 PhsyncHttpError *e)
{
	CURLcode	rc = (CURLcode) result->curl_code;

	memset(e, 0, sizeof(*e));
	e->detail = result->detail;
	if (result->too_large)
	{
		e->sqlerrcode = ERRCODE_PROGRAM_LIMIT_EXCEEDED;
		e->category = "response";
		e->message = "PostHog response too large";
		e->hint = "Lower phsync.page_size, or raise phsync.max_response_size.";
	}
	else if (rc != CURLE_OK)
	{
		e->sqlerrcode = ERRCODE_CONNECTION_FAILURE;
		e->category = rc == CURLE_OPERATION_TIMEDOUT ? "timeout" : "network";
		e->message = psprintf("could not reach PostHog at %s", endpoint->host);
		e->hint = (rc == CURLE_PEER_FAILED_VERIFICATION || rc == CURLE_SSL_CACERT_BADFILE ||
				   rc == CURLE_SSL_CONNECT_ERROR) ?
			psprintf("The TLS certificate could not be verified; %s can add a CA.", endpoint->ca_origin) :
			psprintf("Check %s and the network.", endpoint->host_origin);
	}
	else if (result->status != 200)
	{
		e->message = psprintf("PostHog request failed with HTTP status %ld", result->status);
		e->sqlerrcode = ERRCODE_CONNECTION_FAILURE;
		e->category = "network";
		switch (result->status)
		{
			case 400:
				e->sqlerrcode = ERRCODE_INVALID_PARAMETER_VALUE;
				e->category = "query";
				e->hint = endpoint->query_origin ?
					psprintf("Check the HogQL query (%s).", endpoint->query_origin) :
					"Check the HogQL query.";
				break;
			case 401:
				e->sqlerrcode = ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION;
				e->category = "auth";
				e->hint = psprintf("Check %s: PostHog does not accept it.", endpoint->key_origin);
				break;
			case 402:
				e->hint = "The PostHog organization is over its billing quota.";
				break;
			case 403:
				e->sqlerrcode = ERRCODE_INSUFFICIENT_PRIVILEGE;
				e->category = "permission";
				e->hint = psprintf("Check that %s has the \"Query Read\" scope and access to project %s.",
								   endpoint->key_origin, endpoint->project_id);
				break;
			case 404:
				e->hint = psprintf("Check %s and the project id.", endpoint->host_origin);
				break;
			case 504:
			case 512:
				e->category = "timeout";
				break;
		}
	}
	else
	{
		e->sqlerrcode = ERRCODE_INVALID_TEXT_REPRESENTATION;
		e->category = "response";
		e->message = "PostHog sent a response that is not valid JSON";
	}
}

/*
 * Raise the error a failed request comes to (see http_explain).
 */
void
http_raise(const PhsyncEndpoint *endpoint, PhsyncHttpResult *result)
{
	PhsyncHttpError e;

	http_explain(endpoint, result, &e);
	ereport(ERROR,
			(errcode(e.sqlerrcode),
			 errmsg_internal("%s", e.message),
			 e.detail ? errdetail_internal("%s", e.detail) : 0,
			 e.hint ? errhint("%s", e.hint) : 0));
	pg_unreachable();
}
