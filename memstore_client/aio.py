"""The asyncio client: AsyncMemstore(address, api_key=...).user / .memory, as the sync one."""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import grpc

from memstore.v1 import backup_service_pb2_grpc, session_service_pb2_grpc, user_service_pb2_grpc

from . import _calls as calls
from . import _calls_bulk as bulk
from ._calls import Stream, Unary
from ._channel import TLS, aio_channel
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

#: What a stream's read() answers after its last message (missing from grpc's stubs).
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]


class AsyncMemstore:
    """An asyncio memstore client: `client.user` and `client.memory`, awaitable.

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
        channel: grpc.aio.Channel | None = None,
        stream_idle_timeout: float | None = 60.0,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        # Checked first: a key gRPC cannot send is refused before a channel is opened.
        self._metadata = calls.metadata(api_key)
        self._idle_timeout = checked_idle_timeout(stream_idle_timeout)
        if channel is not None and options:
            raise ValueError("options: set them on the channel given, not beside it")
        self._channel = channel if channel is not None else aio_channel(address, tls, options)
        self._stubs: dict[str, Any] = {
            calls.USERS: user_service_pb2_grpc.UserServiceStub(self._channel),
            calls.SESSIONS: session_service_pb2_grpc.SessionServiceStub(self._channel),
            calls.BACKUP: backup_service_pb2_grpc.BackupServiceStub(self._channel),
        }
        self._timeout = timeout
        self._retry = retry or RetryPolicy()
        self.user = AsyncUserClient(self)
        self.memory = AsyncMemoryClient(self)
        self.backup = AsyncBackupClient(self)
        self._closed = False

    async def close(self) -> None:
        """Closes the channel; calls made after it raise ClientClosed."""
        self._closed = True
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncMemstore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, op: Unary[T]) -> T:
        self._check_open()
        delays = self._retry.delays() if op.idempotent else iter(())
        # One deadline for the call, its retries and their sleeps: `timeout` bounds the call.
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        while True:
            try:
                method = getattr(self._stubs[op.service], op.method)
                response = await method(
                    op.request, timeout=time_left(deadline), metadata=self._metadata
                )
            except grpc.RpcError as error:
                self._check_open(error)
                delay = retry_delay(error, delays, deadline)
                if delay is None:
                    raise from_rpc_error(error) from error
                await asyncio.sleep(delay)
                self._check_open()
                continue
            except (asyncio.CancelledError, Exception) as error:
                # grpc.aio's UsageError for a call begun on the closed channel, among others.
                self._closed_by_close(error)
                raise
            return op.convert(response)

    def _check_open(self, error: BaseException | None = None) -> None:
        if self._closed:
            raise ClientClosed from error

    def _closed_by_close(self, error: BaseException) -> None:
        """ClientClosed for what close() did to a call in flight: grpc.aio cancels it, and
        the task awaiting it saw a CancelledError nobody sent it (gather and TaskGroup read
        it as their own cancellation). A task that is being cancelled keeps its error."""
        task = asyncio.current_task()
        if self._closed and (task is None or task.cancelling() == 0):
            raise ClientClosed from error

    async def _stream(self, op: Stream[T]) -> AsyncIterator[tuple[list[T], str]]:
        self._check_open()
        # After UNAVAILABLE, or a read that waited past stream_idle_timeout, the stream
        # resumes from the last chunk's token: no row twice.
        resume = Resumption(self._retry, self._idle_timeout)
        while True:
            method = getattr(self._stubs[op.service], op.method)
            failed: grpc.RpcError | None = None
            try:
                call = method(op.request, metadata=self._metadata, **resume.call_options())
            except Exception as error:
                self._closed_by_close(error)
                raise
            try:
                while True:
                    chunk = await asyncio.wait_for(call.read(), resume.read_timeout())
                    if chunk is _EOF:
                        return
                    resume.progressed()
                    yield op.convert(chunk), chunk.next_page_token
                    if not chunk.next_page_token:
                        # The last chunk: the stream is whole. Waiting on for its status,
                        # an UNAVAILABLE there restarted it from the first row (its token is
                        # the empty one), and every row came twice.
                        return
                    op.request.page_token = chunk.next_page_token
            except TimeoutError:
                pass  # the read waited past its timeout: a silent peer (failed stays None)
            except grpc.RpcError as error:
                self._check_open(error)
                failed = error
            except (asyncio.CancelledError, Exception) as error:
                self._closed_by_close(error)
                raise
            finally:
                call.cancel()
            delay = resume.delay(failed)
            if delay is None:
                raise resume.failure(failed, op.request.page_token) from failed
            await asyncio.sleep(delay)
            self._check_open()


class AsyncUserClient:
    """client.user: UserService."""

    def __init__(self, client: AsyncMemstore) -> None:
        self._client = client

    async def add(
        self,
        user_id: str,
        *,
        email: str = "",
        first_name: str = "",
        last_name: str = "",
        metadata: JsonObject | None = None,
    ) -> User:
        """Creates a user. Raises AlreadyExists when the id is taken."""
        return await self._client._call(
            calls.add_user(user_id, email, first_name, last_name, metadata)
        )

    async def get(self, user_id: str) -> User:
        """One user. Raises NotFound."""
        return await self._client._call(calls.get_user(user_id))

    async def update(
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
        return await self._client._call(op)

    async def delete(self, user_id: str) -> None:
        """Deletes the user with all its sessions and messages, atomically. Raises NotFound."""
        await self._client._call(calls.delete_user(user_id))

    async def list(
        self, limit: int = 50, cursor: str | None = None, *, page_number: int = 0
    ) -> UserPage:
        """One page of users, oldest first, and total_size, the number of users.

        Pass next_cursor back as `cursor` for the next page (the fast path), or ask for a
        1-based `page_number` (as Zep's SDK pages; not with a cursor).
        """
        return await self._client._call(calls.list_users(limit, cursor, page_number))

    async def list_chunked(self, chunk_size: int = 100) -> AsyncIterator[builtins.list[User]]:
        """Every user, in chunks, over one server stream, resumed from the last chunk after
        UNAVAILABLE or a silent server. When it gives up, the error's page_token resumes it
        with `export(chunk_size, page_token)`."""
        async for users, _ in self._client._stream(calls.list_users_chunked(chunk_size)):
            yield users

    async def get_sessions(self, user_id: str) -> builtins.list[Session]:
        """All live sessions of a user, oldest first. Raises NotFound for an unknown user."""
        found: builtins.list[Session] = []
        token = ""
        while True:
            page = await self._client._call(calls.user_sessions(user_id, token))
            found += page.sessions
            token = page.next_page_token or ""
            if not token:
                return found

    async def list_sessions(
        self, user_id: str, page_size: int = 50, page_token: str | None = None
    ) -> UserSessionPage:
        """One page of a user's live sessions, oldest first; pass next_page_token back for the
        next. Raises NotFound for an unknown user."""
        op = calls.user_sessions(user_id, page_token or "", page_size)
        return await self._client._call(op)

    def export(
        self, chunk_size: int = 100, page_token: str = "", *, snapshot: str = ""
    ) -> AsyncIterator[tuple[builtins.list[User], str]]:
        """Every user in chunks (ListUsersChunked), each with the token that resumes after it;
        in a snapshot of backup.open_snapshot when one is given."""
        return self._client._stream(calls.list_users_chunked(chunk_size, page_token, snapshot))


class AsyncMemoryClient:
    """client.memory: SessionService (sessions and their messages)."""

    def __init__(self, client: AsyncMemstore) -> None:
        self._client = client

    async def add_session(
        self,
        session_id: str = "",
        *,
        user_id: str | None = None,
        metadata: JsonObject | None = None,
    ) -> Session:
        """Creates a session (the server picks an id when empty). Raises AlreadyExists."""
        return await self._client._call(calls.add_session(session_id, user_id, metadata))

    async def get_session(self, session_id: str, *, show_deleted: bool = False) -> Session:
        """One session. Raises NotFound (also for a soft-deleted one unless show_deleted)."""
        return await self._client._call(calls.get_session(session_id, show_deleted))

    async def update_session(
        self,
        session_id: str,
        metadata: JsonObject | None = None,
        *,
        clear_metadata: bool = False,
    ) -> Session:
        """Merges metadata into the session (a None value removes its key), or with
        `clear_metadata=True` empties it (not with `metadata`)."""
        op = calls.update_session(session_id, metadata, clear_metadata)
        return await self._client._call(op)

    async def delete(self, session_id: str) -> int:
        """Soft-deletes the session and its messages; returns how many messages."""
        return await self._client._call(calls.delete_session(session_id))

    async def list_sessions(
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
        return await self._client._call(op)

    async def add(
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
        return await self._client._call(calls.add_memory(session_id, messages, user_id))

    async def undelete_session(self, session_id: str) -> Session:
        """Restores a soft-deleted session. Raises NotFound, or FailedPrecondition if live."""
        return await self._client._call(calls.undelete_session(session_id))

    async def list_messages(
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
        return await self._client._call(op)

    async def get_message(self, session_id: str, uuid: str) -> Message:
        """One live message of a live session by its uuid. Raises NotFound."""
        return await self._client._call(calls.get_message(session_id, uuid))

    async def update_message(
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
        return await self._client._call(op)

    async def clear(self, session_id: str) -> int:
        """Soft-deletes every message of the session and keeps it; returns how many."""
        return await self._client._call(calls.clear_memory(session_id))

    async def get(
        self, session_id: str, lastn: int = 0, *, relevant_limit: int | None = None
    ) -> Memory:
        """The last `lastn` messages (0: the server's default, 6) and the user-level memory.

        `relevant_limit` memories of the user's other sessions come in relevant_messages and
        as prompt text in context (None: the server's default, 5; 0: none). Unknown
        session: found=False.
        """
        return await self._client._call(calls.get_memory(session_id, lastn, relevant_limit))

    async def search(
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
        return await self._client._call(
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
    ) -> AsyncIterator[tuple[list[Session], str]]:
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
    ) -> AsyncIterator[tuple[list[ExportedMessage], str]]:
        """Every live message of a live session (every message, with its deleted_at, with
        include_deleted) with its session id, in chunks, each with its resume token; in a
        snapshot of backup.open_snapshot when one is given."""
        op = bulk.export_messages(chunk_size, page_token, include_deleted, snapshot)
        return self._client._stream(op)


class AsyncBackupClient:
    """client.backup: BackupService (restore; snapshots for the export streams of a
    backup)."""

    def __init__(self, client: AsyncMemstore) -> None:
        self._client = client

    async def restore(
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
        return await self._client._call(op)

    async def open_snapshot(self, hold_seconds: int = 0) -> Snapshot:
        """Holds the database as it is now (at most `hold_seconds`, 0 for the server's
        default of an hour): the export streams given its `snapshot` read the project as it
        was then, so a backup's users, sessions and messages agree. Release it with
        close_snapshot. Raises FailedPrecondition on a Citus cluster, which has none."""
        return await self._client._call(bulk.open_snapshot(hold_seconds))

    async def close_snapshot(self, snapshot: str) -> bool:
        """Releases a snapshot of open_snapshot; False when it was gone already."""
        return await self._client._call(bulk.close_snapshot(snapshot))

    async def get_source(self) -> BackupSource:
        """The project of the client's API key, and an opaque id of it in the server's
        database: what `memstore backup` records, so that --resume refuses another."""
        return await self._client._call(bulk.get_backup_source())
