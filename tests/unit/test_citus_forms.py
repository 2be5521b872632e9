"""The Citus forms of statements, derived at load from their plain-PostgreSQL blocks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from server.store.queries import CITUS_MARK, QUERIES, citus_form, parse

_SQL = Path(__file__).resolve().parents[2] / "server" / "store" / "sql"
#: Each named block's text as written, comments and all, by its name.
_SOURCES = {
    name: block
    for path in sorted(_SQL.glob("*.sql"))
    for name, block in re.findall(
        r"^-- (\w+) --\n(.*?)(?=^-- \w+ --$|\Z)", path.read_text(), re.M | re.S
    )
}

#: The statements marked for a Citus form, by the name of that form.
_DERIVED = sorted(
    name
    for name in QUERIES
    if name.endswith("_citus") and CITUS_MARK in _SOURCES.get(name.removesuffix("_citus"), "")
)

_PARAMETER = re.compile(r"%\((\w+)\)[sb]")
#: A statement's tokens: a parameter with its cast, a bracket, a comma, or a run of anything
#: else but whitespace.
_TOKEN = re.compile(r"%\(\w+\)[sb](?:::[\w\[\]]+)?|[(),]|[^\s(),]+")
#: What unwrapping a parameter may take away: the scalar subquery's brackets and SELECT, and
#: the cast said again around `((SELECT %(x)b::type)::type)`.
_WRAPPER = re.compile(r"[()]|SELECT|::[\w\[\]]+")


def _removed(plain: str, derived: str) -> list[str]:
    """The tokens of `plain` that `derived` leaves out; the test fails unless `derived` is
    `plain` with some tokens left out and nothing added or changed."""
    have, want = _TOKEN.findall(plain), _TOKEN.findall(derived)
    gone: list[str] = []
    i = 0
    for token in have:
        if i < len(want) and want[i] == token:
            i += 1
        else:
            gone.append(token)
    assert i == len(want), f"the derived form adds {want[i : i + 5]}..."
    return gone


def test_three_statements_have_a_derived_citus_form() -> None:
    assert _DERIVED == ["get_users_citus", "list_user_chunk_citus", "list_user_wire_citus"]


@pytest.mark.parametrize("name", _DERIVED)
def test_a_derived_form_is_the_plain_one_less_its_wrappers(name: str) -> None:
    plain = QUERIES[name.removesuffix("_citus")].as_string(None)
    gone = _removed(plain, QUERIES[name].as_string(None))
    assert gone and all(_WRAPPER.fullmatch(token) for token in gone), gone
    assert gone.count("SELECT") == plain.count("(SELECT %(")


@pytest.mark.parametrize("name", _DERIVED)
def test_a_derived_form_hides_no_parameter_and_keeps_their_names(name: str) -> None:
    derived, plain = QUERIES[name].as_string(None), QUERIES[name.removesuffix("_citus")]
    assert "(SELECT %(" not in derived
    assert "(SELECT %(" in plain.as_string(None)
    assert set(_PARAMETER.findall(derived)) == set(_PARAMETER.findall(plain.as_string(None)))


def test_a_mark_derives_the_citus_form_of_its_block() -> None:
    text = (
        f"-- a --\n-- Does a.\n{CITUS_MARK}\n"
        "SELECT x FROM t WHERE p = (SELECT %(p)s::int8)\n"
        "  AND k = ANY ((SELECT %(ks)b::text[])::text[]) LIMIT (SELECT %(n)s::int8);\n"
    )
    assert parse(text)["a_citus"] == (
        "SELECT x FROM t WHERE p = %(p)s::int8\n  AND k = ANY (%(ks)b::text[]) LIMIT %(n)s::int8"
    )
    assert parse(text.replace(CITUS_MARK + "\n", "")).keys() == {"a"}


def test_the_rewrite_refuses_what_it_cannot_unwrap() -> None:
    with pytest.raises(ValueError, match="no parameter"):
        citus_form("SELECT x FROM t WHERE p = %(p)s")
    with pytest.raises(ValueError, match="not of the form"):
        citus_form("SELECT x FROM t WHERE p = (SELECT %(p)s::int8) AND q = (SELECT %(q)s)")
    with pytest.raises(ValueError, match="not of the form"):
        citus_form("SELECT x FROM t WHERE p = (SELECT %(p)s::int8 + 1)")
    with pytest.raises(ValueError, match=r"x\.sql: query 'a': marked for Citus"):
        parse(f"-- a --\n-- Does a.\n{CITUS_MARK}\nSELECT 1;\n", "x.sql")
    with pytest.raises(ValueError, match="defined twice"):
        parse(
            f"-- a --\n-- Does a.\n{CITUS_MARK}\nSELECT (SELECT %(p)s::int8);\n"
            "-- a_citus --\n-- By hand.\nSELECT %(p)s;\n"
        )
    with pytest.raises(ValueError, match="write the mark"):
        parse("-- a --\n-- Does a.\n-- citus: unwrap the parameters\nSELECT 1;\n")
