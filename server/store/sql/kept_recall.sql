-- GetMemory's window and the recall the embedding worker kept for it (session_embeddings with
-- pgvector, session_word_recall without): read for concurrent calls in one statement, or on
-- Citus in two steps. Recall ranked anew is in recall.sql.

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
