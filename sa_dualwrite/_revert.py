"""Revert and replay of synced changes, driven by the audit table."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from itertools import groupby
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Row, delete, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from sa_dualwrite import _store, signals
from sa_dualwrite._buffer import Change
from sa_dualwrite._codec import decode_key, from_json, to_json
from sa_dualwrite._context import _actor
from sa_dualwrite._errors import DualWriteError, RevertConflict, one_line
from sa_dualwrite._sync import Outcome, sync_changes
from sa_dualwrite.mapping._compile import CompiledMapping

if TYPE_CHECKING:
    from sa_dualwrite._install import DualWrite

__all__ = ["replay", "revert"]

audit = _store.audit_table
xref = _store.xref_table


def _select_for_revert(
    connection: Connection, audit_id: int | None, session_key: str | None
) -> list[Row[Any]]:
    if audit_id is not None:
        row = connection.execute(
            select(audit).where(audit.c.id == audit_id).with_for_update()
        ).first()
        if row is None:
            raise DualWriteError(
                f"audit row {audit_id} not found; check the id with "
                "'sa-dualwrite audit'"
            )
        _check_revertible(row)
        return [row]
    rows = connection.execute(
        select(audit)
        .where(
            audit.c.session_key == session_key,
            audit.c.status == "applied",
            audit.c.operation != "revert",
        )
        .order_by(audit.c.id.desc())
        .with_for_update()
    ).all()
    if not rows:
        raise DualWriteError(
            f"no applied changes for session key {session_key!r}; check "
            "the key with 'sa-dualwrite audit --session-key'"
        )
    return list(rows)


def _check_revertible(row: Row[Any]) -> None:
    if row.operation == "revert":
        raise DualWriteError(
            f"audit row {row.id} records a revert; it cannot be reverted. "
            "Revert the original change again only after replaying it"
        )
    if row.status != "applied":
        raise DualWriteError(
            f"audit row {row.id} has status {row.status!r}; only applied "
            "changes can be reverted"
        )


def _current_row(
    connection: Connection, mapping: CompiledMapping, key: tuple[Any, ...]
) -> dict[str, Any] | None:
    table = mapping.target_table
    criteria = [
        column == value
        for column, value in zip(mapping.target_pk_columns, key, strict=True)
    ]
    row = connection.execute(
        select(table).where(*criteria).with_for_update()
    ).first()
    return None if row is None else dict(row._mapping)


def _decode_image(
    mapping: CompiledMapping, image: dict[str, Any]
) -> dict[str, Any]:
    return {
        column: from_json(value, mapping.target_types.get(column))
        for column, value in image.items()
        if column in mapping.target_table.c
    }


def _same_row(
    mapping: CompiledMapping,
    current: dict[str, Any] | None,
    image: dict[str, Any] | None,
) -> bool:
    """Return whether a target row still holds the values of an image.

    Images are compared by value, so that a timestamp or a number written
    by PostgreSQL's JSON functions equals the same value written by Python.
    """
    if current is None or image is None:
        return current is None and image is None
    if set(image) - set(current):
        return False
    return _decode_image(mapping, image) == {
        column: current[column] for column in image if column in current
    }


def _encode_image(row: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if row is None else {k: to_json(v) for k, v in row.items()}


def _undo_one(
    connection: Connection,
    mapping: CompiledMapping,
    row: Row[Any],
    force: bool,
) -> dict[str, Any]:
    """Restore the target row of one audit row; return the revert row."""
    if row.v2_pk is None:
        return _revert_row(row, None, None)
    key = decode_key(row.v2_pk, mapping.target_pk_types)
    current = _current_row(connection, mapping, key)
    current_image = _encode_image(current)
    if not _same_row(mapping, current, row.after) and not force:
        raise RevertConflict(
            f"target row {mapping.target_table.name} key {row.v2_pk} changed "
            f"after audit row {row.id} was applied; inspect it, then revert "
            "with force=True (--force on the command line) to overwrite it",
            audit_id=row.id,
            expected=row.after,
            current=current_image,
        )

    table = mapping.target_table
    criteria = [
        column == value
        for column, value in zip(mapping.target_pk_columns, key, strict=True)
    ]
    restored: dict[str, Any] | None = None
    if row.before is None:
        if current is not None:
            connection.execute(delete(table).where(*criteria))
        connection.execute(
            delete(xref).where(
                xref.c.mapping == mapping.name,
                xref.c.v1_pk == row.v1_pk,
                xref.c.v2_pk == row.v2_pk,
            )
        )
    else:
        values = _decode_image(mapping, row.before)
        if current is None:
            connection.execute(insert(table).values(values))
        else:
            pk_keys = {column.key for column in mapping.target_pk_columns}
            assignments = {
                column: value
                for column, value in values.items()
                if column not in pk_keys
            }
            if assignments:
                connection.execute(
                    update(table).where(*criteria).values(assignments)
                )
        _ensure_xref(connection, mapping.name, row.v1_pk, row.v2_pk)
        restored = _current_row(connection, mapping, key)
    return _revert_row(row, current_image, _encode_image(restored))


def _ensure_xref(
    connection: Connection, mapping: str, v1_key: str | None, v2_key: str
) -> None:
    if v1_key is None:
        return
    found = _store.load_xref(connection, mapping, [v1_key])
    if v1_key not in found:
        _store.insert_xref(
            connection,
            [{"mapping": mapping, "v1_pk": v1_key, "v2_pk": v2_key}],
        )


def _revert_row(
    row: Row[Any],
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "session_key": row.session_key,
        "mapping": row.mapping,
        "operation": "revert",
        "v1_pk": row.v1_pk,
        "v2_pk": row.v2_pk,
        "status": "applied",
        "changes": {"reverted_audit_id": row.id},
        "before": before,
        "after": after,
        "error": None,
        "actor": _actor.get(),
        "reverted_by": None,
    }


def revert(
    handle: DualWrite,
    *,
    audit_id: int | None,
    session_key: str | None,
    force: bool,
) -> list[int]:
    """Undo applied changes; see :meth:`DualWrite.revert`."""
    with handle.target.begin() as connection:
        rows = _select_for_revert(connection, audit_id, session_key)
        new_rows = []
        for row in rows:
            mapping = handle._mapping(row.mapping)
            try:
                new_rows.append(_undo_one(connection, mapping, row, force))
            except SQLAlchemyError as exc:
                raise DualWriteError(
                    f"reverting audit row {row.id} ({row.operation} of "
                    f"{mapping.target_table.name} key {row.v2_pk}) failed: "
                    f"{one_line(exc)}; nothing was reverted. Revert the rows "
                    "that depend on it first, or fix the target row by hand"
                ) from exc
        new_ids = _store.insert_audit(connection, new_rows)
        for row, new_id in zip(rows, new_ids, strict=True):
            connection.execute(
                update(audit)
                .where(audit.c.id == row.id)
                .values(status="reverted", reverted_by=new_id)
            )

    for row, new_id in zip(rows, new_ids, strict=True):
        fields = {
            "audit_id": new_id,
            "v1_pk": row.v1_pk,
            "v2_pk": row.v2_pk,
            "operation": "revert",
        }
        handle.logger.info(
            "change_reverted",
            mapping=row.mapping,
            reverted_audit_id=row.id,
            session_key=row.session_key,
            **fields,
        )
        handle.applier.send(signals.change_reverted, row.mapping, **fields)
    return new_ids


# Failed changes are replayed in transactions of at most this many changes,
# so that one chunk that cannot be written stops only itself, and so that
# the row locks of a chunk stay well within PostgreSQL's lock table.
REPLAY_CHUNK = 500


def _failed_ids(
    connection: Connection, ids: Sequence[int] | None
) -> list[Row[Any]]:
    """Return the audit rows to replay, oldest first, checking given ids."""
    columns = (
        audit.c.id,
        audit.c.mapping,
        audit.c.status,
        audit.c.session_key,
    )
    statement = select(*columns).order_by(audit.c.id)
    rows: list[Row[Any]]
    if ids is None:
        rows = list(
            connection.execute(statement.where(audit.c.status == "failed"))
        )
        return rows
    rows = list(connection.execute(statement.where(audit.c.id.in_(ids))))
    found = {row.id for row in rows}
    missing = [audit_id for audit_id in ids if audit_id not in found]
    if missing:
        raise DualWriteError(f"audit rows not found: {missing}")
    for row in rows:
        if row.status != "failed":
            raise DualWriteError(
                f"audit row {row.id} has status {row.status!r}; only failed "
                "changes can be replayed"
            )
    return rows


def _skip_unknown(
    handle: DualWrite, rows: list[Row[Any]], explicit: bool
) -> list[Row[Any]]:
    """Drop rows of mappings that are not installed, logging them."""
    known = handle.mappings
    unknown = [row for row in rows if row.mapping not in known]
    if not unknown:
        return rows
    names = sorted({row.mapping for row in unknown})
    if explicit:
        raise DualWriteError(
            f"audit rows {[row.id for row in unknown]} belong to mappings "
            f"that are not installed ({', '.join(names)}); install them to "
            "replay these rows"
        )
    handle.logger.warning(
        "replay_skipped",
        mappings=names,
        audit_ids=[row.id for row in unknown][:100],
        changes=len(unknown),
        reason="mapping not installed",
    )
    return [row for row in rows if row.mapping in known]


def _change_of(handle: DualWrite, row: Row[Any]) -> Change:
    mapping = handle._mapping(row.mapping)
    return Change(
        mapping.name,
        row.operation,
        decode_key(row.v1_pk, mapping.source_pk_types),
        frozenset(row.changes or ()),
        row.actor,
    )


def _chunks_by_session(
    items: Sequence[Any], session_of: Any
) -> list[list[Any]]:
    """Split ``items`` into runs of one session key, REPLAY_CHUNK long."""
    chunks: list[list[Any]] = []
    for _, same_session in groupby(items, key=session_of):
        batch = list(same_session)
        chunks.extend(
            batch[start : start + REPLAY_CHUNK]
            for start in range(0, len(batch), REPLAY_CHUNK)
        )
    return chunks


def replay(handle: DualWrite, ids: Sequence[int] | None) -> list[int]:
    """Retry failed changes; see :meth:`DualWrite.replay`.

    Each chunk of changes is replayed in its own target transaction, which
    first locks its audit rows and skips those another replay took. A chunk
    that fails as a whole stops the replay with a DualWriteError; the chunks
    before it stay replayed.
    """
    try:
        with handle.target.connect() as connection:
            candidates = _failed_ids(connection, ids)
    except SQLAlchemyError as exc:
        raise DualWriteError(
            f"replay could not read the failed changes: {one_line(exc)}; "
            "call replay() again when the target database answers"
        ) from exc
    candidates = _skip_unknown(handle, candidates, explicit=ids is not None)
    unrecorded = handle.applier.take_unrecorded() if ids is None else []

    new_ids: list[int] = []
    audited = _chunks_by_session(candidates, lambda row: row.session_key)
    kept = _chunks_by_session(unrecorded, lambda item: item[1])
    try:
        for chunk in audited:
            new_ids.extend(_replay_audited(handle, [row.id for row in chunk]))
        while kept:
            chunk_items = kept[0]
            changes = [change for change, _ in chunk_items]
            new_ids.extend(_replay_changes(handle, changes, chunk_items[0][1]))
            kept.pop(0)
    except Exception as exc:
        for chunk_items in kept:
            handle.applier.unrecorded.extend(chunk_items)
        raise DualWriteError(
            f"replay stopped after {len(new_ids)} change(s): {exc}; fix the "
            "cause and call replay() again"
        ) from exc
    handle.logger.info("replay_finished", changes=len(new_ids))
    return new_ids


def _replay_audited(handle: DualWrite, ids: list[int]) -> list[int]:
    """Replay one chunk of failed audit rows that are still failed."""
    with handle.target.begin() as connection:
        rows = list(
            connection.execute(
                select(audit)
                .where(audit.c.id.in_(ids), audit.c.status == "failed")
                .order_by(audit.c.id)
                .with_for_update()
            )
        )
        if not rows:
            return []
        changes = [_change_of(handle, row) for row in rows]
        outcomes = _sync_chunk(
            handle, connection, changes, rows[0].session_key
        )
        connection.execute(
            update(audit)
            .where(audit.c.id.in_([row.id for row in rows]))
            .values(status="replayed")
        )
    return _reported(handle, outcomes, rows[0].session_key)


def _replay_changes(
    handle: DualWrite, changes: list[Change], session_key: str | None
) -> list[int]:
    """Replay changes that failed without an audit row."""
    with handle.target.begin() as connection:
        outcomes = _sync_chunk(handle, connection, changes, session_key)
    return _reported(handle, outcomes, session_key)


def _sync_chunk(
    handle: DualWrite,
    connection: Connection,
    changes: list[Change],
    session_key: str | None,
) -> list[Outcome]:
    handle.applier.lock_rows(connection, changes)
    if handle.in_transaction:
        return sync_changes(
            changes,
            source=connection,
            target=connection,
            mappings=handle.mappings,
            session_key=session_key,
        )
    with handle.engine.connect() as reader:
        return sync_changes(
            changes,
            source=reader,
            target=connection,
            mappings=handle.mappings,
            session_key=session_key,
        )


def _reported(
    handle: DualWrite, outcomes: list[Outcome], session_key: str | None
) -> list[int]:
    handle.applier.report(outcomes, session_key)
    return [
        outcome.audit_id
        for outcome in outcomes
        if outcome.audit_id is not None
    ]


def resync(
    handle: DualWrite,
    mapping_name: str,
    v1_pks: Sequence[Any],
    session_key: str | None,
) -> list[int]:
    """Sync source rows from their current state; see DualWrite.resync."""
    mapping = handle._mapping(mapping_name)
    key = session_key or f"resync-{uuid.uuid4()}"
    changes = [
        Change(
            mapping.name,
            "update",
            _as_key(value),
            frozenset(mapping.source_attrs),
            _actor.get(),
        )
        for value in v1_pks
    ]
    new_ids: list[int] = []
    for start in range(0, len(changes), REPLAY_CHUNK):
        chunk = changes[start : start + REPLAY_CHUNK]
        new_ids.extend(_replay_changes(handle, chunk, key))
    handle.logger.info(
        "resync_finished", mapping=mapping.name, changes=len(new_ids)
    )
    return new_ids


def _as_key(value: Any) -> tuple[Any, ...]:
    if isinstance(value, tuple):
        return value
    if isinstance(value, list):
        return tuple(value)
    return (value,)
