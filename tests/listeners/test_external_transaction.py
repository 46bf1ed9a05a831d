"""Sessions joined to a connection whose transaction the application owns."""

from __future__ import annotations

from sqlalchemy.orm import Session

import sa_dualwrite as dw
from tests import models
from tests.conftest import Databases
from tests.helpers import alerts, audit_rows


def test_outer_commit_syncs(dbs: Databases, install: dw.DualWrite) -> None:
    """Changes of a joined session sync when the outer transaction commits."""
    with dbs.source.connect() as connection:
        transaction = connection.begin()
        first = Session(bind=connection)
        second = Session(bind=connection)
        first.add(models.new_alerta(titulo="first"))
        first.commit()
        second.add(models.new_alerta(titulo="second"))
        second.commit()
        first.close()
        second.close()
        transaction.commit()

    titles = sorted(row.title for row in alerts(dbs.target_engine))

    assert titles == ["first", "second"]
    assert len({row.session_key for row in audit_rows(dbs.target_engine)}) == 2


def test_outer_rollback(dbs: Databases, install: dw.DualWrite) -> None:
    """An outer rollback drops the changes when V2 is the V1 engine.

    With a separate target the sync runs at the session's commit, which is
    the documented limitation for sessions joined to an outer transaction;
    the outer transaction itself is never ended by the library.
    """
    with dbs.source.connect() as connection:
        transaction = connection.begin()
        session = Session(
            bind=connection, join_transaction_mode="create_savepoint"
        )
        session.add(models.new_alerta())
        session.commit()
        session.close()
        still_open = transaction.is_active
        transaction.rollback()

    synced = len(audit_rows(dbs.target_engine))

    assert still_open
    assert synced == (1 if dbs.target is not None else 0)
