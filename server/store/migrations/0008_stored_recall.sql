-- requires extension: vector
-- 0008: recall prepared in the background. The embedding worker, having refreshed a
-- session's recall vector, also ranks the user's other sessions' messages against it and
-- keeps the best here; GetMemory reads them instead of ranking on the request path. NULL
-- means not yet computed (GetMemory then ranks itself).

ALTER TABLE session_embeddings
    ADD COLUMN recall_sessions text[],
    ADD COLUMN recall_sequences bigint[],
    ADD COLUMN recall_scores float8[];
