"""Every setting of `memstore`, declared once: flag, environment variable, type, default, help."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from server import settings
from server.serving.connections import MAX_CONNECTIONS, MAX_CONNECTIONS_DEFAULT
from server.serving.limit import MAX_CALLS_IN_FLIGHT
from server.settings import (
    ANY,
    EMBED,
    PURGE,
    STORE,
    Declared,
    parse_bool,
    parse_count,
    parse_origins,
    parse_port,
    parse_positive,
    parse_positive_seconds,
    parse_seconds,
    parse_url,
    seconds_up_to,
    set_by_env,
    setting,
    source,
)

#: PostgreSQL's largest statement_timeout, 2^31 - 1 ms, in whole seconds: past it every
#: connection was refused ("invalid value for parameter"), said as "database unavailable".
MAX_STATEMENT_TIMEOUT = 2147483
#: The longest retention: 100 years. Past ~2.7 million years timedelta overflowed (a
#: traceback); far short of that, the purge's cutoff left PostgreSQL's range of times.
MAX_RETENTION_DAYS = 36500
_retention_days = seconds_up_to(MAX_RETENTION_DAYS, "days")

#: The longest --grace-period or --drain-delay: a day. A drain of 1e300 s was taken, and a
#: stopped server then said NOT_SERVING and never exited.
MAX_STOP_SECONDS = 86_400


#: The shortest period between purges: 1e-9 was taken, and purged 6,440 times in 6 s (an
#: audit); a purge that finds nothing still runs its statements.
MIN_PURGE_INTERVAL = 1.0


def _purge_interval(text: str) -> float:
    value = seconds_up_to(MAX_STOP_SECONDS)(text)
    if 0 < value < MIN_PURGE_INTERVAL:
        raise ValueError(f"must be 0 (off) or at least {MIN_PURGE_INTERVAL:.0f}, not {text}")
    return value


def _days(text: str) -> timedelta:
    return timedelta(days=_retention_days(text))


def _log_format(text: str) -> str:
    if text not in ("json", "text"):
        raise ValueError(f"{text!r} is not one of json, text")
    return text


def _log_level(text: str) -> str:
    if text.upper() not in logging.getLevelNamesMapping():
        raise ValueError(
            f"{text!r} is not a logging level (DEBUG, INFO, WARNING, ERROR or CRITICAL)"
        )
    return text.upper()


def _embedder(text: str) -> str:
    value = text.strip()
    if value.lower() in ("local", "none") or value.startswith(("http://", "https://")):
        return value
    raise ValueError(f"{text!r} is not local, none or an http(s):// URL")


def _key(text: str) -> bytes:
    return text.encode()


def _calls(text: str) -> int:
    value = parse_positive(text)
    if value > MAX_CALLS_IN_FLIGHT:
        raise ValueError(f"must be at most {MAX_CALLS_IN_FLIGHT}, not {value}")
    return value


def _connections(text: str) -> int:
    value = parse_positive(text)
    if value > MAX_CONNECTIONS:
        raise ValueError(f"must be at most {MAX_CONNECTIONS}, not {value}")
    return value


# -- the declaration ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    """The security part of Config; see README "Authentication and TLS"."""

    insecure: bool = setting(
        False,
        "serve a non-loopback --host although no API key exists, which is refused otherwise",
        env="MEMSTORE_INSECURE",
        parse=parse_bool,
    )
    tls_cert: Path | None = setting(
        None,
        "PEM certificate chain: serve TLS (with --tls-key)",
        env="MEMSTORE_TLS_CERT",
        parse=Path,
    )
    tls_key: Path | None = setting(
        None, "PEM private key of --tls-cert", env="MEMSTORE_TLS_KEY", parse=Path
    )
    tls_client_ca: Path | None = setting(
        None,
        "PEM CA bundle: require client certificates signed by it (mTLS)",
        env="MEMSTORE_TLS_CLIENT_CA",
        parse=Path,
    )
    key_cache_seconds: float = setting(
        2.0,
        "seconds a checked API key stays trusted: a revoked key stops working within this",
        env="MEMSTORE_KEY_CACHE_SECONDS",
        parse=parse_seconds,
    )
    pool_max_waiting: int = setting(
        64,
        "calls that may queue for a database connection; more answer RESOURCE_EXHAUSTED at once",
        env="MEMSTORE_POOL_MAX_WAITING",
        parse=parse_count,
        commands=STORE,
    )
    max_calls_in_flight: int = setting(
        10_000,
        "calls (gRPC and HTTP) one serving process holds at once, and health Watch streams "
        "apart; more answer RESOURCE_EXHAUSTED at once",
        env="MEMSTORE_MAX_CALLS_IN_FLIGHT",
        parse=_calls,
        metavar="N",
    )
    max_connections: int = setting(
        MAX_CONNECTIONS_DEFAULT,
        "connections one serving process keeps open on each port; more are refused at once "
        "(gRPC: closed, the caller sees UNAVAILABLE; HTTP: 429 SERVER_OVERLOADED)",
        env="MEMSTORE_MAX_CONNECTIONS",
        parse=_connections,
        metavar="N",
    )
    send_stall_timeout: float = setting(
        60.0,
        "seconds a gRPC answer may wait for the client to take it before the call is cancelled "
        "(an unread stream, an HTTP/2 window left shut); 0 waits forever",
        env="MEMSTORE_SEND_STALL_TIMEOUT",
        parse=parse_seconds,
    )
    #: Which of these settings their environment variables set (settings.source).
    set_by_env: frozenset[str] = set_by_env()


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the `memstore` command needs; README "Configuration" lists the same."""

    host: str = setting(
        "localhost", "address to bind", env="MEMSTORE_HOST", parse=str, metavar="ADDRESS"
    )
    port: int = setting(50051, "gRPC port", env="MEMSTORE_PORT", parse=parse_port)
    http: bool = setting(
        True,
        "serve Zep's REST API (HTTP/JSON, docs/zep-compat.md) beside gRPC, on --host",
        env="MEMSTORE_HTTP",
        parse=parse_bool,
    )
    http_port: int = setting(
        8000,
        "port of Zep's REST API (Zep's own port); 0 picks a free one",
        env="MEMSTORE_HTTP_PORT",
        parse=parse_port,
    )
    http_cors_origin: tuple[str, ...] = setting(
        (),
        "browser origins (comma-separated, or *) allowed to call the REST API (CORS)",
        env="MEMSTORE_HTTP_CORS_ORIGIN",
        parse=parse_origins,
        shown="none: no CORS, a preflight answers 405",
        metavar="ORIGINS",
    )
    workers: int = setting(
        1,
        "serving processes sharing the gRPC and HTTP ports (SO_REUSEPORT), e.g. one per core",
        env="MEMSTORE_WORKERS",
        parse=parse_positive,
    )
    reflection: bool | None = setting(
        None,
        "gRPC server reflection",
        env="MEMSTORE_REFLECTION",
        parse=parse_bool,
        shown="on for a loopback --host, off otherwise",
    )
    database_url: str | None = setting(
        None,
        "PostgreSQL URL",
        env="DATABASE_URL",
        parse=parse_url,
        commands=ANY,
        shown="unset: the embedded PostgreSQL under --data-dir",
        metavar="URL",
    )
    data_dir: Path = setting(
        Path(".data"),
        "where the embedded PostgreSQL keeps its data (DIR/pg)",
        env="MEMSTORE_DATA_DIR",
        parse=Path,
        commands=ANY,
        metavar="DIR",
    )
    pool_min_size: int = setting(
        2, "connections kept open", env="MEMSTORE_POOL_MIN_SIZE", parse=parse_count, commands=STORE
    )
    pool_max_size: int = setting(
        10,
        "most connections opened",
        env="MEMSTORE_POOL_MAX_SIZE",
        parse=parse_positive,
        commands=STORE,
    )
    pool_timeout: float = setting(
        5.0,
        "seconds a call waits for a connection before UNAVAILABLE",
        env="MEMSTORE_POOL_TIMEOUT",
        parse=parse_positive_seconds,
        # `keys` and `projects` open the store too: an unreachable database stops them after it.
        commands=ANY,
    )
    statement_timeout: float = setting(
        30.0,
        "seconds a statement may run when its call has no deadline (then DEADLINE_EXCEEDED); "
        "0 for no limit",
        env="MEMSTORE_STATEMENT_TIMEOUT",
        parse=seconds_up_to(MAX_STATEMENT_TIMEOUT),
        metavar="SECONDS",
        commands=STORE,
    )
    recall_timeout: float = setting(
        5.0,
        "seconds GetMemory waits, on Citus, for the memories of the user's other sessions "
        "(at most half of what is left of the call's deadline) before it answers the window "
        "without them, relevant_unavailable set; 0 for no bound",
        env="MEMSTORE_RECALL_TIMEOUT",
        parse=seconds_up_to(MAX_STATEMENT_TIMEOUT),
        metavar="SECONDS",
        commands=("serve",),
    )
    grace_period: float = setting(
        10.0,
        "seconds in-flight calls (and the embedding worker's batch in hand) get to finish on "
        "SIGTERM/SIGINT",
        env="MEMSTORE_GRACE_PERIOD",
        parse=seconds_up_to(MAX_STOP_SECONDS),
        commands=("serve", "embed"),
    )
    drain_delay: float = setting(
        1.0,
        "seconds health says NOT_SERVING on SIGTERM/SIGINT, still serving, before the grace period",
        env="MEMSTORE_DRAIN_DELAY",
        parse=seconds_up_to(MAX_STOP_SECONDS),
    )
    purge_retention: timedelta = setting(
        timedelta(days=7),
        "soft-deleted rows older than this many days are hard-deleted",
        env="MEMSTORE_PURGE_RETENTION_DAYS",
        parse=_days,
        commands=PURGE,
        flag="--purge-retention-days",
        shown="7",
        metavar="DAYS",
    )
    purge_interval: float = setting(
        3600.0,
        f"seconds between periodic purges, {MIN_PURGE_INTERVAL:.0f} to {MAX_STOP_SECONDS}; "
        "0 turns them off (the first runs within a minute of the start)",
        env="MEMSTORE_PURGE_INTERVAL",
        parse=_purge_interval,
    )
    log_level: str = setting(
        "INFO",
        "logging level",
        env="MEMSTORE_LOG_LEVEL",
        parse=_log_level,
        commands=ANY,
        metavar="LEVEL",
    )
    log_format: str = setting(
        "json",
        "json (one object per line) or text",
        env="MEMSTORE_LOG_FORMAT",
        parse=_log_format,
        commands=ANY,
        metavar="{json,text}",
    )
    metrics_port: int | None = setting(
        None,
        "port of the Prometheus /metrics endpoint; with --workers N, each worker takes the first "
        "free port of PORT..PORT+N-1",
        env="MEMSTORE_METRICS_PORT",
        parse=parse_port,
        shown="unset: no metrics",
    )
    metrics_host: str = setting(
        "localhost",
        "address the metrics endpoint binds",
        env="MEMSTORE_METRICS_HOST",
        parse=str,
        metavar="ADDRESS",
    )
    embedder: str = setting(
        "local",
        "embedding model: local (the ONNX model shipped in a package), none (full-text search "
        "only), or the URL of an OpenAI-compatible /v1/embeddings endpoint",
        env="MEMSTORE_EMBEDDER",
        parse=_embedder,
        commands=EMBED,
        metavar="MODEL",
    )
    embedder_model: str = setting(
        "",
        "model name sent to an --embedder URL",
        env="MEMSTORE_EMBEDDER_MODEL",
        parse=str,
        commands=EMBED,
        shown="unset",
        metavar="NAME",
    )
    embedder_api_key: str | None = setting(
        None,
        "API key sent to an --embedder URL (kept out of ps)",
        env="MEMSTORE_EMBEDDER_API_KEY",
        parse=str,
        commands=EMBED,
        flag=None,
        shown="unset",
    )
    embedding_worker: bool = setting(
        True,
        "run the embedding worker in this process (memstore embed runs it alone); without "
        "pgvector it keeps recall by words. Off, run memstore embed somewhere: AddMemory still "
        "queues, and the queue only grows",
        env="MEMSTORE_EMBEDDING_WORKER",
        parse=parse_bool,
    )
    token_key: bytes | None = setting(
        None,
        "page-token HMAC key",
        env="MEMSTORE_TOKEN_KEY",
        parse=_key,
        flag=None,
        shown="unset: the key kept in the database",
    )
    #: Its own dataclass, since TLS and auth take only this part.
    security: SecurityConfig = field(default_factory=SecurityConfig)
    #: Which of these settings their environment variables set (settings.source).
    set_by_env: frozenset[str] = set_by_env()


