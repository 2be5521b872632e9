"""`memstore backup` / `memstore restore`: every row of a project comes back exactly (compared
column by column in PostgreSQL), soft-deleted ones included; restore refuses a project that
is not empty and rows that differ; both resume."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import psycopg
import pytest
from psycopg.rows import dict_row

from memstore_client import AsyncMemstore, ExportedMessage, Message, Session, backup_cli
from memstore_client.errors import Unavailable
from server.__main__ import main
from server.store import Store
from tests.fix_security import make_key

ROOT = Path(__file__).resolve().parents[2]
#: Another server's address, and keys of its projects by name.
OtherServer = tuple[str, dict[str, str]]
#: A checkpoint's snapshot id (BackupService.OpenSnapshot's).
_SNAPSHOT_ID = re.compile(rb'"snapshot": "[0-9A-F]{8}-[0-9A-F]{8}-[0-9]+\.[0-9a-f]{16}"')

TABLES = {
    "users": "user_id",
    "sessions": "session_id",
    "messages": "session_id, sequence",
}


async def _run(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def _run_apart(*argv: str) -> None:
    """`memstore ARGV` in a process of its own, as a user runs it twice."""
    command = [sys.executable, "-m", "server", *argv, "--no-progress"]
    await asyncio.to_thread(subprocess.run, command, check=True, cwd=ROOT, timeout=120)


async def _snapshot(database_url: str) -> dict[str, list[dict[str, Any]]]:
    """Every column of every row of the three tables, in key order."""
    found = {}
    async with await psycopg.AsyncConnection.connect(database_url, row_factory=dict_row) as conn:
        for table, key in TABLES.items():
            cur = await conn.execute(f"SELECT * FROM {table} ORDER BY {key}")
            found[table] = await cur.fetchall()
    return found


async def _truncate(database_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("TRUNCATE messages, sessions, users CASCADE")


async def _seed(address: str) -> None:
    async with AsyncMemstore(address) as client:
        await client.user.add("ann", email="ann@example.com", metadata={"a": {"b": [1, 2.5]}})
        await client.user.add("bob", first_name="Bob", metadata={"ünï": "cödé"})
        await client.user.update("bob", last_name="Builder")  # updated_at moves on
        await client.memory.add_session("s-ann", user_id="ann", metadata={"topic": "food"})
        added = await client.memory.add(
            "s-ann",
            [Message(content=f"m{i}", role="Ann", role_type="user") for i in range(4)],
        )
        await client.memory.update_message("s-ann", added[1].uuid, {"seen": True})
        await client.memory.add("s-free", [Message(content="no user", metadata={"k": [1]})])
        await client.memory.add_session("s-gone", user_id="bob")
        await client.memory.add("s-gone", [Message(content="gone")], user_id="bob")
        await client.memory.delete("s-gone")  # the session and its message soft-deleted
        await client.memory.add("s-cleared", [Message(content="old")])
        await client.memory.clear("s-cleared")  # the message soft-deleted, the session live
        await client.memory.add("s-cleared", [Message(content="new", role_type="assistant")])
        await client.memory.add_session("s-empty", metadata={"n": None, "x": 1})


async def _backed_up_and_emptied(address: str, database_url: str, folder: Path) -> Path:
    """The seeded project backed up to a file, then its tables emptied; the file."""
    await _seed(address)
    backup = folder / "b.jsonl"
    assert await _run("backup", "-o", str(backup), "--address", address, "--no-progress") == 0
    await _truncate(database_url)
    return backup


async def test_backup_and_restore_round_trip_every_column(
    grpc_port: int, clean_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"127.0.0.1:{grpc_port}"
    await _seed(address)
    async with AsyncMemstore(address) as client:
        await client.memory.add("s-purged", [Message(content=f"p{i}") for i in range(3)])
        await client.memory.clear("s-purged")
    async with await psycopg.AsyncConnection.connect(clean_db, autocommit=True) as conn:
        # What the purge does to cleared messages past the retention: they are gone, and
        # the session's next sequence stays past them.
        await conn.execute("DELETE FROM messages WHERE session_id = 's-purged'")
    before = await _snapshot(clean_db)
    purged = next(s for s in before["sessions"] if s["session_id"] == "s-purged")
    assert purged["next_sequence"] == 4
    assert any(m["deleted_at"] for m in before["messages"])
    assert any(s["deleted_at"] for s in before["sessions"])
    backup = tmp_path / "project.backup.jsonl"
    assert await _run("backup", "-o", str(backup), "--address", address, "--chunk-size", "2") == 0
    assert "backing up" in capsys.readouterr().err  # the progress bar

    await _truncate(clean_db)
    assert await _run("restore", "-i", str(backup), "--address", address) == 0
    err = capsys.readouterr().err
    assert "restoring" in err
    report = json.loads(err.strip().splitlines()[-1])
    assert report["messages"] == {"created": len(before["messages"]), "existing": 0}
    after = await _snapshot(clean_db)
    for table in TABLES:
        assert after[table] == before[table], table

    # Into a project that is not empty: refused, and nothing changes.
    assert await _run("restore", "-i", str(backup), "--address", address) == 1
    assert "PROJECT_NOT_EMPTY" in capsys.readouterr().err
    # --resume sends every row again: all already there, still nothing changes.
    assert await _run("restore", "-i", str(backup), "--address", address, "--resume") == 0
    report = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert report["users"] == {"created": 0, "existing": 2}
    assert await _snapshot(clean_db) == before


async def test_restore_names_the_rows_that_differ_and_writes_nothing_of_their_batch(
    grpc_port: int, clean_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"127.0.0.1:{grpc_port}"
    backup = await _backed_up_and_emptied(address, clean_db, tmp_path)
    async with AsyncMemstore(address) as client:
        await client.user.add("ann", email="other@example.com")
    argv = ("restore", "-i", str(backup), "--address", address, "--no-progress", "--resume")
    assert await _run(*argv) == 1
    err = capsys.readouterr().err
    assert "RESTORE_CONFLICT" in err and "users[0] (ann) exists with another email" in err
    assert "resume with: memstore restore" in err
    after = await _snapshot(clean_db)
    assert [u["user_id"] for u in after["users"]] == ["ann"]  # bob's batch was not written
    assert after["sessions"] == []


async def test_a_backup_whose_rows_name_what_it_lacks_is_not_told_to_resume(
    grpc_port: int, clean_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A file whose message names a session it does not hold (edited, or a session purged
    # between the backup's sessions and messages): sending the same file again cannot help.
    address = f"127.0.0.1:{grpc_port}"
    backup = await _backed_up_and_emptied(address, clean_db, tmp_path)
    lines = backup.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [
        line
        for line in lines
        if not ('"kind": "session"' in line and '"session_id": "s-free"' in line)
    ]
    assert len(kept) == len(lines) - 1
    orphaned = tmp_path / "orphaned.jsonl"
    orphaned.write_text("".join(kept), encoding="utf-8")
    argv = ("restore", "-i", str(orphaned), "--address", address, "--no-progress")
    assert await _run(*argv) == 1
    err = capsys.readouterr().err
    assert "SESSION_NOT_FOUND" in err and "names session 's-free'" in err
    assert "resume with" not in err
    assert "the backup file holds rows whose parents it lacks" in err


async def _in_a_held_snapshot(address: str, lines: list[str]) -> list[str]:
    """A whole backup's lines with their checkpoints naming a snapshot still held (of the
    same unchanged project), as an interrupted backup's do: the whole one closed its own."""
    (closed,) = {json.loads(line)["snapshot"] for line in lines if '"checkpoint"' in line}
    if not closed:  # read in no snapshot: a Citus cluster holds none
        return lines
    async with AsyncMemstore(address) as client:
        held = (await client.backup.open_snapshot(600)).snapshot
    return [line.replace(closed, held) for line in lines]


