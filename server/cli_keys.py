"""The `memstore projects` and `memstore keys` commands: make projects, make, revoke, list keys."""

from __future__ import annotations

import argparse
import functools
import re
import sys
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from server import config as config_module
from server.api_keys import MIN_PREFIX_DIGITS, ApiKey, new_key, prefix_start
from server.config import Config
from server.errors import InvalidArgument

if TYPE_CHECKING:
    # The store (psycopg) is imported when a command runs: `memstore --help` builds this
    # module's parsers and needs none of it.
    from server.store import Store

#: Project names: short, printable, safe in shells and logs.
_PROJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_MAX_LABEL = 256

Command = Callable[[Config], Coroutine[Any, Any, None]]
Action = Callable[["Store", argparse.Namespace], Coroutine[Any, Any, None]]


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `projects {create,list}` and `keys {create,revoke,list}` to the memstore parser."""
    projects = commands.add_parser("projects", help="create or list projects")
    project_actions = projects.add_subparsers(dest="action", required=True)
    create = _leaf(project_actions, "projects", "create", "create a project (an API key space)")
    create.add_argument("name", help="the project's name, e.g. acme-prod")
    _leaf(project_actions, "projects", "list", "list projects with their number of live keys")

    keys = commands.add_parser("keys", help="create, revoke or list API keys")
    key_actions = keys.add_subparsers(dest="action", required=True)
    create = _leaf(key_actions, "keys", "create", "create a key for a project; prints it once")
    create.add_argument("--project", required=True, help="the project the key opens")
    create.add_argument("--label", default="", help="a note, e.g. who holds the key")
    revoke = _leaf(key_actions, "keys", "revoke", "revoke a key by its prefix (msk_...)")
    revoke.add_argument(
        "prefix",
        help=f"the key's prefix as `keys list` shows it, or its start (msk_ and at least "
        f"{MIN_PREFIX_DIGITS} hex digits) if no other key's prefix starts so, or the whole key",
    )
    listing = _leaf(key_actions, "keys", "list", "list keys by prefix (never the secret)")
    listing.add_argument("--project", default=None, help="only this project's keys")


def _leaf(
    actions: argparse._SubParsersAction[argparse.ArgumentParser], command: str, name: str, text: str
) -> argparse.ArgumentParser:
    parser = actions.add_parser(name, help=text, description=text)
    config_module.add_arguments(parser, command)
    return parser


def commands(args: argparse.Namespace) -> dict[str, Command]:
    """The runners of these commands for `args` (bound to its sub-action and arguments)."""
    return {
        "projects": functools.partial(_run, _PROJECT_ACTIONS, args),
        "keys": functools.partial(_run, _KEY_ACTIONS, args),
    }


async def _run(
    actions: Mapping[str, Action],
    args: argparse.Namespace,
    config: Config,
) -> None:
    from server.serving.app import open_store  # the app imports grpc; only needed when run

    store = await open_store(config)
    try:
        await store.require_migrated()
        await actions[args.action](store, args)
    finally:
        await store.close()


async def _create_project(store: Store, args: argparse.Namespace) -> None:
    if not _PROJECT_NAME.fullmatch(args.name):
        raise InvalidArgument.field(
            "name", "1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    project = await store.create_project(args.name)
    print(f"created project {project.name}")


async def _list_projects(store: Store, args: argparse.Namespace) -> None:
    for project in await store.list_projects():
        keys = f"{project.live_keys} live key{'' if project.live_keys == 1 else 's'}"
        print(f"{project.name}\t{keys}\tcreated {_utc(project.created_at)}")


async def _create_key(store: Store, args: argparse.Namespace) -> None:
    if len(args.label) > _MAX_LABEL or not args.label.isprintable():
        raise InvalidArgument.field("label", f"at most {_MAX_LABEL} printable characters")
    key = new_key()
    first = not await store.any_api_key()
    stored = await store.create_api_key(args.project, key, args.label)
    # The secret exists only in this output: the database keeps a salted hash of it.
    print(key.text)
    print(
        f"created key {stored.prefix} for project {stored.project}; it is shown only now, "
        "store it safely",
        file=sys.stderr,
    )
    if first:
        print(
            "this is the first key: every call to this database's servers now needs a key",
            file=sys.stderr,
        )


async def _revoke_key(store: Store, args: argparse.Namespace) -> None:
    # A whole key is accepted too: whoever holds a leaked key can revoke it at once.
    key = await store.revoke_api_key(prefix_start(args.prefix))
    print(f"revoked {_describe(key)}")


async def _list_keys(store: Store, args: argparse.Namespace) -> None:
    for key in await store.list_api_keys(args.project):
        print(_describe(key))


def _describe(key: ApiKey) -> str:
    state = f"revoked {_utc(key.revoked_at)}" if key.revoked_at else "active"
    label = f"\t{key.label}" if key.label else ""
    return f"{key.prefix}\t{key.project}\t{state}\tcreated {_utc(key.created_at)}{label}"


def _utc(moment: datetime) -> str:
    # In UTC and saying so: the database session's zone is the machine's, unnamed.
    return f"{moment.astimezone(UTC):%F %T} UTC"


_PROJECT_ACTIONS = {"create": _create_project, "list": _list_projects}
_KEY_ACTIONS = {"create": _create_key, "revoke": _revoke_key, "list": _list_keys}
