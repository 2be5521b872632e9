"""UserService: users, their listing, the chunked export and their sessions."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from memstore.v1 import user_service_pb2 as pb
from memstore.v1 import user_service_pb2_grpc as pb_grpc
from server.api import convert, tokens
from server.api import validation as val
from server.api.base import Context, ServicerBase
from server.api.status import stream_errors, unary_errors
from server.domain import MetadataChange, Page, TimeKey, UserChanges, UserRecord, from_micros
from server.errors import MemstoreError

#: A chunk of ListUsersChunked stops growing before it passes this many serialized bytes.
MAX_CHUNK_BYTES = 256 * 1024
_USER_FIELDS = ("email", "first_name", "last_name", "metadata")


class UserServicer(ServicerBase, pb_grpc.UserServiceServicer):
    """memstore.v1.UserService."""

    @unary_errors
    async def CreateUser(
        self, request: pb.CreateUserRequest, context: Context
    ) -> pb.CreateUserResponse:
        v = val.Violations()
        val.check_id(v, "user_id", request.user_id)
        for name in ("email", "first_name", "last_name"):
            val.check_text(v, name, getattr(request, name))
        metadata = val.metadata(v, "metadata", request.metadata)
        v.raise_if_any()
        user = await self._store.create_user(
            self._project(context),
            request.user_id,
            request.email,
            request.first_name,
            request.last_name,
            metadata,
        )
        return pb.CreateUserResponse(user=convert.user_to_proto(user))

    @unary_errors
    async def GetUser(self, request: pb.GetUserRequest, context: Context) -> pb.GetUserResponse:
        v = val.Violations()
        val.check_id(v, "user_id", request.user_id)
        v.raise_if_any()
        user = await self._store.get_user(self._project(context), request.user_id)
        return pb.GetUserResponse(user=convert.user_to_proto(user))

    @unary_errors
    async def UpdateUser(
        self, request: pb.UpdateUserRequest, context: Context
    ) -> pb.UpdateUserResponse:
        changes = _user_changes(request)
        project = self._project(context)
        if changes == UserChanges():
            # Nothing to change: answer with the user as it is (NOT_FOUND when absent).
            user = await self._store.get_user(project, request.user_id)
        else:
            user = await self._store.update_user(project, request.user_id, changes)
        return pb.UpdateUserResponse(user=convert.user_to_proto(user))

    @unary_errors
    async def DeleteUser(
        self, request: pb.DeleteUserRequest, context: Context
    ) -> pb.DeleteUserResponse:
        v = val.Violations()
        val.check_id(v, "user_id", request.user_id)
        v.raise_if_any()
        counts = await self._store.delete_user(self._project(context), request.user_id)
        return pb.DeleteUserResponse(
            deleted_sessions=counts.sessions, deleted_messages=counts.messages
        )

    @unary_errors
    async def ListUsers(
        self, request: pb.ListUsersRequest, context: Context
    ) -> pb.ListUsersResponse:
        v = val.Violations()
        size = val.clamp_size(v, "page_size", request.page_size, val.DEFAULT_PAGE_SIZE)
        v.raise_if_any()
        project = self._project(context)
        query = tokens.users_fingerprint(project)
        after = self._tokens.decode_time_key(request.page_token, query)
        page = await self._store.list_user_records(project, after, size)
        response = pb.ListUsersResponse()
        users = response.users
        for record in page.items:
            convert.add_user_record(users, record)
        if page.has_more and page.items:
            response.next_page_token = self._tokens.encode_time_key(query, _key(page.items[-1]))
        return response

    @stream_errors
    async def ListUsersChunked(
        self, request: pb.ListUsersChunkedRequest, context: Context
    ) -> AsyncIterator[pb.ListUsersChunkedResponse]:
        v = val.Violations()
        chunk_size = val.clamp_size(v, "chunk_size", request.chunk_size, val.DEFAULT_CHUNK_SIZE)
        v.raise_if_any()
        project = self._project(context)
        query = tokens.users_fingerprint(project)
        after = self._tokens.decode_time_key(request.page_token, query)
        chunk = pb.ListUsersChunkedResponse()
        users, count, size = chunk.users, 0, 0
        last: UserRecord | None = None
        meter = _Meter()
        add = convert.add_user_record
        # The per-user loop is the export's hot path: locals, no calls it can do without.
        async for batch in self._user_batches(project, after, chunk_size, meter):
            batch_bytes = 0
            for record in batch:
                body = add(users, record).ByteSize()
                # Bytes the entry takes in the chunk: tag, length varint, body.
                entry_size = 1 + (body.bit_length() + 6) // 7 + body if body else 2
                batch_bytes += entry_size
                count += 1
                if (count > chunk_size or size + entry_size > MAX_CHUNK_BYTES) and count > 1:
                    # This user starts the next chunk: the current one is complete and, since
                    # a user follows it, not the last; its token resumes right after `last`.
                    del users[-1]
                    assert last is not None
                    chunk.next_page_token = self._tokens.encode_time_key(query, _key(last))
                    yield chunk
                    chunk = pb.ListUsersChunkedResponse()
                    users, count, size = chunk.users, 1, 0
                    add(users, record)
                size += entry_size
                last = record
            meter.add(batch_bytes, len(batch))
        if count:
            yield chunk

    async def _user_batches(
        self, project: int, after: TimeKey | None, chunk_size: int, meter: _Meter
    ) -> AsyncIterator[list[UserRecord]]:
        # Keyset batches: a pooled connection is held only while one batch is read, never while
        # the caller is slow to take chunks. The next batch is read while this one is turned
        # into protos, so PostgreSQL's work overlaps Python's; memory holds two batches.
        first = self._store.list_user_records(project, after, chunk_size)
        pending: asyncio.Future[Page[UserRecord]] | None = asyncio.ensure_future(first)
        try:
            while pending is not None:
                page = await pending
                pending = None
                if page.has_more and page.items:
                    after = _key(page.items[-1])
                    limit = meter.batch_limit(chunk_size)
                    pending = asyncio.ensure_future(
                        self._store.list_user_records(project, after, limit)
                    )
                yield page.items
        finally:
            # The caller went away (or failed) with a batch still pending: cancel it, and
            # collect its outcome either way so no "exception never retrieved" is logged.
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, MemstoreError):
                    await pending

    @unary_errors
    async def ListUserSessions(
        self, request: pb.ListUserSessionsRequest, context: Context
    ) -> pb.ListUserSessionsResponse:
        v = val.Violations()
        val.check_id(v, "user_id", request.user_id)
        size = val.clamp_size(v, "page_size", request.page_size, val.DEFAULT_PAGE_SIZE)
        v.raise_if_any()
        project = self._project(context)
        query = tokens.user_sessions_fingerprint(project, request.user_id)
        after = self._tokens.decode_time_key(request.page_token, query)
        page = await self._store.list_user_sessions(project, request.user_id, after, size)
        response = pb.ListUserSessionsResponse()
        for session in page.items:
            convert.session_to_proto(session, response.sessions.add())
        if page.has_more and page.items:
            last = page.items[-1]
            response.next_page_token = self._tokens.encode_time_key(
                query, (last.created_at, last.session_id)
            )
        return response


def _key(record: UserRecord) -> TimeKey:
    return from_micros(record[5]), record[0]


class _Meter:
    """Average serialized size of the users streamed so far, to size the next batch."""

    def __init__(self) -> None:
        self.bytes = 0
        self.users = 0

    def add(self, size: int, users: int) -> None:
        self.bytes += size
        self.users += users

    def batch_limit(self, chunk_size: int) -> int:
        # Large users make a chunk hold fewer of them; read about one chunk's bytes per batch
        # so that memory stays near one chunk whatever the rows weigh.
        average = max(1, self.bytes // max(1, self.users))
        return max(1, min(chunk_size, MAX_CHUNK_BYTES // average + 1))


def _user_changes(request: pb.UpdateUserRequest) -> UserChanges:
    v = val.Violations()
    val.check_id(v, "user_id", request.user_id)
    mask = val.update_mask(v, request.update_mask, _USER_FIELDS)
    for name in ("email", "first_name", "last_name"):
        val.check_text(v, name, getattr(request, name))
    metadata = val.metadata(v, "metadata", request.metadata)
    v.raise_if_any()
    if mask is None:
        return UserChanges(
            email=request.email if request.HasField("email") else None,
            first_name=request.first_name if request.HasField("first_name") else None,
            last_name=request.last_name if request.HasField("last_name") else None,
            metadata=MetadataChange(metadata) if request.HasField("metadata") else None,
        )
    # A named field the request leaves unset is cleared: its proto default is "".
    return UserChanges(
        email=request.email if "email" in mask else None,
        first_name=request.first_name if "first_name" in mask else None,
        last_name=request.last_name if "last_name" in mask else None,
        metadata=metadata_change(metadata) if "metadata" in mask else None,
    )


def metadata_change(metadata: dict[str, object]) -> MetadataChange:
    """What naming "metadata" in an update mask does: merge a non-empty patch, else clear."""
    if metadata:
        return MetadataChange(metadata)
    return MetadataChange({}, replace=True)
