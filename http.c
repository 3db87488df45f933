/*-------------------------------------------------------------------------
 *
 * http.c
 *		The libcurl client for PostHog's query API: several requests in
 *		flight at once (the multi interface), driven from the caller's own
 *		loop, so that every PostgreSQL call stays in the main thread and
 *		the worker inserts one page while PostHog computes the next.
 *
 * One PhsyncHttp (a multi handle, reusing its connections) serves a run.
 * http_start() begins a request and returns at once; http_poll() moves
 * the transfers along for a while; a transfer's body is scanned as it
 * arrives (response.c), and its rows can be taken before it is complete.
 * When the reader falls behind, the transfer is paused (memory stays
 * bounded by what was not taken yet, whatever the page size) and resumed
 * by http_resume().
 *
 * Nothing here raises an error from inside a libcurl callback: callbacks
 * set a flag and return an abort code.  A transfer given up on before it
 * ended (our own time limit, a cancel, a shutdown, an error elsewhere in
 * the run) is cancelled on PostHog's side too, with DELETE
 * /api/projects/<id>/query/<client_query_id>/, so that it does not hold
 * one of the project's few query slots until PostHog's own limit.
 *
 * PostHog gzips its answers.  They are inflated here with ISA-L's igzip
 * rather than by libcurl's zlib: the same stream, checked against the
 * same CRC, at about 2.4 times the speed (zlib took a tenth of the
 * worker's CPU; see docs/performance.md).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <curl/curl.h>
#include <isa-l/igzip_lib.h>

#include "common/pg_prng.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "utils/wait_event.h"
#include "utils/memutils.h"

#include "phsync.h"

/* how much of an error body to keep for the error message */
#define RAW_PREFIX_MAX 1024
/*
 * Rows received and not taken yet, for all the transfers of a client
 * together: each open transfer may hold its share, at most PAUSE_MAX, at
 * least PAUSE_MIN, before it pauses.  So the worker's memory does not
 * depend on how many requests are open (phsync.max_concurrent_requests).
 */
#define BUFFER_BUDGET (32 * 1024 * 1024)
#define PAUSE_MAX (16 * 1024 * 1024)
#define PAUSE_MIN (1024 * 1024)
/* the limit for the DELETE that cancels a query on PostHog's side */
#define CANCEL_TIMEOUT_MS 2000L
/* inflated bytes are handed on in pieces of this size */
#define INFLATE_CHUNK (128 * 1024)

struct PhsyncTransfer
{
	PhsyncHttp *http;
	CURL	   *curl;
	struct curl_slist *headers;
	char	   *body;			/* malloc'd: curl reads it as it sends */
	char		client_query_id[64];
	char		errbuf[CURL_ERROR_SIZE];
	PhsyncScan *scan;			/* the body, scanned */
	size_t		limit;			/* largest body accepted */
	size_t		received;
	char		raw[RAW_PREFIX_MAX + 1];	/* start of the body, for errors */
	size_t		rawlen;
	double		retry_after;
	long		status;			/* from the status line */
	bool		too_large;
	bool		gzipped;		/* the body is gzipped: inflated by transfer_inflate() */
	struct inflate_state *gzip; /* malloc'd */
	unsigned char *inflated;	/* malloc'd, INFLATE_CHUNK bytes */
	int			gzip_error;		/* ISA-L's code, when the stream is corrupt */
	char		encoding[32];	/* a Content-Encoding not asked for */
	bool		paused;
	bool		done;			/* curl finished it (well or not) */
	bool		timed_out;		/* no answer within the time limit */
	bool		remote_cancelled;	/* the DELETE was sent */
	CURLcode	result;
	TimestampTz started;
	TimestampTz answered;		/* when the status line came (0: not yet) */
	TimestampTz last_data;		/* when bytes last came in */
	PhsyncTransfer *next;		/* in http->transfers */
};

struct PhsyncHttp
{
	CURLM	   *multi;
	const PhsyncEndpoint *endpoint;
	char	   *url;
	long		timeout_ms;
	PhsyncTransfer *transfers;	/* started, not finished by the caller */
	PhsyncHttp *next_open;		/* the list of open clients */
};

