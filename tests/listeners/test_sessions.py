"""Sync through every kind of session: factories, Flask, async, binds."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from psycopg import Connection as PsycopgConnection
from sqlalchemy import Engine, create_engine, delete, event, insert, update
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    create_async_engine,
)
from sqlalchemy.orm import Session, scoped_session, sessionmaker

import sa_dualwrite as dw
from sa_dualwrite._store import metadata as store_metadata
from tests import models
from tests.conftest import Databases, pg_url, sqlite_engine
from tests.helpers import alert_for, audit_rows
from tests.listeners import models as paths_models
from tests.listeners.checks import differences

Alerta = models.Alerta


def test_sessionmaker_syncs(dbs: Databases, strict: dw.DualWrite) -> None:
    """Sessions made by a sessionmaker are watched."""
    factory = sessionmaker(bind=dbs.source)

    with factory.begin() as session:
        session.add(models.new_alerta())
    with factory() as session:
        session.execute(update(Alerta).values(status="resolvido"))
        session.commit()

    assert differences(strict) == []
    assert len(audit_rows(dbs.target_engine)) == 2


def test_scoped_session_syncs(dbs: Databases, strict: dw.DualWrite) -> None:
    """A scoped_session registry's sessions are watched."""
    registry = scoped_session(sessionmaker(bind=dbs.source))
    try:
        alerta = models.new_alerta()
        registry.add(alerta)
        registry.commit()
        registry.execute(update(Alerta).values(prazo=Alerta.prazo + 1))
        registry.commit()
        alerta_id = alerta.id
    finally:
        registry.remove()

    assert differences(strict) == []
    assert alert_for(strict, alerta_id).title == "Alerta de renovação"


def test_flask_sqlalchemy_syncs(
    postgresql: PsycopgConnection, tmp_path: Path
) -> None:
    """Writes through Flask-SQLAlchemy's db.session are synced."""
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = pg_url(
        postgresql
    ).render_as_string(hide_password=False)
    db = SQLAlchemy(app)

    with app.app_context():
        models.V1.metadata.create_all(db.engine)
        models.V2.metadata.create_all(db.engine)
        handle = dw.install_dual_write(
            db.engine,
            models.mappings(),
            log_file=tmp_path / "dual_write.log",
            unsynced_writes="raise",
        )
        handle.create_tables()
        try:
            alerta = models.new_alerta()
            db.session.add(alerta)
            db.session.commit()
            db.session.execute(
                update(Alerta).values(responsavel="gestor.costa")
            )
            db.session.commit()
            alerta_id = alerta.id
            mismatches = differences(handle)
            owner = alert_for(handle, alerta_id).owner_login
        finally:
            handle.uninstall()
            db.session.remove()
            db.engine.dispose()

    assert mismatches == []
    assert owner == "gestor.costa"


def test_other_bind_not_captured(
    dbs: Databases, hierarchy: dw.DualWrite, tmp_path: Path
) -> None:
    """Only writes routed to the watched engine are captured."""
    other = sqlite_engine(tmp_path / "other.db")
    paths_models.PathsV1.metadata.create_all(other)
    binds = {paths_models.Pessoa: dbs.source, paths_models.Lembrete: other}
    try:
        with Session(binds=binds) as session:
            session.add(paths_models.Gestor(nome="Ines", setor="rh"))
            session.add(paths_models.Lembrete(texto="Noutro banco"))
            session.commit()
            session.execute(update(paths_models.Lembrete).values(dias=3))
            session.execute(update(paths_models.Pessoa).values(email="x@y"))
            session.commit()
        with other.begin() as connection:
            connection.execute(delete(paths_models.Lembrete.__table__))
    finally:
        other.dispose()

    mappings = {row.mapping for row in audit_rows(dbs.target_engine)}

    assert mappings == {"pessoas", "gestores"}
    assert differences(hierarchy) == []


