"""The demo's V1 and V2 databases: engines and fresh tables.

Without URLs the demo uses one new SQLite file under ``./demo-data/`` for
both V1 and V2. Given URLs, it drops and recreates its own tables there,
but only in a database that is empty of them or that an earlier run of the
demo marked with its marker table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    MetaData,
    Table,
    create_engine,
    event,
    func,
    inspect,
)
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError

import sa_dualwrite as dw
from examples.contract_alerts.models_v1 import V1Base
from examples.contract_alerts.models_v2 import V2Base

__all__ = [
    "DEMO_DIR",
    "SQLITE_FILE",
    "DemoDatabases",
    "DemoSetupError",
    "make_engine",
    "open_databases",
]

DEMO_DIR = Path("demo-data")
SQLITE_FILE = "contract_alerts.db"

_marker_metadata = MetaData()
_marker = Table(
    "sa_dualwrite_demo",
    _marker_metadata,
    Column("created_at", DateTime(timezone=True), server_default=func.now()),
)


class DemoSetupError(Exception):
    """Raised when the demo cannot use the databases it was given."""


def make_engine(url: str | URL) -> Engine:
    """Return an engine for ``url``, with working SAVEPOINTs on SQLite.

    pysqlite defers BEGIN and so breaks SAVEPOINT; the two listeners are
    the workaround from SQLAlchemy's pysqlite dialect documentation.
    """
    engine = create_engine(url)
    if engine.dialect.name != "sqlite" or engine.dialect.driver != "pysqlite":
        return engine

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, connection_record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")

    return engine


@dataclass
class DemoDatabases:
    """The V1 engine and the V2 engine, which may be the same one."""

    v1: Engine
    v2: Engine

    @property
    def same(self) -> bool:
        """True when V2 lives in the V1 database."""
        return self.v2 is self.v1

    def describe(self) -> list[str]:
        """Return one line per database, for the terminal."""
        lines = [f"V1: {_show(self.v1)}"]
        if self.same:
            lines.append("V2: the V1 database (synced in each V1 transaction)")
        else:
            lines.append(f"V2: {_show(self.v2)} (synced after each V1 commit)")
        return lines

    def close(self) -> None:
        """Dispose of both engines."""
        self.v1.dispose()
        if not self.same:
            self.v2.dispose()


def _show(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def open_databases(v1_url: str | None, v2_url: str | None) -> DemoDatabases:
    """Return the demo's engines, with every demo table new and empty.

    Raises :class:`DemoSetupError` when a database cannot be reached or
    contains tables of the demo's names that the demo did not create.
    """
    if v1_url is None:
        v1 = make_engine(f"sqlite:///{_fresh_sqlite_file()}")
    else:
        v1 = make_engine(v1_url)
    same = v2_url is None or v2_url == v1_url
    databases = DemoDatabases(v1, v1 if same else make_engine(v2_url or ""))
    try:
        if databases.same:
            _reset(
                v1,
                "V1 and V2",
                [
                    V1Base.metadata,
                    dw.outbox_metadata,
                    V2Base.metadata,
                    dw.metadata,
                ],
            )
        else:
            _reset(v1, "V1", [V1Base.metadata, dw.outbox_metadata])
            _reset(databases.v2, "V2", [V2Base.metadata, dw.metadata])
    except BaseException:
        databases.close()
        raise
    return databases


def _fresh_sqlite_file() -> Path:
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    path = DEMO_DIR / SQLITE_FILE
    for suffix in ("", "-journal", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return path


def _reset(engine: Engine, role: str, metadatas: Sequence[MetaData]) -> None:
    """Drop and create the demo tables of ``metadatas`` in ``engine``."""
    try:
        existing = set(inspect(engine).get_table_names())
    except SQLAlchemyError as exc:
        raise DemoSetupError(
            f"cannot connect to the {role} database {_show(engine)}: "
            f"{_first_line(exc)}; check the URL and that the server runs"
        ) from exc
    names = {table.name for md in metadatas for table in md.sorted_tables}
    foreign = sorted(names & existing)
    if foreign and _marker.name not in existing:
        raise DemoSetupError(
            f"the {role} database {_show(engine)} already has tables "
            f"{', '.join(foreign)} that this demo did not create; give the "
            "demo an empty database"
        )
    for metadata in reversed(metadatas):
        metadata.drop_all(engine)
    for metadata in metadatas:
        metadata.create_all(engine)
    _marker_metadata.create_all(engine)


def _first_line(exc: BaseException) -> str:
    original = getattr(exc, "orig", None) or exc
    text = str(original).strip()
    return text.splitlines()[0] if text else type(original).__name__
