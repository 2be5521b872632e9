"""`memstore export` and `memstore import`: JSON Lines in and out, through the client only."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

from memstore_client import (
    TLS,
    AlreadyExists,
    ExportedMessage,
    FailedPrecondition,
    InvalidArgument,
    Memstore,
    MemstoreError,
    Message,
    NotFound,
    PermissionDenied,
    Session,
    Unauthenticated,
    Unavailable,
    User,
    backup_cli,
)
from memstore_client._channel import check_address
from memstore_client._lines import json_value, text_lines

#: The subcommands this module adds to `memstore`.
COMMANDS = ("export", "import", *backup_cli.COMMANDS)
KINDS = ("users", "sessions", "messages")
#: AddMemory takes at most 1000 messages and 16 MiB; stay well under the bytes.
_BATCH_MESSAGES = 1000
_BATCH_BYTES = 4 * 1024 * 1024


def add_parsers(commands: Any) -> None:
    """Adds `export`, `import`, `backup` and `restore` to the `memstore` subcommands."""
    text = "stream users, sessions or messages out as JSON Lines (resumable)"
    export = commands.add_parser("export", help=text, description=text)
    export.add_argument("kind", choices=KINDS)
    export.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    export.add_argument(
        "--chunk-size",
        type=int,
        default=500,
        help="rows per streamed chunk (default 500; the server sends at most 1000, and ends "
        "a chunk at 256 KiB)",
    )
    export.add_argument(
        "--page-token",
        default="",
        help="resume after this token (printed by an interrupted export of the same kind)",
    )
    export.add_argument(
        "-a",
        "--append",
        action="store_true",
        help="append to the --output file instead of replacing it (to resume into it)",
    )
    text = (
        "create users, sessions or messages from JSON Lines, through the API; "
        f"{IMPORT_ORDER} (rows that exist with other values are reported, never changed)"
    )
    imp = commands.add_parser("import", help=text, description=text)
    imp.add_argument("kind", choices=KINDS)
    imp.add_argument("-i", "--input", type=Path, help="file to read (default: stdin)")
    for parser in (export, imp):
        _add_connection_arguments(parser)
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    backup_cli.add_parsers(commands, _add_connection_arguments)


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    port = os.environ.get("MEMSTORE_PORT") or "50051"
    parser.add_argument(
        "--address",
        type=_address,
        default=os.environ.get("MEMSTORE_ADDRESS") or f"localhost:{port}",
        help="host:port of the server (default localhost:50051, or localhost:$MEMSTORE_PORT; "
        "env MEMSTORE_ADDRESS)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("MEMSTORE_API_KEY"),
        help="API key, sent as a bearer token (default none; env MEMSTORE_API_KEY)",
    )
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument("--ca-file", type=Path, help="PEM of the CA to trust (implies --tls)")
    parser.add_argument("--cert-file", type=Path, help="client certificate PEM (mutual TLS)")
    parser.add_argument("--key-file", type=Path, help="client key PEM (mutual TLS)")


def _address(text: str) -> str:
    try:
        return check_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _tls(args: argparse.Namespace) -> TLS | bool:
    files = (args.ca_file, args.cert_file, args.key_file)
    if not any(files):
        return bool(args.tls)
    ca, cert, key = (f.read_bytes() if f else None for f in files)
    return TLS(root_certificates=ca, certificate_chain=cert, private_key=key)


def main(args: argparse.Namespace) -> int:
    """Runs `export`, `import`, `backup` or `restore`; returns the exit status."""
    try:
        # The TLS files are read here, inside the handlers: a missing one was a traceback.
        with Memstore(args.address, args.api_key, tls=_tls(args), timeout=60) as client:
            return _run(client, args)
    except MemstoreError as exc:
        print(f"memstore {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # A Ctrl-C the export, backup or restore did not report itself (connecting, or an
        # import): one line, no traceback, the shell's status for it.
        print(f"memstore {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `memstore export users | head`: the reader left; stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        # A file that cannot be read or written: one line, not a traceback.
        print(f"memstore {args.command}: {exc}", file=sys.stderr)
        return 1


def _run(client: Memstore, args: argparse.Namespace) -> int:
    if args.command in backup_cli.COMMANDS:
        return backup_cli.run(client, args, functools.partial(_progress, args))
    if args.command == "export":
        return _export(client, args)
    return _import(client, args)


# -- export --------------------------------------------------------------------


def _export(client: Memstore, args: argparse.Namespace) -> int:
    streams: dict[str, Callable[[int, str], Iterator[tuple[list[Any], str]]]] = {
        "users": client.user.export,
        "sessions": client.memory.export_sessions,
        "messages": client.memory.export_messages,
    }
    chunks = streams[args.kind](args.chunk_size, args.page_token)
    # How many rows are written, the token that follows them and, with -o, where they end in
    # the file: an interrupted export cuts the file back there (_cut_to_whole_chunks).
    count, token, whole = 0, args.page_token, None
    try:
        # The bar closes (ending its line) before anything below is printed.
        with ExitStack() as stack:
            out = (
                stack.enter_context(args.output.open("a" if args.append else "w", encoding="utf-8"))
                if args.output
                else sys.stdout
            )
            # (A named pipe has no place to cut back to, nor a file to append to.)
            seekable = bool(args.output) and out.seekable()
            whole = out.tell() if seekable else None
            bar = stack.enter_context(_progress(args, f"exporting {args.kind}"))
            for rows, next_token in chunks:
                # The chunk's lines are made before any is written, and counted with its
                # token at once: a Ctrl-C while they were written one by one left part of
                # the chunk in the file, which the resume command wrote again.
                text = "".join(json.dumps(_row(row), ensure_ascii=False) + "\n" for row in rows)
                out.write(text)
                if seekable:
                    out.flush()
                count, token, whole = (
                    count + len(rows),
                    next_token,
                    out.tell() if seekable else None,
                )
                bar.update(len(rows))
    except MemstoreError as exc:
        if exc.reason == "INVALID_PAGE_TOKEN":
            # Nothing was exported and resuming cannot help: say what the token must be.
            print(
                f"memstore export: --page-token is not a token of `memstore export "
                f"{args.kind}`: use the one an interrupted `export {args.kind}` printed "
                f"(server: {exc.message})",
                file=sys.stderr,
            )
            return 1
        _cut_to_whole_chunks(args, whole)
        _interrupted(args, count, token)
        raise
    except KeyboardInterrupt:
        _cut_to_whole_chunks(args, whole)
        _interrupted(args, count, token)
        return 130  # how far it got is its one line
    print(json.dumps({"exported": count, "kind": args.kind}), file=sys.stderr)
    return 0


def _cut_to_whole_chunks(args: argparse.Namespace, whole: int | None) -> None:
    """Cuts the -o file back to the end of its last whole chunk, the one the resume token
    follows: a Ctrl-C during a chunk's write (or after it, before its token was counted) left
    part or all of that chunk in the file, which `--append` then wrote again."""
    if args.output is not None and whole is not None and args.output.is_file():
        os.truncate(args.output, whole)


def _interrupted(args: argparse.Namespace, count: int, token: str) -> None:
    """Says how far an interrupted export got and the command that goes on from there."""
    if not token and count:
        # The last chunk (no token) is written whole: the export is, too.
        print(f"{count} {args.kind} exported, all of them", file=sys.stderr)
        return
    if not token:
        print(
            f"interrupted, nothing exported; run `memstore export {args.kind}` again",
            file=sys.stderr,
        )
        return
    # Everything before `token` is written.
    target = ("-o", args.output, "--append") if args.output else ()
    command = backup_cli.resume_command(args, args.kind, "--page-token", token, *target)
    print(f"interrupted after {count} {args.kind}; resume with: {command}", file=sys.stderr)


def _row(row: User | Session | ExportedMessage) -> dict[str, Any]:
    if isinstance(row, ExportedMessage):
        return {"session_id": row.session_id, **_plain(row.message)}
    return _plain(row)


def _plain(row: Any) -> dict[str, Any]:
    # Shallow: dataclasses.asdict deep-copies every metadata dict, a third of the export's time.
    values = ((f.name, getattr(row, f.name)) for f in dataclasses.fields(row))
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in values}


def _progress(args: argparse.Namespace, label: str) -> Any:
    try:
        # Imported here: the bar is an extra (memstore[cli]), and `memstore serve` imports
        # this module to offer these commands.
        from tqdm import tqdm
    except ImportError:
        if not args.no_progress:
            print("no progress bar: pip install 'memstore[cli]' for one", file=sys.stderr)
        return _NoProgress()
    return tqdm(
        desc=label, unit=" rows", file=sys.stderr, disable=args.no_progress, mininterval=0.5
    )


class _NoProgress:
    """Stands in for the tqdm bar: a context manager whose update does nothing."""

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        """Counts nothing: there is no bar to move."""


# -- import --------------------------------------------------------------------

#: The order in which `memstore import` must see the kinds: each names rows of the one before.
IMPORT_ORDER = "import users, then sessions, then messages"

Counts = dict[str, int]
#: Errors of the connection or the key, not of a row: every other row would fail the same.
_STOPS = (Unavailable, Unauthenticated, PermissionDenied)


def _import(client: Memstore, args: argparse.Namespace) -> int:
    counts: Counts = {"created": 0, "existing": 0, "differs": 0, "failed": 0}
    with ExitStack() as stack:
        source = stack.enter_context(args.input.open("rb")) if args.input else sys.stdin.buffer
        bar = stack.enter_context(_progress(args, f"importing {args.kind}"))
        rows = _read(text_lines(source, str(args.input or "stdin")), args.kind, counts)
        if args.kind == "messages":
            _import_messages(client, rows, counts, bar)
        else:
            create = _create_user if args.kind == "users" else _create_session
            for line, row in rows:
                _count(counts, f"line {line}", 1, functools.partial(create, client, row))
                bar.update(1)
    _report(args.kind, counts)
    if counts["differs"]:
        print(
            f"{counts['differs']} {args.kind} already exist with other values than the file "
            f"and were left as they are (listed above); {IMPORT_ORDER}",
            file=sys.stderr,
        )
    return 1 if counts["failed"] or counts["differs"] else 0


def _report(kind: str, counts: Counts) -> None:
    print(json.dumps({"kind": kind, **counts}))


def _report_stop(where: str, exc: MemstoreError) -> None:
    print(
        f"import stopped at {where} ({exc.code.name}); what was imported before it counts as "
        "existing when the import is run again",
        file=sys.stderr,
    )


def _read(
    lines: Iterable[tuple[int, str]], kind: str, counts: Counts
) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, text in lines:
        if not text.strip():
            continue
        try:
            row = json_value(text)
        except ValueError as exc:
            row = exc
        if not isinstance(row, dict):
            counts["failed"] += 1
            print(f"line {line}: not a JSON object: {row}", file=sys.stderr)
            continue
        _check_kind(row, line, kind)
        yield line, row


#: The field that tells each kind's rows apart, most specific first: messages have content,
#: sessions a session_id (and perhaps a user_id), users only a user_id.
_MARKS = (("content", "messages"), ("session_id", "sessions"), ("user_id", "users"))


def _check_kind(row: dict[str, Any], line: int, kind: str) -> None:
    # A file of another kind would otherwise import as this one: the user_ids of a sessions
    # file as users, the session_ids of a messages file as sessions. Stop at its first row.
    if "memstore_backup" in row or "kind" in row:
        raise InvalidArgument(
            f"line {line} belongs to a `memstore backup` file, not to `memstore export "
            f"{kind}` output: load a backup with `memstore restore -i FILE`"
        )
    found = next((k for field, k in _MARKS if field in row), kind)
    if found != kind:
        raise InvalidArgument(
            f"line {line} is a row of {found} (`memstore export {found}` output), not of "
            f"{kind}: import it with `memstore import {found}`"
        )


class _Differs(Exception):
    """The row exists with other values than the file's; nothing was changed."""


