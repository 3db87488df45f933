/*-------------------------------------------------------------------------
 *
 * schedule.c
 *		When scheduled runs are due: phsync.run_at, a time of day in
 *		phsync.timezone, every phsync.interval.
 *
 * With an interval of whole days, the run is at run_at local time on every
 * day whose number since 2000-01-01 is a multiple of the interval, whatever
 * the daylight-saving rules do:
 *	- a run_at that does not exist that day (the clocks jump from 02:00 to
 *	  03:00 and run_at is 02:30) runs once, at the first valid moment after
 *	  it (03:00);
 *	- a run_at that exists twice (the clocks go back from 02:00 to 01:00 and
 *	  run_at is 01:30) runs once, at the moment PostgreSQL itself gives that
 *	  local time.
 * Shorter intervals are plain arithmetic from run_at on 2000-01-01.
 *
 * A sync may have its own schedule instead: five cron fields, read in
 * phsync.timezone's wall clock (a slot in a spring-forward gap runs at the
 * gap's end), or an interval counted the same way from midnight.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "datatype/timestamp.h"
#include "pgtime.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/fmgrprotos.h"
#include "utils/timestamp.h"

#include "phsync.h"

/* how far a daylight-saving gap may reach (some zones moved by 24 hours) */
#define GAP_SEARCH_USECS (26 * USECS_PER_HOUR)

/*
 * The local wall-clock time of instant t, as a timestamp without time zone.
 */
static Timestamp
wall_clock(TimestampTz t, pg_tz *tz)
{
	struct pg_tm tm;
	fsec_t		fsec;
	int			tzoff;
	Timestamp	result;

	if (timestamp2tm(t, &tzoff, &tm, &fsec, NULL, tz) != 0 ||
		tm2timestamp(&tm, fsec, NULL, &result) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("timestamp out of range")));
	return result;
}

/*
 * The instant of local time `local` (a timestamp without time zone) in tz;
 * when it falls in a gap, the first instant after the gap.
 */
static TimestampTz
local_instant(Timestamp local, pg_tz *tz)
{
	struct pg_tm tm;
	fsec_t		fsec;
	int			offset;
	TimestampTz guess;
	TimestampTz lo,
				hi;

	if (timestamp2tm(local, NULL, &tm, &fsec, NULL, NULL) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("timestamp out of range")));
	offset = DetermineTimeZoneOffset(&tm, tz);	/* seconds west of UTC */
	guess = local + (int64) offset * USECS_PER_SEC;
	if (wall_clock(guess, tz) == local)
		return guess;

	/*
	 * A gap: the wall clock never shows `local`.  Find the first instant
	 * whose wall clock is past it (the end of the gap); around a spring
	 * forward the wall clock only grows, so bisection finds it.
	 */
	lo = guess - GAP_SEARCH_USECS;
	hi = guess + GAP_SEARCH_USECS;
	while (hi - lo > USECS_PER_SEC)
	{
		TimestampTz mid = lo + (hi - lo) / 2;

		if (wall_clock(mid, tz) >= local)
			hi = mid;
		else
			lo = mid;
	}
	/* transitions happen on whole seconds */
	return hi - (hi % USECS_PER_SEC + USECS_PER_SEC) % USECS_PER_SEC;
}

/* local midnight of the day of wall-clock time w, as wall-clock time */
static Timestamp
midnight(Timestamp w)
{
	return w - ((w % USECS_PER_DAY) + USECS_PER_DAY) % USECS_PER_DAY;
}

/*
 * The start (local midnight in phsync.timezone) of the day days_before days
 * before the day of t.
 */
TimestampTz
schedule_day_start(TimestampTz t, int days_before)
{
	return local_instant(midnight(wall_clock(t, settings_timezone())) -
						 (int64) days_before * USECS_PER_DAY, settings_timezone());
}

/*
 * The first slot strictly after t of a schedule that starts at local time
 * `first` (microseconds after midnight) on 2000-01-01 and repeats every
 * `interval` seconds; whole days follow the local calendar.
 */
