"""Revert of synced changes by audit id and by session key."""

from __future__ import annotations

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

import sa_dualwrite as dw
from tests import models
from tests.conftest import Databases
from tests.helpers import alert_for, alerts, audit_rows, xrefs


def _insert_and_update(dbs: Databases) -> tuple[int, str]:
    with Session(dbs.source) as session:
        alerta = models.new_alerta(titulo="v1")
        session.add(alerta)
        session.commit()
        alerta.titulo = "v2"
        session.commit()
        return alerta.id, dw.session_key(session)


def test_revert_update_restores_before(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """Reverting an update restores the target row's before image."""
    alerta_id, _ = _insert_and_update(dbs)
    update_audit = audit_rows(dbs.target_engine)[1]

    (revert_id,) = install.revert(update_audit.id)

    row = alert_for(install, alerta_id)
    reverted, revert_row = (
        audit_rows(dbs.target_engine, id=update_audit.id)[0],
        audit_rows(dbs.target_engine, id=revert_id)[0],
    )
    assert row.title == "v1"
    assert reverted.status == "reverted"
    assert reverted.reverted_by == revert_id
    assert revert_row.operation == "revert"
    assert revert_row.status == "applied"
    assert revert_row.before["title"] == "v2"
    assert revert_row.after["title"] == "v1"


def test_revert_insert_deletes_row(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """Reverting an insert deletes the target row and its xref."""
    with Session(dbs.source) as session:
        session.add(models.new_alerta())
        session.commit()
    (insert_audit,) = audit_rows(dbs.target_engine)

    install.revert(insert_audit.id)

    assert alerts(dbs.target_engine) == []
    assert xrefs(dbs.target_engine, "alertas") == {}


def test_revert_delete_reinserts_row(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """Reverting a delete re-inserts the row and its xref."""
    with Session(dbs.source) as session:
        alerta = models.new_alerta()
        session.add(alerta)
        session.commit()
        alerta_id = alerta.id
        before = alerts(dbs.target_engine)
        session.delete(alerta)
        session.commit()
    delete_audit = audit_rows(dbs.target_engine)[1]

    install.revert(delete_audit.id)

    assert alerts(dbs.target_engine) == before
    assert install.v2_id("alertas", alerta_id) == before[0].id


def test_revert_by_session_key(dbs: Databases, install: dw.DualWrite) -> None:
    """Reverting a session undoes all its applied changes, newest first."""
    with Session(dbs.source) as session:
        session.add(models.new_alerta(titulo="other session"))
        session.commit()
    alerta_id, key = _insert_and_update(dbs)

    new_ids = install.revert(session_key=key)

    assert len(new_ids) == 2
    assert [row.title for row in alerts(dbs.target_engine)] == [
        "other session"
    ]
    assert install.v2_id("alertas", alerta_id) is None
    statuses = [row.status for row in audit_rows(dbs.target_engine)]
    assert statuses == [
        "applied",
        "reverted",
        "reverted",
        "applied",
        "applied",
    ]


def test_revert_conflict_when_target_changed(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """A target row changed since the change makes revert raise."""
    alerta_id, _ = _insert_and_update(dbs)
    update_audit = audit_rows(dbs.target_engine)[1]
    table = models.Alert.__table__
    with dbs.target_engine.begin() as connection:
        connection.execute(update(table).values(title="edited in V2"))

    with pytest.raises(dw.RevertConflict) as caught:
        install.revert(update_audit.id)

    assert caught.value.audit_id == update_audit.id
    assert caught.value.current is not None
    assert caught.value.current["title"] == "edited in V2"
    assert alert_for(install, alerta_id).title == "edited in V2"
    assert (
        audit_rows(dbs.target_engine, id=update_audit.id)[0].status
        == "applied"
    )


def test_revert_force_overwrites(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """force=True reverts even though the target row changed."""
    alerta_id, _ = _insert_and_update(dbs)
    update_audit = audit_rows(dbs.target_engine)[1]
    table = models.Alert.__table__
    with dbs.target_engine.begin() as connection:
        connection.execute(update(table).values(title="edited in V2"))

    install.revert(update_audit.id, force=True)

    assert alert_for(install, alerta_id).title == "v1"


def test_revert_session_all_or_nothing(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """A conflict on one row of a session reverts none of them."""
    alerta_id, key = _insert_and_update(dbs)
    table = models.Alert.__table__
    with dbs.target_engine.begin() as connection:
        connection.execute(update(table).values(owner_login="someone.else"))

    with pytest.raises(dw.RevertConflict):
        install.revert(session_key=key)

    assert alert_for(install, alerta_id).owner_login == "someone.else"
    statuses = {row.status for row in audit_rows(dbs.target_engine)}
    assert statuses == {"applied"}


def test_revert_rejects_failed_row(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """Reverting a change that is not applied raises DualWriteError."""
    with Session(dbs.source) as session:
        session.add(models.new_alerta(status="pendente"))
        session.commit()
    (failed,) = audit_rows(dbs.target_engine)

    with pytest.raises(dw.DualWriteError, match="status 'failed'"):
        install.revert(failed.id)


def test_revert_twice_rejected(dbs: Databases, install: dw.DualWrite) -> None:
    """A reverted change cannot be reverted again."""
    _insert_and_update(dbs)
    update_audit = audit_rows(dbs.target_engine)[1]
    install.revert(update_audit.id)

    with pytest.raises(dw.DualWriteError, match="status 'reverted'"):
        install.revert(update_audit.id)


def test_revert_unknown_id(dbs: Databases, install: dw.DualWrite) -> None:
    """An unknown audit id raises DualWriteError naming it."""
    with pytest.raises(dw.DualWriteError, match="audit row 999 not found"):
        install.revert(999)


def test_revert_needs_one_selector(install: dw.DualWrite) -> None:
    """revert() needs exactly one of audit_id and session_key."""
    with pytest.raises(dw.DualWriteError, match="exactly one"):
        install.revert()
    with pytest.raises(dw.DualWriteError, match="exactly one"):
        install.revert(1, session_key="x")


def test_revert_sends_signal(dbs: Databases, install: dw.DualWrite) -> None:
    """change_reverted is sent for each reverted change."""
    _insert_and_update(dbs)
    update_audit = audit_rows(dbs.target_engine)[1]
    received: list[dict[str, object]] = []

    def on_reverted(sender: str, **kwargs: object) -> None:
        received.append({"sender": sender, **kwargs})

    with dw.signals.change_reverted.connected_to(on_reverted):
        (revert_id,) = install.revert(update_audit.id)

    assert received == [
        {
            "sender": "alertas",
            "audit_id": revert_id,
            "v1_pk": update_audit.v1_pk,
            "v2_pk": update_audit.v2_pk,
            "operation": "revert",
        }
    ]
