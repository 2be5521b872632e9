"""A JSON object as the wire bytes of a google.protobuf.Struct, for one C parse.

Struct.update sets each value through Python calls into the protobuf runtime (a Value made,
its kind chosen, appended): 64 KiB of metadata holds ~11,000 small values and took 46 ms,
14 times json.dumps, on the event loop for every row of an answer. Writing the bytes here
and parsing them once (`MergeFromString`, in C) takes a quarter of that
(tests/unit/test_struct_wire.py). The bytes are those of the same Struct: map entries
(key = 1, value = 2), Value's oneof (null 1, number 2, string 3, bool 4, struct 5, list 6),
ListValue's values = 1.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

from server.api.chunking import varint

_DOUBLE = struct.Struct("<d").pack
_NULL = b"\x08\x00"
_TRUE = b"\x20\x01"
_FALSE = b"\x20\x00"
#: Lengths below 128 are one byte: most keys, values and entries.
_SHORT = [bytes((n,)) for n in range(128)]


def _length(n: int) -> bytes:
    return _SHORT[n] if n < 128 else varint(n)


def struct_bytes(value: Mapping[str, Any]) -> bytes:
    """The wire bytes of the Struct holding `value` (a dict of JSON values: dict, list, str,
    int, float, bool, None).

    Raises:
        TypeError: a value of another type (Struct.update takes some, e.g. Decimal never).
        ValueError: a string that is not Unicode text (a lone surrogate).
    """
    parts = []
    for key, item in value.items():
        name = key.encode()
        encoded = _value(item)
        entry = b"\x0a" + _length(len(name)) + name + b"\x12" + _length(len(encoded)) + encoded
        parts.append(b"\x0a" + _length(len(entry)) + entry)
    return b"".join(parts)


def _value(item: Any) -> bytes:
    kind = type(item)
    if kind is int or kind is float:
        return b"\x11" + _DOUBLE(item)
    if kind is str:
        text: bytes = item.encode()
        return b"\x1a" + _length(len(text)) + text
    if kind is bool:
        return _TRUE if item else _FALSE
    if item is None:
        return _NULL
    if kind is dict:
        inner = struct_bytes(item)
        return b"\x2a" + _length(len(inner)) + inner
    if kind is list:
        if _all_numbers(item):
            inner = _numbers(item)
        elif all(type(i) is str for i in item):
            inner = b"".join([_string_entry(text.encode()) for text in item])
        else:
            inner = _list(item)
        return b"\x32" + _length(len(inner)) + inner
    raise TypeError(f"{kind.__name__} is not a JSON value")


def _all_numbers(items: list[Any]) -> bool:
    return bool(items) and all(type(i) is int or type(i) is float for i in items)


def _numbers(items: list[Any]) -> bytes:
    # Arrays of numbers (tags, ids, vectors) are the most values in the fewest bytes: each
    # entry is 11 fixed bytes (tag, length 9, Value's tag, the double), laid out by slices.
    count = len(items)
    doubles = struct.pack(f"<{count}d", *items)
    out = bytearray(11 * count)
    out[0::11] = b"\x0a" * count
    out[1::11] = b"\x09" * count
    out[2::11] = b"\x11" * count
    for byte in range(8):
        out[3 + byte :: 11] = doubles[byte::8]
    return bytes(out)


def _list(items: list[Any]) -> bytes:
    values = [_value(element) for element in items]
    return b"".join([b"\x0a" + _length(len(v)) + v for v in values])


def _string_entry(text: bytes) -> bytes:
    size = len(text)
    if size < 126:  # the entry's length (the text's and two bytes) is one byte too
        return b"\x0a" + _SHORT[size + 2] + b"\x1a" + _SHORT[size] + text
    value = b"\x1a" + _length(size) + text
    return b"\x0a" + _length(len(value)) + value
