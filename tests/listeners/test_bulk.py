"""Sync of ORM-enabled statements, legacy bulk methods and merge."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

import sa_dualwrite as dw
from tests import models
from tests.conftest import Databases
from tests.helpers import alert_for, alerts, audit_rows, xrefs
from tests.listeners.checks import differences

Alerta = models.Alerta
STRATEGIES = ["auto", "evaluate", "fetch", False]


def seed(engine: Engine, *prazos: int) -> list[int]:
    """Insert one alert per deadline through the ORM; return their ids."""
    with Session(engine) as session:
        rows = [models.new_alerta(prazo=prazo) for prazo in prazos]
        session.add_all(rows)
        session.commit()
        return [row.id for row in rows]


def row_data(**values: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "contrato_id": "77/2026",
        "titulo": "Alerta em lote",
        "prazo": 15,
        "responsavel": "gestor.lima",
        "status": "ativo",
    }
    data.update(values)
    return data


def upsert_insert(engine: Engine) -> Any:
    """Return the dialect's INSERT construct that has ON CONFLICT."""
    if engine.dialect.name == "postgresql":
        return postgresql.insert
    return sqlite.insert


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_update_statement_syncs(
    dbs: Databases, strict: dw.DualWrite, strategy: Any
) -> None:
    """An ORM UPDATE syncs the rows it matched, with SQL-computed values."""
    first, second, third = seed(dbs.source, 30, 10, 5)

    with Session(dbs.source) as session:
        loaded = session.get(Alerta, first)
        session.execute(
            update(Alerta)
            .where(Alerta.prazo >= 10)
            .values(prazo=Alerta.prazo + 5)
            .execution_options(synchronize_session=strategy)
        )
        session.commit()
        assert loaded is not None
        criado_em = loaded.criado_em

    updates = audit_rows(dbs.target_engine, operation="update")

    assert differences(strict) == []
    assert alert_for(strict, first).due_date == (
        criado_em.date() + dt.timedelta(days=35)
    )
    assert alert_for(strict, third).due_date == (
        criado_em.date() + dt.timedelta(days=5)
    )
    assert sorted(row.v1_pk for row in updates) == sorted(
        [str(first), str(second)]
    )
    assert [row.changes for row in updates] == [{"prazo": 35}, {"prazo": 15}]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_delete_statement_syncs(
    dbs: Databases, strict: dw.DualWrite, strategy: Any
) -> None:
    """An ORM DELETE removes the target rows of the rows it matched."""
    first, second, third = seed(dbs.source, 30, 10, 5)

    with Session(dbs.source) as session:
        session.execute(
            delete(Alerta)
            .where(Alerta.prazo < 20)
            .execution_options(synchronize_session=strategy)
        )
        session.commit()

    deletes = audit_rows(dbs.target_engine, operation="delete")

    assert differences(strict) == []
    assert len(alerts(dbs.target_engine)) == 1
    assert sorted(row.v1_pk for row in deletes) == sorted(
        [str(second), str(third)]
    )
    assert strict.v2_id("alertas", first) is not None


def test_query_update_and_delete_sync(
    dbs: Databases, strict: dw.DualWrite
) -> None:
    """Legacy Query.update() and Query.delete() are synced."""
    first, second = seed(dbs.source, 30, 10)

    with Session(dbs.source) as session:
        session.query(Alerta).filter(Alerta.id == first).update(
            {Alerta.status: "resolvido"}
        )
        session.query(Alerta).filter(Alerta.id == second).delete()
        session.commit()

    assert differences(strict) == []
    assert alert_for(strict, first).state == "resolved"
    assert strict.v2_id("alertas", second) is None


def test_update_without_mapped_column_writes_nothing(
    dbs: Databases, strict: dw.DualWrite
) -> None:
    """An UPDATE that sets only unmapped columns writes nothing."""
    seed(dbs.source, 30)
    before = len(audit_rows(dbs.target_engine))

    with Session(dbs.source) as session:
        session.execute(update(Alerta).values(notas_internas="revisar"))
        session.commit()

    assert len(audit_rows(dbs.target_engine)) == before


