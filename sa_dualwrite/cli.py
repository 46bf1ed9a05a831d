"""The ``sa-dualwrite`` command line.

Each command builds a :class:`~sa_dualwrite.DualWrite` handle from the
options (or a TOML config) and calls one of its methods; the formatting of
the result is all that happens here.

Exit codes: 0 success, 1 an error (printed as one line on stderr), 2 a
usage error, 3 a revert conflict, 4 a replay after which some changes
still fail.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import math
import re
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import click
from sqlalchemy.exc import SQLAlchemyError

from sa_dualwrite._admin import status_report
from sa_dualwrite._codec import to_json
from sa_dualwrite._config import (
    CliConfig,
    ConfigError,
    load_config,
    make_engine,
    resolve_mappings,
)
from sa_dualwrite._errors import DualWriteError, RevertConflict, one_line
from sa_dualwrite._install import DualWrite, install_dual_write
from sa_dualwrite._store import STATUSES

__all__ = ["main"]

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONFLICT = 3
EXIT_STILL_FAILING = 4

Command = TypeVar("Command", bound=Callable[..., Any])


def connection_options(command: Command) -> Command:
    """Add the options that name the databases and the mappings."""
    options = [
        click.option(
            "--config",
            "config_path",
            type=click.Path(dir_okay=False),
            envvar="SA_DUALWRITE_CONFIG",
            help="TOML file with v1_url, v2_url, mappings and install "
            "options; options given here override it. "
            "Env: SA_DUALWRITE_CONFIG.",
        ),
        click.option(
            "--v1-url",
            envvar="SA_DUALWRITE_V1_URL",
            help="SQLAlchemy URL of the V1 (source) database, which holds "
            "the outbox. Env: SA_DUALWRITE_V1_URL.",
        ),
        click.option(
            "--v2-url",
            envvar="SA_DUALWRITE_V2_URL",
            help="SQLAlchemy URL of the V2 (target) database, which holds "
            "the audit and cross-reference tables. Default: the V1 "
            "database. Env: SA_DUALWRITE_V2_URL.",
        ),
        click.option(
            "--mappings",
            envvar="SA_DUALWRITE_MAPPINGS",
            help="The mappings: an import string package.module:NAME (a "
            "list, or a function returning one) or a TOML mapping file. "
            "Env: SA_DUALWRITE_MAPPINGS.",
        ),
        click.option(
            "--log-file",
            metavar="FILE",
            help="File that receives the JSON log lines. Default: "
            "logs/dual_write.log, or log_file in the config.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@contextmanager
def _handle(params: dict[str, Any]) -> Iterator[DualWrite]:
    """Build the handle of a command from its options; dispose of it."""
    config = load_config(params.pop("config_path", None))
    overrides = {
        key: params.pop(key)
        for key in ("v1_url", "v2_url", "mappings", "log_file")
        if params.get(key) is not None
    }
    for key in ("v1_url", "v2_url", "mappings", "log_file"):
        params.pop(key, None)
    if "mappings" in overrides:
        # A mapping file named on the command line is relative to the
        # working directory, not to the config file.
        overrides["base_dir"] = Path.cwd()
    config = config.model_copy(update=overrides)
    if config.v1_url is None:
        raise ConfigError(
            "no V1 database given; pass --v1-url, set SA_DUALWRITE_V1_URL "
            "or set v1_url in the config file"
        )
    source = make_engine(config.v1_url, "V1")
    target = (
        None if config.v2_url is None else make_engine(config.v2_url, "V2")
    )
    handle = _install(config, source, target)
    try:
        yield handle
    finally:
        handle.uninstall()
        source.dispose()
        if target is not None:
            target.dispose()


def _install(config: CliConfig, source: Any, target: Any) -> DualWrite:
    return install_dual_write(
        source,
        resolve_mappings(config),
        target=target,
        log_file=config.log_file,
        v2_timeout=config.v2_timeout,
        durable=True,
        max_attempts=config.max_attempts,
        retry_delay=config.retry_delay,
        retry_delay_max=config.retry_delay_max,
    )


def _errors_to_exit_codes(command: Command) -> Command:
    """Turn library and database errors into one line and an exit code."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except RevertConflict as exc:
            click.echo(f"conflict: {exc}", err=True)
            sys.exit(EXIT_CONFLICT)
        except ConfigError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USAGE)
        except DualWriteError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_ERROR)
        except SQLAlchemyError as exc:
            click.echo(f"error: database error: {one_line(exc)}", err=True)
            sys.exit(EXIT_ERROR)

    return run  # type: ignore[return-value]


