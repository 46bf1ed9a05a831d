"""The sa-dualwrite command line, against PostgreSQL V1 and V2 databases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

import sa_dualwrite as dw
from sa_dualwrite.cli import main
from tests import models
from tests.durable.helpers import leave_pending, outbox_rows
from tests.helpers import alert_for, audit_rows

MAPPINGS = "tests.models:mappings"


@pytest.fixture
def app(
    pg_engine: Engine, pg_engine_v2: Engine, tmp_path: Path
) -> Iterator[dw.DualWrite]:
    """The application's durable install on PostgreSQL V1 and V2."""
    models.V1.metadata.create_all(pg_engine)
    models.V2.metadata.create_all(pg_engine_v2)
    handle = dw.install_dual_write(
        pg_engine,
        models.mappings(),
        target=pg_engine_v2,
        log_file=tmp_path / "app.log",
        durable=True,
        max_attempts=2,
        retry_delay=0.0,
    )
    handle.create_tables()
    yield handle
    handle.uninstall()


def url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def run(app: dw.DualWrite, tmp_path: Path, *args: str) -> Result:
    """Run the command line with the app's databases and mappings."""
    options = [
        "--v1-url",
        url(app.engine),
        "--v2-url",
        url(app.target),
        "--mappings",
        MAPPINGS,
        "--log-file",
        str(tmp_path / "cli.log"),
    ]
    return CliRunner().invoke(main, [args[0], *options, *args[1:]])


def rejected(app: dw.DualWrite) -> int:
    """Commit an alerta that V2 rejects, and drain it until parked."""
    with Session(app.engine) as session:
        alerta = models.new_alerta(titulo="REJECTED BY V2")
        session.add(alerta)
        session.commit()
        alerta_id = alerta.id
    app.drain()
    return alerta_id


def test_status_table(app: dw.DualWrite, tmp_path: Path) -> None:
    """status prints one line per mapping with the pending count."""
    leave_pending(app)
    leave_pending(app)

    result = run(app, tmp_path, "status")
    lines = result.output.splitlines()

    assert result.exit_code == 0
    assert lines[0].split() == [
        "MAPPING",
        "PENDING",
        "PARKED",
        "APPLIED",
        "FAILED",
        "LAG_S",
    ]
    assert lines[2].split()[:5] == ["alertas", "2", "0", "0", "0"]
    assert float(lines[2].split()[5]) >= 0


def test_status_json(app: dw.DualWrite, tmp_path: Path) -> None:
    """status --format json reports counts and lag per mapping."""
    rejected(app)

    result = run(app, tmp_path, "status", "--format", "json")
    entries = {entry["mapping"]: entry for entry in json.loads(result.output)}

    assert result.exit_code == 0
    assert entries["alertas"]["parked"] == 1
    assert entries["alertas"]["failed"] == 1
    assert entries["alertas"]["pending"] == 0
    assert entries["alertas"]["lag"] is None


def test_audit_filters_status(app: dw.DualWrite, tmp_path: Path) -> None:
    """audit --status failed lists only the failed rows, as JSON."""
    with Session(app.engine) as session:
        session.add(models.new_alerta())
        session.commit()
    rejected(app)

    result = run(
        app, tmp_path, "audit", "--status", "failed", "--format", "json"
    )
    rows = json.loads(result.output)

    assert result.exit_code == 0
    assert [row["status"] for row in rows] == ["failed"]
    assert "ck_alerts_title" in rows[0]["error"]


def test_audit_table_by_key(app: dw.DualWrite, tmp_path: Path) -> None:
    """audit --v1-pk --since lists the rows of one V1 row as a table."""
    with Session(app.engine) as session:
        alerta = models.new_alerta()
        session.add(alerta)
        session.commit()
        alerta.status = "resolvido"
        session.commit()
        alerta_id = alerta.id
        session.add(models.new_alerta())
        session.commit()

    result = run(
        app, tmp_path, "audit", "--v1-pk", str(alerta_id), "--since", "1h"
    )
    lines = result.output.splitlines()

    assert result.exit_code == 0
    assert len(lines) == 3
    assert lines[1].split()[4:6] == ["update", "applied"]
    assert lines[2].split()[4:6] == ["insert", "applied"]


def test_audit_rejects_bad_time(app: dw.DualWrite, tmp_path: Path) -> None:
    """audit --since with an unreadable time is a usage error."""
    result = run(app, tmp_path, "audit", "--since", "yesterday")

    assert result.exit_code == 2
    assert "is not an ISO 8601 time" in result.output


