"""What one ListUsersChunked chunk's statement costs PostgreSQL, against COPY of the same rows.

    .venv/bin/python -m bench.chunk_cost [--database-url URL] [--users 1000000] [--keep]

Makes one scratch database (`chunk_cost_<pid>`, this run's own, dropped WITH (FORCE) at the end;
with --keep `chunk_cost`, kept, and used again by the next run with --keep if loaded with as many
users): the migrated schema, `--users` users as `python -m bench` loads them (a millisecond apart),
and every third user with 1-3 sessions, counted in user_session_counts as the store counts them.
Each round runs every variant at `--keys` keys spread over the table, `--calls` times each, the
variants' order alternating between rounds; each variant has a connection of its own, its statement
prepared (and run a few times before the first round, so PostgreSQL has settled on a plan, as in a
server's pooled connections). It reads the backend's CPU time from /proc (schedstat) before and
after, so parsing, planning and executing all count, and prints per variant the median backend CPU
per chunk of `--limit` users and the median of the per-round ratios to `copy_rows` (COPY of the same
rows, by query, to the client) and to `list_user_chunk` (the statement of the checkout).
`copy_table` is the bench's baseline: `COPY users TO STDOUT` of the whole table once per round, its
CPU shown per `--limit` rows.

Every variant that returns a chunk is checked to return list_user_chunk's very bytes and key.
With --explain, prints EXPLAIN (ANALYZE, BUFFERS) of each variant at the middle key.

Needs the PostgreSQL server on this machine (its backends' /proc entries).
"""

from __future__ import annotations

import json
import statistics
import sys
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import sql

from bench import env
from bench.pg_cost import _cpu_ns
from bench.rounds import add_database_url, alternate, median_ratio, parser
from server.store.queries import query

DATABASE = "chunk_cost"

#: One keyset page of users, as list_user_chunk reads it.
_PAGE = """SELECT u.created_at, u.user_id, u.wire FROM users u
      WHERE u.project_id = %(project_id)s
        AND (u.created_at, u.user_id) > (%(after_ts)s::timestamptz, %(after_id)s::text)
      ORDER BY u.created_at, u.user_id
      LIMIT %(limit)s"""

#: A chunk's one row from `b` (created_at, user_id, body), as list_user_chunk returns it.
_OUT = r"""SELECT coalesce(string_agg('\x0a'::bytea || memstore_pb_varint(length(b.body)) || b.body,
                           ''::bytea ORDER BY b.created_at, b.user_id), ''::bytea),
       count(*), max(b.created_at),
       (array_agg(b.user_id ORDER BY b.created_at, b.user_id))[count(*)::int4]"""

_BODY = r"""CASE WHEN c.n > 0 THEN p.wire || '\x40'::bytea || memstore_pb_varint(c.n)
                  ELSE p.wire END AS body"""

#: Variants of the chunk's statement (besides the checkout's `list_user_chunk`).
VARIANTS: dict[str, str] = {
    # The page alone, no session counts: what the users' bytes cost.
    "page_only": f"{_OUT} FROM (SELECT p.created_at, p.user_id, p.wire AS body FROM ({_PAGE}) p) b",
    # One scan of the page, its counts by a join PostgreSQL plans (nested loop of probes).
    "join": f"""{_OUT}
FROM (SELECT p.created_at, p.user_id, {_BODY}
      FROM ({_PAGE}) p
      LEFT JOIN (SELECT project_id, user_id, session_count AS n FROM user_session_counts) c
        ON c.project_id = %(project_id)s AND c.user_id = p.user_id
      ORDER BY p.created_at, p.user_id OFFSET 0) b""",
    # The counts kept by (created_at, user_id) too: one ordered range scan merged with the page.
    "merge_keyed": f"""{_OUT}
FROM (SELECT p.created_at, p.user_id, {_BODY}
      FROM ({_PAGE}) p
      LEFT JOIN (SELECT project_id, created_at, user_id, session_count AS n
                 FROM user_session_counts_keyed) c
        ON c.project_id = %(project_id)s AND c.created_at = p.created_at
       AND c.user_id = p.user_id
       AND (c.created_at, c.user_id) > (%(after_ts)s::timestamptz, %(after_id)s::text)
      ORDER BY p.created_at, p.user_id OFFSET 0) b""",
    "merge_keyed_include": f"""{_OUT}
FROM (SELECT p.created_at, p.user_id, {_BODY}
      FROM ({_PAGE}) p
      LEFT JOIN (SELECT project_id, created_at, user_id, session_count AS n
                 FROM user_session_counts_keyed_include) c
        ON c.project_id = %(project_id)s AND c.created_at = p.created_at
       AND c.user_id = p.user_id
       AND (c.created_at, c.user_id) > (%(after_ts)s::timestamptz, %(after_id)s::text)
      ORDER BY p.created_at, p.user_id OFFSET 0) b""",
    # One scan of the page (materialized), its counts by one `= ANY` scan, then the join.
    "any_once": rf"""WITH page AS MATERIALIZED ({_PAGE}),
counts AS MATERIALIZED (
    SELECT c.user_id, c.session_count AS n FROM user_session_counts c
    WHERE c.project_id = %(project_id)s
      AND c.user_id = ANY (ARRAY(SELECT user_id FROM page))
)
{_OUT}
FROM (SELECT p.created_at, p.user_id, {_BODY}
      FROM page p LEFT JOIN counts c ON c.user_id = p.user_id
      ORDER BY p.created_at, p.user_id OFFSET 0) b""",
}