async def test_an_interrupted_backup_resumes_from_its_last_checkpoint(
    grpc_port: int, clean_db: str, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{grpc_port}"
    await _seed(address)
    full = tmp_path / "full.jsonl"
    argv = ("--address", address, "--chunk-size", "2", "--no-progress")
    assert await _run("backup", "-o", str(full), *argv) == 0
    lines = full.read_text(encoding="utf-8").splitlines(keepends=True)
    # An interrupted backup leaves its snapshot held, for the resume to read the rest in; the
    # whole one closed its own: its checkpoints are made to name one still held (of the same
    # unchanged project).
    lines = await _in_a_held_snapshot(address, lines)
    # Cut in the middle of the messages stream: after a checkpoint, one more row, half a row.
    checkpoints = [i for i, line in enumerate(lines) if '"kind": "checkpoint"' in line]
    messages = [i for i in checkpoints if '"stream": "messages"' in lines[i]]
    cut = messages[0]
    part = tmp_path / "part.jsonl"
    part.write_text("".join(lines[: cut + 2]) + lines[cut + 2][:20], encoding="utf-8")
    assert await _run("backup", "-o", str(part), *argv, "--resume") == 0
    rows = [json.loads(line) for line in part.read_text(encoding="utf-8").splitlines()]
    data = [r for r in rows if r.get("kind") in ("user", "session", "message")]
    expected = [json.loads(line) for line in lines]
    assert data == [r for r in expected if r.get("kind") in ("user", "session", "message")]
    assert rows[-1] == expected[-1]  # the end line and its counts
    assert await _run("backup", "-o", str(part), *argv) == 1  # never overwritten silently
    # Cut right after each checkpoint, the last one too (every row in, the end line
    # missing: its chunk carries no token, and the resume wrote every message again).
    for i in checkpoints:
        lines = await _in_a_held_snapshot(address, lines)  # each resume closed its own
        part.write_text("".join(lines[: i + 1]), encoding="utf-8")
        assert await _run("backup", "-o", str(part), *argv, "--resume") == 0
        assert part.read_text(encoding="utf-8").splitlines(keepends=True) == lines, i


async def test_a_damaged_or_unfinished_backup_is_refused_with_its_line(
    grpc_port: int, clean_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"127.0.0.1:{grpc_port}"
    backup = await _backed_up_and_emptied(address, clean_db, tmp_path)
    lines = backup.read_text(encoding="utf-8").splitlines(keepends=True)
    unfinished = tmp_path / "unfinished.jsonl"
    unfinished.write_text("".join(lines[:-1]), encoding="utf-8")
    argv = ("--address", address, "--no-progress")
    assert await _run("restore", "-i", str(unfinished), *argv) == 1
    assert "is an interrupted backup; finish it first" in capsys.readouterr().err
    damaged = tmp_path / "damaged.jsonl"
    broken = json.loads(lines[1])
    del broken["created_at"]
    damaged.write_text(lines[0] + json.dumps(broken) + "\n" + "".join(lines[2:]), "utf-8")
    assert await _run("restore", "-i", str(damaged), *argv) == 1
    err = capsys.readouterr().err
    assert "line 2: not a user row" in err and "resume with" not in err
    # Valid JSON of a wrong type, and an end line without its counts: tracebacks before.
    typed = dict(json.loads(lines[1]), user_id=5)
    damaged.write_text(lines[0] + json.dumps(typed) + "\n" + "".join(lines[2:]), "utf-8")
    assert await _run("restore", "-i", str(damaged), *argv) == 1
    err = capsys.readouterr().err
    assert "line 2: not a user row" in err and "Traceback" not in err, err
    damaged.write_text("".join(lines[:-1]) + '{"kind": "end"}\n', "utf-8")
    assert await _run("restore", "-i", str(damaged), *argv) == 1
    err = capsys.readouterr().err
    assert "its end line does not hold the counts" in err and "Traceback" not in err, err
    assert await _run("restore", "-i", str(tmp_path / "missing.jsonl"), *argv) == 1
    assert "No such file" in capsys.readouterr().err
    assert (await _snapshot(clean_db))["users"] == []


async def test_a_backup_that_is_not_utf8_is_refused_with_its_line(
    grpc_port: int, clean_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"127.0.0.1:{grpc_port}"
    backup = await _backed_up_and_emptied(address, clean_db, tmp_path)
    lines = backup.read_bytes().splitlines(keepends=True)
    # A byte of Latin-1 where UTF-8 was: an editor's or a transfer's damage.
    damaged = tmp_path / "latin1.jsonl"
    bad_line = lines[1].replace(b"}", b', "x": "\xe9"}', 1)
    damaged.write_bytes(lines[0] + bad_line + b"".join(lines[2:]))
    column = bad_line.index(b"\xe9") + 1
    argv = ("--address", address, "--no-progress")
    assert await _run("restore", "-i", str(damaged), *argv) == 1
    # The last line: `backup` above reported its counts on stderr too.
    assert capsys.readouterr().err.splitlines()[-1:] == [
        f"memstore restore: INVALID_ARGUMENT: {damaged} line 2 is not UTF-8 text (byte 0xe9 "
        f"at column {column}); memstore reads the UTF-8 JSON Lines it writes"
    ]
    assert (await _snapshot(clean_db))["users"] == []


async def test_a_backup_line_nested_past_the_parser_is_refused_with_its_line(
    grpc_port: int, clean_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"127.0.0.1:{grpc_port}"
    backup = await _backed_up_and_emptied(address, clean_db, tmp_path)
    lines = backup.read_text(encoding="utf-8").splitlines(keepends=True)
    # Python's json raises RecursionError, no ValueError, past about 1,000 levels.
    damaged = tmp_path / "deep.jsonl"
    damaged.write_text(lines[0] + "[" * 100_000 + "]" * 100_000 + "\n" + "".join(lines[1:]))
    argv = ("--address", address, "--no-progress")
    assert await _run("restore", "-i", str(damaged), *argv) == 1
    assert capsys.readouterr().err.splitlines()[-1:] == [
        f"memstore restore: INVALID_ARGUMENT: {damaged} line 2 is not JSON: nested more "
        "deeply than JSON Lines here may be"
    ]
    assert (await _snapshot(clean_db))["users"] == []
    # backup --resume reads it as the line an interruption cut short, as other damage;
    # and a line of JSON that is no object likewise (it was an AttributeError traceback).
    assert await _run("backup", "-o", str(damaged), "--resume", *argv) == 0
    listed = tmp_path / "list.jsonl"
    listed.write_text(lines[0] + "[1]\n" + "".join(lines[1:]))
    assert await _run("backup", "-o", str(listed), "--resume", *argv) == 0


async def test_resume_refuses_a_file_that_is_no_backup_and_leaves_it_whole(
    grpc_port: int, clean_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `backup -o users.jsonl --resume` by mistake: the export was cut back to nothing (no line
    # of it was a checkpoint) and a backup without its header appended, which restore refuses.
    address = f"127.0.0.1:{grpc_port}"
    await _seed(address)
    argv = ("--address", address, "--no-progress")
    export = tmp_path / "users.jsonl"
    assert await _run("export", "users", "-o", str(export), *argv) == 0
    before = export.read_bytes()
    assert await _run("backup", "-o", str(export), "--resume", *argv) == 1
    assert "is not a memstore backup" in capsys.readouterr().err
    assert export.read_bytes() == before
    # A backup interrupted within its header line starts again, header first.
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b'{"memstore_bac')
    assert await _run("backup", "-o", str(cut), "--resume", *argv) == 0
    await _truncate(clean_db)
    assert await _run("restore", "-i", str(cut), *argv) == 0
    assert [u["user_id"] for u in (await _snapshot(clean_db))["users"]] == ["ann", "bob"]


async def test_a_message_deleted_before_it_was_created_is_backed_up_and_restored(
    grpc_port: int, clean_db: str, tmp_path: Path
) -> None:
    # Why Restore takes a deleted_at earlier than created_at (docs/design.md, "Restore"): a
    # backup streams its sessions before their messages, so a message added meanwhile is
    # newer than its session's updated_at; restored on a server whose clock is behind the
    # old one's, DeleteSession stamps it with that clock (just after the session's
    # updated_at), before the message's created_at. The next backup holds that row.
    address = f"127.0.0.1:{grpc_port}"
    earlier = datetime.now(UTC) - timedelta(hours=1)
    later = datetime.now(UTC) + timedelta(minutes=5)
    session = Session("s", None, {}, earlier, earlier, None, 0, earlier, next_sequence=1)
    newer = Message(
        "added after its session's row was backed up",
        uuid=str(uuid4()),
        sequence=1,
        created_at=later,
        updated_at=later,
    )
    async with AsyncMemstore(address) as client:
        await client.backup.restore([], [session], [ExportedMessage("s", newer)])
        await client.memory.delete("s")
    before = await _snapshot(clean_db)
    [message] = before["messages"]
    assert message["deleted_at"] < message["created_at"]
    backup = tmp_path / "b.jsonl"
    assert await _run("backup", "-o", str(backup), "--address", address, "--no-progress") == 0
    await _truncate(clean_db)
    assert await _run("restore", "-i", str(backup), "--address", address, "--no-progress") == 0
    assert await _snapshot(clean_db) == before


async def test_two_backups_and_exports_of_an_unchanged_project_are_byte_identical(
    grpc_port: int, clean_db: str, tmp_path: Path
) -> None:
    # Each run a process of its own: protobuf's maps (a Struct's fields) come out in an
    # order each process draws afresh, so metadata's keys came out in another order at each
    # run, and two backups of the same rows differed. Many keys, nested ones too, so that
    # two runs almost never draw the same order by chance.
    address = f"127.0.0.1:{grpc_port}"
    await _seed(address)
    many = {f"key{i}": i for i in range(12)} | {"nested": {c: 1 for c in "zyxwvutsr"}}
    async with AsyncMemstore(address) as client:
        await client.user.add("meta", metadata=many)
        await client.memory.add_session("s-meta", user_id="meta", metadata=many)
        await client.memory.add("s-meta", [Message(content="m", metadata=many)])
    argv = ("--address", address)
    for name in ("one", "two"):
        await _run_apart("backup", "-o", str(tmp_path / f"{name}.jsonl"), *argv)
        for kind in ("users", "sessions", "messages"):
            await _run_apart("export", kind, "-o", str(tmp_path / f"{name}-{kind}.jsonl"), *argv)
    # The header holds no time nor anything else that differs between runs: whole files, but
    # for the id of the snapshot each backup read in, which its checkpoints name.
    for suffix in ("", "-users", "-sessions", "-messages"):
        one, two = (
            _SNAPSHOT_ID.sub(b"<snapshot>", (tmp_path / f"{name}{suffix}.jsonl").read_bytes())
            for name in ("one", "two")
        )
        assert b'"key11"' in one, suffix  # the rows with many keys are in it
        assert one == two, suffix


async def test_a_backup_of_an_empty_project_is_refused_by_a_non_empty_one(
    grpc_port: int, clean_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It holds no row, so no Restore carried require_empty: "restored" into a project of
    # other data, which matched nothing of it, and the report said so without a word.
    address = f"127.0.0.1:{grpc_port}"
    backup = tmp_path / "empty.jsonl"
    argv = ("--address", address, "--no-progress")
    assert await _run("backup", "-o", str(backup), *argv) == 0
    assert await _run("restore", "-i", str(backup), *argv) == 0  # into an empty project
    async with AsyncMemstore(address) as client:
        await client.user.add("ann")
    capsys.readouterr()
    assert await _run("restore", "-i", str(backup), *argv) == 1
    err = capsys.readouterr().err
    assert "PROJECT_NOT_EMPTY" in err and '"restored"' not in err, err
    # --resume goes on into the rows a restore left: nothing is checked, nothing written.
    assert await _run("restore", "-i", str(backup), *argv, "--resume") == 0
    assert [u["user_id"] for u in (await _snapshot(clean_db))["users"]] == ["ann"]


@pytest.fixture
async def other_server(secure_port: int, secure_store: Store, clean_secure_db: str) -> OtherServer:
    """The security tests' server, over a database of its own, with keys of its projects
    `default` (the name of the run's server's project) and `b`."""
    keys = {name: await make_key(secure_store, name) for name in ("default", "b")}
    return f"127.0.0.1:{secure_port}", keys


async def test_resume_refuses_a_backup_of_another_project_or_database_and_leaves_it_whole(
    grpc_port: int,
    clean_db: str,
    other_server: OtherServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Cut where the next stream starts from its beginning, so no page token of the file
    # reaches the server (a token of another project or database is refused): the resume
    # wrote another project's sessions and messages after this one's users, no word said.
    address = f"127.0.0.1:{grpc_port}"
    await _seed(address)
    argv = ("--chunk-size", "2", "--no-progress")
    full = tmp_path / "full.jsonl"
    assert await _run("backup", "-o", str(full), "--address", address, *argv) == 0
    text = full.read_text(encoding="utf-8").splitlines(keepends=True)
    lines = [line.encode() for line in await _in_a_held_snapshot(address, text)]
    cut = next(i for i, line in enumerate(lines) if b'"users", "page_token": ""' in line)
    part = tmp_path / "part.jsonl"
    part.write_bytes(b"".join(lines[: cut + 1]))
    before = part.read_bytes()
    # Another database's project of the same name, and another project of it, holding a
    # session.
    secure, keys = other_server
    async with AsyncMemstore(secure, keys["b"]) as client:
        await client.memory.add_session("b-session")
    refused = {
        keys["default"]: "is a backup of project 'default' of another database than this server's",
        keys["b"]: "is a backup of project 'default', and this API key reaches 'b'",
    }
    for key, said in refused.items():
        resume = ("backup", "-o", str(part), "--resume", "--address", secure, "--api-key", key)
        assert await _run(*resume, *argv) == 1
        err = capsys.readouterr().err
        assert said in err and "nothing was changed" in err, err
        assert part.read_bytes() == before
    # A header naming no source (an older memstore's) cannot be checked: refused too.
    old = tmp_path / "old.jsonl"
    old.write_bytes(b'{"memstore_backup": 1}\n' + b"".join(lines[1 : cut + 1]))
    assert await _run("backup", "-o", str(old), "--resume", "--address", address, *argv) == 1
    assert "names no project and database" in capsys.readouterr().err
    # The server and project it was started with: it goes on, to the same file.
    assert await _run("backup", "-o", str(part), "--resume", "--address", address, *argv) == 0
    assert part.read_bytes() == b"".join(lines)
    header = json.loads(lines[0])
    assert header["project"] == "default" and len(header["source"]) == 32, header


async def test_a_backup_cut_before_its_first_checkpoint_holds_no_snapshot(
    grpc_port: int, clean_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An audit: no checkpoint named the snapshot, so the resume started from nothing in one
    # of its own, and this one stayed held (a connection, one of the project's 8) for the
    # whole --snapshot-hold.
    address = f"127.0.0.1:{grpc_port}"
    await _seed(address)
    write = backup_cli._write

    def cut_at_the_first_row(out: Any, row: dict[str, Any]) -> None:
        if row.get("kind") == "user":
            raise Unavailable("the connection was lost")
        write(out, row)

    monkeypatch.setattr(backup_cli, "_write", cut_at_the_first_row)
    part = tmp_path / "part.jsonl"
    argv = ("--address", address, "--no-progress")
    assert await _run("backup", "-o", str(part), *argv) != 0
    async with await psycopg.AsyncConnection.connect(clean_db, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name LIKE 'memstore-snapshot %' AND datname = current_database()"
        )
        assert await cur.fetchone() == (0,)
    monkeypatch.setattr(backup_cli, "_write", write)
    assert await _run("backup", "-o", str(part), *argv, "--resume") == 0


async def test_a_backup_taken_while_the_project_is_written_restores_whole(
    grpc_port: int, clean_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its three streams were read one after another: a user and session made meanwhile had
    # their session or messages in the file without their user or session, a user deleted
    # its sessions' users, and the restore stopped on the first such row (an audit,
    # 2026-12-03). Read in one snapshot, the file is the project at one moment.
    address = f"127.0.0.1:{grpc_port}"
    await _seed(address)
    backup = tmp_path / "live.jsonl"
    argv = ("--address", address, "--chunk-size", "1", "--no-progress")
    written = 0
    write = backup_cli._write

    def after_a_round_of_writes(out: Any, row: dict[str, Any]) -> None:
        # Each batch's checkpoint waits for the writer's next round: on a busy machine the
        # backup ended before the writes could race it (CI, 2026-12-03: 2 rounds).
        if row.get("kind") == "checkpoint":
            seen, deadline = written, time.monotonic() + 10
            while written == seen and time.monotonic() < deadline:
                time.sleep(0.005)
        write(out, row)

    monkeypatch.setattr(backup_cli, "_write", after_a_round_of_writes)
    backing_up = asyncio.ensure_future(_run("backup", "-o", str(backup), *argv))
    async with AsyncMemstore(address) as client:
        while not backing_up.done():
            await client.user.add(f"w{written}")
            await client.memory.add(
                f"w{written}-s", [Message(content="hi", role_type="user")], user_id=f"w{written}"
            )
            if written >= 2:
                await client.user.delete(f"w{written - 2}")
            written += 1
            await asyncio.sleep(0)
    assert await backing_up == 0
    assert written > 3, "the backup ended before the writes could race it"
    await _truncate(clean_db)
    assert await _run("restore", "-i", str(backup), "--address", address, "--no-progress") == 0
    rows = [json.loads(line) for line in backup.read_text(encoding="utf-8").splitlines()]
    users = {r["user_id"] for r in rows if r.get("kind") == "user"}
    sessions = {r["session_id"]: r["user_id"] for r in rows if r.get("kind") == "session"}
    assert {u for u in sessions.values() if u} <= users
    assert {r["session_id"] for r in rows if r.get("kind") == "message"} <= set(sessions)


async def test_a_resume_whose_snapshot_is_gone_starts_nothing_and_says_so(
    grpc_port: int, clean_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"127.0.0.1:{grpc_port}"
    await _seed(address)
    full = tmp_path / "full.jsonl"
    argv = ("--address", address, "--chunk-size", "2", "--no-progress")
    assert await _run("backup", "-o", str(full), *argv) == 0  # it closed its snapshot
    lines = full.read_text(encoding="utf-8").splitlines(keepends=True)
    cut = next(i for i, line in enumerate(lines) if '"stream": "sessions"' in line)
    part = tmp_path / "part.jsonl"
    part.write_text("".join(lines[: cut + 1]), encoding="utf-8")
    capsys.readouterr()
    assert await _run("backup", "-o", str(part), *argv, "--resume") == 1
    err = capsys.readouterr().err
    assert "is no longer held" in err and f"remove {part} and back up again" in err, err
    assert part.read_text(encoding="utf-8") == "".join(lines[: cut + 1])
