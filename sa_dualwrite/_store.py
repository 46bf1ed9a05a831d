"""The plugin's own tables and the queries over them.

``metadata`` holds the target-side tables (audit and cross-reference) and
``outbox_metadata`` the source-side outbox, so that Alembic can include
them. All statements here are Core statements built once at import time, so
SQLAlchemy's compiled cache serves every later call.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    delete,
    insert,
    select,
)
from sqlalchemy.dialects.postgresql import JSONB

__all__ = [
    "audit_table",
    "metadata",
    "outbox_applied_table",
    "outbox_metadata",
    "outbox_table",
    "utcnow",
    "xref_table",
]

_BigId = BigInteger().with_variant(Integer(), "sqlite")
_Json = JSON(none_as_null=True).with_variant(
    JSONB(none_as_null=True), "postgresql"
)
# Mapping names are checked against this length at install time. Keys,
# session keys and actors come from the application and have no length
# limit, so that no value of its own can fail a sync or a durable flush.
MAPPING_NAME_LENGTH = 200
_Name = String(MAPPING_NAME_LENGTH)
_Key = Text()
_Text = Text()

OPERATIONS = ("insert", "update", "delete", "revert")
STATUSES = ("applied", "failed", "reverted", "replayed")
OUTBOX_STATUSES = ("pending", "done", "failed")


def utcnow() -> dt.datetime:
    """Return the current time in UTC, timezone-aware."""
    return dt.datetime.now(dt.timezone.utc)


metadata = MetaData()
"""Target-side tables: ``dualwrite_audit``, ``dualwrite_xref`` and
``dualwrite_outbox_applied``."""

outbox_metadata = MetaData()
"""Source-side table: ``dualwrite_outbox``."""

xref_table = Table(
    "dualwrite_xref",
    metadata,
    Column("mapping", _Name, primary_key=True),
    Column("v1_pk", _Key, primary_key=True),
    Column("v2_pk", _Key, nullable=False),
    Column(
        "created_at", DateTime(timezone=True), nullable=False, default=utcnow
    ),
    Index("ix_dualwrite_xref_v2_pk", "mapping", "v2_pk"),
)

audit_table = Table(
    "dualwrite_audit",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("session_key", _Text),
    Column("mapping", _Name, nullable=False),
    Column("operation", String(16), nullable=False),
    Column("v1_pk", _Key),
    Column("v2_pk", _Key),
    Column("status", String(16), nullable=False),
    Column("changes", _Json),
    Column("before", _Json),
    Column("after", _Json),
    Column("error", Text),
    Column("actor", _Text),
    Column(
        "created_at", DateTime(timezone=True), nullable=False, default=utcnow
    ),
    Column("reverted_by", _BigId),
    Index("ix_dualwrite_audit_status", "status", "mapping"),
    Index("ix_dualwrite_audit_session_key", "session_key"),
    Index("ix_dualwrite_audit_v1_pk", "mapping", "v1_pk"),
)

outbox_table = Table(
    "dualwrite_outbox",
    outbox_metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column(
        "created_at", DateTime(timezone=True), nullable=False, default=utcnow
    ),
    # Random key shared by the rows of one source transaction; it tells the
    # rows of a committed transaction apart from rows whose id a rolled-back
    # savepoint left free for reuse (SQLite reuses such ids).
    Column("transaction_key", String(32), nullable=False),
    Column("session_key", _Text),
    Column("actor", _Text),
    Column("mapping", _Name, nullable=False),
    Column("operation", String(16), nullable=False),
    Column("v1_pk", _Key, nullable=False),
    Column("changes", _Json),
    Column("status", String(16), nullable=False, default="pending"),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("last_error", Text),
    Column("audit_id", _BigId),
    Column("done_at", DateTime(timezone=True)),
    Index("ix_dualwrite_outbox_status", "status", "id"),
    Index("ix_dualwrite_outbox_transaction_key", "transaction_key"),
    sqlite_autoincrement=True,
)

outbox_applied_table = Table(
    "dualwrite_outbox_applied",
    metadata,
    Column("transaction_key", String(32), primary_key=True),
    Column("mapping", _Name, primary_key=True),
    Column("v1_pk", _Key, primary_key=True),
    Column(
        "applied_at", DateTime(timezone=True), nullable=False, default=utcnow
    ),
)
"""Outbox changes applied to a target in another database.

Written in the target transaction that applies them, so that a drain after
a crash between that commit and the outbox update knows they are done.
"""

_select_xref = select(xref_table.c.v1_pk, xref_table.c.v2_pk).where(
    xref_table.c.mapping == bindparam("mapping"),
    xref_table.c.v1_pk.in_(bindparam("keys", expanding=True)),
)
_select_xref_by_v2 = select(xref_table.c.v1_pk).where(
    xref_table.c.mapping == bindparam("mapping"),
    xref_table.c.v2_pk == bindparam("v2_pk"),
)
_insert_xref = insert(xref_table)
_delete_xref = delete(xref_table).where(
    xref_table.c.mapping == bindparam("mapping"),
    xref_table.c.v1_pk.in_(bindparam("keys", expanding=True)),
)
_insert_audit = insert(audit_table)
_insert_audit_returning = insert(audit_table).returning(
    audit_table.c.id, sort_by_parameter_order=True
)

# Large IN lists are sent in chunks of this many keys, well below the
# bind parameter limits of PostgreSQL (65535) and SQLite (32766).
CHUNK = 1000


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    """Yield consecutive slices of ``items`` of at most ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def load_xref(
    connection: Connection, mapping: str, v1_keys: Sequence[str]
) -> dict[str, str]:
    """Return ``{v1_pk: v2_pk}`` for the keys that have a cross-reference."""
    found: dict[str, str] = {}
    for part in chunks(v1_keys):
        result = connection.execute(
            _select_xref, {"mapping": mapping, "keys": list(part)}
        )
        found.update({row.v1_pk: row.v2_pk for row in result})
    return found


def v1_key_for(
    connection: Connection, mapping: str, v2_key: str
) -> str | None:
    """Return the source key text cross-referenced to ``v2_key``."""
    row = connection.execute(
        _select_xref_by_v2, {"mapping": mapping, "v2_pk": v2_key}
    ).first()
    return None if row is None else str(row.v1_pk)


def insert_xref(
    connection: Connection, rows: Sequence[dict[str, Any]]
) -> None:
    """Insert cross-reference rows ``{mapping, v1_pk, v2_pk}``."""
    if rows:
        connection.execute(_insert_xref, list(rows))


def delete_xref(
    connection: Connection, mapping: str, v1_keys: Sequence[str]
) -> None:
    """Delete the cross-reference rows of ``v1_keys`` in ``mapping``."""
    for part in chunks(v1_keys):
        connection.execute(
            _delete_xref, {"mapping": mapping, "keys": list(part)}
        )


def insert_audit(
    connection: Connection, rows: Sequence[dict[str, Any]]
) -> list[int]:
    """Insert audit rows and return their ids, in the order given."""
    if not rows:
        return []
    dialect = connection.dialect
    if len(rows) == 1 or not getattr(
        dialect, "insert_executemany_returning_sort_by_parameter_order", False
    ):
        ids = []
        for row in rows:
            result = connection.execute(_insert_audit, row)
            key = result.inserted_primary_key
            assert key is not None
            ids.append(int(key[0]))
        return ids
    result = connection.execute(_insert_audit_returning, list(rows))
    return [int(audit_id) for audit_id in result.scalars()]
