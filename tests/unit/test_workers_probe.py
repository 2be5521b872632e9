"""The port probe that keeps a taken port an error under --workers (SO_REUSEPORT), and
makes `memstore serve` fail on a taken port before it starts anything."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from server.__main__ import main
from server.serving.ports import probe_port


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


@pytest.mark.parametrize("taken", ["--port", "--http-port"])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_on_a_taken_port_fails_before_postgresql_starts(
    taken: str,
    workers: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        ports = {"--port": "0", "--http-port": "0", taken: str(port)}
        argv = ["serve", "--host", "127.0.0.1", "--data-dir", str(tmp_path), "--workers", workers]
        argv += [item for pair in ports.items() for item in pair]
        with caplog.at_level(logging.ERROR, logger="memstore"):
            assert main(argv) == 1
    assert f"port {port} is in use" in caplog.text
    assert f"choose another {taken})" in caplog.text
    # Neither the embedded PostgreSQL nor the migrations ran: its data folder was never made.
    assert not (tmp_path / "pg").exists()
