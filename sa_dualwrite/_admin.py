"""Read-only views for operators: sync status, audit search, revert preview.

These back :meth:`DualWrite.status`, :meth:`DualWrite.audit_rows` and
:meth:`DualWrite.preview_revert`, and through them the ``sa-dualwrite``
commands ``status``, ``audit`` and ``revert --dry-run``.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, inspect, select
from sqlalchemy.exc import SQLAlchemyError

from sa_dualwrite import _outbox, _revert, _store
from sa_dualwrite._codec import decode_key
from sa_dualwrite._errors import DualWriteError, one_line

if TYPE_CHECKING:
    from sa_dualwrite._install import DualWrite

__all__ = [
    "MappingStatus",
    "RevertStep",
    "audit_rows",
    "preview_revert",
    "status",
    "status_report",
]

audit = _store.audit_table
outbox = _store.outbox_table


@dataclass(frozen=True)
class MappingStatus:
    """Sync state of one mapping.

    ``pending`` and ``parked`` count outbox rows (durable mode) waiting to
    be applied and parked after their last attempt; ``applied`` and
    ``failed`` count audit rows with that status (a failed audit row is a
    change whose last attempt failed and that was not replayed yet).
    ``lag`` is the age of the oldest pending outbox row, in seconds, or
    None when nothing is pending. A count is None when its table could not
    be read (see :func:`status_report`).
    """

    mapping: str
    pending: int | None = 0
    parked: int | None = 0
    applied: int | None = 0
    failed: int | None = 0
    oldest_pending_at: dt.datetime | None = None
    lag: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return the fields as JSON-compatible values."""
        return {
            "mapping": self.mapping,
            "pending": self.pending,
            "parked": self.parked,
            "applied": self.applied,
            "failed": self.failed,
            "oldest_pending_at": None
            if self.oldest_pending_at is None
            else self.oldest_pending_at.isoformat(),
            "lag": self.lag,
        }


def status(handle: DualWrite) -> list[MappingStatus]:
    """Return the sync state of every mapping; see DualWrite.status."""
    entries, problems = status_report(handle, require_outbox=False)
    if problems:
        raise DualWriteError(problems[0])
    return entries


def status_report(
    handle: DualWrite, *, require_outbox: bool
) -> tuple[list[MappingStatus], list[str]]:
    """Return the sync state of every mapping, and what could not be read.

    Each database is read on its own, so that the outbox counts and the
    lag (from V1) are still returned while V2 is unreachable. The counts
    of a table that could not be read are None. ``require_outbox`` counts
    a V1 database without the outbox table as a problem.
    """
    problems: list[str] = []
    audit_counts: dict[str, dict[str, int]] | None = None
    outbox_counts: dict[str, dict[str, Any]] | None = None
    try:
        audit_counts = _audit_counts(handle)
    except DualWriteError as exc:
        problems.append(str(exc))
    except (SQLAlchemyError, TimeoutError) as exc:
        problems.append(
            "cannot read the audit table of the target database "
            f"{handle.target.url.render_as_string(hide_password=True)}: "
            f"{one_line(exc)}; APPLIED and FAILED are unknown until it "
            "answers"
        )
    try:
        outbox_counts = _outbox_counts(handle)
    except SQLAlchemyError as exc:
        problems.append(
            "cannot read the outbox of the source database "
            f"{handle.engine.url.render_as_string(hide_password=True)}: "
            f"{one_line(exc)}"
        )
    else:
        if outbox_counts is None and require_outbox:
            problems.append(
                f"table {outbox.name} not found in the source database "
                f"{handle.engine.url.render_as_string(hide_password=True)}; "
                "check that --v1-url names the V1 database, or create the "
                "tables with DualWrite.create_tables()"
            )
    names = set(handle._mappings)
    names.update(audit_counts or ())
    names.update(outbox_counts or ())
    now = _store.utcnow()
    entries = []
    for name in sorted(names):
        audited = None if audit_counts is None else audit_counts.get(name, {})
        queued = None if outbox_counts is None else outbox_counts.get(name, {})
        oldest = None if queued is None else queued.get("oldest")
        entries.append(
            MappingStatus(
                mapping=name,
                pending=None if queued is None else queued.get("pending", 0),
                parked=None if queued is None else queued.get("parked", 0),
                applied=None if audited is None else audited.get("applied", 0),
                failed=None if audited is None else audited.get("failed", 0),
                oldest_pending_at=oldest,
                lag=None
                if oldest is None
                else max((now - oldest).total_seconds(), 0.0),
            )
        )
    return entries, problems


def _audit_counts(handle: DualWrite) -> dict[str, dict[str, int]]:
    """Count the applied and failed audit rows per mapping."""
    counts: dict[str, dict[str, int]] = {}
    deadline = time.monotonic() + handle.v2_timeout
    connection = handle.applier._connect_target(deadline)
    try:
        if not inspect(connection).has_table(audit.name):
            raise DualWriteError(
                f"table {audit.name} not found in the target database "
                f"{handle.target.url.render_as_string(hide_password=True)}; "
                "check that --v2-url names the V2 database (without it, V2 "
                "is the V1 database), or create the tables with "
                "DualWrite.create_tables()"
            )
        result = connection.execute(
            select(audit.c.mapping, audit.c.status, func.count())
            .where(audit.c.status.in_(["applied", "failed"]))
            .group_by(audit.c.mapping, audit.c.status)
        )
        for mapping, state, number in result:
            counts.setdefault(mapping, {})[state] = int(number)
    finally:
        connection.close()
    return counts


