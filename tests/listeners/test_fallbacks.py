"""Statements on a table without RETURNING, and the comparison helper."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import bindparam, delete, insert, update
from sqlalchemy.orm import Session

import sa_dualwrite as dw
from sa_dualwrite._errors import UnsyncedWriteError
from tests.conftest import Databases
from tests.helpers import audit_rows
from tests.listeners.checks import differences
from tests.listeners.models import Lembrete


def seed(engine: Any, *dias: int) -> list[int]:
    with Session(engine) as session:
        rows = [Lembrete(texto=f"Lembrete {d}", dias=d) for d in dias]
        session.add_all(rows)
        session.commit()
        return [row.id for row in rows]


def test_update_without_returning_syncs(
    dbs: Databases, hierarchy: dw.DualWrite
) -> None:
    """Without RETURNING, the keys of an UPDATE are read before it runs."""
    first, second, third = seed(dbs.source, 1, 5, 9)

    with Session(dbs.source) as session:
        session.execute(
            update(Lembrete)
            .where(Lembrete.dias > 3)
            .values(dias=Lembrete.dias * 10)
        )
        session.commit()

    updates = audit_rows(dbs.target_engine, operation="update")

    assert differences(hierarchy) == []
    assert sorted(row.v1_pk for row in updates) == sorted(
        [str(second), str(third)]
    )
    assert first not in [int(row.v1_pk) for row in updates]


def test_delete_without_returning_syncs(
    dbs: Databases, hierarchy: dw.DualWrite
) -> None:
    """Without RETURNING, the keys of a DELETE are read before it runs."""
    first, second = seed(dbs.source, 1, 5)

    with Session(dbs.source) as session:
        session.execute(delete(Lembrete).where(Lembrete.dias == 5))
        session.commit()

    assert differences(hierarchy) == []
    assert hierarchy.v2_id("lembretes", second) is None
    assert hierarchy.v2_id("lembretes", first) is not None


def test_insert_with_keys_without_returning_syncs(
    dbs: Databases, hierarchy: dw.DualWrite
) -> None:
    """Without RETURNING, rows inserted with their keys are synced."""
    with Session(dbs.source) as session:
        session.execute(
            insert(Lembrete),
            [{"id": 10, "texto": "a"}, {"id": 11, "texto": "b"}],
        )
        session.execute(insert(Lembrete).values(texto="c"))
        session.commit()

    assert differences(hierarchy) == []
    assert hierarchy.v2_id("lembretes", 11) is not None


def test_bulk_update_without_returning_syncs(
    dbs: Databases, hierarchy: dw.DualWrite
) -> None:
    """Without RETURNING, a bulk UPDATE by key takes the keys it was given."""
    first, second = seed(dbs.source, 1, 5)

    with Session(dbs.source) as session:
        session.execute(
            update(Lembrete),
            [{"id": first, "texto": "x"}, {"id": second, "texto": "y"}],
        )
        session.bulk_update_mappings(Lembrete, [{"id": first, "dias": 2}])
        session.commit()

    assert differences(hierarchy) == []
    assert len(audit_rows(dbs.target_engine, operation="update")) == 2


def test_insert_without_keys_raises(
    dbs: Databases, hierarchy: dw.DualWrite
) -> None:
    """Rows inserted without keys and without RETURNING cannot be synced."""
    with Session(dbs.source) as session:
        with pytest.raises(UnsyncedWriteError) as caught:
            session.execute(insert(Lembrete), [{"texto": "a"}, {"texto": "b"}])
        session.rollback()

    assert caught.value.table == "lembretes"
    assert caught.value.operation == "insert"
    assert "keys of the inserted rows are unknown" in str(caught.value)


def test_differences_sees_unsynced_change(
    dbs: Databases, hierarchy: dw.DualWrite
) -> None:
    """The comparison helper reports a source change that was not synced."""
    (first,) = seed(dbs.source, 1)
    hierarchy.uninstall()

    with Session(dbs.source) as session:
        lembrete = session.get(Lembrete, first)
        assert lembrete is not None
        lembrete.texto = "mudou sem sync"
        session.add(Lembrete(texto="novo sem sync"))
        session.commit()

    found = differences(hierarchy)

    assert len(found) == 2
    assert "cross-referenced source keys" in found[0]
    assert "target text is 'Lembrete 1'" in found[1]


def test_named_parameter_without_returning_syncs(
    dbs: Databases, hierarchy: dw.DualWrite
) -> None:
    """The keys read before a statement use the statement's parameters."""
    first, second = seed(dbs.source, 1, 5)
    table = Lembrete.__table__

    with Session(dbs.source) as session:
        session.execute(
            update(table)
            .where(table.c.id == bindparam("alvo"))
            .values(texto="por parametro"),
            {"alvo": second},
        )
        session.commit()

    updates = audit_rows(dbs.target_engine, operation="update")

    assert differences(hierarchy) == []
    assert [row.v1_pk for row in updates] == [str(second)]
    assert first != second
