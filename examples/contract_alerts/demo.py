"""The contract-alert demo: real public contracts written to V1, synced to V2.

:func:`run_demo` installs the dual write, then runs what the application
does, only through the service entry points and the ORM:

1. imports each record of ``data/contracts-mg-2020.csv`` as a V1 alert;
2. replays the amended contract end dates as updates, each with a comment;
3. reviews the alerts on a reference date: contracts that have ended are
   closed, contracts about to end are escalated;
4. provokes a V2 failure, fixes its cause and replays it;
5. reverts the V2 insert of an alert that was removed from V1 by plain SQL;

and prints a report whose V1-versus-V2 check decides the exit code.
"""

from __future__ import annotations

import datetime as dt
import sys
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, text
from sqlalchemy.orm import Session

import sa_dualwrite as dw
from examples.contract_alerts.contracts import (
    BRASILIA,
    CONSEQUENCES,
    DATA_FILE,
    ContractRecord,
    DateIssue,
    read_contracts,
)
from examples.contract_alerts.databases import (
    DemoDatabases,
    DemoSetupError,
    open_databases,
)
from examples.contract_alerts.mappings import MAPPINGS
from examples.contract_alerts.models_v1 import Alerta
from examples.contract_alerts.report import print_report
from examples.contract_alerts.services import dual_write_service as service

__all__ = ["REFERENCE_DATE", "run_demo"]

REFERENCE_DATE = dt.date(2020, 11, 30)
"""The day of the review: contracts ended by then are closed."""

ESCALATION_WINDOW = dt.timedelta(days=30)
"""Contracts ending this soon after the review are escalated."""

REVIEW_TIME = dt.datetime.combine(REFERENCE_DATE, dt.time(12), BRASILIA)
V2_INDEX = "uq_alerts_contract_ref"
SESSION_KEY = "dualwrite.session_key"
ACTOR_KEY = "dualwrite.actor"


def run_demo(v1_url: str | None = None, v2_url: str | None = None) -> int:
    """Run the demo and return its exit code.

    Without URLs, V1 and V2 share a new SQLite file under ``./demo-data/``.
    ``v2_url`` None puts V2 in the V1 database. Returns 0 when V1 and V2
    agree at the end, 1 when they do not or a step went other than
    planned, and 2 when a database cannot be used.
    """
    try:
        databases = open_databases(v1_url, v2_url)
    except DemoSetupError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(databases)
    finally:
        databases.close()


@dataclass
class _Signals:
    """The outcomes the dual write reported through its signals."""

    failed: list[dict[str, Any]] = field(default_factory=list)
    applied: list[dict[str, Any]] = field(default_factory=list)

    def on_failed(self, mapping: str, **fields: Any) -> None:
        self.failed.append({"mapping": mapping, **fields})

    def on_applied(self, mapping: str, **fields: Any) -> None:
        self.applied.append({"mapping": mapping, **fields})


def _run(databases: DemoDatabases) -> int:
    dual_write = dw.install_dual_write(
        databases.v1,
        MAPPINGS,
        target=None if databases.same else databases.v2,
    )
    dual_write.create_tables()
    service.configure(databases.v1)
    signals = _Signals()
    dw.signals.change_failed.connect(signals.on_failed)
    dw.signals.change_applied.connect(signals.on_applied)
    try:
        _print_header(databases, dual_write)
        records, issues = read_contracts()
        ids = _import(databases, records, issues)
        _amend(databases, records, ids)
        ended = _review(databases, records, ids)
        contract = ended[0] if ended else records[0]
        planned = _provoke_failure(databases, dual_write, contract, signals)
        planned = _revert_mistake(databases, dual_write, signals) and planned
        agrees = print_report(databases, dual_write)
    finally:
        dw.signals.change_failed.disconnect(signals.on_failed)
        dw.signals.change_applied.disconnect(signals.on_applied)
        service.configure(None)
        dual_write.uninstall()
    if not planned:
        print("A step of the demo went other than planned; see above.")
    return 0 if agrees and planned else 1


def _print_header(databases: DemoDatabases, dual_write: dw.DualWrite) -> None:
    print("sa_dualwrite demo: contract alerts moving from V1 to V2")
    for line in databases.describe():
        print(f"  {line}")
    print(f"  log: {dual_write.log_file}")


