"""The one translation of psycopg errors into memstore's domain errors."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
from psycopg import errors as pg
from psycopg_pool import PoolTimeout, TooManyRequests

from server.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MemstoreError,
    ResourceExhausted,
    Unavailable,
)

log = logging.getLogger(__name__)

#: Builds the domain error for one driver error, in the words of the calling method.
ErrorFactory = Callable[[psycopg.Error], MemstoreError]


@contextmanager
def translated(
    *,
    unique: ErrorFactory | None = None,
    foreign_key: ErrorFactory | None = None,
    field: str = "request",
) -> Iterator[None]:
    """Re-raises every psycopg error of the block as a domain error.

    `unique` and `foreign_key` word the error of a method that expects one;
    `field` names the request field an invalid value most likely came from.

    Raises:
        MemstoreError: a subclass matching the driver error (see the clauses below).
    """
    try:
        yield
    except pg.UniqueViolation as exc:
        raise (unique(exc) if unique else AlreadyExists(_detail(exc, "already exists"))) from exc
    except pg.ForeignKeyViolation as exc:
        if foreign_key:
            raise foreign_key(exc) from exc
        raise FailedPrecondition(_detail(exc, "a referenced row does not exist")) from exc
    except pg.QueryCanceled as exc:
        # Raised when the caller's deadline cancels the query, or statement_timeout fires.
        if "statement timeout" in _detail(exc, ""):
            raise DeadlineExceeded(
                "the query ran longer than the server's statement timeout and was cancelled"
            ) from exc
        raise DeadlineExceeded("the query was cancelled: the deadline passed") from exc
    except (pg.DataError, pg.ProgramLimitExceeded, pg.IntegrityError) as exc:
        # Client-side dump failures (e.g. a NUL byte in a string) carry no column name.
        name = _column(exc) or field
        raise InvalidArgument.field(name, _detail(exc, "invalid value")) from exc
    except TooManyRequests as exc:
        # The bounded pool queue is full: answer at once rather than queue without bound.
        raise ResourceExhausted(
            "server overloaded: too many calls are waiting for a database connection; "
            "retry with backoff",
            reason="SERVER_OVERLOADED",
        ) from exc
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise Unavailable(f"database unavailable: {_first_line(exc)}") from exc
    except psycopg.Error as exc:
        log.exception("unexpected database error")
        raise MemstoreError("internal database error; see the server log") from exc


def _column(exc: psycopg.Error) -> str | None:
    diag = getattr(exc, "diag", None)
    return getattr(diag, "column_name", None) if diag is not None else None


def _detail(exc: psycopg.Error, fallback: str) -> str:
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    return str(primary or _first_line(exc) or fallback)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
