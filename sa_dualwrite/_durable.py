"""The sync of a source commit in durable mode, and its outbox bookkeeping.

:class:`DurableApplier` applies the changes of a commit the way
:class:`~sa_dualwrite._apply.Applier` does, then records the outcome on the
commit's outbox rows:

* Target in the source database: the sync, its audit rows and the outbox
  update run under one savepoint just before the source COMMIT, so the
  outbox rows become ``done`` atomically with the target rows; a crash
  before COMMIT loses the source write and the intent together.
* Target in another database: the sync commits on the target first, with a
  record of the applied outbox changes in ``dualwrite_outbox_applied``;
  then the outbox rows are marked ``done`` in a short source transaction.
  A crash between the two commits leaves the rows ``pending``; the drain
  finds the applied record and marks them ``done`` without applying them
  again. Without the record the drain would still be correct, because a
  sync writes the target from the current source row, but it would write
  a second audit row for the change.

A sync that fails as a whole (the target is unreachable, the connection
broke, the audit could not be written) leaves the rows ``pending`` for the
drain without counting an attempt, and logs one ``sync_deferred`` event; a
change that fails alone (a constraint, a lock wait that timed out) counts
an attempt, writes a ``failed`` audit row and is retried by the drain with
backoff.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from sa_dualwrite import _outbox, _pipeline
from sa_dualwrite._apply import Applier, _end_read
from sa_dualwrite._buffer import Change
from sa_dualwrite._codec import encode_key
from sa_dualwrite._errors import DualWriteError, one_line
from sa_dualwrite._outbox import RetryPolicy
from sa_dualwrite._sync import Outcome, sync_changes, timed_out
from sa_dualwrite._watchdog import sqlite_busy_timeout
from sa_dualwrite.listeners._outbox import (
    current_transaction_key,
    last_transaction_key,
)
from sa_dualwrite.mapping._compile import CompiledMapping

__all__ = ["DurableApplier"]


class DurableApplier(Applier):
    """Applies changes like :class:`Applier` and updates their outbox rows.

    After the target was found unreachable, syncs after commit are skipped
    for a while (doubling from ``retry_delay`` up to ``retry_delay_max``
    seconds), so that commits do not each wait for the target; the changes
    stay in the outbox for the drain.
    """

    def __init__(
        self,
        *,
        source: Engine,
        target: Engine,
        mappings: dict[str, CompiledMapping],
        timeout: float,
        logger: Any,
        policy: RetryPolicy,
    ) -> None:
        super().__init__(
            source=source,
            target=target,
            mappings=mappings,
            timeout=timeout,
            logger=logger,
        )
        self.policy = policy
        self._unreachable_until = 0.0
        self._unreachable_count = 0

    def apply_in_transaction(
        self,
        connection: Connection,
        changes: Sequence[Change],
        session_key: str | None,
    ) -> list[Outcome]:
        """Sync ``changes`` and mark their outbox rows, before the COMMIT.

        The advisory row locks make a concurrent drain of the same rows
        wait for this transaction, so that it reads the committed rows.
        """
        flushed_key = current_transaction_key(connection)
        # With the target in the source database no outbox row is written at
        # flush: the sync runs in the source transaction and writes them.
        transaction_key = flushed_key or uuid.uuid4().hex

        def finish(failed: list[Outcome]) -> list[tuple[str, Any]]:
            if flushed_key is not None:
                return _outbox.pipeline_marks(
                    flushed_key, failed, self.policy, audited=False
                )
            return [
                _outbox.pipeline_synced_rows(
                    transaction_key, session_key, changes, failed, self.policy
                )
            ]

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
                    lock=True,
                    finish=finish,
                )
            except Exception as exc:
                if timed_out(exc):
                    self._keep_in_outbox(
                        connection,
                        flushed_key,
                        transaction_key,
                        changes,
                        session_key,
                    )
                    return self._left_pending(
                        connection, transaction_key, changes, exc, nested=True
                    )
                self._log_fast_failure(exc, changes)
        try:
            with connection.begin_nested():
                if flushed_key is None:
                    _outbox.insert_rows(
                        connection,
                        _outbox.new_rows(
                            changes,
                            transaction_key=transaction_key,
                            session_key=session_key or "",
                        ),
                    )
                saved = self._set_timeouts(connection, deadline)
                self.lock_rows(connection, changes)
                outcomes = sync_changes(
                    changes,
                    source=connection,
                    target=connection,
                    mappings=self.mappings,
                    session_key=session_key,
                    deadline=deadline,
                )
                if transaction_key is not None:
                    _outbox.mark_transaction(
                        connection,
                        transaction_key,
                        outcomes,
                        self.policy,
                        skip_locked=False,
                    )
                self._restore_timeouts(connection, saved)
            return outcomes
        except Exception as exc:
            self._keep_in_outbox(
                connection, flushed_key, transaction_key, changes, session_key
            )
            return self._left_pending(
                connection, transaction_key, changes, exc, nested=True
            )

    def _keep_in_outbox(
        self,
        connection: Connection,
        flushed_key: str | None,
        transaction_key: str,
        changes: Sequence[Change],
        session_key: str | None,
    ) -> None:
        """Write pending outbox rows for a sync that failed as a whole.

        Only needed when the flush wrote none. If they cannot be written
        either, the source commit is stopped: the change would be lost.
        """
        if flushed_key is not None or not changes:
            return
        rows = _outbox.new_rows(
            changes,
            transaction_key=transaction_key,
            session_key=session_key or "",
        )
        try:
            with connection.begin_nested():
                _outbox.insert_rows(connection, rows)
        except SQLAlchemyError as exc:
            raise DualWriteError(
                f"writing {len(rows)} changes to the outbox table "
                f"{_outbox.outbox.name} failed, and their sync failed too, so "
                f"the source write was not committed: {one_line(exc)}. If the "
                "table is missing, create it with DualWrite.create_tables() "
                "or from sa_dualwrite.outbox_metadata in a migration"
            ) from exc

    def apply_after_commit(
        self,
        source_connection: Connection | None,
        changes: Sequence[Change],
        session_key: str | None,
    ) -> list[Outcome]:
        """Sync ``changes`` on the target, then mark their outbox rows."""
        transaction_key = last_transaction_key(source_connection)
        if time.monotonic() < self._unreachable_until:
            self.logger.debug(
                "changes_deferred", changes=len(changes), reason="unreachable"
            )
            return []
        deadline = time.monotonic() + self.timeout
        try:
            target = self._connect_target(deadline)
        except Exception as exc:
            self._note_unreachable(exc)
            return self._left_pending(
                source_connection, transaction_key, changes, exc, nested=False
            )
        self._unreachable_count = 0
        own_source = source_connection is None
        source = source_connection or self.source.connect()
        owns_read = not source.in_transaction()
        try:
            with (
                self.watchdog.guard(target, deadline),
                sqlite_busy_timeout(target, deadline),
            ):
                return self._apply_to(
                    target,
                    source,
                    changes,
                    session_key,
                    transaction_key,
                    deadline,
                    owns_read,
                )
        finally:
            if own_source:
                source.close()
            target.close()

    def _apply_to(
        self,
        target: Connection,
        source: Connection,
        changes: Sequence[Change],
        session_key: str | None,
        transaction_key: str | None,
        deadline: float,
        owns_read: bool,
    ) -> list[Outcome]:
        """Apply on a checked-out target; see :meth:`apply_after_commit`."""
        if (
            transaction_key is not None
            and owns_read
            and _pipeline.usable(target)
            and _pipeline.usable(source)
            and _pipeline.eligible(changes, self.mappings, target.dialect)
        ):
            try:
                return self._apply_pipelined(
                    target,
                    source,
                    changes,
                    session_key,
                    transaction_key,
                    deadline,
                )
            except Exception as exc:
                if timed_out(exc):
                    return self._left_pending(
                        source, transaction_key, changes, exc, nested=False
                    )
                self._log_fast_failure(exc, changes)
        try:
            outcomes = self._apply_recorded(
                target,
                source,
                changes,
                session_key,
                transaction_key,
                deadline,
            )
        except Exception as exc:
            _end_read(source, rollback=owns_read, close=False)
            return self._left_pending(
                source, transaction_key, changes, exc, nested=False
            )
        _end_read(source, rollback=owns_read, close=False)
        if transaction_key is not None:
            self._mark(source, transaction_key, outcomes)
        return outcomes

    def _apply_pipelined(
        self,
        target: Connection,
        source: Connection,
        changes: Sequence[Change],
        session_key: str | None,
        transaction_key: str,
        deadline: float,
    ) -> list[Outcome]:
        """Sync in pipeline mode, then mark the outbox rows done.

        The applied record goes into the target transaction. The outbox
        rows are marked in a short source transaction that does not wait
        for its WAL flush (synchronous_commit off). If a crash loses that
        update, the rows stay pending and the drain finds the applied
        record, so nothing is applied twice.
        """
        outcomes = _pipeline.sync_after_commit(
            target,
            source,
            changes,
            mappings=self.mappings,
            session_key=session_key,
            deadline=deadline,
            finish=lambda failed: [
                _outbox.pipeline_applied_record(
                    transaction_key, changes, failed
                )
            ],
        )
        try:
            _pipeline.run_statements(
                source,
                [
                    ("SET LOCAL synchronous_commit TO OFF", None),
                    *_outbox.pipeline_marks(
                        transaction_key,
                        [o for o in outcomes if o.status != "applied"],
                        self.policy,
                        audited=True,
                    ),
                ],
            )
        except Exception as exc:
            self.logger.error(
                "outbox_update_failed",
                error=one_line(exc),
                exc_info=exc,
                transaction_key=transaction_key,
                changes=len(outcomes),
            )
        return outcomes

    def _apply_recorded(
        self,
        target: Connection,
        source: Connection,
        changes: Sequence[Change],
        session_key: str | None,
        transaction_key: str | None,
        deadline: float,
    ) -> list[Outcome]:
        """Sync the changes a drain has not applied yet, and record them."""
        with target.begin():
            self._begin_write(target)
            self._set_timeouts(target, deadline)
            self.lock_rows(target, changes)
            if transaction_key is not None:
                done = _outbox.load_applied(target, [transaction_key])
                changes = [
                    change
                    for change in changes
                    if (
                        transaction_key,
                        change.mapping,
                        encode_key(change.v1_pk),
                    )
                    not in done
                ]
            outcomes = sync_changes(
                changes,
                source=source,
                target=target,
                mappings=self.mappings,
                session_key=session_key,
                deadline=deadline,
            )
            if transaction_key is not None:
                _outbox.insert_applied(
                    target,
                    (
                        (transaction_key, outcome.mapping, outcome.v1_pk)
                        for outcome in outcomes
                        if outcome.status == "applied"
                    ),
                )
        return outcomes

    def _mark(
        self,
        source: Connection,
        transaction_key: str,
        outcomes: Sequence[Outcome],
    ) -> None:
        """Mark the outbox rows of a committed transaction; never raises.

        A session joined to a transaction that the application keeps open
        marks them inside that transaction, under a savepoint.
        """
        # NOTE: rows that a drain has locked are skipped here. If this sync
        # failed a change that the drain then applies, the failed audit row
        # written here stays "failed" (no outbox row links to it) until a
        # replay, which then finds the change applied.
        try:
            begin = (
                source.begin_nested
                if source.in_transaction()
                else source.begin
            )
            with begin():
                _outbox.mark_transaction(
                    source,
                    transaction_key,
                    outcomes,
                    self.policy,
                    skip_locked=True,
                )
        except Exception as exc:
            self.logger.error(
                "outbox_update_failed",
                error=one_line(exc),
                exc_info=exc,
                transaction_key=transaction_key,
                changes=len(outcomes),
            )

    def _note_unreachable(self, exc: BaseException) -> None:
        self._unreachable_count += 1
        pause = self.policy.delay(self._unreachable_count)
        self._unreachable_until = time.monotonic() + pause
        self.logger.warning(
            "target_unreachable",
            error=one_line(exc),
            retry_in=pause,
        )

    def _left_pending(
        self,
        connection: Connection | None,
        transaction_key: str | None,
        changes: Sequence[Change],
        exc: BaseException,
        *,
        nested: bool,
    ) -> list[Outcome]:
        """Log a sync that failed as a whole; its rows stay pending.

        One ``sync_deferred`` event is logged for the whole commit, not a
        ``change_failed`` per change: nothing failed for good, and the
        drain sends ``change_applied`` or ``change_failed`` later.
        """
        message = f"sync deferred to the drain: {one_line(exc)}"
        self.logger.warning(
            "sync_deferred",
            error=one_line(exc),
            changes=len(changes),
            transaction_key=transaction_key,
        )
        if connection is None or transaction_key is None:
            return []
        try:
            begin = (
                connection.begin_nested
                if nested or connection.in_transaction()
                else connection.begin
            )
            with begin():
                _outbox.note_error(
                    connection, error=message, transaction_key=transaction_key
                )
        except Exception as note_exc:
            self.logger.error(
                "outbox_update_failed",
                error=one_line(note_exc),
                exc_info=note_exc,
                transaction_key=transaction_key,
                changes=len(changes),
            )
        return []
