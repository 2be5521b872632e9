-- Messages (memory) read, their metadata edited and hidden; appended by append.sql's statements.

-- get_memory --
-- A live session joined to its last `lastn` live messages, oldest first. {window} is
-- memory_window, or memory_window_sized read up to a budget, over the parameters (Citus routes to one shard only
-- what they pin, not s); m_followed says the budget left older ones out.
SELECT s.session_id, s.user_id, s.metadata, s.created_at, s.updated_at, s.deleted_at,
       s.message_count, s.last_message_at,
       m.uuid AS m_uuid, m.sequence AS m_sequence, m.role AS m_role,
       m.role_type AS m_role_type, m.content AS m_content, m.metadata AS m_metadata,
       m.created_at AS m_created_at, m.updated_at AS m_updated_at, m.followed AS m_followed
FROM sessions s
LEFT JOIN LATERAL ({window}) m ON true
WHERE s.project_id = %(project_id)s AND s.session_id = %(session_id)s AND s.deleted_at IS NULL
ORDER BY m.sequence;

-- memory_window_scan --
-- GetMemory's window (get_memory, get_memories_recall): a session's last {lastn} live
-- messages, newest first. {project_id}, {session_id} and {lastn} (and the budget of
-- memory_window_sized's running sum) are the call's: parameters in get_memory, its row q and session s in
-- get_memories_recall.
FROM messages m
WHERE m.project_id = {project_id} AND m.session_id = {session_id} AND m.deleted_at IS NULL
ORDER BY m.sequence DESC
LIMIT {lastn}

-- memory_window --
-- The window whole: for a lastn whose messages cannot pass the answer (at most 1 MiB each).
SELECT m.*, false AS followed {scan}

-- memory_window_sized --
-- The window with each message's bytes, for memory_window_budgeted (budget_rows over it, newest
-- first, up to the call's budget; followed on the oldest row: an older message of the lastn was
-- left out): its content, sized from the value's header (GetMemory's lastn 1000 of messages of
-- 1 MiB is refused, and was read whole, 1 GB, to be), and its metadata as PostgreSQL prints it
-- (lastn 1000 of messages of 60 KB of metadata, which compressed is a few hundred bytes on
-- disk, was read whole, 60 MB, when content alone counted).
SELECT m.*, octet_length(m.content) + octet_length(m.metadata::text) AS size {scan}

-- list_messages --
-- A live session joined to one page of its live messages by sequence: a keyset page, or
-- (ListMessages' page_number) an OFFSET page from the start. message_count, the number of
-- live messages kept under the session's row lock, is the listing's total_size.
-- {page} is list_messages_sized read by budget_rows in sequence order: the page ends early by
-- bytes, a message is in it only while the messages before it hold fewer than %(budget)s
-- bytes (the first always is), so a page of messages of 1 MiB is read up to what one answer
-- may hold, not `limit` of them (1 GB for 1,000). m_followed: a message of the page follows
-- this one, so on the last row returned it says the page was ended early.
SELECT s.session_id, s.message_count,
       m.uuid AS m_uuid, m.sequence AS m_sequence, m.role AS m_role,
       m.role_type AS m_role_type, m.content AS m_content, m.metadata AS m_metadata,
       m.created_at AS m_created_at, m.updated_at AS m_updated_at, m.followed AS m_followed
FROM sessions s
LEFT JOIN LATERAL ({page}) m ON true
WHERE s.project_id = %(project_id)s AND s.session_id = %(session_id)s AND s.deleted_at IS NULL
ORDER BY m.sequence;

-- list_messages_sized --
-- One page of a session's live messages with each message's bytes, for list_messages: its
-- content, sized from the value's header, and its metadata as PostgreSQL prints it (its
-- stored size, compressed, counted 60 KB of repeated text as a few hundred bytes, so a page
-- of 1,000 such messages was read whole, 60 MB, to be refused past 17 MiB). Pinned by the
-- parameters, as in get_memory.
SELECT m.*, octet_length(m.content) + octet_length(m.metadata::text) AS size
FROM messages m
WHERE m.project_id = %(project_id)s AND m.session_id = %(session_id)s
  AND m.deleted_at IS NULL AND m.sequence > %(after_sequence)s
