"""Memory check: many transactions of updates, memory sampled as they run.

A fixed set of alerts is updated again and again, one session and one
transaction per round, so that every change goes through capture, buffer
and sync. Per-session and per-transaction state must be freed when each
transaction ends: the resident set size (and, with ``--tracemalloc``, the
Python allocations) must level off after the first rounds instead of
growing with the number of changes.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from dataclasses import dataclass

import click
from scenarios import Scenario
from sqlalchemy.orm import Session
from verify import verify
from workloads import change_alerta, new_alerta

__all__ = ["run_memory"]

SAMPLES = 20
MIB = 1024 * 1024


@dataclass
class Sample:
    """Memory in use after some number of transactions."""

    transactions: int
    changes: int
    seconds: float
    rss_mib: float
    peak_rss_mib: float
    traced_mib: float | None
    traced_peak_mib: float | None
    plugin_mib: float | None


def _status_mib(field: str) -> float:
    """Return a memory field of /proc/self/status (given in kB) in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def _plugin_mib() -> float:
    """Return the traced memory allocated by sa_dualwrite code and alive."""
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(True, "*/sa_dualwrite/*")]
    )
    return sum(stat.size for stat in snapshot.statistics("filename")) / MIB


def _sample(transactions: int, changes: int, started: float) -> Sample:
    gc.collect()
    traced = peak = plugin = None
    if tracemalloc.is_tracing():
        current, top = tracemalloc.get_traced_memory()
        traced, peak = current / MIB, top / MIB
        plugin = _plugin_mib()
    return Sample(
        transactions,
        changes,
        time.perf_counter() - started,
        _status_mib("VmRSS"),
        _status_mib("VmHWM"),
        traced,
        peak,
        plugin,
    )


def run_memory(
    scenario: Scenario,
    *,
    transactions: int,
    batch: int,
    use_tracemalloc: bool,
    markdown: bool,
) -> None:
    """Update ``batch`` alerts in each of ``transactions`` transactions."""
    scenario.reset()
    engine = scenario.source_engine
    every = max(1, transactions // SAMPLES)
    samples: list[Sample] = []
    # No log file: a million JSON lines would only fill the disk.
    with scenario.installed(log=False):
        with Session(engine, expire_on_commit=False) as session:
            alertas = [new_alerta(number) for number in range(batch)]
            session.add_all(alertas)
            session.commit()
        if use_tracemalloc:
            tracemalloc.start()
        started = time.perf_counter()
        samples.append(_sample(0, 0, started))
        for round_ in range(1, transactions + 1):
            with Session(engine, expire_on_commit=False) as session:
                session.add_all(alertas)
                for alerta in alertas:
                    change_alerta(alerta, round_)
                session.commit()
            if round_ % every == 0 or round_ == transactions:
                samples.append(_sample(round_, round_ * batch, started))
                click.echo(_line(samples[-1]), err=True)
        if use_tracemalloc:
            tracemalloc.stop()
    if scenario.has_target:
        verify(engine, scenario.target_engine, batch * (transactions + 1))
    _report(scenario, samples, markdown=markdown)


def _line(sample: Sample) -> str:
    traced = (
        ""
        if sample.traced_mib is None
        else f"  traced {sample.traced_mib:8.2f} MiB"
        f"  sa_dualwrite {sample.plugin_mib:6.3f} MiB"
    )
    return (
        f"  {sample.transactions:>7} txns {sample.changes:>9} changes "
        f"{sample.seconds:7.1f} s  rss {sample.rss_mib:7.1f} MiB{traced}"
    )


def _report(
    scenario: Scenario, samples: list[Sample], *, markdown: bool
) -> None:
    header = [
        "transactions",
        "changes",
        "seconds",
        "RSS MiB",
        "peak RSS MiB",
        "traced MiB",
        "traced peak MiB",
        "held by sa_dualwrite MiB",
    ]
    rows = [
        [
            str(s.transactions),
            str(s.changes),
            f"{s.seconds:.1f}",
            f"{s.rss_mib:.1f}",
            f"{s.peak_rss_mib:.1f}",
            "-" if s.traced_mib is None else f"{s.traced_mib:.2f}",
            "-" if s.traced_peak_mib is None else f"{s.traced_peak_mib:.2f}",
            "-" if s.plugin_mib is None else f"{s.plugin_mib:.3f}",
        ]
        for s in samples
    ]
    click.echo(f"\nMemory check, scenario {scenario.name}\n")
    if markdown:
        click.echo("| " + " | ".join(header) + " |")
        click.echo("|" + "---:|" * len(header))
        for row in rows:
            click.echo("| " + " | ".join(row) + " |")
    else:
        for row in [header, *rows]:
            click.echo("  ".join(cell.rjust(12) for cell in row))
    # Growth is measured from the first sample after a tenth of the run,
    # when pools, caches and the compiled statement cache are warm.
    settled = next(
        s for s in samples if s.transactions >= samples[-1].transactions / 10
    )
    last = samples[-1]
    click.echo(
        f"\nRSS growth from {settled.transactions} to {last.transactions} "
        f"transactions: {last.rss_mib - settled.rss_mib:+.1f} MiB"
    )
    if settled.traced_mib is not None and last.traced_mib is not None:
        click.echo(
            "Traced growth over the same span: "
            f"{last.traced_mib - settled.traced_mib:+.3f} MiB"
        )
