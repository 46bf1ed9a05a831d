"""Draining the outbox: applying every pending change, in batches.

One call of :func:`drain` walks the outbox once, oldest row first, up to
the highest id it saw when it started, in batches of ``batch_size`` rows.
For each batch it

1. claims the due pending rows; on PostgreSQL with ``FOR UPDATE SKIP
   LOCKED`` in a source transaction held until the batch is marked, so
   that several drains (threads, processes or machines) never take the
   same row;
2. merges the rows of one source row into one change per run of rows with
   the same session key, and drops the rows that the target already
   records as applied (another database only: a crash hit after the
   target commit and before the outbox update);
3. applies the changes in one target transaction, under the advisory row
   locks of :meth:`~sa_dualwrite._apply.Applier.lock_rows`, reading the
   source rows only after taking them: a drain and a commit that sync the
   same row run one after the other, and the later one reads the latest
   committed row;
4. marks applied rows ``done``, counts a failed attempt on the others
   (parking them after the last one), and turns the failed audit rows of
   their earlier attempts into ``replayed``.

A batch whose target transaction fails as a whole (the target is
unreachable, a lock wait timed out) ends the call with the rows still
pending and the error in ``DrainResult.error``; no attempt is counted.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Row

from sa_dualwrite import _outbox, _store
from sa_dualwrite._apply import _end_read
from sa_dualwrite._buffer import DELETE, Change, ChangeBuffer, RowKey
from sa_dualwrite._codec import decode_key, encode_key
from sa_dualwrite._errors import one_line
from sa_dualwrite._sync import (
    Outcome,
    SyncTimeout,
    sync_changes,
    timed_out,
)

if TYPE_CHECKING:
    from sa_dualwrite._install import DualWrite

__all__ = ["DrainResult", "drain", "prune"]

DEFAULT_BATCH_SIZE = 500
DEFAULT_BATCH_TIMEOUT = 30.0


@dataclass(frozen=True)
class DrainResult:
    """Counts of the outbox rows that one drain handled.

    ``applied`` rows became ``done``. ``failed`` rows were not applied and
    stay ``pending`` for a retry. ``parked`` rows failed their last attempt.
    A row that failed on its own data counts an attempt. The rows of a
    batch that failed on the target (unreachable, timed out) count none,
    and ``error`` then gives the reason the drain stopped early.
    ``audit_ids`` are the audit rows written.
    """

    applied: int = 0
    failed: int = 0
    parked: int = 0
    error: str | None = None
    audit_ids: tuple[int, ...] = field(default=(), repr=False)

    def __add__(self, other: DrainResult) -> DrainResult:
        return DrainResult(
            self.applied + other.applied,
            self.failed + other.failed,
            self.parked + other.parked,
            other.error or self.error,
            self.audit_ids + other.audit_ids,
        )

    @property
    def rows(self) -> int:
        """Number of outbox rows this drain attempted."""
        return self.applied + self.failed + self.parked


@dataclass
class _Group:
    """One change to sync and the outbox rows it stands for."""

    change: Change
    rows: list[Row[Any]]
    outcome: Outcome | None = None
    # An insert and a delete of one row that cancel out; see _merge.
    cancelled: bool = False
    # Nothing was done and nothing is audited or reported.
    silent: bool = False


@dataclass
class _Batch:
    rows: list[Row[Any]]
    groups: list[tuple[str | None, list[_Group]]] = field(default_factory=list)
    recorded: list[Row[Any]] = field(default_factory=list)
    unknown: list[Row[Any]] = field(default_factory=list)


def drain(
    handle: DualWrite,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    timeout: float = DEFAULT_BATCH_TIMEOUT,
    ids: Sequence[int] | None = None,
) -> DrainResult:
    """Apply the pending outbox rows; see :meth:`DualWrite.drain`."""
    with handle.engine.connect() as connection:
        upto = _outbox.max_id(connection)
        connection.rollback()
    total = DrainResult()
    after = 0
    while True:
        rows_seen, result, claimed = _drain_batch(
            handle,
            after=after,
            upto=upto,
            limit=batch_size,
            timeout=timeout,
            ids=ids,
        )
        if rows_seen is None:
            break
        if claimed:
            # A batch that failed on its own data, not on the target, is
            # drained again one row at a time, and so are the rows of a run
            # that ran out of time on a lock wait. The bad or locked row
            # then fails alone, and the other rows are applied.
            if result.error is None:
                total += result
            for row_id in claimed:
                _, single, _ = _drain_batch(
                    handle,
                    after=row_id - 1,
                    upto=row_id,
                    limit=1,
                    timeout=timeout,
                    ids=[row_id],
                )
                total += single
                if single.error is not None:
                    break
            after = rows_seen
            if total.error is not None:
                break
            continue
        total += result
        after = rows_seen
        if result.error is not None:
            break
    if total.rows or total.error:
        handle.logger.info(
            "drain_finished",
            applied=total.applied,
            failed=total.failed,
            parked=total.parked,
            error=total.error,
        )
    return total


def _drain_batch(
    handle: DualWrite,
    *,
    after: int,
    upto: int,
    limit: int,
    timeout: float,
    ids: Sequence[int] | None,
) -> tuple[int | None, DrainResult, list[int]]:
    """Drain one batch.

    Returns the last id claimed, the result, and the ids to drain again
    one at a time: every claimed row when the batch failed on an error of
    its own rows, the rows left untried by a lock wait otherwise.
    """
    if handle.in_transaction:
        return _drain_same_database(handle, after, upto, limit, timeout, ids)
    hold = handle.engine.dialect.name == "postgresql"
    with handle.engine.connect() as claimer:
        claimer.begin()
        rows = _outbox.claim(
            claimer, after=after, upto=upto, limit=limit, ids=ids, lock=hold
        )
        if not rows:
            claimer.rollback()
            return None, DrainResult(), []
        seen = rows[-1].id
        if ids is None:
            rows += _outbox.claim_rest(claimer, rows, upto=upto, lock=hold)
        if not hold:
            claimer.commit()
        result = _apply_elsewhere(handle, rows, timeout)
        if not claimer.in_transaction():
            claimer.begin()
        _record(claimer, handle, rows, result)
        claimer.commit()
    return seen, result.summary(), _isolate(rows, result)


def _drain_same_database(
    handle: DualWrite,
    after: int,
    upto: int,
    limit: int,
    timeout: float,
    ids: Sequence[int] | None,
) -> tuple[int | None, DrainResult, list[int]]:
    """Drain one batch when the target is the source database.

    Everything happens in one source transaction, so the rows become
    ``done`` atomically with the target writes.
    """
    applier = handle.applier
    deadline = time.monotonic() + timeout
    with handle.engine.connect() as connection, connection.begin():
        applier._begin_write(connection)
        lock = connection.dialect.name == "postgresql"
        rows = _outbox.claim(
            connection,
            after=after,
            upto=upto,
            limit=limit,
            ids=ids,
            lock=lock,
        )
        if not rows:
            return None, DrainResult(), []
        seen = rows[-1].id
        if ids is None:
            rows += _outbox.claim_rest(connection, rows, upto=upto, lock=lock)
        batch = _plan(handle, rows, recorded=set())
        outcome = _Applied(batch)
        try:
            with connection.begin_nested():
                saved = applier._set_timeouts(connection, deadline)
                applier.lock_rows(connection, _changes(batch))
                _sync(handle, connection, connection, batch, deadline)
                _outbox.mark_replayed(connection, _earlier_audit_ids(rows))
                applier._restore_timeouts(connection, saved)
        except Exception as exc:
            outcome = _Applied(batch, error=exc)
        _record(connection, handle, rows, outcome)
    return seen, outcome.summary(), _isolate(rows, outcome)


def _apply_elsewhere(
    handle: DualWrite, rows: list[Row[Any]], timeout: float
) -> _Applied:
    """Apply a claimed batch to a target in another database."""
    applier = handle.applier
    deadline = time.monotonic() + timeout
    try:
        target = applier._connect_target(deadline, "the drain's timeout")
    except Exception as exc:
        return _Applied(_Batch(rows), error=exc)
    reader = handle.engine.connect()
    try:
        with target.begin():
            applier._begin_write(target)
            applier._set_timeouts(target, deadline)
            # Lock first, so that a sync of these rows still running
            # elsewhere has committed its applied record when it is read.
            applier.lock_rows(target, _changes(_plan(handle, rows, set())))
            keys = {row.transaction_key for row in rows}
            recorded = _outbox.load_applied(target, keys)
            batch = _plan(handle, rows, recorded)
            _sync(handle, reader, target, batch, deadline)
            _outbox.insert_applied(
                target,
                (
                    _outbox.mark_key(row)
                    for _, groups in batch.groups
                    for group in groups
                    if group.outcome is not None
                    and group.outcome.status == "applied"
                    for row in group.rows
                ),
            )
            _outbox.mark_replayed(target, _earlier_audit_ids(rows))
        return _Applied(batch)
    except Exception as exc:
        return _Applied(_Batch(rows), error=exc)
    finally:
        _end_read(reader, rollback=True, close=True)
        target.close()


def _plan(
    handle: DualWrite, rows: list[Row[Any]], recorded: set[_outbox.MarkKey]
) -> _Batch:
    """Group claimed rows into changes, per run of one session key."""
    batch = _Batch(rows)
    todo = []
    for row in rows:
        if _outbox.mark_key(row) in recorded:
            batch.recorded.append(row)
        elif row.mapping not in handle._mappings:
            batch.unknown.append(row)
        else:
            todo.append(row)
    # Rows of one source transaction are written at each of its flushes,
    # so other transactions' rows can sit between them. Each transaction is
    # moved, whole and in order, to the place of its last row, where it
    # committed: rows before that place cannot refer to its uncommitted
    # rows, so no reference is broken, and its changes to one row merge.
    last = {row.transaction_key: index for index, row in enumerate(todo)}
    todo.sort(key=lambda row: last[row.transaction_key])
    for session_key, same_session in groupby(
        todo, key=lambda row: row.session_key
    ):
        batch.groups.append((session_key, _merge(handle, list(same_session))))
    return batch


def _merge(handle: DualWrite, rows: list[Row[Any]]) -> list[_Group]:
    """Return one change per source row, in the order of the buffer.

    Unlike a transaction's buffer, an insert and a later delete of one row
    do not cancel out: the target may hold the row from an earlier sync,
    so the row gets a delete, which the sync skips if there is nothing to
    delete.
    """
    buffer = ChangeBuffer()
    rows_of: dict[RowKey, list[Row[Any]]] = {}
    for row in rows:
        mapping = handle._mappings[row.mapping]
        change = Change(
            row.mapping,
            row.operation,
            decode_key(row.v1_pk, mapping.source_pk_types),
            frozenset(row.changes or ()),
            row.actor,
        )
        buffer.add(change)
        rows_of.setdefault(change.key, []).append(row)
    changes = buffer.changes()
    kept = {change.key for change in changes}
    cancelled = set()
    for key, same_row in rows_of.items():
        if key not in kept:
            changes.append(
                Change(key[0], DELETE, key[1], actor=same_row[-1].actor)
            )
            cancelled.add(key)
    return [
        _Group(change, rows_of[change.key], cancelled=change.key in cancelled)
        for change in changes
    ]


def _changes(batch: _Batch) -> list[Change]:
    return [group.change for _, groups in batch.groups for group in groups]


def _sync(
    handle: DualWrite,
    source: Connection,
    target: Connection,
    batch: _Batch,
    deadline: float,
) -> None:
    for session_key, groups in batch.groups:
        todo = [
            group for group in groups if not _cancelled_unsynced(target, group)
        ]
        if not todo:
            continue
        outcomes = sync_changes(
            [group.change for group in todo],
            source=source,
            target=target,
            mappings=handle._mappings,
            session_key=session_key,
            deadline=deadline,
        )
        for group, outcome in zip(todo, outcomes, strict=True):
            group.outcome = outcome


def _cancelled_unsynced(target: Connection, group: _Group) -> bool:
    """Settle a cancelled insert and delete that never reached the target.

    Such a pair means nothing, unlike one whose insert an earlier batch
    synced. The target then contains the row, and the delete removes it.
    """
    if not group.cancelled:
        return False
    change = group.change
    v1_key = encode_key(change.v1_pk)
    if _store.load_xref(target, change.mapping, [v1_key]):
        return False
    group.outcome = Outcome(change, DELETE, "applied", v1_key)
    group.silent = True
    return True


def _earlier_audit_ids(rows: Sequence[Row[Any]]) -> list[int]:
    return [row.audit_id for row in rows if row.audit_id is not None]


class _Applied:
    """The outcome of applying one batch, before it is recorded."""

    def __init__(self, batch: _Batch, error: BaseException | None = None):
        self.batch = batch
        self.error = error
        self.applied = 0
        self.failed = 0
        self.parked = 0
        self.audit_ids: list[int] = []
        self.retry_alone: list[int] = []

    def summary(self) -> DrainResult:
        return DrainResult(
            self.applied,
            self.failed,
            self.parked,
            None if self.error is None else one_line(self.error),
            tuple(self.audit_ids),
        )


def _record(
    connection: Connection,
    handle: DualWrite,
    rows: list[Row[Any]],
    result: _Applied,
) -> None:
    """Mark the claimed rows after their batch, then report outcomes."""
    if (
        result.error is not None
        and len(rows) == 1
        and not _transient(result.error)
    ):
        message = f"drain failed: {one_line(result.error)}"
        result.parked = _outbox.mark_failed(
            connection, [(rows[0], message, None)], handle.policy
        )
        result.failed = 1 - result.parked
        handle.logger.error(
            "drain_change_failed",
            error=one_line(result.error),
            exc_info=result.error,
            outbox_id=rows[0].id,
        )
        result.error = None
        return
    if result.error is not None:
        message = (
            f"drain failed, the change stays pending: {one_line(result.error)}"
        )
        _outbox.note_error(
            connection, error=message, ids=[row.id for row in rows]
        )
        result.failed = len(rows)
        handle.logger.error(
            "drain_batch_failed",
            error=one_line(result.error),
            exc_info=result.error,
            changes=len(rows),
        )
        return

    batch = result.batch
    done: list[tuple[int, int | None]] = [
        (row.id, row.audit_id) for row in batch.recorded
    ]
    not_attempted: list[tuple[Row[Any], str | None, int | None]] = []
    # A run of several changes that timed out on a lock wait cannot tell
    # which row was locked, and changes the budget left untried were not
    # tried at all: both are tried again alone, without an attempt.
    alone = sum(len(groups) for _, groups in batch.groups) > 1
    failed: list[tuple[Row[Any], str | None, int | None]] = []
    _keep_unknown(connection, handle, batch.unknown)
    for _, groups in batch.groups:
        for group in groups:
            outcome = group.outcome
            assert outcome is not None
            if outcome.audit_id is not None:
                result.audit_ids.append(outcome.audit_id)
            for row in group.rows:
                if outcome.status == "applied":
                    done.append((row.id, outcome.audit_id))
                elif (
                    alone
                    and outcome.exception is not None
                    and (
                        timed_out(outcome.exception)
                        or isinstance(outcome.exception, SyncTimeout)
                    )
                ):
                    not_attempted.append(
                        (row, outcome.error, outcome.audit_id)
                    )
                    result.retry_alone.append(row.id)
                elif isinstance(outcome.exception, SyncTimeout):
                    not_attempted.append(
                        (row, outcome.error, outcome.audit_id)
                    )
                else:
                    failed.append((row, outcome.error, outcome.audit_id))
    _outbox.mark_done(connection, done)
    _outbox.mark_not_attempted(connection, not_attempted)
    result.parked = _outbox.mark_failed(connection, failed, handle.policy)
    result.applied = len(done)
    result.failed = (
        len(batch.unknown)
        + len(failed)
        + len(not_attempted)
        - len(result.retry_alone)
        - result.parked
    )
    for session_key, groups in batch.groups:
        handle.applier.report(
            [
                group.outcome
                for group in groups
                if group.outcome is not None and not group.silent
            ],
            session_key,
        )


def _keep_unknown(
    connection: Connection, handle: DualWrite, rows: list[Row[Any]]
) -> None:
    """Leave rows of mappings this handle lacks pending, and log an error.

    A worker started with the wrong mappings must not use up the attempts
    of every change, so no attempt is counted. Each drain logs an error per
    missing mapping until a handle with that mapping drains the rows.
    """
    by_mapping: dict[str, list[int]] = {}
    for row in rows:
        by_mapping.setdefault(row.mapping, []).append(row.id)
    for mapping, ids in sorted(by_mapping.items()):
        message = (
            f"mapping {mapping!r} is not installed; drain these changes "
            "with the mappings of the application"
        )
        _outbox.note_error(connection, error=message, ids=ids)
        handle.logger.error(
            "drain_mapping_not_installed",
            mapping=mapping,
            changes=len(ids),
            error=message,
        )


# SQLSTATE classes of errors about the target database rather than the
# rows: connection (08), transaction rollback such as a deadlock (40),
# schema or privileges, such as a missing table (42), resources (53),
# operator intervention (57), system (58) and configuration files (F0).
_TARGET_CLASSES = ("08", "40", "42", "53", "57", "58", "F0")


def _transient(exc: BaseException) -> bool:
    """Return whether an error is about the target rather than the rows.

    Such errors (unreachable, timed out, connection lost, a missing table)
    leave the rows pending without counting an attempt.
    """
    if isinstance(exc, TimeoutError) or timed_out(exc):
        return True
    if getattr(exc, "connection_invalidated", False):
        return True
    original = getattr(exc, "orig", None) or exc
    code = getattr(original, "sqlstate", None) or getattr(
        original, "pgcode", None
    )
    if code:
        return str(code)[:2] in _TARGET_CLASSES
    return any(
        cls.__name__ == "OperationalError"
        for cls in (*type(exc).__mro__, *type(original).__mro__)
    )


def _isolate(rows: list[Row[Any]], result: _Applied) -> list[int]:
    """Return the ids to drain again one at a time; see _drain_batch."""
    if result.error is None:
        return result.retry_alone
    if len(rows) < 2 or _transient(result.error):
        return []
    return [row.id for row in rows]


def prune(handle: DualWrite, *, older_than: float, limit: int = 1000) -> int:
    """Delete done outbox rows and stale applied records; see DualWrite."""
    before = _store.utcnow() - dt.timedelta(seconds=older_than)
    deleted = 0
    while True:
        with handle.engine.begin() as connection:
            count = _outbox.prune_done(connection, before, limit)
        deleted += count
        if count < limit:
            break
    if not handle.in_transaction:
        with (
            handle.target.begin() as target,
            handle.engine.connect() as source,
        ):
            stale = _outbox.stale_applied(target, source, limit)
            _outbox.delete_applied(target, stale)
    if deleted:
        handle.logger.info("outbox_pruned", rows=deleted)
    return deleted
