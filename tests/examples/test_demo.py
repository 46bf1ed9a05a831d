"""The contract-alert demo, end to end, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from psycopg import Connection as PsycopgConnection
from sqlalchemy import Engine, text

import sa_dualwrite as dw
from examples.contract_alerts.__main__ import main as module_main
from examples.contract_alerts.databases import make_engine
from examples.contract_alerts.demo import run_demo
from examples.contract_alerts.mappings import MAPPINGS
from sa_dualwrite._verify import VerifyReport
from sa_dualwrite.cli import main as cli_main
from tests.conftest import pg_url

ALERTS = 111
ACTIONS = 81


def check(source: Engine, target: Engine | None) -> VerifyReport:
    """Verify the demo's databases with a dual write of our own."""
    handle = dw.install_dual_write(source, MAPPINGS, target, log_file=None)
    try:
        return handle.verify()
    finally:
        handle.uninstall()


def url(connection: PsycopgConnection) -> str:
    return pg_url(connection).render_as_string(hide_password=False)


def test_default_sqlite(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without URLs the demo fills a new SQLite file and V1 equals V2."""
    monkeypatch.chdir(tmp_path)

    code = run_demo()
    output = capsys.readouterr().out
    engine = make_engine(
        f"sqlite:///{tmp_path / 'demo-data/contract_alerts.db'}"
    )
    report = check(engine, None)
    engine.dispose()

    assert code == 0
    assert output.rstrip().endswith("V1 and V2 agree.")
    assert "87 records with missing or inconsistent dates" in output
    assert "UNIQUE constraint failed: alerts.contract_ref" in output
    assert report.agrees
    assert report["alertas"].source_rows == ALERTS
    assert report["acoes_administrativas"].source_rows == ACTIONS
    assert (tmp_path / "logs" / "dual_write.log").stat().st_size > 0


def test_postgresql_two_databases(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pg_engine: Engine,
    pg_engine_v2: Engine,
    postgresql: PsycopgConnection,
    postgresql_v2: PsycopgConnection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With V2 in another PostgreSQL database, V1 equals V2 at the end."""
    monkeypatch.chdir(tmp_path)

    code = run_demo(url(postgresql), url(postgresql_v2))
    output = capsys.readouterr().out
    report = check(pg_engine, pg_engine_v2)

    assert code == 0
    assert "synced after each V1 commit" in output
    assert "UniqueViolation" in output
    assert report.agrees
    assert report["alertas"].target_rows == ALERTS
    assert report["acoes_administrativas"].target_rows == ACTIONS


def test_postgresql_same_database(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pg_engine: Engine,
    postgresql: PsycopgConnection,
) -> None:
    """With V2 in the V1 PostgreSQL database, V1 equals V2 at the end."""
    monkeypatch.chdir(tmp_path)

    code = run_demo(url(postgresql))
    report = check(pg_engine, None)

    assert code == 0
    assert report.agrees
    assert report["alertas"].target_rows == ALERTS


def test_runs_again_on_its_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second run recreates the tables that the first run created."""
    monkeypatch.chdir(tmp_path)
    database = f"sqlite:///{tmp_path / 'given.db'}"

    first = run_demo(database)
    second = run_demo(database)

    assert first == 0
    assert second == 0


def test_rejects_foreign_tables(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A database with tables the demo did not create is left alone."""
    monkeypatch.chdir(tmp_path)
    database = f"sqlite:///{tmp_path / 'app.db'}"
    engine = make_engine(database)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE alertas (id INTEGER)"))
        connection.execute(text("INSERT INTO alertas VALUES (1)"))

    code = run_demo(database)
    error = capsys.readouterr().err
    with engine.connect() as connection:
        kept = connection.execute(text("SELECT id FROM alertas")).all()
    engine.dispose()

    assert code == 2
    assert "already has tables alertas" in error
    assert kept == [(1,)]


def test_unreachable_server(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    postgresql: PsycopgConnection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A database that does not exist gives exit code 2 and its URL."""
    monkeypatch.chdir(tmp_path)
    missing = url(postgresql) + "_missing"

    code = run_demo(missing)

    assert code == 2
    assert (
        "cannot connect to the V1 and V2 database" in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "command", [cli_main, module_main], ids=["sa-dualwrite", "python-m"]
)
def test_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: click.Command
) -> None:
    """Both command lines run the demo and exit with its code."""
    monkeypatch.chdir(tmp_path)
    arguments = ["--v1-url", f"sqlite:///{tmp_path / 'v1.db'}"]
    arguments += ["--v2-url", f"sqlite:///{tmp_path / 'v2.db'}"]
    if command is cli_main:
        arguments.insert(0, "demo")

    result = CliRunner().invoke(command, arguments)

    assert result.exit_code == 0, result.output
    assert "V1 and V2 agree." in result.output
