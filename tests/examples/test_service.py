"""The contract-alert service: each V1 write yields its V2 write."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

import sa_dualwrite as dw
from examples.contract_alerts.models_v1 import AcaoAdministrativa, Alerta
from examples.contract_alerts.models_v2 import Alert, AlertEvent
from examples.contract_alerts.services import dual_write_service as service
from sa_dualwrite._store import audit_table
from tests.examples.conftest import AlertDatabases

NEW_ALERT = {
    "contrato_id": "123/2026",
    "titulo": "Alerta de renovação",
    "descricao": "Prazo para renovação próximo",
    "prazo": 30,
    "responsavel": "gestor.silva",
}
BRT = dt.timezone(dt.timedelta(hours=-3))


def audit_rows(engine: Engine, **where: Any) -> list[Any]:
    statement = select(audit_table).order_by(audit_table.c.id)
    for column, value in where.items():
        statement = statement.where(audit_table.c[column] == value)
    with engine.connect() as connection:
        return list(connection.execute(statement))


def v2_row(dbs: AlertDatabases, table: Any, mapping: str, v1_id: int) -> Any:
    v2_id = dbs.dual_write.v2_id(mapping, v1_id)
    assert v2_id is not None, f"{mapping} {v1_id} has no cross-reference"
    with dbs.target.connect() as connection:
        return connection.execute(
            select(table).where(table.c.id == v2_id)
        ).one()


def v1_count(dbs: AlertDatabases, model: Any) -> int:
    with Session(dbs.source) as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def test_create_syncs_alert(alert_dbs: AlertDatabases) -> None:
    """criar_alerta_dual inserts V1 and the sync inserts the V2 alert."""
    alerta_id = service.criar_alerta_dual(NEW_ALERT)
    with Session(alert_dbs.source) as session:
        alerta = session.get_one(Alerta, alerta_id)
    row = v2_row(alert_dbs, Alert.__table__, "alertas", alerta_id)
    (audit,) = audit_rows(alert_dbs.target)

    assert alerta.status == "ativo"
    assert row.contract_ref == "123/2026"
    assert row.title == "Alerta de renovação"
    assert row.description == "Prazo para renovação próximo"
    assert row.owner_login == "gestor.silva"
    assert row.state == "active"
    assert row.due_date == alerta.criado_em.date() + dt.timedelta(days=30)
    assert audit.operation == "insert"
    assert audit.status == "applied"
    assert audit.v1_pk == str(alerta_id)


def test_create_keeps_history_date(alert_dbs: AlertDatabases) -> None:
    """A given criado_em is kept, so the V2 due date is the real one."""
    created = dt.datetime(2020, 4, 10, 12, tzinfo=BRT)

    alerta_id = service.criar_alerta_dual(
        {**NEW_ALERT, "criado_em": created, "prazo": 183}
    )
    row = v2_row(alert_dbs, Alert.__table__, "alertas", alerta_id)

    assert row.due_date == dt.date(2020, 10, 10)


def test_update_syncs_changes(alert_dbs: AlertDatabases) -> None:
    """atualizar_alerta_dual updates V1 and the sync updates V2."""
    alerta_id = service.criar_alerta_dual(NEW_ALERT)

    changed = service.atualizar_alerta_dual(
        alerta_id, {"prazo": 45, "status": "resolvido"}
    )
    row = v2_row(alert_dbs, Alert.__table__, "alertas", alerta_id)
    audit = audit_rows(alert_dbs.target)[-1]

    assert changed == ("prazo", "status")
    assert row.state == "resolved"
    assert row.updated_at is not None
    assert row.due_date == row.created_at.date() + dt.timedelta(days=45)
    assert audit.operation == "update"
    assert audit.status == "applied"
    assert audit.changes["prazo"] == 45
    assert audit.before["state"] == "active"


def test_update_same_value(alert_dbs: AlertDatabases) -> None:
    """An update to the current value writes and syncs nothing."""
    alerta_id = service.criar_alerta_dual(NEW_ALERT)

    changed = service.atualizar_alerta_dual(alerta_id, {"prazo": 30})

    assert changed == ()
    assert len(audit_rows(alert_dbs.target)) == 1


def test_action_syncs_event(alert_dbs: AlertDatabases) -> None:
    """sincronizar_acao_dual inserts a V2 event on the V2 alert."""
    alerta_id = service.criar_alerta_dual(NEW_ALERT)

    acao_id = service.sincronizar_acao_dual(
        {
            "alerta_id": alerta_id,
            "tipo": "escalar",
            "usuario": "coordenador.souza",
            "observacao": "Renovação sem resposta do fornecedor",
        }
    )
    row = v2_row(
        alert_dbs, AlertEvent.__table__, "acoes_administrativas", acao_id
    )
    audit = audit_rows(alert_dbs.target, mapping="acoes_administrativas")[0]

    assert row.alert_id == alert_dbs.dual_write.v2_id("alertas", alerta_id)
    assert row.kind == "escalated"
    assert row.actor_login == "coordenador.souza"
    assert row.note == "Renovação sem resposta do fornecedor"
    assert audit.actor == "coordenador.souza"
    assert audit.status == "applied"


def test_acting_as_names_actor(alert_dbs: AlertDatabases) -> None:
    """acting_as overrides the action's usuario as the audit actor."""
    alerta_id = service.criar_alerta_dual(NEW_ALERT)

    with dw.acting_as("suporte.admin"):
        service.sincronizar_acao_dual(
            {"alerta_id": alerta_id, "tipo": "comentar", "usuario": "x.y"}
        )
    audit = audit_rows(alert_dbs.target, mapping="acoes_administrativas")[0]

    assert audit.actor == "suporte.admin"


