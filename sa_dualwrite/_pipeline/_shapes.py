"""The per-mapping facts and SQL of the pipelined sync, built once each.

A mapping qualifies for the pipeline on three conditions. Its source and
target keys are single integer or string columns. Its columns have types
that psycopg and PostgreSQL's JSON functions handle exactly as SQLAlchemy
would. Its target draws ascending keys, or is given them. Its read SELECTs are
compiled once and cached with it.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Column,
    Select,
    Table,
    Text,
    TypeDecorator,
    and_,
    any_,
    bindparam,
    cast,
    literal,
    select,
    true,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.orm import ColumnProperty
from sqlalchemy.sql import sqltypes

from sa_dualwrite import _store
from sa_dualwrite._buffer import Change
from sa_dualwrite._sync import _Plan
from sa_dualwrite.mapping._compile import CompiledField, CompiledMapping

# Column types that psycopg returns and PostgreSQL reads from JSON exactly as
# SQLAlchemy would process and bind them, so this module may skip
# SQLAlchemy's result and bind processing.
_PLAIN_TYPES = (
    sqltypes.JSON,
    sqltypes.String,
    sqltypes.Integer,
    sqltypes.Numeric,
    sqltypes.Boolean,
    sqltypes.Date,
    sqltypes.DateTime,
    sqltypes.Uuid,
)
_NOT_PLAIN = (
    sqltypes.Enum,
    sqltypes.ARRAY,
    sqltypes.Interval,
    sqltypes.PickleType,
)


def _image_statement(mapping: CompiledMapping) -> Select[Any]:
    """Return the SELECT of source rows by key with their cross-references.

    It adds the cross-reference of each row (``_dw_own``), its target row
    locked (``_dw_target0`` and on) and the cross-references of its refs
    (``_dw_ref0`` and on). The keys go as one array parameter, which the
    planner sizes from its value; a set-returning function over a JSON
    parameter is estimated at 100 rows and turns the key lookups into
    scans of whole tables.
    """
    mapper = mapping.source_mapper
    key_column = mapper.primary_key[0]
    keys = bindparam("keys", type_=ARRAY(key_column.type))
    statement = (
        select(*mapping.image_select.selected_columns)
        .select_from(mapper.local_table)
        .where(key_column == any_(keys))
    )
    return _join_xrefs(mapping, statement)


def _ref_fields(mapping: CompiledMapping) -> list[CompiledField]:
    return [item for item in mapping.fields if item.ref_mapping is not None]


def _locks_target(mapping: CompiledMapping) -> bool:
    """Return whether :func:`_join_xrefs` also reads the target rows."""
    columns = mapping.target_pk_columns
    return len(columns) == 1 and _text_key(columns[0])


def _join_xrefs(
    mapping: CompiledMapping, statement: Select[Any]
) -> Select[Any]:
    """Add the cross-references of the rows and of their refs to the
    source row SELECT of ``mapping``, by LEFT JOINs on the key text."""
    mapper = mapping.source_mapper
    table = mapper.local_table
    own = _store.xref_table.alias("dw_own_xref")
    statement = statement.add_columns(own.c.v2_pk.label("_dw_own"))
    statement = statement.outerjoin_from(
        table,
        own,
        and_(
            own.c.mapping == literal(mapping.name),
            own.c.v1_pk == cast(mapper.primary_key[0], Text),
        ),
    )
    if _locks_target(mapping):
        # The target row of the cross-reference, read and locked for an
        # update; FOR UPDATE must sit in a subquery on the nullable side.
        target = mapping.target_table
        key_column = mapping.target_pk_columns[0]
        current = (
            select(target)
            .where(key_column == cast(own.c.v2_pk, key_column.type))
            .with_for_update()
            .lateral("dw_target")
        )
        statement = statement.add_columns(
            *(
                current.c[column.key].label(f"_dw_target{index}")
                for index, column in enumerate(target.columns)
            )
        )
        statement = statement.outerjoin_from(table, current, true())
    for index, item in enumerate(_ref_fields(mapping)):
        prop = mapper.attrs[item.sources[0]]
        assert isinstance(prop, ColumnProperty)
        ref = _store.xref_table.alias(f"dw_ref_xref{index}")
        statement = statement.add_columns(ref.c.v2_pk.label(f"_dw_ref{index}"))
        statement = statement.outerjoin_from(
            table,
            ref,
            and_(
                ref.c.mapping == literal(item.ref_mapping),
                ref.c.v1_pk == cast(prop.columns[0], Text),
            ),
        )
    return statement


def _plain(column_type: Any) -> bool:
    if isinstance(column_type, (TypeDecorator, *_NOT_PLAIN)):
        return False
    return isinstance(column_type, _PLAIN_TYPES)


def _text_key(column: Any) -> bool:
    """Return whether CAST(column AS text) equals the key text of a value."""
    column_type = column.type
    if isinstance(column_type, (TypeDecorator, sqltypes.CHAR)):
        return False
    return isinstance(column_type, (sqltypes.Integer, sqltypes.String))


@dataclass(eq=False)
class _Shape:
    """The facts and compiled SQL of one mapping, built once."""

    mapping: CompiledMapping
    image_sql: str = ""
    image_params: dict[str, Any] = field(default_factory=dict)
    source_sql: str = ""
    source_params: dict[str, Any] = field(default_factory=dict)
    xref_sql: str = ""
    record_columns: list[tuple[str, str]] = field(default_factory=list)
    ref_columns: dict[str, tuple[str, str]] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    pk_key: str = ""
    pk_given: bool = False
    sql: dict[str, str] = field(default_factory=dict)


_shapes: weakref.WeakKeyDictionary[CompiledMapping, _Shape | None] = (
    weakref.WeakKeyDictionary()
)


def eligible(
    changes: Sequence[Change],
    mappings: dict[str, CompiledMapping],
    dialect: Dialect,
) -> bool:
    """Return whether every change's mapping can be synced here."""
    names = {change.mapping for change in changes}
    return all(_shape(mappings[name], dialect) is not None for name in names)


