"""SessionService: sessions and their memory (messages)."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterable
from itertools import chain
from typing import Any

from memstore.v1 import session_service_pb2 as pb
from memstore.v1 import session_service_pb2_grpc as pb_grpc
from server import off_loop
from server.api import answer_size, convert, tokens
from server.api import metadata_checks as meta
from server.api import validation as val
from server.api.base import Context, ServicerBase
from server.api.export import ExportServicer
from server.api.search import SearchServicer, add_results, relevant_limit
from server.api.status import unary_errors
from server.api.tokens import PageTokens
from server.api.users import metadata_change
from server.domain import (
    Message,
    MetadataChange,
    NewMessage,
    Page,
    SearchResult,
    Session,
    SessionQuery,
    TimeKey,
)
from server.search.service import Memory, Searcher
from server.serving import wire
from server.store import Store

_METADATA_ONLY = ("metadata",)


# ExportMessages yields chunks already serialized (chunking.WireChunk), not response objects;
# AddMemory, GetMemory, ListSessions, ListMessages and SearchMemory may answer bytes already
# serialized too (off the loop when large), which serving/services.py sends as they are:
# hence the ignored overrides.
class SessionServicer(  # type: ignore[misc]
    SearchServicer, ExportServicer, ServicerBase, pb_grpc.SessionServiceServicer
):
    """memstore.v1.SessionService."""

    def __init__(self, store: Store, tokens: PageTokens, searcher: Searcher) -> None:
        super().__init__(store, tokens)
        self._searcher = searcher

    @unary_errors
    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: Context
    ) -> pb.CreateSessionResponse:
        v = val.Violations()
        val.check_id(v, "session_id", request.session_id, required=False)
        val.check_id(v, "user_id", request.user_id, required=False)
        metadata = meta.metadata(v, "metadata", request.metadata)
        v.raise_if_any()
        session = await self._store.create_session(
            self._project(context),
            request.session_id or uuid.uuid4().hex,
            request.user_id or None,
            metadata,
        )
        return pb.CreateSessionResponse(session=convert.session_to_proto(session))

    @unary_errors
    async def GetSession(
        self, request: pb.GetSessionRequest, context: Context
    ) -> pb.GetSessionResponse:
        _require_session_id(request.session_id)
        session = await self._store.get_session(
            self._project(context), request.session_id, request.show_deleted
        )
        return pb.GetSessionResponse(session=convert.session_to_proto(session))

    @unary_errors
    async def UpdateSession(
        self, request: pb.UpdateSessionRequest, context: Context
    ) -> pb.UpdateSessionResponse:
        v = val.Violations()
        val.check_id(v, "session_id", request.session_id)
        change = _metadata_update(v, request)
        v.raise_if_any()
        project = self._project(context)
        if change is None:
            session = await self._store.get_session(project, request.session_id, False)
        else:
            session = await self._store.update_session(project, request.session_id, change)
        return pb.UpdateSessionResponse(session=convert.session_to_proto(session))

    @unary_errors
    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: Context
    ) -> pb.DeleteSessionResponse:
        _require_session_id(request.session_id)
        count = await self._store.delete_session(self._project(context), request.session_id)
        return pb.DeleteSessionResponse(deleted_messages=count)

    @unary_errors
    async def UndeleteSession(
        self, request: pb.UndeleteSessionRequest, context: Context
    ) -> pb.UndeleteSessionResponse:
        _require_session_id(request.session_id)
        session = await self._store.undelete_session(self._project(context), request.session_id)
        return pb.UndeleteSessionResponse(session=convert.session_to_proto(session))

    @unary_errors
    async def ListSessions(  # type: ignore[override]
        self, request: pb.ListSessionsRequest, context: Context
    ) -> bytes:
        v = val.Violations()
        size, offset = val.page_window(v, request)
        query = _session_query(v, request)
        v.raise_if_any()
        project = self._project(context)
        fingerprint = tokens.sessions_fingerprint(project, query)
        after, total = self._tokens.decode_time_key_total(request.page_token, fingerprint)
        # The first page (or a page_number page) counts; the token carries that total on.
        page = await self._store.list_sessions(
            project,
            query,
            after,
            offset,
            size,
            count=total is None,
            budget=answer_size.list_budget(size, answer_size.PAGE_BYTES),
        )
        total = page.total_size if total is None else total
        # Also after a page_number page: the token continues by keyset from its last row.
        return await answer_size.sessions_page_answer(
            pb.ListSessionsResponse(total_size=total or 0),
            page,
            by_number=offset is not None,
            token=lambda last: self._tokens.encode_time_key(
                fingerprint, _session_key(last, query), total
            ),
        )

    @unary_errors
    async def AddMemory(  # type: ignore[override]
        self, request: pb.AddMemoryRequest, context: Context
    ) -> bytes:
        v = val.Violations()
        val.check_id(v, "session_id", request.session_id)
        val.check_id(v, "user_id", request.user_id, required=False)
        # Near 16 MiB, checking the messages and building the answer take seconds of CPU:
        # in a thread then, so the loop's other callers are not kept waiting (off_loop). The
        # answer echoes the messages: as large as the request.
        size = off_loop.request_bytes.get()
        messages = await off_loop.run(size, _new_messages, v, request)
        v.raise_if_any()
        session, added = await self._store.add_memory(
            self._project(context), request.session_id, request.user_id or None, messages
        )
        return await off_loop.run(size, _add_memory_response, session, added, size)

    @unary_errors
    async def GetMemory(  # type: ignore[override]
        self, request: pb.GetMemoryRequest, context: Context
    ) -> pb.GetMemoryResponse | bytes:
        v = val.Violations()
        val.check_id(v, "session_id", request.session_id)
        lastn = val.clamp_size(v, "lastn", request.lastn, val.DEFAULT_LASTN)
        recall = relevant_limit(v, request)
        v.raise_if_any()
        project = self._project(context)
        memory = await answer_size.read_memory(
            self._searcher, project, request.session_id, lastn, recall
        )
        if memory.session is None:
            # As Zep 1.x (200, no messages; see the proto comment): no session is an empty memory.
            return pb.GetMemoryResponse(found=False)
        # 1,000 messages of wide metadata are seconds of protobuf to build, weigh and
        # serialize: in a thread then (off_loop), the rows' text telling when.
        size = answer_size.text_at_least(
            chain(memory.messages, (r.message for r in memory.relevant)), off_loop.OFF_LOOP_BYTES
        )
        response = await off_loop.run(size, _memory_response, memory)
        if memory.relevant_cut:
            raise await answer_size.refuse_cut_recall(
                self._searcher,
                memory,
                (project, request.session_id, recall),
                messages=_rows_size(response.messages),
                measure=_results_size,
                content_budget=lambda size: size + 1,  # content is part of each row
                asked=f"the last {len(memory.messages)} messages and {recall} memories",
            )
        return await off_loop.run(size, _checked_memory, response, size)

    @unary_errors
    async def ListMessages(  # type: ignore[override]
        self, request: pb.ListMessagesRequest, context: Context
    ) -> bytes:
        v = val.Violations()
        val.check_id(v, "session_id", request.session_id)
        size, offset = val.page_window(v, request)
        v.raise_if_any()
        project = self._project(context)
        fingerprint = tokens.messages_fingerprint(project, request.session_id)
        after = self._tokens.decode_sequence(request.page_token, fingerprint)
        page = await self._store.list_messages(
            project, request.session_id, after, size, offset=offset, budget=answer_size.PAGE_BYTES
        )
        # A page is up to 4 MiB: built, weighed and serialized in a thread when large.
        return await answer_size.page_answer(
            answer_size.text_at_least(page.items, off_loop.OFF_LOOP_BYTES),
            functools.partial(_messages_page, page),
            "messages",
            page,
            by_number=offset is not None,
            token=lambda last: self._tokens.encode_sequence(fingerprint, last.sequence),
        )

    @unary_errors
    async def GetMessage(
        self, request: pb.GetMessageRequest, context: Context
    ) -> pb.GetMessageResponse:
        v = val.Violations()
        val.check_id(v, "session_id", request.session_id)
        message_uuid = val.message_uuid(v, "uuid", request.uuid)
        v.raise_if_any()
        message = await self._store.get_message(
            self._project(context), request.session_id, message_uuid
        )
        return pb.GetMessageResponse(message=convert.message_to_proto(message))

    @unary_errors
    async def UpdateMessage(
        self, request: pb.UpdateMessageRequest, context: Context
    ) -> pb.UpdateMessageResponse:
        v = val.Violations()
        val.check_id(v, "session_id", request.session_id)
        message_uuid = val.message_uuid(v, "uuid", request.uuid)
        change = _metadata_update(v, request)
        v.raise_if_any()
        project = self._project(context)
        if change is None:
            message = await self._store.get_message(project, request.session_id, message_uuid)
        else:
            message = await self._store.update_message(
                project, request.session_id, message_uuid, change
            )
        return pb.UpdateMessageResponse(message=convert.message_to_proto(message))

    @unary_errors
    async def ClearMemory(
        self, request: pb.ClearMemoryRequest, context: Context
    ) -> pb.ClearMemoryResponse:
        _require_session_id(request.session_id)
        count = await self._store.clear_memory(self._project(context), request.session_id)
        return pb.ClearMemoryResponse(deleted_messages=count)


def _rows_size(rows: Iterable[Any]) -> int:
    # A repeated field's rows as check_answer weighs them.
    return sum(row.ByteSize() for row in rows)


def _results_size(results: list[SearchResult]) -> int:
    # GetMemory's memories as check_answer weighs them in its answer.
    response = pb.GetMemoryResponse()
    add_results(response.relevant_messages, results)
    return _rows_size(response.relevant_messages)


def _require_session_id(session_id: str) -> None:
    v = val.Violations()
    val.check_id(v, "session_id", session_id)
    v.raise_if_any()


def _metadata_update(
    v: val.Violations, request: pb.UpdateSessionRequest | pb.UpdateMessageRequest
) -> MetadataChange | None:
    # The same rule for sessions and messages: with a mask naming "metadata", replace it
    # (clear it when empty); without a mask, merge when metadata is set; else no change.
    paths = val.update_mask(v, request.update_mask, _METADATA_ONLY)
    patch = meta.metadata(v, "metadata", request.metadata)
    if paths is not None:
        return metadata_change(patch) if "metadata" in paths else None
    return MetadataChange(patch) if request.HasField("metadata") else None


def _session_query(v: val.Violations, request: pb.ListSessionsRequest) -> SessionQuery:
    val.check_id(v, "user_id", request.user_id, required=False)
    field, descending = val.order_by(v, request.order_by)
    bounds = {
        name: val.timestamp(v, name, getattr(request, name)) if request.HasField(name) else None
        for name in ("created_after", "created_before", "updated_after", "updated_before")
    }
    val.time_range(
        v, "created_after", bounds["created_after"], "created_before", bounds["created_before"]
    )
    val.time_range(
        v, "updated_after", bounds["updated_after"], "updated_before", bounds["updated_before"]
    )
    contains = (
        meta.containment(v, "metadata_contains", request.metadata_contains)
        if request.HasField("metadata_contains")
        else None
    )
    return SessionQuery(
        user_id=request.user_id or None,
        show_deleted=request.show_deleted,
        order_field=field,
        descending=descending,
        created_after=bounds["created_after"],
        created_before=bounds["created_before"],
        updated_after=bounds["updated_after"],
        updated_before=bounds["updated_before"],
        metadata_contains=contains,
    )


def _session_key(session: Session, query: SessionQuery) -> TimeKey:
    stamp = session.updated_at if query.order_field == "updated_at" else session.created_at
    return stamp, session.session_id


def _add_memory_response(session: Session, added: list[Message], size: int) -> bytes:
    response = pb.AddMemoryResponse(session=convert.session_to_proto(session))
    for message in added:
        convert.message_to_proto(message, response.messages.add())
    return wire.serialized(response, size)


def _memory_response(memory: Memory) -> pb.GetMemoryResponse:
    assert memory.session is not None  # GetMemory answers found=False before
    response = pb.GetMemoryResponse(
        found=True,
        session=convert.session_to_proto(memory.session),
        context=memory.context,
        relevant_unavailable=memory.relevant_unavailable,
    )
    for message in memory.messages:
        convert.message_to_proto(message, response.messages.add())
    add_results(response.relevant_messages, memory.relevant)
    return response


def _checked_memory(response: pb.GetMemoryResponse, size: int) -> bytes:
    return answer_size.checked_answer(
        response,
        size,
        f"the last {len(response.messages)} messages and "
        f"{len(response.relevant_messages)} memories",
        lastn="messages",
        relevant_limit="relevant_messages",
    )


def _messages_page(page: Page[Message]) -> pb.ListMessagesResponse:
    response = pb.ListMessagesResponse(total_size=page.total_size or 0)
    for message in page.items:
        convert.message_to_proto(message, response.messages.add())
    return response


def _new_messages(v: val.Violations, request: pb.AddMemoryRequest) -> list[NewMessage]:
    count = len(request.messages)
    if not 1 <= count <= val.MAX_MESSAGES:
        v.add("messages", f"has {count} messages; send 1 to {val.MAX_MESSAGES}")
        return []
    messages = []
    first_of: dict[str, int] = {}
    for i, message in enumerate(request.messages):
        prefix = f"messages[{i}]"
        val.check_name(v, f"{prefix}.role", message.role)
        role_type = val.role_type(v, f"{prefix}.role_type", message.role_type)
        val.check_content(v, f"{prefix}.content", message.content)
        metadata = meta.metadata(v, f"{prefix}.metadata", message.metadata)
        message_uuid = _message_uuid(v, f"{prefix}.uuid", message.uuid, i, first_of)
        messages.append(
            NewMessage(message.role, role_type, message.content, metadata, message_uuid)
        )
    return messages


def _message_uuid(
    v: val.Violations, field: str, value: str, index: int, first_of: dict[str, int]
) -> str | None:
    # Optional: the server makes one when empty. Canonical, so that a retry spelling the
    # same UUID otherwise names the same message.
    if not value:
        return None
    canonical = val.message_uuid(v, field, value)
    if canonical in first_of:
        v.add(field, f"repeats messages[{first_of[canonical]}].uuid; each message needs its own")
    first_of.setdefault(canonical, index)
    return canonical