def _count(counts: Counts, where: str, n: int, create: Callable[[], int | None]) -> None:
    # `create` answers how many of its n rows already existed (None: all n were new). A row
    # that exists as the file has it counts as done, so an interrupted import can be run
    # again; one that exists otherwise is reported, never overwritten.
    try:
        existing = create() or 0
        counts["created"] += n - existing
        counts["existing"] += existing
    except _STOPS as exc:
        # One line (from main), not one per row of a file of millions.
        _report_stop(where, exc)
        raise
    except _Differs as exc:
        counts["differs"] += n
        print(f"{where}: {exc}", file=sys.stderr)
    except (MemstoreError, KeyError, TypeError, ValueError) as exc:
        counts["failed"] += n
        print(f"{where}: {exc!s}", file=sys.stderr)


def _differences(stored: dict[str, Any], wanted: Mapping[str, Any]) -> str:
    names = [name for name, value in wanted.items() if stored[name] != value]
    return ", ".join(f"{n} {stored[n]!r} (file: {wanted[n]!r})" for n in names)


def _create_user(client: Memstore, row: dict[str, Any]) -> int:
    email, first, last = (str(row.get(k) or "") for k in ("email", "first_name", "last_name"))
    metadata: dict[str, Any] = row.get("metadata") or {}
    wanted = {"email": email, "first_name": first, "last_name": last, "metadata": metadata}
    try:
        client.user.add(
            row["user_id"], email=email, first_name=first, last_name=last, metadata=metadata
        )
        return 0
    except AlreadyExists:
        user = client.user.get(row["user_id"])
    differs = _differences(dataclasses.asdict(user), wanted)
    if differs:
        raise _Differs(f"user {user.user_id!r} exists with {differs}")
    return 1


