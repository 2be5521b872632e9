-- The connection's own housekeeping (server/store/db.py).

-- forget_prepared --
-- Drops the connection's prepared statements; psycopg, seeing the command, forgets them too
-- and prepares them again on later uses (db.fetch_pipelined, after an error in a pipeline).
DEALLOCATE ALL;
