-- Search and recall over messages: full-text (tsvector, always), vectors (pgvector, when
-- migration 0007 applied), and GetMemory's recall. The embedding queue that feeds the vectors
-- and keeps recall is in embeddings.sql.
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

-- recall_distance_window --
-- Distance fragment of search_hybrid for recall: to the nearest of the vectors of the
-- session's last messages (recall_query_vector's vectors), so each message of the window
-- finds its own memories wherever it stands in the window; each window message's distances
-- raised so that its own nearest memory (recall_query_vector's nearest) is no nearer than
-- %(nearest_floor)s, so a message that repeats a memory (distance 0) and its topic's other
-- memories do not crowd out every other message's. The mean of the window's vectors,
-- weighted to the latest, pointed at whatever the window said most or last (a question
-- followed by five messages of other talk: recall@10 0.023 in make eval's recall); the
-- nearest without the floor lost a question after five lines the history holds (0.263);
-- docs/search.md, Recall quality.
(SELECT min((e.embedding <=> v.vector) + greatest(%(nearest_floor)s - v.nearest, 0))
 FROM unnest(q.vectors, q.nearest) AS v(vector, nearest))

-- search_match_index --
-- Match fragment of search: messages sharing a word with the query, found through the GIN
-- index (messages_search_idx): a question's few words have short posting lists.
m.search @@ q.query

-- recall_match_scan --
-- Match fragment of recall: the same match, written so that the GIN index cannot serve it.
-- Recall's query is every word of the session's last messages (a hundred or more): through
-- the index, their posting lists cover the whole project, every user's messages, and were
-- read again for each of the user's sessions (1.8 s at 65,000 messages, docs/search.md).
-- Not indexable, the match is checked on the user's own messages, read by session key: the
-- cost follows the user's messages, not the project's.
(m.search @@ q.query) IS TRUE

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

-- search_filter_other_sessions --
-- Scope fragment of recall: every session but the one being read.
AND m.session_id <> %(exclude_session)s

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

-- recall_query_text --
-- Query fragment of recall: %(words)s words of the session's last live messages, any of them
-- to match; no row unless the session is live, has messages and belongs to a user. The words
-- are the distinct lexemes the window repeats most, then the longest (a stand-in for the
-- rarest): the cost of matching and ranking each of the user's messages grows with the
-- query's size, and six chat messages hold a hundred lexemes or more. Content only, not the
-- speakers: a message's role is indexed at weight A, so the window's own speakers (the
-- user's name, "assistant") matched every message they ever said at ten times a content
-- word, and recall by words ranked the user's shortest messages first whatever they said
-- (R@10 0 in make eval's recall, docs/search.md). The tsvector's text
-- form quotes each lexeme as tsquery's does, and a lexeme holds no space, so "' '" only ever
-- separates two of them. OFFSET 0 keeps it a subquery, computed once: pulled up into the
-- statement, the tsquery was built again for every message it was matched against and ranked
-- with.
SELECT replace(
           strip(array_to_tsvector(ARRAY(
               SELECT w.lexeme
               FROM unnest(to_tsvector('english'::regconfig,
                   (SELECT coalesce(string_agg(left(r.content, 2000), ' '), '')
                    -- Pinned by the parameters, not by s, so Citus routes it to one shard.
                    FROM (SELECT m.content FROM messages m
                          WHERE m.project_id = %(project_id)s
                            AND m.session_id = %(exclude_session)s AND m.deleted_at IS NULL
                          ORDER BY m.sequence DESC LIMIT %(window)s) AS r))) AS w
               ORDER BY cardinality(w.positions) DESC, length(w.lexeme) DESC, w.lexeme
               LIMIT %(words)s)))::text,
           ''' ''', ''' | ''')::tsquery AS query
FROM sessions s
WHERE s.project_id = %(project_id)s AND s.session_id = %(exclude_session)s
  AND s.deleted_at IS NULL AND s.user_id IS NOT NULL AND s.message_count > 0
OFFSET 0

-- recall_query_vector --
-- Query fragment of recall: recall_query_text's words, the vectors of the session's last
-- %(window)s embedded live messages (recall_distance_window ranks by the nearest of them),
-- newest first, and in the same order the distance from each to its nearest memory in scope
-- ({filters}: the user's other live sessions), NULL when there is none; vector, the latest
-- of them, is NULL until the worker has embedded one, and recall then ranks by words alone.
-- {words} is recall_query_text. The nearest memories are a grouped join, not a subquery per
-- vector, so that Citus plans it as one fan-out.
SELECT w.query, v.vectors[1] AS vector, v.vectors, n.nearest
FROM ({words}) AS w,
     (SELECT {window_vectors} AS vectors) AS v,
     (SELECT array_agg(d.nearest ORDER BY d.sequence DESC) AS nearest
      FROM (SELECT x.sequence, min(e.embedding <=> x.embedding) AS nearest
            FROM (SELECT e.sequence, e.embedding
                  FROM message_embeddings e
                  JOIN messages m ON m.project_id = e.project_id
                                 AND m.session_id = e.session_id AND m.sequence = e.sequence
                  WHERE e.project_id = %(project_id)s AND e.session_id = %(exclude_session)s
                    AND e.model = %(model)s AND m.deleted_at IS NULL
                  ORDER BY e.sequence DESC
                  LIMIT %(window)s) AS x,
                 message_embeddings e
            JOIN messages m ON m.project_id = e.project_id AND m.session_id = e.session_id
                           AND m.sequence = e.sequence
            JOIN sessions s ON s.project_id = m.project_id AND s.session_id = m.session_id
            WHERE e.project_id = %(project_id)s AND e.model = %(model)s
              AND m.deleted_at IS NULL AND s.deleted_at IS NULL {filters}
            GROUP BY x.sequence) AS d) AS n

-- recall_query_citus --
-- On Citus, recall's query apart from its ranking, on the session's one shard: the session's
-- user (owner), recall_query_text's words as tsquery text and {vectors} (the window's vectors
-- as vector[] text, recall_window_vectors, or NULL by words alone); no row where
-- recall_query_text has none. The ranking then takes them as parameters (recall_given_*):
-- as one statement, Citus ran the session's own reads inside the ranking as subplans, each a
-- round trip through the coordinator (17 with vectors: ~200 ms a GetMemory on the test
-- cluster; docs/scaling.md, "Recall ranked on Citus").
SELECT s.user_id AS owner, w.query::text AS query, {vectors} AS vectors
FROM ({words}) AS w, sessions s
WHERE s.project_id = %(project_id)s AND s.session_id = %(exclude_session)s

-- recall_window_vectors --
-- Vectors fragment of recall_query_vector and recall_query_citus: the vectors of the
-- session's last %(window)s embedded live messages, newest first.
ARRAY(SELECT e.embedding
      FROM message_embeddings e
      JOIN messages m ON m.project_id = e.project_id
                     AND m.session_id = e.session_id AND m.sequence = e.sequence
      WHERE e.project_id = %(project_id)s AND e.session_id = %(exclude_session)s
        AND e.model = %(model)s AND m.deleted_at IS NULL
      ORDER BY e.sequence DESC
      LIMIT %(window)s)

-- recall_nearest_citus --
-- On Citus, recall_query_vector's nearest apart: for each of the window's vectors
-- (%(vectors)s, recall_query_citus's, newest first) the distance to its nearest memory in
-- scope ({filters}, the owner named), a row each in the same order; no row when there is
-- none. One fan-out: each shard's minimum, combined on the coordinator (an array_agg over
-- these rows was planned as a subplan first).
SELECT x.i, min(e.embedding <=> x.embedding) AS nearest
FROM unnest(%(vectors)s::vector[]) WITH ORDINALITY AS x(embedding, i),
     message_embeddings e
JOIN messages m ON m.project_id = e.project_id AND m.session_id = e.session_id
               AND m.sequence = e.sequence
JOIN sessions s ON s.project_id = m.project_id AND s.session_id = m.session_id
WHERE e.project_id = %(project_id)s AND e.model = %(model)s
  AND m.deleted_at IS NULL AND s.deleted_at IS NULL {filters}
GROUP BY x.i
ORDER BY x.i

-- recall_given_text --
-- Query fragment of recall on Citus by words: recall_query_citus's query, given.
SELECT %(query)s::tsquery AS query

-- recall_given_vector --
-- Query fragment of recall on Citus with pgvector: recall_query_vector's columns, given
-- (recall_query_citus's query and vectors, recall_nearest_citus's nearest).
SELECT %(query)s::tsquery AS query, (%(vectors)s::vector[])[1] AS vector,
       %(vectors)s::vector[] AS vectors, %(nearest)s::float8[] AS nearest

-- recall_filter_user --
-- Scope fragment of recall: the sessions of the user who owns the session being read.
AND s.user_id = (SELECT o.user_id FROM sessions o
                 WHERE o.project_id = %(project_id)s AND o.session_id = %(exclude_session)s)

-- recall_filter_kept_vectors --
-- Kept-recall fragment of get_memories_recall and recall_kept_keys_citus with pgvector: the
-- recall the worker ranked for this model (session_embeddings also holds sessions whose
-- recall vector is made but not yet ranked).
AND e.model = %(model)s AND e.recall_sessions IS NOT NULL

-- get_memories_recall --
-- GetMemory with kept recall for concurrent calls at once (coalesced: one round trip, no
-- pipeline). Row i of the arrays is one call (its session, lastn, relevant_limit and byte
-- budget); each result row names its call (i). Per call: the live session joined to its
-- last lastn live messages, {window} as in get_memory (part 0, m_followed as there),
-- then its kept recall (part 1, none for a relevant_limit of 0, which GetMemory without
-- recall sends: its first relevant_limit memories still live, best first; session_id and
-- user_id are the memory's, its message in the m_ columns, r_score its score, kept_count how
-- many memories the worker kept). No part-1 row when no recall was computed for this model,
-- or when none of the kept memories is live any more (deleted since, or their session changed
-- hands: the store ranks on the request path then, as it does when fewer than relevant_limit
-- of more kept are live); a single one with a NULL m_uuid when the worker kept none. Memories no longer live
-- are skipped in SQL, later ones fill in. A call whose session is absent or deleted has no row
-- at all. Uuids as text: psycopg's uuid
-- loader builds a UUID object (in Python) that rows.message turns back into text. {kept} is
-- where the recall is kept and {kept_filter} which of it: session_embeddings and
-- recall_filter_kept_vectors with pgvector, session_word_recall and nothing without. {recall}
-- is kept_recall, or kept_recall_budgeted read up to each call's relevant budget (its
-- m_followed then says the budget left memories out).
WITH q AS (
    -- Arrays in binary format: their text form costs psycopg a regex per element. Each
    -- behind a scalar subquery, so that a custom plan cannot count its elements: a generic
    -- plan estimates unnest at 100 rows, a custom one at the array's length (1 to 8), so
    -- PostgreSQL found the generic plan dearer and planned every call again, ~1.1 ms of its
    -- CPU per statement (docs/performance.md, "GetMemory's statement planned once").
    SELECT * FROM unnest((SELECT %(session_ids)b::text[]), (SELECT %(lastns)b::int[]),
                         (SELECT %(limits)b::int[]), (SELECT %(budgets)b::int8[]),
                         (SELECT %(relevant_budgets)b::int8[]))
        WITH ORDINALITY AS q(session_id, lastn, lim, budget, relevant_budget, i)
)
SELECT q.i, 0 AS part, s.session_id, s.user_id, s.metadata, s.created_at, s.updated_at,
       s.deleted_at, s.message_count, s.last_message_at,
       m.uuid::text AS m_uuid, m.sequence AS m_sequence, m.role AS m_role,
       m.role_type AS m_role_type, m.content AS m_content, m.metadata AS m_metadata,
       m.created_at AS m_created_at, m.updated_at AS m_updated_at,
       NULL::float8 AS r_score, m.sequence AS ord, m.followed AS m_followed,
       NULL::int AS kept_count
FROM q
JOIN sessions s ON s.project_id = %(project_id)s AND s.session_id = q.session_id
               AND s.deleted_at IS NULL
LEFT JOIN LATERAL ({window}) m ON true
UNION ALL
SELECT q.i, 1, k.session_id, k.user_id, NULL, NULL, NULL, NULL, NULL, NULL,
       k.uuid::text, k.sequence, k.role, k.role_type, k.content, k.metadata, k.created_at,
       k.updated_at, k.score, k.rank, k.followed, cardinality(e.recall_sessions)
FROM q
JOIN {kept} e ON e.project_id = %(project_id)s AND e.session_id = q.session_id
             AND q.lim > 0 {kept_filter}
-- The session's own messages picked its kept recall: once it has none (ClearMemory; its
-- undelete keeps them deleted), the recall of messages it no longer holds is not served.
JOIN sessions o ON o.project_id = e.project_id AND o.session_id = e.session_id
               AND o.deleted_at IS NULL AND o.user_id IS NOT NULL AND o.message_count > 0
LEFT JOIN LATERAL ({recall}) k ON true
-- A kept list none of whose memories is live any more (deleted since) gives no part-1 row:
-- the store then ranks on the request path, as if nothing were kept, rather than answer none
-- while other live memories exist. An empty kept list (nothing relevant) is an answer.
WHERE k.uuid IS NOT NULL OR cardinality(e.recall_sessions) = 0
ORDER BY i, part, ord;

-- kept_recall_scan --
-- get_memories_recall's kept recall of one call (its row q, the kept row e, the session's
-- owner o): its first q.lim memories still live, best first.
FROM unnest(e.recall_sessions, e.recall_sequences, e.recall_scores)
    WITH ORDINALITY AS r(session_id, sequence, score, rank)
JOIN messages rm ON rm.project_id = e.project_id AND rm.session_id = r.session_id
                AND rm.sequence = r.sequence AND rm.deleted_at IS NULL
                -- A key names the message it was kept for, not one made since under a
                -- session id the purge freed (migrations 0019, 0020).
                AND (e.recall_kept_at IS NULL OR rm.created_at <= e.recall_kept_at)
JOIN sessions rs ON rs.project_id = rm.project_id AND rs.session_id = rm.session_id
                AND rs.deleted_at IS NULL AND rs.user_id = o.user_id
ORDER BY r.rank
LIMIT q.lim

-- kept_recall --
-- The kept recall whole: for a relevant_limit whose memories cannot pass the answer.
SELECT rm.uuid, rm.session_id, rm.sequence, rm.role, rm.role_type, rm.content, rm.metadata,
       rm.created_at, rm.updated_at, rs.user_id, r.score, r.rank, false AS followed {scan}

-- kept_recall_sized --
-- The kept recall with each memory's bytes, for kept_recall_budgeted (budget_rows over it,
-- best first by k.rank, up to the call's q.relevant_budget; followed on the last row: a memory
-- of the relevant_limit was left out): its content and its metadata as memory_window_sized
-- counts them.
SELECT rm.uuid, rm.session_id, rm.sequence, rm.role, rm.role_type, rm.content, rm.metadata,
       rm.created_at, rm.updated_at, rs.user_id, r.score, r.rank,
       octet_length(rm.content) + octet_length(rm.metadata::text) AS size {scan}

