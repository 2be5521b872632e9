"""ExportSessions and ExportMessages: resumable server streams of keyset batches."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from memstore.v1 import resources_pb2
from memstore.v1 import session_service_pb2 as pb
from server.api import chunking, convert, tokens
from server.api import validation as val
from server.api.base import Context, ServicerBase
from server.api.status import stream_errors
from server.domain import Message, MessageKey, Session, TimeKey


class ExportServicer(ServicerBase):
    """The export RPCs of memstore.v1.SessionService (mixed into SessionServicer)."""

    @stream_errors
    async def ExportSessions(
        self, request: pb.ExportSessionsRequest, context: Context
    ) -> AsyncIterator[pb.ExportSessionsResponse]:
        chunk_size = _chunk_size(request.chunk_size)
        project = self._project(context)
        everything = request.include_deleted
        query = tokens.export_fingerprint("sessions", project, everything)
        async for chunk in chunking.chunks(
            fetch=functools.partial(
                self._store.export_sessions, project, include_deleted=everything
            ),
            key=_session_key,
            new_chunk=pb.ExportSessionsResponse,
            entries=_sessions,
            add=_add_session,
            token=functools.partial(self._tokens.encode_time_key, query),
            chunk_size=chunk_size,
            after=self._tokens.decode_time_key(request.page_token, query),
        ):
            yield chunk

    @stream_errors
    async def ExportMessages(
        self, request: pb.ExportMessagesRequest, context: Context
    ) -> AsyncIterator[pb.ExportMessagesResponse]:
        chunk_size = _chunk_size(request.chunk_size)
        project = self._project(context)
        everything = request.include_deleted
        query = tokens.export_fingerprint("messages", project, everything)
        async for chunk in chunking.chunks(
            fetch=functools.partial(
                self._store.export_messages, project, include_deleted=everything
            ),
            key=_message_key,
            new_chunk=pb.ExportMessagesResponse,
            entries=_messages,
            add=_add_message,
            token=functools.partial(self._tokens.encode_message_key, query),
            chunk_size=chunk_size,
            after=self._tokens.decode_message_key(request.page_token, query),
        ):
            yield chunk


def _chunk_size(requested: int) -> int:
    v = val.Violations()
    size = val.clamp_size(v, "chunk_size", requested, val.DEFAULT_CHUNK_SIZE)
    v.raise_if_any()
    return size


def _session_key(session: Session) -> TimeKey:
    return session.created_at, session.session_id


def _sessions(
    chunk: pb.ExportSessionsResponse,
) -> RepeatedCompositeFieldContainer[resources_pb2.Session]:
    return chunk.sessions


def _add_session(
    sessions: RepeatedCompositeFieldContainer[resources_pb2.Session], session: Session
) -> resources_pb2.Session:
    return convert.session_to_proto(session, sessions.add())


def _message_key(message: Message) -> MessageKey:
    return message.session_id, message.sequence


def _messages(
    chunk: pb.ExportMessagesResponse,
) -> RepeatedCompositeFieldContainer[pb.ExportedMessage]:
    return chunk.messages


def _add_message(
    messages: RepeatedCompositeFieldContainer[pb.ExportedMessage], message: Message
) -> pb.ExportedMessage:
    entry = messages.add(session_id=message.session_id)
    convert.message_to_proto(message, entry.message)
    return entry
