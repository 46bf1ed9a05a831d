"""Durable mode under faults, on PostgreSQL V1 and V2 databases.

Each test checks the three promises of durable mode: V1 writes are never
held by V2, V2 ends with every V1 row, and no change is applied twice
(one V2 row, one cross-reference and one applied insert per V1 row).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Engine,
    create_engine,
    func,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

import sa_dualwrite as dw
from sa_dualwrite._store import audit_table, xref_table
from tests import models
from tests.conftest import PG_HOST, PG_PORT
from tests.durable.helpers import outbox_rows
from tests.durable.writer import APPLICATION_NAME
from tests.helpers import count
from tests.tcp_proxy import TcpProxy

ROOT = Path(__file__).resolve().parents[2]


def url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def environment() -> dict[str, str]:
    """Return the environment of a child process that imports tests."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def timed_v1_write(engine: Engine) -> float:
    """Return the seconds one V1 insert and commit take.

    The row goes to a table of its own, which no mapping covers.
    """
    started = time.monotonic()
    with engine.begin() as connection:
        connection.execute(
            text("CREATE TABLE IF NOT EXISTS probe (at timestamptz)")
        )
        connection.execute(text("INSERT INTO probe VALUES (now())"))
    return time.monotonic() - started


def _pairs(rows: Any) -> dict[Any, Any]:
    return {row[0]: row[1] for row in rows}


def assert_complete_once(source: Engine, target: Engine) -> None:
    """Assert every V1 alerta is in V2 once, with its current title."""
    alertas = models.Alerta.__table__
    alerts = models.Alert.__table__
    with source.connect() as connection:
        v1 = _pairs(
            connection.execute(select(alertas.c.id, alertas.c.titulo)).all()
        )
    with target.connect() as connection:
        xref = _pairs(
            connection.execute(
                select(xref_table.c.v1_pk, xref_table.c.v2_pk).where(
                    xref_table.c.mapping == "alertas"
                )
            ).all()
        )
        v2 = _pairs(
            connection.execute(select(alerts.c.id, alerts.c.title)).all()
        )
        inserts = connection.execute(
            select(audit_table.c.v1_pk, func.count())
            .where(
                audit_table.c.mapping == "alertas",
                audit_table.c.operation == "insert",
                audit_table.c.status == "applied",
            )
            .group_by(audit_table.c.v1_pk)
        ).all()

    assert len(v2) == len(v1)
    assert sorted(xref) == sorted(str(key) for key in v1)
    assert {v2[int(xref[str(key)])] for key in v1} == set(v1.values())
    for key, title in v1.items():
        assert v2[int(xref[str(key)])] == title
    assert {row[0] for row in inserts} == {str(key) for key in v1}
    assert {row[1] for row in inserts} == {1}


@pytest.fixture
def databases(
    pg_engine: Engine, pg_engine_v2: Engine
) -> tuple[Engine, Engine]:
    """PostgreSQL V1 and V2 with the test models and plugin tables."""
    models.V1.metadata.create_all(pg_engine)
    models.V2.metadata.create_all(pg_engine_v2)
    dw.metadata.create_all(pg_engine_v2)
    dw.outbox_metadata.create_all(pg_engine)
    return pg_engine, pg_engine_v2


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    """A TCP proxy to the PostgreSQL server, started."""
    server = TcpProxy((PG_HOST, PG_PORT))
    server.start()
    yield server
    server.stop()


def install(source: Engine, target: Engine, **options: Any) -> dw.DualWrite:
    settings: dict[str, Any] = {
        "log_file": None,
        "durable": True,
        "v2_timeout": 1.0,
        "max_attempts": 3,
        "retry_delay": 0.0,
    }
    settings.update(options)
    return dw.install_dual_write(
        source, models.mappings(), target=target, **settings
    )


def start_writer(
    source: Engine, target: Engine, rows: int, mode: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.durable.writer",
            url(source),
            url(target),
            str(rows),
            mode,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=environment(),
        cwd=ROOT,
    )


def kill(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)


