-- What every Store method's connection may need: its statement timeout turned off and back.

-- no_statement_timeout --
-- Lifts the per-call statement timeout for this connection, until reset_statement_timeout:
-- migrations may run long, and a call whose deadline is further away than the timeout runs
-- to its deadline (StoreBase._bound_for_call).
SET statement_timeout = 0;

-- long_statement_timeout --
-- The statement timeout of a call whose deadline is further away than the connection's own
-- (StoreBase._bound_for_call), until reset_statement_timeout: set_config, as SET takes no
-- parameter. Outside a transaction (not local), so it holds for the calls that follow.
SELECT set_config('statement_timeout', %(ms)s, false);

-- reset_statement_timeout --
-- Restores the connection's own statement timeout (the one it opened with) after
-- no_statement_timeout.
RESET statement_timeout;

-- snapshot_isolation --
-- The first statement of a transaction that reads in a snapshot held for a backup
-- (sql/snapshots.sql), then import_snapshot (which only a REPEATABLE READ transaction runs).
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY;

-- import_snapshot --
-- A snapshot id is not a parameter PostgreSQL takes here: a literal, of a validated id.
SET TRANSACTION SNAPSHOT {snapshot};

-- snapshot_held --
-- After import_snapshot: whether the connection holding the snapshot for this project (its
-- application_name, sql/snapshots.sql) still lives in this database.
SELECT EXISTS (
    SELECT 1 FROM pg_stat_activity a
    WHERE a.application_name = %(label)s AND a.usename = current_user
      AND a.datname = current_database()
) AS held;