static TimestampTz
slot_after(TimestampTz t, int64 first, int64 interval)
{
	pg_tz	   *tz = settings_timezone();
	int64		step = interval * USECS_PER_SEC;
	int64		days = interval / SECS_PER_DAY;
	int			epoch = date2j(2000, 1, 1);
	int			today;
	int			j;

	if (TIMESTAMP_NOT_FINITE(t))
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("timestamp out of range")));

	if (interval % SECS_PER_DAY != 0)
	{
		/* a sub-day or odd interval: fixed steps from `first` on 2000-01-01 */
		TimestampTz anchor = local_instant(first, tz);
		int64		k;

		if (t < anchor)
			k = -((anchor - t) / step);
		else
			k = (t - anchor) / step + 1;
		while (anchor + k * step <= t)
			k++;
		return anchor + k * step;
	}

	/* a day's local date (Julian day) */
	today = (int) (midnight(wall_clock(t, tz)) / USECS_PER_DAY) + POSTGRES_EPOCH_JDATE;

	for (j = today - 1;; j++)
	{
		TimestampTz slot;

		if (((j - epoch) % days + days) % days != 0)
			continue;
		slot = local_instant((int64) (j - POSTGRES_EPOCH_JDATE) * USECS_PER_DAY + first, tz);
		if (slot > t)
			return slot;
	}
}

/*
 * The first slot of the global schedule (phsync.run_at, phsync.interval)
 * strictly after t.
 */
TimestampTz
schedule_slot_after(TimestampTz t)
{
	return slot_after(t, (int64) settings_run_at_seconds() * USECS_PER_SEC, phsync_interval);
}

/* ---------- a sync's own schedule: cron or an interval ---------- */

/* how far ahead a cron expression is searched (29 February on a Monday) */
#define CRON_SEARCH_DAYS (366 * 28)

typedef struct CronField
{
	const char *name;
	int			min;
	int			max;
	const char *const *words;	/* names for min, min + 1, ... (or NULL) */
} CronField;

static const char *const month_words[] = {"jan", "feb", "mar", "apr", "may", "jun", "jul",
"aug", "sep", "oct", "nov", "dec", NULL};
static const char *const day_words[] = {"sun", "mon", "tue", "wed", "thu", "fri", "sat", NULL};

static const CronField cron_fields[5] = {
	{"minute", 0, 59, NULL},
	{"hour", 0, 23, NULL},
	{"day of month", 1, 31, NULL},
	{"month", 1, 12, month_words},
	{"day of week", 0, 7, day_words},
};

/* one number or name of a cron field; false if there is none at *p */
static bool
cron_value(const char **p, const CronField *f, int *value)
{
	const char *s = *p;

	if (isdigit((unsigned char) *s))
	{
		long		v = 0;

		while (isdigit((unsigned char) *s) && v <= 1000)
			v = v * 10 + (*s++ - '0');
		*value = (int) v;
		*p = s;
		return true;
	}
	if (f->words)
	{
		int			i;

		for (i = 0; f->words[i]; i++)
			if (pg_strncasecmp(s, f->words[i], 3) == 0)
			{
				*value = f->min + i;
				*p = s + 3;
				return true;
			}
	}
	return false;
}

/*
 * Parse one cron field (a list of *, n, a-b, each with an optional /step)
 * into a bit per allowed value; *star says whether it was a plain "*".
 */
