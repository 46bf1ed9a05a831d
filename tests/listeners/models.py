"""Source and target models for the write-path tests.

``Pessoa`` is a polymorphic base with a joined table subclass (``Gestor``)
and a single table subclass (``Fiscal``); each of the three has its own
mapping. ``Lembrete`` is mapped on a table with ``implicit_returning``
off, which makes the capture fall back to what a backend without
RETURNING offers, and has a mutable JSON column, a timezone-aware
datetime and a relationship to ``Pessoa`` that no mapping uses.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Identity,
    Integer,
    Text,
)
from sqlalchemy.ext.mutable import MutableDict
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

import sa_dualwrite as dw

BigId = BigInteger().with_variant(Integer(), "sqlite")


class PathsV1(DeclarativeBase):
    pass


class PathsV2(DeclarativeBase):
    pass


class Pessoa(PathsV1):
    __tablename__ = "pessoas"

    id: Mapped[int] = mapped_column(primary_key=True)
    nome: Mapped[str] = mapped_column(Text)
    email: Mapped[str | None] = mapped_column(Text)
    tipo: Mapped[str] = mapped_column(Text)
    matricula: Mapped[str | None] = mapped_column(Text)
    lembretes: Mapped[list[Lembrete]] = relationship(back_populates="pessoa")

    __mapper_args__: ClassVar[dict[str, Any]] = {
        "polymorphic_on": "tipo",
        "polymorphic_identity": "pessoa",
    }


class Gestor(Pessoa):
    __tablename__ = "gestores"

    id: Mapped[int] = mapped_column(ForeignKey("pessoas.id"), primary_key=True)
    setor: Mapped[str | None] = mapped_column(Text)

    __mapper_args__: ClassVar[dict[str, Any]] = {
        "polymorphic_identity": "gestor"
    }


class Fiscal(Pessoa):
    __mapper_args__: ClassVar[dict[str, Any]] = {
        "polymorphic_identity": "fiscal"
    }


class Lembrete(PathsV1):
    __tablename__ = "lembretes"
    __table_args__: ClassVar[dict[str, Any]] = {"implicit_returning": False}

    id: Mapped[int] = mapped_column(primary_key=True)
    texto: Mapped[str] = mapped_column(Text)
    dias: Mapped[int | None] = mapped_column(Integer)
    dados: Mapped[dict[str, Any] | None] = mapped_column(
        MutableDict.as_mutable(JSON)
    )
    lembrar_em: Mapped[dt.datetime | None] = mapped_column(
        DateTime(timezone=True)
    )
    pessoa_id: Mapped[int | None] = mapped_column(ForeignKey("pessoas.id"))
    pessoa: Mapped[Pessoa | None] = relationship(back_populates="lembretes")


class Person(PathsV2):
    __tablename__ = "people"

    id: Mapped[int] = mapped_column(BigId, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    email: Mapped[str | None] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text)


class Manager(PathsV2):
    __tablename__ = "managers"

    id: Mapped[int] = mapped_column(BigId, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    department: Mapped[str | None] = mapped_column(Text)


class Inspector(PathsV2):
    __tablename__ = "inspectors"

    id: Mapped[int] = mapped_column(BigId, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    registration: Mapped[str | None] = mapped_column(Text)


class Reminder(PathsV2):
    __tablename__ = "reminders"

    id: Mapped[int] = mapped_column(BigId, Identity(), primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    days: Mapped[int | None] = mapped_column(Integer)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    remind_at: Mapped[dt.datetime | None] = mapped_column(
        DateTime(timezone=True)
    )


def mappings() -> list[dw.Mapping]:
    return [
        dw.Mapping(
            name="pessoas",
            source=Pessoa,
            target=Person,
            fields={"name": "nome", "email": "email", "kind": "tipo"},
        ),
        dw.Mapping(
            name="gestores",
            source=Gestor,
            target=Manager,
            fields={"name": "nome", "department": "setor"},
        ),
        dw.Mapping(
            name="fiscais",
            source=Fiscal,
            target=Inspector,
            fields={"name": "nome", "registration": "matricula"},
        ),
        dw.Mapping(
            name="lembretes",
            source=Lembrete,
            target=Reminder,
            fields={
                "text": "texto",
                "days": "dias",
                "data": "dados",
                "remind_at": "lembrar_em",
            },
        ),
    ]
