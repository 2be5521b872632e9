-- 0012: recall by words kept ahead of time where vectors are not. With pgvector the
-- embedding worker keeps each session's recall when its messages arrive (0007, 0008);
-- without it GetMemory ranked the user's messages by words on every call, at a cost that
-- grows with the user (docs/search.md). Now the same worker, without a model, ranks a
-- session's recall by the words of its last messages when they arrive and keeps it here,
-- in session_embeddings' recall columns (0008); GetMemory reads it as it reads those. No row
-- means not yet kept: GetMemory then ranks on the request path. Rows go with their session
-- (the foreign key's cascade: DeleteUser, the purge); what was deleted since it was kept is
-- skipped when it is read.
CREATE TABLE session_word_recall (
    project_id bigint NOT NULL,
    session_id text NOT NULL,
    recall_sessions text[] NOT NULL,
    recall_sequences bigint[] NOT NULL,
    recall_scores float8[] NOT NULL,
    PRIMARY KEY (project_id, session_id),
    FOREIGN KEY (project_id, session_id) REFERENCES sessions ON DELETE CASCADE
);
