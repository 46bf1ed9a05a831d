"""Calls of the public API as users write them; checked by mypy, not run."""

from __future__ import annotations

from sqlalchemy import create_engine
from sqlalchemy.orm import Session

import sa_dualwrite as dw
from tests import models


def usage() -> None:
    engine = create_engine("sqlite://")
    mapping = dw.Mapping(
        name="alertas",
        source=models.Alerta,
        target=models.Alert,
        fields={
            "title": "titulo",
            "state": dw.values("status", {"ativo": "active"}),
            "due_date": dw.compute(["criado_em", "prazo"], models.due_date),
            "origin": dw.const("v1"),
        },
        on_delete={"state": "cancelled"},
    )
    handle: dw.DualWrite = dw.install_dual_write(
        engine, [mapping], log_file=None, v2_timeout=2.0
    )
    handle.create_tables()
    with Session(engine) as session, dw.acting_as("ops"):
        key: str = dw.session_key(session)
        ids: list[int] = handle.revert(session_key=key, force=True)
    replayed: list[int] = handle.replay(ids)
    target_id: object = handle.v2_id("alertas", 1)
    del replayed, target_id
    handle.uninstall()