def test_caller_session_commits_once(alert_dbs: AlertDatabases) -> None:
    """Calls sharing the caller's session sync together, under its key."""
    with Session(
        alert_dbs.source, info={"dualwrite.session_key": "req-42"}
    ) as session:
        alerta_id = service.criar_alerta_dual(NEW_ALERT, session=session)
        service.sincronizar_acao_dual(
            {"alerta_id": alerta_id, "tipo": "encerrar", "usuario": "a.b"},
            session=session,
        )
        service.atualizar_alerta_dual(
            alerta_id, {"status": "resolvido"}, session=session
        )
        before_commit = audit_rows(alert_dbs.target)
        session.commit()
    audits = audit_rows(alert_dbs.target)
    row = v2_row(alert_dbs, Alert.__table__, "alertas", alerta_id)

    assert before_commit == []
    assert [audit.operation for audit in audits] == ["insert", "insert"]
    assert {audit.session_key for audit in audits} == {"req-42"}
    assert row.state == "resolved"


def test_caller_session_rollback(alert_dbs: AlertDatabases) -> None:
    """A rolled-back caller session leaves V1 and V2 untouched."""
    with Session(alert_dbs.source) as session:
        service.criar_alerta_dual(NEW_ALERT, session=session)
        session.rollback()

    assert v1_count(alert_dbs, Alerta) == 0
    assert audit_rows(alert_dbs.target) == []


def test_failure_then_replay(alert_dbs: AlertDatabases) -> None:
    """A V2 rejection keeps V1, is audited failed and replays once fixed."""
    with alert_dbs.target.begin() as connection:
        connection.execute(
            text(
                "CREATE UNIQUE INDEX uq_alerts_contract_ref "
                "ON alerts (contract_ref)"
            )
        )
    service.criar_alerta_dual(NEW_ALERT)

    second = service.criar_alerta_dual({**NEW_ALERT, "titulo": "Obrigação"})
    (failed,) = audit_rows(alert_dbs.target, status="failed")
    missing_v2 = alert_dbs.dual_write.v2_id("alertas", second)
    with alert_dbs.target.begin() as connection:
        connection.execute(text("DROP INDEX uq_alerts_contract_ref"))
    (new_id,) = alert_dbs.dual_write.replay()
    (replayed,) = audit_rows(alert_dbs.target, id=new_id)
    row = v2_row(alert_dbs, Alert.__table__, "alertas", second)

    assert v1_count(alert_dbs, Alerta) == 2
    assert failed.v1_pk == str(second)
    assert "contract_ref" in failed.error
    assert missing_v2 is None
    assert replayed.status == "applied"
    assert audit_rows(alert_dbs.target, id=failed.id)[0].status == "replayed"
    assert row.title == "Obrigação"
    assert alert_dbs.dual_write.verify().agrees


