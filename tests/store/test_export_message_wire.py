"""Store and message_wire: ExportMessages' batches encoded from a few columns
(export_message_columns, server/api/message_wire.py) parse to what the object
path builds, field by field, on generated data, and are its very bytes."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memstore.v1 import session_service_pb2 as pb
from server.api import convert, message_wire
from server.domain import ROLE_TYPES, MessageColumns, WireRows
from server.store import Store
from tests.stored_values import JSON, TEXT, TIMES

#: A byte budget no batch here reaches: these tests compare whole batches.
NO_BUDGET = 1 << 40

_MESSAGES = st.lists(
    st.fixed_dictionaries(
        {
            "session": st.integers(min_value=0, max_value=2),
            "sequence": st.one_of(
                st.integers(min_value=-(2**63), max_value=2**63 - 1),
                st.sampled_from([0, 1, 127, 128, 2**63 - 1, -1]),
            ),
            "role": TEXT,
            "role_type": st.sampled_from(ROLE_TYPES),
            "content": TEXT | st.sampled_from(["", "x" * 300, "ü" * 9_000]),
            "metadata": st.dictionaries(TEXT, JSON, max_size=5),
            "created_at": TIMES,
            "updated_at": TIMES,
            "deleted_at": st.none() | TIMES,
        }
    ),
    min_size=1,
    max_size=6,
)
#: Session ids: unicode, and of a length whose varint takes two bytes.
_SESSIONS = st.lists(TEXT.filter(bool) | st.just("s" * 200), min_size=3, max_size=3, unique=True)

_INSERT_MESSAGE = (
    "INSERT INTO messages (project_id, session_id, sequence, role, role_type, content,"
    " metadata, created_at, updated_at, deleted_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s) ON CONFLICT DO NOTHING"
)


async def _project(conn: psycopg.AsyncConnection[Any]) -> int:
    cur = await conn.execute(
        "INSERT INTO projects (name) VALUES ('wire-' || gen_random_uuid()) RETURNING project_id"
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def _session(conn: psycopg.AsyncConnection[Any], project: int) -> None:
    """User 'u' and its session 's' in `project`, written by SQL."""
    await conn.execute("INSERT INTO users (project_id, user_id) VALUES (%s, 'u')", (project,))
    await conn.execute(
        "INSERT INTO sessions (project_id, session_id, user_id) VALUES (%s, 's', 'u')",
        (project,),
    )


async def _both_paths(
    store: Store, project: int, everything: bool
) -> tuple[bytes, WireRows[Any] | None]:
    """A project's messages as the object path serializes them, and as message_wire does."""
    page = await store.export_messages(project, None, 100, include_deleted=everything)
    built = pb.ExportMessagesResponse()
    for m in page.items:
        convert.message_to_proto(m, built.messages.add(session_id=m.session_id).message)
    columns = await store.export_message_columns(
        project, None, 100, include_deleted=everything, budget=NO_BUDGET
    )
    if columns is None:
        assert not page.items
        return built.SerializeToString(), None
    rows = message_wire.encode(columns)
    # Each size is one entry's bytes, and each key is its message's.
    offset = 0
    for i, (size, m) in enumerate(zip(rows.sizes, page.items, strict=True)):
        entry = pb.ExportMessagesResponse.FromString(rows.entries[offset : offset + size])
        assert [e.session_id for e in entry.messages] == [m.session_id]
        assert rows.key(i) == (m.session_id, m.sequence)
        offset += size
    assert offset == len(rows.entries)
    # The object path's own entries (the batch a datetime cannot hold is read this way).
    assert message_wire.from_messages(page.items).entries == built.SerializeToString()
    return built.SerializeToString(), rows


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(messages=_MESSAGES, sessions=_SESSIONS, deleted_session=st.booleans())
async def test_message_columns_encode_to_the_object_path(
    store: Store,
    database_url: str,
    messages: list[dict[str, Any]],
    sessions: list[str],
    deleted_session: bool,
) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        project = await _project(conn)
        await conn.execute("INSERT INTO users (project_id, user_id) VALUES (%s, 'u')", (project,))
        for i, s in enumerate(sessions):
            gone = datetime(2025, 1, 1, tzinfo=UTC) if deleted_session and i == 1 else None
            await conn.execute(
                "INSERT INTO sessions (project_id, session_id, user_id, deleted_at)"
                " VALUES (%s, %s, 'u', %s)",
                (project, s, gone),
            )
        for m in messages:
            await conn.execute(
                _INSERT_MESSAGE,
                (project, sessions[m["session"]], m["sequence"], m["role"], m["role_type"],
                 m["content"], json.dumps(m["metadata"]), m["created_at"], m["updated_at"],
                 m["deleted_at"]),
            )  # fmt: skip
    for everything in (False, True):
        built, rows = await _both_paths(store, project, everything)
        if rows is None:
            continue
        parsed = pb.ExportMessagesResponse.FromString(rows.entries)
        expected = pb.ExportMessagesResponse.FromString(built)
        assert len(parsed.messages) == len(expected.messages)
        for p, b in zip(parsed.messages, expected.messages, strict=True):
            assert p == b
            assert [(f.name, v) for f, v in p.message.ListFields()] == [
                (f.name, v) for f, v in b.message.ListFields()
            ]
            assert p.message.metadata == b.message.metadata  # maps compared by key
        # Not only equal once parsed: the same bytes, field order and all.
        assert rows.entries == built
        # A batch that stops short, and the batch after it, are the same entries cut in two.
        first = await store.export_message_columns(
            project, None, 1, include_deleted=everything, budget=NO_BUDGET
        )
        assert first is not None and first.rows == 1
        head = message_wire.encode(first)
        rest = await store.export_message_columns(
            project, head.key(0), 100, include_deleted=everything, budget=NO_BUDGET
        )
        tail = message_wire.encode(rest).entries if rest is not None else b""
        assert head.entries + tail == rows.entries


