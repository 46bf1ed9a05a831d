"""The ways of writing V1 that the benchmark compares, and their databases.

Each scenario owns its databases (names starting with ``sadw_bench``),
created at the start of a benchmark run and dropped at its end. Between
two measured runs its tables are truncated, so every run starts empty.
"""

from __future__ import annotations

import inspect
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url

import sa_dualwrite as dw
from examples.contract_alerts.mappings import MAPPINGS
from examples.contract_alerts.models_v1 import V1Base
from examples.contract_alerts.models_v2 import V2Base
from sa_dualwrite import _store

__all__ = [
    "SCENARIOS",
    "Scenario",
    "durable_supported",
    "pipelined_round_trips",
    "scenario_names",
]

TRIGGER_SQL = Path(__file__).with_name("trigger.sql")
DB_PREFIX = "sadw_bench"

_pipelines = 0


def _count_pipelines() -> None:
    """Count psycopg pipeline blocks, which SQLAlchemy's events miss.

    The library's PostgreSQL fast path sends its statements through the
    psycopg connection in pipeline mode: each ``pipeline()`` block is one
    network round trip, whatever the number of statements in it.
    """
    try:
        import psycopg
    except ImportError:
        return
    original = psycopg.Connection.pipeline

    @contextmanager
    def counted(self: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        global _pipelines
        try:
            with original(self, *args, **kwargs) as pipeline:
                yield pipeline
        finally:
            _pipelines += 1

    psycopg.Connection.pipeline = counted  # type: ignore[method-assign]


def pipelined_round_trips() -> int:
    """Return the pipeline blocks run in this process so far."""
    return _pipelines


_count_pipelines()


def durable_supported() -> bool:
    """Return whether the installed sa_dualwrite accepts ``durable=``."""
    parameters = inspect.signature(dw.install_dual_write).parameters
    return "durable" in parameters


@dataclass
class Scenario:
    """One way of writing V1, with the databases it writes to.

    ``round_trips`` counts the statements, commits and rollbacks sent to
    its databases through SQLAlchemy. The BEGIN that psycopg sends before
    the first statement of a transaction is not counted. The benchmark
    adds one round trip per psycopg pipeline block
    (:func:`pipelined_round_trips`).
    """

    name: str
    description: str
    kind: str
    separate_target: bool = False
    durable: bool = False
    source: Engine | None = field(default=None, repr=False)
    target: Engine | None = field(default=None, repr=False)
    round_trips: int = 0
    _log_dir: Path | None = field(default=None, repr=False)

    @property
    def databases(self) -> list[str]:
        """Names of the databases this scenario creates."""
        base = f"{DB_PREFIX}_{self.name.replace('-', '_')}"
        return [base, f"{base}_v2"] if self.separate_target else [base]

    @property
    def has_target(self) -> bool:
        """Whether the scenario writes V2 rows at all."""
        return self.kind != "plain"

    @property
    def source_engine(self) -> Engine:
        """The V1 engine; only valid between create() and drop()."""
        assert self.source is not None, "create() the scenario first"
        return self.source

    @property
    def target_engine(self) -> Engine:
        """The engine whose database contains the V2 tables."""
        if self.target is not None:
            return self.target
        return self.source_engine

    def create(self, server: URL) -> None:
        """Create the databases and tables of this scenario."""
        for name in self.databases:
            _recreate_database(server, name)
        self.source = create_engine(server.set(database=self.databases[0]))
        if self.separate_target:
            self.target = create_engine(server.set(database=self.databases[1]))
        for engine in (self.source, self.target):
            if engine is not None:
                for hook in ("before_cursor_execute", "commit", "rollback"):
                    event.listen(engine, hook, self._count_round_trip)
        V1Base.metadata.create_all(self.source)
        _store.outbox_metadata.create_all(self.source)
        if self.has_target:
            V2Base.metadata.create_all(self.target_engine)
            _store.metadata.create_all(self.target_engine)
        if self.kind == "trigger":
            with self.source.begin() as connection:
                connection.exec_driver_sql(TRIGGER_SQL.read_text())
        self._log_dir = Path(tempfile.mkdtemp(prefix="sadw_bench_logs_"))

    def _count_round_trip(self, *args: Any) -> None:
        self.round_trips += 1

    def reset(self) -> None:
        """Empty every table and restart the identity sequences."""
        _truncate(self.source_engine, V1Base, _store.outbox_metadata)
        if self.has_target:
            _truncate(self.target_engine, V2Base, _store.metadata)

    @contextmanager
    def installed(self, *, log: bool = True) -> Iterator[dw.DualWrite | None]:
        """Install dual write for the duration of one run, if it applies.

        Logs go to a JSON lines file in a temporary folder, as they would
        with the default ``log_file``; ``log=False`` writes no file.
        """
        if self.kind != "dualwrite":
            yield None
            return
        assert self._log_dir is not None
        log_file = self._log_dir / f"{self.name}.log" if log else None
        options: dict[str, Any] = {}
        if self.durable:
            options["durable"] = True
        handle = dw.install_dual_write(
            self.source_engine,
            MAPPINGS,
            target=self.target,
            log_file=log_file,
            **options,
        )
        try:
            yield handle
        finally:
            handle.uninstall()
            if log_file is not None:
                log_file.unlink(missing_ok=True)

    def drop(self, server: URL) -> None:
        """Dispose of the engines and drop the databases."""
        for engine in (self.source, self.target):
            if engine is not None:
                engine.dispose()
        self.source = self.target = None
        for name in self.databases:
            _drop_database(server, name)
        if self._log_dir is not None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None


SCENARIOS = [
    Scenario("plain", "V1 writes only, no dual write", "plain"),
    Scenario(
        "trigger",
        "PL/pgSQL row triggers write V2, xref and audit (same database)",
        "trigger",
    ),
    Scenario("same", "sa_dualwrite, V2 in the same database", "dualwrite"),
    Scenario(
        "separate",
        "sa_dualwrite, V2 in a second database",
        "dualwrite",
        separate_target=True,
    ),
    Scenario(
        "same-durable",
        "sa_dualwrite durable=True, V2 in the same database",
        "dualwrite",
        durable=True,
    ),
    Scenario(
        "separate-durable",
        "sa_dualwrite durable=True, V2 in a second database",
        "dualwrite",
        separate_target=True,
        durable=True,
    ),
]


def scenario_names() -> list[str]:
    """Return the name of every scenario, in report order."""
    return [scenario.name for scenario in SCENARIOS]


def server_url(url: str) -> URL:
    """Return the URL of the server's maintenance database."""
    parsed = make_url(url)
    return parsed.set(database=parsed.database or "postgres")


def _admin_engine(server: URL) -> Engine:
    return create_engine(
        server.set(database="postgres"), isolation_level="AUTOCOMMIT"
    )


def _recreate_database(server: URL, name: str) -> None:
    _check_name(name)
    engine = _admin_engine(server)
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql(
                f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
            )
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        engine.dispose()


def _drop_database(server: URL, name: str) -> None:
    _check_name(name)
    engine = _admin_engine(server)
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql(
                f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
            )
    finally:
        engine.dispose()


def _check_name(name: str) -> None:
    if not name.startswith(DB_PREFIX) or not name.replace("_", "").isalnum():
        raise ValueError(
            f"rejected database name {name!r}: benchmark "
            f"databases are named {DB_PREFIX}_<letters, digits, _>"
        )


def _truncate(engine: Engine, *owners: Any) -> None:
    names: list[str] = []
    for owner in owners:
        metadata = getattr(owner, "metadata", owner)
        names.extend(f'"{table.name}"' for table in metadata.sorted_tables)
    with engine.begin() as connection:
        connection.execute(
            text(f"TRUNCATE {', '.join(names)} RESTART IDENTITY CASCADE")
        )
