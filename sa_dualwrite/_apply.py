"""Running a sync against the target within a time budget, and reporting it.

Two ways of applying the changes of a source commit are implemented here:

* in the source transaction, just before its COMMIT, under a savepoint,
  when the target is the source engine itself: target rows, audit and
  cross-reference commit atomically with the source rows;
* after the source COMMIT, in a transaction of the target engine, when the
  target is another engine.

Either way nothing raised by the target reaches the caller of ``commit()``:
failures become audit rows with status ``failed`` when the target can still
be written, and are logged and signalled in every case.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Engine, text

from sa_dualwrite import _locks, _pipeline, _store, signals
from sa_dualwrite._buffer import Change
from sa_dualwrite._codec import encode_key
from sa_dualwrite._logging import JsonLinesFile
from sa_dualwrite._sync import (
    Outcome,
    SyncTimeout,
    sync_changes,
    timed_out,
)
from sa_dualwrite._watchdog import (
    GRACE,
    Watchdog,
    connect_limit,
    sqlite_busy_timeout,
)
from sa_dualwrite.mapping._compile import CompiledMapping

__all__ = ["Applier"]

# Failures that could not be audited (the target was unreachable) are kept
# for replay(); beyond this many the oldest are dropped with an error log.
MAX_UNRECORDED = 100_000

_PG_SET_TIMEOUTS = text(
    "SELECT current_setting('statement_timeout') AS statement_timeout, "
    "current_setting('lock_timeout') AS lock_timeout, "
    "set_config('statement_timeout', :budget, true), "
    "set_config('lock_timeout', :budget, true)"
)
_PG_RESTORE_TIMEOUTS = text(
    "SELECT set_config('statement_timeout', :statement_timeout, true), "
    "set_config('lock_timeout', :lock_timeout, true)"
)
_PG_LOCK = text(
    _locks.LOCK_SQL.replace("%(keys)s", ":keys").replace("%(modes)s", ":modes")
)


class Applier:
    """Applies changes to the target and reports the outcomes."""

    def __init__(
        self,
        *,
        source: Engine,
        target: Engine,
        mappings: dict[str, CompiledMapping],
        timeout: float,
        logger: Any,
    ) -> None:
        self.source = source
        self.target = target
        self.mappings = mappings
        self.timeout = timeout
        self.logger = logger
        self.unrecorded: deque[tuple[Change, str | None]] = deque()
        self.sink: JsonLinesFile | None = None
        self.watchdog = Watchdog()
        self.connect_limit = connect_limit(timeout)
        self._lock = threading.Lock()
        self._connector: concurrent.futures.ThreadPoolExecutor | None = None

    def apply_in_transaction(
        self,
        connection: Connection,
        changes: Sequence[Change],
        session_key: str | None,
    ) -> list[Outcome]:
        """Sync ``changes`` inside the source transaction of ``connection``.

        Runs just before the source COMMIT. Everything happens under one
        savepoint, so a failure leaves the source transaction as it was.
        On PostgreSQL the changes are first applied in as few statements as
        possible. When that fails, its savepoint is rolled back and the
        changes are applied again, so that each failing change fails alone.
        """
        deadline = time.monotonic() + self.timeout
        if _pipeline.usable(connection) and _pipeline.eligible(
            changes, self.mappings, connection.dialect
        ):
            try:
                return _pipeline.sync_in_transaction(
                    connection,
                    changes,
                    mappings=self.mappings,
                    session_key=session_key,
                    deadline=deadline,
                )
            except Exception as exc:
                if timed_out(exc):
                    return self._record_failures(
                        connection, changes, session_key, exc, nested=True
                    )
                self._log_fast_failure(exc, changes)
        try:
            with connection.begin_nested():
                saved = self._set_timeouts(connection, deadline)
                outcomes = sync_changes(
                    changes,
                    source=connection,
                    target=connection,
                    mappings=self.mappings,
                    session_key=session_key,
                    deadline=deadline,
                )
                self._restore_timeouts(connection, saved)
            return outcomes
        except Exception as exc:
            return self._record_failures(
                connection, changes, session_key, exc, nested=True
            )

    def apply_after_commit(
        self,
        source_connection: Connection | None,
        changes: Sequence[Change],
        session_key: str | None,
    ) -> list[Outcome]:
        """Sync ``changes`` in a transaction of the target engine.

        ``source_connection`` is the connection the source transaction used,
        still checked out; it reads the committed source rows so that no
        second source connection is needed. With None, one is opened. A
        transaction that the application keeps open on that connection is
        left as it is; only a read transaction begun here is ended.
        """
        deadline = time.monotonic() + self.timeout
        try:
            target = self._connect_target(deadline)
        except Exception as exc:
            return self._unrecorded_failures(changes, session_key, exc)
        own_source = source_connection is None
        source = source_connection or self.source.connect()
        owns_read = not source.in_transaction()
        try:
            with (
                self.watchdog.guard(target, deadline),
                sqlite_busy_timeout(target, deadline),
            ):
                return self._apply_on(
                    target, source, changes, session_key, deadline, owns_read
                )
        finally:
            _end_read(source, rollback=owns_read, close=own_source)
            target.close()

    def _apply_on(
        self,
        target: Connection,
        source: Connection,
        changes: Sequence[Change],
        session_key: str | None,
        deadline: float,
        owns_read: bool,
    ) -> list[Outcome]:
        if (
            owns_read
            and _pipeline.usable(target)
            and _pipeline.usable(source)
            and _pipeline.eligible(changes, self.mappings, target.dialect)
        ):
            try:
                return _pipeline.sync_after_commit(
                    target,
                    source,
                    changes,
                    mappings=self.mappings,
                    session_key=session_key,
                    deadline=deadline,
                )
            except Exception as exc:
                if lost(target):
                    target.invalidate()
                    return self._unrecorded_failures(changes, session_key, exc)
                if timed_out(exc):
                    return self._record_failures(
                        target, changes, session_key, exc, nested=False
                    )
                self._log_fast_failure(exc, changes)
        try:
            with target.begin():
                self._begin_write(target)
                self._set_timeouts_and_lock(target, deadline, changes)
                outcomes = sync_changes(
                    changes,
                    source=source,
                    target=target,
                    mappings=self.mappings,
                    session_key=session_key,
                    deadline=deadline,
                )
            return outcomes
        except Exception as exc:
            _end_read(source, rollback=owns_read, close=False)
            return self._record_failures(
                target, changes, session_key, exc, nested=False
            )

    def _log_fast_failure(
        self, exc: Exception, changes: Sequence[Change]
    ) -> None:
        self.logger.debug(
            "sync_retried_change_by_change",
            error=_one_line(exc),
            changes=len(changes),
        )

    def _connect_target(
        self, deadline: float, budget: str = "v2_timeout"
    ) -> Connection:
        """Check out a target connection, waiting until ``deadline`` only.

        Drivers that talk to a server are connected from a worker thread,
        so that a server that does not respond cannot hold the caller past
        the budget; a connection that arrives late is closed. ``budget``
        names the setting the deadline came from, for the error message.
        """
        engine = self.target
        if engine.dialect.name == "sqlite" or engine.dialect.is_async:
            return engine.connect()
        with self._lock:
            if self._connector is None:
                self._connector = concurrent.futures.ThreadPoolExecutor(
                    max_workers=4, thread_name_prefix="sa_dualwrite_connect"
                )
            connector = self._connector
        future = connector.submit(engine.connect)
        waited = max(deadline - time.monotonic(), 0)
        try:
            return future.result(timeout=waited)
        except concurrent.futures.TimeoutError:
            future.add_done_callback(_close_late_connection)
            raise TimeoutError(
                f"connecting to the target timed out after {waited:.1f} s "
                f"({budget})"
            ) from None

    def _begin_write(self, connection: Connection) -> None:
        """Take SQLite's write lock first, so that syncs run one at a time."""
        if connection.dialect.name != "sqlite":
            return
        dbapi_connection = connection.connection.dbapi_connection
        if not getattr(dbapi_connection, "in_transaction", True):
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    def _set_timeouts(
        self, connection: Connection, deadline: float
    ) -> dict[str, Any] | None:
        """Bound statement and lock waits on the target by the budget."""
        if connection.dialect.name != "postgresql":
            return None
        budget_ms = max(int((deadline - time.monotonic()) * 1000), 1)
        row = connection.execute(
            _PG_SET_TIMEOUTS, {"budget": f"{budget_ms}ms"}
        ).one()
        return {
            "statement_timeout": row.statement_timeout,
            "lock_timeout": row.lock_timeout,
        }

    def _restore_timeouts(
        self, connection: Connection, saved: dict[str, Any] | None
    ) -> None:
        if saved is not None:
            connection.execute(_PG_RESTORE_TIMEOUTS, saved)

    def _set_timeouts_and_lock(
        self,
        connection: Connection,
        deadline: float,
        changes: Sequence[Change],
    ) -> None:
        """Bound the target's waits by the budget, then lock the rows.

        One statement on PostgreSQL does both; see :meth:`lock_rows`.
        """
        self._set_timeouts(connection, deadline)
        self.lock_rows(connection, changes)

    def lock_rows(
        self, connection: Connection, changes: Sequence[Change]
    ) -> None:
        """Serialize syncs of the same source rows on a PostgreSQL target.

        A sync reads the committed source rows after taking these locks,
        so the sync that writes last has read the latest committed state;
        see :mod:`sa_dualwrite._locks`.
        """
        if connection.dialect.name != "postgresql" or not changes:
            return
        connection.execute(_PG_LOCK, _locks.lock_plan(changes)).all()

    def _record_failures(
        self,
        connection: Connection,
        changes: Sequence[Change],
        session_key: str | None,
        exc: Exception,
        *,
        nested: bool,
    ) -> list[Outcome]:
        """Audit every change as failed after the whole sync failed.

        A target connection that was lost is not connected again: the
        target did not respond, and a reconnection would wait once more.
        In the source transaction the audit rows get GRACE more seconds of
        statement and lock waits, because the budget is spent and a lock
        on the audit table must not hold the source COMMIT.
        """
        if not nested and (connection.invalidated or lost(connection)):
            return self._unrecorded_failures(changes, session_key, exc)
        outcomes = [_failed(change, exc, self.timeout) for change in changes]
        rows = [_audit_row(outcome, session_key) for outcome in outcomes]
        try:
            if nested:
                with connection.begin_nested():
                    saved = self._set_timeouts(
                        connection, time.monotonic() + GRACE
                    )
                    ids = _store.insert_audit(connection, rows)
                    self._restore_timeouts(connection, saved)
            else:
                if connection.in_transaction():
                    connection.rollback()
                with connection.begin():
                    ids = _store.insert_audit(connection, rows)
        except Exception as audit_exc:
            self.logger.error(
                "audit_write_failed",
                error=_one_line(audit_exc),
                exc_info=audit_exc,
                changes=len(changes),
            )
            return self._unrecorded_failures(changes, session_key, exc)
        for outcome, audit_id in zip(outcomes, ids, strict=True):
            outcome.audit_id = audit_id
        return outcomes

    def _unrecorded_failures(
        self,
        changes: Sequence[Change],
        session_key: str | None,
        exc: BaseException,
    ) -> list[Outcome]:
        """Keep changes that could not be audited, for replay()."""
        with self._lock:
            for change in changes:
                if len(self.unrecorded) >= MAX_UNRECORDED:
                    dropped, _ = self.unrecorded.popleft()
                    self.logger.error(
                        "unrecorded_change_dropped",
                        mapping=dropped.mapping,
                        v1_pk=encode_key(dropped.v1_pk),
                        limit=MAX_UNRECORDED,
                    )
                self.unrecorded.append((change, session_key))
        return [_failed(change, exc, self.timeout) for change in changes]

    def take_unrecorded(self) -> list[tuple[Change, str | None]]:
        """Remove and return the changes kept for replay()."""
        with self._lock:
            changes = list(self.unrecorded)
            self.unrecorded.clear()
        return changes

    def report(
        self, outcomes: Sequence[Outcome], session_key: str | None
    ) -> None:
        """Log each outcome and send its signal.

        A receiver that raises is logged, and the other receivers still run.
        """
        if not outcomes:
            return
        if self.sink is None:
            self._report(outcomes, session_key)
            return
        with self.sink.batch():
            self._report(outcomes, session_key)

    def _report(
        self, outcomes: Sequence[Outcome], session_key: str | None
    ) -> None:
        for outcome in outcomes:
            fields = {
                "mapping": outcome.mapping,
                "operation": outcome.operation,
                "v1_pk": outcome.v1_pk,
                "v2_pk": outcome.v2_pk,
                "audit_id": outcome.audit_id,
                "session_key": session_key,
            }
            if outcome.status == "applied":
                self.logger.info("change_applied", **fields)
                self.send(signals.change_applied, outcome.mapping, **fields)
            else:
                self.logger.error(
                    "change_failed",
                    error=outcome.error,
                    exc_info=outcome.exception,
                    **fields,
                )
                self.send(
                    signals.change_failed,
                    outcome.mapping,
                    error=outcome.error,
                    **fields,
                )

    def send(self, signal: Any, sender: str, **fields: Any) -> None:
        """Send ``signal`` to each receiver; a receiver error is logged."""
        if not signal.receivers:
            return
        payload = {
            key: fields.get(key)
            for key in ("audit_id", "v1_pk", "v2_pk", "operation", "error")
            if key in fields
        }
        for receiver in list(signal.receivers_for(sender)):
            try:
                receiver(sender, **payload)
            except Exception as exc:
                self.logger.error(
                    "signal_receiver_failed",
                    signal=signal.name,
                    receiver=getattr(receiver, "__qualname__", repr(receiver)),
                    error=_one_line(exc),
                    exc_info=exc,
                )

    def close(self) -> None:
        """Stop the connector threads and the watchdog, without waiting."""
        with self._lock:
            connector, self._connector = self._connector, None
        if connector is not None:
            connector.shutdown(wait=False, cancel_futures=True)
        self.watchdog.stop()


