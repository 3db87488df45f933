/*-------------------------------------------------------------------------
 *
 * shmem.c
 *		The shared-memory protocol between sessions and the worker.
 *
 * One struct, one spinlock.  Every section that takes the lock is a
 * function of this file; nothing else touches the struct.
 *
 * The request queue.  Sessions (phsync_run_now(), phsync_verify()) hand
 * the worker requests in slots, each going through
 *
 *	  NONE --submit--> PENDING --take--> TAKEN --answer--> ANSWERED --read--> NONE
 *
 *	- submit: a session, into any free slot, whatever the worker is doing:
 *	  a request made while a run is in progress waits for it.  It records
 *	  its latch, so that the worker can wake it.  With every slot taken
 *	  (PHSYNC_MAX_REQUESTS sessions waiting) the session is refused.
 *	- take: the worker, between runs, one request at a time; the worker is
 *	  then busy.  Requesters are served in turn: the pending request of the
 *	  next role after the one served last (by OID, wrapping), its oldest
 *	  first, so that one role's sessions never keep another's waiting
 *	  behind all of theirs.
 *	- answer: the worker, when the request's runs are over.  If the session
 *	  gave up meanwhile (it was cancelled), the answer is dropped and the
 *	  slot goes straight back to NONE.
 *	- read: the session that asked, once it sees its ticket answered.
 *	- withdraw: a session that stops waiting (it was cancelled: a
 *	  statement timeout, Ctrl-C).  A PENDING request is simply removed; a
 *	  TAKEN one is marked cancelled, which stops its runs, as cancelling a
 *	  statement stops its work; an ANSWERED one is forgotten.
 *	- A session that died before reading its answer leaves ANSWERED behind;
 *	  the next submit finds its pid gone and frees the slot.
 *	- If the worker exits with a request TAKEN (shutdown, crash of the
 *	  worker alone), its exit callback answers it with an error, so that
 *	  the session does not wait for a run that will never end.
 *
 * Cancelling a run (phsync_cancel(), or the session that asked for it
 * giving up): the canceller stores the run's id in cancel_run (or sets
 * request_cancelled), wakes the worker, and sends it SIGINT, as
 * pg_cancel_backend() does, so that a run waiting inside PostgreSQL (for
 * a lock, in a target's trigger) stops too.  The worker polls
 * shmem_cancel_pending() wherever it waits or loops, including libcurl's
 * progress callback, which must not take a lock or raise an error: those
 * two fields are atomics, read without the spinlock.  Between runs the
 * worker holds cancel interrupts off (see shmem_worker_cancellable()): a
 * SIGINT that arrives late, or pg_cancel_backend() of an idle worker,
 * cancels nothing, as for an idle backend.
 *
 * Request budgets (retry.c): one per PostHog key, shared by the worker and
 * the sessions that query PostHog, under their own LWLock (keeping a
 * budget's windows current can take a few thousand steps).
 *
 * Besides: the worker's pid and latch (0/NULL while none is attached),
 * when its next scheduled run is due, the run in progress (id, sync,
 * pages, rows received) for phsync.status and progress notices, and
 * whether the last attempt to connect to phsync.database failed.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>

#include "access/xact.h"
#include "miscadmin.h"
#include "port/atomics.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/procarray.h"
#include "storage/shmem.h"
#include "storage/spin.h"

#include "phsync.h"

typedef enum RequestState
{
	REQUEST_NONE,
	REQUEST_PENDING,
	REQUEST_TAKEN,
	REQUEST_ANSWERED
} RequestState;

/* how many sessions may wait for the worker at once */
#define PHSYNC_MAX_REQUESTS 64

typedef struct RequestSlot
{
	RequestState state;
	uint64		ticket;
	PhsyncRequest request;
	pid_t		requester_pid;
	Latch	   *requester_latch;	/* NULL once its session gave up */
	bool		cancelled;		/* the session gave up on it, TAKEN */
	PhsyncAnswer answer;
} RequestSlot;

