"""Request checks: every rule names the offending field."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from google.protobuf import field_mask_pb2, struct_pb2, timestamp_pb2

from server.api import metadata_checks as meta
from server.api import validation as val
from server.domain import MAX_METADATA_BYTES
from server.errors import InvalidArgument


def _fields(run: object) -> list[str]:
    """Runs a check against a fresh Violations and returns the fields it flagged."""
    v = val.Violations()
    run(v)  # type: ignore[operator]
    return [item.field for item in v.items]


def _struct(value: dict[str, object]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("u", True),
        ("x" * 256, True),
        ("ユーザー😀", True),
        ("x" * 257, False),
        ("", False),
        ("a\x00b", False),
        ("a\nb", False),
        ("a\tb", False),
        ("a\x7fb", False),
        ("a\x85b", False),
        # Whitespace inside an id is fine; at either end (or alone) it is a mistake.
        ("a b", True),
        (" ", False),
        ("\u3000\u00a0", False),
        (" a", False),
        ("a ", False),
        ("a\u00a0", False),
        # Invisible format characters and separators: bidi overrides and isolates, zero-width
        # spaces, BOM, soft hyphen, line and paragraph separators.
        ("user\u202egnp.exe", False),
        ("a\u202ab", False),
        ("a\u2066b\u2069", False),
        ("a\u200bb", False),
        ("\ufeffa", False),
        ("a\u00adb", False),
        ("a\u2028b", False),
        ("a\u2029b", False),
        # ...but the join controls spell words and emoji: ZWNJ in Persian, ZWJ in emoji.
        ("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", True),
        ("\U0001f469\u200d\U0001f4bb", True),
        ("in\u00a0side", True),
    ],
)
def test_ids(value: str, ok: bool) -> None:
    assert _fields(lambda v: val.check_id(v, "user_id", value)) == ([] if ok else ["user_id"])


def test_optional_id_may_be_empty() -> None:
    assert _fields(lambda v: val.check_id(v, "user_id", "", required=False)) == []


@pytest.mark.parametrize(
    ("value", "ok"), [("", True), ("a" * 256, True), ("a" * 257, False), ("a\x00", False)]
)
def test_short_text(value: str, ok: bool) -> None:
    assert _fields(lambda v: val.check_text(v, "email", value)) == ([] if ok else ["email"])


def test_content_limits_count_utf8_bytes() -> None:
    field = "messages[3].content"
    assert _fields(lambda v: val.check_content(v, field, "a" * val.MAX_CONTENT_BYTES)) == []
    assert _fields(lambda v: val.check_content(v, field, "a" * (val.MAX_CONTENT_BYTES + 1))) == [
        field
    ]
    # 2 bytes each in UTF-8: the character count is under 1 MiB, the byte count is not.
    assert _fields(
        lambda v: val.check_content(v, field, "é" * (val.MAX_CONTENT_BYTES // 2 + 1))
    ) == [field]
    # An assistant's turn that only calls a tool has no text: empty is a message too.
    assert _fields(lambda v: val.check_content(v, field, "")) == []
    assert _fields(lambda v: val.check_content(v, field, "hi\x00")) == [field]


def test_metadata_round_trips_nested_values_with_integers() -> None:
    value = {"a": 1, "b": 1.5, "c": [1, {"d": None, "e": True}], "f": "x", "g": {}}
    v = val.Violations()
    assert meta.metadata(v, "metadata", _struct(value)) == value
    assert v.items == []
    assert isinstance(meta.metadata(v, "metadata", _struct(value))["a"], int)


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"a\x00": 1}, "metadata"),
        ({"a": "b\x00"}, "metadata.a"),
        ({"a": {"b": ["c", "\x00"]}}, "metadata.a.b[1]"),
        ({"a": float("nan")}, "metadata.a"),
        ({"a": [float("inf")]}, "metadata.a[0]"),
        ({"a": {"b": float("-inf")}}, "metadata.a.b"),
    ],
)
def test_metadata_rejects_nul_and_non_finite_numbers_naming_the_path(
    value: dict[str, object], path: str
) -> None:
    assert _fields(lambda v: meta.metadata(v, "metadata", _struct(value))) == [path]


def test_metadata_size_limit_is_bytes_of_postgresqls_jsonb_text() -> None:
    # PostgreSQL prints jsonb with ", " and ": ": the size the merge check counts in SQL.
    def sized(n: int) -> dict[str, object]:
        return {"k": "x" * (n - len('{"k": ""}'))}

    assert _fields(lambda v: meta.metadata(v, "m", _struct(sized(MAX_METADATA_BYTES)))) == []
    assert _fields(lambda v: meta.metadata(v, "m", _struct(sized(MAX_METADATA_BYTES + 1)))) == ["m"]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ({"a": [1, {"b": None}], "c": {}}, '{"a": [1, {"b": null}], "c": {}}'),
        ({"x": 1e20}, '{"x": 100000000000000000000}'),
        ({"x": -1.5e-7}, '{"x": -0.00000015}'),
        ({"s": "é\n\u2028"}, '{"s": "é\\n\u2028"}'),
    ],
)
def test_json_size_counts_numbers_in_full_decimal_and_utf8(
    value: dict[str, object], text: str
) -> None:
    assert meta.json_size(value) == len(text.encode())


def _nested(levels: int) -> dict[str, object]:
    """`levels` objects and arrays, alternating, the outermost an object."""
    inner: object = 1
    for level in range(levels - 1, 0, -1):
        inner = {"k": inner} if level % 2 == 0 else [inner]
    return {"k": inner}


def test_metadata_nesting_limit_names_the_field() -> None:
    assert _fields(lambda v: meta.metadata(v, "metadata", _struct(_nested(32)))) == []
    v = val.Violations()
    meta.metadata(v, "messages[2].metadata", _struct(_nested(33)))
    assert [item.field for item in v.items] == ["messages[2].metadata"]
    assert "more than 32 levels" in v.items[0].description
    assert "(at messages[2].metadata.k[0].k[0]" in v.items[0].description


def test_role_type_mapping() -> None:
    v = val.Violations()
    assert val.role_type(v, "r", 0) == "norole"
    assert [val.role_type(v, "r", n) for n in range(1, 7)] == [
        "user",
        "assistant",
        "system",
        "tool",
        "function",
        "norole",
    ]
    assert v.items == []
    assert _fields(lambda v: val.role_type(v, "messages[0].role_type", 7)) == [
        "messages[0].role_type"
    ]
    assert _fields(lambda v: val.role_type(v, "x", -1)) == ["x"]


@pytest.mark.parametrize(
    ("value", "default", "expected"),
    [(0, 50, 50), (1, 50, 1), (1000, 50, 1000), (1001, 50, 1000), (2**31 - 1, 6, 1000), (0, 6, 6)],
)
def test_clamp_size(value: int, default: int, expected: int) -> None:
    v = val.Violations()
    assert val.clamp_size(v, "page_size", value, default) == expected
    assert v.items == []


def test_negative_sizes_are_invalid() -> None:
    assert _fields(lambda v: val.clamp_size(v, "page_size", -1, 50)) == ["page_size"]
    assert _fields(lambda v: val.page_number(v, -1, "")) == ["page_number"]


def test_page_number_and_token_exclude_each_other() -> None:
    v = val.Violations()
    assert val.page_number(v, 0, "tok") is None
    assert val.page_number(v, 3, "") == 3
    assert v.items == []
    assert _fields(lambda v: val.page_number(v, 2, "tok")) == ["page_number"]


def test_message_uuid() -> None:
    v = val.Violations()
    upper = "12345678-1234-5678-1234-56781234ABCD"
    assert val.message_uuid(v, "uuid", upper) == upper.lower()
    assert v.items == []
    assert _fields(lambda v: val.message_uuid(v, "uuid", "not-a-uuid")) == ["uuid"]
    assert _fields(lambda v: val.message_uuid(v, "uuid", "")) == ["uuid"]


def test_update_mask() -> None:
    allowed = ("email", "metadata")
    v = val.Violations()
    assert val.update_mask(v, field_mask_pb2.FieldMask(), allowed) is None
    assert val.update_mask(v, field_mask_pb2.FieldMask(paths=["email"]), allowed) == {"email"}
    assert val.update_mask(v, field_mask_pb2.FieldMask(paths=["*"]), allowed) == set(allowed)
    # "*" names every field, beside another too (it was refused as an unknown path).
    both = field_mask_pb2.FieldMask(paths=["*", "email"])
    assert val.update_mask(v, both, allowed) == set(allowed)
    assert v.items == []
    for bad in (["user_id"], ["metadata.a"], ["email", "nope"], ["*", "nope"]):
        mask = field_mask_pb2.FieldMask(paths=bad)
        assert _fields(lambda v, m=mask: val.update_mask(v, m, allowed)) == ["update_mask"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ("created_at", False)),
        ("   ", ("created_at", False)),
        ("created_at", ("created_at", False)),
        ("updated_at", ("updated_at", False)),
        ("  UPDATED_AT   DESC ", ("updated_at", True)),
        ("created_at asc", ("created_at", False)),
        ("Created_At Desc", ("created_at", True)),
        ("created_at\tdesc", ("created_at", True)),
    ],
)
def test_order_by(text: str, expected: tuple[str, bool]) -> None:
    v = val.Violations()
    assert val.order_by(v, text) == expected
    assert v.items == []


@pytest.mark.parametrize(
    "text", ["name", "created_at up", "created_at desc desc", "created_atdesc"]
)
def test_bad_order_by(text: str) -> None:
    assert _fields(lambda v: val.order_by(v, text)) == ["order_by"]


def test_timestamp_bounds_are_exact_and_round_nanos_up() -> None:
    v = val.Violations()
    ts = timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=123_456_000)
    assert val.timestamp(v, "created_after", ts) == datetime(
        2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC
    )
    ts = timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=123_456_001)
    assert val.timestamp(v, "created_after", ts) == datetime(
        2023, 11, 14, 22, 13, 20, 123457, tzinfo=UTC
    )
    assert v.items == []
    far = timestamp_pb2.Timestamp(seconds=10**12)
    assert _fields(lambda v: val.timestamp(v, "created_before", far)) == ["created_before"]


def test_raise_if_any_names_every_field() -> None:
    v = val.Violations()
    val.check_id(v, "user_id", "")
    val.check_text(v, "email", "x" * 300)
    with pytest.raises(InvalidArgument) as excinfo:
        v.raise_if_any()
    assert [x.field for x in excinfo.value.violations] == ["user_id", "email"]
    assert "user_id" in excinfo.value.message and "email" in excinfo.value.message
    val.Violations().raise_if_any()  # nothing recorded: no error
