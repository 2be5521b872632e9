"""Zep's REST API (HTTP/JSON) beside gRPC: routes that adapt to the same store, same errors."""

from __future__ import annotations

from starlette.routing import BaseRoute

from server.api.tokens import PageTokens
from server.config import Config
from server.rest import unserved, v1, v2
from server.rest.app import HttpMetrics, RestApp
from server.rest.routing import Services, build_app
from server.rest.serve import HttpServer, http_server
from server.search.service import Searcher
from server.serving.auth import Authenticator
from server.serving.limit import CallLimit
from server.serving.metrics import Metrics
from server.store import Store


def routes() -> list[BaseRoute]:
    """Every route of Zep's API memstore registers: the unserved ones, /api/v1, /api/v2.

    The router takes the first route that matches. The unserved come first, so that Zep's
    fixed paths among them (`/api/v2/sessions/end`) are never read as an id by a served
    `/sessions/{session_id}`; none of them matches a served path
    (tests/unit/test_rest_routes.py).
    """
    return [*unserved.routes(), *v1.routes(), *v2.routes()]


def build_http_server(
    config: Config,
    store: Store,
    *,
    searcher: Searcher,
    tokens: PageTokens,
    auth: Authenticator,
    metrics: Metrics,
    limit: CallLimit,
) -> HttpServer:
    """The REST server on config.host:config.http_port, bound but not started.

    Raises:
        OSError: the port is taken.
    """
    router = build_app(routes(), Services(store, searcher, tokens))
    return http_server(config, RestApp(router, auth, HttpMetrics(metrics), limit))


__all__ = ["HttpServer", "build_http_server", "routes"]
