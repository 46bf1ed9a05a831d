"""Replay of failed changes from the current source rows."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

import sa_dualwrite as dw
from tests import models
from tests.conftest import Databases
from tests.helpers import alert_for, audit_rows, events


def test_replay_after_fix(dbs: Databases, install: dw.DualWrite) -> None:
    """A failed change replays once its source row is fixed."""
    with Session(dbs.source) as session:
        alerta = models.new_alerta(titulo="REJECTED BY V2")
        session.add(alerta)
        session.commit()
        with dw.acting_as("fixer"):
            session.execute(
                text("UPDATE alertas SET titulo = 'fixed' WHERE id = :id"),
                {"id": alerta.id},
            )
        session.commit()
        alerta_id = alerta.id
    (failed,) = audit_rows(dbs.target_engine)

    new_ids = install.replay()

    replayed = audit_rows(dbs.target_engine, id=failed.id)[0]
    (retry,) = audit_rows(dbs.target_engine, id=new_ids[0])
    assert failed.status == "failed"
    assert replayed.status == "replayed"
    assert retry.status == "applied"
    assert retry.operation == "insert"
    assert retry.session_key == failed.session_key
    assert alert_for(install, alerta_id).title == "fixed"


def test_replay_still_failing(dbs: Databases, install: dw.DualWrite) -> None:
    """A replay that fails again writes a new failed row."""
    with Session(dbs.source) as session:
        session.add(models.new_alerta(status="pendente"))
        session.commit()

    (new_id,) = install.replay()

    statuses = [row.status for row in audit_rows(dbs.target_engine)]
    assert statuses == ["replayed", "failed"]
    assert audit_rows(dbs.target_engine, id=new_id)[0].status == "failed"


def test_replay_selected_ids(dbs: Databases, install: dw.DualWrite) -> None:
    """replay(ids) retries only the given failed rows."""
    with Session(dbs.source) as session:
        session.add(models.new_alerta(titulo="REJECTED BY V2"))
        session.add(models.new_alerta(titulo="REJECTED BY V2"))
        session.commit()
        session.execute(text("UPDATE alertas SET titulo = 'fixed'"))
        session.commit()
    _, second = audit_rows(dbs.target_engine)

    install.replay([second.id])

    statuses = [row.status for row in audit_rows(dbs.target_engine)]
    assert statuses == ["failed", "replayed", "applied"]


def test_replay_rejects_applied_row(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """Replaying a row that did not fail raises DualWriteError."""
    with Session(dbs.source) as session:
        session.add(models.new_alerta())
        session.commit()
    (applied,) = audit_rows(dbs.target_engine)

    with pytest.raises(dw.DualWriteError, match="only failed"):
        install.replay([applied.id])


def test_replay_resolves_refs_in_order(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """Replaying a failed parent then its child translates the ref."""
    with Session(dbs.source) as session:
        alerta = models.new_alerta(status="pendente")
        session.add(alerta)
        session.flush()
        session.add(
            models.Acao(alerta_id=alerta.id, tipo="encerrar", usuario="ana")
        )
        session.commit()
        alerta.status = "resolvido"
        session.commit()
        alerta_id = alerta.id

    install.replay()

    (event,) = events(dbs.target_engine)
    assert event.alert_id == install.v2_id("alertas", alerta_id)
    assert event.kind == "closed"
    assert alert_for(install, alerta_id).state == "resolved"


def test_replay_nothing_failed(install: dw.DualWrite) -> None:
    """replay() with nothing failed returns no ids."""
    assert install.replay() == []


def test_replay_skips_uninstalled_mapping(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """Failed rows of a mapping not installed are skipped, not fatal."""
    with Session(dbs.source) as session:
        session.add(models.new_alerta(status="pendente"))
        session.commit()
    with dbs.target_engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO dualwrite_audit (mapping, operation, v1_pk, "
                "status, created_at) VALUES ('gone', 'insert', '1', "
                "'failed', CURRENT_TIMESTAMP)"
            )
        )

    new_ids = install.replay()

    statuses = [row.status for row in audit_rows(dbs.target_engine)]
    assert len(new_ids) == 1
    assert statuses == ["replayed", "failed", "failed"]
    with pytest.raises(dw.DualWriteError, match="not installed"):
        install.replay([audit_rows(dbs.target_engine)[1].id])


def test_resync_repairs_invisible_writes(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """resync() syncs rows changed by raw SQL, then verify agrees."""
    with Session(dbs.source) as session:
        first = models.new_alerta(titulo="one")
        second = models.new_alerta(titulo="two")
        session.add_all([first, second])
        session.commit()
        keys = [first.id, second.id]
    with dbs.source.begin() as connection:
        connection.execute(text("UPDATE alertas SET titulo = 'raw'"))
        connection.execute(
            text("DELETE FROM alertas WHERE id = :id"), {"id": keys[1]}
        )
    assert not install.verify().agrees

    new_ids = install.resync("alertas", keys, session_key="repair-1")

    rows = audit_rows(dbs.target_engine, session_key="repair-1")
    assert install.verify().agrees
    assert len(new_ids) == 2
    assert [row.operation for row in rows] == ["update", "delete"]
    assert alert_for(install, keys[0]).title == "raw"
