"""`memstore backup` and `memstore restore`: a whole project, exactly, through the client only.

A backup is one JSON Lines file: a header naming what it is of (the project, and an id of
the project in the server's database), then every user, every session (soft-deleted ones
too) and every message (uuids, sequences, timestamps and soft-delete state), each chunk
followed by a checkpoint line holding the token that resumes its stream, then an end line
with the counts. `backup --resume` goes on from the file's last checkpoint, only against
the project and database its header names; `restore` writes the rows back with
BackupService.Restore, in batches that are each all-or-nothing, into a project that must be
empty (`--resume` goes on after an interrupted restore: rows already restored count as
existing).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from ._lines import json_value, text_lines
from .errors import FailedPrecondition, InvalidArgument, MemstoreError
from .sync import Memstore
from .types import (
    ExportedMessage,
    Message,
    Session,
    User,
    message_backup_proto,
    session_backup_proto,
    user_backup_proto,
)

COMMANDS = ("backup", "restore")
#: The format of the file; restore refuses another.
FORMAT = 1
#: Stream of each kind, in the order a backup holds (and a restore needs) them.
STREAMS = ("users", "sessions", "messages")
#: How long the server holds a backup's snapshot at most (BackupService.OpenSnapshot's own
#: default): the backup, and any --resume of it, must end within it.
DEFAULT_SNAPSHOT_HOLD = 3600
_KIND_OF = {"users": "user", "sessions": "session", "messages": "message"}
#: Restore takes at most 1000 rows per call; stay well under the 16 MiB request limit, in
#: bytes of the request (the rows' protobuf: characters outside the BMP are 4 bytes of UTF-8,
#: and a Struct's small numbers 11 bytes against their 2 in JSON).
_BATCH_ROWS = 1000
_BATCH_BYTES = 4 * 1024 * 1024
#: Each stream's rows as Restore's request holds them (weighed before they are sent).
_PROTO_OF: dict[str, Callable[[Any], Any]] = {
    "users": user_backup_proto,
    "sessions": session_backup_proto,
    "messages": message_backup_proto,
}


def add_parsers(commands: Any, connection: Callable[[argparse.ArgumentParser], None]) -> None:
    """Adds `backup` and `restore` to the `memstore` subcommands."""
    text = (
        "write every user, session and message of the project (soft-deleted ones, uuids, "
        "sequences and timestamps included) to one JSON Lines file, resumably"
    )
    backup = commands.add_parser("backup", help=text, description=text)
    backup.add_argument("-o", "--output", type=Path, required=True, help="the backup file")
    backup.add_argument(
        "--chunk-size",
        type=int,
        default=500,
        help="rows per streamed chunk (default 500; the server sends at most 1000, and ends "
        "a chunk at 256 KiB)",
    )
    backup.add_argument(
        "--resume", action="store_true", help="go on from the last checkpoint of --output"
    )
    backup.add_argument(
        "--snapshot-hold",
        type=int,
        default=DEFAULT_SNAPSHOT_HOLD,
        metavar="SECONDS",
        help="how long the server holds the backup's snapshot at most, for the backup and any "
        f"--resume of it (default {DEFAULT_SNAPSHOT_HOLD}; at most 86400)",
    )
    text = "write a backup back, exactly, into a project that holds no users or sessions"
    restore = commands.add_parser("restore", help=text, description=text)
    restore.add_argument("-i", "--input", type=Path, required=True, help="the backup file")
    restore.add_argument(
        "--resume",
        action="store_true",
        help="go on after an interrupted restore (the project then holds its first rows)",
    )
    for parser in (backup, restore):
        connection(parser)
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def resume_command(args: argparse.Namespace, *words: str | Path) -> str:
    """The command that goes on where this run stopped, quoted for a shell: `memstore`, this
    run's command and `words`, then the connection flags this run used, so that it reaches
    the same server (run as printed without them, it went to the default address). An API
    key given as a flag is named, never printed."""
    argv = ["memstore", args.command, *map(str, words), "--address", args.address]
    if args.tls:
        argv.append("--tls")
    for flag in ("ca_file", "cert_file", "key_file"):
        if (path := getattr(args, flag)) is not None:
            argv += ["--" + flag.replace("_", "-"), str(path)]
    line = shlex.join(argv)
    if args.api_key and args.api_key != os.environ.get("MEMSTORE_API_KEY"):
        line += " (with the same --api-key)"
    return line


def run(client: Memstore, args: argparse.Namespace, progress: Callable[[str], Any]) -> int:
    """Runs `backup` or `restore`; returns the exit status."""
    if args.command == "backup":
        return _backup(client, args, progress)
    return _restore(client, args, progress)


# -- backup --------------------------------------------------------------------


def _backup(client: Memstore, args: argparse.Namespace, progress: Callable[[str], Any]) -> int:
    resuming = args.resume and args.output.exists() and args.output.stat().st_size > 0
    source = client.backup.get_source()
    header = {"memstore_backup": FORMAT, "project": source.project, "source": source.source_id}
    start, counts, snapshot = (
        _resume_point(args.output, header) if resuming else (("users", ""), _zero(), None)
    )
    if start is None:
        print(f"memstore backup: {args.output} is complete already", file=sys.stderr)
        return 0
    if not resuming and args.output.exists() and args.output.stat().st_size:
        print(
            f"memstore backup: {args.output} exists; remove it, or go on with --resume",
            file=sys.stderr,
        )
        return 1
    if snapshot is None:  # a backup from its start: every stream reads one moment
        snapshot = _open_snapshot(client, args.snapshot_hold)
    streams: dict[str, Callable[[str], Iterator[tuple[list[Any], str]]]] = {
        "users": lambda token: client.user.export(args.chunk_size, token, snapshot=snapshot),
        "sessions": lambda token: client.memory.export_sessions(
            args.chunk_size, token, include_deleted=True, snapshot=snapshot
        ),
        "messages": lambda token: client.memory.export_messages(
            args.chunk_size, token, include_deleted=True, snapshot=snapshot
        ),
    }
    first, token = start
    # Whether a checkpoint in the file names the snapshot: a resume reads on in it then.
    named = resuming
    try:
        with ExitStack() as stack:
            out = stack.enter_context(args.output.open("a", encoding="utf-8"))
            if not args.output.stat().st_size:  # a new file, or one cut within its header
                _write(out, header)
            bar = stack.enter_context(progress("backing up"))
            bar.update(sum(counts.values()))
            for stream in STREAMS[STREAMS.index(first) :] if first else ():
                for rows, next_token in streams[stream](token):
                    for row in rows:
                        _write(out, {"kind": _KIND_OF[stream], **_plain(row)})
                    counts[stream] += len(rows)
                    bar.update(len(rows))
                    # Written after its rows: resuming never repeats or skips one. The
                    # snapshot it was read in, for a resume to read the rest in.
                    checkpoint = {"stream": stream, "page_token": next_token, "snapshot": snapshot}
                    _write(out, {"kind": "checkpoint", **checkpoint})
                    out.flush()
                    named = True
                token = ""
            _write(out, {"kind": "end", **counts})
    except FailedPrecondition as exc:
        if exc.reason != "SNAPSHOT_GONE":
            raise
        # Read in another moment, the rest would not agree with what the file holds.
        print(
            f"memstore backup: the snapshot {args.output} was read in is no longer held (its "
            "hold passed, or the server process holding it stopped); the rest cannot be read "
            f"in it: remove {args.output} and back up again (a longer --snapshot-hold keeps "
            "it longer)",
            file=sys.stderr,
        )
        return 1
    except (MemstoreError, KeyboardInterrupt) as exc:
        _backup_stopped(client, args, None if named else snapshot)
        if isinstance(exc, KeyboardInterrupt):
            return 130  # said in _backup_stopped's one line
        raise
    if snapshot:
        _close_snapshot(client, snapshot)
    print(json.dumps({"backup": str(args.output), **counts}), file=sys.stderr)
    return 0


def _open_snapshot(client: Memstore, hold: int) -> str:
    """A snapshot the server holds for the backup's streams; "" where it holds none (Citus),
    said on stderr."""
    try:
        return client.backup.open_snapshot(hold).snapshot
    except FailedPrecondition as exc:
        if exc.reason != "SNAPSHOT_UNSUPPORTED":
            raise
        print(
            f"memstore backup: {exc}; the streams are read as the project changes",
            file=sys.stderr,
        )
        return ""


def _close_snapshot(client: Memstore, snapshot: str) -> None:
    # Released as soon as the backup is whole; a failure to say so only leaves it held until
    # its hold passes, which is no reason to fail a whole backup.
    try:
        client.backup.close_snapshot(snapshot)
    except MemstoreError as exc:
        print(
            f"memstore backup: the snapshot is held until its hold passes: {exc}", file=sys.stderr
        )


def _zero() -> dict[str, int]:
    return dict.fromkeys(STREAMS, 0)


def _resume_point(
    path: Path, header: dict[str, Any]
) -> tuple[tuple[str, str] | None, dict[str, int], str | None]:
    """Where an interrupted backup goes on, (stream, token), or None when it is complete; the
    rows it holds; and the snapshot its rows were read in ("" for none; None before the first
    checkpoint, when it starts again from nothing). Rows after the last checkpoint (a chunk
    cut short) are cut off. The stream is "" when every stream is whole and only the end line
    is missing.

    Raises:
        InvalidArgument: the file is not a backup (its first line is not the header), or a
            backup of another source than `header` names (this server's project), and is
            left as it is: cutting it back would destroy what it holds.
    """
    keep, point, snapshot = 0, ("users", ""), None
    with path.open("rb") as source:
        _check_header(path, source.readline(), header)
        source.seek(0)
        offset = 0
        for raw in source:
            offset += len(raw)
            try:
                row = json_value(raw)
            except ValueError:
                break  # a line cut short by the interruption
            if not isinstance(row, dict):
                break  # damage, which the backup goes on from as from a cut line
            if row.get("kind") == "end":
                return None, _zero(), None
            if row.get("kind") == "checkpoint":
                stream, token = row["stream"], row["page_token"]
                snapshot = str(row.get("snapshot") or "")
                following = STREAMS.index(stream) + 1
                if token:
                    point = (stream, token)
                elif following < len(STREAMS):
                    point = (STREAMS[following], "")
                else:
                    # The last stream's last chunk carries no token: every row is in, only
                    # the end line is missing. Read as "messages from the start", this
                    # wrote every message a second time.
                    point = ("", "")
                keep = offset
            elif "memstore_backup" in row:
                keep = offset
    with path.open("r+b") as file:
        file.truncate(keep)
    return point, _count_rows(path), snapshot


def _check_header(path: Path, first: bytes, header: dict[str, Any]) -> None:
    try:
        found = json_value(first)
    except ValueError:
        found = None
    if isinstance(found, dict) and found.get("memstore_backup") == FORMAT:
        _check_source(path, found, header)
        return
    # The header itself cut short by an interruption starts the backup again.
    line = (json.dumps(header, ensure_ascii=False) + "\n").encode()
    if not (line.startswith(first) and not first.endswith(b"\n")):
        raise InvalidArgument(
            f"{path} is not a memstore backup (its first line is not a "
            f'{{"memstore_backup": {FORMAT}, ...}} header); nothing was changed: back up to '
            "another file"
        )


def _check_source(path: Path, found: dict[str, Any], header: dict[str, Any]) -> None:
    """Refuses to resume a backup of another project or database than this server's:
    the rest of the file would be another project's rows, two projects mixed in one."""
    project, source = found.get("project"), found.get("source")
    if (project, source) == (header["project"], header["source"]):
        return
    if not isinstance(project, str) or not isinstance(source, str):
        what = "names no project and database (an older memstore wrote it)"
    elif project != header["project"]:
        what = f"is a backup of project '{project}', and this API key reaches '{header['project']}'"
    else:
        what = f"is a backup of project '{project}' of another database than this server's"
    raise InvalidArgument(
        f"{path} {what}: resuming would mix two projects in one file; nothing was changed: "
        "resume it with the server and API key it was started with, or back up to another file"
    )


def _count_rows(path: Path) -> dict[str, int]:
    counts = _zero()
    with path.open(encoding="utf-8") as source:
        for line in source:
            kind = json.loads(line).get("kind")
            if kind in ("user", "session", "message"):
                counts[f"{kind}s"] += 1
    return counts


def _write(out: IO[str], row: dict[str, Any]) -> None:
    out.write(json.dumps(row, ensure_ascii=False) + "\n")


def _plain(row: User | Session | ExportedMessage) -> dict[str, Any]:
    if isinstance(row, ExportedMessage):
        return {"session_id": row.session_id, **_fields(row.message)}
    return _fields(row)


def _fields(row: Any) -> dict[str, Any]:
    names = row.__dataclass_fields__
    values = ((name, getattr(row, name)) for name in names)
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in values}


