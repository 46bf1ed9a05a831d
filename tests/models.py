"""Source (V1) and target (V2) models shared by the tests."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    Identity,
    Integer,
    String,
    Text,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sa_dualwrite as dw

BigId = BigInteger().with_variant(Integer(), "sqlite")

STATES = {"ativo": "active", "resolvido": "resolved", "cancelado": "cancelled"}
KINDS = {
    "escalar": "escalated",
    "reatribuir": "reassigned",
    "encerrar": "closed",
    "comentar": "commented",
}


class V1(DeclarativeBase):
    pass


class V2(DeclarativeBase):
    pass


class Alerta(V1):
    __tablename__ = "alertas"

    id: Mapped[int] = mapped_column(primary_key=True)
    contrato_id: Mapped[str] = mapped_column(Text)
    titulo: Mapped[str] = mapped_column(Text)
    descricao: Mapped[str | None] = mapped_column(Text)
    prazo: Mapped[int | None]
    responsavel: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, default="ativo")
    criado_em: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    notas_internas: Mapped[str | None] = mapped_column(Text)


class Acao(V1):
    __tablename__ = "acoes"

    id: Mapped[int] = mapped_column(primary_key=True)
    alerta_id: Mapped[int] = mapped_column(ForeignKey("alertas.id"))
    tipo: Mapped[str] = mapped_column(Text)
    usuario: Mapped[str] = mapped_column(Text)
    registrado_em: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


class Alert(V2):
    __tablename__ = "alerts"
    __table_args__ = (
        CheckConstraint("title <> 'REJECTED BY V2'", name="ck_alerts_title"),
    )

    id: Mapped[int] = mapped_column(BigId, Identity(), primary_key=True)
    contract_ref: Mapped[str] = mapped_column(Text)
    title: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    due_date: Mapped[dt.date | None] = mapped_column(Date)
    owner_login: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    origin: Mapped[str] = mapped_column(Text, default="v2")
    extra: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class AlertEvent(V2):
    __tablename__ = "alert_events"

    id: Mapped[int] = mapped_column(BigId, Identity(), primary_key=True)
    alert_id: Mapped[int] = mapped_column(BigId, ForeignKey("alerts.id"))
    kind: Mapped[str] = mapped_column(Text)
    actor_login: Mapped[str] = mapped_column(Text)
    occurred_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


def due_date(
    criado_em: dt.datetime | None, prazo: int | None
) -> dt.date | None:
    if criado_em is None or prazo is None:
        return None
    return criado_em.date() + dt.timedelta(days=prazo)


def alert_mapping(**overrides: Any) -> dw.Mapping:
    fields: dict[str, Any] = {
        "contract_ref": "contrato_id",
        "title": "titulo",
        "description": "descricao",
        "due_date": dw.compute(["criado_em", "prazo"], due_date),
        "owner_login": "responsavel",
        "state": dw.values("status", STATES),
        "created_at": "criado_em",
        "origin": dw.const("v1"),
    }
    fields.update(overrides.pop("fields", {}))
    return dw.Mapping(
        name="alertas", source=Alerta, target=Alert, fields=fields, **overrides
    )


def event_mapping(**overrides: Any) -> dw.Mapping:
    return dw.Mapping(
        name="acoes",
        source=Acao,
        target=AlertEvent,
        fields={
            "alert_id": dw.ref("alerta_id", "alertas"),
            "kind": dw.values("tipo", KINDS),
            "actor_login": "usuario",
            "occurred_at": "registrado_em",
        },
        **overrides,
    )


def mappings() -> list[dw.Mapping]:
    return [alert_mapping(), event_mapping()]


def new_alerta(**values: Any) -> Alerta:
    data: dict[str, Any] = {
        "contrato_id": "123/2026",
        "titulo": "Alerta de renovação",
        "descricao": "Prazo para renovação próximo",
        "prazo": 30,
        "responsavel": "gestor.silva",
    }
    data.update(values)
    return Alerta(**data)
