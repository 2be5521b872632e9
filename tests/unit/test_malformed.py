"""Request bytes protobuf refuses: too-deep metadata is named by its field, the rest malformed."""

from __future__ import annotations

from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import user_service_pb2 as us
from server.serving.malformed import MALFORMED, Malformed, tolerant_deserializer
from tests.wire import field, nested_struct


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


def test_too_deep_metadata_is_named_by_itsfield() -> None:
    deep = nested_struct(40)
    assert _error(us.UpdateUserRequest, field(1, b"u") + field(5, deep)) == (
        "metadata",
        "INVALID_ARGUMENT",
    )
    fine = field(4, b"x")
    request = field(1, b"s") + field(2, fine) * 3 + field(2, fine + field(5, deep))
    assert _error(ss.AddMemoryRequest, request) == ("messages[3].metadata", "INVALID_ARGUMENT")
    assert _error(ss.SearchMemoryRequest, field(8, deep))[0] == "metadata_contains"


def test_the_first_problem_the_parser_meets_decides() -> None:
    broken = field(2, field(4, b"\xff\xfe"))  # a message whose content is invalid UTF-8
    deep = field(2, field(4, b"x") + field(5, nested_struct(40)))
    assert _error(ss.AddMemoryRequest, field(1, b"s") + broken + deep) == (
        "request",
        "MALFORMED_REQUEST",
    )
    assert _error(ss.AddMemoryRequest, field(1, b"s") + deep + broken)[0] == (
        "messages[0].metadata"
    )


def test_the_search_is_bounded() -> None:
    # Past 4,096 top-level fields the server stops looking and calls the request malformed.
    filler = (b"\x18\x01") * 5000  # page_number (a varint) again and again
    request = filler + field(11, nested_struct(40))
    parsed = tolerant_deserializer(ss.ListSessionsRequest)(request)
    assert isinstance(parsed, Malformed)
    assert parsed.error is MALFORMED