#: The checkout's keys stage of list_user_chunk (the page's ids and last key).
_KEYS = query("list_user_chunk").as_string(None).split("), counts AS MATERIALIZED (")[0]
#: list_user_chunk until 2026-12-05, on the same keys stage: its page joined to its counts
#: (one `= ANY` scan), whose output is in no order PostgreSQL knows, so string_agg's ORDER BY
#: sorted the page's entries (docs/performance.md, "The page's entries not sorted again").
VARIANTS["joined_counts"] = (
    _KEYS
    + r"""), counts AS MATERIALIZED (
    SELECT c.user_id, c.session_count AS n FROM user_session_counts c
    WHERE c.project_id = (SELECT %(project_id)s::int8)
      AND c.user_id = ANY ((SELECT ids FROM keys)::text[])
)
SELECT coalesce(string_agg('\x0a'::bytea || memstore_pb_varint(length(b.body)) || b.body,
                           ''::bytea ORDER BY b.created_at, b.user_id), ''::bytea),
       count(*), (SELECT last_created FROM keys), (SELECT ids[cardinality(ids)] FROM keys)
FROM (SELECT p.created_at, p.user_id,
             CASE WHEN c.n > 0 THEN p.wire || '\x40'::bytea || memstore_pb_varint(c.n)
                  ELSE p.wire END AS body
      FROM (SELECT u.created_at, u.user_id, u.wire FROM users u
            WHERE u.project_id = (SELECT %(project_id)s::int8)
              AND (u.created_at, u.user_id)
                  > ((SELECT %(after_ts)s::timestamptz), (SELECT %(after_id)s::text))
            ORDER BY u.created_at, u.user_id
            LIMIT (SELECT %(limit)s::int8)) p
      LEFT JOIN counts c ON c.user_id = p.user_id
      OFFSET 0) b"""
)

#: list_user_chunk before its parameters went behind scalar subqueries (planned every chunk):
#: its form with them bare, which Citus runs (queries.citus_form).
VARIANTS["planned_each_chunk"] = query("list_user_chunk_citus").as_string(None)

#: COPY of the same page's rows (the API's columns, as the bench's COPY), to the client.
_COPY_ROWS = """COPY (SELECT u.project_id, u.user_id, u.email, u.first_name, u.last_name,
       u.metadata, u.created_at, u.updated_at FROM users u
      WHERE u.project_id = {project_id}
        AND (u.created_at, u.user_id) > ({after_ts}::timestamptz, {after_id}::text)
      ORDER BY u.created_at, u.user_id
      LIMIT {limit}) TO STDOUT"""

_COPY_TABLE = (
    "COPY users (project_id, user_id, email, first_name, last_name, metadata, created_at,"
    " updated_at) TO STDOUT"
)


