"""Values that are easy to corrupt on the way to the target."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

import sa_dualwrite as dw
from tests.conftest import Databases
from tests.helpers import audit_rows
from tests.listeners import models
from tests.listeners.checks import differences
from tests.listeners.models import Gestor, Lembrete, Reminder

BRASILIA = dt.timezone(dt.timedelta(hours=-3))


@pytest.fixture(params=["pg-same", "pg-separate"])
def pg_hierarchy(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[dw.DualWrite]:
    """The hierarchy mappings on PostgreSQL, one or two databases."""
    source: Engine = request.getfixturevalue("pg_engine")
    target: Engine | None = None
    if request.param == "pg-separate":
        target = request.getfixturevalue("pg_engine_v2")
    models.PathsV1.metadata.create_all(source)
    models.PathsV2.metadata.create_all(target or source)
    handle = dw.install_dual_write(
        source,
        models.mappings(),
        target=target,
        log_file=tmp_path / "dual_write.log",
        unsynced_writes="raise",
    )
    handle.create_tables()
    yield handle
    handle.uninstall()


def reminder(handle: dw.DualWrite, v1_id: int) -> Reminder:
    v2_id = handle.v2_id("lembretes", v1_id)
    with Session(handle.target) as session:
        row = session.get(Reminder, v2_id)
        assert row is not None
        session.expunge(row)
        return row


def test_aware_datetime_keeps_offset(pg_hierarchy: dw.DualWrite) -> None:
    """A timezone-aware datetime reaches the target and audit as an instant."""
    moment = dt.datetime(2026, 3, 1, 9, 30, tzinfo=BRASILIA)
    with Session(pg_hierarchy.engine) as session:
        lembrete = Lembrete(texto="Renovar", lembrar_em=moment)
        session.add(lembrete)
        session.commit()
        lembrete_id = lembrete.id

    remind_at = reminder(pg_hierarchy, lembrete_id).remind_at
    (audit,) = audit_rows(pg_hierarchy.target)
    audited = dt.datetime.fromisoformat(audit.after["remind_at"])
    changed = dt.datetime.fromisoformat(audit.changes["lembrar_em"])

    assert remind_at == moment
    assert remind_at is not None
    assert remind_at.utcoffset() is not None
    assert audited == moment
    assert audited.utcoffset() is not None
    assert changed == moment
    assert differences(pg_hierarchy) == []


def test_aware_datetime_by_statement(pg_hierarchy: dw.DualWrite) -> None:
    """An aware datetime set by an UPDATE statement reaches the target."""
    moment = dt.datetime(2026, 7, 15, 23, 0, tzinfo=BRASILIA)
    with Session(pg_hierarchy.engine) as session:
        lembrete = Lembrete(texto="Vencimento")
        session.add(lembrete)
        session.commit()
        session.execute(update(Lembrete).values(lembrar_em=moment))
        session.commit()
        lembrete_id = lembrete.id

    remind_at = reminder(pg_hierarchy, lembrete_id).remind_at

    assert remind_at == moment
    assert remind_at is not None
    assert remind_at.utcoffset() is not None


def test_mutable_json_change_syncs(
    dbs: Databases, hierarchy: dw.DualWrite
) -> None:
    """A JSON value changed in place through MutableDict is synced."""
    with Session(dbs.source) as session:
        lembrete = Lembrete(texto="Com dados", dados={"canal": "email"})
        session.add(lembrete)
        session.commit()
        assert lembrete.dados is not None
        lembrete.dados["prioridade"] = 2
        session.commit()
        lembrete_id = lembrete.id

    updates = audit_rows(dbs.target_engine, operation="update")

    assert reminder(hierarchy, lembrete_id).data == {
        "canal": "email",
        "prioridade": 2,
    }
    assert [row.changes for row in updates] == [
        {"dados": {"canal": "email", "prioridade": 2}}
    ]
    assert differences(hierarchy) == []


def test_relationship_change_writes_nothing(
    dbs: Databases, hierarchy: dw.DualWrite
) -> None:
    """A change to a relationship only, no mapped column, writes nothing."""
    with Session(dbs.source) as session:
        gestor = Gestor(nome="Helena", setor="juridico")
        lembrete = Lembrete(texto="Sem dono")
        session.add_all([gestor, lembrete])
        session.commit()
        before = len(audit_rows(dbs.target_engine))
        gestor.lembretes.append(lembrete)
        session.commit()
        owner = session.scalars(select(Lembrete.pessoa_id)).one()

    assert owner is not None
    assert len(audit_rows(dbs.target_engine)) == before
    assert differences(hierarchy) == []
