/*-------------------------------------------------------------------------
 *
 * response.c
 *		Reading PostHog's query responses as they arrive: a streaming JSON
 *		scanner that turns "results" into a queue of rows, each a list of
 *		values kept as text, and keeps the other members PostHog sends
 *		that phsync reads ("columns", "types", "timezone", an error's
 *		"detail").
 *
 * Why not json-c's tokener, as before: it builds an object per value for
 * the whole page (tens of bytes of overhead per value, a malloc each),
 * so a 50,000-row page took over 150 MB and a good part of the worker's
 * CPU.  Here a row's values go straight into a block of memory, decoded
 * once; the consumer converts and inserts them and the block is freed.
 * Memory is bounded by what the consumer has not taken yet, not by the
 * page: the HTTP layer pauses a transfer whose queue is full.
 *
 * The scanner runs inside libcurl's write callback, so it never raises an
 * error or pallocs: memory comes from malloc, and a failure (bad JSON, no
 * memory) is a flag the caller reads once curl has returned.
 *
 * Values: strings are decoded (escapes, \u surrogate pairs) to UTF-8 and
 * checked to be valid UTF-8 without NUL bytes, so that the consumer's
 * input functions get clean text; numbers, true and false are their
 * text; null is a NULL value; arrays and objects are their JSON text,
 * however deep (nesting is counted, never recursed into).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "mb/pg_wchar.h"
#include "utils/json.h"

#include "phsync.h"

/* a block of rows: rows are written one after the other, never across blocks */
typedef struct RowBlock
{
	struct RowBlock *next;
	size_t		size;			/* bytes of data[] */
	size_t		used;			/* written, complete rows only */
	size_t		taken;			/* consumed by the reader */
	char		data[FLEXIBLE_ARRAY_MEMBER];
} RowBlock;

#define BLOCK_SIZE (1024 * 1024)
/* the members other than results phsync keeps, at most this long each */
#define MEMBER_MAX (4 * 1024 * 1024)

/*
 * A row in a block: uint32 nvalues, then per value: uint8 kind, uint32
 * length, the bytes and a NUL.  (Unaligned reads go through memcpy.)
 */

typedef enum ScanStep
{
	S_START,					/* before the top-level '{' */
	S_KEY_OR_END,				/* in the top object: a key or '}' */
	S_KEY,						/* reading a key string */
	S_COLON,
	S_VALUE,					/* a top-level member's value starts */
	S_COMMA_OR_END,				/* after a member */
	S_RESULTS_START,			/* '[' of results expected */
	S_ROW_OR_END,				/* in results: '[' of a row, or ']' */
	S_ROW_COMMA,				/* after a row: ',' or ']' */
	S_VAL_OR_ROWEND,			/* in a row: a value or ']' */
	S_VAL,						/* in a row: a value after ',' */
	S_VAL_COMMA,				/* after a value: ',' or ']' */
	S_STRING,					/* inside a value string */
	S_STRING_ESC,				/* after a backslash */
	S_STRING_U,					/* in a \uXXXX */
	S_ATOM,						/* a number or literal */
	S_NESTED,					/* inside an array/object value */
	S_NESTED_STRING,
	S_NESTED_ESC,
	S_MEMBER,					/* inside a top-level member we skip or keep */
	S_MEMBER_STRING,
	S_MEMBER_ESC,
	S_DONE,
	S_ERROR
} ScanStep;

struct PhsyncScan
{
	ScanStep	state;
	bool		failed;
	char		error[160];

	/* the top-level member being read */
	char		key[32];
	int			keylen;
	StringInfoData member;		/* malloc'd: the raw text of a member we keep */
	bool		keep_member;
	int			depth;			/* nesting inside a member or a nested value */

	/* kept members, raw JSON text (malloc'd), NULL until seen */
	char	   *columns_json;
	char	   *types_json;
	char	   *timezone_json;
	char	   *detail_json;
	char	   *hasmore_json;	/* "hasMore": only without a LIMIT */
	char	   *tables_json;	/* a DatabaseSchemaQuery's answer */

	/* rows */
	RowBlock   *head;			/* oldest block, the reader's */
	RowBlock   *tail;			/* newest, the writer's */
	size_t		buffered;		/* bytes in blocks */
	int64		nrows;			/* complete rows seen */
	int64		ntaken;			/* rows the reader took */

	/* the row being written: in a scratch buffer until complete */
	char	   *row;
	size_t		rowlen;
	size_t		rowsize;
	uint32		rowvalues;
	size_t		valstart;		/* offset of the current value's length field */
	uint8		valkind;

	/* \uXXXX decoding */
	int			ulen;
	uint32		ucode;
	uint32		uhigh;			/* a pending high surrogate */