def _import(
    databases: DemoDatabases,
    records: list[ContractRecord],
    issues: list[DateIssue],
) -> dict[str, int]:
    """Create one V1 alert per record; return the V1 ids by reference."""
    print(f"\n1. Import {len(records)} records of {DATA_FILE.name}")
    ids: dict[str, int] = {}
    info = {SESSION_KEY: "import-contracts-mg-2020", ACTOR_KEY: "importacao"}
    with Session(databases.v1, info=info) as session:
        for record in records:
            ids[record.reference] = service.criar_alerta_dual(
                record.alert_data(), session=session
            )
            session.commit()
    contracts = sum(1 for record in records if record.contrato is not None)
    print(
        f"   {len(ids)} V1 alerts created: {contracts} contracts, "
        f"{len(records) - contracts} processes without contract"
    )
    _print_issues(issues)
    return ids


def _print_issues(issues: list[DateIssue]) -> None:
    affected = {issue.reference for issue in issues}
    print(
        f"   {len(affected)} records with missing or inconsistent dates, "
        "all imported:"
    )
    by_kind: dict[str, list[DateIssue]] = {}
    for issue in issues:
        by_kind.setdefault(issue.kind, []).append(issue)
    for kind, items in by_kind.items():
        print(f"   {len(items):>4} {kind}, so {CONSEQUENCES[kind]}:")
        print(f"        {_sample(items)}")


def _sample(issues: list[DateIssue], width: int = 50) -> str:
    """Return the first references of ``issues`` that fit in ``width``."""
    shown: list[str] = []
    for issue in issues:
        if shown and len(", ".join([*shown, issue.reference])) > width:
            break
        shown.append(issue.reference)
    rest = len(issues) - len(shown)
    return ", ".join(shown) + (f" and {rest} more" if rest else "")


def _amend(
    databases: DemoDatabases,
    records: list[ContractRecord],
    ids: dict[str, int],
) -> None:
    """Update the deadline of each amended contract and comment on it."""
    amended = [record for record in records if record.amended_end]
    print(f"\n2. Replay {len(amended)} amended end dates as V1 updates")
    info = {SESSION_KEY: "aditivos-vigencia"}
    with Session(databases.v1, info=info) as session:
        for record in amended:
            assert record.amended_end is not None
            gestor = record.responsavel()
            note = (
                "Vigência alterada por aditivo: fim em "
                f"{record.amended_end}, antes {record.dates['fim_vigencia']}"
            )
            with dw.acting_as(gestor):
                service.atualizar_alerta_dual(
                    ids[record.reference],
                    {"prazo": record.prazo(record.amended_end)},
                    session=session,
                )
                _action(
                    session, ids[record.reference], "comentar", gestor, note
                )
                session.commit()
    print(
        f"   {len(amended)} alerts: new prazo and a 'comentar' action, "
        "by their manager"
    )


def _action(
    session: Session, alerta_id: int, tipo: str, usuario: str, note: str
) -> None:
    service.sincronizar_acao_dual(
        {
            "alerta_id": alerta_id,
            "tipo": tipo,
            "usuario": usuario,
            "observacao": note,
            "registrado_em": REVIEW_TIME,
        },
        session=session,
    )


def _review(
    databases: DemoDatabases,
    records: list[ContractRecord],
    ids: dict[str, int],
) -> list[ContractRecord]:
    """Close ended contracts and escalate those about to end."""
    print(f"\n3. Review the alerts on {REFERENCE_DATE}")
    horizon = REFERENCE_DATE + ESCALATION_WINDOW
    ended, ending = [], []
    for record in records:
        end = record.current_end
        if record.contrato is None or end is None:
            continue
        if end <= REFERENCE_DATE:
            ended.append(record)
        elif end <= horizon:
            ending.append(record)
    info = {SESSION_KEY: f"revisao-{REFERENCE_DATE}"}
    with Session(databases.v1, info=info) as session:
        for record in ended:
            _close(session, ids[record.reference], record)
        for record in ending:
            _escalate(session, ids[record.reference], record)
    print(
        f"   {len(ended)} ended contracts: 'encerrar' action and status "
        "'resolvido'"
    )
    print(f"   {len(ending)} contracts end by {horizon}: 'escalar' action")
    return ended


def _close(session: Session, alerta_id: int, record: ContractRecord) -> None:
    gestor = record.responsavel()
    note = f"Vigência encerrada em {record.current_end}"
    with dw.acting_as(gestor):
        _action(session, alerta_id, "encerrar", gestor, note)
        service.atualizar_alerta_dual(
            alerta_id, {"status": "resolvido"}, session=session
        )
        session.commit()


