"""Checks, conversions and JSON of large requests run in a thread, so the event loop keeps serving.

The gRPC and HTTP ports share one event loop. Checking an AddMemory near the 16 MiB cap (1,000
messages whose metadata holds a thousand small keys each) walks about a million values in
Python: 1 s of CPU over gRPC, 5 s over REST (JSON parsed, then each metadata object checked
as a Struct), and building its answer another second; the store's JSON of its metadata
(json.dumps 0.26 s, the answer's parse 0.34 s) came in single blocks too. On the loop, every
other caller of either port waited that long (tests/reliability/test_loop_stalls.py). In a
thread the work holds the GIL for at most `sys.getswitchinterval()` (5 ms) at a time, so the
loop answers between its slices; small requests stay on the loop, where a thread hand-off
would cost more than the work. The adapters (server/api, server/rest) and the store
(server/store: add_memory.py, db.py) share this pool; over gRPC, so do the parse of a large
request and the serialization of a large answer (serving/services.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

#: Requests of at least this many bytes are checked (and answered) in a thread. A request of
#: 256 KiB holds at most ~25,000 values, a few ms of checks.
OFF_LOOP_BYTES = 256 * 1024
#: Threads for that work: two large requests proceed at once, more wait their turn (the GIL
#: runs one at a time anyway), and the default executor stays free for the embedder.
_THREADS = 2

#: The bytes of the gRPC request being served, as it came off the wire (serving/services.py
#: sets it before the handler runs): what a handler weighs its checks and an answer that echoes
#: the request by, without the request's ByteSize (as costly as serializing it).
request_bytes: ContextVar[int] = ContextVar("request_bytes", default=0)


@functools.cache
def _pool() -> ThreadPoolExecutor:
    # Made on first use, in the serving process (--workers forks before serving).
    return ThreadPoolExecutor(_THREADS, thread_name_prefix="memstore-check")


async def run(size: int, work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`work(*args, **kwargs)`: on the loop when `size` (the request's bytes) is small, else in
    a thread of its own pool. Its exceptions propagate either way."""
    if size < OFF_LOOP_BYTES:
        return work(*args, **kwargs)
    call = functools.partial(contextvars.copy_context().run, work, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_pool(), call)
