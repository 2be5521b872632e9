"""Metadata checks: a Struct to the dict stored, within the size, depth and value limits of
metadata, and containment filters bounded in their array elements."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

from google.protobuf import struct_pb2

from server.api.validation import Violations
from server.domain import MAX_EXACT_INT, MAX_METADATA_BYTES, MAX_METADATA_DEPTH, JsonObject
from server.errors import FieldViolation

#: Why a REST body's integer beyond MAX_EXACT_INT is refused (gRPC's Struct cannot carry one).
INEXACT_INTEGER = (
    "is an integer beyond +-2^53 (9007199254740992), which memstore holds as a double and "
    "would round; send it as a string, or as a float if rounding is fine"
)


#: Metadata whose JSON is surely larger than this (a lower bound of its bytes passes it) is
#: refused without walking the rest. A request of 16 MiB holds a million tiny values, and
#: walking them all, to learn a size far past the limit, held the event loop (every call of
#: the process) for seconds; a REST body of 16 MiB, for 40 s. Twice the limit: metadata
#: just past it is still refused with its exact size.
SIZE_BOUND = 2 * MAX_METADATA_BYTES


class _FarTooLarge(Exception):
    """The walk passed SIZE_BOUND."""


def far_too_large(field: str) -> FieldViolation:
    """The violation of metadata whose JSON is surely larger than SIZE_BOUND."""
    return FieldViolation(
        field,
        f"is more than {SIZE_BOUND} bytes as JSON; at most {MAX_METADATA_BYTES} are allowed",
    )


def metadata(v: Violations, field: str, value: struct_pb2.Struct) -> JsonObject:
    """A Struct as a dict: at most 64 KiB as PostgreSQL prints it (see json_size), at most 32
    levels deep, no NUL, no NaN or Infinity."""
    if not value.fields:
        return {}  # the common case: nothing to walk, "{}" is 2 bytes
    walk = _StructWalk(field)
    try:
        result = walk.struct(value, field, 1)
    except _FarTooLarge:
        v.items.append(far_too_large(field))
        return {}
    if walk.problems:
        # Each violation names the exact key path (e.g. `metadata.a.b[2]`); ten say enough.
        v.items.extend(walk.problems[:10])
        return {}
    size = json_size(result, walk.float_extra)
    if size > MAX_METADATA_BYTES:
        v.add(field, f"is {size} bytes as JSON; at most {MAX_METADATA_BYTES} are allowed")
    return result


#: The most array elements a metadata_contains filter may hold, those of nested arrays
#: included. PostgreSQL's jsonb @> looks each of them up in the stored array by reading it
#: from its start (jsonb arrays are not sorted; an object element is compared with every
#: object there), so a filter costs a scan of each matching row's array per element: 100
#: elements against 200 sessions holding 10,000 took 18.5 s, 1,000 the 30 s statement
#: timeout. Bounded, a row costs at most this many scans (tests/grpc/test_filter_cost.py).
MAX_FILTER_ELEMENTS = 8


def containment(v: Violations, field: str, value: struct_pb2.Struct) -> JsonObject:
    """A containment filter (jsonb @>): metadata, of at most MAX_FILTER_ELEMENTS array
    elements in all."""
    result = metadata(v, field, value)
    check_filter_elements(v, field, result)
    return result


def check_filter_elements(v: Violations, field: str, value: JsonObject) -> None:
    """Records a violation when `value`, a containment filter, holds more than
    MAX_FILTER_ELEMENTS array elements (at any depth)."""
    elements = _array_elements(value)
    if elements > MAX_FILTER_ELEMENTS:
        v.add(
            field,
            f"holds {elements} array elements (nested ones included); a containment filter "
            f"may hold at most {MAX_FILTER_ELEMENTS}, since each is looked up by a scan of "
            "every stored array",
        )


def _array_elements(value: Any) -> int:
    if isinstance(value, dict):
        return sum(_array_elements(item) for item in value.values())
    if isinstance(value, list):
        return len(value) + sum(_array_elements(item) for item in value)
    return 0


def json_size(value: JsonObject, float_extra: int | None = None) -> int:
    """The bytes of `value` in PostgreSQL's jsonb text form: `octet_length(metadata::text)`.

    That form separates with ", " and ": " (json.dumps' defaults), leaves non-ASCII
    characters unescaped and prints numbers in full decimal (1e+20 as 21 digits); the
    store's merge check counts the same bytes in SQL. `float_extra`, when known, is what
    the floats add over their repr.
    """
    if float_extra is None:
        float_extra = _float_extra(value)
    return len(json.dumps(value, ensure_ascii=False).encode("utf-8")) + float_extra


def _float_extra(value: Any) -> int:
    if isinstance(value, dict):
        return sum(_float_extra(item) for item in value.values())
    if isinstance(value, list):
        return sum(_float_extra(item) for item in value)
    return _decimal_extra(value) if isinstance(value, float) else 0


def _decimal_extra(number: float) -> int:
    # psycopg sends json.dumps' repr (1e+20); jsonb keeps it as numeric, printed in full.
    text = repr(number)
    return len(format(Decimal(text), "f")) - len(text)


class _StructWalk:
    """Struct to dict, like json_format.MessageToDict but integral numbers come back as int
    (so 1 is stored as 1, not 1.0) and every problem is reported with its key path."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.problems: list[FieldViolation] = []
        self.float_extra = 0
        self.too_deep = False
        #: A lower bound of the JSON bytes seen so far (each character is a byte or more).
        self.bound = 0

    def _count(self, chars: int) -> None:
        self.bound += chars
        if self.bound > SIZE_BOUND:
            raise _FarTooLarge

    def struct(self, struct: struct_pb2.Struct, path: str, level: int) -> JsonObject:
        out: JsonObject = {}
        self._count(2 * max(len(struct.fields), 1))  # {} and a ", " between members
        for key, item in struct.fields.items():
            self._count(len(key) + 4)  # "key":_
            if "\x00" in key:
                self.problems.append(FieldViolation(path, f"key {key!r} contains a NUL character"))
            out[key] = self.value(item, f"{path}.{key}", level)
        return out

    def value(self, item: struct_pb2.Value, path: str, level: int) -> Any:
        """The value of `item`, found inside a container at `level` (the object is 1)."""
        kind = item.WhichOneof("kind")
        if kind in {"struct_value", "list_value"} and level >= MAX_METADATA_DEPTH:
            self._nested_too_deep(path)
            return None
        if kind == "struct_value":
            return self.struct(item.struct_value, path, level + 1)
        if kind == "list_value":
            self._count(2 * max(len(item.list_value.values), 1))  # [] and a ", " between items
            return [
                self.value(element, f"{path}[{i}]", level + 1)
                for i, element in enumerate(item.list_value.values)
            ]
        self._count(len(item.string_value) + 2 if kind == "string_value" else 1)  # "" or 0
        if kind == "string_value":
            if "\x00" in item.string_value:
                self.problems.append(FieldViolation(path, "contains a NUL character"))
            return item.string_value
        if kind == "number_value":
            return self.number(item.number_value, path)
        if kind == "bool_value":
            return item.bool_value
        return None  # null_value, or a Value with no kind set: JSON null

    def number(self, number: float, path: str) -> int | float | None:
        if not math.isfinite(number):
            # Over REST, JSON's 1e400 reads as Infinity: say so, not only "Infinity".
            self.problems.append(
                FieldViolation(
                    path,
                    "is NaN, Infinity or beyond a double's range (+-1.8e308), which JSON "
                    "cannot hold",
                )
            )
            return None
        if number.is_integer() and abs(number) <= MAX_EXACT_INT:
            return int(number)
        self.float_extra += _decimal_extra(number)
        return number

    def _nested_too_deep(self, path: str) -> None:
        # Named by the field itself (as when the parser refuses deeper requests, which
        # server/serving/malformed.py words), with the path where the limit was crossed.
        if not self.too_deep:
            self.too_deep = True
            where = path if len(path) <= 200 else path[:200] + "..."
            self.problems.append(
                FieldViolation(
                    self.root,
                    f"is nested more than {MAX_METADATA_DEPTH} levels of objects and arrays "
                    f"deep (at {where})",
                )
            )
