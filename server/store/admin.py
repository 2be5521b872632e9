"""The Store's methods on the database as a whole: ping, migrations, the token key, what it
holds (the purge is in purge.py)."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from server.domain import BackupSource
from server.errors import DeadlineExceeded, FailedPrecondition, Unavailable
from server.store.base import StoreBase, statement_timeout_off
from server.store.db import Unanswered, fetch_one
from server.store.distribute import citus_worker_group
from server.store.migrate import apply_migrations, missing_migrations
from server.store.queries import query


class AdminMethods(StoreBase):
    """What the process and operators run on the database, outside any one project's rows."""

    async def ping(self, answer_within: float | None = None) -> None:
        """One round trip; finding the database gone marks it down (see on_database_change).

        `answer_within`: seconds the database has to answer once the ping holds a pooled
        connection; past them it is marked down too. A server that stops answering without
        closing its connections (a hung primary, a network partition) was found by nothing:
        health said SERVING while every call timed out. The wait for a connection is not
        bounded by it: a pool busy with calls is no outage.

        Raises:
            Unavailable: the database cannot be reached, or did not answer in time.
        """
        # One statement in autocommit: no BEGIN or COMMIT of its own to wait on, under the
        # ping's own bound on an answer (db.BoundedConnection). Under the call's bound (the
        # statement timeout and a margin), shorter with a short statement timeout, the ping
        # was cut first as a DEADLINE_EXCEEDED that marks nothing down, and health said
        # SERVING for good in front of a silent database. An answer missing before the ping
        # was sent (the call's setting, on a connection a long deadline used) counts too.
        try:
            async with self._connect(single=True) as conn:
                bound = conn.answer_within
                if answer_within is not None:
                    conn.answer_within = answer_within
                try:
                    await conn.execute(query("ping"))
                finally:
                    conn.answer_within = bound  # the next call's, with no statement timeout
        except DeadlineExceeded as exc:
            if answer_within is None or not isinstance(exc.__cause__, Unanswered):
                raise
            # The connection was closed under the ping: the pool replaces it.
            self._health.report_lost_connection(
                f"PostgreSQL did not answer a ping within {answer_within:g}s"
            )
            raise Unavailable(f"database unavailable: no answer within {answer_within:g}s") from exc

    async def migrate(self) -> list[str]:
        """Applies pending migrations under an advisory lock; returns the names applied.

        Raises:
            FailedPrecondition: (CITUS_WORKER) the database URL reaches a Citus worker.
            Unavailable: the database cannot be reached.
        """
        async with self._connect(single=True) as conn:
            # A migration may rewrite a large table: the per-call statement timeout is not
            # meant for it (RESET goes back to the connection's own default afterwards).
            try:
                await statement_timeout_off(conn, True)
                applied = await apply_migrations(conn)
            finally:
                try:
                    await statement_timeout_off(conn, False)
                except BaseException:
                    # The reset interrupted (a second cancellation) or failed: the
                    # connection may keep no timeout, and the pool replaces it rather
                    # than lend it to calls the timeout must bound.
                    conn.pgconn.finish()
                    raise
        await self.check_vectors()
        return applied

    async def migrate_to_serve(self) -> list[str]:
        """What a serving process (`memstore serve`, `memstore embed`) does at its start:
        migrates (`migrate`); through a Citus worker, where only the coordinator may migrate,
        checks instead that the coordinator has applied every migration, and remembers the
        worker's node group (`worker_group`). Returns the migrations applied.

        Raises:
            FailedPrecondition: on a worker, migrations are missing (NOT_MIGRATED), naming
                them and the coordinator.
            Unavailable: the database (or, on a worker, the coordinator) cannot be reached.
        """
        async with self._connect(single=True) as conn:
            group = await citus_worker_group(conn)
            missing = await missing_migrations(conn, on_worker=True) if group else []
        if group is None:
            return await self.migrate()
        if missing:
            raise FailedPrecondition(
                f"this database URL reaches a Citus worker (node group {group}) and the "
                f"coordinator lacks this memstore's migrations ({', '.join(missing)}): run "
                "`memstore migrate` with the coordinator's URL first",
                reason="NOT_MIGRATED",
            )
        self.worker_group = group
        await self.check_vectors()
        return []

    async def require_migrated(self) -> None:
        """Checks, changing nothing, that the database holds this memstore's migrations (but
        those waiting for pgvector), then reads what they made (check_vectors). For the
        one-shot commands (purge, reindex, projects, keys): a newer one, run from a cron job
        against older servers, migrated under them (an audit).

        Raises:
            FailedPrecondition: migrations are missing (reason NOT_MIGRATED), naming them;
                or the database URL reaches a Citus worker (CITUS_WORKER).
            Unavailable: the database cannot be reached.
        """
        async with self._connect(single=True) as conn:
            missing = await missing_migrations(conn)
        if missing:
            raise FailedPrecondition(
                f"the database lacks this memstore's migrations ({', '.join(missing)}): run "
                "`memstore migrate`, or start a server of this version, first (stop servers "
                "of an older version before: README)",
                reason="NOT_MIGRATED",
            )
        await self.check_vectors()

    async def check_vectors(self) -> bool:
        """Looks again whether the vector tables exist; remembers and returns the answer.

        Raises:
            Unavailable: the database cannot be reached.
        """
        async with self._connect(single=True) as conn:
            row = await fetch_one(conn, "vectors_ready", {})
        self.vectors = bool(row and row["ready"])
        self.word_recall = bool(row and row["word_recall"]) and not self.vectors
        self.citus = bool(row and row["citus"])
        return self.vectors

    async def token_key(self) -> bytes:
        """The page-token HMAC key shared by every worker, created once and kept in the database.

        Raises:
            Unavailable: the database cannot be reached.
        """
        params = {"candidate": secrets.token_bytes(32)}
        async with self._connect(single=True) as conn:
            # A worker that loses the insert race may not see the winner's row in the same
            # statement's snapshot; the next statement does.
            for _ in range(3):
                row = await fetch_one(conn, "token_key", params)
                if row is not None:
                    return bytes(row["value"])
        raise Unavailable("database unavailable: cannot read the page-token key")

    async def get_backup_source(self, project_id: int) -> BackupSource:
        """The project's name, and an id of the project in this database that a backup
        records, so that resuming it elsewhere is refused.

        The id is an HMAC of the project's number under the page-token key this database
        keeps (made at random once per database, whatever MEMSTORE_TOKEN_KEY says): every
        worker and replica answers the same, another project or database another, and
        neither the number nor the key can be read from it.

        Raises:
            Unavailable: the database cannot be reached.
        """
        key = await self.token_key()
        async with self._connect() as conn:
            row = await fetch_one(conn, "get_backup_source", {"project_id": project_id})
        assert row is not None  # the caller's key names it, or it is the default
        tag = hmac.new(key, b"memstore backup source %d" % project_id, hashlib.sha256)
        return BackupSource(project=str(row["name"]), source_id=tag.hexdigest()[:32])
