"""Store: snapshots held for a backup (server/store/snapshots.py) — released from any process
of the database, bounded per process, and released when the store closes.

Plain PostgreSQL only: on Citus open_snapshot refuses (tests/citus/test_invariants.py).
"""

from __future__ import annotations

import psycopg
import pytest

from server.domain import DEFAULT_PROJECT_ID as P
from server.errors import FailedPrecondition, ResourceExhausted
from server.store import Store
from server.store import snapshots as snapshots_module
from tests.fix_db import SNAPSHOT_HOLDERS, scalar
from tests.polling import until


async def _read_in(store: Store, snapshot: str) -> list[str]:
    page = await store.export_sessions(P, None, 10, budget=1 << 20, snapshot=snapshot)
    return [s.session_id for s in page.items]


async def test_another_process_closes_a_snapshot_and_the_reads_in_it_say_it_is_gone(
    store: Store, database_url: str, clean_db: str
) -> None:
    other = await Store.open(database_url, min_size=1, max_size=2)
    try:
        snapshot, _ = await other.open_snapshot(P, 60)
        await store.create_session(P, "later", None, {})
        assert await _read_in(store, snapshot) == []  # made after the snapshot
        assert await store.close_snapshot(P, snapshot)  # held by `other`, closed from here
        with pytest.raises(FailedPrecondition) as gone:
            await _read_in(store, snapshot)
        assert gone.value.reason == "SNAPSHOT_GONE"
        # Another project's key cannot close it either: it names the project's snapshots only.
        kept, _ = await other.open_snapshot(P, 60)
        assert not await store.close_snapshot(P + 1, kept)
        assert await _read_in(store, kept) == ["later"]
    finally:
        await other.close()
    # Closing the store released what it held.
    with pytest.raises(FailedPrecondition):
        await _read_in(store, kept)


async def test_a_read_right_after_a_close_says_the_snapshot_is_gone(
    store: Store, database_url: str, clean_db: str
) -> None:
    # CI on PostgreSQL 15: a read at once after another process's close found the holder
    # still exiting (its snapshot not yet removed, its transaction no longer running) and
    # was answered UNAVAILABLE "could not import the requested snapshot". A close now returns
    # once the holder has ended, and that import error means gone too.
    other = await Store.open(database_url, min_size=1, max_size=2)
    try:
        for _ in range(40):
            snapshot, _ = await other.open_snapshot(P, 60)
            assert await store.close_snapshot(P, snapshot)
            with pytest.raises(FailedPrecondition) as gone:
                await _read_in(store, snapshot)
            assert gone.value.reason == "SNAPSHOT_GONE"
    finally:
        await other.close()


async def test_a_close_answers_only_once_the_holder_is_gone_from_the_database(
    store: Store, database_url: str, clean_db: str
) -> None:
    # A read in a snapshot imports it, then looks for its holder (snapshot_held): a holder
    # still listed is a snapshot still held. A close answers once its holder, another
    # process's or its own, is gone from pg_stat_activity, looked at right after by a
    # connection already open (opening one takes longer than the holder's exit). The holder
    # ends within a millisecond of the signal: closes that did not wait for it failed this
    # in 6 runs of 6 (PostgreSQL 15 and 18), and in one run of 4 with 40 closes, hence 200.
    other = await Store.open(database_url, min_size=1, max_size=2)
    try:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as watch:
            for _ in range(100):
                for holder in (other, store):
                    snapshot, _ = await holder.open_snapshot(P, 60)
                    assert await store.close_snapshot(P, snapshot)
                    listed = await (await watch.execute(SNAPSHOT_HOLDERS)).fetchone()
                    assert listed == (0,)
    finally:
        await other.close()


async def test_a_process_holds_a_bounded_number_of_snapshots(
    store: Store, clean_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(snapshots_module, "MAX_HELD_SNAPSHOTS", 2)
    first, _ = await store.open_snapshot(P, 1)
    second, _ = await store.open_snapshot(P, 60)
    with pytest.raises(ResourceExhausted) as refused:
        await store.open_snapshot(P, 60)
    assert refused.value.reason == "TOO_MANY_SNAPSHOTS"

    # The first one's hold passes: PostgreSQL ends it (a fixed 1.5 s found its holder still
    # leaving under load).
    async def first_ended() -> bool:
        return await scalar(clean_db, SNAPSHOT_HOLDERS) == 1

    assert await until(first_ended)
    third, _ = await store.open_snapshot(P, 60)
    assert await _read_in(store, third) == []
    for snapshot in (second, third):
        assert await store.close_snapshot(P, snapshot)
    assert not await store.close_snapshot(P, first)


async def test_one_projects_snapshots_never_refuse_anothers(
    store: Store, clean_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An audit: the 8 a process held were shared by every project, so one project's backups
    # (held up to a day) refused every other's, told to close snapshots they could not.
    monkeypatch.setattr(snapshots_module, "MAX_HELD_SNAPSHOTS", 2)
    monkeypatch.setattr(snapshots_module, "MAX_HELD_SNAPSHOTS_ALL", 3)
    held = [await store.open_snapshot(P, 60) for _ in range(2)]
    with pytest.raises(ResourceExhausted, match="of this project"):
        await store.open_snapshot(P, 60)
    others, _ = await store.open_snapshot(P + 1, 60)
    with pytest.raises(ResourceExhausted, match="as many snapshots as it holds") as full:
        await store.open_snapshot(P + 1, 60)
    assert not any(c.isdigit() for c in str(full.value))  # nothing of what others hold
    # And a project reads in no snapshot of another's.
    with pytest.raises(FailedPrecondition) as gone:
        await _read_in(store, others)
    assert gone.value.reason == "SNAPSHOT_GONE"
    for snapshot, _ in held:
        assert await store.close_snapshot(P, snapshot)
    assert await store.close_snapshot(P + 1, others)


async def test_an_id_whose_holder_is_gone_never_reads_in_a_snapshot_that_took_its_number(
    store: Store, clean_db: str
) -> None:
    # An audit: PostgreSQL numbers exported snapshots from the same start after a restart,
    # so a resumed backup's id named another backup's new snapshot: the resume read in it,
    # silently, and its close ended the other's. An id carries a nonce of its holder now.
    gone_id, _ = await store.open_snapshot(P, 60)
    assert await store.close_snapshot(P, gone_id)
    await store.create_session(P, "later", None, {})
    held, _ = await store.open_snapshot(P, 60)
    # PostgreSQL's part of the new id with the old nonce: the id a restart could bring back.
    reused = f"{held.rpartition('.')[0]}.{gone_id.rpartition('.')[2]}"
    with pytest.raises(FailedPrecondition) as refused:
        await _read_in(store, reused)
    assert refused.value.reason == "SNAPSHOT_GONE"
    assert not await store.close_snapshot(P, reused)
    assert await _read_in(store, held) == ["later"]  # the other's, still held
    assert await store.close_snapshot(P, held)
