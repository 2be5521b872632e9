"""Large protobuf messages parsed and serialized in pieces, each a short call into protobuf's C.

upb parses or serializes a message in one call that holds the GIL throughout: an AddMemory at
the request cap (9 MiB, 800,000 values) took 0.4 s to parse and 0.14 s to serialize (its
ByteSize as long), and in a thread the event loop waited for the GIL as long as on the loop.
Messages concatenate on the wire: merging runs of a request's top-level fields one after the
other (MergeFromString) makes what one parse of the whole makes, and a repeated field's entries
serialize one at a time. A piece holds about PIECE_BYTES, a few ms of C; between pieces the
thread gives the GIL up to the loop when it asks (sys.getswitchinterval).
"""

from __future__ import annotations

from typing import Any

from server import off_loop
from server.api.chunking import varint
from server.serving.malformed import top_level_fields

#: The bytes parsed in one call (a single field larger than this is parsed alone).
PIECE_BYTES = 64 * 1024

_LENGTH_DELIMITED = 2


def parse(message_class: Any, data: bytes) -> Any:
    """`message_class` parsed from `data`, PIECE_BYTES of its top-level fields at a time.

    Raises:
        DecodeError: as `message_class.FromString(data)` raises it; the bytes it cannot read
            are parsed with the fields after the last whole piece, so it sees them.
    """
    message = message_class()
    view = memoryview(data)
    start = 0
    for _, _, _, end in top_level_fields(view):
        if end - start >= PIECE_BYTES:
            message.MergeFromString(view[start:end])
            start = end
    message.MergeFromString(view[start:])
    return message


def serialize(message: Any) -> bytes:
    """`message`'s wire bytes: each entry of a repeated message field serialized alone, the
    other fields together first (head: an order every parser reads as the same message)."""
    pieces = [head(message).SerializeToString()]
    for field, value in message.ListFields():
        if _in_pieces(field):
            tag = varint(field.number << 3 | _LENGTH_DELIMITED)
            for entry in value:
                body = entry.SerializeToString()
                pieces += (tag, varint(len(body)), body)
    return b"".join(pieces)


def head(message: Any) -> Any:
    """A message of `message`'s type holding its fields but its repeated message fields (the
    rows serialize sends, and answer_size.page_rows weighs, one at a time)."""
    first = type(message)()
    for field, value in message.ListFields():
        if _in_pieces(field):
            continue
        if field.is_repeated or field.message_type is not None:
            getattr(first, field.name).MergeFrom(value)
        else:
            setattr(first, field.name, value)
    return first


def serialized(message: Any, size: int) -> bytes:
    """`message`'s wire bytes: in pieces when `size` (an estimate of them) reaches
    OFF_LOOP_BYTES, where the caller runs in a thread, else in one call."""
    if size < off_loop.OFF_LOOP_BYTES:
        data: bytes = message.SerializeToString()
        return data
    return serialize(message)


def _in_pieces(field: Any) -> bool:
    # A repeated message field but a map (whose entries are a map's, not rows).
    return bool(
        field.is_repeated
        and field.message_type is not None
        and not field.message_type.GetOptions().map_entry
    )
