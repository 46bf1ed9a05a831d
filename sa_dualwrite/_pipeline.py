"""Sync on PostgreSQL with psycopg 3 in one or two network round trips.

The general sync (:func:`sa_dualwrite._sync.sync_changes`) sends one
statement at a time and waits for each answer. With psycopg 3 this module
sends its statements in pipeline mode instead, where the server runs them in
order while the client waits once:

* the read round trip: set the time budget, then read the source rows,
  their cross-references and the locked target rows of the changes that
  need them (updates, deletes, inserts whose values the ORM did not hold);
* the write round trip: one statement per run of changes, which writes the
  target rows, the cross-references and the audit rows together in a
  data-modifying CTE, then puts the time budget settings back.

When nothing needs reading, both go out in one round trip. The audit
``after`` images are built by PostgreSQL (``jsonb_build_object``), so a
timestamp or a number may be spelled differently than in images built in
Python; revert compares images by value, not by text.

Any database error aborts the pipeline. The caller then rolls back to the
savepoint it gave and runs the general sync, which fails each bad change
alone. Mappings this module cannot handle (composite keys, custom types,
targets without an ascending generated key) are left to the general sync.
"""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
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

from sa_dualwrite import _locks, _store
from sa_dualwrite._buffer import DELETE, INSERT, UPDATE, Change
from sa_dualwrite._codec import decode_key, encode_key, to_json
from sa_dualwrite._errors import SyncError
from sa_dualwrite._sync import (
    NOOP,
    Outcome,
    _changes_json,
    _fail,
    _fail_timed_out,
    _Plan,
)
from sa_dualwrite.mapping._compile import CompiledField, CompiledMapping

__all__ = [
    "PipelineUnavailable",
    "eligible",
    "run_statements",
    "sync_after_commit",
    "sync_in_transaction",
    "usable",
]

SAVEPOINT = "sa_dualwrite_sync"

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

