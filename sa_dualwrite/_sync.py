"""Sync: applying captured changes to the target and auditing them.

One call of :func:`sync_changes` takes the changes of one source commit (or
of a replay or a drain) and, on a target connection that is already inside
a transaction:

1. reads the current source row of every inserted or updated row, with one
   SELECT per mapping, so that values computed by the database are synced;
2. loads the cross-reference of every row and of every ref, one SELECT per
   mapping;
3. writes the target rows in runs of consecutive changes with the same
   mapping and operation, under one savepoint per run. When a run fails,
   each of its changes is retried alone under its own savepoint, so that
   one bad row fails alone;
4. inserts one audit row per change.

What is written is decided by the state of the row, not only by the
captured operation: a source row that exists is inserted into the target if
it has no cross-reference yet and updated otherwise, and a source row that
no longer exists is deleted from the target. Applying a change twice
therefore has the effect of applying it once.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from itertools import groupby
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Integer,
    Row,
    Select,
    Text,
    TypeDecorator,
    and_,
    any_,
    bindparam,
    cast,
    column,
    delete,
    func,
    insert,
    literal,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import ColumnProperty
from sqlalchemy.sql import sqltypes

from sa_dualwrite import _store
from sa_dualwrite._buffer import DELETE, INSERT, UPDATE, Change
from sa_dualwrite._codec import decode_key, encode_key, python_type, to_json
from sa_dualwrite._errors import SyncError
from sa_dualwrite.mapping._compile import (
    CompiledField,
    CompiledMapping,
    iter_source_refs,
)

__all__ = ["Outcome", "SyncTimeout", "sync_changes", "sync_changes_fast"]

NOOP = "noop"
_PK_PARAM = "_dw_pk{}"


class SyncTimeout(SyncError):
    """Raised for a change left unapplied when the time budget ran out."""


@dataclass(slots=True)
class Outcome:
    """The result of syncing one change, as written to its audit row."""

    change: Change
    operation: str
    status: str
    v1_pk: str
    v2_pk: str | None = None
    changes: dict[str, Any] | None = None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    error: str | None = None
    exception: BaseException | None = None
    audit_id: int | None = None

    @property
    def mapping(self) -> str:
        """Name of the mapping of the change."""
        return self.change.mapping


@dataclass(slots=True)
class _Plan:
    """One change on its way through a sync call."""

    change: Change
    mapping: CompiledMapping
    v1_key: str
    image: dict[str, Any] | None = None
    v2_key: str | None = None
    operation: str = NOOP
    values: dict[str, Any] = field(default_factory=dict)
    outcome: Outcome | None = None


class _Run:
    """Consecutive plans of one mapping and one operation."""

    def __init__(self, mapping: CompiledMapping, operation: str) -> None:
        self.mapping = mapping
        self.operation = operation
        self.plans: list[_Plan] = []


def sync_changes(
    changes: Sequence[Change],
    *,
    source: Connection,
    target: Connection,
    mappings: dict[str, CompiledMapping],
    session_key: str | None,
    deadline: float | None = None,
) -> list[Outcome]:
    """Apply ``changes`` to ``target`` and write their audit rows.

    ``target`` must be inside a transaction, which the caller commits.
    ``source`` reads the current source rows; it may be the same connection.
    ``deadline`` is a ``time.monotonic()`` value after which the changes not
    yet applied fail as timed out. Returns one :class:`Outcome` per change,
    in order, with ``audit_id`` set. Errors of single changes are recorded
    in their outcomes; an error that prevents auditing (the audit table is
    missing, the connection is lost) is raised.
    """
    plans = [
        _Plan(change, mappings[change.mapping], encode_key(change.v1_pk))
        for change in changes
    ]
    _read_images(source, plans)
    cache = _load_cross_references(target, plans, mappings)
    for plan in plans:
        if plan.outcome is None:
            _decide_operation(plan, cache)

    for run in _runs(plans):
        if deadline is not None and time.monotonic() > deadline:
            _fail_timed_out(run.plans)
            continue
        _execute_run(target, run, cache, mappings)

    outcomes = [plan.outcome for plan in plans]
    assert all(outcome is not None for outcome in outcomes)
    final = [outcome for outcome in outcomes if outcome is not None]
    _write_audit(target, final, session_key)
    return final


def _read_images(
    source: Connection,
    plans: list[_Plan],
    timeouts: _Timeouts | None = None,
    prefetched: _Prefetched | None = None,
) -> None:
    """Attach the current source row (or None if gone) to each plan.

    With ``timeouts`` not yet set, the first SELECT also sets them. With
    ``prefetched``, which needs the target tables in the source database,
    the SELECT also reads the cross-references of the rows and of their
    refs where :func:`_joins_xrefs` allows, and records them there.
    """
    needed: dict[str, list[_Plan]] = {}
    for plan in plans:
        if plan.change.operation == DELETE:
            continue
        if plan.change.values is not None and _complete(plan):
            plan.image = plan.change.values
            continue
        needed.setdefault(plan.mapping.name, []).append(plan)

    for group in needed.values():
        mapping = group[0].mapping
        found: dict[tuple[Any, ...], dict[str, Any]] = {}
        keys = list({plan.change.v1_pk for plan in group})
        single = len(mapping.source_pk_attrs) == 1
        joined = prefetched is not None and _joins_xrefs(mapping)
        try:
            for part in _store.chunks(keys):
                params: Any = [key[0] for key in part] if single else part
                if timeouts is not None and timeouts.saved is None:
                    statement = _image_statement(mapping, joined, True)
                    rows = timeouts.read_and_set(source, statement, params)
                else:
                    statement = _image_statement(mapping, joined, False)
                    rows = list(source.execute(statement, {"keys": params}))
                for row in rows:
                    image = _row_image(mapping, row)
                    found[_row_key(mapping, row)] = image
                    if joined:
                        assert prefetched is not None
                        prefetched.record(mapping, row, image)
        except SQLAlchemyError as exc:
            context = f"reading source table {mapping.source_table_name}"
            for plan in group:
                _fail(plan, exc, context)
            continue
        for plan in group:
            plan.image = found.get(plan.change.v1_pk)


class _Timeouts:
    """Statement and lock timeouts set for one sync on PostgreSQL.

    ``set()`` bounds the statements that follow by the time left until
    ``deadline`` and keeps the values it replaced in ``saved``, so that a
    sync can put them back in its last statement. ``read_and_set()`` does
    the same within the SELECT of source rows, which saves a round trip.
    """

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.saved: dict[str, Any] | None = None

    def _params(self) -> dict[str, Any]:
        budget_ms = max(int((self.deadline - time.monotonic()) * 1000), 1)
        return {"_dw_budget": f"{budget_ms}ms"}

    def set(self, connection: Connection) -> None:
        row = connection.execute(_SET_TIMEOUTS, self._params()).one()
        self.saved = {
            "statement_timeout": row.statement_timeout,
            "lock_timeout": row.lock_timeout,
        }

    def read_and_set(
        self, connection: Connection, statement: Select[Any], keys: Any
    ) -> list[Row[Any]]:
        """Run an image SELECT from :func:`_image_statement` that sets the
        timeouts, for ``keys``.

        statement_timeout applies from the next statement on, but this
        SELECT only reads rows by key. lock_timeout, set before any row
        is read, already bounds its wait for the target rows it locks.
        """
        params = self._params()
        params["keys"] = keys
        rows = list(connection.execute(statement, params))
        self.saved = {
            "statement_timeout": rows[0].statement_timeout,
            "lock_timeout": rows[0].lock_timeout,
        }
        # The settings row comes back alone when no source row matched.
        return [row for row in rows if row[0] is not None]


# current_setting() is listed before set_config(), so it reads the value
# in force before this statement.
_SETTINGS = select(
    func.current_setting("statement_timeout").label("statement_timeout"),
    func.current_setting("lock_timeout").label("lock_timeout"),
    func.set_config(
        "statement_timeout", bindparam("_dw_budget", type_=Text), true()
    ).label("_dw_set_statement_timeout"),
    func.set_config(
        "lock_timeout", bindparam("_dw_budget", type_=Text), true()
    ).label("_dw_set_lock_timeout"),
).subquery("dw_settings")
_SET_TIMEOUTS = select(_SETTINGS)
_image_statements: weakref.WeakKeyDictionary[
    CompiledMapping, dict[tuple[bool, bool], Select[Any]]
] = weakref.WeakKeyDictionary()


def _image_statement(
    mapping: CompiledMapping, joined: bool, setting: bool
) -> Select[Any]:
    """Return the SELECT of source rows by key, built once per variant.

    ``joined`` adds the cross-references of each row (``_dw_own``) and of
    its refs (``_dw_ref0`` and so on), and takes the keys as one array
    (psycopg parses a statement with more than 50 parameters anew on each
    call). ``setting`` adds the columns of ``_SETTINGS`` and returns one
    row even when no source row matches.
    """
    variants = _image_statements.setdefault(mapping, {})
    found = variants.get((joined, setting))
    if found is not None:
        return found
    statement = mapping.image_select
    if joined:
        mapper = mapping.source_mapper
        key_column = mapper.primary_key[0]
        # One array parameter, which the planner sizes from its value; a
        # set-returning function over a JSON parameter is estimated at 100
        # rows and turns the key lookups into scans of whole tables.
        keys = bindparam("keys", type_=ARRAY(key_column.type))
        statement = (
            select(*statement.selected_columns)
            .select_from(mapper.local_table)
            .where(key_column == any_(keys))
        )
        statement = _join_xrefs(mapping, statement)
    if setting:
        image = statement.subquery("image")
        statement = select(image, _SETTINGS).select_from(
            _SETTINGS.outerjoin(image, true())
        )
    variants[(joined, setting)] = statement
    return statement


def _ref_fields(mapping: CompiledMapping) -> list[CompiledField]:
    return [item for item in mapping.fields if item.ref_mapping is not None]


def _text_key_column(column: Any) -> bool:
    """Return whether CAST(column AS text) is the key text of its values.

    That holds for integers and for variable-length text, whose key text
    (see :func:`encode_key`) is their plain decimal or string form.
    """
    python = python_type(column.type)
    if isinstance(column.type, (sqltypes.CHAR, TypeDecorator)):
        return False
    return python is int or python is str


def _locks_target(mapping: CompiledMapping) -> bool:
    """Return whether :func:`_join_xrefs` also reads the target rows."""
    columns = mapping.target_pk_columns
    return len(columns) == 1 and _text_key_column(columns[0])


def _joins_xrefs(mapping: CompiledMapping) -> bool:
    """Return whether :func:`_join_xrefs` applies to ``mapping``."""
    mapper = mapping.source_mapper
    table = mapper.local_table
    if mapper.selectable is not table or len(mapper.primary_key) != 1:
        return False
    columns = [mapper.primary_key[0]]
    for item in _ref_fields(mapping):
        prop = mapper.attrs[item.sources[0]]
        assert isinstance(prop, ColumnProperty)
        columns.append(prop.columns[0])
    return all(_text_key_column(column) for column in columns)


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


class _Prefetched:
    """Cross-references read along with the source rows.

    ``looked_up`` holds every (mapping name, source key text) whose
    cross-reference was read, found or not, and ``found`` the ones found.
    ``locked`` holds the target rows read and locked with them, by mapping
    name and target key text.
    """

    def __init__(self) -> None:
        self.looked_up: set[tuple[str, str]] = set()
        self.found: dict[str, dict[str, str]] = {}
        self.locked: dict[tuple[str, str], dict[str, Any]] = {}

    def record(
        self, mapping: CompiledMapping, row: Row[Any], image: dict[str, Any]
    ) -> None:
        """Record the cross-references in one row of :func:`_join_xrefs`."""
        columns = row._mapping
        own_key = encode_key(_row_key(mapping, row))
        v2_key = columns["_dw_own"]
        self._note(mapping.name, own_key, v2_key)
        if v2_key is not None and _locks_target(mapping):
            self._lock(mapping, v2_key, columns)
        for index, item in enumerate(_ref_fields(mapping)):
            value = image.get(item.sources[0])
            if value is not None:
                assert item.ref_mapping is not None
                self._note(
                    item.ref_mapping,
                    encode_key((value,)),
                    columns[f"_dw_ref{index}"],
                )

    def record_locked(self, mapping: CompiledMapping, row: Row[Any]) -> None:
        """Record one row of :func:`_xref_lock_statement`."""
        columns = row._mapping
        self._note(mapping.name, row.v1_pk, row.v2_pk)
        self._lock(mapping, row.v2_pk, columns)

    def _lock(
        self, mapping: CompiledMapping, v2_key: str, columns: Any
    ) -> None:
        current = {
            column.key: columns[f"_dw_target{index}"]
            for index, column in enumerate(mapping.target_table.columns)
        }
        if current[mapping.target_pk_columns[0].key] is not None:
            self.locked[(mapping.name, v2_key)] = current

    def _note(self, mapping: str, v1_key: str, v2_key: str | None) -> None:
        self.looked_up.add((mapping, v1_key))
        if v2_key is not None:
            self.found.setdefault(mapping, {})[v1_key] = v2_key


def _lock_updated_rows(
    target: Connection,
    plans: list[_Plan],
    skip: set[tuple[str, str]],
    prefetched: _Prefetched,
) -> None:
    """Read the cross-references of rows that may be updated, and lock
    their target rows, in one SELECT per mapping.

    For a target in another database than the source: rows in ``skip``
    and rows whose source row is gone are left to the usual lookups.
    """
    needed: dict[str, tuple[CompiledMapping, list[str]]] = {}
    for plan in plans:
        mapping = plan.mapping
        if (
            plan.image is None
            or (mapping.name, plan.v1_key) in skip
            or not _locks_target(mapping)
        ):
            continue
        needed.setdefault(mapping.name, (mapping, []))[1].append(plan.v1_key)
    for mapping, keys in needed.values():
        statement = _xref_lock_statement(mapping)
        for part in _store.chunks(keys):
            rows = target.execute(statement, {"keys": list(part)})
            for row in rows:
                prefetched.record_locked(mapping, row)
            for key in part:
                prefetched.looked_up.add((mapping.name, key))


_xref_lock_statements: weakref.WeakKeyDictionary[
    CompiledMapping, Select[Any]
] = weakref.WeakKeyDictionary()


def _xref_lock_statement(mapping: CompiledMapping) -> Select[Any]:
    """Return the SELECT of cross-references by source key text, given as
    one array, with their target rows locked, built once."""
    found = _xref_lock_statements.get(mapping)
    if found is not None:
        return found
    xref = _store.xref_table
    target = mapping.target_table
    key_column = mapping.target_pk_columns[0]
    keys = bindparam("keys", type_=ARRAY(Text()))
    current = (
        select(target)
        .where(key_column == cast(xref.c.v2_pk, key_column.type))
        .with_for_update()
        .lateral("dw_target")
    )
    found = (
        select(
            xref.c.v1_pk,
            xref.c.v2_pk,
            *(
                current.c[column.key].label(f"_dw_target{index}")
                for index, column in enumerate(target.columns)
            ),
        )
        .select_from(xref.outerjoin(current, true()))
        .where(
            xref.c.mapping == literal(mapping.name),
            xref.c.v1_pk == any_(keys),
        )
    )
    _xref_lock_statements[mapping] = found
    return found


def _complete(plan: _Plan) -> bool:
    values = plan.change.values
    assert values is not None
    return all(attr in values for attr in plan.mapping.source_attrs)


def _row_key(mapping: CompiledMapping, row: Row[Any]) -> tuple[Any, ...]:
    return tuple(row[index] for index in range(len(mapping.source_pk_attrs)))


def _row_image(mapping: CompiledMapping, row: Row[Any]) -> dict[str, Any]:
    mapped = row._mapping
    return {attr: mapped[attr] for attr in mapping.source_attrs}


def _load_cross_references(
    target: Connection,
    plans: list[_Plan],
    mappings: dict[str, CompiledMapping],
    new_rows: frozenset[tuple[str, str]] = frozenset(),
) -> dict[str, dict[str, str]]:
    """Load the cross-reference of every row and every ref target.

    Rows in ``new_rows`` (mapping name, source key text) are known to have
    none, so they are not looked up.
    """
    needed: dict[str, set[str]] = {}
    for plan in plans:
        needed.setdefault(plan.mapping.name, set()).add(plan.v1_key)
        if plan.image is not None:
            for ref_mapping, value in iter_source_refs(
                plan.mapping, plan.image
            ):
                needed.setdefault(ref_mapping, set()).add(encode_key((value,)))
    cache: dict[str, dict[str, str]] = {}
    for name, keys in needed.items():
        if new_rows:
            keys = {key for key in keys if (name, key) not in new_rows}
        cache[name] = (
            _store.load_xref(target, name, sorted(keys)) if keys else {}
        )
    for name in mappings:
        cache.setdefault(name, {})
    return cache


def _decide_operation(plan: _Plan, cache: dict[str, dict[str, str]]) -> None:
    """Choose what to write from the source row and the cross-reference."""
    plan.v2_key = cache[plan.mapping.name].get(plan.v1_key)
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


def _runs(plans: list[_Plan]) -> Iterable[_Run]:
    pending = [plan for plan in plans if plan.outcome is None]
    for (_, operation), group in groupby(
        pending, key=lambda plan: (plan.mapping.name, plan.operation)
    ):
        items = list(group)
        run = _Run(items[0].mapping, operation)
        run.plans = items
        yield run


def _execute_run(
    target: Connection,
    run: _Run,
    cache: dict[str, dict[str, str]],
    mappings: dict[str, CompiledMapping],
) -> None:
    ready = [plan for plan in run.plans if _prepare(plan, cache, mappings)]
    if not ready:
        return
    known_keys = [plan.v2_key for plan in ready]
    try:
        with target.begin_nested():
            _write(target, run.mapping, run.operation, ready, cache)
        return
    except SQLAlchemyError as exc:
        if len(ready) == 1:
            ready[0].v2_key = known_keys[0]
            _fail(ready[0], exc, f"{run.operation} failed")
            return
    for plan, v2_key in zip(ready, known_keys, strict=True):
        plan.outcome = None
        plan.v2_key = v2_key
        try:
            with target.begin_nested():
                _write(target, run.mapping, run.operation, [plan], cache)
        except SQLAlchemyError as exc:
            _fail(plan, exc, f"{run.operation} failed")


def _prepare(
    plan: _Plan,
    cache: dict[str, dict[str, str]],
    mappings: dict[str, CompiledMapping],
) -> bool:
    """Compute the target values of a plan; record a failure if that fails."""
    if plan.operation == DELETE:
        return True
    assert plan.image is not None

    def resolve_ref(mapping_name: str, value: Any) -> Any:
        referenced = mappings[mapping_name]
        v1_key = encode_key((value,))
        v2_key = cache[mapping_name].get(v1_key)
        if v2_key is None:
            raise SyncError(
                f"ref to {mapping_name!r} key {v1_key}: no cross-reference "
                "(the referenced row was never synced, or its sync "
                "failed); sync that row first, then replay this change",
                mapping=plan.mapping.name,
                operation=plan.operation,
                v1_pk=plan.v1_key,
            )
        return decode_key(v2_key, referenced.target_pk_types)[0]

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


def _write(
    target: Connection,
    mapping: CompiledMapping,
    operation: str,
    plans: list[_Plan],
    cache: dict[str, dict[str, str]],
    xref_rows: list[dict[str, Any]] | None = None,
    locked: dict[tuple[str, str], dict[str, Any]] | None = None,
) -> None:
    """Write one run; with ``xref_rows``, as :func:`sync_changes_fast` does.

    ``locked`` holds target rows already read and locked, by mapping name
    and target key text.
    """
    if operation == INSERT:
        _insert(target, mapping, plans, cache, xref_rows)
    elif operation == UPDATE:
        _update(target, mapping, plans, locked)
    else:
        _delete(target, mapping, plans, cache)


def _pk_criterion(
    mapping: CompiledMapping, keys: list[tuple[Any, ...]]
) -> Any:
    columns = mapping.target_pk_columns
    if len(columns) == 1:
        return columns[0].in_([key[0] for key in keys])
    return tuple_(*columns).in_(keys)


def _row_dict(row: Row[Any]) -> dict[str, Any]:
    return dict(row._mapping)


def _image(row: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if row is None else {k: to_json(v) for k, v in row.items()}


def _insert(
    target: Connection,
    mapping: CompiledMapping,
    plans: list[_Plan],
    cache: dict[str, dict[str, str]],
    xref_rows: list[dict[str, Any]] | None = None,
) -> None:
    """Insert the target rows of ``plans`` and their cross-references.

    With ``xref_rows`` the cross-reference rows are appended to it for the
    caller to write, instead of being inserted here, and rows that
    :func:`_insert_json` can send go out as one JSON parameter.
    """
    rows = [plan.values for plan in plans]
    inserted = None
    if xref_rows is not None and len(rows) > 1:
        inserted = _insert_json(target, mapping, rows)
    if inserted is None:
        inserted = _insert_rows(target, mapping, rows)

    new_xrefs = []
    for plan, row in zip(plans, inserted, strict=True):
        v2_key = encode_key(mapping.target_key(row))
        plan.v2_key = v2_key
        new_xrefs.append(
            {"mapping": mapping.name, "v1_pk": plan.v1_key, "v2_pk": v2_key}
        )
        plan.outcome = _applied(plan, None, row)
    if xref_rows is None:
        _store.insert_xref(target, new_xrefs)
    else:
        xref_rows.extend(new_xrefs)
    for plan in plans:
        assert plan.v2_key is not None
        cache[mapping.name][plan.v1_key] = plan.v2_key


def _insert_rows(
    target: Connection, mapping: CompiledMapping, rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Insert ``rows`` into the target; return them as inserted, in order."""
    table = mapping.target_table
    dialect = target.dialect
    inserted: list[dict[str, Any]]
    # NOTE: SQLite has no implicit insert sentinel, so SQLAlchemy sends one
    # INSERT per row when RETURNING must follow the parameter order. On an
    # embedded database these are function calls, not network round trips.
    if len(rows) > 1 and getattr(
        dialect, "insert_executemany_returning_sort_by_parameter_order", False
    ):
        statement = _statements(mapping).insert_many
        inserted = [_row_dict(row) for row in target.execute(statement, rows)]
    elif dialect.insert_returning:
        statement = _statements(mapping).insert_one
        inserted = [
            _row_dict(target.execute(statement, values).one())
            for values in rows
        ]
    else:
        inserted = []
        for values in rows:
            result = target.execute(insert(table), values)
            key = tuple(result.inserted_primary_key or ())
            fetched = target.execute(
                select(table).where(_pk_criterion(mapping, [key]))
            ).one()
            inserted.append(_row_dict(fetched))
    return inserted


