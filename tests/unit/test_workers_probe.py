"""The port probe that keeps a taken port an error under --workers (SO_REUSEPORT), and
makes `memstore serve` fail on a taken port before it starts anything; start-up errors name
the flag or the environment variable that set the value."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from server.__main__ import main
from server.config import Config
from server.serving.app import _serve_metrics, make_embedder
from server.serving.metrics import Metrics
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


#: Each port setting's flag and variable.
_PORT_VARIABLES = {"--port": "MEMSTORE_PORT", "--http-port": "MEMSTORE_HTTP_PORT"}


@pytest.mark.parametrize("taken", ["--port", "--http-port", "MEMSTORE_PORT", "MEMSTORE_HTTP_PORT"])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_on_a_taken_port_fails_before_postgresql_starts(
    taken: str,
    workers: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Set by its variable, the advice names the variable ("choose another --port" it was).
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        ports = {"--port": "0", "--http-port": "0"}
        if taken in ports:
            ports[taken] = str(port)
        else:
            for variable in _PORT_VARIABLES.values():
                monkeypatch.setenv(variable, "0")
            monkeypatch.setenv(taken, str(port))
            del ports[next(f for f, v in _PORT_VARIABLES.items() if v == taken)]
        argv = ["--host", "127.0.0.1", "--workers", workers]
        said = _serve_fails([*argv, *(i for pair in ports.items() for i in pair)], tmp_path, caplog)
    assert f"port {port} is in use" in said
    assert f"choose another {taken})" in said


def _serve_fails(argv: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> str:
    """What `memstore serve` logged failing at start, before anything started: neither the
    embedded PostgreSQL nor the migrations ran (its data folder was never made)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.delenv("DATABASE_URL", raising=False)
        with caplog.at_level(logging.ERROR, logger="memstore"):
            assert main(["serve", "--data-dir", str(tmp_path), *argv]) == 1
    assert not (tmp_path / "pg").exists()
    return caplog.text


@pytest.mark.parametrize("named", ["--host", "MEMSTORE_HOST"])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_on_a_host_without_address_names_what_set_it(
    named: str,
    workers: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # It was "serve failed: [Errno -2] Name or service not known", naming neither the host
    # nor the flag or variable that set it.
    argv = ["--workers", workers]
    if named == "--host":
        argv += ["--host", "no-such-host.invalid"]
    else:
        monkeypatch.setenv(named, "no-such-host.invalid")
    assert f"{named} 'no-such-host.invalid' has no address" in _serve_fails(argv, tmp_path, caplog)


@pytest.mark.parametrize(
    ("set_by_env", "named"),
    [
        (frozenset(), "--metrics-port"),
        (frozenset({"metrics_port"}), "MEMSTORE_METRICS_PORT"),
    ],
)
def test_a_taken_metrics_port_names_what_set_it(set_by_env: frozenset[str], named: str) -> None:
    # It was OSError's own "[Errno 98] Address already in use", naming no setting.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = Config(metrics_host="127.0.0.1", metrics_port=port, set_by_env=set_by_env)
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}: ") as got:
            _serve_metrics(config, Metrics())
    assert f"(see --metrics-host and {named})" in str(got.value)


@pytest.mark.parametrize(
    ("set_by_env", "named"),
    [(frozenset(), "--embedder"), (frozenset({"embedder"}), "MEMSTORE_EMBEDDER")],
)
def test_a_bad_embedder_names_what_set_it(set_by_env: frozenset[str], named: str) -> None:
    # It named --embedder when MEMSTORE_EMBEDDER had set it.
    with pytest.raises(RuntimeError, match=f"^{named}: the embedding URL 'http://' needs a model"):
        make_embedder(Config(embedder="http://", set_by_env=set_by_env))
