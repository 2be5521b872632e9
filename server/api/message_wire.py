"""ExportMessagesResponse entries encoded a batch at a time with numpy: no Python per message.

PostgreSQL hands over a keyset batch of messages as a few values (`export_message_columns`,
sql/export.sql): each variable-length column as one concatenated bytea with an int4 array of
lengths, the fixed-width ones (sequence, uuid, timestamps) as their binary send format.
Here the batch becomes the wire bytes of its `messages` entries (tag 1, length, an
ExportedMessage) with array arithmetic: every field's tag and varints are written into one
scratch row per message, then every piece but the content — scratch bytes, session id,
role, metadata — is gathered into place by one index, and each message's content is
joined in between as the slice of the column it came in (an index per byte of content cost
more than a slice per message: docs/performance.md, "The gather without the contents").
Beyond that slice, only a message with non-empty metadata costs Python: its Struct's
bytes, cached by the jsonb text (docs/performance.md, "Export as bytes").

The bytes are those `SerializeToString` makes of the same ExportedMessage built by
`convert.message_to_proto` (fields in number order, proto3 defaults omitted), proved by
tests/store/test_export_wire.py.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import numpy.typing as npt
from google.protobuf import struct_pb2

from memstore.v1 import session_service_pb2 as pb
from server.api import convert
from server.api.chunking import varint
from server.domain import Message, MessageColumns, MessageKey, WireRows
from server.store.db import load_json

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]

#: Microseconds from the Unix epoch to PostgreSQL's (2000-01-01), the origin of timestamptz's
#: binary format.
_PG_EPOCH_MICROS = 946_684_800_000_000
#: What datetime (and so the object path) can hold: 0001-01-01 to 9999-12-31 23:59:59.999999.
_MIN_MICROS = -62_135_596_800_000_000
_MAX_MICROS = 253_402_300_799_999_999
#: A varint's byte count is 1 + how many of these a value reaches.
_VARINT_STEPS = np.array([1 << (7 * k) for k in range(1, 10)], dtype=np.uint64)
_SHIFTS = np.arange(0, 70, 7, dtype=np.uint64)
_GROUPS = np.arange(11, dtype=np.int64)
#: The RoleType number by a stored role_type's first byte (the CHECK constraint of
#: messages.role_type allows six values, whose first letters differ); norole otherwise.
_ROLE_NUMBERS = np.full(256, convert.role_type_number("norole"), dtype=np.uint8)
for _name in convert.ROLE_TYPE_NUMBERS:
    _ROLE_NUMBERS[ord(_name[0])] = convert.role_type_number(_name)
#: Two lowercase hex digits per byte value.
_HEX = np.frombuffer(b"".join(b"%02x" % i for i in range(256)), dtype=np.uint8).reshape(256, 2)
#: A Struct's bytes by the jsonb text it was made from; cleared when it grows past this.
_STRUCT_CACHE_SIZE = 4096
_structs: dict[bytes, bytes] = {}


#: The fixed-width columns of one message, as export_message_columns packs them.
_FIXED = np.dtype(
    [("sequence", ">i8"), ("uuid", "V16"), ("created", ">i8"), ("updated", ">i8"), ("kind", "S1")]
)
# The scratch row's columns: each region is its tag bytes, then room for a 10-byte varint.
_ENTRY = 0  # 0x0a, varint(ExportedMessage size)
_SID = 11  # 0x0a, varint(session_id size)
_MESSAGE = 22  # 0x12, varint(Message size)
_UUID = 33  # 0x0a, 36, the uuid's text
_ROLE = 71  # 0x12, varint(role size)
_KIND = 82  # 0x18, role_type, 0x22, varint(content size)
_STRUCT = 95  # 0x2a, varint(Struct size)
_CREATED = 106  # 0x32, size, 0x08, varint(seconds) | 0x10, varint(nanos)
_UPDATED = 130
_SEQUENCE = 154  # 0x40, varint(sequence)
_DELETED = 165
_WIDTH = 189


class OutOfRange(Exception):
    """A timestamp the object path cannot load (outside years 1-9999, or infinity)."""


def encode(columns: MessageColumns) -> WireRows[MessageKey]:
    """The batch's messages as ExportMessagesResponse `messages` entries, with each one's size.

    Raises:
        OutOfRange: a timestamp outside what a datetime holds; the caller reads the batch the
            object path's way, which fails (or not) as it always did.
    """
    n = columns.rows
    lengths = np.frombuffer(columns.lengths, dtype=">i4").reshape(n, 4).astype(np.int64)
    sid_len, role_len, content_len, meta_len = lengths.T
    fixed = np.frombuffer(columns.fixed, dtype=_FIXED)
    created = _micros(fixed["created"])
    updated = _micros(fixed["updated"])
    deleted_mask = np.frombuffer(columns.deleted_mask, dtype=np.uint8).astype(bool)
    deleted = np.zeros(n, dtype=np.int64)
    if columns.deleted:
        deleted[deleted_mask] = _micros(np.frombuffer(columns.deleted, dtype=">i8"))
    structs, struct_len = _structs_of(columns.metadata, meta_len)
    sequence = fixed["sequence"].astype(np.int64)

    b = _Batch(n)
    # The pieces in wire order. The entry's and the ExportedMessage's heads come first but
    # are sized last, from what follows them.
    entry_slot = b.piece(_ENTRY)
    sid_head = b.head(_SID, 0x0A, sid_len)
    b.piece(_SID, sid_head)
    b.text(columns.session_ids, sid_len)
    message_slot = b.piece(_MESSAGE)
    # Message: uuid (1), role (2), role_type (3), content (4), metadata (5), created_at (6),
    # updated_at (7), sequence (8), deleted_at (9).
    b.scratch[:, _UUID] = 0x0A
    b.scratch[:, _UUID + 1] = 36
    b.scratch[:, _UUID + 2 : _UUID + 38] = _uuid_text(fixed["uuid"])
    message = np.full(n, 38, dtype=np.int64)  # the sum of the Message's pieces
    b.piece(_UUID, np.full(n, 38, dtype=np.int64))
    message += b.piece(_ROLE, b.head(_ROLE, 0x12, role_len))
    message += b.text(columns.roles, role_len)
    b.scratch[:, _KIND] = 0x18
    b.scratch[:, _KIND + 1] = _ROLE_NUMBERS[np.frombuffer(fixed["kind"].tobytes(), np.uint8)]
    message += b.piece(_KIND, 2 + b.head(_KIND + 2, 0x22, content_len))
    message += b.text(columns.contents, content_len, apart=True)
    message += b.piece(_STRUCT, b.head(_STRUCT, 0x2A, struct_len))
    message += b.text(structs, struct_len)
    message += b.timestamp(_CREATED, 0x32, created, None)
    message += b.timestamp(_UPDATED, 0x3A, updated, None)
    b.scratch[:, _SEQUENCE] = 0x40
    sequence_size = b.varint(_SEQUENCE + 1, sequence.view(np.uint64))
    message += b.piece(_SEQUENCE, np.where(sequence != 0, 1 + sequence_size, 0))
    message += b.timestamp(_DELETED, 0x4A, deleted, deleted_mask)

    b.scratch[:, _MESSAGE] = 0x12
    message_head = 1 + b.varint(_MESSAGE + 1, message.astype(np.uint64))
    b.sizes[message_slot] = message_head
    exported = sid_head + sid_len + message_head + message
    b.scratch[:, _ENTRY] = 0x0A
    entry_head = 1 + b.varint(_ENTRY + 1, exported.astype(np.uint64))
    b.sizes[entry_slot] = entry_head

    key = functools.partial(key_of, columns)
    return WireRows(b.gather(), (entry_head + exported).tolist(), key)


class _Batch:
    """The wire bytes of a batch under construction: a scratch row per message holding every
    tag and varint at fixed columns, the text columns as they came, and the pieces — runs of
    either, per message, in wire order — that make each entry. One text piece may be kept
    apart from the gather's index (`text(..., apart=True)`): it is joined in by slices."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.scratch = np.zeros((n, _WIDTH), dtype=np.uint8)
        self.rows = np.arange(n, dtype=np.int64) * _WIDTH
        self.sources: list[U8] = [self.scratch.reshape(-1)]
        self.source_size = n * _WIDTH
        self.starts: list[I64] = []  # per piece, each message's start in the sources
        self.sizes: list[I64] = []  # per piece, each message's length
        #: The piece kept apart: its position among the pieces, its column's bytes, and
        #: where each message's run starts in them and how long it is.
        self.apart: tuple[int, bytes, I64, I64] | None = None

    def piece(self, column: int, size: I64 | None = None) -> Any:
        """Adds a run of the scratch row starting at `column`; returns its size, or its slot
        when the size is set later."""
        self.starts.append(self.rows + column)
        if size is None:
            self.sizes.append(np.zeros(self.n, dtype=np.int64))
            return len(self.sizes) - 1
        self.sizes.append(size)
        return size

    def text(self, blob: bytes | None, length: I64, *, apart: bool = False) -> I64:
        """Adds each message's run of a concatenated text column; returns the lengths.

        `apart`: the runs are not indexed byte by byte but joined in by `gather` as slices
        of `blob` (one column of a batch at most: its longest, the content)."""
        starts = np.cumsum(length) - length
        if apart:
            self.apart = (len(self.sizes), blob or b"", starts, length)
            self.starts.append(np.zeros(self.n, dtype=np.int64))
            self.sizes.append(np.zeros(self.n, dtype=np.int64))
            return length
        data = np.frombuffer(blob or b"", dtype=np.uint8)
        self.starts.append(self.source_size + starts)
        self.sizes.append(length)
        self.sources.append(data)
        self.source_size += data.size
        return length

    def varint(self, column: int, values: npt.NDArray[np.uint64]) -> I64:
        """Writes each value as a varint at `column` (room for 10 bytes); returns the sizes."""
        size = np.searchsorted(_VARINT_STEPS, values, side="right").astype(np.int64) + 1
        width = int(size.max()) if self.n else 1
        groups = (values[:, None] >> _SHIFTS[None, :width]) & np.uint64(0x7F)
        more = (size[:, None] > _GROUPS[None, 1 : width + 1]).astype(np.uint64) << np.uint64(7)
        self.scratch[:, column : column + width] = groups | more
        return size

    def head(self, column: int, tag: int, length: I64) -> I64:
        """A length-delimited field's tag and length at `column`; its size, 0 when the length
        is 0 (proto3 omits an empty string or message)."""
        self.scratch[:, column] = tag
        size = self.varint(column + 1, length.astype(np.uint64))
        return np.where(length > 0, 1 + size, 0)

    def timestamp(
        self, column: int, tag: int, micros: I64, present: npt.NDArray[np.bool_] | None
    ) -> I64:
        """A Timestamp field as two pieces, [tag, size, 0x08 seconds] and [0x10 nanos], each
        number omitted at 0; absent where `present` is False. Returns its sizes."""
        seconds, rest = np.divmod(micros, 1_000_000)
        nanos = (rest * 1000).astype(np.uint64)
        self.scratch[:, column] = tag
        self.scratch[:, column + 2] = 0x08
        self.scratch[:, column + 13] = 0x10
        has_seconds = (seconds != 0).astype(np.int64)
        has_nanos = (nanos != 0).astype(np.int64)
        seconds_size = (1 + self.varint(column + 3, seconds.view(np.uint64))) * has_seconds
        nanos_size = (1 + self.varint(column + 14, nanos)) * has_nanos
        self.scratch[:, column + 1] = seconds_size + nanos_size
        head = 2 + seconds_size
        if present is not None:
            head = np.where(present, head, 0)
            nanos_size = np.where(present, nanos_size, 0)
        self.piece(column, head)
        self.piece(column + 13, nanos_size)
        size: I64 = head + nanos_size
        return size

    def gather(self) -> bytes:
        """The entries: every piece of every message, in order, as one bytes."""
        table = np.stack(self.sizes, axis=1)  # (message, piece): the piece's length
        indexed = self._indexed(np.stack(self.starts, axis=1).reshape(-1), table.reshape(-1))
        if self.apart is None:
            return indexed
        # Each message's indexed bytes up to the piece apart, then its run of the piece.
        at, blob, starts, lengths = self.apart
        indexed_sizes = table.sum(axis=1)
        cuts = (np.cumsum(indexed_sizes) - indexed_sizes + table[:, :at].sum(axis=1)).tolist()
        runs = (starts + lengths).tolist()
        kept, text = memoryview(indexed), memoryview(blob)
        parts: list[memoryview] = []
        done = 0
        for cut, start, stop in zip(cuts, starts.tolist(), runs, strict=True):
            parts.append(kept[done:cut])
            parts.append(text[start:stop])
            done = cut
        parts.append(kept[done:])
        return b"".join(parts)

    def _indexed(self, starts: I64, sizes: I64) -> bytes:
        # The pieces of the sources, in order, as one bytes gathered by one index.
        kept = sizes > 0
        starts, sizes = starts[kept], sizes[kept]
        if not sizes.size:
            return b""
        dtype = np.int32 if self.source_size < 2**31 else np.int64
        ends = np.cumsum(sizes)
        # Each output byte's index in the sources, as the running sum of steps: 1 within a
        # piece, and at each piece's first byte the jump from the previous piece's last byte
        # (a fill, a scatter and a cumsum: no per-byte repeat and arange).
        index = np.ones(int(ends[-1]), dtype=dtype)
        index[0] = starts[0]
        index[ends[:-1]] = starts[1:] - (starts[:-1] + sizes[:-1]) + 1
        np.cumsum(index, out=index)
        entries: bytes = np.concatenate(self.sources)[index].tobytes()
        return entries


