-- Users. Every statement is scoped by project_id. session_count, the number of the user's live
-- sessions, is read from user_session_counts (migration 0010), kept by every session write.

-- create_user --
-- Inserts a user; a taken id raises UniqueViolation (AlreadyExists).
INSERT INTO users AS u (project_id, user_id, email, first_name, last_name, metadata, created_at,
                        updated_at)
-- VALUES, not INSERT ... SELECT: Citus routes a VALUES row to its shard in one step (it would
-- run a SELECT on the coordinator first). statement_timestamp() is one time for both columns.
VALUES (%(project_id)s, %(user_id)s, %(email)s, %(first_name)s, %(last_name)s,
        memstore_merge_patch('{}', %(metadata)s), statement_timestamp(), statement_timestamp())
RETURNING u.user_id, u.email, u.first_name, u.last_name, u.metadata, u.created_at,
          u.updated_at, 0::bigint AS session_count;

-- get_users --
-- The users of several ids (concurrent GetUser calls coalesced into one statement), each with
-- the number of its live sessions; an id with no row is simply absent.
-- The parameters are behind scalar subqueries, so that a custom plan knows no more than the
-- generic one: seeing the array's length, a custom plan of fewer than ten ids (the generic
-- plan's guess), which is nearly every batch the coalescer sends, looked cheaper, and
-- PostgreSQL planned every call again: ~75 µs of its CPU per statement, 116 -> 42 µs for one
-- id on PostgreSQL 18 (docs/performance.md, "GetUser's statement planned once"). The plan
-- is the one a custom plan of ten ids gets: the users by their key, then each one's count.
-- Citus prunes shards by the ids it can see, and a subquery's would send every GetUser to
-- every shard: it runs get_users_citus, this statement with the parameters bare
-- (queries.citus_form). user_session_counts is placed with users there: one id reads one shard.
-- citus: unwrap parameters
SELECT u.user_id, u.email, u.first_name, u.last_name, u.metadata, u.created_at, u.updated_at,
       coalesce(c.session_count, 0) AS session_count
FROM users u
LEFT JOIN user_session_counts c ON c.project_id = u.project_id AND c.user_id = u.user_id
-- user_ids in binary format: the text form of an array costs psycopg a regex per element;
-- the outer cast makes `ANY` read one array value, not the rows of a subquery.
WHERE u.project_id = (SELECT %(project_id)s::int8)
  AND u.user_id = ANY ((SELECT %(user_ids)b::text[])::text[]);