static bool curl_initialized = false;

/*
 * Open clients, so that a process that exits mid-request (SIGTERM: a FATAL
 * error skips the run's cleanup) still cancels its queries on PostHog's
 * side.
 */
static PhsyncHttp *open_clients = NULL;
static bool exit_callback_registered = false;
static void abandon_all(PhsyncHttp *http);
static void http_at_exit(int code, Datum arg);

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
static char *
http_query_url(const PhsyncEndpoint *endpoint)
{
	size_t		len = strlen(endpoint->host);

	while (len > 0 && endpoint->host[len - 1] == '/')
		len--;
	return psprintf("%.*s/api/projects/%s/query/", (int) len, endpoint->host,
					endpoint->project_id);
}

static void
init_curl(void)
{
	if (curl_initialized)
		return;
	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not initialize libcurl")));
	curl_initialized = true;
}

static CURL *
new_curl_handle(void)
{
	CURL	   *curl;

	init_curl();
	curl = curl_easy_init();
	if (curl == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not create a libcurl handle")));
	return curl;
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
	return phsync_interrupt_pending() ? 1 : 0;
}

/*
 * What every connection phsync makes shares: https (or http to loopback)
 * only, TLS verified against the system CAs plus the endpoint's CA file,
 * through its proxy if it has one, no redirects, no signals, and a
 * progress callback that lets a cancel or shutdown abort the transfer.
 */
static void
set_transport_options(CURL *curl, char *errbuf, const PhsyncEndpoint *endpoint,
					  long connect_timeout_ms)
{
	SETOPT(curl, CURLOPT_ERRORBUFFER, errbuf);
	SETOPT(curl, CURLOPT_NOSIGNAL, 1L);
	SETOPT(curl, CURLOPT_FOLLOWLOCATION, 0L);
	SETOPT(curl, CURLOPT_PROTOCOLS_STR, "https,http");
	SETOPT(curl, CURLOPT_SSL_VERIFYPEER, 1L);
	SETOPT(curl, CURLOPT_SSL_VERIFYHOST, 2L);
	if (endpoint->ca_file && endpoint->ca_file[0])
		SETOPT(curl, CURLOPT_CAINFO, endpoint->ca_file);
	/* only the endpoint's proxy, never one from the server's environment */
	SETOPT(curl, CURLOPT_PROXY, endpoint->proxy ? endpoint->proxy : "");
	SETOPT(curl, CURLOPT_CONNECTTIMEOUT_MS, connect_timeout_ms);
	SETOPT(curl, CURLOPT_NOPROGRESS, 0L);
	SETOPT(curl, CURLOPT_XFERINFOFUNCTION, http_progress);
}

/*
 * A client for one PostHog project, kept for a whole run.  The endpoint
 * must outlive it.
 */
PhsyncHttp *
http_open(const PhsyncEndpoint *endpoint)
{
	PhsyncHttp *http = MemoryContextAllocZero(TopMemoryContext, sizeof(PhsyncHttp));

	init_curl();
	http->endpoint = endpoint;
	http->timeout_ms = endpoint->timeout_ms;
	http->url = MemoryContextStrdup(TopMemoryContext, http_query_url(endpoint));
	http->multi = curl_multi_init();
	if (http->multi == NULL)
	{
		pfree(http->url);
		pfree(http);
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not create a libcurl multi handle")));
	}
	if (!exit_callback_registered)
	{
		before_shmem_exit(http_at_exit, (Datum) 0);
		exit_callback_registered = true;
	}
	http->next_open = open_clients;
	open_clients = http;
	return http;
}

/*
 * At process exit: give up on every transfer still in flight, cancelling
 * its query on PostHog's side (no memory is freed: the process ends).
 */
static void
http_at_exit(int code, Datum arg)
{
	PhsyncHttp *http;

	for (http = open_clients; http; http = http->next_open)
		abandon_all(http);
	open_clients = NULL;
}

/*
 * Use another time limit for this client's requests (phsync_doctor()).
 */
void
http_set_timeout(PhsyncHttp *http, long timeout_ms)
{
	http->timeout_ms = timeout_ms;
}

/* ---------- callbacks (no PostgreSQL calls) ---------- */

/* an answer nobody reads (a cancel's): not to stdout, curl's default */
static size_t
discard_write(char *data, size_t size, size_t nmemb, void *userdata)
{
	return size * nmemb;
}

/* bytes of the body as sent, inflated: false to abort the transfer */
static bool
transfer_body(PhsyncTransfer *t, const char *data, size_t len)
{
	/* counted after decompression: a gzip bomb is caught too */
	t->received += len;
	if (t->received > t->limit)
	{
		t->too_large = true;
		return false;
	}
	if (t->rawlen < RAW_PREFIX_MAX)
	{
		size_t		n = Min(len, RAW_PREFIX_MAX - t->rawlen);

		memcpy(t->raw + t->rawlen, data, n);
		t->rawlen += n;
		t->raw[t->rawlen] = '\0';
	}
	(void) scan_feed(t->scan, data, len);	/* a bad body is seen at the end */
	return true;
}

/*
 * Inflate a piece of a gzipped body: false to abort the transfer (a
 * corrupt stream, or too large).  Members that follow each other are one
 * body, as RFC 1952 says.
 */
static bool
transfer_inflate(PhsyncTransfer *t, char *data, size_t len)
{
	struct inflate_state *z = t->gzip;

	z->next_in = (uint8_t *) data;
	z->avail_in = (uint32_t) len;
	for (;;)
	{
		int			rc;

		if (z->block_state == ISAL_BLOCK_FINISH)
		{
			uint8_t    *in = z->next_in;
			uint32_t	avail = z->avail_in;

			if (avail == 0)
				return true;
			/* another member */
			isal_inflate_reset(z);
			z->crc_flag = ISAL_GZIP;
			z->next_in = in;
			z->avail_in = avail;
		}
		z->next_out = t->inflated;
		z->avail_out = INFLATE_CHUNK;
		rc = isal_inflate(z);
		if (rc < 0)
		{
			t->gzip_error = rc;
			return false;
		}
		if (z->avail_out < INFLATE_CHUNK &&
			!transfer_body(t, (char *) t->inflated, INFLATE_CHUNK - z->avail_out))
			return false;
		/* all taken and all given out: wait for more */
		if (z->avail_in == 0 && z->avail_out > 0)
			return true;
	}
}

/* the rows a transfer may hold before it pauses: its share of the budget */
static size_t
pause_bytes(PhsyncTransfer *t)
{
	PhsyncTransfer *o;
	size_t		open = 0;

	for (o = t->http->transfers; o; o = o->next)
		open++;
	return Max(Min(BUFFER_BUDGET / Max(open, 1), PAUSE_MAX), PAUSE_MIN);
}

static size_t
transfer_write(char *data, size_t size, size_t nmemb, void *userdata)
{
	PhsyncTransfer *t = (PhsyncTransfer *) userdata;
	size_t		len = size * nmemb;

	/*
	 * The reader is behind: keep these bytes for later (curl does).  Only
	 * while it has rows to take: it resumes the transfer when it has taken
	 * them (http_resume()), and a transfer paused with nothing to take would
	 * never be resumed (the block that holds the last row stays).
	 */
	if (t->status == 200 && scan_buffered(t->scan) >= pause_bytes(t) &&
		scan_pending(t->scan) > 0 && scan_member(t->scan, "columns") != NULL)
	{
		t->paused = true;
		return CURL_WRITEFUNC_PAUSE;
	}
	t->last_data = GetCurrentTimestamp();
	/* false makes curl abort with CURLE_WRITE_ERROR */
	if (t->encoding[0])
		return 0;
	if (t->gzipped)
		return transfer_inflate(t, data, len) ? len : 0;
	return transfer_body(t, data, len) ? len : 0;
}

/*
 * A Content-Encoding header: gzip (asked for) is inflated here, identity
 * is the body itself, anything else is refused.  Called before the body.
 */
static void
transfer_encoding(PhsyncTransfer *t, const char *value, size_t len)
{
	while (len > 0 && isspace((unsigned char) value[len - 1]))
		len--;
	while (len > 0 && isspace((unsigned char) *value))
	{
		value++;
		len--;
	}
	if ((len == 4 && pg_strncasecmp(value, "gzip", 4) == 0) ||
		(len == 6 && pg_strncasecmp(value, "x-gzip", 6) == 0))
	{
		t->gzipped = true;
		isal_inflate_init(t->gzip);
		t->gzip->crc_flag = ISAL_GZIP;
	}
	else if (!(len == 8 && pg_strncasecmp(value, "identity", 8) == 0) && len > 0)
	{
		len = Min(len, sizeof(t->encoding) - 1);
		memcpy(t->encoding, value, len);
		t->encoding[len] = '\0';
	}
}

/*
 * libcurl header callback: the status, and Retry-After (seconds; an HTTP
 * date is treated as absent, which means "back off").
 */
static size_t
transfer_header(char *data, size_t size, size_t nitems, void *userdata)
{
	PhsyncTransfer *t = (PhsyncTransfer *) userdata;
	size_t		len = size * nitems;

	if (len > 12 && strncmp(data, "HTTP/", 5) == 0)
	{
		const char *sp = memchr(data, ' ', len);

		if (sp && sp + 4 <= data + len)
			t->status = strtol(sp + 1, NULL, 10);
		if (t->answered == 0)
			t->answered = GetCurrentTimestamp();
		/* a new response (after a 100 Continue, say): its own encoding */
		t->gzipped = false;
		t->encoding[0] = '\0';
	}
	else if (len > 17 && pg_strncasecmp(data, "Content-Encoding:", 17) == 0)
		transfer_encoding(t, data + 17, len - 17);
	else if (len > 12 && pg_strncasecmp(data, "Retry-After:", 12) == 0)
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
			t->retry_after = v;
	}
	return len;
}

