"""Databases with the contract-alert example's tables and dual write."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine

import sa_dualwrite as dw
from examples.contract_alerts.mappings import MAPPINGS
from examples.contract_alerts.models_v1 import V1Base
from examples.contract_alerts.models_v2 import V2Base
from examples.contract_alerts.services import dual_write_service
from tests.conftest import sqlite_engine


@dataclass
class AlertDatabases:
    """The V1 engine, the V2 engine and the installed dual write."""

    name: str
    source: Engine
    target: Engine
    dual_write: dw.DualWrite


@pytest.fixture(
    params=["pg-same", "pg-separate", "sqlite-same", "sqlite-separate"]
)
def alert_dbs(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[AlertDatabases]:
    """Example tables, dual write installed, service configured."""
    name = request.param
    owned: list[Engine] = []
    if name.startswith("pg"):
        source = request.getfixturevalue("pg_engine")
        target = (
            request.getfixturevalue("pg_engine_v2")
            if name == "pg-separate"
            else source
        )
    else:
        source = sqlite_engine(tmp_path / "v1.db")
        target = (
            sqlite_engine(tmp_path / "v2.db")
            if name == "sqlite-separate"
            else source
        )
        owned = [source] if target is source else [source, target]

    V1Base.metadata.create_all(source)
    V2Base.metadata.create_all(target)
    handle = dw.install_dual_write(
        source,
        MAPPINGS,
        target=None if target is source else target,
        log_file=tmp_path / "logs" / "dual_write.log",
    )
    handle.create_tables()
    dual_write_service.configure(source)

    yield AlertDatabases(name, source, target, handle)
    dual_write_service.configure(None)
    handle.uninstall()
    for engine in owned:
        engine.dispose()
