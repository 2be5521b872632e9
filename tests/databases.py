"""Scratch databases on the run's PostgreSQL server, for tests that need one of their own."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import conninfo as pg_conninfo
from psycopg import sql


@contextmanager
def scratch_database(server_url: str, prefix: str) -> Iterator[str]:
    """Creates an empty database named `prefix_<random>`; yields its URL; drops it after."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    params = pg_conninfo.conninfo_to_dict(server_url)
    params["dbname"] = name
    try:
        yield pg_conninfo.make_conninfo(**params)
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def database_name(url: str) -> str:
    """The database a URL names."""
    return str(pg_conninfo.conninfo_to_dict(url)["dbname"])
