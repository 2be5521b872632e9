"""Requests protobuf cannot parse: their error, naming the field when metadata is too deep."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from google.protobuf import descriptor, struct_pb2

from server.domain import MAX_METADATA_DEPTH
from server.errors import InvalidArgument

#: upb's words when a message is nested past its limit of 100 ("Exceeded
#: upb_DecodeOptions_MaxDepth"); the pure-Python parser says "too many levels of nesting".
_TOO_DEEP = re.compile(r"MaxDepth|recursion|nesting", re.IGNORECASE)

#: How many top-level fields are searched for the deep one (a bound on the work a hostile
#: request can cause); past it the request is only called malformed (no valid request holds
#: so many: AddMemory takes at most 1,000 messages).
_MAX_FIELDS_SEARCHED = 4096

MALFORMED = InvalidArgument.field(
    "request",
    "request is not valid protobuf / contains invalid UTF-8 in a string field",
    reason="MALFORMED_REQUEST",
)

_WIRE_VARINT, _WIRE_FIXED64, _WIRE_BYTES, _WIRE_FIXED32 = 0, 1, 2, 5


class Malformed:
    """What the tolerant deserializer hands over instead of a request it cannot parse."""

    def __init__(self, error: InvalidArgument) -> None:
        self.error = error


def tolerant_deserializer(
    message_class: Any, parse: Callable[[Any, bytes], Any] | None = None
) -> Callable[[bytes], Any]:
    """A deserializer that returns Malformed rather than raise (which gRPC answers INTERNAL):
    `message_class.FromString`, or `parse(message_class, data)` (serving/wire.py's, in pieces)."""

    def deserialize(data: bytes) -> Any:
        try:
            if parse is not None:
                return parse(message_class, data)
            return message_class.FromString(data)
        except Exception as exc:  # DecodeError, or a RecursionError of a pure-Python parser
            return Malformed(parse_error(message_class, data, exc))

    return deserialize


def tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """grpc's `deserialize` of a service memstore does not define (health, reflection),
    returning Malformed (MALFORMED_REQUEST) rather than raise, which grpc.aio answers UNKNOWN
    and logs as an ERROR with a traceback, past the observer: uncounted, with no access line."""

    def deserialize_or_refuse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:  # DecodeError, or a RecursionError of a pure-Python parser
            return Malformed(MALFORMED)

    return deserialize_or_refuse


def parse_error(message_class: Any, data: bytes, exc: BaseException) -> InvalidArgument:
    """INVALID_ARGUMENT naming the too-deep Struct field (`messages[2].metadata`), else
    MALFORMED_REQUEST: bad bytes or invalid UTF-8."""
    if not _TOO_DEEP.search(str(exc)):
        return MALFORMED
    field = _deep_field(message_class, memoryview(data))
    if field is None:
        return MALFORMED
    return InvalidArgument.field(
        field,
        f"is nested more than {MAX_METADATA_DEPTH} levels of objects and arrays deep "
        "(too deep for protobuf's parser)",
    )


def _deep_field(message_class: Any, data: memoryview) -> str | None:
    # Each top-level message field is parsed again alone in a request of the same type: the
    # same nesting context, so only the occurrence holding the deep Struct fails.
    fields = message_class.DESCRIPTOR.fields_by_number
    seen: dict[int, int] = {}
    for count, (number, wire, start, end) in enumerate(top_level_fields(data)):
        if count >= _MAX_FIELDS_SEARCHED:
            return None
        field = fields.get(number)
        if wire != _WIRE_BYTES or field is None or field.message_type is None:
            continue
        index = seen[number] = seen.get(number, -1) + 1
        try:
            message_class.FromString(bytes(data[start:end]))
        except Exception as exc:
            if not _TOO_DEEP.search(str(exc)):
                continue  # malformed in another way
        else:
            continue
        name = f"{field.name}[{index}]" if field.is_repeated else field.name
        inner = _struct_field(field.message_type)
        return name if inner is None else f"{name}.{inner}"
    return None


def _struct_field(message: descriptor.Descriptor) -> str | None:
    """The path of the Struct inside `message`: None for a Struct, else its Struct field."""
    if message.full_name == struct_pb2.Struct.DESCRIPTOR.full_name:
        return None
    for field in message.fields:
        if field.message_type is not None and (
            field.message_type.full_name == struct_pb2.Struct.DESCRIPTOR.full_name
        ):
            return field.name
    return None


def top_level_fields(data: memoryview) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, start, end) of each top-level field, tag included; stops at
    the first byte it cannot read (groups, truncation)."""
    pos = 0
    while pos < len(data):
        start = pos
        tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == _WIRE_VARINT:
            _, pos = _varint(data, pos)
        elif wire == _WIRE_FIXED64:
            pos += 8
        elif wire == _WIRE_FIXED32:
            pos += 4
        elif wire == _WIRE_BYTES:
            length, pos = _varint(data, pos)
            pos += length
        else:
            return
        if pos > len(data):
            return
        yield number, wire, start, pos


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return value, len(data) + 1  # truncated or too long: past the end stops the caller
