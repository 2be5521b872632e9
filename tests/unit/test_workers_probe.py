"""The port probe that keeps a taken port an error under --workers (SO_REUSEPORT)."""

from __future__ import annotations

import socket

import pytest

from server.serving.workers import probe_port


def test_port_zero_picks_one_free_port_for_every_worker() -> None:
    port = probe_port("127.0.0.1", 0)
    assert port > 0
    # The probe released it: a worker can bind it now.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_a_taken_port_is_refused_even_when_its_holder_allows_sharing() -> None:
    with socket.socket() as holder:
        # Another server that opted into SO_REUSEPORT, as gRPC does by default.
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            probe_port("127.0.0.1", port)
