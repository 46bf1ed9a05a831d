"""Installs for the write-path tests, in strict mode.

The installs here raise ``UnsyncedWriteError`` for any write they cannot
sync, so a test fails if a write path that should be synced is not seen,
or if a statement of the ORM or of the plugin is taken for an unsynced
write.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import sa_dualwrite as dw
from tests import models
from tests.conftest import Databases
from tests.listeners import models as paths_models


@pytest.fixture
def strict(dbs: Databases, tmp_path: Path) -> Iterator[dw.DualWrite]:
    """The alert mappings installed with unsynced_writes="raise"."""
    handle = dw.install_dual_write(
        dbs.source,
        models.mappings(),
        target=dbs.target,
        log_file=tmp_path / "logs" / "dual_write.log",
        unsynced_writes="raise",
    )
    handle.create_tables()
    yield handle
    handle.uninstall()


@pytest.fixture
def hierarchy(dbs: Databases, tmp_path: Path) -> Iterator[dw.DualWrite]:
    """The inheritance and reminder mappings, installed in strict mode."""
    paths_models.PathsV1.metadata.create_all(dbs.source)
    paths_models.PathsV2.metadata.create_all(dbs.target_engine)
    handle = dw.install_dual_write(
        dbs.source,
        paths_models.mappings(),
        target=dbs.target,
        log_file=tmp_path / "logs" / "dual_write.log",
        unsynced_writes="raise",
    )
    handle.create_tables()
    yield handle
    handle.uninstall()
