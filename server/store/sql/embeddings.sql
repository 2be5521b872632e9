-- The embedding worker (store/embeddings.py): it claims due messages, saves their vectors
-- (pgvector) or, without pgvector, keeps recall by words, and keeps each touched session's
-- recall; reindex.sql fills the queue. Vectors travel as text, as in search.sql.

-- claim_embeddings --
-- Leases the oldest due messages that no other worker holds, for %(lease)s seconds.
WITH picked AS (
    SELECT q.project_id, q.session_id, q.sequence
    FROM embedding_queue q
    WHERE q.leased_until IS NULL OR q.leased_until < clock_timestamp()
    ORDER BY q.enqueued_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), leased AS (
    UPDATE embedding_queue q SET leased_until = clock_timestamp() + make_interval(secs => %(lease)s)
    FROM picked p
    WHERE q.project_id = p.project_id AND q.session_id = p.session_id AND q.sequence = p.sequence
    RETURNING q.project_id, q.session_id, q.sequence
)
SELECT l.project_id, l.session_id, l.sequence, m.role, m.content, m.deleted_at IS NULL AS live
FROM leased l
JOIN messages m ON m.project_id = l.project_id AND m.session_id = l.session_id
               AND m.sequence = l.sequence;

-- release_embeddings --
-- Gives leased messages back at once (the model failed): the next claim takes them.
UPDATE embedding_queue q SET leased_until = NULL
FROM unnest(%(project_ids)s::bigint[], %(session_ids)s::text[], %(sequences)s::bigint[])
    AS k(project_id, session_id, sequence)
WHERE q.project_id = k.project_id AND q.session_id = k.session_id AND q.sequence = k.sequence;

-- renew_embeddings --
-- Holds a claimed batch's lease for %(lease)s seconds more while its model works: a batch that
-- outlasted its lease (a slow remote model, the halving of a failing batch) was claimed and
-- embedded again by another worker. A row given back (leased_until NULL) stays given back.
-- The clock is read in a materialized CTE, as defer_embeddings does (Citus).
WITH t AS MATERIALIZED (
    SELECT clock_timestamp() + make_interval(secs => %(lease)s) AS until
)
UPDATE embedding_queue q SET leased_until = t.until
FROM unnest(%(project_ids)s::bigint[], %(session_ids)s::text[], %(sequences)s::bigint[])
    AS k(project_id, session_id, sequence), t
WHERE q.project_id = k.project_id AND q.session_id = k.session_id AND q.sequence = k.sequence
  AND q.leased_until IS NOT NULL;

-- defer_embeddings --
-- Puts off messages the model failed on alone (not a refusal) while it embedded the rest of
-- their batch: each is leased for as long again as it has waited, between %(least)s and
-- %(most)s seconds, so it heads no claim meanwhile and one that keeps failing is tried ever
-- more rarely (each try at most doubles its wait). enqueued_at is kept: the queue's age
-- still shows it. The clock is read once in a materialized CTE and the time built from epoch
-- seconds: Citus refuses a volatile function in a distributed UPDATE's SET, and a stable
-- one (timestamptz + interval) on a column.
WITH t AS MATERIALIZED (
    SELECT clock_timestamp() AS now, extract(epoch FROM clock_timestamp())::float8 AS epoch
)
UPDATE embedding_queue q
SET leased_until = to_timestamp(t.epoch + least(%(most)s::float8,
        greatest(%(least)s::float8, extract(epoch FROM t.now - q.enqueued_at)::float8)))
FROM unnest(%(project_ids)s::bigint[], %(session_ids)s::text[], %(sequences)s::bigint[])
    AS k(project_id, session_id, sequence), t
WHERE q.project_id = k.project_id AND q.session_id = k.session_id AND q.sequence = k.sequence
RETURNING q.project_id, q.session_id, q.sequence,
          extract(epoch FROM t.now - q.enqueued_at)::float8 AS waited,
          extract(epoch FROM q.leased_until - t.now)::float8 AS delay;

