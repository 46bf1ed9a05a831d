"""V2 model of the contract-alert system: the model being moved to."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger,
    Date,
    DateTime,
    ForeignKey,
    Identity,
    Integer,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["Alert", "AlertEvent", "V2Base"]

# BIGINT identity on PostgreSQL; SQLite only autoincrements INTEGER keys.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class V2Base(DeclarativeBase):
    """Declarative base of the V2 tables."""


class Alert(V2Base):
    """An alert in the V2 model."""

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(BigId, Identity(), primary_key=True)
    contract_ref: Mapped[str] = mapped_column(Text)
    title: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    due_date: Mapped[dt.date | None] = mapped_column(Date)
    owner_login: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(
        Text, comment="active, resolved or cancelled"
    )
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[dt.datetime | None] = mapped_column(
        DateTime(timezone=True)
    )


class AlertEvent(V2Base):
    """Something that happened to a V2 alert."""

    __tablename__ = "alert_events"

    id: Mapped[int] = mapped_column(BigId, Identity(), primary_key=True)
    alert_id: Mapped[int] = mapped_column(BigId, ForeignKey("alerts.id"))
    kind: Mapped[str] = mapped_column(
        Text, comment="escalated, reassigned, closed or commented"
    )
    actor_login: Mapped[str] = mapped_column(Text)
    note: Mapped[str | None] = mapped_column(Text)
    occurred_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
