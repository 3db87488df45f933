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
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "datatype/timestamp.h"
#include "pgtime.h"
#include "utils/datetime.h"
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
 * The first scheduled slot strictly after t.
 */
TimestampTz
schedule_slot_after(TimestampTz t)
{
	pg_tz	   *tz = settings_timezone();
	int64		run_at = (int64) settings_run_at_seconds() * USECS_PER_SEC;
	int64		step = (int64) phsync_interval * USECS_PER_SEC;
	int			days = phsync_interval / SECS_PER_DAY;
	int			epoch = date2j(2000, 1, 1);
	int			today;
	int			j;

	if (TIMESTAMP_NOT_FINITE(t))
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("timestamp out of range")));

	if (phsync_interval % SECS_PER_DAY != 0)
	{
		/* a sub-day or odd interval: fixed steps from run_at on 2000-01-01 */
		TimestampTz anchor = local_instant(run_at, tz);
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
		slot = local_instant((int64) (j - POSTGRES_EPOCH_JDATE) * USECS_PER_DAY + run_at, tz);
		if (slot > t)
			return slot;
	}
}
