"""Sync on PostgreSQL with psycopg 3 in one or two network round trips.

The general sync (:func:`sa_dualwrite._sync.sync_changes`) sends one
statement at a time and waits for each result. With psycopg 3 this module
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

import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection

from sa_dualwrite import _locks, _store
from sa_dualwrite._buffer import DELETE, INSERT, UPDATE, Change
from sa_dualwrite._codec import encode_key
from sa_dualwrite._pipeline._shapes import _Batch, _Shape, _shape, eligible
from sa_dualwrite._pipeline._writes import _write_statements
from sa_dualwrite._sync import (
    NOOP,
    Outcome,
    _changes_json,
    _fail_timed_out,
    _Plan,
)
from sa_dualwrite.mapping._compile import CompiledMapping

__all__ = [
    "PipelineUnavailable",
    "eligible",
    "run_statements",
    "sync_after_commit",
    "sync_in_transaction",
    "usable",
]

SAVEPOINT = "sa_dualwrite_sync"

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
    without a read. If a concurrent sync already inserted one, the
    cross-reference key stops the commit, and the caller's fallback
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
    needed = set()
    for plan in batch.plans:
        if plan.image is None or plan.change.operation != INSERT:
            continue
        for item in plan.mapping.fields:
            if item.ref_mapping is None:
                continue
            value = plan.image.get(item.sources[0])
            if value is not None:
                needed.add((item.ref_mapping, encode_key((value,))))
    return needed


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
