"""Helpers that read the outbox in durable-mode tests."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Engine, insert, select, update

import sa_dualwrite as dw
from sa_dualwrite import _outbox
from sa_dualwrite._buffer import Change
from sa_dualwrite._store import outbox_table
from tests import models


def outbox_rows(engine: Engine, **where: Any) -> list[Any]:
    statement = select(outbox_table).order_by(outbox_table.c.id)
    for column, value in where.items():
        statement = statement.where(outbox_table.c[column] == value)
    with engine.connect() as connection:
        return list(connection.execute(statement))


def leave_pending(handle: dw.DualWrite, **values: Any) -> int:
    """Insert an alerta and its outbox row, as a process that died after
    the source commit and before the sync would have left them.
    """
    table = models.Alerta.__table__
    data = {
        "contrato_id": "123/2026",
        "titulo": "Alerta de renovação",
        "responsavel": "gestor.silva",
        "prazo": 30,
        "status": "ativo",
    }
    data.update(values)
    with handle.engine.begin() as connection:
        alerta_id = connection.execute(
            insert(table).values(data).returning(table.c.id)
        ).scalar_one()
        change = Change("alertas", "insert", (alerta_id,), frozenset(data))
        rows = _outbox.new_rows(
            [change], transaction_key=uuid.uuid4().hex, session_key="crashed"
        )
        _outbox.insert_rows(connection, rows)
    return int(alerta_id)


def leave_pending_update(
    handle: dw.DualWrite,
    alerta_id: int,
    titulo: str,
    session_key: str = "crashed",
) -> None:
    """Update an alerta and add its outbox row, as a process that died
    after the source commit and before the sync would have left them.
    """
    table = models.Alerta.__table__
    with handle.engine.begin() as connection:
        connection.execute(
            update(table).where(table.c.id == alerta_id).values(titulo=titulo)
        )
        change = Change(
            "alertas", "update", (alerta_id,), frozenset({"titulo"})
        )
        rows = _outbox.new_rows(
            [change], transaction_key=uuid.uuid4().hex, session_key=session_key
        )
        _outbox.insert_rows(connection, rows)
