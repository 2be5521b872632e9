-- Search over messages: full-text (tsvector, always) and vectors (pgvector, when migration
-- 0007 applied). Its rankings rank GetMemory's recall too, over recall.sql's fragments; the
-- recall the worker kept is read in kept_recall.sql, and the embedding queue that feeds the
-- vectors and keeps recall is in embeddings.sql.
-- {filters} fragments come from a fixed whitelist in store/search.py. Vectors travel as
-- text ('[0.1,0.2,...]') cast to vector in SQL: no per-connection type registration, so
-- connections opened before the extension was created work too.

-- search_full_text --
-- Live messages in scope matching any word of the query, best full-text rank first. {match}
-- is search_match_index or, for recall, recall_match_scan. Ties go to the newest message: the
-- later written, then in one write (one created_at) the later in the conversation; the
-- messages' uuids broke them, random ones, so the same messages written twice ranked in
-- another order (make eval's figures moved between runs; docs/search.md). Every ranking here
-- breaks ties so.
SELECT m.uuid, m.session_id, m.sequence, m.role, m.role_type, m.content, m.metadata,
       m.created_at, m.updated_at, s.user_id, ts_rank(m.search, q.query, 1) AS score,
       NULL::text AS vector
FROM ({query}) AS q, messages m
JOIN sessions s ON s.project_id = m.project_id AND s.session_id = m.session_id
WHERE m.project_id = %(project_id)s AND {match}
  AND m.deleted_at IS NULL AND s.deleted_at IS NULL {filters}
ORDER BY score DESC, m.created_at DESC, m.session_id, m.sequence DESC
LIMIT %(limit)s;

-- search_words --
-- search_hybrid where no vector can take part (no pgvector, or --embedder none): ranked by
-- words alone, each score its full-text rank over the best candidate's (0 to 1, the best
-- 1), as a hybrid score is. Raw ts_rank (0.03 to 0.1 for an exact match) made Zep's
-- min_score of 0.1 to 0.5 keep nothing here (an audit). Not min-max as search_hybrid's text
-- part: two near-equal matches would score 1 and 0. One level of subquery, no join back to
-- the messages, so that one session's search stays on its shard (Citus). {text_candidates}
-- as in search_hybrid.
SELECT c.uuid, c.session_id, c.sequence, c.role, c.role_type, c.content, c.metadata,
       c.created_at, c.updated_at, c.user_id,
       coalesce(c.rank / nullif(max(c.rank) OVER (), 0), 1)::float8 AS score,
       NULL::text AS vector
FROM (
    SELECT m.uuid, m.session_id, m.sequence, m.role, m.role_type, m.content, m.metadata,
           m.created_at, m.updated_at, s.user_id, ts_rank(m.search, q.query, 1) AS rank
    FROM ({query}) AS q, {text_candidates}
) AS c
ORDER BY score DESC, c.created_at DESC, c.session_id, c.sequence DESC
LIMIT %(limit)s;

-- search_semantic --
-- Embedded live messages in scope, nearest to the query vector first (cosine).
SELECT m.uuid, m.session_id, m.sequence, m.role, m.role_type, m.content, m.metadata,
       m.created_at, m.updated_at, s.user_id,
       1 - (e.embedding <=> q.vector) AS score,
       CASE WHEN %(with_vectors)s THEN e.embedding::text END AS vector
FROM ({query}) AS q, message_embeddings e
JOIN messages m ON m.project_id = e.project_id AND m.session_id = e.session_id
               AND m.sequence = e.sequence
JOIN sessions s ON s.project_id = m.project_id AND s.session_id = m.session_id
WHERE e.project_id = %(project_id)s AND e.model = %(model)s
  AND m.deleted_at IS NULL AND s.deleted_at IS NULL {filters}
ORDER BY e.embedding <=> q.vector, m.created_at DESC, m.session_id, m.sequence DESC
LIMIT %(limit)s;