typedef struct PhsyncShared
{
	slock_t		mutex;

	/* the worker */
	pid_t		worker_pid;		/* 0 while none is attached */
	Latch	   *worker_latch;
	TimestampTz next_due;		/* next scheduled run, 0 if unknown */
	TimestampTz schedule_base;	/* see worker.c */
	bool		connect_failed; /* the last start could not connect */
	int			starts;			/* of the worker, since the server started */
	bool		restart_planned;	/* its last exit was to start again */
	char		role_problem[PHSYNC_MAX_MESSAGE];	/* what phsync.role lacks, or "" */
	char		role_fix[PHSYNC_MAX_MESSAGE];	/* the GRANTs that fix it */

	/* the request queue */
	uint64		ticket;			/* the last request submitted */
	int			taken;			/* the slot TAKEN, or -1 */
	Oid			served;			/* the requester served last */
	RequestSlot requests[PHSYNC_MAX_REQUESTS];

	/* cancelling: read without the lock (see the top of this file) */
	pg_atomic_uint32 request_cancelled;	/* == the TAKEN slot's cancelled */
	pg_atomic_uint64 cancel_run;	/* a run phsync_cancel() stops */

	/* the run in progress */
	bool		busy;			/* a run of any kind */
	int64		run_id;			/* its phsync.runs id, once known */
	char		sync[NAMEDATALEN];
	int			pages;
	int64		received;
	TimestampTz waiting_until;	/* it waits for a throttle until then, or 0 */

	/* request budgets, under budget_lock */
	LWLock	   *budget_lock;
	PhsyncBudget budgets[PHSYNC_BUDGETS];

	/* the roles that own syncs, as the worker last read them (roles.c) */
	bool		owners_known;
	bool		owners_overflow;	/* more than PHSYNC_MAX_OWNERS */
	int			nowners;
	Oid			owners[PHSYNC_MAX_OWNERS];
	pg_atomic_uint32 owners_changed;	/* phsync.syncs changed since */
} PhsyncShared;

static PhsyncShared *shared = NULL;

/* in the worker: the run in progress, and whether a session asked for it */
static int64 my_run_id = 0;
static bool my_request = false;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

static void
shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(PhsyncShared)));
	RequestNamedLWLockTranche("phsync", 1);
}

static void
shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	shared = ShmemInitStruct("phsync", sizeof(PhsyncShared), &found);
	if (!found)
	{
		memset(shared, 0, sizeof(PhsyncShared));
		SpinLockInit(&shared->mutex);
		shared->taken = -1;
		pg_atomic_init_u32(&shared->request_cancelled, 0);
		pg_atomic_init_u64(&shared->cancel_run, 0);
		pg_atomic_init_u32(&shared->owners_changed, 1);
		shared->budget_lock = &(GetNamedLWLockTranche("phsync"))->lock;
	}
	LWLockRelease(AddinShmemInitLock);
}

/*
 * Install the shared memory hooks (from _PG_init, while preloading).
 */
void
shmem_install_hooks(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = shmem_startup;
}

/*
 * Is phsync's shared memory there (was the library preloaded)?
 */
bool
shmem_available(void)
{
	return shared != NULL;
}

/* ---------- the worker's side ---------- */

/*
 * Store an answer to the TAKEN request (lock held) and return the latch
 * of whoever asked, to be set once the lock is released.  A session that
 * gave up reads nothing, so the slot is free at once.
 */
static Latch *
store_answer(const PhsyncAnswer *answer)
{
	RequestSlot *slot = &shared->requests[shared->taken];
	Latch	   *requester = slot->requester_latch;

	Assert(slot->state == REQUEST_TAKEN);
	slot->answer = *answer;
	slot->answer.ticket = slot->ticket;
	slot->state = requester ? REQUEST_ANSWERED : REQUEST_NONE;
	slot->requester_latch = NULL;
	slot->cancelled = false;
	shared->taken = -1;
	pg_atomic_write_u32(&shared->request_cancelled, 0);
	my_request = false;
	return requester;
}

/* the slot of request `ticket` (lock held), or NULL */
static RequestSlot *
find_request(uint64 ticket)
{
	for (int i = 0; i < PHSYNC_MAX_REQUESTS; i++)
		if (shared->requests[i].state != REQUEST_NONE && shared->requests[i].ticket == ticket)
			return &shared->requests[i];
	return NULL;
}

/*
 * Worker exit (shutdown, pg_terminate_backend, FATAL): leave the struct
 * clean, and answer a request cut short.
 */