-- update_user --
-- Sets the named fields and merges (or replaces) metadata, in one statement. `target` locks
-- the row, says each field's new value and merges into its latest committed metadata (FOR UPDATE re-reads a row that a
-- concurrent merge changed while it waited); the UPDATE writes only a result within the
-- metadata limit, so a merge that would outgrow it changes nothing: the answer's row then
-- has metadata_bytes and no user_id (the store raises InvalidArgument). No row: no user.
WITH target AS (
    SELECT u.project_id, u.user_id,
           CASE WHEN %(set_email)s THEN %(email)s::text ELSE u.email END AS email,
           CASE WHEN %(set_first_name)s THEN %(first_name)s::text ELSE u.first_name END
               AS first_name,
           CASE WHEN %(set_last_name)s THEN %(last_name)s::text ELSE u.last_name END
               AS last_name,
           CASE
               WHEN NOT %(set_metadata)s THEN u.metadata
               WHEN %(replace_metadata)s THEN memstore_merge_patch('{}', %(patch)s::jsonb)
               ELSE memstore_merge_patch(u.metadata, %(patch)s::jsonb)
           END AS metadata
    FROM users u
    WHERE u.project_id = %(project_id)s AND u.user_id = %(user_id)s
    FOR UPDATE
), sized AS (
    SELECT t.*, CASE WHEN %(set_metadata)s THEN octet_length(t.metadata::text) ELSE 0 END
               AS metadata_bytes
    FROM target t
), updated AS (
    UPDATE users AS u SET
        email = sized.email,
        first_name = sized.first_name,
        last_name = sized.last_name,
        metadata = sized.metadata,
        -- The clock is read in FROM: Citus refuses a non-immutable function in SET (and
        -- reads it on the coordinator, before the row lock). Always after the last change
        -- (memstore_touch, migration 0011), so updates of a row are ordered by updated_at;
        -- an update that changes nothing leaves it (the protos' promise: "returns the user
        -- as it is"). SET's own columns are the row's values before this update.
        updated_at = CASE
            WHEN (sized.email, sized.first_name, sized.last_name, sized.metadata)
                 IS NOT DISTINCT FROM (u.email, u.first_name, u.last_name, u.metadata)
            THEN u.updated_at
            ELSE memstore_touch(t.now, u.updated_at) END
    FROM sized, (SELECT clock_timestamp() AS now) AS t
    -- Pinned by the parameters (sized holds that one user) so it stays on one shard.
    WHERE u.project_id = %(project_id)s AND u.user_id = %(user_id)s
      AND sized.metadata_bytes <= %(max_metadata_bytes)s
    RETURNING u.user_id, u.email, u.first_name, u.last_name, u.metadata, u.created_at,
              u.updated_at
)
SELECT sized.metadata_bytes, updated.*,
       coalesce((SELECT c.session_count FROM user_session_counts c
                 WHERE c.project_id = %(project_id)s AND c.user_id = %(user_id)s), 0)
           AS session_count
FROM sized LEFT JOIN updated ON true;

-- lock_user --
-- Locks the user first: from then on no session can be created for it (the foreign key
-- check of a new session waits), so lock_user_sessions' fresh snapshot sees them all.
SELECT u.user_id FROM users u
WHERE u.project_id = %(project_id)s AND u.user_id = %(user_id)s
FOR UPDATE;

-- lock_user_sessions --
-- Locks all the sessions of a locked user, so that no message lands in them before
-- delete_user counts and removes them (its counts are then exact).
SELECT count(*) AS sessions FROM (
    SELECT 1 FROM sessions s
    WHERE s.project_id = %(project_id)s AND s.user_id = %(user_id)s
    -- In key order, as the embedding worker, Restore and AddMemory's shared commits lock
    -- sessions: no lock cycle. By code points (COLLATE "C"), as Python sorts the batches'
    -- ids, whatever the database's collation (tests/store/test_lock_order.py).
    ORDER BY s.session_id COLLATE "C"
    FOR UPDATE
) AS locked;

-- lock_user_sessions_citus --
-- lock_user_sessions under Citus, which runs no multi-shard SELECT ... FOR UPDATE: the same
-- sessions locked by a write that changes nothing. AddMemory's upsert and every other write
-- of a session wait for that row lock, so delete_user's counts stay exact. `live` counts the
-- live ones (as they are after any write this one waited for), for the store to compare with
-- user_live_sessions: a session whose two-phase commit reached the user's shard but not yet
-- its own is counted there and not found here.
WITH locked AS (
    UPDATE sessions s SET message_count = s.message_count
    WHERE s.project_id = %(project_id)s AND s.user_id = %(user_id)s
    RETURNING s.deleted_at IS NULL AS live
)
SELECT count(*) AS sessions, count(*) FILTER (WHERE live) AS live FROM locked;

-- user_live_sessions --
-- Under Citus, DeleteUser's count of the locked user's live sessions, on the user's shard: no
-- session write can change it while the user is locked but one already committed there, whose
-- session may still be committing on its own shard. No row: none.
SELECT c.session_count FROM user_session_counts c
WHERE c.project_id = %(project_id)s AND c.user_id = %(user_id)s;

-- delete_user --
-- Hard-deletes the user and its sessions (their foreign keys cascade to the messages and
-- vectors; the user's to its user_session_counts row). The sessions are deleted by name, not
-- by the users foreign key's cascade: under Citus that key cannot exist (users and sessions
-- are placed by different columns).
WITH doomed AS MATERIALIZED (
    SELECT s.session_id FROM sessions s
    WHERE s.project_id = %(project_id)s AND s.user_id = %(user_id)s
), gone_messages AS (
    -- Deleted by name before their sessions (rather than by the cascade), and counted here.
    DELETE FROM messages m
    WHERE m.project_id = %(project_id)s AND m.session_id IN (SELECT session_id FROM doomed)
    RETURNING 1
), gone_sessions AS (
    DELETE FROM sessions s
    WHERE s.project_id = %(project_id)s AND s.session_id IN (SELECT session_id FROM doomed)
    RETURNING 1
), gone AS (
    DELETE FROM users u
    WHERE u.project_id = %(project_id)s AND u.user_id = %(user_id)s
    RETURNING u.user_id
)
SELECT (SELECT count(*) FROM gone) AS users,
       (SELECT count(*) FROM gone_sessions) AS sessions,
       (SELECT count(*) FROM gone_messages) AS messages;

-- list_users --
-- One keyset page of users by (created_at, user_id), strictly after the given key.
-- session_count comes from `counts`, the page's rows of user_session_counts (placed with the
-- users under Citus). The page's ids as an array: on plain PostgreSQL one index probe per id
-- (an IN-join was measured ~40% slower per 1,000-user page).
WITH page AS MATERIALIZED (
    SELECT u.user_id, u.email, u.first_name, u.last_name, u.metadata, u.created_at,
           u.updated_at
    FROM users u
    WHERE u.project_id = %(project_id)s
      AND (u.created_at, u.user_id) > (%(after_ts)s::timestamptz, %(after_id)s::text)
    ORDER BY u.created_at, u.user_id
    LIMIT %(limit)s
), counts AS MATERIALIZED (
    SELECT c.user_id, c.session_count AS n FROM user_session_counts c
    WHERE c.project_id = %(project_id)s AND c.user_id = ANY(ARRAY(SELECT user_id FROM page))
)
SELECT p.*, coalesce(c.n, 0) AS session_count
FROM page p LEFT JOIN counts c ON c.user_id = p.user_id
ORDER BY p.created_at, p.user_id;

