"""A real HTTP server on loopback speaking OpenAI's /v1/embeddings, for the remote embedder's
tests: what it answers is set per test, and it records what it was asked."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class FakeServer:
    """What /v1/embeddings answers, and what it was asked."""

    url: str
    requests: list[tuple[dict[str, str], Any]] = field(default_factory=list)
    status: int = 200
    body: bytes | None = None  # replaces the computed answer when set
    dims: int = 3
    delay: float = 0.0
    #: When an Event, each request waits until it is set (at most a minute) before `delay`:
    #: a model that answers when the test says, not after a time a loaded machine outlasts.
    hold: threading.Event | None = None
    #: A request holding a longer text is refused with 400, as a model refuses one past its
    #: context (OpenAI: "maximum context length").
    max_chars: int | None = None
    #: A request holding a text that contains this fails with 500, as llama.cpp fails one
    #: input past its physical batch size (and whatever is sent with it).
    fail_on: str | None = None


def answer(texts: list[str], dims: int) -> dict[str, Any]:
    """Vectors that are not unit length, listed in reverse: the client must sort and
    normalise."""
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": [float(len(text) + 1)] + [1.0] * (dims - 1),
        }
        for i, text in enumerate(texts)
    ]
    return {"object": "list", "model": "m", "data": data[::-1]}


@contextlib.contextmanager
def serving() -> Iterator[FakeServer]:
    """The server, on a free port, until the block ends."""
    state = FakeServer(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            request = json.loads(self.rfile.read(length))
            state.requests.append((dict(self.headers), request))
            if state.hold is not None:
                state.hold.wait(timeout=60)
            time.sleep(state.delay)
            if self.path != "/v1/embeddings":
                self.send_error(404)
                return
            body, status = state.body, state.status
            if state.max_chars is not None and any(
                len(text) > state.max_chars for text in request["input"]
            ):
                message = f"input is longer than {state.max_chars} characters"
                body, status = json.dumps({"error": {"message": message}}).encode(), 400
            if state.fail_on is not None and any(state.fail_on in t for t in request["input"]):
                message = "input is too large to process. increase the physical batch size"
                error = {"code": 500, "message": message, "type": "server_error"}
                body, status = json.dumps({"error": error}).encode(), 500
            if body is None:
                body = json.dumps(answer(request["input"], state.dims)).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(body)  # a client that timed out has gone

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep the test output clean

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1/embeddings"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