def _create_session(client: Memstore, row: dict[str, Any]) -> int:
    user_id: str | None = row.get("user_id") or None
    metadata: dict[str, Any] = row.get("metadata") or {}
    wanted = {"user_id": user_id, "metadata": metadata}
    try:
        client.memory.add_session(row["session_id"], user_id=user_id, metadata=metadata)
        return 0
    except FailedPrecondition as exc:
        raise ValueError(f"{exc}; {IMPORT_ORDER}") from exc
    except AlreadyExists:
        session = client.memory.get_session(row["session_id"], show_deleted=True)
    differs = _differences(dataclasses.asdict(session), wanted)
    if differs:
        hint = ""
        if session.user_id is None and not session.metadata:
            # What `import messages` before `import sessions` leaves: AddMemory made it bare.
            hint = f" (a bare session, as `import messages` makes when run first: {IMPORT_ORDER})"
        raise _Differs(f"session {session.session_id!r} exists with {differs}{hint}")
    if session.deleted_at is not None:
        raise _Differs(f"session {session.session_id!r} exists soft-deleted; left deleted")
    return 1


def _message(row: dict[str, Any]) -> Message:
    # The row's uuid is kept: importing the same file twice appends nothing twice.
    # Each value's type is checked here, where the line is named: a content of 123 ended the
    # import in a traceback (AttributeError) further on.
    for name in ("content", "role", "role_type", "uuid"):
        value = row.get(name)
        if not isinstance(value, str) and (name == "content" or value is not None):
            raise TypeError(f"{name} must be a string, not {_json_kind(value)}")
    metadata = row.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be an object, not {_json_kind(metadata)}")
    return Message(
        content=row["content"],
        role=row.get("role") or "",
        role_type=row.get("role_type") or "norole",
        metadata=metadata or {},
        uuid=row.get("uuid") or "",
    )


