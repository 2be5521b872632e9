"""The key commands and the start-up rules as an operator meets them: real processes."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import httpx
import pytest

from memstore.v1 import user_service_pb2 as us
from memstore.v1 import user_service_pb2_grpc
from server.__main__ import main
from server.api_keys import new_key
from server.store import Store
from tests.fix_db import scratch_database
from tests.processes import ROOT, free_port, run_memstore, serve_memstore, stop_memstore

KEY_RE = re.compile(r"^msk_[0-9a-f]{12}_[A-Za-z0-9_-]{43}$")


def _ok(*args: str, env: dict[str, str]) -> str:
    run = run_memstore(*args, env=env)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_projects_and_keys_commands(secure_db_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": secure_db_url}
    _ok("migrate", env=env)
    _ok("projects", "create", "cli-proj", env=env)
    again = run_memstore("projects", "create", "cli-proj", env=env)
    assert again.returncode == 1 and "already exists" in again.stderr
    assert "Traceback" not in again.stderr
    key = _ok("keys", "create", "--project", "cli-proj", "--label", "ci", env=env).strip()
    # The key is the whole of stdout (so `KEY=$(memstore keys create ...)` works), once.
    assert KEY_RE.match(key), key
    prefix = key[:16]
    # Times are said in UTC whatever the database session's zone (14 hours from UTC here).
    listed = _ok("keys", "list", "--project", "cli-proj", env={**env, "PGTZ": "Etc/GMT-14"})
    assert prefix in listed and "active" in listed and key not in listed
    created = re.search(r"created (\S+ \S+) UTC", listed)
    assert created, listed
    made = datetime.strptime(created[1], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    assert abs(made - datetime.now(UTC)) < timedelta(minutes=5), listed
    assert "cli-proj\t1 live key\t" in _ok("projects", "list", env=env)
    refused = run_memstore("projects", "create", "'; DROP TABLE projects; --", env=env)
    assert refused.returncode == 1 and "name: 1-63 letters" in refused.stderr
    missing = run_memstore("keys", "create", "--project", "no-such", env=env)
    assert missing.returncode == 1 and "project 'no-such' not found" in missing.stderr
    # Revoking by the whole key, as whoever found it leaked would (the prefix works too).
    assert "revoked" in _ok("keys", "revoke", key, env=env)
    everything = _ok("keys", "list", env=env)
    assert f"{prefix}\tcli-proj\trevoked" in everything and key[17:] not in everything
    unknown = run_memstore("keys", "revoke", "msk_000000000000", env=env)
    assert unknown.returncode == 1 and "no API key" in unknown.stderr


def test_key_commands_refuse_bad_names_and_labels(
    secure_db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # In-process (the same main() the console script runs), to keep the checks cheap.
    url = f"--database-url={secure_db_url}"
    # "acme\n": Python's $ matches before a final newline, and a look-alike of acme was made.
    for bad in ("x" * 64, "a b", ".hidden", "naïve", "acme\n"):
        caplog.clear()
        assert main(["projects", "create", bad, url]) == 1, bad
        assert "projects failed: name: 1-63 letters" in caplog.text
    assert main(["keys", "create", "--project=a", "--label=a\nb", url]) == 1
    assert "keys failed: label: at most 256 printable characters" in caplog.text


async def test_keys_revoke_takes_any_unambiguous_start_of_the_prefix(
    secure_store: Store,
    secure_db_url: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Two keys of project `a` whose prefixes share `msk_5ca1ab1` and differ in the next digit.
    for prefix in ("msk_5ca1ab1e0001", "msk_5ca1ab1f0002"):
        await secure_store.create_api_key("a", replace(new_key(), prefix=prefix), "short")

    async def revoke(text: str) -> tuple[int, str, str]:
        caplog.clear()
        capsys.readouterr()
        # In-process (as the console script), on a thread: main() runs its own event loop.
        code = await asyncio.to_thread(
            main, ["keys", "revoke", text, f"--database-url={secure_db_url}"]
        )
        return code, capsys.readouterr().out, caplog.text

    async def revoked() -> dict[str, bool]:
        # These two keys' state (project `a` holds other tests' keys too).
        keys = await secure_store.list_api_keys("a")
        return {k.prefix: k.revoked_at is not None for k in keys if k.label == "short"}

    code, _, log = await revoke("msk_5ca1ab1")
    assert code == 1 and "keys failed: prefix: 'msk_5ca1ab1' matches 2 API keys" in log, log
    code, _, log = await revoke("msk_5ca")  # 3 digits: under the minimum, whatever it matches
    assert code == 1 and "keys failed: prefix: msk_ and 4 to 12 hex digits" in log, log
    code, _, log = await revoke("msk_5CA1AB1E")
    assert code == 1 and "keys failed: prefix: msk_ and 4 to 12 hex digits" in log, log
    code, _, log = await revoke("msk_0000feed")
    assert code == 1 and "keys failed: no API key's prefix starts with 'msk_0000feed'" in log, log
    assert await revoked() == {"msk_5ca1ab1e0001": False, "msk_5ca1ab1f0002": False}
    code, out, _ = await revoke("msk_5ca1ab1e")  # as short as `msk_9747d035`
    assert code == 0 and out.startswith("revoked msk_5ca1ab1e0001\ta\trevoked "), out
    assert await revoked() == {"msk_5ca1ab1e0001": True, "msk_5ca1ab1f0002": False}
    # A revoked key still counts: `msk_5ca1` stays ambiguous rather than naming whichever
    # key is still active.
    code, _, log = await revoke("msk_5ca1")
    assert code == 1 and "matches 2 API keys" in log, log
    code, out, _ = await revoke("msk_5ca1ab1f")
    assert code == 0 and out.startswith("revoked msk_5ca1ab1f0002\ta\trevoked "), out


def test_served_keys_and_revocation_over_the_wire(secure_db_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": secure_db_url}
    _ok("projects", "create", "cli-serve", env=env)
    key = _ok("keys", "create", "--project", "cli-serve", env=env).strip()
    proc, port = serve_memstore("--purge-interval", "0", "--key-cache-seconds", "0.2", env=env)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            users = user_service_pb2_grpc.UserServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                users.ListUsers(us.ListUsersRequest(), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            md = (("authorization", f"Bearer {key}"),)
            users.ListUsers(us.ListUsersRequest(), metadata=md, timeout=10)
            _ok("keys", "revoke", key[:16], env=env)  # by prefix
            time.sleep(0.6)
            with pytest.raises(grpc.RpcError) as caught:
                users.ListUsers(us.ListUsersRequest(), metadata=md, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        code, out = stop_memstore(proc)
    assert code == 0, out


def test_revoking_every_key_locks_callers_out(server_url: str) -> None:
    # A database whose one key ever made is revoked: no live key, yet authentication is on.
    with scratch_database(server_url, "memstore_revoked") as url:
        env = {**os.environ, "DATABASE_URL": url}
        _ok("migrate", env=env)
        _ok("projects", "create", "only", env=env)
        key = _ok("keys", "create", "--project", "only", env=env).strip()
        _ok("keys", "revoke", key, env=env)
        http_port = free_port()
        args = ("--purge-interval", "0", "--no-embedding-worker", "--http-port", str(http_port))
        proc, port = serve_memstore(*args, env=env)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                users = user_service_pb2_grpc.UserServiceStub(channel)
                for md in ((), (("authorization", f"Bearer {key}"),)):
                    with pytest.raises(grpc.RpcError) as caught:
                        users.ListUsers(us.ListUsersRequest(), metadata=md, timeout=10)
                    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, md
            rest = f"http://127.0.0.1:{http_port}/api/v2/sessions-ordered"
            for headers in ({}, {"Authorization": f"Api-Key {key}"}):
                assert httpx.get(rest, headers=headers, timeout=10).status_code == 401, headers
        finally:
            code, out = stop_memstore(proc)
        assert code == 0, out


@pytest.mark.parametrize("workers", ["1", "2"])
def test_open_non_loopback_bind_fails_start_with_one_line(clean_db: str, workers: str) -> None:
    # The run's shared database holds no key: authentication would be off.
    env = {**os.environ, "DATABASE_URL": clean_db}
    run = run_memstore("serve", "--host", "0.0.0.0", "--port", "0", "--workers", workers, env=env)
    assert run.returncode == 1
    assert run.stderr.count("refusing") == 1, run.stderr  # the parent says it, once
    assert "serve failed: refusing to serve 0.0.0.0 without authentication" in run.stderr
    assert "--insecure" in run.stderr
    assert "Traceback" not in run.stderr


def _readme_auth_script(port: int) -> str:
    """The README's key walkthrough, aimed at `port` and this virtualenv's memstore."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Authentication and TLS", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    bin_dir = Path(sys.executable).parent
    return block.replace(".venv/bin/", f"{bin_dir}/").replace(
        "localhost:50051", f"127.0.0.1:{port}"
    )


async def test_readme_key_walkthrough_runs(secure_port: int, secure_db_url: str) -> None:
    script = _readme_auth_script(secure_port)
    assert script.count("grpcurl ") >= 2 and "keys create" in script, script
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "DATABASE_URL": secure_db_url,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    # The server runs on this test's event loop, so the script must not block it.
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-e",
        "-c",
        script,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, out.decode()[-2000:] + err.decode()[-2000:]
    text = out.decode()
    assert '"user_id": "alice"' in text
    assert "Code: Unauthenticated" in err.decode()  # the call without a key