/* ---------- transfers ---------- */

/*
 * Free what a transfer holds; it must not be in the multi handle.
 */
static void
transfer_free(PhsyncTransfer *t)
{
	PhsyncTransfer **p;

	for (p = &t->http->transfers; *p; p = &(*p)->next)
		if (*p == t)
		{
			*p = t->next;
			break;
		}
	if (t->curl)
		curl_easy_cleanup(t->curl);
	if (t->headers)
		curl_slist_free_all(t->headers);
	if (t->body)
		free(t->body);
	if (t->gzip)
		free(t->gzip);
	if (t->inflated)
		free(t->inflated);
	scan_free(t->scan);
	/* the request held the key: do not leave it in freed memory */
	pfree(t);
}

/*
 * A client_query_id of a session's own request: prefix, the backend's pid
 * and a random number (PostHog cancels by it; a prefix finds the kind).
 */
char *
http_client_id(const char *prefix)
{
	return psprintf("%s-%d-%016llx", prefix, MyProcPid,
					(unsigned long long) pg_prng_uint64(&pg_global_prng_state));
}

/*
 * Start a query request: POST body to the project's query endpoint.
 * Returns at once; http_poll() moves it along.
 */
PhsyncTransfer *
http_start(PhsyncHttp *http, const char *body, const char *client_query_id)
{
	const PhsyncEndpoint *e = http->endpoint;
	PhsyncTransfer *t;
	char	   *auth;

	if (strpbrk(e->api_key, "\r\n") != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the PostHog API key contains a line break"),
				 errhint("Check %s.", e->key_origin)));

	t = MemoryContextAllocZero(TopMemoryContext, sizeof(PhsyncTransfer));
	t->http = http;
	t->next = http->transfers;
	http->transfers = t;
	strlcpy(t->client_query_id, client_query_id, sizeof(t->client_query_id));
	t->retry_after = -1;
	t->limit = (size_t) e->max_response_kb * 1024;
	t->started = t->last_data = GetCurrentTimestamp();
	t->scan = scan_create();
	t->body = strdup(body);
	t->gzip = malloc(sizeof(struct inflate_state));
	t->inflated = malloc(INFLATE_CHUNK);
	if (t->scan == NULL || t->body == NULL || t->gzip == NULL || t->inflated == NULL)
	{
		transfer_free(t);
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory")));
	}

	PG_TRY();
	{
		t->curl = new_curl_handle();
		auth = psprintf("Authorization: Bearer %s", e->api_key);
		t->headers = curl_slist_append(t->headers, "Content-Type: application/json");
		t->headers = curl_slist_append(t->headers, "Accept: application/json");
		/* gzip only: inflated here, not by libcurl (see the top) */
		t->headers = curl_slist_append(t->headers, "Accept-Encoding: gzip");
		t->headers = curl_slist_append(t->headers, auth);
		explicit_bzero(auth, strlen(auth));
		pfree(auth);
		if (t->headers == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("out of memory")));

		SETOPT(t->curl, CURLOPT_URL, http->url);
		SETOPT(t->curl, CURLOPT_POST, 1L);
		SETOPT(t->curl, CURLOPT_POSTFIELDS, t->body);
		SETOPT(t->curl, CURLOPT_HTTPHEADER, t->headers);
		SETOPT(t->curl, CURLOPT_USERAGENT, "phsync/" PHSYNC_VERSION);
		SETOPT(t->curl, CURLOPT_HTTP_CONTENT_DECODING, 0L);
		/* large pages: read the socket in large pieces */
		SETOPT(t->curl, CURLOPT_BUFFERSIZE, 256L * 1024);
		set_transport_options(t->curl, t->errbuf, e, Min(http->timeout_ms, 30000L));
		SETOPT(t->curl, CURLOPT_WRITEFUNCTION, transfer_write);
		SETOPT(t->curl, CURLOPT_WRITEDATA, t);
		SETOPT(t->curl, CURLOPT_HEADERFUNCTION, transfer_header);
		SETOPT(t->curl, CURLOPT_HEADERDATA, t);
		SETOPT(t->curl, CURLOPT_PRIVATE, t);
		if (curl_multi_add_handle(http->multi, t->curl) != CURLM_OK)
			ereport(ERROR,
					(errcode(ERRCODE_INTERNAL_ERROR),
					 errmsg("could not start a libcurl transfer")));
	}
	PG_CATCH();
	{
		transfer_free(t);
		PG_RE_THROW();
	}
	PG_END_TRY();
	return t;
}