ORDER BY m.sequence
LIMIT %(limit)s OFFSET %(offset)s

-- get_message --
-- One live message of a live session, by uuid.
SELECT m.uuid, m.session_id, m.sequence, m.role, m.role_type, m.content, m.metadata,
       m.created_at, m.updated_at
FROM messages m
JOIN sessions s ON s.project_id = m.project_id AND s.session_id = m.session_id
WHERE m.project_id = %(project_id)s AND m.session_id = %(session_id)s AND m.uuid = %(uuid)s
  AND m.deleted_at IS NULL AND s.deleted_at IS NULL;

-- update_message --
-- Merges (or replaces) one live message's metadata and bumps its session's updated_at, in
-- one statement, writing only a result within the metadata limit (as update_user). No row:
-- no such live message in a live session; a row without uuid: the result would be too large.
WITH target AS (
    SELECT m.project_id, m.session_id, m.uuid, CASE
        WHEN %(replace_metadata)s THEN memstore_merge_patch('{}', %(patch)s::jsonb)
        ELSE memstore_merge_patch(m.metadata, %(patch)s::jsonb)
    END AS metadata, m.metadata AS stored
    FROM messages m
    JOIN sessions s ON s.project_id = m.project_id AND s.session_id = m.session_id
    WHERE m.project_id = %(project_id)s AND m.session_id = %(session_id)s AND m.uuid = %(uuid)s
      AND m.deleted_at IS NULL AND s.deleted_at IS NULL
    -- The lock its UPDATE takes, no more: FOR UPDATE also blocked the foreign key checks
    -- (FOR KEY SHARE) of the embedding worker's writes of the message's vector.
    FOR NO KEY UPDATE OF m
), sized AS (
    SELECT t.*, octet_length(t.metadata::text) AS metadata_bytes FROM target t
), m AS (
    -- The clock is read in FROM: Citus refuses a non-immutable function in SET. Always
    -- after the message's last change; an update that changes nothing leaves the message's
    -- and its session's as they are (as update_user).
    UPDATE messages AS m SET metadata = sized.metadata,
                             updated_at = CASE WHEN sized.metadata IS NOT DISTINCT FROM m.metadata
                                               THEN m.updated_at
                                               ELSE memstore_touch(t.now, m.updated_at) END
    FROM sized, (SELECT clock_timestamp() AS now) AS t
    -- Pinned by the parameters (sized holds that one message) so it stays on one shard.
    WHERE m.project_id = %(project_id)s AND m.session_id = %(session_id)s
      AND m.uuid = sized.uuid AND sized.metadata_bytes <= %(max_metadata_bytes)s
    RETURNING m.uuid, m.session_id, m.sequence, m.role, m.role_type, m.content, m.metadata,
              m.created_at, m.updated_at
), touched AS (
    UPDATE sessions AS s SET updated_at = memstore_touch(m.updated_at, s.updated_at)
    FROM m, sized
    WHERE s.project_id = %(project_id)s AND s.session_id = %(session_id)s
      AND sized.metadata IS DISTINCT FROM sized.stored
    RETURNING 1
)
SELECT sized.metadata_bytes, m.*, (SELECT count(*) FROM touched) AS touched
FROM sized LEFT JOIN m ON true;

-- clear_memory --
-- Soft-deletes every live message of a live session; the session stays, message_count 0.
-- The messages' deleted_at is the clock's, not the session's touched updated_at: that is
-- later than the clock after a backup restored it in the future, and was never purged.
WITH s AS (
    UPDATE sessions AS s SET message_count = 0, updated_at = memstore_touch(t.now, s.updated_at)
    FROM (SELECT clock_timestamp() AS now) AS t
    WHERE s.project_id = %(project_id)s AND s.session_id = %(session_id)s
      AND s.deleted_at IS NULL
    RETURNING s.project_id, s.session_id, s.updated_at, t.now
), hidden AS (
    UPDATE messages AS m SET deleted_at = s.now
    FROM s
    -- Pinned by the parameters (s holds that one session) so it stays on one shard.
    WHERE m.project_id = %(project_id)s AND m.session_id = %(session_id)s
      AND m.deleted_at IS NULL
    RETURNING 1
)
SELECT (SELECT count(*) FROM hidden) AS messages FROM s;
