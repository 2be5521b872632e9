"""Named SQL blocks, loaded once from server/store/sql/*.sql."""

from __future__ import annotations

import re
from importlib import resources

from psycopg import sql

#: A block header: the statement's name alone on its line, as in `-- get_user --`.
_HEADER = re.compile(r"^-- (\w+) --$")

#: The block header of aiosql and yesql, which would otherwise read as a plain comment and
#: silently glue its statement onto the block above.
_FOREIGN_HEADER = re.compile(r"^--\s*name:")


def parse(text: str, origin: str = "<sql>") -> dict[str, str]:
    """Splits a file into {name: statement}; each block is `-- x --`, a comment, one statement.

    Comment and blank lines before the first block describe the file; comment lines inside a
    block are left out of its statement.

    Raises:
        ValueError: a block has no description comment, no statement or more than one, a
            name repeats, or SQL or another header style stands outside the blocks.
    """
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{origin}:{number}"
        if match := _HEADER.match(line):
            name = match.group(1)
            if name in blocks:
                raise ValueError(f"{where}: query {name!r} defined twice")
            current = blocks[name] = []
        elif _FOREIGN_HEADER.match(line.lstrip()):
            raise ValueError(f"{where}: write a block header as '-- name_of_query --'")
        elif current is not None:
            current.append(line)
        elif line.strip() and not line.lstrip().startswith("--"):
            raise ValueError(f"{where}: SQL outside a named block")
    return {name: _statement(name, lines, origin) for name, lines in blocks.items()}


def _statement(name: str, lines: list[str], origin: str) -> str:
    body = [ln for ln in lines if ln.strip()]
    if not body or not body[0].lstrip().startswith("--"):
        raise ValueError(f"{origin}: query {name!r} lacks its one-line description")
    statement = "\n".join(ln for ln in body if not ln.lstrip().startswith("--")).strip()
    if not statement:
        raise ValueError(f"{origin}: query {name!r} has no statement")
    statement = statement.rstrip(";")
    # psycopg sends a statement with parameters as one command: a second one here is the
    # statement of a block whose header is missing.
    if ";" in statement:
        raise ValueError(f"{origin}: query {name!r} holds more than one statement")
    return statement


def compact(statement: str) -> str:
    """`statement` without its lines' indentation, when no string literal spans lines.

    psycopg parses a statement's placeholders once and caches the result only for statements
    of at most 4,096 bytes (`_queries.MAX_CACHED_STATEMENT_LENGTH`); a longer one is parsed
    again, by regular expression, on every execute: ~30 µs per AddMemory call
    (docs/performance.md).
    """
    lines = statement.splitlines()
    if any(line.count("'") % 2 for line in lines):
        return statement  # a literal may span lines: its spaces are part of it
    return "\n".join(line.strip() for line in lines)


#: A value's placeholder in a named statement, `%(name)s`.
_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


def positional(statement: str) -> tuple[bytes, tuple[str, ...]]:
    """`statement` with `$1`, `$2`... for its `%(name)s` placeholders, and the names in order.

    What psycopg itself sends (a name used twice is one parameter), for its raw cursor, which
    sends the statement as it is: psycopg parses the placeholders of a statement over 4,096
    bytes again on every execute (`compact`), where this is done once.

    Raises:
        ValueError: the statement holds a `%` that is no such placeholder.
    """
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    text = _PLACEHOLDER.sub(number, statement)
    if "%" in text:
        raise ValueError("a % in the statement that is not a %(name)s placeholder")
    return text.encode(), tuple(names)


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
