-- Restore (memstore restore): rows written back with their original values, in the caller's
-- transaction, users before sessions before messages. Each kind has a statement that finds
-- the request's rows already stored, with the names of the fields that differ, and one that
-- inserts the others.

-- project_rows --
-- Whether the project holds any user or session (live or soft-deleted).
SELECT EXISTS (SELECT 1 FROM users u WHERE u.project_id = %(project_id)s)
       OR EXISTS (SELECT 1 FROM sessions s WHERE s.project_id = %(project_id)s) AS taken;

-- restore_users_existing --
-- The request's users already stored (by user_id), each with the fields that differ.
WITH t AS (
    SELECT * FROM unnest(%(user_ids)s::text[], %(emails)s::text[], %(first_names)s::text[],
                         %(last_names)s::text[], %(metadatas)s::jsonb[],
                         %(created)s::timestamptz[], %(updated)s::timestamptz[])
                  WITH ORDINALITY
                  AS t(user_id, email, first_name, last_name, metadata, created_at,
                       updated_at, ord)
)
SELECT t.ord, t.user_id AS id, array_remove(ARRAY[
           CASE WHEN u.email IS DISTINCT FROM t.email THEN 'email' END,
           CASE WHEN u.first_name IS DISTINCT FROM t.first_name THEN 'first_name' END,
           CASE WHEN u.last_name IS DISTINCT FROM t.last_name THEN 'last_name' END,
           CASE WHEN u.metadata IS DISTINCT FROM t.metadata THEN 'metadata' END,
           CASE WHEN u.created_at IS DISTINCT FROM t.created_at THEN 'created_at' END,
           CASE WHEN u.updated_at IS DISTINCT FROM t.updated_at THEN 'updated_at' END
       ], NULL) AS differs
FROM t JOIN users u ON u.project_id = %(project_id)s AND u.user_id = t.user_id
ORDER BY t.ord;

-- restore_users --
-- Inserts the request's users that are not stored yet, timestamps as given; one row per user
-- inserted (Citus counts every row of an INSERT ... SELECT in its rowcount, conflicts too).
-- In key order, as every write takes its rows: a concurrent Restore of the same new users in
-- another order then waits for this one instead of deadlocking with it (each insert holds
-- the keys it has made until its commit; tests/store/test_restore_races.py).
INSERT INTO users (project_id, user_id, email, first_name, last_name, metadata, created_at,
                   updated_at)
SELECT %(project_id)s, t.user_id, t.email, t.first_name, t.last_name, t.metadata,
       t.created_at, t.updated_at
FROM unnest(%(user_ids)s::text[], %(emails)s::text[], %(first_names)s::text[],
            %(last_names)s::text[], %(metadatas)s::jsonb[], %(created)s::timestamptz[],
            %(updated)s::timestamptz[])
     AS t(user_id, email, first_name, last_name, metadata, created_at, updated_at)
ORDER BY t.user_id COLLATE "C"
ON CONFLICT (project_id, user_id) DO NOTHING
RETURNING 1;

-- restore_sessions_existing --
-- The request's sessions already stored (by session_id), each with the fields that differ.
WITH t AS (
    SELECT * FROM unnest(%(session_ids)s::text[], %(user_ids)s::text[], %(metadatas)s::jsonb[],
                         %(created)s::timestamptz[], %(updated)s::timestamptz[],
                         %(deleted)s::timestamptz[], %(last_message)s::timestamptz[])
                  WITH ORDINALITY
                  AS t(session_id, user_id, metadata, created_at, updated_at, deleted_at,
                       last_message_at, ord)
)
SELECT t.ord, t.session_id AS id, array_remove(ARRAY[
           CASE WHEN s.user_id IS DISTINCT FROM t.user_id THEN 'user_id' END,
           CASE WHEN s.metadata IS DISTINCT FROM t.metadata THEN 'metadata' END,
           CASE WHEN s.created_at IS DISTINCT FROM t.created_at THEN 'created_at' END,
           CASE WHEN s.updated_at IS DISTINCT FROM t.updated_at THEN 'updated_at' END,
           CASE WHEN s.deleted_at IS DISTINCT FROM t.deleted_at THEN 'deleted_at' END,
           CASE WHEN s.last_message_at IS DISTINCT FROM t.last_message_at
                THEN 'last_message_at' END
       ], NULL) AS differs
