"""`memstore import` cannot lose data silently: it refuses messages of sessions not imported
yet (AddMemory would create them bare), reports rows that exist with other values instead of
counting them as done, and keeps message uuids so a second run appends nothing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import psycopg
import pytest

from memstore_client import AsyncMemstore, Message
from server.__main__ import main

KINDS = ("users", "sessions", "messages")


async def _run(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


def _reports(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.fixture
async def exported(grpc_port: int, clean_db: str, tmp_path: Path) -> tuple[str, Path]:
    """Two users, three sessions with users and metadata, their messages: exported, then
    the tables emptied. Yields the address and the folder of the three files."""
    address = f"127.0.0.1:{grpc_port}"
    async with AsyncMemstore(address) as client:
        for uid in ("ann", "bob"):
            await client.user.add(uid, email=f"{uid}@example.com")
        for i, uid in enumerate(("ann", "ann", "bob")):
            await client.memory.add_session(f"s{i}", user_id=uid, metadata={"n": i})
            await client.memory.add(f"s{i}", [Message(content=f"m{i}-{j}") for j in range(3)])
    for kind in KINDS:
        out = tmp_path / f"{kind}.jsonl"
        assert await _run("export", kind, "--address", address, "-o", str(out)) == 0
    async with await psycopg.AsyncConnection.connect(clean_db, autocommit=True) as conn:
        await conn.execute("TRUNCATE messages, sessions, users CASCADE")
    return address, tmp_path


async def _import(address: str, folder: Path, kind: str) -> int:
    path = folder / f"{kind}.jsonl"
    return await _run("import", kind, "--address", address, "-i", str(path), "--no-progress")


async def test_messages_before_sessions_are_refused_not_imported_bare(
    exported: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    address, folder = exported
    assert await _import(address, folder, "users") == 0
    assert await _import(address, folder, "messages") == 1
    captured = capsys.readouterr()
    assert _reports(captured.out)[-1] == {
        "kind": "messages", "created": 0, "existing": 0, "differs": 0, "failed": 9,
    }  # fmt: skip
    assert "session 's0' does not exist; import users, then sessions, then messages" in (
        captured.err
    )
    # In the right order everything lands, and each session keeps its user and metadata.
    assert await _import(address, folder, "sessions") == 0
    assert await _import(address, folder, "messages") == 0
    async with AsyncMemstore(address) as client:
        sessions = (await client.memory.list_sessions()).sessions
        assert [(s.session_id, s.user_id, s.metadata, s.message_count) for s in sessions] == [
            ("s0", "ann", {"n": 0}, 3),
            ("s1", "ann", {"n": 1}, 3),
            ("s2", "bob", {"n": 2}, 3),
        ]


async def test_rows_that_exist_otherwise_are_reported_and_left_alone(
    exported: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    address, folder = exported
    async with AsyncMemstore(address) as client:
        await client.user.add("ann", email="other@example.com")
        await client.user.add("bob", email="bob@example.com")
        # What an earlier `import messages` run first would have left: a bare session.
        await client.memory.add("s0", [Message(content="stray")])
    assert await _import(address, folder, "users") == 1
    assert await _import(address, folder, "sessions") == 1
    captured = capsys.readouterr()
    users, sessions = _reports(captured.out)
    assert users == {"kind": "users", "created": 0, "existing": 1, "differs": 1, "failed": 0}
    assert sessions == {
        "kind": "sessions", "created": 2, "existing": 0, "differs": 1, "failed": 0,
    }  # fmt: skip
    assert "user 'ann' exists with email 'other@example.com' (file: 'ann@example.com')" in (
        captured.err
    )
    assert "session 's0' exists with user_id None (file: 'ann')" in captured.err
    assert "a bare session" in captured.err and "import users, then sessions" in captured.err
    async with AsyncMemstore(address) as client:
        assert (await client.user.get("ann")).email == "other@example.com"  # not overwritten
        assert (await client.memory.get_session("s0")).user_id is None


async def test_importing_messages_twice_appends_nothing_twice(
    exported: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    address, folder = exported
    for kind in ("users", "sessions", "messages"):
        assert await _import(address, folder, kind) == 0
    assert await _import(address, folder, "messages") == 0
    reports = _reports(capsys.readouterr().out)
    assert reports[-2:] == [
        {"kind": "messages", "created": 9, "existing": 0, "differs": 0, "failed": 0},
        {"kind": "messages", "created": 0, "existing": 9, "differs": 0, "failed": 0},
    ]
    exported_uuids = {
        json.loads(line)["uuid"] for line in (folder / "messages.jsonl").read_text().splitlines()
    }
    async with AsyncMemstore(address) as client:
        stored = set()
        for sid in ("s0", "s1", "s2"):
            page = await client.memory.list_messages(sid)
            assert page.total_size == 3
            stored |= {m.uuid for m in page.messages}
    assert stored == exported_uuids


@pytest.mark.parametrize(
    ("kind", "file", "wanted"),
    [
        ("users", "sessions", "line 1 is a row of sessions"),
        ("sessions", "messages", "line 1 is a row of messages"),
        ("messages", "users", "line 1 is a row of users"),
    ],
)
async def test_a_file_of_another_kind_is_refused_at_its_first_row(
    exported: tuple[str, Path],
    capsys: pytest.CaptureFixture[str],
    kind: str,
    file: str,
    wanted: str,
) -> None:
    # Read as users, a sessions file made users of its user_ids; read as sessions, a
    # messages file made sessions of its session_ids. One line says so; nothing is written.
    address, folder = exported
    path = folder / f"{file}.jsonl"
    assert await _run("import", kind, "--address", address, "-i", str(path), "--no-progress") == 1
    err = capsys.readouterr().err
    assert wanted in err and f"memstore import {file}" in err
    assert len(err.splitlines()) == 1
    async with AsyncMemstore(address) as client:
        assert (await client.user.list()).users == []
        assert (await client.memory.list_sessions()).sessions == []


async def test_a_backup_file_is_refused_by_import(
    exported: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    address, folder = exported
    users = (folder / "users.jsonl").read_text(encoding="utf-8").splitlines()
    backup = folder / "backup.jsonl"
    rows = [json.dumps({"kind": "user", **json.loads(line)}) for line in users]
    backup.write_text("\n".join(['{"memstore_backup": 1}', *rows]) + "\n", encoding="utf-8")
    argv = ("--address", address, "-i", str(backup), "--no-progress")
    assert await _run("import", "users", *argv) == 1
    err = capsys.readouterr().err
    assert "memstore restore" in err and len(err.splitlines()) == 1


async def test_a_line_that_is_not_utf8_is_named_without_a_traceback(
    exported: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    address, folder = exported
    latin1 = folder / "latin1.jsonl"
    latin1.write_bytes(b'{"user_id": "ann"}\n{"user_id": "b\xf6b"}\n')
    argv = ("--address", address, "-i", str(latin1), "--no-progress")
    assert await _run("import", "users", *argv) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"memstore import: INVALID_ARGUMENT: {latin1} line 2 is not UTF-8 text (byte 0xf6 at "
        "column 15); memstore reads the UTF-8 JSON Lines it writes"
    ]


async def test_a_line_nested_past_the_parser_is_a_failed_row_not_a_traceback(
    exported: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Python's json raises RecursionError, no ValueError, past about 1,000 levels.
    address, folder = exported
    deep = folder / "deep.jsonl"
    deep.write_text('{"user_id": "ann"}\n' + "[" * 100_000 + "]" * 100_000 + "\n", "utf-8")
    argv = ("--address", address, "-i", str(deep), "--no-progress")
    assert await _run("import", "users", *argv) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "line 2: not a JSON object: nested more deeply than JSON Lines here may be"
    ]
    assert _reports(captured.out)[-1] == {
        "kind": "users", "created": 1, "existing": 0, "differs": 0, "failed": 1,
    }  # fmt: skip


async def test_a_message_row_of_wrong_types_is_a_failed_row_not_a_traceback(
    exported: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Valid JSON with a content of 123 (or null) ended the import in an AttributeError.
    address, folder = exported
    assert await _import(address, folder, "users") == 0
    assert await _import(address, folder, "sessions") == 0
    capsys.readouterr()
    rows = folder / "typed.jsonl"
    lines = [
        {"session_id": "s0", "content": 123},
        {"session_id": "s0", "content": None},
        {"session_id": "s0", "content": "ok", "metadata": [1]},
        {"session_id": "s0", "content": "kept"},
    ]
    rows.write_text("".join(json.dumps(line) + "\n" for line in lines), "utf-8")
    argv = ("--address", address, "-i", str(rows), "--no-progress")
    assert await _run("import", "messages", *argv) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "line 1: content must be a string, not a number",
        "line 2: content must be a string, not null",
        "line 3: metadata must be an object, not an array",
    ]
    assert _reports(captured.out)[-1] == {
        "kind": "messages", "created": 1, "existing": 0, "differs": 0, "failed": 3,
    }  # fmt: skip
