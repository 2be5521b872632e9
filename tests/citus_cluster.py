"""A local three-node Citus cluster (coordinator + two workers) for the Citus test suites.

It only *uses* a Citus that is already installed into the machine's PostgreSQL 15 (the
binaries under MEMSTORE_CITUS_PG_BIN, /usr/lib/postgresql/15/bin by default); it never builds
or installs anything. Each node gets a fresh data directory under a temporary directory, listens
on a free loopback port, and is stopped and removed at the end.

    python -m tests.citus_cluster run -- pytest tests/citus     # start, run, stop
    python -m tests.citus_cluster check                         # is Citus installed here?

`run` passes the cluster to the command as DATABASE_URL (the coordinator's maintenance
database) and MEMSTORE_CITUS_WORKERS (the workers' host:port list); tests/fix_db.py then makes
every scratch database a Citus database on all three nodes (prepare_database below).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import conninfo as pg_conninfo
from psycopg import sql

PG_BIN = Path(os.environ.get("MEMSTORE_CITUS_PG_BIN", "/usr/lib/postgresql/15/bin"))
#: Set by `run` for the command it runs: the workers of the cluster DATABASE_URL coordinates.
WORKERS_ENV = "MEMSTORE_CITUS_WORKERS"
#: Shards per distributed table on the test cluster: several per worker, so that a statement
#: routed to one shard is told apart from one that reaches all, and DDL stays quick.
TEST_SHARD_COUNT = 8
#: DROP DATABASE ... WITH (FORCE) signals the database's sessions and waits up to 5 s for
#: them to end. On a Citus node the database's own background processes (the maintenance
#: daemon, its connections to the node itself, a metadata sync retrying a lost worker) can
#: outlast that under load: a fresh-clone CI of 2026-12-05 failed the teardown of
#: tests/citus/test_grow.py's promoted-standby test so ("There is 1 other session using the
#: database"), every assertion of the test met. The drop is tried this many times.
DROP_TRIES = 6
#: Each drop that had to be tried again, with the database's sessions then (pg_stat_activity):
#: tests/conftest.py prints them at the end of the run, so a holder that keeps coming back is
#: named.
HELD_DROPS: list[str] = []
_HOLDERS = """
SELECT pid, backend_type, application_name, state, wait_event, left(query, 80)
FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()
"""
_SETTINGS = {
    "shared_preload_libraries": "'citus'",
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "300",
    # Multi-shard writes commit with two-phase commit: the workers need prepared transactions.
    "max_prepared_transactions": "200",
    # Online shard moves (the rebalancer's default transfer mode) copy a shard and then
    # stream the writes made meanwhile by logical replication: the source must log them so.
    # No test moves shards so now; the reproduction of docs/scaling.md "Growing the cluster
    # online" does (tests/citus/test_grow.py says how).
    "wal_level": "logical",
    "citus.shard_count": str(TEST_SHARD_COUNT),
    # A throwaway cluster: durability buys nothing here. But asynchronous commits are what
    # made logical shard moves lose acknowledged writes (docs/scaling.md).
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "64MB",
}


def citus_missing() -> str | None:
    """Why the Citus suites cannot run on this machine, or None when they can."""
    pg_config = PG_BIN / "pg_config"
    if not pg_config.exists():
        return f"no PostgreSQL 15 binaries under {PG_BIN} (set MEMSTORE_CITUS_PG_BIN)"
    found = subprocess.run(
        [str(pg_config), "--pkglibdir", "--sharedir"], capture_output=True, text=True, check=True
    ).stdout.split()
    libdir, sharedir = Path(found[0]), Path(found[1])
    if not (libdir / "citus.so").exists():
        return f"Citus is not installed into the PostgreSQL under {PG_BIN} (no {libdir}/citus.so)"
    if not (sharedir / "extension" / "citus.control").exists():
        return f"Citus is not installed into the PostgreSQL under {PG_BIN} (no citus.control)"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres() -> dict[str, str]:
    """subprocess arguments that run a PostgreSQL binary as `postgres` when we are root."""
    return {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}


@dataclass(frozen=True)
class Node:
    """One PostgreSQL server of the cluster."""

    data_dir: Path
    port: int

    def url(self, dbname: str = "postgres") -> str:
        """A libpq URL of one database of this node (trust auth on loopback)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def pg_ctl(self, *args: str) -> None:
        """Runs pg_ctl on this node's data directory."""
        subprocess.run(
            [str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), *args],
            check=True,
            capture_output=True,
            # The server's own libpq (Citus's node connections) looks under $HOME/.postgresql:
            # a home of its own keeps it out of the caller's.
            env={**os.environ, "HOME": str(self.data_dir.parent)},
            **_as_postgres(),  # type: ignore[arg-type]
        )