static void
worker_detach(int code, Datum arg)
{
	Latch	   *requester = NULL;

	SpinLockAcquire(&shared->mutex);
	if (shared->taken >= 0)
	{
		PhsyncAnswer cut;

		memset(&cut, 0, sizeof(cut));
		cut.run_id = cut.last_run_id = cut.failed_run_id = shared->run_id;
		strlcpy(cut.failed_sync, shared->sync, NAMEDATALEN);
		cut.sqlerrcode = ERRCODE_ADMIN_SHUTDOWN;
		strlcpy(cut.message, "the phsync worker stopped before the run finished",
				sizeof(cut.message));
		strlcpy(cut.hint, "The next run resumes from the table's watermark; call phsync_run_now() again.",
				sizeof(cut.hint));
		requester = store_answer(&cut);
	}
	shared->worker_pid = 0;
	shared->worker_latch = NULL;
	shared->busy = false;
	shared->run_id = 0;
	shared->sync[0] = '\0';
	SpinLockRelease(&shared->mutex);
	if (requester)
		SetLatch(requester);
}

/*
 * The worker announces itself (once connected to its database).
 */
void
shmem_worker_attach(void)
{
	SpinLockAcquire(&shared->mutex);
	shared->worker_pid = MyProcPid;
	shared->worker_latch = MyLatch;
	shared->busy = false;
	shared->run_id = 0;
	SpinLockRelease(&shared->mutex);
	on_shmem_exit(worker_detach, (Datum) 0);
}

/*
 * The worker starts.  Returns whether it starts again after a failure
 * (an error that ended the last one), rather than for the first time or
 * after a restart it planned.
 */
bool
shmem_worker_starting(void)
{
	bool		after_failure;

	SpinLockAcquire(&shared->mutex);
	after_failure = shared->starts > 0 && !shared->restart_planned;
	shared->starts++;
	shared->restart_planned = false;
	SpinLockRelease(&shared->mutex);
	return after_failure;
}

/* the worker exits to start again at once (it found its database) */
void
shmem_worker_restart_planned(void)
{
	SpinLockAcquire(&shared->mutex);
	shared->restart_planned = true;
	shared->worker_latch = NULL;
	SpinLockRelease(&shared->mutex);
}

static void
forget_waiting_latch(int code, Datum arg)
{
	SpinLockAcquire(&shared->mutex);
	if (shared->worker_pid == 0)
		shared->worker_latch = NULL;
	SpinLockRelease(&shared->mutex);
}

/*
 * The worker waits for phsync.database to be created, connected to no
 * database: sessions may wake it (CREATE DATABASE), though it takes no
 * request.
 */
void
shmem_worker_waiting(void)
{
	SpinLockAcquire(&shared->mutex);
	shared->worker_latch = MyLatch;
	SpinLockRelease(&shared->mutex);
	on_shmem_exit(forget_waiting_latch, (Datum) 0);
}

/*
 * Did the last attempt to connect to phsync.database end the worker?
 * (Set before connecting, cleared once connected.)
 */
bool
shmem_connect_failed(void)
{
	return shared->connect_failed;
}

void
shmem_set_connect_failed(bool failed)
{
	shared->connect_failed = failed;
}

/*
 * Does pending request a take its turn before b?  The first requester
 * after the one served last (by OID, wrapping), then the oldest.
 */
static bool
turn_before(const RequestSlot *a, const RequestSlot *b, Oid served)
{
	bool		a_after = a->request.requester > served;
	bool		b_after = b->request.requester > served;

	if (a_after != b_after)
		return a_after;
	if (a->request.requester != b->request.requester)
		return a->request.requester < b->request.requester;
	return a->ticket < b->ticket;
}

/*
 * Take the next pending request, if any: the worker is busy from now on.
 * Requesters in turn (see the top of this file).  Returns false when none
 * is pending.
 */
bool
shmem_take_request(PhsyncRequest *request)
{
	int			next = -1;

	SpinLockAcquire(&shared->mutex);
	for (int i = 0; i < PHSYNC_MAX_REQUESTS; i++)
		if (shared->requests[i].state == REQUEST_PENDING &&
			(next < 0 || turn_before(&shared->requests[i], &shared->requests[next], shared->served)))
			next = i;
	if (next >= 0)
	{
		RequestSlot *slot = &shared->requests[next];

		*request = slot->request;
		slot->state = REQUEST_TAKEN;
		slot->cancelled = false;
		shared->taken = next;
		shared->served = slot->request.requester;
		pg_atomic_write_u32(&shared->request_cancelled, 0);
		shared->busy = true;
		my_request = true;
	}
	SpinLockRelease(&shared->mutex);
	return next >= 0;
}

