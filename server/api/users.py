"""UserService: users, their listing, the chunked export and their sessions."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

from memstore.v1 import user_service_pb2 as pb
from memstore.v1 import user_service_pb2_grpc as pb_grpc
from server import off_loop
from server.api import answer_size, chunking, convert, tokens
from server.api import metadata_checks as meta
from server.api import validation as val
from server.api.base import Context, ServicerBase
from server.api.status import stream_errors, unary_errors
from server.domain import (
    USER_RECORD_METADATA,
    MetadataChange,
    TimeKey,
    UserChanges,
    UserRecord,
    from_micros,
)

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
            val.check_name(v, name, getattr(request, name))
        metadata = meta.metadata(v, "metadata", request.metadata)
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
    async def ListUsers(  # type: ignore[override]
        self, request: pb.ListUsersRequest, context: Context
    ) -> bytes:
        v = val.Violations()
        size, offset = val.page_window(v, request)
        v.raise_if_any()
        project = self._project(context)
        query = tokens.users_fingerprint(project)
        after, total = self._tokens.decode_time_key_total(request.page_token, query)
        # As ListSessions: the first page (or a page_number page) counts, the token carries it.
        page = await self._store.list_user_records(
            project,
            after,
            size,
            offset=offset,
            count=total is None,
            budget=answer_size.list_budget(size, answer_size.PAGE_BYTES),
        )
        total = page.total_size if total is None else total

        def build() -> pb.ListUsersResponse:
            response = pb.ListUsersResponse(total_size=total or 0)
            users = response.users
            for record in page.items:
                convert.add_user_record(users, record)
            return response

        return await answer_size.page_answer(
            answer_size.metadata_at_least(
                (r[USER_RECORD_METADATA] for r in page.items), off_loop.OFF_LOOP_BYTES
            ),
            build,
            "users",
            page,
            by_number=offset is not None,
            token=lambda last: self._tokens.encode_time_key(query, _key(last), total),
        )

    # Yields chunks already serialized (the server's serializer sends bytes as they are).
    @stream_errors
    async def ListUsersChunked(  # type: ignore[override]
        self, request: pb.ListUsersChunkedRequest, context: Context
    ) -> AsyncIterator[chunking.WireChunk]:
        v = val.Violations()
        chunk_size = val.clamp_size(v, "chunk_size", request.chunk_size, val.DEFAULT_CHUNK_SIZE)
        snapshot = val.snapshot(v, "snapshot", request.snapshot)
        v.raise_if_any()
        project = self._project(context)
        query = tokens.users_fingerprint(project)
        after = self._tokens.decode_time_key(request.page_token, query)
        # Each chunk is sent as the bytes PostgreSQL encoded (users.wire, migration 0040),
        # one value per chunk: no Python object per user (docs/performance.md, "Export as
        # bytes").
        async for chunk in chunking.wire_chunks(
            fetch=functools.partial(self._store.list_user_chunk, project, snapshot=snapshot),
            fetch_rows=functools.partial(self._store.list_user_wire, project, snapshot=snapshot),
            token=functools.partial(self._tokens.encode_time_key, query),
            chunk_size=chunk_size,
            after=after,
        ):
            yield chunk

    @unary_errors
    async def ListUserSessions(  # type: ignore[override]
        self, request: pb.ListUserSessionsRequest, context: Context
    ) -> bytes:
        v = val.Violations()
        val.check_id(v, "user_id", request.user_id)
        size = val.clamp_size(v, "page_size", request.page_size, val.DEFAULT_PAGE_SIZE)
        v.raise_if_any()
        project = self._project(context)
        query = tokens.user_sessions_fingerprint(project, request.user_id)
        after = self._tokens.decode_time_key(request.page_token, query)
        budget = answer_size.list_budget(size, answer_size.PAGE_BYTES)
        page = await self._store.list_user_sessions(
            project, request.user_id, after, size, budget=budget
        )
        return await answer_size.sessions_page_answer(
            pb.ListUserSessionsResponse(),
            page,
            by_number=False,
            token=lambda last: self._tokens.encode_time_key(
                query, (last.created_at, last.session_id)
            ),
        )


def _key(record: UserRecord) -> TimeKey:
    return from_micros(record[5]), record[0]


def _user_changes(request: pb.UpdateUserRequest) -> UserChanges:
    v = val.Violations()
    val.check_id(v, "user_id", request.user_id)
    mask = val.update_mask(v, request.update_mask, _USER_FIELDS)
    for name in ("email", "first_name", "last_name"):
        val.check_name(v, name, getattr(request, name))
    metadata = meta.metadata(v, "metadata", request.metadata)
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
    """What naming "metadata" in an update mask does: replace the stored metadata with the
    request's (keys set to null left out, as a create leaves them), clear it when empty. A
    field mask replaces the fields it names (AIP-134), and it is the way out of a merge the
    metadata limit refuses (METADATA_TOO_LARGE): until 2026-12-02 a non-empty one merged."""
    return MetadataChange(metadata, replace=True)
