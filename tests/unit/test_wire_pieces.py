"""serving/wire.py: a message parsed and serialized in pieces is the message one call makes."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError

from memstore.v1 import resources_pb2 as rpb
from memstore.v1 import session_service_pb2 as ss
from server.serving import wire
from tests.grpc import struct


def _wide(messages: int) -> ss.AddMemoryRequest:
    metadata = struct({f"k{j}": j for j in range(200)})
    request = ss.AddMemoryRequest(session_id="s", user_id="u")
    for i in range(messages):
        request.messages.add(role="a", content=f"m{i}", metadata=metadata)
    return request


def test_a_request_parsed_in_pieces_is_the_one_a_single_parse_makes() -> None:
    request = _wide(100)
    data = request.SerializeToString()
    assert len(data) > 4 * wire.PIECE_BYTES  # several pieces
    assert wire.parse(ss.AddMemoryRequest, data) == ss.AddMemoryRequest.FromString(data)
    # A field after the repeated one, and one larger than a piece, are parsed too.
    tail = ss.AddMemoryRequest(user_id="v", messages=[rpb.Message(content="x" * 100_000)])
    both = data + tail.SerializeToString()
    assert wire.parse(ss.AddMemoryRequest, both) == ss.AddMemoryRequest.FromString(both)


@pytest.mark.parametrize("cut", [b"\xff", b"\x12\x05ab"])
def test_bytes_a_single_parse_refuses_are_refused_in_pieces(cut: bytes) -> None:
    data = _wide(100).SerializeToString() + cut  # a tag with nothing after; a short field
    with pytest.raises(DecodeError):
        ss.AddMemoryRequest.FromString(data)
    with pytest.raises(DecodeError):
        wire.parse(ss.AddMemoryRequest, data)


def test_an_answer_serialized_in_pieces_parses_to_the_same_message() -> None:
    answer = ss.GetMemoryResponse(found=True, context="c")
    answer.session.session_id = "s"
    for i in range(50):
        answer.messages.add(content=f"m{i}", metadata=struct({"i": i}))
    answer.relevant_messages.add(score=0.5).message.content = "r"
    data = wire.serialize(answer)
    assert len(data) == answer.ByteSize()
    assert ss.GetMemoryResponse.FromString(data) == answer
    assert wire.serialized(answer, 0) == answer.SerializeToString()
