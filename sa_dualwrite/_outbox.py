"""The outbox of durable mode: its rows, retry policy and queries.

An outbox row is one captured change, written in the source transaction
that made it. Its ``status`` is ``pending`` until a sync applies it, then
``done``; a change that keeps failing is parked as ``failed`` after the
policy's number of attempts, until a replay puts it back in the queue.
``attempts``, ``next_attempt_at``, ``last_error`` and ``audit_id`` (the
audit row of the last attempt) record the retries.

When the target is another database, the sync also records the outbox
changes it applied in ``dualwrite_outbox_applied``, in the target
transaction itself: marking a source row done cannot commit atomically with
the target, and that record is how a later drain recognises a change whose
target transaction committed just before a crash.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    Row,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    not_,
    or_,
    select,
    tuple_,
    update,
)

from sa_dualwrite import _store
from sa_dualwrite._buffer import Change
from sa_dualwrite._codec import encode_key
from sa_dualwrite._errors import DualWriteError
from sa_dualwrite._sync import SyncTimeout, timed_out

__all__ = [
    "PENDING",
    "RetryPolicy",
    "insert_rows",
    "new_rows",
    "outbox",
]

outbox = _store.outbox_table
applied = _store.outbox_applied_table
audit = _store.audit_table

PENDING = "pending"
DONE = "done"
FAILED = "failed"

DEFAULT_MAX_ATTEMPTS = 10
DEFAULT_RETRY_DELAY = 2.0
DEFAULT_RETRY_DELAY_MAX = 300.0

MarkKey = tuple[str, str, str]
"""An outbox change as the applied record names it: transaction key,
mapping and source key."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how late a failing outbox change is retried.

    The n-th failed attempt schedules the next one ``retry_delay * 2**(n-1)``
    seconds later, at most ``retry_delay_max`` seconds; the attempt number
    ``max_attempts`` that fails parks the change as ``failed``.
    """

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    retry_delay: float = DEFAULT_RETRY_DELAY
    retry_delay_max: float = DEFAULT_RETRY_DELAY_MAX

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not (
            isinstance(self.max_attempts, int) and self.max_attempts >= 1
        ):
            raise DualWriteError(
                f"max_attempts must be an integer of at least 1, got "
                f"{self.max_attempts!r}"
            )
        for name in ("retry_delay", "retry_delay_max"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise DualWriteError(
                    f"{name} must be a number of seconds of at least 0, "
                    f"got {value!r}"
                )

    def delay(self, attempts: int) -> float:
        """Return the seconds to wait after failed attempt ``attempts``."""
        exponent = min(max(attempts - 1, 0), 62)
        return float(min(self.retry_delay * 2**exponent, self.retry_delay_max))

    def parks(self, attempts: int) -> bool:
        """Return whether failed attempt ``attempts`` parks the change."""
        return attempts >= self.max_attempts


def new_rows(
    changes: Sequence[Change], *, transaction_key: str, session_key: str
) -> list[dict[str, Any]]:
    """Return the outbox rows of ``changes`` captured in one flush."""
    now = _store.utcnow()
    return [
        {
            "created_at": now,
            "transaction_key": transaction_key,
            "session_key": session_key,
            "actor": change.actor,
            "mapping": change.mapping,
            "operation": change.operation,
            "v1_pk": encode_key(change.v1_pk),
            "changes": sorted(change.changed),
            "status": PENDING,
            "attempts": 0,
        }
        for change in changes
    ]


# RETURNING makes SQLAlchemy send an executemany as multi-row INSERT
# statements (its "insertmanyvalues" mode) on every dialect that has it.
_insert_returning = insert(outbox).returning(outbox.c.id)
_insert_plain = insert(outbox)


def insert_rows(
    connection: Connection, rows: Sequence[dict[str, Any]]
) -> None:
    """Insert outbox rows with as few statements as the dialect allows."""
    if not rows:
        return
    if connection.dialect.insert_executemany_returning:
        connection.execute(_insert_returning, list(rows)).all()
    else:
        connection.execute(_insert_plain, list(rows))


def _own_rows(transaction_key: str, skip_locked: bool) -> Any:
    """Return a subquery of the pending rows of one source transaction.

    With ``skip_locked`` the rows that a drain has locked are left out,
    because that drain finds the applied record and marks them itself.
    """
    query = select(outbox.c.id).where(
        outbox.c.transaction_key == transaction_key,
        outbox.c.status == PENDING,
    )
    if skip_locked:
        query = query.with_for_update(skip_locked=True)
    return query


def mark_transaction(
    connection: Connection,
    transaction_key: str,
    outcomes: Iterable[Any],
    policy: RetryPolicy,
    *,
    skip_locked: bool,
) -> None:
    """Record the outcomes of a sync on the rows of one transaction.

    Rows of applied changes, and of changes that needed no target write,
    become ``done``; rows of failed changes get their attempt counted and
    their next attempt scheduled, or are parked.
    """
    now = _store.utcnow()
    failed = [outcome for outcome in outcomes if outcome.status != "applied"]
    failed_keys = [(outcome.mapping, outcome.v1_pk) for outcome in failed]
    done_rows = _own_rows(transaction_key, skip_locked)
    if failed_keys:
        done_rows = done_rows.where(
            not_(tuple_(outbox.c.mapping, outbox.c.v1_pk).in_(failed_keys))
        )
    connection.execute(
        update(outbox)
        .where(outbox.c.id.in_(done_rows.scalar_subquery()))
        .values(status=DONE, done_at=now, next_attempt_at=None)
    )
    for outcome in failed:
        rows = _own_rows(transaction_key, skip_locked).where(
            outbox.c.mapping == outcome.mapping,
            outbox.c.v1_pk == outcome.v1_pk,
        )
        statement = update(outbox).where(
            outbox.c.id.in_(rows.scalar_subquery())
        )
        if not counts_attempt(outcome):
            connection.execute(
                statement.values(
                    next_attempt_at=None,
                    last_error=outcome.error,
                    audit_id=outcome.audit_id,
                )
            )
            continue
        connection.execute(
            statement.values(
                attempts=outbox.c.attempts + 1,
                status=case(
                    (outbox.c.attempts + 1 >= policy.max_attempts, FAILED),
                    else_=PENDING,
                ),
                next_attempt_at=now + dt.timedelta(seconds=policy.delay(1)),
                last_error=outcome.error,
                audit_id=outcome.audit_id,
            )
        )


def counts_attempt(outcome: Any) -> bool:
    """Return whether a failed outcome of a commit's sync counts an attempt.

    A change that the sync never tried, because the time budget ran out on
    another change first, keeps its attempt count and stays due at once,
    so that one slow change cannot park the others. So does a change whose
    run of writes timed out on a lock wait, because the run cannot tell
    which of its rows was locked. The drain tries them one at a time.
    """
    exception = outcome.exception
    if isinstance(exception, SyncTimeout):
        return False
    return exception is None or not timed_out(exception)


def note_error(
    connection: Connection,
    *,
    error: str,
    transaction_key: str | None = None,
    ids: Sequence[int] | None = None,
) -> None:
    """Record an error that stopped a whole sync, without an attempt.

    Such errors (the target is unreachable, a lock wait timed out) are not
    about one change, so they leave the attempt count as it is.
    """
    statement = update(outbox).where(outbox.c.status == PENDING)
    if transaction_key is not None:
        statement = statement.where(
            outbox.c.id.in_(
                _own_rows(transaction_key, skip_locked=True).scalar_subquery()
            )
        )
    elif ids is not None:
        statement = statement.where(outbox.c.id.in_(list(ids)))
    else:  # pragma: no cover - every caller names its rows
        raise ValueError("note_error() needs transaction_key or ids")
    connection.execute(statement.values(last_error=error))


def claim(
    connection: Connection,
    *,
    after: int,
    upto: int,
    limit: int,
    ids: Sequence[int] | None,
    lock: bool,
) -> list[Row[Any]]:
    """Return up to ``limit`` due pending rows with ``after < id <= upto``.

    With ``lock`` the rows are locked until the transaction ends, skipping
    rows that another drain holds (``FOR UPDATE SKIP LOCKED``).
    """
    query = (
        select(outbox)
        .where(
            outbox.c.status == PENDING,
            outbox.c.id > after,
            outbox.c.id <= upto,
            or_(
                outbox.c.next_attempt_at.is_(None),
                outbox.c.next_attempt_at <= _store.utcnow(),
            ),
        )
        .order_by(outbox.c.id)
        .limit(limit)
    )
    if ids is not None:
        query = query.where(outbox.c.id.in_(list(ids)))
    if lock:
        query = query.with_for_update(skip_locked=True)
    return list(connection.execute(query))


def claim_rest(
    connection: Connection,
    rows: list[Row[Any]],
    *,
    upto: int,
    lock: bool,
) -> list[Row[Any]]:
    """Return the later pending rows of the last claimed transaction that
    change the same source rows.

    The limit of a claim can cut the rows of the last transaction in two.
    Taking the rest of its changes to the claimed source rows keeps a drain
    from syncing half of a row's changes, such as an insert whose delete
    waits in the next batch. A large transaction still spreads over
    several batches and workers, because only those rows are added.
    """
    if not rows:
        return []
    last = rows[-1].transaction_key
    pairs = sorted(
        {
            (row.mapping, row.v1_pk)
            for row in rows
            if row.transaction_key == last
        }
    )
    query = (
        select(outbox)
        .where(
            outbox.c.status == PENDING,
            outbox.c.id > rows[-1].id,
            outbox.c.id <= upto,
            outbox.c.transaction_key == last,
            tuple_(outbox.c.mapping, outbox.c.v1_pk).in_(pairs),
        )
        .order_by(outbox.c.id)
    )
    if lock:
        query = query.with_for_update(skip_locked=True)
    return list(connection.execute(query))


def max_id(connection: Connection) -> int:
    """Return the highest outbox id, 0 for an empty outbox."""
    return int(connection.execute(select(func.max(outbox.c.id))).scalar() or 0)


_mark_done = (
    update(outbox)
    .where(outbox.c.id == bindparam("_id"), outbox.c.status == PENDING)
    .values(
        status=DONE,
        done_at=bindparam("_now"),
        next_attempt_at=None,
        audit_id=bindparam("_audit_id"),
    )
)
_mark_failed = (
    update(outbox)
    .where(outbox.c.id == bindparam("_id"), outbox.c.status == PENDING)
    .values(
        status=bindparam("_status"),
        attempts=bindparam("_attempts"),
        next_attempt_at=bindparam("_next"),
        last_error=bindparam("_error"),
        audit_id=bindparam("_audit_id"),
    )
)
_mark_not_attempted = (
    update(outbox)
    .where(outbox.c.id == bindparam("_id"), outbox.c.status == PENDING)
    .values(last_error=bindparam("_error"), audit_id=bindparam("_audit_id"))
)


def mark_done(
    connection: Connection, done: Sequence[tuple[int, int | None]]
) -> None:
    """Mark rows ``(id, audit_id)`` done."""
    if done:
        now = _store.utcnow()
        connection.execute(
            _mark_done,
            [
                {"_id": row_id, "_now": now, "_audit_id": audit_id}
                for row_id, audit_id in done
            ],
        )


def mark_failed(
    connection: Connection,
    failed: Sequence[tuple[Row[Any], str | None, int | None]],
    policy: RetryPolicy,
) -> int:
    """Count a failed attempt on rows ``(row, error, audit_id)``.

    Returns how many rows were parked.
    """
    if not failed:
        return 0
    now = _store.utcnow()
    params = []
    parked = 0
    for row, error, audit_id in failed:
        attempts = row.attempts + 1
        parks = policy.parks(attempts)
        parked += parks
        params.append(
            {
                "_id": row.id,
                "_status": FAILED if parks else PENDING,
                "_attempts": attempts,
                "_next": None
                if parks
                else now + dt.timedelta(seconds=policy.delay(attempts)),
                "_error": error,
                "_audit_id": audit_id,
            }
        )
    connection.execute(_mark_failed, params)
    return parked


def mark_not_attempted(
    connection: Connection,
    rows: Sequence[tuple[Row[Any], str | None, int | None]],
) -> None:
    """Record why rows ``(row, error, audit_id)`` were not tried.

    They stay ``pending`` and due, with their attempt count unchanged.
    """
    if rows:
        connection.execute(
            _mark_not_attempted,
            [
                {"_id": row.id, "_error": error, "_audit_id": audit_id}
                for row, error, audit_id in rows
            ],
        )


def mark_key(row: Row[Any]) -> MarkKey:
    """Return the applied-record key of an outbox row."""
    return (row.transaction_key, row.mapping, row.v1_pk)


def load_applied(
    connection: Connection, transaction_keys: Iterable[str]
) -> set[MarkKey]:
    """Return the applied records of the given source transactions."""
    found: set[MarkKey] = set()
    keys = sorted(set(transaction_keys))
    for part in _store.chunks(keys):
        result = connection.execute(
            select(
                applied.c.transaction_key, applied.c.mapping, applied.c.v1_pk
            ).where(applied.c.transaction_key.in_(list(part)))
        )
        found.update((row[0], row[1], row[2]) for row in result)
    return found


def insert_applied(connection: Connection, keys: Iterable[MarkKey]) -> None:
    """Record outbox changes as applied, in the target transaction."""
    now = _store.utcnow()
    rows = [
        {
            "transaction_key": transaction_key,
            "mapping": mapping,
            "v1_pk": v1_pk,
            "applied_at": now,
        }
        for transaction_key, mapping, v1_pk in sorted(set(keys))
    ]
    if rows:
        connection.execute(insert(applied), rows)


def mark_replayed(connection: Connection, audit_ids: Iterable[int]) -> None:
    """Turn the failed audit rows of earlier attempts into ``replayed``."""
    ids = sorted(set(audit_ids))
    for part in _store.chunks(ids):
        connection.execute(
            update(audit)
            .where(audit.c.id.in_(list(part)), audit.c.status == "failed")
            .values(status="replayed")
        )


def requeue(
    connection: Connection, audit_ids: Sequence[int] | None
) -> list[int]:
    """Put failed rows back in the queue, due now; return their ids.

    Failed rows are the parked ones and the pending ones waiting for a
    retry after a failed attempt. With ``audit_ids``, only the rows whose
    last attempt wrote one of those audit rows are requeued.
    """
    query = select(outbox.c.id).where(
        or_(
            outbox.c.status == FAILED,
            and_(outbox.c.status == PENDING, outbox.c.audit_id.is_not(None)),
        )
    )
    if audit_ids is not None:
        query = select(outbox.c.id).where(
            outbox.c.status.in_([FAILED, PENDING]),
            outbox.c.audit_id.in_(list(audit_ids)),
        )
    ids = [int(row_id) for row_id in connection.execute(query).scalars()]
    for part in _store.chunks(ids):
        connection.execute(
            update(outbox)
            .where(outbox.c.id.in_(list(part)))
            .values(status=PENDING, attempts=0, next_attempt_at=None)
        )
    return ids


def linked_audit_ids(
    connection: Connection, audit_ids: Sequence[int] | None
) -> set[int]:
    """Return the audit ids that not-done outbox rows refer to."""
    query = select(outbox.c.audit_id).where(
        outbox.c.status.in_([FAILED, PENDING]), outbox.c.audit_id.is_not(None)
    )
    if audit_ids is not None:
        query = query.where(outbox.c.audit_id.in_(list(audit_ids)))
    return {int(value) for value in connection.execute(query).scalars()}


def prune_done(connection: Connection, before: dt.datetime, limit: int) -> int:
    """Delete up to ``limit`` done rows finished before ``before``."""
    ids = select(outbox.c.id).where(
        outbox.c.status == DONE, outbox.c.done_at < before
    )
    ids = ids.order_by(outbox.c.id).limit(limit)
    result = connection.execute(
        delete(outbox).where(outbox.c.id.in_(ids.scalar_subquery()))
    )
    return int(result.rowcount or 0)


def stale_applied(
    target: Connection, source: Connection, limit: int
) -> list[MarkKey]:
    """Return applied records whose outbox rows are all done or deleted."""
    records = [
        (row[0], row[1], row[2])
        for row in target.execute(
            select(
                applied.c.transaction_key, applied.c.mapping, applied.c.v1_pk
            )
            .order_by(applied.c.applied_at)
            .limit(limit)
        )
    ]
    if not records:
        return []
    open_rows: set[MarkKey] = set()
    for part in _store.chunks(sorted({record[0] for record in records})):
        result = source.execute(
            select(
                outbox.c.transaction_key, outbox.c.mapping, outbox.c.v1_pk
            ).where(
                outbox.c.transaction_key.in_(list(part)),
                outbox.c.status != DONE,
            )
        )
        open_rows.update((row[0], row[1], row[2]) for row in result)
    return [record for record in records if record not in open_rows]


def delete_applied(target: Connection, records: Sequence[MarkKey]) -> None:
    """Delete applied records."""
    for part in _store.chunks(list(records)):
        target.execute(
            delete(applied).where(
                or_(
                    *(
                        and_(
                            applied.c.transaction_key == key,
                            applied.c.mapping == mapping,
                            applied.c.v1_pk == v1_pk,
                        )
                        for key, mapping, v1_pk in part
                    )
                )
            )
        )


# The outbox bookkeeping of a sync sent in psycopg's pipeline mode (see
# sa_dualwrite._pipeline), as statements that run in its round trip. A
# change that reached the database in such a sync was applied, because any
# database error aborts the whole pipeline; the changes that failed before
# (a value map, a ref) are passed as ``failed``.
_MARK_DONE_SQL = (
    f"UPDATE {outbox.name} SET status = '{DONE}', done_at = now(), "
    "next_attempt_at = NULL WHERE transaction_key = %(transaction_key)s "
    f"AND status = '{PENDING}' AND NOT (mapping || chr(1) || v1_pk = "
    "ANY(%(failed)s))"
)
_MARK_FAILED_SQL = (
    f"UPDATE {outbox.name} AS o SET attempts = o.attempts + f.attempt, "
    "status = CASE WHEN f.attempt = 1 AND o.attempts + 1 >= "
    f"%(max_attempts)s THEN '{FAILED}' ELSE '{PENDING}' END, "
    "next_attempt_at = CASE WHEN f.attempt = 1 THEN now() + "
    "make_interval(secs => %(delay)s) END, "
    "last_error = f.error, audit_id = {audit_id} FROM "
    "jsonb_to_recordset(CAST(%(rows)s AS jsonb)) AS f(mapping text, "
    "v1_pk text, error text, attempt integer, audit_id bigint) "
    "WHERE o.transaction_key = %(transaction_key)s "
    f"AND o.status = '{PENDING}' AND o.mapping = f.mapping "
    "AND o.v1_pk = f.v1_pk"
)
# The audit id of a failed change: given when the audit rows were written
# before the outbox is marked, else read from the audit table, which the
# same pipeline writes first and which is then in the source database.
_GIVEN_AUDIT_ID = "f.audit_id"
_WRITTEN_AUDIT_ID = (
    f"(SELECT max(a.id) FROM {_store.audit_table.name} AS a WHERE "
    "a.mapping = o.mapping AND a.v1_pk = o.v1_pk AND a.status = 'failed')"
)
_RECORD_APPLIED_SQL = (
    f"INSERT INTO {_store.outbox_applied_table.name} (transaction_key, "
    "mapping, v1_pk, applied_at) SELECT %(transaction_key)s, applied.mapping, "
    "applied.v1_pk, now() FROM unnest(CAST(%(mappings)s AS text[]), "
    "CAST(%(keys)s AS text[])) AS applied(mapping, v1_pk)"
)


def pipeline_marks(
    transaction_key: str,
    failed: Sequence[Any],
    policy: RetryPolicy,
    *,
    audited: bool,
) -> list[tuple[str, dict[str, Any]]]:
    """Return the statements that record a pipelined sync on the outbox.

    ``audited``: the failed outcomes carry the ids of their audit rows,
    which the target database already holds. Otherwise the audit rows are
    written earlier in the same pipeline, in the source database.
    """
    statements: list[tuple[str, dict[str, Any]]] = [
        (
            _MARK_DONE_SQL,
            {
                "transaction_key": transaction_key,
                "failed": [f"{o.mapping}\x01{o.v1_pk}" for o in failed],
            },
        )
    ]
    if failed:
        rows = [
            {
                "mapping": o.mapping,
                "v1_pk": o.v1_pk,
                "error": o.error,
                "attempt": int(counts_attempt(o)),
                "audit_id": o.audit_id,
            }
            for o in failed
        ]
        audit_id = _GIVEN_AUDIT_ID if audited else _WRITTEN_AUDIT_ID
        statements.append(
            (
                _MARK_FAILED_SQL.replace("{audit_id}", audit_id),
                {
                    "transaction_key": transaction_key,
                    "max_attempts": policy.max_attempts,
                    "delay": policy.delay(1),
                    "rows": json.dumps(rows),
                },
            )
        )
    return statements


def pipeline_applied_record(
    transaction_key: str, changes: Sequence[Change], failed: Sequence[Any]
) -> tuple[str, dict[str, Any]]:
    """Return the INSERT of the applied record of a pipelined sync."""
    skipped = {(o.mapping, o.v1_pk) for o in failed}
    keys = [
        (change.mapping, encode_key(change.v1_pk))
        for change in changes
        if (change.mapping, encode_key(change.v1_pk)) not in skipped
    ]
    return (
        _RECORD_APPLIED_SQL,
        {
            "transaction_key": transaction_key,
            "mappings": [mapping for mapping, _ in keys],
            "keys": [key for _, key in keys],
        },
    )


_INSERT_SYNCED_SQL = (
    f"INSERT INTO {outbox.name} (created_at, transaction_key, session_key, "
    "actor, mapping, operation, v1_pk, changes, status, attempts, "
    "next_attempt_at, last_error, done_at, audit_id) SELECT now(), "
    "%(transaction_key)s, %(session_key)s, r.actor, r.mapping, r.operation, "
    "r.v1_pk, r.changes, CASE WHEN NOT r.failed THEN "
    f"'{DONE}' WHEN r.attempt = 1 AND %(max_attempts)s <= 1 THEN "
    f"'{FAILED}' ELSE '{PENDING}' END, CASE WHEN r.failed THEN r.attempt "
    "ELSE 0 END, CASE WHEN r.failed AND r.attempt = 1 THEN now() + "
    "make_interval(secs => %(delay)s) END, r.error, "
    "CASE WHEN NOT r.failed THEN now() END, CASE WHEN r.failed THEN "
    f"(SELECT max(a.id) FROM {_store.audit_table.name} AS a WHERE "
    "a.mapping = r.mapping AND a.v1_pk = r.v1_pk AND a.status = 'failed') "
    "END FROM jsonb_to_recordset(CAST(%(rows)s AS jsonb)) AS r(position "
    "integer, actor text, mapping text, operation text, v1_pk text, "
    "changes jsonb, failed boolean, error text, attempt integer) "
    "ORDER BY r.position"
)


def pipeline_synced_rows(
    transaction_key: str,
    session_key: str | None,
    changes: Sequence[Change],
    failed: Sequence[Any],
    policy: RetryPolicy,
) -> tuple[str, dict[str, Any]]:
    """Return the INSERT of the outbox rows of a sync in the V1 database.

    When the target is the source database the sync runs in the source
    transaction, so the sync itself writes the outbox rows, in the same
    transaction as the source write. Rows of applied changes are ``done``,
    and rows of failed changes are due for a retry.
    """
    errors = {(o.mapping, o.v1_pk): o.error for o in failed}
    counted = {(o.mapping, o.v1_pk) for o in failed if counts_attempt(o)}
    rows = []
    for position, change in enumerate(changes):
        v1_key = encode_key(change.v1_pk)
        failed_change = (change.mapping, v1_key) in errors
        rows.append(
            {
                "position": position,
                "actor": change.actor,
                "mapping": change.mapping,
                "operation": change.operation,
                "v1_pk": v1_key,
                "changes": sorted(change.changed),
                "failed": failed_change,
                "error": errors.get((change.mapping, v1_key)),
                "attempt": int((change.mapping, v1_key) in counted),
            }
        )
    return (
        _INSERT_SYNCED_SQL,
        {
            "transaction_key": transaction_key,
            "session_key": session_key,
            "max_attempts": policy.max_attempts,
            "delay": policy.delay(1),
            "rows": json.dumps(rows),
        },
    )
