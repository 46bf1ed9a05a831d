"""The target down, slow or locked never blocks or fails a V1 commit."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

import sa_dualwrite as dw
from tests import models
from tests.conftest import PG_HOST, PG_PORT
from tests.helpers import alert_for, alerts, audit_rows
from tests.tcp_proxy import TcpProxy


@pytest.fixture
def proxied_v2(pg_engine_v2: Engine) -> Iterator[tuple[TcpProxy, Engine]]:
    """The V2 database reached through a proxy the test can stop."""
    models.V2.metadata.create_all(pg_engine_v2)
    dw.metadata.create_all(pg_engine_v2)
    proxy = TcpProxy((PG_HOST, PG_PORT))
    proxy.start()
    url = pg_engine_v2.url.set(host="127.0.0.1", port=proxy.port)
    engine = create_engine(url, pool_pre_ping=True)
    yield proxy, engine
    engine.dispose()
    proxy.stop()


def _failures() -> tuple[list[dict[str, Any]], Any]:
    received: list[dict[str, Any]] = []

    def on_failed(sender: str, **kwargs: Any) -> None:
        received.append(kwargs)

    return received, on_failed


def test_target_down_then_replayed(
    pg_engine: Engine,
    proxied_v2: tuple[TcpProxy, Engine],
    tmp_path: Path,
) -> None:
    """With V2 down V1 commits; replay() syncs once V2 is back."""
    proxy, v2 = proxied_v2
    models.V1.metadata.create_all(pg_engine)
    handle = dw.install_dual_write(
        pg_engine, models.mappings(), target=v2, log_file=tmp_path / "dw.log"
    )
    received, on_failed = _failures()
    try:
        proxy.stop()
        with (
            dw.signals.change_failed.connected_to(on_failed),
            Session(pg_engine) as session,
        ):
            alerta = models.new_alerta()
            session.add(alerta)
            session.commit()
            alerta_id = alerta.id
        proxy.start()

        new_ids = handle.replay()

        assert len(received) == 1
        assert received[0]["audit_id"] is None
        assert "OperationalError" in received[0]["error"]
        assert len(new_ids) == 1
        assert alert_for(handle, alerta_id).title == "Alerta de renovação"
        assert "change_failed" in (tmp_path / "dw.log").read_text()
    finally:
        handle.uninstall()


def test_target_hanging_is_bounded(
    pg_engine: Engine, pg_engine_v2: Engine, tmp_path: Path
) -> None:
    """A V2 server that never responds costs the commit only v2_timeout."""
    models.V1.metadata.create_all(pg_engine)
    proxy = TcpProxy((PG_HOST, PG_PORT), blackhole=True)
    proxy.start()
    hanging = create_engine(
        pg_engine_v2.url.set(host="127.0.0.1", port=proxy.port)
    )
    handle = dw.install_dual_write(
        pg_engine,
        models.mappings(),
        target=hanging,
        log_file=None,
        v2_timeout=0.5,
    )
    received, on_failed = _failures()
    try:
        with (
            dw.signals.change_failed.connected_to(on_failed),
            Session(pg_engine) as session,
        ):
            session.add(models.new_alerta())
            started = time.monotonic()
            session.commit()
            elapsed = time.monotonic() - started
            count = session.query(models.Alerta).count()

        assert elapsed < 2.0
        assert count == 1
        assert len(received) == 1
        assert "timed out" in received[0]["error"]
    finally:
        handle.uninstall()
        hanging.dispose()
        proxy.stop()


@pytest.mark.parametrize("separate", [False, True], ids=["same-db", "two-dbs"])
def test_locked_target_row_is_bounded(
    pg_engine: Engine, pg_engine_v2: Engine, separate: bool
) -> None:
    """A V2 row locked by another transaction fails the change in time."""
    target = pg_engine_v2 if separate else pg_engine
    models.V1.metadata.create_all(pg_engine)
    models.V2.metadata.create_all(target)
    handle = dw.install_dual_write(
        pg_engine,
        models.mappings(),
        target=target if separate else None,
        log_file=None,
        v2_timeout=1.0,
    )
    handle.create_tables()
    try:
        with Session(pg_engine) as session:
            alerta = models.new_alerta()
            session.add(alerta)
            session.commit()
            with target.connect() as locker:
                locker.execute(text("SELECT * FROM alerts FOR UPDATE"))
                alerta.titulo = "while locked"
                started = time.monotonic()
                session.commit()
                elapsed = time.monotonic() - started
                locker.rollback()
            alerta_id = alerta.id

        statuses = [row.status for row in audit_rows(target)]
        assert elapsed < 3.0
        assert statuses == ["applied", "failed"]
        assert "timeout" in audit_rows(target)[1].error.lower()

        handle.replay()

        assert alert_for(handle, alerta_id).title == "while locked"
    finally:
        handle.uninstall()


@pytest.mark.parametrize("separate", [False, True], ids=["same-db", "two-dbs"])
def test_concurrent_writers_converge(
    pg_engine: Engine, pg_engine_v2: Engine, separate: bool
) -> None:
    """Concurrent V1 transactions on one row leave V2 equal to V1."""
    target = pg_engine_v2 if separate else pg_engine
    models.V1.metadata.create_all(pg_engine)
    models.V2.metadata.create_all(target)
    handle = dw.install_dual_write(
        pg_engine,
        models.mappings(),
        target=target if separate else None,
        log_file=None,
        v2_timeout=10.0,
    )
    handle.create_tables()
    try:
        with Session(pg_engine) as session:
            alerta = models.new_alerta()
            session.add(alerta)
            session.commit()
            alerta_id = alerta.id
        errors: list[BaseException] = []

        def writer(number: int) -> None:
            try:
                for step in range(15):
                    with Session(pg_engine) as session:
                        row = session.get(models.Alerta, alerta_id)
                        assert row is not None
                        if number % 2:
                            row.titulo = f"writer {number} step {step}"
                        else:
                            row.prazo = number * 100 + step
                        session.commit()
            except BaseException as exc:  # reported by the assert below
                errors.append(exc)

        threads = [
            threading.Thread(target=writer, args=(n,)) for n in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        with Session(pg_engine) as session:
            final = session.get(models.Alerta, alerta_id)
            assert final is not None
            expected_title, expected_due = (
                final.titulo,
                models.due_date(final.criado_em, final.prazo),
            )
        row = alert_for(handle, alerta_id)
        statuses = {r.status for r in audit_rows(target)}

        assert errors == []
        assert row.title == expected_title
        assert row.due_date == expected_due
        assert statuses == {"applied"}
        assert len(alerts(target)) == 1
    finally:
        handle.uninstall()


def test_target_freezing_mid_sync_is_bounded(
    pg_engine: Engine, pg_engine_v2: Engine
) -> None:
    """A V2 that stops responding on an open connection is cut off in time."""
    models.V1.metadata.create_all(pg_engine)
    models.V2.metadata.create_all(pg_engine_v2)
    dw.metadata.create_all(pg_engine_v2)
    proxy = TcpProxy((PG_HOST, PG_PORT))
    proxy.start()
    frozen = create_engine(
        pg_engine_v2.url.set(host="127.0.0.1", port=proxy.port)
    )
    handle = dw.install_dual_write(
        pg_engine,
        models.mappings(),
        target=frozen,
        log_file=None,
        v2_timeout=0.5,
    )
    received, on_failed = _failures()
    try:
        with Session(pg_engine) as session:
            session.add(models.new_alerta(titulo="before"))
            session.commit()
            proxy.freeze()
            with dw.signals.change_failed.connected_to(on_failed):
                session.add(models.new_alerta(titulo="while frozen"))
                started = time.monotonic()
                session.commit()
                elapsed = time.monotonic() - started
            count = session.query(models.Alerta).count()

        assert elapsed < 3.0
        assert count == 2
        assert len(received) == 1
    finally:
        handle.uninstall()
        frozen.dispose()
        proxy.stop()


def test_connect_limit_keeps_given_timeout() -> None:
    """The connect timeout is added for known drivers, never overridden."""
    from sa_dualwrite._watchdog import connect_limit

    class _Dialect:
        driver = "psycopg"

    receiver = connect_limit(0.5)
    given: dict[str, Any] = {"connect_timeout": 30}
    missing: dict[str, Any] = {}
    receiver(_Dialect(), None, (), given)
    receiver(_Dialect(), None, (), missing)

    assert given == {"connect_timeout": 30}
    assert missing == {"connect_timeout": 2}


def test_locked_sqlite_target_is_bounded(tmp_path: Path) -> None:
    """A separate SQLite V2 file locked by a writer costs only v2_timeout."""
    from tests.conftest import sqlite_engine

    source = sqlite_engine(tmp_path / "v1.db")
    target = sqlite_engine(tmp_path / "v2.db")
    models.V1.metadata.create_all(source)
    models.V2.metadata.create_all(target)
    handle = dw.install_dual_write(
        source, models.mappings(), target=target, log_file=None, v2_timeout=0.5
    )
    handle.create_tables()
    locker = sqlite3.connect(tmp_path / "v2.db", isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        with Session(source) as session:
            session.add(models.new_alerta())
            started = time.monotonic()
            session.commit()
            elapsed = time.monotonic() - started
        locker.rollback()
        with target.connect() as connection:
            busy = connection.exec_driver_sql("PRAGMA busy_timeout").scalar()

        assert elapsed < 2.0
        assert busy == 5000
        assert len(handle.applier.unrecorded) == 1
    finally:
        locker.close()
        handle.uninstall()
        source.dispose()
        target.dispose()
