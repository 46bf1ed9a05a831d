"""Revert and replay of synced changes, driven by the audit table."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Row, delete, insert, select, update

from sa_dualwrite import _store, signals
from sa_dualwrite._buffer import Change
from sa_dualwrite._codec import decode_key, from_json, to_json
from sa_dualwrite._context import _actor
from sa_dualwrite._errors import DualWriteError, RevertConflict
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
    if current_image != row.after and not force:
        raise RevertConflict(
            f"target row {mapping.target_table.name} key {row.v2_pk} changed "
            f"after audit row {row.id} was applied; inspect it, then revert "
            "with force=True to overwrite it",
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
            new_rows.append(_undo_one(connection, mapping, row, force))
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


def _select_failed(
    connection: Connection, ids: Sequence[int] | None
) -> list[Row[Any]]:
    statement = select(audit).order_by(audit.c.id).with_for_update()
    if ids is None:
        return list(
            connection.execute(statement.where(audit.c.status == "failed"))
        )
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


def _change_of(handle: DualWrite, row: Row[Any]) -> Change:
    mapping = handle._mapping(row.mapping)
    return Change(
        mapping.name,
        row.operation,
        decode_key(row.v1_pk, mapping.source_pk_types),
        frozenset(row.changes or ()),
        row.actor,
    )


def replay(handle: DualWrite, ids: Sequence[int] | None) -> list[int]:
    """Retry failed changes; see :meth:`DualWrite.replay`."""
    unrecorded = handle.applier.take_unrecorded() if ids is None else []
    reports: list[tuple[list[Outcome], str | None]] = []
    try:
        with handle.target.begin() as connection:
            source = connection if handle.in_transaction else None
            rows = _select_failed(connection, ids)
            work: list[tuple[str | None, list[Change], list[int]]] = []
            for key, same_session in groupby(
                rows, key=lambda row: row.session_key
            ):
                batch = list(same_session)
                work.append(
                    (
                        key,
                        [_change_of(handle, row) for row in batch],
                        [row.id for row in batch],
                    )
                )
            for key, unaudited in groupby(
                unrecorded, key=lambda item: item[1]
            ):
                work.append((key, [change for change, _ in unaudited], []))
            reports = _replay_work(handle, connection, source, work)
    except Exception:
        for change, key in unrecorded:
            handle.applier.unrecorded.append((change, key))
        raise

    new_ids: list[int] = []
    for outcomes, key in reports:
        handle.applier.report(outcomes, key)
        new_ids.extend(
            outcome.audit_id
            for outcome in outcomes
            if outcome.audit_id is not None
        )
    handle.logger.info("replay_finished", changes=len(new_ids))
    return new_ids


def _replay_work(
    handle: DualWrite,
    connection: Connection,
    source: Connection | None,
    work: list[tuple[str | None, list[Change], list[int]]],
) -> list[tuple[list[Outcome], str | None]]:
    reports = []
    own_source = source is None
    reader = source if source is not None else handle.engine.connect()
    try:
        all_changes = [change for _, changes, _ in work for change in changes]
        handle.applier.lock_rows(connection, all_changes)
        for key, changes, old_ids in work:
            outcomes = sync_changes(
                changes,
                source=reader,
                target=connection,
                mappings=handle.mappings,
                session_key=key,
            )
            if old_ids:
                connection.execute(
                    update(audit)
                    .where(audit.c.id.in_(old_ids))
                    .values(status="replayed")
                )
            reports.append((outcomes, key))
    finally:
        if own_source:
            reader.close()
    return reports