/*
 * Ask PostHog to stop the query client_query_id (a request phsync gave up
 * on), with a short time limit, whatever is pending: it must get through
 * during a shutdown too.  Failure is only logged.
 */
static void
cancel_remote(PhsyncHttp *http, const char *client_query_id)
{
	const PhsyncEndpoint *e = http->endpoint;
	CURL	   *curl = curl_easy_init();
	struct curl_slist *headers = NULL;
	char		errbuf[CURL_ERROR_SIZE];
	char	   *auth;
	char	   *url;
	CURLcode	rc;
	long		status = 0;

	if (curl == NULL)
		return;
	errbuf[0] = '\0';
	url = psprintf("%s%s/", http->url, client_query_id);
	auth = psprintf("Authorization: Bearer %s", e->api_key);
	headers = curl_slist_append(headers, auth);
	explicit_bzero(auth, strlen(auth));
	pfree(auth);
	if (headers == NULL ||
		curl_easy_setopt(curl, CURLOPT_URL, url) != CURLE_OK ||
		curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, "DELETE") != CURLE_OK ||
		curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, discard_write) != CURLE_OK ||
		curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers) != CURLE_OK ||
		curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, errbuf) != CURLE_OK ||
		curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L) != CURLE_OK ||
		curl_easy_setopt(curl, CURLOPT_FOLLOWLOCATION, 0L) != CURLE_OK ||
		curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "https,http") != CURLE_OK ||
		curl_easy_setopt(curl, CURLOPT_SSL_VERIFYPEER, 1L) != CURLE_OK ||
		curl_easy_setopt(curl, CURLOPT_SSL_VERIFYHOST, 2L) != CURLE_OK ||
		(e->ca_file && e->ca_file[0] && curl_easy_setopt(curl, CURLOPT_CAINFO, e->ca_file) != CURLE_OK) ||
		curl_easy_setopt(curl, CURLOPT_PROXY, e->proxy ? e->proxy : "") != CURLE_OK ||
		curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, CANCEL_TIMEOUT_MS) != CURLE_OK)
		rc = CURLE_FAILED_INIT;
	else
		rc = curl_easy_perform(curl);
	if (rc == CURLE_OK)
		curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
	curl_slist_free_all(headers);
	curl_easy_cleanup(curl);
	/* 404: the query had ended already */
	if (rc != CURLE_OK || (status >= 300 && status != 404))
		elog(LOG, "phsync could not cancel PostHog query %s: %s", client_query_id,
			 rc != CURLE_OK ? (errbuf[0] ? errbuf : curl_easy_strerror(rc)) :
			 psprintf("HTTP status %ld", status));
	else
		elog(DEBUG1, "phsync cancelled PostHog query %s", client_query_id);
	pfree(url);
}

