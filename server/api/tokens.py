"""Opaque, versioned, HMAC-sealed page tokens bound to the query they were minted for."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from datetime import datetime
from typing import Any

from server.domain import MessageKey, SessionQuery, TimeKey, from_micros, to_micros
from server.errors import InvalidArgument

#: First byte of every token; bump it when the layout changes so old tokens fail cleanly.
VERSION = 1
_FINGERPRINT_LEN = 16
_TAG_LEN = 32
_FIELD = "page_token"
_REASON = "INVALID_PAGE_TOKEN"


def fingerprint(kind: str, project_id: int, **parts: Any) -> bytes:
    """A digest of everything that defines a query, so a token works only for that query."""
    canonical = json.dumps(
        [kind, project_id, parts], sort_keys=True, separators=(",", ":"), default=_json_default
    )
    return hashlib.sha256(canonical.encode()).digest()[:_FINGERPRINT_LEN]


def users_fingerprint(project_id: int) -> bytes:
    """ListUsers and ListUsersChunked: all users by created_at, so their tokens interchange."""
    return fingerprint("users", project_id)


def user_sessions_fingerprint(project_id: int, user_id: str) -> bytes:
    """ListUserSessions of one user."""
    return fingerprint("user_sessions", project_id, user_id=user_id)


def sessions_fingerprint(project_id: int, query: SessionQuery) -> bytes:
    """ListSessions with these filters, order and show_deleted."""
    return fingerprint(
        "sessions",
        project_id,
        user_id=query.user_id,
        show_deleted=query.show_deleted,
        order=[query.order_field, query.descending],
        created=[query.created_after, query.created_before],
        updated=[query.updated_after, query.updated_before],
        metadata_contains=query.metadata_contains,
    )


def messages_fingerprint(project_id: int, session_id: str) -> bytes:
    """ListMessages of one session."""
    return fingerprint("messages", project_id, session_id=session_id)


def export_fingerprint(kind: str, project_id: int, include_deleted: bool = False) -> bytes:
    """ExportSessions or ExportMessages (`kind`) of one project; with include_deleted another
    stream (the tokens of the live-only streams stay what they were)."""
    return fingerprint("export_" + kind + ("_all" if include_deleted else ""), project_id)


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return to_micros(value)
    # jsonb may hand back Decimal; its exact text keeps fingerprints stable.
    return str(value)


class PageTokens:
    """Mints and checks page tokens with one HMAC key shared by every worker and replica."""

    def __init__(self, key: bytes) -> None:
        if not key:
            raise ValueError("the page-token key must not be empty")
        self._key = key

    def encode_time_key(self, query: bytes, key: TimeKey, total: int | None = None) -> str:
        """A token resuming after (timestamp, id) in the query with fingerprint `query`.

        `total`, when given, is the listing's total_size, carried so that later pages need
        not count again (see decode_time_key_total).
        """
        payload: list[Any] = [to_micros(key[0]), key[1]]
        if total is not None:
            payload.append(total)
        return self._seal(query, payload)

    def decode_time_key(self, token: str, query: bytes) -> TimeKey | None:
        """The (timestamp, id) a token carries; None for an empty token.

        Raises:
            InvalidArgument: the token is malformed, tampered with, or of another query.
        """
        return self.decode_time_key_total(token, query)[0]

    def decode_time_key_total(self, token: str, query: bytes) -> tuple[TimeKey | None, int | None]:
        """The (timestamp, id) and the carried total of a token; (None, None) for no token.

        Raises:
            InvalidArgument: the token is malformed, tampered with, or of another query.
        """
        payload = self._open(token, query)
        if payload is None:
            return None, None
        match payload:
            case [int(micros), str(row_id), *rest] if not isinstance(micros, bool):
                total = _total(rest)
                try:
                    return (from_micros(micros), row_id), total
                except OverflowError:
                    pass
        raise _invalid("page_token is malformed")

    def encode_sequence(self, query: bytes, sequence: int) -> str:
        """A token resuming after message `sequence` in the query with fingerprint `query`."""
        return self._seal(query, [sequence])

    def decode_sequence(self, token: str, query: bytes) -> int | None:
        """The message sequence a token carries; None for an empty token.

        Raises:
            InvalidArgument: the token is malformed, tampered with, or of another query.
        """
        payload = self._open(token, query)
        if payload is None:
            return None
        match payload:
            case [int(sequence)] if not isinstance(sequence, bool):
                return sequence
        raise _invalid("page_token is malformed")

    def encode_message_key(self, query: bytes, key: MessageKey) -> str:
        """A token resuming after (session_id, sequence) in the message export."""
        return self._seal(query, [key[0], key[1]])

    def decode_message_key(self, token: str, query: bytes) -> MessageKey | None:
        """The (session_id, sequence) a token carries; None for an empty token.

        Raises:
            InvalidArgument: the token is malformed, tampered with, or of another query.
        """
        payload = self._open(token, query)
        if payload is None:
            return None
        match payload:
            case [str(session_id), int(sequence)] if not isinstance(sequence, bool):
                return session_id, sequence
        raise _invalid("page_token is malformed")

    def _tag(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()

    def _seal(self, query: bytes, payload: list[Any]) -> str:
        body = (
            bytes([VERSION])
            + query
            + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        )
        raw = body + self._tag(body)
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    def _open(self, token: str, query: bytes) -> Any:
        if not token:
            return None
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise _invalid("page_token is not a token this server issued") from None
        if len(raw) < 1 + _FINGERPRINT_LEN + _TAG_LEN or raw[0] != VERSION:
            raise _invalid("page_token is not a token this server issued")
        body, tag = raw[:-_TAG_LEN], raw[-_TAG_LEN:]
        if not hmac.compare_digest(tag, self._tag(body)):
            raise _invalid("page_token was altered or was not issued by this server")
        if not hmac.compare_digest(body[1 : 1 + _FINGERPRINT_LEN], query):
            raise _invalid(
                "page_token belongs to a different query (other method, filters, order, "
                "show_deleted or parent); send the same request with only page_token changed"
            )
        try:
            return json.loads(body[1 + _FINGERPRINT_LEN :])
        except ValueError:
            raise _invalid("page_token is malformed") from None


def _total(rest: list[Any]) -> int | None:
    match rest:
        case []:
            return None
        case [int(total)] if not isinstance(total, bool) and total >= 0:
            return total
    raise _invalid("page_token is malformed")


def _invalid(description: str) -> InvalidArgument:
    return InvalidArgument.field(_FIELD, description, reason=_REASON)