-- search_hybrid --
-- Convex combination of the full-text and vector candidates' min-max normalised scores. A
-- message the model has not embedded yet (no vector of this model) is ranked by its words
-- alone, at full weight: its vector part is its text part, not 0, so it is not capped at
-- the text weight below every embedded candidate however weak (docs/search.md). Where every
-- candidate is embedded the ranking is the plain combination. {text_candidates} is
-- search_text_candidates (its {match} and {filters} filled); {distance} is a message's cosine
-- distance to the query: search_distance_query for search, recall_distance_window for recall.
WITH q AS ({query}), fts AS (
    SELECT c.session_id, c.sequence,
           coalesce((c.rank - min(c.rank) OVER ()) / nullif(max(c.rank) OVER ()
                                                        - min(c.rank) OVER (), 0), 1) AS norm
    FROM (
        SELECT m.session_id, m.sequence, ts_rank(m.search, q.query, 1) AS rank
        FROM q, {text_candidates}
    ) AS c
), vec AS (
    SELECT c.session_id, c.sequence,
           coalesce((max(c.distance) OVER () - c.distance) / nullif(max(c.distance) OVER ()
                                                                - min(c.distance) OVER (), 0),
                    1) AS norm
    FROM (
        SELECT m.session_id, m.sequence, {distance} AS distance
        FROM q, message_embeddings e
        JOIN messages m ON m.project_id = e.project_id AND m.session_id = e.session_id
                       AND m.sequence = e.sequence
        JOIN sessions s ON s.project_id = m.project_id AND s.session_id = m.session_id
        WHERE e.project_id = %(project_id)s AND e.model = %(model)s AND q.vector IS NOT NULL
          AND m.deleted_at IS NULL AND s.deleted_at IS NULL {filters}
        ORDER BY distance, m.created_at DESC, m.session_id, m.sequence DESC
        LIMIT %(candidates)s
    ) AS c
), fused AS (
    SELECT session_id, sequence, fts.norm AS text_norm, vec.norm AS vector_norm
    FROM fts FULL JOIN vec USING (session_id, sequence)
)
SELECT m.uuid, m.session_id, m.sequence, m.role, m.role_type, m.content, m.metadata,
       m.created_at, m.updated_at, s.user_id,
       (%(text_weight)s * coalesce(f.text_norm, 0)
        + (1 - %(text_weight)s) * coalesce(f.vector_norm,
                                           CASE WHEN e.embedding IS NULL THEN f.text_norm END,
                                           0))::float8 AS score,
       CASE WHEN %(with_vectors)s THEN e.embedding::text END AS vector
FROM fused f
JOIN messages m ON m.project_id = %(project_id)s AND m.session_id = f.session_id
               AND m.sequence = f.sequence
JOIN sessions s ON s.project_id = m.project_id AND s.session_id = m.session_id
LEFT JOIN message_embeddings e ON e.project_id = m.project_id AND e.session_id = m.session_id
                              AND e.sequence = m.sequence AND e.model = %(model)s
ORDER BY score DESC, m.created_at DESC, m.session_id, m.sequence DESC
LIMIT %(limit)s;

-- search_text_candidates --
-- Full-text candidates fragment of search_words and search_hybrid, after their query q in
-- FROM: the %(candidates)s best live messages in scope matching any word of the query, by the
-- full-text rank their select list names `rank`, ties broken as search_full_text breaks them.
-- {match} as in search_full_text. Written once for both, filled by the store's
-- ranking_statement.
messages m
JOIN sessions s ON s.project_id = m.project_id AND s.session_id = m.session_id
WHERE m.project_id = %(project_id)s AND {match}
  AND m.deleted_at IS NULL AND s.deleted_at IS NULL {filters}
ORDER BY rank DESC, m.created_at DESC, m.session_id, m.sequence DESC
LIMIT %(candidates)s

-- search_budgeted --
-- A ranking statement's rows ({rows}: search_sized in budget_rows, in the order of
-- search_order over k), best first, read only while the rows before one hold less than
-- %(budget)s bytes (the best is always read); followed on the last row: a row of the limit
-- was left out.
SELECT b.* FROM ({rows}) AS b
ORDER BY b.score DESC, b.created_at DESC, b.session_id, b.sequence DESC

-- search_sized --
-- A ranking statement's rows ({ranked}: search_full_text, search_semantic or search_hybrid,
-- for SearchMemory or recall) with each one's bytes for search_budgeted: its content, sized
-- from the value's header (SearchMemory's and recall's limit 100 of messages of 1 MiB were
-- read whole, 106 MB, to be refused), and its metadata as PostgreSQL prints it (limit 100 of
-- messages of 60 KB of metadata, compressed on disk to a few hundred bytes, were not counted).
SELECT r.*, octet_length(r.content) + octet_length(r.metadata::text) AS size
FROM ({ranked}) AS r