FROM t JOIN sessions s ON s.project_id = %(project_id)s AND s.session_id = t.session_id
ORDER BY t.ord;

-- restore_sessions --
-- Inserts the request's sessions that are not stored yet (one row back per session inserted,
-- as restore_users, with its user and whether it is live: the store counts those for their
-- users, count_restored_sessions); message_count starts at 0 and grows
-- as restore_messages adds their live messages, next_sequence starts where the backup had it
-- (1 when it does not say) and never falls behind a restored message. In key order, as
-- restore_users.
INSERT INTO sessions (project_id, session_id, user_id, metadata, created_at, updated_at,
                      deleted_at, last_message_at, next_sequence)
SELECT %(project_id)s, t.session_id, t.user_id, t.metadata, t.created_at, t.updated_at,
       t.deleted_at, t.last_message_at, greatest(t.next_sequence, 1)
FROM unnest(%(session_ids)s::text[], %(user_ids)s::text[], %(metadatas)s::jsonb[],
            %(created)s::timestamptz[], %(updated)s::timestamptz[], %(deleted)s::timestamptz[],
            %(last_message)s::timestamptz[], %(next_sequences)s::bigint[])
     AS t(session_id, user_id, metadata, created_at, updated_at, deleted_at, last_message_at,
          next_sequence)
ORDER BY t.session_id COLLATE "C"
ON CONFLICT (project_id, session_id) DO NOTHING
RETURNING user_id, deleted_at IS NULL AS live;

-- restore_messages_existing --
-- The request's messages whose (session_id, sequence) or (session_id, uuid) is stored, each
-- with the fields that differ.
WITH t AS (
    SELECT * FROM unnest(%(session_ids)s::text[], %(sequences)s::bigint[], %(uuids)s::uuid[],
                         %(roles)s::text[], %(role_types)s::text[], %(contents)s::text[],
                         %(metadatas)s::jsonb[], %(created)s::timestamptz[],
                         %(updated)s::timestamptz[], %(deleted)s::timestamptz[])
                  WITH ORDINALITY
                  AS t(session_id, sequence, uuid, role, role_type, content, metadata,
                       created_at, updated_at, deleted_at, ord)
)
SELECT t.ord, t.session_id || ' #' || t.sequence AS id, array_remove(ARRAY[
           CASE WHEN m.sequence IS DISTINCT FROM t.sequence THEN 'sequence' END,
           CASE WHEN m.uuid IS DISTINCT FROM t.uuid THEN 'uuid' END,
           CASE WHEN m.role IS DISTINCT FROM t.role THEN 'role' END,
           CASE WHEN m.role_type IS DISTINCT FROM t.role_type THEN 'role_type' END,
           CASE WHEN m.content IS DISTINCT FROM t.content THEN 'content' END,
           CASE WHEN m.metadata IS DISTINCT FROM t.metadata THEN 'metadata' END,
           CASE WHEN m.created_at IS DISTINCT FROM t.created_at THEN 'created_at' END,
           CASE WHEN m.updated_at IS DISTINCT FROM t.updated_at THEN 'updated_at' END,
           CASE WHEN m.deleted_at IS DISTINCT FROM t.deleted_at THEN 'deleted_at' END
       ], NULL) AS differs
FROM t JOIN messages m ON m.project_id = %(project_id)s AND m.session_id = t.session_id
                      AND (m.sequence = t.sequence OR m.uuid = t.uuid)
ORDER BY t.ord;

