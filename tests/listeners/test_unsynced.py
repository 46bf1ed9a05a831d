"""Writes that the ORM cannot see: detected, logged or raised."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import bindparam, delete, event, insert, text, update
from sqlalchemy.orm import Session

import sa_dualwrite as dw
from sa_dualwrite._errors import UnsyncedWriteError
from tests import models
from tests.conftest import Databases
from tests.helpers import alert_for, alerts, audit_rows
from tests.listeners.checks import differences

table = models.Alerta.__table__


def events(handle: dw.DualWrite, name: str) -> list[dict[str, Any]]:
    assert handle.log_file is not None
    lines = Path(handle.log_file).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    return [record for record in records if record["event"] == name]


def seed(engine: Any) -> int:
    with Session(engine) as session:
        alerta = models.new_alerta()
        session.add(alerta)
        session.commit()
        return alerta.id


def test_core_writes_logged(dbs: Databases, install: dw.DualWrite) -> None:
    """Core INSERT, UPDATE and DELETE outside a session are logged."""
    alerta_id = seed(dbs.source)

    with dbs.source.begin() as connection:
        connection.execute(
            insert(table).values(
                contrato_id="9/2026", titulo="Core", responsavel="ana"
            )
        )
        connection.execute(update(table).values(prazo=1))
        connection.execute(delete(table).where(table.c.id == alerta_id))

    logged = events(install, "unsynced_write")

    assert [event["operation"] for event in logged] == [
        "insert",
        "update",
        "delete",
    ]
    assert {event["table"] for event in logged} == {"alertas"}
    assert {event["level"] for event in logged} == {"warning"}
    assert logged[1]["rowcount"] == 2
    assert logged[2]["count"] == 1
    assert "no ORM session" in logged[0]["reason"]
    assert install.v2_id("alertas", alerta_id) is not None


def test_core_write_raises_before_running(
    dbs: Databases, strict: dw.DualWrite
) -> None:
    """In raise mode a Core write fails before it changes anything."""
    alerta_id = seed(dbs.source)

    with (
        dbs.source.begin() as connection,
        pytest.raises(UnsyncedWriteError) as caught,
    ):
        connection.execute(update(table).values(titulo="Nunca"))
    with Session(dbs.source) as session:
        alerta = session.get(models.Alerta, alerta_id)
        assert alerta is not None
        titulo = alerta.titulo

    assert caught.value.table == "alertas"
    assert caught.value.operation == "update"
    assert "was not executed" in str(caught.value)
    assert titulo == "Alerta de renovação"


def test_orm_statement_on_connection_detected(
    dbs: Databases, strict: dw.DualWrite
) -> None:
    """An ORM-enabled statement run on a bare connection is detected."""
    seed(dbs.source)

    with (
        dbs.source.begin() as connection,
        pytest.raises(UnsyncedWriteError),
    ):
        connection.execute(delete(models.Alerta))

    assert len(alerts(dbs.target_engine)) == 1


def test_orm_and_plugin_statements_pass(
    dbs: Databases, strict: dw.DualWrite
) -> None:
    """Flushes, syncs, replays and reverts never count as unsynced."""
    with Session(dbs.source) as session:
        alerta = models.new_alerta()
        session.add(alerta)
        session.flush()
        session.add(
            models.Acao(alerta_id=alerta.id, tipo="escalar", usuario="ana")
        )
        session.commit()
        alerta.titulo = "REJECTED BY V2"
        session.commit()
        alerta.titulo = "Corrigido"
        session.commit()
        alerta_id = alerta.id

    failed = audit_rows(dbs.target_engine, status="failed")
    replayed = strict.replay()
    corrected = audit_rows(
        dbs.target_engine, operation="update", status="applied"
    )[0]
    reverted = strict.revert(corrected.id)

    assert len(failed) == 1
    assert len(replayed) == 1
    assert len(reverted) == 1
    assert alert_for(strict, alerta_id).title == "Alerta de renovação"


def test_raw_sql_is_not_detected(dbs: Databases, strict: dw.DualWrite) -> None:
    """Raw SQL strings are invisible: neither synced nor reported."""
    alerta_id = seed(dbs.source)

    with dbs.source.begin() as connection:
        connection.execute(
            text("UPDATE alertas SET titulo = 'SQL puro' WHERE id = :id"),
            {"id": alerta_id},
        )

    assert alert_for(strict, alerta_id).title == "Alerta de renovação"
    assert len(differences(strict)) == 1


def test_unknown_setting_rejected(dbs: Databases, tmp_path: Path) -> None:
    """An unknown unsynced_writes value fails and installs nothing."""
    with pytest.raises(dw.DualWriteError) as caught:
        dw.install_dual_write(
            dbs.source,
            models.mappings(),
            log_file=None,
            unsynced_writes="ignore",  # type: ignore[arg-type]
        )
    handle = dw.install_dual_write(
        dbs.source, models.mappings(), log_file=None
    )
    handle.uninstall()

    assert "unsynced_writes must be one of log, raise" in str(caught.value)


def test_bulk_update_without_key_raises(
    dbs: Databases, strict: dw.DualWrite
) -> None:
    """Several parameter sets without a key in WHERE cannot be synced."""
    seed(dbs.source)

    with Session(dbs.source) as session:
        with pytest.raises(UnsyncedWriteError) as caught:
            session.execute(
                update(table)
                .where(table.c.responsavel == bindparam("quem"))
                .values(status="cancelado"),
                [{"quem": "gestor.silva"}, {"quem": "gestor.lima"}],
            )
        session.rollback()

    assert "does not select rows by primary key" in caught.value.reason
    assert "was not executed" in str(caught.value)


def test_flush_marker_exists(dbs: Databases, strict: dw.DualWrite) -> None:
    """The private flag that marks flush statements is set during a flush."""
    seen: list[bool] = []

    def record(mapper: Any, connection: Any, target: Any) -> None:
        seen.append(Session.object_session(target)._warn_on_events)  # type: ignore[union-attr]

    event.listen(models.Alerta, "before_insert", record)
    try:
        with Session(dbs.source) as session:
            session.add(models.new_alerta())
            idle = session._warn_on_events
            session.commit()
    finally:
        event.remove(models.Alerta, "before_insert", record)

    assert idle is False
    assert seen == [True]
