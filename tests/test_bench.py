"""The benchmark's code path on a tiny data set, so `make bench` cannot rot between runs."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from grpc_health.v1 import health_pb2

from bench import client
from memstore.v1 import (
    resources_pb2,
    session_service_pb2,
    session_service_pb2_grpc,
    user_service_pb2,
    user_service_pb2_grpc,
)
from server.store.recall import RECALL_WORDS
from tests.fix_db import usable_extensions

ROOT = Path(__file__).resolve().parent.parent
FIGURES = {
    *("unary", "writes_1", "writes_20", "export", "export_messages", "deep_page", "workers"),
    *("agent_turn", "get_memory", "rest_get_memory", "workers_cpu"),
}
USERS = 2000
MESSAGES = 2000
PAGE_SIZE = 20
#: Each figure's value is subject over baseline, and these the two numbers it divides.
RATIO_OF = {
    "unary": ("get_user_rps", "health_rps"),
    "writes_1": ("add_memory_1_rps", "health_rps"),
    "writes_20": ("add_memory_20_rps", "health_rps"),
    "export": ("export_rows_per_s", "copy_rows_per_s"),
    "export_messages": ("export_rows_per_s", "copy_rows_per_s"),
    "deep_page": ("deep_page_ms", "first_page_ms"),
    "workers": ("two_rps", "one_rps"),
    "agent_turn": ("turns_per_s", "health_rps"),
    "get_memory": ("get_memory_rps", "health_rps"),
    "rest_get_memory": ("rest_get_memory_rps", "grpc_get_memory_rps"),
    "workers_cpu": ("two_cpu_s_per_1000", "one_cpu_s_per_1000"),
}
#: Each judged figure's goal: (at most?, the bound), as docs/performance.md states them.
GOALS = {
    "unary": (False, 0.70),
    "writes_1": (False, 0.50),
    "export": (False, 0.50),
    "export_messages": (False, 0.50),
    "deep_page": (True, 1.50),
    "workers": (False, 1.60),
    "get_memory": (False, 0.60),
    "rest_get_memory": (False, 0.80),
    "workers_cpu": (True, 1.10),
}
#: Far above any ratio a working bench measures here, far below a unit slip (ms for s).
SANE_RATIO = 20.0
#: Server RSS growth while streaming 2000 users: a few MB; 100 MB is the goal at 1M users.
MAX_RSS_GROWTH_MB = 50.0
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


def _run_bench(server_url: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(sys.executable, "-m", "bench", "--database-url", server_url),
            *("--db-name", f"memstore_bench_{secrets.token_hex(3)}", "--out", str(out)),
            *("--users", str(USERS), "--messages", str(MESSAGES), "--runs", "1"),
            *("--export-runs", "1", "--seconds", "0.3", "--warmup", "0.1"),
            *("--page-size", str(PAGE_SIZE), "--page-calls", "3"),
            *SEARCH_ARGS,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def _verdicts(figure: dict[str, Any]) -> set[bool | None]:
    """The `met` values the figure's goal allows for its value."""
    name, value = figure["figure"], figure["value"]
    if name not in GOALS:
        return {None}  # no goal, not judged
    at_most, goal = GOALS[name]
    # `value` is rounded to 3 places and the bench judged the unrounded one: at the edge,
    # either verdict is right.
    met = (
        {True, False}
        if abs(value - goal) < 0.001
        else {value <= goal if at_most else value >= goal}
    )
    if name in ("export", "export_messages") and figure["server_rss_growth_mb"] >= 100:
        return {False}
    if name == "workers" and figure["client_bound"]:
        return {m or None for m in met}  # a missed goal is not judged when the client set the pace
    return met