-- search_candidates --
-- A ranking statement's rows ({ranked}: search_semantic or search_hybrid, with_vectors) without
-- their content and metadata, for diversified search to choose among: PostgreSQL replaces a
-- subquery's outputs nothing reads with NULLs, so the candidates' values (up to 400 of 1 MiB
-- and 64 KiB of metadata) are neither detoasted nor sent; search_chosen reads the chosen ones
-- (docs/search.md, "Diversity").
SELECT r.uuid, r.session_id, r.sequence, r.score, r.vector
FROM ({ranked}) AS r

-- search_chosen --
-- The messages diversified search chose (%(chosen)s, by uuid, in the order chosen; their
-- sessions and sequences pin the shards and the index reads, as recall_live_citus's), still
-- live, each with the score its ranking gave it (%(chosen_scores)s, in the same order) and
-- its place in that order (chosen_order; the store sorts by it: an ORDER BY here made Citus
-- read search_chosen_budgeted's running sum over every shard). The sessions are named for
-- both tables: pinned through the join alone, the sessions' shard was not known to Citus
-- when it planned search_chosen_budgeted's window, which it then ran over these rows made
-- first as a subplan, even for one session (docs/scaling.md).
SELECT m.uuid, m.session_id, m.sequence, m.role, m.role_type, m.content, m.metadata,
       m.created_at, m.updated_at, s.user_id,
       (%(chosen_scores)s::float8[])[array_position(%(chosen)s::uuid[], m.uuid)] AS score,
       NULL::text AS vector, array_position(%(chosen)s::uuid[], m.uuid) AS chosen_order
FROM messages m
JOIN sessions s ON s.project_id = m.project_id AND s.session_id = m.session_id
               AND s.session_id = ANY(%(chosen_sessions)s::text[])
WHERE m.project_id = %(project_id)s AND m.session_id = ANY(%(chosen_sessions)s::text[])
  AND m.sequence = ANY(%(chosen_sequences)s::bigint[]) AND m.uuid = ANY(%(chosen)s::uuid[])
  AND m.deleted_at IS NULL AND s.deleted_at IS NULL

-- search_chosen_budgeted --
-- search_chosen's rows ({rows}: search_sized over it in budget_rows, in the chosen order), read
-- only while the rows before one hold less than %(budget)s bytes, as search_budgeted's.
SELECT b.* FROM ({rows}) AS b
ORDER BY b.chosen_order

-- search_order --
-- The order of search_budgeted's running sum over k: the ranking statements' (search_semantic's
-- distance is 1 - its score).
k.score DESC, k.created_at DESC, k.session_id, k.sequence DESC

-- search_distance_query --
-- Distance fragment of search_hybrid for search: to the query's vector.
e.embedding <=> q.vector

-- search_match_index --
-- Match fragment of search: messages sharing a word with the query, found through the GIN
-- index (messages_search_idx): a question's few words have short posting lists.
m.search @@ q.query

-- search_filter_user --
-- Scope fragment: the live sessions of one user.
AND s.user_id = %(user_id)s

-- search_filter_sessions --
-- Scope fragment: only these sessions.
AND m.session_id = ANY(%(session_ids)s::text[])

-- search_filter_session --
-- Scope fragment: only this one session (SearchMemory in one session), named directly so
-- that Citus routes the whole statement to its shard: by an array it planned the budgeted
-- ranking's LIMIT and its window as two subplans (docs/scaling.md).
AND m.session_id = %(session_id)s

-- search_filter_role_types --
-- Filter fragment: messages of these role types.
AND m.role_type = ANY(%(role_types)s::text[])

-- search_filter_metadata --
-- Filter fragment: messages whose metadata contains a JSON object (jsonb @>).
AND m.metadata @> %(metadata_contains)s

-- search_filter_created_after --
-- Filter fragment: messages created at or after a time.
AND m.created_at >= %(created_after)s

-- search_filter_created_before --
-- Filter fragment: messages created before a time.
AND m.created_at < %(created_before)s

-- count_unembedded --
-- How many live messages in scope still wait for their embedding.
SELECT count(*) AS n
FROM embedding_queue q
JOIN messages m ON m.project_id = q.project_id AND m.session_id = q.session_id
               AND m.sequence = q.sequence
JOIN sessions s ON s.project_id = m.project_id AND s.session_id = m.session_id
WHERE q.project_id = %(project_id)s AND m.deleted_at IS NULL AND s.deleted_at IS NULL
  {filters};

-- search_query_text --
-- Query fragment of search: the words of the caller's text.
SELECT memstore_any_words(%(text)s) AS query

-- search_query_vector --
-- Query fragment of search: the words of the caller's text and its embedding.
SELECT memstore_any_words(%(text)s) AS query, %(vector)s::text::vector AS vector
