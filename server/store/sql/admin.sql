-- The database as a whole: reachability, the shared page-token key, and the purge of
-- expired soft-deleted rows.

-- ping --
-- One round trip, to notice a database that went away while no call was made.
SELECT 1;

-- token_key --
-- Creates the page-token key once (first worker wins) and reads the one that is kept.
WITH made AS (
    INSERT INTO settings (name, value) VALUES ('page_token_key', %(candidate)s)
    ON CONFLICT (name) DO NOTHING
    RETURNING value
)
SELECT value FROM made
UNION ALL
SELECT value FROM settings WHERE name = 'page_token_key'
LIMIT 1;

-- get_backup_source --
-- The name of the project a backup reads (its id, from the caller's key, always exists).
SELECT name FROM projects WHERE project_id = %(project_id)s;

-- purge_cutoff --
-- The time before which soft-deleted rows are expired, by the database's clock.
SELECT now() - %(retention)s::interval AS cutoff;

-- purge_messages --
-- Hard-deletes one batch of messages soft-deleted before the cutoff.
WITH doomed AS (
    SELECT m.project_id, m.session_id, m.sequence FROM messages m
    WHERE m.deleted_at < %(cutoff)s
    LIMIT %(batch_size)s
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM messages m USING doomed d
    WHERE m.project_id = d.project_id AND m.session_id = d.session_id
      AND m.sequence = d.sequence
    RETURNING 1
)
SELECT count(*) AS n, 0 AS others FROM gone;

-- purge_sessions --
-- Hard-deletes one batch of sessions soft-deleted before the cutoff, with all their messages.
WITH doomed AS (
    SELECT s.project_id, s.session_id FROM sessions s
    WHERE s.deleted_at < %(cutoff)s
    LIMIT %(batch_size)s
    FOR UPDATE SKIP LOCKED
), gone_messages AS (
    DELETE FROM messages m USING doomed d
    WHERE m.project_id = d.project_id AND m.session_id = d.session_id
    RETURNING 1
), gone AS (
    DELETE FROM sessions s USING doomed d
    WHERE s.project_id = d.project_id AND s.session_id = d.session_id
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS n, (SELECT count(*) FROM gone_messages) AS others;

-- purge_pick_messages_citus --
-- The purge under Citus, which locks no rows of a multi-shard SELECT, step one: up to
-- batch_size expired messages over every shard (nothing locked), as their sessions grouped by
-- the shard that holds them. Each group is then purged on its shard alone
-- (purge_messages_in_shard).
WITH picked AS MATERIALIZED (
    SELECT m.session_id FROM messages m
    WHERE m.deleted_at < %(cutoff)s
    LIMIT %(batch_size)s
)
SELECT count(*) AS picked, array_agg(DISTINCT p.session_id) AS session_ids
FROM picked p
GROUP BY get_shard_id_for_distribution_column('messages', p.session_id);

-- purge_messages_in_shard --
-- purge_messages under Citus, step two: the expired messages of sessions that one shard holds
-- (one group of purge_pick_messages_citus), so Citus sends the statement whole to that shard
-- and it runs there as purge_messages does on plain PostgreSQL: its own short transaction,
-- rows picked and locked in one snapshot, and a row a write holds skipped, not waited for.
WITH doomed AS (
    SELECT m.project_id, m.session_id, m.sequence FROM messages m
    WHERE m.session_id = ANY(%(session_ids)s::text[]) AND m.deleted_at < %(cutoff)s
    LIMIT %(batch_size)s
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM messages m USING doomed d
    -- Pinned by the parameters (doomed is on that shard) so it stays on one shard.
    WHERE m.session_id = ANY(%(session_ids)s::text[])
      AND m.project_id = d.project_id AND m.session_id = d.session_id
      AND m.sequence = d.sequence
    RETURNING 1
)
SELECT count(*) AS n, 0 AS others FROM gone;

-- purge_pick_sessions_citus --
-- purge_sessions under Citus, step one: as purge_pick_messages_citus, for expired sessions.
WITH picked AS MATERIALIZED (
    SELECT s.session_id FROM sessions s
    WHERE s.deleted_at < %(cutoff)s
    LIMIT %(batch_size)s
)
SELECT count(*) AS picked, array_agg(DISTINCT p.session_id) AS session_ids
FROM picked p
GROUP BY get_shard_id_for_distribution_column('sessions', p.session_id);

-- purge_sessions_in_shard --
-- purge_sessions under Citus, step two: one shard's group, as purge_messages_in_shard. In one
-- statement on one shard, a session an AddMemory revived is either revived first (then it is
-- not picked) or locked here first (the AddMemory waits, then makes the session anew): its
-- new messages are never deleted with the old ones.
WITH doomed AS (
    SELECT s.project_id, s.session_id FROM sessions s
    WHERE s.session_id = ANY(%(session_ids)s::text[]) AND s.deleted_at < %(cutoff)s
    LIMIT %(batch_size)s
    FOR UPDATE SKIP LOCKED
), gone_messages AS (
    DELETE FROM messages m USING doomed d
    WHERE m.session_id = ANY(%(session_ids)s::text[])
      AND m.project_id = d.project_id AND m.session_id = d.session_id
    RETURNING 1
), gone AS (
    DELETE FROM sessions s USING doomed d
    WHERE s.session_id = ANY(%(session_ids)s::text[])
      AND s.project_id = d.project_id AND s.session_id = d.session_id
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS n, (SELECT count(*) FROM gone_messages) AS others;

-- vectors_ready --
-- Whether migration 0007 made the vector tables (pgvector was available), whether 0012 made
-- the table of recall kept by words, and whether the database is a Citus coordinator (a few
-- writes then take another path: store/distribute.py).
SELECT to_regclass('message_embeddings') IS NOT NULL AS ready,
       to_regclass('session_word_recall') IS NOT NULL AS word_recall,
       EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') AS citus;
