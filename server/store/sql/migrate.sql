-- The record of applied schema migrations and the lock that applies each once.

-- lock_migrations --
-- Serializes migrate() across every worker and replica (one fixed advisory lock key).
SELECT pg_advisory_lock(7283946501);

-- unlock_migrations --
-- Releases the advisory lock of lock_migrations.
SELECT pg_advisory_unlock(7283946501);

-- create_schema_migrations --
-- The record of applied migrations; created before the first one runs.
CREATE TABLE IF NOT EXISTS schema_migrations (
    name text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- applied_migrations --
-- The names of the migrations already applied.
SELECT name FROM schema_migrations ORDER BY name;

-- record_migration --
-- Marks one migration as applied, in the transaction that applied it.
INSERT INTO schema_migrations (name) VALUES (%(name)s);
