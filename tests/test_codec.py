"""Key text and JSON images."""

from __future__ import annotations

import datetime as dt
import math
import uuid
from decimal import Decimal

import pytest

from sa_dualwrite._codec import decode_key, encode_key, from_json, to_json


@pytest.mark.parametrize(
    ("value", "type_"),
    [
        (
            dt.datetime(
                2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=-3))
            ),
            dt.datetime,
        ),
        (dt.date(2026, 1, 2), dt.date),
        (Decimal("12.30"), Decimal),
        (uuid.UUID(int=5), uuid.UUID),
        (b"\x00\xff", bytes),
        (1.5, float),
        ("texto", str),
    ],
    ids=[
        "aware-datetime",
        "date",
        "decimal",
        "uuid",
        "bytes",
        "float",
        "text",
    ],
)
def test_json_round_trip(value: object, type_: type) -> None:
    """to_json then from_json returns the value, offset included."""
    assert from_json(to_json(value), type_) == value


def test_non_finite_floats_are_text() -> None:
    """NaN and infinities become text, which JSON columns accept."""
    assert to_json(math.nan) == "nan"
    assert to_json(math.inf) == "inf"
    assert math.isnan(from_json(to_json(math.nan), float))


@pytest.mark.parametrize(
    ("key", "types"),
    [((5,), (int,)), (("123/2026",), (str,)), ((1, "a"), (int, str))],
    ids=["int", "text", "composite"],
)
def test_key_round_trip(
    key: tuple[object, ...], types: tuple[type, ...]
) -> None:
    """encode_key then decode_key returns the key tuple."""
    assert decode_key(encode_key(key), types) == key
