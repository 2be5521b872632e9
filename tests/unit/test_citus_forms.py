"""The Citus forms of statements, derived at load from their plain-PostgreSQL blocks."""

from __future__ import annotations

import re

import pytest

from server.store.queries import CITUS_MARK, QUERIES, citus_form, parse

#: The Citus forms as they were written by hand in sql/users.sql and sql/export.sql until
#: they were derived (statements only, as parse gives them), to hold the derivation to them.
_HAND_WRITTEN = {
    "get_users_citus": """
SELECT u.user_id, u.email, u.first_name, u.last_name, u.metadata, u.created_at, u.updated_at,
       coalesce(c.session_count, 0) AS session_count
FROM users u
LEFT JOIN user_session_counts c ON c.project_id = u.project_id AND c.user_id = u.user_id
WHERE u.project_id = %(project_id)s AND u.user_id = ANY(%(user_ids)b::text[])
""",
    "list_user_chunk_citus": """
WITH keys AS MATERIALIZED (
    SELECT array_agg(k.user_id ORDER BY k.created_at, k.user_id) AS ids,
           max(k.created_at) AS last_created
    FROM (SELECT u.created_at, u.user_id FROM users u
          WHERE u.project_id = %(project_id)s
            AND (u.created_at, u.user_id) > (%(after_ts)s::timestamptz, %(after_id)s::text)
          ORDER BY u.created_at, u.user_id
          LIMIT %(limit)s) k
), counts AS MATERIALIZED (
    SELECT c.user_id, c.session_count AS n FROM user_session_counts c
    WHERE c.project_id = %(project_id)s
      AND c.user_id = ANY ((SELECT ids FROM keys)::text[])
)
SELECT coalesce(string_agg('\\x0a'::bytea || memstore_pb_varint(length(b.body)) || b.body,
                           ''::bytea ORDER BY b.created_at, b.user_id), ''::bytea),
       count(*), (SELECT last_created FROM keys), (SELECT ids[cardinality(ids)] FROM keys)
FROM (SELECT p.created_at, p.user_id,
             CASE WHEN c.n > 0 THEN p.wire || '\\x40'::bytea || memstore_pb_varint(c.n)
                  ELSE p.wire END AS body
      FROM (SELECT u.created_at, u.user_id, u.wire FROM users u
            WHERE u.project_id = %(project_id)s
              AND (u.created_at, u.user_id) > (%(after_ts)s::timestamptz, %(after_id)s::text)
            ORDER BY u.created_at, u.user_id
            LIMIT %(limit)s) p
      LEFT JOIN counts c ON c.user_id = p.user_id
      OFFSET 0) b
""",
    "list_user_wire_citus": """
WITH page AS MATERIALIZED (
    SELECT u.user_id, u.created_at, u.wire
    FROM users u
    WHERE u.project_id = %(project_id)s
      AND (u.created_at, u.user_id) > (%(after_ts)s::timestamptz, %(after_id)s::text)
    ORDER BY u.created_at, u.user_id
    LIMIT %(limit)s
), counts AS MATERIALIZED (
    SELECT c.user_id, c.session_count AS n FROM user_session_counts c
    WHERE c.project_id = %(project_id)s AND c.user_id IN (SELECT user_id FROM page)
), bodies AS MATERIALIZED (
    SELECT p.created_at, p.user_id,
           CASE WHEN c.n > 0 THEN p.wire || '\\x40'::bytea || memstore_pb_varint(c.n)
                ELSE p.wire END AS body
    FROM page p LEFT JOIN counts c ON c.user_id = p.user_id
), entries AS MATERIALIZED (
    SELECT created_at, user_id, '\\x0a'::bytea || memstore_pb_varint(length(body)) || body AS entry
    FROM bodies
)
SELECT coalesce(string_agg(entry, ''::bytea ORDER BY created_at, user_id), ''::bytea),
       coalesce(array_agg(length(entry) ORDER BY created_at, user_id), '{}'),
       coalesce(array_agg(created_at ORDER BY created_at, user_id), '{}'),
       coalesce(array_agg(user_id ORDER BY created_at, user_id), '{}')
FROM entries
""",
}

#: What the derived forms add to the hand-written ones: the plain form's casts, kept beside
#: the bare parameters, where the hand-written forms left the coercion to PostgreSQL.
_CASTS_KEPT = {"%(project_id)s": "%(project_id)s::int8", "%(limit)s": "%(limit)s::int8"}

_PARAMETER = re.compile(r"%\((\w+)\)[sb]")


def _normal(statement: str) -> str:
    """`statement` with its whitespace in one form: none beside brackets and commas."""
    return re.sub(r"\s*([(),])\s*", r"\1", re.sub(r"\s+", " ", statement)).strip()


@pytest.mark.parametrize("name", sorted(_HAND_WRITTEN))
def test_a_derived_form_is_the_hand_written_one_with_the_plain_forms_casts(name: str) -> None:
    expected = _normal(_HAND_WRITTEN[name])
    for bare, cast in _CASTS_KEPT.items():
        expected = expected.replace(bare, cast)
    assert _normal(QUERIES[name].as_string(None)) == expected


@pytest.mark.parametrize("name", sorted(_HAND_WRITTEN))
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
