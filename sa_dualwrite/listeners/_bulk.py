"""Capture of writes that SQL statements make outside a flush.

Mapper events see only the objects that a session flushes. The receivers
here, on the source engine's ``before_execute`` and ``after_execute``
events, see every INSERT, UPDATE and DELETE of a mapped source table:

* Statements run through an ORM session of the source engine, other than
  its flush. These are ORM-enabled ``update()``, ``delete()`` and
  ``insert()`` given to ``session.execute()`` (with a list of rows, with
  ``values()`` or as an upsert), ``Query.update()`` and
  ``Query.delete()``, the legacy ``bulk_save_objects``,
  ``bulk_insert_mappings`` and ``bulk_update_mappings``, and Core
  statements on the session's connection. The rows they wrote come from
  the database: RETURNING where the backend has it, otherwise the primary
  keys in the statement's parameters or a SELECT of the matching keys just
  before the statement. The changes go to
  :meth:`CaptureListeners.add_changes`, so they follow the transaction,
  savepoint and coalescing rules of flushed objects, and the values synced
  are read from the source rows at sync time.
* Statements on a connection that no ORM session of the engine is using,
  such as a Core ``connection.execute()``, and statements whose written
  rows cannot be known. These are not synced: each one is logged as the
  ``unsynced_write`` warning event, or raised as
  :class:`~sa_dualwrite._errors.UnsyncedWriteError` when the install asked
  for ``unsynced_writes="raise"``.

The statements of a flush are left to the mapper events. Which session
uses which connection is learnt from the session ``after_begin`` event.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Column, Connection, Table
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session, SessionTransaction

from sa_dualwrite._buffer import DELETE, INSERT, UPDATE, Change
from sa_dualwrite._context import current_actor
from sa_dualwrite._errors import UnsyncedWriteError
from sa_dualwrite.listeners._rows import (
    StatementInfo,
    changed_attrs,
    describe,
    inserted_keys,
    key_columns,
    key_getter,
    pk_binds,
    preselect_keys,
    sets_key,
    typed_keys,
)
from sa_dualwrite.mapping._compile import CompiledMapping

if TYPE_CHECKING:
    from sa_dualwrite.listeners._capture import CaptureListeners, Receiver

__all__ = ["UNSYNCED_WRITES", "StatementCapture"]

UNSYNCED_WRITES = ("log", "raise")
"""Accepted values of ``install_dual_write(unsynced_writes=...)``."""

Key = tuple[Any, ...]

# Ways to find the keys of the written rows. One is chosen before the
# statement runs and applied to its result.
_INSERTED = "inserted_primary_key"
_RETURNING = "returning"
_EXPLICIT = "explicit_returning"
_DEFAULTS = "return_defaults"
_PARAMETERS = "parameters"
_BEFORE = "select_before"
_UNSYNCED = "unsynced"

_OUTSIDE_SESSION = (
    "it ran on a connection that no ORM session of the source engine is "
    "using; run it through session.execute() to have it synced"
)
_NO_KEY_IN_WHERE = (
    "it ran with several parameter sets and its WHERE clause does not "
    "select rows by primary key, so the rows it wrote are unknown; select "
    "by primary key or run it through an ORM session one set at a time"
)
_NO_INSERTED_KEYS = (
    "the keys of the inserted rows are unknown: the rows carry no primary "
    "key and the database returned none (no RETURNING for this statement "
    "on this backend or table); give the rows their primary key"
)
_NO_KEY_RETURNED = (
    "its returning() does not include the primary key, so the inserted "
    "rows are unknown; add the primary key columns to returning()"
)
_NEW_KEYS_UNKNOWN = (
    "it changes primary key values and the backend cannot return the new "
    "ones (no RETURNING); change keys through the ORM instead"
)


@dataclass(frozen=True, slots=True)
class _Target:
    """A mapping that a statement on one table may write rows of.

    ``columns`` are the table's columns that hold the mapping's key, in
    the order of its primary key. ``filtered`` is true when the table
    contains rows of other classes of an inheritance hierarchy too.
    """

    mapping: CompiledMapping
    columns: tuple[Column[Any], ...]
    filtered: bool


@dataclass(eq=False)
class _Pending:
    """A statement that has started and whose rows are to be captured."""

    statement: Any
    info: StatementInfo
    session: Session | None
    targets: tuple[_Target, ...]
    strategy: str
    reason: str | None = None
    binds: tuple[Any, ...] = ()
    sets_key: bool = False
    before: list[Key] = field(default_factory=list)
    typed_before: dict[str, set[Key]] = field(default_factory=dict)


class StatementCapture:
    """The engine and session receivers that capture statement writes."""

    def __init__(self, listeners: CaptureListeners, unsynced_writes: str):
        self.listeners = listeners
        self.unsynced_writes = unsynced_writes
        self._sessions: weakref.WeakKeyDictionary[
            Connection, weakref.ref[Session]
        ] = weakref.WeakKeyDictionary()
        self._pending: weakref.WeakKeyDictionary[
            Connection, list[_Pending]
        ] = weakref.WeakKeyDictionary()
        self._targets_cache: dict[tuple[Table, Any], tuple[_Target, ...]] = {}
        self._by_table: dict[Table, list[CompiledMapping]] | None = None
        self.unsynced_counts: Counter[tuple[str, str]] = Counter()

    def receivers(self) -> list[Receiver]:
        """Return each ``(target, hook, function)`` of this capture."""
        engine = self.listeners.engine
        return [
            (Session, "after_begin", self._after_begin),
            (Session, "after_transaction_end", self._after_transaction_end),
            (engine, "before_execute", self._before_execute),
            (engine, "after_execute", self._after_execute),
        ]

    def clear(self) -> None:
        """Forget every session and statement in progress."""
        self._sessions.clear()
        self._pending.clear()

    def _after_begin(
        self,
        session: Session,
        transaction: SessionTransaction,
        connection: Connection,
    ) -> None:
        if self.listeners._watches(connection):
            self._sessions[connection] = weakref.ref(session)
            self._pending.pop(connection, None)

    def _after_transaction_end(
        self, session: Session, transaction: SessionTransaction
    ) -> None:
        if transaction.parent is not None:
            return
        for connection, ref in list(self._sessions.items()):
            if ref() is session or ref() is None:
                self._sessions.pop(connection, None)

    def _before_execute(
        self,
        connection: Connection,
        statement: Any,
        multiparams: Sequence[dict[str, Any]],
        params: dict[str, Any],
        execution_options: Any,
    ) -> tuple[Any, Sequence[dict[str, Any]], dict[str, Any]]:
        unchanged = (statement, multiparams, params)
        info = describe(statement)
        if info is None:
            return unchanged
        targets = self._targets(info)
        if not targets:
            return unchanged
        session = self._session_of(connection)
        if session is not None and _run_by_flush(session, execution_options):
            return unchanged

        if session is None:
            pending = _Pending(
                statement, info, None, targets, _UNSYNCED, _OUTSIDE_SESSION
            )
        else:
            pending = self._plan(
                connection, info, multiparams, params, session, targets
            )
        if pending.strategy == _UNSYNCED and self.unsynced_writes == "raise":
            self._report(pending, None)
        self._pending.setdefault(connection, []).append(pending)
        return pending.statement, multiparams, params

    def _plan(
        self,
        connection: Connection,
        info: StatementInfo,
        multiparams: Sequence[dict[str, Any]],
        params: dict[str, Any],
        session: Session,
        targets: tuple[_Target, ...],
    ) -> _Pending:
        """Decide how the rows of a session statement will be known.

        May return the statement with RETURNING added (``returning()`` or
        ``return_defaults()``), and may read keys before it runs.
        """
        statement = info.statement
        pending = _Pending(statement, info, session, targets, _INSERTED)
        missing = [target for target in targets if not target.columns]
        if missing:
            pending.strategy = _UNSYNCED
            pending.reason = (
                f"table {info.table.fullname} has no column for the primary "
                f"key of mapping {missing[0].mapping.name!r}"
            )
            return pending
        several = len(multiparams) > 1
        can_return = _can_return(connection, info, several)

        if info.operation == INSERT:
            if info.explicit_returning:
                pending.strategy = _EXPLICIT
            elif (info.several_rows or info.upsert) and can_return:
                pending.statement = statement.returning(
                    *info.table.primary_key
                )
                pending.strategy = _RETURNING
            elif several and can_return:
                pending.statement = statement.return_defaults()
            return pending

        pending.binds = pk_binds(statement, info.table) or ()
        parameter_sets = list(multiparams)
        parameters = parameter_sets[0] if parameter_sets else params
        pending.sets_key = info.operation == UPDATE and sets_key(
            statement, parameter_sets, info, pending.binds
        )
        if several:
            pending.strategy = _PARAMETERS
            if not pending.binds:
                pending.strategy, pending.reason = _UNSYNCED, _NO_KEY_IN_WHERE
            elif pending.sets_key:
                pending.strategy, pending.reason = _UNSYNCED, _NEW_KEYS_UNKNOWN
        elif info.explicit_returning or pending.sets_key or not can_return:
            pending.strategy = _BEFORE
            pending.before = preselect_keys(connection, info, parameters)
            if pending.sets_key and not can_return:
                pending.strategy, pending.reason = _UNSYNCED, _NEW_KEYS_UNKNOWN
            elif pending.sets_key:
                pending.statement = statement.return_defaults(
                    *info.table.primary_key
                )
        else:
            pending.strategy = _DEFAULTS
            pending.statement = statement.return_defaults(
                *info.table.primary_key
            )

        if info.operation == DELETE and pending.strategy != _UNSYNCED:
            self._read_types(connection, pending, parameter_sets, parameters)
        return pending

    def _read_types(
        self,
        connection: Connection,
        pending: _Pending,
        parameter_sets: list[dict[str, Any]],
        parameters: dict[str, Any],
    ) -> None:
        """Before a DELETE, read which rows belong to subclass mappings."""
        info = pending.info
        for target in pending.targets:
            if not target.filtered:
                continue
            mapper = target.mapping.source_mapper
            if pending.strategy == _PARAMETERS:
                keys = _parameter_keys(pending, parameter_sets)
                found = typed_keys(
                    connection, mapper, _target_keys(target, keys, info.table)
                )
            else:
                found = preselect_keys(connection, info, parameters, mapper)
            pending.typed_before[target.mapping.name] = set(found)

    def _after_execute(
        self,
        connection: Connection,
        statement: Any,
        multiparams: Sequence[dict[str, Any]],
        params: dict[str, Any],
        execution_options: Any,
        result: Any,
    ) -> None:
        if not getattr(statement, "is_dml", False):
            return
        pending = self._take_pending(connection, statement)
        if pending is None:
            return
        if pending.strategy == _UNSYNCED:
            self._report(pending, result)
            return
        parameter_sets = list(multiparams) or [params or {}]
        keys = self._row_keys(pending, result, parameter_sets)
        if keys is None:
            self._report(pending, result)
            return
        assert pending.session is not None
        changes = self._changes(connection, pending, keys, parameter_sets)
        if changes:
            self.listeners.add_changes(pending.session, connection, changes)

    def _take_pending(
        self, connection: Connection, statement: Any
    ) -> _Pending | None:
        """Remove and return the pending entry of a finished statement.

        Matched by identity first and, if another ``before_execute``
        listener replaced the statement, by table and operation. Entries
        above the match belong to statements that failed.
        """
        stack = self._pending.get(connection)
        if not stack:
            return None
        for index in range(len(stack) - 1, -1, -1):
            if stack[index].statement is statement:
                break
        else:
            info = describe(statement)
            index = len(stack) - 1
            top = stack[index].info
            if info is None or (info.table, info.operation) != (
                top.table,
                top.operation,
            ):
                return None
        pending = stack[index]
        del stack[index:]
        return pending

    def _row_keys(
        self,
        pending: _Pending,
        result: CursorResult[Any],
        parameter_sets: list[dict[str, Any]],
    ) -> list[Key] | None:
        """Return the table keys of the rows the statement wrote."""
        table_key = tuple(pending.info.table.primary_key)
        strategy = pending.strategy
        if strategy == _INSERTED:
            keys = inserted_keys(result)
            if keys is None:
                pending.reason = _NO_INSERTED_KEYS
            return keys
        if strategy == _RETURNING:
            return [tuple(row) for row in result.fetchall()]
        if strategy == _EXPLICIT:
            return self._returned_keys(pending, result, parameter_sets)
        if strategy == _PARAMETERS:
            return _parameter_keys(pending, parameter_sets)
        if strategy == _BEFORE and not pending.sets_key:
            return list(pending.before)
        read = key_getter([table_key])
        rows = result.returned_defaults_rows or []
        returned: list[Key] = []
        for row in rows:
            key = read(row)
            if key is not None:
                returned.append(key)
        return returned

    def _returned_keys(
        self,
        pending: _Pending,
        result: CursorResult[Any],
        parameter_sets: list[dict[str, Any]],
    ) -> list[Key] | None:
        """Read the keys of an INSERT from the rows it returned.

        The ORM adds the primary key to the RETURNING of bulk inserts and
        keeps those rows in ``returned_defaults_rows``. Otherwise the rows
        are read and put back with ``CursorResult._rewind()``, the method
        SQLAlchemy itself uses for this, so that the caller still gets
        them.
        """
        info = pending.info
        candidates: list[tuple[Any, ...]] = [tuple(info.table.primary_key)]
        if info.entity is not None:
            candidates.append(tuple(info.entity.primary_key))
        read = key_getter(candidates)
        rows = result.returned_defaults_rows
        if not rows:
            rewind = getattr(result, "_rewind", None)
            if rewind is None:
                pending.reason = _NO_KEY_RETURNED
                return None
            rows = result.fetchall()
            rewind(rows)
        keys = []
        for index, row in enumerate(rows):
            key = read(row)
            if key is None and index < len(parameter_sets):
                key = _key_from_parameters(parameter_sets[index], info.table)
            if key is None:
                pending.reason = _NO_KEY_RETURNED
                return None
            keys.append(key)
        return keys

    def _changes(
        self,
        connection: Connection,
        pending: _Pending,
        keys: list[Key],
        parameter_sets: list[dict[str, Any]],
    ) -> list[Change]:
        """Turn the written table keys into changes, per mapping."""
        assert pending.session is not None
        info = pending.info
        actor = current_actor(pending.session)
        changes: list[Change] = []
        for target in pending.targets:
            mapping = target.mapping
            found = _target_keys(target, keys, info.table)
            if target.filtered:
                if info.operation == DELETE:
                    typed = pending.typed_before.get(mapping.name, set())
                    found = [key for key in found if key in typed]
                else:
                    found = typed_keys(
                        connection, mapping.source_mapper, found
                    )

            if info.operation == DELETE:
                operation, changed = DELETE, frozenset[str]()
            elif info.operation == INSERT:
                operation = UPDATE if info.upsert else INSERT
                changed = frozenset(mapping.source_attrs)
            elif pending.sets_key:
                operation, changed = UPDATE, frozenset(mapping.source_attrs)
                old = _target_keys(target, pending.before, info.table)
                changes.extend(
                    Change(mapping.name, DELETE, key, actor=actor)
                    for key in old
                    if key not in found
                )
            else:
                operation = UPDATE
                ignore = {bind.key for bind in pending.binds}
                changed = changed_attrs(
                    pending.statement,
                    parameter_sets,
                    mapping,
                    info.table,
                    ignore,
                )
                if not changed:
                    continue
            changes.extend(
                Change(mapping.name, operation, key, changed, actor)
                for key in found
            )
        return changes

    def _report(self, pending: _Pending, result: Any) -> None:
        """Log or raise a write that cannot be synced."""
        info = pending.info
        table = info.table.fullname
        reason = pending.reason or _OUTSIDE_SESSION
        self.unsynced_counts[(table, info.operation)] += 1
        if self.unsynced_writes == "raise":
            written = "was" if result is not None else "was not"
            raise UnsyncedWriteError(
                f"{info.operation.upper()} on source table {table} cannot "
                f"be synced to the target: {reason} (the statement "
                f"{written} executed)",
                table=table,
                operation=info.operation,
                reason=reason,
            )
        rowcount = getattr(result, "rowcount", None)
        self.listeners.applier.logger.warning(
            "unsynced_write",
            table=table,
            operation=info.operation,
            rowcount=rowcount if rowcount is None or rowcount >= 0 else None,
            reason=reason,
            count=self.unsynced_counts[(table, info.operation)],
        )

    def _session_of(self, connection: Connection) -> Session | None:
        ref = self._sessions.get(connection)
        return None if ref is None else ref()

    def _targets(self, info: StatementInfo) -> tuple[_Target, ...]:
        cache_key = (info.table, info.entity)
        found = self._targets_cache.get(cache_key)
        if found is None:
            found = self._targets_cache[cache_key] = self._find_targets(info)
        return found

    def _find_targets(self, info: StatementInfo) -> tuple[_Target, ...]:
        """Return the mappings whose rows a statement may write."""
        table, entity = info.table, info.entity
        targets = []
        if entity is not None:
            for mapping in self.listeners.mappings.values():
                mapper = mapping.source_mapper
                if entity.isa(mapper):
                    filtered = False
                elif mapper.isa(entity):
                    filtered = True
                else:
                    continue
                columns = key_columns(table, mapper)
                targets.append(_Target(mapping, columns, filtered))
            return tuple(targets)

        for mapping in self._table_index().get(table, []):
            mapper = mapping.source_mapper
            filtered = mapper.inherits is not None and (
                mapper.single or table is not mapper.local_table
            )
            columns = key_columns(table, mapper)
            targets.append(_Target(mapping, columns, filtered))
        return tuple(targets)

    def _table_index(self) -> dict[Table, list[CompiledMapping]]:
        if self._by_table is None:
            index: dict[Table, list[CompiledMapping]] = {}
            for mapping in self.listeners.mappings.values():
                for table in mapping.source_mapper.tables:
                    if isinstance(table, Table):
                        index.setdefault(table, []).append(mapping)
            self._by_table = index
        return self._by_table


def _run_by_flush(session: Session, execution_options: Any) -> bool:
    """Return True for a statement of the session's unit of work.

    NOTE: SQLAlchemy has no public flag for "this session is flushing"
    that excludes the legacy bulk methods, which set ``_flushing`` too.
    The private ``Session._warn_on_events`` is set only while the unit of
    work runs (SQLAlchemy 2.0 and 2.1). The unit of work also runs its
    statements with the mapper's ``compiled_cache``. A Core statement that
    a mapper event listener runs during the flush has no such option, so
    it is captured.
    """
    in_flush = bool(getattr(session, "_warn_on_events", False))
    return in_flush and "compiled_cache" in execution_options


def _can_return(
    connection: Connection, info: StatementInfo, several: bool
) -> bool:
    """Return True if the statement can be given a RETURNING clause."""
    if not info.table.implicit_returning:
        return False
    dialect = connection.dialect
    operation = info.operation
    if not getattr(dialect, f"{operation}_returning", False):
        return False
    if several and not getattr(
        dialect, f"{operation}_executemany_returning", False
    ):
        return False
    return not (
        info.other_tables
        and not getattr(dialect, f"{operation}_returning_multifrom", False)
    )


def _key_from_parameters(
    parameters: dict[str, Any], table: Table
) -> Key | None:
    key = tuple(parameters.get(column.key) for column in table.primary_key)
    return None if any(value is None for value in key) else key


def _parameter_keys(
    pending: _Pending, parameter_sets: list[dict[str, Any]]
) -> list[Key]:
    """Return the table keys that bulk parameter sets select."""
    return [
        tuple(parameters.get(bind.key, bind.value) for bind in pending.binds)
        for parameters in parameter_sets
    ]


def _target_keys(target: _Target, keys: list[Key], table: Table) -> list[Key]:
    """Reorder table keys into a mapping's key order, without repeats."""
    positions = {
        column: index for index, column in enumerate(table.primary_key)
    }
    order = [positions[column] for column in target.columns]
    return list(dict.fromkeys(tuple(key[i] for i in order) for key in keys))
