"""Receivers that write captured changes to the outbox (durable mode).

The capture receivers hand every change they buffer to
:meth:`OutboxWriter.capture`; ``_after_flush`` then writes the changes of
the flush to ``dualwrite_outbox`` with one multi-row INSERT on the flush's
own connection. The rows are part of the source transaction: they commit
with it, and a rolled-back transaction or savepoint removes them together
with the source rows they describe.

Every row of one source transaction carries the same transaction key,
kept in ``Connection.info`` for as long as that transaction lasts, so that
the sync after the commit can mark exactly the rows of its transaction.
"""

from __future__ import annotations

import threading
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, SessionTransaction

from sa_dualwrite import _outbox
from sa_dualwrite._buffer import Change
from sa_dualwrite._context import session_key
from sa_dualwrite._errors import DualWriteError, one_line

__all__ = ["OutboxWriter", "current_transaction_key", "last_transaction_key"]

Receiver = tuple[Any, str, Callable[..., Any]]

_INFO_KEY = "dualwrite.outbox_transaction"


def _transaction_key(connection: Connection) -> str:
    """Return the key of the transaction of ``connection``, making one."""
    root = connection.get_transaction()
    entry = connection.info.get(_INFO_KEY)
    if entry is not None and root is not None and entry[0]() is root:
        return str(entry[1])
    key = uuid.uuid4().hex
    connection.info[_INFO_KEY] = (
        weakref.ref(root) if root is not None else (lambda: None),
        key,
    )
    return key


def current_transaction_key(connection: Connection) -> str | None:
    """Return the key of the open transaction, if it wrote outbox rows."""
    entry = connection.info.get(_INFO_KEY)
    root = connection.get_transaction()
    if entry is None or root is None or entry[0]() is not root:
        return None
    return str(entry[1])


def last_transaction_key(connection: Connection | None) -> str | None:
    """Return the key of the last transaction that wrote outbox rows.

    Called just after a COMMIT, when the transaction itself has ended;
    every transaction that captured changes wrote outbox rows, so the key
    found is the committed transaction's own.
    """
    if connection is None or connection.closed:
        return None
    entry = connection.info.get(_INFO_KEY)
    return None if entry is None else str(entry[1])


class OutboxWriter:
    """Writes the changes of each flush to the outbox, in its transaction."""

    def __init__(self) -> None:
        self._captured: weakref.WeakKeyDictionary[
            Session, list[tuple[Connection, Change]]
        ] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def receivers(self) -> list[Receiver]:
        """Return each ``(target, hook, function)`` of the outbox."""
        return [
            (Session, "after_flush", self._after_flush),
            (Session, "after_transaction_end", self._after_transaction_end),
        ]

    def capture(
        self, session: Session, connection: Connection, change: Change
    ) -> None:
        """Keep ``change`` until the flush that captured it ends."""
        captured = self._captured.get(session)
        if captured is None:
            with self._lock:
                captured = self._captured.setdefault(session, [])
        captured.append((connection, change))

    def write_now(
        self,
        session: Session,
        connection: Connection,
        changes: Sequence[Change],
    ) -> None:
        """Write changes captured outside a flush (bulk statements)."""
        self._write(session, connection, changes)

    def _after_flush(self, session: Session, flush_context: Any) -> None:
        captured = self._captured.pop(session, None)
        if not captured:
            return
        by_connection: dict[Connection, list[Change]] = {}
        for connection, change in captured:
            by_connection.setdefault(connection, []).append(change)
        for connection, changes in by_connection.items():
            self._write(session, connection, changes)

    def _after_transaction_end(
        self, session: Session, transaction: SessionTransaction
    ) -> None:
        # A flush that failed before after_flush leaves its captured
        # changes here; its transaction or savepoint has rolled back.
        self._captured.pop(session, None)

    def _write(
        self,
        session: Session,
        connection: Connection,
        changes: Sequence[Change],
    ) -> None:
        if not changes:
            return
        rows = _outbox.new_rows(
            changes,
            transaction_key=_transaction_key(connection),
            session_key=session_key(session),
        )
        try:
            _outbox.insert_rows(connection, rows)
        except SQLAlchemyError as exc:
            raise DualWriteError(
                f"writing {len(rows)} changes to the outbox table "
                f"{_outbox.outbox.name} failed, so the source write was "
                f"not committed: {one_line(exc)}. If the table is missing, "
                "create it with DualWrite.create_tables() or from "
                "sa_dualwrite.outbox_metadata in a migration"
            ) from exc
