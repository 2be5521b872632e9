-- requires extension: vector
-- 0020: 0019 for the recall the embedding worker keeps with pgvector (0008).
ALTER TABLE session_embeddings ADD COLUMN recall_kept_at timestamptz;