-- list_user_sessions --
-- The user (always one row when it exists) joined to one keyset page of its live sessions:
-- {page}, list_user_sessions_page, or (budgeted) the same in budget_rows read only up to
-- %(budget)s bytes of its rows' metadata and ids; {followed} then (`, s.followed`) says
-- so on its last row.
SELECT u.user_id AS owner, s.session_id, s.user_id, s.metadata, s.created_at, s.updated_at,
       s.deleted_at, s.message_count, s.last_message_at {followed}
FROM users u
LEFT JOIN ({page}) s ON true
WHERE u.project_id = %(project_id)s AND u.user_id = %(user_id)s
ORDER BY s.created_at, s.session_id;

-- list_user_sessions_page --
-- list_user_sessions' page, pinned by the parameters, not by u (under Citus a user's
-- sessions span shards); {size} is nothing, or budget_list_size when budgeted.
SELECT s.* {size} FROM sessions s
WHERE s.project_id = %(project_id)s AND s.user_id = %(user_id)s AND s.deleted_at IS NULL
  AND (s.created_at, s.session_id) > (%(after_ts)s::timestamptz, %(after_id)s::text)
ORDER BY s.created_at, s.session_id
LIMIT %(limit)s

-- list_user_records --
-- list_users as plain records for the hot list paths: metadata as JSON text, times as integer
-- microseconds since the epoch (exact: extract() is numeric), so no Python decodes them.
-- The offset is 0 but for ListUsers' page_number, which pages by OFFSET from the start.
-- session_count as in list_users. {page} is list_user_records_page, or (budgeted) the same
-- in budget_rows read only up to %(budget)s bytes of its rows' metadata and ids; then
-- {followed} (`, p.followed`) ends each row, as budget_rows says it; {order} is order_users
-- over p.
WITH page AS MATERIALIZED ({page}), counts AS MATERIALIZED (
    SELECT c.user_id, c.session_count AS n FROM user_session_counts c
    WHERE c.project_id = %(project_id)s AND c.user_id = ANY(ARRAY(SELECT user_id FROM page))
)
SELECT p.user_id, p.email, p.first_name, p.last_name, p.metadata::text,
       (extract(epoch FROM p.created_at) * 1000000)::int8,
       (extract(epoch FROM p.updated_at) * 1000000)::int8,
       coalesce(c.n, 0) {followed}
FROM page p LEFT JOIN counts c ON c.user_id = p.user_id
ORDER BY {order};

-- list_user_records_page --
-- list_user_records' page of users; {size} is nothing, or budget_list_size when budgeted;
-- {order} is order_users over u. The keyset is a start in the oldest-first order only (the
-- newest-first order pages by offset alone, from START).
SELECT u.user_id, u.email, u.first_name, u.last_name, u.metadata, u.created_at,
       u.updated_at {size}
FROM users u
WHERE u.project_id = %(project_id)s
  AND (u.created_at, u.user_id) > (%(after_ts)s::timestamptz, %(after_id)s::text)
ORDER BY {order}
LIMIT %(limit)s OFFSET %(offset)s

-- order_users --
-- Order fragment of list_user_records: created_at, then user_id, over the alias {alias};
-- {direction} ASC (oldest first), or DESC (Zep's users-ordered: newest first).
{alias}.created_at {direction}, {alias}.user_id {direction}

-- count_users --
-- total_size of ListUsers: how many users the project has.
SELECT count(*) AS total FROM users u WHERE u.project_id = %(project_id)s;