#: Every setting, in declaration order.
SETTINGS: tuple[Declared, ...] = tuple(settings.declared(Config))


def add_arguments(parser: argparse.ArgumentParser, command: str = "serve") -> None:
    """Adds the flags `command` reads; from_arguments then fills in the environment and defaults."""
    settings.add_arguments(parser, Config, command)


def from_arguments(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Config:
    """The Config of parsed flags: a flag wins, then its environment variable, then the default.

    Raises:
        ConfigError: an environment variable holds a value its setting cannot take, or
            --pool-min-size is more than --pool-max-size (psycopg's ValueError was a
            traceback).
    """
    config = settings.build(Config, args, environ)
    if config.pool_min_size > config.pool_max_size:
        raise settings.ConfigError(
            f"{source(config, 'pool_min_size')} ({config.pool_min_size}) is more than "
            f"{source(config, 'pool_max_size')} ({config.pool_max_size})"
        )
    _check_ports(config)
    return config


def _check_ports(config: Config) -> None:
    """Refuses two of memstore's servers on one port (0, picked by the system, never clashes).
    The metrics server took 127.0.0.1:PORT and gRPC only [::1]:PORT, with a warning in gRPC's
    own log; an --http-port equal to --port said "port ... is in use", by memstore itself.

    Raises:
        ConfigError: naming the two flags (or the environment variables that set them).
    """
    taken = {config.port: source(config, "port")}
    if config.http and config.http_port:
        http_port = source(config, "http_port")
        if config.http_port in taken:
            raise settings.ConfigError(
                f"{http_port} ({config.http_port}) is {taken[config.http_port]}'s too"
            )
        taken[config.http_port] = http_port
    if config.metrics_port:
        # With --workers N, worker i serves its metrics on metrics_port + i.
        for port in range(config.metrics_port, config.metrics_port + config.workers):
            if port in taken:
                raise settings.ConfigError(
                    f"{source(config, 'metrics_port')} ({config.metrics_port}) is "
                    f"{taken[port]}'s too"
                    + (f" (its workers take up to {port})" if port != config.metrics_port else "")
                )
