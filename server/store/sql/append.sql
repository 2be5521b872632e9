-- AddMemory's append of messages to a session: one call's statements, on plain PostgreSQL
-- (add_memory) and on Citus (the *_citus router statements). Sequences come from
-- sessions.next_sequence under the session's row lock.

-- add_memory --
-- Upserts the session, appends the messages whose uuid the session does not hold yet,
-- reserving sequences for those only, and queues them for embedding. Answers one row per
-- request message, in request order: the stored message, new or already there. A
-- soft-deleted session is revived only with `revive` (after lock_session_for_revival):
-- without it, a deleted session answers no row and the store takes that path, which counts
-- the session live again for its user. {count_session} counts a session this statement
-- inserted for its user (plain PostgreSQL; under Citus user_session_counts is on another
-- shard and the store counts it in the same transaction: store/add_memory.py). A literal
-- brace is written twice here: the statement is a format string.
WITH t AS (
    -- The arrays come in binary format: psycopg's text form of an array quotes each element
    -- with a regular expression in Python, ~50 µs per call of one message, ~600 of twenty.
    SELECT * FROM unnest(%(uuids)b::uuid[], %(roles)b::text[], %(role_types)b::text[],
                         %(contents)b::text[], %(metadatas)b::jsonb[])
                  WITH ORDINALITY AS t(uuid, role, role_type, content, metadata, ord)
), old AS (
    -- The request's messages already in the session (a retry), as this statement's snapshot
    -- sees them. One committed since makes the insert below fail on the uuid's unique key
    -- (the store then runs the statement again). A uuid held by another message (another
    -- role, role_type or content) makes the whole call change nothing. One soft-deleted
    -- since (ClearMemory, DeleteSession) is answered so, with its deleted_at.
    SELECT t.ord, (m.role, m.role_type, m.content) IS DISTINCT FROM
                  (t.role, t.role_type, t.content) AS differs,
           m.uuid, m.sequence, m.role, m.role_type, m.content, m.metadata, m.created_at,
           m.updated_at, m.deleted_at
    FROM t JOIN messages m ON m.project_id = %(project_id)s AND m.session_id = %(session_id)s
                          AND m.uuid = t.uuid
), new AS (
    SELECT t.*, row_number() OVER (ORDER BY t.ord) AS rank
    FROM t
    WHERE t.ord NOT IN (SELECT old.ord FROM old) AND NOT EXISTS (SELECT FROM old WHERE differs)
), n AS (
    SELECT count(*) AS n FROM new
), s AS (
    INSERT INTO sessions AS s (project_id, session_id, user_id, created_at, updated_at,
                               message_count, last_message_at, next_sequence)
    SELECT %(project_id)s, %(session_id)s, %(user_id)s::text, t.now, t.now, n.n, t.now,
           n.n + 1
    FROM n, (SELECT clock_timestamp() AS now) AS t
    {guard}
    {upsert}
), {count_session} m AS (
    INSERT INTO messages AS m (project_id, session_id, sequence, uuid, role, role_type,
                               content, metadata, created_at, updated_at)
    SELECT s.project_id, s.session_id, s.next_sequence - n.n + new.rank - 1, new.uuid,
           new.role, new.role_type, new.content,
           -- A message without metadata (the common case) skips the PL/pgSQL call.
           CASE WHEN new.metadata = '{{}}' THEN new.metadata
                ELSE memstore_merge_patch('{{}}', new.metadata) END,
           s.last_message_at,
           s.last_message_at
    FROM s, n, new
    RETURNING m.uuid, m.sequence, m.role, m.role_type, m.content, m.metadata, m.created_at,
              m.updated_at
), due AS (
    -- Where vectors are kept, the new messages wait for the embedding worker. Where recall
    -- is kept by words instead, only the call's last one does (LIMIT 1; NULL is no limit):
    -- the worker ranks the session, once per turn, whatever the number of its messages.
    INSERT INTO embedding_queue (project_id, session_id, sequence)
    SELECT %(project_id)s, %(session_id)s, m.sequence FROM m WHERE %(embed)s
    ORDER BY m.sequence DESC LIMIT CASE WHEN %(per_turn)s THEN 1 END
)
SELECT s.session_id, s.user_id, s.metadata, s.created_at, s.updated_at, s.deleted_at,
       s.message_count, s.last_message_at, s.inserted, r.*
