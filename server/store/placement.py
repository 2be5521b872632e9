"""Which Citus worker holds a user's row, known in the process: PostgreSQL's hash of text
(`hashtext`, with which Citus hashes a text distribution column) and the users table's
shards and their nodes, read from the coordinator's catalog now and then.

GetUser's concurrent calls share one statement (users.py); on Citus each node's users get
statements of their own, so that a worker lost, or one that stopped answering, holds and
fails only the calls of its own users. A map out of date (a shard moved since it was read)
only groups calls less well: every statement is still routed by Citus itself.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_right
from functools import lru_cache
from typing import Any

from psycopg import AsyncConnection

from server.store.db import fetch_all

#: Seconds a read of the users table's shard map is used before it is read again: shards
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


class UserPlacement:
    """The users table's shard map: which node group holds a user's row."""

    def __init__(self) -> None:
        self._lowest: list[int] = []
        self._groups: list[int] = []
        self._read_at = -math.inf

    def group_of(self, user_id: str) -> int | None:
        """The node group holding `user_id`'s row, None while no map was read."""
        i = bisect_right(self._lowest, hash_text(user_id)) - 1
        return self._groups[i] if i >= 0 else None

    def due(self) -> bool:
        """Whether the map is to be read (again): never read, or read (or tried) more than
        MAP_SECONDS ago."""
        return time.monotonic() - self._read_at > MAP_SECONDS

    def read_now(self) -> None:
        """Notes that the map was read, or tried, now."""
        self._read_at = time.monotonic()

    async def read(self, conn: AsyncConnection[Any]) -> None:
        """Reads the map on the coordinator (its catalog: no worker is reached)."""
        shards = await fetch_all(conn, "users_shards_citus", {})
        self._lowest = [row["lowest"] for row in shards]
        self._groups = [row["node_group"] for row in shards]
