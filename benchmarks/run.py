"""Benchmark of the V1 overhead of dual write, on a real PostgreSQL.

Runs every selected scenario on every selected workload, in one process.
The scenarios are plain V1 writes, a PL/pgSQL trigger doing the same
mapping, sa_dualwrite with V2 in the same or in a second database, and
durable mode where the installed sa_dualwrite has it. Repetitions are
interleaved, so machine noise hits every scenario alike and cancels in the
ratios. After each run V2 is checked against V1, and a difference stops the
benchmark with exit status 1.

Examples::

    python benchmarks/run.py                      # full run, 3 repetitions
    python benchmarks/run.py --scale 0.1 --repeat 1 -w A -s plain -s same
    python benchmarks/run.py --markdown           # tables for the docs
    python benchmarks/run.py --memory             # one million changes
    python benchmarks/run.py --profile profiles -w B -s same
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import sqlalchemy

# The benchmark's own modules sit next to this file, which is on sys.path
# when it runs as a script.
from memory import run_memory
from scenarios import (
    SCENARIOS,
    Scenario,
    durable_supported,
    pipelined_round_trips,
    scenario_names,
    server_url,
)
from verify import Mismatch, caught_up, verify
from workloads import WORKLOADS, Workload, WorkloadResult

import sa_dualwrite as dw

DEFAULT_URL = "postgresql+psycopg://{user}@{host}:{port}/postgres".format(
    user=os.environ.get("SA_DUALWRITE_PG_USER", "postgres"),
    host=os.environ.get("SA_DUALWRITE_PG_HOST", "127.0.0.1"),
    port=os.environ.get("SA_DUALWRITE_PG_PORT", "5432"),
)
CATCH_UP_LIMIT = 300.0
WARMUP_SCALE = 0.01


@dataclass
class Measurement:
    """One run of one workload in one scenario."""

    workload: str
    scenario: str
    repetition: int
    transactions: int
    changes: int
    seconds: float
    caught_up_seconds: float
    p50_ms: float
    p99_ms: float
    round_trips: int
    cpu_seconds: float

    @property
    def ops_per_second(self) -> float:
        """Changes per second while the V1 writes ran."""
        return self.changes / self.seconds

    @property
    def round_trips_per_transaction(self) -> float:
        """Database round trips per V1 transaction, both databases."""
        return self.round_trips / self.transactions

    @property
    def cpu_ms_per_transaction(self) -> float:
        """CPU time of this process per V1 transaction, in milliseconds."""
        return self.cpu_seconds * 1000 / self.transactions

    @property
    def end_to_end(self) -> float:
        """Changes per second until V2 had caught up."""
        return self.changes / self.caught_up_seconds


@dataclass(frozen=True)
class Target:
    """A required minimum of one end-to-end throughput ratio."""

    workload: str
    scenario: str
    reference: str
    minimum: float


TARGETS = [
    Target("A", "same", "plain", 0.75),
    Target("A", "separate", "plain", 0.5),
    Target("B", "same", "trigger", 1.0),
    *(
        Target(workload, f"{mode}-durable", mode, 0.85)
        for workload in WORKLOADS
        for mode in ("same", "separate")
    ),
]


def percentile(values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of ``values``."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered)) - 1))
    return ordered[rank]


def run_once(
    scenario: Scenario,
    workload: Workload,
    transactions: int,
    repetition: int,
    *,
    profile_dir: Path | None = None,
) -> Measurement:
    """Run one workload in one scenario, wait for V2, then verify it."""
    scenario.reset()
    with scenario.installed() as handle:
        profiler = _start_profiler() if profile_dir is not None else None
        scenario.round_trips = 0
        pipelines = pipelined_round_trips()
        cpu_started = time.process_time()
        result = workload.run(scenario.source_engine, transactions)
        cpu_seconds = time.process_time() - cpu_started
        round_trips = scenario.round_trips + (
            pipelined_round_trips() - pipelines
        )
        caught = _wait_caught_up(scenario, handle, result)
        if profiler is not None:
            assert profile_dir is not None
            _save_profile(profiler, profile_dir, workload, scenario)
    if scenario.has_target:
        verify(scenario.source_engine, scenario.target_engine, result.changes)
    return Measurement(
        workload=workload.name,
        scenario=scenario.name,
        repetition=repetition,
        transactions=result.transactions,
        changes=result.changes,
        seconds=result.seconds,
        caught_up_seconds=caught - result.started,
        p50_ms=percentile(result.latencies, 0.5) * 1000,
        p99_ms=percentile(result.latencies, 0.99) * 1000,
        round_trips=round_trips,
        cpu_seconds=cpu_seconds,
    )


def _wait_caught_up(
    scenario: Scenario, handle: dw.DualWrite | None, result: WorkloadResult
) -> float:
    """Return the time at which V2 had every change of ``result``.

    A handle with ``drain()`` (durable mode) is drained first. Modes that
    sync before ``commit()`` returns have caught up when the last commit
    returned; that is checked, not assumed.
    """
    if not scenario.has_target:
        return result.finished
    finished = result.finished
    drain = getattr(handle, "drain", None)
    if callable(drain):
        drain()
        finished = time.perf_counter()
    limit = finished + CATCH_UP_LIMIT
    while not caught_up(scenario.target_engine, result.changes):
        now = time.perf_counter()
        if now > limit:
            raise Mismatch(
                f"{scenario.name}: V2 had not caught up "
                f"{CATCH_UP_LIMIT:.0f} s after the last commit"
            )
        time.sleep(0.01)
        finished = now
    return finished


def _start_profiler() -> Any:
    try:
        from pyinstrument import Profiler
    except ImportError as exc:
        raise click.ClickException(
            "--profile needs pyinstrument: pip install -e '.[dev]'"
        ) from exc
    profiler = Profiler(interval=0.0005)
    profiler.start()
    return profiler


def _save_profile(
    profiler: Any, directory: Path, workload: Workload, scenario: Scenario
) -> None:
    profiler.stop()
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"{workload.name}-{scenario.name}"
    stem.with_suffix(".txt").write_text(
        profiler.output_text(unicode=True, show_all=False)
    )
    stem.with_suffix(".html").write_text(profiler.output_html())
    click.echo(f"profile written to {stem}.txt and {stem}.html", err=True)


def run_all(
    scenarios: list[Scenario],
    workloads: list[Workload],
    *,
    scale: float,
    repeat: int,
    warmup: bool,
    profile_dir: Path | None,
) -> list[Measurement]:
    """Run every workload in every scenario ``repeat`` times, interleaved.

    Scenarios run in a rotated order in each repetition, so that none of
    them always runs first (with a cold cache) or last.
    """
    if warmup:
        for workload in workloads:
            for scenario in scenarios:
                run_once(scenario, workload, workload.sized(WARMUP_SCALE), -1)
    measurements: list[Measurement] = []
    for repetition in range(repeat):
        for workload in workloads:
            shift = repetition % len(scenarios)
            for scenario in scenarios[shift:] + scenarios[:shift]:
                measurement = run_once(
                    scenario,
                    workload,
                    workload.sized(scale),
                    repetition,
                    profile_dir=profile_dir,
                )
                measurements.append(measurement)
                click.echo(_progress(measurement), err=True)
    return measurements


def _progress(m: Measurement) -> str:
    return (
        f"  rep {m.repetition} {m.workload} {m.scenario:<16} "
        f"{m.ops_per_second:9.0f} ops/s  p50 {m.p50_ms:7.2f} ms  "
        f"p99 {m.p99_ms:7.2f} ms  caught up {m.caught_up_seconds:7.2f} s  "
        f"{m.round_trips_per_transaction:5.1f} trips/txn  "
        f"CPU {m.cpu_ms_per_transaction:6.2f} ms/txn"
    )


def ratio(
    measurements: list[Measurement],
    workload: str,
    scenario: str,
    reference: str,
    metric: str,
) -> float | None:
    """Return the median over repetitions of ``metric`` of ``scenario``
    divided by that of ``reference`` in the same repetition."""
    by_rep: dict[int, dict[str, Measurement]] = {}
    for m in measurements:
        if m.workload == workload:
            by_rep.setdefault(m.repetition, {})[m.scenario] = m
    ratios = [
        getattr(runs[scenario], metric) / getattr(runs[reference], metric)
        for runs in by_rep.values()
        if scenario in runs and reference in runs
    ]
    return statistics.median(ratios) if ratios else None


def median_of(
    measurements: list[Measurement], workload: str, scenario: str, metric: str
) -> float | None:
    values = [
        getattr(m, metric)
        for m in measurements
        if m.workload == workload and m.scenario == scenario
    ]
    return statistics.median(values) if values else None


COLUMNS = [
    ("ops/s", "ops_per_second", "{:.0f}"),
    ("p50 ms", "p50_ms", "{:.2f}"),
    ("p99 ms", "p99_ms", "{:.2f}"),
    ("caught up s", "caught_up_seconds", "{:.2f}"),
]


def table_rows(
    measurements: list[Measurement], workload: str, scenarios: list[str]
) -> tuple[list[str], list[list[str]]]:
    """Return the header and the rows of one workload's result table.

    Each metric is followed by its ratio to plain and to the trigger. For
    "caught up" the ratios are of end-to-end throughput (changes per
    second until V2 had caught up), so that higher is better everywhere
    except for the latencies.
    """
    header = ["scenario"]
    for title, _, _ in COLUMNS:
        header += [title, "÷plain", "÷trigger"]
    rows = []
    for scenario in scenarios:
        row = [scenario]
        for _, metric, fmt in COLUMNS:
            value = median_of(measurements, workload, scenario, metric)
            row.append("-" if value is None else fmt.format(value))
            ratio_metric = (
                "end_to_end" if metric == "caught_up_seconds" else metric
            )
            for reference in ("plain", "trigger"):
                found = ratio(
                    measurements, workload, scenario, reference, ratio_metric
                )
                row.append("-" if found is None else f"{found:.2f}")
        rows.append(row)
    return header, rows


def cost_rows(
    measurements: list[Measurement], workload: str, scenarios: list[str]
) -> tuple[list[str], list[list[str]]]:
    """Return round trips and client CPU time per transaction, by scenario.

    CPU time is that of the benchmark process only (the V1 application
    and sa_dualwrite), not that of the PostgreSQL server.
    """
    header = ["scenario", "round trips/txn", "client CPU ms/txn"]
    rows = []
    for scenario in scenarios:
        trips = median_of(
            measurements, workload, scenario, "round_trips_per_transaction"
        )
        cpu = median_of(
            measurements, workload, scenario, "cpu_ms_per_transaction"
        )
        rows.append(
            [
                scenario,
                "-" if trips is None else f"{trips:.1f}",
                "-" if cpu is None else f"{cpu:.2f}",
            ]
        )
    return header, rows


def render_table(
    header: list[str], rows: list[list[str]], *, markdown: bool
) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |"]
        lines.append(
            "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"
        )
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [
        max(len(line[i]) for line in [header, *rows])
        for i in range(len(header))
    ]
    out = []
    for line in [header, *rows]:
        cells = [line[0].ljust(widths[0])]
        cells += [
            cell.rjust(width)
            for cell, width in zip(line[1:], widths[1:], strict=True)
        ]
        out.append("  ".join(cells))
    return "\n".join(out)


def target_lines(measurements: list[Measurement]) -> list[tuple[str, bool]]:
    """Return each target that could be checked, and whether it was met."""
    lines = []
    for target in TARGETS:
        found = ratio(
            measurements,
            target.workload,
            target.scenario,
            target.reference,
            "end_to_end",
        )
        if found is None:
            continue
        met = found >= target.minimum
        lines.append(
            (
                f"{target.workload}: {target.scenario} ÷ {target.reference} "
                f"end-to-end = {found:.2f} (target >= {target.minimum:.2f}) "
                f"{'met' if met else 'MISSED'}",
                met,
            )
        )
    return lines


def report(
    measurements: list[Measurement],
    workloads: list[Workload],
    scenarios: list[str],
    *,
    markdown: bool,
    scale: float,
    repeat: int,
) -> list[tuple[str, bool]]:
    heading = "### " if markdown else ""
    click.echo(
        f"\n{heading}sa_dualwrite {dw.__version__}, SQLAlchemy "
        f"{sqlalchemy.__version__}, Python {platform.python_version()}; "
        f"scale {scale}, {repeat} repetition(s), medians"
    )
    for workload in workloads:
        click.echo(
            f"\n{heading}Workload {workload.name}: {workload.description}"
        )
        transactions = median_of(
            measurements, workload.name, scenarios[0], "transactions"
        )
        changes = median_of(
            measurements, workload.name, scenarios[0], "changes"
        )
        if transactions is not None and changes is not None:
            click.echo(
                f"{transactions:.0f} transactions, {changes:.0f} changes\n"
            )
        header, rows = table_rows(measurements, workload.name, scenarios)
        click.echo(render_table(header, rows, markdown=markdown))
        click.echo("")
        header, rows = cost_rows(measurements, workload.name, scenarios)
        click.echo(render_table(header, rows, markdown=markdown))
    lines = target_lines(measurements)
    if lines:
        click.echo(f"\n{heading}Targets (end-to-end throughput ratios)\n")
        for line, _ in lines:
            click.echo(f"- {line}" if markdown else line)
    return lines


@click.command()
@click.option(
    "--scale",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Multiply every workload's transaction count by this factor.",
)
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Measured repetitions of each workload in each scenario.",
)
@click.option(
    "-w",
    "--workload",
    "workload_names",
    multiple=True,
    type=click.Choice(list(WORKLOADS)),
    help="Run only this workload (repeatable). Default: all.",
)
@click.option(
    "-s",
    "--scenario",
    "scenario_filter",
    multiple=True,
    type=click.Choice(scenario_names()),
    help="Run only this scenario (repeatable). Default: all available.",
)
@click.option("--markdown", is_flag=True, help="Print the tables as markdown.")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write every measurement to this JSON file.",
)
@click.option(
    "--check-targets",
    is_flag=True,
    help="Exit with status 2 when a target ratio is missed.",
)
@click.option(
    "--warmup/--no-warmup",
    default=True,
    show_default=True,
    help="Run each workload once at 1 % size, unmeasured, first.",
)
@click.option(
    "--profile",
    "profile_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Profile each run with pyinstrument; write reports to this folder.",
)
@click.option(
    "--memory",
    is_flag=True,
    help="Run the memory check instead: many transactions of updates.",
)
@click.option(
    "--memory-transactions",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Transactions of the memory check.",
)
@click.option(
    "--memory-batch",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Updated rows per transaction in the memory check.",
)
@click.option(
    "--tracemalloc",
    "use_tracemalloc",
    is_flag=True,
    help="Memory check: also trace Python allocations (slower).",
)
@click.option(
    "--pg-url",
    default=DEFAULT_URL,
    show_default=True,
    help="SQLAlchemy URL of the PostgreSQL server (the database part is "
    "ignored; databases named sadw_bench* are created and dropped).",
)
@click.option(
    "--keep-databases",
    is_flag=True,
    help="Leave the sadw_bench* databases in place after the run.",
)
def main(
    scale: float,
    repeat: int,
    workload_names: tuple[str, ...],
    scenario_filter: tuple[str, ...],
    markdown: bool,
    json_path: Path | None,
    check_targets: bool,
    warmup: bool,
    profile_dir: Path | None,
    memory: bool,
    memory_transactions: int,
    memory_batch: int,
    use_tracemalloc: bool,
    pg_url: str,
    keep_databases: bool,
) -> None:
    """Measure the V1 overhead of dual write against plain writes and a
    trigger."""
    server = server_url(pg_url)
    scenarios = _select_scenarios(scenario_filter, memory=memory)
    try:
        for scenario in scenarios:
            scenario.create(server)
        if memory:
            run_memory(
                scenarios[0],
                transactions=memory_transactions,
                batch=memory_batch,
                use_tracemalloc=use_tracemalloc,
                markdown=markdown,
            )
            return
        workloads = [
            WORKLOADS[name] for name in (workload_names or list(WORKLOADS))
        ]
        measurements = run_all(
            scenarios,
            workloads,
            scale=scale,
            repeat=repeat,
            warmup=warmup,
            profile_dir=profile_dir,
        )
    except Mismatch as exc:
        click.echo(f"FAILED: {exc}", err=True)
        sys.exit(1)
    finally:
        if not keep_databases:
            for scenario in scenarios:
                scenario.drop(server)

    if json_path is not None:
        json_path.write_text(
            json.dumps([asdict(m) for m in measurements], indent=1)
        )
    lines = report(
        measurements,
        workloads,
        [scenario.name for scenario in scenarios],
        markdown=markdown,
        scale=scale,
        repeat=repeat,
    )
    if not durable_supported():
        click.echo(
            "\nDurable scenarios were NOT run: the installed sa_dualwrite "
            "has no durable= parameter."
        )
    if check_targets and not all(met for _, met in lines):
        sys.exit(2)


def _select_scenarios(
    names: tuple[str, ...], *, memory: bool
) -> list[Scenario]:
    durable = durable_supported()
    if memory:
        names = names or ("same",)
        if len(names) != 1:
            raise click.UsageError("--memory runs one scenario; give one -s")
    chosen = [
        scenario
        for scenario in SCENARIOS
        if (not names or scenario.name in names)
        and (durable or not scenario.durable)
    ]
    skipped = [
        name for name in names if not durable and name.endswith("-durable")
    ]
    if skipped:
        click.echo(
            f"not running {', '.join(skipped)}: the installed sa_dualwrite "
            "has no durable= parameter",
            err=True,
        )
    if not chosen:
        raise click.UsageError("no scenario left to run")
    return chosen


if __name__ == "__main__":
    main()
