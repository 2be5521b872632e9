-- Citus: the statements that distribute memstore's tables (store/distribute.py).

-- citus_present --
-- Whether this database is a Citus database (the citus extension is created here): on its
-- coordinator migrate also distributes the tables (store/distribute.py); a worker's is
-- refused (citus_node_group).
SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') AS citus;

-- citus_node_group --
-- This Citus node's group: 0 on the coordinator, a worker's own number on a worker (Citus
-- syncs its metadata to the workers, so memstore's tables exist there too, as shells).
SELECT groupid FROM pg_dist_local_group;

-- citus_tables --
-- memstore's tables that Citus already manages, with their kind ('h' hash-distributed,
-- 'n' reference) and distribution column.
SELECT p.logicalrelid::regclass::text AS name, p.partmethod AS kind,
       column_to_column_name(p.logicalrelid, p.partkey) AS distribution_column
FROM pg_dist_partition p;

-- citus_foreign_keys --
-- The foreign keys between the tables still to distribute (and any they reference): dropped
-- while the tables are distributed, then made again where Citus can enforce them.
SELECT c.conrelid::regclass::text AS table_name, c.conname AS name,
       c.confrelid::regclass::text AS referenced, pg_get_constraintdef(c.oid) AS definition
FROM pg_constraint c
WHERE c.contype = 'f' AND c.connamespace = current_schema()::regnamespace
  AND (c.conrelid::regclass::text = ANY(%(tables)s::text[])
       OR c.confrelid::regclass::text = ANY(%(tables)s::text[]))
ORDER BY c.conrelid::regclass::text, c.conname;

-- citus_reference_table --
-- Copies a small shared table to every node (a Citus reference table).
SELECT create_reference_table(%(table)s::text::regclass);

-- citus_distributed_table --
-- Hash-distributes a table by one column, in the co-location group of another table (or in a
-- group of its own, 'none').
SELECT create_distributed_table(%(table)s::text::regclass, %(column)s,
                                colocate_with => %(colocate_with)s);

-- drop_foreign_key --
-- Drops one foreign key while its tables are distributed; {table} and {name} are identifiers.
ALTER TABLE {table} DROP CONSTRAINT {name};

-- add_foreign_key --
-- Makes a dropped foreign key again from PostgreSQL's own text of it ({definition}).
ALTER TABLE {table} ADD CONSTRAINT {name} {definition};

-- existing_tables --
-- The tables of the current schema (the vector tables exist only where pgvector was).
SELECT c.relname AS name FROM pg_class c
WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p');

-- sequential_mode --
-- Distributes over one connection per node: the tables reference each other, and Citus
-- refuses parallel shard writes in a transaction that also touches a reference table.
SET LOCAL citus.multi_shard_modify_mode TO 'sequential';

-- citus_triggers --
-- The row triggers of the tables still to distribute (users_wire, migration 0040): Citus
-- distributes no table that has triggers, so they are dropped first and made again after.
SELECT t.tgrelid::regclass::text AS table_name, t.tgname AS name,
       pg_get_triggerdef(t.oid) AS definition
FROM pg_trigger t
WHERE NOT t.tgisinternal AND t.tgrelid::regclass::text = ANY(%(tables)s::text[])
ORDER BY t.tgrelid::regclass::text, t.tgname;

-- drop_trigger --
-- Drops one trigger while its table is distributed; {table} and {name} are identifiers.
DROP TRIGGER {name} ON {table};

-- unsafe_triggers --
-- Lets a trigger be made on a distributed table. memstore's only touch their own row (NEW),
-- so they run on each shard as on one table.
SET LOCAL citus.enable_unsafe_triggers TO on;
