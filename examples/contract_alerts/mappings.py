"""How the V1 alert tables map to the V2 ones."""

from __future__ import annotations

import datetime as dt

from examples.contract_alerts.models_v1 import AcaoAdministrativa, Alerta
from examples.contract_alerts.models_v2 import Alert, AlertEvent
from sa_dualwrite import Mapping, compute, ref, values

__all__ = ["ALERT_STATES", "EVENT_KINDS", "MAPPINGS", "due_date"]

ALERT_STATES = {
    "ativo": "active",
    "resolvido": "resolved",
    "cancelado": "cancelled",
}
EVENT_KINDS = {
    "escalar": "escalated",
    "reatribuir": "reassigned",
    "encerrar": "closed",
    "comentar": "commented",
}


def due_date(
    criado_em: dt.datetime | None, prazo: int | None
) -> dt.date | None:
    """Return the deadline: the creation date plus ``prazo`` days."""
    if criado_em is None or prazo is None:
        return None
    return criado_em.date() + dt.timedelta(days=prazo)


MAPPINGS = [
    Mapping(
        name="alertas",
        source=Alerta,
        target=Alert,
        fields={
            "contract_ref": "contrato_id",
            "title": "titulo",
            "description": "descricao",
            "due_date": compute(["criado_em", "prazo"], due_date),
            "owner_login": "responsavel",
            "state": values("status", ALERT_STATES),
            "created_at": "criado_em",
            "updated_at": "atualizado_em",
        },
    ),
    Mapping(
        name="acoes_administrativas",
        source=AcaoAdministrativa,
        target=AlertEvent,
        fields={
            "alert_id": ref("alerta_id", "alertas"),
            "kind": values("tipo", EVENT_KINDS),
            "actor_login": "usuario",
            "note": "observacao",
            "occurred_at": "registrado_em",
        },
    ),
]