-- recall_kept_keys_citus --
-- The kept recall of get_memories_recall under Citus, first of two steps: on the session's
-- shard, its user (owner) and the keys the worker kept, best first (the memories' sessions,
-- sequences and scores). No row when nothing was computed. Citus refuses a lateral join from
-- this row to messages of other sessions (other shards), and a join through a materialized
-- list of them runs on every shard; so the store reads the memories next with
-- recall_live_citus, which names their sessions and reaches only those sessions' shards.
-- {kept} and {kept_filter} as in get_memories_recall.
SELECT o.user_id AS owner, e.recall_sessions, e.recall_sequences, e.recall_scores,
       e.recall_kept_at
FROM {kept} e
JOIN sessions o ON o.project_id = e.project_id AND o.session_id = e.session_id
               AND o.deleted_at IS NULL AND o.user_id IS NOT NULL AND o.message_count > 0
WHERE e.project_id = %(project_id)s AND e.session_id = %(exclude_session)s {kept_filter}

-- recall_live_citus --
-- Second step: the live messages of live sessions still owned by the same user among kept
-- keys (the sessions in recall_sessions, a superset by sequences: the store keeps exact
-- pairs, in rank order). The session ids pin the shards: Citus runs it on the shards of
-- those sessions only, however many shards the cluster has. Uuids as text, as there.
SELECT m.session_id, s.user_id, m.uuid::text AS m_uuid, m.sequence AS m_sequence,
       m.role AS m_role, m.role_type AS m_role_type, m.content AS m_content,
       m.metadata AS m_metadata, m.created_at AS m_created_at, m.updated_at AS m_updated_at
FROM messages m
JOIN sessions s ON s.project_id = m.project_id AND s.session_id = m.session_id
               AND s.deleted_at IS NULL AND s.user_id = %(owner)s
WHERE m.project_id = %(project_id)s AND m.session_id = ANY(%(recall_sessions)b::text[])
  AND m.sequence = ANY(%(recall_sequences)b::bigint[]) AND m.deleted_at IS NULL