_SET_BUDGET = (
    "SELECT set_config('sa_dualwrite.statement_timeout', "
    "current_setting('statement_timeout'), true), "
    "set_config('sa_dualwrite.lock_timeout', "
    "current_setting('lock_timeout'), true), "
    "set_config('statement_timeout', %(budget)s, true), "
    "set_config('lock_timeout', %(budget)s, true)"
)
_RESTORE_BUDGET = (
    "SELECT set_config('statement_timeout', "
    "current_setting('sa_dualwrite.statement_timeout'), true), "
    "set_config('lock_timeout', "
    "current_setting('sa_dualwrite.lock_timeout'), true)"
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


class PipelineUnavailable(Exception):
    """Raised when these changes must go through the general sync."""


def usable(connection: Connection) -> bool:
    """Return whether ``connection`` is a synchronous psycopg 3 connection."""
    dialect = connection.dialect
    return (
        dialect.name == "postgresql"
        and dialect.driver == "psycopg"
        and not dialect.is_async
    )


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
    """What this module needs to know about one mapping, built once."""

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


def sync_in_transaction(
    connection: Connection,
    changes: Sequence[Change],
    *,
    mappings: dict[str, CompiledMapping],
    session_key: str | None,
    deadline: float,
    lock: bool = False,
    finish: Finish | None = None,
) -> list[Outcome]:
    """Sync ``changes`` inside the source transaction of ``connection``.

    Opens the savepoint ``sa_dualwrite_sync`` and leaves it open: the source
    COMMIT follows and ends it. With ``lock`` the advisory row locks of
    :mod:`sa_dualwrite._locks` are taken first. ``finish`` returns more
    statements for the write round trip, given the outcomes of the changes
    that failed before reaching the database. Raises the database error
    after rolling back to the savepoint; raises
    :class:`PipelineUnavailable`, having sent nothing, when a change needs
    the general sync.
    """
    dialect = connection.dialect
    shapes = {}
    for name in {change.mapping for change in changes}:
        shape = _shape(mappings[name], dialect)
        if shape is None:
            raise PipelineUnavailable(name)
        shapes[name] = shape
    batch = _Batch(
        [
            _Plan(change, mappings[change.mapping], encode_key(change.v1_pk))
            for change in changes
        ],
        shapes,
    )
    raw = connection.connection.dbapi_connection
    assert raw is not None
    budget = {
        "budget": f"{max(int((deadline - time.monotonic()) * 1000), 1)}ms"
    }
    opening: list[Any] = [
        (f"SAVEPOINT {SAVEPOINT}", None),
        (_SET_BUDGET, budget),
    ]
    if lock:
        opening.append((_locks.LOCK_SQL, _locks.lock_plan(changes)))
    try:
        reads = _read_statements(batch)
        if reads:
            _run(raw, opening + reads, batch)
            opening = []
        for plan in batch.plans:
            if plan.outcome is None:
                _decide(plan, batch)
        if time.monotonic() > deadline:
            _fail_timed_out([p for p in batch.plans if p.outcome is None])
        writes = _write_statements(batch, session_key, dialect)
        if finish is not None:
            writes.extend(finish(_failed_before(batch)))
        writes.append((_RESTORE_BUDGET, None))
        _run(raw, opening + writes, batch)
    except Exception:
        raw.execute(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}")
        raise
    outcomes = [plan.outcome for plan in batch.plans]
    return [outcome for outcome in outcomes if outcome is not None]


def sync_after_commit(
    target: Connection,
    source: Connection,
    changes: Sequence[Change],
    *,
    mappings: dict[str, CompiledMapping],
    session_key: str | None,
    deadline: float,
    finish: Finish | None = None,
) -> list[Outcome]:
    """Sync ``changes`` in one transaction of ``target``, and commit it.

    ``target`` must be idle. The advisory row locks are taken first, then
    the committed source rows are read on ``source`` in a read transaction
    begun and ended here, then everything is written and committed. Rows
    inserted by the source commit are taken from the values the ORM held,
    without a read; if a concurrent sync already inserted one, the
    cross-reference key stops the commit and the caller's fallback
    updates it instead. Raises like :func:`sync_in_transaction`, after
    rolling the target transaction back.
    """
    dialect = target.dialect
    shapes = {}
    for name in {change.mapping for change in changes}:
        shape = _shape(mappings[name], dialect)
        if shape is None:
            raise PipelineUnavailable(name)
        shapes[name] = shape
    source_raw = source.connection.dbapi_connection
    raw = target.connection.dbapi_connection
    assert source_raw is not None
    assert raw is not None
    if source.in_transaction() or target.in_transaction():
        raise PipelineUnavailable("a connection is inside a transaction")
    batch = _Batch(
        [
            _Plan(change, mappings[change.mapping], encode_key(change.v1_pk))
            for change in changes
        ],
        shapes,
    )
    budget = {
        "budget": f"{max(int((deadline - time.monotonic()) * 1000), 1)}ms"
    }
    opening = [
        (_SET_BUDGET, budget),
        (_locks.LOCK_SQL, _locks.lock_plan(changes)),
    ]
    try:
        source_reads, target_reads = _separate_reads(batch)
        if target_reads:
            _run(raw, opening + target_reads, batch)
            opening = []
        if source_reads:
            _run(source_raw, source_reads, batch, end=source_raw.rollback)
        for plan in batch.plans:
            if plan.outcome is None:
                _decide(plan, batch)
        if time.monotonic() > deadline:
            _fail_timed_out([p for p in batch.plans if p.outcome is None])
        writes = _write_statements(batch, session_key, dialect)
        if finish is not None:
            writes.extend(finish(_failed_before(batch)))
        _run(raw, opening + writes, batch, end=raw.commit)
    except Exception:
        raw.rollback()
        if source_raw.info.transaction_status != 0:
            source_raw.rollback()
        raise
    outcomes = [plan.outcome for plan in batch.plans]
    return [outcome for outcome in outcomes if outcome is not None]


def _separate_reads(batch: _Batch) -> tuple[list[Any], list[Any]]:
    """Return the reads of the source and of the target, in that order."""
    sources: dict[str, list[_Plan]] = {}
    targets: dict[str, list[_Plan]] = {}
    for plan in batch.plans:
        change = plan.change
        if change.operation == INSERT and _complete(plan):
            plan.image = change.values
            batch.new_keys.add((plan.mapping.name, plan.v1_key))
            continue
        # A delete is checked against the source too: the row may have
        # been inserted again since, by a transaction synced before this.
        sources.setdefault(plan.mapping.name, []).append(plan)
        targets.setdefault(plan.mapping.name, []).append(plan)

    source_reads: list[Any] = []
    for name, plans in sources.items():
        shape = batch.shapes[name]
        params = dict(shape.source_params)
        params["keys"] = [plan.change.v1_pk[0] for plan in plans]
        source_reads.append(
            (shape.source_sql, params, _sources_reader(shape, plans))
        )
    target_reads: list[Any] = []
    for name, plans in targets.items():
        shape = batch.shapes[name]
        params = {"mapping": name, "keys": [plan.v1_key for plan in plans]}
        target_reads.append((shape.xref_sql, params, _xrefs_reader(shape)))
    refs = _unknown_refs(batch)
    if refs:
        target_reads.append(_refs_statement(refs))
    return source_reads, target_reads


def _sources_reader(shape: _Shape, plans: list[_Plan]) -> Any:
    mapping = shape.mapping

    def read(cursor: Any, batch: _Batch) -> None:
        names = [column.name for column in cursor.description]
        found = {}
        for values in cursor.fetchall():
            row = dict(zip(names, values, strict=True))
            found[row["_pk0"]] = _image_of(mapping, row)
        for plan in plans:
            plan.image = found.get(plan.change.v1_pk[0])

    return read


Finish = Callable[[list[Outcome]], list[tuple[str, dict[str, Any]]]]
"""Callable that adds statements to a write round trip; see the syncs."""


def run_statements(
    connection: Connection, statements: list[tuple[str, Any]]
) -> None:
    """Run ``statements`` and COMMIT in one round trip on an idle connection.

    Rolls back and raises on any error.
    """
    raw = connection.connection.dbapi_connection
    assert raw is not None
    try:
        _run(raw, list(statements), _Batch([], {}), end=raw.commit)
    except Exception:
        raw.rollback()
        raise


def _failed_before(batch: _Batch) -> list[Outcome]:
    """Return the outcomes of changes that failed without a database error."""
    return [
        plan.outcome
        for plan in batch.plans
        if plan.outcome is not None and plan.outcome.status == "failed"
    ]


def _run(
    raw: Any, statements: list[Any], batch: _Batch, end: Any = None
) -> None:
    """Send ``statements`` in one pipeline and hand each result on.

    ``end``, the connection's commit or rollback, ends the transaction in
    the same round trip.
    """
    cursors = []
    with raw.pipeline():
        for statement in statements:
            sql, params = statement[0], statement[1]
            cursor = raw.cursor()
            cursor.execute(sql, params)
            cursors.append((cursor, statement))
        if end is not None:
            end()
    for cursor, statement in cursors:
        if len(statement) > 2:
            statement[2](cursor, batch)


def _read_statements(batch: _Batch) -> list[Any]:
    """Return the SELECTs of the read round trip; record what they need."""
    images: dict[str, list[_Plan]] = {}
    deletes: dict[str, list[_Plan]] = {}
    for plan in batch.plans:
        change = plan.change
        if change.operation == DELETE:
            deletes.setdefault(plan.mapping.name, []).append(plan)
        elif change.operation == INSERT and _complete(plan):
            plan.image = change.values
            batch.new_keys.add((plan.mapping.name, plan.v1_key))
        else:
            images.setdefault(plan.mapping.name, []).append(plan)

    statements: list[Any] = []
    for name, plans in images.items():
        shape = batch.shapes[name]
        params = dict(shape.image_params)
        params["keys"] = [plan.change.v1_pk[0] for plan in plans]
        statements.append(
            (shape.image_sql, params, _images_reader(shape, plans))
        )
    for name, plans in deletes.items():
        shape = batch.shapes[name]
        params = {"mapping": name, "keys": [plan.v1_key for plan in plans]}
        statements.append((shape.xref_sql, params, _xrefs_reader(shape)))
    refs = _unknown_refs(batch)
    if refs:
        statements.append(_refs_statement(refs))
    return statements


def _refs_statement(refs: set[tuple[str, str]]) -> Any:
    return (
        f"SELECT mapping, v1_pk, v2_pk FROM {_store.xref_table.name} "
        "WHERE mapping = ANY(%(mappings)s) AND v1_pk = ANY(%(keys)s)",
        {
            "mappings": sorted({name for name, _ in refs}),
            "keys": sorted({key for _, key in refs}),
        },
        _refs_reader,
    )


def _complete(plan: _Plan) -> bool:
    values = plan.change.values
    return values is not None and all(
        attr in values for attr in plan.mapping.source_attrs
    )


def _unknown_refs(batch: _Batch) -> set[tuple[str, str]]:
    """Return the refs of inserted rows that no read covers."""
    wanted = set()
    for plan in batch.plans:
        if plan.image is None or plan.change.operation != INSERT:
            continue
        for item in plan.mapping.fields:
            if item.ref_mapping is None:
                continue
            value = plan.image.get(item.sources[0])
            if value is not None:
                wanted.add((item.ref_mapping, encode_key((value,))))
    return wanted


def _images_reader(shape: _Shape, plans: list[_Plan]) -> Any:
    mapping = shape.mapping
    refs = [item for item in mapping.fields if item.ref_mapping is not None]
    target_columns = list(mapping.target_table.columns)

    def read(cursor: Any, batch: _Batch) -> None:
        names = [column.name for column in cursor.description]
        found: dict[Any, dict[str, Any]] = {}
        for values in cursor.fetchall():
            row = dict(zip(names, values, strict=True))
            key = row["_pk0"]
            found[key] = row
            v1_key = encode_key((key,))
            own = batch.xrefs.setdefault(mapping.name, {})
            if row["_dw_own"] is not None:
                own[v1_key] = row["_dw_own"]
                current = {
                    column.key: row[f"_dw_target{index}"]
                    for index, column in enumerate(target_columns)
                }
                if current[shape.pk_key] is not None:
                    batch.locked[(mapping.name, row["_dw_own"])] = current
            for index, item in enumerate(refs):
                value = row[item.sources[0]]
                ref_key = row[f"_dw_ref{index}"]
                if value is not None and ref_key is not None:
                    assert item.ref_mapping is not None
                    batch.xrefs.setdefault(item.ref_mapping, {})[
                        encode_key((value,))
                    ] = ref_key
        for plan in plans:
            source_row = found.get(plan.change.v1_pk[0])
            plan.image = (
                None if source_row is None else _image_of(mapping, source_row)
            )
            if source_row is None:
                continue
            batch.xrefs.setdefault(mapping.name, {})

    return read


def _image_of(mapping: CompiledMapping, row: dict[str, Any]) -> dict[str, Any]:
    return {attr: row[attr] for attr in mapping.source_attrs}


def _xrefs_reader(shape: _Shape) -> Any:
    mapping = shape.mapping
    keys = [column.key for column in mapping.target_table.columns]

    def read(cursor: Any, batch: _Batch) -> None:
        own = batch.xrefs.setdefault(mapping.name, {})
        for values in cursor.fetchall():
            v1_key, v2_key, *rest = values
            own[v1_key] = v2_key
            current = dict(zip(keys, rest, strict=True))
            if current[shape.pk_key] is not None:
                batch.locked[(mapping.name, v2_key)] = current

    return read


def _refs_reader(cursor: Any, batch: _Batch) -> None:
    for mapping, v1_key, v2_key in cursor.fetchall():
        batch.xrefs.setdefault(mapping, {})[v1_key] = v2_key


def _decide(plan: _Plan, batch: _Batch) -> None:
    """Choose the write of a plan from the source row and the xref."""
    name = plan.mapping.name
    if (name, plan.v1_key) in batch.new_keys:
        plan.v2_key = None
    else:
        plan.v2_key = batch.xrefs.get(name, {}).get(plan.v1_key)
    if plan.image is not None:
        plan.operation = UPDATE if plan.v2_key is not None else INSERT
    elif plan.v2_key is not None:
        plan.operation = DELETE
    else:
        plan.operation = NOOP
        plan.outcome = Outcome(
            plan.change,
            plan.change.operation,
            "applied",
            plan.v1_key,
            changes=_changes_json(plan),
        )


def _write_statements(
    batch: _Batch, session_key: str | None, dialect: Dialect
) -> list[Any]:
    """Return one statement per run of plans, plus audit-only rows."""
    statements: list[Any] = []
    inserted: set[tuple[str, str]] = set()
    current: list[_Plan] = []
    for plan in batch.plans:
        if plan.outcome is not None:
            continue
        if current and (
            current[0].mapping is not plan.mapping
            or current[0].operation != plan.operation
        ):
            statements.extend(
                _run_statement(batch, current, session_key, dialect, inserted)
            )
            current = []
        current.append(plan)
    if current:
        statements.extend(
            _run_statement(batch, current, session_key, dialect, inserted)
        )
    # Plans decided without a target write (no-ops) and plans that failed
    # before reaching the database (a value map, a ref, the budget).
    audit_only = [plan for plan in batch.plans if plan.outcome is not None]
    if audit_only:
        statements.append(_audit_only(audit_only, session_key))
    return statements


def _run_statement(
    batch: _Batch,
    plans: list[_Plan],
    session_key: str | None,
    dialect: Dialect,
    inserted: set[tuple[str, str]],
) -> list[Any]:
    shape = batch.shapes[plans[0].mapping.name]
    operation = plans[0].operation
    ready = [plan for plan in plans if _values(plan, batch, inserted)]
    if not ready:
        return []
    if operation == INSERT:
        for plan in ready:
            inserted.add((plan.mapping.name, plan.v1_key))
        return [_insert(shape, ready, session_key, dialect)]
    if operation == UPDATE:
        return [_update(shape, ready, batch, session_key, dialect)]
    return [_delete(shape, ready, batch, session_key, dialect)]


def _values(
    plan: _Plan, batch: _Batch, inserted: set[tuple[str, str]]
) -> bool:
    """Compute the target values of a plan, refs left to the database
    when they point at a row inserted earlier in this sync."""
    if plan.operation == DELETE:
        return True
    assert plan.image is not None

    def resolve_ref(mapping_name: str, value: Any) -> Any:
        v1_key = encode_key((value,))
        v2_key = batch.xrefs.get(mapping_name, {}).get(v1_key)
        if v2_key is not None:
            referenced = batch.shapes.get(mapping_name)
            types = (
                referenced.mapping.target_pk_types
                if referenced is not None
                else (None,)
            )
            return decode_key(v2_key, types)[0]
        if (mapping_name, v1_key) in inserted:
            return _PendingRef(v1_key)
        raise SyncError(
            f"ref to {mapping_name!r} key {v1_key}: no cross-reference "
            "(the referenced row was never synced, or its sync "
            "failed); sync that row first, then replay this change",
            mapping=plan.mapping.name,
            operation=plan.operation,
            v1_pk=plan.v1_key,
        )

    try:
        plan.values = plan.mapping.target_values(
            plan.image,
            resolve_ref,
            operation=plan.operation,
            v1_pk=plan.v1_key,
        )
    except SyncError as exc:
        _fail(plan, exc, None)
        return False
    return True


@dataclass(frozen=True, slots=True)
class _PendingRef:
    """A ref to a row whose target key the database assigns in this sync."""

    v1_key: str


def _document(
    shape: _Shape, plan: _Plan, extra: dict[str, Any]
) -> dict[str, Any]:
    """Return the JSON record of one plan's target values."""
    record = dict(extra)
    values = {**shape.defaults, **plan.values}
    for key, _ in shape.record_columns:
        value = values.get(key)
        if isinstance(value, _PendingRef):
            record[key] = None
            record[f"{key}__v1"] = value.v1_key
        else:
            record[key] = to_json(value)
    return record


def _record_type(shape: _Shape, extra: list[tuple[str, str]]) -> str:
    columns = [*extra, *shape.record_columns]
    columns += [(f"{key}__v1", "text") for key in shape.ref_columns]
    return ", ".join(f'"{name}" {sql_type}' for name, sql_type in columns)


def _value_sql(shape: _Shape, key: str) -> str:
    """Return the SQL of one target value in the JSON record ``r``."""
    if key not in shape.ref_columns:
        return f'r."{key}"'
    ref_mapping, sql_type = shape.ref_columns[key]
    return (
        f'COALESCE(r."{key}", (SELECT CAST(x.v2_pk AS {sql_type}) '
        f"FROM {_store.xref_table.name} AS x WHERE x.mapping = "
        f'{_literal(ref_mapping)} AND x.v1_pk = r."{key}__v1"))'
    )


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _row_json(shape: _Shape, alias: str, dialect: Dialect) -> str:
    """Return jsonb_build_object() of a target row, keyed like images."""
    quote = dialect.identifier_preparer.quote
    parts = []
    for column in shape.mapping.target_table.columns:
        parts.append(f"{_literal(column.key)}, {alias}.{quote(column.name)}")
    return f"jsonb_build_object({', '.join(parts)})"


_AUDIT_FIELDS = [
    ("dw_ord", "integer"),
    ("dw_v1_pk", "text"),
    ("dw_changes", "jsonb"),
    ("dw_actor", "text"),
]


def _audit_document(plan: _Plan, ordinal: int) -> dict[str, Any]:
    return {
        "dw_ord": ordinal,
        "dw_v1_pk": plan.v1_key,
        "dw_changes": _changes_json(plan),
        "dw_actor": plan.change.actor,
    }


def _audit_insert(
    source: str, v2_pk: str, before: str, after: str, operation: str
) -> str:
    return (
        f"INSERT INTO {_store.audit_table.name} (session_key, mapping, "
        "operation, v1_pk, v2_pk, status, changes, before, after, actor, "
        f"created_at) SELECT %(session_key)s, %(mapping)s, "
        f"{_literal(operation)}, {source}.dw_v1_pk, {v2_pk}, 'applied', "
        f"{source}.dw_changes, {before}, {after}, {source}.dw_actor, "
        f"now() FROM {source}"
    )


def _insert(
    shape: _Shape,
    plans: list[_Plan],
    session_key: str | None,
    dialect: Dialect,
) -> Any:
    records = [
        _document(shape, plan, _audit_document(plan, ordinal))
        for ordinal, plan in enumerate(plans)
    ]
    params = {
        "rows": json.dumps(records),
        "mapping": shape.mapping.name,
        "session_key": session_key,
    }
    sql = shape.sql.get(INSERT) or _insert_sql(shape, dialect)
    return (sql, params, _audit_reader(plans, INSERT))


def _insert_sql(shape: _Shape, dialect: Dialect) -> str:
    """Build the INSERT of target, cross-reference and audit rows."""
    mapping = shape.mapping
    quote = dialect.identifier_preparer.quote
    table = dialect.identifier_preparer.format_table(mapping.target_table)
    pk = quote(mapping.target_table.c[shape.pk_key].name)
    keys = [key for key, _ in shape.record_columns]
    columns = ", ".join(
        quote(mapping.target_table.c[key].name) for key in keys
    )
    values = ", ".join(_value_sql(shape, key) for key in keys)
    if shape.pk_given:
        match = (
            f'ins.{pk} = CAST(r."{shape.pk_key}" AS {_pk_sql(shape, dialect)})'
        )
        numbered = (
            "numbered AS (SELECT ins.*, r.dw_ord, r.dw_v1_pk, r.dw_changes, "
            f"r.dw_actor FROM ins JOIN src AS r ON {match})"
        )
    else:
        numbered = (
            "numbered AS (SELECT ins.*, s.dw_ord, s.dw_v1_pk, s.dw_changes, "
            "s.dw_actor FROM (SELECT ins.*, row_number() OVER "
            f"(ORDER BY ins.{pk}) - 1 AS dw_n FROM ins) AS ins JOIN "
            "(SELECT src.*, row_number() OVER (ORDER BY src.dw_ord) - 1 "
            "AS dw_n FROM src) AS s ON s.dw_n = ins.dw_n)"
        )
    audit = _audit_insert(
        "numbered",
        f"CAST(numbered.{pk} AS text)",
        "NULL",
        _row_json(shape, "numbered", dialect),
        INSERT,
    )
    sql = (
        f"WITH src AS (SELECT * FROM jsonb_to_recordset(CAST(%(rows)s AS "
        f"jsonb)) AS r({_record_type(shape, _AUDIT_FIELDS)})), "
        f"ins AS (INSERT INTO {table} ({columns}) SELECT {values} FROM src "
        f"AS r ORDER BY r.dw_ord RETURNING {table}.*), {numbered}, "
        f"xref AS (INSERT INTO {_store.xref_table.name} (mapping, v1_pk, "
        f"v2_pk, created_at) SELECT %(mapping)s, dw_v1_pk, "
        f"CAST({pk} AS text), now() FROM numbered), "
        f"audit AS ({audit} "
        "RETURNING id, v1_pk, v2_pk) SELECT id, v1_pk, v2_pk FROM audit"
    )
    shape.sql[INSERT] = sql
    return sql


def _pk_sql(shape: _Shape, dialect: Dialect) -> str:
    column = shape.mapping.target_table.c[shape.pk_key]
    return str(column.type.compile(dialect=dialect))


def _audit_reader(plans: list[_Plan], operation: str) -> Any:
    by_key = {plan.v1_key: plan for plan in plans}

    def read(cursor: Any, batch: _Batch) -> None:
        rows = cursor.fetchall()
        if len(rows) != len(plans):
            raise _RowCountError(
                f"{len(rows)} audit rows for {len(plans)} changes of "
                f"{plans[0].mapping.name}; check the triggers of its tables"
            )
        for audit_id, v1_key, v2_key in rows:
            plan = by_key[v1_key]
            plan.v2_key = v2_key
            plan.outcome = Outcome(
                plan.change,
                operation,
                "applied",
                plan.v1_key,
                v2_key,
                changes=_changes_json(plan),
                audit_id=int(audit_id),
            )
            if operation == INSERT:
                batch.xrefs.setdefault(plan.mapping.name, {})[plan.v1_key] = (
                    v2_key
                )

    return read


class _RowCountError(Exception):
    pass


def _update(
    shape: _Shape,
    plans: list[_Plan],
    batch: _Batch,
    session_key: str | None,
    dialect: Dialect,
) -> Any:
    mapping = shape.mapping
    records = []
    for ordinal, plan in enumerate(plans):
        assert plan.v2_key is not None
        before = batch.locked.get((mapping.name, plan.v2_key))
        if before is None:
            raise _MissingTarget(
                f"target row {mapping.target_table.name} key {plan.v2_key} "
                "no longer exists"
            )
        changed = any(
            before.get(key) != value
            for key, value in plan.values.items()
            if not isinstance(value, _PendingRef)
        )
        record = _document(shape, plan, _audit_document(plan, ordinal))
        record["dw_v2_pk"] = plan.v2_key
        record["dw_changed"] = changed
        record["dw_before"] = {k: to_json(v) for k, v in before.items()}
        records.append(record)
    params = {
        "rows": json.dumps(records),
        "mapping": mapping.name,
        "session_key": session_key,
    }
    sql = shape.sql.get(UPDATE) or _update_sql(shape, dialect)
    return (sql, params, _audit_reader(plans, UPDATE))


def _update_sql(shape: _Shape, dialect: Dialect) -> str:
    """Build the UPDATE of target rows and the INSERT of audit rows."""
    mapping = shape.mapping
    quote = dialect.identifier_preparer.quote
    table = dialect.identifier_preparer.format_table(mapping.target_table)
    pk = quote(mapping.target_table.c[shape.pk_key].name)
    pk_type = _pk_sql(shape, dialect)
    written = {item.column_key for item in mapping.fields}
    written |= set(mapping.fixed_values)
    assignments = ", ".join(
        f"{quote(mapping.target_table.c[key].name)} = {_value_sql(shape, key)}"
        for key, _ in shape.record_columns
        if key in written
    )
    fields = [
        *_AUDIT_FIELDS,
        ("dw_v2_pk", "text"),
        ("dw_changed", "boolean"),
        ("dw_before", "jsonb"),
    ]
    audit = _audit_insert(
        "joined",
        "joined.dw_v2_pk",
        "joined.dw_before",
        "joined.dw_after",
        UPDATE,
    )
    sql = (
        f"WITH src AS (SELECT * FROM jsonb_to_recordset(CAST(%(rows)s AS "
        f"jsonb)) AS r({_record_type(shape, fields)})), "
        f"upd AS (UPDATE {table} SET {assignments} FROM src AS r WHERE "
        f"r.dw_changed AND {table}.{pk} = CAST(r.dw_v2_pk AS {pk_type}) "
        f"RETURNING {table}.*), "
        "joined AS (SELECT src.*, "
        f"CASE WHEN upd.{pk} IS NULL THEN src.dw_before ELSE "
        f"{_row_json(shape, 'upd', dialect)} END AS dw_after FROM src LEFT "
        f"JOIN upd ON upd.{pk} = CAST(src.dw_v2_pk AS {pk_type})), "
        f"audit AS ({audit} "
        "RETURNING id, v1_pk, v2_pk) SELECT id, v1_pk, v2_pk FROM audit"
    )
    shape.sql[UPDATE] = sql
    return sql


class _MissingTarget(Exception):
    pass


def _delete(
    shape: _Shape,
    plans: list[_Plan],
    batch: _Batch,
    session_key: str | None,
    dialect: Dialect,
) -> Any:
    mapping = shape.mapping
    records = []
    for ordinal, plan in enumerate(plans):
        before = batch.locked.get((mapping.name, plan.v2_key or ""))
        record: dict[str, Any] = _audit_document(plan, ordinal)
        record["dw_v2_pk"] = plan.v2_key
        record["dw_before"] = (
            None
            if before is None
            else {k: to_json(v) for k, v in before.items()}
        )
        records.append(record)
    params: dict[str, Any] = {
        "rows": json.dumps(records),
        "mapping": mapping.name,
        "session_key": session_key,
    }
    on_delete = mapping.on_delete
    if isinstance(on_delete, dict):
        for index, value in enumerate(on_delete.values()):
            params[f"set_{index}"] = value
    sql = shape.sql.get(DELETE) or _delete_sql(shape, dialect)
    return (sql, params, _audit_reader(plans, DELETE))


def _delete_sql(shape: _Shape, dialect: Dialect) -> str:
    """Build the delete (or soft delete) with its audit rows."""
    mapping = shape.mapping
    quote = dialect.identifier_preparer.quote
    table = dialect.identifier_preparer.format_table(mapping.target_table)
    pk = quote(mapping.target_table.c[shape.pk_key].name)
    pk_type = _pk_sql(shape, dialect)
    fields = [*_AUDIT_FIELDS, ("dw_v2_pk", "text"), ("dw_before", "jsonb")]
    src = (
        "src AS (SELECT * FROM jsonb_to_recordset(CAST(%(rows)s AS jsonb)) "
        f"AS r({', '.join(f'{name} {kind}' for name, kind in fields)}))"
    )
    ignored = _audit_insert(
        "src", "src.dw_v2_pk", "src.dw_before", "src.dw_before", DELETE
    )
    soft = _audit_insert(
        "joined",
        "joined.dw_v2_pk",
        "joined.dw_before",
        "joined.dw_after",
        DELETE,
    )
    hard = _audit_insert(
        "src", "src.dw_v2_pk", "src.dw_before", "NULL", DELETE
    )
    on_delete = mapping.on_delete
    if on_delete == "ignore":
        body = f"{src}, audit AS ({ignored} RETURNING id, v1_pk, v2_pk)"
    elif isinstance(on_delete, dict):
        assignments = ", ".join(
            f"{quote(mapping.target_table.c[key].name)} = %(set_{index})s"
            for index, key in enumerate(on_delete)
        )
        body = (
            f"{src}, upd AS (UPDATE {table} SET {assignments} FROM src WHERE "
            f"{table}.{pk} = CAST(src.dw_v2_pk AS {pk_type}) RETURNING "
            f"{table}.*), joined AS (SELECT src.*, CASE WHEN upd.{pk} IS NULL "
            f"THEN NULL ELSE {_row_json(shape, 'upd', dialect)} END AS "
            f"dw_after FROM src LEFT JOIN upd ON upd.{pk} = "
            f"CAST(src.dw_v2_pk AS {pk_type})), audit AS "
            f"({soft} "
            "RETURNING id, v1_pk, v2_pk)"
        )
    else:
        body = (
            f"{src}, del AS (DELETE FROM {table} USING src WHERE "
            f"{table}.{pk} = CAST(src.dw_v2_pk AS {pk_type})), "
            f"xdel AS (DELETE FROM {_store.xref_table.name} AS x USING src "
            "WHERE x.mapping = %(mapping)s AND x.v1_pk = src.dw_v1_pk), "
            f"audit AS ({hard} "
            "RETURNING id, v1_pk, v2_pk)"
        )
    sql = f"WITH {body} SELECT id, v1_pk, v2_pk FROM audit"
    shape.sql[DELETE] = sql
    return sql


def _audit_only(plans: list[_Plan], session_key: str | None) -> Any:
    """Insert the audit rows of plans decided without a target write."""
    rows = []
    for position, plan in enumerate(plans):
        outcome = plan.outcome
        assert outcome is not None
        rows.append(
            {
                "position": position,
                "session_key": session_key,
                "mapping": outcome.mapping,
                "operation": outcome.operation,
                "v1_pk": outcome.v1_pk,
                "v2_pk": outcome.v2_pk,
                "status": outcome.status,
                "changes": outcome.changes,
                "before": outcome.before,
                "after": outcome.after,
                "error": outcome.error,
                "actor": outcome.change.actor,
            }
        )
    sql = (
        f"INSERT INTO {_store.audit_table.name} (session_key, mapping, "
        "operation, v1_pk, v2_pk, status, changes, before, after, error, "
        "actor, created_at) SELECT r.session_key, r.mapping, r.operation, "
        "r.v1_pk, r.v2_pk, r.status, r.changes, r.before, r.after, r.error, "
        "r.actor, now() FROM jsonb_to_recordset(CAST(%(rows)s AS jsonb)) "
        "AS r(position integer, session_key text, mapping text, operation "
        "text, v1_pk text, v2_pk text, status text, changes jsonb, before "
        "jsonb, after jsonb, error text, actor text) ORDER BY r.position "
        "RETURNING id"
    )

    def read(cursor: Any, batch: _Batch) -> None:
        ids = sorted(int(row[0]) for row in cursor.fetchall())
        for plan, audit_id in zip(plans, ids, strict=True):
            assert plan.outcome is not None
            plan.outcome.audit_id = audit_id

    return (sql, {"rows": json.dumps(rows)}, read)
