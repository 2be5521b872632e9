"""The periodic purge of a serving process: its turn among the database's processes, its
metrics and its log line."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import asdict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from server.config import Config
from server.domain import PurgeReport
from server.errors import DeadlineExceeded, Unavailable
from server.store import Store

log = logging.getLogger(__name__)

#: The longest wait for a server's first purge after its start, drawn at random so that
#: processes started together do not purge together.
FIRST_PURGE_SECONDS = 60.0
#: After a failed run the next one comes this soon (the interval, when shorter), not a
#: whole interval later: a run that met a database restart or a lost Citus worker kept
#: soft-deleted rows an hour past their next purge.
RETRY_SECONDS = 60.0
#: Seconds of the purge-duration histogram's buckets: an empty run takes milliseconds, a
#: backlog of millions of rows (a first purge after a long retention) many minutes.
PURGE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
#: What each count of a PurgeReport's details is: (table, kind) of the rows.
_ROWS = {
    "messages": ("messages", "expired"),
    "sessions": ("sessions", "expired"),
    "session_messages": ("messages", "of_purged_session"),
}
#: Every outcome of a periodic run: it purged, another process's purge was running, one had
#: started within the interval, or it failed.
OUTCOMES = ("ok", "skipped_other_holder", "skipped_recent", "error")


class PurgeMetrics:
    """The periodic purge's metric families, in the server's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rows = Counter(
            "memstore_purge_rows",
            "Rows the periodic purge hard-deleted, by table and kind: expired (soft-deleted"
            " past the retention) or of_purged_session (the messages of an expired session).",
            ["table", "kind"],
            registry=registry,
        )
        self.runs = Counter(
            "memstore_purge_runs",
            "Periodic purge runs by outcome: ok, skipped_other_holder (another process's purge"
            " of the database was running), skipped_recent (one had started within"
            " --purge-interval), error.",
            ["outcome"],
            registry=registry,
        )
        self.last_success = Gauge(
            "memstore_purge_last_success_timestamp_seconds",
            "Unix time at which this process's last successful purge ended (0: none yet).",
            registry=registry,
        )
        self.duration = Histogram(
            "memstore_purge_duration_seconds",
            "Time a periodic purge that ran took, its turn included (ok and error runs).",
            buckets=PURGE_BUCKETS,
            registry=registry,
        )
        # Every series from the start, at 0: a rate or an alert on one that never moved
        # reads 0, not "no data".
        for outcome in OUTCOMES:
            self.runs.labels(outcome)
        for table, kind in _ROWS.values():
            self.rows.labels(table, kind)

    def purged(self, report: PurgeReport, seconds: float) -> None:
        """Counts one run that purged (what it removed, how long it took)."""
        self.runs.labels("ok").inc()
        self.duration.observe(seconds)
        self.last_success.set(time.time())
        for name, (table, kind) in _ROWS.items():
            self.rows.labels(table, kind).inc(report.details.get(name, 0))


def due_after(interval: float) -> float:
    """Seconds since the database's last purge after which a periodic one is due: the
    interval less a second (a tenth of it, when shorter). A run started a hair early by its
    timer would otherwise find its own last run not yet due, and wait a whole interval more."""
    return interval - min(1.0, interval / 10)


async def purge_periodically(
    config: Config, store: Store, metrics: PurgeMetrics | None = None
) -> None:
    """Purges every --purge-interval seconds, the first run within a minute of the start;
    only one process of the database purges per interval (Store.purge_if_due)."""
    metrics = metrics or PurgeMetrics(CollectorRegistry())
    # The first run within a minute of the start, not a whole interval after it: a fleet
    # restarted more often than the interval (deploys, autoscaling, a crash loop) never
    # purged, and kept soft-deleted rows past their retention for good (an audit).
    wait = random.uniform(0, min(FIRST_PURGE_SECONDS, config.purge_interval))
    while True:
        await asyncio.sleep(wait)
        failed = await purge_once(config, store, metrics) == "error"
        wait = retry_after(config) if failed else config.purge_interval


def retry_after(config: Config) -> float:
    """Seconds to the next periodic run after one that failed."""
    return min(RETRY_SECONDS, config.purge_interval)


async def purge_once(config: Config, store: Store, metrics: PurgeMetrics) -> str:
    """One periodic run, counted and logged; returns its outcome (one of OUTCOMES)."""
    start = time.perf_counter()
    try:
        result = await store.purge_if_due(config.purge_retention, due_after(config.purge_interval))
    except Exception as exc:
        # One failed run (e.g. the database restarting) must not end the periodic purge.
        metrics.runs.labels("error").inc()
        metrics.duration.observe(time.perf_counter() - start)
        if isinstance(exc, Unavailable | DeadlineExceeded):
            # The database's state, said in one line: no traceback of ours explains it.
            log.warning("purge failed: %s; retrying in %gs", exc, retry_after(config))
        else:
            log.exception("purge failed; retrying in %gs", retry_after(config))
        return "error"
    if not isinstance(result, PurgeReport):
        metrics.runs.labels(f"skipped_{result}").inc()
        log.debug("purge skipped: %s", _SKIPPED[result])
        return f"skipped_{result}"
    seconds = time.perf_counter() - start
    metrics.purged(result, seconds)
    # One line per run that ran: one process of the database's runs each interval.
    log.info("purge removed %s in %.3fs", json.dumps(asdict(result), sort_keys=True), seconds)
    return "ok"


_SKIPPED = {
    "other_holder": "another process's purge of this database is running",
    "recent": "another process purged this database within the interval",
}
