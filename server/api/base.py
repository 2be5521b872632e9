"""gRPC servicers: one class per proto service; each validates, calls the store, converts."""

from __future__ import annotations

from typing import Any

import grpc

from server.api.tokens import PageTokens
from server.serving.auth import current_project
from server.store import Store

Context = grpc.aio.ServicerContext[Any, Any]


class ServicerBase:
    """What every servicer shares: the store, the page-token sealer, the caller's project."""

    def __init__(self, store: Store, tokens: PageTokens) -> None:
        self._store = store
        self._tokens = tokens

    def _project(self, context: Context) -> int:
        # The one place a call's project is read: AuthGate resolved it from the API
        # key (or the default project while no key exists) before the handler ran.
        del context
        return current_project()


__all__ = ["Context", "ServicerBase"]