-- lock_embedded_sessions --
-- Locks the sessions of a batch against deletion, in key order as DeleteUser does, before
-- the batch's vectors are written: a delete and a save then wait for each other in turn.
-- Key order is code points' (COLLATE "C"), as in every statement that locks sessions.
SELECT s.session_id FROM sessions s
JOIN unnest(%(project_ids)s::bigint[], %(session_ids)s::text[]) AS k(project_id, session_id)
    ON s.project_id = k.project_id AND s.session_id = k.session_id
ORDER BY s.project_id, s.session_id COLLATE "C"
FOR KEY SHARE OF s;

-- save_embeddings --
-- Writes the vectors of a claimed batch and removes the whole batch from the queue.
WITH v AS (
    SELECT * FROM unnest(%(project_ids)s::bigint[], %(session_ids)s::text[],
                         %(sequences)s::bigint[], %(vectors)s::text[])
        AS v(project_id, session_id, sequence, vector)
), saved AS (
    INSERT INTO message_embeddings AS e (project_id, session_id, sequence, model, embedding)
    SELECT v.project_id, v.session_id, v.sequence, %(model)s, v.vector::vector
    FROM v
    -- A message deleted since it was claimed is gone: nothing to keep a vector of.
    JOIN messages m ON m.project_id = v.project_id AND m.session_id = v.session_id
                   AND m.sequence = v.sequence
    WHERE v.vector IS NOT NULL
    ON CONFLICT (project_id, session_id, sequence) DO UPDATE
        SET model = excluded.model, embedding = excluded.embedding
    RETURNING 1
), done AS (
    DELETE FROM embedding_queue q USING v
    WHERE q.project_id = v.project_id AND q.session_id = v.session_id
      AND q.sequence = v.sequence
    RETURNING 1
)
SELECT (SELECT count(*) FROM saved) AS saved, (SELECT count(*) FROM done) AS done;

-- refresh_session_embeddings --
-- Marks each session of a batch as seen by the worker through its latest embedded live
-- message; _keep_recall then ranks and keeps its recall in the same row. No recall vector
-- since migration 0014 (recall_distance_window ranks by the window's own vectors): a row
-- of an older server loses its mean here.
INSERT INTO session_embeddings AS t (project_id, session_id, model, through_sequence)
SELECT s.project_id, s.session_id, %(model)s, r.through
FROM unnest(%(project_ids)s::bigint[], %(session_ids)s::text[]) AS s(project_id, session_id)
CROSS JOIN LATERAL (
    SELECT max(e.sequence) AS through
    FROM message_embeddings e
    JOIN messages m ON m.project_id = e.project_id AND m.session_id = e.session_id
                   AND m.sequence = e.sequence
    WHERE e.project_id = s.project_id AND e.session_id = s.session_id
      AND e.model = %(model)s AND m.deleted_at IS NULL
) AS r
WHERE r.through IS NOT NULL
ON CONFLICT (project_id, session_id) DO UPDATE
    SET model = excluded.model, embedding = NULL, through_sequence = excluded.through_sequence;

-- save_recall --
-- Keeps a session's ranked recall (other sessions' message keys, best first) with its vector.
UPDATE session_embeddings SET
    recall_sessions = %(recall_sessions)s::text[],
    recall_sequences = %(recall_sequences)s::bigint[],
    recall_scores = %(recall_scores)s::float8[],
    -- Every message the ranking saw was made before this statement (migration 0020).
    recall_kept_at = statement_timestamp()
WHERE project_id = %(project_id)s AND session_id = %(session_id)s AND model = %(model)s;

-- save_word_recall --
-- Keeps a session's recall ranked by words (other sessions' message keys, best first), where
-- vectors are not kept; only while the session is live, so a session deleted meanwhile
-- keeps nothing (on Citus its hard delete may commit between the two: the save is retried).
INSERT INTO session_word_recall AS t (project_id, session_id, recall_sessions,
                                      recall_sequences, recall_scores, recall_kept_at)
SELECT s.project_id, s.session_id, %(recall_sessions)s::text[], %(recall_sequences)s::bigint[],
       %(recall_scores)s::float8[], statement_timestamp()
