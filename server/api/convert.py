"""Domain objects <-> protos, in one place."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from memstore.v1 import resources_pb2
from server.api.struct_wire import struct_bytes
from server.domain import ROLE_TYPES, JsonObject, Message, Session, User, UserRecord, to_micros

#: Stored role_type -> RoleType enum number (ROLE_TYPES follow the enum order from 1).
ROLE_TYPE_NUMBERS: dict[str, resources_pb2.RoleType.ValueType] = {
    name: resources_pb2.RoleType.ValueType(i) for i, name in enumerate(ROLE_TYPES, start=1)
}


def set_timestamp(target: timestamp_pb2.Timestamp, value: datetime) -> None:
    """Writes a datetime into a Timestamp exactly to the microsecond (integer arithmetic)."""
    seconds, micros = divmod(to_micros(value), 1_000_000)
    target.seconds = seconds
    target.nanos = micros * 1000


def set_struct(target: struct_pb2.Struct, value: JsonObject) -> None:
    """Writes a JSON object into a Struct."""
    if not value:
        return
    try:
        # Its wire bytes, parsed in C: Struct.update took 4 times as long (struct_wire.py).
        target.MergeFromString(struct_bytes(value))
    except (ValueError, TypeError, OverflowError):
        # jsonb numbers may arrive as Decimal (a custom loader); Struct only takes float/int.
        target.Clear()
        target.update(_plain(value))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def role_type_number(role_type: str) -> resources_pb2.RoleType.ValueType:
    """The RoleType enum number of a stored role type (unknown text is NOROLE)."""
    return ROLE_TYPE_NUMBERS.get(role_type, ROLE_TYPE_NUMBERS["norole"])


def user_to_proto(user: User, target: resources_pb2.User | None = None) -> resources_pb2.User:
    """A User proto; fills `target` in place when given (e.g. a repeated field's new element)."""
    p = resources_pb2.User() if target is None else target
    p.user_id = user.user_id
    p.email = user.email
    p.first_name = user.first_name
    p.last_name = user.last_name
    p.session_count = user.session_count
    set_timestamp(p.created_at, user.created_at)
    set_timestamp(p.updated_at, user.updated_at)
    set_struct(p.metadata, user.metadata)
    return p


def add_user_record(users: Any, record: UserRecord) -> resources_pb2.User:
    """Appends a UserRecord to a repeated User field (e.g. `chunk.users`); returns the new entry.

    The hot path of ListUsers and ListUsersChunked: one C call builds the scalar fields, the
    timestamps are set from integer microseconds, and an empty metadata object costs nothing.
    """
    user_id, email, first_name, last_name, metadata, created, updated, sessions = record
    p: resources_pb2.User = users.add(
        user_id=user_id,
        email=email,
        first_name=first_name,
        last_name=last_name,
        session_count=sessions,
    )
    ts = p.created_at
    ts.seconds, micros = divmod(created, 1_000_000)
    ts.nanos = micros * 1000
    ts = p.updated_at
    ts.seconds, micros = divmod(updated, 1_000_000)
    ts.nanos = micros * 1000
    if metadata != "{}":
        set_struct(p.metadata, json.loads(metadata))
    return p


def session_to_proto(
    session: Session, target: resources_pb2.Session | None = None
) -> resources_pb2.Session:
    """A Session proto; deleted_at and last_message_at stay unset when None."""
    p = resources_pb2.Session() if target is None else target
    p.session_id = session.session_id
    p.user_id = session.user_id or ""
    p.message_count = session.message_count
    set_timestamp(p.created_at, session.created_at)
    set_timestamp(p.updated_at, session.updated_at)
    if session.deleted_at is not None:
        set_timestamp(p.deleted_at, session.deleted_at)
    if session.last_message_at is not None:
        set_timestamp(p.last_message_at, session.last_message_at)
    if session.next_sequence:
        p.next_sequence = session.next_sequence
    set_struct(p.metadata, session.metadata)
    return p


def message_to_proto(
    message: Message, target: resources_pb2.Message | None = None
) -> resources_pb2.Message:
    """A Message proto."""
    p = resources_pb2.Message() if target is None else target
    p.uuid = message.uuid
    p.role = message.role
    p.role_type = role_type_number(message.role_type)
    p.content = message.content
    p.sequence = message.sequence
    set_timestamp(p.created_at, message.created_at)
    set_timestamp(p.updated_at, message.updated_at)
    if message.deleted_at is not None:
        set_timestamp(p.deleted_at, message.deleted_at)
    set_struct(p.metadata, message.metadata)
    return p