/*
 * Answer the request taken, and wake whoever asked.
 */
void
shmem_answer_request(const PhsyncAnswer *answer)
{
	Latch	   *requester;

	SpinLockAcquire(&shared->mutex);
	shared->busy = false;
	shared->run_id = 0;
	requester = store_answer(answer);
	SpinLockRelease(&shared->mutex);
	if (requester)
		SetLatch(requester);
}

/*
 * Did the session whose request is running give up on it?
 */
bool
shmem_request_cancelled(void)
{
	bool		cancelled;

	SpinLockAcquire(&shared->mutex);
	cancelled = shared->taken >= 0 && shared->requests[shared->taken].cancelled;
	SpinLockRelease(&shared->mutex);
	return cancelled;
}

/*
 * A run that no session asked for (scheduled, a queued backfill) starts
 * or ends: sessions asking meanwhile are told a run is in progress.
 */
void
shmem_set_busy(bool busy)
{
	SpinLockAcquire(&shared->mutex);
	shared->busy = busy;
	if (!busy)
		shared->run_id = 0;
	SpinLockRelease(&shared->mutex);
}

/*
 * The run in progress has this phsync.runs id and sync (0 and NULL: none).
 */
void
shmem_set_run(int64 run_id, const char *sync)
{
	my_run_id = run_id;
	SpinLockAcquire(&shared->mutex);
	shared->run_id = run_id;
	strlcpy(shared->sync, sync ? sync : "", NAMEDATALEN);
	shared->pages = 0;
	shared->received = 0;
	shared->waiting_until = 0;
	SpinLockRelease(&shared->mutex);
}

/*
 * The run in progress waits for a throttle until `until` (0: it does not).
 */
void
shmem_set_waiting(TimestampTz until)
{
	if (shared == NULL)
		return;
	SpinLockAcquire(&shared->mutex);
	shared->waiting_until = until;
	SpinLockRelease(&shared->mutex);
}

/*
 * How far the run in progress has got.
 */
void
shmem_set_progress(int pages, int64 received)
{
	SpinLockAcquire(&shared->mutex);
	shared->pages = pages;
	shared->received = received;
	SpinLockRelease(&shared->mutex);
}

/*
 * What the worker's role lacks (NULL or "": nothing), and the fix, for
 * sessions and the doctor to report.
 */
void
shmem_set_role_problem(const char *problem, const char *fix)
{
	SpinLockAcquire(&shared->mutex);
	strlcpy(shared->role_problem, problem ? problem : "", PHSYNC_MAX_MESSAGE);
	strlcpy(shared->role_fix, fix ? fix : "", PHSYNC_MAX_MESSAGE);
	SpinLockRelease(&shared->mutex);
}

/* false when the worker's role has what it needs; else its problem and fix */
bool
shmem_role_problem(char *problem, char *fix)
{
	bool		found;

	SpinLockAcquire(&shared->mutex);
	found = shared->role_problem[0] != '\0';
	strlcpy(problem, shared->role_problem, PHSYNC_MAX_MESSAGE);
	strlcpy(fix, shared->role_fix, PHSYNC_MAX_MESSAGE);
	SpinLockRelease(&shared->mutex);
	return found;
}

void
shmem_set_schedule_base(TimestampTz base)
{
	SpinLockAcquire(&shared->mutex);
	shared->schedule_base = base;
	SpinLockRelease(&shared->mutex);
}

void
shmem_set_next_due(TimestampTz due)
{
	SpinLockAcquire(&shared->mutex);
	shared->next_due = due;
	SpinLockRelease(&shared->mutex);
}

/*
 * Should the run in progress stop?  Safe in a libcurl callback: no lock,
 * no error.
 */
bool
shmem_cancel_pending(void)
{
	if (shared == NULL)
		return false;
	if (my_request && pg_atomic_read_u32(&shared->request_cancelled) != 0)
		return true;
	return my_run_id != 0 &&
		pg_atomic_read_u64(&shared->cancel_run) == (uint64) my_run_id;
}

