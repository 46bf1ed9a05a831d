"""The ``sa-dualwrite`` command line."""

from __future__ import annotations

import click

__all__ = ["main"]


@click.group()
@click.version_option(package_name="sa-dualwrite")
def main() -> None:
    """Operate sa_dualwrite: run the demo and inspect the sync."""


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
    from examples.contract_alerts.demo import run_demo

    raise SystemExit(run_demo(v1_url=v1_url, v2_url=v2_url))