def drain_in_new_process(
    source: Engine, target: Engine, tmp_path: Path
) -> str:
    """Run ``sa-dualwrite worker --once``; return what it printed."""
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "sa-dualwrite"),
            "worker",
            "--once",
            "--v1-url",
            url(source),
            "--v2-url",
            url(target),
            "--mappings",
            "tests.models:mappings",
            "--log-file",
            str(tmp_path / "worker.log"),
            "--log-level",
            "error",
        ],
        capture_output=True,
        text=True,
        env=environment(),
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def terminate_writer_backends(target: Engine) -> None:
    """End the server sessions of the killed writer, as the server would
    once it notices the client is gone.
    """
    with target.begin() as connection:
        connection.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = :name"
            ),
            {"name": APPLICATION_NAME},
        )


def test_kill_during_v2_write(
    databases: tuple[Engine, Engine], tmp_path: Path
) -> None:
    """SIGKILL while the V2 write waits: a new process drains it all."""
    source, target = databases
    locker = target.connect()
    locker.begin()
    locker.execute(text("LOCK TABLE alerts IN ACCESS EXCLUSIVE MODE"))
    writer = start_writer(source, target, 5, "plain")
    try:
        wait_for(lambda: count(source, models.Alerta.__table__) == 5, 30, "V1")
        wait_for(lambda: _waiting_on_lock(target), 30, "the writer's V2 write")
        probe = timed_v1_write(source)
        pending = outbox_rows(source, status="pending")
    finally:
        kill(writer)
        locker.rollback()
        locker.close()
    terminate_writer_backends(target)

    output = drain_in_new_process(source, target, tmp_path)

    assert probe < 1.0
    assert len(pending) == 5
    assert "5 applied, 0 failed, 0 parked" in output
    assert_complete_once(source, target)
    assert {row.status for row in outbox_rows(source)} == {"done"}


def _waiting_on_lock(target: Engine) -> bool:
    with target.connect() as connection:
        waiting = connection.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = :name AND wait_event_type = 'Lock'"
            ),
            {"name": APPLICATION_NAME},
        ).scalar_one()
    return bool(waiting)


def test_kill_before_outbox_update(
    databases: tuple[Engine, Engine], tmp_path: Path
) -> None:
    """SIGKILL after the V2 commit: the drain applies nothing again."""
    source, target = databases
    writer = start_writer(source, target, 5, "before-mark")
    try:
        assert writer.stdout is not None
        lines = [writer.stdout.readline().strip() for _ in range(2)]
        pending = outbox_rows(source, status="pending")
        applied_before = count(target, audit_table)
    finally:
        kill(writer)

    output = drain_in_new_process(source, target, tmp_path)

    assert lines == ["committing", "marking"]
    assert len(pending) == 5
    assert applied_before == 5
    assert "5 applied, 0 failed, 0 parked" in output
    assert count(target, audit_table) == 5
    assert_complete_once(source, target)
    assert {row.status for row in outbox_rows(source)} == {"done"}


def test_v2_down_then_back(
    databases: tuple[Engine, Engine], proxy: TcpProxy
) -> None:
    """V2 unreachable for a while: commits stay fast, the drain catches up."""
    source, _ = databases
    target = create_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{proxy.port}/"
        f"{databases[1].url.database}",
        pool_pre_ping=True,
    )
    handle = install(source, target)
    try:
        with Session(source) as session:
            alertas = [models.new_alerta(titulo=f"up {i}") for i in range(3)]
            session.add_all(alertas)
            session.commit()
            proxy.stop()
            durations = []
            for index, alerta in enumerate(alertas):
                alerta.titulo = f"while down {index}"
                session.add(models.new_alerta(titulo=f"down {index}"))
                started = time.monotonic()
                session.commit()
                durations.append(time.monotonic() - started)
        pending = outbox_rows(source, status="pending")
        while_down = handle.drain()
        proxy.start()
        result = handle.drain()
    finally:
        handle.uninstall()
        target.dispose()

    assert max(durations) < 1.0
    assert len(pending) == 6
    assert while_down.error is not None
    assert while_down.applied == 0
    assert (result.applied, result.failed, result.parked) == (6, 0, 0)
    assert_complete_once(source, databases[1])


