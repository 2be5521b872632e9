"""The Node.js example (examples/node) against the real server: the polyglot proof."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from memstore.v1 import user_service_pb2 as us
from tests.grpc import Users

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node"
NODE, NPM = shutil.which("node"), shutil.which("npm")


async def _run(*cmd: str, seconds: float) -> tuple[int, str, str]:
    # A subprocess, awaited: the server under test runs on this same event loop.
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=EXAMPLE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), seconds)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _install() -> None:
    # npm ci from the committed lock file, only when node_modules is older than the lock.
    installed = EXAMPLE / "node_modules" / ".package-lock.json"
    lock = EXAMPLE / "package-lock.json"
    if installed.exists() and installed.stat().st_mtime >= lock.stat().st_mtime:
        return
    assert NPM is not None
    code, out, err = await _run(NPM, "ci", "--no-audit", "--no-fund", seconds=300)
    assert code == 0, out + err


@pytest.mark.skipif(NODE is None or NPM is None, reason="node and npm are not installed")
async def test_node_client_creates_adds_reads_and_streams(
    grpc_port: int, users: Users, clean_db: str
) -> None:
    await _install()
    assert NODE is not None
    for user_id in ("a-1", "a-2", "a-3"):
        await users.CreateUser(us.CreateUserRequest(user_id=user_id))
    code, out, err = await _run(NODE, "example.js", f"127.0.0.1:{grpc_port}", seconds=60)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["metadata"] == {"plan": "pro", "languages": ["en", "fr"]}
    assert summary["memory"] == [
        {"role_type": "ROLE_TYPE_USER", "content": "I prefer tea."},
        {"role_type": "ROLE_TYPE_ASSISTANT", "content": "Tea it is."},
    ]
    assert summary["session_message_count"] == 2
    # Four users in chunks of two, oldest first: the stream was read to its end.
    assert summary["chunked_users"] == ["a-1", "a-2", "a-3", summary["user_id"]]
    assert summary["chunks"] == 2
