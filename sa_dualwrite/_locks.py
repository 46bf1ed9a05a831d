"""Advisory locks that make syncs of the same source rows run in order.

A sync after the source commit reads the committed source rows only after
taking these locks on the PostgreSQL target, so of two syncs of one row the
one that writes last has read the latest committed row. A sync locks each
of its rows exclusively, after taking its mappings' locks shared; a sync of
more than ``ROW_LOCK_LIMIT`` rows of one mapping takes that mapping's lock
exclusively instead of one lock per row, which keeps PostgreSQL's lock
table (``max_locks_per_transaction``) from filling up. Locks are taken in
one fixed order, mappings first, so that two syncs cannot deadlock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from sa_dualwrite._buffer import Change
from sa_dualwrite._codec import encode_key

__all__ = ["ROW_LOCK_LIMIT", "lock_id", "lock_plan"]

ROW_LOCK_LIMIT = 1000

# Both forms take (keys bigint[], exclusive boolean[]) and lock in array
# order, which unnest() keeps.
LOCK_SQL = (
    "SELECT count(CASE WHEN exclusive THEN pg_advisory_xact_lock(key)::text "
    "ELSE pg_advisory_xact_lock_shared(key)::text END) FROM "
    "unnest(CAST(%(keys)s AS bigint[]), CAST(%(modes)s AS boolean[])) "
    "AS locks(key, exclusive)"
)


def lock_id(mapping: str, v1_key: str) -> int:
    """Return the 64-bit advisory lock id of one source row."""
    digest = hashlib.blake2b(
        f"{mapping}\x00{v1_key}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big", signed=True)


def _mapping_lock_id(mapping: str) -> int:
    digest = hashlib.blake2b(f"{mapping}\x01".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def lock_plan(changes: Sequence[Change]) -> dict[str, list[Any]]:
    """Return the parameters of LOCK_SQL for ``changes``."""
    rows: dict[str, set[str]] = {}
    for change in changes:
        rows.setdefault(change.mapping, set()).add(encode_key(change.v1_pk))
    mappings = sorted(
        (_mapping_lock_id(name), len(keys) > ROW_LOCK_LIMIT)
        for name, keys in rows.items()
    )
    row_ids = sorted(
        lock_id(name, key)
        for name, keys in rows.items()
        if len(keys) <= ROW_LOCK_LIMIT
        for key in keys
    )
    keys = [key for key, _ in mappings] + row_ids
    modes = [exclusive for _, exclusive in mappings] + [True] * len(row_ids)
    return {"keys": keys, "modes": modes}
