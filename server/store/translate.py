"""The one translation of psycopg errors into memstore's domain errors."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType

import psycopg
from psycopg import errors as pg
from psycopg import sql
from psycopg_pool import PoolTimeout, TooManyRequests

from server.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MemstoreError,
    ResourceExhausted,
    Unavailable,
    UnreadableValue,
)
from server.store.db import StoreCursor, Unanswered
from server.store.queries import QUERIES

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
    except (pg.QueryCanceled, Unanswered) as exc:
        raise _cancelled(exc) from exc
    except pg.DataError as exc:
        raise _data_error(exc, field) from exc
    except (pg.ProgramLimitExceeded, pg.IntegrityError) as exc:
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
        raise _unavailable(exc) from exc
    except pg.InsufficientPrivilege as exc:
        # The role memstore connects as may not do what it must (create its tables, say):
        # the operator's to grant, said in one line, not a traceback.
        log.error("the database role lacks a privilege: %s", _first_line(exc))
        raise MemstoreError(
            f"the database role lacks a privilege memstore needs: {_detail(exc, 'denied')}"
        ) from exc
    except psycopg.Error as exc:
        if _worker_lost(exc):
            raise Unavailable(
                "database unavailable: a Citus worker could not be reached "
                f"({_detail(exc, '').splitlines()[0]}); retry"
            ) from exc
        log.exception("unexpected database error")
        raise MemstoreError("internal database error; see the server log") from exc


#: How Citus words a connection to a worker not made within citus.node_connection_timeout.
_NO_CONNECTION_IN_TIME = "could not establish any connections to the node"


#: How Citus words a worker it cannot reach, or whose connection it lost, within a call: as
#: an internal error (XX000), where libpq's own connection errors are OperationalErrors. A
#: connection cut while Citus prepared a two-phase commit answered INTERNAL and logged a
#: traceback; the transaction is rolled back, and the call is one to retry. So did a worker
#: lost during a one-shard write's COMMIT ("could not commit transaction for shard ...",
#: Citus's commit-time check; memstore defers no constraint, so nothing else raises it
#: here): as with a connection lost during COMMIT on plain PostgreSQL, the write may have
#: been made (tests/citus/test_grow.py, the crashed worker). Citus also passes on libpq's own
#: words for a connection lost mid-command as the message (XX000: libpq's result has no
#: SQLSTATE), over SSL between nodes as "SSL SYSCALL error: EOF detected" (a COMMIT meeting
#: the crashed worker, 2 runs of 6 on 2026-12-04): these are the client library's, never a
#: worker's own error. A read over several shards whose connection to a lost worker failed
#: says "failure on connection marked as essential" (Citus's MarkRemoteTransactionFailed,
#: for a failed transaction command such as BEGIN or COMMIT on a node's connection; memstore
#: defers no constraint and reads committed, so for it only a lost node fails those).
_WORKER_LOST = (
    "server closed the connection unexpectedly",
    "connection to the remote node",
    _NO_CONNECTION_IN_TIME,
    "connection not open",
    "could not commit transaction for shard",
    "SSL SYSCALL error",
    "SSL connection has been closed unexpectedly",
    "could not receive data from server",
    "could not send data to server",
    "no connection to the server",
    "failure on connection marked as essential",
)


def _worker_lost(exc: psycopg.Error) -> bool:
    """Whether `exc` is Citus saying that a worker node could not be reached."""
    return exc.sqlstate == "XX000" and _detail(exc, "").startswith(_WORKER_LOST)


def worker_lost(exc: MemstoreError) -> bool:
    """Whether `exc`, a translated error, is Citus saying that a worker node could not be
    reached: the coordinator answered (its error has a SQLSTATE: XX000 as _worker_lost
    reads it, or 08006 for "connection to the remote node ... failed", a connection it
    could not open), so the rest of the cluster still serves. A connection to the
    coordinator itself lost or refused (libpq's own error, no SQLSTATE) is not one."""
    cause = exc.__cause__
    return (
        isinstance(exc, Unavailable)
        and isinstance(cause, psycopg.Error)
        and cause.sqlstate is not None
        and _detail(cause, "").startswith(_WORKER_LOST)
    )


def unanswered(exc: MemstoreError) -> bool:
    """Whether `exc`, a translated error, is the database's silence past the bound on an
    answer (Unanswered: the connection was dropped), not a statement PostgreSQL cancelled."""
    return isinstance(exc, DeadlineExceeded) and isinstance(exc.__cause__, Unanswered)


def met_silence(exc: MemstoreError) -> bool:
    """Whether `exc`, a translated error, is a worker's (or the database's) silence: no answer
    within the store's bound (unanswered), or no connection to a Citus worker within
    citus.node_connection_timeout (Store.open sets it below the statement timeout). A worker
    that refuses connections (crashed, its machine up) is lost, not silent."""
    if unanswered(exc):
        return True
    cause = exc.__cause__
    return (
        worker_lost(exc)
        and isinstance(cause, psycopg.Error)
        and _detail(cause, "").startswith(_NO_CONNECTION_IN_TIME)
    )


def _cancelled(exc: pg.QueryCanceled | Unanswered) -> DeadlineExceeded:
    if isinstance(exc, Unanswered):
        # The statement timeout passed and the database still said nothing (a Citus worker
        # or a primary that stopped answering): the connection was dropped. As for a
        # statement the timeout cancelled, what it wrote may or may not have been made.
        return DeadlineExceeded(
            f"the database did not answer within the statement timeout ({exc}); retry"
        )
    # Raised when the caller's deadline cancels the query, or statement_timeout fires.
    if "statement timeout" in _detail(exc, ""):
        return DeadlineExceeded(
            "the query ran longer than the server's statement timeout and was cancelled"
        )
    return DeadlineExceeded("the query was cancelled: the deadline passed")


def _unavailable(exc: psycopg.OperationalError | PoolTimeout) -> Unavailable:
    if isinstance(exc, pg.DeadlockDetected):
        # Not the database's absence: calls writing the same rows at once (said apart, so
        # that an operator is not sent to look at PostgreSQL).
        return Unavailable(
            f"calls writing the same rows at once deadlocked: {_first_line(exc)}; retry",
            reason="CONCURRENT_WRITES",
        )
    return Unavailable(f"database unavailable: {_first_line(exc)}")


def _data_error(exc: psycopg.DataError, field: str) -> MemstoreError:
    """The domain error of a data error: a stored value unreadable, vectors of two lengths,
    or (most often) a value of the request, named by its column or `field`."""
    if _loading(exc):
        return _unreadable(exc)
    if exc.sqlstate == "22000" and _detail(exc, "").startswith("different vector dimensions"):
        return _dimensions_differ(exc)
    # Client-side dump failures (e.g. a NUL byte in a string) carry no column name.
    return InvalidArgument.field(_column(exc) or field, _detail(exc, "invalid value"))


#: The methods by which psycopg's Transformer (psycopg.abc.Transformer: the Python one and the
#: C one of psycopg_binary alike) loads a result's values into Python. A value's dumper runs
#: in execute(), before the statement is sent; its loader only in these, after it ran.
_LOADS = frozenset({"load_rows", "load_row", "load_sequence"})


def _loading(exc: psycopg.DataError) -> bool:
    """Whether `exc` was raised loading a result's value, rather than dumping a parameter.

    psycopg raises the same DataError, with no sqlstate, for both: a parameter it cannot
    send (the caller's value) and a stored value it cannot give as Python's (a timestamptz
    past 9999 or `infinity`: no datetime holds it). Only where it was raised tells them
    apart. An error PostgreSQL raised has a sqlstate (22P02, 22003...): the request's.
    """
    if exc.sqlstate is not None:
        return False
    return any(_name(tb).rsplit(".", 1)[-1] in _LOADS for tb in _frames(exc.__traceback__))


def _frames(tb: TracebackType | None) -> Iterator[TracebackType]:
    while tb is not None:
        yield tb
        tb = tb.tb_next


def _name(tb: TracebackType) -> str:
    return tb.tb_frame.f_code.co_name


def _unreadable(exc: psycopg.DataError) -> UnreadableValue:
    # The caller learns only that a stored value could not be read; the log says which
    # statement read it and what the driver said.
    log.error(
        "a stored value could not be read by statement %s: %s: %s",
        _statement(exc),
        type(exc).__name__,
        _first_line(exc),
    )
    return UnreadableValue("a value stored in the database could not be read; see the server log")


def _dimensions_differ(exc: psycopg.DataError) -> FailedPrecondition:
    # pgvector compares only vectors of one length. Vectors carry their model's name, so
    # this means one name now answers vectors of another length than those it stored:
    # another model behind the same --embedder-model. No request can mend that; the
    # operator can, and the message says how (docs/search.md, "Models").
    log.error("stored vectors and the embedding model's differ in length: %s", _first_line(exc))
    return FailedPrecondition(
        f"the stored vectors of the embedding model and its answers differ in length "
        f"({_detail(exc, '')}): another model answers under the same name; start memstore "
        "with a new --embedder-model name and run `memstore reindex`",
        reason="EMBEDDING_DIMENSIONS_DIFFER",
    )


def _statement(exc: psycopg.DataError) -> str:
    """The name of the statement whose result raised `exc` (else its text, on one line)."""
    for tb in _frames(exc.__traceback__):
        cursor = tb.tb_frame.f_locals.get("self")
        if isinstance(cursor, StoreCursor):
            # The statement as the store passed it to execute, kept by the store's own
            # cursor (it read psycopg's private Cursor._last_query).
            statement = cursor.statement
            for name, known in QUERIES.items():
                if statement is known:
                    return name
            if isinstance(statement, sql.Composable):
                statement = statement.as_string(None)
            if isinstance(statement, bytes):
                statement = statement.decode(errors="replace")
            if isinstance(statement, str):
                return _name_of(" ".join(statement.split()))
    return "(unknown)"


#: A field of a statement template, `{filters}`, which the store fills before running it.
_FIELD = re.compile(r"\{[a-z_]+\}")


def _name_of(text: str) -> str:
    # A template the store filled: the named template with the longest text up to its first
    # field that the statement begins with (list_sessions' begins get_memory's too). Else,
    # or where two such heads are as long, the statement's own first 200 characters.
    found: dict[int, list[str]] = {}
    for name, known in QUERIES.items():
        template = known.as_string(None)
        head = " ".join(_FIELD.split(template, maxsplit=1)[0].split())
        if _FIELD.search(template) and len(head) >= 24 and text.startswith(head):
            found.setdefault(len(head), []).append(name)
    names = found[max(found)] if found else []
    return names[0] if len(names) == 1 else repr(text[:200])


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
