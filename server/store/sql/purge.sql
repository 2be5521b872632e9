-- The purge of expired soft-deleted rows: its turn (one purge at a time per database, at most
-- one periodic run per interval), the cutoff, and the batches.

-- try_lock_purge --
-- Takes the purge's session advisory lock unless another session holds it: one purge at a time
-- per database, whichever worker or replica runs it. On Citus, the coordinator's own lock (an
-- advisory lock is not propagated to the workers), which every purge takes there.
SELECT pg_try_advisory_lock(7283946502) AS locked;

-- unlock_purge --
-- Releases the lock of try_lock_purge.
SELECT pg_advisory_unlock(7283946502);

-- last_purge_started --
-- Seconds since the last purge of the database started (of any process), by the database's
-- clock, which every process shares; no row before the first. Read under the purge's lock,
-- which every writer of the time holds (record_purge_start): nothing changes it meanwhile.
SELECT extract(epoch FROM now()) - convert_from(value, 'UTF8')::numeric AS seconds_ago
FROM settings WHERE name = 'purge_started_at';

-- record_purge_start --
-- Under the purge's lock: a purge of the database starts now (seconds since the epoch, as
-- text). No function in the conflict's WHERE: Citus refuses one that is not immutable.
INSERT INTO settings (name, value)
VALUES ('purge_started_at', convert_to(extract(epoch FROM now())::text, 'UTF8'))
ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value;

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