def _escalate(
    session: Session, alerta_id: int, record: ContractRecord
) -> None:
    gestor = record.responsavel()
    note = (
        f"Vigência termina em {record.current_end}: decidir renovação "
        "com coordenacao.contratos"
    )
    with dw.acting_as(gestor):
        _action(session, alerta_id, "escalar", gestor, note)
        session.commit()


def _provoke_failure(
    databases: DemoDatabases,
    dual_write: dw.DualWrite,
    record: ContractRecord,
    signals: _Signals,
) -> bool:
    """Make V2 reject an insert, fix the cause, replay; True if it did."""
    print("\n4. A V2 failure, provoked on purpose")
    print("   V2 gets a unique index on alerts.contract_ref (one alert per")
    print("   contract), but V1 allows several alerts per contract.")
    with databases.v2.begin() as connection:
        connection.execute(
            text(f"CREATE UNIQUE INDEX {V2_INDEX} ON alerts (contract_ref)")
        )

    signals.failed.clear()
    with dw.acting_as(record.responsavel()):
        alerta_id = service.criar_alerta_dual(
            {
                "contrato_id": record.reference,
                "titulo": "Prestação de contas",
                "descricao": "Enviar a prestação de contas do contrato",
                "prazo": 60,
                "responsavel": record.responsavel(),
            }
        )
    print(
        f"   V1 alert {alerta_id} for contract {record.reference} "
        "committed; the application saw no error"
    )
    if len(signals.failed) != 1:
        print(f"   expected one failed change, got {len(signals.failed)}")
        return False
    failure = signals.failed[0]
    print(f"   V2 insert failed, audit row {failure['audit_id']}:")
    print(f"     {failure['error']}")
    _print_check(dual_write)
    return _fix_and_replay(databases, dual_write, alerta_id, signals)


def _print_check(dual_write: dw.DualWrite) -> None:
    print("   verify:")
    print(f"     {dual_write.verify()['alertas'].summary()}")


def _fix_and_replay(
    databases: DemoDatabases,
    dual_write: dw.DualWrite,
    alerta_id: int,
    signals: _Signals,
) -> bool:
    with databases.v2.begin() as connection:
        connection.execute(text(f"DROP INDEX {V2_INDEX}"))
    print(f"   fix: DROP INDEX {V2_INDEX}, so V2 allows it too")
    signals.failed.clear()
    new_ids = dual_write.replay()
    v2_id = dual_write.v2_id("alertas", alerta_id)
    print(
        f"   replay: {len(new_ids)} change retried as audit row "
        f"{', '.join(map(str, new_ids))}, {len(signals.failed)} failed"
    )
    print(f"   V1 alert {alerta_id} is now V2 alert {v2_id}")
    return len(new_ids) == 1 and not signals.failed and v2_id is not None


def _revert_mistake(
    databases: DemoDatabases, dual_write: dw.DualWrite, signals: _Signals
) -> bool:
    """Revert the V2 insert of an alert deleted from V1 outside the ORM."""
    print("\n5. A revert")
    created = _create_test_alert(signals)
    if created is None:
        return False
    alerta_id, audit_id = created

    with databases.v1.begin() as connection:
        connection.execute(delete(Alerta).where(Alerta.id == alerta_id))
    print(f"   V1 alert {alerta_id} was created by mistake, then deleted")
    print("   with plain SQL, which the ORM and the dual write do not see")
    _print_check(dual_write)

    (revert_id,) = dual_write.revert(audit_id)
    print(
        f"   revert audit row {audit_id} (its V2 insert): "
        f"new audit row {revert_id}"
    )
    print("   deleted the V2 row and its cross-reference")
    return dual_write.v2_id("alertas", alerta_id) is None


def _create_test_alert(signals: _Signals) -> tuple[int, int] | None:
    """Create a test alert; return its V1 id and its insert's audit id."""
    signals.applied.clear()
    with dw.acting_as("suporte.sistemas"):
        alerta_id = service.criar_alerta_dual(
            {
                "contrato_id": "TESTE",
                "titulo": "Teste de integração, ignorar",
                "responsavel": "suporte.sistemas",
            }
        )
    inserts = [
        fields["audit_id"]
        for fields in signals.applied
        if fields["v1_pk"] == str(alerta_id) and fields["mapping"] == "alertas"
    ]
    if len(inserts) != 1:
        print(f"   expected one applied insert, got {len(inserts)}")
        return None
    return alerta_id, int(inserts[0])
