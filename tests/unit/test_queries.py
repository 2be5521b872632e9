"""The named SQL blocks: one header style, a description each, and each file beside its module."""

from __future__ import annotations

import ast
from importlib import resources

import pytest

from server.store.queries import QUERIES, compact, parse


def test_every_query_is_named_and_described() -> None:
    assert {"get_users", "add_memory", "purge_sessions", "token_key"} <= set(QUERIES)
    parsed = parse("-- a --\n-- Does a.\nSELECT 1;\n\n-- b --\n-- Does b.\nSELECT 2\n")
    assert parsed == {"a": "SELECT 1", "b": "SELECT 2"}
    with pytest.raises(ValueError, match="description"):
        parse("-- a --\nSELECT 1;\n")
    with pytest.raises(ValueError, match="twice"):
        parse("-- a --\n-- x\nSELECT 1;\n-- a --\n-- y\nSELECT 2;\n")


def test_a_file_may_open_with_comments_and_blocks_may_hold_them() -> None:
    text = "-- What the file holds.\n\n-- a --\n-- Does a.\nSELECT 1\n-- why the filter\nWHERE x;\n"
    assert parse(text) == {"a": "SELECT 1\nWHERE x"}


def test_a_statement_without_its_header_is_refused() -> None:
    with pytest.raises(ValueError, match=r"x\.sql:1: SQL outside a named block"):
        parse("SELECT 1;\n-- a --\n-- Does a.\nSELECT 2;\n", "x.sql")
    with pytest.raises(ValueError, match="more than one statement"):
        parse("-- a --\n-- Does a.\nSELECT 1;\n\n-- Does b.\nSELECT 2;\n")
    with pytest.raises(ValueError, match=r"x\.sql:4: write a block header as"):
        parse("-- a --\n-- Does a.\nSELECT 1;\n-- name: b\n-- Does b.\nSELECT 2;\n", "x.sql")


def _sql_files() -> dict[str, dict[str, str]]:
    folder = resources.files("server.store").joinpath("sql")
    return {
        e.name.removesuffix(".sql"): parse(e.read_text("utf-8"), e.name)
        for e in folder.iterdir()
        if e.name.endswith(".sql")
    }


def _strings(module: str) -> set[str]:
    source = resources.files("server.store").joinpath(f"{module}.py").read_text("utf-8")
    return {
        node.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


def test_each_sql_file_holds_the_statements_its_namesake_module_runs() -> None:
    files = _sql_files()
    modules = [
        e.name.removesuffix(".py")
        for e in resources.files("server.store").iterdir()
        if e.name.endswith(".py")
    ]
    for name, queries in files.items():
        assert name in modules, f"sql/{name}.sql has no module server/store/{name}.py"
        unused = sorted(set(queries) - _strings(name))
        assert not unused, f"sql/{name}.sql holds statements {name}.py never names: {unused}"
    for module in modules:
        own = files.get(module, {})
        elsewhere = sorted((_strings(module) & QUERIES.keys()) - own.keys())
        assert not elsewhere, f"{module}.py runs statements kept in another file: {elsewhere}"


def test_add_memory_statements_fit_psycopgs_parse_cache() -> None:
    # psycopg parses a longer statement's placeholders again on every execute, by regular
    # expression in Python: AddMemory's hot path would pay that on every call.
    from psycopg._queries import MAX_CACHED_STATEMENT_LENGTH

    from server.store.append import ADD_MEMORY, ADD_MEMORY_GUARDED

    for statement in (*ADD_MEMORY.values(), ADD_MEMORY_GUARDED):
        assert len(statement.as_string(None).encode()) <= MAX_CACHED_STATEMENT_LENGTH


def test_recall_is_sent_as_psycopg_would_send_it_without_parsing_it_per_call() -> None:
    # Recall ranks on the embedding worker's path (every embedded batch keeps its sessions'
    # recall) and on GetMemory's when none is kept. Over 4,096 bytes, psycopg parsed its
    # placeholders again on every call (docs/performance.md); the store now sends it with
    # $n placeholders, converted once: byte for byte what psycopg would send.
    from psycopg._queries import _query2pg_nocache

    from server.store import Store
    from server.store.recall import recall_positional, recall_statement

    params = Store._recall_params(1, "s", 6, "m", 10)
    for vector in (True, False):
        statement, names = recall_positional(vector)
        sent, _, order, _ = _query2pg_nocache(recall_statement(vector).as_bytes(None), "utf-8")
        assert (statement, names) == (sent, tuple(order or ())), vector
        assert set(names) <= params.keys(), vector


def test_positional_refuses_a_percent_it_cannot_place() -> None:
    from server.store.queries import positional

    assert positional("SELECT %(a)s, %(b)s, %(a)s") == (b"SELECT $1, $2, $1", ("a", "b"))
    with pytest.raises(ValueError, match="placeholder"):
        positional("SELECT %(a)s LIKE 'x%'")


def test_compact_drops_indentation_but_not_from_a_literal_spanning_lines() -> None:
    assert compact("SELECT a,\n       b\n  FROM t") == "SELECT a,\nb\nFROM t"
    spanning = "SELECT 'a\n   b' FROM t"
    assert compact(spanning) == spanning
