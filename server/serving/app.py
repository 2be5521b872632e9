"""The server factory (build_server) and the serving loop with graceful shutdown (serve)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from types import ModuleType
from typing import Any, cast

import grpc
from google.protobuf import descriptor, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from memstore.v1 import backup_service_pb2, session_service_pb2, user_service_pb2
from server.api import answer_size
from server.api.backup import BackupServicer
from server.api.base import Context
from server.api.chunking import WireChunk
from server.api.sessions import SessionServicer
from server.api.status import abort
from server.api.tokens import PageTokens
from server.api.users import UserServicer
from server.config import Config
from server.errors import MemstoreError
from server.rest import HttpServer, build_http_server
from server.search.embedding import Embedder, EmbeddingError, embedder_from_setting
from server.search.service import Searcher
from server.search.worker import EmbeddingWorker, watch_queue
from server.serving.auth import Authenticator, AuthGate, start_authenticator
from server.serving.grpc_health import (
    DrainingHealth,
    Readiness,
    settle_calls,
    track_call,
    watch_database,
)
from server.serving.handlers import Wrap, WrappingServer, register, rewrap
from server.serving.limit import CallLimit
from server.serving.malformed import Malformed, tolerant_deserializer
from server.serving.observability import Metrics, Observer, quiet_ended_call_writes
from server.serving.ports import probe_port
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
#: Seconds a stopping server goes on waiting for calls once none of memstore's is in flight
#: (stop_grpc): a call gRPC hands over as the stop begins reaches its handler in a few turns
#: of the loop; what is left after this is stranded in gRPC's core.
ORPHAN_SECONDS = 1.0

#: Seconds a metrics scrape waits for the embedding queue's count before leaving it out.
_QUEUE_READ_SECONDS = 5.0


class _Wrapping:
    """What every method's handler is wrapped in, once, at registration (serving/handlers.py):
    observed (metrics, access line, request id), then, but for health and reflection
    (auth.OPEN_METHODS), counted against the cap on calls in flight and behind the API key
    gate; our services' requests are checked too."""

    def __init__(self, observer: Observer, gate: AuthGate, limit: CallLimit) -> None:
        self._observer = observer
        self._gate = gate
        self._limit = limit

    def open(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> Any:
        """Health: observed, no key needed. Client streams (reflection) pass as they are."""
        if handler.request_streaming:
            return handler
        return rewrap(
            handler,
            unary=functools.partial(self._observer.unary, method),
            stream=functools.partial(self._observer.stream, method),
        )

    def service(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> Any:
        """One of our services' methods: observed, behind the gate, malformed requests refused."""
        return rewrap(
            handler,
            unary=lambda behavior: self._observer.unary(method, behavior, self._enter),
            stream=lambda behavior: self._observer.stream(
                method, _limited_stream(self._limit, self._gate.stream(_guard_stream(behavior)))
            ),
        )

    async def _enter(self, request: Any, context: Context, metadata: Any) -> None:
        # The cap first: refusing costs nothing, not even a key check. Then in this order, as
        # before any of this was folded into one wrapper: an unknown key is UNAUTHENTICATED
        # whatever the request says.
        await _admit(self._limit, context)
        await self._gate.enter(context, metadata)
        track_call()
        if isinstance(request, Malformed):
            await abort(context, request.error)


def _call_limit(config: Config) -> CallLimit:
    sec = config.security
    return CallLimit(sec.max_calls_in_flight, source(sec, "max_calls_in_flight"))


async def _admit(limit: CallLimit, context: Context) -> None:
    try:
        limit.enter_task()
    except MemstoreError as error:
        await abort(context, error)


def _limited_stream(
    limit: CallLimit, method: Callable[[Any, Context], AsyncIterator[Any]]
) -> Callable[[Any, Context], AsyncIterator[Any]]:
    async def handler(request: Any, context: Context) -> AsyncIterator[Any]:
        await _admit(limit, context)
        async for response in method(request, context):
            yield response

    return handler


def _guard_stream(
    method: Callable[[Any, Context], AsyncIterator[Any]],
) -> Callable[[Any, Context], AsyncIterator[Any]]:
    async def handler(request: Any, context: Context) -> AsyncIterator[Any]:
        track_call()
        if isinstance(request, Malformed):
            await abort(context, request.error)
        async for response in method(request, context):
            yield response

    return handler


def _passing_bytes(serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    # A stream may yield a chunk already serialized (WireChunk, encoded by PostgreSQL);
    # protobuf messages concatenate, so its bytes go out as they are.
    def serializer(response: Any) -> bytes:
        if type(response) is WireChunk:
            return response.data
        return serialize(response)

    return serializer


def _register(
    server: grpc.aio.Server, module: ModuleType, name: str, servicer: object, wrap: Wrap
) -> str:
    """Registers `servicer` for service `name` of `module`; returns the full service name."""
    service: descriptor.ServiceDescriptor = module.DESCRIPTOR.services_by_name[name]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        request_class = getattr(module, method.input_type.name)
        response_class = getattr(module, method.output_type.name)
        implementation = getattr(servicer, method.name)
        deserializer = tolerant_deserializer(request_class)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                implementation,
                request_deserializer=deserializer,
                response_serializer=_passing_bytes(response_class.SerializeToString),
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                implementation,
                request_deserializer=deserializer,
                response_serializer=response_class.SerializeToString,
            )
    register(server, service.full_name, handlers, wrap)
    return str(service.full_name)


class _MethodAwarePool:
    """The descriptor pool as reflection sees it, plus the files of RPC methods.

    grpcurl's `describe memstore.v1.SessionService.AddMemory` asks reflection for the file
    containing a method symbol; Python's pool knows services and messages but not methods,
    so it would answer NOT_FOUND. Everything else goes to the real pool unchanged.
    """

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def FindFileContainingSymbol(self, name: str) -> descriptor.FileDescriptor:
        """The file of a symbol, methods included (KeyError when unknown)."""
        try:
            return self._pool.FindFileContainingSymbol(name)
        except KeyError:
            service_name, _, method = name.rpartition(".")
            try:
                service = self._pool.FindServiceByName(service_name)
            except KeyError:
                raise KeyError(name) from None
            if method not in service.methods_by_name:
                raise KeyError(name) from None
            return service.file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


async def _build(
    config: Config,
    store: Store,
    metrics: Metrics | None,
    embedder: Embedder | None,
    auth: Authenticator | None = None,
    *,
    limit: CallLimit | None = None,
) -> tuple[grpc.aio.Server, int, Readiness]:
    if embedder is not None and not store.vectors:
        log.warning(
            "the database keeps no vectors (pgvector is not available): serving full-text "
            "search only"
        )
    tokens = await page_tokens(config, store)
    metrics = metrics or Metrics()
    quiet_ended_call_writes()
    wrapping = _Wrapping(
        Observer(metrics),
        AuthGate(auth or await start_authenticator(config, store)),
        limit or _call_limit(config),
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
        ],
    )
    wrap = wrapping.service
    names = [
        _register(server, user_service_pb2, "UserService", UserServicer(store, tokens), wrap),
        _register(
            server,
            session_service_pb2,
            "SessionService",
            SessionServicer(store, tokens, Searcher(store, embedder)),
            wrap,
        ),
        _register(server, backup_service_pb2, "BackupService", BackupServicer(store, tokens), wrap),
    ]
    health = DrainingHealth()
    health_pb2_grpc.add_HealthServicer_to_server(health, WrappingServer(server, wrapping.open))
    # Services go NOT_SERVING while the database is down, everything during the drain.
    readiness = Readiness(health, names)
    await readiness.start(store)
    if reflection_enabled(config.reflection, config.host):
        reflection.enable_server_reflection(
            [
                *names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
            # Duck-typed: reflection only calls the pool's Find* methods.
            pool=cast(descriptor_pool.DescriptorPool, _MethodAwarePool(descriptor_pool.Default())),
        )
    port = add_port(server, f"{config.host}:{config.port}", config.security)
    if port == 0:
        raise RuntimeError(f"cannot listen on {config.host}:{config.port}")
    return server, port, readiness


async def build_server(
    config: Config, store: Store, metrics: Metrics | None = None
) -> tuple[grpc.aio.Server, int]:
    """A server with both services, health and (optionally) reflection, bound but not started.

    Every call is counted in `metrics` (a fresh Metrics when None) and access-logged.
    Returns the server and the port it is bound to (the real one when config.port is 0).
    """
    server, port, _ = await _build(config, store, metrics, make_embedder(config))
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


def make_embedder(config: Config) -> Embedder | None:
    """The embedder `--embedder` names (None for "none"), shared by search and the worker."""
    try:
        return embedder_from_setting(
            config.embedder, model=config.embedder_model or None, api_key=config.embedder_api_key
        )
    except ValueError as exc:
        raise RuntimeError(f"{source(config, 'embedder')}: {exc}") from exc


def load_model(embedder: Embedder | None) -> None:
    """Loads a local model now rather than on its first use; a failure is logged, not raised.

    A model that cannot load fails each search and embedding batch with the same error,
    which says what to install; the rest of memstore serves on.
    """
    load = getattr(embedder, "load", None)
    if load is None:
        return  # none, or a remote model: nothing to load
    try:
        load()
    except EmbeddingError as exc:
        log.error("%s", exc)


def _embedding_worker(
    config: Config, store: Store, embedder: Embedder | None
) -> EmbeddingWorker | None:
    """The in-process embedding worker, or None when it is off or has nothing to feed.

    Without pgvector it keeps recall by words (migration 0012) and runs no model.
    """
    if not config.embedding_worker:
        _queue_undrained(store, "--no-embedding-worker")
        return None
    if store.word_recall:
        log.info("recall worker on (no pgvector: recall by words, kept ahead of time)")
        return EmbeddingWorker(store, None)
    if embedder is None or not store.vectors:
        _queue_undrained(store, "--embedder none")
        return None
    log.info("embedding worker on (model %s)", embedder.name)
    return EmbeddingWorker(store, embedder)


def _queue_undrained(store: Store, why: str) -> None:
    # AddMemory still queues (the queue is the database's, any process may drain it): say
    # once at start who must, rather than drop the work or let the queue grow unseen.
    if not (store.vectors or store.word_recall):
        return
    work = "messages to embed" if store.vectors else "sessions whose recall to keep by words"
    log.warning(
        "%s: AddMemory queues %s and this process runs no worker to drain them; run "
        "`memstore embed` on this database (one is enough), or the queue only grows "
        "(the memstore_embedding_queue_rows metric)",
        why,
        work,
    )


def _queue_stats(store: Store) -> Callable[[], tuple[int, float] | None] | None:
    """The embedding queue's (rows, oldest seconds) for the metrics thread, read on this
    loop's pool at each scrape; None where nothing is ever queued (no pgvector, no 0012)."""
    if not (store.vectors or store.word_recall):
        return None
    loop = asyncio.get_running_loop()

    def read() -> tuple[int, float] | None:
        future = asyncio.run_coroutine_threadsafe(store.embedding_lag(), loop)
        try:
            return future.result(timeout=_QUEUE_READ_SECONDS)
        except Exception:  # down or slow: the scrape goes on without the queue's gauges
            future.cancel()
            return None

    return read


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
        max_waiting=config.security.pool_max_waiting,
    )


async def serve(config: Config) -> None:
    """Serves until SIGTERM or SIGINT, then shuts down gracefully.

    Raises:
        OSError: the port is taken; checked before the database is opened or migrated.
    """
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
        await store.migrate()  # logs each migration it applies
        metrics = Metrics(store.pool_stats, _queue_stats(store))
        metrics_http = _serve_metrics(config, metrics)
        await loading
        auth = await start_authenticator(config, store)
        # One cap for the process: gRPC and HTTP calls count against it together.
        limit = _call_limit(config)
        server, port, readiness = await _build(config, store, metrics, embedder, auth, limit=limit)
        http = None
        if config.http:
            http = await build_http(config, store, metrics, auth, embedder, limit=limit)
        if http is not None:
            # Before gRPC: once gRPC health answers SERVING, both ports do.
            await http.start()
            log.info("Zep REST API on http://%s:%d", config.host, http.port)
        await server.start()
        log.info("memstore listening on %s:%d", config.host, port)
        if config.purge_interval > 0:
            background.append(asyncio.create_task(_purge_periodically(config, store)))
        worker = _embedding_worker(config, store, embedder)
        if worker is not None:
            background.append(asyncio.create_task(worker.run()))
        if store.vectors or store.word_recall:
            background.append(asyncio.create_task(watch_queue(store)))
        watcher = asyncio.create_task(watch_database(store))
        await wait_for_signal()
        log.info("shutting down (grace period %.1fs)", config.grace_period)
        # Health says NOT_SERVING while calls are still served, so that load balancers
        # move away before the server stops accepting (a stopping server answers no Check).
        await readiness.drain(config.drain_delay)
        await asyncio.gather(
            stop_grpc(server, config.grace_period, lambda: limit.in_flight > 0),
            *([http.stop(config.grace_period)] if http is not None else []),
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


async def stop_grpc(server: grpc.aio.Server, grace: float, busy: Callable[[], bool]) -> None:
    """`server.stop(grace)`, ended early once the server holds only calls nobody will serve.

    gRPC's core (1.85) can strand a call that arrives as the stop begins: it checks for the
    stop without its lock, then queues the call for a handler after the stop has failed every
    request for one, where nothing ever takes it or cancels it (the filter-stack
    `RealRequestMatcher::MatchOrQueue` in `src/core/server/server.cc` misses the check of
    `zombified_` that its promise-based `MatchRequest` has). Its caller then waits for its
    deadline (DEADLINE_EXCEEDED) and the stop for the whole grace period, or that deadline.
    So once no call of memstore's (`busy`) has been in flight for ORPHAN_SECONDS, what the
    core still holds is cancelled (callers get UNAVAILABLE or CANCELLED, at once).
    tests/reliability/test_stop_race.py; docs/reliability.md, "Shutdown".
    """
    loop = asyncio.get_running_loop()
    stopping = asyncio.ensure_future(server.stop(grace))
    idle_since: float | None = None
    cancelling: asyncio.Future[None] | None = None
    while not stopping.done():
        await asyncio.wait({stopping}, timeout=ORPHAN_SECONDS / 4)
        if busy():
            idle_since = None
            continue
        idle_since = loop.time() if idle_since is None else idle_since
        if cancelling is None and loop.time() - idle_since >= ORPHAN_SECONDS:
            # A smaller grace ends the stop sooner: it cancels what the core still holds.
            cancelling = asyncio.ensure_future(server.stop(0))
    await stopping
    if cancelling is not None:
        await cancelling


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
        log.info("metrics on http://%s:%d/metrics", config.metrics_host, port)
        return httpd
    return None


async def wait_for_signal() -> None:
    """Returns when the process receives SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _purge_periodically(config: Config, store: Store) -> None:
    while True:
        await asyncio.sleep(config.purge_interval)
        try:
            report = await store.purge(config.purge_retention)
        except Exception:
            # One failed run (e.g. the database restarting) must not end the periodic purge.
            log.exception("purge failed; retrying in %.0fs", config.purge_interval)
            continue
        # A run that found nothing is routine; only removals are worth an INFO line.
        level = logging.INFO if report.sessions or report.messages else logging.DEBUG
        log.log(level, "purge removed %s", json.dumps(asdict(report), sort_keys=True))
