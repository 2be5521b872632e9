"""`memstore serve` and its HTTP port: on by default, off with --no-http, shared by --workers,
refused when taken, stopped cleanly by SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg

from tests.processes import free_port, run_memstore, serve_memstore, stop_memstore
from tests.test_process import _until_a_lock_waiter


def _env(url: str) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": url}


def _two_free_ports() -> int:
    while True:
        first = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", first + 1))
                return first
            except OSError:
                continue


def _http_requests(metrics_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("memstore_http_requests_total{")
    )


def test_workers_serve_http_from_every_process_and_stop_cleanly(clean_db: str) -> None:
    http_port, metrics = free_port(), _two_free_ports()
    proc, _ = serve_memstore(
        "--workers", "2", "--http-port", str(http_port), "--purge-interval", "0",
        "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics), env=_env(clean_db),
    )  # fmt: skip
    try:
        for i in range(40):  # a new connection each time: the kernel spreads them over workers
            with httpx.Client(base_url=f"http://127.0.0.1:{http_port}") as client:
                made = client.post(
                    "/api/v2/sessions/w/memory", json={"messages": [{"content": f"m{i}"}]}
                )
                assert made.status_code == 200, made.text
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}") as client:
            listed = client.get("/api/v2/sessions/w/messages?limit=100").json()
        assert listed["total_count"] == 40
        # Each worker keeps its own counters on its own metrics port: both served HTTP.
        served = [_http_requests(metrics), _http_requests(metrics + 1)]
        assert sum(served) == 41 and all(n > 0 for n in served), served
    finally:
        code, out = stop_memstore(proc)
    assert code == 0, out


def test_no_http_leaves_the_port_closed(clean_db: str) -> None:
    http_port = free_port()
    proc, _ = serve_memstore("--no-http", "--http-port", str(http_port), env=_env(clean_db))
    try:
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", http_port)) != 0
    finally:
        code, out = stop_memstore(proc)
    assert code == 0, out


def test_a_taken_http_port_fails_start_with_one_clear_line(clean_db: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        for workers in ("1", "2"):
            run = run_memstore(
                "serve", "--host", "127.0.0.1", "--port", "0", "--http-port", str(taken),
                "--workers", workers, env=_env(clean_db),
            )  # fmt: skip
            assert run.returncode == 1, run.stderr
            assert f"cannot listen on 127.0.0.1:{taken}" in run.stderr
            assert "Traceback" not in run.stderr


def test_sigterm_lets_an_in_flight_http_request_finish(clean_db: str) -> None:
    http_port = free_port()
    proc, _ = serve_memstore(
        "--http-port", str(http_port), "--purge-interval", "0", "--grace-period", "10",
        env=_env(clean_db),
    )  # fmt: skip
    base = f"http://127.0.0.1:{http_port}"
    assert httpx.post(f"{base}/api/v2/users", json={"user_id": "busy"}).status_code == 201
    with psycopg.connect(clean_db) as blocker, ThreadPoolExecutor(1) as pool:
        # Hold the row lock so the PATCH below is in flight when SIGTERM arrives.
        blocker.execute("SELECT 1 FROM users WHERE user_id = 'busy' FOR UPDATE")
        pending = pool.submit(
            httpx.patch, f"{base}/api/v2/users/busy", json={"email": "b@x.org"}, timeout=20
        )
        assert _until_a_lock_waiter(clean_db), "the PATCH never reached the database"
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None, "the server must wait for the in-flight request"
        blocker.rollback()
        reply = pending.result()
    assert reply.status_code == 200 and reply.json()["email"] == "b@x.org", reply.text
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
