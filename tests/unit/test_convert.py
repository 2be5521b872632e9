"""Domain objects to protos: exact timestamps, metadata, enums, unset optionals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

from google.protobuf import json_format

from memstore.v1 import resources_pb2
from server.api import convert
from server.domain import Message, Session, User

STAMP = datetime(2024, 5, 6, 7, 8, 9, 999999, tzinfo=UTC)


def test_timestamp_is_exact_to_the_microsecond() -> None:
    user = User("u", "e", "f", "l", {}, STAMP, STAMP + timedelta(microseconds=1), 3)
    p = convert.user_to_proto(user)
    assert p.created_at.nanos == 999_999_000
    assert p.created_at.ToDatetime(tzinfo=UTC) == STAMP
    assert p.updated_at.seconds == p.created_at.seconds + 1
    assert p.updated_at.nanos == 0


def test_timestamp_before_epoch_and_in_other_zones() -> None:
    ts = resources_pb2.User().created_at
    convert.set_timestamp(ts, datetime(1969, 12, 31, 23, 59, 59, 1, tzinfo=UTC))
    assert (ts.seconds, ts.nanos) == (-1, 1000)
    convert.set_timestamp(ts, datetime(2024, 1, 1, 1, 0, 0, 5, tzinfo=timezone(timedelta(hours=1))))
    assert ts.ToDatetime(tzinfo=UTC) == datetime(2024, 1, 1, 0, 0, 0, 5, tzinfo=UTC)


def test_user_fields_and_metadata_round_trip() -> None:
    metadata = {"a": 1, "b": [1.5, "x", None, True], "c": {"d": {}}}
    p = convert.user_to_proto(User("u1", "a@b.c", "Ada", "L", metadata, STAMP, STAMP, 2))
    assert (p.user_id, p.email, p.first_name, p.last_name, p.session_count) == (
        "u1",
        "a@b.c",
        "Ada",
        "L",
        2,
    )
    assert json_format.MessageToDict(p.metadata) == metadata


def test_decimal_metadata_numbers_convert() -> None:
    metadata = {"a": Decimal("2"), "b": [Decimal("1.25")], "c": {"d": Decimal("-3")}}
    p = convert.user_to_proto(User("u", "", "", "", metadata, STAMP, STAMP, 0))  # type: ignore[arg-type]
    assert json_format.MessageToDict(p.metadata) == {"a": 2, "b": [1.25], "c": {"d": -3}}


def test_session_optional_timestamps_stay_unset() -> None:
    live = Session("s", None, {}, STAMP, STAMP, None, 0, None)
    p = convert.session_to_proto(live)
    assert not p.HasField("deleted_at")
    assert not p.HasField("last_message_at")
    assert not p.HasField("metadata")
    assert p.user_id == ""
    deleted = Session("s", "u", {"k": "v"}, STAMP, STAMP, STAMP, 4, STAMP)
    p = convert.session_to_proto(deleted)
    assert p.deleted_at.ToDatetime(tzinfo=UTC) == STAMP
    assert p.last_message_at.ToDatetime(tzinfo=UTC) == STAMP
    assert (p.user_id, p.message_count) == ("u", 4)


def test_message_and_role_type_enum() -> None:
    for name, number in [
        ("user", resources_pb2.ROLE_TYPE_USER),
        ("assistant", resources_pb2.ROLE_TYPE_ASSISTANT),
        ("system", resources_pb2.ROLE_TYPE_SYSTEM),
        ("tool", resources_pb2.ROLE_TYPE_TOOL),
        ("function", resources_pb2.ROLE_TYPE_FUNCTION),
        ("norole", resources_pb2.ROLE_TYPE_NOROLE),
    ]:
        m = Message("0a" * 16, "s", 7, "Alice", name, "hi", {"x": 1}, STAMP, STAMP)
        p = convert.message_to_proto(m)
        assert p.role_type == number
        assert (p.uuid, p.role, p.content, p.sequence) == ("0a" * 16, "Alice", "hi", 7)
        assert json_format.MessageToDict(p.metadata) == {"x": 1}


def test_fill_in_place_into_repeated_field() -> None:
    from memstore.v1 import user_service_pb2

    response = user_service_pb2.ListUsersResponse()
    for i in range(3):
        convert.user_to_proto(User(f"u{i}", "", "", "", {}, STAMP, STAMP, 0), response.users.add())
    assert [u.user_id for u in response.users] == ["u0", "u1", "u2"]
