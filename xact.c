/*-------------------------------------------------------------------------
 *
 * xact.c
 *		Transactions and SPI as phsync uses them: the worker's transaction
 *		sandwich, recovering from an error caught in the worker, and the
 *		connection to SPI that functions with the "SPI connected" contract
 *		assert.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "commands/prepare.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/lock.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#include "phsync.h"

/* how many phsync_spi_connect() calls are not finished yet */
static int	spi_depth = 0;
static bool callback_registered = false;

/* an aborted (or committed) transaction has no SPI connection left */
static void
reset_spi_depth(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_ABORT || event == XACT_EVENT_COMMIT ||
		event == XACT_EVENT_PARALLEL_ABORT || event == XACT_EVENT_PARALLEL_COMMIT)
		spi_depth = 0;
}

/*
 * SPI_connect, counted, so that code with the contract "SPI connected" can
 * Assert it.
 */
void
phsync_spi_connect(void)
{
	if (!callback_registered)
	{
		RegisterXactCallback(reset_spi_depth, NULL);
		callback_registered = true;
	}
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	spi_depth++;
}

void
phsync_spi_finish(void)
{
	Assert(spi_depth > 0);
	spi_depth--;
	SPI_finish();
}

/*
 * Is SPI connected by phsync (for Assert)?
 */
bool
phsync_spi_connected(void)
{
	return spi_depth > 0;
}

/*
 * SPI_execute_with_args, with SPI connected, in the caller's memory
 * context: SPI leaves its own procedure context current after a call,
 * whose memory goes at phsync_spi_finish().  The result (SPI_tuptable)
 * lives until the next call.
 */
int
phsync_spi_exec(const char *sql, int nargs, Oid *types, Datum *values,
				const char *nulls, bool read_only, long count)
{
	MemoryContext cxt = CurrentMemoryContext;
	int			ret;

	Assert(phsync_spi_connected());
	ret = SPI_execute_with_args(sql, nargs, types, values, nulls, read_only, count);
	MemoryContextSwitchTo(cxt);
	return ret;
}

/*
 * SPI_execute_plan, in the caller's memory context (as phsync_spi_exec).
 */
int
phsync_spi_exec_plan(SPIPlanPtr plan, Datum *values, const char *nulls,
					 bool read_only, long count)
{
	MemoryContext cxt = CurrentMemoryContext;
	int			ret;

	Assert(phsync_spi_connected());
	ret = SPI_execute_plan(plan, values, nulls, read_only, count);
	MemoryContextSwitchTo(cxt);
	return ret;
}

/*
 * SPI_prepare, in the caller's memory context (as phsync_spi_exec).
 */
SPIPlanPtr
phsync_spi_prepare(const char *sql, int nargs, Oid *types)
{
	MemoryContext cxt = CurrentMemoryContext;
	SPIPlanPtr	plan;

	Assert(phsync_spi_connected());
	plan = SPI_prepare(sql, nargs, types);
	MemoryContextSwitchTo(cxt);
	return plan;
}

/*
 * Begin a worker transaction with SPI and a snapshot (worker_spi's order).
 * Returns the caller's memory context, which xact_commit() restores: SPI
 * leaves its own current.
 */
MemoryContext
xact_begin(void)
{
	MemoryContext cxt = CurrentMemoryContext;

	Assert(!IsTransactionState());
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	phsync_spi_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	MemoryContextSwitchTo(cxt);
	return cxt;
}

/*
 * Commit what xact_begin() began, back in the caller's memory context.  In
 * the worker, the table statistics of the transaction are reported too (a
 * background worker must do it itself, or they wait for it to exit).
 */
void
xact_commit(MemoryContext cxt)
{
	PopActiveSnapshot();
	phsync_spi_finish();
	CommitTransactionCommand();
	MemoryContextSwitchTo(cxt);
	if (phsync_am_background_worker())
		pgstat_report_stat(false);
}

/*
 * Make the current transaction commit without waiting for its WAL to reach
 * the disk (SET LOCAL synchronous_commit = off): for the loads within a run.
 * Nothing is lost that matters: a crash can take back only the last
 * moments of loaded rows, atomically, and the next run loads them again
 * (the watermark is the table itself); the run's last commit (its run-log
 * row) is synchronous, so when a run reports success everything it loaded
 * is on disk.  The worker no longer writes and flushes WAL at every chunk:
 * the WAL writer does, in the background, as for COPY's one transaction.
 */
void
xact_set_async_commit(void)
{
	Assert(IsTransactionState());
	(void) set_config_option("synchronous_commit", "off", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);
}

/*
 * In a PG_CATCH block of the worker: copy the error out, clear it, abort
 * whatever transaction was open, and go back to cxt, where the copy is.
 * Interrupts are held meanwhile, so a cancel cannot strike mid-cleanup.
 */
ErrorData *
xact_recover(MemoryContext cxt)
{
	ErrorData  *edata;

	HOLD_INTERRUPTS();
	MemoryContextSwitchTo(cxt);
	edata = CopyErrorData();
	FlushErrorState();
	AbortOutOfAnyTransaction();
	MemoryContextSwitchTo(cxt);
	RESUME_INTERRUPTS();
	return edata;
}

/*
 * Act as `role` until as_role_end(): SQL run meanwhile is checked against
 * role's privileges, and code that other roles control (triggers, column
 * defaults, index expressions, policies) runs with role's rights.  With
 * restricted, also under SECURITY_RESTRICTED_OPERATION, as autovacuum and
 * REFRESH MATERIALIZED VIEW run code on a table they do not own: that
 * code cannot change the session (SET ROLE, temporary objects, ...), and
 * settings it changes are undone by as_role_end().
 *
 * An error in between needs no as_role_end(): aborting the (sub)transaction
 * restores the user and the settings.
 */
void
as_role_begin(Oid role, bool restricted, PhsyncAsRole *save)
{
	Assert(IsTransactionState());
	GetUserIdAndSecContext(&save->userid, &save->sec_context);
	SetUserIdAndSecContext(role, save->sec_context | SECURITY_LOCAL_USERID_CHANGE |
						   (restricted ? SECURITY_RESTRICTED_OPERATION : 0));
	save->nestlevel = NewGUCNestLevel();
}

void
as_role_end(PhsyncAsRole *save)
{
	AtEOXact_GUC(false, save->nestlevel);
	SetUserIdAndSecContext(save->userid, save->sec_context);
}

/*
 * Undo what code other roles control (a target's triggers, defaults,
 * policies) may have left in the worker's session after a run: its
 * session-level advisory locks and prepared statements.  (Settings it
 * changed are undone by as_role_end(); temporary tables, cursors WITH
 * HOLD, LISTEN and SET ROLE are refused inside a security-restricted
 * operation in the first place.)
 */
void
xact_reset_session(void)
{
	LockReleaseSession(USER_LOCKMETHOD);
	DropAllPreparedStatements();
}
