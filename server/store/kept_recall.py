"""Reading the recall the embedding worker kept for GetMemory (get_memories_recall, and its
two steps on Citus; see sql/kept_recall.sql): concurrent calls' reads coalesced into one
statement."""

from __future__ import annotations

import json
import math
import time
from functools import cache, cached_property
from typing import Any, NamedTuple

from psycopg import AsyncConnection, sql

from server.domain import SearchResult
from server.errors import DeadlineExceeded, MemstoreError, Unavailable
from server.store import rows
from server.store.base import StoreBase, call_deadline
from server.store.budget import budget_rows
from server.store.coalesce import Coalescer
from server.store.db import Row, fetch_all, fetch_pipelined
from server.store.messages import memory_window, window_fragment
from server.store.queries import compact, query
from server.store.translate import translated, unanswered, worker_lost

#: One coalesced GetMemory call: (project_id, session_id, lastn, relevant_limit, model,
#: budget, relevant budget), the model "" for recall kept by words; a call with
#: relevant_limit 0 reads no recall, so its model is None and it joins any statement of its
#: project.
MemoryKey = tuple[int, str, int, int, str | None, int | None, int | None]

#: The shortest bound on GetMemory's read of the memories on Citus (seconds), for a call
#: whose deadline has (nearly) passed: it fails at its deadline as it would have.
MIN_RECALL_WITHIN = 0.01

#: Seconds GetMemory on Citus answers without reading the memories after a read of them was
#: dropped for a worker's silence (KeptRecallMethods._recall_trial); then one call tries.
RECALL_PAUSE_SECONDS = 10.0

#: A call's budget in a batch read by budget when the call itself has none: int8's largest.
NO_BUDGET = (1 << 63) - 1


class KeptRead(NamedTuple):
    """GetMemory's window and kept recall as _read_kept read them (its docstring)."""

    memory: list[Row]
    kept: list[Row]
    relevant_cut: bool = False
    #: On Citus: the window was read, the kept memories' shards not all reached (a worker
    #: lost); `kept` is empty and recall must not be ranked on the request path either.
    unreachable: bool = False


@cache
def kept_recall_statement(
    name: str, *, vectors: bool, budgeted: bool = False, relevant_budgeted: bool = False
) -> sql.SQL:
    """A read of kept recall (get_memories_recall, recall_kept_keys_citus) over the table the
    worker keeps it in: session_embeddings with vectors, session_word_recall without;
    get_memories_recall's windows read up to their calls' budgets if `budgeted`, and their
    kept memories up to their relevant budgets if `relevant_budgeted`. Composed once, as
    memory_window: psycopg would compose it again at every execute."""
    if vectors:
        kept, kept_filter = "session_embeddings", query("recall_filter_kept_vectors")
    else:
        kept, kept_filter = "session_word_recall", sql.SQL("")
    window = window_fragment(budgeted=budgeted, coalesced=True)
    scan = query("kept_recall_scan")
    recall: sql.Composable = query("kept_recall").format(scan=scan)
    if relevant_budgeted:
        sized = query("kept_recall_sized").format(scan=scan)
        recall = budget_rows(sized, sql.SQL("k.rank"), sql.SQL("q.relevant_budget"))
    statement = query(name).format(
        kept=sql.Identifier(kept), kept_filter=kept_filter, window=window, recall=recall
    )
    return sql.SQL(compact(statement.as_string(None)))


def kept_result(row: Row) -> SearchResult:
    """A kept memory: a part-1 row of get_memories_recall (its message in the m_ columns), or
    of _kept_live_citus."""
    return SearchResult(
        message=rows.message(row, "m_"), user_id=row["user_id"], score=row["r_score"]
    )


