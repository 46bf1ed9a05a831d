"""Durable mode: the outbox written in the source transaction."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine, event, insert, text, update
from sqlalchemy.orm import Session

import sa_dualwrite as dw
from sa_dualwrite import _outbox
from sa_dualwrite._buffer import Change
from sa_dualwrite._store import outbox_applied_table, outbox_table
from tests import models
from tests.conftest import Databases
from tests.durable.helpers import (
    leave_pending,
    leave_pending_update,
    outbox_rows,
)
from tests.helpers import alert_for, alerts, audit_rows, count


def test_commit_marks_outbox_done(
    dbs: Databases, durable: dw.DualWrite
) -> None:
    """A synced commit leaves its outbox rows done."""
    with Session(dbs.source) as session:
        alerta = models.new_alerta()
        session.add(alerta)
        session.commit()
        alerta_id = alerta.id

    rows = outbox_rows(dbs.source)

    assert alert_for(durable, alerta_id).title == "Alerta de renovação"
    assert [row.status for row in rows] == ["done"]
    assert rows[0].operation == "insert"
    assert rows[0].v1_pk == str(alerta_id)


def test_rollback_leaves_no_outbox_row(
    dbs: Databases, durable: dw.DualWrite
) -> None:
    """A rolled-back transaction writes no outbox row."""
    with Session(dbs.source) as session:
        session.add(models.new_alerta())
        session.flush()
        session.rollback()

    assert outbox_rows(dbs.source) == []


def test_savepoint_rollback_drops_rows(
    dbs: Databases, durable: dw.DualWrite
) -> None:
    """A rolled-back savepoint drops exactly its own outbox rows."""
    with Session(dbs.source) as session:
        session.add(models.new_alerta(titulo="outer"))
        session.flush()
        savepoint = session.begin_nested()
        session.add(models.new_alerta(titulo="inner, rolled back"))
        session.flush()
        savepoint.rollback()
        with session.begin_nested():
            session.add(models.new_alerta(titulo="inner, released"))
        session.commit()

    rows = outbox_rows(dbs.source)

    assert len(rows) == 2
    assert {row.status for row in rows} == {"done"}
    assert [row.title for row in alerts(dbs.target_engine)] == [
        "outer",
        "inner, released",
    ]


def test_flush_writes_one_insert(
    dbs: Databases, durable: dw.DualWrite
) -> None:
    """A flush of many objects writes the outbox with one statement."""
    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, many):  # type: ignore[no-untyped-def]
        if "dualwrite_outbox" in statement and "INSERT" in statement:
            statements.append(statement)

    event.listen(dbs.source, "before_cursor_execute", record)
    try:
        with Session(dbs.source) as session:
            session.add_all([models.new_alerta() for _ in range(50)])
            session.commit()
    finally:
        event.remove(dbs.source, "before_cursor_execute", record)

    # With V2 in the V1 database on PostgreSQL the rows are written by the
    # pipelined sync, which SQLAlchemy's cursor events do not see.
    assert len(statements) <= 1
    assert len(outbox_rows(dbs.source, status="done")) == 50


def test_missing_outbox_fails_write(
    dbs: Databases, durable: dw.DualWrite
) -> None:
    """Without the outbox table the source write fails, with the fix."""
    dw.outbox_metadata.drop_all(dbs.source)

    with Session(dbs.source) as session:
        session.add(models.new_alerta())
        with pytest.raises(dw.DualWriteError, match="create_tables"):
            session.commit()

    with Session(dbs.source) as session:
        assert session.query(models.Alerta).count() == 0


def test_drain_applies_left_rows(
    dbs: Databases, durable: dw.DualWrite
) -> None:
    """drain() applies the rows a dead process left pending."""
    first = leave_pending(durable, titulo="first")
    second = leave_pending(durable, titulo="second")

    result = durable.drain()
    again = durable.drain()

    assert (result.applied, result.failed, result.parked) == (2, 0, 0)
    assert again.rows == 0
    assert alert_for(durable, first).title == "first"
    assert alert_for(durable, second).title == "second"
    assert {row.status for row in outbox_rows(dbs.source)} == {"done"}
    assert [a.session_key for a in audit_rows(dbs.target_engine)] == [
        "crashed",
        "crashed",
    ]


def test_failing_change_is_parked(
    dbs: Databases, durable: dw.DualWrite
) -> None:
    """A change the target rejects is retried, then parked."""
    with Session(dbs.source) as session:
        alerta = models.new_alerta(titulo="REJECTED BY V2")
        session.add(alerta)
        session.commit()

    after_commit = outbox_rows(dbs.source)
    first = durable.drain()
    second = durable.drain()
    rows = outbox_rows(dbs.source)
    audits = audit_rows(dbs.target_engine)

    assert after_commit[0].status == "pending"
    assert after_commit[0].attempts == 1
    assert (first.failed, first.parked) == (1, 0)
    assert (second.failed, second.parked) == (0, 1)
    assert rows[0].status == "failed"
    assert rows[0].attempts == 3
    assert (
        "ck_alerts_title" in rows[0].last_error
        or "CHECK" in rows[0].last_error
    )
    assert [a.status for a in audits] == ["replayed", "replayed", "failed"]
    assert rows[0].audit_id == audits[-1].id


def test_replay_requeues_parked(dbs: Databases, durable: dw.DualWrite) -> None:
    """replay() applies a parked change once its source row is fixed."""
    with Session(dbs.source) as session:
        alerta = models.new_alerta(titulo="REJECTED BY V2")
        session.add(alerta)
        session.commit()
        alerta_id = alerta.id
    durable.drain()
    durable.drain()
    parked = outbox_rows(dbs.source)
    with dbs.source.begin() as connection:
        connection.execute(
            update(models.Alerta.__table__).values(titulo="fixed")
        )

    new_ids = durable.replay()
    audits = audit_rows(dbs.target_engine)

    assert parked[0].status == "failed"
    assert alert_for(durable, alerta_id).title == "fixed"
    assert [row.status for row in outbox_rows(dbs.source)] == ["done"]
    assert len(new_ids) == 1
    assert [a.status for a in audits] == [
        "replayed",
        "replayed",
        "replayed",
        "applied",
    ]


def test_replay_takes_waiting_retries(
    dbs: Databases, durable: dw.DualWrite
) -> None:
    """replay() also applies a failed change still waiting for a retry."""
    with Session(dbs.source) as session:
        alerta = models.new_alerta(titulo="REJECTED BY V2")
        session.add(alerta)
        session.commit()
        alerta_id = alerta.id
    waiting = outbox_rows(dbs.source)
    with dbs.source.begin() as connection:
        connection.execute(
            update(models.Alerta.__table__).values(titulo="fixed")
        )

    new_ids = durable.replay()

    assert waiting[0].status == "pending"
    assert waiting[0].audit_id is not None
    assert len(new_ids) == 1
    assert alert_for(durable, alerta_id).title == "fixed"
    assert [row.status for row in outbox_rows(dbs.source)] == ["done"]


def test_drain_trusts_applied_record(
    dbs: Databases, durable: dw.DualWrite
) -> None:
    """A change the target recorded as applied is not applied again."""
    with Session(dbs.source) as session:
        session.add(models.new_alerta())
        session.commit()
    with dbs.source.begin() as connection:
        connection.execute(
            update(outbox_table).values(status="pending", done_at=None)
        )

    result = durable.drain()
    audits = audit_rows(dbs.target_engine)

    assert result.applied == 1
    assert [row.status for row in outbox_rows(dbs.source)] == ["done"]
    if dbs.target is None:
        assert len(audits) == 2
    else:
        assert len(audits) == 1


def test_status_counts_rows(dbs: Databases, durable: dw.DualWrite) -> None:
    """status() counts pending, parked, applied and failed per mapping."""
    leave_pending(durable)
    with Session(dbs.source) as session:
        session.add(models.new_alerta())
        session.add(models.new_alerta(titulo="REJECTED BY V2"))
        session.commit()

    by_name = {entry.mapping: entry for entry in durable.status()}
    alertas = by_name["alertas"]

    assert alertas.pending == 2
    assert alertas.applied == 1
    assert alertas.failed == 1
    assert alertas.parked == 0
    assert alertas.lag is not None
    assert alertas.lag >= 0
    assert by_name["acoes"].pending == 0
    assert by_name["acoes"].lag is None


def test_prune_deletes_done_rows(
    dbs: Databases, durable: dw.DualWrite
) -> None:
    """prune() deletes done rows and the applied records they needed."""
    leave_pending(durable)
    with Session(dbs.source) as session:
        session.add(models.new_alerta())
        session.commit()

    deleted = durable.prune(0)

    assert deleted == 1
    assert [row.status for row in outbox_rows(dbs.source)] == ["pending"]
    assert count(dbs.target_engine, outbox_applied_table) == 0


def test_cancelled_changes_leave_nothing_pending(
    dbs: Databases, durable: dw.DualWrite
) -> None:
    """An insert then a delete in one transaction leaves no pending row."""
    with Session(dbs.source) as session:
        alerta = models.new_alerta()
        session.add(alerta)
        session.flush()
        session.delete(alerta)
        session.commit()

    statuses = {row.status for row in outbox_rows(dbs.source)}

    assert statuses <= {"done"}
    assert audit_rows(dbs.target_engine) == []


@pytest.mark.parametrize("separate", [False, True], ids=["same-db", "two-dbs"])
def test_poison_row_does_not_block_drain(
    pg_engine: Engine, pg_engine_v2: Engine, tmp_path: Path, separate: bool
) -> None:
    """A row that fails its whole batch is isolated; the others drain."""
    target = pg_engine_v2 if separate else pg_engine
    models.V1.metadata.create_all(pg_engine)
    models.V2.metadata.create_all(target)
    handle = dw.install_dual_write(
        pg_engine,
        models.mappings(),
        target=target if separate else None,
        log_file=None,
        durable=True,
        max_attempts=2,
        retry_delay=0.0,
    )
    handle.create_tables()
    try:
        first = leave_pending(handle, titulo="first")
        poison = leave_pending(handle, titulo="poison")
        last = leave_pending(handle, titulo="last")
        with target.begin() as connection:
            connection.execute(
                text(
                    "CREATE FUNCTION reject_audit() RETURNS trigger AS $$ "
                    f"BEGIN IF NEW.v1_pk = '{poison}' THEN RAISE EXCEPTION "
                    "'audit row rejected'; END IF; RETURN NEW; END $$ "
                    "LANGUAGE plpgsql"
                )
            )
            connection.execute(
                text(
                    "CREATE TRIGGER reject_audit BEFORE INSERT ON "
                    "dualwrite_audit FOR EACH ROW EXECUTE FUNCTION "
                    "reject_audit()"
                )
            )

        result = handle.drain()
        again = handle.drain()

        rows = {row.v1_pk: row for row in outbox_rows(pg_engine)}
        assert result.applied == 2
        assert result.error is None
        assert rows[str(first)].status == "done"
        assert rows[str(last)].status == "done"
        assert rows[str(poison)].status == "failed"
        assert rows[str(poison)].attempts == 2
        assert again.parked == 1
    finally:
        handle.uninstall()


@pytest.mark.parametrize("sessions", ["one-session", "one-session-each"])
def test_locked_row_does_not_park_others(
    pg_engine: Engine, pg_engine_v2: Engine, sessions: str
) -> None:
    """A locked target row fails alone; the rest of its batch applies."""
    models.V1.metadata.create_all(pg_engine)
    models.V2.metadata.create_all(pg_engine_v2)
    handle = dw.install_dual_write(
        pg_engine,
        models.mappings(),
        target=pg_engine_v2,
        log_file=None,
        durable=True,
        max_attempts=2,
        retry_delay=600.0,
    )
    handle.create_tables()
    try:
        ids = [leave_pending(handle, titulo=f"alerta {n}") for n in range(3)]
        assert handle.drain().applied == 3
        for alerta_id in ids:
            session_key = (
                "crashed" if sessions == "one-session" else f"s{alerta_id}"
            )
            leave_pending_update(
                handle, alerta_id, titulo="changed", session_key=session_key
            )
        locked_key = handle.v2_id("alertas", ids[0])

        with pg_engine_v2.connect() as locker, locker.begin():
            locker.execute(
                text("SELECT 1 FROM alerts WHERE id = :id FOR UPDATE"),
                {"id": locked_key},
            )
            first = handle.drain(timeout=1.0)
            updates = outbox_rows(pg_engine, operation="update")
            second = handle.drain(timeout=1.0)

        assert first.applied == 2
        assert first.failed == 1
        assert [row.attempts for row in updates] == [1, 0, 0]
        assert [row.status for row in updates] == ["pending", "done", "done"]
        assert second.rows == 0
    finally:
        handle.uninstall()


def test_lock_wait_at_commit_counts_no_attempt(
    pg_engine: Engine, pg_engine_v2: Engine
) -> None:
    """A commit's sync that times out on a lock leaves its rows due."""
    models.V1.metadata.create_all(pg_engine)
    models.V2.metadata.create_all(pg_engine_v2)
    handle = dw.install_dual_write(
        pg_engine,
        models.mappings(),
        target=pg_engine_v2,
        log_file=None,
        durable=True,
        v2_timeout=1.0,
        max_attempts=2,
    )
    handle.create_tables()
    try:
        with Session(pg_engine) as session:
            alertas = [models.new_alerta(titulo=f"alerta {n}") for n in (1, 2)]
            session.add_all(alertas)
            session.commit()
            locked_key = handle.v2_id("alertas", alertas[0].id)
            with pg_engine_v2.connect() as locker, locker.begin():
                locker.execute(
                    text("SELECT 1 FROM alerts WHERE id = :id FOR UPDATE"),
                    {"id": locked_key},
                )
                for alerta in alertas:
                    alerta.titulo = "changed"
                session.commit()
        updates = outbox_rows(pg_engine, operation="update")
        result = handle.drain()

        assert [row.status for row in updates] == ["pending", "pending"]
        assert [row.attempts for row in updates] == [0, 0]
        assert result.applied == 2
    finally:
        handle.uninstall()


