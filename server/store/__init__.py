"""The storage layer: every SQL statement of memstore runs here (see sql/*.sql)."""

from __future__ import annotations

from server.store.embeddings import Deferred
from server.store.fuse import ShareState
from server.store.reindex import QUEUE_COUNT_CAP
from server.store.store import Store

__all__ = ["QUEUE_COUNT_CAP", "Deferred", "ShareState", "Store"]
