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

#: A comment line in a block asking for its Citus form, `<name>_citus` (citus_form).
CITUS_MARK = "-- citus: unwrap parameters"


def parse(text: str, origin: str = "<sql>") -> dict[str, str]:
    """Splits a file into {name: statement}; each block is `-- x --`, a comment, one statement.

    Comment and blank lines before the first block describe the file; comment lines inside a
    block are left out of its statement. A block holding the line `CITUS_MARK` also gives
    `<name>_citus`, its statement with the parameters unwrapped (citus_form).

    Raises:
        ValueError: a block has no description comment, no statement or more than one, a
            name repeats, SQL or another header style stands outside the blocks, or a
            marked statement has no parameter to unwrap.
    """
    blocks: dict[str, list[str]] = {}
    marked: list[str] = []
    current: list[str] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{origin}:{number}"
        if match := _HEADER.match(line):
            name = match.group(1)
            if name in blocks:
                raise ValueError(f"{where}: query {name!r} defined twice")
            current = blocks[name] = []
        elif line.strip().startswith("-- citus:"):
            if line.strip() != CITUS_MARK or current is None:
                raise ValueError(f"{where}: write the mark inside a block as {CITUS_MARK!r}")
            marked.append(list(blocks)[-1])
        elif _FOREIGN_HEADER.match(line.lstrip()):
            raise ValueError(f"{where}: write a block header as '-- name_of_query --'")
        elif current is not None:
            current.append(line)
        elif line.strip() and not line.lstrip().startswith("--"):
            raise ValueError(f"{where}: SQL outside a named block")
    statements = {name: _statement(name, lines, origin) for name, lines in blocks.items()}
    for name in marked:
        if f"{name}_citus" in statements:
            raise ValueError(f"{origin}: query {name + '_citus'!r} defined twice")
        try:
            statements[f"{name}_citus"] = citus_form(statements[name])
        except ValueError as exc:
            raise ValueError(f"{origin}: query {name!r}: {exc}") from None
    return statements


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


#: A parameter behind a scalar subquery with its cast, `(SELECT %(name)s::type)` (or `%(name)b`),
#: and the same cast again around it, `((SELECT %(name)b::text[])::text[])`, which makes `= ANY`
#: read one array value rather than a subquery's rows.
_WRAPPED = re.compile(r"\(SELECT (%\(\w+\)[sb]::\w+(?:\[\])?)\)")
_WRAPPED_RECAST = re.compile(r"\(\(SELECT (%\(\w+\)[sb])(::\w+(?:\[\])?)\)\2\)")
_LEFT_WRAPPED = re.compile(r"\(\s*SELECT\s+%\(", re.IGNORECASE)
_ANY_PLACEHOLDER = re.compile(r"%\((\w+)\)[sb]")


def citus_form(statement: str) -> str:
    """`statement` with each parameter its scalar subquery hides written bare, with its cast.

    Plain PostgreSQL must not see the values, or it plans each call again (docs/performance.md,
    "GetUser's statement planned once"); Citus must, to prune shards by them and to take a
    `LIMIT` in a multi-shard query (docs/scaling.md). So one statement is written, for plain
    PostgreSQL, and this gives Citus its form.

    Raises:
        ValueError: the statement has no such subquery, or one this cannot unwrap.
    """
    text, recast = _WRAPPED_RECAST.subn(r"(\1\2)", statement)
    text, wrapped = _WRAPPED.subn(r"\1", text)
    if _LEFT_WRAPPED.search(text):
        raise ValueError("a parameter's scalar subquery is not of the form (SELECT %(x)s::type)")
    if not recast + wrapped:
        raise ValueError("marked for Citus, but no parameter is behind a scalar subquery")
    if set(_ANY_PLACEHOLDER.findall(text)) != set(_ANY_PLACEHOLDER.findall(statement)):
        raise ValueError("unwrapping changed the statement's parameters")
    return text


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
