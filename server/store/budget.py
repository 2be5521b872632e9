"""Reading rows only up to what their answer may hold: the shared running sum (sql/budget.sql)."""

from __future__ import annotations

from psycopg import sql

from server.store.db import Row
from server.store.queries import query

#: The budget of a call's statement: its parameter.
BUDGET = sql.SQL("%(budget)s::int8")


def budget_rows(
    sized: sql.Composable, order: sql.Composable, budget: sql.Composable = BUDGET
) -> sql.Composed:
    """`sized`'s rows read in `order` (over the alias k) only up to `budget` bytes of their
    `size` column (budget_rows: the running sum, each row saying whether one `followed`)."""
    return query("budget_rows").format(sized=sized, order=order, budget=budget)


def list_size(alias: str, *ids: str) -> sql.Composed:
    """The `size` column of a user's or session's row (its alias) for budget_rows: its
    metadata as printed and its text columns `ids` (budget_list_size)."""
    columns = sql.SQL(", ").join(sql.Identifier(alias, c) for c in ids)
    return query("budget_list_size").format(alias=sql.Identifier(alias), ids=columns)


def followed(found: list[Row]) -> bool:
    """Whether budget_rows left rows out after the last one read (its `followed` says so)."""
    return bool(found) and bool(found[-1].get("followed"))
