"""`memstore --help` and the client-side commands load no server: its import took 2.3 s (gRPC
services, psycopg, the REST app, numpy) before anything happened, and they use none of it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.fix_db import ROOT

#: Modules of the server proper: the store (psycopg), the gRPC services, the REST app, search.
SERVER_MODULES = (
    "psycopg",
    "psycopg_pool",
    "server.store",
    "server.api",
    "server.rest",
    "server.search",
    "server.serving.app",
    "server.serving.observability",
    "numpy",
    "uvicorn",
)


def _loaded_after(argv: list[str], prelude: str = "") -> list[str]:
    """The server modules loaded in a fresh process by `main(argv)`."""
    code = (
        "import json, sys\n"
        f"{prelude}"
        "from server.__main__ import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"names = {SERVER_MODULES!r}\n"
        "loaded = [m for m in sys.modules if any(m == n or m.startswith(n + '.') for n in names)]\n"
        "print(json.dumps(sorted(loaded)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return list(json.loads(out.splitlines()[-1]))


@pytest.mark.parametrize("argv", [["--help"], ["keys", "--help"], ["serve", "--help"]])
def test_help_loads_no_server(argv: list[str]) -> None:
    assert _loaded_after(argv) == []


@pytest.mark.parametrize("command", ["export", "import", "backup", "restore"])
def test_the_client_side_commands_load_no_server(command: str) -> None:
    # The command itself is replaced: what is checked is what `memstore` loaded to reach it.
    prelude = "from memstore_client import cli\ncli.main = lambda args: 0\n"
    argv = {
        "export": ["export", "users"],
        "import": ["import", "users"],
        "backup": ["backup", "-o", "b.jsonl"],
        "restore": ["restore", "-i", "b.jsonl"],
    }[command]
    assert _loaded_after(argv, prelude) == []


def test_a_server_command_loads_the_server_it_runs() -> None:
    # The other side: the check above sees modules when they are loaded.
    prelude = "import asyncio\nasyncio.run = lambda work: None\n"
    assert "server.serving.app" in _loaded_after(["serve"], prelude)
