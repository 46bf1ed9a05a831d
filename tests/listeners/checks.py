"""Comparison of the target with the source, through the mappings."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, select

import sa_dualwrite as dw
from sa_dualwrite._codec import decode_key, encode_key
from sa_dualwrite._store import xref_table
from sa_dualwrite.mapping._compile import CompiledMapping


def differences(
    handle: dw.DualWrite,
    source_engine: Engine | None = None,
    target_engine: Engine | None = None,
) -> list[str]:
    """Return each way in which the target differs from the source.

    For every mapping, each source row must have a cross-reference to a
    target row whose columns equal what the mapping makes of the source
    row, and the target table must hold no other row. Returns an empty
    list when the two agree. The engines default to the handle's; async
    installs pass sync engines on the same databases.
    """
    source_engine = source_engine or handle.engine
    target_engine = target_engine or handle.target
    found: list[str] = []
    with source_engine.connect() as source, target_engine.connect() as target:
        xrefs = {name: _xrefs(target, name) for name in handle.mappings}
        for mapping in handle.mappings.values():
            found.extend(_compare(source, target, mapping, handle, xrefs))
    return found


def _xrefs(connection: Connection, name: str) -> dict[str, str]:
    rows = connection.execute(
        select(xref_table.c.v1_pk, xref_table.c.v2_pk).where(
            xref_table.c.mapping == name
        )
    )
    return {row.v1_pk: row.v2_pk for row in rows}


def _images(
    connection: Connection, mapping: CompiledMapping
) -> dict[str, dict[str, Any]]:
    mapper = mapping.source_mapper
    keys = [
        tuple(row)
        for row in connection.execute(
            select(*mapper.primary_key).select_from(mapper)
        )
    ]
    if not keys:
        return {}
    single = len(mapping.source_pk_attrs) == 1
    params = [key[0] for key in keys] if single else keys
    images = {}
    for row in connection.execute(mapping.image_select, {"keys": params}):
        key = tuple(row[i] for i in range(len(mapping.source_pk_attrs)))
        if key in keys:
            image = {attr: row._mapping[attr] for attr in mapping.source_attrs}
            images[encode_key(key)] = image
    return images


def _compare(
    source: Connection,
    target: Connection,
    mapping: CompiledMapping,
    handle: dw.DualWrite,
    xrefs: dict[str, dict[str, str]],
) -> list[str]:
    name = mapping.name
    images = _images(source, mapping)
    refs = xrefs[name]
    found = []
    if set(refs) != set(images):
        found.append(
            f"{name}: cross-referenced source keys {sorted(refs)} differ "
            f"from the source keys {sorted(images)}"
        )
    table = mapping.target_table
    rows = {
        encode_key(mapping.target_key(dict(row._mapping))): dict(row._mapping)
        for row in target.execute(select(table))
    }
    if set(rows) != set(refs.values()):
        found.append(
            f"{name}: target keys {sorted(rows)} differ from the "
            f"cross-referenced keys {sorted(refs.values())}"
        )

    def resolve(ref_mapping: str, value: Any) -> Any:
        v2_key = xrefs[ref_mapping][encode_key((value,))]
        types = handle.mappings[ref_mapping].target_pk_types
        return decode_key(v2_key, types)[0]

    for v1_key, image in images.items():
        v2_key = refs.get(v1_key)
        row = rows.get(v2_key) if v2_key is not None else None
        if row is None:
            continue
        expected = mapping.target_values(
            image, resolve, operation="update", v1_pk=v1_key
        )
        for column, value in expected.items():
            if row[column] != value:
                found.append(
                    f"{name} {v1_key}: target {column} is {row[column]!r}, "
                    f"expected {value!r}"
                )
    return found