def lost(connection: Connection) -> bool:
    """Return whether the DBAPI connection of ``connection`` is unusable."""
    if connection.invalidated or connection.closed:
        return True
    raw = connection.connection.dbapi_connection
    return bool(getattr(raw, "broken", False) or getattr(raw, "closed", False))


def _failed(change: Change, exc: BaseException, timeout: float) -> Outcome:
    if isinstance(exc, TimeoutError) and not isinstance(exc, SyncTimeout):
        message = f"target unreachable: {exc}"
    elif timed_out(exc):
        message = (
            f"timed out: the target did not answer within v2_timeout "
            f"({timeout} s): {_one_line(exc)}"
        )
    else:
        message = f"sync failed: {_one_line(exc)}"
    return Outcome(
        change,
        change.operation,
        "failed",
        encode_key(change.v1_pk),
        error=message,
        exception=exc,
    )


def _audit_row(outcome: Outcome, session_key: str | None) -> dict[str, Any]:
    return {
        "session_key": session_key,
        "mapping": outcome.mapping,
        "operation": outcome.operation,
        "v1_pk": outcome.v1_pk,
        "v2_pk": outcome.v2_pk,
        "status": outcome.status,
        "changes": outcome.changes,
        "before": None,
        "after": None,
        "error": outcome.error,
        "actor": outcome.change.actor,
        "reverted_by": None,
    }


def _one_line(exc: BaseException) -> str:
    original = getattr(exc, "orig", None)
    source = original if original is not None else exc
    text_ = str(source).strip()
    first = text_.splitlines()[0] if text_ else ""
    return (
        f"{type(source).__name__}: {first}" if first else type(source).__name__
    )


def _end_read(connection: Connection, *, rollback: bool, close: bool) -> None:
    """End the read transaction begun on a source connection."""
    try:
        if rollback and connection.in_transaction():
            connection.rollback()
    finally:
        if close:
            connection.close()


def _close_late_connection(
    future: concurrent.futures.Future[Connection],
) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    future.result().close()
