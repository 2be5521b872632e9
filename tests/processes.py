"""The `memstore` command as a real process: run it, serve with it, stop it."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
MEMSTORE = [sys.executable, "-m", "server"]


def run_memstore(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs one `memstore` command to completion; the caller checks its status and output."""
    return subprocess.run(
        [*MEMSTORE, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: How long `memstore serve` may take to say SERVING. A hang guard, not a check of how fast it
#: starts: it loads the embedding model and migrates first, and at a load average of 8 on the
#: shared 2-core machine 30 s was not enough (test_sigterm, against PostgreSQL 15). A server
#: that dies while starting fails at once, whatever this says.
STARTUP_TIMEOUT = 90.0


def _wait_serving(port: int, proc: subprocess.Popen[str], timeout: float = STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"server exited early: {proc.communicate()}"
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise AssertionError("server did not become SERVING in time")


def serve_memstore(
    *args: str, env: dict[str, str], preexec_fn: Callable[[], object] | None = None
) -> tuple[subprocess.Popen[str], int]:
    """Starts `memstore serve` on a free loopback port; returns once health says SERVING.

    `preexec_fn` runs in the child before memstore starts (e.g. to lower a limit).
    """
    port = free_port()
    cmd = [*MEMSTORE, "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=preexec_fn,  # noqa: PLW1509 - only setrlimit, in a child of a test
    )
    _wait_serving(port, proc)
    return proc, port


def stop_memstore(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """Sends SIGTERM and waits for the exit; returns the exit code and everything it printed."""
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out
