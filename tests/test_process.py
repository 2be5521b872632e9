"""The `memstore` command as an operator runs it: a real process, signals, reflection, CLI."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

from memstore.v1 import (
    user_service_pb2,
    user_service_pb2_grpc,
)
from tests.fix_db import lock_waiters, scratch_database
from tests.processes import MEMSTORE, ROOT, run_memstore, serve_memstore, stop_memstore

BUF = shutil.which("buf", path=str(Path(sys.executable).parent)) or "buf"


@pytest.fixture
def served(clean_db: str) -> Iterator[int]:
    """A `memstore serve` subprocess on the test database; yields its port."""
    env = {**os.environ, "DATABASE_URL": clean_db}
    proc, port = serve_memstore("--purge-interval", "0", "--grace-period", "5", env=env)
    yield port
    if proc.poll() is None:
        stop_memstore(proc)


def test_serves_over_the_wire_and_exits_zero_on_sigterm(clean_db: str) -> None:
    env = {**os.environ, "DATABASE_URL": clean_db}
    proc, port = serve_memstore("--purge-interval", "0", env=env)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        users = user_service_pb2_grpc.UserServiceStub(channel)
        users.CreateUser(user_service_pb2.CreateUserRequest(user_id="proc-user"), timeout=10)
        got = users.GetUser(user_service_pb2.GetUserRequest(user_id="proc-user"), timeout=10)
        assert got.user.user_id == "proc-user"
    code, out = stop_memstore(proc)
    assert code == 0, out


def test_reflection_lets_buf_curl_call_without_protos(served: int) -> None:
    base = f"http://127.0.0.1:{served}"
    listed = subprocess.run(
        [BUF, "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--list-services", base],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    services = listed.stdout.split()
    assert "memstore.v1.UserService" in services
    assert "memstore.v1.SessionService" in services
    created = subprocess.run(
        [
            BUF,
            "curl",
            "--protocol",
            "grpc",
            "--http2-prior-knowledge",
            "-d",
            json.dumps({"user_id": "via-buf", "metadata": {"plan": "pro"}}),
            f"{base}/memstore.v1.UserService/CreateUser",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    user = json.loads(created.stdout)["user"]
    assert user["userId"] == "via-buf"
    assert user["metadata"] == {"plan": "pro"}


def test_one_shot_commands_change_no_schema_and_say_to_migrate(server_url: str) -> None:
    # purge, reindex, projects and keys migrated first, silently: one run from a cron job by
    # a newer memstore migrated the database under the older servers still serving it (an
    # audit). They now check, change nothing, and say what to run.
    with scratch_database(server_url, "memstore_unmigrated") as url:
        env = {**os.environ, "DATABASE_URL": url}
        for argv in (["purge"], ["recount"], ["reindex"], ["projects", "list"], ["keys", "list"]):
            run = run_memstore(*argv, env=env)
            assert run.returncode == 1, (argv, run.stdout, run.stderr)
            assert "run `memstore migrate`" in run.stderr and "0001_init" in run.stderr, run.stderr
            assert "Traceback" not in run.stderr
        with psycopg.connect(url) as conn:
            tables = conn.execute(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
            ).fetchone()
            assert tables == (0,)
        assert run_memstore("migrate", env=env).returncode == 0
        assert run_memstore("projects", "list", env=env).returncode == 0


def test_migrate_and_purge_commands_report(clean_db: str) -> None:
    with psycopg.connect(clean_db, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO sessions (project_id, session_id, deleted_at) VALUES"
            " (1, 'expired', now() - interval '8 days'), (1, 'recent', now()), (1, 'live', NULL)"
        )
        conn.execute(
            "INSERT INTO messages (project_id, session_id, sequence, content) VALUES"
            " (1, 'expired', 1, 'a'), (1, 'expired', 2, 'b'), (1, 'recent', 1, 'c'),"
            " (1, 'live', 1, 'd')"
        )
    env = {**os.environ, "DATABASE_URL": clean_db}
    migrate = run_memstore("migrate", env=env)
    assert migrate.returncode == 0, migrate.stderr
    purge = run_memstore("purge", "--purge-retention-days", "7", env=env)
    assert purge.returncode == 0, purge.stderr
    report = json.loads(purge.stdout.strip().splitlines()[-1])
    # Only the session soft-deleted past the retention goes, with its messages.
    assert report["sessions"] == 1
    assert report["messages"] == 2
    with psycopg.connect(clean_db) as conn:
        left = conn.execute("SELECT session_id FROM sessions ORDER BY session_id").fetchall()
        assert [r[0] for r in left] == ["live", "recent"]
        count = conn.execute("SELECT count(*) FROM messages").fetchone()
        assert count is not None and count[0] == 2


def test_without_database_url_serves_from_embedded_postgres(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    data_dir = tmp_path / "data"
    proc, port = serve_memstore("--data-dir", str(data_dir), "--purge-interval", "0", env=env)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            users = user_service_pb2_grpc.UserServiceStub(channel)
            users.CreateUser(user_service_pb2.CreateUserRequest(user_id="kept"), timeout=10)
    finally:
        code, out = stop_memstore(proc)
    assert code == 0, out
    assert (data_dir / "pg" / "PG_VERSION").exists()
    # The data folder survives a restart: the user is still there.
    proc, port = serve_memstore("--data-dir", str(data_dir), "--purge-interval", "0", env=env)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            users = user_service_pb2_grpc.UserServiceStub(channel)
            got = users.GetUser(user_service_pb2.GetUserRequest(user_id="kept"), timeout=10)
            assert got.user.user_id == "kept"
    finally:
        code, out = stop_memstore(proc)
    assert code == 0, out


def test_unreachable_database_fails_start_with_one_clear_line() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"postgresql://nobody@127.0.0.1:{closed.getsockname()[1]}/none"
    run = run_memstore("serve", "--port", "0", "--database-url", dead, "--pool-timeout", "1")
    assert run.returncode == 1
    assert "serve failed: database unavailable" in run.stderr
    assert "Traceback" not in run.stderr


def test_taken_port_fails_start_instead_of_sharing_it(served: int, clean_db: str) -> None:
    env = {**os.environ, "DATABASE_URL": clean_db}
    run = run_memstore("serve", "--host", "127.0.0.1", "--port", str(served), env=env)
    assert run.returncode == 1
    assert "serve failed" in run.stderr
    assert "Traceback" not in run.stderr


def _until_a_lock_waiter(url: str, within: float = 20.0) -> bool:
    """Polls until a backend of the database waits for a lock; False at the deadline.

    On a Citus cluster the call waits on a worker (tests/fix_db.lock_waiters counts them).
    """
    deadline = time.monotonic() + within
    while True:
        if asyncio.run(lock_waiters(url)):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def test_sigterm_lets_an_in_flight_call_finish(clean_db: str) -> None:
    env = {**os.environ, "DATABASE_URL": clean_db}
    proc, port = serve_memstore("--purge-interval", "0", "--grace-period", "10", env=env)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        users = user_service_pb2_grpc.UserServiceStub(channel)
        users.CreateUser(user_service_pb2.CreateUserRequest(user_id="busy"), timeout=10)
        with psycopg.connect(clean_db) as blocker:
            # Hold the row lock so the UpdateUser below is in flight when SIGTERM arrives.
            blocker.execute("SELECT 1 FROM users WHERE user_id = 'busy' FOR UPDATE")
            request = user_service_pb2.UpdateUserRequest(user_id="busy", email="b@example.com")
            pending = users.UpdateUser.future(request, timeout=20)
            assert _until_a_lock_waiter(clean_db), "the UpdateUser never reached the database"
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert proc.poll() is None, "the server must wait for the in-flight call"
            blocker.rollback()
        assert pending.result().user.email == "b@example.com"
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    with psycopg.connect(clean_db) as conn:
        row = conn.execute("SELECT email FROM users WHERE user_id = 'busy'").fetchone()
        assert row == ("b@example.com",)


def _readme_grpcurl_script(port: int) -> str:
    """The README's grpcurl code blocks, in order, aimed at `port`."""
    text = (ROOT / "README.md").read_text()
    blocks = [block.split("```", 1)[0] for block in text.split("```sh\n")[1:]]
    script = "\n".join(block for block in blocks if block.lstrip().startswith("grpcurl "))
    return script.replace("localhost:50051", f"127.0.0.1:{port}")


