"""The benchmark's code path on a tiny data set, so `make bench` cannot rot between runs."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = {"unary", "writes_1", "writes_20", "export", "export_messages", "deep_page", "workers"}


def test_bench_runs_every_figure_on_tiny_data(server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    run = subprocess.run(
        [
            *(sys.executable, "-m", "bench", "--database-url", server_url),
            *("--db-name", f"memstore_bench_{secrets.token_hex(3)}", "--out", str(out)),
            *("--users", "2000", "--messages", "2000", "--runs", "1", "--export-runs", "1"),
            *("--seconds", "0.3", "--warmup", "0.1", "--page-size", "20", "--page-calls", "3"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(x) for x in run.stdout.splitlines() if x.startswith("{")]
    assert {f["figure"] for f in lines} == FIGURES
    result = json.loads(out.read_text())
    assert {f["figure"] for f in result["figures"]} == FIGURES
    for figure in result["figures"]:
        assert figure["value"] > 0, figure
        assert figure["met"] in (True, False, None)
    export = next(f for f in result["figures"] if f["figure"] == "export")
    # Every user streamed exactly once, in chunks well under the 4 MiB message limit.
    assert export["rows"] == 2000
    assert 0 < export["max_chunk_bytes"] <= 256 * 1024 + 1024
    messages = next(f for f in result["figures"] if f["figure"] == "export_messages")
    assert messages["rows"] == 2000
    assert 0 < messages["max_chunk_bytes"] <= 256 * 1024 + 1024
    # The table names every figure and a verdict.
    for name in FIGURES:
        assert name in run.stdout
