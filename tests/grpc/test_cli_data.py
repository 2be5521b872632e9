"""`memstore export` / `memstore import` through the API: JSON Lines out, a faithful copy back."""

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
    # The server runs on this event loop; the CLI's blocking client must not.
    return await asyncio.to_thread(main, list(argv))


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _comparable(kind: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # What an import can carry over: ids, fields, metadata and message uuids (not timestamps).
    drop = {"created_at", "updated_at", "last_message_at", "deleted_at"}
    out = [{k: v for k, v in row.items() if k not in drop} for row in rows]
    key = "user_id" if kind == "users" else "session_id"
    return sorted(out, key=lambda r: (r[key], r.get("sequence", 0)))


async def _seed(client: AsyncMemstore) -> None:
    await client.user.add("alice", email="a@example.com", metadata={"plan": "pro", "n": 1})
    await client.user.add("bob", first_name="Bob")
    await client.memory.add_session("s-alice", user_id="alice", metadata={"topic": "food"})
    await client.memory.add(
        "s-alice",
        [Message(content=f"m{i}", role="Alice", role_type="user") for i in range(5)],
    )
    await client.memory.add("s-free", [Message(content="é ünïcode", metadata={"k": [1, 2]})])


async def test_export_then_import_round_trips(
    grpc_port: int, clean_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"127.0.0.1:{grpc_port}"
    async with AsyncMemstore(address) as client:
        await _seed(client)
    for kind in KINDS:
        out = tmp_path / f"{kind}.jsonl"
        assert (
            await _run("export", kind, "--address", address, "-o", str(out), "--chunk-size", "2")
            == 0
        )
    exported = {kind: _lines(tmp_path / f"{kind}.jsonl") for kind in KINDS}
    assert [u["user_id"] for u in exported["users"]] == ["alice", "bob"]
    assert exported["users"][0]["metadata"] == {"plan": "pro", "n": 1}
    assert [(m["session_id"], m["sequence"]) for m in exported["messages"]][:2] == [
        ("s-alice", 1),
        ("s-alice", 2),
    ]
    err = capsys.readouterr().err
    assert '{"exported": 6, "kind": "messages"}' in err
    assert "exporting messages" in err  # the progress bar, on stderr

    async with await psycopg.AsyncConnection.connect(clean_db, autocommit=True) as conn:
        await conn.execute("TRUNCATE messages, sessions, users CASCADE")
    for kind in KINDS:
        assert (
            await _run("import", kind, "--address", address, "-i", str(tmp_path / f"{kind}.jsonl"))
            == 0
        )
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert reports == [
        {"kind": "users", "created": 2, "existing": 0, "differs": 0, "failed": 0},
        {"kind": "sessions", "created": 2, "existing": 0, "differs": 0, "failed": 0},
        {"kind": "messages", "created": 6, "existing": 0, "differs": 0, "failed": 0},
    ]
    for kind in KINDS:
        again = tmp_path / f"again-{kind}.jsonl"
        assert await _run("export", kind, "--address", address, "-o", str(again)) == 0
        assert _comparable(kind, _lines(again)) == _comparable(kind, exported[kind])


async def test_import_reports_bad_lines_and_existing_rows(
    grpc_port: int, clean_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"127.0.0.1:{grpc_port}"
    async with AsyncMemstore(address) as client:
        await client.user.add("alice")
    source = tmp_path / "users.jsonl"
    source.write_text('{"user_id": "alice"}\n{"user_id": "carol"}\nnot json\n{"user_id": ""}\n')
    assert await _run("import", "users", "--address", address, "-i", str(source)) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {
        "kind": "users",
        "created": 1,
        "existing": 1,
        "differs": 0,
        "failed": 2,
    }
    assert "line 3" in captured.err and "line 4" in captured.err and "user_id" in captured.err


async def test_export_resumes_from_a_page_token(
    grpc_port: int, clean_db: str, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{grpc_port}"
    async with AsyncMemstore(address) as client:
        await client.memory.add("s", [Message(content=f"m{i}") for i in range(5)])
        chunks = [c async for c in client.memory.export_messages(chunk_size=2)]
    out = tmp_path / "rest.jsonl"
    token = chunks[0][1]
    assert (
        await _run(
            "export", "messages", "--address", address, "-o", str(out), "--page-token", token
        )
        == 0
    )
    assert [m["content"] for m in _lines(out)] == ["m2", "m3", "m4"]


async def test_export_fails_cleanly_when_the_server_is_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = await _run("export", "users", "--address", f"127.0.0.1:{port}", "--no-progress")
    assert code == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["export", "import", "backup", "restore"])
@pytest.mark.parametrize("flag", ["--ca-file", "--cert-file", "--key-file"])
async def test_an_unreadable_tls_file_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, flag: str
) -> None:
    # It was read before the command's error handling: a FileNotFoundError traceback.
    missing = tmp_path / "missing.pem"
    argv = {"export": ["users"], "import": ["users"], "backup": ["-o", str(tmp_path / "b")]}
    argv["restore"] = ["-i", str(tmp_path / "b")]
    assert await _run(command, *argv[command], flag, str(missing), "--no-progress") == 1
    err = capsys.readouterr().err
    assert err == f"memstore {command}: [Errno 2] No such file or directory: '{missing}'\n"


@pytest.mark.parametrize("command", ["export", "import", "backup", "restore"])
async def test_an_api_key_with_a_control_character_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    # gRPC refused the header at the first call: INTERNAL "Invalid metadata", after a C
    # log line with its source location on stderr.
    argv = {"export": ["users"], "import": ["users"], "backup": ["-o", str(tmp_path / "b")]}
    argv["restore"] = ["-i", str(tmp_path / "b")]
    (tmp_path / "b").write_text("")
    code = await _run(command, *argv[command], "--api-key", "ms_\x01", "--no-progress")
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"memstore {command}: INVALID_ARGUMENT: api_key: "), err
    assert "INTERNAL" not in err and err.count("\n") == 1, err


@pytest.mark.parametrize("address", ["localhost:99999", "127.0.0.1:65536", "[::1]:-1"])
async def test_an_address_whose_port_is_out_of_range_is_refused(
    capsys: pytest.CaptureFixture[str], address: str
) -> None:
    # gRPC read port 99999 modulo 65536: the export went to port 34463, someone else's.
    with pytest.raises(SystemExit) as done:
        await _run("export", "users", "--address", address)
    assert done.value.code == 2
    port = address.rsplit(":", 1)[1]
    assert f"argument --address: port {port} is not 0 to 65535" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["users", "sessions", "messages"])
async def test_import_stops_at_the_first_row_when_the_server_is_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    # Every row would fail the same way: one line per row of a big file told nothing more.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rows = {
        "users": [{"user_id": f"u{i}"} for i in range(50)],
        "sessions": [{"session_id": f"s{i}"} for i in range(50)],
        "messages": [{"session_id": f"s{i}", "content": "x"} for i in range(50)],
    }[kind]
    source = tmp_path / f"{kind}.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ("--address", f"127.0.0.1:{port}", "-i", str(source), "--no-progress")
    assert await _run("import", kind, *argv) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "import stopped at line" in err[0] and "UNAVAILABLE" in err[1]
