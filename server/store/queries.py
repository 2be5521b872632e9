"""Named SQL blocks loaded once from server/store/sql/*.sql."""

from __future__ import annotations

import re
from importlib import resources

from psycopg import sql

_NAME = re.compile(r"^-- name: (\w+)\s*$")


def parse(text: str, origin: str = "<sql>") -> dict[str, str]:
    """Splits a file into {name: statement}; each block is `-- name: x`, a comment, the SQL.

    Raises:
        ValueError: a block has no description comment or no statement, or a name repeats.
    """
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        match = _NAME.match(line)
        if match:
            name = match.group(1)
            if name in blocks:
                raise ValueError(f"{origin}: query {name!r} defined twice")
            current = blocks[name] = []
        elif current is not None:
            current.append(line)
    queries: dict[str, str] = {}
    for name, lines in blocks.items():
        body = [ln for ln in lines if ln.strip()]
        if not body or not body[0].lstrip().startswith("--"):
            raise ValueError(f"{origin}: query {name!r} lacks its one-line description")
        statement = "\n".join(ln for ln in body if not ln.lstrip().startswith("--")).strip()
        if not statement:
            raise ValueError(f"{origin}: query {name!r} has no statement")
        queries[name] = statement.rstrip(";")
    return queries


def _load() -> dict[str, sql.SQL]:
    loaded: dict[str, sql.SQL] = {}
    for entry in sorted(resources.files("server.store").joinpath("sql").iterdir(), key=str):
        if not entry.name.endswith(".sql"):
            continue
        for name, statement in parse(entry.read_text("utf-8"), entry.name).items():
            if name in loaded:
                raise ValueError(f"{entry.name}: query {name!r} defined in two files")
            # The text comes from the package's own files, never from a caller.
            loaded[name] = sql.SQL(statement)
    return loaded


#: Every named statement of the store, by name.
QUERIES: dict[str, sql.SQL] = _load()


def query(name: str) -> sql.SQL:
    """The statement called `name` (KeyError when no file defines it)."""
    return QUERIES[name]


def migrations() -> list[tuple[str, str]]:
    """(name, SQL) of every migration file, in the order they apply."""
    folder = resources.files("server.store").joinpath("migrations")
    files = sorted((e for e in folder.iterdir() if e.name.endswith(".sql")), key=lambda e: e.name)
    return [(e.name.removesuffix(".sql"), e.read_text("utf-8")) for e in files]
