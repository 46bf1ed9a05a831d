"""Fixtures for durable mode: an install that writes the outbox."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import sa_dualwrite as dw
from tests import models
from tests.conftest import Databases


@pytest.fixture
def durable(dbs: Databases, tmp_path: Path) -> Iterator[dw.DualWrite]:
    """Dual write in durable mode, with fast retries, tables created."""
    handle = dw.install_dual_write(
        dbs.source,
        models.mappings(),
        target=dbs.target,
        log_file=tmp_path / "logs" / "dual_write.log",
        durable=True,
        max_attempts=3,
        retry_delay=0.0,
    )
    handle.create_tables()
    yield handle
    handle.uninstall()
