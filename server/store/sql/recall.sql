-- GetMemory's recall ranked here (on the request path, and by the embedding worker to keep
-- it): the user's other live sessions against the session's last messages, by search.sql's
-- rankings (search_full_text, or search_hybrid with vectors) over these query, match,
-- distance and scope fragments; on Citus with the session's own reads apart (*_citus). The
-- recall the worker kept is read in kept_recall.sql.

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

-- recall_match_scan --
-- Match fragment of recall: the same match, written so that the GIN index cannot serve it.
-- Recall's query is every word of the session's last messages (a hundred or more): through
-- the index, their posting lists cover the whole project, every user's messages, and were
-- read again for each of the user's sessions (1.8 s at 65,000 messages, docs/search.md).
-- Not indexable, the match is checked on the user's own messages, read by session key: the
-- cost follows the user's messages, not the project's.
(m.search @@ q.query) IS TRUE

-- search_filter_other_sessions --
-- Scope fragment of recall: every session but the one being read.
AND m.session_id <> %(exclude_session)s

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
-- ({memories}: recall_memories over the user's other live sessions), NULL when there is none;
-- vector, the latest of them, is NULL until the worker has embedded one, and recall then
-- ranks by words alone. {words} is recall_query_text, {window_vectors} recall_window_vectors
-- and {window_scan} recall_window_scan. The nearest memories are a grouped join, not a
-- subquery per vector, so that Citus plans it as one fan-out.
SELECT w.query, v.vectors[1] AS vector, v.vectors, n.nearest
FROM ({words}) AS w,
     (SELECT {window_vectors} AS vectors) AS v,
     (SELECT array_agg(d.nearest ORDER BY d.sequence DESC) AS nearest
      FROM (SELECT x.sequence, min(e.embedding <=> x.embedding) AS nearest
            FROM (SELECT e.sequence, e.embedding {window_scan}) AS x, {memories}
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
-- session's last %(window)s embedded live messages, newest first ({window_scan}).
ARRAY(SELECT e.embedding {window_scan})

-- recall_memories --
-- The memories in scope, after the FROM list's first item: the embedded live messages of
-- this model ({filters}: the user's other live sessions) as e, their messages m and sessions
-- s. For recall_query_vector's and recall_nearest_citus's nearest memories.
message_embeddings e
JOIN messages m ON m.project_id = e.project_id AND m.session_id = e.session_id
               AND m.sequence = e.sequence
JOIN sessions s ON s.project_id = m.project_id AND s.session_id = m.session_id
WHERE e.project_id = %(project_id)s AND e.model = %(model)s
  AND m.deleted_at IS NULL AND s.deleted_at IS NULL {filters}

-- recall_window_scan --
-- The window's embedded messages, after a select list over e: the message_embeddings rows of
-- the session's last %(window)s embedded live messages, newest first. For
-- recall_window_vectors and recall_query_vector's nearest memories.
FROM message_embeddings e
JOIN messages m ON m.project_id = e.project_id
               AND m.session_id = e.session_id AND m.sequence = e.sequence
WHERE e.project_id = %(project_id)s AND e.session_id = %(exclude_session)s
  AND e.model = %(model)s AND m.deleted_at IS NULL
ORDER BY e.sequence DESC
LIMIT %(window)s

-- recall_nearest_citus --
-- On Citus, recall_query_vector's nearest apart: for each of the window's vectors
-- (%(vectors)s, recall_query_citus's, newest first) the distance to its nearest memory in
-- scope ({memories}: recall_memories over the owner named), a row each in the same order; no row when there is
-- none. One fan-out: each shard's minimum, combined on the coordinator (an array_agg over
-- these rows was planned as a subplan first).
SELECT x.i, min(e.embedding <=> x.embedding) AS nearest
FROM unnest(%(vectors)s::vector[]) WITH ORDINALITY AS x(embedding, i), {memories}
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
