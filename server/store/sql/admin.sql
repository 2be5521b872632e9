-- The database as a whole: reachability, the shared page-token key, what it holds
-- (migrations 0007 and 0012, Citus). The purge is in purge.sql.

-- ping --
-- One round trip, to notice a database that went away while no call was made.
SELECT 1;

-- token_key --
-- Creates the page-token key once (first worker wins) and reads the one that is kept.
WITH made AS (
    INSERT INTO settings (name, value) VALUES ('page_token_key', %(candidate)s)
    ON CONFLICT (name) DO NOTHING
    RETURNING value
)
SELECT value FROM made
UNION ALL
SELECT value FROM settings WHERE name = 'page_token_key'
LIMIT 1;

-- get_backup_source --
-- The name of the project a backup reads (its id, from the caller's key, always exists).
SELECT name FROM projects WHERE project_id = %(project_id)s;

-- vectors_ready --
-- Whether migration 0007 made the vector tables (pgvector was available), whether 0012 made
-- the table of recall kept by words, and whether the database is a Citus coordinator (a few
-- writes then take another path: store/distribute.py).
SELECT to_regclass('message_embeddings') IS NOT NULL AS ready,
       to_regclass('session_word_recall') IS NOT NULL AS word_recall,
       EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') AS citus;
