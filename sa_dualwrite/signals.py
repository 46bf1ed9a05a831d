"""Blinker signals sent after each change is synced, fails or is reverted.

Every signal is sent with the mapping name as sender and these keyword
arguments: ``audit_id`` (int, or None when the audit row could not be
written because the target was unreachable), ``v1_pk`` and ``v2_pk`` (the
keys as stored in the audit table, text or None) and ``operation``
(``insert``, ``update``, ``delete`` or ``revert``). ``change_failed`` also
gets ``error``, the error text.

Signals are sent after the source commit has returned from the database,
from the thread that committed. A receiver that raises is logged and does
not stop the other receivers or the commit.
"""

from __future__ import annotations

from blinker import Namespace

__all__ = ["change_applied", "change_failed", "change_reverted"]

_signals = Namespace()

change_applied = _signals.signal(
    "change_applied",
    doc="Sent for each change written to the target.",
)
change_failed = _signals.signal(
    "change_failed",
    doc="Sent for each change that could not be written to the target.",
)
change_reverted = _signals.signal(
    "change_reverted",
    doc="Sent for each applied change undone by revert().",
)
