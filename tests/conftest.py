"""Database fixtures: a fresh PostgreSQL database per test, and SQLite.

PostgreSQL is reached through pytest-postgresql's no-process fixture, which
connects to a running server (it never starts one). The server is given by
SA_DUALWRITE_PG_HOST, SA_DUALWRITE_PG_PORT, SA_DUALWRITE_PG_USER and
SA_DUALWRITE_PG_PASSWORD, defaulting to postgres@127.0.0.1:5432.
SA_DUALWRITE_PG_DBNAME names the test databases; it defaults to
``sa_dualwrite_tests_<pid>``, so that two test runs on one server, or a run
after one that was killed before it could drop its databases, never meet
on the same name. If the server is down, the PostgreSQL tests fail: they
are never skipped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from psycopg import Connection as PsycopgConnection
from pytest_postgresql import factories
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL

import sa_dualwrite as dw
from tests import models

PG_HOST = os.environ.get("SA_DUALWRITE_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("SA_DUALWRITE_PG_PORT", "5432"))
PG_USER = os.environ.get("SA_DUALWRITE_PG_USER", "postgres")
PG_PASSWORD = os.environ.get("SA_DUALWRITE_PG_PASSWORD", "")
PG_DBNAME = os.environ.get(
    "SA_DUALWRITE_PG_DBNAME", f"sa_dualwrite_tests_{os.getpid()}"
)

postgresql_noproc = factories.postgresql_noproc(
    host=PG_HOST,
    port=PG_PORT,
    user=PG_USER,
    password=PG_PASSWORD,
    dbname=PG_DBNAME,
)
postgresql = factories.postgresql("postgresql_noproc")
postgresql_v2 = factories.postgresql(
    "postgresql_noproc", dbname=f"{PG_DBNAME}_v2"
)


def pg_url(connection: PsycopgConnection) -> URL:
    """Return the SQLAlchemy URL of a pytest-postgresql database."""
    return URL.create(
        "postgresql+psycopg",
        username=PG_USER,
        password=PG_PASSWORD or None,
        host=PG_HOST,
        port=PG_PORT,
        database=connection.info.dbname,
    )


def sqlite_engine(path: Path) -> Engine:
    """Return a file SQLite engine with working SAVEPOINT support.

    pysqlite's own transaction handling defers BEGIN and breaks
    savepoints; the two listeners below are the recipe from SQLAlchemy's
    pysqlite documentation.
    """
    engine = create_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, connection_record):  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection):  # type: ignore[no-untyped-def]
        connection.exec_driver_sql("BEGIN")

    return engine


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail a CI run that skipped any test: a skipped test hides a failure."""
    if not os.environ.get("CI"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        reporter.write_line(
            f"CI: {len(skipped)} test(s) skipped; every test must run in CI",
            red=True,
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# Errors that a pipelined statement can only raise through a bug of its
# own, unlike the constraint violations that tests provoke on purpose.
_BUG_ERRORS = (
    "SyntaxError",
    "UndefinedColumn",
    "UndefinedFunction",
    "AmbiguousColumn",
    "DatatypeMismatch",
    "InvalidTextRepresentation",
    "InvalidParameterValue",
    "GroupingError",
    "ProgrammingError",
    "AssertionError",
    "AttributeError",
    "KeyError",
    "TypeError",
    "ValueError",
    "IndexError",
    "_RowCountError",
)


class _FallbackRecorder(logging.Handler):
    """Collects the errors that made a pipelined sync fall back."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "sync_retried_change_by_change":
            self.errors.append(str(getattr(record, "error", "")))


@pytest.fixture(autouse=True)
def _no_buggy_fallback() -> Iterator[None]:
    """Fail a test whose PostgreSQL pipelined sync fell back on a bug.

    The change-by-change sync that takes over gives the same result, so
    without this check a broken pipelined statement would go unnoticed.
    """
    logger = logging.getLogger("sa_dualwrite")
    recorder = _FallbackRecorder()
    level = logger.level
    logger.addHandler(recorder)
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.removeHandler(recorder)
        logger.setLevel(level)
    for error in recorder.errors:
        if error.startswith(_BUG_ERRORS):
            pytest.fail(f"the pipelined sync fell back on a bug: {error}")


@dataclass
class Databases:
    """The source engine and the target engine of one test."""

    name: str
    source: Engine
    target: Engine | None

    @property
    def target_engine(self) -> Engine:
        return self.target if self.target is not None else self.source


@pytest.fixture
def pg_engine(postgresql: PsycopgConnection) -> Iterator[Engine]:
    engine = create_engine(pg_url(postgresql))
    yield engine
    engine.dispose()


@pytest.fixture
def pg_engine_v2(postgresql_v2: PsycopgConnection) -> Iterator[Engine]:
    engine = create_engine(pg_url(postgresql_v2))
    yield engine
    engine.dispose()


@pytest.fixture(
    params=["pg-same", "pg-separate", "sqlite-same", "sqlite-separate"]
)
def dbs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Databases]:
    """Source and target databases, in each supported arrangement."""
    name = request.param
    engines: list[Engine] = []
    if name.startswith("pg"):
        source = request.getfixturevalue("pg_engine")
        target = (
            request.getfixturevalue("pg_engine_v2")
            if name == "pg-separate"
            else None
        )
    else:
        source = sqlite_engine(tmp_path / "v1.db")
        engines.append(source)
        target = None
        if name == "sqlite-separate":
            target = sqlite_engine(tmp_path / "v2.db")
            engines.append(target)
    databases = Databases(name, source, target)
    models.V1.metadata.create_all(source)
    models.V2.metadata.create_all(databases.target_engine)
    yield databases
    for engine in engines:
        engine.dispose()


@pytest.fixture
def install(dbs: Databases, tmp_path: Path) -> Iterator[dw.DualWrite]:
    """Dual write installed with the test mappings, tables created."""
    handle = dw.install_dual_write(
        dbs.source,
        models.mappings(),
        target=dbs.target,
        log_file=tmp_path / "logs" / "dual_write.log",
    )
    handle.create_tables()
    yield handle
    handle.uninstall()
