"""The PostgreSQL sync path: few statements, same outcomes as the general."""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    BigInteger,
    Connection,
    Date,
    DateTime,
    Engine,
    Float,
    Identity,
    Numeric,
    String,
    Uuid,
    delete,
    event,
    func,
    select,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sa_dualwrite as dw
from sa_dualwrite._locks import lock_id
from tests import models
from tests.helpers import alert_for, alerts, audit_rows, xrefs


@pytest.fixture(params=["pg-same", "pg-separate"])
def pg_install(
    request: pytest.FixtureRequest, pg_engine: Engine, tmp_path: Path
) -> Iterator[dw.DualWrite]:
    """Dual write on PostgreSQL, V2 in the same or in a second database."""
    target = None
    if request.param == "pg-separate":
        target = request.getfixturevalue("pg_engine_v2")
    models.V1.metadata.create_all(pg_engine)
    models.V2.metadata.create_all(target if target is not None else pg_engine)
    handle = dw.install_dual_write(
        pg_engine, models.mappings(), target=target, log_file=None
    )
    handle.create_tables()
    yield handle
    handle.uninstall()


def test_reinsert_over_stale_xref_updates(
    pg_install: dw.DualWrite, caplog: pytest.LogCaptureFixture
) -> None:
    """A new row whose key has a stale cross-reference updates its row."""
    caplog.set_level(logging.DEBUG, logger="sa_dualwrite")
    engine = pg_install.engine
    with Session(engine) as session:
        session.add(models.new_alerta(id=500, titulo="first"))
        session.commit()
    with engine.begin() as connection:
        connection.execute(
            delete(models.Alerta).where(models.Alerta.id == 500)
        )
    with Session(engine) as session:
        session.add(models.new_alerta(id=500, titulo="second"))
        session.commit()

    rows = alerts(pg_install.target)
    audits = audit_rows(pg_install.target)

    assert [row.title for row in rows] == ["second"]
    assert alert_for(pg_install, 500).title == "second"
    assert [a.operation for a in audits] == ["insert", "update"]
    assert [a.status for a in audits] == ["applied", "applied"]
    assert list(xrefs(pg_install.target, "alertas")) == ["500"]
    if not pg_install.in_transaction:
        # With V2 in the source database the cross-reference is read with
        # the source row, so the first attempt already updates.
        assert "sync_retried_change_by_change" in caplog.messages


def test_audit_ids_follow_change_order(pg_install: dw.DualWrite) -> None:
    """Audit rows of a many-row commit are numbered in flush order."""
    with Session(pg_install.engine) as session:
        session.add_all(
            [models.new_alerta(titulo=f"alert {n}") for n in range(50)]
        )
        session.commit()

    audits = audit_rows(pg_install.target)
    keys = xrefs(pg_install.target, "alertas")

    assert [int(a.v1_pk) for a in audits] == sorted(int(k) for k in keys)
    assert [a.after["title"] for a in audits] == [
        f"alert {n}" for n in range(50)
    ]
    assert all(keys[a.v1_pk] == a.v2_pk for a in audits)


def test_failed_row_leaves_batch_applied(pg_install: dw.DualWrite) -> None:
    """One rejected row among many fails alone; the rest is applied."""
    titles = [f"alert {n}" for n in range(20)]
    titles[7] = "REJECTED BY V2"
    with Session(pg_install.engine) as session:
        session.add_all([models.new_alerta(titulo=title) for title in titles])
        session.commit()

    audits = audit_rows(pg_install.target)
    statuses = [a.status for a in audits]

    assert statuses == ["applied"] * 7 + ["failed"] + ["applied"] * 12
    assert len(alerts(pg_install.target)) == 19
    assert len(xrefs(pg_install.target, "alertas")) == 19


def test_timeouts_restored_before_commit(
    pg_engine: Engine, tmp_path: Path
) -> None:
    """The sync's time budget does not outlive it in the V1 transaction."""
    models.V1.metadata.create_all(pg_engine)
    models.V2.metadata.create_all(pg_engine)
    handle = dw.install_dual_write(pg_engine, models.mappings(), log_file=None)
    handle.create_tables()
    seen: list[Any] = []

    def record(connection: Connection) -> None:
        seen.append(
            connection.exec_driver_sql(
                "SELECT current_setting('statement_timeout'), "
                "current_setting('lock_timeout')"
            ).one()
        )

    event.listen(pg_engine, "commit", record)
    try:
        with Session(pg_engine) as session:
            session.execute(models.Alerta.__table__.select().limit(0))
            session.connection().exec_driver_sql(
                "SET LOCAL statement_timeout = '17s'"
            )
            session.add(models.new_alerta())
            session.commit()
    finally:
        event.remove(pg_engine, "commit", record)
        handle.uninstall()

    assert len(audit_rows(pg_engine)) == 1
    assert tuple(seen[0]) == ("17s", "0")