def test_unknown_mapping_stays_pending(
    dbs: Databases, durable: dw.DualWrite, caplog: pytest.LogCaptureFixture
) -> None:
    """A row of a mapping the handle lacks is kept, with an error logged."""
    change = Change("gone", "insert", (1,), frozenset({"titulo"}))
    with dbs.source.begin() as connection:
        _outbox.insert_rows(
            connection,
            _outbox.new_rows(
                [change], transaction_key="t1", session_key="crashed"
            ),
        )

    result = durable.drain()
    rows = outbox_rows(dbs.source)

    assert result.failed == 1
    assert result.parked == 0
    assert rows[0].status == "pending"
    assert rows[0].attempts == 0
    assert "mapping 'gone' is not installed" in rows[0].last_error
    assert "drain_mapping_not_installed" in caplog.messages


def test_drain_merges_one_transaction(
    dbs: Databases, durable: dw.DualWrite
) -> None:
    """Rows of one transaction merge even with other rows between them."""
    table = models.Alerta.__table__
    values = {
        "contrato_id": "123/2026",
        "titulo": "first",
        "responsavel": "gestor.silva",
        "prazo": 30,
        "status": "ativo",
    }
    with dbs.source.begin() as connection:
        first, second = (
            connection.execute(
                insert(table).values(values).returning(table.c.id)
            ).scalar_one()
            for _ in range(2)
        )
        columns = frozenset(values)
        for change, transaction_key in [
            (Change("alertas", "insert", (first,), columns), "t1"),
            (Change("alertas", "insert", (second,), columns), "t2"),
            (
                Change("alertas", "update", (first,), frozenset({"titulo"})),
                "t1",
            ),
        ]:
            _outbox.insert_rows(
                connection,
                _outbox.new_rows(
                    [change],
                    transaction_key=transaction_key,
                    session_key=f"session-{transaction_key}",
                ),
            )

    result = durable.drain()
    audits = audit_rows(dbs.target_engine)

    assert result.applied == 3
    assert sorted((a.v1_pk, a.operation) for a in audits) == [
        (str(first), "insert"),
        (str(second), "insert"),
    ]


