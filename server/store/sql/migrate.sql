-- The record of applied schema migrations and the lock that applies each once.

-- lock_migrations --
-- Serializes migrate() across every worker and replica (one fixed advisory lock key).
SELECT pg_advisory_lock(7283946501);

-- try_lock_migrations --
-- lock_migrations without waiting: false when another process holds it (it is migrating).
SELECT pg_try_advisory_lock(7283946501) AS locked;

-- unlock_migrations --
-- Releases the advisory lock of lock_migrations.
SELECT pg_advisory_unlock(7283946501);

-- schema_migrations_exist --
-- Whether the record of applied migrations is there (then nothing needs creating: a role
-- that may only read and write rows serves a database whose migrations are all applied).
SELECT to_regclass('schema_migrations') IS NOT NULL AS present;

-- create_schema_migrations --
-- The record of applied migrations; created before the first one runs.
CREATE TABLE IF NOT EXISTS schema_migrations (
    name text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- coordinator_applied_migrations --
-- On a Citus worker: whether the coordinator answered, and the names of the migrations it
-- records as applied, comma-separated (or its error). schema_migrations is the coordinator's
-- own table, absent on workers.
SELECT success, result FROM run_command_on_coordinator(
    $$SELECT coalesce(string_agg(name, ',' ORDER BY name), '') FROM schema_migrations$$
);

-- applied_migrations --
-- The names of the migrations already applied.
SELECT name FROM schema_migrations ORDER BY name;

-- record_migration --
-- Marks one migration as applied, in the transaction that applied it.
INSERT INTO schema_migrations (name) VALUES (%(name)s);

-- extension_available --
-- Whether an extension can be created on this server, whether it already is here, and if so
-- in which schema and whether that schema is on this connection's search_path (its types
-- are found by name only then).
SELECT a.name, a.installed_version IS NOT NULL AS installed, n.nspname AS schema,
       coalesce(n.nspname = ANY(current_schemas(false)), false) AS visible
FROM pg_available_extensions a
LEFT JOIN pg_extension e ON e.extname = a.name
LEFT JOIN pg_namespace n ON n.oid = e.extnamespace
WHERE a.name = %(name)s;

-- migration_lock_timeout --
-- How long each lock a migration's transaction waits for may take (milliseconds, as text):
-- past it the migration gives way to the calls queued behind its request and tries again.
SELECT set_config('lock_timeout', %(ms)s, true);
