-- Reindex (store/reindex.py): the embedding queue filled with the live messages that lack a
-- vector of the model (or, without pgvector, the sessions whose recall by words is not
-- kept), the models other than it whose vectors are left, and the queue's length.

-- queue_reindex --
-- Queues one batch of live messages whose vector is missing or made by another model.
WITH picked AS (
    SELECT m.project_id, m.session_id, m.sequence
    FROM messages m
    LEFT JOIN message_embeddings e ON e.project_id = m.project_id
        AND e.session_id = m.session_id AND e.sequence = m.sequence
    WHERE (m.project_id, m.session_id, m.sequence)
          > (%(after_project)s, %(after_session)s, %(after_sequence)s)
      AND m.deleted_at IS NULL
      AND (e.model IS NULL OR e.model <> %(model)s)
    ORDER BY m.project_id, m.session_id, m.sequence
    LIMIT %(limit)s
), queued AS (
    INSERT INTO embedding_queue (project_id, session_id, sequence)
    SELECT project_id, session_id, sequence FROM picked
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM queued) AS queued, l.project_id, l.session_id, l.sequence
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (
    SELECT project_id, session_id, sequence FROM picked
    ORDER BY project_id DESC, session_id DESC, sequence DESC LIMIT 1
) AS l ON true;

-- queue_word_recall --
-- memstore reindex without pgvector: queues one batch of live sessions of a user whose recall
-- by words is not kept (their messages arrived before migration 0012, or while nothing
-- queued them), in key order after the previous batch's last session, one row each: its
-- latest live message (the worker ranks a session, not a message). A session without a live
-- message has nothing to rank from and is passed over.
WITH picked AS MATERIALIZED (
    SELECT s.project_id, s.session_id
    FROM sessions s
    WHERE (s.project_id, s.session_id) > (%(after_project)s, %(after_session)s)
      AND s.deleted_at IS NULL AND s.user_id IS NOT NULL
      AND NOT EXISTS (SELECT FROM session_word_recall r
                      WHERE r.project_id = s.project_id AND r.session_id = s.session_id)
    ORDER BY s.project_id, s.session_id
    LIMIT %(limit)s
), latest AS (
    SELECT m.project_id, m.session_id, max(m.sequence) AS sequence
    FROM messages m
    JOIN picked p ON p.project_id = m.project_id AND p.session_id = m.session_id
    WHERE m.deleted_at IS NULL
    GROUP BY m.project_id, m.session_id
), queued AS (
    INSERT INTO embedding_queue (project_id, session_id, sequence)
    SELECT project_id, session_id, sequence FROM latest
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM queued) AS queued, l.project_id, l.session_id
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (
    SELECT project_id, session_id FROM picked
    ORDER BY project_id DESC, session_id DESC LIMIT 1
) AS l ON true;

-- reindex_total --
-- How many live messages lack a vector of this model (the reindex progress bar's total).
SELECT count(*) AS n
FROM messages m
LEFT JOIN message_embeddings e ON e.project_id = m.project_id
    AND e.session_id = m.session_id AND e.sequence = m.sequence
WHERE m.deleted_at IS NULL AND (e.model IS NULL OR e.model <> %(model)s);

-- embedding_lag --
-- The queue's length counted up to %(cap)s rows, and the age of its oldest entry (seconds),
-- for /metrics at each scrape and every server's look each minute. Counting stops at the
-- cap, so a queue of millions (after a reindex) costs a scrape no more than one of cap rows;
-- the age stays exact: min() alone reads the first entry of embedding_queue_enqueued_idx
-- (with count(*) beside it in one aggregate, both scanned the whole queue).
SELECT (SELECT count(*) FROM (SELECT 1 FROM embedding_queue LIMIT %(cap)s) AS capped) AS queued,
       coalesce(extract(epoch FROM clock_timestamp()
                                   - (SELECT min(enqueued_at) FROM embedding_queue)),
                0)::float8 AS oldest;

-- other_embedding_models --
-- The models other than this one whose vectors may be stored: search with this model does
-- not find the messages they embedded.
SELECT model FROM embedding_models WHERE model <> %(model)s ORDER BY model;

-- embedding_model_used --
-- Whether a live message still has a vector of this model (reindex, before it forgets the
-- model; a soft-deleted message's vector is never read, and the purge removes it).
SELECT EXISTS (
    SELECT 1 FROM message_embeddings e
    JOIN messages m ON m.project_id = e.project_id AND m.session_id = e.session_id
                   AND m.sequence = e.sequence
    WHERE e.model = %(model)s AND m.deleted_at IS NULL
) AS used;

-- forget_embedding_model --
-- A model none of whose vectors is left (reindex replaced them all).
DELETE FROM embedding_models WHERE model = %(model)s;