def test_update_returning_syncs(dbs: Databases, strict: dw.DualWrite) -> None:
    """An UPDATE with its own returning() is synced and returns its rows."""
    first, second = seed(dbs.source, 30, 10)

    with Session(dbs.source) as session:
        returned = session.execute(
            update(Alerta)
            .where(Alerta.prazo == 10)
            .values(titulo="Renovado")
            .returning(Alerta.id, Alerta.titulo)
        ).all()
        session.commit()

    assert [tuple(row) for row in returned] == [(second, "Renovado")]
    assert differences(strict) == []
    assert alert_for(strict, second).title == "Renovado"
    assert alert_for(strict, first).title == "Alerta de renovação"


def test_update_rowcount_unchanged(
    dbs: Databases, strict: dw.DualWrite
) -> None:
    """The caller of an UPDATE still gets the number of matched rows."""
    seed(dbs.source, 30, 10, 5)

    with Session(dbs.source) as session:
        result = session.execute(
            update(Alerta).where(Alerta.prazo > 5).values(status="resolvido")
        )
        rowcount = result.rowcount  # type: ignore[attr-defined]
        session.commit()

    assert rowcount == 2


def test_insert_rows_syncs(dbs: Databases, strict: dw.DualWrite) -> None:
    """session.execute(insert(Model), rows) syncs every inserted row."""
    with Session(dbs.source) as session:
        session.execute(
            insert(Alerta),
            [row_data(titulo=f"Lote {index}") for index in range(3)],
        )
        session.commit()

    inserts = audit_rows(dbs.target_engine, operation="insert")

    assert differences(strict) == []
    assert len(inserts) == 3
    assert len(xrefs(dbs.target_engine, "alertas")) == 3


def test_insert_values_syncs(dbs: Databases, strict: dw.DualWrite) -> None:
    """An INSERT of one or several VALUES rows is synced."""
    with Session(dbs.source) as session:
        session.execute(insert(Alerta).values(**row_data(titulo="Um")))
        session.execute(
            insert(Alerta).values([row_data(titulo="A"), row_data(titulo="B")])
        )
        session.commit()

    assert differences(strict) == []
    assert len(alerts(dbs.target_engine)) == 3


def test_insert_returning_syncs(dbs: Databases, strict: dw.DualWrite) -> None:
    """INSERTs with their own returning() are synced and return rows."""
    with Session(dbs.source) as session:
        objects = session.scalars(
            insert(Alerta).returning(Alerta),
            [row_data(titulo="A"), row_data(titulo="B")],
        ).all()
        new_id = session.scalar(
            insert(Alerta).values(**row_data(titulo="C")).returning(Alerta.id)
        )
        session.commit()
        titles = [alerta.titulo for alerta in objects]

    assert titles == ["A", "B"]
    assert new_id is not None
    assert differences(strict) == []
    assert alert_for(strict, new_id).title == "C"


def test_upsert_syncs(dbs: Databases, strict: dw.DualWrite) -> None:
    """An ON CONFLICT DO UPDATE upsert syncs updated and inserted rows."""
    (existing,) = seed(dbs.source, 30)
    dialect_insert = upsert_insert(dbs.source)
    statement = dialect_insert(Alerta).values(
        [
            row_data(id=existing, titulo="Atualizado"),
            row_data(id=existing + 100, titulo="Novo"),
        ]
    )
    statement = statement.on_conflict_do_update(
        index_elements=[Alerta.id],
        set_={"titulo": statement.excluded.titulo},
    )

    with Session(dbs.source) as session:
        session.execute(statement)
        session.commit()

    assert differences(strict) == []
    assert alert_for(strict, existing).title == "Atualizado"
    assert alert_for(strict, existing + 100).title == "Novo"


def test_bulk_upsert_syncs(dbs: Databases, strict: dw.DualWrite) -> None:
    """An upsert given a list of rows syncs them; DO NOTHING skips rows."""
    (existing,) = seed(dbs.source, 30)
    dialect_insert = upsert_insert(dbs.source)
    update_statement = dialect_insert(Alerta)
    update_statement = update_statement.on_conflict_do_update(
        index_elements=[Alerta.id],
        set_={"prazo": update_statement.excluded.prazo},
    )
    skip_statement = dialect_insert(Alerta).on_conflict_do_nothing()

    with Session(dbs.source) as session:
        session.execute(
            update_statement,
            [row_data(id=existing, prazo=3), row_data(id=existing + 1)],
        )
        session.execute(
            skip_statement,
            [
                row_data(id=existing, titulo="Ignorado"),
                row_data(id=existing + 2),
            ],
        )
        session.commit()

    assert differences(strict) == []
    assert len(alerts(dbs.target_engine)) == 3
    assert alert_for(strict, existing).title == "Alerta de renovação"


