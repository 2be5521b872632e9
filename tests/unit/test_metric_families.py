"""The metric families' shapes: histogram buckets past the long calls, counters for what only
grows and gauges for levels (what a scraper's rate() and quantiles rely on)."""

from __future__ import annotations

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.rest.app import HttpMetrics
from server.serving.metrics import Metrics
from server.store import ShareState


def _families(metrics: Metrics) -> dict[str, tuple[str, dict[tuple[str, ...], float]]]:
    """Each family's type and its samples, by (sample name, label values)."""
    text = generate_latest(metrics.registry).decode()
    return {
        family.name: (
            family.type,
            {(s.name, *sorted(s.labels.values())): s.value for s in family.samples},
        )
        for family in text_string_to_metric_families(text)
    }


def test_calls_past_ten_seconds_land_in_a_bucket_of_their_own() -> None:
    # An export, a Restore or a call held to a long deadline runs past 10 s: with 10 s the
    # last bucket, all of them read as +Inf and no quantile past 10 s could be told.
    metrics = Metrics()
    http = HttpMetrics(metrics)
    metrics.latency.labels("/memstore.v1.SessionService/ExportMessages").observe(45.0)
    http.latency.labels("/api/v2/sessions", "GET").observe(45.0)
    families = _families(metrics)
    for name, labels in (
        ("memstore_grpc_request_duration_seconds", ("/memstore.v1.SessionService/ExportMessages",)),
        ("memstore_http_request_duration_seconds", ("/api/v2/sessions", "GET")),
    ):
        _, samples = families[name]
        bucket = f"{name}_bucket"
        assert samples[(bucket, *sorted((*labels, "10.0")))] == 0
        assert samples[(bucket, *sorted((*labels, "30.0")))] == 0
        assert samples[(bucket, *sorted((*labels, "60.0")))] == 1
        assert samples[(bucket, *sorted((*labels, "300.0")))] == 1


def test_pool_totals_are_counters_and_levels_gauges() -> None:
    # psycopg_pool's get_stats as the store reads it: totals since the pool started (they only
    # grow) beside levels. Totals exposed as gauges hid their resets from rate().
    stats = {
        "pool_min": 1, "pool_max": 4, "pool_size": 3, "pool_available": 2,
        "requests_waiting": 0, "requests_num": 57, "requests_queued": 3,
        "requests_wait_ms": 120, "requests_errors": 1, "usage_ms": 900, "returns_bad": 0,
        "connections_num": 5, "connections_ms": 40, "connections_errors": 2,
        "connections_lost": 1,
    }  # fmt: skip
    families = _families(Metrics(lambda: stats))
    levels = {"pool_min", "pool_max", "pool_size", "pool_available", "requests_waiting"}
    for name, value in stats.items():
        family = f"memstore_db_pool_{name}"
        kind, samples = families[family]
        if name in levels:
            assert (kind, samples) == ("gauge", {(family,): value}), family
        else:
            assert (kind, samples) == ("counter", {(f"{family}_total",): value}), family


def test_pool_totals_are_there_before_their_first_event() -> None:
    # get_stats of a pool nothing has happened to yet: its levels only.
    stats = {"pool_min": 1, "pool_max": 4, "pool_size": 1, "pool_available": 1}
    families = _families(Metrics(lambda: stats))
    for name in ("requests_errors", "connections_errors", "usage_ms", "returns_bad"):
        family = f"memstore_db_pool_{name}"
        assert families[family] == ("counter", {(f"{family}_total",): 0}), family


def test_each_share_of_the_pool_shows_its_slots_and_its_fuse() -> None:
    # On Citus: the fan-outs' share (node_group "all") and each worker's, by node group. A
    # blown fuse is how an operator sees a silent worker's calls failing at once; its
    # refusals only grow (a counter).
    states = [
        ShareState(node_group=None, in_flight=3, waiting=0, blown=False, refused=0),
        ShareState(node_group=2, in_flight=5, waiting=4, blown=True, refused=17),
    ]
    families = _families(Metrics(share_states=lambda: states))
    expected = {
        "memstore_citus_share_in_flight": ("gauge", {"all": 3, "2": 5}),
        "memstore_citus_share_waiting": ("gauge", {"all": 0, "2": 4}),
        "memstore_citus_share_blown": ("gauge", {"all": 0, "2": 1}),
        "memstore_citus_share_refused": ("counter", {"all": 0, "2": 17}),
    }
    for family, (kind, by_group) in expected.items():
        sample = f"{family}_total" if kind == "counter" else family
        assert families[family] == (
            kind,
            {(sample, group): value for group, value in by_group.items()},
        ), family


def test_recall_shows_its_pause_and_its_calls_without_memories() -> None:
    # GetMemory's recall on Citus: the pause a gauge (0 or 1), the calls answered
    # relevant_unavailable a counter.
    families = _families(Metrics(recall_state=lambda: (True, 7)))
    assert families["memstore_recall_paused"] == ("gauge", {("memstore_recall_paused",): 1.0})
    assert families["memstore_recall_unavailable"] == (
        "counter",
        {("memstore_recall_unavailable_total",): 7.0},
    )