def test_locked_row_fails_within_budget(
    pg_engine: Engine, pg_engine_v2: Engine
) -> None:
    """A sync waiting on a locked row gives up when the budget runs out."""
    models.V1.metadata.create_all(pg_engine)
    models.V2.metadata.create_all(pg_engine_v2)
    handle = dw.install_dual_write(
        pg_engine,
        models.mappings(),
        target=pg_engine_v2,
        log_file=None,
        v2_timeout=0.5,
    )
    handle.create_tables()
    key = lock_id("alertas", "700")
    try:
        with pg_engine_v2.connect() as holder, holder.begin():
            holder.execute(select(func.pg_advisory_xact_lock(key)))
            with Session(pg_engine) as session:
                session.add(models.new_alerta(id=700))
                started = time.monotonic()
                session.commit()
                elapsed = time.monotonic() - started
    finally:
        handle.uninstall()

    (audit,) = audit_rows(pg_engine_v2)

    assert elapsed < 2.0
    assert audit.status == "failed"
    assert "timed out" in audit.error


class _Base(DeclarativeBase):
    pass


class _Reading(_Base):
    """A source row with a value of each type the JSON insert accepts."""

    __tablename__ = "readings"

    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column(String(20))
    count: Mapped[int | None] = mapped_column(BigInteger)
    flag: Mapped[bool | None]
    amount: Mapped[Decimal | None] = mapped_column(Numeric(10, 2))
    ratio: Mapped[float | None] = mapped_column(Float)
    seen_at: Mapped[dt.datetime | None] = mapped_column(
        DateTime(timezone=True)
    )
    local_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    day: Mapped[dt.date | None] = mapped_column(Date)
    token: Mapped[uuid.UUID | None] = mapped_column(Uuid)


class _Copy(_Base):
    __tablename__ = "reading_copies"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    label: Mapped[str] = mapped_column(String(20))
    count: Mapped[int | None] = mapped_column(BigInteger)
    flag: Mapped[bool | None]
    amount: Mapped[Decimal | None] = mapped_column(Numeric(10, 2))
    ratio: Mapped[float | None] = mapped_column(Float)
    seen_at: Mapped[dt.datetime | None] = mapped_column(
        DateTime(timezone=True)
    )
    local_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    day: Mapped[dt.date | None] = mapped_column(Date)
    token: Mapped[uuid.UUID | None] = mapped_column(Uuid)


_COLUMNS = [
    "label",
    "count",
    "flag",
    "amount",
    "ratio",
    "seen_at",
    "local_at",
    "day",
    "token",
]


def test_batch_insert_keeps_values(pg_engine: Engine) -> None:
    """A many-row commit copies each value exactly as the source has it."""
    _Base.metadata.create_all(pg_engine)
    mapping = dw.Mapping(
        name="readings",
        source=_Reading,
        target=_Copy,
        fields={name: name for name in _COLUMNS},
    )
    handle = dw.install_dual_write(pg_engine, [mapping], log_file=None)
    handle.create_tables()
    moment = dt.datetime(2026, 3, 1, 12, 30, 15, 120000)
    west = dt.timezone(dt.timedelta(hours=-3))
    batch = [
        _Reading(
            id=n,
            label=f"r{n}",
            count=2**40 + n,
            flag=n % 2 == 0,
            amount=Decimal("12.5") + n,
            ratio=0.1 * n,
            seen_at=moment.replace(tzinfo=west),
            local_at=moment,
            day=moment.date(),
            token=uuid.UUID(int=n),
        )
        for n in range(1, 4)
    ]
    batch.append(_Reading(id=9, label="naive", seen_at=moment))
    batch.append(_Reading(id=10, label="empty"))
    statements: list[str] = []

    def record(*args: Any) -> None:
        statements.append(args[2])

    event.listen(pg_engine, "before_cursor_execute", record)
    try:
        with Session(pg_engine) as session:
            session.add_all(batch)
            session.commit()
    finally:
        event.remove(pg_engine, "before_cursor_execute", record)
        handle.uninstall()

    with pg_engine.connect() as connection:
        sources = connection.execute(
            select(_Reading.__table__).order_by(_Reading.id)
        ).all()
        copies = connection.execute(
            select(_Copy.__table__).order_by(_Copy.id)
        ).all()
    audits = audit_rows(pg_engine)

    assert len(copies) == 5
    assert [a.status for a in audits] == ["applied"] * 5
    for source, copy in zip(sources, copies, strict=True):
        for name in _COLUMNS:
            assert getattr(copy, name) == getattr(source, name), name