_FORMAT = click.option(
    "--format",
    "output_format",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="Output as an aligned text table or as JSON.",
)


@click.group()
@click.version_option(package_name="sa-dualwrite")
def main() -> None:
    """Operate sa_dualwrite: watch the sync, drain the outbox, revert and
    replay changes, run the demo.
    """


@main.command()
@click.option(
    "--v1-url",
    default=None,
    help="SQLAlchemy URL of the V1 database. Default: a new SQLite file "
    "under ./demo-data/.",
)
@click.option(
    "--v2-url",
    default=None,
    help="SQLAlchemy URL of the V2 database. Default: the V1 database.",
)
def demo(v1_url: str | None, v2_url: str | None) -> None:
    """Run the contract-alert demo on real public contract records."""
    from examples.contract_alerts.demo import (  # type: ignore[import-untyped, import-not-found, unused-ignore]
        run_demo,
    )

    raise SystemExit(run_demo(v1_url=v1_url, v2_url=v2_url))


@main.command()
@connection_options
@_FORMAT
@_errors_to_exit_codes
def status(output_format: str, **params: Any) -> None:
    """Show per mapping the pending, parked, applied and failed changes
    and the lag: the age of the oldest pending change, in seconds.

    A database that cannot be read is reported on stderr and its counts
    are shown as ? (null in JSON); the exit status is then 1.
    """
    with _handle(params) as handle:
        entries, problems = status_report(handle, require_outbox=True)
    # When nothing could be read, the errors below are the whole output.
    if any(
        entry.pending is not None or entry.applied is not None
        for entry in entries
    ):
        _print_status(entries, output_format)
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    if problems:
        sys.exit(EXIT_ERROR)


def _print_status(entries: list[Any], output_format: str) -> None:
    if output_format == "json":
        click.echo(
            json.dumps([entry.as_dict() for entry in entries], indent=2)
        )
        return
    rows = [
        [
            entry.mapping,
            _count(entry.pending),
            _count(entry.parked),
            _count(entry.applied),
            _count(entry.failed),
            "-" if entry.lag is None else f"{entry.lag:.1f}",
        ]
        for entry in entries
    ]
    _table(
        ["MAPPING", "PENDING", "PARKED", "APPLIED", "FAILED", "LAG_S"], rows
    )


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str) -> dt.datetime:
    """Parse an ISO 8601 time (UTC unless it has an offset) or a
    duration such as ``30m`` meaning that long ago.
    """
    match = _DURATION.match(text.strip())
    if match:
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        return dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=seconds)
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not an ISO 8601 time (2026-01-31T12:00) or a "
            "duration (90s, 30m, 2h, 7d)"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value


def _time_option(name: str, meaning: str) -> Callable[[Command], Command]:
    return click.option(
        name,
        callback=lambda ctx, param, value: (
            None if value is None else parse_time(value)
        ),
        help=f"{meaning}: an ISO 8601 time (UTC when it has no offset) or "
        "a duration ago such as 90s, 30m, 2h, 7d.",
    )


@main.command()
@connection_options
@click.option("--mapping", help="Only rows of this mapping.")
@click.option(
    "--status",
    "row_status",
    type=click.Choice(STATUSES),
    help="Only rows with this status.",
)
@click.option(
    "--operation",
    type=click.Choice(["insert", "update", "delete", "revert"]),
    help="Only rows of this operation.",
)
@click.option("--session-key", help="Only rows written by this session.")
@click.option(
    "--v1-pk",
    help="Only rows of this V1 key, as stored: the plain value, or a JSON "
    "array for a composite key.",
)
@_time_option("--since", "Only rows written at or after this time")
@_time_option("--until", "Only rows written before this time")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="Newest rows to show; 0 shows all.",
)
@_FORMAT
@_errors_to_exit_codes
def audit(
    mapping: str | None,
    row_status: str | None,
    operation: str | None,
    session_key: str | None,
    v1_pk: str | None,
    since: dt.datetime | None,
    until: dt.datetime | None,
    limit: int,
    output_format: str,
    **params: Any,
) -> None:
    """List audit rows, newest first."""
    with _handle(params) as handle:
        rows = handle.audit_rows(
            mapping=mapping,
            status=row_status,
            operation=operation,
            session_key=session_key,
            v1_pk=v1_pk,
            since=since,
            until=until,
            limit=limit or None,
        )
    if output_format == "json":
        click.echo(json.dumps([to_json(row) for row in rows], indent=2))
        return
    _table(
        [
            "ID",
            "CREATED_AT",
            "MAPPING",
            "OPERATION",
            "STATUS",
            "V1_PK",
            "V2_PK",
            "SESSION_KEY",
            "ERROR",
        ],
        [
            [
                row["id"],
                row["created_at"].strftime("%Y-%m-%d %H:%M:%S"),
                row["mapping"],
                row["operation"],
                row["status"],
                row["v1_pk"],
                row["v2_pk"],
                row["session_key"],
                _shorten(row["error"], 60),
            ]
            for row in rows
        ],
    )


