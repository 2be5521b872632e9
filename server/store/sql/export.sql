-- Bulk export: keyset batches in index order (sessions_created_idx, the messages primary key).

-- export_sessions --
-- One keyset batch of live sessions (every session with include_deleted, for a backup) by
-- (created_at, session_id), strictly after the given key ({rows}: export_sessions_sized in
-- budget_rows, sql/budget.sql), ending early by bytes: a session is in it only while the
-- sessions before it hold fewer than %(budget)s bytes of metadata and ids as printed (the
-- first always is). Sized by the rows measured so far alone, a batch of 1,000 sessions of
-- 60 KB of metadata after small ones was read whole (docs/reliability.md, "ExportSessions
-- read 1,000 sessions at a time").
SELECT k.session_id, k.user_id, k.metadata, k.created_at, k.updated_at, k.deleted_at,
       k.message_count, k.last_message_at, k.next_sequence, k.followed
FROM ({rows}) AS k
ORDER BY k.created_at, k.session_id;

-- export_sessions_sized --
-- export_sessions' rows, with their size as budget_list_size counts it ({size}).
SELECT s.session_id, s.user_id, s.metadata, s.created_at, s.updated_at, s.deleted_at,
       s.message_count, s.last_message_at,
       CASE WHEN %(include_deleted)s THEN s.next_sequence END AS next_sequence {size}
FROM sessions s
WHERE s.project_id = %(project_id)s AND (%(include_deleted)s OR s.deleted_at IS NULL)
  AND (s.created_at, s.session_id) > (%(after_ts)s::timestamptz, %(after_id)s::text)
ORDER BY s.created_at, s.session_id
LIMIT %(limit)s

-- export_messages --
-- One keyset batch of live messages of live sessions (every message with include_deleted, for
-- a backup) by (session_id, sequence), after the key.
SELECT m.uuid, m.session_id, m.sequence, m.role, m.role_type, m.content, m.metadata,
       m.created_at, m.updated_at, m.deleted_at
FROM messages m
JOIN sessions s ON s.project_id = m.project_id AND s.session_id = m.session_id
WHERE m.project_id = %(project_id)s
  AND (%(include_deleted)s OR (m.deleted_at IS NULL AND s.deleted_at IS NULL))
  AND (m.session_id, m.sequence) > (%(after_session)s::text, %(after_sequence)s::bigint)
  -- Implied by the join and the key, and said so the sessions' side of the join starts at
  -- the key too: without it a merge join walks the sessions from the first one on every
  -- batch, so each batch costs more the deeper the export is (docs/performance.md).
  AND s.session_id >= %(after_session)s::text
ORDER BY m.session_id, m.sequence
LIMIT %(limit)s;

-- list_user_chunk --
-- The next at most %(limit)s users after the key as one ListUsersChunkedResponse's `users`
-- entries in protobuf wire bytes (tag 1, length, the User), concatenated in key order, with
-- how many they are and the last one's key: one row, no value per user for the client to
-- load. Each entry is users.wire (fields 1-7, kept by migration 0040's trigger) and
-- session_count (field 8, omitted when 0, as proto3 does; read from user_session_counts as
-- list_user_records reads it). The counts come from one index scan for the whole batch (`= ANY`
-- of the batch's ids), not one subquery per user: each per-row plan node costs PostgreSQL about a microsecond per
-- user here (docs/performance.md, "Export as bytes"). When the entries pass a chunk's byte
-- cap, the caller cuts them by list_user_wire.
-- The counts reach the page's rows as one jsonb object (user id -> field 8's bytes, in hex),
-- looked up in the page's own scan, not joined: a join's output is in no order PostgreSQL
-- knows, so string_agg's ORDER BY sorted the page's entries, and the page as a subquery with
-- ORDER BY and LIMIT right under the aggregate is its input already in that order (a
-- presorted aggregate, PostgreSQL 16 on). The entries' bytes are the same; PostgreSQL's CPU per
-- user was 1.84 -> 0.97 µs over users without sessions, 3.58 -> 3.07 over users with
-- (docs/performance.md, "The page's entries not sorted again").
-- Every parameter is behind a scalar subquery, so that a custom plan knows no more than the
-- generic one: seeing the limit and the key, a custom plan estimated a page of `limit` rows
-- where the generic one estimates a tenth of the table, so PostgreSQL found the generic plan
-- dearer and planned every chunk again, ~0.3 ms of its CPU per chunk of 1,000 users, a fifth
-- of the statement (docs/performance.md, "A chunk's statement planned once"). The plan is the
-- same either way: both scans by users_created_idx, the counts by their key.
-- Citus refuses a subquery in the LIMIT of a multi-shard query (it pushes this LIMIT down to
-- every shard's query): it runs list_user_chunk_citus, this statement with the parameters
-- bare (queries.citus_form).
-- citus: unwrap parameters
WITH keys AS MATERIALIZED (
    SELECT array_agg(k.user_id ORDER BY k.created_at, k.user_id) AS ids,
           max(k.created_at) AS last_created
    FROM (SELECT u.created_at, u.user_id FROM users u
          WHERE u.project_id = (SELECT %(project_id)s::int8)
            AND (u.created_at, u.user_id)
                > ((SELECT %(after_ts)s::timestamptz), (SELECT %(after_id)s::text))
          ORDER BY u.created_at, u.user_id
          LIMIT (SELECT %(limit)s::int8)) k
), counts AS MATERIALIZED (
    SELECT jsonb_object_agg(c.user_id, encode('\x40'::bytea || memstore_pb_varint(c.session_count),
                                              'hex')) AS fields
    FROM user_session_counts c
    WHERE c.project_id = (SELECT %(project_id)s::int8)
      AND c.user_id = ANY ((SELECT ids FROM keys)::text[])
      AND c.session_count > 0
)
SELECT coalesce(string_agg('\x0a'::bytea || memstore_pb_varint(length(b.body)) || b.body,
                           ''::bytea ORDER BY b.created_at, b.user_id), ''::bytea),
       count(*), (SELECT last_created FROM keys), (SELECT ids[cardinality(ids)] FROM keys)
-- body is a column of a subquery with a LIMIT, so it is computed once per user, not once per
-- use in the inlined varint.
FROM (SELECT u.created_at, u.user_id,
             u.wire || coalesce(decode((SELECT fields FROM counts) ->> u.user_id, 'hex'),
                                ''::bytea) AS body
      FROM users u
      WHERE u.project_id = (SELECT %(project_id)s::int8)
        AND (u.created_at, u.user_id)
            > ((SELECT %(after_ts)s::timestamptz), (SELECT %(after_id)s::text))
      ORDER BY u.created_at, u.user_id
      LIMIT (SELECT %(limit)s::int8)) b;

-- list_user_wire --
-- One keyset batch of users as ListUsersChunkedResponse `users` entries in protobuf wire bytes
-- (tag 1, length, the User), concatenated in key order, with each entry's size and key so
-- the caller can cut chunks between entries (list_user_chunk's rows when they pass the byte
-- cap). Each entry is users.wire (fields 1-7, kept by
-- migration 0040's trigger) and session_count (field 8, omitted when 0, as proto3 does;
-- read as list_user_records reads it). One row; its arrays are empty when no user follows.
-- Each stage is MATERIALIZED: the inlined encoders name their argument several times, and
-- an argument that is a column of the stage before is read, not computed again.
-- Every parameter is behind a scalar subquery, as in list_user_chunk and for its reason: a
-- custom plan that saw the limit looked cheaper than the generic one, and every batch was
-- planned again: 0.25-0.45 ms of PostgreSQL's CPU per batch of 1,000 users (3,477 -> 3,017
-- µs on PostgreSQL 18, 4,691 -> 4,439 on 15; docs/performance.md, "GetUser's statement
-- planned once"). Citus runs list_user_wire_citus, the parameters bare, as for
-- list_user_chunk.
-- citus: unwrap parameters
WITH page AS MATERIALIZED (
    SELECT u.user_id, u.created_at, u.wire
    FROM users u
    WHERE u.project_id = (SELECT %(project_id)s::int8)
      AND (u.created_at, u.user_id)
          > ((SELECT %(after_ts)s::timestamptz), (SELECT %(after_id)s::text))
    ORDER BY u.created_at, u.user_id
    LIMIT (SELECT %(limit)s::int8)
), counts AS MATERIALIZED (
    SELECT c.user_id, c.session_count AS n FROM user_session_counts c
    WHERE c.project_id = (SELECT %(project_id)s::int8)
      AND c.user_id IN (SELECT user_id FROM page)
), bodies AS MATERIALIZED (
    SELECT p.created_at, p.user_id,
           CASE WHEN c.n > 0 THEN p.wire || '\x40'::bytea || memstore_pb_varint(c.n)
                ELSE p.wire END AS body
    FROM page p LEFT JOIN counts c ON c.user_id = p.user_id
), entries AS MATERIALIZED (
    SELECT created_at, user_id, '\x0a'::bytea || memstore_pb_varint(length(body)) || body AS entry
    FROM bodies
)
SELECT coalesce(string_agg(entry, ''::bytea ORDER BY created_at, user_id), ''::bytea),
       coalesce(array_agg(length(entry) ORDER BY created_at, user_id), '{}'),
       coalesce(array_agg(created_at ORDER BY created_at, user_id), '{}'),
       coalesce(array_agg(user_id ORDER BY created_at, user_id), '{}')
FROM entries;

-- export_message_columns --
-- export_messages' batch (the same rows, in the same order) as one row of a few values, for
-- ExportMessages to encode with array arithmetic and no Python per message
-- (server/api/message_wire.py, docs/performance.md): per message four int4 lengths, 41 bytes
-- of fixed-width values (sequence, uuid, created_at, updated_at, role_type's first byte), and
-- the texts as UTF-8 concatenated in key order; deleted_at as the set values and a byte each
-- saying which are set. All NULL but the count when no message follows.
-- The batch ends early by bytes: a message is in it only while the messages before it hold
-- fewer than %(budget)s bytes of content and metadata (the first always is), so a batch of
-- messages of 1 MiB is a few of them, not `limit` (without it, one ExportMessages over
-- messages of 1 MiB took the server's RSS from 90 MB to 3.87 GB: docs/reliability.md). Sizes
-- are read from the stored values' headers (octet_length, pg_column_size), so the messages
-- left out are never detoasted, but for a compressed metadata, whose stored size says
-- nothing of its printed one (60 KB of one repeated letter is stored in a few hundred bytes:
-- 4,000 of them made one batch of 256 MB), which is printed to be counted: at most 64 KiB
-- each, where every message's content could be 1 MiB. `cut` says whether messages of the
-- page were left out: every message kept then has a follower.
SELECT count(*), bool_and(p.followed) AS cut,
       string_agg(int4send(length(p.sid)) || int4send(length(p.role))
                  || int4send(length(p.content)) || int4send(length(p.meta)),
                  ''::bytea ORDER BY p.session_id, p.sequence),
       string_agg(int8send(p.sequence) || uuid_send(p.uuid) || timestamptz_send(p.created_at)
                  || timestamptz_send(p.updated_at) || p.kind,
                  ''::bytea ORDER BY p.session_id, p.sequence),
       string_agg(p.sid, ''::bytea ORDER BY p.session_id, p.sequence),
       string_agg(p.role, ''::bytea ORDER BY p.session_id, p.sequence),
       string_agg(p.content, ''::bytea ORDER BY p.session_id, p.sequence),
       string_agg(p.meta, ''::bytea ORDER BY p.session_id, p.sequence),
       string_agg(timestamptz_send(p.deleted_at), ''::bytea ORDER BY p.session_id, p.sequence),
       string_agg(CASE WHEN p.deleted_at IS NULL THEN '\x00'::bytea ELSE '\x01'::bytea END,
                  ''::bytea ORDER BY p.session_id, p.sequence)
FROM (SELECT w.session_id, convert_to(w.session_id, 'UTF8') AS sid, w.sequence, w.uuid,
             convert_to(w.role, 'UTF8') AS role, convert_to(left(w.role_type, 1), 'UTF8') AS kind,
             convert_to(w.content, 'UTF8') AS content,
             convert_to(w.metadata::text, 'UTF8') AS meta,
             w.created_at, w.updated_at, w.deleted_at, w.followed
      FROM (SELECT k.*, sum(k.size) OVER w - k.size AS before, lead(true, 1, false) OVER w AS followed
            FROM (SELECT m.session_id, m.sequence, m.uuid, m.role, m.role_type, m.content,
                         m.metadata, m.created_at, m.updated_at, m.deleted_at,
                         octet_length(m.content)
                         + CASE WHEN pg_column_compression(m.metadata) IS NULL
                                THEN pg_column_size(m.metadata)
                                ELSE octet_length(m.metadata::text) END AS size
                  FROM messages m
                  JOIN sessions s ON s.project_id = m.project_id AND s.session_id = m.session_id
                  WHERE m.project_id = %(project_id)s
                    AND (%(include_deleted)s OR (m.deleted_at IS NULL AND s.deleted_at IS NULL))
                    AND (m.session_id, m.sequence)
                        > (%(after_session)s::text, %(after_sequence)s::bigint)
                    AND s.session_id >= %(after_session)s::text
                  ORDER BY m.session_id, m.sequence
                  LIMIT %(limit)s) k
            WINDOW w AS (ORDER BY k.session_id, k.sequence ROWS UNBOUNDED PRECEDING)) w
      WHERE w.before < %(budget)s::int8
      -- Said again, though the window's rows come in this order: without it the aggregates
      -- each sort their input (1.7 -> 2.8 ms a batch of 1,000 on PostgreSQL 18; with it 2.5).
      ORDER BY w.session_id, w.sequence) p;