def test_readme_grpcurl_examples_run(served: int) -> None:
    script = _readme_grpcurl_script(served)
    assert script.count("grpcurl ") >= 19, script
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    run = subprocess.run(
        ["bash", "-e", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    out = run.stdout
    assert "memstore.v1.SessionService" in out  # list
    assert "AddMemory is a method" in out  # describe of a method symbol
    assert '"status": "SERVING"' in out
    # The search examples find Maya's message by its words, and recall brings it to maya-2.
    assert out.count("named him Biscuit") >= 2
    # Both print "semantic" (-emit-defaults), the full-text one's false: grpcurl leaves out a
    # field at its default, and README's words about "semantic" matched nothing printed.
    assert out.count('"semantic": ') == 2 and '"semantic": false' in out, out
    assert '"content": "Hi, I am vegetarian."' in out
    # The last example is the privacy delete of everything the others created.
    assert '"deleted_sessions": "1"' in out
    assert '"deleted_messages": "2"' in out


def test_readme_buf_curl_examples_run(served: int) -> None:
    # The block makes alice and s1 itself (the grpcurl lines before it end by deleting them;
    # followed in order, its GetMemory printed {}), and deletes alice at its end, so the
    # Python example after it can create her.
    text = (ROOT / "README.md").read_text()
    blocks = [block.split("```", 1)[0] for block in text.split("```sh\n")[1:]]
    script = next(block for block in blocks if block.startswith(".venv/bin/buf curl"))
    script = script.replace(".venv/bin/buf", BUF).replace("localhost:50051", f"127.0.0.1:{served}")
    assert script.count(" curl ") == 7, script
    run = subprocess.run(
        ["bash", "-e", "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert '"userId": "alice"' in run.stdout  # GetUser
    # AddMemory, GetMemory and ExportMessages print it.
    assert run.stdout.count('"content": "Hi, I am vegetarian."') == 3
    assert '"status": "SERVING"' in run.stdout  # health
    with grpc.insecure_channel(f"127.0.0.1:{served}") as channel:
        users = user_service_pb2_grpc.UserServiceStub(channel)
        with pytest.raises(grpc.RpcError) as gone:
            users.GetUser(user_service_pb2.GetUserRequest(user_id="alice"), timeout=10)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND  # the Python example may add her


def test_a_role_that_may_not_create_tables_fails_migrate_with_one_clear_line() -> None:
    # A role without CREATE on the schema (PostgreSQL 15+ grants none on public but to its
    # owner): migrate printed a full traceback and "internal database error; see the log".
    # On the tests' embedded PostgreSQL whatever DATABASE_URL says: making a role needs a
    # superuser, which CI's role on PostgreSQL 15 is not.
    from server.serving.embedded import EmbeddedPostgres

    superuser = EmbeddedPostgres(ROOT / ".data" / "test-pg").url("postgres")
    role = f"memstore_noperm_{os.getpid()}"
    database = f"memstore_noperm_{os.getpid()}"
    admin = psycopg.conninfo.conninfo_to_dict(superuser)
    with psycopg.connect(superuser, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"CREATE DATABASE {database}")
    try:
        url = psycopg.conninfo.make_conninfo(
            psycopg.conninfo.make_conninfo("", **{**admin, "dbname": database}), user=role
        )
        run = run_memstore("migrate", "--database-url", url, "--pool-timeout", "5")
        assert run.returncode == 1, run.stderr
        assert "lacks a privilege memstore needs: permission denied" in run.stderr
        assert "Traceback" not in run.stderr
    finally:
        with psycopg.connect(superuser, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
            conn.execute(f"DROP ROLE IF EXISTS {role}")


def test_an_embedded_postgresql_that_cannot_start_fails_with_one_clear_line(
    tmp_path: Path,
) -> None:
    # A data directory pg_ctl cannot start (another version's, a damaged one): a 70-line
    # CalledProcessError traceback, PostgreSQL's reason buried in the wheel's log dump.
    data = tmp_path / "pg"
    data.mkdir()
    (data / "PG_VERSION").write_text("15\n")  # inited, to the wheel; not to PostgreSQL
    for path in (tmp_path, data, data / "PG_VERSION"):
        path.chmod(0o777)  # the server runs as a user of its own under root
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    run = run_memstore("migrate", "--data-dir", str(tmp_path), env=env)
    assert run.returncode == 1, run.stderr
    assert f"the embedded PostgreSQL under {data} did not start (pg_ctl failed): " in run.stderr
    assert "Traceback" not in run.stderr


def test_a_sigterm_as_the_server_starts_stops_it_gracefully(clean_db: str) -> None:
    # The signals were caught only once the server waited to be stopped: a SIGTERM right
    # after its "listening" line (before that wait) killed it at once, in half the runs of
    # an audit, leaving the embedded PostgreSQL running. Three runs: each could be that one.
    env = {**os.environ, "DATABASE_URL": clean_db}
    args = ("--host", "127.0.0.1", "--port", "0", "--no-http", "--drain-delay", "0")
    for _ in range(3):
        proc = subprocess.Popen(
            [*MEMSTORE, "serve", *args, "--purge-interval", "0"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "memstore listening" in line:
                proc.send_signal(signal.SIGTERM)
                break
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, "".join(seen) + out
        assert "memstore stopped" in out, out


@pytest.mark.parametrize(("workers", "sig"), [(1, signal.SIGINT), (2, signal.SIGTERM)])
def test_a_ctrl_c_while_the_database_does_not_answer_stops_the_start_at_once(
    workers: int, sig: signal.Signals
) -> None:
    # A database that accepts the connection and never answers (a stuck server, a firewall
    # that swallows packets): a Ctrl-C waited for the pool's whole timeout (60 s here), and
    # once hung for good. Now the start stops within seconds, as a stop asked for: status 0,
    # with --workers too (here while the parent migrates for the workers: the database it
    # waits for never answers, so no worker is forked).
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(16)
        url = f"postgresql://nobody@127.0.0.1:{blackhole.getsockname()[1]}/none"
        args = ("--port", "0", "--no-http", "--workers", str(workers), "--database-url", url)
        proc = subprocess.Popen(
            [*MEMSTORE, "serve", *args],
            cwd=ROOT,
            env={**os.environ, "MEMSTORE_POOL_TIMEOUT": "60"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            blackhole.settimeout(60)
            held, _ = blackhole.accept()  # the pool is connecting now
            with held:
                time.sleep(1)  # every worker has begun its start
                proc.send_signal(sig)
                out, _ = proc.communicate(timeout=15)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "stopped before it served" in out and "Traceback" not in out, out


def test_a_ctrl_c_while_a_migration_waits_stops_the_start_at_once(clean_db: str) -> None:
    # Another migrator holds the migrations' lock (a replica starting, `memstore migrate`):
    # the start waits for it, and a Ctrl-C then stops it as a stop asked for.
    with psycopg.connect(clean_db, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(7283946501)")  # lock_migrations' key
        proc = subprocess.Popen(
            [*MEMSTORE, "serve", "--port", "0", "--no-http", "--database-url", clean_db],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert _until_a_lock_waiter(clean_db, within=60), "the start never waited"
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=15)  # the lock is still held: else a hang
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "stopped before it served" in out and "Traceback" not in out, out