async def test_message_columns_of_an_empty_project_are_none(
    store: Store, database_url: str
) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        project = await _project(conn)
    assert await store.export_message_columns(project, None, 100, budget=NO_BUDGET) is None


@pytest.mark.parametrize("created", ["infinity", "-infinity", "10000-01-01 00:00:00+00"])
async def test_a_timestamp_a_datetime_cannot_hold_is_out_of_range(
    store: Store, database_url: str, created: str
) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        project = await _project(conn)
        await _session(conn, project)
        await conn.execute(
            "INSERT INTO messages (project_id, session_id, sequence, content, created_at)"
            " VALUES (%s, 's', 1, 'hi', %s::timestamptz)",
            (project, created),
        )
    columns = await store.export_message_columns(project, None, 100, budget=NO_BUDGET)
    assert columns is not None
    with pytest.raises(message_wire.OutOfRange):
        message_wire.encode(columns)


async def test_a_batch_ends_where_its_messages_pass_the_byte_budget(
    store: Store, database_url: str
) -> None:
    # 30 small messages, then 10 of 300,000 bytes, then 5 small: a batch of `limit` rows
    # would hand over all of them at once. With a budget of 1 MiB a batch takes messages while
    # those before hold less than it: the small ones and four large, then four large, then the
    # last two large and the small ones; a budget of one byte still takes one message.
    big = "x" * 300_000
    contents = [f"s{i}" for i in range(30)] + [big] * 10 + [f"t{i}" for i in range(5)]
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        project = await _project(conn)
        await _session(conn, project)
        for sequence, content in enumerate(contents, start=1):
            await conn.execute(
                "INSERT INTO messages (project_id, session_id, sequence, content)"
                " VALUES (%s, 's', %s, %s)",
                (project, sequence, content),
            )
    batches = await _batches_of_a_mib(store, project)
    assert [(b.rows, b.cut) for b in batches] == [(34, True), (4, True), (7, False)]
    assert all(len(b.contents or b"") <= (1 << 20) + len(big) for b in batches)
    assert sum(b.rows for b in batches) == len(contents)
    one = await store.export_message_columns(project, None, 1000, budget=1)
    assert one is not None and (one.rows, one.cut) == (1, True)
    whole = await store.export_message_columns(project, None, 1000, budget=NO_BUDGET)
    assert whole is not None and (whole.rows, whole.cut) == (len(contents), False)
    # A page cut by its limit, not by bytes, is not `cut`: the caller reads one row more.
    page = await store.export_message_columns(project, None, 3, budget=NO_BUDGET)
    assert page is not None and (page.rows, page.cut) == (3, False)


async def test_metadata_counts_as_printed_against_the_byte_budget(
    store: Store, database_url: str
) -> None:
    # 40 messages whose metadata prints as 60,000 bytes of one repeated letter, stored
    # compressed in a few hundred: counted by their stored size, every one fitted in one batch
    # of 1 MiB and the server held 2.4 MB of metadata for it (a 64 KiB metadata each at the
    # default chunk size: 4,000 of them, 256 MB). Counted as printed, a batch of 1 MiB holds
    # 18 of them (17 below the budget, then the one that passes it).
    metadata = json.dumps({"k": "y" * 60_000})
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        project = await _project(conn)
        await _session(conn, project)
        for sequence in range(1, 41):
            await conn.execute(
                "INSERT INTO messages (project_id, session_id, sequence, content, metadata)"
                " VALUES (%s, 's', %s, 'c', %s::jsonb)",
                (project, sequence, metadata),
            )
        stored = await (
            await conn.execute("SELECT max(pg_column_size(metadata)) FROM messages")
        ).fetchone()
        assert stored is not None and stored[0] < 10_000  # compressed: what misled the sum
    batches = await _batches_of_a_mib(store, project)
    assert [b.rows for b in batches] == [18, 18, 4]
    assert all(len(b.metadata or b"") < (1 << 20) + 60_100 for b in batches)


async def _batches_of_a_mib(store: Store, project: int) -> list[MessageColumns]:
    # The project's messages as ExportMessages reads them, batch after batch of 1 MiB.
    batches: list[MessageColumns] = []
    after = None
    while (
        columns := await store.export_message_columns(project, after, 1000, budget=1 << 20)
    ) is not None:
        batches.append(columns)
        after = message_wire.encode(columns).key(columns.rows - 1)
    return batches
