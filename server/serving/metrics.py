"""Prometheus metrics: the registry of one server, its collectors and the /metrics endpoint."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app
from prometheus_client.registry import Collector

from server.serving.log_format import dropped_log_records
from server.store import QUEUE_COUNT_CAP, ShareState

#: Seconds of the request-duration histograms' buckets, gRPC's and HTTP's. Past 10 s for the
#: calls that run that long on purpose: exports and Restore over large projects, a call with
#: a long deadline held up to --statement-timeout (30 s), a REST body allowed 20 s plus 1 s
#: per 8 KiB; ending at 10 s put all of them in +Inf, where no quantile can be read.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300,
)  # fmt: skip
#: The one path the metrics endpoint answers; any other is 404.
METRICS_PATH = "/metrics"


class Metrics:
    """The metric families of one server, in a registry of their own."""

    def __init__(
        self,
        pool_stats: Callable[[], dict[str, int]] | None = None,
        queue_stats: Callable[[], tuple[int, float] | None] | None = None,
        share_states: Callable[[], list[ShareState]] | None = None,
        recall_state: Callable[[], tuple[bool, int]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "memstore_grpc_requests",
            "Finished RPCs by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "memstore_grpc_request_duration_seconds",
            "Time from the start of an RPC to its status, by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "memstore_grpc_in_flight", "RPCs being served, by method.", ["method"],
            registry=self.registry,
        )  # fmt: skip
        self.stream_messages = Counter(
            "memstore_grpc_stream_messages",
            "Messages sent on server streams, by method.",
            ["method"],
            registry=self.registry,
        )
        self.stream_rows = Counter(
            "memstore_grpc_stream_rows",
            "Rows (users, sessions, messages) sent on server streams, by method.",
            ["method"],
            registry=self.registry,
        )
        if pool_stats is not None:
            self.registry.register(_PoolCollector(pool_stats))
        if queue_stats is not None:
            self.registry.register(_QueueCollector(queue_stats))
        if share_states is not None:
            self.registry.register(_ShareCollector(share_states))
        if recall_state is not None:
            self.registry.register(_RecallCollector(recall_state))
        self.registry.register(_DroppedLogCollector())
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...
        ProcessCollector(registry=self.registry)

    def serve(self, host: str, port: int) -> tuple[Any, int]:
        """Starts the /metrics HTTP endpoint in a thread; returns it and its port.

        Only /metrics answers; every other path is 404 (prometheus_client's own server
        answers metrics on any path, which hides a mistyped scrape target).
        """
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
        # prometheus_client's start_wsgi_server serves its app on every path; its server class
        # is reused, with a handler of our own that writes no line per request.
        httpd: WSGIServer = make_server(
            host,
            port,
            _only_metrics(make_wsgi_app(self.registry)),
            server_class,
            handler_class=_SilentHandler,
        )
        threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
        return httpd, int(httpd.server_port)


class _SilentHandler(WSGIRequestHandler):
    """A request handler that writes no line per request.

    wsgiref's writes each scrape to sys.stderr itself, past logging: a plain-text line in the
    JSON log whatever --log-level says, and, with stderr stalled, a scrape thread (and its
    socket) blocked on the write for good (tests/test_metrics_process.py). Every scrape is in
    the scraper's own records; prometheus_client's handler (private there) is silent too.
    """

    def log_message(self, format: str, *args: Any) -> None:
        """Writes nothing."""


def _only_metrics(app: Any) -> Any:
    """The WSGI app that serves `app` on METRICS_PATH and 404 elsewhere."""

    def serve(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") != METRICS_PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"not found: metrics are served at {METRICS_PATH}\n".encode()]
        return app(environ, start_response)

    return serve


#: psycopg_pool's statistics that only grow from the pool's start (its get_stats, which the
#: store reads, never resets them): counters, so that rate() and increase() apply. The
#: others (pool_min, pool_max, pool_size, pool_available, requests_waiting) are levels, and
#: a statistic a later psycopg_pool adds stays a gauge until it is named here. get_stats
#: leaves a counter out until its first event: each is exposed from the first scrape, at 0
#: until then (a series that appears late hides its first increase from rate()).
_POOL_COUNTERS = frozenset(
    {
        "requests_num", "requests_queued", "requests_wait_ms", "requests_errors", "usage_ms",
        "returns_bad", "connections_num", "connections_ms", "connections_errors",
        "connections_lost",
    }
)  # fmt: skip


class _PoolCollector(Collector):
    """psycopg_pool's statistics, read at scrape time: counters for totals, gauges for levels."""

    def __init__(self, stats: Callable[[], dict[str, int]]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        stats = dict.fromkeys(_POOL_COUNTERS, 0) | self._stats()
        for name, value in sorted(stats.items()):
            family = CounterMetricFamily if name in _POOL_COUNTERS else GaugeMetricFamily
            yield family(f"memstore_db_pool_{name}", f"psycopg_pool statistic {name}.", value=value)


class _DroppedLogCollector(Collector):
    """Log records dropped while stderr was stalled (server/serving/log_output.py)."""

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily(
            "memstore_log_records_dropped",
            "Log records dropped because stderr was not taking them (a stalled log consumer);"
            " the log says how many when it gets through again.",
            value=dropped_log_records(),
        )


class _QueueCollector(Collector):
    """The embedding queue's length and age, read from the database at scrape time.

    Without a worker draining it (--no-embedding-worker and no `memstore embed`), the queue
    only grows: these two gauges are how an operator sees that (docs/search.md).
    """

    def __init__(self, stats: Callable[[], tuple[int, float] | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        stats = self._stats()
        if stats is None:
            return  # the database did not answer in time: no sample rather than a stale one
        rows, oldest = stats
        yield GaugeMetricFamily(
            "memstore_embedding_queue_rows",
            "Rows waiting in the embedding queue for a worker (memstore embed, or serve's own),"
            f" counted up to {QUEUE_COUNT_CAP}: exact below it, {QUEUE_COUNT_CAP} means that"
            " many or more (a scrape never scans a long queue whole).",
            value=rows,
        )
        yield GaugeMetricFamily(
            "memstore_embedding_queue_oldest_seconds",
            "Seconds the oldest row of the embedding queue has waited (0 when it is empty).",
            value=oldest,
        )


class _ShareCollector(Collector):
    """On Citus, each share of the pool (a worker's, by node group, and the fan-outs',
    node_group "all"): its calls in flight and waiting, and its fuse (server/store/fuse.py).
    A blown fuse is how an operator sees a silent worker's calls failing at once."""

    def __init__(self, states: Callable[[], list[ShareState]]) -> None:
        self._states = states

    def collect(self) -> Iterable[Metric]:
        states = self._states()
        for attr, (counter, doc) in _SHARE_FAMILIES.items():
            kind = CounterMetricFamily if counter else GaugeMetricFamily
            family = kind(f"memstore_citus_share_{attr}", doc, labels=["node_group"])
            for state in states:
                group = "all" if state.node_group is None else str(state.node_group)
                family.add_metric([group], float(getattr(state, attr)))
            yield family


#: The families of _ShareCollector, by ShareState's attribute: (whether a counter, help).
_SHARE_FAMILIES = {
    "in_flight": (False, "Calls holding a slot of the share (at most half the pool)."),
    "waiting": (False, "Calls waiting for a slot of the share."),
    "blown": (
        False,
        "1 while the share's fuse is blown (its worker found silent): its calls fail at"
        " once, UNAVAILABLE, but for one trial every few seconds.",
    ),
    "refused": (True, "Calls the share's fuse failed at once (UNAVAILABLE)."),
}


class _RecallCollector(Collector):
    """GetMemory's recall on Citus: whether its reads of the memories are paused, and the
    calls answered without them (docs/scaling.md, "Recall with a worker lost")."""

    def __init__(self, state: Callable[[], tuple[bool, int]]) -> None:
        self._state = state

    def collect(self) -> Iterable[Metric]:
        paused, unavailable = self._state()
        yield GaugeMetricFamily(
            "memstore_recall_paused",
            "1 while GetMemory skips reading the memories of the user's other sessions: a"
            " read met a silent Citus worker, and no trial read has been answered since.",
            value=float(paused),
        )
        yield CounterMetricFamily(
            "memstore_recall_unavailable",
            "GetMemory calls answered with their window but without the memories"
            " (relevant_unavailable): a Citus worker holding some of them lost or silent.",
            value=unavailable,
        )