	/* the last row written: its block and offset */
	RowBlock   *last_block;
	size_t		last_offset;
};

/*
 * Text PostHog sent (an error's detail, a column name, a raw row) made
 * safe to store and to show: bytes that are not UTF-8 become '?', NUL
 * bytes end it, and in a database whose encoding is not UTF-8 what the
 * encoding cannot hold becomes '?' too.  Without this, one bad byte in an
 * error makes phsync.runs impossible to dump and reload.
 */
char *
foreign_text(const char *s, int len)
{
	char	   *out = palloc(len + 1);
	int			i = 0;
	int			o = 0;

	while (i < len && s[i] != '\0')
	{
		int			l = pg_encoding_verifymbchar(PG_UTF8, s + i, len - i);

		if (l <= 0)
		{
			out[o++] = '?';
			i++;
		}
		else if (l > 1 && GetDatabaseEncoding() != PG_UTF8)
		{
			out[o++] = '?';
			i += l;
		}
		else
		{
			memcpy(out + o, s + i, l);
			o += l;
			i += l;
		}
	}
	out[o] = '\0';
	return out;
}

/* ---------- writing ---------- */

/*
 * The string value being read is not text (a lone surrogate escape): the
 * row is refused by the consumer, the page goes on.
 */
static void
bad_text(PhsyncScan *s)
{
	s->row[s->valstart - 1] = (char) PHSYNC_VALUE_BAD_TEXT;
	s->uhigh = 0;
}

static void
fail(PhsyncScan *s, const char *what)
{
	if (!s->failed)
		snprintf(s->error, sizeof(s->error), "%s", what);
	s->failed = true;
	s->state = S_ERROR;
}

static bool
row_reserve(PhsyncScan *s, size_t more)
{
	if (s->rowlen + more <= s->rowsize)
		return true;
	while (s->rowlen + more > s->rowsize)
		s->rowsize = s->rowsize ? s->rowsize * 2 : 4096;
	s->row = realloc(s->row, s->rowsize);
	if (s->row == NULL)
	{
		fail(s, "out of memory");
		return false;
	}
	return true;
}

static inline void
row_put(PhsyncScan *s, const char *bytes, size_t n)
{
	if (!row_reserve(s, n))
		return;
	memcpy(s->row + s->rowlen, bytes, n);
	s->rowlen += n;
}

static inline void
row_putc(PhsyncScan *s, char c)
{
	if (s->rowlen < s->rowsize || row_reserve(s, 1))
		s->row[s->rowlen++] = c;
}

static void
value_begin(PhsyncScan *s, uint8 kind)
{
	uint32		zero = 0;

	row_putc(s, (char) kind);
	s->valstart = s->rowlen;
	row_put(s, (const char *) &zero, sizeof(zero));
	s->valkind = kind;
}

static void
value_end(PhsyncScan *s)
{
	uint32		len;

	if (s->failed)
		return;
	len = (uint32) (s->rowlen - s->valstart - sizeof(uint32));
	memcpy(s->row + s->valstart, &len, sizeof(len));
	row_putc(s, '\0');
	s->rowvalues++;
}

static void
row_begin(PhsyncScan *s)
{
	uint32		zero = 0;

	s->rowlen = 0;
	s->rowvalues = 0;
	row_put(s, (const char *) &zero, sizeof(zero));
}

/*
 * Blocks of BLOCK_SIZE freed lately, for the next ones: a run goes through
 * hundreds of them, and a fresh one costs a page fault per 4 kB.
 */
#define SPARE_BLOCKS 8
static RowBlock *spare_blocks = NULL;
static int	nspare = 0;

static RowBlock *
block_alloc(size_t size)
{
	RowBlock   *b;

	if (size == BLOCK_SIZE && spare_blocks)
	{
		b = spare_blocks;
		spare_blocks = b->next;
		nspare--;
		return b;
	}
	return malloc(offsetof(RowBlock, data) + size);
}

static void
block_free(RowBlock *b)
{
	if (b->size == BLOCK_SIZE && nspare < SPARE_BLOCKS)
	{
		b->next = spare_blocks;
		spare_blocks = b;
		nspare++;
		return;
	}
	free(b);
}

/*
 * Give the spare blocks back (a run is over), and the pages malloc keeps
 * free to the system: after one large page glibc serves blocks from its
 * heap rather than by mmap, and keeps what was freed there, so without
 * the trim a worker that loaded one big window stays megabytes bigger
 * while it sleeps.
 */
void
scan_trim(void)
{
	while (spare_blocks)
	{
		RowBlock   *b = spare_blocks;

		spare_blocks = b->next;
		free(b);
	}
	nspare = 0;
#ifdef __GLIBC__
	malloc_trim(0);
#endif
}

