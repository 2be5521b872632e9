"""ExportSessions and ExportMessages: resumable server streams of keyset batches."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

from google.protobuf.message import Message as ProtoMessage

from memstore.v1 import resources_pb2
from memstore.v1 import session_service_pb2 as pb
from server.api import convert, tokens
from server.api import validation as val
from server.api.base import Context, ServicerBase
from server.api.status import stream_errors
from server.domain import Message, MessageKey, Page, Session, TimeKey

#: A chunk stops growing before it passes this many serialized bytes (as ListUsersChunked).
MAX_CHUNK_BYTES = 256 * 1024

Row = TypeVar("Row")
Key = TypeVar("Key")
Entry = TypeVar("Entry", bound=ProtoMessage)


class Chunker(Generic[Row, Key, Entry]):
    """Reads rows in keyset batches and groups their protos into byte-bounded chunks.

    A batch is read on a pooled connection that goes back to the pool before any chunk is
    sent, so a slow consumer pins no connection and no transaction; memory holds about one
    chunk. Cancellation needs nothing here: grpc.aio cancels the task at its next await.
    """

    def __init__(
        self,
        fetch: Callable[[Key | None, int], Awaitable[Page[Row]]],
        key: Callable[[Row], Key],
        entry: Callable[[Row], Entry],
        chunk_size: int,
    ) -> None:
        self._fetch, self._key, self._entry = fetch, key, entry
        self._chunk_size = chunk_size
        self._bytes = 0
        self._rows = 0

    async def chunks(self, after: Key | None) -> AsyncIterator[tuple[list[Entry], Key | None]]:
        """(entries, key to resume after) per chunk; the key is None on the last chunk."""
        entries: list[Entry] = []
        size = 0
        last: Key | None = None
        async for row in self._rows_after(after):
            entry = self._entry(row)
            entry_size = field_size(entry.ByteSize())
            self._bytes += entry_size
            self._rows += 1
            full = len(entries) >= self._chunk_size or size + entry_size > MAX_CHUNK_BYTES
            if full and entries:
                # A row follows this chunk, so it is not the last: it resumes after `last`.
                yield entries, last
                entries, size = [], 0
            entries.append(entry)
            size += entry_size
            last = self._key(row)
        if entries:
            yield entries, None

    async def _rows_after(self, after: Key | None) -> AsyncIterator[Row]:
        limit = self._chunk_size
        while True:
            page = await self._fetch(after, limit)
            for row in page.items:
                yield row
            if not page.has_more or not page.items:
                return
            after = self._key(page.items[-1])
            limit = self._batch_limit()

    def _batch_limit(self) -> int:
        # Large rows make a chunk hold fewer of them; read about one chunk's bytes per batch.
        average = max(1, self._bytes // max(1, self._rows))
        return max(1, min(self._chunk_size, MAX_CHUNK_BYTES // average + 1))


def field_size(size: int) -> int:
    """Bytes a repeated message entry of `size` bytes takes in its parent: tag, length, body."""
    return 1 + (size.bit_length() + 6) // 7 + size if size else 2


def _session_key(session: Session) -> TimeKey:
    return session.created_at, session.session_id


def _message_key(message: Message) -> MessageKey:
    return message.session_id, message.sequence


def _exported(message: Message) -> pb.ExportedMessage:
    return pb.ExportedMessage(
        session_id=message.session_id, message=convert.message_to_proto(message)
    )


class ExportServicer(ServicerBase):
    """The export RPCs of memstore.v1.SessionService (mixed into SessionServicer)."""

    @stream_errors
    async def ExportSessions(
        self, request: pb.ExportSessionsRequest, context: Context
    ) -> AsyncIterator[pb.ExportSessionsResponse]:
        chunk_size = _chunk_size(request.chunk_size)
        project = self._project(context)
        query = tokens.export_fingerprint("sessions", project)
        after = self._tokens.decode_time_key(request.page_token, query)

        async def fetch(key: TimeKey | None, limit: int) -> Page[Session]:
            return await self._store.export_sessions(project, key, limit)

        chunker: Chunker[Session, TimeKey, resources_pb2.Session] = Chunker(
            fetch, _session_key, convert.session_to_proto, chunk_size
        )
        async for entries, last in chunker.chunks(after):
            token = "" if last is None else self._tokens.encode_time_key(query, last)
            yield pb.ExportSessionsResponse(sessions=entries, next_page_token=token)

    @stream_errors
    async def ExportMessages(
        self, request: pb.ExportMessagesRequest, context: Context
    ) -> AsyncIterator[pb.ExportMessagesResponse]:
        chunk_size = _chunk_size(request.chunk_size)
        project = self._project(context)
        query = tokens.export_fingerprint("messages", project)
        after = self._tokens.decode_message_key(request.page_token, query)

        async def fetch(key: MessageKey | None, limit: int) -> Page[Message]:
            return await self._store.export_messages(project, key, limit)

        chunker: Chunker[Message, MessageKey, pb.ExportedMessage] = Chunker(
            fetch, _message_key, _exported, chunk_size
        )
        async for entries, last in chunker.chunks(after):
            token = "" if last is None else self._tokens.encode_message_key(query, last)
            yield pb.ExportMessagesResponse(messages=entries, next_page_token=token)


def _chunk_size(requested: int) -> int:
    v = val.Violations()
    size = val.clamp_size(v, "chunk_size", requested, val.DEFAULT_CHUNK_SIZE)
    v.raise_if_any()
    return size
