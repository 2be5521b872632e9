-- requires extension: vector
-- 0007: message and session embeddings (pgvector). Applied only where the `vector`
-- extension is available; without it memstore serves full-text search alone, and this
-- migration applies at the first start after pgvector is installed.

CREATE EXTENSION IF NOT EXISTS vector;

-- One vector per embedded message, with the name of the model that made it: vectors of
-- different models cannot be compared, so search reads only the current model's.
-- No dimension on the column: a team's own model may have any; HNSW is not used (an exact
-- scan of one user's messages takes milliseconds; see docs/search.md).
CREATE TABLE message_embeddings (
    project_id bigint NOT NULL,
    session_id text NOT NULL,
    sequence bigint NOT NULL,
    model text NOT NULL,
    embedding vector NOT NULL,
    PRIMARY KEY (project_id, session_id, sequence),
    FOREIGN KEY (project_id, session_id, sequence)
        REFERENCES messages (project_id, session_id, sequence) ON DELETE CASCADE
);

-- What recall in GetMemory compares against: the mean of the embeddings of a session's most
-- recent live messages, kept by the embedding worker as they arrive, so GetMemory runs no
-- model. `through_sequence` is the newest message it covers.
CREATE TABLE session_embeddings (
    project_id bigint NOT NULL,
    session_id text NOT NULL,
    model text NOT NULL,
    embedding vector NOT NULL,
    through_sequence bigint NOT NULL,
    PRIMARY KEY (project_id, session_id),
    FOREIGN KEY (project_id, session_id) REFERENCES sessions ON DELETE CASCADE
);

-- Where this applies after messages were stored (pgvector installed later: it applies at the
-- first start after), they are queued, so the worker embeds them as it does new ones: they
-- were never embedded, and nothing said to run `memstore reindex` (an audit, 2026-12-03).
-- Without pgvector the queue held only each AddMemory's last message, for recall by words.
INSERT INTO embedding_queue (project_id, session_id, sequence)
SELECT m.project_id, m.session_id, m.sequence FROM messages m
WHERE m.deleted_at IS NULL
ON CONFLICT DO NOTHING;