def _backup_stopped(client: Memstore, args: argparse.Namespace, unnamed: str | None) -> None:
    """Says how to resume a backup that stopped; closes its snapshot if no checkpoint names
    it (`unnamed`): the resume starts from nothing, in a snapshot of its own, and this one
    would stay held (a connection, one of the project's 8) for the whole --snapshot-hold."""
    if unnamed:
        _close_snapshot(client, unnamed)
    print(
        "backup interrupted; resume with: " + resume_command(args, "-o", args.output, "--resume"),
        file=sys.stderr,
    )


# -- restore -------------------------------------------------------------------


#: Restore's refusals of rows that name a user or session neither stored nor sent before
#: them (server/store/restore.py), or a live message in a deleted session: the file's rows.
_FILE_LACKS = frozenset({"USER_NOT_FOUND", "SESSION_NOT_FOUND", "SESSION_DELETED"})


def _restore(client: Memstore, args: argparse.Namespace, progress: Callable[[str], Any]) -> int:
    total = _check_backup(args.input)
    done = {kind: {"created": 0, "existing": 0} for kind in STREAMS}
    require_empty = not args.resume
    try:
        with ExitStack() as stack:
            source = stack.enter_context(args.input.open("rb"))
            bar = stack.enter_context(progress("restoring"))
            bar.total = total
            for kind, batch in _batches(args.input, source):
                rows = {kind: batch}
                result = client.backup.restore(
                    rows.get("users", []),
                    rows.get("sessions", []),
                    rows.get("messages", []),
                    require_empty=require_empty,
                )
                require_empty = False
                counts = getattr(result, kind)
                done[kind]["created"] += counts.created
                done[kind]["existing"] += counts.existing
                bar.update(len(batch))
        if require_empty:
            # A backup of an empty project sends no rows, and with them no check: it was
            # "restored" into a project of other data without a word. (A first batch
            # carries the check itself: made apart, two restores could both pass it.)
            client.backup.restore(require_empty=True)
    except (MemstoreError, KeyboardInterrupt) as exc:
        # Resuming helps after an outage or a resolved conflict, not with a bad row, nor with
        # rows naming a parent the file does not hold: the same file would fail again.
        reason = getattr(exc, "reason", "")
        if reason in _FILE_LACKS:
            print(
                "restore stopped: the backup file holds rows whose parents it lacks, most "
                "likely because the project was written to while the backup ran (its "
                "three streams are not one snapshot: back up again while nothing writes), "
                "else an edited file or a parent deleted during this restore; nothing of "
                "the failed batch was written",
                file=sys.stderr,
            )
        elif not isinstance(exc, InvalidArgument) and reason != "PROJECT_NOT_EMPTY":
            print(
                "restore interrupted; nothing of the failed batch was written; resume with: "
                + resume_command(args, "-i", args.input, "--resume"),
                file=sys.stderr,
            )
        if isinstance(exc, KeyboardInterrupt):
            return 130  # said above, in one line
        raise
    print(json.dumps({"restored": str(args.input), **done}), file=sys.stderr)
    return 0