@main.command()
@connection_options
@click.argument("audit_id", type=int, required=False)
@click.option(
    "--session-key",
    help="Revert every applied change of this session instead of one "
    "audit row.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Revert even when a V2 row changed since the change was applied, "
    "overwriting that later change.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Show what the revert would change, and change nothing.",
)
@_errors_to_exit_codes
def revert(
    audit_id: int | None,
    session_key: str | None,
    force: bool,
    dry_run: bool,
    **params: Any,
) -> None:
    """Undo applied changes in V2, all or nothing: AUDIT_ID or
    --session-key. Exits with 3 when a V2 row changed since (a conflict)
    and --force is not given.
    """
    if audit_id is None and session_key is None:
        raise click.UsageError("give an AUDIT_ID or --session-key")
    if audit_id is not None and session_key is not None:
        raise click.UsageError("give an AUDIT_ID or --session-key, not both")
    with _handle(params) as handle:
        if dry_run:
            steps = handle.preview_revert(audit_id, session_key=session_key)
            _print_steps(steps, force)
            if any(step.conflict for step in steps) and not force:
                sys.exit(EXIT_CONFLICT)
            return
        new_ids = handle.revert(audit_id, session_key=session_key, force=force)
    click.echo(
        f"reverted {len(new_ids)} changes; revert audit rows: "
        + ", ".join(str(new_id) for new_id in new_ids)
    )


def _print_steps(steps: Sequence[Any], force: bool) -> None:
    for step in steps:
        click.echo(
            f"audit {step.audit_id}: {step.operation} {step.mapping} "
            f"V1 {step.v1_pk} -> {step.table} V2 {step.v2_pk}"
        )
        for line in _diff(step.current, step.restored):
            click.echo(f"    {line}")
        if step.conflict:
            verdict = "overwritten (--force)" if force else "needs --force"
            click.echo(
                f"    conflict: the V2 row changed since this change was "
                f"applied; {verdict}"
            )
    click.echo(
        f"dry run: {len(steps)} changes would be reverted; nothing was written"
    )


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _diff(
    current: dict[str, Any] | None, restored: dict[str, Any] | None
) -> list[str]:
    if current is None and restored is None:
        return ["row absent, stays absent"]
    if restored is None:
        return ["row would be deleted"]
    if current is None:
        return ["row would be inserted: " + _json(restored)]
    changed = [
        f"{column}: {_json(current.get(column))} -> {_json(value)}"
        for column, value in restored.items()
        if current.get(column) != value
    ]
    return changed or ["row unchanged"]


@main.command()
@connection_options
@click.argument("audit_ids", type=int, nargs=-1)
@click.option(
    "--requeue-only",
    is_flag=True,
    help="Only put parked changes back in the outbox queue, for a running "
    "worker to apply.",
)
@_errors_to_exit_codes
def replay(
    audit_ids: tuple[int, ...], requeue_only: bool, **params: Any
) -> None:
    """Retry failed changes from the current V1 rows: every one, or the
    AUDIT_IDS given. Parked outbox changes are requeued and applied.
    Exits with 4 when some changes failed again.
    """
    ids = list(audit_ids) or None
    with _handle(params) as handle:
        if requeue_only:
            count = handle.requeue(ids)
            click.echo(f"requeued {count} outbox changes")
            return
        new_ids = handle.replay(ids)
        failed = handle.audit_rows(ids=new_ids, status="failed", limit=None)
    click.echo(
        f"replayed {len(new_ids)} changes: {len(new_ids) - len(failed)} "
        f"applied, {len(failed)} failed"
    )
    if failed:
        sys.exit(EXIT_STILL_FAILING)