class KeptRecallMethods(StoreBase):
    """GetMemory's window and kept recall, read in one round trip (two steps on Citus)."""

    async def _read_kept(
        self, params: dict[str, Any], kept_by: str, relevant_budget: int | None
    ) -> KeptRead:
        """GetMemory's window (get_memory's rows) and the recall kept by `kept_by` (the model,
        or "" by words; rows as get_memories_recall's part 1, read up to `relevant_budget`),
        and whether that budget cut the recall. The recall is empty where it must be ranked
        on the request path instead: none kept, or fewer of the kept still live than asked;
        and on Citus where a worker holding some of its sessions is out of reach
        (`unreachable`: the window read, the recall not). `params` are recall's
        (RecallMethods._recall_params) with the call's lastn and budget.
        """
        if self.citus:
            return await self._read_kept_citus(params, relevant_budget)
        # Concurrent calls share one statement (and its round trip), as GetUser's do; those
        # without recall too (their model is None: any statement serves them).
        limit = params["limit"]
        call = (params["project_id"], params["session_id"], params["lastn"], limit)
        with translated():
            found = await self._memory_loader.load(
                (*call, kept_by if limit > 0 else None, params["budget"], relevant_budget)
            )
        memory, kept = found or ([], [])
        relevant_cut = bool(kept) and bool(kept[-1]["m_followed"])
        if not relevant_cut and _kept_short(kept, limit, kept[0]["kept_count"] if kept else 0):
            kept = []  # ranked on the request path
        return KeptRead(memory, kept, relevant_cut)

    async def _read_kept_citus(
        self, params: dict[str, Any], relevant_budget: int | None
    ) -> KeptRead:
        # Citus: the window and the kept keys on the session's shard (one round trip), then
        # the memories on the shards of the sessions they name only.
        async with self._connect(single=True, session=params["session_id"]) as conn:
            memory, kept_keys = await fetch_pipelined(
                conn,
                [
                    memory_window(budgeted=params["budget"] is not None),
                    self._kept_statement("recall_kept_keys_citus"),
                ],
                params,
                prepare=True,
            )
        if not (memory and kept_keys):
            return KeptRead(memory, [])
        # While a worker's fuse is blown (found silent by its own calls), a read that would
        # reach it (the workers of the sessions read first: _kept_live_citus) is skipped at
        # once, and one that reaches none of them goes though the reads are paused, the
        # silence placed. Otherwise (the usual case: no lookup of the sessions' workers) the
        # pause decides.
        if self._refusing():
            first = kept_keys[0]["recall_sessions"][: max(params["limit"], 1)]
            if self._refusing(await self._groups_of(first)):
                return KeptRead(memory, [], unreachable=True)
            trial: bool | None = False
        else:
            trial = self._recall_trial()
        if trial is None:
            return KeptRead(memory, [], unreachable=True)
        try:
            async with self._connect(single=True, within=self._recall_within()) as conn:
                kept = await _kept_live_citus(conn, params, kept_keys[0], params["limit"])
        except (Unavailable, DeadlineExceeded) as exc:
            if not self._recall_lost(exc):
                raise
            return KeptRead(memory, [], unreachable=True)
        self._recall_answered(trial)
        return KeptRead(memory, *_cut_by_content(kept, relevant_budget))

    def _recall_within(self) -> float | None:
        """The bound on each answer of GetMemory's read of the memories on Citus, where the
        window was read on the session's shard and the memories are on the shards of the
        user's other sessions: the recall timeout, at most half of what is left of the
        call's deadline (the window is answered in time without them); None on plain
        PostgreSQL, where both are on the one server, or with no recall timeout."""
        if not self.citus or self.recall_timeout <= 0:
            return None
        within = self.recall_timeout
        deadline = call_deadline.get()
        if deadline is not None:
            within = min(within, max((deadline - time.monotonic()) / 2, MIN_RECALL_WITHIN))
        return within

    def _recall_lost(self, exc: MemstoreError) -> bool:
        """Whether `exc`, raised by GetMemory's read of the memories on Citus, means they
        cannot be read now while the window could: a worker holding some of them lost, or
        silent past _recall_within (a worker that stopped answering, a network partition).
        A silent one pauses the reads of the memories (_recall_trial)."""
        if not self.citus:
            return False
        if unanswered(exc):
            self._recall_paused_until = time.monotonic() + RECALL_PAUSE_SECONDS
            return True
        return worker_lost(exc)

    def _recall_trial(self) -> bool | None:
        """Whether GetMemory may read the memories now, on Citus: None while the reads are
        paused, a read having been dropped for silence (_recall_lost) less than
        RECALL_PAUSE_SECONDS ago; True for the first call after a pause (its trial: the
        calls that come while it runs skip the read, as paused, for its bound), False
        otherwise. Each read dropped held a pooled connection for the recall's bound, and
        the reads of every turn of every user with a session on the silent worker took
        the pool whole within seconds (docs/scaling.md)."""
        paused_until = self._recall_paused_until
        if paused_until == -math.inf:
            return False
        now = time.monotonic()
        if now < paused_until:
            return None
        self._recall_paused_until = now + (self._recall_within() or RECALL_PAUSE_SECONDS)
        return True

    def recall_state(self) -> tuple[bool, int]:
        """For the metrics: whether GetMemory's reads of the memories are paused (a read
        dropped for a worker's silence, no trial answered since), and how many GetMemory
        calls were answered without them (relevant_unavailable) since the store opened."""
        return self._recall_paused_until != -math.inf, self.recall_unavailable

    def _recall_answered(self, trial: bool) -> None:
        """A read of the memories answered: after a trial, the reads are no longer paused."""
        if trial:
            self._recall_paused_until = -math.inf

    @cached_property
    def _memory_loader(self) -> Coalescer[MemoryKey, tuple[list[Row], list[Row]]]:
        return Coalescer(self._get_memories, max_waiting_batches=self._pool.max_waiting)

    async def _get_memories(
        self, keys: list[MemoryKey]
    ) -> dict[MemoryKey, tuple[list[Row], list[Row]]]:
        # One get_memories_recall per project and model (one of each, in practice); calls
        # without recall (model None) join their project's first.
        groups: dict[tuple[int, str], list[MemoryKey]] = {}
        for k in sorted(keys, key=lambda k: k[4] is None):
            model = k[4]
            if model is None:
                model = next((m for p, m in groups if p == k[0]), "")
            groups.setdefault((k[0], model), []).append(k)
        found: dict[MemoryKey, tuple[list[Row], list[Row]]] = {}
        async with self._connect(single=True) as conn:
            for (project_id, model), group in groups.items():
                params = {
                    "project_id": project_id,
                    "model": model,
                    "session_ids": [k[1] for k in group],
                    "lastns": [k[2] for k in group],
                    "limits": [k[3] for k in group],
                    "budgets": [NO_BUDGET if k[5] is None else k[5] for k in group],
                    "relevant_budgets": [NO_BUDGET if k[6] is None else k[6] for k in group],
                }
                statement = self._kept_statement(
                    "get_memories_recall",
                    budgeted=any(k[5] is not None for k in group),
                    relevant_budgeted=any(k[6] is not None for k in group),
                )
                for row in await fetch_all(conn, statement, params):
                    parts = found.setdefault(group[row["i"] - 1], ([], []))
                    parts[row["part"]].append(row)
        return found

    def _kept_statement(
        self, name: str, *, budgeted: bool = False, relevant_budgeted: bool = False
    ) -> sql.SQL:
        return kept_recall_statement(
            name, vectors=self.vectors, budgeted=budgeted, relevant_budgeted=relevant_budgeted
        )


