"""Conversion of keys and row images to the text and JSON that tables keep.

Primary keys are stored as text: a single-column key as its plain text, a
composite key as a JSON array. Row images (the ``changes``, ``before`` and
``after`` columns of the audit table) are JSON objects whose values are
encoded by :func:`to_json` and decoded back by :func:`from_json` with the
Python type of the column they belong to.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import json
import math
import uuid
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from sqlalchemy.types import TypeEngine

__all__ = [
    "decode_key",
    "encode_key",
    "from_json",
    "python_type",
    "to_json",
]


def python_type(type_: TypeEngine[Any]) -> type | None:
    """Return the Python type of a column type, or None if it has none."""
    try:
        return type_.python_type
    except NotImplementedError:
        return None


def to_json(value: Any) -> Any:
    """Return ``value`` as a JSON-compatible value, without loss of text."""
    if isinstance(value, float) and not math.isfinite(value):
        # JSON has no NaN or infinity (PostgreSQL's JSONB rejects them).
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return to_json(value.value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, (Decimal, uuid.UUID)):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(key): to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_json(item) for item in value]
    return str(value)


def from_json(value: Any, type_: type | None) -> Any:
    """Return the Python value that :func:`to_json` encoded as ``value``.

    ``type_`` is the Python type of the column the value belongs to; without
    it the JSON value is returned as it is.
    """
    if value is None or type_ is None:
        return value
    if type_ is dt.date and isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, type_):
        return value
    if type_ is dt.datetime:
        return dt.datetime.fromisoformat(value)
    if type_ is dt.date:
        return dt.date.fromisoformat(value)
    if type_ is dt.time:
        return dt.time.fromisoformat(value)
    if type_ is dt.timedelta:
        return dt.timedelta(seconds=value)
    if type_ is Decimal:
        return Decimal(str(value))
    if type_ is uuid.UUID:
        return uuid.UUID(str(value))
    if type_ is bytes:
        if isinstance(value, str) and value.startswith("\\x"):
            # PostgreSQL's JSON functions write bytea in hex form.
            return bytes.fromhex(value[2:])
        return base64.b64decode(value)
    if issubclass(type_, enum.Enum):
        return type_(value)
    if type_ in (int, float, str, bool):
        return type_(value)
    return value


def encode_key(values: Sequence[Any]) -> str:
    """Return the text form of a primary key given as a tuple of values."""
    if len(values) == 1:
        single = to_json(values[0])
        return single if isinstance(single, str) else json.dumps(single)
    return json.dumps([to_json(value) for value in values])


def decode_key(text: str, types: Sequence[type | None]) -> tuple[Any, ...]:
    """Return the tuple of key values that :func:`encode_key` produced."""
    if len(types) == 1:
        type_ = types[0]
        if type_ is str or type_ is None:
            return (text,)
        if type_ in (int, float, bool):
            return (type_(json.loads(text)),)
        return (from_json(text, type_),)
    parts = json.loads(text)
    return tuple(
        from_json(part, type_)
        for part, type_ in zip(parts, types, strict=True)
    )
