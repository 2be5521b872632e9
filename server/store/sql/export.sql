-- Bulk export: keyset batches in index order (sessions_created_idx, the messages primary key).

-- export_sessions --
-- One keyset batch of live sessions (every session with include_deleted, for a backup) by
-- (created_at, session_id), strictly after the given key.
SELECT s.session_id, s.user_id, s.metadata, s.created_at, s.updated_at, s.deleted_at,
       s.message_count, s.last_message_at,
       CASE WHEN %(include_deleted)s THEN s.next_sequence END AS next_sequence
FROM sessions s
WHERE s.project_id = %(project_id)s AND (%(include_deleted)s OR s.deleted_at IS NULL)
  AND (s.created_at, s.session_id) > (%(after_ts)s::timestamptz, %(after_id)s::text)
ORDER BY s.created_at, s.session_id
LIMIT %(limit)s;

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
ORDER BY m.session_id, m.sequence
LIMIT %(limit)s;