@main.command()
@connection_options
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Outbox rows claimed and applied per batch.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds a batch may spend on V2 (connecting, lock waits, "
    "statements).",
)
@click.option(
    "--idle",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Seconds to wait before looking again when the outbox is empty.",
)
@click.option(
    "--max-backoff",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="Maximum wait, in seconds, between drains while they fail (V2 "
    "unreachable); the wait doubles from --idle up to this.",
)
@click.option(
    "--retention",
    type=click.FloatRange(min=0),
    default=7 * 86400.0,
    show_default=True,
    help="Seconds to keep done outbox rows before deleting them; 0 keeps "
    "them for ever.",
)
@click.option(
    "--once",
    is_flag=True,
    help="Drain the outbox once and exit, instead of running until stopped.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="Minimum level of the log events printed on stderr.",
)
@_errors_to_exit_codes
def worker(
    batch_size: int,
    timeout: float,
    idle: float,
    max_backoff: float,
    retention: float,
    once: bool,
    log_level: str,
    **params: Any,
) -> None:
    """Apply pending outbox changes until stopped by SIGINT or SIGTERM.

    Several workers may run at once against one outbox. On a signal the
    batch in progress finishes, then the worker exits with status 0; a
    second signal stops it at once.
    """
    from sa_dualwrite._worker import Worker

    for name, value in (
        ("--timeout", timeout),
        ("--idle", idle),
        ("--max-backoff", max_backoff),
        ("--retention", retention),
    ):
        if not math.isfinite(value):
            raise click.BadParameter(
                f"{value} is not a finite number of seconds", param_hint=name
            )
    if max_backoff < idle:
        raise click.BadParameter(
            f"{max_backoff} is shorter than --idle {idle}; give a maximum "
            "wait of at least --idle",
            param_hint="--max-backoff",
        )
    with _log_to_stderr(log_level), _handle(params) as handle:
        loop = Worker(
            handle,
            batch_size=batch_size,
            timeout=timeout,
            idle=idle,
            max_backoff=max_backoff,
            retention=retention or None,
        )
        with _stop_on_signals(loop.stop):
            total = loop.run(once=once)
    click.echo(
        f"worker stopped: {total.applied} applied, {total.failed} failed, "
        f"{total.parked} parked"
    )
    if once and loop.last_error is not None:
        click.echo(f"error: the drain failed: {loop.last_error}", err=True)
        sys.exit(EXIT_ERROR)


@contextmanager
def _stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """Call ``stop`` on the first SIGINT or SIGTERM; the second one gets
    the default action, which ends the process.
    """
    wanted = [signal.SIGINT, signal.SIGTERM]
    previous = {number: signal.getsignal(number) for number in wanted}

    def receive(number: int, frame: Any) -> None:
        stop()
        signal.signal(number, signal.SIG_DFL)

    for number in wanted:
        signal.signal(number, receive)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


class _KeyValueFormatter(logging.Formatter):
    """Prints a log record's event and its structured fields on one line."""

    _standard: ClassVar[frozenset[str]] = frozenset(
        vars(logging.makeLogRecord({}))
    )

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(
            f"{key}={value}"
            for key, value in vars(record).items()
            if key not in self._standard and key != "message"
        )
        line = f"{self.formatTime(record)} {record.levelname.lower()} "
        return line + record.getMessage() + (f" {fields}" if fields else "")


@contextmanager
def _log_to_stderr(level: str) -> Iterator[None]:
    """Print the library's events on stderr while the worker runs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter())
    logger = logging.getLogger("sa_dualwrite")
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)


def _table(headers: list[str], rows: list[list[Any]]) -> None:
    texts = [
        ["" if cell is None else str(cell) for cell in row] for row in rows
    ]
    widths = [
        max([len(header)] + [len(row[index]) for row in texts])
        for index, header in enumerate(headers)
    ]
    for row in [headers, *texts]:
        click.echo(
            "  ".join(
                cell.ljust(width)
                for cell, width in zip(row, widths, strict=True)
            ).rstrip()
        )


def _shorten(text: str | None, width: int) -> str:
    if text is None:
        return ""
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= width else line[: width - 3] + "..."