def test_revert_dry_run(app: dw.DualWrite, tmp_path: Path) -> None:
    """revert --dry-run shows the change and writes nothing."""
    with Session(app.engine) as session:
        alerta = models.new_alerta()
        session.add(alerta)
        session.commit()
        alerta.titulo = "Novo título"
        session.commit()
        alerta_id = alerta.id
    update_id = audit_rows(app.target, operation="update")[0].id

    result = run(app, tmp_path, "revert", str(update_id), "--dry-run")

    assert result.exit_code == 0
    assert 'title: "Novo título" -> "Alerta de renovação"' in result.output
    assert "nothing was written" in result.output
    assert alert_for(app, alerta_id).title == "Novo título"
    assert audit_rows(app.target, id=update_id)[0].status == "applied"


def test_revert_conflict_exit(app: dw.DualWrite, tmp_path: Path) -> None:
    """revert of a row changed since exits 3 unless --force."""
    with Session(app.engine) as session:
        alerta = models.new_alerta()
        session.add(alerta)
        session.commit()
        alerta_id = alerta.id
    insert_id = audit_rows(app.target)[0].id
    table = models.Alert.__table__
    with app.target.begin() as connection:
        connection.execute(update(table).values(title="edited in V2"))

    dry = run(app, tmp_path, "revert", str(insert_id), "--dry-run")
    refused = run(app, tmp_path, "revert", str(insert_id))
    forced = run(app, tmp_path, "revert", str(insert_id), "--force")

    assert dry.exit_code == 3
    assert "needs --force" in dry.output
    assert refused.exit_code == 3
    assert refused.output.startswith("conflict: target row alerts")
    assert forced.exit_code == 0
    assert forced.output.startswith("reverted 1 changes")
    assert app.v2_id("alertas", alerta_id) is None


def test_revert_needs_one_target(app: dw.DualWrite, tmp_path: Path) -> None:
    """revert without an audit id or session key is a usage error."""
    result = run(app, tmp_path, "revert")

    assert result.exit_code == 2
    assert "give an AUDIT_ID or --session-key" in result.output


def test_replay_applies_parked(app: dw.DualWrite, tmp_path: Path) -> None:
    """replay requeues a parked change and applies the fixed V1 row."""
    alerta_id = rejected(app)
    with app.engine.begin() as connection:
        connection.execute(
            update(models.Alerta.__table__).values(titulo="fixed")
        )

    result = run(app, tmp_path, "replay")

    assert result.exit_code == 0
    assert result.output.strip() == "replayed 1 changes: 1 applied, 0 failed"
    assert alert_for(app, alerta_id).title == "fixed"


def test_replay_requeue_only(app: dw.DualWrite, tmp_path: Path) -> None:
    """replay --requeue-only puts parked changes back as pending."""
    rejected(app)

    result = run(app, tmp_path, "replay", "--requeue-only")

    assert result.exit_code == 0
    assert result.output.strip() == "requeued 1 outbox changes"
    assert [row.status for row in outbox_rows(app.engine)] == ["pending"]


def test_worker_once_drains(app: dw.DualWrite, tmp_path: Path) -> None:
    """worker --once applies the pending changes and exits 0."""
    first = leave_pending(app)
    second = leave_pending(app)

    result = run(app, tmp_path, "worker", "--once", "--log-level", "error")

    assert result.exit_code == 0
    assert "worker stopped: 2 applied, 0 failed, 0 parked" in result.output
    assert app.v2_id("alertas", first) is not None
    assert app.v2_id("alertas", second) is not None


def test_missing_v1_url(tmp_path: Path) -> None:
    """A command without a V1 URL exits 2 with a one-line error."""
    result = CliRunner().invoke(
        main,
        ["status", "--mappings", MAPPINGS],
        env={"SA_DUALWRITE_V1_URL": ""},
    )

    assert result.exit_code == 2
    assert result.output.startswith("error: no V1 database given")
    assert len(result.output.splitlines()) == 1


def test_unknown_mappings_module(app: dw.DualWrite, tmp_path: Path) -> None:
    """A mappings import string that does not import exits 2."""
    result = CliRunner().invoke(
        main,
        ["status", "--v1-url", url(app.engine), "--mappings", "nowhere:X"],
    )

    assert result.exit_code == 2
    assert "cannot import module 'nowhere'" in result.output


