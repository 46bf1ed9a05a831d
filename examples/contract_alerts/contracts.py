"""Reading the public contract records and turning them into V1 alerts.

Each CSV row becomes one :class:`ContractRecord` with its dates parsed.
Missing, unreadable or inconsistent dates never stop the reading: each one
is kept as a :class:`DateIssue`, and the alert built from the row is given
no deadline when its dates cannot produce one.
"""

from __future__ import annotations

import csv
import datetime as dt
import re
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = [
    "BRASILIA",
    "CONSEQUENCES",
    "DATA_FILE",
    "ContractRecord",
    "DateIssue",
    "read_contracts",
]

DATA_FILE = Path(__file__).parent / "data" / "contracts-mg-2020.csv"

# Brasília time has had no daylight saving time since 2019.
BRASILIA = dt.timezone(dt.timedelta(hours=-3), "BRT")

_DATE_COLUMNS = (
    "cadastro",
    "publicacao",
    "inicio_vigencia",
    "fim_vigencia",
    "fim_vigencia_atualizada",
)
_STOP_WORDS = {"DA", "DAS", "DE", "DO", "DOS", "E"}

NO_END_DATE = "no end date"
NO_PLANNED_END = "no planned end date"
NO_START_DATE = "no start date"
END_BEFORE_START = "end date before start date"
STARTS_BEFORE_PUBLICATION = "start date before publication date"
UNREADABLE_DATE = "unreadable date"

CONSEQUENCES = {
    NO_END_DATE: "alert without deadline",
    NO_PLANNED_END: "deadline from fim_vigencia_atualizada",
    NO_START_DATE: "alert without deadline",
    END_BEFORE_START: "no deadline from that end date",
    STARTS_BEFORE_PUBLICATION: "deadline counted from the start",
    UNREADABLE_DATE: "date ignored",
}
"""The demo's handling of a record, by kind of date issue."""


@dataclass(frozen=True, slots=True)
class DateIssue:
    """A missing, unreadable or inconsistent date of one record."""

    reference: str
    kind: str
    detail: str


@dataclass(frozen=True)
class ContractRecord:
    """One row of the CSV file: a contract, or a process without one."""

    line: int
    processo: str
    contrato: str | None
    objeto: str
    orgao: str
    dates: dict[str, dt.date | None]
    issues: tuple[DateIssue, ...] = field(default=())

    @property
    def reference(self) -> str:
        """The contract number, or the process number without a contract."""
        return self.contrato or self.processo

    @property
    def start(self) -> dt.date | None:
        """The date the deadline counts from: the start, else registration."""
        return self.dates["inicio_vigencia"] or self.dates["cadastro"]

    @property
    def planned_end(self) -> dt.date | None:
        """The original end date, or the amended one when it is missing."""
        return (
            self.dates["fim_vigencia"] or self.dates["fim_vigencia_atualizada"]
        )

    @property
    def amended_end(self) -> dt.date | None:
        """The amended end date when it differs from the original one."""
        original = self.dates["fim_vigencia"]
        amended = self.dates["fim_vigencia_atualizada"]
        if original is None or amended is None or amended == original:
            return None
        return amended

    @property
    def current_end(self) -> dt.date | None:
        """The end date in force: the amended one when there is one."""
        return self.amended_end or self.planned_end

    def prazo(self, end: dt.date | None) -> int | None:
        """Return the days from :attr:`start` to ``end``, or None."""
        start = self.start
        if start is None or end is None or end < start:
            return None
        return (end - start).days

    def responsavel(self) -> str:
        """Return the login of the manager in charge, from the body's name.

        The login is ``gestor.`` and the initials of the significant words
        of ``orgao``: "POLICIA MILITAR DE MINAS GERAIS" gives ``gestor.pmmg``.
        """
        plain = unicodedata.normalize("NFKD", self.orgao)
        words = re.findall(r"[A-Za-z]+", plain.upper())
        initials = "".join(
            word[0] for word in words if word not in _STOP_WORDS
        )
        return f"gestor.{initials.lower() or 'sem.orgao'}"

    def alert_data(self) -> dict[str, Any]:
        """Return the ``criar_alerta_dual`` data of this record.

        The alert is dated at noon, Brasília time, of :attr:`start`. So the
        V2 due date is the planned end date whenever the time zone of the V1
        database session lies between UTC-12 and UTC+8. Without a start date
        the database sets the creation time.
        """
        if self.contrato is not None:
            titulo = "Vencimento de contrato"
        else:
            titulo = "Processo de compra sem contrato"
        data: dict[str, Any] = {
            "contrato_id": self.reference,
            "titulo": titulo,
            "descricao": f"{self.objeto.strip()} ({self.orgao.strip()})",
            "prazo": self.prazo(self.planned_end),
            "responsavel": self.responsavel(),
        }
        if self.start is not None:
            data["criado_em"] = dt.datetime.combine(
                self.start, dt.time(12), BRASILIA
            )
        return data


def read_contracts(
    path: Path = DATA_FILE,
) -> tuple[list[ContractRecord], list[DateIssue]]:
    """Read the CSV file; return its records and every date issue found."""
    records = []
    issues: list[DateIssue] = []
    with path.open(newline="", encoding="utf-8") as file:
        for line, row in enumerate(csv.DictReader(file), start=2):
            record = _record(line, row)
            records.append(record)
            issues.extend(record.issues)
    return records, issues


def _record(line: int, row: dict[str, str]) -> ContractRecord:
    contrato = (row.get("contrato") or "").strip() or None
    processo = (row.get("processo") or "").strip() or f"linha {line}"
    reference = contrato or processo
    issues: list[DateIssue] = []
    dates = {
        column: _date(reference, column, row.get(column), issues)
        for column in _DATE_COLUMNS
    }
    record = ContractRecord(
        line=line,
        processo=processo,
        contrato=contrato,
        objeto=row.get("objeto") or "",
        orgao=row.get("orgao") or "",
        dates=dates,
    )
    issues.extend(_check_dates(record))
    return replace(record, issues=tuple(issues))


def _date(
    reference: str, column: str, text: str | None, issues: list[DateIssue]
) -> dt.date | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        issues.append(
            DateIssue(reference, UNREADABLE_DATE, f"{column} {text!r} ignored")
        )
        return None


def _check_dates(record: ContractRecord) -> list[DateIssue]:
    issues = []
    reference = record.reference
    dates = record.dates
    if record.start is None:
        issues.append(
            DateIssue(reference, NO_START_DATE, "alert without deadline")
        )
    if record.planned_end is None:
        issues.append(
            DateIssue(reference, NO_END_DATE, "alert without deadline")
        )
    elif dates["fim_vigencia"] is None:
        issues.append(
            DateIssue(
                reference,
                NO_PLANNED_END,
                "deadline from fim_vigencia_atualizada "
                f"{record.planned_end.isoformat()}",
            )
        )
    start = record.start
    for column in ("fim_vigencia", "fim_vigencia_atualizada"):
        end = dates[column]
        if start is not None and end is not None and end < start:
            issues.append(
                DateIssue(
                    reference,
                    END_BEFORE_START,
                    f"{column} {end.isoformat()} before "
                    f"{start.isoformat()}: no deadline from it",
                )
            )
    published = dates["publicacao"]
    begins = dates["inicio_vigencia"]
    if published is not None and begins is not None and begins < published:
        issues.append(
            DateIssue(
                reference,
                STARTS_BEFORE_PUBLICATION,
                f"starts {begins.isoformat()}, published "
                f"{published.isoformat()}: deadline counted from the start",
            )
        )
    return issues
