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


@lru_cache(maxsize=65536)
def hash_text(text: str) -> int:
    """PostgreSQL's hashtext(text) (hash_bytes in src/common/hashfn.c, Bob Jenkins's lookup3,
    read little-endian) of `text`'s UTF-8 bytes: the hash by which Citus places a row whose
    distribution column is text. Checked against PostgreSQL's own by
    tests/store/test_placement.py."""
    k = text.encode()
    n = len(k)
    a = b = c = (0x9E3779B9 + n + 3923095) & _M
    i = 0
    while n - i >= 12:
        a = (a + int.from_bytes(k[i : i + 4], "little")) & _M
        b = (b + int.from_bytes(k[i + 4 : i + 8], "little")) & _M
        c = (c + int.from_bytes(k[i + 8 : i + 12], "little")) & _M
        a = (a - c) & _M
        a ^= _rot(c, 4)
        c = (c + b) & _M
        b = (b - a) & _M
        b ^= _rot(a, 6)
        a = (a + c) & _M
        c = (c - b) & _M
        c ^= _rot(b, 8)
        b = (b + a) & _M
        a = (a - c) & _M
        a ^= _rot(c, 16)
        c = (c + b) & _M
        b = (b - a) & _M
        b ^= _rot(a, 19)
        a = (a + c) & _M
        c = (c - b) & _M
        c ^= _rot(b, 4)
        b = (b + a) & _M
        i += 12
    tail = k[i:]
    # The last 0-11 bytes: the lowest byte of c is left to the length (added above).
    if len(tail) > 8:
        c = (c + (int.from_bytes(tail[8:], "little") << 8)) & _M
    if len(tail) > 4:
        b = (b + int.from_bytes(tail[4:8], "little")) & _M
    if tail:
        a = (a + int.from_bytes(tail[:4], "little")) & _M
    c ^= b
    c = (c - _rot(b, 14)) & _M
    a ^= c
    a = (a - _rot(c, 11)) & _M
    b ^= a
    b = (b - _rot(a, 25)) & _M
    c ^= b
    c = (c - _rot(b, 16)) & _M
    a ^= c
    a = (a - _rot(c, 4)) & _M
    b ^= a
    b = (b - _rot(a, 14)) & _M
    c ^= b
    c = (c - _rot(b, 24)) & _M
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
