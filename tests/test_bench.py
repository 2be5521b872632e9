"""The benchmark's code path on a tiny data set, so `make bench` cannot rot between runs."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
FIGURES = {"unary", "writes_1", "writes_20", "export", "deep_page", "workers"}
#: Measured only where the server has pgvector (the embedded PostgreSQL has).
SEARCH_FIGURES = {
    "embedding_throughput",
    "search_latency",
    "recall",
    "embedding_lag",
    "writes_embedding",
}
#: Tiny sizes of the search group: users of 60 and 200 messages in sessions of 10.
SEARCH_ARGS = (
    *("--search-sizes", "60,200", "--search-session-messages", "10", "--embed-backlog", "90"),
    *("--lag-seconds", "2", "--latency-calls", "3"),
)


def test_bench_runs_every_figure_on_tiny_data(server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    run = subprocess.run(
        [
            *(sys.executable, "-m", "bench", "--database-url", server_url),
            *("--db-name", f"memstore_bench_{secrets.token_hex(3)}", "--out", str(out)),
            *("--users", "2000", "--runs", "1", "--export-runs", "1", "--seconds", "0.3"),
            *("--warmup", "0.1", "--page-size", "20", "--page-calls", "3"),
            *SEARCH_ARGS,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    expected = FIGURES | (SEARCH_FIGURES if _has_pgvector(server_url) else set())
    lines = [json.loads(x) for x in run.stdout.splitlines() if x.startswith("{")]
    assert {f["figure"] for f in lines} == expected
    result = json.loads(out.read_text())
    assert {f["figure"] for f in result["figures"]} == expected
    for figure in result["figures"]:
        # A lag (seconds) may be 0: the queue may be empty whenever it is looked at.
        assert figure["value"] > 0 or figure["figure"] == "embedding_lag", figure
        assert figure["met"] in (True, False, None)
    export = next(f for f in result["figures"] if f["figure"] == "export")
    # Every user streamed exactly once, in chunks well under the 4 MiB message limit.
    assert export["rows"] == 2000
    assert 0 < export["max_chunk_bytes"] <= 256 * 1024 + 1024
    # The table names every figure and a verdict.
    for name in expected:
        assert name in run.stdout
    if expected != FIGURES:
        _check_search_figures({f["figure"]: f for f in result["figures"]})
    else:
        assert "search figures skipped: this PostgreSQL server has no pgvector" in run.stderr


def _has_pgvector(url: str) -> bool:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")
        return row.fetchone() is not None


def _check_search_figures(f: dict[str, dict[str, Any]]) -> None:
    throughput = f["embedding_throughput"]
    # The worker drained the whole backlog, and every message got its vector.
    assert throughput["drained"] == throughput["embedded"] == throughput["backlog"] == 90
    assert throughput["cpu_s_per_1000"] > 0
    latency = f["search_latency"]
    for size in (60, 200):
        for kind in ("hybrid", "full_text"):
            assert latency[f"{kind}_{size}_p95_ms"] >= latency[f"{kind}_{size}_p50_ms"] > 0
    assert latency["value"] == latency["hybrid_200_p50_ms"]
    assert latency["health_p50_ms"] > 0 and latency["query_embed_ms"] > 0
    assert latency["calls_per_kind"] == 3
    recall = f["recall"]
    assert recall["sessions"] == 6 and recall["recall_rps"] > 0 and recall["no_recall_rps"] > 0
    lag = f["embedding_lag"]
    # Every message written during the run was embedded once the queue drained.
    assert lag["errors"] == 0 and lag["drained_after_s"] is not None
    assert lag["embedded"] == lag["sent_messages"] > 0
    assert lag["lag_max_s"] >= lag["lag_p95_s"] >= lag["value"] >= 0
    writes = f["writes_embedding"]
    assert writes["on_rps"] > 0 and writes["off_rps"] > 0
    # The ON server embedded while it ran, over a backlog that never emptied; the OFF one
    # embedded nothing (no other worker ran beside it).
    assert all(n > 0 for n in writes["embedded_per_on_round"])
    assert writes["queue_min_during_on_runs"] > 0
    assert writes["embedded_per_off_round"] == [0]
