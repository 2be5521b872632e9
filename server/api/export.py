"""ExportSessions and ExportMessages: resumable server streams of keyset batches."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from memstore.v1 import resources_pb2
from memstore.v1 import session_service_pb2 as pb
from server.api import chunking, convert, message_wire, tokens
from server.api import validation as val
from server.api.base import Context, ServicerBase
from server.api.status import stream_errors
from server.domain import MessageColumns, MessageKey, Page, Session, TimeKey, WireRows
from server.errors import Unavailable

#: ExportMessages reads about this many chunks' worth of messages per batch: 1.48x the rows/s
#: of one (server CPU 4.55 -> 3.0 us per message), for ~20 MB more memory while it streams
#: (docs/performance.md, "ExportMessages encoded by columns").
MESSAGE_BATCH_CHUNKS = 4
#: A batch of ExportMessages also ends once its messages hold this many bytes of content and
#: metadata (at least one message), and one of ExportSessions once its sessions hold as many
#: of metadata and ids: the batch sizing by rows measured so far cannot foresee large ones
#: (docs/reliability.md, "ExportMessages held about 18 times a batch's bytes" and
#: "ExportSessions read 1,000 sessions at a time").
BATCH_BYTES = MESSAGE_BATCH_CHUNKS * chunking.MAX_CHUNK_BYTES


class ExportServicer(ServicerBase):
    """The export RPCs of memstore.v1.SessionService (mixed into SessionServicer)."""

    @stream_errors
    async def ExportSessions(
        self, request: pb.ExportSessionsRequest, context: Context
    ) -> AsyncIterator[pb.ExportSessionsResponse]:
        chunk_size, snapshot = _stream_options(request)
        project = self._project(context)
        everything = request.include_deleted
        query = tokens.export_fingerprint("sessions", project, everything)
        async for chunk in chunking.chunks(
            fetch=functools.partial(
                self._store.export_sessions,
                project,
                include_deleted=everything,
                budget=BATCH_BYTES,
                snapshot=snapshot,
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

    # Yields chunks already serialized (the server's serializer sends bytes as they are).
    @stream_errors
    async def ExportMessages(
        self, request: pb.ExportMessagesRequest, context: Context
    ) -> AsyncIterator[chunking.WireChunk]:
        chunk_size, snapshot = _stream_options(request)
        project = self._project(context)
        everything = request.include_deleted
        query = tokens.export_fingerprint("messages", project, everything)
        # Each batch is encoded whole by message_wire from a few values PostgreSQL hands
        # over: no Python object per message (docs/performance.md, "Export as bytes").
        async for chunk in chunking.wire_row_chunks(
            fetch=functools.partial(self._message_batch, project, everything, snapshot),
            key=_last_key,
            encode=functools.partial(self._encoded, project, everything, snapshot),
            token=functools.partial(self._tokens.encode_message_key, query),
            chunk_size=chunk_size,
            after=self._tokens.decode_message_key(request.page_token, query),
            batch_chunks=MESSAGE_BATCH_CHUNKS,
        ):
            yield chunk

    async def _message_batch(
        self,
        project: int,
        everything: bool,
        snapshot: str | None,
        after: MessageKey | None,
        limit: int,
    ) -> Page[_BatchRead]:
        # One keyset batch of ExportMessages as read: none when no message follows. One
        # message more than the batch is read, as export_messages reads it, to know whether
        # another batch follows without a last, empty read.
        columns = await self._store.export_message_columns(
            project,
            after,
            limit + 1,
            include_deleted=everything,
            budget=BATCH_BYTES,
            snapshot=snapshot,
        )
        if columns is None:
            return Page([], has_more=False)
        batch = _BatchRead(columns, min(limit, columns.rows), after)
        # More than the batch read, or ended by bytes: messages follow it; else it is the last.
        return Page([batch], has_more=columns.rows > limit or columns.cut)

    async def _encoded(
        self, project: int, everything: bool, snapshot: str | None, batch: _BatchRead
    ) -> WireRows[MessageKey]:
        # A batch as read, encoded: its first `count` messages as `messages` entries.
        try:
            rows = message_wire.encode(batch.columns)
        except message_wire.OutOfRange:
            return await self._read_as_objects(project, everything, snapshot, batch)
        return message_wire.first(rows, batch.count) if batch.count < batch.columns.rows else rows

    async def _read_as_objects(
        self, project: int, everything: bool, snapshot: str | None, batch: _BatchRead
    ) -> WireRows[MessageKey]:
        # A batch holding a timestamp a datetime cannot hold, read as objects: which fails
        # (or not) exactly as the object path always has. Only the messages the byte budget
        # kept: `limit` of them was up to 4,000 messages of 1 MiB read whole.
        page = await self._store.export_messages(
            project, batch.after, batch.count, include_deleted=everything, snapshot=snapshot
        )
        rows = message_wire.from_messages(page.items)
        if len(rows.sizes) != batch.count or rows.key(batch.count - 1) != _last_key(batch):
            # Written between the two reads: the next batch, already asked for after this
            # one's last message as first read, would lose or repeat messages.
            raise Unavailable(
                "messages of this batch changed while it was read: resume from the last"
                " chunk's token",
                reason="CONCURRENT_WRITES",
            )
        return rows


@dataclass(frozen=True, slots=True)
class _BatchRead:
    # A keyset batch of ExportMessages as PostgreSQL handed it over: its first `count`
    # messages are the batch (one more may have been read), after the key `after`.
    columns: MessageColumns
    count: int
    after: MessageKey | None


def _last_key(batch: _BatchRead) -> MessageKey:
    return message_wire.key_of(batch.columns, batch.count - 1)


def _stream_options(
    request: pb.ExportSessionsRequest | pb.ExportMessagesRequest,
) -> tuple[int, str | None]:
    # The chunk size and the held snapshot (if any) of an export stream's request.
    v = val.Violations()
    size = val.clamp_size(v, "chunk_size", request.chunk_size, val.DEFAULT_CHUNK_SIZE)
    snapshot = val.snapshot(v, "snapshot", request.snapshot)
    v.raise_if_any()
    return size, snapshot


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