def test_update_of_vanished_target_row(pg_install: dw.DualWrite) -> None:
    """An update whose target row was deleted out of band fails alone."""
    with Session(pg_install.engine) as session:
        kept = models.new_alerta(titulo="kept")
        gone = models.new_alerta(titulo="gone")
        session.add_all([kept, gone])
        session.commit()
        kept_id, gone_id = kept.id, gone.id
    gone_v2 = pg_install.v2_id("alertas", gone_id)
    with pg_install.target.begin() as connection:
        connection.execute(
            delete(models.Alert).where(models.Alert.id == gone_v2)
        )
    with Session(pg_install.engine) as session:
        for alerta_id in (kept_id, gone_id):
            alerta = session.get(models.Alerta, alerta_id)
            assert alerta is not None
            alerta.titulo = f"{alerta.titulo}, changed"
        session.commit()

    audits = audit_rows(pg_install.target)[2:]

    assert [a.status for a in audits] == ["applied", "failed"]
    assert "no longer exists" in audits[1].error
    assert alert_for(pg_install, kept_id).title == "kept, changed"


def test_locked_target_row_within_budget(
    pg_engine: Engine, pg_engine_v2: Engine
) -> None:
    """An update waiting on a locked target row stops at the budget."""
    models.V1.metadata.create_all(pg_engine)
    models.V2.metadata.create_all(pg_engine)
    handle = dw.install_dual_write(
        pg_engine, models.mappings(), log_file=None, v2_timeout=0.5
    )
    handle.create_tables()
    try:
        with Session(pg_engine) as session:
            alerta = models.new_alerta()
            session.add(alerta)
            session.commit()
            v2_id = handle.v2_id("alertas", alerta.id)
            with pg_engine.connect() as holder, holder.begin():
                holder.execute(
                    select(models.Alert.id)
                    .where(models.Alert.id == v2_id)
                    .with_for_update()
                )
                alerta.titulo = "changed"
                started = time.monotonic()
                session.commit()
                elapsed = time.monotonic() - started
    finally:
        handle.uninstall()

    audits = audit_rows(pg_engine)

    assert elapsed < 2.0
    assert [a.status for a in audits] == ["applied", "failed"]
    assert "v2_timeout" in audits[1].error


def test_locked_audit_table_within_budget(pg_engine: Engine) -> None:
    """Failed audit rows waiting on a locked audit table stop in time."""
    models.V1.metadata.create_all(pg_engine)
    models.V2.metadata.create_all(pg_engine)
    handle = dw.install_dual_write(
        pg_engine, models.mappings(), log_file=None, v2_timeout=0.5
    )
    handle.create_tables()
    try:
        with Session(pg_engine) as session:
            alerta = models.new_alerta()
            session.add(alerta)
            session.commit()
            v2_id = handle.v2_id("alertas", alerta.id)
            with pg_engine.connect() as holder, holder.begin():
                holder.execute(
                    select(models.Alert.id)
                    .where(models.Alert.id == v2_id)
                    .with_for_update()
                )
                holder.execute(
                    text("LOCK TABLE dualwrite_audit IN ACCESS EXCLUSIVE MODE")
                )
                # Without the library's own bound the commit would wait for
                # the holder, in this same thread, for ever: fail instead.
                session.connection().exec_driver_sql(
                    "SET lock_timeout = '10s'"
                )
                alerta.titulo = "changed"
                started = time.monotonic()
                session.commit()
                elapsed = time.monotonic() - started
        kept = handle.applier.take_unrecorded()
    finally:
        handle.uninstall()

    assert elapsed < 3.0
    assert [change.mapping for change, _ in kept] == ["alertas"]
