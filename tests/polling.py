"""Waiting for a state to hold, up to a deadline, instead of sleeping a fixed time and hoping."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def until(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> bool:
    """Polls `check` until it holds or `within` seconds pass; returns its last answer.

    Callers assert afterwards, so a state that never comes fails with their own message,
    and one that comes early costs no more than a poll.
    """
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True
