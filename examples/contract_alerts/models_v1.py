"""V1 model of the contract-alert system: the system of record today."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import DateTime, ForeignKey, Text, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["AcaoAdministrativa", "Alerta", "V1Base"]


class V1Base(DeclarativeBase):
    """Declarative base of the V1 tables."""


class Alerta(V1Base):
    """An alert about a contract: a renewal, a deadline, an obligation."""

    __tablename__ = "alertas"

    id: Mapped[int] = mapped_column(primary_key=True)
    contrato_id: Mapped[str] = mapped_column(Text)
    titulo: Mapped[str] = mapped_column(Text)
    descricao: Mapped[str | None] = mapped_column(Text)
    prazo: Mapped[int | None] = mapped_column(
        comment="days until the deadline, counted from creation"
    )
    responsavel: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, default="ativo")
    criado_em: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    atualizado_em: Mapped[dt.datetime | None] = mapped_column(
        DateTime(timezone=True), onupdate=func.now()
    )


class AcaoAdministrativa(V1Base):
    """An admin action logged against an alert."""

    __tablename__ = "acoes_administrativas"

    id: Mapped[int] = mapped_column(primary_key=True)
    alerta_id: Mapped[int] = mapped_column(ForeignKey("alertas.id"))
    tipo: Mapped[str] = mapped_column(
        Text, comment="escalar, reatribuir, encerrar or comentar"
    )
    usuario: Mapped[str] = mapped_column(Text)
    observacao: Mapped[str | None] = mapped_column(Text)
    registrado_em: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
