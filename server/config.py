"""Configuration from flags and environment variables (flags win)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from server.serving import tls as security_flags
from server.serving.tls import SecurityConfig


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the server needs to start; see README "Configuration"."""

    host: str = "localhost"
    port: int = 50051
    #: PostgreSQL URL; None starts the embedded PostgreSQL under data_dir.
    database_url: str | None = None
    data_dir: Path = Path(".data")
    pool_min_size: int = 2
    pool_max_size: int = 10
    #: Seconds a call waits for a pooled connection before answering UNAVAILABLE.
    pool_timeout: float = 5.0
    #: Soft-deleted rows older than this are hard-deleted by the purge.
    purge_retention: timedelta = timedelta(days=7)
    #: Seconds between periodic purges; 0 turns the periodic purge off.
    purge_interval: float = 3600.0
    #: Seconds in-flight calls get to finish after SIGTERM/SIGINT.
    grace_period: float = 10.0
    #: Seconds health says NOT_SERVING, still serving, before the grace period starts.
    drain_delay: float = 1.0
    #: Seconds a statement may run when its call has no deadline; 0 for no limit.
    statement_timeout: float = 30.0
    #: None: on for a loopback bind, off otherwise.
    reflection: bool | None = None
    #: Page-token HMAC key; None uses the key kept in the database.
    token_key: bytes | None = None
    log_level: str = "INFO"
    #: Port of the Prometheus /metrics endpoint; None serves no metrics.
    metrics_port: int | None = None
    metrics_host: str = "localhost"
    #: "json" (one object per line) or "text".
    log_format: str = "json"
    #: TLS, --insecure, the key cache and the pool queue bound (server/serving/tls.py).
    security: SecurityConfig = field(default_factory=SecurityConfig)
    #: Serving processes sharing the port (SO_REUSEPORT); 1 serves in this process.
    workers: int = 1
    #: "local" (the ONNX model shipped in a package), "none", or an OpenAI-compatible URL.
    embedder: str = "local"
    #: The model name sent to an OpenAI-compatible embedder.
    embedder_model: str = ""
    #: The API key sent to an OpenAI-compatible embedder.
    embedder_api_key: str | None = None
    #: Whether `serve` runs the embedding worker in-process (`memstore embed` runs it alone).
    embedding_worker: bool = True


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the serve flags, each defaulting to its environment variable."""
    d = Config()
    parser.add_argument("--host", default=_env("MEMSTORE_HOST", d.host))
    parser.add_argument("--port", type=int, default=int(_env("MEMSTORE_PORT", str(d.port)) or 0))
    parser.add_argument("--database-url", default=_env("DATABASE_URL"))
    parser.add_argument(
        "--data-dir", type=Path, default=Path(_env("MEMSTORE_DATA_DIR", ".data") or ".")
    )
    parser.add_argument(
        "--pool-min-size", type=int, default=int(_env("MEMSTORE_POOL_MIN_SIZE", "2") or 2)
    )
    parser.add_argument(
        "--pool-max-size", type=int, default=int(_env("MEMSTORE_POOL_MAX_SIZE", "10") or 10)
    )
    parser.add_argument(
        "--pool-timeout", type=float, default=float(_env("MEMSTORE_POOL_TIMEOUT", "5") or 5)
    )
    parser.add_argument(
        "--purge-retention-days",
        type=float,
        default=float(_env("MEMSTORE_PURGE_RETENTION_DAYS", "7") or 7),
    )
    parser.add_argument(
        "--purge-interval", type=float, default=float(_env("MEMSTORE_PURGE_INTERVAL", "3600") or 0)
    )
    parser.add_argument(
        "--grace-period", type=float, default=float(_env("MEMSTORE_GRACE_PERIOD", "10") or 0)
    )
    reflection = _env("MEMSTORE_REFLECTION")
    parser.add_argument(
        "--drain-delay", type=float, default=float(_env("MEMSTORE_DRAIN_DELAY", "1") or 0)
    )
    parser.add_argument(
        "--statement-timeout",
        type=float,
        default=float(_env("MEMSTORE_STATEMENT_TIMEOUT", "30") or 0),
    )
    parser.add_argument(
        "--reflection",
        action=argparse.BooleanOptionalAction,
        default=None if reflection is None else reflection not in ("0", "false", "off"),
        help="server reflection (default: on for a loopback bind, off otherwise)",
    )
    parser.add_argument("--log-level", default=_env("MEMSTORE_LOG_LEVEL", "INFO"))
    security_flags.add_arguments(parser)
    parser.add_argument(
        "--workers", type=_positive, default=_positive(_env("MEMSTORE_WORKERS", "1") or "1")
    )
    add_observability_arguments(parser)
    add_embedding_arguments(parser)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_embedding_arguments(parser: argparse.ArgumentParser) -> None:
    """The embedding model and worker flags."""
    worker = _env("MEMSTORE_EMBEDDING_WORKER")
    parser.add_argument("--embedder", default=_env("MEMSTORE_EMBEDDER", "local"))
    parser.add_argument("--embedder-model", default=_env("MEMSTORE_EMBEDDER_MODEL", ""))
    parser.add_argument(
        "--embedding-worker",
        action=argparse.BooleanOptionalAction,
        default=True if worker is None else worker not in ("0", "false", "off"),
    )


def add_observability_arguments(parser: argparse.ArgumentParser) -> None:
    """The metrics endpoint and log format flags."""
    port = _env("MEMSTORE_METRICS_PORT")
    parser.add_argument("--metrics-port", type=int, default=int(port) if port else None)
    parser.add_argument("--metrics-host", default=_env("MEMSTORE_METRICS_HOST", "localhost"))
    parser.add_argument(
        "--log-format", choices=("json", "text"), default=_env("MEMSTORE_LOG_FORMAT", "json")
    )


def from_arguments(args: argparse.Namespace) -> Config:
    """Builds a Config from parsed flags (and MEMSTORE_TOKEN_KEY)."""
    key = _env("MEMSTORE_TOKEN_KEY")
    return Config(
        host=args.host,
        port=args.port,
        database_url=args.database_url,
        data_dir=args.data_dir,
        pool_min_size=args.pool_min_size,
        pool_max_size=args.pool_max_size,
        pool_timeout=args.pool_timeout,
        purge_retention=timedelta(days=args.purge_retention_days),
        purge_interval=args.purge_interval,
        grace_period=args.grace_period,
        drain_delay=args.drain_delay,
        statement_timeout=args.statement_timeout,
        reflection=args.reflection,
        token_key=key.encode() if key else None,
        log_level=args.log_level,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        log_format=args.log_format,
        security=security_flags.from_arguments(args),
        workers=args.workers,
        embedder=args.embedder,
        embedder_model=args.embedder_model,
        embedder_api_key=_env("MEMSTORE_EMBEDDER_API_KEY"),
        embedding_worker=args.embedding_worker,
    )