# Column types whose values PostgreSQL reads from JSON exactly as the
# driver would bind them, with the exact Python types that may fill them.
_JSON_SAFE_TYPES: tuple[tuple[type, frozenset[type]], ...] = (
    (sqltypes.String, frozenset({str})),
    (sqltypes.Integer, frozenset({int})),
    (sqltypes.Boolean, frozenset({bool})),
    (sqltypes.Numeric, frozenset({int, float, Decimal})),
    (sqltypes.Float, frozenset({int, float})),
    (sqltypes.DateTime, frozenset({dt.datetime})),
    (sqltypes.Date, frozenset({dt.date})),
    (sqltypes.Uuid, frozenset({uuid.UUID, str})),
)
_json_inserts: weakref.WeakKeyDictionary[
    CompiledMapping, dict[tuple[str, ...], Any]
] = weakref.WeakKeyDictionary()


def _insert_json(
    target: Connection, mapping: CompiledMapping, rows: list[dict[str, Any]]
) -> list[dict[str, Any]] | None:
    """Insert ``rows`` with one JSON parameter; return them as inserted.

    A statement with a parameter per value (SQLAlchemy's insertmanyvalues)
    is parsed by the driver anew on each call once it has more than a few
    dozen parameters, which costs as much as the insert. Here the rows go
    out as one JSON array, read by jsonb_to_recordset() in position order,
    and come back sorted by the target's integer key, which the sequence
    draws in that order (the same rule insertmanyvalues relies on).
    Returns None, having sent nothing, when the target key is not such a
    server-generated integer or a value is not known to read back from
    JSON as it would bind.
    """
    keys = tuple(rows[0])
    statement = _json_insert_statement(mapping, keys)
    if statement is None:
        return None
    table = mapping.target_table
    accepted = [_json_types(table.c[key]) for key in keys]
    documents = []
    for position, values in enumerate(rows):
        if tuple(values) != keys:
            return None
        document: dict[str, Any] = {"dw_position": position}
        for (key, value), (types, naive_only) in zip(
            values.items(), accepted, strict=True
        ):
            if value is not None:
                if type(value) not in types:
                    return None
                if naive_only and value.tzinfo is not None:
                    return None
            document[key] = to_json(value)
        documents.append(document)
    result = target.execute(statement, {"rows": json.dumps(documents)})
    pk = mapping.target_pk_columns[0].key
    inserted = sorted((_row_dict(row) for row in result), key=lambda r: r[pk])
    if len(inserted) != len(rows):
        raise _UnexpectedRowCount(
            f"{len(inserted)} rows came back from inserting {len(rows)} "
            f"into {table.name}; check the triggers of that table"
        )
    return inserted


