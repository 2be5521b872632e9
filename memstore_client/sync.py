"""The blocking client: Memstore(address, api_key=...).user / .memory, shaped like Zep's SDK."""

from __future__ import annotations

import builtins
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import grpc

from memstore.v1 import backup_service_pb2_grpc, session_service_pb2_grpc, user_service_pb2_grpc

from . import _calls as calls
from . import _calls_bulk as bulk
from ._calls import Stream, Unary
from ._channel import TLS, sync_channel
from ._retry import Resumption, RetryPolicy, checked_idle_timeout, retry_delay, time_left
from .errors import ClientClosed, from_rpc_error
from .types import (
    BackupSource,
    ExportedMessage,
    JsonObject,
    Memory,
    Message,
    MessagePage,
    Restored,
    SearchResults,
    Session,
    SessionPage,
    Snapshot,
    User,
    UserPage,
    UserSessionPage,
)

T = TypeVar("T")


class Memstore:
    """A memstore client: `client.user` (UserService) and `client.memory` (SessionService).

    Args:
        address: "host:port" of the server.
        api_key: sent as `authorization: Bearer <key>` on every call.
        tls: False for plaintext, True for TLS with the system's roots, or TLS(...).
        timeout: seconds each unary call may take, its retries included (streams have no
            deadline).
        retry: how UNAVAILABLE is retried (idempotent calls only), and how long a stream
            keeps resuming.
        channel: a ready channel instead of address and tls (e.g. a test channel).
        stream_idle_timeout: seconds a stream may wait for its next message before the
            attempt is cancelled and resumed from the last chunk's token (None: no bound).
        options: gRPC channel options over the client's own (message limits), e.g.
            keepalive; not with `channel`.

    Raises:
        ValueError: `options` with `channel`, or a stream_idle_timeout that is not positive.
    """

    def __init__(
        self,
        address: str = "localhost:50051",
        api_key: str | None = None,
        *,
        tls: TLS | bool = False,
        timeout: float | None = 30.0,
        retry: RetryPolicy | None = None,
        channel: grpc.Channel | None = None,
        stream_idle_timeout: float | None = 60.0,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        # Checked first: a key gRPC cannot send is refused before a channel is opened.
        self._metadata = calls.metadata(api_key)
        self._idle_timeout = checked_idle_timeout(stream_idle_timeout)
        if channel is not None and options:
            raise ValueError("options: set them on the channel given, not beside it")
        self._channel = channel if channel is not None else sync_channel(address, tls, options)
        self._stubs: dict[str, Any] = {
            calls.USERS: user_service_pb2_grpc.UserServiceStub(self._channel),
            calls.SESSIONS: session_service_pb2_grpc.SessionServiceStub(self._channel),
            calls.BACKUP: backup_service_pb2_grpc.BackupServiceStub(self._channel),
        }
        self._timeout = timeout
        self._retry = retry or RetryPolicy()
        self.user = UserClient(self)
        self.memory = MemoryClient(self)
        self.backup = BackupClient(self)
        self._closed = False

    def close(self) -> None:
        """Closes the channel; calls made after it raise ClientClosed."""
        self._closed = True
        self._channel.close()

    def __enter__(self) -> Memstore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, op: Unary[T]) -> T:
        self._check_open()
        delays = self._retry.delays() if op.idempotent else iter(())
        # One deadline for the call, its retries and their sleeps: `timeout` bounds the call.
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        while True:
            try:
                method = getattr(self._stubs[op.service], op.method)
                response = method(op.request, timeout=time_left(deadline), metadata=self._metadata)
            except (grpc.RpcError, ValueError) as error:
                # close() cancels the calls in flight (CANCELLED) and refuses new ones
                # (ValueError): either is ClientClosed, as a call after close() is.
                self._check_open(error)
                if not isinstance(error, grpc.RpcError):
                    raise
                delay = retry_delay(error, delays, deadline)
                if delay is None:
                    raise from_rpc_error(error) from error
                time.sleep(delay)
                continue
            return op.convert(response)

    def _check_open(self, error: BaseException | None = None) -> None:
        if self._closed:
            raise ClientClosed from error

    def _stream(self, op: Stream[T]) -> Iterator[tuple[list[T], str]]:
        self._check_open()
        # After UNAVAILABLE, or a read that waited past stream_idle_timeout, the stream
        # resumes from the last chunk's token: no row twice.
        resume = Resumption(self._retry, self._idle_timeout)
        while True:
            method = getattr(self._stubs[op.service], op.method)
            try:
                call = method(op.request, metadata=self._metadata, **resume.call_options())
            except ValueError as error:
                self._check_open(error)
                raise
            watchdog = _Watchdog(call)
            try:
                while True:
                    watchdog.arm(resume.read_timeout())
                    chunk = next(call, None)
                    watchdog.arm(None)
                    if chunk is None:
                        return
                    resume.progressed()
                    yield op.convert(chunk), chunk.next_page_token
                    if not chunk.next_page_token:
                        # The last chunk: the stream is whole. Waiting on for its status,
                        # an UNAVAILABLE there restarted it from the first row (its token is
                        # the empty one), and every row came twice.
                        return
                    op.request.page_token = chunk.next_page_token
            except grpc.RpcError as error:
                self._check_open(error)
                # The watchdog's own cancel is a silent peer, not a failure of the call.
                failed = None if watchdog.fired else error
                delay = resume.delay(failed)
                if delay is None:
                    raise resume.failure(failed, op.request.page_token) from error
            finally:
                watchdog.stop()
                call.cancel()
            time.sleep(delay)
            self._check_open()


