"""DualWrite.verify: source rows against target rows, on every backend."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import Engine, delete, insert, update
from sqlalchemy.orm import Session

import sa_dualwrite as dw
from sa_dualwrite._store import xref_table
from tests import models
from tests.conftest import Databases


def add_alertas(engine: Engine, count: int, **values: object) -> list[int]:
    with Session(engine) as session:
        alertas = [models.new_alerta(**values) for _ in range(count)]
        session.add_all(alertas)
        session.commit()
        return [alerta.id for alerta in alertas]


def test_synced_rows_agree(dbs: Databases, install: dw.DualWrite) -> None:
    """Rows written through the sync agree, with counts per mapping."""
    (alerta_id,) = add_alertas(dbs.source, 1)
    with Session(dbs.source) as session:
        session.add(
            models.Acao(alerta_id=alerta_id, tipo="escalar", usuario="u")
        )
        session.commit()

    report = install.verify()

    assert report.agrees
    assert report["alertas"].source_rows == 1
    assert report["alertas"].target_rows == 1
    assert report["acoes"].source_rows == 1
    assert report["acoes"].target_rows == 1
    assert "agree" in report.summary()


def test_reads_in_batches(dbs: Databases, install: dw.DualWrite) -> None:
    """Batches smaller than the table still visit every row once."""
    add_alertas(dbs.source, 5)

    report = install.verify(batch_size=2)

    assert report.agrees
    assert report["alertas"].source_rows == 5
    assert report["alertas"].target_rows == 5


def test_changed_target_column(dbs: Databases, install: dw.DualWrite) -> None:
    """A target column changed behind the sync is reported as different."""
    (alerta_id,) = add_alertas(dbs.source, 1)
    v2_id = install.v2_id("alertas", alerta_id)
    table = models.Alert.__table__
    with dbs.target_engine.begin() as connection:
        connection.execute(
            update(table).where(table.c.id == v2_id).values(title="Outro")
        )

    report = install.verify()
    (mismatch,) = report["alertas"].mismatches

    assert not report.agrees
    assert report["alertas"].counts["different"] == 1
    assert mismatch.kind == "different"
    assert mismatch.v1_pk == str(alerta_id)
    assert mismatch.v2_pk == str(v2_id)
    assert mismatch.columns == {"title": ("Alerta de renovação", "Outro")}


def test_failed_insert_is_missing(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """A source row whose insert failed on the target is missing."""
    (alerta_id,) = add_alertas(dbs.source, 1, titulo="REJECTED BY V2")

    report = install.verify()
    (mismatch,) = report["alertas"].mismatches

    assert report["alertas"].counts["missing"] == 1
    assert mismatch.v1_pk == str(alerta_id)
    assert mismatch.v2_pk is None


def test_deleted_target_row(dbs: Databases, install: dw.DualWrite) -> None:
    """A cross-reference to a target row that is gone is missing."""
    (alerta_id,) = add_alertas(dbs.source, 1)
    v2_id = install.v2_id("alertas", alerta_id)
    table = models.Alert.__table__
    with dbs.target_engine.begin() as connection:
        connection.execute(delete(table).where(table.c.id == v2_id))

    report = install.verify()
    (mismatch,) = report["alertas"].mismatches

    assert report["alertas"].counts["missing"] == 1
    assert mismatch.v2_pk == str(v2_id)
    assert report["alertas"].target_rows == 0


def test_unreferenced_target_row(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """A target row that no cross-reference points at is extra."""
    add_alertas(dbs.source, 1)
    table = models.Alert.__table__
    with dbs.target_engine.begin() as connection:
        v2_id = connection.execute(
            insert(table).returning(table.c.id),
            {
                "contract_ref": "9/2026",
                "title": "Criado no V2",
                "owner_login": "v2.user",
                "state": "active",
                "created_at": dt.datetime(2026, 1, 5),
            },
        ).scalar_one()

    report = install.verify()
    (mismatch,) = report["alertas"].mismatches

    assert report["alertas"].counts["extra"] == 1
    assert mismatch.v1_pk is None
    assert mismatch.v2_pk == str(v2_id)
    assert report["alertas"].target_rows == 2


def test_unsynced_source_delete(dbs: Databases, install: dw.DualWrite) -> None:
    """A target row whose source row was deleted outside the ORM is extra."""
    (alerta_id,) = add_alertas(dbs.source, 1)
    table = models.Alerta.__table__
    with dbs.source.begin() as connection:
        connection.execute(delete(table).where(table.c.id == alerta_id))

    report = install.verify()
    (mismatch,) = report["alertas"].mismatches

    assert report["alertas"].counts["extra"] == 1
    assert mismatch.v1_pk == str(alerta_id)
    assert report["alertas"].source_rows == 0


def test_stale_cross_reference(dbs: Databases, install: dw.DualWrite) -> None:
    """A cross-reference whose two rows are both gone is stale."""
    (alerta_id,) = add_alertas(dbs.source, 1)
    v2_id = install.v2_id("alertas", alerta_id)
    with dbs.source.begin() as connection:
        table = models.Alerta.__table__
        connection.execute(delete(table).where(table.c.id == alerta_id))
    with dbs.target_engine.begin() as connection:
        table = models.Alert.__table__
        connection.execute(delete(table).where(table.c.id == v2_id))

    report = install.verify()

    assert report["alertas"].counts["stale"] == 1
    assert report["alertas"].mismatch_count == 1


def test_unmapped_source_value(dbs: Databases, install: dw.DualWrite) -> None:
    """A source value the mapping cannot map is reported, not raised."""
    (alerta_id,) = add_alertas(dbs.source, 1)
    table = models.Alerta.__table__
    with dbs.source.begin() as connection:
        connection.execute(
            update(table)
            .where(table.c.id == alerta_id)
            .values(status="suspenso")
        )

    report = install.verify()
    (mismatch,) = report["alertas"].mismatches

    assert mismatch.kind == "unmappable"
    assert "'suspenso'" in mismatch.detail


def test_ref_column_checked(dbs: Databases, install: dw.DualWrite) -> None:
    """A ref column is compared after translation through the xref."""
    first, second = add_alertas(dbs.source, 2)
    with Session(dbs.source) as session:
        acao = models.Acao(alerta_id=first, tipo="comentar", usuario="u")
        session.add(acao)
        session.commit()
        acao_id = acao.id
    table = models.AlertEvent.__table__
    with dbs.target_engine.begin() as connection:
        connection.execute(
            update(table).values(alert_id=install.v2_id("alertas", second))
        )

    report = install.verify()
    (mismatch,) = report["acoes"].mismatches

    assert mismatch.v1_pk == str(acao_id)
    assert mismatch.columns == {
        "alert_id": (
            install.v2_id("alertas", first),
            install.v2_id("alertas", second),
        )
    }


def test_lists_first_mismatches(dbs: Databases, install: dw.DualWrite) -> None:
    """Every mismatch is counted; only max_mismatches are listed."""
    ids = add_alertas(dbs.source, 3)
    with dbs.target_engine.begin() as connection:
        connection.execute(delete(xref_table))

    report = install.verify(max_mismatches=2)

    assert report["alertas"].counts["missing"] == len(ids)
    assert report["alertas"].counts["extra"] == len(ids)
    assert len(report["alertas"].mismatches) == 2
    assert "... and 4 more" in report.summary(max_listed=2)


def test_soft_delete_agrees(dbs: Databases, tmp_path: Path) -> None:
    """A soft-deleted target row agrees while it keeps on_delete values."""
    handle = dw.install_dual_write(
        dbs.source,
        [
            models.alert_mapping(on_delete={"state": "cancelled"}),
            models.event_mapping(),
        ],
        target=dbs.target,
        log_file=tmp_path / "dual_write.log",
    )
    try:
        handle.create_tables()
        (alerta_id,) = add_alertas(dbs.source, 1)
        with Session(dbs.source) as session:
            session.delete(session.get(models.Alerta, alerta_id))
            session.commit()
        agreed = handle.verify()
        table = models.Alert.__table__
        with dbs.target_engine.begin() as connection:
            connection.execute(update(table).values(state="active"))
        changed = handle.verify()
    finally:
        handle.uninstall()
    (mismatch,) = changed["alertas"].mismatches

    assert agreed.agrees
    assert mismatch.columns == {"state": ("cancelled", "active")}