FROM s LEFT JOIN (
    SELECT old.ord AS m_ord, old.differs AS m_differs, old.uuid AS m_uuid,
           old.sequence AS m_sequence, old.role AS m_role, old.role_type AS m_role_type,
           old.content AS m_content, old.metadata AS m_metadata,
           old.created_at AS m_created_at, old.updated_at AS m_updated_at,
           old.deleted_at AS m_deleted_at
    FROM old
    UNION ALL
    SELECT new.ord, false, m.uuid, m.sequence, m.role, m.role_type, m.content, m.metadata,
           m.created_at, m.updated_at, NULL
    FROM m JOIN new ON new.uuid = m.uuid
) r ON true
ORDER BY r.m_ord;

-- add_memory_upsert --
-- The session's side of add_memory and add_memory_session_citus, inserting n messages
-- (excluded.message_count) at the time excluded.updated_at: the session made, or appended to
-- under its row lock.
-- excluded.message_count is the number of messages appended: with none (a pure retry)
-- the session stays as it is, deleted or not.
ON CONFLICT (project_id, session_id) DO UPDATE SET
    next_sequence = s.next_sequence + excluded.message_count,
    message_count = CASE WHEN excluded.message_count = 0 THEN s.message_count
                         WHEN s.deleted_at IS NULL
                             THEN s.message_count + excluded.message_count
                         ELSE excluded.message_count END,
    deleted_at = CASE WHEN excluded.message_count = 0 THEN s.deleted_at END,
    -- The insert's time, raised under the row lock to the session's last one, so
    -- created_at never goes back as the sequence grows (excluded.updated_at is the
    -- statement's clock, read once: Citus allows no function here but an immutable
    -- one). updated_at is that time too, or just after the session's last change
    -- (memstore_touch, as update_user).
    last_message_at = CASE WHEN excluded.message_count = 0 THEN s.last_message_at
                           ELSE greatest(excluded.updated_at, s.last_message_at) END,
    updated_at = CASE WHEN excluded.message_count = 0 THEN s.updated_at
                      ELSE memstore_touch(greatest(excluded.updated_at, s.last_message_at),
                                          s.updated_at) END
WHERE (%(user_id)s::text IS NULL OR s.user_id IS NOT DISTINCT FROM %(user_id)s::text)
  AND (%(revive)s OR s.deleted_at IS NULL OR excluded.message_count = 0)
-- xmax is 0 in a row version this statement inserted (not in one it updated).
RETURNING s.project_id, s.session_id, s.user_id, s.metadata, s.created_at, s.updated_at,
          s.deleted_at, s.message_count, s.last_message_at, s.next_sequence,
          s.xmax = '0'::xid AS inserted

-- add_memory_guard --
-- add_memory's {guard} for a call that shares its batch's transaction and names a user: the
-- statement appends to a live session only and never makes one, so it never takes the lock
-- of the user's session count (user_session_counts) in the middle of the batch's session
-- locks, where two batches could wait on each other. Without a live session it answers no
-- row, and the store makes the session alone (store/add_memory.py).
WHERE EXISTS (SELECT FROM sessions x WHERE x.project_id = %(project_id)s
                                       AND x.session_id = %(session_id)s
                                       AND x.deleted_at IS NULL)

