"""`memstore export` when it cannot finish: a foreign token is a clear error, an interrupted
export prints its resume command on a line of its own, and resuming appends to the file."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from memstore_client import AsyncMemstore, cli
from server.__main__ import main
from server.config import Config
from server.domain import DEFAULT_PROJECT_ID
from server.serving.app import build_server
from server.store import Store

#: Enough bytes that the stream is still running when its server stops (the FIFO, the
#: socket buffers and gRPC's flow-control windows together hold a few MB at most).
USERS = 1500
PAD = 8000


async def _run(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def test_a_token_of_another_stream_is_a_clear_error(
    grpc_port: int, clean_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"127.0.0.1:{grpc_port}"
    async with AsyncMemstore(address) as client:
        for uid in ("a", "b", "c"):
            await client.user.add(uid)
        chunks = [c async for c in client.user.export(chunk_size=1)]
    users_token = chunks[0][1]
    code = await _run("export", "sessions", "--address", address, "--page-token", users_token)
    err = capsys.readouterr().err
    assert code == 1
    assert "--page-token is not a token of `memstore export sessions`" in err
    assert "interrupted after" not in err and "resume with" not in err


@pytest.fixture
async def own_server(store: Store) -> AsyncIterator[tuple[object, str]]:
    server, port = await build_server(Config(host="127.0.0.1", port=0), store)
    await server.start()
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def _seed_users(database_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO users (project_id, user_id, metadata, created_at, updated_at)"
            " SELECT %(p)s, 'u' || lpad(i::text, 5, '0'),"
            "        jsonb_build_object('pad', repeat('x', %(pad)s)),"
            "        t + i * interval '1 millisecond', t + i * interval '1 millisecond'"
            " FROM generate_series(1, %(n)s) AS i, (SELECT now() AS t) AS n",
            {"p": DEFAULT_PROJECT_ID, "pad": PAD, "n": USERS},
        )


async def test_an_interrupted_export_resumes_into_the_same_file(
    own_server, store: Store, clean_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, address = own_server
    await _seed_users(clean_db)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    out = tmp_path / "users.jsonl"
    export = asyncio.create_task(
        _run("export", "users", "--address", address, "-o", str(fifo), "--chunk-size", "1")
    )
    reader = await asyncio.to_thread(fifo.open, encoding="utf-8")
    with reader, out.open("w", encoding="utf-8") as copy:
        copy.write(await asyncio.to_thread(reader.readline))  # the export is under way
        await server.stop(None)  # type: ignore[attr-defined]
        copy.write(await asyncio.to_thread(reader.read))
    assert await export == 1
    err = capsys.readouterr().err
    lines = err.splitlines()
    resume = [line for line in lines if "resume with" in line]
    # On a line of its own, not after the progress bar's carriage return.
    assert len(resume) == 1 and resume[0].startswith("interrupted after "), err
    written = len(out.read_text().splitlines())
    assert 0 < written < USERS and f"interrupted after {written} users;" in resume[0]
    command = shlex.split(resume[0].split("resume with: ")[1])
    assert command[:3] == ["memstore", "export", "users"] and "--page-token" in command
    # It names the server it was reading (run as printed, it reached the default address).
    assert command[command.index("--address") + 1] == address
    assert command[command.index("-o") + 1] == str(fifo) and "--append" in command

    # A new server over the same database (the token's key lives there) finishes the job:
    # the printed command, pointed at it and at the copy of what the pipe carried.
    again, port = await build_server(Config(host="127.0.0.1", port=0), store)
    await again.start()
    try:
        command[command.index("--address") + 1] = f"127.0.0.1:{port}"
        command[command.index("-o") + 1] = str(out)
        assert await _run(*command[1:], "--no-progress") == 0
    finally:
        await again.stop(None)
    ids = [json.loads(line)["user_id"] for line in out.read_text().splitlines()]
    assert ids == [f"u{i:05d}" for i in range(1, USERS + 1)]


async def _thirty_users(grpc_port: int) -> str:
    """The server's address, once users u00..u29 exist (three chunks of 10)."""
    address = f"127.0.0.1:{grpc_port}"
    async with AsyncMemstore(address) as client:
        for i in range(30):
            await client.user.add(f"u{i:02d}")
    return address