def test_bulk_save_objects_syncs(dbs: Databases, strict: dw.DualWrite) -> None:
    """bulk_save_objects syncs new and changed objects."""
    (first,) = seed(dbs.source, 30)

    with Session(dbs.source) as session:
        alerta = session.get(Alerta, first)
        assert alerta is not None
        alerta.titulo = "Alterado em lote"
        session.bulk_save_objects(
            [alerta, models.new_alerta(titulo="Novo em lote")]
        )
        session.commit()

    assert differences(strict) == []
    assert alert_for(strict, first).title == "Alterado em lote"
    assert len(alerts(dbs.target_engine)) == 2


def test_bulk_mappings_sync(dbs: Databases, strict: dw.DualWrite) -> None:
    """bulk_insert_mappings and bulk_update_mappings are synced."""
    (first,) = seed(dbs.source, 30)

    with Session(dbs.source) as session:
        session.bulk_insert_mappings(
            Alerta, [row_data(titulo="X"), row_data(titulo="Y")]
        )
        session.bulk_update_mappings(
            Alerta, [{"id": first, "status": "cancelado"}]
        )
        session.commit()

    updates = audit_rows(dbs.target_engine, operation="update")

    assert differences(strict) == []
    assert alert_for(strict, first).state == "cancelled"
    assert len(alerts(dbs.target_engine)) == 3
    assert [row.changes for row in updates] == [{"status": "cancelado"}]


def test_bulk_update_by_key_syncs(
    dbs: Databases, strict: dw.DualWrite
) -> None:
    """An ORM UPDATE given a list of rows by primary key is synced."""
    first, second = seed(dbs.source, 30, 10)

    with Session(dbs.source) as session:
        session.execute(
            update(Alerta),
            [
                {"id": first, "responsavel": "gestor.rocha"},
                {"id": second, "responsavel": "gestor.melo"},
            ],
        )
        session.commit()

    assert differences(strict) == []
    assert alert_for(strict, first).owner_login == "gestor.rocha"
    assert alert_for(strict, second).owner_login == "gestor.melo"


def test_merge_syncs(dbs: Databases, strict: dw.DualWrite) -> None:
    """merge() of a detached changed object and of a new one is synced."""
    (first,) = seed(dbs.source, 30)
    with Session(dbs.source) as session:
        detached = session.get(Alerta, first)
    assert detached is not None
    detached.titulo = "Mesclado"

    with Session(dbs.source) as session:
        session.merge(detached)
        session.merge(models.new_alerta(id=first + 50, titulo="Novo"))
        session.commit()

    assert differences(strict) == []
    assert alert_for(strict, first).title == "Mesclado"
    assert alert_for(strict, first + 50).title == "Novo"


def test_core_statement_in_session_syncs(
    dbs: Databases, strict: dw.DualWrite
) -> None:
    """Core statements on the session's own connection are synced."""
    first, second = seed(dbs.source, 30, 10)
    table = Alerta.__table__

    with Session(dbs.source) as session:
        session.execute(
            update(table).where(table.c.id == first).values(titulo="Core")
        )
        session.connection().execute(delete(table).where(table.c.id == second))
        session.commit()

    assert differences(strict) == []
    assert alert_for(strict, first).title == "Core"
    assert strict.v2_id("alertas", second) is None


def test_key_change_by_statement_syncs(
    dbs: Databases, strict: dw.DualWrite
) -> None:
    """An UPDATE that changes primary keys moves the target rows."""
    (first,) = seed(dbs.source, 30)

    with Session(dbs.source) as session:
        session.execute(
            update(Alerta)
            .where(Alerta.id == first)
            .values(id=Alerta.id + 1000)
        )
        session.commit()

    assert differences(strict) == []
    assert strict.v2_id("alertas", first) is None
    assert strict.v2_id("alertas", first + 1000) is not None


def test_statement_rollback_syncs_nothing(
    dbs: Databases, strict: dw.DualWrite
) -> None:
    """A rolled-back bulk statement syncs nothing."""
    seed(dbs.source, 30)
    before = len(audit_rows(dbs.target_engine))

    with Session(dbs.source) as session:
        session.execute(update(Alerta).values(titulo="Desfeito"))
        session.execute(insert(Alerta), [row_data()])
        session.rollback()

    assert len(audit_rows(dbs.target_engine)) == before
    assert differences(strict) == []


