"""Checks that V2 equals V1 after a run, through the cross-reference.

Every V1 row must have exactly one cross-reference and a V2 row whose
values are the mapped V1 values. V2 must have no other rows. Every change
must have one ``applied`` audit row, and no audit row may have failed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, func, select

from examples.contract_alerts.mappings import (
    ALERT_STATES,
    EVENT_KINDS,
    due_date,
)
from examples.contract_alerts.models_v1 import AcaoAdministrativa, Alerta
from examples.contract_alerts.models_v2 import Alert, AlertEvent
from sa_dualwrite._store import audit_table, xref_table

__all__ = ["Mismatch", "caught_up", "verify"]

Expected = Callable[[Any, dict[str, dict[str, str]]], dict[str, Any]]


class Mismatch(Exception):
    """Raised when V2 does not match V1 after a run."""


def _alert_values(
    row: Any, xrefs: dict[str, dict[str, str]]
) -> dict[str, Any]:
    return {
        "contract_ref": row.contrato_id,
        "title": row.titulo,
        "description": row.descricao,
        "due_date": due_date(row.criado_em, row.prazo),
        "owner_login": row.responsavel,
        "state": ALERT_STATES[row.status],
        "created_at": row.criado_em,
        "updated_at": row.atualizado_em,
    }


def _event_values(
    row: Any, xrefs: dict[str, dict[str, str]]
) -> dict[str, Any]:
    alert_key = xrefs["alertas"].get(str(row.alerta_id))
    return {
        "alert_id": None if alert_key is None else int(alert_key),
        "kind": EVENT_KINDS[row.tipo],
        "actor_login": row.usuario,
        "note": row.observacao,
        "occurred_at": row.registrado_em,
    }


PAIRS: list[tuple[str, Any, Any, Expected]] = [
    ("alertas", Alerta, Alert, _alert_values),
    ("acoes_administrativas", AcaoAdministrativa, AlertEvent, _event_values),
]


def audit_count(target: Engine) -> int:
    """Return the number of audit rows in the target."""
    with target.connect() as connection:
        return int(
            connection.execute(
                select(func.count()).select_from(audit_table)
            ).scalar_one()
        )


def caught_up(target: Engine, changes: int) -> bool:
    """Return whether the target has an audit row for every change."""
    return audit_count(target) >= changes


def verify(source: Engine, target: Engine, changes: int) -> None:
    """Raise :class:`Mismatch` unless V2 mirrors V1 after ``changes``."""
    with target.connect() as connection:
        xrefs: dict[str, dict[str, str]] = {}
        for mapping, *_ in PAIRS:
            rows = connection.execute(
                select(xref_table.c.v1_pk, xref_table.c.v2_pk).where(
                    xref_table.c.mapping == mapping
                )
            )
            xrefs[mapping] = {row.v1_pk: row.v2_pk for row in rows}
        targets = {
            mapping: {
                str(row.id): row
                for row in connection.execute(select(target_cls.__table__))
            }
            for mapping, _, target_cls, _ in PAIRS
        }
        statuses: dict[str, int] = dict(
            connection.execute(
                select(audit_table.c.status, func.count()).group_by(
                    audit_table.c.status
                )
            ).all()
        )
    with source.connect() as connection:
        sources = {
            mapping: list(connection.execute(select(source_cls.__table__)))
            for mapping, source_cls, _, _ in PAIRS
        }

    problems: list[str] = []
    for mapping, _, _, expected in PAIRS:
        problems.extend(
            _compare(
                mapping, sources[mapping], targets[mapping], xrefs, expected
            )
        )
    applied = statuses.pop("applied", 0)
    if applied != changes:
        problems.append(f"{applied} applied audit rows for {changes} changes")
    if statuses:
        problems.append(f"audit rows with other statuses: {statuses}")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = len(problems) - 20
        suffix = f"\n  ... and {more} more" if more > 0 else ""
        raise Mismatch(f"V2 differs from V1:\n  {shown}{suffix}")


def _compare(
    mapping: str,
    source_rows: list[Any],
    target_rows: dict[str, Any],
    xrefs: dict[str, dict[str, str]],
    expected: Expected,
) -> list[str]:
    problems: list[str] = []
    keys = xrefs[mapping]
    if len(keys) != len(source_rows):
        problems.append(
            f"{mapping}: {len(source_rows)} V1 rows but {len(keys)} "
            "cross-references"
        )
    if len(target_rows) != len(source_rows):
        problems.append(
            f"{mapping}: {len(source_rows)} V1 rows but "
            f"{len(target_rows)} V2 rows"
        )
    for row in source_rows:
        v2_key = keys.get(str(row.id))
        target = None if v2_key is None else target_rows.get(v2_key)
        if target is None:
            problems.append(f"{mapping} {row.id}: no V2 row")
            continue
        for column, value in expected(row, xrefs).items():
            actual = getattr(target, column)
            if actual != value:
                problems.append(
                    f"{mapping} {row.id} -> {v2_key}: {column} is "
                    f"{actual!r}, expected {value!r}"
                )
    return problems
