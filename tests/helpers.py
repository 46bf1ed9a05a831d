"""Small helpers that read the target side in tests."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, func, select

import sa_dualwrite as dw
from sa_dualwrite._store import audit_table, xref_table
from tests import models


def audit_rows(engine: Engine, **where: Any) -> list[Any]:
    statement = select(audit_table).order_by(audit_table.c.id)
    for column, value in where.items():
        statement = statement.where(audit_table.c[column] == value)
    with engine.connect() as connection:
        return list(connection.execute(statement))


def count(engine: Engine, table: Any) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                select(func.count()).select_from(table)
            ).scalar_one()
        )


def alerts(engine: Engine) -> list[Any]:
    table = models.Alert.__table__
    with engine.connect() as connection:
        return list(connection.execute(select(table).order_by(table.c.id)))


def events(engine: Engine) -> list[Any]:
    table = models.AlertEvent.__table__
    with engine.connect() as connection:
        return list(connection.execute(select(table).order_by(table.c.id)))


def xrefs(engine: Engine, mapping: str) -> dict[str, str]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(xref_table.c.v1_pk, xref_table.c.v2_pk).where(
                xref_table.c.mapping == mapping
            )
        )
        return {row.v1_pk: row.v2_pk for row in rows}


def alert_for(handle: dw.DualWrite, v1_id: int) -> Any:
    v2_id = handle.v2_id("alertas", v1_id)
    assert v2_id is not None, f"alerta {v1_id} has no cross-reference"
    table = models.Alert.__table__
    with handle.target.connect() as connection:
        return connection.execute(
            select(table).where(table.c.id == v2_id)
        ).one()