static bool
cron_field(const char *text, const CronField *f, uint64 *bits, bool *star, char **why)
{
	const char *p = text;

	*bits = 0;
	*star = strcmp(text, "*") == 0;
	for (;;)
	{
		int			lo,
					hi,
					step = 1,
					v;

		if (*p == '*')
		{
			lo = f->min;
			hi = f->max;
			p++;
		}
		else if (cron_value(&p, f, &lo))
		{
			hi = lo;
			if (*p == '-')
			{
				p++;
				if (!cron_value(&p, f, &hi))
					break;
			}
		}
		else
			break;
		if (*p == '/')
		{
			p++;
			if (!cron_value(&p, &cron_fields[0], &step) || step < 1)
				break;
			if (hi == lo)
				hi = f->max;
		}
		if (lo < f->min || hi > f->max || lo > hi)
		{
			*why = psprintf("The %s field \"%s\" is outside %d-%d.", f->name, text, f->min, f->max);
			return false;
		}
		for (v = lo; v <= hi; v += step)
			*bits |= UINT64CONST(1) << v;
		if (*p == '\0')
			return true;
		if (*p++ != ',')
			break;
	}
	*why = psprintf("The %s field \"%s\" is not a list of *, numbers, ranges (a-b) and steps (/n).",
					f->name, text);
	return false;
}

static bool
parse_cron(const char *text, PhsyncSchedule *s, char **why)
{
	char	   *copy = pstrdup(text);
	char	   *fields[5];
	char	   *save = NULL;
	char	   *tok;
	uint64		bits[5];
	bool		star[5];
	int			n = 0;
	int			i;

	for (tok = strtok_r(copy, " \t", &save); tok; tok = strtok_r(NULL, " \t", &save))
	{
		if (n == 5)
			return false;
		fields[n++] = tok;
	}
	if (n != 5)
		return false;
	for (i = 0; i < 5; i++)
		if (!cron_field(fields[i], &cron_fields[i], &bits[i], &star[i], why))
			return true;		/* a cron expression, a wrong one */
	s->kind = PHSYNC_SCHEDULE_CRON;
	s->minutes = bits[0];
	s->hours = (uint32) bits[1];
	s->mdays = (uint32) bits[2];
	s->months = (uint16) bits[3];
	/* 7 is Sunday too */
	s->wdays = (uint8) ((bits[4] | (bits[4] >> 7)) & 0x7F);
	s->mday_star = star[2];
	s->wday_star = star[4];
	return true;
}

/*
 * Parse a sync's schedule: five cron fields (minute hour day-of-month
 * month day-of-week, as crontab and pg_cron), one of @hourly, @daily,
 * @weekly, @monthly, @yearly, or an interval ('15 minutes') counted from
 * midnight.  NULL or '' is the global schedule.  Errors say what is wrong.
 */
void
schedule_parse(const char *text, PhsyncSchedule *s)
{
	static const struct
	{
		const char *alias;
		const char *cron;
	}			aliases[] = {
		{"@hourly", "0 * * * *"}, {"@daily", "0 0 * * *"}, {"@midnight", "0 0 * * *"},
		{"@weekly", "0 0 * * 0"}, {"@monthly", "0 0 1 * *"}, {"@yearly", "0 0 1 1 *"},
		{"@annually", "0 0 1 1 *"},
	};
	char	   *why = NULL;
	int			i;

	memset(s, 0, sizeof(*s));
	if (text == NULL || text[0] == '\0')
		return;					/* PHSYNC_SCHEDULE_GLOBAL */
	for (i = 0; i < (int) lengthof(aliases); i++)
		if (pg_strcasecmp(text, aliases[i].alias) == 0)
			text = aliases[i].cron;

	if (parse_cron(text, s, &why) && why == NULL)
		return;
	if (why == NULL && text[0] != '@')
	{
		Interval   *iv = DatumGetIntervalP(DirectFunctionCall3(interval_in, CStringGetDatum(text),
															   ObjectIdGetDatum(InvalidOid),
															   Int32GetDatum(-1)));
		int64		secs = iv->time / USECS_PER_SEC + (int64) iv->day * SECS_PER_DAY;

		if (iv->month != 0 || iv->time % USECS_PER_SEC != 0)
			why = pstrdup("An interval schedule is whole seconds, days at most: months vary in length (use cron for monthly runs).");
		else if (secs < 1 || secs > INT_MAX)
			why = pstrdup("An interval schedule is at least 1 second and at most 68 years.");
		else
		{
			s->kind = PHSYNC_SCHEDULE_INTERVAL;
			s->interval = secs;
			return;
		}
	}
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("invalid schedule \"%s\"", text),
			 why ? errdetail("%s", why) : 0,
			 errhint("Use five cron fields (minute hour day-of-month month day-of-week) such as '30 3 * * *', or an interval such as '15 minutes'; NULL follows phsync.run_at and phsync.interval.")));
}

