"""The base of every Store method: the pool, the translated connection, the shared helpers."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection, sql
from psycopg import errors as pg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout, TooManyRequests

from server.domain import MAX_METADATA_BYTES, MetadataChange, Page, TimeKey
from server.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MemstoreError,
    ResourceExhausted,
    Unavailable,
)
from server.store.db import ANSWER_MARGIN_SECONDS, BoundedConnection, Unanswered
from server.store.fuse import FUSE_SECONDS, Admission, Fuse, Outcome, ShareState
from server.store.health import DatabaseHealth, is_stale
from server.store.placement import ShardMaps
from server.store.queries import query
from server.store.translate import ErrorFactory, met_silence, translated

#: Seconds to wait for a replacement after a stale pooled connection was discarded.
_RETRY_CHECKOUT_TIMEOUT = 1.0
#: Seconds a call that took its slots at the end of its --pool-timeout still waits for a
#: connection: enough to take one that is free (the pool refuses a wait of 0 outright).
_LAST_CHECKOUT_SECONDS = 0.05

#: Sorts before every stored timestamp: the keyset position of a first page.
START: TimeKey = (datetime.min.replace(tzinfo=UTC), "")

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Seconds each statement of a call whose deadline is further away than the statement
#: timeout may run (or the statement timeout, when longer): its deadline ends it sooner,
#: but a deadline of years (grpc-timeout 99999999H) would otherwise leave it unbounded.
LONGEST_STATEMENT_SECONDS = 3600.0

#: Runs of a transaction that the database may end as a deadlock's victim (rerun_deadlocked).
DEADLOCK_ATTEMPTS = 3
#: Seconds a deadlock's victim waits, at most, before its first rerun (doubled for the next):
#: a random share of it, so that two victims do not replay the same order at once.
DEADLOCK_BACKOFF = 0.05

#: When the call being served must end (time.monotonic()), if its caller set a deadline: set
#: by the serving layer for each gRPC call (serving/observability.py). The store's statement
#: timeout bounds calls without a deadline; a call whose deadline is further away than the
#: timeout runs its statements up to that deadline instead (StoreBase._bound_for_call).
call_deadline: ContextVar[float | None] = ContextVar("memstore_call_deadline", default=None)


class StoreBase:
    """The pool and the one way every method reaches the database."""

    def __init__(self, pool: AsyncConnectionPool[BoundedConnection]) -> None:
        self._pool = pool
        # The pool was opened with a plain conninfo string (Store.open).
        self._health = DatabaseHealth(pool, str(pool.conninfo))
        #: Whether the vector tables exist (pgvector was available to migration 0007): new
        #: messages are then queued for embedding and search can rank by meaning.
        self.vectors = False
        #: Whether recall by words is kept ahead of time instead (migration 0012 applied and
        #: no vector tables): new messages are then queued too, for the worker to rank their
        #: session's recall by words, and GetMemory reads what it kept.
        self.word_recall = False
        #: Whether the database is a Citus coordinator (the tables are distributed): the few
        #: writes Citus runs differently take their other path (docs/scaling.md).
        self.citus = False
        #: The node group of the Citus worker this store reaches, when a server started
        #: through one (migrate_to_serve): calls work as through the coordinator, but for what
        #: relies on the coordinator's advisory locks (Restore is refused, no periodic purge).
        self.worker_group: int | None = None
        #: The statement timeout every pooled connection opens with (seconds, 0 for none):
        #: Store.open sets it.
        self.statement_timeout = 0.0
        #: Seconds GetMemory waits on Citus for the memories of the user's other sessions
        #: (0 for no bound of its own): Store.open sets it (KeptRecallMethods._recall_within).
        self.recall_timeout = 0.0
        #: The pooled connections whose statement timeout is the long one (_bound_for_call); one
        #: the pool closes leaves the set with it.
        self._unbounded: weakref.WeakSet[AsyncConnection[Any]] = weakref.WeakSet()
        #: The models this process's worker has recorded in embedding_models (migration
        #: 0021): recorded once per process, before the model's first save.
        self._recorded_models: set[str] = set()
        #: Whether the vector tables were found made since this process started without
        #: them, and when that was last looked at (keep_word_recall_due).
        self._vectors_arrived = False
        self._vectors_looked = -math.inf
        #: On Citus, which worker holds a user or a session (placement.py), and the shares of
        #: the pool (_connect): each worker's, for the calls naming one of its sessions or
        #: users, and the fan-outs' (keyed None), for the calls reaching every worker.
        self._shard_maps = ShardMaps()
        self._shard_maps_lock = asyncio.Lock()
        self._node_slots: dict[int | None, asyncio.Semaphore] = {}
        #: The slots of each share; None: half the pool. bench.citus_share sets the whole
        #: pool's size on a store of its own, to measure what the cap costs a busy worker.
        self.share_slots: int | None = None
        self._node_waiting: dict[int | None, int] = {}
        self._node_held: dict[int | None, int] = {}
        #: Each share's fuse, keyed as its slots are (server/store/fuse.py).
        self._fuses: dict[int | None, Fuse] = {}
        #: Until when GetMemory on Citus skips reading the memories, a read of them having
        #: met a silent worker (KeptRecallMethods._recall_trial); -inf: not paused.
        self._recall_paused_until = -math.inf
        #: GetMemory calls answered without the memories (relevant_unavailable) since the
        #: store opened: a worker holding some of them lost or silent (for the metrics).
        self.recall_unavailable = 0
        #: Seconds pooled connections have been held by calls since the pool started: the
        #: pool's usage_ms, which psycopg_pool counts only for its connection() block and
        #: this store does not use (_connect takes connections with getconn).
        self.held_seconds = 0.0

    def _connect(
        self,
        *,
        unique: ErrorFactory | None = None,
        foreign_key: ErrorFactory | None = None,
        field: str = "request",
        single: bool = False,
        snapshot: tuple[int, str] | None = None,
        within: float | None = None,
        session: str | None = None,
        user: str | None = None,
        fans_out: bool = False,
    ) -> AbstractAsyncContextManager[BoundedConnection]:
        # One transaction per block: committed on exit, rolled back on error. A block of one
        # statement (`single`) runs in autocommit instead: the statement is its own
        # transaction, which saves the BEGIN and COMMIT round trips. A block that reads in a
        # held `snapshot` (server/store/snapshots.py; a project's, as (project_id, id)) is a
        # transaction that imports it first. `within` (seconds) bounds each answer of the
        # block more tightly than the call's bound: past it the connection is dropped
        # (Unanswered, translated as DeadlineExceeded; `unanswered` tells it). On Citus a
        # block naming the one `session` and/or `user` it reaches takes a slot of each of
        # their workers' shares of the pool first (_take_shares); a block that reaches
        # every worker (`fans_out`: ListSessions, ListUsers, ListUserSessions, user-scope
        # search, DeleteUser, the exports) takes a slot of the fan-outs' share: one silent
        # worker holds every fan-out until its bound, and a steady stream of them would
        # otherwise take the whole pool as its own calls did. While a share's fuse is blown
        # (server/store/fuse.py: its worker found silent) its calls fail at once instead.
        # The wait for slots and the wait for a connection share one bound, --pool-timeout.
        until = time.monotonic() + self._pool.timeout
        block = self._connected(
            unique=unique,
            foreign_key=foreign_key,
            field=field,
            single=single,
            snapshot=snapshot,
            within=within,
            until=until,
        )
        if self.citus and (fans_out or session is not None or user is not None):
            return self._sharing(block, session, user, fans_out, until)
        return block

    @asynccontextmanager
    async def _sharing(
        self,
        block: AbstractAsyncContextManager[BoundedConnection],
        session: str | None,
        user: str | None,
        fans_out: bool,
        until: float,
    ) -> AsyncIterator[BoundedConnection]:
        # `block` (_connected) inside its shares of the pool (_take_shares), their fuses told
        # how it ended.
        shares = await self._take_shares(session, user, fans_out, until)
        try:
            async with block as conn:
                yield conn
        except MemstoreError as exc:
            shares.outcome = _outcome(exc)
            raise
        else:
            shares.outcome = Outcome.ANSWERED
        finally:
            self._release_shares(shares)

    @asynccontextmanager
    async def _connected(
        self,
        *,
        unique: ErrorFactory | None,
        foreign_key: ErrorFactory | None,
        field: str,
        single: bool,
        snapshot: tuple[int, str] | None,
        within: float | None,
        until: float,
    ) -> AsyncIterator[BoundedConnection]:
        # _connect's block: a connection by `until` (a time.monotonic()).
        with translated(unique=unique, foreign_key=foreign_key, field=field):
            conn = await self._checkout(max(_LAST_CHECKOUT_SECONDS, until - time.monotonic()))
            taken = time.monotonic()
            call_bound = conn.answer_within
            try:
                await self._bound_for_call(conn)
                call_bound = conn.answer_within
                if within is not None:
                    bound = within if call_bound is None else min(call_bound, within)
                    conn.answer_within = bound
                if single and snapshot is None:
                    async with _autocommit(conn):
                        yield conn
                else:
                    async with conn:
                        if snapshot is not None:
                            await _import_snapshot(conn, *snapshot)
                        yield conn
            except psycopg.OperationalError as exc:
                # A connection dropped for want of an answer (Unanswered) says nothing of
                # the database as a whole (one Citus worker, one statement): the health
                # watcher's ping is what finds a silent server (serving/grpc_health.py).
                if (conn.broken or conn.closed) and not isinstance(exc, Unanswered):
                    self._health.report_lost_connection()
                raise
            finally:
                conn.answer_within = call_bound
                await self._pool.putconn(conn)
                # Summed unrounded: psycopg_pool's own sum rounds each use down to whole
                # milliseconds, which counts most of this store's calls (under 1 ms) as 0.
                self.held_seconds += time.monotonic() - taken

    async def _take_shares(
        self, session: str | None, user: str | None, fans_out: bool, until: float
    ) -> _Shares:
        # The shares of the pool a block takes a slot of: the fan-outs' (`fans_out`), or
        # those of the worker holding `session` and of the one holding `user` (one where
        # both are on one worker; none while the shard maps are unknown), taken in the order
        # of their node groups: two calls each holding one and waiting for the other cannot
        # happen. A share whose fuse is blown refuses the call at once (Unavailable), and so
        # does any worker's for a fan-out, which would reach that worker too. The caller
        # gives them back (_release_shares) with how the call ended.
        if fans_out and self._refusing():
            self._fuses.setdefault(None, Fuse()).refused += 1  # shown as the fan-outs'
            raise Unavailable(
                "a Citus worker met silence in its calls and every call reaching it fails at"
                " once, this one too (it reaches every worker): one of its calls tries again"
                f" every {FUSE_SECONDS:g}s; retry"
            )
        with translated():
            keys: list[int | None] = [None] if fans_out else await self._nodes_of(session, user)
        shares = _Shares(keys, self._admit(keys))
        try:
            with translated():
                for key in keys:
                    shares.slots.append(await self._take_node_slot(key, until))
        except BaseException:
            self._release_shares(shares)
            raise
        return shares

    async def _nodes_of(self, session: str | None, user: str | None) -> list[int | None]:
        # The node groups holding `session` and `user`, in order, each once.
        nodes = await self._groups_of((session,) if session is not None else ())
        if user is not None and (node := await self._node_of("users", user)) is not None:
            nodes.add(node)
        return list(sorted(nodes))  # list() lets mypy type it list[int | None]

    async def _groups_of(self, sessions: Iterable[str]) -> set[int]:
        # The node groups holding `sessions` (those the shard maps know).
        groups: set[int] = set()
        for session in sessions:
            group = await self._node_of("sessions", session)
            if group is not None:
                groups.add(group)
        return groups

    def _refusing(self, groups: Iterable[int | None] | None = None) -> bool:
        # Whether the fuse of one of `groups` (None: of any worker) fails its calls now: that
        # worker found silent by its own calls (server/store/fuse.py).
        now = time.monotonic()
        if groups is None:
            return any(k is not None and f.refusing(now) for k, f in self._fuses.items())
        return any((f := self._fuses.get(k)) is not None and f.refusing(now) for k in groups)

    def _admit(self, keys: list[int | None]) -> list[int | None]:
        # The shares (keys) whose fuse lets the call go as its trial; Unavailable if one
        # refuses it (its worker found silent: server/store/fuse.py).
        now = time.monotonic()
        trials: list[int | None] = []
        for key in keys:
            fuse = self._fuses.setdefault(key, Fuse())
            admission = fuse.admit(now)
            if admission is Admission.REFUSE:
                for tried in trials:
                    self._fuses[tried].ended(Outcome.NEITHER, now, trial=True)
                raise Unavailable(
                    f"{_share(key)} met a silent worker {fuse.strikes} times in a row: they"
                    f" fail at once, one call trying again every {FUSE_SECONDS:g}s; retry"
                )
            if admission is Admission.TRY:
                trials.append(key)
        return trials

    def _release_shares(self, shares: _Shares) -> None:
        # Gives back a call's slots and tells each share's fuse how the call ended.
        for key, slot in zip(shares.keys, shares.slots, strict=False):
            slot.release()
            self._node_held[key] -= 1
        now = time.monotonic()
        for key in shares.keys:
            fuse = self._fuses[key]
            was_blown = fuse.blown
            fuse.ended(shares.outcome, now, trial=key in shares.trials)
            if fuse.blown and not was_blown:
                log.warning(
                    "%s met a silent worker %d times in a row: failing them at once, one"
                    " call trying again every %gs",
                    _share(key),
                    fuse.strikes,
                    FUSE_SECONDS,
                )
            elif was_blown and not fuse.blown:
                log.warning("%s are answered again", _share(key))

    def share_states(self) -> list[ShareState]:
        """On Citus, each share of the pool met so far (the fan-outs' first, then the
        workers' by node group), for the metrics; none on plain PostgreSQL."""
        # Each set made at once under the GIL: the scrape's thread reads while the loop adds.
        keys = sorted(
            set(self._node_slots) | set(self._fuses), key=lambda k: -1 if k is None else k
        )
        states = []
        for key in keys:
            fuse = self._fuses.get(key, Fuse())
            states.append(
                ShareState(
                    node_group=key,
                    in_flight=self._node_held.get(key, 0),
                    waiting=self._node_waiting.get(key, 0),
                    blown=fuse.blown,
                    refused=fuse.refused,
                )
            )
        return states

    async def _take_node_slot(self, node: int | None, until: float) -> asyncio.Semaphore:
        # A worker that stops answering holds each call that reaches it until the bound on an
        # answer (the statement timeout and ANSWER_MARGIN_SECONDS): under a steady arrival of
        # calls for its sessions, those took every pooled connection within a second, and
        # the calls of every other worker's sessions then failed waiting for one (a probe:
        # 165 of 198 UNAVAILABLE in 12 s). Each worker's calls hold at most half the pool; a
        # call that finds its worker's share taken waits for a slot until `until` (a
        # time.monotonic(): the call's --pool-timeout, which its wait for a connection
        # shares), then fails UNAVAILABLE; past the pool's bound on waiting calls
        # (--pool-max-waiting) one fails at once, as the pool's own queue fails it
        # (TooManyRequests: translate.py answers RESOURCE_EXHAUSTED). `node` None: the
        # fan-outs' share, half the pool as well, held the same way. The caller releases the
        # slot.
        slots = self._node_slots.get(node)
        if slots is None:
            slots = asyncio.Semaphore(self.share_slots or max(1, self._pool.max_size // 2))
            self._node_slots[node] = slots
        waiting = self._node_waiting.get(node, 0)
        if slots.locked() and 0 < self._pool.max_waiting <= waiting:
            raise TooManyRequests(f"{waiting} calls already wait for a worker's share of the pool")
        self._node_waiting[node] = waiting + 1
        try:
            async with asyncio.timeout(max(0.0, until - time.monotonic())):
                await slots.acquire()
        except TimeoutError:
            raise Unavailable(
                f"{_share(node)} had as many in flight as they may hold (half the pool) until"
                f" this call's wait ran out ({self._pool.timeout:g}s): a worker may have"
                " stopped answering; retry"
            ) from None
        finally:
            self._node_waiting[node] -= 1
        self._node_held[node] = self._node_held.get(node, 0) + 1
        return slots

    async def _node_of(self, table: str, key_value: str) -> int | None:
        """On Citus, the node group holding the row of `table` ("users", "sessions") keyed
        `key_value`, by the shard maps (read again every MAP_SECONDS: the call that finds them
        due reads them, the calls meanwhile wait for it); None on plain PostgreSQL, or while
        the maps cannot be read (the call's own statement then says what is wrong)."""
        if not self.citus:
            return None
        if self._shard_maps.due():
            async with self._shard_maps_lock:
                if self._shard_maps.due():
                    try:
                        async with self._connect(single=True) as conn:
                            await self._shard_maps.read(conn)
                    except MemstoreError as exc:
                        log.info("could not read the Citus shard maps (%s): kept as they were", exc)
                    finally:
                        self._shard_maps.read_now()
        return self._shard_maps.group_of(table, key_value)

    async def _bound_for_call(self, conn: BoundedConnection) -> None:
        # The statement timeout bounds a call without a deadline. A call whose deadline is
        # further away runs its statements up to LONGEST_STATEMENT_SECONDS (its deadline
        # cancels them sooner, as any deadline does); one whose deadline comes sooner is
        # bounded either way. The connection keeps what it was set to (outside a
        # transaction), so the setting changes, one round trip, only where a call needs the
        # other one. The store itself waits for any one answer at most the statement timeout
        # and ANSWER_MARGIN_SECONDS (a server that stops answering enforces no timeout); a
        # call whose deadline is further away, until its deadline (gRPC cancels it then).
        if self.statement_timeout <= 0:
            return
        deadline = call_deadline.get()
        answer_within: float | None = self.statement_timeout + ANSWER_MARGIN_SECONDS
        if deadline is None:
            unbounded = False
        elif deadline - time.monotonic() > self.statement_timeout:
            unbounded, answer_within = True, None
        else:
            unbounded = conn in self._unbounded
        conn.answer_within = answer_within
        if unbounded == (conn in self._unbounded):
            return
        longest = max(LONGEST_STATEMENT_SECONDS, self.statement_timeout)
        try:
            async with _autocommit(conn):
                if unbounded:
                    ms = f"{longest * 1000:.0f}"
                    await conn.execute(query("long_statement_timeout"), {"ms": ms})
                else:
                    await statement_timeout_off(conn, False)
        except BaseException:
            # Cancelled or failed mid-switch (a call cancelled in the turn psycopg may take
            # after a statement, say), the connection's timeout is not known: the pool
            # replaces it, rather than the next call on it running under the wrong bound.
            self._unbounded.discard(conn)
            conn.pgconn.finish()
            raise
        if unbounded:
            self._unbounded.add(conn)
        else:
            self._unbounded.discard(conn)

    async def _checkout(self, within: float) -> BoundedConnection:
        # A connection within `within` seconds. Skip connections the server closed while
        # they sat in the pool (a restart): the pool replaces each closed one, and the call
        # goes on with a live connection. Only when no live one comes is the database taken
        # for down.
        timeout, seen_stale = within, False
        for _ in range(self._pool.max_size + 1):
            try:
                # Refused at once while the database is known down, and ended as soon as it
                # is found down (the calls holding connections fail): no wait for the pool's
                # timeout either way; the probe heals the pool.
                with self._health.waiting_for_connection():
                    conn = await self._pool.getconn(timeout)
            except PoolTimeout:
                if seen_stale:
                    self._health.report_lost_connection()
                raise
            if not is_stale(conn):
                return conn
            await conn.close()
            await self._pool.putconn(conn)
            # If the server is down, no fresh connection ever comes: do not wait the pool's
            # whole timeout for one.
            timeout, seen_stale = min(timeout, _RETRY_CHECKOUT_TIMEOUT), True
        self._health.report_lost_connection()
        raise Unavailable("database unavailable: every pooled connection was closed")


async def statement_timeout_off(conn: BoundedConnection, off: bool) -> None:
    """Turns the connection's statement timeout off, or (`off` False) back to the one it
    opened with. Outside a transaction the setting holds until it is changed again."""
    await conn.execute(query("no_statement_timeout" if off else "reset_statement_timeout"))
    if off:
        conn.answer_within = None


@asynccontextmanager
async def _autocommit(conn: AsyncConnection[Any]) -> AsyncIterator[None]:
    # Switching autocommit is local to the client while no transaction is open: no round trip.
    # The switch on is inside the `try`: psycopg may give the loop a turn after it has set the
    # flag (`waiting.wait_async` yields once where the loop has been busy), and a call
    # cancelled in that turn gave its connection back to the pool in autocommit, where the
    # next call's transaction committed each statement as it ran: a refused Restore kept the
    # users it had written (tests/store/test_autocommit.py).
    try:
        await conn.set_autocommit(True)
        yield
    finally:
        if conn.autocommit and not (conn.closed or conn.broken):
            await conn.set_autocommit(False)


async def rerun_deadlocked(attempt: Callable[[], Awaitable[T]]) -> T:
    """`attempt()`'s result, run again (DEADLOCK_ATTEMPTS in all) while the database ends its
    transaction as a deadlock's victim: rolled back whole, it runs again, as PostgreSQL's
    manual advises for a transaction aborted by a deadlock. Citus reports the victim of a
    distributed deadlock the same way (SQLSTATE 40P01).

    Raises:
        Unavailable: the last run was a deadlock's victim too (or the database is down).
    """
    for run in range(DEADLOCK_ATTEMPTS - 1):
        try:
            return await attempt()
        except Unavailable as exc:
            if not isinstance(exc.__cause__, pg.DeadlockDetected):
                raise
        # Rerun at once, the two victims of a distributed deadlock (Citus: DeleteUser's
        # sessions locked in no order against a Restore's in key order) met again, and an
        # audit saw one use all its runs.
        await asyncio.sleep(random.uniform(0, DEADLOCK_BACKOFF * 2**run))
    return await attempt()


def holder_label(project_id: int, nonce: str) -> str:
    """The application_name of the connection holding `project_id`'s snapshot of `nonce`."""
    return f"memstore-snapshot {project_id} {nonce}"


def snapshot_label(project_id: int, snapshot: str) -> str:
    """The application_name of the connection that holds `snapshot` (an id of
    OpenSnapshot: PostgreSQL's id, a dot, a nonce) for `project_id`."""
    return holder_label(project_id, snapshot.rpartition(".")[2])


async def _import_snapshot(conn: AsyncConnection[Any], project_id: int, snapshot: str) -> None:
    """Makes the transaction just begun on `conn` read in `project_id`'s held `snapshot`.

    PostgreSQL's snapshot ids count from the same start after a restart: a checkpoint's id
    named another backup's snapshot then, and a resume read in it, silently, a backup of
    two moments (an audit). So the import is trusted only while the connection that holds
    it for this project, named by the id's nonce, still lives: it held it before the import
    and never stopped, so the id was its snapshot's.

    Raises:
        FailedPrecondition: (SNAPSHOT_GONE) the snapshot is no longer held (or is not this
            project's, or not of this database).
    """
    await conn.execute(query("snapshot_isolation"))
    exported = snapshot.rpartition(".")[0]
    gone = FailedPrecondition(
        f"snapshot '{snapshot}' is no longer held (closed, expired, or the server process"
        " holding it stopped); open another (OpenSnapshot) and read again from the start",
        reason="SNAPSHOT_GONE",
    )
    try:
        await conn.execute(query("import_snapshot").format(snapshot=sql.Literal(exported)))
    except (
        pg.UndefinedObject,
        pg.InvalidParameterValue,
        pg.FeatureNotSupported,
        pg.ObjectNotInPrerequisiteState,
    ) as exc:
        # "snapshot ... does not exist" (its transaction ended); "invalid snapshot
        # identifier"; "cannot import a snapshot from a different database"; "could not
        # import the requested snapshot" (its holder is ending: its file is not yet removed)
        raise gone from exc
    if not await _holder_listed(conn, snapshot_label(project_id, snapshot)):
        raise gone


async def _holder_listed(conn: AsyncConnection[Any], label: str) -> bool:
    # Whether the connection holding a snapshot (its application_name `label`) still lives.
    cur = await conn.execute(query("snapshot_held"), {"label": label})
    row = await cur.fetchone()
    return bool(row and row[0])


#: holder_gone looks first after HOLDER_FIRST_LOOK_S, then twice as long each time up to
#: HOLDER_LOOK_S: an ended holder is gone in about a millisecond.
HOLDER_FIRST_LOOK_S = 0.0005
HOLDER_LOOK_S = 0.02


async def holder_gone(conn: AsyncConnection[Any], label: str, wait_s: float) -> bool:
    """Whether the connection holding a snapshot (its application_name `label`) is gone from
    the database within `wait_s`, looked for as a read looks after importing (snapshot_held):
    a close answers only then (server/store/snapshots.py)."""
    deadline = time.monotonic() + wait_s
    pause = HOLDER_FIRST_LOOK_S
    while True:
        if not await _holder_listed(conn, label):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(pause)
        pause = min(pause * 2, HOLDER_LOOK_S)


def page_of(
    found: list[T], limit: int, *, followed: bool = False, total: int | None = None
) -> Page[T]:
    """A page of `limit` rows from the `limit + 1` read (`found`): has_more when the extra
    row was read or, `followed`, when a byte budget (budget_rows) stopped the reading; `cut`
    when it stopped before the page's last row."""
    cut = followed and len(found) < limit
    return Page(found[:limit], has_more=followed or len(found) > limit, total_size=total, cut=cut)


def key(project_id: int, **ids: str) -> dict[str, Any]:
    """The parameters naming a row: the project and its ids."""
    return {"project_id": project_id, **ids}


def metadata_params(change: MetadataChange | None) -> dict[str, Any]:
    """The parameters of a metadata merge (or replace) in SQL; patch is NULL without a change."""
    return {
        "replace_metadata": bool(change and change.replace),
        "patch": Jsonb(change.patch) if change is not None else None,
        "max_metadata_bytes": MAX_METADATA_BYTES,
    }


def merged_too_large(size: int) -> InvalidArgument:
    """The error of a merge whose result would be larger than the metadata limit."""
    return InvalidArgument.field(
        "metadata",
        f"merged into the stored metadata, the result would be {size} bytes as JSON; at most "
        f"{MAX_METADATA_BYTES} are allowed (remove keys with null values, or, over gRPC, "
        "replace the metadata by naming it in update_mask)",
        reason="METADATA_TOO_LARGE",
    )


def factory(error: MemstoreError) -> ErrorFactory:
    """An ErrorFactory that always gives `error`, for `translated(unique=..., foreign_key=...)`."""
    return lambda _exc: error


def no_such_user(user_id: str | None) -> FailedPrecondition:
    """The error of a session or memory write naming a user that does not exist."""
    return FailedPrecondition(
        f"user '{user_id}' does not exist; create it before naming it", reason="USER_NOT_FOUND"
    )


@dataclass
class _Shares:
    """The shares of the pool one call takes (keys: node groups, None for the fan-outs'),
    those it goes as the trial of, the slots it holds, and how it ended."""

    keys: list[int | None]
    trials: list[int | None]
    slots: list[asyncio.Semaphore] = field(default_factory=list)
    outcome: Outcome = Outcome.NEITHER


def _share(key: int | None) -> str:
    """Names the calls of a share of the pool (key: a node group, None for the fan-outs')."""
    if key is None:
        return "the calls reaching every Citus worker"
    return f"the calls of the Citus worker (node group {key}) holding this session or user"


def _outcome(exc: MemstoreError) -> Outcome:
    """How a call that failed with `exc` ended, as a fuse reads it: the worker's silence;
    an error of the infrastructure that is not (a lost worker, a statement timeout, a
    deadline, a full queue); or any other error, which the database answered."""
    if met_silence(exc):
        return Outcome.SILENT
    if isinstance(exc, (Unavailable, DeadlineExceeded, ResourceExhausted)):
        return Outcome.NEITHER
    return Outcome.ANSWERED
