"""The demo's closing report: row counts, audit rows and the V1-V2 check."""

from __future__ import annotations

from sqlalchemy import func, select

import sa_dualwrite as dw
from examples.contract_alerts.databases import DemoDatabases

__all__ = ["print_report"]


def print_report(databases: DemoDatabases, dual_write: dw.DualWrite) -> bool:
    """Print the report; return True when V1 and V2 agree."""
    report = dual_write.verify()
    print("\nReport")
    print(f"  {'V1 table':<24}{'rows':>6}   {'V2 table':<14}{'rows':>6}")
    for mapping in report.mappings:
        print(
            f"  {mapping.source_table:<24}{mapping.source_rows:>6}   "
            f"{mapping.target_table:<14}{mapping.target_rows:>6}"
        )
    print("  audit rows by status:")
    for status, operations in _audit_counts(databases).items():
        total = sum(operations.values())
        detail = ", ".join(
            f"{operation} {count}" for operation, count in operations.items()
        )
        print(f"    {status:<9}{total:>5}  ({detail})")
    print("  V1 against V2 through the mappings:")
    for line in report.summary().splitlines():
        print(f"    {line}")
    if report.agrees:
        print("V1 and V2 agree.")
    else:
        print(f"V1 and V2 disagree: {report.mismatch_count} mismatches.")
    return report.agrees


def _audit_counts(databases: DemoDatabases) -> dict[str, dict[str, int]]:
    audit = dw.metadata.tables["dualwrite_audit"]
    statement = (
        select(audit.c.status, audit.c.operation, func.count())
        .group_by(audit.c.status, audit.c.operation)
        .order_by(audit.c.status, audit.c.operation)
    )
    counts: dict[str, dict[str, int]] = {}
    with databases.v2.connect() as connection:
        for status, operation, count in connection.execute(statement):
            counts.setdefault(status, {})[operation] = count
    return counts