/*
 * In the worker: whether a cancel interrupt (SIGINT, see the top of this
 * file) is acted on.  Only during a run: at its start a SIGINT left over
 * from an earlier cancel is dropped, unless it is for this run (its
 * session gave up already).  Assigned rather than counted: an error
 * resets PostgreSQL's holdoff count.
 */
void
shmem_worker_cancellable(bool cancellable)
{
	if (cancellable)
	{
		if (!shmem_cancel_pending())
			QueryCancelPending = false;
		QueryCancelHoldoffCount = 0;
	}
	else
		QueryCancelHoldoffCount = 1;
}

/*
 * Why the run in progress was cancelled, as an error's detail; NULL when
 * it was not (a cancel from pg_cancel_backend() says nothing here).
 */
const char *
shmem_cancel_reason(void)
{
	if (!shmem_cancel_pending())
		return NULL;
	if (my_request && pg_atomic_read_u32(&shared->request_cancelled) != 0)
		return "The session that asked for it stopped waiting (it was cancelled, or its statement timed out).";
	return "phsync_cancel() was called for it.";
}

/*
 * Stop the run in progress with an error if it was cancelled (called where
 * the worker calls CHECK_FOR_INTERRUPTS()).
 */
void
shmem_check_cancel(void)
{
	const char *why = shmem_cancel_reason();

	if (why == NULL)
		return;
	ereport(ERROR,
			(errcode(ERRCODE_QUERY_CANCELED),
			 errmsg("phsync run %lld was cancelled", (long long) my_run_id),
			 errdetail("%s", why)));
}

/*
 * The interrupt check of every loop and wait in a run: PostgreSQL's own
 * (a cancel, a shutdown) and a cancelled run (phsync_cancel(), or the
 * session that asked for the run gave up).
 */
void
phsync_check_interrupts(void)
{
	CHECK_FOR_INTERRUPTS();
	shmem_check_cancel();
}

/*
 * Is one of those pending?  Safe in a libcurl callback: no lock, no error.
 */
bool
phsync_interrupt_pending(void)
{
	return ProcDiePending || QueryCancelPending || shmem_cancel_pending();
}

/* ---------- the sessions' side ---------- */

/*
 * Stop what the worker is doing now: wake it, and send it SIGINT, which
 * ends a wait inside PostgreSQL (a lock, a target's trigger) as
 * pg_cancel_backend() would.  The worker acts on it only during a run
 * that was cancelled (see the top of this file).
 */
static void
interrupt_worker(Latch *latch, pid_t pid)
{
	if (latch)
		SetLatch(latch);
	if (pid != 0 && kill(pid, SIGINT) != 0 && errno != ESRCH)
		ereport(WARNING,
				(errmsg("could not send a cancel to the phsync worker (PID %d): %m", (int) pid)));
}

/*
 * Cancel run run_id if it is the one in progress; the worker stops it
 * within a second.  Returns whether it was.
 */
bool
shmem_cancel_run(int64 run_id)
{
	bool		running;
	Latch	   *latch;
	pid_t		pid;

	SpinLockAcquire(&shared->mutex);
	running = shared->run_id == run_id && run_id != 0;
	if (running)
		pg_atomic_write_u64(&shared->cancel_run, (uint64) run_id);
	latch = shared->worker_latch;
	pid = shared->worker_pid;
	SpinLockRelease(&shared->mutex);
	if (running)
		interrupt_worker(latch, pid);
	return running;
}

/*
 * What the worker does now: its pid (0 when none is attached), its next
 * scheduled run, and the run in progress (run_id 0 when none).
 */
void
shmem_worker_state(PhsyncWorkerState *state)
{
	SpinLockAcquire(&shared->mutex);
	state->pid = shared->worker_pid;
	state->next_due = shared->next_due;
	state->schedule_base = shared->schedule_base;
	state->busy = shared->busy;
	state->run_id = shared->run_id;
	strlcpy(state->sync, shared->sync, NAMEDATALEN);
	state->pages = shared->pages;
	state->received = shared->received;
	state->waiting_until = shared->waiting_until;
	SpinLockRelease(&shared->mutex);
}