class _UnexpectedRowCount(SQLAlchemyError):
    pass


def _json_types(column: Column[Any]) -> tuple[frozenset[type], bool]:
    """Return the value types that ``column`` reads from JSON as bound,
    and whether datetimes must be naive for it."""
    column_type = column.type
    if isinstance(column_type, TypeDecorator):
        return frozenset(), False
    for sql_type, python_types in _JSON_SAFE_TYPES:
        if isinstance(column_type, sql_type):
            # timestamp without time zone ignores an offset in text.
            naive_only = isinstance(column_type, sqltypes.DateTime) and not (
                column_type.timezone
            )
            return python_types, naive_only
    return frozenset(), False


def _ascending_identity(column: Column[Any]) -> bool:
    """Return whether the key values the database draws for ``column``
    grow, as a SERIAL column's or a default IDENTITY's do."""
    # NOTE: a sequence altered in the database to count down is not seen
    # here; its rows would be matched to the wrong changes.
    identity = column.identity
    return (
        identity is None
        or identity.increment is None
        or (identity.increment > 0)
    )


def _json_insert_statement(
    mapping: CompiledMapping, keys: tuple[str, ...]
) -> Any:
    """Return the JSON insert of ``keys`` into the target, or None if the
    target's key or defaults rule it out."""
    statements = _json_inserts.setdefault(mapping, {})
    if keys in statements:
        return statements[keys]
    table = mapping.target_table
    pk_columns = mapping.target_pk_columns
    usable = (
        len(pk_columns) == 1
        and pk_columns[0] is table.autoincrement_column
        and isinstance(pk_columns[0].type, sqltypes.Integer)
        and pk_columns[0].default is None
        and _ascending_identity(pk_columns[0])
        and pk_columns[0].key not in keys
        and all(
            column.key in keys or column.default is None
            for column in table.columns
        )
    )
    statement = None
    if usable:
        source = (
            func.jsonb_to_recordset(bindparam("rows", type_=Text).cast(JSONB))
            .table_valued(
                *(column(key, table.c[key].type) for key in keys),
                column("dw_position", Integer()),
            )
            .render_derived(name="dw_rows", with_types=True)
        )
        statement = (
            insert(table)
            .from_select(
                [table.c[key] for key in keys],
                select(*(source.c[key] for key in keys)).order_by(
                    source.c.dw_position
                ),
            )
            .returning(*table.c)
        )
    statements[keys] = statement
    return statement


