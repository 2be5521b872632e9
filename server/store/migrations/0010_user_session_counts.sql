-- 0010: each user's number of live sessions, kept by the store beside the user, so that
-- GetUser, UpdateUser and ListUsers read it instead of counting the user's sessions. Under
-- Citus sessions are placed by session, so that count was a fan-out to every shard of the
-- sessions group on every user read (docs/scaling.md); this table is placed with the users
-- (store/distribute.py), and a read of one user stays on one shard.
--
-- A table of its own rather than a users column: a session write then locks this row, never
-- the user row, which DeleteUser holds FOR UPDATE while it locks the user's sessions (a lock
-- cycle with DeleteSession, which holds its session first); and the users_wire trigger
-- (0040) does not re-encode the user for every session made or deleted.
--
-- Every write that makes a session of a user live or not live (AddMemory making or reviving
-- it, CreateSession, DeleteSession, UndeleteSession, Restore) changes the count in its own
-- transaction, after the session row (store/sessions.py count_live_sessions). The foreign
-- key's cascade removes the row with its user (DeleteUser, TRUNCATE ... CASCADE).
CREATE TABLE user_session_counts (
    project_id bigint NOT NULL,
    user_id text NOT NULL,
    session_count bigint NOT NULL,
    PRIMARY KEY (project_id, user_id),
    FOREIGN KEY (project_id, user_id) REFERENCES users ON DELETE CASCADE
);

-- Every user with a session gets its row (0 when none is live), so a later write of one of
-- those sessions updates a row rather than inserting one (an insert's key check would lock
-- the user row). Writers wait for the count: nothing is missed.
LOCK TABLE sessions IN SHARE MODE;
INSERT INTO user_session_counts (project_id, user_id, session_count)
SELECT s.project_id, s.user_id, count(*) FILTER (WHERE s.deleted_at IS NULL) FROM sessions s
WHERE s.user_id IS NOT NULL
GROUP BY s.project_id, s.user_id;