def _init_node(base: Path, name: str) -> Node:
    node = Node(base / name, _free_port())
    subprocess.run(
        [
            str(PG_BIN / "initdb"),
            "-D",
            str(node.data_dir),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
        **_as_postgres(),  # type: ignore[arg-type]
    )
    settings = {**_SETTINGS, "port": str(node.port), "unix_socket_directories": f"'{base}'"}
    with (node.data_dir / "postgresql.conf").open("a") as conf:
        conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
    node.pg_ctl("-w", "-l", str(base / f"{name}.log"), "start")
    return node


@contextmanager
def _nodes(prefix: str, names: tuple[str, ...]) -> Iterator[list[Node]]:
    """Starts a node for each name, with fresh data under one temporary directory; yields
    them; stops them and removes their data (the nodes started, if one failed to)."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    nodes: list[Node] = []
    try:
        for name in names:
            nodes.append(_init_node(base, name))
        yield nodes
    finally:
        for node in nodes:
            if (node.data_dir / "postmaster.pid").exists():  # not one a test left stopped
                node.pg_ctl("-w", "-m", "immediate", "stop")
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def cluster() -> Iterator[tuple[Node, list[Node]]]:
    """Starts a coordinator and two workers; yields them; stops them and removes their data."""
    with _nodes("memstore-citus-", ("coordinator", "worker1", "worker2")) as nodes:
        coordinator, workers = nodes[0], nodes[1:]
        prepare_database(coordinator.url(), [f"127.0.0.1:{w.port}" for w in workers])
        yield coordinator, workers


@contextmanager
def extra_node(name: str = "worker3") -> Iterator[Node]:
    """Starts one more node, set up as the cluster's are but a worker of no database yet
    (add_worker makes it one of a database's); stops it and removes its data after."""
    with _nodes("memstore-citus-extra-", (name,)) as nodes:
        yield nodes[0]


@contextmanager
def standby_of(primary: Node) -> Iterator[Node]:
    """Starts a streaming standby of `primary` (pg_basebackup, a copy of every database),
    beside it on a port of its own; yields it; stops it and removes its data after.

    The primary's replication from loopback is trusted (initdb's defaults, as every node's).
    """
    standby = Node(primary.data_dir.parent / f"{primary.data_dir.name}-standby", _free_port())
    subprocess.run(
        [str(PG_BIN / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port),
         "-U", "postgres", "-D", str(standby.data_dir), "-R", "-X", "stream", "--no-sync",
         "--checkpoint", "fast"],
        check=True,
        capture_output=True,
        **_as_postgres(),  # type: ignore[arg-type]
    )  # fmt: skip
    with (standby.data_dir / "postgresql.conf").open("a") as conf:
        conf.write(f"port = {standby.port}\n")
    log = str(standby.data_dir.parent / f"{standby.data_dir.name}.log")
    standby.pg_ctl("-w", "-l", log, "start")
    try:
        yield standby
    finally:
        if (standby.data_dir / "postmaster.pid").exists():
            standby.pg_ctl("-w", "-m", "immediate", "stop")
        shutil.rmtree(standby.data_dir, ignore_errors=True)


def add_worker(url: str, node: Node) -> int:
    """Makes `node` a worker of the Citus database `url` names (its coordinator's URL): the
    database is made there with the extension, then added; returns Citus's node id.

    Citus keeps its node list per database: only this database gains the worker.
    """
    dbname = str(pg_conninfo.conninfo_to_dict(url)["dbname"])
    _make_worker_database(f"127.0.0.1:{node.port}", dbname)
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT citus_add_node(%s, %s)", ("127.0.0.1", node.port)).fetchone()
    assert row is not None
    return int(row[0])


def _make_worker_database(worker: str, dbname: str) -> None:
    host, port = worker.rsplit(":", 1)
    if dbname != "postgres":
        with psycopg.connect(host=host, port=port, user="postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    with psycopg.connect(
        host=host, port=port, user="postgres", dbname=dbname, autocommit=True
    ) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS citus")


def prepare_database(url: str, workers: list[str]) -> None:
    """Makes the database `url` names a Citus database spanning the coordinator and workers.

    Citus keeps its node list per database, so each scratch database the tests create is made
    on every worker too (same name), gets the extension on all three nodes, and is told where
    its coordinator and workers are.
    """
    params = pg_conninfo.conninfo_to_dict(url)
    dbname = str(params["dbname"])
    for worker in workers:
        _make_worker_database(worker, dbname)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS citus")
        conn.execute(
            "SELECT citus_set_coordinator_host(%s, %s)",
            (str(params.get("host", "127.0.0.1")), int(params.get("port", 5432))),
        )
        for worker in workers:
            host, port = worker.rsplit(":", 1)
            conn.execute("SELECT citus_add_node(%s, %s)", (host, int(port)))


def drop_database(dbname: str, workers: list[str]) -> None:
    """Drops a scratch database from the workers (its owner drops the coordinator's copy)."""
    for worker in workers:
        host, port = worker.rsplit(":", 1)
        with psycopg.connect(host=host, port=port, user="postgres", autocommit=True) as conn:
            drop_forced(conn, dbname)


def drop_forced(conn: psycopg.Connection[Any], dbname: str) -> None:
    """Drops database `dbname`, if it exists, ending its sessions (WITH (FORCE)); tries again
    while one still holds it, up to DROP_TRIES times, and notes who held it (HELD_DROPS).
    `conn` is an autocommit connection to another database of the same server."""
    drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
    for attempt in range(1, DROP_TRIES + 1):
        try:
            conn.execute(drop)
            return
        except psycopg.errors.ObjectInUse:
            holders = conn.execute(_HOLDERS, (dbname,)).fetchall()
            HELD_DROPS.append(f"{dbname}, try {attempt} of {DROP_TRIES}: {holders}")
            if attempt == DROP_TRIES:
                raise


def cluster_workers() -> list[str] | None:
    """The workers of the cluster this process runs against (set by `run`), if any."""
    value = os.environ.get(WORKERS_ENV)
    return value.split(",") if value else None


def main(argv: list[str]) -> int:
    """`check`: say whether Citus is installed; `run -- CMD...`: run CMD against a new cluster."""
    if argv[:1] == ["check"]:
        reason = citus_missing()
        print(reason or f"Citus is installed into the PostgreSQL under {PG_BIN}")
        return 0 if reason is None else 1
    if argv[:1] != ["run"] or "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    command = argv[argv.index("--") + 1 :]
    reason = citus_missing()
    if reason is not None:
        # Only tests/citus runs then: it skips, saying why (the other suites would only run
        # again on plain PostgreSQL, which `make test` does).
        print(f"citus_cluster: {reason}; the Citus tests skip", file=sys.stderr)
        fallback = [sys.executable, "-m", "pytest", "-rs", "tests/citus"]
        return subprocess.run(fallback, check=False).returncode
    with cluster() as (coordinator, workers):
        env = {
            **os.environ,
            "DATABASE_URL": coordinator.url(),
            WORKERS_ENV: ",".join(f"127.0.0.1:{w.port}" for w in workers),
        }
        print(
            f"citus_cluster: coordinator on {coordinator.port}, workers on "
            f"{', '.join(str(w.port) for w in workers)}",
            file=sys.stderr,
        )
        return subprocess.run(command, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
