"""`memstore serve` as a real process: its metrics endpoint and its log move with calls."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request

import grpc
import psycopg

from memstore.v1 import (
    resources_pb2,
    session_service_pb2,
    session_service_pb2_grpc,
    user_service_pb2,
    user_service_pb2_grpc,
)
from tests.processes import ROOT, free_port, serve_memstore, stop_memstore


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def test_serve_exposes_metrics_and_writes_json_access_logs(clean_db: str) -> None:
    metrics_port = free_port()
    env = {**os.environ, "DATABASE_URL": clean_db, "MEMSTORE_METRICS_PORT": str(metrics_port)}
    proc, port = serve_memstore("--purge-interval", "0", "--metrics-host", "127.0.0.1", env=env)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            users = user_service_pb2_grpc.UserServiceStub(channel)
            users.CreateUser(user_service_pb2.CreateUserRequest(user_id="m"), timeout=10)
        text = _metrics(metrics_port)
    finally:
        code, out = stop_memstore(proc)
    assert code == 0, out
    line = (
        'memstore_grpc_requests_total{code="OK",method="/memstore.v1.UserService/CreateUser"} 1.0'
    )
    assert line in text
    assert "memstore_db_pool_pool_size" in text
    # Recall is only ever unavailable on Citus: here the series are there, at 0.
    assert "\nmemstore_recall_paused 0.0\n" in text
    assert "\nmemstore_recall_unavailable_total 0.0\n" in text
    access = [json.loads(x) for x in out.splitlines() if '"memstore.access"' in x]
    create = [a for a in access if a.get("method", "").endswith("/CreateUser")]
    assert create and create[0]["code"] == "OK" and len(create[0]["request_id"]) == 32


def _pool_series_in_readme() -> list[str]:
    # The pool's series as README's "Metrics" paragraph lists them (gauges bare, counters with
    # their _total), so that the list and the endpoint cannot drift apart.
    text = (ROOT / "README.md").read_text()
    listed = text.split("as `memstore_db_pool_*`:", 1)[1].split("tests/unit/", 1)[0]
    names = dict.fromkeys(re.findall(r"`([a-z_]+)`", listed))  # in order, each once
    return [f"memstore_db_pool_{name}" for name in names]


def _sample(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not in the scrape"
    return float(found.group(1))


def test_every_pool_series_is_there_from_the_first_scrape(clean_db: str) -> None:
    # psycopg_pool's get_stats leaves a counter out until its first event (requests_errors,
    # connections_errors, ... appeared only once something failed), and usage_ms always:
    # psycopg_pool counts it only in its connection() block, which the store does not use.
    series = _pool_series_in_readme()
    assert len(series) == 15, series
    metrics_port = free_port()
    env = {**os.environ, "DATABASE_URL": clean_db, "MEMSTORE_METRICS_PORT": str(metrics_port)}
    proc, port = serve_memstore("--purge-interval", "0", "--metrics-host", "127.0.0.1", env=env)
    try:
        first = _metrics(metrics_port)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            users = user_service_pb2_grpc.UserServiceStub(channel)
            for n in range(20):
                users.CreateUser(user_service_pb2.CreateUserRequest(user_id=f"u{n}"), timeout=10)
        later = _metrics(metrics_port)
    finally:
        code, out = stop_memstore(proc)
    assert code == 0, out
    for name in series:
        _sample(first, name)
    assert _sample(first, "memstore_db_pool_requests_errors_total") == 0
    # The time calls held connections is measured, not a 0 that never moves.
    used = "memstore_db_pool_usage_ms_total"
    assert _sample(later, used) > _sample(first, used), (first, later)


def test_each_worker_serves_its_own_metrics_port(clean_db: str) -> None:
    first = free_port()
    while True:
        second = first + 1
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", second))
            break
        except OSError:
            first = free_port()
    env = {**os.environ, "DATABASE_URL": clean_db}
    proc, _ = serve_memstore(
        "--purge-interval", "0", "--workers", "2", "--metrics-host", "127.0.0.1",
        "--metrics-port", str(first), env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        texts: list[str] = []
        while time.monotonic() < deadline:
            try:
                texts = [_metrics(first), _metrics(second)]
                break
            except OSError:
                time.sleep(0.2)
    finally:
        code, out = stop_memstore(proc)
    assert code == 0, out
    assert len(texts) == 2 and all("memstore_db_pool_pool_size" in t for t in texts), out
    # Each worker says which port its counters are on, with its pid: the supervisor's pids.
    messages = [json.loads(line)["message"] for line in out.splitlines()]
    pids = {
        pid
        for m in messages
        if (found := re.match(r"memstore: 2 workers \(pids ([\d, ]+)\)", m))
        for pid in found.group(1).split(", ")
    }
    served = dict(
        found.groups()
        for m in messages
        if (found := re.match(r"metrics of pid (\d+) on http://[^ ]*:(\d+)/metrics$", m))
    )
    assert set(served) == pids and set(served.values()) == {str(first), str(second)}, out


def test_a_queue_no_worker_drains_is_logged_and_measured(clean_db: str) -> None:
    # --no-embedding-worker: AddMemory still queues (with pgvector each message, without it
    # the turn, for recall kept by words); the start says who must drain the queue, and
    # /metrics shows it growing.
    metrics_port = free_port()
    env = {**os.environ, "DATABASE_URL": clean_db, "MEMSTORE_METRICS_PORT": str(metrics_port)}
    proc, port = serve_memstore(
        "--purge-interval", "0", "--no-embedding-worker", "--metrics-host", "127.0.0.1", env=env
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            sessions = session_service_pb2_grpc.SessionServiceStub(channel)
            for n in range(3):
                message = resources_pb2.Message(role="kai", content=f"turn {n}")
                request = session_service_pb2.AddMemoryRequest(session_id="q", messages=[message])
                sessions.AddMemory(request, timeout=10)
        text = _metrics(metrics_port)
    finally:
        code, out = stop_memstore(proc)
    assert code == 0, out
    assert "memstore_embedding_queue_rows 3.0" in text, text
    assert "memstore_embedding_queue_oldest_seconds" in text
    assert "--no-embedding-worker" in out and "memstore embed" in out, out


def test_a_scrape_the_database_does_not_answer_in_5_s_has_no_queue_gauges(clean_db: str) -> None:
    # The queue's count blocked behind a lock (a database that does not answer): the scrape
    # leaves the gauges out after 5 s rather than hang or show a stale value.
    metrics_port = free_port()
    env = {**os.environ, "DATABASE_URL": clean_db, "MEMSTORE_METRICS_PORT": str(metrics_port)}
    proc, _ = serve_memstore(
        "--purge-interval", "0", "--no-embedding-worker", "--metrics-host", "127.0.0.1", env=env
    )
    try:
        assert "memstore_embedding_queue_rows " in _metrics(metrics_port)
        with psycopg.connect(clean_db) as conn:
            conn.execute("LOCK TABLE embedding_queue IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            blocked = _metrics(metrics_port)
            waited = time.monotonic() - started
            conn.rollback()
        again = _metrics(metrics_port)
    finally:
        code, out = stop_memstore(proc)
    assert code == 0, out
    assert "memstore_embedding_queue" not in blocked, blocked
    assert "memstore_grpc_requests_total" in blocked  # the rest of the scrape is there
    assert 4.5 < waited < 9, waited
    assert "memstore_embedding_queue_rows 0.0" in again, again
    assert "memstore_embedding_queue_oldest_seconds 0.0" in again, again


def test_a_scrape_writes_nothing_to_the_log(clean_db: str) -> None:
    # wsgiref's request handler wrote a plain-text line to stderr per scrape, past logging:
    # in the JSON log whatever --log-level said, and, with stderr stalled, a blocked thread.
    # At INFO, where an access line per scrape would show (at WARNING it would not).
    metrics_port = free_port()
    env = {**os.environ, "DATABASE_URL": clean_db, "MEMSTORE_METRICS_PORT": str(metrics_port)}
    proc, _ = serve_memstore(
        "--purge-interval", "0", "--metrics-host", "127.0.0.1", "--log-level", "INFO", env=env
    )
    try:
        for _ in range(3):
            _metrics(metrics_port)
        with contextlib.suppress(urllib.error.HTTPError):  # a 404 is not logged either
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/favicon.ico", timeout=10)
    finally:
        code, out = stop_memstore(proc)
    assert code == 0, out
    # The start names the metrics' address once; no scrape adds a line.
    scrapes = [line for line in out.splitlines() if "/metrics" in line or "favicon" in line]
    assert len(scrapes) == 1 and "metrics of pid" in scrapes[0], scrapes
    for line in out.splitlines():
        json.loads(line)  # nothing but the JSON log


def test_text_logs_carry_the_request_id_one_line_per_record(clean_db: str) -> None:
    # --log-format text wrote no request id, which the JSON form carries: a caller's trace
    # id could not be found in the log, of a gRPC call or an HTTP one.
    http_port = free_port()
    env = {**os.environ, "DATABASE_URL": clean_db}
    proc, port = serve_memstore(
        "--purge-interval", "0", "--log-format", "text", "--http-port", str(http_port), env=env
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            users = user_service_pb2_grpc.UserServiceStub(channel)
            with contextlib.suppress(grpc.RpcError):
                request = user_service_pb2.GetUserRequest(user_id="nobody")
                users.GetUser(request, metadata=(("x-request-id", "trace-grpc-42"),), timeout=10)
        rest = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/api/v2/users/nobody",
            headers={"x-request-id": "trace-rest-42"},
        )
        with contextlib.suppress(urllib.error.HTTPError):
            urllib.request.urlopen(rest, timeout=10)
    finally:
        code, out = stop_memstore(proc)
    assert code == 0, out
    access = [x for x in out.splitlines() if " memstore.access " in x]
    assert any("request_id=trace-grpc-42: /memstore.v1.UserService/GetUser" in x for x in access)
    assert any("request_id=trace-rest-42: GET /api/v2/users/{user_id} 404" in x for x in access)
    # A line per record: each begins with its time (tests/unit/test_observability.py escapes
    # a traceback's line breaks).
    assert all(
        re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ", x) for x in out.splitlines()
    )
