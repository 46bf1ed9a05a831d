"""The V1 write patterns that the benchmark times.

Every transaction opens its own ORM session, as a web request would, and
commits once. Latency is the time the caller spends from its first
database call in the transaction until ``commit()`` returns. That first
call is the flush inside ``commit()``, or an explicit ``flush()``, so
building the objects is outside it. Objects are kept detached
(``expire_on_commit=False``) and added back to the session that updates
them, so an update costs no SELECT.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from examples.contract_alerts.models_v1 import AcaoAdministrativa, Alerta

__all__ = ["WORKLOADS", "Workload", "WorkloadResult"]

STATUSES = ("ativo", "resolvido", "cancelado")
KINDS = ("escalar", "reatribuir", "encerrar", "comentar")


@dataclass
class WorkloadResult:
    """Counts and commit latencies of one run of a workload."""

    transactions: int = 0
    changes: int = 0
    latencies: list[float] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0

    @property
    def seconds(self) -> float:
        """Wall time from the first transaction to the last commit."""
        return self.finished - self.started


@dataclass(frozen=True)
class Workload:
    """A named write pattern, sized by its transaction count at scale 1."""

    name: str
    description: str
    transactions: int
    run: Callable[[Engine, int], WorkloadResult]

    def sized(self, scale: float) -> int:
        """Return the number of transactions at ``scale``, at least 1."""
        return max(1, round(self.transactions * scale))


def new_alerta(number: int) -> Alerta:
    """Return a new V1 alert whose values depend on ``number``."""
    return Alerta(
        contrato_id=f"{number:06d}/2026",
        titulo=f"Alerta de renovação {number}",
        descricao="Prazo para renovação próximo",
        prazo=30 + number % 60,
        responsavel="gestor.silva",
        status="ativo",
    )


def change_alerta(alerta: Alerta, round_: int) -> None:
    """Change the status and the deadline of an alert."""
    alerta.status = STATUSES[(round_ + 1) % len(STATUSES)]
    alerta.prazo = 10 + ((alerta.prazo or 0) + round_ + 7) % 80


def new_acao(alerta_id: int, number: int) -> AcaoAdministrativa:
    """Return a new admin action on alert ``alerta_id``."""
    return AcaoAdministrativa(
        alerta_id=alerta_id,
        tipo=KINDS[number % len(KINDS)],
        usuario="analista.souza",
        observacao=f"ação {number}",
    )


def _session(engine: Engine) -> Session:
    return Session(engine, expire_on_commit=False)


def run_single_rows(engine: Engine, transactions: int) -> WorkloadResult:
    """Insert one alert per transaction, then update each one in turn."""
    result = WorkloadResult(started=time.perf_counter())
    latencies = result.latencies
    created: list[Alerta] = []
    for number in range(transactions):
        with _session(engine) as session:
            alerta = new_alerta(number)
            session.add(alerta)
            began = time.perf_counter()
            session.commit()
            latencies.append(time.perf_counter() - began)
        created.append(alerta)
    for alerta in created:
        with _session(engine) as session:
            session.add(alerta)
            change_alerta(alerta, 0)
            began = time.perf_counter()
            session.commit()
            latencies.append(time.perf_counter() - began)
    result.finished = time.perf_counter()
    result.transactions = result.changes = 2 * transactions
    return result


BATCH = 100


def run_batches(engine: Engine, transactions: int) -> WorkloadResult:
    """Insert ``BATCH`` alerts per transaction."""
    result = WorkloadResult(started=time.perf_counter())
    for batch in range(transactions):
        with _session(engine) as session:
            session.add_all(
                [new_alerta(batch * BATCH + row) for row in range(BATCH)]
            )
            began = time.perf_counter()
            session.commit()
            result.latencies.append(time.perf_counter() - began)
    result.finished = time.perf_counter()
    result.transactions = transactions
    result.changes = transactions * BATCH
    return result


def run_mixed(engine: Engine, transactions: int) -> WorkloadResult:
    """Insert an alert and log an action on it, update an earlier alert
    and log an action on that one, all in one transaction.

    The first action's ref is resolved within the commit, the second's
    through a cross-reference written by an earlier commit.
    """
    result = WorkloadResult(started=time.perf_counter())
    created: list[Alerta] = []
    for number in range(transactions):
        with _session(engine) as session:
            alerta = new_alerta(number)
            session.add(alerta)
            began = time.perf_counter()
            session.flush()
            session.add(new_acao(alerta.id, 2 * number))
            changes = 2
            if created:
                earlier = created[(number * 7919) % len(created)]
                session.add(earlier)
                change_alerta(earlier, number)
                session.add(new_acao(earlier.id, 2 * number + 1))
                changes += 2
            session.commit()
            result.latencies.append(time.perf_counter() - began)
        created.append(alerta)
        result.changes += changes
    result.finished = time.perf_counter()
    result.transactions = transactions
    return result


WORKLOADS = {
    "A": Workload(
        "A",
        "single-row transactions: inserts, then updates of those rows",
        2000,
        run_single_rows,
    ),
    "B": Workload("B", f"transactions of {BATCH} inserts", 100, run_batches),
    "C": Workload(
        "C",
        "mixed: alert insert + update, two admin actions with refs",
        1000,
        run_mixed,
    ),
}
