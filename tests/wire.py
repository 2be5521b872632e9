"""Protobuf wire bytes built by hand, for requests Python's protobuf cannot or will not build."""

from __future__ import annotations

import struct as binary


def varint(value: int) -> bytes:
    """A base-128 varint."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2) carrying `payload` as is."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def nested_struct(levels: int) -> bytes:
    """A Struct of `levels` nested objects, {"a": {"a": ... 1}}, as bytes: protobuf in
    Python cannot even build the deeper ones (grpcurl and other languages can)."""
    value = b"\x11" + binary.pack("<d", 1.0)  # Value.number_value
    struct_bytes = b""
    for _ in range(levels):
        entry = field(1, b"a") + field(2, value)  # a Struct.fields map entry
        struct_bytes = field(1, entry)
        value = field(5, struct_bytes)  # Value.struct_value
    return struct_bytes
