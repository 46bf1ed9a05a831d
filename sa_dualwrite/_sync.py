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

import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

from sqlalchemy import (
    Connection,
    Row,
    bindparam,
    delete,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.exc import SQLAlchemyError

from sa_dualwrite import _store
from sa_dualwrite._buffer import DELETE, INSERT, UPDATE, Change
from sa_dualwrite._codec import decode_key, encode_key, to_json
from sa_dualwrite._errors import SyncError
from sa_dualwrite.mapping._compile import (
    CompiledMapping,
    iter_source_refs,
)

__all__ = ["Outcome", "SyncTimeout", "sync_changes"]

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
        _execute_run(target, run, cache, mappings, deadline)

    outcomes = [plan.outcome for plan in plans]
    assert all(outcome is not None for outcome in outcomes)
    final = [outcome for outcome in outcomes if outcome is not None]
    _write_audit(target, final, session_key)
    return final


def _read_images(source: Connection, plans: list[_Plan]) -> None:
    """Attach the current source row (or None if gone) to each plan."""
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
        try:
            for part in _store.chunks(keys):
                params = [key[0] for key in part] if single else list(part)
                rows = source.execute(mapping.image_select, {"keys": params})
                for row in rows:
                    found[_row_key(mapping, row)] = _row_image(mapping, row)
        except SQLAlchemyError as exc:
            context = f"reading source table {mapping.source_table_name}"
            for plan in group:
                _fail(plan, exc, context)
            continue
        for plan in group:
            plan.image = found.get(plan.change.v1_pk)


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
) -> dict[str, dict[str, str]]:
    """Load the cross-reference of every row and every ref target."""
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
        cache[name] = _store.load_xref(target, name, sorted(keys))
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
    deadline: float | None,
) -> None:
    """Write one run under a savepoint; if it fails, each change alone.

    A run that failed because a wait ran out of the time budget is not
    retried change by change: each retry could wait as long again.
    """
    ready = [plan for plan in run.plans if _prepare(plan, cache, mappings)]
    if not ready:
        return
    known_keys = [plan.v2_key for plan in ready]
    try:
        with target.begin_nested():
            _write(target, run.mapping, run.operation, ready, cache)
        return
    except SQLAlchemyError as exc:
        if len(ready) == 1 or timed_out(exc):
            for plan, v2_key in zip(ready, known_keys, strict=True):
                plan.v2_key = v2_key
                _fail(plan, exc, f"{run.operation} failed")
            return
    for plan, v2_key in zip(ready, known_keys, strict=True):
        plan.outcome = None
        plan.v2_key = v2_key
        if deadline is not None and time.monotonic() > deadline:
            _fail_timed_out([plan])
            continue
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
) -> None:
    if operation == INSERT:
        _insert(target, mapping, plans, cache)
    elif operation == UPDATE:
        _update(target, mapping, plans)
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
) -> None:
    """Insert the target rows of ``plans`` and their cross-references."""
    inserted = _insert_rows(target, mapping, [plan.values for plan in plans])

    new_xrefs = []
    for plan, row in zip(plans, inserted, strict=True):
        v2_key = encode_key(mapping.target_key(row))
        plan.v2_key = v2_key
        new_xrefs.append(
            {"mapping": mapping.name, "v1_pk": plan.v1_key, "v2_pk": v2_key}
        )
        plan.outcome = _applied(plan, None, row)
    _store.insert_xref(target, new_xrefs)
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
) -> None:
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


def timed_out(exc: BaseException) -> bool:
    """Return whether PostgreSQL ended a wait: statement_timeout (57014)
    or lock_timeout (55P03)."""
    error = getattr(exc, "orig", None) or exc
    code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    return code in ("57014", "55P03")


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
