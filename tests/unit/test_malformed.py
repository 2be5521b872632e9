"""Request bytes protobuf refuses: too-deep metadata is named by its field, the rest malformed."""

from __future__ import annotations

import struct as binary

from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import user_service_pb2 as us
from server.serving.malformed import MALFORMED, Malformed, tolerant_deserializer


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _deep_struct(levels: int) -> bytes:
    value = b"\x11" + binary.pack("<d", 1.0)
    for _ in range(levels):
        struct_bytes = _field(1, _field(1, b"a") + _field(2, value))
        value = _field(5, struct_bytes)
    return struct_bytes


def _error(message_class: object, data: bytes) -> tuple[str, str]:
    parsed = tolerant_deserializer(message_class)(data)
    assert isinstance(parsed, Malformed)
    (violation,) = parsed.error.violations
    return violation.field, parsed.error.reason


def test_a_parsable_request_is_returned_as_is() -> None:
    request = us.CreateUserRequest(user_id="u")
    assert tolerant_deserializer(us.CreateUserRequest)(request.SerializeToString()) == request


def test_invalid_utf8_is_malformed() -> None:
    assert _error(us.GetUserRequest, b"\x0a\x02\xff\xfe") == ("request", "MALFORMED_REQUEST")


def test_too_deep_metadata_is_named_by_its_field() -> None:
    deep = _deep_struct(40)
    assert _error(us.UpdateUserRequest, _field(1, b"u") + _field(5, deep)) == (
        "metadata",
        "INVALID_ARGUMENT",
    )
    fine = _field(4, b"x")
    request = _field(1, b"s") + _field(2, fine) * 3 + _field(2, fine + _field(5, deep))
    assert _error(ss.AddMemoryRequest, request) == ("messages[3].metadata", "INVALID_ARGUMENT")
    assert _error(ss.SearchMemoryRequest, _field(8, deep))[0] == "metadata_contains"


def test_the_first_problem_the_parser_meets_decides() -> None:
    broken = _field(2, _field(4, b"\xff\xfe"))  # a message whose content is invalid UTF-8
    deep = _field(2, _field(4, b"x") + _field(5, _deep_struct(40)))
    assert _error(ss.AddMemoryRequest, _field(1, b"s") + broken + deep) == (
        "request",
        "MALFORMED_REQUEST",
    )
    assert _error(ss.AddMemoryRequest, _field(1, b"s") + deep + broken)[0] == (
        "messages[0].metadata"
    )


def test_the_search_is_bounded() -> None:
    # Past 4,096 top-level fields the server stops looking and calls the request malformed.
    filler = (b"\x18\x01") * 5000  # page_number (a varint) again and again
    request = filler + _field(11, _deep_struct(40))
    parsed = tolerant_deserializer(ss.ListSessionsRequest)(request)
    assert isinstance(parsed, Malformed)
    assert parsed.error is MALFORMED