def _resume_token(err: str, *, after: int) -> str:
    """The --page-token of the resume command an export interrupted after `after` users
    printed."""
    resume = next(line for line in err.splitlines() if "resume with" in line)
    assert resume.startswith(f"interrupted after {after} users;"), resume
    command = resume.split("resume with: ")[1].split()
    return command[command.index("--page-token") + 1]


async def test_a_ctrl_c_mid_chunk_leaves_whole_lines_and_resumes_without_repeats(
    grpc_port: int,
    clean_db: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A Ctrl-C while a chunk was being written left its first rows in the file (and the
    # last one cut short at the buffer's edge) while the resume command named the token
    # before that chunk: resuming with --append wrote those rows twice.
    address = await _thirty_users(grpc_port)
    rows = {"n": 0}
    row = cli._row

    def interrupted_row(value: object) -> dict[str, object]:
        rows["n"] += 1
        if rows["n"] == 15:  # the fifth row of the second chunk
            raise KeyboardInterrupt
        return row(value)  # type: ignore[arg-type]

    monkeypatch.setattr(cli, "_row", interrupted_row)
    out = tmp_path / "users.jsonl"
    argv = ["export", "users", "--address", address, "-o", str(out), "--no-progress"]
    assert await _run(*argv, "--chunk-size", "10") == 130
    token = _resume_token(capsys.readouterr().err, after=10)
    monkeypatch.setattr(cli, "_row", row)
    assert await _run(*argv, "--chunk-size", "10", "--page-token", token, "--append") == 0
    ids = [json.loads(line)["user_id"] for line in out.read_text().splitlines()]
    assert ids == [f"u{i:02d}" for i in range(30)]


@pytest.mark.parametrize("cut", ["during_the_write", "after_the_write"])
async def test_a_ctrl_c_as_a_chunk_is_written_is_cut_back_and_resumes_without_repeats(
    cut: str,
    *,
    grpc_port: int,
    clean_db: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A Ctrl-C can also land while a chunk's lines go to the file (a write is not atomic: part
    # of it reaches the file) or just after, before the chunk's token is counted: either way
    # the file held rows after the point the resume command goes on from, and --append wrote
    # them again (or after half a line). The file is cut back to its last whole chunk.
    address = await _thirty_users(grpc_port)
    out = tmp_path / "users.jsonl"
    opened = Path.open
    writes = {"n": 0}

    class InterruptedFile:
        """The export's file, whose second chunk is interrupted as `cut` says."""

        def __init__(self, file: Any) -> None:
            self._file = file

        def write(self, text: str) -> int:
            writes["n"] += 1
            if writes["n"] != 2:
                return int(self._file.write(text))
            self._file.write(text if cut == "after_the_write" else text[: len(text) // 2])
            self._file.flush()
            raise KeyboardInterrupt

        def __getattr__(self, name: str) -> Any:
            return getattr(self._file, name)

        def __enter__(self) -> InterruptedFile:
            return self

        def __exit__(self, *exc: object) -> None:
            self._file.close()

    def open_export_file(path: Path, *args: Any, **kwargs: Any) -> Any:
        file = opened(path, *args, **kwargs)
        return InterruptedFile(file) if path == out else file

    monkeypatch.setattr(Path, "open", open_export_file)
    argv = ["export", "users", "--address", address, "-o", str(out), "--no-progress"]
    assert await _run(*argv, "--chunk-size", "10") == 130
    monkeypatch.setattr(Path, "open", opened)
    assert len(out.read_text().splitlines()) == 10  # the first chunk, whole
    token = _resume_token(capsys.readouterr().err, after=10)
    assert await _run(*argv, "--chunk-size", "10", "--page-token", token, "--append") == 0
    ids = [json.loads(line)["user_id"] for line in out.read_text().splitlines()]
    assert ids == [f"u{i:02d}" for i in range(30)]
