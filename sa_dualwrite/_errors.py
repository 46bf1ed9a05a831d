"""Exceptions raised by sa_dualwrite.

Every error derives from :class:`DualWriteError`::

    DualWriteError
     ├── MappingError        a mapping is invalid (raised at install time)
     ├── SyncError           one change could not be applied to the target
     ├── RevertConflict      a target row changed after the change to revert
     └── UnsyncedWriteError  a write on a source table cannot be synced

Errors about one row carry ``mapping``, ``operation`` and ``v1_pk`` and chain
the database error that caused them.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "DualWriteError",
    "MappingError",
    "RevertConflict",
    "SyncError",
    "UnsyncedWriteError",
]


class DualWriteError(Exception):
    """Root of every error raised by sa_dualwrite."""


class MappingError(DualWriteError):
    """Raised when a mapping cannot be used as declared.

    Raised by :func:`~sa_dualwrite.install_dual_write`,
    :func:`~sa_dualwrite.load_mappings` and the :class:`~sa_dualwrite.Mapping`
    model, before any row is written. The message names the mapping, the
    field and the fix.
    """

    def __init__(
        self,
        message: str,
        *,
        mapping: str | None = None,
        field: str | None = None,
    ) -> None:
        prefix = ""
        if mapping is not None and field is not None:
            prefix = f"mapping {mapping!r}, field {field!r}: "
        elif mapping is not None:
            prefix = f"mapping {mapping!r}: "
        elif field is not None:
            prefix = f"field {field!r}: "
        super().__init__(prefix + message)
        self.detail = message
        self.mapping = mapping
        self.field = field


class SyncError(DualWriteError):
    """Raised inside the library when one change cannot reach the target.

    The library never lets it reach the code that committed the source
    transaction: its text becomes the ``error`` of the change's audit row,
    the ``change_failed`` log event and signal.
    """

    def __init__(
        self,
        message: str,
        *,
        mapping: str,
        operation: str,
        v1_pk: Any,
    ) -> None:
        super().__init__(message)
        self.mapping = mapping
        self.operation = operation
        self.v1_pk = v1_pk


class RevertConflict(DualWriteError):
    """Raised by ``revert`` when a target row changed after the change.

    ``audit_id`` names the audit row whose ``after`` image no longer matches
    the target row; ``current`` and ``expected`` hold both images. Pass
    ``force=True`` to revert anyway.
    """

    def __init__(
        self,
        message: str,
        *,
        audit_id: int,
        expected: dict[str, Any] | None,
        current: dict[str, Any] | None,
    ) -> None:
        super().__init__(message)
        self.audit_id = audit_id
        self.expected = expected
        self.current = current


class UnsyncedWriteError(DualWriteError):
    """Raised for a write on a source table that cannot be synced.

    Raised only when dual write was installed with
    ``unsynced_writes="raise"``; by default such a write is logged as the
    ``unsynced_write`` warning event instead. Typical causes are a Core
    ``connection.execute()`` of an INSERT, UPDATE or DELETE outside any
    ORM session, or a statement whose written rows cannot be identified.
    ``table``, ``operation`` and ``reason`` describe the write. When the
    error is raised before the statement runs, nothing was written.
    """

    def __init__(
        self, message: str, *, table: str, operation: str, reason: str
    ) -> None:
        super().__init__(message)
        self.table = table
        self.operation = operation
        self.reason = reason


def one_line(exc: BaseException) -> str:
    """Return the first line of an error, with its type, for a message."""
    original = getattr(exc, "orig", None)
    source = original if original is not None else exc
    text = str(source).strip()
    first = text.splitlines()[0] if text else ""
    return (
        f"{type(source).__name__}: {first}" if first else type(source).__name__
    )
