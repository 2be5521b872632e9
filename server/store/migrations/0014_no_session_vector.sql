-- requires extension: vector
-- 0014: a session's recall vector is no longer made. Recall ranks each memory by its distance
-- to the nearest vector of the session's last messages (recall_distance_window, c9d1c83),
-- which it reads from message_embeddings, not by their mean kept here; the worker stops
-- averaging them. The row stays: it holds the kept recall (0008) and the last message the
-- worker saw (through_sequence). The column is made nullable rather than dropped so that a
-- server from before this migration, still running while it applies, goes on working: it
-- writes a mean, and ranks by words alone a session whose vector a newer server left NULL.
ALTER TABLE session_embeddings ALTER COLUMN embedding DROP NOT NULL;