def test_revert_update(alert_dbs: AlertDatabases) -> None:
    """Reverting a synced update restores the V2 row it replaced."""
    alerta_id = service.criar_alerta_dual(NEW_ALERT)
    service.atualizar_alerta_dual(alerta_id, {"responsavel": "outro.gestor"})
    update_audit = audit_rows(alert_dbs.target, operation="update")[0]

    (revert_id,) = alert_dbs.dual_write.revert(update_audit.id)
    row = v2_row(alert_dbs, Alert.__table__, "alertas", alerta_id)
    (reverted,) = audit_rows(alert_dbs.target, id=update_audit.id)

    assert row.owner_login == "gestor.silva"
    assert reverted.status == "reverted"
    assert reverted.reverted_by == revert_id


def test_revert_insert(alert_dbs: AlertDatabases) -> None:
    """Reverting a synced insert deletes the V2 row and its xref."""
    alerta_id = service.criar_alerta_dual(NEW_ALERT)
    (insert_audit,) = audit_rows(alert_dbs.target)

    alert_dbs.dual_write.revert(insert_audit.id)

    assert alert_dbs.dual_write.v2_id("alertas", alerta_id) is None
    with alert_dbs.target.connect() as connection:
        count = connection.scalar(select(func.count()).select_from(Alert))
    assert count == 0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**NEW_ALERT, "cor": "azul"}, "unknown key 'cor'"),
        (
            {"contrato_id": "1/2026", "responsavel": "a"},
            "missing required key 'titulo'",
        ),
        ({**NEW_ALERT, "prazo": -5}, "key 'prazo'"),
        ({**NEW_ALERT, "prazo": "30"}, "valid integer"),
        ({**NEW_ALERT, "status": "suspenso"}, "key 'status'"),
        ({**NEW_ALERT, "criado_em": dt.datetime(2020, 1, 1)}, "timezone"),
        ({**NEW_ALERT, "titulo": ""}, "key 'titulo'"),
        (["contrato_id"], "must be a dict"),
    ],
    ids=[
        "unknown-key",
        "missing-key",
        "negative-prazo",
        "text-prazo",
        "unknown-status",
        "naive-datetime",
        "empty-title",
        "not-a-dict",
    ],
)
def test_create_rejects_data(data: Any, message: str) -> None:
    """Invalid alert data raises InvalidAlertData naming the key."""
    with pytest.raises(service.InvalidAlertData, match=message):
        service.criar_alerta_dual(data)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({}, "non-empty dict"),
        ({"criado_em": None}, "criado_em"),
        ({"id": 7}, "unknown or read-only keys"),
        ({"prazo": 1.5}, "key 'prazo'"),
        ({"responsavel": None}, "key 'responsavel'"),
    ],
    ids=["empty", "read-only", "primary-key", "float-prazo", "null-owner"],
)
def test_update_rejects_changes(
    alert_dbs: AlertDatabases, changes: dict[str, Any], message: str
) -> None:
    """Invalid changes raise InvalidAlertData and write nothing."""
    alerta_id = service.criar_alerta_dual(NEW_ALERT)

    with pytest.raises(service.InvalidAlertData, match=message):
        service.atualizar_alerta_dual(alerta_id, changes)

    assert len(audit_rows(alert_dbs.target)) == 1


def test_update_unknown_alert(alert_dbs: AlertDatabases) -> None:
    """Updating an id that V1 does not have raises AlertNotFound."""
    with pytest.raises(service.AlertNotFound, match="alerta 999 not found"):
        service.atualizar_alerta_dual(999, {"prazo": 1})


def test_action_unknown_alert(alert_dbs: AlertDatabases) -> None:
    """An action on an id that V1 does not have writes nothing."""
    with pytest.raises(service.AlertNotFound, match="alerta 999"):
        service.sincronizar_acao_dual(
            {"alerta_id": 999, "tipo": "comentar", "usuario": "a.b"}
        )

    assert v1_count(alert_dbs, AcaoAdministrativa) == 0


def test_action_rejects_kind() -> None:
    """An action type outside the V1 list raises InvalidAlertData."""
    with pytest.raises(service.InvalidAlertData, match="key 'tipo'"):
        service.sincronizar_acao_dual(
            {"alerta_id": 1, "tipo": "prorrogar", "usuario": "a.b"}
        )


def test_requires_configure() -> None:
    """Calling before configure() raises ServiceNotConfigured."""
    with pytest.raises(service.ServiceNotConfigured, match="configure"):
        service.criar_alerta_dual(NEW_ALERT)
