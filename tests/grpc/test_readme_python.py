"""The README's Python examples, run as written against a live server (only the address
changes), so the client calls they show cannot drift from the client."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import Awaitable, Callable
from typing import Any

from memstore_client import Memstore, Message
from server.store import Store
from tests.fix_db import ROOT


def _python_block(starting: str) -> str:
    """The README's ```python block whose first line starts with `starting`."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]
    found = [block for block in blocks if block.startswith(starting)]
    assert len(found) == 1, f"one README python block starts with {starting!r}: {len(found)}"
    return found[0]


def _run(code: str, port: int, namespace: dict[str, Any] | None = None) -> str:
    """Runs README code aimed at the test server; returns what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code.replace("localhost:50051", f"127.0.0.1:{port}"), namespace or {})
    return printed.getvalue()


async def test_the_from_python_example_runs(grpc_port: int, clean_db: str) -> None:
    code = _python_block("from memstore_client import")
    out = await asyncio.to_thread(_run, code, grpc_port)
    lines = out.splitlines()
    assert lines[0] == "['Hi!'] 1", out  # the memory's contents and the session's count
    assert lines[1] == "1", out  # one chunk of one user
    assert lines[-1] == "USER_NOT_FOUND", out


async def test_the_search_and_recall_example_runs(
    grpc_port: int, clean_db: str, store: Store, embed: Callable[[], Awaitable[int]]
) -> None:
    def seed() -> None:
        # What the README's grpcurl lines just above the example create.
        with Memstore(f"127.0.0.1:{grpc_port}") as client:
            client.user.add("maya")
            biscuit = "We adopted a beagle puppy from the shelter and named him Biscuit."
            client.memory.add("maya-1", [Message(biscuit, role="Maya")], user_id="maya")
            food = "Which food should I buy for Biscuit?"
            client.memory.add("maya-2", [Message(food, role="Maya")], user_id="maya")

    await asyncio.to_thread(seed)
    await embed()  # what the server's worker does a moment after AddMemory

    def run() -> str:
        with Memstore(f"127.0.0.1:{grpc_port}") as client:
            return _run(
                _python_block("found = client.memory.search"), grpc_port, {"client": client}
            )

    out = await asyncio.to_thread(run)
    # Recall brings maya-1's message to maya-2 (by its words at least), as a context line.
    assert "Maya: We adopted a beagle puppy" in out, out
    if store.vectors:  # and the hybrid search finds it by meaning
        assert "maya-1 We adopted a beagle puppy" in out, out