/*
 * Stop t if it is in flight, and cancel its query on PostHog's side unless
 * PostHog answered it in full (once).
 */
static void
stop_transfer(PhsyncTransfer *t, CURLcode why)
{
	if (!t->done)
	{
		curl_multi_remove_handle(t->http->multi, t->curl);
		t->done = true;
		t->result = why;
	}
	if (t->result != CURLE_OK && !t->remote_cancelled)
	{
		long		sent = 0;

		/* a request that never reached PostHog has nothing to cancel */
		t->remote_cancelled = true;
		if (curl_easy_getinfo(t->curl, CURLINFO_REQUEST_SIZE, &sent) == CURLE_OK && sent > 0)
			cancel_remote(t->http, t->client_query_id);
	}
}

/*
 * Give up on a transfer (cancelling it on PostHog's side if it had not
 * been answered) and free it.
 */
static void
http_abandon(PhsyncTransfer *t)
{
	stop_transfer(t, CURLE_ABORTED_BY_CALLBACK);
	transfer_free(t);
}

/*
 * Free a transfer the caller is done with (one still in flight is given
 * up on).
 */
void
http_finish(PhsyncTransfer *t)
{
	http_abandon(t);
}

/*
 * Close the client: transfers still in flight are abandoned (and
 * cancelled on PostHog's side).
 */
