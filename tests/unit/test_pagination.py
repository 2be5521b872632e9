"""Page tokens: round trips, exact microseconds, and every way a token can be bad."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta, timezone

import pytest

from server import domain
from server.api import tokens as pagination
from server.api.tokens import PageTokens
from server.domain import SessionQuery
from server.errors import InvalidArgument

KEY = b"k" * 32
USERS = pagination.users_fingerprint(1)


def _assert_bad_token(excinfo: pytest.ExceptionInfo[InvalidArgument]) -> None:
    assert excinfo.value.reason == "INVALID_PAGE_TOKEN"
    assert [v.field for v in excinfo.value.violations] == ["page_token"]


def test_time_key_round_trip_keeps_every_microsecond() -> None:
    tokens = PageTokens(KEY)
    stamp = datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=UTC)
    token = tokens.encode_time_key(USERS, (stamp, "user-é"))
    assert tokens.decode_time_key(token, USERS) == (stamp, "user-é")


@pytest.mark.parametrize(
    "stamp",
    [
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2025, 6, 1, 12, 0, 0, 1, tzinfo=timezone(timedelta(hours=-7))),
    ],
)
def test_micros_conversion_is_exact(stamp: datetime) -> None:
    micros = domain.to_micros(stamp)
    assert isinstance(micros, int)
    back = domain.from_micros(micros)
    assert back == stamp
    assert back.tzinfo == UTC


def test_micros_of_a_known_instant() -> None:
    stamp = datetime(2001, 9, 9, 1, 46, 40, 999999, tzinfo=UTC)
    assert domain.to_micros(stamp) == 1_000_000_000_999_999


def test_token_is_url_safe_without_padding() -> None:
    token = PageTokens(KEY).encode_time_key(USERS, (datetime.now(UTC), "a/b+c=d"))
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_sequence_round_trip() -> None:
    tokens = PageTokens(KEY)
    query = pagination.messages_fingerprint(1, "s1")
    assert tokens.decode_sequence(tokens.encode_sequence(query, 12345), query) == 12345


def test_empty_token_means_first_page() -> None:
    tokens = PageTokens(KEY)
    assert tokens.decode_time_key("", USERS) is None
    assert tokens.decode_sequence("", USERS) is None


def test_every_tampered_byte_is_rejected() -> None:
    tokens = PageTokens(KEY)
    token = tokens.encode_time_key(USERS, (datetime(2024, 1, 1, tzinfo=UTC), "u1"))
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    for i in range(len(raw)):
        altered = bytearray(raw)
        altered[i] ^= 0x01
        bad = base64.urlsafe_b64encode(bytes(altered)).rstrip(b"=").decode()
        with pytest.raises(InvalidArgument) as excinfo:
            tokens.decode_time_key(bad, USERS)
        _assert_bad_token(excinfo)


def test_token_signed_with_another_key_is_rejected() -> None:
    token = PageTokens(b"other").encode_time_key(USERS, (datetime.now(UTC), "u"))
    with pytest.raises(InvalidArgument) as excinfo:
        PageTokens(KEY).decode_time_key(token, USERS)
    _assert_bad_token(excinfo)


@pytest.mark.parametrize(
    "other",
    [
        pagination.user_sessions_fingerprint(1, "u1"),
        pagination.users_fingerprint(2),
        pagination.sessions_fingerprint(1, SessionQuery()),
        pagination.sessions_fingerprint(1, SessionQuery(show_deleted=True)),
        pagination.sessions_fingerprint(1, SessionQuery(order_field="updated_at")),
        pagination.sessions_fingerprint(1, SessionQuery(descending=True)),
        pagination.sessions_fingerprint(1, SessionQuery(metadata_contains={"a": 1})),
    ],
)
def test_token_of_another_query_is_rejected(other: bytes) -> None:
    tokens = PageTokens(KEY)
    token = tokens.encode_time_key(USERS, (datetime.now(UTC), "u"))
    with pytest.raises(InvalidArgument) as excinfo:
        tokens.decode_time_key(token, other)
    _assert_bad_token(excinfo)
    assert "different query" in excinfo.value.message


def test_session_fingerprints_differ_by_every_filter() -> None:
    base = SessionQuery()
    stamp = datetime(2024, 1, 1, tzinfo=UTC)
    variants = [
        base,
        SessionQuery(user_id="u"),
        SessionQuery(created_after=stamp),
        SessionQuery(created_before=stamp),
        SessionQuery(updated_after=stamp),
        SessionQuery(updated_before=stamp),
        SessionQuery(created_after=stamp + timedelta(microseconds=1)),
    ]
    prints = {pagination.sessions_fingerprint(1, q) for q in variants}
    assert len(prints) == len(variants)
    assert pagination.sessions_fingerprint(1, SessionQuery()) == pagination.sessions_fingerprint(
        1, SessionQuery()
    )


def test_sequence_token_is_not_a_time_key_token() -> None:
    tokens = PageTokens(KEY)
    token = tokens.encode_sequence(USERS, 5)
    with pytest.raises(InvalidArgument) as excinfo:
        tokens.decode_time_key(token, USERS)
    _assert_bad_token(excinfo)


@pytest.mark.parametrize("garbage", ["x", "!!!!", "AAAA", "a" * 200, "é", "AQ", "=" * 8])
def test_garbage_is_rejected(garbage: str) -> None:
    with pytest.raises(InvalidArgument) as excinfo:
        PageTokens(KEY).decode_time_key(garbage, USERS)
    _assert_bad_token(excinfo)


def test_wrong_version_is_rejected() -> None:
    tokens = PageTokens(KEY)
    token = tokens.encode_time_key(USERS, (datetime.now(UTC), "u"))
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[0] = pagination.VERSION + 1
    bad = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    with pytest.raises(InvalidArgument) as excinfo:
        tokens.decode_time_key(bad, USERS)
    _assert_bad_token(excinfo)
