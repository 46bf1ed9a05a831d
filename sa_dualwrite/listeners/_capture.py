"""ORM event receivers that capture changes and trigger their sync.

Receivers are named after the hook they receive and registered from one
table, :meth:`CaptureListeners.receivers`, so that install and uninstall
walk the same list. They never write to the target themselves: they turn
flushed objects into :class:`~sa_dualwrite._buffer.Change` values, keep them
in the buffer of the current session transaction and hand the buffer of a
committed root transaction to the :class:`~sa_dualwrite._apply.Applier`.

State is kept per session (a weak mapping from Session to
:class:`SessionState`) and, inside a session, per transaction: the root
transaction and each savepoint have their own buffer. A released savepoint
merges its buffer into the enclosing one; a savepoint or root transaction
that ends without a commit discards its buffer.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import InstanceState, Mapper, Session, SessionTransaction
from sqlalchemy.orm.base import instance_state

from sa_dualwrite._apply import Applier
from sa_dualwrite._buffer import DELETE, INSERT, UPDATE, Change, ChangeBuffer
from sa_dualwrite._context import current_actor, session_key
from sa_dualwrite._errors import DualWriteError, one_line
from sa_dualwrite._sync import Outcome
from sa_dualwrite.listeners._bulk import StatementCapture
from sa_dualwrite.listeners._outbox import OutboxWriter
from sa_dualwrite.mapping._compile import CompiledMapping

__all__ = ["CaptureListeners", "SessionState"]

Receiver = tuple[Any, str, Callable[..., Any]]


@dataclass(eq=False)
class SessionState:
    """State that one install keeps for one session."""

    session: weakref.ref[Session]
    buffers: dict[SessionTransaction, ChangeBuffer] = field(
        default_factory=dict
    )
    connection: Connection | None = None
    outcomes: list[Outcome] = field(default_factory=list)
    reported_key: str | None = None
    captured: bool = False


def _enclosing(transaction: SessionTransaction) -> SessionTransaction:
    """Return the savepoint or root transaction that encloses a savepoint."""
    parent = transaction.parent
    assert parent is not None
    while not (parent.nested or parent.parent is None):
        assert parent.parent is not None
        parent = parent.parent
    return parent


def _inserted_values(
    mapping: CompiledMapping, state: InstanceState[Any]
) -> dict[str, Any] | None:
    """Return the source values of a row just inserted, if all are known.

    After an INSERT the ORM holds the values it sent and those the database
    returned (keys, server defaults). An attribute set to a SQL expression,
    or a server default it did not fetch, is missing from the object's
    dict; so is an attribute never set, which is NULL when its column has
    no default. Only when every mapped value is known this way can the sync
    skip reading the row back. JSON values are copied, because the
    application may still change them in place before the commit.
    """
    loaded = state.dict
    expired = state.expired_attributes
    values: dict[str, Any] = {}
    for attr in mapping.source_attrs:
        if attr not in loaded:
            if attr in expired or attr not in mapping.null_when_unset:
                return None
            values[attr] = None
            continue
        value = loaded[attr]
        if isinstance(value, (dict, list)):
            value = copy.deepcopy(value)
        values[attr] = value
    return values


class CaptureListeners:
    """The receivers of one install, and the state they share."""

    def __init__(
        self,
        *,
        engine: Engine,
        mappings: dict[str, CompiledMapping],
        applier: Applier,
        in_transaction: bool,
        outbox: OutboxWriter | None = None,
        unsynced_writes: str = "log",
    ) -> None:
        self.engine = engine
        self.mappings = mappings
        self.applier = applier
        self.in_transaction = in_transaction
        self.outbox = outbox
        self._by_mapper: dict[Mapper[Any], tuple[CompiledMapping, ...]] = {}
        self._sessions: weakref.WeakKeyDictionary[Session, SessionState] = (
            weakref.WeakKeyDictionary()
        )
        self._by_connection: dict[Connection, list[SessionState]] = {}
        self._parked: dict[Connection, list[tuple[ChangeBuffer, str]]] = {}
        self._lock = threading.Lock()
        self._registered: list[Receiver] = []
        self.statements = StatementCapture(self, unsynced_writes)

    def receivers(self) -> list[Receiver]:
        """Return each ``(target, hook, function)`` of this install."""
        table: list[Receiver] = [
            (Mapper, "after_insert", self._after_insert),
            (Mapper, "after_update", self._after_update),
            (Mapper, "after_delete", self._after_delete),
            (Session, "after_commit", self._after_commit),
            (Session, "after_transaction_end", self._after_transaction_end),
            *self.statements.receivers(),
        ]
        if self.in_transaction:
            table.append((self.engine, "commit", self._commit))
            table.append((self.engine, "rollback", self._rollback))
        else:
            target = self.applier.target
            table.append((target, "do_connect", self.applier.connect_limit))
        if self.outbox is not None:
            table.extend(self.outbox.receivers())
        return table

    def register(self) -> None:
        """Listen to every receiver; on failure, remove those added."""
        try:
            for target, hook, function in self.receivers():
                # A before_execute receiver returns the statement to run.
                options = {"retval": True} if hook == "before_execute" else {}
                event.listen(target, hook, function, **options)
                self._registered.append((target, hook, function))
        except Exception:
            self.unregister()
            raise

    def unregister(self) -> None:
        """Remove every receiver this install added."""
        while self._registered:
            target, hook, function = self._registered.pop()
            if event.contains(target, hook, function):
                event.remove(target, hook, function)
        self._by_connection.clear()
        self._parked.clear()
        self.statements.clear()

    def _mappings_for(
        self, mapper: Mapper[Any]
    ) -> tuple[CompiledMapping, ...]:
        found = self._by_mapper.get(mapper)
        if found is None:
            lineage = set(mapper.iterate_to_root())
            found = tuple(
                mapping
                for mapping in self.mappings.values()
                if mapping.source_mapper in lineage
            )
            self._by_mapper[mapper] = found
        return found

    def _watches(self, connection: Connection) -> bool:
        engine = connection.engine
        return engine is self.engine or (
            getattr(engine, "_proxied", None) is self.engine
        )

    def _after_insert(
        self, mapper: Mapper[Any], connection: Connection, target: Any
    ) -> None:
        mappings = self._mappings_for(mapper)
        if not mappings or not self._watches(connection):
            return
        session, buffer = self._buffer_for(target, connection)
        actor = current_actor(session)
        state = instance_state(target)
        for mapping in mappings:
            self._add(
                session,
                connection,
                buffer,
                Change(
                    mapping.name,
                    INSERT,
                    mapping.source_key(target),
                    frozenset(mapping.source_attrs),
                    actor,
                    _inserted_values(mapping, state),
                ),
            )

    def _after_update(
        self, mapper: Mapper[Any], connection: Connection, target: Any
    ) -> None:
        mappings = self._mappings_for(mapper)
        if not mappings or not self._watches(connection):
            return
        state = instance_state(target)
        modified = state.committed_state.keys()
        changes = []
        for mapping in mappings:
            changed = frozenset(
                attr
                for attr in mapping.source_attrs
                if attr in modified and state.attrs[attr].history.has_changes()
            )
            new_key = mapping.source_key(target)
            old_key = tuple(state.key[1]) if state.key else new_key
            if old_key != new_key:
                changes.append(Change(mapping.name, DELETE, old_key))
                changes.append(
                    Change(
                        mapping.name,
                        INSERT,
                        new_key,
                        frozenset(mapping.source_attrs),
                    )
                )
            elif changed:
                changes.append(Change(mapping.name, UPDATE, new_key, changed))
        if not changes:
            return
        session, buffer = self._buffer_for(target, connection)
        actor = current_actor(session)
        for change in changes:
            change.actor = actor
            self._add(session, connection, buffer, change)

    def _after_delete(
        self, mapper: Mapper[Any], connection: Connection, target: Any
    ) -> None:
        mappings = self._mappings_for(mapper)
        if not mappings or not self._watches(connection):
            return
        state = instance_state(target)
        session, buffer = self._buffer_for(target, connection)
        actor = current_actor(session)
        for mapping in mappings:
            key = (
                tuple(state.key[1])
                if state.key
                else mapping.source_key(target)
            )
            self._add(
                session,
                connection,
                buffer,
                Change(mapping.name, DELETE, key, actor=actor),
            )

    def add_changes(
        self,
        session: Session,
        connection: Connection,
        changes: list[Change],
    ) -> None:
        """Buffer changes captured outside the mapper events."""
        buffer = self._buffer_of_session(session, connection)
        for change in changes:
            buffer.add(change)
        if self.outbox is not None:
            self.outbox.write_now(session, connection, changes)

    def _add(
        self,
        session: Session,
        connection: Connection,
        buffer: ChangeBuffer,
        change: Change,
    ) -> None:
        """Buffer a change captured by a mapper event; outbox it if durable."""
        buffer.add(change)
        if self.outbox is not None:
            self.outbox.capture(session, connection, change)

    def _buffer_for(
        self, target: Any, connection: Connection
    ) -> tuple[Session, ChangeBuffer]:
        session = sa_inspect(target).session
        if session is None:  # pragma: no cover - flush always has one
            raise RuntimeError("a flushed object has no session")
        return session, self._buffer_of_session(session, connection)

    def _buffer_of_session(
        self, session: Session, connection: Connection
    ) -> ChangeBuffer:
        state = self._sessions.get(session)
        if state is None:
            with self._lock:
                state = self._sessions.get(session)
                if state is None:
                    state = SessionState(weakref.ref(session))
                    self._sessions[session] = state
        state.captured = True
        transaction = (
            session.get_nested_transaction() or session.get_transaction()
        )
        assert transaction is not None
        buffer = state.buffers.get(transaction)
        if buffer is None:
            buffer = state.buffers[transaction] = ChangeBuffer()
        if state.connection is not connection:
            state.connection = connection
            if self.in_transaction:
                self._by_connection.setdefault(connection, []).append(state)
        return buffer

    def _after_commit(self, session: Session) -> None:
        state = self._sessions.get(session)
        if state is None:
            return
        nested = session.get_nested_transaction()
        if nested is not None:
            buffer = state.buffers.pop(nested, None)
            if buffer:
                parent = _enclosing(nested)
                into = state.buffers.get(parent)
                if into is None:
                    into = state.buffers[parent] = ChangeBuffer()
                buffer.merge_into(into)
            return
        root = session.get_transaction()
        buffer = state.buffers.pop(root, None) if root is not None else None
        try:
            self._finish_root(session, state, buffer)
        except Exception as exc:
            # The source transaction has committed: nothing may reach the
            # caller of commit() from here.
            self.applier.logger.error(
                "sync_crashed", error=one_line(exc), exc_info=exc
            )

    def _finish_root(
        self,
        session: Session,
        state: SessionState,
        buffer: ChangeBuffer | None,
    ) -> None:
        """Report the sync of a committed root transaction, or run it."""
        key = state.reported_key or session_key(session)
        if self.in_transaction:
            outcomes, state.outcomes = state.outcomes, []
            self.applier.report(outcomes, key)
            if buffer:
                self._park(state.connection, buffer, key)
            return
        if buffer or self._outbox_rows_left(state):
            # NOTE: a session joined to an outer transaction gets here
            # before the database COMMIT, because SQLAlchemy has no event
            # after a connection's COMMIT; the sync reads inside that
            # transaction and leaves it open.
            outcomes = self.applier.apply_after_commit(
                state.connection, buffer.changes() if buffer else [], key
            )
            self.applier.report(outcomes, key)

    def _after_transaction_end(
        self, session: Session, transaction: SessionTransaction
    ) -> None:
        state = self._sessions.get(session)
        if state is None:
            return
        state.buffers.pop(transaction, None)
        if transaction.parent is None:
            if state.connection is not None:
                self._forget_connection(state)
            state.connection = None
            state.outcomes = []
            state.reported_key = None
            state.captured = False

    def _forget_connection(self, state: SessionState) -> None:
        assert state.connection is not None
        states = self._by_connection.get(state.connection)
        if states is not None and state in states:
            states.remove(state)
            if not states:
                del self._by_connection[state.connection]

    def _outbox_rows_left(self, state: SessionState) -> bool:
        """Return whether outbox rows await marking with no change left.

        Changes that cancel out (an insert, then a delete of that row) still
        wrote their outbox rows at flush; the sync of the empty commit marks
        them done.
        """
        return self.outbox is not None and state.captured

    def _park(
        self, connection: Connection | None, buffer: ChangeBuffer, key: str
    ) -> None:
        """Keep changes whose session committed inside an outer transaction.

        A session joined to a connection that the application keeps in its
        own transaction commits without a database COMMIT; its changes wait
        for that connection's COMMIT (and are dropped on its rollback).
        """
        if connection is None or not connection.in_transaction():
            outcomes = self.applier.apply_after_commit(
                connection, buffer.changes(), key
            )
            self.applier.report(outcomes, key)
            return
        parked = self._parked.setdefault(connection, [])
        for earlier, earlier_key in parked:
            if earlier_key == key:
                buffer.merge_into(earlier)
                return
        parked.append((buffer, key))

    def _rollback(self, connection: Connection) -> None:
        self._parked.pop(connection, None)

    def _commit(self, connection: Connection) -> None:
        """Sync the changes of ``connection`` just before its COMMIT.

        Only a DualWriteError (durable mode could not keep a change) stops
        the COMMIT. SQLAlchemy does not roll back a transaction whose commit
        event raised, and its pool would hand the open transaction to the
        next user, so the transaction is rolled back here first. Any other
        error is logged and the COMMIT goes on.
        """
        try:
            for buffer, key in self._parked.pop(connection, []):
                outcomes = self.applier.apply_in_transaction(
                    connection, buffer.changes(), key
                )
                self.applier.report(outcomes, key)
            for state in self._by_connection.pop(connection, []):
                self._sync_session(connection, state)
        except DualWriteError:
            dbapi_connection = connection.connection.dbapi_connection
            if dbapi_connection is not None:
                dbapi_connection.rollback()
            raise
        except Exception as exc:
            self.applier.logger.error(
                "sync_crashed",
                error=one_line(exc),
                exc_info=exc,
            )

    def _sync_session(
        self, connection: Connection, state: SessionState
    ) -> None:
        session = state.session()
        if session is None:
            return
        root = session.get_transaction()
        pending = state.buffers.get(root) if root is not None else None
        if not pending and not self._outbox_rows_left(state):
            return
        key = session_key(session)
        state.reported_key = key
        state.outcomes = self.applier.apply_in_transaction(
            connection, pending.changes() if pending else [], key
        )
        if pending:
            pending.clear()

    def sessions(self) -> Iterator[SessionState]:
        """Yield the state of every live session with captured changes."""
        yield from list(self._sessions.values())