def _check_backup(path: Path) -> int:
    """The number of rows of a complete backup file.

    Raises:
        InvalidArgument: the file is no memstore backup, an interrupted or a damaged one.
    """
    first: dict[str, Any] | None = None
    last: dict[str, Any] = {}
    with path.open("rb") as source:
        for number, line in text_lines(source, str(path)):
            last = _json(path, number, line)
            first = last if first is None else first
    if (first or {}).get("memstore_backup") != FORMAT:
        raise InvalidArgument(f"{path} is not a memstore backup (format {FORMAT})")
    if last.get("kind") != "end":
        raise InvalidArgument(
            f"{path} is an interrupted backup; finish it first: memstore backup -o {path} --resume"
        )
    try:
        return sum(int(last[kind]) for kind in STREAMS)
    except (KeyError, TypeError, ValueError):
        raise InvalidArgument(
            f"{path}: its end line does not hold the counts of users, sessions and messages "
            "a backup ends with; it is damaged"
        ) from None


def _json(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        row = json_value(line)
    except ValueError as exc:
        raise InvalidArgument(f"{path} line {number} is not JSON: {exc}") from None
    if not isinstance(row, dict):
        raise InvalidArgument(f"{path} line {number} is not a JSON object")
    return row


def _batches(path: Path, source: IO[bytes]) -> Iterator[tuple[str, list[Any]]]:
    kind, batch, size = "", list[Any](), 0
    for number, line in text_lines(source, str(path)):
        row = _json(path, number, line)
        stream = {"user": "users", "session": "sessions", "message": "messages"}.get(
            row.pop("kind", "")
        )
        if stream is None:
            continue  # the header, checkpoints, the end line
        try:
            item = _from_row(stream, row)
            # Its bytes in the request, a field's tag and length included; converting it
            # also checks every value's type here, where the line can be named.
            weight = _PROTO_OF[stream](item).ByteSize() + 8
        except (KeyError, TypeError, ValueError, AttributeError, InvalidArgument) as exc:
            raise InvalidArgument(f"{path} line {number}: not a {stream[:-1]} row: {exc}") from None
        full = len(batch) >= _BATCH_ROWS or size + weight > _BATCH_BYTES
        if batch and (stream != kind or full):
            yield kind, batch
            batch, size = [], 0
        kind = stream
        batch.append(item)
        size += weight
    if batch:
        yield kind, batch


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _from_row(stream: str, row: dict[str, Any]) -> Any:
    fields: dict[str, Any] = dict(row)
    for name in ("created_at", "updated_at", "deleted_at", "last_message_at"):
        if name in fields:
            fields[name] = _time(fields[name])
    if stream == "users":
        return User(**fields)
    if stream == "sessions":
        return Session(**fields)
    session_id = fields.pop("session_id")
    return ExportedMessage(session_id, Message(**fields))
