"""The bench's own PostgreSQL database, its data (loaded by COPY), and memstore servers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg import conninfo as pg_conninfo
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
BENCH_DB = "memstore_bench"
#: created_at of the first loaded user; each next one is a millisecond later.
EPOCH = datetime(2024, 1, 1, tzinfo=UTC)


def server_url(database_url: str | None, data_dir: Path) -> str:
    """A maintenance URL: DATABASE_URL's server, or the bench's embedded one (kept running)."""
    if database_url:
        return database_url
    from server.serving.embedded import EmbeddedPostgres

    return EmbeddedPostgres(data_dir / "bench-pg").url("postgres")


def server_version(url: str) -> str:
    """PostgreSQL's version string, short form (e.g. "18.1")."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]).split()[0] if row else "unknown"


def own_name(base: str) -> str:
    """`base` suffixed with this process's id: a scratch database of this run alone, so two
    runs sharing a PostgreSQL (CI and a developer, two worktrees) never drop or load each
    other's (dropped WITH (FORCE), a database of the same name under a running bench ended
    it with "terminating connection due to administrator command")."""
    return f"{base}_{os.getpid()}"


def fresh_database(url: str, name: str = BENCH_DB) -> str:
    """Drops and creates the bench database on the server of `url`; returns its URL."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return pg_conninfo.make_conninfo(url, dbname=name)


def drop_database(url: str, name: str = BENCH_DB) -> None:
    """Drops the bench database (the smoke test cleans up after itself)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@contextmanager
def migrated_database(
    name: str, database_url: str | None = None, data_dir: Path = ROOT / ".data"
) -> Iterator[str]:
    """A fresh database `name` with memstore's schema, on `database_url`'s server (else the
    bench's embedded one, as server_url): its URL, until it is dropped on leaving."""
    server = server_url(database_url, data_dir)
    url = fresh_database(server, name)
    try:
        migrate(url)
        yield url
    finally:
        drop_database(server, name)


def migrate(url: str, root: Path = ROOT) -> None:
    """Applies memstore's migrations with its own command (the migrations of checkout `root`)."""
    run = subprocess.run(
        [sys.executable, "-m", "server", "migrate", "--database-url", url],
        cwd=root,
        env=code_env(root),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if run.returncode != 0:
        raise RuntimeError(f"memstore migrate failed: {run.stderr}")


def file_at(rev: str, path: str) -> str:
    """The text of `path` (from the checkout's root) at git revision `rev`."""
    return subprocess.run(
        ["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout


def _user_lines(count: int) -> Iterator[str]:
    base = EPOCH
    for i in range(count):
        ts = (base + timedelta(milliseconds=i)).isoformat()
        yield (
            f"1\tuser-{i:07d}\tuser{i}@example.com\tFirst{i % 997}\tLast{i % 991}\t"
            f'{{"plan": "{("free", "pro", "team")[i % 3]}", "seq": {i}}}\t{ts}\t{ts}\n'
        )


#: A message's content: about 200 bytes of chat, as in the AddMemory bench.
_CONTENT = "The user said they prefer vegetarian food and live near the sea. " * 3


def _message_lines(count: int, sessions: int) -> Iterator[str]:
    # Message j goes to session j mod `sessions`, as that session's next sequence number.
    for j in range(count):
        role, kind = ("Alice", "user") if j % 2 == 0 else ("Bot", "assistant")
        sequence = j // sessions + 1
        content, metadata = f"{_CONTENT}#{j}", f'{{"turn": {sequence}}}'
        yield f"1\tsess-{j % sessions}\t{sequence}\t{role}\t{kind}\t{content}\t{metadata}\n"


def load(url: str, users: int, messages: int = 0, sessions_per_10_users: int = 3) -> None:
    """COPYs users, sessions for the first tenth of them (counted in user_session_counts),
    messages over those; ANALYZEs."""
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        columns = (
            "project_id, user_id, email, first_name, last_name, metadata, created_at, updated_at"
        )
        with cur.copy(f"COPY users ({columns}) FROM STDIN") as copy:
            _write_batched(copy, _user_lines(users))
        # The first tenth of the users own sessions, so session_count has rows to count.
        owners = max(1, users // 10)
        sessions = owners * sessions_per_10_users
        with cur.copy("COPY sessions (project_id, session_id, user_id) FROM STDIN") as copy:
            copy.write("".join(f"1\tsess-{j}\tuser-{j % owners:07d}\n" for j in range(sessions)))
        # Counted for their users as the store counts them (migration 0010): COPY bypasses
        # the store, and each owner's session_count would read 0.
        cur.execute(
            "INSERT INTO user_session_counts (project_id, user_id, session_count)"
            " SELECT project_id, user_id, count(*) FROM sessions"
            " WHERE user_id IS NOT NULL GROUP BY project_id, user_id"
        )
        columns = "project_id, session_id, sequence, role, role_type, content, metadata"
        with cur.copy(f"COPY messages ({columns}) FROM STDIN") as copy:
            _write_batched(copy, _message_lines(messages, sessions))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


def _write_batched(copy: psycopg.Copy, lines: Iterator[str]) -> None:
    batch: list[str] = []
    for line in lines:
        batch.append(line)
        if len(batch) == 10_000:
            copy.write("".join(batch))
            batch.clear()
    copy.write("".join(batch))


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def code_env(root: Path) -> dict[str, str]:
    """The environment in which this interpreter imports memstore from the checkout `root`."""
    if root == ROOT:
        return dict(os.environ)
    # The editable install's import hook comes after sys.path, so these paths win over it.
    paths = [str(root), str(root / "generated")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


class Server:
    """A `memstore serve` subprocess (with --workers N) on the bench database.

    `root` is the checkout whose code serves: another one (e.g. a `git worktree` of an older
    commit) serves its own `server/` with this interpreter, to compare two commits.
    `extra_args` go last on the command line, e.g. `--no-embedding-worker`.
    """

    def __init__(
        self,
        url: str,
        workers: int = 1,
        pool_max_size: int = 10,
        root: Path = ROOT,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        #: Zep's REST API of the same processes (bench/rest.py).
        self.http_port = free_port()
        cmd = [
            *(sys.executable, "-m", "server", "serve", "--host", "127.0.0.1"),
            *("--port", str(self.port), "--database-url", url, "--purge-interval", "0"),
            *("--workers", str(workers), "--pool-max-size", str(pool_max_size)),
            *("--http-port", str(self.http_port)),
            *("--log-level", "WARNING"),
            *extra_args,
        ]
        env = {**code_env(root), "MEMSTORE_PURGE_INTERVAL": "0"}
        self.proc = subprocess.Popen(cmd, cwd=root, env=env)
        self.workers = workers
        self._wait_serving()

    def _wait_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"memstore serve exited with {self.proc.returncode}")
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise RuntimeError("memstore serve did not become SERVING")

    def pids(self) -> list[int]:
        """The serving processes: the worker children, or the one process itself."""
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            children = ""
        found = [int(p) for p in children.split()]
        return found or [self.proc.pid]

    def rss_bytes(self) -> int:
        """Resident memory of the serving processes, summed."""
        total = 0
        for pid in self.pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        return total

    def cpu_seconds(self) -> float:
        """User + system CPU of the serving processes so far."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in self.pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def stop(self) -> int:
        """SIGTERM, then wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