def _lock_rows(
    target: Connection, mapping: CompiledMapping, plans: list[_Plan]
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Read and lock the current target rows of ``plans``, by key."""
    table = mapping.target_table
    keys = []
    for plan in plans:
        assert plan.v2_key is not None
        keys.append(decode_key(plan.v2_key, mapping.target_pk_types))
    if len(mapping.target_pk_columns) == 1:
        result = target.execute(
            _statements(mapping).lock, {"keys": [key[0] for key in keys]}
        )
    else:
        result = target.execute(
            select(table).where(_pk_criterion(mapping, keys)).with_for_update()
        )
    rows = [_row_dict(row) for row in result]
    return {mapping.target_key(row): row for row in rows}


def _update(
    target: Connection,
    mapping: CompiledMapping,
    plans: list[_Plan],
    locked: dict[tuple[str, str], dict[str, Any]] | None = None,
) -> None:
    if locked is not None and all(
        (mapping.name, plan.v2_key) in locked for plan in plans
    ):
        before_rows = {}
        for plan in plans:
            assert plan.v2_key is not None
            row = locked[(mapping.name, plan.v2_key)]
            before_rows[mapping.target_key(row)] = row
    else:
        before_rows = _lock_rows(target, mapping, plans)
    changed: list[tuple[_Plan, dict[str, Any], tuple[Any, ...]]] = []
    for plan in plans:
        assert plan.v2_key is not None
        key = decode_key(plan.v2_key, mapping.target_pk_types)
        before = before_rows.get(key)
        if before is None:
            raise _MissingTargetRow(mapping, plan)
        diff = {
            column: value
            for column, value in plan.values.items()
            if before.get(column) != value
        }
        if not diff:
            plan.outcome = _applied(plan, before, before)
            continue
        changed.append((plan, before, key))
    if not changed:
        return

    params = []
    for plan, _, key in changed:
        row = dict(plan.values)
        for index, value in enumerate(key):
            row[_PK_PARAM.format(index)] = value
        params.append(row)
    statements = _statements(mapping)
    if len(changed) == 1 and target.dialect.update_returning:
        plan, before, _ = changed[0]
        result = target.execute(statements.update_one, params[0])
        plan.outcome = _applied(plan, before, _row_dict(result.one()))
        return

    target.execute(statements.update, params)
    after_rows = _lock_rows(target, mapping, [plan for plan, _, _ in changed])
    for plan, before, key in changed:
        plan.outcome = _applied(plan, before, after_rows.get(key))


@dataclass(frozen=True)
class _TargetStatements:
    """Statements on the target table of one mapping, built once.

    The updates take the column values and the key, as ``_dw_pk0`` and
    so on, from their parameters.
    """

    insert_one: Any
    insert_many: Any
    lock: Any  # for a single-column key only
    update: Any
    update_one: Any


_target_statements: weakref.WeakKeyDictionary[
    CompiledMapping, _TargetStatements
] = weakref.WeakKeyDictionary()


def _statements(mapping: CompiledMapping) -> _TargetStatements:
    """Return the statements of ``mapping``, building them on first use.

    Building a statement and its cache key costs about as much as running
    a small one, so they are built once per mapping.
    """
    found = _target_statements.get(mapping)
    if found is not None:
        return found
    table = mapping.target_table
    pk_columns = mapping.target_pk_columns
    by_key = update(table).where(
        *(
            column == bindparam(_PK_PARAM.format(index))
            for index, column in enumerate(pk_columns)
        )
    )
    found = _TargetStatements(
        insert_one=insert(table).returning(*table.c),
        insert_many=insert(table).returning(
            *table.c, sort_by_parameter_order=True
        ),
        lock=select(table)
        .where(pk_columns[0].in_(bindparam("keys", expanding=True)))
        .with_for_update(),
        update=by_key,
        update_one=by_key.returning(*table.c),
    )
    _target_statements[mapping] = found
    return found


class _MissingTargetRow(SQLAlchemyError):
    def __init__(self, mapping: CompiledMapping, plan: _Plan) -> None:
        super().__init__(
            f"target row {mapping.target_table.name} key {plan.v2_key} "
            f"(cross-referenced from {mapping.source_table_name} key "
            f"{plan.v1_key}) no longer exists; delete the stale "
            "cross-reference row, then replay this change"
        )


def _delete(
    target: Connection,
    mapping: CompiledMapping,
    plans: list[_Plan],
    cache: dict[str, dict[str, str]],
) -> None:
    table = mapping.target_table
    before_rows = _lock_rows(target, mapping, plans)
    keys = [
        decode_key(plan.v2_key, mapping.target_pk_types)
        for plan in plans
        if plan.v2_key is not None
    ]
    on_delete = mapping.on_delete
    if on_delete == "ignore":
        for plan, key in zip(plans, keys, strict=True):
            row = before_rows.get(key)
            plan.outcome = _applied(plan, row, row)
        return
    if isinstance(on_delete, dict):
        target.execute(
            update(table).where(_pk_criterion(mapping, keys)).values(on_delete)
        )
        after_rows = _lock_rows(target, mapping, plans)
        for plan, key in zip(plans, keys, strict=True):
            plan.outcome = _applied(
                plan, before_rows.get(key), after_rows.get(key)
            )
        return
    target.execute(delete(table).where(_pk_criterion(mapping, keys)))
    _store.delete_xref(target, mapping.name, [plan.v1_key for plan in plans])
    for plan, key in zip(plans, keys, strict=True):
        plan.outcome = _applied(plan, before_rows.get(key), None)
        cache[mapping.name].pop(plan.v1_key, None)


def _changes_json(plan: _Plan) -> dict[str, Any] | None:
    image = plan.image
    if image is None:
        return None
    if plan.change.operation == INSERT:
        names: Iterable[str] = plan.mapping.source_attrs
    else:
        names = [
            attr
            for attr in plan.mapping.source_attrs
            if attr in plan.change.changed
        ]
    return {attr: to_json(image[attr]) for attr in names}


def _applied(
    plan: _Plan,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
) -> Outcome:
    return Outcome(
        plan.change,
        plan.operation,
        "applied",
        plan.v1_key,
        plan.v2_key,
        changes=_changes_json(plan),
        before=_image(before),
        after=_image(after),
    )


def _fail(plan: _Plan, exc: BaseException, context: str | None) -> None:
    message = str(exc) if isinstance(exc, SyncError) else _db_error(exc)
    if context:
        message = f"{context}: {message}"
    operation = (
        plan.operation if plan.operation != NOOP else plan.change.operation
    )
    plan.outcome = Outcome(
        plan.change,
        operation,
        "failed",
        plan.v1_key,
        plan.v2_key,
        changes=_changes_json(plan),
        error=message,
        exception=exc,
    )


def _db_error(exc: BaseException) -> str:
    """Return the first line of a database error, without SQL and params."""
    original = getattr(exc, "orig", None)
    if original is None:
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__
    text = str(original).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(original).__name__}: {first}"


def _fail_timed_out(plans: list[_Plan]) -> None:
    for plan in plans:
        exc = SyncTimeout(
            "the time budget for the target (v2_timeout) ran out before "
            "this change was applied; replay it",
            mapping=plan.mapping.name,
            operation=plan.operation,
            v1_pk=plan.v1_key,
        )
        _fail(plan, exc, None)


def _write_audit(
    target: Connection, outcomes: list[Outcome], session_key: str | None
) -> None:
    rows = _audit_rows(outcomes, session_key)
    ids = _store.insert_audit(target, rows)
    for outcome, audit_id in zip(outcomes, ids, strict=True):
        outcome.audit_id = audit_id


def _audit_rows(
    outcomes: list[Outcome], session_key: str | None
) -> list[dict[str, Any]]:
    return [
        {
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
            "reverted_by": None,
        }
        for outcome in outcomes
    ]


def sync_changes_fast(
    changes: Sequence[Change],
    *,
    source: Connection,
    target: Connection,
    mappings: dict[str, CompiledMapping],
    session_key: str | None,
    deadline: float | None = None,
    fresh_inserts: bool = False,
    set_timeouts: bool = False,
) -> list[Outcome]:
    """Apply ``changes`` like :func:`sync_changes`, in fewer statements.

    For PostgreSQL targets. No savepoint is taken, and the audit rows and
    cross-references go out in one final statement. A database error
    anywhere is therefore raised and leaves the target transaction
    unusable. The caller must then roll back to where it stood before the
    call and call :func:`sync_changes`, which fails each bad change alone.
    Changes that fail without a database error (a value missing from a
    value map, a missing ref, the time budget) fail here as they do there.

    ``fresh_inserts`` skips the cross-reference lookup of changes captured
    as inserts: the source transaction inserted those rows, so they have
    no cross-reference unless a concurrent sync or an out-of-band delete
    left one. Such a row makes the final statement fail on the
    cross-reference key, and the caller's fallback then finds it and
    updates the target row. ``set_timeouts`` bounds the statement and
    lock waits of the target statements by ``deadline``, transaction-
    locally, and sets the previous values back in the last statement.
    """
    plans = [
        _Plan(change, mappings[change.mapping], encode_key(change.v1_pk))
        for change in changes
    ]
    timeouts = None
    if set_timeouts:
        assert deadline is not None, "set_timeouts needs a deadline"
        timeouts = _Timeouts(deadline)
    prefetched = _Prefetched()
    if source is target:
        _read_images(source, plans, timeouts, prefetched)
    else:
        _read_images(source, plans)
    if timeouts is not None and timeouts.saved is None:
        timeouts.set(target)
    for plan in plans:
        if plan.outcome is not None and plan.outcome.exception is not None:
            raise plan.outcome.exception
    known = {
        (plan.mapping.name, plan.v1_key)
        for plan in plans
        if fresh_inserts and plan.change.operation == INSERT
    }
    if source is not target:
        _lock_updated_rows(target, plans, known, prefetched)
    known |= prefetched.looked_up
    cache = _load_cross_references(target, plans, mappings, frozenset(known))
    for name, found in prefetched.found.items():
        cache.setdefault(name, {}).update(found)
    for plan in plans:
        _decide_operation(plan, cache)

    xref_rows: list[dict[str, Any]] = []
    for run in _runs(plans):
        if deadline is not None and time.monotonic() > deadline:
            _fail_timed_out(run.plans)
            continue
        ready = [plan for plan in run.plans if _prepare(plan, cache, mappings)]
        if ready:
            _write(
                target,
                run.mapping,
                run.operation,
                ready,
                cache,
                xref_rows,
                prefetched.locked,
            )

    final = [plan.outcome for plan in plans if plan.outcome is not None]
    assert len(final) == len(plans)
    ids = _store.insert_audit_and_xref(
        target,
        _audit_rows(final, session_key),
        xref_rows,
        None if timeouts is None else timeouts.saved,
    )
    for outcome, audit_id in zip(final, ids, strict=True):
        outcome.audit_id = audit_id
    return final