/* ---------- request budgets ---------- */

/*
 * The budget of key, locked (shmem_budget_unlock() releases it): created
 * when new, taking over the least recently used slot when all are taken.
 * NULL when phsync's shared memory is not there.
 */
PhsyncBudget *
shmem_budget_lock(const char *key)
{
	PhsyncBudget *b;
	PhsyncBudget *oldest = NULL;
	int			i;

	if (shared == NULL)
		return NULL;
	LWLockAcquire(shared->budget_lock, LW_EXCLUSIVE);
	for (i = 0; i < PHSYNC_BUDGETS; i++)
	{
		b = &shared->budgets[i];
		if (strcmp(b->key, key) == 0)
			return b;
		if (oldest == NULL || b->second < oldest->second)
			oldest = b;
	}
	memset(oldest, 0, sizeof(PhsyncBudget));
	strlcpy(oldest->key, key, sizeof(oldest->key));
	return oldest;
}

void
shmem_budget_unlock(void)
{
	LWLockRelease(shared->budget_lock);
}

/*
 * Until when a throttle closed the budget of key (0: it is open).
 */
TimestampTz
shmem_budget_closed_until(const char *key)
{
	PhsyncBudget *b = shmem_budget_lock(key);
	TimestampTz until;

	if (b == NULL)
		return 0;
	until = b->closed_until;
	shmem_budget_unlock();
	return until;
}

/* ---------- the roles that own syncs (roles.c) ---------- */

static bool commit_callback_registered = false;
static bool owners_change_pending = false;
static bool wake_pending = false;

/* a change of phsync.syncs committed: the worker reads the owners again */
static void
at_commit(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_COMMIT && shared != NULL)
	{
		if (owners_change_pending)
			pg_atomic_write_u32(&shared->owners_changed, 1);
		if (owners_change_pending || wake_pending)
			shmem_wake_worker();
	}
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT)
		owners_change_pending = wake_pending = false;
}

static void
register_at_commit(void)
{
	if (!commit_callback_registered)
	{
		RegisterXactCallback(at_commit, NULL);
		commit_callback_registered = true;
	}
}

/*
 * phsync.syncs is being changed in this transaction: once it commits, the
 * worker reads the owners of syncs again.
 */
void
shmem_owners_changing(void)
{
	register_at_commit();
	owners_change_pending = true;
}

/*
 * Wake the worker when this transaction commits (it queued a backfill,
 * created phsync.database or the extension): it acts at once, not at its
 * next poll.
 */
void
shmem_wake_worker_at_commit(void)
{
	register_at_commit();
	wake_pending = true;
}

/*
 * The worker: should it read the owners again?  (Clears the flag.)
 */
bool
shmem_take_owners_changed(void)
{
	return pg_atomic_exchange_u32(&shared->owners_changed, 0) != 0;
}

/*
 * The worker publishes the roles that own syncs.
 */
void
shmem_publish_owners(const Oid *owners, int n, bool overflow)
{
	Assert(n <= PHSYNC_MAX_OWNERS);
	SpinLockAcquire(&shared->mutex);
	memcpy(shared->owners, owners, sizeof(Oid) * n);
	shared->nowners = n;
	shared->owners_overflow = overflow;
	shared->owners_known = true;
	SpinLockRelease(&shared->mutex);
}

/*
 * Does role own a sync, as far as the worker knows?  When it cannot tell
 * (too many owners to list), it says yes.
 */
bool
shmem_owns_syncs(Oid role)
{
	bool		owns = false;
	int			i;

	if (shared == NULL)
		return false;
	SpinLockAcquire(&shared->mutex);
	if (shared->owners_known)
	{
		owns = shared->owners_overflow;
		for (i = 0; i < shared->nowners && !owns; i++)
			owns = shared->owners[i] == role;
	}
	SpinLockRelease(&shared->mutex);
	return owns;
}

/*
 * Wake the worker (a backfill was queued, say).
 */
void
shmem_wake_worker(void)
{
	Latch	   *latch;

	SpinLockAcquire(&shared->mutex);
	latch = shared->worker_latch;
	SpinLockRelease(&shared->mutex);
	if (latch)
		SetLatch(latch);
}

/*
 * Free the slots of answers nobody will read, because the session that
 * asked is gone.
 */