def _json_kind(value: object) -> str:
    # What JSON calls the value's type.
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else "a string"


def _import_messages(
    client: Memstore, rows: Iterable[tuple[int, dict[str, Any]]], counts: Counts, bar: Any
) -> None:
    # Consecutive messages of one session go in one AddMemory call (as export orders them).
    live: dict[str, int] = {}  # message_count of each session seen, as AddMemory answers
    for session_id, first, batch in _batches(rows, counts):
        where = f"lines {first}-{first + len(batch) - 1} (session {session_id!r})"
        add = functools.partial(_add_messages, client, session_id, batch, live)
        _count(counts, where, len(batch), add)
        bar.update(len(batch))


def _add_messages(
    client: Memstore, session_id: str, batch: list[Message], live: dict[str, int]
) -> int:
    if session_id not in live:
        # AddMemory would create a missing session bare (no user, no metadata) and restore
        # a deleted one: neither is what the files describe.
        try:
            session = client.memory.get_session(session_id, show_deleted=True)
        except NotFound as exc:
            raise ValueError(f"session {session_id!r} does not exist; {IMPORT_ORDER}") from exc
        if session.deleted_at is not None:
            raise _Differs(f"session {session_id!r} is soft-deleted here; left as it is")
        live[session_id] = session.message_count
    try:
        added = client.memory.add(session_id, batch)
    except AlreadyExists as exc:
        raise _Differs(str(exc)) from exc
    before = live[session_id]
    live[session_id] = client.memory.get_session(session_id).message_count if added else before
    return len(batch) - (live[session_id] - before)


def _batches(
    rows: Iterable[tuple[int, dict[str, Any]]], counts: Counts
) -> Iterator[tuple[str, int, list[Message]]]:
    session_id, first, batch, size = "", 0, list[Message](), 0
    for line, row in rows:
        try:
            sid, message = str(row["session_id"]), _message(row)
        except (KeyError, TypeError, ValueError) as exc:
            counts["failed"] += 1
            print(f"line {line}: {exc!s}", file=sys.stderr)
            continue
        length = len(message.content.encode())
        full = len(batch) >= _BATCH_MESSAGES or size + length > _BATCH_BYTES
        if batch and (sid != session_id or full):
            yield session_id, first, batch
            batch, size = [], 0
        if not batch:
            session_id, first = sid, line
        batch.append(message)
        size += length
    if batch:
        yield session_id, first, batch