def _seed(url: str, users: int) -> None:
    # The bench's users; every third user 1-3 sessions, counted as the store counts them.
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        columns = (
            "project_id, user_id, email, first_name, last_name, metadata, created_at, updated_at"
        )
        with cur.copy(f"COPY users ({columns}) FROM STDIN") as copy:
            env._write_batched(copy, env._user_lines(users))
        with cur.copy("COPY sessions (project_id, session_id, user_id) FROM STDIN") as copy:
            lines = (
                f"1\tsess-{i}-{k}\tuser-{i:07d}\n"
                for i in range(0, users, 3)
                for k in range(i // 3 % 3 + 1)
            )
            env._write_batched(copy, lines)
        cur.execute(
            "INSERT INTO user_session_counts (project_id, user_id, session_count)"
            " SELECT project_id, user_id, count(*) FROM sessions GROUP BY 1, 2"
        )
    _keyed(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


def _keyed(url: str) -> None:
    # merge_keyed's tables: the counts with their user's created_at, indexed in the users'
    # page order beside their key (so a count's update can stay HOT), or with the count in
    # that index too (index-only, but no update is HOT).
    with psycopg.connect(url) as conn:
        for table, include in (("keyed", ""), ("keyed_include", " INCLUDE (session_count)")):
            name = f"user_session_counts_{table}"
            conn.execute(f"DROP TABLE IF EXISTS {name}")
            conn.execute(
                f"CREATE TABLE {name} AS SELECT c.project_id, u.created_at, c.user_id,"
                " c.session_count FROM user_session_counts c JOIN users u"
                " USING (project_id, user_id)"
            )
            conn.execute(f"ALTER TABLE {name} ADD PRIMARY KEY (project_id, user_id)")
            conn.execute(f"CREATE INDEX ON {name} (project_id, created_at, user_id){include}")


def _keys(users: int, count: int) -> list[tuple[Any, str]]:
    # `count` keys spread over the table: each the key of the user before a page.
    starts = [users * (2 * k + 1) // (2 * count) for k in range(count)]
    return [(env.EPOCH + timedelta(milliseconds=i - 1), f"user-{i - 1:07d}") for i in starts]


def _prepare_database(url: str, name: str, users: int, keep: bool) -> str:
    with psycopg.connect(url, autocommit=True) as admin:
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
        found = exists.fetchone() is not None
    db_url = psycopg.conninfo.make_conninfo(url, dbname=name)
    if found and keep:
        with psycopg.connect(db_url) as conn:
            row = conn.execute("SELECT count(*) FROM users").fetchone()
        if row is not None and row[0] == users:
            _keyed(db_url)
            with psycopg.connect(db_url, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE user_session_counts_keyed")
                conn.execute("VACUUM ANALYZE user_session_counts_keyed_include")
            return db_url
    db_url = env.fresh_database(url, name)
    env.migrate(db_url)
    _seed(db_url, users)
    return db_url


def _statements(variants: list[str]) -> dict[str, str]:
    # Each variant's statement; `<name>@generic` is <name> on PostgreSQL's generic plan.
    found = {"list_user_chunk": query("list_user_chunk").as_string(None)}
    for v in variants:
        base = v.removesuffix("@generic")
        found[v] = found["list_user_chunk"] if base == "list_user_chunk" else VARIANTS[base]
    return found


def _connect(url: str, name: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(url, autocommit=True)
    if name.endswith("@generic"):
        conn.execute("SET plan_cache_mode = force_generic_plan")
    return conn


def _chunk(conn: psycopg.Connection[Any], statement: str, params: dict[str, Any]) -> Any:
    cur = conn.cursor(binary=True)
    cur.execute(statement, params, prepare=True)
    return cur.fetchone()


def _copy(conn: psycopg.Connection[Any], statement: sql.SQL | sql.Composed) -> int:
    n = 0
    with conn.cursor().copy(statement) as copy:
        for block in copy:
            n += len(block)
    return n


def _copy_rows(params: dict[str, Any]) -> sql.Composed:
    return sql.SQL(_COPY_ROWS).format(**{k: sql.Literal(v) for k, v in params.items()})


def _check_same_bytes(
    conns: dict[str, psycopg.Connection[Any]],
    statements: dict[str, str],
    params: list[dict[str, Any]],
) -> None:
    # Every variant returns list_user_chunk's bytes and key at every key (page_only, which
    # leaves the counts out, aside); each runs a few times first, past psycopg's and
    # PostgreSQL's plan choices.
    for p in params:
        expected = _chunk(conns["list_user_chunk"], statements["list_user_chunk"], p)
        for n, statement in statements.items():
            found = [_chunk(conns[n], statement, p) for _ in range(6)][-1]
            if n != "page_only" and tuple(found) != tuple(expected):
                raise AssertionError(f"{n} differs from list_user_chunk at {p}")


def _round(conn: psycopg.Connection[Any], name: str, statement: str, params: list[Any]) -> None:
    # One round's statements of one variant: `calls` passes over the keys (or one COPY).
    if name == "copy_table":
        _copy(conn, sql.SQL(_COPY_TABLE))
        return
    for p in params:
        if name == "copy_rows":
            _copy(conn, _copy_rows(p))
        else:
            _chunk(conn, statement, p)


def measure(
    url: str, users: int, *, limit: int, keys: int, rounds: int, calls: int, variants: list[str]
) -> dict[str, Any]:
    """Backend CPU per chunk by variant: medians, ratios to copy_rows and list_user_chunk."""
    statements = _statements(variants)
    names = [*statements, "copy_rows", "copy_table"]
    conns = {n: _connect(url, n) for n in names}
    params = [
        {"project_id": 1, "after_ts": ts, "after_id": uid, "limit": limit}
        for ts, uid in _keys(users, keys)
    ]
    _check_same_bytes(conns, statements, params)

    def one_round(n: str) -> float:
        # Backend CPU per chunk (µs): a whole-table COPY counts as users / limit chunks.
        pid = conns[n].info.backend_pid
        before = _cpu_ns(pid)
        if n == "copy_table":
            _round(conns[n], n, "", [])
            return (_cpu_ns(pid) - before) / users * limit / 1000
        for _ in range(calls):
            _round(conns[n], n, statements.get(n, ""), params)
        return (_cpu_ns(pid) - before) / calls / len(params) / 1000

    per_chunk = alternate(names, rounds, one_round)
    # Each connection prepared its one statement: on generic or custom plans?
    plans: dict[str, dict[str, int]] = {}
    for n in statements:
        row = (
            conns[n]
            .execute("SELECT sum(generic_plans), sum(custom_plans) FROM pg_prepared_statements")
            .fetchone()
        )
        plans[n] = {"generic": int(row[0] or 0), "custom": int(row[1] or 0)} if row else {}
    for conn in conns.values():
        conn.close()

    def ratios(to: str, n: str) -> float:
        return round(median_ratio(per_chunk[n], per_chunk[to]), 3)

    return {
        n: {
            "backend_cpu_us": round(statistics.median(per_chunk[n])),
            "rounds_us": [round(x) for x in per_chunk[n]],
            "vs_copy_rows": ratios("copy_rows", n),
            "vs_list_user_chunk": ratios("list_user_chunk", n),
            **({"plans": plans[n]} if n in plans else {}),
        }
        for n in names
    }


def explain(url: str, users: int, limit: int, variants: list[str]) -> None:
    """Prints EXPLAIN (ANALYZE, BUFFERS) of each statement at the table's middle key."""
    ts, uid = _keys(users, 1)[0]
    p = {"project_id": 1, "after_ts": ts, "after_id": uid, "limit": limit}
    for n, statement in _statements(variants).items():
        with _connect(url, n) as conn:
            for _ in range(6):
                _chunk(conn, statement, p)
            rows = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, p).fetchall()
            print(f"--- {n}", file=sys.stderr)
            print("\n".join(r[0] for r in rows), file=sys.stderr)


def run(
    url: str,
    users: int,
    *,
    limit: int = 1000,
    keys: int = 8,
    rounds: int = 8,
    calls: int = 3,
    variants: list[str] | None = None,
    name: str | None = None,
    keep: bool = False,
    show_plans: bool = False,
) -> dict[str, Any]:
    """Loads (or, with `keep`, finds) the database `name` on the server of `url`, measures,
    drops it unless `keep`; returns the server's version and each variant's figures. `name`
    is by default this run's own `chunk_cost_<pid>`, or with `keep` `chunk_cost`, the one
    database kept runs share."""
    variants = [*VARIANTS] if variants is None else variants
    name = name or (DATABASE if keep else env.own_name(DATABASE))
    db_url = _prepare_database(url, name, users, keep)
    try:
        if show_plans:
            explain(db_url, users, limit, variants)
        found = measure(
            db_url, users, limit=limit, keys=keys, rounds=rounds, calls=calls, variants=variants
        )
    finally:
        if not keep:
            env.drop_database(url, name)
    return {"server": env.server_version(url), **found}


def main(argv: list[str] | None = None) -> int:
    """Prints the medians as JSON."""
    p = parser(
        "chunk_cost",
        __doc__,
        rounds=8,
        calls=3,
        calls_help="statements per key, variant, round",
        users=1_000_000,
    )
    add_database_url(p)
    p.add_argument("--limit", type=int, default=1000, help="users per chunk (the server's)")
    p.add_argument("--keys", type=int, default=8, help="keys spread over the table")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated; <name>@generic runs <name> on PostgreSQL's generic plan",
    )
    p.add_argument("--keep", action="store_true", help="keep (and reuse) the loaded database")
    p.add_argument("--explain", action="store_true")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    url = env.server_url(args.database_url, env.ROOT / ".data")
    found = run(
        url,
        args.users,
        limit=args.limit,
        keys=args.keys,
        rounds=args.rounds,
        calls=args.calls,
        variants=variants,
        keep=args.keep,
        show_plans=args.explain,
    )
    print(json.dumps(found, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