static void
free_unread_answers(void)
{
	pid_t		pids[PHSYNC_MAX_REQUESTS];
	uint64		tickets[PHSYNC_MAX_REQUESTS];
	int			n = 0;

	SpinLockAcquire(&shared->mutex);
	for (int i = 0; i < PHSYNC_MAX_REQUESTS; i++)
		if (shared->requests[i].state == REQUEST_ANSWERED)
		{
			pids[n] = shared->requests[i].requester_pid;
			tickets[n++] = shared->requests[i].ticket;
		}
	SpinLockRelease(&shared->mutex);

	for (int i = 0; i < n; i++)
	{
		RequestSlot *slot;

		if (BackendPidGetProc(pids[i]) != NULL)
			continue;
		SpinLockAcquire(&shared->mutex);
		slot = find_request(tickets[i]);
		if (slot && slot->state == REQUEST_ANSWERED)
			slot->state = REQUEST_NONE;
		SpinLockRelease(&shared->mutex);
	}
}

/*
 * Queue a request for the worker.  Returns its ticket, or 0 when every
 * slot is taken.  *busy_run is the run in progress (0 when none), and
 * *ahead the number of requests that wait before this one could be taken
 * (all pending ones: the order of turns is the worker's to choose).
 */
uint64
shmem_submit_request(const PhsyncRequest *request, int64 *busy_run, int *ahead)
{
	uint64		ticket = 0;
	Latch	   *worker_latch = NULL;

	free_unread_answers();

	SpinLockAcquire(&shared->mutex);
	*busy_run = shared->busy ? shared->run_id : 0;
	*ahead = 0;
	for (int i = 0; i < PHSYNC_MAX_REQUESTS; i++)
		if (shared->requests[i].state == REQUEST_PENDING)
			(*ahead)++;
	for (int i = 0; i < PHSYNC_MAX_REQUESTS; i++)
	{
		RequestSlot *slot = &shared->requests[i];

		if (slot->state != REQUEST_NONE)
			continue;
		ticket = ++shared->ticket;
		slot->ticket = ticket;
		slot->request = *request;
		slot->state = REQUEST_PENDING;
		slot->requester_pid = MyProcPid;
		slot->requester_latch = MyLatch;
		slot->cancelled = false;
		worker_latch = shared->worker_latch;
		break;
	}
	SpinLockRelease(&shared->mutex);
	if (worker_latch)
		SetLatch(worker_latch);
	return ticket;
}

/*
 * Has request `ticket` been answered?  If so, the answer is copied out and
 * the slot freed.  *worker_absent tells whether no worker is attached to
 * take the request, which is not taken yet.
 */
bool
shmem_read_answer(uint64 ticket, PhsyncAnswer *answer, bool *worker_absent)
{
	RequestSlot *slot;
	bool		done;

	SpinLockAcquire(&shared->mutex);
	slot = find_request(ticket);
	done = slot != NULL && slot->state == REQUEST_ANSWERED;
	if (done)
	{
		*answer = slot->answer;
		slot->state = REQUEST_NONE;
	}
	*worker_absent = shared->worker_pid == 0 && slot != NULL &&
		slot->state == REQUEST_PENDING;
	SpinLockRelease(&shared->mutex);
	return done;
}

/*
 * The session that submitted `ticket` stops waiting (it was cancelled, or
 * the worker never came): see the comment at the top.
 */
void
shmem_withdraw_request(uint64 ticket)
{
	Latch	   *latch = NULL;
	pid_t		pid = 0;
	RequestSlot *slot;

	SpinLockAcquire(&shared->mutex);
	slot = find_request(ticket);
	if (slot)
	{
		switch (slot->state)
		{
			case REQUEST_PENDING:
			case REQUEST_ANSWERED:
				slot->state = REQUEST_NONE;
				break;
			case REQUEST_TAKEN:
				slot->requester_latch = NULL;
				slot->cancelled = true;
				pg_atomic_write_u32(&shared->request_cancelled, 1);
				latch = shared->worker_latch;
				pid = shared->worker_pid;
				break;
			case REQUEST_NONE:
				break;
		}
	}
	SpinLockRelease(&shared->mutex);
	if (latch)
		interrupt_worker(latch, pid);
}