class _Watchdog:
    """Cancels a stream's call when a read waits past its timeout (a peer gone silent: gRPC
    itself waits on a frozen connection for as long as it stays open)."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._changed = threading.Condition()
        self._until: float | None = None
        self._stopped = False
        #: Set when this watchdog cancelled the call.
        self.fired = False
        threading.Thread(target=self._watch, name="memstore-stream-idle", daemon=True).start()

    def arm(self, timeout: float | None) -> None:
        """Cancels the call unless disarmed (arm(None)) within `timeout` seconds."""
        with self._changed:
            self._until = None if timeout is None else time.monotonic() + timeout
            self._changed.notify()

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify()

    def _watch(self) -> None:
        with self._changed:
            while not self._stopped:
                if self._until is None:
                    self._changed.wait()
                    continue
                left = self._until - time.monotonic()
                if left > 0:
                    self._changed.wait(left)
                    continue
                self.fired = True
                break
        if self.fired:
            self._call.cancel()


class UserClient:
    """client.user: UserService."""

    def __init__(self, client: Memstore) -> None:
        self._client = client

    def add(
        self,
        user_id: str,
        *,
        email: str = "",
        first_name: str = "",
        last_name: str = "",
        metadata: JsonObject | None = None,
    ) -> User:
        """Creates a user. Raises AlreadyExists when the id is taken."""
        return self._client._call(calls.add_user(user_id, email, first_name, last_name, metadata))

    def get(self, user_id: str) -> User:
        """One user. Raises NotFound."""
        return self._client._call(calls.get_user(user_id))

    def update(
        self,
        user_id: str,
        *,
        email: str | None = None,
        first_name: str | None = None,
        last_name: str | None = None,
        metadata: JsonObject | None = None,
        clear_metadata: bool = False,
    ) -> User:
        """Changes the fields given; metadata is merged (a None value removes its key).

        `clear_metadata=True` empties the metadata instead (not with `metadata`); "" clears a
        text field.
        """
        op = calls.update_user(
            user_id, email, first_name, last_name, metadata, clear_metadata=clear_metadata
        )
        return self._client._call(op)

    def delete(self, user_id: str) -> None:
        """Deletes the user with all its sessions and messages, atomically. Raises NotFound."""
        self._client._call(calls.delete_user(user_id))

    def list(self, limit: int = 50, cursor: str | None = None, *, page_number: int = 0) -> UserPage:
        """One page of users, oldest first, and total_size, the number of users.

        Pass next_cursor back as `cursor` for the next page (the fast path), or ask for a
        1-based `page_number` (as Zep's SDK pages; not with a cursor).
        """
        return self._client._call(calls.list_users(limit, cursor, page_number))

    def list_chunked(self, chunk_size: int = 100) -> Iterator[builtins.list[User]]:
        """Every user, in chunks, over one server stream, resumed from the last chunk after
        UNAVAILABLE or a silent server. When it gives up, the error's page_token resumes it
        with `export(chunk_size, page_token)`."""
        for users, _ in self._client._stream(calls.list_users_chunked(chunk_size)):
            yield users

    def get_sessions(self, user_id: str) -> builtins.list[Session]:
        """All live sessions of a user, oldest first. Raises NotFound for an unknown user."""
        found: builtins.list[Session] = []
        token = ""
        while True:
            page = self._client._call(calls.user_sessions(user_id, token))
            found += page.sessions
            token = page.next_page_token or ""
            if not token:
                return found

    def list_sessions(
        self, user_id: str, page_size: int = 50, page_token: str | None = None
    ) -> UserSessionPage:
        """One page of a user's live sessions, oldest first; pass next_page_token back for the
        next. Raises NotFound for an unknown user."""
        op = calls.user_sessions(user_id, page_token or "", page_size)
        return self._client._call(op)

    def export(
        self, chunk_size: int = 100, page_token: str = "", *, snapshot: str = ""
    ) -> Iterator[tuple[builtins.list[User], str]]:
        """Every user in chunks (ListUsersChunked), each with the token that resumes after it;
        in a snapshot of backup.open_snapshot when one is given."""
        return self._client._stream(calls.list_users_chunked(chunk_size, page_token, snapshot))


class MemoryClient:
    """client.memory: SessionService (sessions and their messages)."""

    def __init__(self, client: Memstore) -> None:
        self._client = client

    def add_session(
        self,
        session_id: str = "",
        *,
        user_id: str | None = None,
        metadata: JsonObject | None = None,
    ) -> Session:
        """Creates a session (the server picks an id when empty). Raises AlreadyExists."""
        return self._client._call(calls.add_session(session_id, user_id, metadata))

    def get_session(self, session_id: str, *, show_deleted: bool = False) -> Session:
        """One session. Raises NotFound (also for a soft-deleted one unless show_deleted)."""
        return self._client._call(calls.get_session(session_id, show_deleted))

    def update_session(
        self,
        session_id: str,
        metadata: JsonObject | None = None,
        *,
        clear_metadata: bool = False,
    ) -> Session:
        """Merges metadata into the session (a None value removes its key), or with
        `clear_metadata=True` empties it (not with `metadata`)."""
        op = calls.update_session(session_id, metadata, clear_metadata)
        return self._client._call(op)

    def delete(self, session_id: str) -> int:
        """Soft-deletes the session and its messages; returns how many messages."""
        return self._client._call(calls.delete_session(session_id))

    def list_sessions(
        self,
        page_size: int = 50,
        page_number: int | None = None,
        *,
        page_token: str | None = None,
        user_id: str | None = None,
        show_deleted: bool = False,
        order_by: str = "",
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        updated_after: datetime | None = None,
        updated_before: datetime | None = None,
        metadata_contains: JsonObject | None = None,
    ) -> SessionPage:
        """One page of sessions and total_size, the number that match.

        Page by `page_token` (the previous page's next_page_token; the fast path) or by a
        1-based `page_number` (as Zep's SDK pages), not both; neither is the first page.
        Filters combine: one user's sessions; soft-deleted ones too (`show_deleted`); created
        or updated in [after, before); metadata containing `metadata_contains`. `order_by`
        is "created_at" (default) or "updated_at", optionally followed by " desc".
        """
        op = calls.list_sessions(
            page_size,
            page_number,
            user_id,
            order_by,
            page_token=page_token,
            show_deleted=show_deleted,
            created_after=created_after,
            created_before=created_before,
            updated_after=updated_after,
            updated_before=updated_before,
            metadata_contains=metadata_contains,
        )
        return self._client._call(op)

    def add(
        self,
        session_id: str,
        messages: Sequence[Message | Mapping[str, Any]],
        *,
        user_id: str | None = None,
    ) -> list[Message]:
        """Appends messages (creating or restoring the session); returns them as stored.

        Each message without a uuid gets a random one, so this client's own retries of
        UNAVAILABLE append nothing twice; set uuids yourself to make your retries safe too.
        """
        return self._client._call(calls.add_memory(session_id, messages, user_id))

    def undelete_session(self, session_id: str) -> Session:
        """Restores a soft-deleted session. Raises NotFound, or FailedPrecondition if live."""
        return self._client._call(calls.undelete_session(session_id))

    def list_messages(
        self,
        session_id: str,
        page_size: int = 50,
        page_token: str | None = None,
        *,
        page_number: int = 0,
    ) -> MessagePage:
        """One page of a session's live messages, oldest first, and total_size, their number.

        Pass next_page_token back for the next page, or ask for a 1-based `page_number`
        (not with a token). Raises NotFound.
        """
        op = calls.list_messages(session_id, page_size, page_token or "", page_number)
        return self._client._call(op)

    def get_message(self, session_id: str, uuid: str) -> Message:
        """One live message of a live session by its uuid. Raises NotFound."""
        return self._client._call(calls.get_message(session_id, uuid))

    def update_message(
        self,
        session_id: str,
        uuid: str,
        metadata: JsonObject | None = None,
        *,
        clear_metadata: bool = False,
    ) -> Message:
        """Merges metadata into one message (a None value removes its key), or with
        `clear_metadata=True` empties it (not with `metadata`). Raises NotFound."""
        op = calls.update_message(session_id, uuid, metadata, clear_metadata)
        return self._client._call(op)

    def clear(self, session_id: str) -> int:
        """Soft-deletes every message of the session and keeps it; returns how many."""
        return self._client._call(calls.clear_memory(session_id))

    def get(self, session_id: str, lastn: int = 0, *, relevant_limit: int | None = None) -> Memory:
        """The last `lastn` messages (0: the server's default, 6) and the user-level memory.

        `relevant_limit` memories of the user's other sessions come in relevant_messages and
        as prompt text in context (None: the server's default, 5; 0: none). Unknown
        session: found=False.
        """
        return self._client._call(calls.get_memory(session_id, lastn, relevant_limit))

    def search(
        self,
        text: str,
        *,
        user_id: str | None = None,
        session_ids: Sequence[str] | None = None,
        search_type: str = "hybrid",
        limit: int = 10,
        mmr_lambda: float | None = None,
        role_types: Sequence[str] | None = None,
        metadata: JsonObject | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> SearchResults:
        """Messages matching `text`, best first: in one user's sessions, in the named
        sessions, or (neither) in the whole project.

        search_type is "hybrid" (words and meaning), "full_text" or "semantic"; mmr_lambda
        (0-1) diversifies the results; role_types, metadata (containment) and the created
        range filter them. Raises InvalidArgument, FailedPrecondition (semantic search on a
        server without vectors).
        """
        return self._client._call(
            bulk.search_memory(
                text,
                user_id=user_id,
                session_ids=session_ids,
                search_type=search_type,
                limit=limit,
                mmr_lambda=mmr_lambda,
                role_types=role_types,
                metadata=metadata,
                created_after=created_after,
                created_before=created_before,
            )
        )

    def export_sessions(
        self,
        chunk_size: int = 100,
        page_token: str = "",
        *,
        include_deleted: bool = False,
        snapshot: str = "",
    ) -> Iterator[tuple[list[Session], str]]:
        """Every live session (every session with include_deleted) in chunks, each with the
        token that resumes after it; in a snapshot of backup.open_snapshot when one is given."""
        op = bulk.export_sessions(chunk_size, page_token, include_deleted, snapshot)
        return self._client._stream(op)

    def export_messages(
        self,
        chunk_size: int = 100,
        page_token: str = "",
        *,
        include_deleted: bool = False,
        snapshot: str = "",
    ) -> Iterator[tuple[list[ExportedMessage], str]]:
        """Every live message of a live session (every message, with its deleted_at, with
        include_deleted) with its session id, in chunks, each with its resume token; in a
        snapshot of backup.open_snapshot when one is given."""
        op = bulk.export_messages(chunk_size, page_token, include_deleted, snapshot)
        return self._client._stream(op)


class BackupClient:
    """client.backup: BackupService (restore; snapshots for the export streams of a
    backup)."""

    def __init__(self, client: Memstore) -> None:
        self._client = client

    def restore(
        self,
        users: Sequence[User] = (),
        sessions: Sequence[Session] = (),
        messages: Sequence[ExportedMessage] = (),
        *,
        require_empty: bool = False,
    ) -> Restored:
        """Writes rows back exactly as exported (ids, timestamps, uuids, sequences,
        soft-delete state, metadata), all of them or none: at most 1000 in all.

        A row already stored as given counts as existing, so a batch can be sent again.
        `require_empty` refuses (FailedPrecondition) a project that holds any row; with it
        the rows may be none, and the call only checks. Raises
        AlreadyExists when a row's key is stored with other values.
        """
        op = bulk.restore(users, sessions, messages, require_empty)
        return self._client._call(op)

    def open_snapshot(self, hold_seconds: int = 0) -> Snapshot:
        """Holds the database as it is now (at most `hold_seconds`, 0 for the server's
        default of an hour): the export streams given its `snapshot` read the project as it
        was then, so a backup's users, sessions and messages agree. Release it with
        close_snapshot. Raises FailedPrecondition on a Citus cluster, which has none."""
        return self._client._call(bulk.open_snapshot(hold_seconds))

    def close_snapshot(self, snapshot: str) -> bool:
        """Releases a snapshot of open_snapshot; False when it was gone already."""
        return self._client._call(bulk.close_snapshot(snapshot))

    def get_source(self) -> BackupSource:
        """The project of the client's API key, and an opaque id of it in the server's
        database: what `memstore backup` records, so that --resume refuses another."""
        return self._client._call(bulk.get_backup_source())