def _micros(pg: npt.NDArray[np.generic]) -> I64:
    # timestamptz's binary value (big-endian micros since 2000) as micros since 1970.
    values = np.asarray(pg, dtype=np.int64)
    if values.size and (
        values.min() < _MIN_MICROS - _PG_EPOCH_MICROS
        or values.max() > _MAX_MICROS - _PG_EPOCH_MICROS
    ):
        raise OutOfRange
    return values + _PG_EPOCH_MICROS


def _varint_size(values: npt.NDArray[np.uint64]) -> I64:
    return np.searchsorted(_VARINT_STEPS, values, side="right").astype(np.int64) + 1


def _uuid_text(raw: npt.NDArray[np.void]) -> U8:
    # 16 bytes each as the canonical 36 characters (8-4-4-4-12 lowercase hex).
    digits = _HEX[np.frombuffer(raw.tobytes(), dtype=np.uint8)].reshape(-1, 32)
    text = np.full((digits.shape[0], 36), ord("-"), dtype=np.uint8)
    for start, stop, at in ((0, 8, 0), (8, 12, 9), (12, 16, 14), (16, 20, 19), (20, 32, 24)):
        text[:, at : at + stop - start] = digits[:, start:stop]
    return text


def _structs_of(metadata: bytes | None, lengths: I64) -> tuple[bytes, I64]:
    # Each message's metadata Struct bytes (none for `{}`) and their sizes: the only Python
    # per message, and only for non-empty metadata; each distinct text is encoded once.
    sizes = np.zeros(lengths.size, dtype=np.int64)
    if metadata is None:
        return b"", sizes
    ends = np.cumsum(lengths)
    data = np.frombuffer(metadata, dtype=np.uint8)
    empty = (lengths == 2) & (data[np.maximum(ends - 2, 0)] == ord("{"))
    todo = np.flatnonzero(~empty)
    if not todo.size:
        return b"", sizes
    cache = _structs
    if len(cache) > _STRUCT_CACHE_SIZE:
        cache.clear()
    parts: list[bytes] = []
    starts = (ends - lengths)[todo].tolist()
    stops = ends[todo].tolist()
    for start, stop in zip(starts, stops, strict=True):
        text = metadata[start:stop]
        encoded = cache.get(text)
        if encoded is None:
            encoded = cache[text] = _struct_bytes(text)
        parts.append(encoded)
    sizes[todo] = [len(p) for p in parts]
    return b"".join(parts), sizes


