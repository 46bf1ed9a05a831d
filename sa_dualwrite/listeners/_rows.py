"""What a SQL statement on a source table is, and which rows it wrote.

Helpers for :mod:`sa_dualwrite.listeners._bulk`. They look at an INSERT,
UPDATE or DELETE construct and at its result, and some read keys through
its connection, but none looks at a session. A few read private
attributes of SQLAlchemy's DML constructs (``_values``, ``_returning`` and
the like) through :func:`getattr` with a default, because SQLAlchemy
offers no public reader for them. The tests pass with SQLAlchemy 2.0.30
and 2.1.9.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from sqlalchemy import Column, Connection, Table, select, tuple_
from sqlalchemy.engine import CursorResult, Row
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.exc import UnmappedColumnError
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.elements import (
    BinaryExpression,
    BindParameter,
    BooleanClauseList,
    ColumnElement,
)

from sa_dualwrite._store import chunks
from sa_dualwrite.mapping._compile import CompiledMapping

__all__ = [
    "StatementInfo",
    "changed_attrs",
    "describe",
    "inserted_keys",
    "key_columns",
    "key_getter",
    "pk_binds",
    "preselect_keys",
    "sets_key",
    "typed_keys",
]

INSERT = "insert"
UPDATE = "update"
DELETE = "delete"


@dataclass(eq=False)
class StatementInfo:
    """The parts of a DML statement that decide how to capture it.

    ``table`` is the table the statement writes (for an ORM statement, the
    local table of its entity) and ``entity`` the mapper of an ORM-enabled
    statement, or None for a Core statement.
    """

    statement: Any
    operation: str
    table: Table
    entity: Mapper[Any] | None

    @property
    def explicit_returning(self) -> bool:
        """True if the caller gave the statement a ``returning()``."""
        return bool(getattr(self.statement, "_returning", ()))

    @property
    def several_rows(self) -> bool:
        """True for an INSERT of several VALUES rows or of a SELECT."""
        statement = self.statement
        return bool(getattr(statement, "_multi_values", ())) or (
            getattr(statement, "select", None) is not None
        )

    @property
    def upsert(self) -> bool:
        """True for an INSERT with an ON CONFLICT or similar clause."""
        return getattr(self.statement, "_post_values_clause", None) is not None

    @cached_property
    def other_tables(self) -> bool:
        """True for the UPDATE..FROM and DELETE..USING forms."""
        return _refers_to_other_tables(self.statement, self.table)


def describe(statement: Any) -> StatementInfo | None:
    """Return what capturing needs to know about ``statement``.

    Returns None for anything that is not an INSERT, UPDATE or DELETE of
    a plain table. Only cheap attribute reads happen here, because every
    statement of the source engine passes through.
    """
    if not getattr(statement, "is_dml", False):
        return None
    if statement.is_insert:
        operation = INSERT
    elif statement.is_update:
        operation = UPDATE
    elif statement.is_delete:
        operation = DELETE
    else:
        return None
    entity = _entity_mapper(statement)
    table = entity.local_table if entity is not None else statement.table
    if not isinstance(table, Table):
        return None
    return StatementInfo(statement, operation, table, entity)


def _entity_mapper(statement: Any) -> Mapper[Any] | None:
    plugin = statement._propagate_attrs.get("compile_state_plugin")
    if plugin != "orm":
        return None
    subject = statement._propagate_attrs.get("plugin_subject")
    mapper = getattr(subject, "mapper", None)
    return mapper if isinstance(mapper, Mapper) else None


def _refers_to_other_tables(statement: Any, table: Table) -> bool:
    where = getattr(statement, "whereclause", None)
    if where is None:
        return False
    for element in visitors.iterate(where):
        owner = getattr(element, "table", None)
        if (
            isinstance(element, Column)
            and owner is not None
            and _plain(owner) is not table
        ):
            return True
    return False


def _plain(element: Any) -> Any:
    """Return the element that an annotated ORM element was made from."""
    deannotate = getattr(element, "_deannotate", None)
    return element if deannotate is None else deannotate()


def key_columns(table: Table, mapper: Mapper[Any]) -> tuple[Column[Any], ...]:
    """Return the columns of ``table`` holding ``mapper``'s primary key.

    In joined table inheritance a subclass table repeats the key of the
    base table through a foreign key, so that column is taken as the base
    key column. Returns an empty tuple when ``table`` lacks a key column.
    """
    found: list[Column[Any]] = []
    for key_column in mapper.primary_key:
        match = None
        for column in table.primary_key:
            if _same_key(column, key_column):
                match = column
                break
        if match is None:
            return ()
        found.append(match)
    return tuple(found)


def _same_key(column: Column[Any], key_column: Any) -> bool:
    """Return True if ``column`` is ``key_column`` or refers to it."""
    pending = [column]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if current is key_column:
            return True
        if id(current) in seen:
            continue
        seen.add(id(current))
        pending.extend(fk.column for fk in current.foreign_keys)
    return False


def key_getter(
    columns: Sequence[Sequence[Any]],
) -> Callable[[Row[Any]], tuple[Any, ...] | None]:
    """Return a function reading a key from a row of a DML result.

    ``columns`` lists candidate column sequences; the first one whose
    columns are all in the row is used. The function returns None when
    no candidate matches.
    """

    def read(row: Row[Any]) -> tuple[Any, ...] | None:
        mapping = row._mapping
        for candidate in columns:
            try:
                return tuple(mapping[column] for column in candidate)
            except KeyError:
                continue
        return None

    return read


def pk_binds(statement: Any, table: Table) -> tuple[BindParameter[Any], ...]:
    """Return the parameters that select the statement's rows by key.

    Works for the ``WHERE pk = :param AND ...`` form that SQLAlchemy emits
    for bulk updates and deletes by primary key, and for the same form
    written by hand. Returns one parameter per key column of ``table``, or
    an empty tuple when the WHERE clause is not a plain conjunction with
    an equality on every key column.
    """
    where = getattr(statement, "whereclause", None)
    if where is None:
        return ()
    if isinstance(where, BooleanClauseList):
        if where.operator is not operators.and_:
            return ()
        terms: Iterable[Any] = where.clauses
    else:
        terms = [where]
    found: dict[Column[Any], BindParameter[Any]] = {}
    for term in terms:
        if not isinstance(term, BinaryExpression):
            continue
        if term.operator is not operators.eq:
            continue
        column, bind = term.left, term.right
        if isinstance(column, BindParameter):
            column, bind = bind, column
        if not isinstance(bind, BindParameter):
            continue
        plain = _plain(column)
        for key_column in table.primary_key:
            if plain is key_column:
                found[key_column] = bind
    if len(found) != len(table.primary_key):
        return ()
    return tuple(found[column] for column in table.primary_key)


def _set_keys(
    statement: Any,
    parameters: Sequence[dict[str, Any]],
    ignore: Iterable[str],
) -> list[str]:
    """Return the names of what an UPDATE sets, as written by the caller.

    Names are attribute names or column keys. An empty list means that
    the statement sets nothing that can be read here.
    """
    skipped = set(ignore)
    values = getattr(statement, "_values", None) or {}
    ordered = getattr(statement, "_ordered_values", None) or ()
    keys = [_key_name(key) for key in values]
    keys.extend(_key_name(key) for key, _ in ordered)
    for parameter_set in parameters[:1]:
        keys.extend(key for key in parameter_set if key not in skipped)
    return keys


def sets_key(
    statement: Any,
    parameters: Sequence[dict[str, Any]],
    info: StatementInfo,
    binds: Iterable[BindParameter[Any]],
) -> bool:
    """Return True if an UPDATE sets a primary key column of its table."""
    names = set(_set_keys(statement, parameters, (b.key for b in binds)))
    for column in info.table.primary_key:
        if column.key in names:
            return True
        if info.entity is not None:
            try:
                prop = info.entity.get_property_by_column(column)
            except UnmappedColumnError:
                continue
            if prop.key in names:
                return True
    return False


def changed_attrs(
    statement: Any,
    parameters: Sequence[dict[str, Any]],
    mapping: CompiledMapping,
    table: Table,
    ignore: Iterable[str] = (),
) -> frozenset[str]:
    """Return the mapped source attributes that an UPDATE sets.

    The attributes come from the statement's ``values()`` and from the
    keys of its parameter sets, minus the names in ``ignore``. Columns
    that the database or SQLAlchemy set on update (``onupdate``,
    ``server_onupdate``) count as set. When nothing can be read, every
    mapped attribute counts as set.
    """
    keys = _set_keys(statement, parameters, ignore)
    if not keys:
        return frozenset(mapping.source_attrs)
    by_name = _attr_names(mapping)
    names = {by_name[key] for key in keys if key in by_name}
    for column in table.columns:
        if column.onupdate is not None or column.server_onupdate is not None:
            attr = by_name.get(column.key)
            if attr is not None:
                names.add(attr)
    return frozenset(names)


def _key_name(key: Any) -> str:
    if isinstance(key, str):
        return key
    return str(getattr(key, "key", key))


def _attr_names(mapping: CompiledMapping) -> dict[str, str]:
    """Map attribute names and column keys to mapped source attributes."""
    names: dict[str, str] = {}
    for attr in mapping.source_attrs:
        prop = mapping.source_mapper.attrs[attr]
        names[attr] = attr
        for column in getattr(prop, "columns", ()):
            key = getattr(column, "key", None)
            if isinstance(key, str):
                names.setdefault(key, attr)
    return names


def preselect_keys(
    connection: Connection,
    info: StatementInfo,
    parameters: dict[str, Any],
    mapper: Mapper[Any] | None = None,
) -> list[tuple[Any, ...]]:
    """Read the keys of the rows that an UPDATE or DELETE will write.

    Selects with the statement's own WHERE clause and ``parameters``,
    before it runs, and locks the rows (``FOR UPDATE``) where the backend
    has it. The keys are
    the table's, or with ``mapper`` that class's, whose inheritance
    criteria then apply; an ORM statement's entity criteria apply too.
    Rows that come to match the WHERE clause between this read and the
    statement, through a concurrent commit, are not seen.
    """
    statement = info.statement
    entity = mapper if mapper is not None else info.entity
    columns = (
        list(mapper.primary_key)
        if mapper is not None
        else list(info.table.primary_key)
    )
    query = select(*columns)
    if entity is not None:
        query = query.select_from(entity)
        options = getattr(statement, "_with_options", ())
        if info.entity is not None and options:
            query = query.options(*options)
    where = getattr(statement, "whereclause", None)
    if where is not None:
        query = query.where(where)
    if connection.dialect.name != "sqlite":
        query = query.with_for_update()
    return [tuple(row) for row in connection.execute(query, parameters)]


def typed_keys(
    connection: Connection,
    mapper: Mapper[Any],
    keys: Sequence[tuple[Any, ...]],
) -> list[tuple[Any, ...]]:
    """Return the keys, among ``keys``, of rows of ``mapper``'s class.

    ``keys`` are in ``mapper``'s primary key order. Needed where a
    statement wrote rows of a whole inheritance hierarchy and a mapping
    covers one subclass only.
    """
    if not keys:
        return []
    columns = list(mapper.primary_key)
    found: set[tuple[Any, ...]] = set()
    for part in chunks(list(keys)):
        criterion: ColumnElement[bool]
        if len(columns) == 1:
            criterion = columns[0].in_([key[0] for key in part])
        else:
            criterion = tuple_(*columns).in_(part)
        query = select(*columns).select_from(mapper).where(criterion)
        found.update(tuple(row) for row in connection.execute(query))
    return [key for key in keys if key in found]


def inserted_keys(
    result: CursorResult[Any],
) -> list[tuple[Any, ...]] | None:
    """Return the keys an INSERT wrote, or None if some are unknown."""
    rows = result.inserted_primary_key_rows
    keys = [tuple(row) for row in rows if row is not None]
    if len(keys) != len(rows):
        return None
    if any(value is None for key in keys for value in key):
        return None
    return keys