async def _kept_live_citus(
    conn: AsyncConnection[Any], params: dict[str, Any], keys: Row, limit: int
) -> list[Row]:
    """Kept recall's rows as get_memories_recall's part 1 has them, read on Citus.

    `keys` is recall_kept_keys_citus's row: the owner and the kept keys, best first. Their
    live memories are read `limit` keys at a time (the next keys only when some of these are
    gone), so a call reaches the shards of at most `limit` sessions in the usual case. As in
    get_memories_recall: one row with a NULL m_uuid when the worker kept none, no row when
    fewer than `limit` of the kept are live any more, and fewer than it kept (the caller
    then ranks on the request path).
    """
    # As unnest of the three arrays, which the worker writes with equal lengths.
    columns = (keys["recall_sessions"], keys["recall_sequences"], keys["recall_scores"])
    ranked = list(zip(*columns, strict=False))
    found: list[Row] = []
    for start in range(0, len(ranked), max(limit, 1)):
        if len(found) >= limit:
            break
        part = ranked[start : start + max(limit, 1)]
        live = await fetch_all(
            conn,
            "recall_live_citus",
            {
                "project_id": params["project_id"],
                "owner": keys["owner"],
                "recall_sessions": sorted({session for session, _, _ in part}),
                "recall_sequences": sorted({sequence for _, sequence, _ in part}),
            },
        )
        # A key names the message it was kept for, not one made since under a session id
        # the purge freed (get_memories_recall's kept_recall_scan, migrations 0019, 0020).
        kept_at = keys["recall_kept_at"]
        by_key = {
            (row["session_id"], row["m_sequence"]): row
            for row in live
            if kept_at is None or row["m_created_at"] <= kept_at
        }
        for session, sequence, score in part:
            row = by_key.get((session, sequence))
            if row is not None and len(found) < limit:
                found.append({**row, "r_score": score})
    if not ranked:
        return [{"m_uuid": None}]
    return [] if _kept_short(found, limit, len(ranked)) else found


def _kept_short(found: list[Row], limit: int, kept: int) -> bool:
    """Whether kept recall's live memories (`found`, read up to `limit` of the `kept` keys)
    are fewer than the worker's ranking would give now: some were deleted since and too few
    are left. The store then ranks on the request path, as if nothing were kept, rather than
    answer a short list while other live memories of the user would fill it."""
    live = sum(1 for row in found if row["m_uuid"] is not None)
    return live < min(limit, kept)


def _cut_by_content(found: list[Row], budget: int | None) -> tuple[list[Row], bool]:
    """Kept recall's rows read on Citus (best first) cut as kept_recall_sized's running sum
    cuts them: each only while those before it hold less than `budget` bytes of content and
    metadata (as PostgreSQL prints it: json.dumps' separators); and whether that left one
    out."""
    if budget is None:
        return found, False
    before = 0
    for i, row in enumerate(found):
        if before >= budget:
            return found[:i], True
        content, metadata = row.get("m_content"), row.get("m_metadata")
        before += len(content.encode()) if content is not None else 0
        before += len(json.dumps(metadata, ensure_ascii=False).encode()) if metadata else 0
    return found, False