def _struct_bytes(text: bytes) -> bytes:
    # What message_to_proto puts in Message.metadata, as bytes (empty when it sets nothing).
    struct = struct_pb2.Struct()
    convert.set_struct(struct, load_json(text))
    return struct.SerializeToString()


def key_of(columns: MessageColumns, i: int) -> MessageKey:
    """The key (session_id, sequence) of the batch's `i`-th message: encode's rows' `key`,
    and read before encoding too (ExportMessages asks for the next batch with it)."""
    sid_len = np.frombuffer(columns.lengths, dtype=">i4", count=4 * (i + 1))[::4]
    end = int(sid_len.sum())
    session_ids = columns.session_ids or b""
    sequence = np.frombuffer(columns.fixed, dtype=_FIXED, count=1, offset=i * _FIXED.itemsize)
    return session_ids[end - int(sid_len[-1]) : end].decode(), int(sequence["sequence"][0])


def first(rows: WireRows[MessageKey], count: int) -> WireRows[MessageKey]:
    """The first `count` entries of `rows`."""
    sizes = rows.sizes[:count]
    return WireRows(rows.entries[: sum(sizes)], sizes, rows.key)


def from_messages(messages: list[Message]) -> WireRows[MessageKey]:
    """The object path's entries for the same messages: one ExportedMessage each, serialized."""
    bodies = []
    for m in messages:
        # Built in place, as the object path did: a copied Struct may order its map otherwise.
        exported = pb.ExportedMessage(session_id=m.session_id)
        convert.message_to_proto(m, exported.message)
        bodies.append(exported.SerializeToString())
    entries = [b"\x0a" + varint(len(body)) + body for body in bodies]

    def key(i: int) -> MessageKey:
        return messages[i].session_id, messages[i].sequence

    return WireRows(b"".join(entries), [len(e) for e in entries], key)
