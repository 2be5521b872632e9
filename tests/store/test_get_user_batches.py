"""GetUser calls coalesced into shared statements still answer each caller exactly."""

from __future__ import annotations

import asyncio
import random

import psycopg
import pytest

from server.domain import DEFAULT_PROJECT_ID as P
from server.errors import NotFound
from server.store import Store
from server.store.placement import hash_text


async def test_concurrent_get_user_calls_each_get_their_own_user(
    store: Store, clean_db: str
) -> None:
    for i in range(20):
        await store.create_user(P, f"u{i}", f"u{i}@example.com", "", "", {"n": i})
    await store.create_session(P, "s1", "u3", {})
    ids = [f"u{i % 20}" for i in range(60)]
    users = await asyncio.gather(*(store.get_user(P, uid) for uid in ids))
    assert [u.user_id for u in users] == ids
    assert [u.metadata for u in users] == [{"n": i % 20} for i in range(60)]
    assert {u.user_id: u.session_count for u in users}["u3"] == 1
    # A missing id fails only its own call, not the others of its batch.
    results = await asyncio.gather(
        store.get_user(P, "u1"), store.get_user(P, "nobody"), return_exceptions=True
    )
    assert getattr(results[0], "user_id", None) == "u1"
    assert isinstance(results[1], NotFound)
    with pytest.raises(NotFound):
        await store.get_user(P, "nobody")


#: User ids around hash_text's 12-byte blocks, and of every kind of UTF-8.
_IDS = [
    *("", "a", "u1", "user-42", "x" * 11, "y" * 12, "z" * 13, "w" * 24, "v" * 25),
    *("é", "日本語の利用者", "🙂" * 7, "mixed-é日🙂-id", "a\tb c", "UPPER-lower"),
]


async def test_hash_text_is_postgresqls_hashtext(clean_db: str) -> None:
    # On Citus GetUser's shared reads are grouped by the worker holding each user
    # (server/store/placement.py), found by the hash Citus places a text column by.
    rng = random.Random(7)
    alphabet = "abcXYZ09-_.éß日本🙂"
    ids = _IDS + ["".join(rng.choices(alphabet, k=rng.randrange(60))) for _ in range(400)]
    async with await psycopg.AsyncConnection.connect(clean_db) as conn:
        cur = await conn.execute(
            "SELECT hashtext(i) FROM unnest(%s::text[]) WITH ORDINALITY AS t(i, n) ORDER BY n",
            (ids,),
        )
        theirs = [row[0] for row in await cur.fetchall()]
    assert [hash_text(i) for i in ids] == theirs
