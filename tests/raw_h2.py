"""A minimal HTTP/2 client (cleartext, prior knowledge) that speaks gRPC framing by hand, for
tests that need what no gRPC client does: a flow-control window left shut (an initial window
of 0 that is never opened), so that the server cannot send the answers it has (WindowShut);
a request announced whole and sent in part, then stalled (Sender)."""

from __future__ import annotations

import asyncio
import struct

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY = 0, 1, 3, 4, 6, 7
_END_STREAM, _ACK, _END_HEADERS = 1, 1, 4
_SETTINGS_INITIAL_WINDOW_SIZE, _SETTINGS_ENABLE_PUSH = 4, 2


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


async def _next_frame(reader: asyncio.StreamReader) -> tuple[int, int, int, bytes]:
    """The next frame the server sent: its type, flags, stream and payload."""
    head = await reader.readexactly(9)
    payload = await reader.readexactly(int.from_bytes(head[:3], "big"))
    return head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, payload


def _length(n: int) -> bytes:
    # HPACK's integer with a 7-bit prefix (the Huffman bit left 0).
    if n < 127:
        return bytes([n])
    out = [127]
    n -= 127
    while n >= 128:
        out.append((n & 127) | 128)
        n >>= 7
    return bytes([*out, n])


def _hpack(headers: list[tuple[str, str]]) -> bytes:
    # Each a literal without indexing, its name new: no table state to keep.
    block = b""
    for name, value in headers:
        key, val = name.encode(), value.encode()
        block += b"\x00" + _length(len(key)) + key + _length(len(val)) + val
    return block


class WindowShut:
    """One connection whose every stream's window is 0 and stays 0: the server can send
    headers and trailers (not flow controlled) but no message."""

    def __init__(self) -> None:
        #: The error code of each stream the server reset.
        self.resets: dict[int, int] = {}
        #: Whether the server sent GOAWAY; `closed` is set once it closed the connection.
        self.goaway = False
        self.closed = asyncio.Event()
        self._next = 1
        self._reader: asyncio.Task[None] | None = None

    async def open(self, port: int) -> WindowShut:
        self._r, self._w = await asyncio.open_connection("127.0.0.1", port)
        settings = struct.pack(">HI", _SETTINGS_INITIAL_WINDOW_SIZE, 0)
        settings += struct.pack(">HI", _SETTINGS_ENABLE_PUSH, 0)
        self._w.write(_PREFACE + _frame(_SETTINGS, 0, 0, settings))
        self._reader = asyncio.create_task(self._read())
        return self

    async def call(
        self, method: str, request: bytes, extra: tuple[tuple[str, str], ...] = ()
    ) -> int:
        """Sends one unary request to `method` (/package.Service/Method), with `extra` headers
        (ones no gRPC client sends, such as a malformed grpc-timeout); returns its stream."""
        stream, self._next = self._next, self._next + 2
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", method),
            (":authority", "127.0.0.1"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *extra,
        ]
        self._w.write(_frame(_HEADERS, _END_HEADERS, stream, _hpack(headers)))
        message = b"\x00" + struct.pack(">I", len(request)) + request
        self._w.write(_frame(_DATA, _END_STREAM, stream, message))
        await self._w.drain()
        return stream

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self._w.close()

    async def _read(self) -> None:
        try:
            while True:
                kind, flags, stream, payload = await _next_frame(self._r)
                if kind == _RST_STREAM:
                    self.resets[stream] = int.from_bytes(payload, "big")
                elif kind == _GOAWAY:
                    self.goaway = True
                elif kind == _SETTINGS and not flags & _ACK:
                    self._w.write(_frame(_SETTINGS, _ACK, 0))
                elif kind == _PING and not flags & _ACK:
                    self._w.write(_frame(_PING, _ACK, 0, payload))
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed.set()


_WINDOW_UPDATE = 8
_MAX_FRAME = 16384
_DEFAULT_WINDOW = 65535


