"""The embedding worker's figures: its throughput, its lag behind writes, its cost to writes."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import psycopg

from bench import env, search_data
from bench.client import CHANNEL_OPTIONS, UnaryLoad
from bench.figures import ADD_MEMORY, Settings, ratio_figure, unary_run
from bench.rounds import in_turn
from bench.search_data import ChatText

#: Messages waiting, and the age in seconds of the oldest of them.
_QUEUE = (
    "SELECT count(*), coalesce(extract(epoch FROM clock_timestamp() - min(enqueued_at)), 0)"
    "::float8 FROM embedding_queue"
)
_EMBEDDED = "SELECT count(*) FROM message_embeddings"


def stop(server: env.Server) -> None:
    """Stops a server; a failing exit status is an error."""
    code = server.stop()
    if code != 0:
        raise RuntimeError(f"memstore serve exited with {code}")


def _queue(conn: psycopg.Connection[Any]) -> tuple[int, float]:
    row = conn.execute(_QUEUE).fetchone()
    assert row is not None
    return int(row[0]), float(row[1])


def _embedded(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(_EMBEDDED).fetchone()
    return int(row[0]) if row else 0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def quantile(values: list[float], q: int) -> float:
    """The q-th percentile (inclusive method: never outside the values)."""
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _drain(url: str, poll: float, backlog: int) -> tuple[float, list[tuple[float, int, float]]]:
    """Runs `memstore embed` until the queue is empty; its start time and the samples taken.

    Each sample is (time, messages queued, CPU-seconds of the embed process).
    """
    cmd = [sys.executable, "-m", "server", "embed", "--database-url", url, "--log-level", "WARNING"]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=env.ROOT)
    samples: list[tuple[float, int, float]] = []
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            deadline = started + 60 + backlog / 5
            while True:
                queued, _ = _queue(conn)
                samples.append((time.perf_counter(), queued, _cpu_seconds(proc.pid)))
                if queued == 0:
                    return started, samples
                if proc.poll() is not None:
                    raise RuntimeError(f"memstore embed exited with {proc.returncode}")
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"memstore embed left {queued} of {backlog} queued")
                time.sleep(poll)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def embedding_throughput(url: str, backlog: int, poll: float) -> dict[str, Any]:
    """Messages/s one `memstore embed` process embeds, draining a backlog queued beforehand."""
    if backlog < 1:
        raise ValueError("embedding_throughput needs a backlog of at least one message")
    started, samples = _drain(url, poll, backlog)
    first = next(i for i, x in enumerate(samples) if x[1] < backlog)
    # The rate is taken from the first sample after a batch was saved (imports and the
    # model's loading are behind it) to the sample that saw the queue empty; when the
    # backlog went in one interval, from the last sample that saw it whole.
    a = samples[first] if first < len(samples) - 1 else samples[max(0, first - 1)]
    b = samples[-1]
    messages, seconds, cpu = a[1] - b[1], max(b[0] - a[0], 1e-9), b[2] - a[2]
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(e.*), avg(length(m.content)) FROM messages m LEFT JOIN"
            " message_embeddings e USING (project_id, session_id, sequence)"
            " WHERE m.session_id LIKE 'backlog-%'"
        ).fetchone()
    assert row is not None
    return {
        "figure": "embedding_throughput",
        "value": round(messages / seconds, 1),
        "goal": None,
        "met": None,
        "backlog": backlog,
        "drained": backlog - b[1],
        "embedded": int(row[0]),
        "mean_content_chars": round(float(row[1])),
        "measured_messages": messages,
        "measured_seconds": round(seconds, 2),
        "cpu_s_per_1000": round(cpu / messages * 1000, 2),
        "worker_cpu_cores": round(cpu / seconds, 2),
        "startup_seconds": round(samples[first][0] - started, 2),
        "note": "one `memstore embed` process, one model thread, batches of 32",
    }


def _paced(target: str, payloads: tuple[bytes, ...], per_s: float, seconds: float) -> list[Any]:
    """Sends AddMemory at a fixed rate for `seconds` (open loop); returns the futures."""
    futures = []
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(ADD_MEMORY, None, None)
        start = time.perf_counter()
        i = 0
        while (due := start + i / per_s) < start + seconds:
            time.sleep(max(0.0, due - time.perf_counter()))
            futures.append(call.future(payloads[i % len(payloads)], timeout=30))
            i += 1
        for f in futures:
            f.exception()  # waits for the call
    return futures


def embedding_lag(
    url: str,
    server: env.Server,
    text: ChatText,
    *,
    capacity: float,
    share: float,
    seconds: float,
    poll: float,
) -> dict[str, Any]:
    """How long messages wait for their embedding under a steady write load below capacity.

    Writes arrive open loop at `share` of `capacity` messages/s, as AddMemory calls of two
    messages, for `seconds`, on `server` (whose worker has its model loaded already).
    """
    rate = capacity * share
    payloads = search_data.add_memory_payloads(text, 2, "lag", sessions=200)
    samples: list[tuple[float, int, float]] = []
    with psycopg.connect(url, autocommit=True) as conn, ThreadPoolExecutor(1) as thread:
        embedded0 = _embedded(conn)
        t0 = time.perf_counter()
        sender = thread.submit(_paced, server.target, payloads, rate / 2, seconds)
        while not sender.done():
            samples.append((time.perf_counter() - t0, *_queue(conn)))
            time.sleep(poll)
        futures = sender.result()
        stopped = time.perf_counter()
        queued, _ = _queue(conn)
        while queued and time.perf_counter() < stopped + 10:
            time.sleep(poll)
            queued, _ = _queue(conn)
        drained_after = round(time.perf_counter() - stopped, 2) if queued == 0 else None
        embedded = _embedded(conn) - embedded0
    errors = sum(1 for f in futures if f.exception() is not None)
    ts, lengths, ages = zip(*samples, strict=True)
    slope = statistics.linear_regression(ts, lengths).slope if len(ts) > 1 else 0.0
    # Bounded: the queue grows by less than a tenth of what arrives, and empties soon after.
    bounded = slope < 0.1 * rate and drained_after is not None and errors == 0
    return {
        "figure": "embedding_lag",
        "value": round(statistics.median(ages), 3),
        "goal": f"queue bounded at {share:.0%} of capacity",
        "met": bounded,
        "capacity_msgs_per_s": capacity,
        "offered_msgs_per_s": round(rate, 1),
        "sent_messages": 2 * len(futures),
        "errors": errors,
        "embedded": embedded,
        "lag_p95_s": round(quantile(list(ages), 95), 3),
        "lag_max_s": round(max(ages), 3),
        "queue_max": max(lengths),
        "queue_slope_per_s": round(slope, 2),
        "drained_after_s": drained_after,
        "seconds": seconds,
    }


def _await_embedding(conn: psycopg.Connection[Any], timeout: float = 60.0) -> None:
    """Waits until the worker has saved a batch: its model is loaded and it is at work."""
    if _queue(conn)[0] == 0:
        return
    start, deadline = _embedded(conn), time.monotonic() + timeout
    while _embedded(conn) == start:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the embedding worker saved nothing in {timeout:.0f}s")
        time.sleep(0.1)


def _queue_while(future: Future[Any], conn: psycopg.Connection[Any], poll: float) -> list[int]:
    seen = [_queue(conn)[0]]
    while not future.done():
        time.sleep(poll)
        seen.append(_queue(conn)[0])
    return seen


class _Round(NamedTuple):
    run: dict[str, float]
    #: Messages the worker embedded during the timed load, and from server start to stop.
    embedded_in_load: int
    embedded_in_round: int
    #: The shortest the queue was during the load.
    queue_min: int


def write_round(
    s: Settings,
    url: str,
    pool: Executor,
    load: UnaryLoad,
    *,
    on: bool,
    poll: float,
    root: Path = env.ROOT,
) -> _Round:
    """One AddMemory load on a server started for it (serving the checkout `root`), with the
    embedding worker on or off."""
    flag = "--embedding-worker" if on else "--no-embedding-worker"
    with psycopg.connect(url, autocommit=True) as conn, ThreadPoolExecutor(1) as thread:
        before = _embedded(conn)
        server = env.Server(url, root=root, extra_args=(flag, "--drain-delay", "0"))
        try:
            if on:
                _await_embedding(conn)
            embedded0, cpu0 = _embedded(conn), server.cpu_seconds()
            future = thread.submit(
                unary_run, pool, replace(load, target=server.target), s.client_procs
            )
            seen = _queue_while(future, conn, poll)
            run = future.result()
            run["server_cpu_cores"] = (server.cpu_seconds() - cpu0) / (s.seconds + s.warmup)
            in_load = _embedded(conn) - embedded0
        finally:
            stop(server)
        return _Round(run, in_load, _embedded(conn) - before, min(seen))


def writes_embedding(
    s: Settings, pool: Executor, url: str, text: ChatText, poll: float
) -> dict[str, Any]:
    """AddMemory(1) rps with the embedding worker on over off, one server at a time.

    Both never run at once: an ON server's worker would drain what the OFF run queued.
    """
    payloads = search_data.add_memory_payloads(text, 1, "embw", sessions=2000)
    load = UnaryLoad("", ADD_MEMORY, payloads, s.seconds, s.warmup, s.concurrency, s.channels)
    rounds: dict[str, list[_Round]] = {"on": [], "off": []}
    for r in range(s.runs):
        # OFF first in the first round, so every ON run starts with a backlog to embed.
        for arm in in_turn(("off", "on"), r):
            rounds[arm].append(write_round(s, url, pool, load, on=arm == "on", poll=poll))
    runs = {arm: [x.run for x in done] for arm, done in rounds.items()}
    figure = ratio_figure("writes_embedding", runs, "on", "off", 0.90)
    figure["off_server_cpu_cores"] = round(
        statistics.median(x["server_cpu_cores"] for x in runs["off"]), 2
    )
    during = [x.embedded_in_load for x in rounds["on"]]
    figure["embedded_per_on_run"] = during
    figure["embedded_per_on_round"] = [x.embedded_in_round for x in rounds["on"]]
    figure["embedded_per_off_round"] = [x.embedded_in_round for x in rounds["off"]]
    figure["worker_msgs_per_s"] = round(statistics.median(during) / (s.seconds + s.warmup), 1)
    figure["queue_min_during_on_runs"] = min(x.queue_min for x in rounds["on"])
    if figure["queue_min_during_on_runs"] > 0:
        figure["note"] = (
            "sustained load: the ON worker had a backlog throughout every run (the worst case: "
            "it never idles); one server at a time"
        )
    else:
        # On a loaded machine (or tiny data) the writes can queue less than the worker
        # drains: it idled part of a run, so the figure is not the worst case it means to be.
        figure["note"] = (
            "the queue emptied during an ON run (the worker idled part of it): not the worst "
            "case of a worker that never idles; one server at a time"
        )
    return figure
