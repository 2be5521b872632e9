"""Which Citus worker holds a user's or a session's rows, known in the process: PostgreSQL's
hash of text (`hashtext`, with which Citus hashes a text distribution column) and the shards
of users and sessions and their nodes, read from the coordinator's catalog now and then.

GetUser's concurrent calls share one statement (users.py); on Citus each node's users get
statements of their own, so that a worker lost, or one that stopped answering, holds and
fails only the calls of its own users. The calls of an agent's turn (GetMemory, AddMemory)
take a slot of their session's worker's share of the pool (StoreBase._connect), so that a
worker that stops answering holds at most that share of the connections. A map out of date
(a shard moved since it was read) only groups calls less well: every statement is still
routed by Citus itself.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_right
from functools import lru_cache
from typing import Any

from psycopg import AsyncConnection

from server.store.db import fetch_all

#: Seconds a read of the shard maps is used before they are read again: shards
#: move between workers only when an operator rebalances or a node is replaced.
MAP_SECONDS = 30.0

_M = 0xFFFFFFFF


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M


#: lookup3's mix (rotations of its six steps) and final (its seven), as hash_bytes has them:
#: step i of each changes word t (mix: a, b, c, ...; final: c, a, b, ...) by word (t + 2) % 3.
_MIX = (4, 6, 8, 16, 19, 4)
_FINAL = (14, 11, 25, 16, 4, 14, 24)


@lru_cache(maxsize=65536)
def hash_text(text: str) -> int:
    """PostgreSQL's hashtext(text) (hash_bytes in src/common/hashfn.c, Bob Jenkins's lookup3,
    read little-endian) of `text`'s UTF-8 bytes: the hash by which Citus places a row whose
    distribution column is text. Checked against PostgreSQL's own by
    tests/store/test_get_user_batches.py::test_hash_text_is_postgresqls_hashtext."""
    k = text.encode()
    v = [(0x9E3779B9 + len(k) + 3923095) & _M] * 3  # a, b, c
    i = 0
    while len(k) - i >= 12:
        for w in range(3):
            v[w] = (v[w] + int.from_bytes(k[i + 4 * w : i + 4 * w + 4], "little")) & _M
        for step, r in enumerate(_MIX):  # mix(a, b, c)
            t, s = step % 3, (step + 2) % 3
            v[t] = ((v[t] - v[s]) & _M) ^ _rot(v[s], r)
            v[s] = (v[s] + v[(step + 1) % 3]) & _M
        i += 12
    tail = k[i:]
    # The last 0-11 bytes: the lowest byte of c is left to the length (added above).
    if len(tail) > 8:
        v[2] = (v[2] + (int.from_bytes(tail[8:], "little") << 8)) & _M
    if len(tail) > 4:
        v[1] = (v[1] + int.from_bytes(tail[4:8], "little")) & _M
    if tail:
        v[0] = (v[0] + int.from_bytes(tail[:4], "little")) & _M
    for step, r in enumerate(_FINAL):  # final(a, b, c)
        t = (step + 2) % 3
        s = (t + 2) % 3
        v[t] = ((v[t] ^ v[s]) - _rot(v[s], r)) & _M
    c = v[2]
    return c - (1 << 32) if c & 0x80000000 else c  # int4, as PostgreSQL answers it


class ShardMaps:
    """The shard maps of the tables calls are keyed by on Citus (users by user_id, sessions
    by session_id): which node group holds a key's row."""

    def __init__(self) -> None:
        self._lowest: dict[str, list[int]] = {}
        self._groups: dict[str, list[int]] = {}
        self._read_at = -math.inf

    def group_of(self, table: str, key: str) -> int | None:
        """The node group holding the row of `table` keyed `key`, None while no map was read."""
        lowest = self._lowest.get(table, [])
        i = bisect_right(lowest, hash_text(key)) - 1
        return self._groups[table][i] if i >= 0 else None

    def due(self) -> bool:
        """Whether the maps are to be read (again): never read, or read (or tried) more than
        MAP_SECONDS ago."""
        return time.monotonic() - self._read_at > MAP_SECONDS

    def read_now(self) -> None:
        """Notes that the maps were read, or tried, now."""
        self._read_at = time.monotonic()

    async def read(self, conn: AsyncConnection[Any]) -> None:
        """Reads the maps on the coordinator (its catalog: no worker is reached)."""
        lowest: dict[str, list[int]] = {}
        groups: dict[str, list[int]] = {}
        for row in await fetch_all(conn, "shards_citus", {"tables": list(MAPPED)}):
            lowest.setdefault(row["table_name"], []).append(row["lowest"])
            groups.setdefault(row["table_name"], []).append(row["node_group"])
        self._lowest, self._groups = lowest, groups


#: The tables whose shard maps are kept (ShardMaps): the first of each co-location group.
MAPPED = ("users", "sessions")
