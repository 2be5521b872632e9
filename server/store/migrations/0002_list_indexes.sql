-- 0002: indexes for every list order and filter, and a cheap live-session count per user.
-- tests/store/test_indexes.py checks each with EXPLAIN.

-- ListSessions(user_id, order_by updated_at): 0001 served a user's sessions by created_at only.
CREATE INDEX sessions_user_updated_idx ON sessions (project_id, user_id, updated_at, session_id);

-- ListSessions(metadata_contains): jsonb @> through a GIN index (jsonb_path_ops: smaller and
-- faster than the default opclass, and @> is the only operator the filter uses).
CREATE INDEX sessions_metadata_idx ON sessions USING gin (metadata jsonb_path_ops);

-- session_count of every listed or exported user counts that user's live sessions; with this
-- index the count is an index-only scan instead of a heap visit per session.
CREATE INDEX sessions_user_live_idx ON sessions (project_id, user_id) WHERE deleted_at IS NULL;