def test_unmapped_value_marks_outbox(
    dbs: Databases, durable: dw.DualWrite, caplog: pytest.LogCaptureFixture
) -> None:
    """A change failing before the write counts an attempt at commit."""
    with Session(dbs.source) as session:
        session.add(models.new_alerta(titulo="good"))
        session.add(models.new_alerta(titulo="bad", status="unknown"))
        session.commit()

    rows = outbox_rows(dbs.source)
    audits = audit_rows(dbs.target_engine)

    assert [row.status for row in rows] == ["done", "pending"]
    assert [row.attempts for row in rows] == [0, 1]
    assert [a.status for a in audits] == ["applied", "failed"]
    assert rows[1].audit_id == audits[1].id
    assert "outbox_update_failed" not in caplog.messages


def test_drain_drops_cancelled_insert(
    dbs: Databases, durable: dw.DualWrite
) -> None:
    """An insert and delete in one transaction write no audit row."""
    table = models.Alerta.__table__
    values = {
        "contrato_id": "123/2026",
        "titulo": "inserted again",
        "responsavel": "gestor.silva",
        "prazo": 30,
        "status": "ativo",
    }
    with dbs.source.begin() as connection:
        alerta_id = connection.execute(
            insert(table).values(values).returning(table.c.id)
        ).scalar_one()
        columns = frozenset(values)
        for operation, transaction_key in [
            ("insert", "t1"),
            ("delete", "t1"),
            ("insert", "t2"),
        ]:
            _outbox.insert_rows(
                connection,
                _outbox.new_rows(
                    [Change("alertas", operation, (alerta_id,), columns)],
                    transaction_key=transaction_key,
                    session_key=f"session-{transaction_key}",
                ),
            )

    result = durable.drain()
    audits = audit_rows(dbs.target_engine)

    assert result.applied == 3
    assert [(a.operation, a.session_key) for a in audits] == [
        ("insert", "session-t2")
    ]
    assert alert_for(durable, alerta_id).title == "inserted again"


def test_batch_keeps_transaction_whole(
    dbs: Databases, durable: dw.DualWrite
) -> None:
    """A batch limit never splits one transaction's insert and delete."""
    rows = []
    for operation in ("insert", "delete"):
        change = Change("alertas", operation, (999,), frozenset({"titulo"}))
        rows += _outbox.new_rows(
            [change], transaction_key="t1", session_key="s1"
        )
    with dbs.source.begin() as connection:
        _outbox.insert_rows(connection, rows)

    result = durable.drain(batch_size=1)

    assert result.applied == 2
    assert audit_rows(dbs.target_engine) == []
    assert [row.status for row in outbox_rows(dbs.source)] == ["done"] * 2