/*
 * The row in the scratch buffer is complete: append it to the queue.
 */
static void
row_end(PhsyncScan *s)
{
	RowBlock   *b = s->tail;

	if (s->failed)
		return;
	memcpy(s->row, &s->rowvalues, sizeof(uint32));
	if (b == NULL || b->size - b->used < s->rowlen)
	{
		size_t		size = Max(BLOCK_SIZE, s->rowlen);

		b = block_alloc(size);
		if (b == NULL)
		{
			fail(s, "out of memory");
			return;
		}
		b->next = NULL;
		b->size = size;
		b->used = 0;
		b->taken = 0;
		if (s->tail)
			s->tail->next = b;
		else
			s->head = b;
		s->tail = b;
		s->buffered += size;
	}
	memcpy(b->data + b->used, s->row, s->rowlen);
	s->last_block = b;
	s->last_offset = b->used;
	b->used += s->rowlen;
	s->nrows++;
}

/*
 * Append a code point, as UTF-8, to the value being written.
 */
static void
put_codepoint(PhsyncScan *s, uint32 cp)
{
	unsigned char buf[4];

	if (cp == 0)
	{
		/* jsonb refuses \u0000 and PostHog's own exports drop it: so do we */
		return;
	}
	unicode_to_utf8(cp, buf);
	row_put(s, (const char *) buf, pg_utf_mblen(buf));
}

