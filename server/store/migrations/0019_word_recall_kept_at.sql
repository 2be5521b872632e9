-- 0019: when a session's recall by words was kept (0012). Kept recall names other sessions'
-- messages by (session_id, sequence); a session the purge hard-deleted and a user made
-- again under the same id numbers its messages from 1 again, so a kept key could name a
-- message written after the recall was kept, unrelated to it, and GetMemory served it as
-- the top memory (an audit, 2026-12-03). A kept key is read only for a message made before
-- its recall was kept. NULL: kept before this migration (read as before).
ALTER TABLE session_word_recall ADD COLUMN recall_kept_at timestamptz;
