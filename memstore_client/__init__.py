"""memstore's Python client: sync Memstore and asyncio AsyncMemstore, shaped like Zep's SDK."""

from __future__ import annotations

from ._channel import TLS
from ._retry import RetryPolicy
from .aio import AsyncMemstore
from .errors import (
    AlreadyExists,
    ArgumentTypeError,
    ClientClosed,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    MemstoreError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from .sync import Memstore
from .types import (
    BackupSource,
    ExportedMessage,
    Memory,
    Message,
    MessagePage,
    RestoreCounts,
    Restored,
    SearchResult,
    SearchResults,
    Session,
    SessionPage,
    Snapshot,
    User,
    UserPage,
    UserSessionPage,
)

__all__ = [
    "TLS",
    "AlreadyExists",
    "ArgumentTypeError",
    "AsyncMemstore",
    "BackupSource",
    "ClientClosed",
    "DeadlineExceeded",
    "ExportedMessage",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "Memory",
    "Memstore",
    "MemstoreError",
    "Message",
    "MessagePage",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "RestoreCounts",
    "Restored",
    "RetryPolicy",
    "SearchResult",
    "SearchResults",
    "Session",
    "SessionPage",
    "Snapshot",
    "Unauthenticated",
    "Unavailable",
    "User",
    "UserPage",
    "UserSessionPage",
]
