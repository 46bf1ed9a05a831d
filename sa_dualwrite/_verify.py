"""Comparison of the source rows of each mapping with their target rows.

:func:`verify` makes three passes per mapping, each reading in batches
ordered by key, with one short read transaction per batch:

1. every source row: its cross-reference must lead to a target row whose
   mapped columns equal what the mapping computes from the source row;
2. every cross-reference row: a source row that is gone must have had its
   target row deleted (or kept, or soft-deleted, as ``on_delete`` says);
3. every target row: it must be cross-referenced by a mapping that writes
   its table.

Nothing is written. On a live system a change still being synced shows as
a mismatch, so run it again before acting on a single row.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Row,
    Select,
    Table,
    select,
    tuple_,
)

from sa_dualwrite import _store
from sa_dualwrite._codec import decode_key, encode_key
from sa_dualwrite._errors import SyncError
from sa_dualwrite.mapping._compile import CompiledMapping, iter_source_refs

if TYPE_CHECKING:
    from sa_dualwrite._install import DualWrite

__all__ = [
    "DIFFERENT",
    "EXTRA",
    "KINDS",
    "MISSING",
    "STALE",
    "UNMAPPABLE",
    "MappingReport",
    "Mismatch",
    "VerifyReport",
    "verify",
]

MISSING = "missing"
"""A source row has no target row."""

DIFFERENT = "different"
"""A target row's mapped columns differ from the values computed."""

EXTRA = "extra"
"""A target row has no source row."""

STALE = "stale"
"""A cross-reference row whose source row and target row are both gone."""

UNMAPPABLE = "unmappable"
"""The mapping cannot compute target values from a source row."""

KINDS = (MISSING, DIFFERENT, EXTRA, STALE, UNMAPPABLE)

DEFAULT_BATCH_SIZE = 1000
DEFAULT_MAX_MISMATCHES = 100