void
http_close(PhsyncHttp *http)
{
	PhsyncHttp **link;

	if (http == NULL)
		return;
	while (http->transfers)
		http_abandon(http->transfers);
	for (link = &open_clients; *link; link = &(*link)->next_open)
	{
		if (*link == http)
		{
			*link = http->next_open;
			break;
		}
	}
	curl_multi_cleanup(http->multi);
	pfree(http->url);
	pfree(http);
}

/*
 * Stop every transfer in flight (a cancel or a shutdown is pending).
 */
static void
abandon_all(PhsyncHttp *http)
{
	PhsyncTransfer *t;

	/* those that ended unanswered too (the progress callback aborts them) */
	for (t = http->transfers; t; t = t->next)
		stop_transfer(t, CURLE_ABORTED_BY_CALLBACK);
}

/* bytes received so far by the transfers in flight */
static size_t
received_total(PhsyncHttp *http)
{
	size_t		n = 0;
	PhsyncTransfer *t;

	for (t = http->transfers; t; t = t->next)
		n += t->received;
	return n;
}

/*
 * Let curl read what has arrived.  One curl_multi_perform() may take only
 * part of it, and the worker calls this between the chunks it loads, so
 * the end of an answer that has all arrived (which lets its slice ask for
 * the next page) was seen a chunk or two late: about a second of PostHog
 * idle after each early page, measured with bench.py --timeline.  Perform
 * again while bytes keep coming, within a bound.
 */
static void
perform(PhsyncHttp *http, int *running)
{
	int			i;

	for (i = 0; i < 64; i++)
	{
		size_t		before = received_total(http);

		curl_multi_perform(http->multi, running);
		if (received_total(http) == before)
			break;
	}
}

/*
 * Move the transfers along for at most timeout_ms, returning sooner when
 * one finishes or brings data.  A cancel, a shutdown or a cancelled run
 * abandons every transfer (cancelling them on PostHog's side) and raises.
 */
