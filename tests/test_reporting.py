"""Signals, the JSON lines log, session keys and actors."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

import sa_dualwrite as dw
from tests import models
from tests.conftest import Databases
from tests.helpers import audit_rows


def _log_lines(handle: dw.DualWrite) -> list[dict[str, Any]]:
    assert handle.log_file is not None
    text = Path(handle.log_file).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def test_signals_applied_and_failed(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """change_applied and change_failed carry the documented arguments."""
    applied: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []

    def on_applied(sender: str, **kwargs: Any) -> None:
        applied.append({"sender": sender, **kwargs})

    def on_failed(sender: str, **kwargs: Any) -> None:
        failed.append({"sender": sender, **kwargs})

    with (
        dw.signals.change_applied.connected_to(on_applied),
        dw.signals.change_failed.connected_to(on_failed),
        Session(dbs.source) as session,
    ):
        session.add(models.new_alerta())
        session.add(models.new_alerta(status="pendente"))
        session.commit()
    first, second = audit_rows(dbs.target_engine)

    assert applied == [
        {
            "sender": "alertas",
            "audit_id": first.id,
            "v1_pk": first.v1_pk,
            "v2_pk": first.v2_pk,
            "operation": "insert",
        }
    ]
    assert len(failed) == 1
    assert failed[0]["audit_id"] == second.id
    assert failed[0]["operation"] == "insert"
    assert failed[0]["v2_pk"] is None
    assert "pendente" in failed[0]["error"]


def test_signal_receiver_error_is_contained(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """A receiver that raises does not reach the committing caller."""

    def broken(sender: str, **kwargs: Any) -> None:
        raise RuntimeError("receiver bug")

    with (
        dw.signals.change_applied.connected_to(broken),
        Session(dbs.source) as session,
    ):
        session.add(models.new_alerta())
        session.commit()

    events = [line["event"] for line in _log_lines(install)]
    assert "signal_receiver_failed" in events
    assert audit_rows(dbs.target_engine)[0].status == "applied"


def test_log_file_json_lines(dbs: Databases, install: dw.DualWrite) -> None:
    """Each change is one JSON line with the documented keys."""
    with Session(dbs.source) as session:
        session.info["dualwrite.session_key"] = "request-42"
        session.add(models.new_alerta())
        session.add(models.new_alerta(status="pendente"))
        session.commit()

    lines = _log_lines(install)
    applied = [line for line in lines if line["event"] == "change_applied"]
    failed = [line for line in lines if line["event"] == "change_failed"]

    assert lines[0]["event"] == "dual_write_installed"
    assert len(applied) == 1
    assert applied[0]["level"] == "info"
    assert applied[0]["mapping"] == "alertas"
    assert applied[0]["operation"] == "insert"
    assert applied[0]["session_key"] == "request-42"
    assert {"timestamp", "v1_pk", "v2_pk", "audit_id"} <= applied[0].keys()
    assert len(failed) == 1
    assert failed[0]["level"] == "error"
    assert "pendente" in failed[0]["error"]
    assert "Traceback" in failed[0]["exception"]


def test_stdlib_logger_receives_events(
    dbs: Databases, install: dw.DualWrite, caplog: pytest.LogCaptureFixture
) -> None:
    """The standard logger sa_dualwrite receives the events."""
    with (
        caplog.at_level(logging.INFO, logger="sa_dualwrite"),
        Session(dbs.source) as session,
    ):
        session.add(models.new_alerta())
        session.commit()

    messages = [record.getMessage() for record in caplog.records]
    assert "change_applied" in messages


def test_no_log_file(
    pg_engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """log_file=None writes no file and nothing to stdout."""
    monkeypatch.chdir(tmp_path)
    models.V1.metadata.create_all(pg_engine)
    models.V2.metadata.create_all(pg_engine)
    handle = dw.install_dual_write(pg_engine, models.mappings(), log_file=None)
    try:
        handle.create_tables()
        with Session(pg_engine) as session:
            session.add(models.new_alerta())
            session.commit()
    finally:
        handle.uninstall()

    captured = capsys.readouterr()
    assert handle.log_file is None
    assert list(tmp_path.iterdir()) == []
    assert captured.out == ""


def test_session_key_stable_per_session(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """Audit rows of one session carry its key across commits."""
    with Session(dbs.source) as session:
        key = dw.session_key(session)
        session.add(models.new_alerta())
        session.commit()
        session.add(models.new_alerta())
        session.commit()
    with Session(dbs.source) as other:
        other.add(models.new_alerta())
        other.commit()
        other_key = dw.session_key(other)

    keys = [row.session_key for row in audit_rows(dbs.target_engine)]

    assert keys == [key, key, other_key]
    assert key != other_key


def test_actor_from_session_info_and_acting_as(
    dbs: Databases, install: dw.DualWrite
) -> None:
    """acting_as wins over session.info; both reach the audit row."""
    with Session(dbs.source) as session:
        session.info["dualwrite.actor"] = "request.user"
        session.add(models.new_alerta())
        session.flush()
        with dw.acting_as("batch.job"):
            session.add(models.new_alerta())
            session.flush()
        session.commit()

    actors = [row.actor for row in audit_rows(dbs.target_engine)]

    assert actors == ["request.user", "batch.job"]


def test_log_file_write_error_contained(
    dbs: Databases, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A log file that cannot be written never fails the commit."""
    handle = dw.install_dual_write(
        dbs.source, models.mappings(), target=dbs.target, log_file="/dev/full"
    )
    try:
        handle.create_tables()
        with (
            caplog.at_level(logging.ERROR, logger="sa_dualwrite"),
            Session(dbs.source) as session,
        ):
            session.add(models.new_alerta())
            session.commit()
    finally:
        handle.uninstall()

    messages = [record.getMessage() for record in caplog.records]
    assert audit_rows(dbs.target_engine)[0].status == "applied"
    assert any(m.startswith("log_file_write_failed") for m in messages)
