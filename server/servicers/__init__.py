"""gRPC servicers: one class per proto service; each validates, calls the store, converts."""

from __future__ import annotations

from typing import Any

import grpc

from server.domain import DEFAULT_PROJECT_ID
from server.pagination import PageTokens
from server.store import Store

Context = grpc.aio.ServicerContext[Any, Any]


class ServicerBase:
    """What every servicer shares: the store, the page-token sealer, the caller's project."""

    def __init__(self, store: Store, tokens: PageTokens) -> None:
        self._store = store
        self._tokens = tokens

    def _project(self, context: Context) -> int:
        # The one place a call's project is decided; auth will derive it from the API key.
        del context
        return DEFAULT_PROJECT_ID


__all__ = ["Context", "ServicerBase"]
