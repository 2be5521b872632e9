"""Builds list_sessions from whitelisted SQL fragments (filters, keyset, order)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from server.domain import SessionQuery, TimeKey
from server.store.queries import query

#: The only columns a session list may be ordered by.
ORDER_COLUMNS = ("created_at", "updated_at")

#: (query attribute, filter fragment) of every optional filter with a value.
_VALUE_FILTERS = (
    ("user_id", "filter_user_id"),
    ("created_after", "filter_created_after"),
    ("created_before", "filter_created_before"),
    ("updated_after", "filter_updated_after"),
    ("updated_before", "filter_updated_before"),
    ("metadata_contains", "filter_metadata_contains"),
)


def session_filters(q: SessionQuery) -> tuple[sql.Composable, dict[str, Any]]:
    """The AND-ed filter fragments of a query and their parameters."""
    parts: list[sql.Composable] = []
    params: dict[str, Any] = {}
    if not q.show_deleted:
        parts.append(query("filter_live"))
    for attribute, fragment in _VALUE_FILTERS:
        value: Any = getattr(q, attribute)
        if value is None:
            continue
        parts.append(query(fragment))
        params[attribute] = Jsonb(value) if attribute == "metadata_contains" else value
    return sql.SQL(" ").join(parts), params


def list_sessions_statements(
    q: SessionQuery, after: TimeKey | None
) -> tuple[sql.Composed, sql.Composed, dict[str, Any]]:
    """(page statement, count statement, parameters) of one list_sessions call."""
    if q.order_field not in ORDER_COLUMNS:
        raise ValueError(f"cannot order sessions by {q.order_field!r}")
    column = sql.Identifier("s", q.order_field)
    direction = sql.SQL("DESC" if q.descending else "ASC")
    filters, params = session_filters(q)
    keyset: sql.Composable = sql.SQL("")
    if after is not None:
        keyset = query("keyset_sessions").format(
            column=column, op=sql.SQL("<" if q.descending else ">")
        )
        after_ts: datetime = after[0]
        params.update(after_ts=after_ts, after_id=after[1])
    order = query("order_sessions").format(column=column, direction=direction)
    page = query("list_sessions").format(filters=filters, keyset=keyset, order=order)
    count = query("count_sessions").format(filters=filters)
    return page, count, params