void
http_poll(PhsyncHttp *http, long timeout_ms)
{
	int			running;
	int			numfds;
	CURLMsg    *msg;
	int			left;
	PhsyncTransfer *t;
	TimestampTz now;

	if (phsync_interrupt_pending())
	{
		abandon_all(http);
		phsync_check_interrupts();
	}

	perform(http, &running);
	if (running > 0 && timeout_ms > 0)
	{
		curl_multi_poll(http->multi, NULL, 0, (int) Min(timeout_ms, 100L), &numfds);
		perform(http, &running);
	}
	else if (timeout_ms > 0)
	{
		/* nothing in flight (waiting to retry, say): wait, but wake for signals */
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 Min(timeout_ms, 1000L), PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}

	while ((msg = curl_multi_info_read(http->multi, &left)) != NULL)
	{
		if (msg->msg != CURLMSG_DONE)
			continue;
		curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &t);
		t->done = true;
		t->result = msg->data.result;
		curl_multi_remove_handle(http->multi, t->curl);
	}

	/*
	 * Our own time limit, for the answer to start and then whenever data
	 * stalls (not while the transfer is paused: that wait is ours).
	 */
	now = GetCurrentTimestamp();
	for (t = http->transfers; t; t = t->next)
	{
		if (t->done || t->paused)
			continue;
		if (TimestampDifferenceExceeds(t->last_data, now, (int) http->timeout_ms))
		{
			t->timed_out = true;
			snprintf(t->errbuf, sizeof(t->errbuf),
					 "No answer from PostHog within %ld ms.", http->timeout_ms);
			stop_transfer(t, CURLE_OPERATION_TIMEDOUT);
		}
	}

	if (phsync_interrupt_pending())
	{
		abandon_all(http);
		phsync_check_interrupts();
	}
}

/*
 * Unpause t after the reader took rows from it (its stall timer restarts).
 */
void
http_resume(PhsyncTransfer *t)
{
	if (!t->paused || t->done ||
		(scan_buffered(t->scan) >= pause_bytes(t) / 2 && scan_pending(t->scan) > 0))
		return;
	t->paused = false;
	t->last_data = GetCurrentTimestamp();
	curl_easy_pause(t->curl, CURLPAUSE_CONT);
}

bool
http_done(PhsyncTransfer *t)
{
	return t->done;
}

/* is t waiting for its rows to be taken? */
bool
http_paused(PhsyncTransfer *t)
{
	return t->paused;
}

/*
 * The rows of a transfer (a 200's), to take as they arrive.
 */
PhsyncScan *
http_scan(PhsyncTransfer *t)
{
	return t->status == 200 ? t->scan : NULL;
}

/*
 * Has PostHog begun to answer t (or did t end)?  Until then the query
 * holds one of PostHog's query slots; the transfer that follows does not.
 */
bool
http_answering(PhsyncTransfer *t)
{
	return t->answered != 0 || t->done;
}

/*
 * Take the scan out of a finished transfer (a 200's): the caller owns it
 * (scan_free()), and may free the transfer.
 */
PhsyncScan *
http_take_scan(PhsyncTransfer *t)
{
	PhsyncScan *s = t->scan;

	Assert(t->done && t->status == 200);
	t->scan = scan_create();
	if (t->scan == NULL)
	{
		scan_free(s);
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory")));
	}
	return s;
}

/*
 * PostHog's "detail" from an error body, else the start of the raw body.
 */
static char *
error_detail(PhsyncTransfer *t)
{
	const char *detail = scan_member(t->scan, "detail");

	if (detail)
	{
		json_object *j = json_tokener_parse(detail);

		if (j && json_object_is_type(j, json_type_string))
		{
			char	   *s = foreign_text(json_object_get_string(j), json_object_get_string_len(j));

			json_object_put(j);
			return s;
		}
		if (j)
			json_object_put(j);
	}
	if (t->rawlen > 0)
		return foreign_text(t->raw, (int) t->rawlen);
	return pstrdup("The response had no body.");
}

/*
 * What a finished transfer came to; nothing is raised (the retry policy
 * judges, http_raise() reports).  For a 200 whose body is complete,
 * result->ok is set and the rows are in http_scan().
 */