def test_bench_runs_every_figure_on_tiny_data(server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    run = _run_bench(server_url, out)
    assert run.returncode == 0, run.stderr[-3000:]
    expected = FIGURES | (SEARCH_FIGURES if _has_pgvector(server_url) else set())
    lines = [json.loads(x) for x in run.stdout.splitlines() if x.startswith("{")]
    assert {f["figure"] for f in lines} == expected
    result = json.loads(out.read_text())
    assert {f["figure"] for f in result["figures"]} == expected
    assert result["setup"]["users"] == USERS
    assert result["setup"]["messages"] == MESSAGES
    for figure in result["figures"]:
        if figure["figure"] in SEARCH_FIGURES:
            continue  # their own shapes: _check_search_figures
        name, value = figure["figure"], figure["value"]
        # A ratio of two measured, positive figures, over one run of each.
        assert math.isfinite(value) and 0 < value < SANE_RATIO, figure
        assert len(figure["runs"]) == 1 and figure["runs"][0] == pytest.approx(value), figure
        subject, baseline = (figure[k] for k in RATIO_OF[name])
        assert subject > 0 and baseline > 0, figure
        assert value == pytest.approx(subject / baseline, rel=0.05, abs=0.002), figure
        assert figure["met"] in _verdicts(figure), figure
    by_name = {f["figure"]: f for f in result["figures"]}
    export = by_name["export"]
    # Every seeded user streamed exactly once, in chunks well under the 4 MiB message limit,
    # and the server's memory stayed flat while it streamed them.
    assert export["rows"] == USERS
    assert 0 < export["max_chunk_bytes"] <= 256 * 1024 + 1024
    assert export["server_rss_before_mb"] > 0
    assert export["server_rss_growth_mb"] < MAX_RSS_GROWTH_MB, export
    messages = by_name["export_messages"]
    assert messages["rows"] == MESSAGES
    assert 0 < messages["max_chunk_bytes"] <= 256 * 1024 + 1024
    assert messages["server_rss_growth_mb"] < MAX_RSS_GROWTH_MB, messages
    turn = by_name["agent_turn"]
    # Every paced turn was answered: both calls' latencies measured, ordered as quantiles.
    assert turn["paced_turns"] > 0 and turn["sessions"] == 64
    for call in ("get_memory", "add_memory"):
        assert turn[f"{call}_p99_ms"] >= turn[f"{call}_p50_ms"] > 0
    deep = by_name["deep_page"]
    assert deep["page_size"] == PAGE_SIZE
    assert deep["depth_pages"] == USERS // PAGE_SIZE
    # The table names every figure and a verdict.
    for name in expected:
        assert name in run.stdout
    if expected != FIGURES:
        _check_search_figures(by_name)
    else:
        assert "search figures skipped: this PostgreSQL server has no pgvector" in run.stderr


def _has_pgvector(url: str) -> bool:
    # Installed into the server is not enough: the role must be allowed to create it (CI's
    # external run connects as memstore_ci, which is not; docs/search.md).
    return "vector" in usable_extensions(url)


@pytest.fixture
def created_databases(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The databases the bench code run in this test makes (each through env.fresh_database)."""
    from bench import env

    made: list[str] = []
    fresh = env.fresh_database

    def spy(url: str, name: str = env.BENCH_DB) -> str:
        made.append(name)
        return fresh(url, name)

    monkeypatch.setattr(env, "fresh_database", spy)
    return made


def _own_and_dropped(server_url: str, made: list[str]) -> None:
    """Each database in `made` was this run's own (named for its process, so a run beside it
    on the same server, CI's or a developer's, never drops or loads it) and is gone."""
    assert made and all(n.endswith(f"_{os.getpid()}") for n in made), made
    with psycopg.connect(server_url) as conn:
        left = conn.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s)", [made])
        assert left.fetchall() == []


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
    # The ON server embedded while it ran; the OFF one embedded nothing (no other worker ran
    # beside it). Whether the backlog lasted through every ON run depends on the machine's
    # load (on tiny data the writes may queue less than the worker drains): the figure says
    # which it measured.
    assert all(n > 0 for n in writes["embedded_per_on_round"])
    never_idle = "never idles" in writes["note"] and "emptied" not in writes["note"]
    assert never_idle == (writes["queue_min_during_on_runs"] > 0), writes
    assert writes["embedded_per_off_round"] == [0]


def _run_ab(server_url: str, comparison: str, *extra: str) -> subprocess.CompletedProcess[str]:
    # Both sides serve this checkout: the code path, not a comparison, is what is tested.
    # bench.ab's --db-name is fixed by default (as `python -m bench`'s): passed here.
    name = f"memstore_ab_{secrets.token_hex(3)}"
    return _run_scratch(
        server_url, "bench.ab", "--before", str(ROOT), "--only", comparison,
        "--database-url", server_url, "--db-name", name,
        "--users", "100", "--rounds", "1", "--seconds", "0.3", "--warmup", "0.1", *extra,
        db_name=name,
    )  # fmt: skip


def _ab_summary(run: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert run.returncode == 0, run.stderr[-3000:]
    summary: dict[str, Any] = json.loads(run.stdout[run.stdout.index("\n{") :])
    return summary


def test_ab_recall_runs_on_tiny_data(server_url: str) -> None:
    run = _run_ab(server_url, "recall")
    if not _has_pgvector(server_url):
        assert run.returncode != 0 and "needs pgvector" in run.stderr
        return
    summary = _ab_summary(run)
    assert summary["comparison"] == "recall"
    for side in ("before", "after"):
        figures = summary[side]
        assert figures["health_rps"] > 0 and figures["recall_rps"] > 0, figures
        assert figures["recall_over_no_recall"] == pytest.approx(
            figures["recall_over_no_recall_rounds"][0]
        )
    assert summary["recall_after_over_before"] > 0


def test_ab_recall_words_runs_on_tiny_data(server_url: str) -> None:
    # Recall ranked by words on the request path: with pgvector or without.
    summary = _ab_summary(_run_ab(server_url, "recall_words", "--messages", "2560"))
    assert summary["comparison"] == "recall_words"
    for side in ("before", "after"):
        figures = summary[side]
        assert figures["recall_rps"] > 0 and figures["no_recall_rps"] > 0, figures
        assert len(figures["recall_over_no_recall_rounds"]) == 1
    assert summary["recall_after_over_before"] > 0


def test_ab_writes_embedding_runs_on_tiny_data(server_url: str) -> None:
    run = _run_ab(server_url, "writes_embedding")
    if not _has_pgvector(server_url):
        assert run.returncode != 0 and "needs pgvector" in run.stderr
        return
    summary = _ab_summary(run)
    assert summary["comparison"] == "writes_embedding" and summary["off_rps"] > 0
    for side in ("before", "after"):
        assert summary[side]["on_rps"] > 0 and len(summary[side]["on_over_off_rounds"]) == 1
    assert summary["on_after_over_before"] > 0


def test_ab_get_user_runs_on_tiny_data(server_url: str) -> None:
    summary = _ab_summary(_run_ab(server_url, "get_user"))
    assert summary["comparison"] == "get_user"
    for side in ("before", "after"):
        figures = summary[side]
        assert figures["get_user_rps"] > 0 and figures["health_rps"] > 0, figures
        assert len(figures["get_user_over_health_rounds"]) == 1
    assert summary["get_user_after_over_before"] > 0


def test_lone_latency_runs_on_tiny_data(server_url: str) -> None:
    run = _run_scratch(
        server_url, "bench.lone_latency", "--before", str(ROOT), "--database-url", server_url,
        "--users", "100", "--rounds", "2", "--calls", "30",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout[run.stdout.index("{") :])
    for side in ("before", "after"):
        assert summary[side]["get_user_p50_us"] > 0 and summary[side]["health_p50_us"] > 0
        assert len(summary["get_user_rounds_us"][side]) == 2
    assert summary["get_user_after_over_before"] > 0


@pytest.mark.parametrize(
    "extra",
    [(), ("--together",), ("--separate-databases",)],
    ids=["in_turn", "together", "separate_databases"],
)
def test_ab_writes_runs_on_tiny_data(server_url: str, extra: tuple[str, ...]) -> None:
    # With --separate-databases each side has a database of its own, dropped at the end.
    summary = _ab_summary(_run_ab(server_url, "writes", *extra))
    with psycopg.connect(server_url) as conn:
        left = conn.execute("SELECT datname FROM pg_database WHERE datname ~ '^memstore_ab_'")
        assert left.fetchall() == []
    assert summary["comparison"] == "writes"
    for side in ("before", "after"):
        figures = summary[side]
        assert figures["add_memory_1_rps"] > 0 and figures["add_memory_20_rps"] > 0, figures
        assert figures["add_memory_1_cpu_us_per_call"] > 0
    assert summary["add_memory_1_after_over_before"] > 0


def test_eval_measures_search_and_recall_on_tiny_data(server_url: str, tmp_path: Path) -> None:
    # `make eval`'s code path on its first three questions (69 messages): SearchMemory's
    # rankers and GetMemory's recall (each question a probe session), each beside BM25.
    out = tmp_path / "eval.json"
    run = _run_module(
        "bench.eval",
        "--sample",
        "3",
        "--json",
        str(out),
        env={"DATABASE_URL": server_url},
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(out.read_text())
    vectors = _has_pgvector(server_url)
    search = {"bm25", "full_text"} | ({"semantic", "hybrid"} if vectors else set())
    assert search <= figures["rankers"].keys()
    words = {"words_8", "words_16", "words_32", "words_64", "words_all"}
    recall = {
        "bm25",
        *words,
        *(("vector", "vector_all_words") if vectors else ("get_memory_words",)),
    }
    assert figures["recall"].keys() == {
        "alone",
        "after_talk",
        "before_talk",
        "after_history_talk",
        "before_history_talk",
    }
    for window in figures["recall"].values():
        assert window["corpus"]["questions"] == 3
        assert window["rankers"].keys() == recall
        for ranker in window["rankers"].values():
            overall = ranker["overall"]
            assert 0 <= overall["mrr"] <= overall["recall_at_10"] <= 1, ranker
    # BM25 finds the lexical question's order number from the window alone.
    assert figures["recall"]["alone"]["rankers"]["bm25"]["by_kind"]["lexical"]["recall_at_10"] == 1
    if not vectors:
        # Without pgvector GetMemory's recall is by words, RECALL_WORDS of them.
        for window in figures["recall"].values():
            rankers = window["rankers"]
            assert rankers["get_memory_words"] == rankers[f"words_{RECALL_WORDS}"]


def test_ab_recall_kept_words_runs_on_tiny_data(server_url: str) -> None:
    # Recall kept by words (migration 0012): only where the server has no pgvector.
    run = _run_ab(server_url, "recall_kept_words", "--messages", "2560")
    if _has_pgvector(server_url):
        assert run.returncode != 0 and "needs a PostgreSQL without pgvector" in run.stderr
        return
    summary = _ab_summary(run)
    assert summary["comparison"] == "recall_kept_words"
    for side in ("before", "after"):
        figures = summary[side]
        assert figures["recall_rps"] > 0 and figures["no_recall_rps"] > 0, figures
    assert summary["recall_after_over_before"] > 0


async def test_queue_cost_times_the_queue_insert_on_tiny_data(clean_db: str) -> None:
    # bench.queue_cost on a migrated database: every way and size timed, nothing kept
    # (each call rolled back).
    from bench.queue_cost import measure

    found = measure(clean_db, rounds=1, calls=2)
    assert set(found) == {f"{w}_{n}" for w in ("none", "each", "turn") for n in (1, 20)}
    assert all(x["statement_us"] > 0 and x["queue_insert_us"] >= 0 for x in found.values())
    with psycopg.connect(clean_db) as conn:
        row = conn.execute("SELECT count(*) FROM sessions").fetchone()
    assert row == (0,)


def test_pg_cost_times_each_variant_on_tiny_data(
    server_url: str, created_databases: list[str]
) -> None:
    # bench.pg_cost: a database per variant, each timed, the session's updates counted (none
    # HOT while updated_at is indexed), every database dropped at the end; with pgvector or
    # on a server whose role may not create it (it tried to, and stopped there).
    from bench.pg_cost import get_memory_cost, measure

    found = measure(server_url, ["base", "no_updated_idx", "touch_0011"], 20, rounds=1, calls=5)
    assert set(found) == {"base", "no_updated_idx", "touch_0011"}
    assert all(x["backend_cpu_us"] > 0 and x["vs_base"] > 0 for x in found.values()), found
    assert found["base"]["sessions_hot_share"] == 0
    # --get-memory: GetMemory's statement as sent and planned at every call, both timed, over
    # the recall the store keeps on this server: as vectors with pgvector, by words without.
    cost = get_memory_cost(server_url, 20, rounds=1, calls=2)
    kept = cost.pop("kept_recall")
    assert kept == ("vectors" if _has_pgvector(server_url) else "words"), kept
    assert set(cost) == {f"{m}_{n}" for m in ("auto", "force_custom_plan") for n in (1, 8)}
    assert all(x > 0 for x in cost.values()), cost
    assert len(created_databases) == 2, created_databases  # base's, then get_memory's
    with psycopg.connect(server_url) as conn:
        own = f"^pg_cost_.*_{os.getpid()}$"  # the variants' copies of base's too
        left = conn.execute("SELECT datname FROM pg_database WHERE datname ~ %s", [own])
        assert left.fetchall() == []
    _own_and_dropped(server_url, created_databases)


@pytest.mark.parametrize("name", ["get_users", "list_user_wire"])
def test_plan_cost_times_both_sides_on_tiny_data(
    server_url: str, name: str, created_databases: list[str]
) -> None:
    # bench.plan_cost: the statement before and after (their rows checked equal), both
    # timed for each kind of call, the checkout's on its generic plan, the database dropped.
    from bench.plan_cost import STATEMENTS, measure

    found = measure(server_url, name, 50, rounds=2, calls=2)
    kinds = STATEMENTS[name][1]
    assert all(found[f"{s}_{k}"] > 0 for s in ("before", "after") for k in kinds), found
    assert found["plans"]["after"]["generic"] > found["plans"]["after"]["custom"], found
    _own_and_dropped(server_url, created_databases)


def test_chunk_cost_times_each_variant_on_tiny_data(
    server_url: str, created_databases: list[str]
) -> None:
    # bench.chunk_cost: every variant timed against COPY of the same rows (each checked to
    # return list_user_chunk's bytes), its database dropped at the end.
    from bench.chunk_cost import VARIANTS, run

    found = run(server_url, 300, limit=50, keys=2, rounds=1, calls=1)
    assert set(found) == {"server", "list_user_chunk", *VARIANTS, "copy_rows", "copy_table"}
    assert all(x["backend_cpu_us"] > 0 for k, x in found.items() if k != "server"), found
    # The statement of the checkout keeps its generic plan.
    plans = found["list_user_chunk"]["plans"]
    assert plans["generic"] > plans["custom"], plans
    _own_and_dropped(server_url, created_databases)


def test_queue_gauge_times_both_statements_on_tiny_data(
    server_url: str, created_databases: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # bench.queue_gauge's rounds on a migrated database with a few queued rows: both
    # statements timed, the capped count exact below its cap, the age read from the index.
    # In its own database (fill() drops the queue's foreign key and autovacuum there).
    from bench.queue_gauge import main

    args = ("--rows", "50", "--drained", "10", "--rounds", "2", "--calls", "1")
    assert main([*args, "--database-url", server_url]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["before_ms"] > 0 and found["after_ms"] > 0 and found["after_over_before"] > 0
    assert found["values"]["before"][0] == found["values"]["after"][0] == 40
    assert found["values"]["after"][1] == pytest.approx(found["values"]["before"][1], abs=5)
    _own_and_dropped(server_url, created_databases)


def _run_module(
    module: str,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    spied: bool = False,
) -> subprocess.CompletedProcess[str]:
    """`python -m <module> args` as a user runs it, with `env` added to this environment;
    `spied`: with env.fresh_database spied (_SPIED)."""
    launch = ("-c", _SPIED) if spied else ("-m",)
    return subprocess.run(
        [sys.executable, *launch, module, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


#: `python -m <module>` with env.fresh_database spied: each database made says so on stderr.
_SPIED = """
import os, runpy, sys
from bench import env
fresh = env.fresh_database
def spy(url, name=env.BENCH_DB):
    print(f"made database {name!r} in process {os.getpid()}", file=sys.stderr, flush=True)
    return fresh(url, name)
env.fresh_database = spy
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def _run_scratch(
    server_url: str,
    module: str,
    *args: str,
    env: dict[str, str] | None = None,
    db_name: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """`python -m <module> args` (as _run_module), checked to make only databases of its own
    (named for its process, as `created_databases` checks in this one; but `db_name`, the
    --db-name passed) and to drop them all."""
    run = _run_module(module, *args, env=env, timeout=240, spied=True)
    made = re.findall(r"^made database '(\w+)' in process (\d+)$", run.stderr, re.M)
    assert made and all(n == db_name or n.endswith(f"_{pid}") for n, pid in made), made
    for name, _ in made:
        _no_database_left(server_url, name)
    return run


def _no_database_left(server_url: str, name: str) -> None:
    with psycopg.connect(server_url) as conn:
        left = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
        assert left.fetchall() == []


_RATIO_LINE = r"after / before per round: median ([\d.]+) \(([\d.]+)-([\d.]+)\), (\d+) rounds"


def _run_recall_bench(server_url: str, module: str, *args: str) -> str | None:
    """`python -m bench.<module>` on a database of its own on the server of `server_url`: its
    stdout, or None where the server lacks pgvector and it refused, as it must, saying so.
    Its database is gone either way."""
    run = _run_scratch(server_url, f"bench.{module}", *args, env={"DATABASE_URL": server_url})
    if not _has_pgvector(server_url):
        assert run.returncode == 1 and "needs pgvector" in run.stderr, run.stderr[-3000:]
        return None
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def _by_side(out: str, line: str) -> dict[str, re.Match[str]]:
    """Each side's line of `out` that reads `<side>  <line>` (a regular expression)."""
    found = {side: re.search(rf"^{side} +{line}$", out, re.M) for side in ("before", "after")}
    assert all(found.values()), out
    return {side: match for side, match in found.items() if match}


def test_recall_cost_explains_both_sides_on_tiny_data(server_url: str) -> None:
    # bench.recall_cost (its own fixed data: two users of 1,280 messages with random vectors):
    # both sides' plans timed and their buffers read; without pgvector, a clear refusal.
    out = _run_recall_bench(server_url, "recall_cost", "--runs", "2", "--before", "HEAD")
    if out is None:
        return
    for found in _by_side(out, r"median ([\d.]+) ms  fastest ([\d.]+) ms  buffers (\d+)").values():
        median, fastest, buffers = float(found[1]), float(found[2]), int(found[3])
        assert median >= fastest > 0 and buffers > 0, out
    ratio = re.search(_RATIO_LINE, out)
    assert ratio, out
    assert float(ratio[3]) >= float(ratio[1]) >= float(ratio[2]) > 0 and ratio[4] == "2"


def test_recall_cpu_times_both_sides_on_tiny_data(server_url: str) -> None:
    # bench.recall_cpu on recall_cost's data: both sides' rows equal for each of the first
    # user's 20 sessions, then each side's CPU per call; without pgvector, a clear refusal.
    args = ("--rounds", "2", "--calls", "5", "--before", "HEAD")
    out = _run_recall_bench(server_url, "recall_cpu", *args)
    if out is None:
        return
    assert "rows equal, row for row, for each of the first user's 20 sessions" in out
    line = r"CPU per call median (\d+) µs \((\d+)-(\d+)\), statement ([\d,]+) bytes"
    for found in _by_side(out, line).values():
        assert int(found[3]) >= int(found[1]) >= int(found[2]) > 0, out
        assert int(found[4].replace(",", "")) > 0
    assert re.search(_RATIO_LINE + " of 5 calls", out), out


def test_session_counts_times_every_kind_on_tiny_data(server_url: str) -> None:
    # bench.session_counts on 10 users: each kind's rate on both sides, and (one round) its
    # after/before the ratio of the two rates printed beside it; plain PostgreSQL either way.
    run = _run_scratch(
        server_url, "bench.session_counts", "--users", "10", "--rounds", "1", "--seconds", "0.2",
        "--database-url", server_url,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    for kind in ("add_new", "add_existing", "get_user"):
        found = re.search(
            rf"^{kind}: before ([\d,]+)/s, after ([\d,]+)/s, after/before ([\d.]+)$",
            run.stdout,
            re.M,
        )
        assert found, run.stdout
        before, after = (float(found[i].replace(",", "")) for i in (1, 2))
        assert before > 0 and after > 0, run.stdout
        assert float(found[3]) == pytest.approx(after / before, abs=0.01), run.stdout


@pytest.mark.parametrize("together", [(), ("--together",)], ids=["in_turn", "together"])
def test_ab_streams_run_on_tiny_data(server_url: str, together: tuple[str, ...]) -> None:
    # bench.ab's streams (its default --only): every loaded user and message streamed whole
    # by both servers, one after the other or (--together) both at once, and the ratio of one
    # round the ratio of the two rates.
    name = f"memstore_ab_{secrets.token_hex(3)}"
    run = _run_module(
        "bench.ab", "--before", str(ROOT), "--database-url", server_url, "--db-name", name,
        "--users", "300", "--messages", "200", "--rounds", "1", *together,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    _no_database_left(server_url, name)
    summary = json.loads(run.stdout[run.stdout.index("\n{") :])
    assert (summary["users"], summary["messages"]) == (300, 200)
    for stream, rows in (("export", 300), ("export_messages", 200)):
        figures = summary[stream]
        assert figures["rows_streamed"] == [rows], figures
        before, after = figures["before_rows_per_s"], figures["after_rows_per_s"]
        assert before > 0 and after > 0, figures
        assert figures["round_ratios"] == [figures["after_over_before"]]
        assert figures["after_over_before"] == pytest.approx(after / before, rel=0.01), figures


def test_soak_runs_clean_on_tiny_data(server_url: str, tmp_path: Path) -> None:
    # `make soak` for six seconds with two clients: every call answered, the counts adding
    # up, a clean exit of the server and memory judged flat; its figures kept where
    # SOAK_FIGURES says (not over a real soak's in .data).
    kept = tmp_path / "soak-figures.json"
    run = _run_module(
        "bench.soak",
        env={
            **{"DATABASE_URL": server_url, "SOAK_SECONDS": "6", "SOAK_CLIENTS": "2"},
            "SOAK_FIGURES": str(kept),
        },
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.rstrip().endswith("soak passed: 0 errors, flat memory, clean exit")
    figures = json.loads(run.stdout[run.stdout.index("{\n") : run.stdout.rindex("}") + 1])
    assert (figures["seconds"], figures["clients"]) == (6.0, 2)
    assert figures["errors"] == 0 and figures["exit_code"] == 0, figures
    assert figures["calls"] == sum(figures["by_method"].values()) > 0, figures
    assert figures["by_method"]["CreateUser"] >= 2 and figures["by_method"]["AddMemory"] > 0
    assert figures["p99_ms"] >= figures["p50_ms"] > 0, figures
    assert figures["rss_growth_mib"] <= 20 and figures["rss_max_mib"] > 0, figures
    assert json.loads(kept.read_text()) == figures


def test_profile_summarizes_a_raw_profile(tmp_path: Path) -> None:
    # bench.profile on py-spy's raw format: samples counted, self and inclusive shares, each
    # frame's file shortened to its folder and name; a line that is no sample is skipped.
    raw = tmp_path / "export.raw"
    raw.write_text(
        "main (/srv/server/__main__.py:10);serve (/srv/server/serving/app.py:20);"
        "encode (/v/lib/python3.11/site-packages/google/protobuf/json_format.py:5) 3\n"
        "main (/srv/server/__main__.py:10);serve (/srv/server/serving/app.py:20) 1\n"
        "not a sample\n"
    )
    run = _run_module("bench.profile", str(raw), "--top", "2")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[:5] == [
        "4 samples",
        "--- self",
        " 75.0%  encode (protobuf/json_format.py:5)",
        " 25.0%  serve (serving/app.py:20)",
        "--- inclusive",
    ]
    # Frames of equal count in either order.
    assert set(lines[5:]) == {
        "100.0%  main (server/__main__.py:10)",
        "100.0%  serve (serving/app.py:20)",
    }


def test_recall_replay_scores_every_fusion_on_tiny_data(server_url: str, tmp_path: Path) -> None:
    # bench.eval.recall_replay on make eval's first three questions: each candidate fusion
    # (GetMemory's answers first) scored per window for all, odd and even questions; a second
    # run from --cache scores the same parts alike. Without pgvector, refused before loading.
    cache = tmp_path / "replay.pickle"
    args = ("--sample", "3", "--cache", str(cache))
    run = _run_module("bench.eval.recall_replay", *args, env={"DATABASE_URL": server_url})
    if not _has_pgvector(server_url):
        assert run.returncode == 1, run.stderr[-3000:]
        assert "the replay needs pgvector, which this PostgreSQL lacks" in run.stderr
        assert not cache.exists()
        return
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    windows = "alone / after talk / before talk / after history talk / before history talk"
    assert lines[0] == f"R@10 {windows}"
    titles = ("all questions", "odd-numbered questions (to choose on)", "even-numbered questions")
    starts = [lines.index(t) for t in titles]
    rows = [
        lines[a + 1 : b - 1] for a, b in zip(starts, [*starts[1:], len(lines) + 1], strict=True)
    ]
    assert len({len(r) for r in rows}) == 1 and len(rows[0]) > 10, run.stdout
    for section in rows:
        assert section[0].startswith("GetMemory (as answered) ")
        for row in section:
            found = re.fullmatch(r"(.+?) +([\d.]+(?: / [\d.]+){4})", row)
            assert found, row
            assert all(0 <= float(x) <= 1 for x in found[2].split(" / ")), row
    again = _run_module("bench.eval.recall_replay", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout == run.stdout


#: The stand-alone cost benches' command lines on tiny data, and the keys their JSON holds
#: (their measuring functions are checked in depth above: here, that each runs as a user runs
#: it, `python -m bench.<module>`, and prints what it measured).
_COST_COMMANDS = {
    "chunk_cost": (
        ("--users", "300", "--limit", "50", "--keys", "2", "--rounds", "1", "--calls", "1"),
        {"server", "list_user_chunk", "copy_rows", "copy_table"},
    ),
    "pg_cost": (
        ("--get-memory", "--sessions", "20", "--rounds", "1", "--calls", "2"),
        {"kept_recall", "auto_1", "auto_8", "force_custom_plan_1", "force_custom_plan_8"},
    ),
    "plan_cost": (
        ("--users", "50", "--rounds", "2", "--calls", "2"),
        {"plans", "before_1", "after_1", "after_over_before_1"},
    ),
    "queue_gauge": (
        ("--rows", "50", "--drained", "10", "--rounds", "2", "--calls", "1"),
        {"rows", "drained", "before_ms", "after_ms", "after_over_before", "values"},
    ),
}


@pytest.mark.parametrize("module", sorted(_COST_COMMANDS))
def test_cost_bench_runs_as_a_command_on_tiny_data(server_url: str, module: str) -> None:
    args, keys = _COST_COMMANDS[module]
    run = _run_module(f"bench.{module}", *args, "--database-url", server_url)
    assert run.returncode == 0, run.stderr[-3000:]
    # stdout is the JSON alone (`python -m bench.pg_cost ... | jq` works): what migrate
    # applied, and any progress, goes to stderr.
    found = json.loads(run.stdout)
    assert keys <= found.keys(), found
    # Every figure measured: a finite count or time, none negative.
    numbers = list(_numbers(found))
    assert numbers and all(math.isfinite(x) and x >= 0 for x in numbers), found


def _numbers(value: Any) -> Iterator[float]:
    """Every number in a JSON value, however deep."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield value


def test_watch_cost_times_both_sides_as_a_command() -> None:
    # bench.watch_cost needs no database: asyncio tasks with and without the send-stall watch.
    run = _run_module("bench.watch_cost", "--rounds", "2", "--calls", "200")
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout)
    assert found["bare_us"] > 0 and found["watched_us"] > 0, found
    assert math.isfinite(found["watch_us"]), found
    assert [len(found["rounds_us"][side]) for side in ("bare", "watched")] == [2, 2], found


async def test_queue_cost_runs_as_a_command_on_tiny_data(clean_db: str) -> None:
    run = _run_module(
        "bench.queue_cost", "--database-url", clean_db, "--rounds", "1", "--calls", "2"
    )
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout)
    assert set(found) == {f"{w}_{n}" for w in ("none", "each", "turn") for n in (1, 20)}
    assert all(x["statement_us"] > 0 and x["queue_insert_us"] >= 0 for x in found.values())


async def test_a_load_window_that_counted_nothing_is_stretched_until_it_counts(
    grpc_port: int,
    users: user_service_pb2_grpc.UserServiceStub,
    sessions: session_service_pb2_grpc.SessionServiceStub,
) -> None:
    """A zero-second window (as on tiny data, where one slow first call filled it) still
    measures: both load kinds count MIN_COUNTED before they divide by the wall time."""
    await users.CreateUser(user_service_pb2.CreateUserRequest(user_id="turner"))
    await sessions.CreateSession(
        session_service_pb2.CreateSessionRequest(session_id="turns", user_id="turner")
    )
    target = f"127.0.0.1:{grpc_port}"
    get = session_service_pb2.GetMemoryRequest(session_id="turns", lastn=6)
    add = session_service_pb2.AddMemoryRequest(
        session_id="turns",
        messages=[resources_pb2.Message(role_type=resources_pb2.ROLE_TYPE_USER, content="hi")],
    )
    turns = await asyncio.to_thread(
        client.run_turns,
        client.TurnLoad(
            target,
            "/memstore.v1.SessionService/GetMemory",
            (get.SerializeToString(),),
            "/memstore.v1.SessionService/AddMemory",
            (add.SerializeToString(),),
            seconds=0.0,
            warmup=0.0,
            concurrency=2,
            channels=1,
        ),
    )
    assert turns["errors"] == 0
    assert turns["turns"] >= client.MIN_COUNTED and turns["wall"] > 0
    assert len(turns["get"]) == len(turns["add"]) == turns["turns"]
    health = await asyncio.to_thread(
        client.run_unary,
        client.UnaryLoad(
            target,
            "/grpc.health.v1.Health/Check",
            (health_pb2.HealthCheckRequest().SerializeToString(),),
            seconds=0.0,
            warmup=0.0,
            concurrency=2,
            channels=1,
        ),
    )
    assert health["errors"] == 0
    assert health["calls"] >= client.MIN_COUNTED and health["wall"] > 0
