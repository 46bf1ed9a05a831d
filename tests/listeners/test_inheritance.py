"""Sync of classes mapped with joined and single table inheritance."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import Integer, Text, bindparam, delete, insert, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sa_dualwrite as dw
from tests.conftest import Databases
from tests.helpers import audit_rows
from tests.listeners.checks import differences
from tests.listeners.models import Fiscal, Gestor, Manager, Person, Pessoa


def seed(engine: Any) -> dict[str, int]:
    """Insert one row of each class through the ORM; return their ids."""
    with Session(engine) as session:
        rows = {
            "pessoa": Pessoa(nome="Ana", email="ana@example.com"),
            "gestor": Gestor(nome="Bruno", setor="compras"),
            "fiscal": Fiscal(nome="Carla", matricula="F-1"),
        }
        session.add_all(rows.values())
        session.commit()
        return {name: row.id for name, row in rows.items()}


def mapped_audits(engine: Any, mapping: str) -> list[Any]:
    return audit_rows(engine, mapping=mapping)


def test_flushed_subclasses_sync(
    dbs: Databases, hierarchy: dw.DualWrite
) -> None:
    """Each object syncs to its own mapping and to its base class's."""
    ids = seed(dbs.source)

    assert differences(hierarchy) == []
    assert len(mapped_audits(dbs.target_engine, "pessoas")) == 3
    assert hierarchy.v2_id("gestores", ids["gestor"]) is not None
    assert hierarchy.v2_id("gestores", ids["fiscal"]) is None
    assert hierarchy.v2_id("fiscais", ids["fiscal"]) is not None
    assert hierarchy.v2_id("fiscais", ids["gestor"]) is None


def test_base_update_reaches_subclasses(
    dbs: Databases, hierarchy: dw.DualWrite
) -> None:
    """An UPDATE of the base class syncs each subclass mapping's rows."""
    ids = seed(dbs.source)

    with Session(dbs.source) as session:
        session.execute(update(Pessoa).values(nome=Pessoa.nome + " S."))
        session.commit()

    gestores = audit_rows(
        dbs.target_engine, mapping="gestores", operation="update"
    )
    fiscais = audit_rows(
        dbs.target_engine, mapping="fiscais", operation="update"
    )

    assert differences(hierarchy) == []
    assert [row.v1_pk for row in gestores] == [str(ids["gestor"])]
    assert [row.v1_pk for row in fiscais] == [str(ids["fiscal"])]


def test_joined_subclass_update_syncs(
    dbs: Databases, hierarchy: dw.DualWrite
) -> None:
    """An UPDATE of a joined subclass's own columns syncs that mapping."""
    ids = seed(dbs.source)

    with Session(dbs.source) as session:
        session.execute(
            update(Gestor)
            .where(Gestor.setor == "compras")
            .values(setor="vendas")
        )
        session.commit()

    updates = audit_rows(dbs.target_engine, operation="update")

    assert differences(hierarchy) == []
    assert [(row.mapping, row.v1_pk) for row in updates] == [
        ("gestores", str(ids["gestor"]))
    ]


def test_single_subclass_statements_sync(
    dbs: Databases, hierarchy: dw.DualWrite
) -> None:
    """UPDATE and DELETE of a single table subclass touch only its rows."""
    ids = seed(dbs.source)

    with Session(dbs.source) as session:
        session.execute(update(Fiscal).values(matricula="F-2"))
        session.commit()
        session.execute(delete(Fiscal))
        session.commit()

    assert differences(hierarchy) == []
    assert hierarchy.v2_id("fiscais", ids["fiscal"]) is None
    assert hierarchy.v2_id("pessoas", ids["fiscal"]) is None
    assert hierarchy.v2_id("pessoas", ids["pessoa"]) is not None


def test_base_delete_reaches_subclass(
    dbs: Databases, hierarchy: dw.DualWrite
) -> None:
    """A DELETE of the base class removes a subclass mapping's rows."""
    ids = seed(dbs.source)

    with Session(dbs.source) as session:
        session.execute(delete(Pessoa).where(Pessoa.tipo == "fiscal"))
        session.commit()

    deletes = audit_rows(dbs.target_engine, operation="delete")

    assert differences(hierarchy) == []
    assert sorted((row.mapping, row.v1_pk) for row in deletes) == [
        ("fiscais", str(ids["fiscal"])),
        ("pessoas", str(ids["fiscal"])),
    ]