/* whether a cron schedule runs on local date (y, m, d) */
static bool
cron_day(const PhsyncSchedule *s, int y, int m, int d)
{
	bool		mday = (s->mdays >> d) & 1;
	bool		wday = (s->wdays >> j2day(date2j(y, m, d))) & 1;

	if (!((s->months >> m) & 1))
		return false;
	/* crontab's rule: with both days restricted, either one will do */
	if (s->mday_star || s->wday_star)
		return mday && wday;
	return mday || wday;
}

static TimestampTz
cron_after(const PhsyncSchedule *s, TimestampTz t)
{
	pg_tz	   *tz = settings_timezone();
	Timestamp	now = wall_clock(t, tz);
	Timestamp	day = midnight(now) - USECS_PER_DAY;
	int			n;

	for (n = 0; n < CRON_SEARCH_DAYS; n++, day += USECS_PER_DAY)
	{
		struct pg_tm tm;
		fsec_t		fsec;
		int			h,
					m;

		if (timestamp2tm(day, NULL, &tm, &fsec, NULL, NULL) != 0)
			break;
		if (!cron_day(s, tm.tm_year, tm.tm_mon, tm.tm_mday))
			continue;
		for (h = 0; h < 24; h++)
		{
			if (!((s->hours >> h) & 1))
				continue;
			for (m = 0; m < 60; m++)
			{
				Timestamp	local = day + h * USECS_PER_HOUR + m * USECS_PER_MINUTE;
				TimestampTz slot;

				if (!((s->minutes >> m) & 1) || local + GAP_SEARCH_USECS < now)
					continue;
				slot = local_instant(local, tz);
				if (slot > t)
					return slot;
			}
		}
	}
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("the schedule never runs"),
			 errdetail("No day in the next %d years matches its day and month fields.",
					   CRON_SEARCH_DAYS / 366)));
	return 0;					/* keep the compiler quiet */
}

/*
 * When a sync's next scheduled run is due: the first slot after its last
 * scheduled run (`last`, 0 if none), so that a restart neither repeats a
 * run nor skips one, and runs missed while the server was down collapse
 * into one; with none yet, the first slot after `base` (the latest of when
 * the worker started or re-read its settings, took the database over, and
 * the sync was added).  Never a slot at or before `attempt`, when this
 * worker last tried it (a run that could not even write its row).
 */
TimestampTz
schedule_sync_due(const char *schedule, TimestampTz last, TimestampTz attempt,
				  TimestampTz base)
{
	PhsyncSchedule s;

	schedule_parse(schedule, &s);
	return schedule_next(&s, Max(last ? last : base, attempt));
}

/*
 * The length of the schedule's period that follows t (for "stale": no
 * success for two of them).
 */
TimestampTz
schedule_period(const char *schedule, TimestampTz t)
{
	PhsyncSchedule s;
	TimestampTz first;

	schedule_parse(schedule, &s);
	first = schedule_next(&s, t);
	return schedule_next(&s, first) - first;
}

/*
 * The first slot of schedule s strictly after t.
 */
TimestampTz
schedule_next(const PhsyncSchedule *s, TimestampTz t)
{
	switch (s->kind)
	{
		case PHSYNC_SCHEDULE_CRON:
			return cron_after(s, t);
		case PHSYNC_SCHEDULE_INTERVAL:
			return slot_after(t, 0, s->interval);
		default:
			return schedule_slot_after(t);
	}
}