-- add_memory_count --
-- add_memory's {count_session} on plain PostgreSQL: the session it inserted, counted live for
-- its user in the same statement (as count_live_sessions). The user's row is locked first
-- (FOR KEY SHARE, what the session's foreign key check takes, but at the statement's end),
-- then the count's: the order of DeleteUser, which locks the user FOR UPDATE and deletes the
-- count by cascade. Count first, the two waited on each other (deadlock detected, 1 s, then
-- UNAVAILABLE: tests/reliability/test_races.py). A user deleted meanwhile counts nothing, and
-- the foreign key check then refuses the session.
counted AS (
    INSERT INTO user_session_counts AS c (project_id, user_id, session_count)
    SELECT s.project_id, s.user_id, 1 FROM s WHERE s.inserted AND s.user_id IS NOT NULL
      AND EXISTS (SELECT FROM users u WHERE u.project_id = s.project_id
                                        AND u.user_id = s.user_id FOR KEY SHARE)
    ON CONFLICT (project_id, user_id) DO UPDATE SET session_count = c.session_count + 1
),

-- add_memory_held_citus --
-- AddMemory on Citus, the first of its router statements (add_memory_citus in
-- store/append.py): Citus plans no INSERT in a CTE on one shard, and ran add_memory as ~8
-- subplans over intermediate results, each a round trip to the worker. The request's
-- messages already in the session, as add_memory's `old`.
SELECT t.ord, (m.role, m.role_type, m.content) IS DISTINCT FROM
              (t.role, t.role_type, t.content) AS differs,
       m.uuid, m.sequence, m.role, m.role_type, m.content, m.metadata, m.created_at,
       m.updated_at, m.deleted_at
FROM unnest(%(uuids)b::uuid[], %(roles)b::text[], %(role_types)b::text[],
            %(contents)b::text[]) WITH ORDINALITY AS t(uuid, role, role_type, content, ord)
JOIN messages m ON m.project_id = %(project_id)s AND m.session_id = %(session_id)s
               AND m.uuid = t.uuid;

-- add_memory_session_citus --
-- add_memory's session, for %(n)s new messages, as one row of VALUES (a router insert).
-- statement_timestamp() is the clock read once: add_memory's clock_timestamp() three times
-- would give a new session three times.
INSERT INTO sessions AS s (project_id, session_id, user_id, created_at, updated_at,
                           message_count, last_message_at, next_sequence)
VALUES (%(project_id)s, %(session_id)s, %(user_id)s::text, statement_timestamp(),
        statement_timestamp(), %(n)s, statement_timestamp(), %(n)s + 1)
{upsert};

-- add_memory_messages_citus --
-- add_memory's new messages, as rows of VALUES (add_memory_message_citus each): an INSERT
-- ... SELECT from unnest is pulled to the coordinator.
INSERT INTO messages AS m (project_id, session_id, sequence, uuid, role, role_type, content,
                           metadata, created_at, updated_at)
VALUES {rows}
RETURNING m.uuid, m.sequence, m.role, m.role_type, m.content, m.metadata, m.created_at,
          m.updated_at;

-- add_memory_message_citus --
-- One row of add_memory_messages_citus: {i} numbers its parameters.
(%(project_id)s, %(session_id)s, %(sequence_{i})s, %(uuid_{i})s::uuid, %(role_{i})s,
 %(role_type_{i})s, %(content_{i})s,
 CASE WHEN %(metadata_{i})s::jsonb = '{{}}' THEN %(metadata_{i})s::jsonb
      ELSE memstore_merge_patch('{{}}', %(metadata_{i})s::jsonb) END,
 %(at)s, %(at)s)

-- add_memory_queue_citus --
-- add_memory's due rows (the new messages waiting for the embedding worker), as rows of
-- VALUES (add_memory_due_citus each).
INSERT INTO embedding_queue (project_id, session_id, sequence) VALUES {rows};

-- add_memory_due_citus --
-- One row of add_memory_queue_citus.
(%(project_id)s, %(session_id)s, %(sequence_{i})s)

-- lock_session_for_revival --
-- AddMemory on a soft-deleted session: the session locked, and whether it is still deleted
-- (add_memory then revives it and the store counts it live again for its user). No row: the
-- session is gone (purged); add_memory then makes it anew.
SELECT s.user_id, s.deleted_at IS NOT NULL AS deleted FROM sessions s
WHERE s.project_id = %(project_id)s AND s.session_id = %(session_id)s
FOR UPDATE;
