"""Captured changes and the per-transaction buffer that coalesces them.

A :class:`Change` is one row operation on a mapped source object, reduced to
plain values. A :class:`ChangeBuffer` belongs to one session transaction (the
root transaction or a savepoint) and keeps at most one change per row: later
changes to the same row merge into the earlier one, so a transaction yields
one change per row with its final operation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Change", "ChangeBuffer"]

INSERT = "insert"
UPDATE = "update"
DELETE = "delete"

RowKey = tuple[str, tuple[Any, ...]]


@dataclass(slots=True)
class Change:
    """One captured row operation on a mapped source object.

    ``changed`` names the source attributes that changed (every mapped
    attribute for an insert). ``values`` carries source values that the
    capture already knows from the database, such as the rows returned by
    a bulk statement; it may be empty, in which case the sync reads them.
    """

    mapping: str
    operation: str
    v1_pk: tuple[Any, ...]
    changed: frozenset[str] = frozenset()
    actor: str | None = None
    values: dict[str, Any] | None = field(default=None)

    @property
    def key(self) -> RowKey:
        """The row this change is about: mapping name and source key."""
        return (self.mapping, self.v1_pk)


def _merge(earlier: Change, later: Change) -> Change | None:
    """Return the single change equivalent to ``earlier`` then ``later``.

    Returns None when the two cancel out (an insert then a delete).
    """
    changed = earlier.changed | later.changed
    actor = later.actor if later.actor is not None else earlier.actor
    first, second = earlier.operation, later.operation
    if first == INSERT and second == DELETE:
        return None
    if second == DELETE:
        operation = DELETE
    elif first == INSERT:
        operation = INSERT
    else:
        # update+update stays an update; delete then insert of the same key
        # leaves the row in place with new values, which is an update too.
        operation = UPDATE
    values = None if operation == DELETE else later.values
    return Change(
        earlier.mapping, operation, earlier.v1_pk, changed, actor, values
    )


class ChangeBuffer:
    """Changes of one transaction, one per row, in flush order.

    A merged change keeps the position where its row was first captured,
    except that a delete moves it to the end: a row is deleted after the
    rows inserted before its deletion, which keeps foreign keys valid.
    """

    __slots__ = ("_changes",)

    def __init__(self) -> None:
        self._changes: dict[RowKey, Change] = {}

    def __bool__(self) -> bool:
        return bool(self._changes)

    def __len__(self) -> int:
        return len(self._changes)

    def add(self, change: Change) -> None:
        """Record ``change``, merging it with an earlier one of its row."""
        key = change.key
        earlier = self._changes.get(key)
        if earlier is None:
            self._changes[key] = change
            return
        merged = _merge(earlier, change)
        if merged is None:
            del self._changes[key]
        elif merged.operation == DELETE or earlier.operation == DELETE:
            del self._changes[key]
            self._changes[key] = merged
        else:
            self._changes[key] = merged

    def merge_into(self, parent: ChangeBuffer) -> None:
        """Add every change of this buffer to ``parent``, in order."""
        for change in self._changes.values():
            parent.add(change)

    def changes(self) -> list[Change]:
        """Return the buffered changes in flush order."""
        return list(self._changes.values())

    def clear(self) -> None:
        """Forget every buffered change."""
        self._changes.clear()