_xref = _store.xref_table


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One disagreement between the source and the target of a mapping.

    ``columns`` maps each differing target column to a pair: the value
    computed from the source row, then the value found in the target row.
    It is empty for every kind but ``different``. Keys are text, as the
    cross-reference stores them.
    """

    kind: str
    v1_pk: str | None
    v2_pk: str | None
    detail: str
    columns: dict[str, tuple[Any, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MappingReport:
    """The result of checking one mapping.

    ``counts`` has the number of mismatches of each kind; ``mismatches``
    lists at most ``max_mismatches`` of them, in the order found.
    """

    mapping: str
    source_table: str
    target_table: str
    source_rows: int
    target_rows: int
    counts: dict[str, int]
    mismatches: tuple[Mismatch, ...]

    @property
    def mismatch_count(self) -> int:
        """Number of mismatches found, including those not listed."""
        return sum(self.counts.values())

    @property
    def agrees(self) -> bool:
        """True when no mismatch was found."""
        return self.mismatch_count == 0

    def summary(self) -> str:
        """Return one line with the row counts and the mismatches."""
        tables = f"{self.source_table} -> {self.target_table}"
        if self.mapping != self.source_table:
            tables = f"{self.mapping} ({tables})"
        head = (
            f"{tables}: {self.source_rows} source rows, "
            f"{self.target_rows} target rows"
        )
        if self.agrees:
            return f"{head}, agree"
        kinds = ", ".join(
            f"{count} {kind}" for kind, count in self.counts.items() if count
        )
        noun = "mismatch" if self.mismatch_count == 1 else "mismatches"
        return f"{head}, {self.mismatch_count} {noun} ({kinds})"


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The result of :meth:`DualWrite.verify`: one report per mapping."""

    mappings: tuple[MappingReport, ...]

    @property
    def agrees(self) -> bool:
        """True when every mapping agrees."""
        return all(report.agrees for report in self.mappings)

    @property
    def mismatch_count(self) -> int:
        """Number of mismatches found over all mappings."""
        return sum(report.mismatch_count for report in self.mappings)

    def __getitem__(self, mapping: str) -> MappingReport:
        for report in self.mappings:
            if report.mapping == mapping:
                return report
        known = ", ".join(report.mapping for report in self.mappings)
        raise KeyError(f"no report for mapping {mapping!r}; known: {known}")

    def summary(self, max_listed: int = 10) -> str:
        """Return a few lines per mapping, listing up to ``max_listed``
        mismatches of each.
        """
        lines = []
        for report in self.mappings:
            lines.append(report.summary())
            for mismatch in report.mismatches[:max_listed]:
                lines.append(f"  {_describe(mismatch)}")
            hidden = report.mismatch_count - min(
                len(report.mismatches), max_listed
            )
            if hidden > 0:
                lines.append(f"  ... and {hidden} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _describe(mismatch: Mismatch) -> str:
    keys = []
    if mismatch.v1_pk is not None:
        keys.append(f"v1 {mismatch.v1_pk}")
    if mismatch.v2_pk is not None:
        keys.append(f"v2 {mismatch.v2_pk}")
    text = f"{mismatch.kind} {', '.join(keys)}: {mismatch.detail}"
    for column, (expected, found) in mismatch.columns.items():
        text += f"; {column}: expected {expected!r}, found {found!r}"
    return text


class _Collector:
    """Counts every mismatch of a mapping and keeps the first few."""

    def __init__(self, mapping: CompiledMapping, limit: int) -> None:
        self.mapping = mapping
        self.limit = limit
        self.counts = dict.fromkeys(KINDS, 0)
        self.mismatches: list[Mismatch] = []
        self.source_rows = 0
        self.target_rows = 0

    def add(self, mismatch: Mismatch) -> None:
        self.counts[mismatch.kind] += 1
        if len(self.mismatches) < self.limit:
            self.mismatches.append(mismatch)

    def report(self) -> MappingReport:
        return MappingReport(
            mapping=self.mapping.name,
            source_table=self.mapping.source_table_name,
            target_table=self.mapping.target_table.name,
            source_rows=self.source_rows,
            target_rows=self.target_rows,
            counts=self.counts,
            mismatches=tuple(self.mismatches),
        )


def verify(
    handle: DualWrite,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_mismatches: int = DEFAULT_MAX_MISMATCHES,
) -> VerifyReport:
    """Compare every mapping's source rows with the target; see
    :meth:`DualWrite.verify`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    mappings = handle.mappings
    collectors = {
        name: _Collector(mapping, max_mismatches)
        for name, mapping in mappings.items()
    }
    with handle.engine.connect() as source, handle.target.connect() as target:
        for collector in collectors.values():
            _check_source_rows(source, target, mappings, collector, batch_size)
            _check_cross_references(source, target, collector, batch_size)
        for table, writers in _writers_by_table(mappings).items():
            _check_target_rows(
                target,
                table,
                [collectors[mapping.name] for mapping in writers],
                batch_size,
            )
    return VerifyReport(
        tuple(collector.report() for collector in collectors.values())
    )


def _batches(
    connection: Connection,
    statement: Select[Any],
    key_columns: Sequence[ColumnElement[Any]],
    batch_size: int,
) -> Iterator[list[Row[Any]]]:
    """Yield the rows of ``statement`` in batches, by keyset pagination.

    The first ``len(key_columns)`` columns of ``statement`` must be the
    key columns. Each batch is read in its own transaction, so that no
    snapshot or lock is held between batches.
    """
    width = len(key_columns)
    ordered = statement.order_by(*key_columns).limit(batch_size)
    last: tuple[Any, ...] | None = None
    while True:
        page = ordered
        if last is not None:
            page = ordered.where(_after(key_columns, last))
        rows = list(connection.execute(page))
        connection.rollback()
        if rows:
            yield rows
        if len(rows) < batch_size:
            return
        last = tuple(rows[-1][:width])


def _after(
    columns: Sequence[ColumnElement[Any]], key: tuple[Any, ...]
) -> ColumnElement[bool]:
    criterion: ColumnElement[bool]
    if len(columns) == 1:
        criterion = columns[0] > key[0]
    else:
        criterion = tuple_(*columns) > tuple_(*key)
    return criterion


def _source_select(mapping: CompiledMapping) -> Select[Any]:
    mapper = mapping.source_mapper
    columns: list[ColumnElement[Any]] = [
        column.label(f"_pk{index}")
        for index, column in enumerate(mapper.primary_key)
    ]
    for attr in mapping.source_attrs:
        columns.append(mapper.columns[attr].label(attr))
    return select(*columns).select_from(mapper.selectable)


def _check_source_rows(
    source: Connection,
    target: Connection,
    mappings: dict[str, CompiledMapping],
    collector: _Collector,
    batch_size: int,
) -> None:
    """Pass 1: each source row against its cross-referenced target row."""
    mapping = collector.mapping
    width = len(mapping.source_pk_attrs)
    for rows in _batches(
        source,
        _source_select(mapping),
        list(mapping.source_mapper.primary_key),
        batch_size,
    ):
        collector.source_rows += len(rows)
        images = {
            encode_key(tuple(row[:width])): {
                attr: row._mapping[attr] for attr in mapping.source_attrs
            }
            for row in rows
        }
        _compare_batch(target, mappings, mapping, images, collector)
        target.rollback()


def _compare_batch(
    target: Connection,
    mappings: dict[str, CompiledMapping],
    mapping: CompiledMapping,
    images: dict[str, dict[str, Any]],
    collector: _Collector,
) -> None:
    xref = _store.load_xref(target, mapping.name, list(images))
    found = _target_rows(target, mapping, list(xref.values()))
    refs = _load_refs(target, mapping, images.values())

    def resolve_ref(mapping_name: str, value: Any) -> Any:
        key = encode_key((value,))
        v2_key = refs[mapping_name].get(key)
        if v2_key is None:
            raise SyncError(
                f"ref to {mapping_name!r} key {key}: no cross-reference",
                mapping=mapping.name,
                operation="verify",
                v1_pk=key,
            )
        return decode_key(v2_key, mappings[mapping_name].target_pk_types)[0]

    for v1_key, image in images.items():
        v2_key = xref.get(v1_key)
        if v2_key is None:
            collector.add(
                Mismatch(
                    MISSING,
                    v1_key,
                    None,
                    "no cross-reference: the row was never synced or its "
                    "sync failed; replay its failed change, or resync() it",
                )
            )
            continue
        row = found.get(v2_key)
        if row is None:
            collector.add(
                Mismatch(
                    MISSING,
                    v1_key,
                    v2_key,
                    "the cross-referenced target row does not exist; "
                    "delete the cross-reference row, then resync() it",
                )
            )
            continue
        try:
            expected = mapping.target_values(
                image, resolve_ref, operation="verify", v1_pk=v1_key
            )
        except SyncError as exc:
            collector.add(Mismatch(UNMAPPABLE, v1_key, v2_key, str(exc)))
            continue
        # NOTE: values compare with ==, so an aware source datetime differs
        # from the naive value of a target column that drops time zones
        # (any SQLite DateTime).
        columns = {
            column: (value, row.get(column))
            for column, value in expected.items()
            if row.get(column) != value
        }
        if columns:
            collector.add(
                Mismatch(
                    DIFFERENT,
                    v1_key,
                    v2_key,
                    "mapped columns differ from the source row",
                    columns,
                )
            )


def _load_refs(
    target: Connection,
    mapping: CompiledMapping,
    images: Iterable[dict[str, Any]],
) -> dict[str, dict[str, str]]:
    ref_keys: dict[str, set[str]] = {}
    for image in images:
        for ref_mapping, value in iter_source_refs(mapping, image):
            ref_keys.setdefault(ref_mapping, set()).add(encode_key((value,)))
    return {
        name: _store.load_xref(target, name, sorted(keys))
        for name, keys in ref_keys.items()
    }


def _target_rows(
    target: Connection, mapping: CompiledMapping, v2_keys: list[str]
) -> dict[str, dict[str, Any]]:
    """Return the target rows of ``v2_keys`` that exist, by key text."""
    table = mapping.target_table
    columns = mapping.target_pk_columns
    found: dict[str, dict[str, Any]] = {}
    for part in _store.chunks(v2_keys):
        keys = [decode_key(key, mapping.target_pk_types) for key in part]
        if len(columns) == 1:
            criterion = columns[0].in_([key[0] for key in keys])
        else:
            criterion = tuple_(*columns).in_(keys)
        for row in target.execute(select(table).where(criterion)):
            values = dict(row._mapping)
            found[encode_key(mapping.target_key(values))] = values
    return found


def _check_cross_references(
    source: Connection,
    target: Connection,
    collector: _Collector,
    batch_size: int,
) -> None:
    """Pass 2: cross-references whose source row no longer exists."""
    mapping = collector.mapping
    statement = select(_xref.c.v1_pk, _xref.c.v2_pk).where(
        _xref.c.mapping == mapping.name
    )
    for rows in _batches(target, statement, [_xref.c.v1_pk], batch_size):
        pairs = {row.v1_pk: row.v2_pk for row in rows}
        existing = _existing_source_keys(source, mapping, list(pairs))
        deleted = {v1: v2 for v1, v2 in pairs.items() if v1 not in existing}
        if not deleted or mapping.on_delete == "ignore":
            continue
        found = _target_rows(target, mapping, list(deleted.values()))
        target.rollback()
        for v1_key, v2_key in deleted.items():
            _check_deleted(collector, v1_key, v2_key, found.get(v2_key))


def _existing_source_keys(
    source: Connection, mapping: CompiledMapping, v1_keys: list[str]
) -> set[str]:
    single = len(mapping.source_pk_attrs) == 1
    width = len(mapping.source_pk_attrs)
    existing: set[str] = set()
    for part in _store.chunks(v1_keys):
        keys = [decode_key(key, mapping.source_pk_types) for key in part]
        params = [key[0] for key in keys] if single else keys
        for row in source.execute(mapping.image_select, {"keys": params}):
            existing.add(encode_key(tuple(row[:width])))
    source.rollback()
    return existing


def _check_deleted(
    collector: _Collector,
    v1_key: str,
    v2_key: str,
    row: dict[str, Any] | None,
) -> None:
    """Check the target row of a deleted source row against on_delete."""
    on_delete = collector.mapping.on_delete
    if row is None:
        collector.add(
            Mismatch(
                STALE,
                v1_key,
                v2_key,
                "the source row and the target row are both gone but the "
                "cross-reference row remains; delete it",
            )
        )
        return
    if isinstance(on_delete, dict):
        columns = {
            column: (value, row.get(column))
            for column, value in on_delete.items()
            if row.get(column) != value
        }
        if columns:
            collector.add(
                Mismatch(
                    DIFFERENT,
                    v1_key,
                    v2_key,
                    "the source row was deleted but the target row lacks "
                    "the on_delete values",
                    columns,
                )
            )
        return
    collector.add(
        Mismatch(
            EXTRA,
            v1_key,
            v2_key,
            "the source row was deleted but the target row remains; "
            "resync() it, or revert the insert",
        )
    )


def _writers_by_table(
    mappings: dict[str, CompiledMapping],
) -> dict[Table, list[CompiledMapping]]:
    writers: dict[Table, list[CompiledMapping]] = {}
    for mapping in mappings.values():
        writers.setdefault(mapping.target_table, []).append(mapping)
    return writers


def _check_target_rows(
    target: Connection,
    table: Table,
    collectors: list[_Collector],
    batch_size: int,
) -> None:
    """Pass 3: target rows that no mapping writing the table refers to.

    When several mappings write one table, such rows are counted in the
    report of the first of them.
    """
    mapping = collectors[0].mapping
    names = [collector.mapping.name for collector in collectors]
    pk_columns = list(mapping.target_pk_columns)
    total = 0
    for rows in _batches(target, select(*pk_columns), pk_columns, batch_size):
        total += len(rows)
        keys = [encode_key(tuple(row)) for row in rows]
        referenced: set[str] = set()
        for part in _store.chunks(keys):
            statement = select(_xref.c.v2_pk).where(
                _xref.c.mapping.in_(names), _xref.c.v2_pk.in_(list(part))
            )
            referenced.update(target.scalars(statement))
        target.rollback()
        for key in keys:
            if key not in referenced:
                collectors[0].add(
                    Mismatch(
                        EXTRA,
                        None,
                        key,
                        "no cross-reference: the row was not written by the "
                        "sync, or its cross-reference was deleted",
                    )
                )
    for collector in collectors:
        collector.target_rows = total
