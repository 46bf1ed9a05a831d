"""install_dual_write, uninstall and create_tables."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.orm import Session

import sa_dualwrite as dw
from tests import models
from tests.helpers import audit_rows


def test_install_twice_raises(pg_engine: Engine, tmp_path: Path) -> None:
    """A second install on the same engine raises DualWriteError."""
    handle = dw.install_dual_write(pg_engine, models.mappings(), log_file=None)
    try:
        with pytest.raises(dw.DualWriteError, match="already installed"):
            dw.install_dual_write(pg_engine, models.mappings(), log_file=None)
    finally:
        handle.uninstall()


def test_reinstall_after_uninstall(pg_engine: Engine) -> None:
    """After uninstall the engine can be installed again."""
    first = dw.install_dual_write(pg_engine, models.mappings(), log_file=None)
    first.uninstall()

    second = dw.install_dual_write(pg_engine, models.mappings(), log_file=None)
    second.uninstall()

    assert not first.installed
    assert not second.installed


def test_failed_install_leaves_no_listener(pg_engine: Engine) -> None:
    """A mapping error leaves nothing installed: writes are not captured."""
    models.V1.metadata.create_all(pg_engine)
    models.V2.metadata.create_all(pg_engine)
    dw.metadata.create_all(pg_engine)
    bad = [models.alert_mapping(), models.event_mapping(), {"target": 1}]

    with pytest.raises(dw.MappingError):
        dw.install_dual_write(pg_engine, bad, log_file=None)
    with Session(pg_engine) as session:
        session.add(models.new_alerta())
        session.commit()

    assert audit_rows(pg_engine) == []
    handle = dw.install_dual_write(pg_engine, models.mappings(), log_file=None)
    handle.uninstall()


def test_uninstall_stops_capture(pg_engine: Engine) -> None:
    """After uninstall no change is captured."""
    models.V1.metadata.create_all(pg_engine)
    models.V2.metadata.create_all(pg_engine)
    handle = dw.install_dual_write(pg_engine, models.mappings(), log_file=None)
    handle.create_tables()
    handle.uninstall()

    with Session(pg_engine) as session:
        session.add(models.new_alerta())
        session.commit()

    assert audit_rows(pg_engine) == []
    assert not event.contains(
        Session, "after_commit", handle.listeners._after_commit
    )


def test_install_never_connects_to_target(pg_engine: Engine) -> None:
    """Install succeeds with a target that cannot be reached."""
    unreachable = create_engine("postgresql+psycopg://nobody@127.0.0.1:9/none")
    connects: list[object] = []
    event.listen(unreachable, "connect", lambda *args: connects.append(args))

    handle = dw.install_dual_write(
        pg_engine, models.mappings(), target=unreachable, log_file=None
    )
    handle.uninstall()

    assert connects == []


def test_create_tables_both_sides(
    pg_engine: Engine, pg_engine_v2: Engine
) -> None:
    """Audit and xref go to the target, the outbox to the source."""
    handle = dw.install_dual_write(
        pg_engine, models.mappings(), target=pg_engine_v2, log_file=None
    )
    try:
        handle.create_tables()
    finally:
        handle.uninstall()

    source_tables = set(inspect(pg_engine).get_table_names())
    target_tables = set(inspect(pg_engine_v2).get_table_names())
    assert "dualwrite_outbox" in source_tables
    assert {"dualwrite_audit", "dualwrite_xref"} <= target_tables
    assert "dualwrite_audit" not in source_tables


def test_async_engine_counts_as_same_engine(pg_engine: Engine) -> None:
    """Installing on a bad engine type raises a clear error."""
    with pytest.raises(dw.DualWriteError, match="Engine or AsyncEngine"):
        dw.install_dual_write("postgresql://x", models.mappings())  # type: ignore[arg-type]


def test_v2_timeout_must_be_positive(pg_engine: Engine) -> None:
    """A non-positive v2_timeout is rejected."""
    with pytest.raises(dw.DualWriteError, match="v2_timeout"):
        dw.install_dual_write(
            pg_engine, models.mappings(), log_file=None, v2_timeout=0
        )


def test_log_file_folder_created(pg_engine: Engine, tmp_path: Path) -> None:
    """The folder of log_file is created at install."""
    path = tmp_path / "nested" / "dir" / "dual_write.log"

    handle = dw.install_dual_write(pg_engine, models.mappings(), log_file=path)
    handle.uninstall()

    assert path.exists()


def test_v2_id_and_v1_id(pg_engine: Engine) -> None:
    """v2_id and v1_id return keys in their column types, or None."""
    models.V1.metadata.create_all(pg_engine)
    models.V2.metadata.create_all(pg_engine)
    handle = dw.install_dual_write(pg_engine, models.mappings(), log_file=None)
    try:
        handle.create_tables()
        with Session(pg_engine) as session:
            alerta = models.new_alerta()
            session.add(alerta)
            session.commit()
            alerta_id = alerta.id

        v2_id = handle.v2_id("alertas", alerta_id)

        assert isinstance(v2_id, int)
        assert handle.v1_id("alertas", v2_id) == alerta_id
        assert handle.v2_id("alertas", 10_000) is None
        with pytest.raises(dw.DualWriteError, match="unknown mapping 'nope'"):
            handle.v2_id("nope", 1)
    finally:
        handle.uninstall()