def test_subclass_inserts_sync(
    dbs: Databases, hierarchy: dw.DualWrite
) -> None:
    """Bulk inserts of subclasses sync to every mapping of their class."""
    with Session(dbs.source) as session:
        session.execute(
            insert(Gestor),
            [{"nome": "Davi", "setor": "rh"}, {"nome": "Eva", "setor": "ti"}],
        )
        session.bulk_insert_mappings(
            Gestor, [{"nome": "Fabio", "setor": "rh"}]
        )
        session.execute(insert(Fiscal), [{"nome": "Gil", "matricula": "F-9"}])
        session.commit()

    with Session(dbs.target_engine) as session:
        managers = session.scalars(select(Manager.name)).all()
        people = session.scalars(select(Person.kind)).all()

    assert differences(hierarchy) == []
    assert sorted(managers) == ["Davi", "Eva", "Fabio"]
    assert sorted(people) == ["fiscal", "gestor", "gestor", "gestor"]


def test_core_update_of_base_table_syncs(
    dbs: Databases, hierarchy: dw.DualWrite
) -> None:
    """A Core UPDATE of the shared base table syncs every mapping's rows."""
    seed(dbs.source)
    table = Pessoa.__table__

    with Session(dbs.source) as session:
        session.execute(update(table).values(nome=table.c.nome + "!"))
        session.commit()

    assert differences(hierarchy) == []
    assert len(audit_rows(dbs.target_engine, operation="update")) == 5


def test_subclass_mapped_after_install_syncs(
    dbs: Databases, tmp_path: Path
) -> None:
    """A subclass defined after install syncs through its base's mapping."""

    class Base(DeclarativeBase):
        pass

    class Target(DeclarativeBase):
        pass

    class Documento(Base):
        __tablename__ = "documentos"
        id: Mapped[int] = mapped_column(primary_key=True)
        titulo: Mapped[str] = mapped_column(Text)
        tipo: Mapped[str] = mapped_column(Text)
        __mapper_args__: ClassVar[dict[str, Any]] = {
            "polymorphic_on": "tipo",
            "polymorphic_identity": "documento",
        }

    class Document(Target):
        __tablename__ = "documents"
        id: Mapped[int] = mapped_column(Integer, primary_key=True)
        title: Mapped[str] = mapped_column(Text)

    Base.metadata.create_all(dbs.source)
    Target.metadata.create_all(dbs.target_engine)
    handle = dw.install_dual_write(
        dbs.source,
        [
            dw.Mapping(
                source=Documento, target=Document, fields={"title": "titulo"}
            )
        ],
        target=dbs.target,
        log_file=tmp_path / "dual_write.log",
        unsynced_writes="raise",
    )
    handle.create_tables()
    try:

        class Parecer(Documento):
            __mapper_args__: ClassVar[dict[str, Any]] = {
                "polymorphic_identity": "parecer"
            }

        with Session(dbs.source) as session:
            parecer = Parecer(titulo="Parecer 1")
            session.add(parecer)
            session.commit()
            session.execute(update(Parecer).values(titulo="Parecer 1-A"))
            session.commit()
            parecer_id = parecer.id

        mismatches = differences(handle)
    finally:
        handle.uninstall()

    assert mismatches == []
    assert handle.v2_id("documentos", parecer_id) is not None


def test_core_bulk_delete_of_base_table_syncs(
    dbs: Databases, hierarchy: dw.DualWrite
) -> None:
    """A Core DELETE by key with several parameter sets is synced."""
    ids = seed(dbs.source)
    table = Pessoa.__table__

    with Session(dbs.source) as session:
        session.execute(
            delete(table).where(table.c.id == bindparam("alvo")),
            [{"alvo": ids["fiscal"]}, {"alvo": ids["pessoa"]}],
        )
        session.commit()

    deletes = audit_rows(dbs.target_engine, operation="delete")

    assert differences(hierarchy) == []
    assert sorted((row.mapping, row.v1_pk) for row in deletes) == sorted(
        [
            ("fiscais", str(ids["fiscal"])),
            ("pessoas", str(ids["fiscal"])),
            ("pessoas", str(ids["pessoa"])),
        ]
    )
