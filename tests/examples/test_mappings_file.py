"""The example's TOML mapping file, read by load_mappings()."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

import sa_dualwrite as dw
from examples.contract_alerts.mappings import MAPPINGS
from examples.contract_alerts.models_v1 import (
    AcaoAdministrativa,
    Alerta,
    V1Base,
)
from examples.contract_alerts.models_v2 import V2Base
from tests.conftest import sqlite_engine

MAPPING_FILE = (
    Path(__file__).resolve().parents[2]
    / "examples"
    / "contract_alerts"
    / "mappings.toml"
)


def test_file_matches_python_mappings() -> None:
    """The TOML file declares the same mappings and fields as MAPPINGS."""
    loaded = dw.load_mappings(MAPPING_FILE)

    assert [m.name for m in loaded] == [m.name for m in MAPPINGS]
    for from_file, from_python in zip(loaded, MAPPINGS, strict=True):
        assert set(from_file.fields) == set(from_python.fields)


def test_file_syncs_example(tmp_path: Path) -> None:
    """Installed from the TOML file, the example's writes sync and agree."""
    engine = sqlite_engine(tmp_path / "example.db")
    V1Base.metadata.create_all(engine)
    V2Base.metadata.create_all(engine)
    handle = dw.install_dual_write(
        engine, dw.load_mappings(MAPPING_FILE), log_file=None
    )
    handle.create_tables()
    try:
        with Session(engine) as session:
            alerta = Alerta(
                contrato_id="12/2020",
                titulo="Vencimento do contrato",
                responsavel="gestor.silva",
                prazo=30,
            )
            session.add(alerta)
            session.flush()
            session.add(
                AcaoAdministrativa(
                    alerta_id=alerta.id, tipo="encerrar", usuario="admin"
                )
            )
            session.commit()
        report = handle.verify()
    finally:
        handle.uninstall()
        engine.dispose()

    assert report.agrees, report.summary()
    assert report["acoes_administrativas"].source_rows == 1
