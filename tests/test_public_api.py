"""The public surface of sa_dualwrite stays complete and sorted."""

from __future__ import annotations

import logging
import subprocess
import sys

import sa_dualwrite

DOCUMENTED = {
    "DualWriteError",
    "Mapping",
    "MappingError",
    "RevertConflict",
    "acting_as",
    "compute",
    "const",
    "copy",
    "install_dual_write",
    "load_mappings",
    "metadata",
    "outbox_metadata",
    "ref",
    "session_key",
    "signals",
    "values",
}


def test_all_sorted_and_importable() -> None:
    """__all__ is sorted and every name in it exists."""
    names = sa_dualwrite.__all__

    assert names == sorted(names)
    for name in names:
        assert hasattr(sa_dualwrite, name), name


def test_documented_names_exported() -> None:
    """Every documented public name is in __all__."""
    assert set(sa_dualwrite.__all__) >= DOCUMENTED


def test_errors_share_one_root() -> None:
    """Every error class derives from DualWriteError."""
    for error in (
        sa_dualwrite.MappingError,
        sa_dualwrite.RevertConflict,
        sa_dualwrite.SyncError,
        sa_dualwrite.UnsyncedWriteError,
    ):
        assert issubclass(error, sa_dualwrite.DualWriteError)
        assert error.__doc__


def test_signals_named() -> None:
    """The three documented signals exist."""
    signals = sa_dualwrite.signals

    assert signals.change_applied.name == "change_applied"
    assert signals.change_failed.name == "change_failed"
    assert signals.change_reverted.name == "change_reverted"


def test_import_configures_no_logging() -> None:
    """Importing the library configures neither logging nor structlog."""
    script = (
        "import logging, sa_dualwrite\n"
        "root = logging.getLogger()\n"
        "library = logging.getLogger('sa_dualwrite')\n"
        "print(len(root.handlers), root.level, logging.root.manager.disable)\n"
        "print(sorted(type(h).__name__ for h in library.handlers))\n"
        "import structlog\n"
        "print(structlog.is_configured())\n"
    )

    completed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
    )

    root_line, library_line, structlog_line = completed.stdout.splitlines()
    assert root_line == f"0 {logging.WARNING} 0"
    assert library_line == "['NullHandler']"
    assert structlog_line == "False"