FROM sessions s
WHERE s.project_id = %(project_id)s AND s.session_id = %(session_id)s AND s.deleted_at IS NULL
ON CONFLICT (project_id, session_id) DO UPDATE SET
    recall_sessions = excluded.recall_sessions,
    recall_sequences = excluded.recall_sequences,
    recall_scores = excluded.recall_scores,
    recall_kept_at = excluded.recall_kept_at;

-- settle_word_recall --
-- Removes a claimed batch from the queue once its sessions' recall by words is kept.
DELETE FROM embedding_queue q
USING unnest(%(project_ids)s::bigint[], %(session_ids)s::text[], %(sequences)s::bigint[])
    AS k(project_id, session_id, sequence)
WHERE q.project_id = k.project_id AND q.session_id = k.session_id AND q.sequence = k.sequence;

-- claim_embeddings_citus --
-- claim_embeddings under Citus, which locks no rows of a multi-shard SELECT: the oldest due
-- rows are picked, then leased by an UPDATE that takes only those still unleased under their
-- row lock, so two workers that picked the same row never both lease it.
WITH picked AS MATERIALIZED (
    SELECT q.project_id, q.session_id, q.sequence
    FROM embedding_queue q
    WHERE q.leased_until IS NULL OR q.leased_until < clock_timestamp()
    ORDER BY q.enqueued_at
    LIMIT %(limit)s
), leased AS (
    UPDATE embedding_queue q SET leased_until = t.until
    FROM picked p, (SELECT clock_timestamp() AS now,
                           clock_timestamp() + make_interval(secs => %(lease)s) AS until) AS t
    WHERE q.project_id = p.project_id AND q.session_id = p.session_id AND q.sequence = p.sequence
      AND (q.leased_until IS NULL OR q.leased_until < t.now)
    RETURNING q.project_id, q.session_id, q.sequence
)
SELECT l.project_id, l.session_id, l.sequence, m.role, m.content, m.deleted_at IS NULL AS live
FROM leased l
JOIN messages m ON m.project_id = l.project_id AND m.session_id = l.session_id
               AND m.sequence = l.sequence;

-- refresh_session_embeddings_citus --
-- refresh_session_embeddings under Citus, which cannot push a lateral join over several
-- sessions down to their shards: grouped by session (the distribution column), on each shard.
INSERT INTO session_embeddings AS t (project_id, session_id, model, through_sequence)
SELECT e.project_id, e.session_id, %(model)s, max(e.sequence)
FROM message_embeddings e
JOIN messages m ON m.project_id = e.project_id AND m.session_id = e.session_id
               AND m.sequence = e.sequence
-- Each id against each project: a session of another project with a batch's id is
-- refreshed too, harmlessly (from its own messages).
WHERE e.session_id = ANY(%(session_ids)s::text[])
  AND e.project_id = ANY(%(project_ids)s::bigint[])
  AND e.model = %(model)s AND m.deleted_at IS NULL
GROUP BY e.session_id, e.project_id
ON CONFLICT (project_id, session_id) DO UPDATE
    SET model = excluded.model, embedding = NULL, through_sequence = excluded.through_sequence;

-- any_due_citus --
-- Whether some queued message is unleased or its lease ran out: under Citus, a claim that
-- leased nothing may have lost every picked row to another worker, with more still due.
SELECT EXISTS (
    SELECT 1 FROM embedding_queue q
    WHERE q.leased_until IS NULL OR q.leased_until < clock_timestamp()
) AS due;

-- record_embedding_model --
-- Notes that vectors of this model are (about to be) stored: the worker, before its first
-- save of a model (0021).
INSERT INTO embedding_models (model) VALUES (%(model)s) ON CONFLICT (model) DO NOTHING;

-- vector_tables_made --
-- Whether migration 0007 has made the vector tables (a word-recall worker, started without
-- them, then leaves the queue to one that embeds).
SELECT to_regclass('message_embeddings') IS NOT NULL AS made;
