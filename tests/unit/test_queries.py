"""The named SQL blocks: one header style, a description and one statement each."""

from __future__ import annotations

import pytest

from server.store.queries import QUERIES, parse


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
