"""Run the contract-alert demo: ``python -m examples.contract_alerts``."""

from __future__ import annotations

import click

from examples.contract_alerts.demo import run_demo


@click.command()
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
def main(v1_url: str | None, v2_url: str | None) -> None:
    """Run the contract-alert demo on real public contract records."""
    raise SystemExit(run_demo(v1_url=v1_url, v2_url=v2_url))


if __name__ == "__main__":
    main()
