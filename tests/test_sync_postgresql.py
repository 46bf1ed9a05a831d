"""The PostgreSQL sync path: few statements, same outcomes as the general."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, delete, event, func, select
from sqlalchemy.orm import Session

import sa_dualwrite as dw
from sa_dualwrite._apply import lock_id
from tests import models
from tests.helpers import alert_for, alerts, audit_rows, xrefs


@pytest.fixture(params=["pg-same", "pg-separate"])
def pg_install(
    request: pytest.FixtureRequest, pg_engine: Engine, tmp_path: Path
) -> Iterator[dw.DualWrite]:
    """Dual write on PostgreSQL, V2 in the same or in a second database."""
    target = None
    if request.param == "pg-separate":
        target = request.getfixturevalue("pg_engine_v2")
    models.V1.metadata.create_all(pg_engine)
    models.V2.metadata.create_all(target if target is not None else pg_engine)
    handle = dw.install_dual_write(
        pg_engine, models.mappings(), target=target, log_file=None
    )
    handle.create_tables()
    yield handle
    handle.uninstall()


def test_reinsert_over_stale_xref_updates(
    pg_install: dw.DualWrite, caplog: pytest.LogCaptureFixture
) -> None:
    """A new row whose key has a stale cross-reference updates its row."""
    caplog.set_level(logging.DEBUG, logger="sa_dualwrite")
    engine = pg_install.engine
    with Session(engine) as session:
        session.add(models.new_alerta(id=500, titulo="first"))
        session.commit()
    with engine.begin() as connection:
        connection.execute(
            delete(models.Alerta).where(models.Alerta.id == 500)
        )
    with Session(engine) as session:
        session.add(models.new_alerta(id=500, titulo="second"))
        session.commit()

    rows = alerts(pg_install.target)
    audits = audit_rows(pg_install.target)

    assert [row.title for row in rows] == ["second"]
    assert alert_for(pg_install, 500).title == "second"
    assert [a.operation for a in audits] == ["insert", "update"]
    assert [a.status for a in audits] == ["applied", "applied"]
    assert list(xrefs(pg_install.target, "alertas")) == ["500"]
    if pg_install.in_transaction:
        assert "sync_retried_change_by_change" in caplog.messages


def test_audit_ids_follow_change_order(pg_install: dw.DualWrite) -> None:
    """Audit rows of a many-row commit are numbered in flush order."""
    with Session(pg_install.engine) as session:
        session.add_all(
            [models.new_alerta(titulo=f"alert {n}") for n in range(50)]
        )
        session.commit()

    audits = audit_rows(pg_install.target)
    keys = xrefs(pg_install.target, "alertas")

    assert [int(a.v1_pk) for a in audits] == sorted(int(k) for k in keys)
    assert [a.after["title"] for a in audits] == [
        f"alert {n}" for n in range(50)
    ]
    assert all(keys[a.v1_pk] == a.v2_pk for a in audits)


def test_failed_row_leaves_batch_applied(pg_install: dw.DualWrite) -> None:
    """One rejected row among many fails alone; the rest is applied."""
    titles = [f"alert {n}" for n in range(20)]
    titles[7] = "REJECTED BY V2"
    with Session(pg_install.engine) as session:
        session.add_all([models.new_alerta(titulo=title) for title in titles])
        session.commit()

    audits = audit_rows(pg_install.target)
    statuses = [a.status for a in audits]

    assert statuses == ["applied"] * 7 + ["failed"] + ["applied"] * 12
    assert len(alerts(pg_install.target)) == 19
    assert len(xrefs(pg_install.target, "alertas")) == 19


def test_timeouts_restored_before_commit(
    pg_engine: Engine, tmp_path: Path
) -> None:
    """The sync's time budget does not outlive it in the V1 transaction."""
    models.V1.metadata.create_all(pg_engine)
    models.V2.metadata.create_all(pg_engine)
    handle = dw.install_dual_write(pg_engine, models.mappings(), log_file=None)
    handle.create_tables()
    seen: list[Any] = []

    def record(connection: Connection) -> None:
        seen.append(
            connection.exec_driver_sql(
                "SELECT current_setting('statement_timeout'), "
                "current_setting('lock_timeout')"
            ).one()
        )

    event.listen(pg_engine, "commit", record)
    try:
        with Session(pg_engine) as session:
            session.execute(models.Alerta.__table__.select().limit(0))
            session.connection().exec_driver_sql(
                "SET LOCAL statement_timeout = '17s'"
            )
            session.add(models.new_alerta())
            session.commit()
    finally:
        event.remove(pg_engine, "commit", record)
        handle.uninstall()

    assert len(audit_rows(pg_engine)) == 1
    assert tuple(seen[0]) == ("17s", "0")


def test_locked_row_fails_within_budget(
    pg_engine: Engine, pg_engine_v2: Engine
) -> None:
    """A sync waiting on a locked row gives up when the budget runs out."""
    models.V1.metadata.create_all(pg_engine)
    models.V2.metadata.create_all(pg_engine_v2)
    handle = dw.install_dual_write(
        pg_engine,
        models.mappings(),
        target=pg_engine_v2,
        log_file=None,
        v2_timeout=0.5,
    )
    handle.create_tables()
    key = lock_id("alertas", "700")
    try:
        with pg_engine_v2.connect() as holder, holder.begin():
            holder.execute(select(func.pg_advisory_xact_lock(key)))
            with Session(pg_engine) as session:
                session.add(models.new_alerta(id=700))
                started = time.monotonic()
                session.commit()
                elapsed = time.monotonic() - started
    finally:
        handle.uninstall()

    (audit,) = audit_rows(pg_engine_v2)

    assert elapsed < 2.0
    assert audit.status == "failed"
    assert "lock timeout" in audit.error
