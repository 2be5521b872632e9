"""The server factory (build_server) and the serving loop (serve); how it stops: shutdown.py."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from memstore.v1 import backup_service_pb2, session_service_pb2, user_service_pb2
from server.api import answer_size
from server.api.backup import BackupServicer
from server.api.sessions import SessionServicer
from server.api.tokens import PageTokens
from server.api.users import UserServicer
from server.config import Config
from server.rest import HttpServer, build_http_server
from server.search.embedding import Embedder
from server.search.service import Searcher
from server.search.worker import watch_queue
from server.serving.auth import Authenticator, AuthGate, start_authenticator
from server.serving.background import (
    embedding_worker,
    load_model,
    make_embedder,
    queue_stats,
    warn_of_other_models,
)
from server.serving.connections import grpc_options, prepare_descriptors
from server.serving.grpc_health import (
    DrainingHealth,
    Readiness,
    settle_calls,
    watch_database,
)
from server.serving.handlers import WrappingServer
from server.serving.limit import CallLimit
from server.serving.log_format import quiet_ended_call_writes
from server.serving.metrics import Metrics
from server.serving.observability import Observer
from server.serving.ports import probe_port
from server.serving.purge import PurgeMetrics, purge_periodically
from server.serving.reflection import enable_reflection
from server.serving.services import Wrapping, register_service
from server.serving.shutdown import caught_signals, stop_grpc, until_stopped
from server.serving.tls import add_port, reflection_enabled
from server.settings import source
from server.store import Store

log = logging.getLogger(__name__)

#: Calls gRPC's core may hold for the application to pick up: past any burst, so overload is
#: memstore's to answer (--pool-max-waiting). Each call in flight costs ~11 KB of memory
#: (docs/reliability.md, "A burst is refused as overload").
_MAX_PENDING_CALLS = 1_000_000
#: Seconds calls cut off by the end of the grace period get to cancel their queries.
_SETTLE_SECONDS = 5.0


def _call_limit(config: Config) -> CallLimit:
    sec = config.security
    return CallLimit(
        sec.max_calls_in_flight, source(sec, "max_calls_in_flight"), sec.send_stall_timeout
    )


async def _build(
    config: Config,
    store: Store,
    metrics: Metrics | None,
    embedder: Embedder | None,
    auth: Authenticator | None = None,
    *,
    limit: CallLimit | None = None,
) -> tuple[grpc.aio.Server, int, Readiness, Callable[[], bool]]:
    if embedder is not None and not store.vectors:
        log.warning(
            "the database keeps no vectors (pgvector is not available): serving full-text "
            "search only"
        )
    tokens = await page_tokens(config, store)
    metrics = metrics or Metrics()
    quiet_ended_call_writes()
    limit = limit or _call_limit(config)
    wrapping = Wrapping(
        Observer(metrics), AuthGate(auth or await start_authenticator(config, store)), limit
    )
    # No grpc.aio interceptors: each handler is wrapped once here instead (serving/handlers.py).
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", answer_size.MAX_REQUEST_BYTES),
            ("grpc.max_send_message_length", answer_size.MAX_ANSWER_BYTES),
            # gRPC sets SO_REUSEPORT by default, so a second server on a taken port would
            # silently share it; refuse instead. Workers opt in on purpose (serving/workers.py
            # checks first that nobody else holds the port).
            ("grpc.so_reuseport", 1 if config.workers > 1 else 0),
            # gRPC's core answers CANCELLED (the caller's own code: not retried, named by no
            # RPC) to calls past a backlog of 1,000 the application has not picked up yet; a
            # burst of 1,500 got some. Overload is answered by memstore instead:
            # RESOURCE_EXHAUSTED, SERVER_OVERLOADED (tests/grpc/test_burst.py).
            ("grpc.server.max_pending_requests", _MAX_PENDING_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", _MAX_PENDING_CALLS),
            # --max-connections; streams per connection; idle connections closed
            *grpc_options(config.security.max_connections),
        ],
    )
    wrap, stall = wrapping.service, limit.send_stall
    names = [
        register_service(
            server,
            user_service_pb2,
            "UserService",
            UserServicer(store, tokens),
            wrap,
            send_stall=stall,
        ),
        register_service(
            server,
            session_service_pb2,
            "SessionService",
            SessionServicer(store, tokens, Searcher(store, embedder)),
            wrap,
            send_stall=stall,
        ),
        register_service(
            server,
            backup_service_pb2,
            "BackupService",
            BackupServicer(store, tokens),
            wrap,
            send_stall=stall,
        ),
    ]
    health = DrainingHealth(limit.most, limit.setting)
    health_pb2_grpc.add_HealthServicer_to_server(health, WrappingServer(server, wrapping.open))
    # Services go NOT_SERVING while the database is down, everything during the drain.
    readiness = Readiness(health, names)
    await readiness.start(store)
    if reflection_enabled(config.reflection, config.host):
        enable_reflection(server, names, wrapping.open)
    # Last: asked only once every other handler has answered None.
    server.add_generic_rpc_handlers((wrapping.unknown_methods(),))
    port = add_port(server, f"{config.host}:{config.port}", config.security)
    if port == 0:
        raise RuntimeError(f"cannot listen on {config.host}:{config.port}")
    return server, port, readiness, wrapping.busy


async def build_server(
    config: Config,
    store: Store,
    metrics: Metrics | None = None,
    *,
    limit: CallLimit | None = None,
) -> tuple[grpc.aio.Server, int]:
    """A server with both services, health and (optionally) reflection, bound but not started.

    Every call is counted in `metrics` (a fresh Metrics when None) and access-logged, and
    against `limit` (the one config.security sets when None; build_http's seam too).
    Returns the server and the port it is bound to (the real one when config.port is 0).
    """
    server, port, _, _ = await _build(config, store, metrics, make_embedder(config), limit=limit)
    return server, port


async def page_tokens(config: Config, store: Store) -> PageTokens:
    """The page-token sealer: MEMSTORE_TOKEN_KEY, else the key kept in the database."""
    return PageTokens(config.token_key or await store.token_key())


async def build_http(
    config: Config,
    store: Store,
    metrics: Metrics | None = None,
    auth: Authenticator | None = None,
    embedder: Embedder | None = None,
    *,
    limit: CallLimit | None = None,
) -> HttpServer:
    """Zep's REST API over `store` on config.host:config.http_port, bound but not started.

    The test seam beside build_server: the same store, auth rules and error table.

    Raises:
        OSError: the port is taken.
    """
    return build_http_server(
        config,
        store,
        searcher=Searcher(store, embedder if embedder is not None else make_embedder(config)),
        tokens=await page_tokens(config, store),
        auth=auth or await start_authenticator(config, store),
        metrics=metrics or Metrics(),
        limit=limit or _call_limit(config),
    )


async def open_store(config: Config) -> Store:
    """Opens the store on DATABASE_URL, or on the embedded PostgreSQL under data_dir."""
    url = config.database_url
    if url is None:
        from server.serving.embedded import EmbeddedPostgres

        url = EmbeddedPostgres(config.data_dir / "pg").url("postgres")
    return await Store.open(
        url,
        min_size=config.pool_min_size,
        max_size=config.pool_max_size,
        timeout=config.pool_timeout,
        statement_timeout=config.statement_timeout,
        recall_timeout=config.recall_timeout,
        max_waiting=config.security.pool_max_waiting,
    )


async def serve(config: Config) -> None:
    """Serves until SIGTERM or SIGINT, then shuts down gracefully.

    The signals are caught from the start: one that arrives while the server starts ends it
    gracefully once it has started. They were caught only while it waited to be stopped, so
    one sent as it started (or after its "listening" line, before the wait: half the runs of
    an audit) killed it at once, leaving the embedded PostgreSQL running; a second one
    during the stop likewise. A signal before the server serves (waiting for the database,
    a migration's lock, the model's load) stops the start at once (it waited for the pool's
    timeout, or for good, before noticing), and the process exits 0, as after serving.

    Raises:
        OSError: the port is taken; checked before the database is opened or migrated.
    """
    with caught_signals() as stop:
        serving = asyncio.Event()
        if not await until_stopped(_serve(config, stop, serving), stop, serving):
            # A stop asked for and done: status 0, as after serving (a worker the supervisor
            # stops while it starts is no failure).
            log.info("memstore stopped before it served")


#: Allocations (less deallocations) between two collections of the youngest generation;
#: Python's default is 700, a few GetMemory calls' worth of rows, dataclasses and protos.
GC_YOUNG_THRESHOLD = 10_000


def _tune_collector() -> None:
    # What the process made to serve (modules, descriptors, the pool) lives as long as it:
    # frozen, no full collection walks it again; and the youngest generation is collected
    # after GC_YOUNG_THRESHOLD allocations, not 700 (py-spy: 3% of GetMemory's samples in
    # gc_collect_main, none of health's; docs/performance.md).
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, oldest)


async def _serve(config: Config, stop: asyncio.Event, serving: asyncio.Event) -> None:
    prepare_descriptors(
        config.security.max_connections, 2 if config.http else 1, config.pool_max_size
    )
    host = source(config, "host")
    if config.port:
        probe_port(config.host, config.port, flag=source(config, "port"), host_flag=host)
    if config.http and config.http_port:
        probe_port(config.host, config.http_port, flag=source(config, "http_port"), host_flag=host)
    embedder = make_embedder(config)  # one model for the queries and the worker
    # Loads while PostgreSQL starts and migrates: SERVING means search answers at once, and
    # a SIGTERM never waits at exit for a load the worker began (the thread cannot stop).
    loading = asyncio.ensure_future(asyncio.to_thread(load_model, embedder))
    store = await open_store(config)
    background: list[asyncio.Task[None]] = []
    try:
        await store.migrate_to_serve()  # logs each migration it applies
        if store.worker_group is not None:
            log.info(
                "serving through Citus worker node group %d: the coordinator's migrations "
                "found; Restore goes to servers on the coordinator's URL",
                store.worker_group,
            )
        metrics = Metrics(
            store.pool_stats, queue_stats(store), store.share_states, store.recall_state
        )
        metrics_http = _serve_metrics(config, metrics)
        await loading
        await warn_of_other_models(store, embedder)
        auth = await start_authenticator(config, store)
        # One cap for the process: gRPC and HTTP calls count against it together.
        limit = _call_limit(config)
        server, port, readiness, busy = await _build(
            config, store, metrics, embedder, auth, limit=limit
        )
        http = None
        if config.http:
            http = await build_http(config, store, metrics, auth, embedder, limit=limit)
        if http is not None:
            # Before gRPC: once gRPC health answers SERVING, both ports do.
            await http.start()
            log.info("Zep REST API on http://%s:%d", config.host, http.port)
        _tune_collector()
        await server.start()
        log.info("memstore listening on %s:%d", config.host, port)
        stop_worker = _start_background(config, store, embedder, metrics, background)
        watcher = asyncio.create_task(watch_database(store))
        serving.set()
        await stop.wait()
        log.info("shutting down (grace period %.1fs)", config.grace_period)
        # The embedding worker claims no batch once the signal has come (it claimed more
        # during the drain delay); its batch in hand is saved, as a call's answer.
        worker_stopped = asyncio.ensure_future(stop_worker())
        # Health says NOT_SERVING while calls are still served, so that load balancers
        # move away before the server stops accepting (a stopping server answers no Check).
        await readiness.drain(config.drain_delay)
        await asyncio.gather(
            stop_grpc(server, config.grace_period, busy),
            *([http.stop(config.grace_period)] if http is not None else []),
            worker_stopped,
        )
        await settle_calls(_SETTLE_SECONDS)
        watcher.cancel()
        if metrics_http is not None:
            metrics_http.shutdown()
    finally:
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await store.close()
    log.info("memstore stopped")


def _start_background(
    config: Config,
    store: Store,
    embedder: Embedder | None,
    metrics: Metrics,
    background: list[asyncio.Task[None]],
) -> Callable[[], Awaitable[None]]:
    """Starts what a serving process runs beside its calls, among `background`: the periodic
    purge, the embedding worker and the watch on its queue; returns what stops the worker."""
    if config.purge_interval > 0 and store.worker_group is not None:
        # One purge per interval is kept by the coordinator's advisory lock, which a worker
        # does not see (docs/scaling.md, "Calls through a worker").
        log.info(
            "serving through Citus worker node group %d: no periodic purge here; servers on "
            "the coordinator's URL purge (or run `memstore purge` with it)",
            store.worker_group,
        )
    elif config.purge_interval > 0:
        purging = purge_periodically(config, store, PurgeMetrics(metrics.registry))
        background.append(asyncio.create_task(purging))
    stop_worker = _start_worker(config, store, embedder, background)
    if store.vectors or store.word_recall:
        background.append(asyncio.create_task(watch_queue(store)))
    return stop_worker


def _start_worker(
    config: Config, store: Store, embedder: Embedder | None, background: list[asyncio.Task[None]]
) -> Callable[[], Awaitable[None]]:
    """Starts this process's embedding worker, if it runs one, among `background`; returns
    what stops it, its batch in hand saved: called at the signal, it waits the drain delay
    and the grace period, as long as calls in flight get."""
    worker = embedding_worker(config, store, embedder)
    if worker is None:
        return lambda: asyncio.sleep(0)
    running = asyncio.create_task(worker.run())
    background.append(running)
    return lambda: worker.stop(running, config.drain_delay + config.grace_period)


def _serve_metrics(config: Config, metrics: Metrics) -> Any:
    """Starts the Prometheus endpoint when a metrics port is configured.

    Each of N workers keeps its own counters, so each serves them on its own port: the
    first free one of metrics_port ... metrics_port + N - 1 (a bind is atomic, so no two
    workers get the same one).
    """
    if config.metrics_port is None:
        return None
    ports = [config.metrics_port + i for i in range(config.workers)] if config.metrics_port else [0]
    for candidate in ports:
        try:
            httpd, port = metrics.serve(config.metrics_host, candidate)
        except OSError as exc:
            if candidate == ports[-1]:
                # It was OSError's own text ("[Errno 98] Address already in use"), naming no
                # setting; now the two that choose where metrics are served, as they were set.
                raise OSError(
                    f"cannot serve metrics on {config.metrics_host}:{candidate}: "
                    f"{exc.strerror or exc} (see {source(config, 'metrics_host')} and "
                    f"{source(config, 'metrics_port')})"
                ) from exc
            continue
        # With the pid: each of N workers serves its own counters on a port it found free,
        # and an operator (or a scrape config) must know which process each port speaks for.
        log.info(
            "metrics of pid %d on http://%s:%d/metrics", os.getpid(), config.metrics_host, port
        )
        return httpd
    return None
