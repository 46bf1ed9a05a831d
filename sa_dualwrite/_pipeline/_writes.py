"""The write round trip of the pipelined sync.

Each run of changes to one mapping with one operation becomes one
statement: a data-modifying CTE that writes the target rows, the
cross-references and the audit rows together, from JSON parameters.
Changes that write no target row (nothing to change, or failed before the
write) get one statement for their audit rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine.interfaces import Dialect

from sa_dualwrite import _store
from sa_dualwrite._buffer import DELETE, INSERT, UPDATE
from sa_dualwrite._codec import decode_key, encode_key, to_json
from sa_dualwrite._errors import SyncError
from sa_dualwrite._pipeline._shapes import _Batch, _Shape
from sa_dualwrite._sync import Outcome, _changes_json, _fail, _Plan


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
