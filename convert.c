/*-------------------------------------------------------------------------
 *
 * convert.c
 *		PostHog's values as PostgreSQL's: the date-time text PostHog writes,
 *		read in one place.
 *
 * PostHog renders a DateTime as RFC 3339 in the project's time zone
 * (2026-11-02T08:34:05.123456+05:30, 2026-11-02T03:04:05Z, the fraction
 * left out when zero) and a Date as 2026-11-02.  convert_timestamp() reads
 * those, and the ISO 8601 forms around them (a space for the T, an offset
 * of hours only or with seconds, none at all for UTC), without raising an
 * error: a cursor that does not read is a bad row, not a failed run.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "datatype/timestamp.h"
#include "utils/datetime.h"
#include "utils/timestamp.h"

#include "phsync.h"

/* n decimal digits at *p (advanced past them); -1 when they are not there */
static int
digits(const char **p, const char *end, int n)
{
	int			v = 0;

	if (end - *p < n)
		return -1;
	for (; n > 0; n--, (*p)++)
	{
		if (**p < '0' || **p > '9')
			return -1;
		v = v * 10 + (**p - '0');
	}
	return v;
}

/*
 * Read date-time text s (len bytes) as PostHog writes it: *result is the
 * instant (a date alone: its midnight in UTC, with *date_only set).
 * Returns false, without an error, for anything else: another format, a
 * field out of range, a time outside PostgreSQL's range.  Fractions finer
 * than a microsecond are truncated (*exact tells: false when digits were
 * dropped, so that a caller that stores the value can leave it to the
 * type's own input function, which rounds).
 */
bool
convert_timestamp(const char *s, size_t len, TimestampTz *result, bool *date_only, bool *exact)
{
	const char *p = s;
	const char *end = s + len;
	int			y,
				mo,
				d,
				h = 0,
				mi = 0,
				sec = 0;
	int64		usec = 0;
	int64		offset = 0;		/* seconds east of UTC */
	int64		days;

	*date_only = false;
	*exact = true;
	if ((y = digits(&p, end, 4)) < 1 || p >= end || *p++ != '-' ||
		(mo = digits(&p, end, 2)) < 1 || mo > 12 || p >= end || *p++ != '-' ||
		(d = digits(&p, end, 2)) < 1 || d > day_tab[isleap(y)][mo - 1])
		return false;
	if (p == end)
		*date_only = true;
	else
	{
		if (*p != 'T' && *p != 't' && *p != ' ')
			return false;
		p++;
		if ((h = digits(&p, end, 2)) < 0 || h > 23 || p >= end || *p++ != ':' ||
			(mi = digits(&p, end, 2)) < 0 || mi > 59)
			return false;
		if (p < end && *p == ':')
		{
			p++;
			if ((sec = digits(&p, end, 2)) < 0 || sec > 59)
				return false;
			if (p < end && (*p == '.' || *p == ','))
			{
				int			n = 0;

				for (p++; p < end && *p >= '0' && *p <= '9'; p++, n++)
				{
					if (n < 6)
						usec = usec * 10 + (*p - '0');
					else if (*p != '0')
						*exact = false;
				}
				if (n == 0)
					return false;
				for (; n < 6; n++)
					usec *= 10;
			}
		}
		if (p < end && (*p == 'Z' || *p == 'z'))
			p++;
		else if (p < end && (*p == '+' || *p == '-'))
		{
			int			sign = *p++ == '-' ? -1 : 1;
			int			oh,
						om = 0,
						os = 0;

			if ((oh = digits(&p, end, 2)) < 0 || oh > 15)
				return false;
			if (p < end && *p == ':')
				p++;
			if (p < end && (om = digits(&p, end, 2)) < 0)
				return false;
			if (p < end && *p == ':')
			{
				p++;
				if ((os = digits(&p, end, 2)) < 0)
					return false;
			}
			if (om > 59 || os > 59)
				return false;
			offset = sign * (oh * 3600 + om * 60 + os);
		}
		if (p != end)
			return false;
	}
	days = (int64) date2j(y, mo, d) - POSTGRES_EPOCH_JDATE;
	*result = days * USECS_PER_DAY +
		((int64) h * 3600 + mi * 60 + sec - offset) * USECS_PER_SEC + usec;
	return IS_VALID_TIMESTAMP(*result);
}
