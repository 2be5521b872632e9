"""Hypothesis strategies for values PostgreSQL stores and the wire encodings must carry
exactly: text, JSON metadata with numbers at their extremes, and timestamps a datetime holds
(the export wire tests' generated rows)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import strategies as st

#: PostgreSQL text holds no NUL; surrogates are not UTF-8.
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))

NUMBERS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -0.0, 5e-324, 1.7976931348623157e308, 2**53 + 1, -(2**63)]),
)

#: Nested JSON values: null, booleans, numbers, text, lists and objects.
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), NUMBERS, TEXT),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)

#: Years 1 to 9999, to the microsecond, in UTC.
TIMES = st.datetimes(
    min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999999)
).map(lambda t: t.replace(tzinfo=UTC))


def wide_metadata(count: int) -> list[dict[str, Any]]:
    """`count` metadata objects of every JSON kind, of about 5.6 KB each (every tenth empty):
    60 hold more than server/off_loop.py's OFF_LOOP_BYTES, past which the store dumps and
    parses a call's metadata in a thread."""
    return [
        {}
        if i % 10 == 9
        else {
            "i": i,
            "ratio": i / 7,
            "tiny": -2.5e-7,
            "huge": 2**52 + i,
            "yes": True,
            "no": False,
            "text": 'a "quote", a \\ backslash,\na line, \t, é, 中, 😀',
            "nested": {"list": [1, "two", [3.5], {"four": None}, None], "empty": {}, "no": []},
            "pad": "x" * 5500,
        }
        for i in range(count)
    ]
