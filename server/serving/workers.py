"""`memstore serve --workers N`: one serving process per core, all on one port (SO_REUSEPORT).

The parent prepares what the workers share (the embedded PostgreSQL, the migrations), checks
that nobody else holds the port, then forks the workers before any gRPC object exists: a
gRPC core that has started its threads cannot be forked safely. Each worker builds its own
server and connection pool; the kernel spreads new connections over the workers' sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from dataclasses import replace
from types import FrameType

from server.config import Config
from server.serving.ports import probe_port
from server.settings import source

log = logging.getLogger(__name__)

#: prctl option that sends a signal to a worker when its parent dies (linux/prctl.h).
_PR_SET_PDEATHSIG = 1


async def _prepare(config: Config) -> bool:
    """Migrates once, so the workers start on the current schema without racing for it, and
    refuses an unauthenticated public bind here too: one line, not one per worker. False
    when SIGTERM or SIGINT stopped it (it was killed then, or waited out the pool's timeout).
    """
    from server.serving.shutdown import caught_signals, until_stopped

    with caught_signals() as stop:
        return await until_stopped(_migrate_once(config), stop)


async def _migrate_once(config: Config) -> None:
    from server.serving.app import open_store
    from server.serving.auth import start_authenticator

    store = await open_store(config)
    try:
        await store.migrate_to_serve()
        await start_authenticator(config, store)
    finally:
        await store.close()


def serve_workers(config: Config) -> int:
    """Forks config.workers serving processes and waits for them; returns the exit status.

    Raises:
        OSError: the gRPC or HTTP port is taken.
        MemstoreError: the database cannot be reached or migrated.
        StartupRefused: the bind is public and nothing authenticates callers.
    """
    host = source(config, "host")
    port = probe_port(config.host, config.port, flag=source(config, "port"), host_flag=host)
    if config.http:
        # The same check for the REST port, and one port for all workers when it is 0.
        http_port = probe_port(
            config.host, config.http_port, flag=source(config, "http_port"), host_flag=host
        )
        config = replace(config, http_port=http_port)
    if config.database_url is None:
        # One embedded PostgreSQL for all workers, owned (and stopped at exit) by the parent.
        from server.serving.embedded import EmbeddedPostgres

        url = EmbeddedPostgres(config.data_dir / "pg").url("postgres")
        config = replace(config, database_url=url)
    config = replace(config, port=port)
    if not asyncio.run(_prepare(config)):
        log.info("memstore stopped before it served")
        return 0
    pids = [_fork_worker(config, i) for i in range(config.workers)]
    log.info(
        "memstore: %d workers (pids %s) on %s:%d",
        len(pids), ", ".join(map(str, pids)), config.host, port,
    )  # fmt: skip
    if config.http:
        log.info("memstore: Zep REST API on http://%s:%d", config.host, config.http_port)
    return _supervise(pids)


def _fork_worker(config: Config, index: int) -> int:
    pid = os.fork()
    if pid:
        return pid
    # The worker: default signal dispositions until serve() installs its own, its own
    # process group (a terminal's Ctrl-C reaches only the parent, which forwards it once),
    # and a SIGTERM of its own should the parent die.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.setpgid(0, 0)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    os._exit(_run_worker(config, index))


def _run_worker(config: Config, index: int) -> int:
    from server.errors import MemstoreError
    from server.serving.app import serve

    code = 0
    try:
        asyncio.run(serve(config))
    except (MemstoreError, OSError, RuntimeError) as exc:
        logging.getLogger("memstore").error("worker %d failed: %s", index, exc)
        code = 1
    except BaseException:
        logging.getLogger("memstore").exception("worker %d crashed", index)
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: the parent's atexit handlers (e.g. stopping the embedded PostgreSQL) are
    # the parent's to run, not every worker's.
    return code


def _supervise(pids: list[int]) -> int:
    """Forwards SIGTERM/SIGINT to the workers once, reaps them, and sums up their exits."""
    live = set(pids)
    forwarded = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal forwarded
        del signum, frame
        if not forwarded:
            forwarded = True
            _signal_all(live, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    failed = False
    while live:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        live.discard(pid)
        if os.waitstatus_to_exitcode(status) != 0:
            failed = True
            if not forwarded:
                # One worker failing (e.g. at start) takes the others down: no half service.
                log.error(
                    "worker %d exited with %d; stopping the others",
                    pid,
                    os.waitstatus_to_exitcode(status),
                )
                forward(signal.SIGTERM, None)
    return 1 if failed else 0


def _signal_all(pids: set[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
