-- 0006: full-text search over messages and the queue of messages due for an embedding.
-- The vectors themselves need pgvector: 0007 creates them where the extension can be had.

-- What full-text search matches: the speaker (role, often a person's name, weighted A so a
-- question naming someone ranks their messages first) and the content. to_tsvector fails
-- on text whose tsvector passes 1 MiB, and content may be 1 MiB: only the first 100,000
-- characters are indexed, so no valid message is ever refused for its length.
ALTER TABLE messages ADD COLUMN search tsvector GENERATED ALWAYS AS (
    setweight(to_tsvector('english'::regconfig, role), 'A')
    || to_tsvector('english'::regconfig, left(content, 100000))
) STORED;
CREATE INDEX messages_search_idx ON messages USING gin (search);

-- Messages whose embedding is due. AddMemory inserts here in its own statement (when
-- vectors are kept); embedding workers claim rows with FOR UPDATE SKIP LOCKED and delete
-- them in the transaction that writes the vectors, so a worker that dies mid-batch leaves
-- its rows to be claimed again.
CREATE TABLE embedding_queue (
    project_id bigint NOT NULL,
    session_id text NOT NULL,
    sequence bigint NOT NULL,
    enqueued_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (project_id, session_id, sequence),
    FOREIGN KEY (project_id, session_id, sequence)
        REFERENCES messages (project_id, session_id, sequence) ON DELETE CASCADE
);
-- Oldest first, so the lag of every message is bounded.
CREATE INDEX embedding_queue_enqueued_idx ON embedding_queue (enqueued_at);

-- A tsquery matching any word of a text (plainto_tsquery would need every word): a question
-- shares only some words with the message that answers it, and ts_rank orders the matches.
-- The english parser never puts a space inside a lexeme, so ' & ' only ever joins terms.
CREATE FUNCTION memstore_any_words(query text) RETURNS tsquery
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT replace(plainto_tsquery('english'::regconfig, query)::text, ' & ', ' | ')::tsquery
$$;
