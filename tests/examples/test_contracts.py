"""Reading the contract records and deriving V1 alert data from them."""

from __future__ import annotations

import collections
import datetime as dt
from pathlib import Path

from examples.contract_alerts import contracts
from examples.contract_alerts.contracts import read_contracts

HEADER = (
    "processo,contrato,objeto,orgao,procedimento,cadastro,publicacao,"
    "inicio_vigencia,fim_vigencia,fim_vigencia_atualizada,cidade,itens,"
    "valor_homologado\n"
)


def write_csv(path: Path, *rows: str) -> Path:
    path.write_text(HEADER + "".join(row + "\n" for row in rows), "utf-8")
    return path


def test_shipped_file_counts() -> None:
    """The shipped file has 110 records, 66 contracts, 25 amendments."""
    records, issues = read_contracts()
    kinds = collections.Counter(issue.kind for issue in issues)

    assert len(records) == 110
    assert sum(1 for r in records if r.contrato is not None) == 66
    assert sum(1 for r in records if r.amended_end is not None) == 25
    assert kinds[contracts.NO_END_DATE] == 44
    assert kinds[contracts.NO_PLANNED_END] == 35
    assert kinds[contracts.STARTS_BEFORE_PUBLICATION] == 12
    assert len({r.reference for r in records}) == 110


def test_contract_alert_data() -> None:
    """A contract's alert counts prazo from its start to its end."""
    records, _ = read_contracts()
    first = records[0]

    data = first.alert_data()

    assert data["contrato_id"] == "9245761"
    assert data["prazo"] == (dt.date(2020, 10, 10) - dt.date(2020, 4, 10)).days
    assert data["responsavel"] == "gestor.pmmg"
    assert data["criado_em"].date() == dt.date(2020, 4, 10)
    assert data["criado_em"].utcoffset() == dt.timedelta(hours=-3)
    assert "(POLICIA MILITAR DE MINAS GERAIS)" in data["descricao"]


def test_process_without_contract(tmp_path: Path) -> None:
    """A process without contract is keyed by process, with no prazo."""
    path = write_csv(
        tmp_path / "c.csv",
        "0250073 000003/2020,,Tanques,SECRETARIA DE ESTADO DA SAUDE,"
        "Dispensa,2020-04-10,,,,,BH,2,10.00",
    )

    (record,), issues = read_contracts(path)
    data = record.alert_data()

    assert data["contrato_id"] == "0250073 000003/2020"
    assert data["prazo"] is None
    assert data["titulo"] == "Processo de compra sem contrato"
    assert data["responsavel"] == "gestor.ses"
    assert [issue.kind for issue in issues] == [contracts.NO_END_DATE]


def test_bad_dates_reported(tmp_path: Path) -> None:
    """Unreadable and reversed dates become issues, never exceptions."""
    path = write_csv(
        tmp_path / "c.csv",
        "1,100,Obj,ORGAO,P,2020-13-01,2020-05-01,2020-05-01,2020-04-01,"
        "2020-04-01,BH,1,1.00",
        "2,,Obj,ORGAO,P,,,,,,BH,1,1.00",
    )

    records, issues = read_contracts(path)
    kinds = [issue.kind for issue in issues]

    assert records[0].prazo(records[0].planned_end) is None
    assert contracts.UNREADABLE_DATE in kinds
    assert kinds.count(contracts.END_BEFORE_START) == 2
    assert contracts.NO_START_DATE in kinds
    assert "criado_em" not in records[1].alert_data()


def test_amended_end_date() -> None:
    """An end date changed by amendment gives the update's prazo."""
    records, _ = read_contracts()
    record = next(r for r in records if r.contrato == "9245765")

    assert record.planned_end == dt.date(2020, 12, 31)
    assert record.amended_end == dt.date(2020, 10, 14)
    assert record.current_end == dt.date(2020, 10, 14)
    assert record.prazo(record.amended_end) == 183