class Sender:
    """One connection that sends request bodies only as the server's flow-control windows
    let it, as any HTTP/2 client must: what the server buffers is what it opened its windows
    to. Records which streams the server ended (trailers or a reset), and how many bytes of
    each it took."""

    def __init__(self) -> None:
        #: Each stream the server ended, with its trailers (END_STREAM) or a reset.
        self.ended: set[int] = set()
        #: Each stream the server reset: it takes no more of it.
        self.reset: set[int] = set()
        #: The bytes of DATA sent on each stream (gRPC framing included).
        self.sent: dict[int, int] = {}
        self.closed = asyncio.Event()
        self._settings = asyncio.Event()
        self._changed = asyncio.Event()
        self._initial = _DEFAULT_WINDOW
        self._connection = _DEFAULT_WINDOW
        self._windows: dict[int, int] = {}
        self._next = 1
        self._reader: asyncio.Task[None] | None = None

    async def open(self, port: int) -> Sender:
        self._r, self._w = await asyncio.open_connection("127.0.0.1", port)
        settings = struct.pack(">HI", _SETTINGS_ENABLE_PUSH, 0)
        self._w.write(_PREFACE + _frame(_SETTINGS, 0, 0, settings))
        self._reader = asyncio.create_task(self._read())
        await asyncio.wait_for(self._settings.wait(), 10)
        return self

    async def start(
        self, method: str, announced: int | None, headers: tuple[tuple[str, str], ...]
    ) -> int:
        """Opens a stream to `method` (/package.Service/Method) with `headers` added, and sends
        the prefix of a message of `announced` bytes; returns the stream. With `announced`
        None the stream is ended at once, no message sent."""
        stream, self._next = self._next, self._next + 2
        block = _hpack(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", method),
                (":authority", "127.0.0.1"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                *headers,
            ]
        )
        self._windows[stream] = self._initial
        self.sent[stream] = 0
        if announced is None:
            self._w.write(_frame(_HEADERS, _END_HEADERS | _END_STREAM, stream, block))
            await self._w.drain()
            return stream
        self._w.write(_frame(_HEADERS, _END_HEADERS, stream, block))
        await self.send(stream, b"\x00" + struct.pack(">I", announced), stall=5)
        return stream

    async def send(self, stream: int, data: bytes, *, stall: float, end: bool = False) -> int:
        """Sends what of `data` the windows let through, waiting up to `stall` seconds at a
        time for them to open; stops early once the server ended the stream. Returns the
        bytes sent."""
        done = 0
        while done < len(data) and stream not in self.ended:
            room = min(self._windows[stream], self._connection, _MAX_FRAME, len(data) - done)
            if room <= 0:
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), stall)
                except TimeoutError:
                    break
                continue
            last = end and done + room == len(data)
            piece = data[done : done + room]
            self._w.write(_frame(_DATA, _END_STREAM if last else 0, stream, piece))
            self._windows[stream] -= room
            self._connection -= room
            self.sent[stream] += room
            done += room
            await self._w.drain()
            await asyncio.sleep(0)  # what the server answered is read as it comes
        return done

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self._w.close()

    def _settle(self, payload: bytes) -> None:
        for at in range(0, len(payload) - 5, 6):
            key, value = struct.unpack(">HI", payload[at : at + 6])
            if key == _SETTINGS_INITIAL_WINDOW_SIZE:
                for stream in self._windows:
                    self._windows[stream] += value - self._initial
                self._initial = value
        self._w.write(_frame(_SETTINGS, _ACK, 0))
        self._settings.set()

    async def _read(self) -> None:
        try:
            while True:
                kind, flags, stream, payload = await _next_frame(self._r)
                if kind == _RST_STREAM:
                    self.reset.add(stream)
                if kind == _RST_STREAM or (kind == _HEADERS and flags & _END_STREAM):
                    self.ended.add(stream)
                elif kind == _WINDOW_UPDATE:
                    grant = int.from_bytes(payload, "big") & 0x7FFFFFFF
                    if stream == 0:
                        self._connection += grant
                    elif stream in self._windows:
                        self._windows[stream] += grant
                elif kind == _SETTINGS and not flags & _ACK:
                    self._settle(payload)
                elif kind == _PING and not flags & _ACK:
                    self._w.write(_frame(_PING, _ACK, 0, payload))
                self._changed.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed.set()
