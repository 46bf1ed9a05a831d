"""Capture and sync of ORM inserts, updates and deletes, on every backend."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

import sa_dualwrite as dw
from tests import models
from tests.conftest import Databases
from tests.helpers import alert_for, alerts, audit_rows, events, xrefs


def test_insert_syncs_row(dbs: Databases, install: dw.DualWrite) -> None:
    """An inserted source row is written to the target with mapped values."""
    with Session(dbs.source) as session:
        alerta = models.new_alerta()
        session.add(alerta)
        session.commit()
        alerta_id = alerta.id
        criado_em = alerta.criado_em

    row = alert_for(install, alerta_id)
    (audit,) = audit_rows(dbs.target_engine)

    assert row.contract_ref == "123/2026"
    assert row.title == "Alerta de renovação"
    assert row.owner_login == "gestor.silva"
    assert row.state == "active"
    assert row.origin == "v1"
    assert row.due_date == criado_em.date() + dt.timedelta(days=30)
    assert audit.operation == "insert"
    assert audit.status == "applied"
    assert audit.v1_pk == str(alerta_id)
    assert audit.v2_pk == str(row.id)
    assert audit.before is None
    assert audit.after["title"] == "Alerta de renovação"
    assert audit.changes["titulo"] == "Alerta de renovação"


def test_server_default_reaches_target(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """A value computed by the source database is synced."""
    with Session(dbs.source) as session:
        alerta = models.new_alerta()
        session.add(alerta)
        session.commit()
        criado_em = alerta.criado_em
        alerta_id = alerta.id

    row = alert_for(install, alerta_id)

    assert criado_em is not None
    assert row.created_at.replace(tzinfo=None) == criado_em.replace(
        tzinfo=None
    )


def test_update_syncs_changed_row(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """An update of a mapped attribute updates the target row."""
    with Session(dbs.source) as session:
        alerta = models.new_alerta()
        session.add(alerta)
        session.commit()
        alerta.status = "resolvido"
        alerta.prazo = 10
        session.commit()
        alerta_id = alerta.id

    row = alert_for(install, alerta_id)
    audits = audit_rows(dbs.target_engine)

    assert row.state == "resolved"
    assert [a.operation for a in audits] == ["insert", "update"]
    assert audits[1].changes == {"prazo": 10, "status": "resolvido"}
    assert audits[1].before["state"] == "active"
    assert audits[1].after["state"] == "resolved"


def test_unmapped_update_writes_nothing(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """An update that touches no mapped attribute writes nothing."""
    with Session(dbs.source) as session:
        alerta = models.new_alerta()
        session.add(alerta)
        session.commit()
        alerta.notas_internas = "only in V1"
        session.commit()
        alerta.titulo = alerta.titulo  # same value: no change
        session.commit()

    assert len(audit_rows(dbs.target_engine)) == 1


def test_delete_syncs(dbs: Databases, install: dw.DualWrite) -> None:
    """A deleted source row is deleted from the target with its xref."""
    with Session(dbs.source) as session:
        alerta = models.new_alerta()
        session.add(alerta)
        session.commit()
        session.delete(alerta)
        session.commit()

    audits = audit_rows(dbs.target_engine)

    assert alerts(dbs.target_engine) == []
    assert xrefs(dbs.target_engine, "alertas") == {}
    assert [a.operation for a in audits] == ["insert", "delete"]
    assert audits[1].after is None
    assert audits[1].before["title"] == "Alerta de renovação"


def test_rollback_syncs_nothing(dbs: Databases, install: dw.DualWrite) -> None:
    """A rolled-back transaction leaves the target untouched."""
    with Session(dbs.source) as session:
        session.add(models.new_alerta())
        session.flush()
        session.rollback()
        session.add(models.new_alerta(titulo="kept"))
        session.commit()

    rows = alerts(dbs.target_engine)

    assert [row.title for row in rows] == ["kept"]
    assert len(audit_rows(dbs.target_engine)) == 1


def test_savepoint_rollback_drops_its_changes(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """A rolled-back savepoint drops exactly the changes made inside it."""
    with Session(dbs.source) as session:
        session.add(models.new_alerta(titulo="outer"))
        session.flush()
        savepoint = session.begin_nested()
        session.add(models.new_alerta(titulo="inner, rolled back"))
        session.flush()
        savepoint.rollback()
        with session.begin_nested():
            session.add(models.new_alerta(titulo="inner, released"))
        session.commit()

    titles = [row.title for row in alerts(dbs.target_engine)]

    assert titles == ["outer", "inner, released"]


def test_nested_savepoints_merge(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """Savepoints inside savepoints keep or drop their own changes."""
    with Session(dbs.source) as session:
        alerta = models.new_alerta(titulo="a")
        session.add(alerta)
        session.flush()
        with session.begin_nested():
            alerta.titulo = "b"
            inner = session.begin_nested()
            alerta.titulo = "c"
            session.flush()
            inner.rollback()
            alerta.prazo = 5
        session.commit()
        alerta_id = alerta.id

    row = alert_for(install, alerta_id)
    audits = audit_rows(dbs.target_engine)

    assert row.title == "b"
    assert len(audits) == 1
    assert audits[0].operation == "insert"


def test_changes_coalesce_per_row(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """Several flushes of one row in a transaction become one change."""
    with Session(dbs.source) as session:
        kept = models.new_alerta(titulo="first")
        gone = models.new_alerta(titulo="gone")
        session.add_all([kept, gone])
        session.flush()
        kept.titulo = "second"
        session.flush()
        kept.titulo = "final"
        session.delete(gone)
        session.commit()

    audits = audit_rows(dbs.target_engine)

    assert [row.title for row in alerts(dbs.target_engine)] == ["final"]
    assert [a.operation for a in audits] == ["insert"]


def test_ref_resolves_same_commit(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """A ref to a row inserted in the same commit is translated."""
    with Session(dbs.source) as session:
        alerta = models.new_alerta()
        session.add(alerta)
        session.flush()
        session.add(
            models.Acao(alerta_id=alerta.id, tipo="escalar", usuario="ana")
        )
        session.commit()
        alerta_id = alerta.id

    (event,) = events(dbs.target_engine)

    assert event.alert_id == install.v2_id("alertas", alerta_id)
    assert event.kind == "escalated"


def test_ref_resolves_earlier_commit(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """A ref to a row synced by an earlier commit is translated."""
    with Session(dbs.source) as session:
        alerta = models.new_alerta()
        session.add(alerta)
        session.commit()
        session.add(
            models.Acao(alerta_id=alerta.id, tipo="comentar", usuario="ana")
        )
        session.commit()
        alerta_id = alerta.id

    (event,) = events(dbs.target_engine)

    assert event.alert_id == install.v2_id("alertas", alerta_id)


def test_target_failure_isolated(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """One change rejected by the target fails alone and V1 commits."""
    with Session(dbs.source) as session:
        session.add(models.new_alerta(titulo="ok 1"))
        session.add(models.new_alerta(titulo="REJECTED BY V2"))
        session.add(models.new_alerta(titulo="ok 2"))
        session.commit()
        source_count = session.query(models.Alerta).count()

    audits = audit_rows(dbs.target_engine)

    assert source_count == 3
    assert [row.title for row in alerts(dbs.target_engine)] == ["ok 1", "ok 2"]
    assert [a.status for a in audits] == ["applied", "failed", "applied"]
    assert "ck_alerts_title" in audits[1].error or "CHECK" in audits[1].error


def test_unmapped_value_fails_change(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """A source value missing from a value map fails with a clear error."""
    with Session(dbs.source) as session:
        session.add(models.new_alerta(status="pendente"))
        session.commit()

    (audit,) = audit_rows(dbs.target_engine)

    assert audit.status == "failed"
    assert "'pendente' is not in the value map" in audit.error
    assert "field 'state'" in audit.error


def test_missing_ref_fails_change(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """A ref to a row that failed to sync fails with a clear error."""
    with Session(dbs.source) as session:
        alerta = models.new_alerta(status="pendente")
        session.add(alerta)
        session.flush()
        session.add(
            models.Acao(alerta_id=alerta.id, tipo="escalar", usuario="ana")
        )
        session.commit()

    audits = audit_rows(dbs.target_engine)

    assert [a.status for a in audits] == ["failed", "failed"]
    assert "no cross-reference" in audits[1].error


def test_failed_flush_in_savepoint(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """A flush error inside a savepoint drops only that savepoint."""
    with Session(dbs.source) as session:
        session.add(models.new_alerta(titulo="outer"))
        session.flush()
        savepoint = session.begin_nested()
        session.add(models.new_alerta(titulo="inner"))
        session.add(models.Acao(alerta_id=None, tipo="comentar", usuario="x"))
        with pytest.raises(IntegrityError):
            session.flush()
        savepoint.rollback()
        session.add(models.new_alerta(titulo="after"))
        session.commit()

    titles = [row.title for row in alerts(dbs.target_engine)]

    assert titles == ["outer", "after"]
    assert events(dbs.target_engine) == []


def test_failed_flush_then_rollback(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """A flush error in the root transaction syncs nothing of it."""
    with Session(dbs.source) as session:
        session.add(models.new_alerta(titulo="lost"))
        session.flush()
        session.add(models.Acao(alerta_id=None, tipo="comentar", usuario="x"))
        with pytest.raises(IntegrityError):
            session.flush()
        session.rollback()
        session.add(models.new_alerta(titulo="next transaction"))
        session.commit()

    titles = [row.title for row in alerts(dbs.target_engine)]

    assert titles == ["next transaction"]
    assert len(audit_rows(dbs.target_engine)) == 1


def test_many_flushes_are_not_savepoints(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """Each flush runs in an internal subtransaction that merges nothing."""
    with Session(dbs.source) as session:
        alerta = models.new_alerta(titulo="v0")
        session.add(alerta)
        for step in range(1, 5):
            session.flush()
            alerta.titulo = f"v{step}"
        session.commit()
        alerta_id = alerta.id

    audits = audit_rows(dbs.target_engine)

    assert alert_for(install, alerta_id).title == "v4"
    assert [a.operation for a in audits] == ["insert"]


def test_long_session_key_and_actor(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """Long session keys and actors are stored whole."""
    with Session(dbs.source) as session:
        session.info["dualwrite.session_key"] = "k" * 600
        with dw.acting_as("a" * 600):
            session.add(models.new_alerta())
            session.commit()

    (audit,) = audit_rows(dbs.target_engine)

    assert audit.status == "applied"
    assert audit.session_key == "k" * 600
    assert audit.actor == "a" * 600


def _install_with(
    dbs: Databases, tmp_path: Any, **overrides: Any
) -> dw.DualWrite:
    handle = dw.install_dual_write(
        dbs.source,
        [models.alert_mapping(**overrides), models.event_mapping()],
        target=dbs.target,
        log_file=None,
    )
    handle.create_tables()
    return handle


def test_soft_delete(dbs: Databases, tmp_path: Any) -> None:
    """on_delete assignments keep the target row and its xref."""
    handle = _install_with(dbs, tmp_path, on_delete={"state": "cancelled"})
    try:
        with Session(dbs.source) as session:
            alerta = models.new_alerta()
            session.add(alerta)
            session.commit()
            alerta_id = alerta.id
            session.delete(alerta)
            session.commit()

        row = alert_for(handle, alerta_id)
        audits = audit_rows(dbs.target_engine)

        assert row.state == "cancelled"
        assert [a.operation for a in audits] == ["insert", "delete"]
        assert audits[1].before["state"] == "active"
        assert audits[1].after["state"] == "cancelled"

        handle.revert(audits[1].id)

        assert alert_for(handle, alerta_id).state == "active"
    finally:
        handle.uninstall()


def test_ignored_delete(dbs: Databases, tmp_path: Any) -> None:
    """on_delete='ignore' leaves the target row and audits the delete."""
    handle = _install_with(dbs, tmp_path, on_delete="ignore")
    try:
        with Session(dbs.source) as session:
            alerta = models.new_alerta()
            session.add(alerta)
            session.commit()
            alerta_id = alerta.id
            session.delete(alerta)
            session.commit()

        audits = audit_rows(dbs.target_engine)

        assert alert_for(handle, alerta_id).state == "active"
        assert [a.operation for a in audits] == ["insert", "delete"]
        assert audits[1].status == "applied"
        assert audits[1].after == audits[1].before
    finally:
        handle.uninstall()