-- restore_messages --
-- Inserts the request's messages that are not stored yet, then counts the live ones into
-- their sessions and moves each session's next sequence past them (its updated_at stays as
-- restored), and queues the live messages of live sessions for embedding; where recall is
-- kept by words instead (per_turn), only each session's last live one, as AddMemory does
-- (the worker ranks a session, not a message). Answers how many messages it inserted.
WITH ins AS (
    INSERT INTO messages AS m (project_id, session_id, sequence, uuid, role, role_type,
                               content, metadata, created_at, updated_at, deleted_at)
    SELECT %(project_id)s, t.session_id, t.sequence, t.uuid, t.role, t.role_type, t.content,
           t.metadata, t.created_at, t.updated_at, t.deleted_at
    FROM unnest(%(session_ids)s::text[], %(sequences)s::bigint[], %(uuids)s::uuid[],
                %(roles)s::text[], %(role_types)s::text[], %(contents)s::text[],
                %(metadatas)s::jsonb[], %(created)s::timestamptz[], %(updated)s::timestamptz[],
                %(deleted)s::timestamptz[])
         AS t(session_id, sequence, uuid, role, role_type, content, metadata, created_at,
              updated_at, deleted_at)
    ON CONFLICT DO NOTHING
    RETURNING m.session_id, m.sequence, m.deleted_at
), per_session AS (
    SELECT ins.session_id, count(*) FILTER (WHERE ins.deleted_at IS NULL) AS live,
           max(ins.sequence) AS top,
           max(ins.sequence) FILTER (WHERE ins.deleted_at IS NULL) AS live_top
    FROM ins GROUP BY ins.session_id
), counted AS (
    UPDATE sessions AS s SET message_count = s.message_count + p.live,
                             next_sequence = greatest(s.next_sequence, p.top + 1)
    FROM per_session p
    WHERE s.project_id = %(project_id)s AND s.session_id = p.session_id
    RETURNING s.session_id, s.deleted_at
), due AS (
    INSERT INTO embedding_queue (project_id, session_id, sequence)
    SELECT %(project_id)s, ins.session_id, ins.sequence
    FROM ins JOIN counted ON counted.session_id = ins.session_id
    JOIN per_session p ON p.session_id = ins.session_id
    WHERE %(embed)s AND ins.deleted_at IS NULL AND counted.deleted_at IS NULL
      AND (NOT %(per_turn)s OR ins.sequence = p.live_top)
)
SELECT count(*) AS created FROM ins;

-- count_restored_sessions --
-- count_live_sessions for the live sessions a Restore batch inserted: one delta per user.
INSERT INTO user_session_counts AS c (project_id, user_id, session_count)
SELECT %(project_id)s, t.user_id, t.delta
FROM unnest(%(user_ids)s::text[], %(deltas)s::bigint[]) AS t(user_id, delta)
ON CONFLICT (project_id, user_id)
    DO UPDATE SET session_count = c.session_count + excluded.session_count;

-- restore_lock_sessions --
-- The sessions a Restore's messages name, locked in key order before restore_messages counts
-- into them (FOR NO KEY UPDATE, the lock its UPDATE takes, and AddMemory's upsert): a session
-- a concurrent call commits meanwhile is then in restore_messages' snapshot, and no
-- AddMemory, ClearMemory or DeleteSession changes it before the commit. A named session
-- missing here is neither stored nor in the request (plain PostgreSQL; on Citus
-- restore_lock_session_citus, one session at a time). Each row's deleted_at is the locked
-- (latest) version's, which holds until the commit: the store refuses a live message in a
-- soft-deleted session by it.
SELECT s.session_id, s.deleted_at FROM sessions s
WHERE s.project_id = %(project_id)s AND s.session_id = ANY(%(session_ids)s::text[])
-- Key order by code points (COLLATE "C"), as AddMemory's shared commits sort their sessions
-- in Python and restore_lock_session_citus goes through them: in a database of another
-- collation the two orders differed (tests/store/test_lock_order.py).
ORDER BY s.session_id COLLATE "C"
FOR NO KEY UPDATE;

-- restore_lock_session_citus --
-- restore_lock_sessions for one session, on Citus (which runs no multi-shard SELECT ... FOR
-- NO KEY UPDATE): the store locks the sessions in key order, one router statement each.
SELECT s.session_id, s.deleted_at FROM sessions s
WHERE s.project_id = %(project_id)s AND s.session_id = %(session_id)s
FOR NO KEY UPDATE;

-- restore_serialize --
-- One Restore of a project at a time, on both engines: each waits here, in its transaction,
-- for the one before to commit, before project_rows. Under READ COMMITTED two Restores with
-- require_empty each saw the project empty beside the other's uncommitted rows, and both
-- wrote their backups into it (tests/store/test_restore_races.py). On Citus it also keeps
-- two Restores of overlapping rows from deadlocking across shards: their inserts reach the
-- shards in parallel, in no order two Restores share (Citus cancelled one, UNAVAILABLE),
-- where on plain PostgreSQL the key order makes one wait for the other. The lock is the
-- coordinator's own (an advisory lock is not propagated), which holds while every call goes
-- through the coordinator (docs/scaling.md). `memstore restore` sends its batches one at a
-- time, so it waits on nothing.
SELECT pg_advisory_xact_lock(hashtext('memstore restore'), hashtext(%(project_id)s::text));