def _shape(mapping: CompiledMapping, dialect: Dialect) -> _Shape | None:
    if mapping in _shapes:
        return _shapes[mapping]
    shape = _build_shape(mapping, dialect)
    _shapes[mapping] = shape
    return shape


def _build_shape(mapping: CompiledMapping, dialect: Dialect) -> _Shape | None:
    mapper = mapping.source_mapper
    table = mapping.target_table
    if mapper.selectable is not mapper.local_table:
        return None
    if len(mapper.primary_key) != 1 or not _text_key(mapper.primary_key[0]):
        return None
    if len(mapping.target_pk_columns) != 1:
        return None
    pk = mapping.target_pk_columns[0]
    if not _text_key(pk):
        return None
    for attr in mapping.source_attrs:
        prop = mapper.attrs[attr]
        if not isinstance(prop, ColumnProperty) or not _plain(
            prop.columns[0].type
        ):
            return None
    if not all(_plain(column.type) for column in table.columns):
        return None
    written = {item.column_key for item in mapping.fields}
    written |= set(mapping.fixed_values)
    pk_given = pk.key in written
    if not pk_given and not _ascending_key(pk, table):
        return None

    defaults: dict[str, Any] = {}
    for column in table.columns:
        if column.key in written or column.default is None:
            continue
        if not column.default.is_scalar:
            return None
        defaults[column.key] = getattr(column.default, "arg", None)
    for item in mapping.fields:
        if item.ref_mapping is not None:
            prop = mapper.attrs[item.sources[0]]
            assert isinstance(prop, ColumnProperty)
            if not _text_key(prop.columns[0]):
                return None

    shape = _Shape(
        mapping, pk_key=pk.key, pk_given=pk_given, defaults=defaults
    )
    _compile_reads(shape, dialect)
    keys = sorted(written | set(defaults))
    shape.record_columns = [
        (key, table.c[key].type.compile(dialect=dialect)) for key in keys
    ]
    for item in mapping.fields:
        if item.ref_mapping is not None:
            shape.ref_columns[item.column_key] = (
                item.ref_mapping,
                table.c[item.column_key].type.compile(dialect=dialect),
            )
    return shape


def _ascending_key(column: Column[Any], table: Table) -> bool:
    """Return whether the database draws growing keys for ``column``."""
    if column is not table.autoincrement_column:
        return False
    if not isinstance(column.type, sqltypes.Integer):
        return False
    if column.default is not None:
        return False
    identity = column.identity
    # NOTE: a sequence altered in the database to count down is not seen
    # here; inserted rows would then be matched to the wrong changes.
    return (
        identity is None
        or identity.increment is None
        or (identity.increment > 0)
    )


def _compile_reads(shape: _Shape, dialect: Dialect) -> None:
    """Compile the SELECTs of source rows and of cross-references."""
    mapping = shape.mapping
    image = _image_statement(mapping).compile(dialect=dialect)
    shape.image_sql = str(image)
    shape.image_params = {
        key: value for key, value in image.params.items() if key != "keys"
    }
    mapper = mapping.source_mapper
    key_column = mapper.primary_key[0]
    rows = (
        select(*mapping.image_select.selected_columns)
        .select_from(mapper.local_table)
        .where(
            key_column == any_(bindparam("keys", type_=ARRAY(key_column.type)))
        )
        .compile(dialect=dialect)
    )
    shape.source_sql = str(rows)
    shape.source_params = {
        key: value for key, value in rows.params.items() if key != "keys"
    }
    quote = dialect.identifier_preparer.format_table
    target = quote(mapping.target_table)
    pk = dialect.identifier_preparer.quote(mapping.target_pk_columns[0].name)
    pk_type = mapping.target_pk_columns[0].type.compile(dialect=dialect)
    shape.xref_sql = (
        f"SELECT x.v1_pk, x.v2_pk, t.* FROM {quote(_store.xref_table)} AS x "
        f"LEFT JOIN LATERAL (SELECT * FROM {target} "
        f"WHERE {target}.{pk} = CAST(x.v2_pk AS {pk_type}) FOR UPDATE) AS t "
        "ON true WHERE x.mapping = %(mapping)s "
        "AND x.v1_pk = ANY(%(keys)s)"
    )


@dataclass(eq=False)
class _Batch:
    """The plans of one sync and what the read round trip found."""

    plans: list[_Plan]
    shapes: dict[str, _Shape]
    xrefs: dict[str, dict[str, str]] = field(default_factory=dict)
    locked: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    new_keys: set[tuple[str, str]] = field(default_factory=set)