def test_savepoint_rollback_drops_statement(
    dbs: Databases, strict: dw.DualWrite
) -> None:
    """A rolled-back savepoint drops exactly its statements' changes."""
    first, second = seed(dbs.source, 30, 10)

    with Session(dbs.source) as session:
        session.execute(
            update(Alerta).where(Alerta.id == first).values(titulo="Fica")
        )
        nested = session.begin_nested()
        session.execute(
            update(Alerta).where(Alerta.id == second).values(titulo="Sai")
        )
        session.execute(delete(Alerta).where(Alerta.id == first))
        nested.rollback()
        session.commit()

    updates = audit_rows(dbs.target_engine, operation="update")

    assert differences(strict) == []
    assert [row.v1_pk for row in updates] == [str(first)]
    assert alert_for(strict, second).title == "Alerta de renovação"


def test_statement_changes_coalesce(
    dbs: Databases, strict: dw.DualWrite
) -> None:
    """Flushed and statement changes to one row become one change."""
    with Session(dbs.source) as session:
        alerta = models.new_alerta()
        session.add(alerta)
        session.flush()
        session.execute(
            update(Alerta)
            .where(Alerta.id == alerta.id)
            .values(prazo=Alerta.prazo + 1)
        )
        session.execute(insert(Alerta), [row_data(id=alerta.id + 10)])
        session.execute(delete(Alerta).where(Alerta.id == alerta.id + 10))
        session.commit()
        alerta_id = alerta.id

    (audit,) = audit_rows(dbs.target_engine)

    assert differences(strict) == []
    assert audit.operation == "insert"
    assert audit.v1_pk == str(alerta_id)
    assert audit.changes["prazo"] == 31


def test_statement_actor_recorded(
    dbs: Databases, strict: dw.DualWrite
) -> None:
    """Changes of a statement carry the actor of the block that ran it."""
    seed(dbs.source, 30)

    with Session(dbs.source) as session, dw.acting_as("admin.souza"):
        session.execute(update(Alerta).values(status="cancelado"))
        session.commit()

    (audit,) = audit_rows(dbs.target_engine, operation="update")

    assert audit.actor == "admin.souza"


def test_statement_syncs_in_log_mode(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """Statements are synced the same way with the default install."""
    first, second = seed(dbs.source, 30, 10)

    with Session(dbs.source) as session:
        session.execute(update(Alerta).values(prazo=Alerta.prazo * 2))
        session.execute(delete(Alerta).where(Alerta.id == second))
        session.commit()

    row = alert_for(install, first)

    assert row.title == "Alerta de renovação"
    assert install.v2_id("alertas", second) is None
    assert differences(install) == []


def test_ref_of_statement_rows_resolves(
    dbs: Databases, strict: dw.DualWrite
) -> None:
    """Rows inserted by statements resolve refs to rows of the same commit."""
    with Session(dbs.source) as session:
        session.execute(insert(Alerta), [row_data(id=500)])
        session.execute(
            insert(models.Acao),
            [{"alerta_id": 500, "tipo": "escalar", "usuario": "ana"}],
        )
        session.commit()

    with Session(dbs.source) as session:
        acao_id = session.scalars(select(models.Acao.id)).one()

    assert differences(strict) == []
    assert strict.v2_id("acoes", acao_id) is not None


def test_insert_from_select_syncs(
    dbs: Databases, strict: dw.DualWrite
) -> None:
    """An INSERT .. SELECT copies rows that are all synced."""
    seed(dbs.source, 30, 10)
    table = Alerta.__table__
    copied = select(
        table.c.contrato_id,
        (table.c.titulo + " (cópia)").label("titulo"),
        table.c.responsavel,
    )

    with Session(dbs.source) as session:
        session.execute(
            insert(table).from_select(
                ["contrato_id", "titulo", "responsavel"], copied
            )
        )
        session.commit()

    assert differences(strict) == []
    assert len(alerts(dbs.target_engine)) == 4


def test_core_insert_rows_in_session_sync(
    dbs: Databases, strict: dw.DualWrite
) -> None:
    """A Core INSERT with several parameter sets in a session is synced."""
    with Session(dbs.source) as session:
        session.execute(
            insert(Alerta.__table__),
            [row_data(titulo="P"), row_data(titulo="Q")],
        )
        session.commit()

    assert differences(strict) == []
    assert len(alerts(dbs.target_engine)) == 2