def test_unreachable_database(tmp_path: Path) -> None:
    """A V1 database that refuses connections exits 1, saying why."""
    result = CliRunner().invoke(
        main,
        [
            "status",
            "--v1-url",
            "postgresql+psycopg://postgres@127.0.0.1:1/none",
            "--mappings",
            MAPPINGS,
            "--log-file",
            str(tmp_path / "cli.log"),
        ],
    )

    lines = result.output.splitlines()
    assert result.exit_code == 1
    assert len(lines) == 2
    assert lines[0].startswith("error: cannot read the audit table")
    assert lines[1].startswith("error: cannot read the outbox")
    assert "OperationalError" in lines[1]


def test_config_file(app: dw.DualWrite, tmp_path: Path) -> None:
    """A TOML config names the databases and a mapping file."""
    mapping_file = tmp_path / "mappings.toml"
    mapping_file.write_text(
        "[[mappings]]\n"
        'name = "alertas"\n'
        'source = "tests.models:Alerta"\n'
        'target = "tests.models:Alert"\n'
        "[mappings.fields]\n"
        'contract_ref = "contrato_id"\n'
        'title = "titulo"\n'
        'owner_login = "responsavel"\n'
        'state = { from = "status", values = { ativo = "active" } }\n'
        'created_at = "criado_em"\n'
    )
    config = tmp_path / "sa-dualwrite.toml"
    config.write_text(
        f'v1_url = "{url(app.engine)}"\n'
        f'v2_url = "{url(app.target)}"\n'
        'mappings = "mappings.toml"\n'
        f'log_file = "{tmp_path / "cli.log"}"\n'
    )
    leave_pending(app)

    result = CliRunner().invoke(
        main, ["status", "--config", str(config), "--format", "json"]
    )

    assert result.exit_code == 0
    assert [entry["mapping"] for entry in json.loads(result.output)] == [
        "alertas"
    ]


def test_config_rejects_unknown_key(tmp_path: Path) -> None:
    """A misspelled config key exits 2 and names the key."""
    config = tmp_path / "sa-dualwrite.toml"
    config.write_text('v1_ulr = "sqlite://"\n')

    result = CliRunner().invoke(main, ["status", "--config", str(config)])

    assert result.exit_code == 2
    assert "v1_ulr: Extra inputs are not permitted" in result.output


def test_help_names_units(tmp_path: Path) -> None:
    """worker --help states the unit of each timing option."""
    result = CliRunner().invoke(main, ["worker", "--help"])

    assert result.exit_code == 0
    for option in ("--timeout", "--idle", "--max-backoff", "--retention"):
        assert option in result.output
    assert result.output.count("Seconds") >= 3


def test_demo_is_listed() -> None:
    """The demo command is still part of the command line."""
    result = CliRunner().invoke(main, ["demo", "--help"])

    assert result.exit_code == 0
    assert "--v1-url" in result.output


def _environment() -> dict[str, str]:
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_worker_stops_on_sigterm(app: dw.DualWrite, tmp_path: Path) -> None:
    """A real worker process drains, then exits 0 on SIGTERM."""
    alerta_id = leave_pending(app)
    command = [
        str(Path(sys.executable).parent / "sa-dualwrite"),
        "worker",
        "--v1-url",
        url(app.engine),
        "--v2-url",
        url(app.target),
        "--mappings",
        MAPPINGS,
        "--log-file",
        str(tmp_path / "worker.log"),
        "--idle",
        "0.2",
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_environment(),
    )
    try:
        deadline = time.monotonic() + 30
        while app.v2_id("alertas", alerta_id) is None:
            assert time.monotonic() < deadline, "the worker applied nothing"
            assert process.poll() is None, process.stderr.read()  # type: ignore[union-attr]
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    lines = (tmp_path / "worker.log").read_text().splitlines()
    events = [json.loads(line)["event"] for line in lines]

    assert process.returncode == 0
    assert "worker stopped: 1 applied" in stdout
    assert "worker_stopped" in stderr
    assert "worker_stopped" in events


def test_replay_still_failing(app: dw.DualWrite, tmp_path: Path) -> None:
    """replay exits 4 when a change fails again."""
    rejected(app)

    result = run(app, tmp_path, "replay")

    assert result.exit_code == 4
    assert result.output.strip() == "replayed 1 changes: 0 applied, 1 failed"