def _outbox_counts(handle: DualWrite) -> dict[str, dict[str, Any]] | None:
    """Count pending and parked outbox rows per mapping; None: no table."""
    counts: dict[str, dict[str, Any]] = {}
    with handle.engine.connect() as connection:
        if not inspect(connection).has_table(outbox.name):
            return None
        result = connection.execute(
            select(
                outbox.c.mapping,
                outbox.c.status,
                func.count(),
                func.min(outbox.c.created_at),
            )
            .where(outbox.c.status.in_(["pending", "failed"]))
            .group_by(outbox.c.mapping, outbox.c.status)
        )
        for mapping, state, number, oldest in result:
            entry = counts.setdefault(mapping, {})
            key = "pending" if state == "pending" else "parked"
            entry[key] = int(number)
            if state == "pending":
                entry["oldest"] = _aware(oldest)
    return counts


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    # SQLite returns naive datetimes; the plugin writes them in UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value


def audit_rows(
    handle: DualWrite,
    *,
    mapping: str | None = None,
    status: str | None = None,
    operation: str | None = None,
    session_key: str | None = None,
    v1_pk: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    ids: Sequence[int] | None = None,
    limit: int | None = 100,
) -> list[dict[str, Any]]:
    """Return audit rows, newest first; see DualWrite.audit_rows."""
    if status is not None and status not in _store.STATUSES:
        raise DualWriteError(
            f"unknown audit status {status!r}; use one of "
            f"{', '.join(_store.STATUSES)}"
        )
    if operation is not None and operation not in _store.OPERATIONS:
        raise DualWriteError(
            f"unknown operation {operation!r}; use one of "
            f"{', '.join(_store.OPERATIONS)}"
        )
    query = select(audit).order_by(audit.c.id.desc())
    filters = {
        "mapping": mapping,
        "status": status,
        "operation": operation,
        "session_key": session_key,
        "v1_pk": v1_pk,
    }
    for column, value in filters.items():
        if value is not None:
            query = query.where(audit.c[column] == value)
    if ids is not None:
        query = query.where(audit.c.id.in_(list(ids)))
    if since is not None:
        query = query.where(audit.c.created_at >= since)
    if until is not None:
        query = query.where(audit.c.created_at < until)
    if limit is not None:
        query = query.limit(limit)
    with handle.target.connect() as connection:
        rows = connection.execute(query).all()
    result = []
    for row in rows:
        values = dict(row._mapping)
        values["created_at"] = _aware(values["created_at"])
        result.append(values)
    return result


@dataclass(frozen=True)
class RevertStep:
    """Effect of reverting one audit row on its target row.

    ``current`` is the target row now and ``restored`` the row after the
    revert (None: absent). ``conflict`` is true when the row changed since
    the change was applied, so the revert needs ``force``.
    """

    audit_id: int
    mapping: str
    operation: str
    v1_pk: str | None
    v2_pk: str | None
    table: str
    current: dict[str, Any] | None
    restored: dict[str, Any] | None
    conflict: bool


def preview_revert(
    handle: DualWrite,
    *,
    audit_id: int | None,
    session_key: str | None,
) -> list[RevertStep]:
    """Return what a revert would change; see DualWrite.preview_revert.

    The revert runs in a target transaction that is rolled back, so the
    preview shows exactly the rows the revert would write.
    """
    steps: list[RevertStep] = []
    with handle.target.connect() as connection, connection.begin():
        rows = _revert._select_for_revert(connection, audit_id, session_key)
        for row in rows:
            mapping = handle._mapping(row.mapping)
            current = (
                _revert._current_row(
                    connection,
                    mapping,
                    decode_key(row.v2_pk, mapping.target_pk_types),
                )
                if row.v2_pk is not None
                else None
            )
            undone = _revert._undo_one(connection, mapping, row, True)
            steps.append(
                RevertStep(
                    audit_id=row.id,
                    mapping=row.mapping,
                    operation=row.operation,
                    v1_pk=row.v1_pk,
                    v2_pk=row.v2_pk,
                    table=mapping.target_table.name,
                    current=undone["before"],
                    restored=undone["after"],
                    conflict=row.v2_pk is not None
                    and not _revert._same_row(mapping, current, row.after),
                )
            )
        connection.rollback()
    return steps


def replay_durable(handle: DualWrite, ids: Sequence[int] | None) -> list[int]:
    """Replay in durable mode: requeue parked changes and drain them.

    Failed audit rows that no outbox row refers to (written before durable
    mode was on, for example) are replayed as in the core plugin.
    """
    from sa_dualwrite._drain import drain

    with handle.engine.begin() as connection:
        linked = _outbox.linked_audit_ids(connection, ids)
        requeued = _outbox.requeue(connection, ids)
    query = select(audit.c.id).where(audit.c.status == "failed")
    if ids is not None:
        query = query.where(audit.c.id.in_(list(ids)))
    try:
        with handle.target.connect() as connection:
            failed = [
                int(value) for value in connection.execute(query).scalars()
            ]
    except SQLAlchemyError as exc:
        raise DualWriteError(
            f"replay could not read the failed changes: {one_line(exc)}; "
            f"the {len(requeued)} requeued outbox change(s) wait for the "
            "drain; call replay() again when the target database answers"
        ) from exc
    unlinked = [audit_id for audit_id in failed if audit_id not in linked]
    if ids is not None:
        missing = set(ids) - set(failed) - linked
        if missing:
            raise DualWriteError(
                f"audit rows {sorted(missing)} are not failed changes; "
                "list them with 'sa-dualwrite audit --status failed'"
            )
    new_ids = _revert.replay(handle, unlinked) if unlinked else []
    if requeued:
        result = drain(handle, ids=requeued)
        new_ids.extend(result.audit_ids)
    handle.logger.info(
        "replay_requeued", requeued=len(requeued), replayed=len(unlinked)
    )
    return new_ids
