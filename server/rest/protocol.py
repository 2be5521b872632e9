"""The HTTP connection: uvicorn's httptools protocol with bounds on a request's head and body.

uvicorn bounds neither. A connection that never finished a request's head was held for as
long as the client liked (no bytes at all, or a header byte now and then: each byte stops
uvicorn's keep-alive timer), and header lines were kept without limit before the app saw the
request, so before authentication: 200 MB of them took the server's RSS from 95 to 330 MB
over one connection (tests/rest/test_slow_clients.py). Bounds in the manner of Apache's
mod_reqtimeout: the head within HEAD_SECONDS and MAX_HEAD_BYTES; the body (RestApp reads it,
server/rest/app.py) within BODY_SECONDS plus one second per BODY_MIN_RATE bytes received.

Nor does uvicorn bound an answer its client does not read: it is kept whole in the transport's
buffer, and its close (the keep-alive timer's, this head timer's) waits for that buffer to be
sent, so 60 connections that never read a 4 MB answer held 130 MB until the clients left, and
a pipelined request's answer waited in uvicorn's send() holding its call against
--max-calls-in-flight. A connection whose client reads less than WRITE_MIN_BYTES of its
waiting answers in WRITE_STALL_SECONDS is reset (tests/rest/test_unread_answers.py), and one
idle or timed out with answers unsent is reset at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import http
import json
import socket
import struct
import termios
import uuid
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.api.status import http_status
from server.errors import (
    InvalidArgument,
    MemstoreError,
    RequestHeadTooLarge,
    RequestTimeout,
    ResourceExhausted,
    UrlTooLong,
)
from server.rest.error_body import error_body
from server.serving.connections import MAX_CONNECTIONS
from server.serving.observability import REQUEST_ID_KEY

#: The most bytes of a request's head (request line and headers) before it is refused; Zep's
#: SDKs send a few hundred. Counted exactly over the request line and header lines parsed
#: (each line's name, value and 4 bytes of framing); a line still unparsed is counted by the
#: reads that carry it, so one without end is cut off at most one read (256 KiB) past it.
MAX_HEAD_BYTES = 64 * 1024
#: The longest request target (path and query) read. An id is at most 256 characters, 3 KiB
#: percent-encoded; httptools cannot parse a target past 64 KiB (uvicorn answered that in
#: plain text).
MAX_URL_BYTES = 16 * 1024
#: Seconds a request's head may take to arrive, from the connection's start or the end of
#: the answer before it.
HEAD_SECONDS = 20.0
#: Seconds a request's body may take to arrive, before BODY_MIN_RATE extends it.
BODY_SECONDS = 20.0
#: Bytes of body per second of extra time: a 16 MiB body may take 20 s + 2,048 s.
BODY_MIN_RATE = 8 * 1024
#: While more than the transport's high-water mark (64 KiB) of answers waits to be sent, or
#: any of it once the connection is closing, the client must read WRITE_MIN_BYTES of it (or
#: all that is left) in each WRITE_STALL_SECONDS, or the connection is reset: at least
#: about 2 KiB/s.
WRITE_STALL_SECONDS = 30.0
WRITE_MIN_BYTES = 64 * 1024
#: The ioctl reading a socket's bytes not yet acknowledged (Linux's SIOCOUTQ), if any.
_OUTQ: int | None = getattr(termios, "TIOCOUTQ", None)

#: Told of each refusal the connection answers itself, before the app sees a request (the app
#: counts and logs it, server/rest/app.py): the error, the request's method ("" when not yet
#: read), the peer, the seconds since the head's time began, and the answer's request id.
OnRefused = Callable[[MemstoreError, str, str, float, str], None]


def head_too_large() -> RequestHeadTooLarge:
    """The refusal of a head past MAX_HEAD_BYTES."""
    return RequestHeadTooLarge(
        f"the request head (request line and headers) is larger than {MAX_HEAD_BYTES} bytes"
    )


def url_too_long() -> UrlTooLong:
    """The refusal of a request target past MAX_URL_BYTES."""
    return UrlTooLong(f"the request's URL is longer than {MAX_URL_BYTES} bytes")


def malformed() -> InvalidArgument:
    """The refusal of bytes httptools cannot parse as a request."""
    return InvalidArgument.field(
        "request", "is not an HTTP/1.1 request", reason="MALFORMED_REQUEST"
    )


class _Refused(Exception):
    """Raised from a parser callback to stop the parser at a refused head."""


def body_timeout() -> RequestTimeout:
    """The refusal of a body that arrives slower than BODY_SECONDS and BODY_MIN_RATE allow."""
    return RequestTimeout(
        f"the request body did not arrive in time: {BODY_SECONDS:g} s, plus 1 s per "
        f"{BODY_MIN_RATE} bytes received",
        reason="REQUEST_BODY_TIMEOUT",
    )


def error_bytes(error: MemstoreError, rid: str) -> bytes:
    """A whole HTTP answer of `error` that closes the connection: the body every REST error
    has, and request id `rid` as every answer has (made here: the head was refused unread)."""
    status = http_status(error)
    body = json.dumps(error_body(error)).encode()
    head = (
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
        "content-type: application/json\r\n"
        f"{REQUEST_ID_KEY}: {rid}\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class BoundedHttpProtocol(HttpToolsProtocol):
    """httptools' protocol refusing a head past MAX_HEAD_BYTES (431), closing a connection
    whose head does not arrive within HEAD_SECONDS (408 once it began), and one that sends
    more than MAX_HEAD_BYTES of trailers, and resetting one whose client does not read its
    answers (WRITE_STALL_SECONDS). Each refusal it answers goes to `refused`, as the
    app never sees those requests (bounded_protocol's class tells the app)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Between a request's first byte and the end of its headers.
        self._in_head = False
        #: Bytes of the unfinished head, counted by reads that neither began nor ended it.
        self._head_bytes = 0
        #: Bytes of the head's request line and header lines parsed (see MAX_HEAD_BYTES).
        self._parsed_bytes = 0
        #: Requests begun so far on the connection: whether a read began one.
        self._begun = 0
        #: Between the end of a request's headers and the end of its body.
        self._in_body = False
        #: Whether the read being parsed carried body bytes.
        self._fed_body = False
        #: Bytes of reads after the head that carried no body: trailers, chunk framing.
        self._other_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        #: Armed while answers wait for a client that reads none of them (WRITE_STALL_SECONDS).
        self._stall_timer: asyncio.TimerHandle | None = None
        #: Bytes unsent when the stall timer was armed.
        self._unsent = 0
        #: When the current head's time began (the timer was armed): a refusal's latency.
        self._head_since = 0.0
        #: The refusal a parser callback raised _Refused for (send_400_response answers it).
        self._refusal: MemstoreError | None = None

    #: Connections this process keeps open on the port (--max-connections): one more is
    #: answered SERVER_OVERLOADED and closed as it is made (bounded_protocol sets it).
    max_connections = MAX_CONNECTIONS

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # counts it in self.connections
        self._arm_head_timer()
        if len(self.connections) > self.max_connections:
            self._refuse(
                ResourceExhausted(
                    f"server overloaded: {self.max_connections} connections are open "
                    "(--max-connections); retry with backoff",
                    reason="SERVER_OVERLOADED",
                )
            )

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        self._disarm_stall_timer()
        super().connection_lost(exc)  # ends a send() waiting to write: the call is over

    def data_received(self, data: bytes) -> None:
        in_head, in_body, begun = self._in_head, self._in_body, self._begun
        self._fed_body = False
        super().data_received(data)
        if self.transport.is_closing():
            return
        # Only a read that neither began nor ended a head is counted whole: one that began
        # or ended it may carry the end of a body or the start of one, or (pipelined) whole
        # requests before the head still unfinished. Lines parsed are counted exactly
        # (on_url, on_header); these reads only cut off a line without end.
        if in_head and self._in_head and begun == self._begun:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(head_too_large())
        # Trailer fields are kept as headers are (a chunked body's, after its last
        # chunk); a read within a body that carried none of it is counted the same way.
        elif in_body and self._in_body and not self._fed_body:
            self._other_bytes += len(data)
            if self._other_bytes > MAX_HEAD_BYTES:
                self._close()  # mid-request: no answer can follow the body

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._in_body = True, False
        self._head_bytes = self._other_bytes = 0
        self._parsed_bytes = len("DELETE  HTTP/1.1\r\n")  # the request line but its target
        self._begun += 1

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._parsed_bytes += len(url)  # checked at the next header, or with the head

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        if not self._in_head:
            return  # a trailer field: counted by the reads that carry it
        self._parsed_bytes += len(name) + len(value) + len(": \r\n")
        if self._parsed_bytes > MAX_HEAD_BYTES and self._refusal is None:
            # A URL past its own limit is what made the head too large: named as such.
            too_long = len(self.url) > MAX_URL_BYTES
            self._refusal = url_too_long() if too_long else head_too_large()
            raise _Refused  # feed_data raises HttpParserError: send_400_response answers

    def on_headers_complete(self) -> None:
        self._in_head, self._in_body = False, True
        self._disarm_head_timer()
        # Checked once the head is in, so the answer is read before the connection closes
        # (closed on unread bytes, it is reset); a target still arriving past MAX_HEAD_BYTES
        # is refused as any head that large.
        if len(self.url) > MAX_URL_BYTES:
            self._refusal = url_too_long()
            raise _Refused  # feed_data raises HttpParserError: send_400_response answers
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        """What uvicorn calls for bytes httptools cannot parse (or a head refused while it
        was parsed): answered in JSON as every REST error, not uvicorn's plain text."""
        del msg  # "Invalid HTTP request received.", which uvicorn has logged
        self._refuse(self._refusal or malformed())

    def on_body(self, body: bytes) -> None:
        self._fed_body = True
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_body = False
        super().on_message_complete()

    def on_response_complete(self) -> None:
        next_waits = bool(self.pipeline)
        if self.transport.is_closing():  # the answer said "connection: close"
            self._watch_unsent()
        super().on_response_complete()
        if not next_waits and not self.transport.is_closing():
            # The next head's time starts now; a body the answer left unread (a refusal
            # before it was read) is not a head, and is closed with the connection.
            self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_since = self.loop.time()
        self._head_timer = self.loop.call_later(HEAD_SECONDS, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._in_head and not self.transport.get_write_buffer_size():
            self._refuse(
                RequestTimeout(
                    f"the request head did not arrive within {HEAD_SECONDS:g} s",
                    reason="REQUEST_HEAD_TIMEOUT",
                )
            )
        else:  # an idle kept-alive connection, or a client that reads no answer
            self.timeout_keep_alive_handler()

    def timeout_keep_alive_handler(self) -> None:
        """uvicorn's keep-alive timer (5 s idle after an answer): closed, or reset when the
        client has not read all of the answers (a close would wait for it to read them)."""
        if self.transport.is_closing():
            return
        if self.transport.get_write_buffer_size():
            self._reset()
        else:
            self.transport.close()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._arm_stall_timer()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._disarm_stall_timer()
        if self.transport.is_closing():
            self._watch_unsent()  # what is left (under the low-water mark) gets its own time

    def _close(self) -> None:
        """Closes the connection once what was written is sent (within WRITE_STALL_SECONDS)."""
        self.transport.close()
        self._watch_unsent()

    def _watch_unsent(self) -> None:
        # A closing transport waits for its buffer to be sent without end, and below the
        # high-water mark it calls neither pause_writing nor resume_writing.
        if self._stall_timer is None and self.transport.get_write_buffer_size():
            self._arm_stall_timer()

    def _arm_stall_timer(self) -> None:
        self._disarm_stall_timer()
        self._unsent = self._unsent_bytes()
        self._stall_timer = self.loop.call_later(WRITE_STALL_SECONDS, self._stalled)

    def _stalled(self) -> None:
        # Nothing is written while the timer runs (uvicorn's send waits for resume_writing),
        # so the buffer shrinks only by what the client read.
        self._stall_timer = None
        read = self._unsent - self._unsent_bytes()
        if read >= min(WRITE_MIN_BYTES, self._unsent):
            self._arm_stall_timer()  # a slow reader, not a stalled one
        else:
            self._reset()

    def _disarm_stall_timer(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _unsent_bytes(self) -> int:
        """Bytes written and not yet acknowledged by the client: the transport's buffer and
        the kernel's send queue (up to 4 MiB, read from before the transport's buffer moves)."""
        unsent = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is not None and _OUTQ is not None:
            with contextlib.suppress(OSError, ValueError):  # no such ioctl: the buffer's alone
                queued = fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0")
                unsent += int(struct.unpack("i", queued)[0])
        return unsent

    def _reset(self) -> None:
        """Drops what is unsent and resets the connection: the kernel's copy goes too (with
        SO_LINGER 0), and uvicorn's send() waiting to write returns, so the call ends."""
        self._stall_timer = None
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def _refuse(self, error: MemstoreError) -> None:
        # Answered only where no other answer is being written on this connection; only an
        # answered refusal is counted (the other one's request was never read, nor answered).
        if self.cycle is None or self.cycle.response_complete:
            rid = uuid.uuid4().hex
            self.transport.write(error_bytes(error, rid))
            peer = "%s:%d" % self.client if self.client else ""  # noqa: UP031
            self.refused(error, self._method(), peer, self.loop.time() - self._head_since, rid)
        self._close()
        self._disarm_head_timer()

    def refused(
        self, error: MemstoreError, method: str, peer: str, elapsed: float, rid: str
    ) -> None:
        """Told of each refusal answered here (see OnRefused); nothing is done with it."""

    def _method(self) -> str:
        # The request line's method, once httptools has read it (one of its fixed list, so
        # a bounded label); "" when the bytes refused came before the target or were no
        # request: the parser then names its first method, DELETE, for none.
        # uvicorn empties it at each request's start, and makes it at the first one's: a
        # connection refused as it is made (--max-connections) has none.
        if not getattr(self, "url", b""):
            return ""
        return str(self.parser.get_method().decode("ascii", "replace"))


def bounded_protocol(
    on_refused: OnRefused, max_connections: int = MAX_CONNECTIONS
) -> type[BoundedHttpProtocol]:
    """BoundedHttpProtocol telling `on_refused` of each refusal it answers, and keeping at
    most `max_connections` open (uvicorn makes one protocol per connection from a class, so
    both are the class's)."""

    class Telling(BoundedHttpProtocol):
        def refused(
            self, error: MemstoreError, method: str, peer: str, elapsed: float, rid: str
        ) -> None:
            on_refused(error, method, peer, elapsed, rid)

    Telling.max_connections = max_connections
    return Telling
