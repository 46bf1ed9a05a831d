"""A commit of many rows costs a few statements per table, not one per row."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, event
from sqlalchemy.orm import Session

import sa_dualwrite as dw
from tests import models
from tests.helpers import alerts, audit_rows, events


class _StatementCounter:
    def __init__(self) -> None:
        self.statements: list[str] = []

    def __call__(
        self, conn: Any, cursor: Any, statement: str, *args: Any
    ) -> None:
        self.statements.append(statement.split()[0].upper())


@pytest.mark.parametrize("separate", [False, True], ids=["same-db", "two-dbs"])
def test_hundred_rows_few_statements(
    pg_engine: Engine, pg_engine_v2: Engine, separate: bool
) -> None:
    """100 alerts and 100 actions sync with a bounded statement count."""
    target = pg_engine_v2 if separate else pg_engine
    models.V1.metadata.create_all(pg_engine)
    models.V2.metadata.create_all(target)
    handle = dw.install_dual_write(
        pg_engine,
        models.mappings(),
        target=target if separate else None,
        log_file=None,
    )
    handle.create_tables()
    counter = _StatementCounter()
    try:
        with Session(pg_engine) as session:
            parents = [models.new_alerta(titulo=f"a{n}") for n in range(100)]
            session.add_all(parents)
            session.flush()
            session.add_all(
                models.Acao(
                    alerta_id=parent.id, tipo="comentar", usuario="ana"
                )
                for parent in parents
            )
            session.flush()
            for engine in {pg_engine, target}:
                event.listen(engine, "before_cursor_execute", counter)
            session.commit()
    finally:
        for engine in {pg_engine, target}:
            if event.contains(engine, "before_cursor_execute", counter):
                event.remove(engine, "before_cursor_execute", counter)
        handle.uninstall()

    assert len(alerts(target)) == 100
    assert len(events(target)) == 100
    assert {row.status for row in audit_rows(target)} == {"applied"}
    assert len(counter.statements) <= 20, counter.statements
