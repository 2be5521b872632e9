"""Store: the users PostgreSQL encodes as protobuf (migration 0040) parse
to what the object path builds, field by field, on generated data; a whole
chunk's run (list_user_chunk) is the same bytes as its rows (list_user_wire)."""

from __future__ import annotations

import json
from typing import Any

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memstore.v1 import resources_pb2
from memstore.v1 import user_service_pb2 as pb
from server.api import convert
from server.store import Store
from tests.stored_values import JSON, TEXT, TIMES

_USERS = st.lists(
    st.fixed_dictionaries(
        {
            "email": TEXT,
            "first_name": TEXT,
            "last_name": TEXT,
            "metadata": st.dictionaries(TEXT, JSON, max_size=5),
            "created_at": TIMES,
            "updated_at": TIMES,
            "sessions": st.integers(min_value=0, max_value=3),
            # The user's row of user_session_counts (absent, 0 after its sessions went, or a
            # count of one to four varint bytes): field 8, or nothing when 0.
            "count": st.one_of(st.none(), st.integers(min_value=0, max_value=2**28)),
        }
    ),
    min_size=1,
    max_size=4,
)

_INSERT_USER = (
    "INSERT INTO users (project_id, user_id, email, first_name, last_name, metadata,"
    " created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s, %s)"
)


async def _project(conn: psycopg.AsyncConnection[Any]) -> int:
    cur = await conn.execute(
        "INSERT INTO projects (name) VALUES ('wire-' || gen_random_uuid()) RETURNING project_id"
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def _both_paths(store: Store, project: int) -> tuple[list[Any], list[Any]]:
    """The users of a project as the object path builds them and as their wire bytes parse."""
    records = await store.list_user_records(project, None, 100)
    built = pb.ListUsersChunkedResponse()
    for record in records.items:
        convert.add_user_record(built.users, record)
    wire = await store.list_user_wire(project, None, 100)
    (rows,) = wire.items
    assert sum(rows.sizes) == len(rows.entries)
    parsed = pb.ListUsersChunkedResponse.FromString(rows.entries)
    # Each size is one entry's bytes: cutting there leaves whole users.
    offset = 0
    for size, user in zip(rows.sizes, parsed.users, strict=True):
        entry = pb.ListUsersChunkedResponse.FromString(rows.entries[offset : offset + size])
        assert list(entry.users) == [user]
        offset += size
    # The one-value run of list_user_chunk is the same bytes, with the last user's key.
    run = await store.list_user_chunk(project, None, 100)
    assert run is not None
    assert run.entries == rows.entries
    assert run.rows == len(rows.sizes)
    assert run.last == rows.key(len(rows.sizes) - 1)
    # A run that stops short, and the run after it, are the same entries cut in two.
    if len(rows.sizes) > 1:
        first = await store.list_user_chunk(project, None, 1)
        assert first is not None and first.rows == 1
        rest = await store.list_user_chunk(project, first.last, 100)
        assert rest is not None
        assert first.entries + rest.entries == rows.entries
    return list(built.users), list(parsed.users)


def _same(built: resources_pb2.User, parsed: resources_pb2.User) -> None:
    assert parsed == built
    assert [(f.name, v) for f, v in parsed.ListFields()] == [
        (f.name, v) for f, v in built.ListFields()
    ]
    assert parsed.metadata == built.metadata  # map entries compared by key, not by order


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(users=_USERS, changed=_USERS)
async def test_user_wire_parses_to_the_object_path(
    store: Store, database_url: str, users: list[dict[str, Any]], changed: list[dict[str, Any]]
) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        project = await _project(conn)
        for i, u in enumerate(users):
            await conn.execute(
                _INSERT_USER,
                (project, f"ü{i}", u["email"], u["first_name"], u["last_name"],
                 json.dumps(u["metadata"]), u["created_at"], u["updated_at"]),
            )  # fmt: skip
            for s in range(u["sessions"]):
                await conn.execute(
                    "INSERT INTO sessions (project_id, session_id, user_id) VALUES (%s, %s, %s)",
                    (project, f"s{i}-{s}", f"ü{i}"),
                )
            if u["count"] is not None:
                await conn.execute(
                    "INSERT INTO user_session_counts (project_id, user_id, session_count)"
                    " VALUES (%s, %s, %s)",
                    (project, f"ü{i}", u["count"]),
                )
        built, parsed = await _both_paths(store, project)
        assert len(parsed) == len(users)
        for b, p in zip(built, parsed, strict=True):
            _same(b, p)
        # An update rewrites the bytes (the trigger fires on UPDATE too).
        for i, c in enumerate(changed[: len(users)]):
            await conn.execute(
                "UPDATE users SET email = %s, metadata = %s::jsonb, updated_at = %s"
                " WHERE project_id = %s AND user_id = %s",
                (c["email"], json.dumps(c["metadata"]), c["updated_at"], project, f"ü{i}"),
            )
        built, parsed = await _both_paths(store, project)
        for b, p in zip(built, parsed, strict=True):
            _same(b, p)


async def test_varints_match_protobuf(store: Store, database_url: str) -> None:
    numbers = [1, 127, 128, 16383, 16384, 2097151, 2097152, 2**31, 2**62, 2**63 - 1]
    numbers += [-1, -128, -(2**31), -(2**63)]
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        for n in numbers:
            cur = await conn.execute("SELECT memstore_pb_varint(%s::int8)", (n,))
            row = await cur.fetchone()
            assert row is not None
            # session_count is field 8, varint: tag 0x40 then the number (0 is omitted).
            assert (
                b"\x40" + bytes(row[0]) == resources_pb2.User(session_count=n).SerializeToString()
            )


async def test_user_chunk_of_an_empty_project_is_none(store: Store, database_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        project = await _project(conn)
    assert await store.list_user_chunk(project, None, 100) is None