static bool
is_ws(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/*
 * A top-level member's key has been read: keep its value or skip it.
 */
/*
 * Where a top-level member phsync keeps goes (NULL: one it skips).
 */
static char **
member_slot(PhsyncScan *s, const char *key)
{
	if (strcmp(key, "columns") == 0)
		return &s->columns_json;
	if (strcmp(key, "types") == 0)
		return &s->types_json;
	if (strcmp(key, "timezone") == 0)
		return &s->timezone_json;
	if (strcmp(key, "detail") == 0)
		return &s->detail_json;
	if (strcmp(key, "hasMore") == 0)
		return &s->hasmore_json;
	if (strcmp(key, "tables") == 0)
		return &s->tables_json;
	return NULL;
}

static void
member_key_done(PhsyncScan *s)
{
	s->key[s->keylen] = '\0';
	s->keep_member = member_slot(s, s->key) != NULL;
}

static void
member_put(PhsyncScan *s, char c)
{
	if (!s->keep_member)
		return;
	if (s->member.len >= MEMBER_MAX)
	{
		fail(s, "a member of the response is too long");
		return;
	}
	if (s->member.len + 1 >= s->member.maxlen)
	{
		int			newlen = s->member.maxlen ? s->member.maxlen * 2 : 256;
		char	   *d = realloc(s->member.data, newlen);

		if (d == NULL)
		{
			fail(s, "out of memory");
			return;
		}
		s->member.data = d;
		s->member.maxlen = newlen;
	}
	s->member.data[s->member.len++] = c;
	s->member.data[s->member.len] = '\0';
}

static void
member_done(PhsyncScan *s)
{
	char	  **slot = NULL;

	if (!s->keep_member || s->member.len == 0)
		return;
	slot = member_slot(s, s->key);
	if (slot)
	{
		free(*slot);
		*slot = s->member.data;
		s->member.data = NULL;
		s->member.len = s->member.maxlen = 0;
	}
	s->member.len = 0;
}

/*
 * Feed len bytes of the body.  Returns false once the body is known to be
 * bad (scan_error() says why).
 */
/*
 * The first '"' or '\\' in [p, end), or end: eight bytes at a time while
 * none is among them (the bulk of a response is string contents).
 */
static inline const char *
string_run_end(const char *p, const char *end)
{
	const uint64 ones = UINT64CONST(0x0101010101010101);
	const uint64 highs = UINT64CONST(0x8080808080808080);

	while (end - p >= 8)
	{
		uint64		w;
		uint64		q;
		uint64		b;

		memcpy(&w, p, 8);
		q = w ^ (ones * '"');
		b = w ^ (ones * '\\');
		/* a zero byte in q or b: a quote or backslash in these eight */
		if ((((q - ones) & ~q) | ((b - ones) & ~b)) & highs)
			break;
		p += 8;
	}
	while (p < end && *p != '"' && *p != '\\')
		p++;
	return p;
}

/* the character a one-character JSON escape stands for; 0: not one */
static inline char
simple_escape(char c)
{
	switch (c)
	{
		case '"':
		case '\\':
		case '/':
			return c;
		case 'b':
			return '\b';
		case 'f':
			return '\f';
		case 'n':
			return '\n';
		case 'r':
			return '\r';
		case 't':
			return '\t';
		default:
			return 0;
	}
}

bool
scan_feed(PhsyncScan *s, const char *p, size_t len)
{
	const char *end = p + len;

	while (p < end && !s->failed)
	{
		char		c = *p;

		switch (s->state)
		{
			case S_START:
				if (c == '{')
					s->state = S_KEY_OR_END;
				else if (!is_ws(c))
					fail(s, "the response is not a JSON object");
				p++;
				break;

			case S_KEY_OR_END:
			case S_COMMA_OR_END:
				if (c == '"' && s->state == S_KEY_OR_END)
				{
					s->keylen = 0;
					s->state = S_KEY;
				}
				else if (c == ',' && s->state == S_COMMA_OR_END)
					s->state = S_KEY_OR_END;
				else if (c == '}')
					s->state = S_DONE;
				else if (!is_ws(c))
					fail(s, "unexpected character in the response object");
				p++;
				break;

			case S_KEY:
				if (c == '"')
				{
					member_key_done(s);
					s->state = S_COLON;
				}
				else if (c == '\\')
					fail(s, "escaped keys are not expected in the response");
				else if (s->keylen < (int) sizeof(s->key) - 1)
					s->key[s->keylen++] = c;
				else
					s->keylen = sizeof(s->key) - 1;	/* long keys: not ours */
				p++;
				break;

			case S_COLON:
				if (c == ':')
					s->state = strcmp(s->key, "results") == 0 ? S_RESULTS_START : S_VALUE;
				else if (!is_ws(c))
					fail(s, "a ':' is missing in the response object");
				p++;
				break;

			case S_VALUE:
				if (is_ws(c))
				{
					p++;
					break;
				}
				s->member.len = 0;
				s->depth = 0;
				s->state = S_MEMBER;
				break;			/* S_MEMBER reads c */

			case S_MEMBER:
				/* a member value: skipped, or kept as raw text */
				if (c == '"')
				{
					member_put(s, c);
					s->state = S_MEMBER_STRING;
					p++;
					break;
				}
				if (c == '[' || c == '{')
					s->depth++;
				else if (c == ']' || c == '}')
				{
					if (s->depth == 0)
					{
						/* the end of the top-level object */
						member_done(s);
						s->state = S_COMMA_OR_END;
						break;	/* S_COMMA_OR_END reads it */
					}
					s->depth--;
				}
				else if (c == ',' && s->depth == 0)
				{
					member_done(s);
					s->state = S_COMMA_OR_END;
					break;
				}
				if (!is_ws(c) || s->depth > 0)
					member_put(s, c);
				p++;
				break;

			case S_MEMBER_STRING:
				member_put(s, c);
				if (c == '\\')
					s->state = S_MEMBER_ESC;
				else if (c == '"')
					s->state = S_MEMBER;
				p++;
				break;

			case S_MEMBER_ESC:
				member_put(s, c);
				s->state = S_MEMBER_STRING;
				p++;
				break;

			case S_RESULTS_START:
				if (c == '[')
					s->state = S_ROW_OR_END;
				else if (!is_ws(c))
					fail(s, "\"results\" is not an array");
				p++;
				break;

			case S_ROW_OR_END:
			case S_ROW_COMMA:
				if (c == '[' && s->state == S_ROW_OR_END)
				{
					row_begin(s);
					s->state = S_VAL_OR_ROWEND;
				}
				else if (c == ',' && s->state == S_ROW_COMMA)
					s->state = S_ROW_OR_END;
				else if (c == ']')
					s->state = S_COMMA_OR_END;
				else if (!is_ws(c))
					fail(s, "a row of the results is not an array");
				p++;
				break;

			case S_VAL_OR_ROWEND:
			case S_VAL:
				if (is_ws(c))
				{
					p++;
					break;
				}
				if (c == ']' && s->state == S_VAL_OR_ROWEND)
				{
					row_end(s);
					s->state = S_ROW_COMMA;
					p++;
				}
				else if (c == '"')
				{
					value_begin(s, PHSYNC_VALUE_STRING);
					s->uhigh = 0;
					s->state = S_STRING;
					p++;
				}
				else if (c == '[' || c == '{')
				{
					value_begin(s, PHSYNC_VALUE_JSON);
					row_putc(s, c);
					s->depth = 1;
					s->state = S_NESTED;
					p++;
				}
				else if (c == '-' || (c >= '0' && c <= '9'))
				{
					value_begin(s, PHSYNC_VALUE_NUMBER);
					s->state = S_ATOM;
				}
				else if (c == 't' || c == 'f' || c == 'n')
				{
					value_begin(s, c == 'n' ? PHSYNC_VALUE_NULL :
								c == 't' ? PHSYNC_VALUE_TRUE : PHSYNC_VALUE_FALSE);
					s->state = S_ATOM;
				}
				else
					fail(s, "unexpected character in a row of the results");
				break;

			case S_ATOM:
				if (c == ',' || c == ']' || is_ws(c))
				{
					/* check the literal we collected */
					const char *text = s->row + s->valstart + sizeof(uint32);
					size_t		n = s->rowlen - s->valstart - sizeof(uint32);

					if ((s->valkind == PHSYNC_VALUE_NULL && !(n == 4 && memcmp(text, "null", 4) == 0)) ||
						(s->valkind == PHSYNC_VALUE_TRUE && !(n == 4 && memcmp(text, "true", 4) == 0)) ||
						(s->valkind == PHSYNC_VALUE_FALSE && !(n == 5 && memcmp(text, "false", 5) == 0)))
					{
						fail(s, "a value of the results is not valid JSON");
						break;
					}
					value_end(s);
					s->state = S_VAL_COMMA;
					break;		/* S_VAL_COMMA reads c */
				}
				if (!(isalnum((unsigned char) c) || c == '.' || c == '-' || c == '+'))
				{
					fail(s, "a value of the results is not valid JSON");
					break;
				}
				row_putc(s, c);
				p++;
				break;

			case S_VAL_COMMA:
				if (c == ',')
					s->state = S_VAL;
				else if (c == ']')
				{
					row_end(s);
					s->state = S_ROW_COMMA;
				}
				else if (!is_ws(c))
					fail(s, "a ',' is missing in a row of the results");
				p++;
				break;

			case S_STRING:
				{
					/*
					 * Copy the runs between escapes at once, and take the
					 * one-character escapes on the way (properties are JSON
					 * text inside a string: an escaped quote every few bytes).
					 */
					const char *q = p;
					char		e;

					for (;;)
					{
						q = string_run_end(q, end);
						if (q > p)
							row_put(s, p, q - p);
						p = q;
						if (p + 1 >= end || *p != '\\' || (e = simple_escape(p[1])) == 0)
							break;
						if (s->uhigh)
							bad_text(s);
						row_putc(s, e);
						p += 2;
						q = p;
					}
					if (p >= end)
						break;
					c = *p;
					if (c == '"')
					{
						const char *text = s->row + s->valstart + sizeof(uint32);
						size_t		n = s->rowlen - s->valstart - sizeof(uint32);

						/* not text: a row error for the consumer, not a bad page */
						if (s->uhigh || pg_encoding_verifymbstr(PG_UTF8, text, (int) n) != (int) n)
							bad_text(s);
						value_end(s);
						s->state = S_VAL_COMMA;
					}
					else
						s->state = S_STRING_ESC;
					p++;
					break;
				}

			case S_STRING_ESC:
				if (c == 'u')
				{
					s->ulen = 0;
					s->ucode = 0;
					s->state = S_STRING_U;
					p++;
					continue;
				}
				if (simple_escape(c) == 0)
				{
					fail(s, "a string of the results has a bad escape");
					continue;
				}
				row_putc(s, simple_escape(c));
				if (s->uhigh)
					bad_text(s);
				s->state = S_STRING;
				p++;
				break;

			case S_STRING_U:
				{
					int			d;

					if (c >= '0' && c <= '9')
						d = c - '0';
					else if (c >= 'a' && c <= 'f')
						d = c - 'a' + 10;
					else if (c >= 'A' && c <= 'F')
						d = c - 'A' + 10;
					else
					{
						fail(s, "a string of the results has a bad \\u escape");
						break;
					}
					s->ucode = s->ucode * 16 + d;
					p++;
					if (++s->ulen < 4)
						break;
					s->state = S_STRING;
					if (s->ucode >= 0xD800 && s->ucode <= 0xDBFF)
					{
						if (s->uhigh)
							bad_text(s);
						s->uhigh = s->ucode;
					}
					else if (s->ucode >= 0xDC00 && s->ucode <= 0xDFFF)
					{
						if (!s->uhigh)
							bad_text(s);
						else
							put_codepoint(s, 0x10000 + ((s->uhigh - 0xD800) << 10) + (s->ucode - 0xDC00));
						s->uhigh = 0;
					}
					else
					{
						if (s->uhigh)
							bad_text(s);
						put_codepoint(s, s->ucode);
					}
					break;
				}

			case S_NESTED:
				row_putc(s, c);
				if (c == '"')
					s->state = S_NESTED_STRING;
				else if (c == '[' || c == '{')
					s->depth++;
				else if (c == ']' || c == '}')
				{
					if (--s->depth == 0)
					{
						const char *text = s->row + s->valstart + sizeof(uint32);
						size_t		n = s->rowlen - s->valstart - sizeof(uint32);

						/*
						 * Kept as JSON text, but checked as a string is: bytes
						 * that are not UTF-8, or a raw NUL (which would cut the
						 * value short), make the row a bad row, not a value
						 * stored that pg_dump cannot reload.
						 */
						if (pg_encoding_verifymbstr(PG_UTF8, text, (int) n) != (int) n)
							bad_text(s);
						value_end(s);
						s->state = S_VAL_COMMA;
					}
				}
				p++;
				break;

			case S_NESTED_STRING:
				row_putc(s, c);
				if (c == '\\')
					s->state = S_NESTED_ESC;
				else if (c == '"')
					s->state = S_NESTED;
				p++;
				break;

			case S_NESTED_ESC:
				row_putc(s, c);
				s->state = S_NESTED_STRING;
				p++;
				break;

			case S_DONE:
				if (!is_ws(c))
					fail(s, "there is text after the response object");
				p++;
				break;

			case S_ERROR:
				return false;
		}
	}
	return !s->failed;
}

/* ---------- the scan as a whole ---------- */

PhsyncScan *
scan_create(void)
{
	PhsyncScan *s = calloc(1, sizeof(PhsyncScan));

	if (s)
		s->state = S_START;
	return s;
}

void
scan_free(PhsyncScan *s)
{
	RowBlock   *b;

	if (s == NULL)
		return;
	for (b = s->head; b;)
	{
		RowBlock   *next = b->next;

		block_free(b);
		b = next;
	}
	free(s->member.data);
	free(s->columns_json);
	free(s->types_json);
	free(s->timezone_json);
	free(s->detail_json);
	free(s->hasmore_json);
	free(s->tables_json);
	free(s->row);
	free(s);
}

/*
 * Did the whole body arrive, as one complete JSON object?
 */
bool
scan_complete(PhsyncScan *s)
{
	return !s->failed && s->state == S_DONE;
}

const char *
scan_error(PhsyncScan *s)
{
	if (s->failed)
		return s->error;
	return s->state == S_DONE ? NULL : "the body ended early";
}

/* bytes held for rows not taken yet */
size_t
scan_buffered(PhsyncScan *s)
{
	return s->buffered;
}

/* rows seen in all, and rows not taken yet */
int64
scan_rows(PhsyncScan *s)
{
	return s->nrows;
}

int64
scan_pending(PhsyncScan *s)
{
	return s->nrows - s->ntaken;
}

/*
 * The raw JSON text of a kept member ("columns", "types", "timezone",
 * "detail", "hasMore", "tables"), NULL when it has not been seen.
 */
const char *
scan_member(PhsyncScan *s, const char *name)
{
	char	  **slot = member_slot(s, name);

	return slot ? *slot : NULL;
}

/*
 * The length of the encoded row at p.
 */
static size_t
row_length(const char *p)
{
	const char *start = p;
	uint32		n;
	uint32		i;

	memcpy(&n, p, sizeof(n));
	p += sizeof(n);
	for (i = 0; i < n; i++)
	{
		uint32		len;

		p++;
		memcpy(&len, p, sizeof(len));
		p += sizeof(len) + len + 1;
	}
	return p - start;
}

/*
 * The number of values of an encoded row.
 */
static int
row_nvalues(const char *encoded)
{
	uint32		n;

	memcpy(&n, encoded, sizeof(n));
	return (int) n;
}

/*
 * Decode an encoded row into row, whose arrays hold row->capacity values:
 * pointers into the encoded row, NUL-terminated (NULL for JSON null).
 * Returns false when the row has another number of values than capacity.
 */
bool
row_decode(const char *encoded, PhsyncRow *row)
{
	const char *p = encoded;
	uint32		n;
	uint32		i;

	memcpy(&n, p, sizeof(n));
	p += sizeof(n);
	row->nvalues = (int) n;
	if ((int) n != row->capacity)
		return false;
	for (i = 0; i < n; i++)
	{
		uint32		len;
		uint8		kind = (uint8) *p++;

		memcpy(&len, p, sizeof(len));
		p += sizeof(len);
		row->kinds[i] = kind;
		row->lens[i] = len;
		row->values[i] = kind == PHSYNC_VALUE_NULL ? NULL : p;
		p += len + 1;
	}
	return true;
}

/*
 * Take the next complete row, if there is one: *encoded points at it, in
 * memory that stays valid until scan_release() (the last row taken is
 * also copied, for scan_last_row()).
 */
bool
scan_next_row(PhsyncScan *s, const char **encoded)
{
	RowBlock   *b = s->head;
	size_t		n;

	while (b && b->taken >= b->used)
	{
		if (b == s->tail)
			return false;
		b = b->next;
	}
	if (b == NULL)
		return false;
	*encoded = b->data + b->taken;
	n = row_length(*encoded);
	b->taken += n;
	s->ntaken++;
	return true;
}

/*
 * The last row received, encoded (valid until the next scan_release()),
 * or NULL when there was none.  Once the response is complete, it is the
 * keyset position of the next page.
 */
const char *
scan_last_row(PhsyncScan *s)
{
	return s->nrows > 0 ? s->last_block->data + s->last_offset : NULL;
}

/*
 * Free the blocks whose rows were all taken (the rows handed out before
 * become invalid).
 */
void
scan_release(PhsyncScan *s)
{
	while (s->head && s->head->taken >= s->head->used && s->head != s->tail)
	{
		RowBlock   *b = s->head;

		if (b == s->last_block)
			break;				/* keep the last row for scan_last_row() */
		s->head = b->next;
		s->buffered -= b->size;
		block_free(b);
	}
	if (s->head && s->head == s->tail && s->head->taken >= s->head->used &&
		s->head != s->last_block)
		s->head->taken = s->head->used = 0;
}

/*
 * A row with room for capacity values (palloc'd).
 */
PhsyncRow *
row_alloc(int capacity)
{
	PhsyncRow  *row = palloc0(sizeof(PhsyncRow));

	row->capacity = capacity;
	row->values = palloc0(sizeof(char *) * Max(capacity, 1));
	row->lens = palloc0(sizeof(uint32) * Max(capacity, 1));
	row->kinds = palloc0(sizeof(uint8) * Max(capacity, 1));
	return row;
}

/*
 * The whole row as a JSON array, as PostHog sent it (strings re-quoted;
 * bytes that are not UTF-8 as '?'), for phsync.rejects.  Palloc'd.
 */
char *
row_json(const char *encoded)
{
	PhsyncRow  *row = row_alloc(row_nvalues(encoded));
	StringInfoData buf;
	int			i;

	row_decode(encoded, row);
	initStringInfo(&buf);
	appendStringInfoChar(&buf, '[');
	for (i = 0; i < row->nvalues; i++)
	{
		if (i > 0)
			appendStringInfoChar(&buf, ',');
		appendStringInfoString(&buf, row_value_json(row, i));
	}
	appendStringInfoChar(&buf, ']');
	return buf.data;
}

/*
 * The "columns", "types" and "timezone" of a complete response, palloc'd;
 * an error if there are no columns.  Types are matched to columns by
 * position (their names are ClickHouse's, not always the columns').
 */
PhsyncColumns *
scan_columns(PhsyncScan *s)
{
	PhsyncColumns *cols = palloc0(sizeof(PhsyncColumns));
	json_object *columns = s->columns_json ? json_tokener_parse(s->columns_json) : NULL;
	json_object *types = s->types_json ? json_tokener_parse(s->types_json) : NULL;
	json_object *tz = s->timezone_json ? json_tokener_parse(s->timezone_json) : NULL;
	int			i;

	if (columns == NULL || !json_object_is_type(columns, json_type_array))
	{
		if (columns)
			json_object_put(columns);
		if (types)
			json_object_put(types);
		if (tz)
			json_object_put(tz);
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("PostHog sent a response phsync cannot read"),
				 errdetail("The response has no \"columns\" array.")));
	}
	cols->ncolumns = (int) json_object_array_length(columns);
	cols->names = palloc0(sizeof(char *) * (cols->ncolumns + 1));
	cols->chtypes = palloc0(sizeof(char *) * (cols->ncolumns + 1));
	for (i = 0; i < cols->ncolumns; i++)
	{
		json_object *c = json_object_array_get_idx(columns, i);

		cols->names[i] = json_object_is_type(c, json_type_string) ?
			foreign_text(json_object_get_string(c), json_object_get_string_len(c)) :
			foreign_text(json_object_to_json_string_ext(c, JSON_C_TO_STRING_PLAIN),
						 (int) strlen(json_object_to_json_string_ext(c, JSON_C_TO_STRING_PLAIN)));
	}
	/* types: [[name, type], ...] in column order; optional */
	if (types && json_object_is_type(types, json_type_array) &&
		json_object_array_length(types) == (size_t) cols->ncolumns)
	{
		for (i = 0; i < cols->ncolumns; i++)
		{
			json_object *t = json_object_array_get_idx(types, i);
			json_object *tn;

			if (json_object_is_type(t, json_type_array) &&
				json_object_array_length(t) == 2 &&
				(tn = json_object_array_get_idx(t, 1)) != NULL &&
				json_object_is_type(tn, json_type_string))
				cols->chtypes[i] = foreign_text(json_object_get_string(tn), json_object_get_string_len(tn));
		}
	}
	if (tz && json_object_is_type(tz, json_type_string))
		cols->timezone = foreign_text(json_object_get_string(tz), json_object_get_string_len(tz));
	json_object_put(columns);
	if (types)
		json_object_put(types);
	if (tz)
		json_object_put(tz);
	return cols;
}

