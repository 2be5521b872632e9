-- requires extension: vector
-- 0021: the models whose vectors are stored. Search reads only the current model's vectors
-- (0007), so after a change of --embedder the messages embedded before it were found by
-- meaning no more, and nothing said so. The embedding worker records its model before its
-- first save; `memstore reindex` forgets a model once no vector of it is left; a server
-- whose model is not alone here says so in its log and in each search's note.
CREATE TABLE embedding_models (
    model text PRIMARY KEY,
    recorded_at timestamptz NOT NULL DEFAULT now()
);

-- The models of the vectors stored before this migration (one scan of the vectors, once).
INSERT INTO embedding_models (model) SELECT DISTINCT model FROM message_embeddings;