void
http_result(PhsyncTransfer *t, PhsyncHttpResult *result)
{
	memset(result, 0, sizeof(*result));
	Assert(t->done);
	result->status = t->status;
	result->curl_code = (int) t->result;
	result->retry_after = t->retry_after;
	/* PostHog's own time: to the first byte of its answer */
	result->seconds = (double) ((t->answered ? t->answered : GetCurrentTimestamp()) - t->started) / USECS_PER_SEC;
	if (t->too_large)
	{
		result->too_large = true;
		result->detail = psprintf("The response was larger than phsync.max_response_size (%d kB).",
								  t->http->endpoint->max_response_kb);
		return;
	}
	if (t->encoding[0])
	{
		result->bad_encoding = result->bad_body = true;
		result->detail = psprintf("It came with Content-Encoding \"%s\"; phsync asks for gzip only.",
								  foreign_text(t->encoding, strlen(t->encoding)));
		return;
	}
	if (t->gzip_error)
	{
		result->bad_encoding = result->bad_body = true;
		result->detail = psprintf("Its gzip stream is corrupt (%s) after %zu bytes.",
								  t->gzip_error == ISAL_INCORRECT_CHECKSUM ? "the checksum does not match" :
								  "invalid compressed data", t->received);
		return;
	}
	if (t->result != CURLE_OK)
	{
		result->detail = pstrdup(t->errbuf[0] ? t->errbuf : curl_easy_strerror(t->result));
		return;
	}
	if (t->status != 200)
	{
		result->detail = error_detail(t);
		return;
	}
	if (t->gzipped && t->gzip->block_state != ISAL_BLOCK_FINISH)
	{
		result->bad_encoding = result->bad_body = true;
		result->detail = psprintf("Its gzip stream ended early, after %zu bytes.", t->received);
		return;
	}
	if (!scan_complete(t->scan))
	{
		result->bad_body = true;
		result->detail = psprintf("%s after %zu bytes.", scan_error(t->scan), t->received);
		result->detail[0] = pg_toupper((unsigned char) result->detail[0]);
		return;
	}
	result->ok = true;
}

/*
 * One request, waited for: start it and poll until it ends.  The caller
 * frees the transfer with http_finish() (its rows are in http_scan()).
 */
PhsyncTransfer *
http_request(PhsyncHttp *http, const char *body, const char *client_query_id,
			 PhsyncHttpResult *result)
{
	PhsyncTransfer *t = http_start(http, body, client_query_id);

	PG_TRY();
	{
		while (!t->done)
			http_poll(http, 100);
	}
	PG_CATCH();
	{
		http_abandon(t);
		PG_RE_THROW();
	}
	PG_END_TRY();
	http_result(t, result);
	return t;
}

/*
 * Connect to url and stop there: TCP for http://, TCP and a verified TLS
 * handshake for https://.  Returns curl's code; *detail gets its message.
 */
int
http_probe(const PhsyncEndpoint *endpoint, const char *url, long timeout_ms, char **detail)
{
	CURL	   *curl = new_curl_handle();
	char		errbuf[CURL_ERROR_SIZE];
	volatile CURLcode rc = CURLE_OK;

	errbuf[0] = '\0';
	PG_TRY();
	{
		SETOPT(curl, CURLOPT_URL, url);
		SETOPT(curl, CURLOPT_CONNECT_ONLY, 1L);
		set_transport_options(curl, errbuf, endpoint, timeout_ms);
		SETOPT(curl, CURLOPT_TIMEOUT_MS, timeout_ms);
		rc = curl_easy_perform(curl);
	}
	PG_FINALLY();
	{
		curl_easy_cleanup(curl);
	}
	PG_END_TRY();
	phsync_check_interrupts();
	*detail = pstrdup(errbuf[0] ? errbuf : curl_easy_strerror(rc));
	return (int) rc;
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
	else if (result->bad_encoding)
	{
		e->sqlerrcode = ERRCODE_INVALID_TEXT_REPRESENTATION;
		e->category = "response";
		e->message = "PostHog sent a response that could not be decoded";
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
			case 429:
				e->category = "throttled";
				e->hint = "PostHog kept refusing: lower phsync.max_requests_per_minute, phsync.max_requests_per_hour or phsync.max_concurrent_requests.";
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
