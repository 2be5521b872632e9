"""Store: the metadata limit holds for what a merge stores, atomically, under concurrent merges."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from server.api.metadata_checks import json_size
from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import MAX_METADATA_BYTES, MetadataChange, NewMessage, UserChanges
from server.errors import InvalidArgument
from server.store import Store
from tests.fix_db import has_lock_waiter
from tests.polling import until

#: The bytes of {"a": ""} and of each further `, "k": ""` entry in jsonb's text form.
_BASE, _ENTRY = len('{"a": ""}'), len(', "k": ""')


def _fill(key: str, size: int, **more: str) -> dict[str, str]:
    """{key: "x"*n, **more} whose jsonb text is exactly `size` bytes."""
    value = {key: "", **more}
    return {**value, key: "x" * (size - json_size(value))}


async def _stored_size(url: str, table: str) -> int:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(f"SELECT max(octet_length(metadata::text)) FROM {table}")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize(
    "value",
    [
        {},
        {"a": [1, 2.5, {"b": None, "c": True}], "d": {}, "e": []},
        {"big": 1e300, "small": 5e-324, "neg": -1.5e-7, "int": 2**53, "float": 2.0**60},
        {"s": 'é\n\t"\\\x01\x1f\x7f\u2028 ☃ 𝄞', 'k\n"': False, "": ""},
    ],
)
async def test_json_size_is_what_postgresql_counts(
    store: Store, clean_db: str, value: dict[str, Any]
) -> None:
    # The request check (Python) and the merge check (SQL) must agree byte for byte, or a
    # value one accepts the other refuses (an export that fails to import).
    async with await psycopg.AsyncConnection.connect(clean_db) as conn:
        cur = await conn.execute("SELECT octet_length(%s::jsonb::text)", [Jsonb(value)])
        row = await cur.fetchone()
    assert row == (json_size(value),)


async def _user(store: Store, size: int) -> Callable[[dict[str, Any]], Awaitable[Any]]:
    await store.create_user(P, "u", "", "", "", _fill("a", size))
    return lambda patch: store.update_user(P, "u", UserChanges(metadata=MetadataChange(patch)))


async def _session(store: Store, size: int) -> Callable[[dict[str, Any]], Awaitable[Any]]:
    await store.create_session(P, "s", None, _fill("a", size))
    return lambda patch: store.update_session(P, "s", MetadataChange(patch))


async def _message(store: Store, size: int) -> Callable[[dict[str, Any]], Awaitable[Any]]:
    message = NewMessage(role="r", role_type="user", content="c", metadata=_fill("a", size))
    _, (added,) = await store.add_memory(P, "s", None, [message])
    return lambda patch: store.update_message(P, "s", added.uuid, MetadataChange(patch))


_KINDS = {"users": _user, "sessions": _session, "messages": _message}


@pytest.mark.parametrize("table", list(_KINDS))
async def test_merge_result_over_the_limit_changes_nothing(
    store: Store, clean_db: str, table: str
) -> None:
    # The case: 63,000 bytes stored, then a 10,000-byte patch, each fine alone.
    update = await _KINDS[table](store, 63_000)
    async with await psycopg.AsyncConnection.connect(clean_db) as conn:
        before = await (await conn.execute(f"SELECT metadata, updated_at FROM {table}")).fetchall()
    with pytest.raises(InvalidArgument) as caught:
        await update({"b": "y" * 10_000})
    assert caught.value.reason == "METADATA_TOO_LARGE"
    assert [v.field for v in caught.value.violations] == ["metadata"]
    assert f"would be {63_000 + _ENTRY + 10_000} bytes" in caught.value.message
    async with await psycopg.AsyncConnection.connect(clean_db) as conn:
        after = await (await conn.execute(f"SELECT metadata, updated_at FROM {table}")).fetchall()
    assert after == before


@pytest.mark.parametrize("table", list(_KINDS))
async def test_merge_result_of_exactly_the_limit_is_stored(
    store: Store, clean_db: str, table: str
) -> None:
    update = await _KINDS[table](store, 1_000)
    # The patch adds `, "b": "..."` to the stored object: fill the rest to the byte.
    room = MAX_METADATA_BYTES - 1_000 - _ENTRY
    await update({"b": "y" * room})
    assert await _stored_size(clean_db, table) == MAX_METADATA_BYTES
    with pytest.raises(InvalidArgument, match=f"{MAX_METADATA_BYTES + 1} bytes"):
        await update({"b": "y" * (room + 1)})
    # Removing keys (null) and shrinking is always possible.
    await update({"a": None})
    assert await _stored_size(clean_db, table) == MAX_METADATA_BYTES - 1_000 + _BASE - _ENTRY


@pytest.mark.parametrize("table", list(_KINDS))
async def test_a_merge_waiting_for_the_row_sees_the_committed_one(
    store: Store, clean_db: str, table: str
) -> None:
    # Two merges each fine alone, too big together. The first holds the row lock (an open
    # transaction), the second waits for it: once the first commits, the second must measure
    # the merged result *with* the first's key and refuse, not write from what it first read.
    update = await _KINDS[table](store, 2)
    half = MAX_METADATA_BYTES // 2 + 100
    async with await psycopg.AsyncConnection.connect(clean_db) as first:
        await first.execute(
            f"UPDATE {table} SET metadata = memstore_merge_patch(metadata, %s)",
            [Jsonb({"first": "x" * half})],
        )
        second = asyncio.ensure_future(update({"second": "y" * half}))
        assert await until(lambda: has_lock_waiter(clean_db))
        await first.commit()
    with pytest.raises(InvalidArgument) as caught:
        await second
    assert caught.value.reason == "METADATA_TOO_LARGE"
    async with await psycopg.AsyncConnection.connect(clean_db) as conn:
        cur = await conn.execute(f"SELECT metadata FROM {table}")
        assert [set(row[0]) for row in await cur.fetchall()] == [{"a", "first"}]
    assert await _stored_size(clean_db, table) <= MAX_METADATA_BYTES


@pytest.mark.parametrize("table", list(_KINDS))
async def test_concurrent_merges_that_fit_only_alone_one_wins(
    store: Store, clean_db: str, table: str
) -> None:
    update = await _KINDS[table](store, 2)
    patches = [{f"k{i}": str(i) * (MAX_METADATA_BYTES // 2)} for i in range(8)]
    results = await asyncio.gather(*(update(p) for p in patches), return_exceptions=True)
    refused = [r for r in results if isinstance(r, InvalidArgument)]
    assert len(refused) == len(patches) - 1, results
    assert all(r.reason == "METADATA_TOO_LARGE" for r in refused)
    assert await _stored_size(clean_db, table) <= MAX_METADATA_BYTES


async def test_a_user_stored_over_the_limit_can_still_change_its_other_fields(
    store: Store, clean_db: str
) -> None:
    # Rows written before the limit held may be larger: only metadata merges are measured.
    await store.create_user(P, "u", "", "", "", {})
    async with await psycopg.AsyncConnection.connect(clean_db) as conn:
        await conn.execute("UPDATE users SET metadata = %s", [Jsonb({"a": "x" * 70_000})])
    user = await store.update_user(P, "u", UserChanges(email="u@x.io"))
    assert user.email == "u@x.io"
    replaced = await store.update_user(
        P, "u", UserChanges(metadata=MetadataChange({"small": 1}, replace=True))
    )
    assert replaced.metadata == {"small": 1}
