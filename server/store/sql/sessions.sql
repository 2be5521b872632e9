-- Sessions. Soft-deleted sessions keep their rows (deleted_at set) until the purge.

-- create_session --
-- Inserts a session; no row back means the id is taken (see session_state).
INSERT INTO sessions AS s (project_id, session_id, user_id, metadata, created_at, updated_at)
-- VALUES, as create_user: one step on Citus.
VALUES (%(project_id)s, %(session_id)s, %(user_id)s, memstore_merge_patch('{}', %(metadata)s),
        statement_timestamp(), statement_timestamp())
ON CONFLICT (project_id, session_id) DO NOTHING
RETURNING s.session_id, s.user_id, s.metadata, s.created_at, s.updated_at, s.deleted_at,
          s.message_count, s.last_message_at;

-- lock_session_owner --
-- Under Citus, where sessions cannot reference users by foreign key: the user a session write
-- names must exist, and stays locked (FOR KEY SHARE, as the foreign key's check locks it)
-- until the write commits, so DeleteUser cannot remove it in between. No row: no such user.
SELECT u.user_id FROM users u
WHERE u.project_id = %(project_id)s AND u.user_id = %(user_id)s
FOR KEY SHARE;

-- own_new_session --
-- Under Citus, after a write made a session for a user (CreateSession, AddMemory's upsert):
-- checks and locks the user (FOR KEY SHARE, as lock_session_owner) and counts the session
-- live for them (as count_live_sessions), in one statement on the user's shard. No row: no
-- such user, and nothing counted (the caller rolls back).
INSERT INTO user_session_counts AS c (project_id, user_id, session_count)
SELECT u.project_id, u.user_id, 1 FROM users u
WHERE u.project_id = %(project_id)s AND u.user_id = %(user_id)s
FOR KEY SHARE
ON CONFLICT (project_id, user_id)
    DO UPDATE SET session_count = c.session_count + excluded.session_count
RETURNING c.user_id;

-- session_state --
-- Whether a session exists and whether it is soft-deleted (to word an error).
SELECT s.deleted_at IS NOT NULL AS deleted
FROM sessions s
WHERE s.project_id = %(project_id)s AND s.session_id = %(session_id)s;

-- get_session --
-- One session; soft-deleted ones only when show_deleted.
SELECT s.session_id, s.user_id, s.metadata, s.created_at, s.updated_at, s.deleted_at,
       s.message_count, s.last_message_at
FROM sessions s
WHERE s.project_id = %(project_id)s AND s.session_id = %(session_id)s
  AND (%(show_deleted)s OR s.deleted_at IS NULL);

-- update_session --
-- Merges (or replaces) the metadata of a live session under its row lock, in one statement,
-- writing only a result within the metadata limit (as update_user). No row: the session is
-- absent or soft-deleted; a row without session_id: the merged metadata would be too large.
WITH target AS (
    SELECT s.project_id, s.session_id, CASE
        WHEN %(replace_metadata)s THEN memstore_merge_patch('{}', %(patch)s::jsonb)
        ELSE memstore_merge_patch(s.metadata, %(patch)s::jsonb)
    END AS metadata
    FROM sessions s
    WHERE s.project_id = %(project_id)s AND s.session_id = %(session_id)s
      AND s.deleted_at IS NULL
    FOR UPDATE
), sized AS (
    SELECT t.*, octet_length(t.metadata::text) AS metadata_bytes FROM target t
), updated AS (
    -- The clock is read in FROM: Citus refuses a non-immutable function in SET. Always
    -- after the last change, and left as it is by an update that changes nothing (as
    -- update_user).
    UPDATE sessions AS s SET metadata = sized.metadata,
                             updated_at = CASE WHEN sized.metadata IS NOT DISTINCT FROM s.metadata
                                               THEN s.updated_at
                                               ELSE memstore_touch(t.now, s.updated_at) END
    FROM sized, (SELECT clock_timestamp() AS now) AS t
    -- Pinned by the parameters (sized holds that one session) so it stays on one shard.
    WHERE s.project_id = %(project_id)s AND s.session_id = %(session_id)s
      AND sized.metadata_bytes <= %(max_metadata_bytes)s
    RETURNING s.session_id, s.user_id, s.metadata, s.created_at, s.updated_at, s.deleted_at,
              s.message_count, s.last_message_at
)
SELECT sized.metadata_bytes, updated.* FROM sized LEFT JOIN updated ON true;

-- forget_recall_vectors --
-- The recall the worker kept for a session whose messages were all just soft-deleted
-- (ClearMemory, DeleteSession), with pgvector: it was picked by those messages, and served to
-- the session's next message until the worker ranked again. NULL: not computed (GetMemory
-- ranks on the request path).
UPDATE session_embeddings e
SET recall_sessions = NULL, recall_sequences = NULL, recall_scores = NULL,
    recall_kept_at = NULL
WHERE e.project_id = %(project_id)s AND e.session_id = %(session_id)s;

-- forget_recall_words --
-- forget_recall_vectors where recall is kept by words.
DELETE FROM session_word_recall w
WHERE w.project_id = %(project_id)s AND w.session_id = %(session_id)s;

-- lock_live_session_to_update --
-- lock_live_session for a write that changes no key (UpdateMessage, before its message): the
-- lock an UPDATE of the row takes (FOR NO KEY UPDATE), which waits for ClearMemory's and
-- DeleteSession's and lets the foreign key checks (FOR KEY SHARE) of the embedding worker's
-- writes go by: FOR UPDATE blocked them, and on Citus, where the worker writes a message's
-- vector (its key share of the message) before its session's recall (of the session), the
-- two could wait on each other.
SELECT s.session_id FROM sessions s
WHERE s.project_id = %(project_id)s AND s.session_id = %(session_id)s AND s.deleted_at IS NULL
FOR NO KEY UPDATE;

-- lock_live_session --
-- Locks a live session before its messages are soft-deleted (a session's row before its
-- messages', in every write). AddMemory appends only under
-- this row lock, so the next statement's snapshot holds every message committed before it
-- and no new one can come; in one statement, messages appended while it waited for the
-- lock would stay live in a deleted session (tests/reliability/test_races.py).
SELECT s.session_id FROM sessions s
WHERE s.project_id = %(project_id)s AND s.session_id = %(session_id)s AND s.deleted_at IS NULL
FOR UPDATE;

-- delete_session --
-- Soft-deletes a live session and its live messages at one time, the clock's; returns the
-- count, and the session's user (whose count of live sessions the store then lowers).
WITH gone AS (
    -- updated_at after the session's last change (as update_user), deleted_at the clock's:
    -- the touched time is later than the clock for an updated_at a backup restored in the
    -- future (year 9999), and such a deleted_at was never purged (an audit).
    UPDATE sessions AS s SET deleted_at = t.now,
                             updated_at = memstore_touch(t.now, s.updated_at), message_count = 0
    FROM (SELECT clock_timestamp() AS now) AS t
    WHERE s.project_id = %(project_id)s AND s.session_id = %(session_id)s
      AND s.deleted_at IS NULL
    RETURNING s.project_id, s.session_id, s.deleted_at, s.user_id
), hidden AS (
    UPDATE messages AS m SET deleted_at = gone.deleted_at
    FROM gone
    -- Pinned by the parameters (gone holds that one session) so it stays on one shard.
    WHERE m.project_id = %(project_id)s AND m.session_id = %(session_id)s
      AND m.deleted_at IS NULL
    RETURNING 1
)
SELECT (SELECT count(*) FROM hidden) AS messages, gone.user_id FROM gone;

-- undelete_session --
-- Restores a soft-deleted session (not its messages); no row means absent or live. The
-- UPDATE is a CTE, as in update_session: a top-level UPDATE reading the clock in FROM is
-- planned by Citus with a subplan (the clock's row made on the coordinator, sent to the
-- worker as an intermediate result, then the update); in a CTE it is sent whole.
WITH restored AS (
    UPDATE sessions AS s SET deleted_at = NULL,
                             updated_at = memstore_touch(t.now, s.updated_at)
    FROM (SELECT clock_timestamp() AS now) AS t
    WHERE s.project_id = %(project_id)s AND s.session_id = %(session_id)s
      AND s.deleted_at IS NOT NULL
    RETURNING s.session_id, s.user_id, s.metadata, s.created_at, s.updated_at, s.deleted_at,
              s.message_count, s.last_message_at
)
SELECT * FROM restored;

-- list_sessions --
-- One page of sessions; {filters}, {keyset}, {order} come from a fixed whitelist in Python.
-- {size} is nothing, or budget_list_size for list_sessions_budgeted.
SELECT s.session_id, s.user_id, s.metadata, s.created_at, s.updated_at, s.deleted_at,
       s.message_count, s.last_message_at {size}
FROM sessions s
WHERE s.project_id = %(project_id)s {filters} {keyset}
ORDER BY {order}
LIMIT %(limit)s OFFSET %(offset)s;

-- list_sessions_budgeted --
-- list_sessions ({rows}: its page in budget_rows) read only up to %(budget)s bytes of its
-- rows' metadata and ids, in the page's order ({order} over k); `followed` as there.
SELECT k.session_id, k.user_id, k.metadata, k.created_at, k.updated_at, k.deleted_at,
       k.message_count, k.last_message_at, k.followed
FROM ({rows}) AS k
ORDER BY {order};

-- count_sessions --
-- How many sessions match the filters of list_sessions, across all pages.
SELECT count(*) AS total FROM sessions s WHERE s.project_id = %(project_id)s {filters};

-- filter_user_id --
-- Filter fragment of list_sessions: sessions of one user.
AND s.user_id = %(user_id)s

-- filter_live --
-- Filter fragment of list_sessions: sessions that are not soft-deleted.
AND s.deleted_at IS NULL

-- filter_created_after --
-- Filter fragment of list_sessions: created at or after a time.
AND s.created_at >= %(created_after)s

-- filter_created_before --
-- Filter fragment of list_sessions: created before a time.
AND s.created_at < %(created_before)s

-- filter_updated_after --
-- Filter fragment of list_sessions: updated at or after a time.
AND s.updated_at >= %(updated_after)s

-- filter_updated_before --
-- Filter fragment of list_sessions: updated before a time.
AND s.updated_at < %(updated_before)s

-- filter_metadata_contains --
-- Filter fragment of list_sessions: metadata containing a JSON object (jsonb @>).
AND s.metadata @> %(metadata_contains)s

-- keyset_sessions --
-- Keyset fragment of list_sessions: rows strictly after the last key in the page order.
AND ({column}, s.session_id) {op} (%(after_ts)s::timestamptz, %(after_id)s::text)

-- order_sessions --
-- Order fragment of list_sessions: the order column, then session_id, one direction, over
-- the alias {alias} (s, or k over budget_rows).
{column} {direction}, {alias}.session_id {direction}

-- count_live_sessions --
-- Adds `delta` to the number of a user's live sessions (+1 a session made live, -1 one
-- soft-deleted), in the transaction of the session write that changed it, after it: the
-- session row is locked first, then this one (never the user row, which DeleteUser locks
-- FOR UPDATE before the user's sessions). Under Citus one shard, the user's.
INSERT INTO user_session_counts AS c (project_id, user_id, session_count)
VALUES (%(project_id)s, %(user_id)s, %(delta)s)
ON CONFLICT (project_id, user_id)
    DO UPDATE SET session_count = c.session_count + excluded.session_count;