/*
 * The JSON text of value i, as PostHog sent it (strings re-quoted), for
 * phsync.rejects and for keyset values.  Palloc'd.
 */
char *
row_value_json(PhsyncRow *row, int i)
{
	StringInfoData buf;
	const char *v = row->values[i];

	switch (row->kinds[i])
	{
		case PHSYNC_VALUE_NULL:
			return pstrdup("null");
		case PHSYNC_VALUE_STRING:
		case PHSYNC_VALUE_BAD_TEXT:
			initStringInfo(&buf);
			escape_json(&buf, foreign_text(v, (int) row->lens[i]));
			return buf.data;
		default:
			return foreign_text(v, (int) row->lens[i]);
	}
}

/* ---------- PostHog's types as PostgreSQL's ---------- */

/*
 * The PostgreSQL type phsync stores a result column of ClickHouse type
 * chtype as (a type name for CREATE TABLE).  Nullable() and
 * LowCardinality() are looked through; date-times are instants
 * (timestamptz: PostHog renders them with the project's offset); integers
 * get a type that holds their whole range; arrays, maps, tuples and JSON
 * become jsonb, and so does a String column named properties (PostHog
 * sends JSON text there).  Anything unknown is text.
 */
const char *
pg_type_for_clickhouse(const char *chtype, const char *column)
{
	char		base[256];
	const char *p = chtype ? chtype : "";
	size_t		n;

	/* look through wrappers */
	for (;;)
	{
		if (strncmp(p, "Nullable(", 9) == 0)
			p += 9;
		else if (strncmp(p, "LowCardinality(", 15) == 0)
			p += 15;
		else
			break;
	}
	strlcpy(base, p, sizeof(base));
	n = strcspn(base, "(),");
	if (strncmp(base, "DateTime", 8) == 0)
		return "timestamptz";
	if (strncmp(base, "Date", 4) == 0)
		return "date";
	if (strcmp(base, "UUID") == 0 || strncmp(base, "UUID)", 5) == 0)
		return "uuid";
	if (strncmp(base, "Bool", 4) == 0)
		return "boolean";
	if (n == 4 && strncmp(base, "Int8", 4) == 0)
		return "smallint";
	if ((n == 5 && strncmp(base, "Int16", 5) == 0) || (n == 5 && strncmp(base, "UInt8", 5) == 0))
		return "smallint";
	if ((n == 5 && strncmp(base, "Int32", 5) == 0) || (n == 6 && strncmp(base, "UInt16", 6) == 0))
		return "integer";
	if ((n == 5 && strncmp(base, "Int64", 5) == 0) || (n == 6 && strncmp(base, "UInt32", 6) == 0))
		return "bigint";
	if (strncmp(base, "Int", 3) == 0 || strncmp(base, "UInt", 4) == 0 ||
		strncmp(base, "Decimal", 7) == 0)
		return "numeric";
	if (strncmp(base, "Float32", 7) == 0)
		return "real";
	if (strncmp(base, "Float", 5) == 0)
		return "double precision";
	if (strncmp(base, "Array", 5) == 0 || strncmp(base, "Map", 3) == 0 ||
		strncmp(base, "Tuple", 5) == 0 || strncmp(base, "JSON", 4) == 0 ||
		strncmp(base, "Object", 6) == 0)
		return "jsonb";
	if (column && (strcmp(column, "properties") == 0 ||
				   (strlen(column) > 11 && strcmp(column + strlen(column) - 11, "_properties") == 0)))
		return "jsonb";
	return "text";
}

/*
 * The PostgreSQL type for a field type of PostHog's database schema
 * (DatabaseSchemaQuery: integer, float, decimal, string, datetime, date,
 * boolean, json, array; NULL for what is not a column, such as a lazy
 * table).
 */
const char *
pg_type_for_schema_field(const char *fieldtype, const char *column)
{
	if (fieldtype == NULL)
		return NULL;
	if (strcmp(fieldtype, "integer") == 0)
		return "bigint";
	if (strcmp(fieldtype, "float") == 0)
		return "double precision";
	if (strcmp(fieldtype, "decimal") == 0)
		return "numeric";
	if (strcmp(fieldtype, "datetime") == 0)
		return "timestamptz";
	if (strcmp(fieldtype, "date") == 0)
		return "date";
	if (strcmp(fieldtype, "boolean") == 0)
		return "boolean";
	if (strcmp(fieldtype, "json") == 0 || strcmp(fieldtype, "array") == 0)
		return "jsonb";
	if (strcmp(fieldtype, "string") == 0 || strcmp(fieldtype, "unknown") == 0)
		return pg_type_for_clickhouse("String", column);
	return NULL;
}