def _sqlite_async(path: Path) -> AsyncEngine:
    """Return an aiosqlite engine with working SAVEPOINT support."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, connection_record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")

    return engine


async def _create_tables(engine: AsyncEngine, *metadatas: Any) -> None:
    async with engine.begin() as connection:
        for item in metadatas:
            await connection.run_sync(item.create_all)


async def _async_writes(
    source: AsyncEngine, target: AsyncEngine | None, log_file: Path
) -> dw.DualWrite:
    await _create_tables(source, models.V1.metadata)
    await _create_tables(target or source, models.V2.metadata, store_metadata)
    handle = dw.install_dual_write(
        source,
        models.mappings(),
        target=target,
        log_file=log_file,
        unsynced_writes="raise",
    )
    try:
        async with AsyncSession(source) as session:
            alerta = models.new_alerta()
            session.add(alerta)
            await session.commit()
            await session.execute(
                update(Alerta).values(prazo=Alerta.prazo + 5)
            )
            await session.execute(
                insert(Alerta),
                [
                    {"contrato_id": "1", "titulo": "A", "responsavel": "a"},
                    {"contrato_id": "2", "titulo": "B", "responsavel": "b"},
                ],
            )
            await session.commit()
            await session.execute(delete(Alerta).where(Alerta.titulo == "B"))
            alerta.titulo = "Assíncrono"
            await session.commit()
    finally:
        handle.uninstall()
        await source.dispose()
        if target is not None:
            await target.dispose()
    return handle


def _sync_copy(handle: dw.DualWrite, source: Engine, target: Engine) -> Any:
    return differences(handle, source, target)


@pytest.mark.parametrize("separate", [False, True], ids=["same", "separate"])
def test_async_sqlite_syncs(tmp_path: Path, separate: bool) -> None:
    """AsyncSession writes on aiosqlite are synced like sync ones."""
    source = _sqlite_async(tmp_path / "v1.db")
    target = _sqlite_async(tmp_path / "v2.db") if separate else None
    handle = asyncio.run(
        _async_writes(source, target, tmp_path / "dual_write.log")
    )
    sync_source = sqlite_engine(tmp_path / "v1.db")
    sync_target = sqlite_engine(tmp_path / ("v2.db" if separate else "v1.db"))
    try:
        mismatches = differences(handle, sync_source, sync_target)
        audits = audit_rows(sync_target)
    finally:
        sync_source.dispose()
        sync_target.dispose()

    assert mismatches == []
    assert [row.operation for row in audits] == [
        "insert",
        "update",
        "insert",
        "insert",
        "delete",
        "update",
    ]


def test_async_handle_needs_run_sync(tmp_path: Path) -> None:
    """An async install's handle methods work inside run_sync only."""
    source = _sqlite_async(tmp_path / "v1.db")

    async def scenario() -> tuple[str, Any]:
        await _create_tables(
            source, models.V1.metadata, models.V2.metadata, store_metadata
        )
        handle = dw.install_dual_write(
            source, models.mappings(), log_file=None
        )
        try:
            async with AsyncSession(source) as session:
                alerta = models.new_alerta()
                session.add(alerta)
                await session.flush()
                alerta_id = alerta.id
                await session.commit()
            try:
                handle.v2_id("alertas", alerta_id)
            except dw.DualWriteError as exc:
                message = str(exc)
            async with source.connect() as connection:
                found = await connection.run_sync(
                    lambda _: handle.v2_id("alertas", alerta_id)
                )
        finally:
            handle.uninstall()
            await source.dispose()
        return message, found

    message, found = asyncio.run(scenario())

    assert "run_sync()" in message
    assert found is not None


def _async_url(connection: PsycopgConnection) -> URL:
    return pg_url(connection).set(drivername="postgresql+psycopg_async")


@pytest.mark.parametrize("separate", [False, True], ids=["same", "separate"])
def test_async_postgresql_syncs(
    request: pytest.FixtureRequest, tmp_path: Path, separate: bool
) -> None:
    """AsyncSession writes on psycopg's async driver are synced."""
    database = request.getfixturevalue("postgresql")
    target_database = (
        request.getfixturevalue("postgresql_v2") if separate else database
    )
    source = create_async_engine(_async_url(database))
    target = (
        create_async_engine(_async_url(target_database)) if separate else None
    )
    handle = asyncio.run(
        _async_writes(source, target, tmp_path / "dual_write.log")
    )
    sync_source = create_engine(pg_url(database))
    sync_target = create_engine(pg_url(target_database))
    try:
        mismatches = differences(handle, sync_source, sync_target)
        audits = audit_rows(sync_target)
    finally:
        sync_source.dispose()
        sync_target.dispose()

    assert mismatches == []
    assert len(audits) == 6


def test_async_extension_not_imported(tmp_path: Path) -> None:
    """A sync install never imports sqlalchemy.ext.asyncio."""
    script = textwrap.dedent(
        f"""
        import sys
        from sqlalchemy import create_engine
        from sqlalchemy.orm import Session
        import sa_dualwrite as dw
        from tests import models

        engine = create_engine("sqlite:///{tmp_path / "v1.db"}")
        models.V1.metadata.create_all(engine)
        models.V2.metadata.create_all(engine)
        handle = dw.install_dual_write(
            engine, models.mappings(), log_file=None
        )
        handle.create_tables()
        with Session(engine) as session:
            session.add(models.new_alerta())
            session.commit()
        handle.uninstall()
        print("sqlalchemy.ext.asyncio" in sys.modules)
        """
    )
    root = Path(__file__).resolve().parents[2]

    completed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=root,
        check=True,
    )

    assert completed.stdout.strip() == "False"


def test_session_in_outer_transaction_syncs(
    dbs: Databases, strict: dw.DualWrite
) -> None:
    """A session joined to an outer transaction syncs and keeps it open.

    With V2 in the V1 database the sync waits for the outer COMMIT; with a
    separate V2 engine it runs at the session's commit, as documented.
    """
    with dbs.source.connect() as connection:
        outer = connection.begin()
        with Session(
            bind=connection, join_transaction_mode="create_savepoint"
        ) as session:
            session.add(models.new_alerta())
            session.execute(update(Alerta).values(titulo="Externo"))
            session.commit()
        before_outer_commit = len(audit_rows(dbs.target_engine))
        with pytest.raises(dw.DualWriteError):
            connection.execute(update(Alerta.__table__).values(prazo=1))
        outer.commit()

    assert before_outer_commit == (0 if dbs.target is None else 1)
    assert differences(strict) == []
    assert [row.operation for row in audit_rows(dbs.target_engine)] == [
        "insert"
    ]