def test_config_inline_mappings(app: dw.DualWrite, tmp_path: Path) -> None:
    """A config file may hold its mappings as [[mappings]] tables."""
    config = tmp_path / "sa-dualwrite.toml"
    config.write_text(
        f'v1_url = "{url(app.engine)}"\n'
        f'v2_url = "{url(app.target)}"\n'
        f'log_file = "{tmp_path / "cli.log"}"\n'
        "[[mappings]]\n"
        'name = "alertas"\n'
        'source = "tests.models:Alerta"\n'
        'target = "tests.models:Alert"\n'
        "[mappings.fields]\n"
        'contract_ref = "contrato_id"\n'
        'title = "titulo"\n'
        'owner_login = "responsavel"\n'
        'state = { from = "status", values = { ativo = "active" } }\n'
        'created_at = "criado_em"\n'
    )
    alerta_id = leave_pending(app)

    result = CliRunner().invoke(
        main, ["worker", "--config", str(config), "--once"]
    )

    assert result.exit_code == 0
    assert "1 applied" in result.output
    assert app.v2_id("alertas", alerta_id) is not None


def run_with(
    app: dw.DualWrite, tmp_path: Path, v2_url: str, *args: str
) -> Result:
    """Run the command line with the app's V1 database and ``v2_url``."""
    options = [
        "--v1-url",
        url(app.engine),
        "--v2-url",
        v2_url,
        "--mappings",
        MAPPINGS,
        "--log-file",
        str(tmp_path / "cli.log"),
    ]
    return CliRunner().invoke(main, [args[0], *options, *args[1:]])


CLOSED_PORT_URL = "postgresql+psycopg://postgres@127.0.0.1:1/none"


def test_status_without_v2(app: dw.DualWrite, tmp_path: Path) -> None:
    """status still shows the outbox when V2 cannot be reached."""
    leave_pending(app)

    result = run_with(app, tmp_path, CLOSED_PORT_URL, "status")

    lines = result.output.splitlines()
    assert result.exit_code == 1
    assert lines[1].split()[:5] == ["acoes", "0", "0", "?", "?"]
    assert lines[2].split()[:5] == ["alertas", "1", "0", "?", "?"]
    assert lines[-1].startswith("error: cannot read the audit table")


def test_status_without_outbox(app: dw.DualWrite, tmp_path: Path) -> None:
    """status reports a V1 database that has no outbox table."""
    result = CliRunner().invoke(
        main,
        [
            "status",
            "--v1-url",
            url(app.target),
            "--mappings",
            MAPPINGS,
            "--log-file",
            str(tmp_path / "cli.log"),
        ],
    )

    assert result.exit_code == 1
    assert "error: table dualwrite_outbox not found" in result.output


def test_worker_once_fails(app: dw.DualWrite, tmp_path: Path) -> None:
    """worker --once exits 1 when its drain could not reach V2."""
    leave_pending(app)

    result = run_with(app, tmp_path, CLOSED_PORT_URL, "worker", "--once")

    assert result.exit_code == 1
    assert "error: the drain failed" in result.output
    assert [row.attempts for row in outbox_rows(app.engine)] == [0]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("raise RuntimeError('broken')\n", "importing module"),
        ("def MAPPINGS(name):\n    return []\n", "calling"),
        ("MAPPINGS = []\n", "is an empty list"),
        ("MAPPINGS = None\n", "is None"),
    ],
    ids=["import-error", "needs-arguments", "empty", "none"],
)
def test_bad_mappings_module(
    app: dw.DualWrite,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    source: str,
    message: str,
) -> None:
    """A mappings module that fails is one line and exit status 2."""
    module = tmp_path / f"bad_mappings_{os.getpid()}_{len(source)}.py"
    module.write_text(source)
    monkeypatch.chdir(tmp_path)

    result = CliRunner().invoke(
        main,
        [
            "status",
            "--v1-url",
            url(app.engine),
            "--mappings",
            f"{module.stem}:MAPPINGS",
            "--log-file",
            str(tmp_path / "cli.log"),
        ],
    )

    assert result.exit_code == 2
    assert result.output.startswith("error: ")
    assert message in result.output
    assert len(result.output.splitlines()) == 1


def test_missing_mapping_file(app: dw.DualWrite, tmp_path: Path) -> None:
    """A mapping file that does not exist is a usage error."""
    result = CliRunner().invoke(
        main,
        [
            "status",
            "--v1-url",
            url(app.engine),
            "--mappings",
            str(tmp_path / "nowhere.toml"),
        ],
    )

    assert result.exit_code == 2
    assert "mapping file" in result.output
    assert "not found" in result.output


def test_worker_rejects_nan(app: dw.DualWrite, tmp_path: Path) -> None:
    """A timing option that is not a finite number is rejected."""
    result = run(app, tmp_path, "worker", "--once", "--idle", "nan")

    assert result.exit_code == 2
    assert "not a finite number" in result.output
