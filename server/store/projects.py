"""The project and API key methods of the Store."""

from __future__ import annotations

from typing import Any

from server.api_keys import ApiKey, NewKey, Project, StoredKey
from server.errors import AlreadyExists, InvalidArgument, NotFound
from server.store.base import StoreBase, factory
from server.store.db import fetch_all, fetch_one


class ProjectMethods(StoreBase):
    """Projects, and the salted digests of their API keys."""

    async def create_project(self, name: str) -> Project:
        """Creates a project.

        Raises:
            AlreadyExists: a project has this name (reason PROJECT_ALREADY_EXISTS).
        """
        taken = AlreadyExists(f"project '{name}' already exists", reason="PROJECT_ALREADY_EXISTS")
        async with self._connect(unique=factory(taken), field="name") as conn:
            row = await fetch_one(conn, "create_project", {"name": name})
        assert row is not None
        return _project(row)

    async def list_projects(self) -> list[Project]:
        """Every project with its number of live keys.

        Raises:
            Unavailable: the database cannot be reached.
        """
        async with self._connect() as conn:
            found = await fetch_all(conn, "list_projects", {})
        return [_project(r) for r in found]

    async def create_api_key(self, project: str, key: NewKey, label: str = "") -> ApiKey:
        """Stores a new key's prefix and salted digest (never its secret) under `project`.

        Raises:
            NotFound: no project has this name (reason PROJECT_NOT_FOUND).
        """
        params = {
            "project": project,
            "prefix": key.prefix,
            "salt": key.salt,
            "digest": key.digest,
            "label": label,
        }
        async with self._connect(field="label") as conn:
            found = await fetch_one(conn, "get_project", {"name": project})
            if found is None:
                raise project_not_found(project)
            row = await fetch_one(conn, "create_api_key", {**params, **found})
        assert row is not None
        return _api_key(row)

    async def find_api_key(self, prefix: str) -> StoredKey | None:
        """The stored digest of the key with this public prefix, or None.

        Raises:
            Unavailable: the database cannot be reached.
        """
        async with self._connect() as conn:
            row = await fetch_one(conn, "find_api_key", {"prefix": prefix})
        if row is None:
            return None
        return StoredKey(
            project_id=int(row["project_id"]),
            salt=bytes(row["salt"]),
            digest=bytes(row["digest"]),
            revoked=row["revoked_at"] is not None,
        )

    async def revoke_api_key(self, prefix: str) -> ApiKey:
        """Revokes the one key whose prefix starts with `prefix` (a whole prefix, or its start as
        server.api_keys.prefix_start takes it). Again is a no-op that keeps the first time.

        Raises:
            NotFound: no key's prefix starts so (reason API_KEY_NOT_FOUND).
            InvalidArgument: more than one key's does, revoked ones included (field `prefix`).
        """
        async with self._connect() as conn:
            found = await fetch_one(conn, "match_api_keys", {"prefix": prefix})
            matching = int(found["matching"]) if found else 0
            row = None
            if found and matching == 1:
                row = await fetch_one(conn, "revoke_api_key", {"prefix": found["prefix"]})
        if matching > 1:
            raise InvalidArgument.field(
                "prefix", f"'{prefix}' matches {matching} API keys: give more of its digits"
            )
        if row is None:
            raise NotFound(
                f"no API key's prefix starts with '{prefix}'", reason="API_KEY_NOT_FOUND"
            )
        return _api_key(row)

    async def list_api_keys(self, project: str | None = None) -> list[ApiKey]:
        """Keys of one project (every project when None), by prefix; never a secret.

        Raises:
            NotFound: `project` names no project (reason PROJECT_NOT_FOUND).
        """
        async with self._connect() as conn:
            if project is not None and not await fetch_one(conn, "get_project", {"name": project}):
                raise project_not_found(project)
            found = await fetch_all(conn, "list_api_keys", {"project": project})
        return [_api_key(r) for r in found]

    async def any_api_key(self) -> bool:
        """Whether any API key was ever made (revoked ones count).

        Raises:
            Unavailable: the database cannot be reached.
        """
        async with self._connect() as conn:
            row = await fetch_one(conn, "any_api_key", {})
        return bool(row and row["any_key"])


def project_not_found(name: str) -> NotFound:
    """The error of a name that names no project."""
    return NotFound(f"project '{name}' not found", reason="PROJECT_NOT_FOUND")


def _project(row: dict[str, Any]) -> Project:
    return Project(
        project_id=int(row["project_id"]),
        name=row["name"],
        created_at=row["created_at"],
        live_keys=int(row.get("live_keys") or 0),
    )


def _api_key(row: dict[str, Any]) -> ApiKey:
    return ApiKey(
        prefix=row["prefix"],
        project=row["project"],
        label=row["label"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )
