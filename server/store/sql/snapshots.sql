-- Snapshots of the database held for a backup's reads (BackupService.OpenSnapshot): exported
-- by a transaction of a connection of its own, imported by each batch of the export streams.

-- open_snapshot --
-- Run first in a REPEATABLE READ transaction of a connection outside the pool, which then
-- stays idle in it: the snapshot lives while that transaction does. PostgreSQL ends it after
-- %(hold_ms)s of idling (the timeout is the transaction's own setting), so a snapshot
-- outlives neither its hold nor a process that forgot it. The application_name names the
-- project and the snapshot's nonce (%(label)s), for close_snapshot and each import, from any
-- process.
WITH exported AS (SELECT pg_export_snapshot() AS snapshot)
SELECT e.snapshot,
       statement_timestamp() + make_interval(secs => %(hold_ms)s / 1000.0) AS expires_at,
       set_config('idle_in_transaction_session_timeout', %(hold_ms)s::text, true),
       set_config('application_name', %(label)s, true)
FROM exported e;

-- close_snapshot --
-- Signals the backend holding a snapshot of this project to end (a process's own connection,
-- or another process's: a role may end its own backends); the caller then waits for it to be
-- gone by snapshot_held (sql/base.sql), the very check a read makes after importing: only
-- signalled, it still lived for a moment, and a read at once imported its snapshot and found
-- its holder listed (CI, PostgreSQL 15). Not pg_terminate_backend's own wait, which looks
-- every 100 ms: a close took ~100 ms where the backend ends in about one. No row: it was gone
-- already.
SELECT pg_terminate_backend(a.pid) AS signalled
FROM pg_stat_activity a
WHERE a.application_name = %(label)s AND a.usename = current_user
  AND a.datname = current_database();

-- held_snapshots --
-- The snapshots still held by this role's connections (those PostgreSQL ended are gone).
SELECT a.application_name FROM pg_stat_activity a
WHERE a.application_name LIKE 'memstore-snapshot %%' AND a.usename = current_user
  AND a.datname = current_database();