def test_v2_constraint_errors(databases: tuple[Engine, Engine]) -> None:
    """Rejected changes are retried, parked, then replayed once fixed."""
    source, target = databases
    handle = install(source, target)
    try:
        with Session(source) as session:
            session.add(models.new_alerta(titulo="ok"))
            for _ in range(3):
                session.add(models.new_alerta(titulo="REJECTED BY V2"))
            started = time.monotonic()
            session.commit()
            duration = time.monotonic() - started
        first = handle.drain()
        second = handle.drain()
        with source.begin() as connection:
            connection.execute(
                update(models.Alerta.__table__)
                .where(models.Alerta.titulo == "REJECTED BY V2")
                .values(titulo="fixed")
            )
        replayed = handle.replay()
    finally:
        handle.uninstall()

    assert duration < 1.0
    assert (first.failed, second.parked) == (3, 3)
    assert len(replayed) == 3
    assert_complete_once(source, target)
    assert {row.status for row in outbox_rows(source)} == {"done"}
    assert count(target, models.Alert.__table__) == 4


def test_v2_row_locked(databases: tuple[Engine, Engine]) -> None:
    """A V2 row locked elsewhere fails the sync in time; the drain ends it."""
    source, target = databases
    handle = install(source, target, v2_timeout=0.5)
    try:
        with Session(source) as session:
            alerta = models.new_alerta(titulo="before")
            session.add(alerta)
            session.commit()
            alerts = models.Alert.__table__
            with target.connect() as locker, locker.begin():
                locker.execute(select(alerts).with_for_update()).all()
                alerta.titulo = "after"
                started = time.monotonic()
                session.commit()
                duration = time.monotonic() - started
                held = outbox_rows(source, status="pending")
                blocked = handle.drain(timeout=0.5)
            result = handle.drain()
    finally:
        handle.uninstall()

    assert duration < 1.5
    assert len(held) == 1
    assert "timeout" in (held[0].last_error or "")
    assert blocked.applied == 0
    assert result.applied == 1
    assert_complete_once(source, target)


def test_two_workers_share_outbox(
    databases: tuple[Engine, Engine], proxy: TcpProxy, tmp_path: Path
) -> None:
    """Two worker processes drain 10,000 changes, each applied once."""
    source, target = databases
    unreachable = create_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{proxy.port}/x"
    )
    proxy.stop()
    handle = install(source, unreachable)
    try:
        with Session(source) as session:
            alertas = [
                models.new_alerta(titulo=f"bulk {i}") for i in range(9000)
            ]
            session.add_all(alertas)
            session.flush()
            session.add_all(
                models.Acao(
                    alerta_id=alerta.id, tipo="comentar", usuario="ana"
                )
                for alerta in alertas[:1000]
            )
            started = time.monotonic()
            session.commit()
            duration = time.monotonic() - started
    finally:
        handle.uninstall()
        unreachable.dispose()
    config = tmp_path / "worker.toml"
    config.write_text(
        f'v1_url = "{url(source)}"\nv2_url = "{url(target)}"\n'
        'mappings = "tests.models:mappings"\n'
        "retry_delay = 0.2\nmax_attempts = 50\n"
    )
    workers = [_start_worker(config, tmp_path / f"w{i}.log") for i in (1, 2)]
    probes = []
    try:
        deadline = time.monotonic() + 300
        while outbox_rows(source, status="pending"):
            assert time.monotonic() < deadline, "workers did not finish"
            probes.append(timed_v1_write(source))
            time.sleep(0.5)
        outputs = []
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
            outputs.append(worker.communicate(timeout=60)[0])
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    applied = [_applied_count(output) for output in outputs]
    events = models.AlertEvent.__table__

    assert duration < 10.0
    assert max(probes) < 1.0
    assert [worker.returncode for worker in workers] == [0, 0]
    assert sum(applied) == 10000
    assert min(applied) > 0
    assert count(target, events) == 1000
    assert count(target, audit_table) >= 10000
    assert {row.status for row in outbox_rows(source)} == {"done"}
    assert_complete_once(source, target)


def _start_worker(config: Path, log_file: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            str(Path(sys.executable).parent / "sa-dualwrite"),
            "worker",
            "--config",
            str(config),
            "--log-file",
            str(log_file),
            "--log-level",
            "error",
            "--idle",
            "0.2",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=environment(),
        cwd=ROOT,
    )


def _applied_count(output: str) -> int:
    # "worker stopped: N applied, N failed, N parked"
    return int(output.split("worker stopped: ")[1].split(" applied")[0])
