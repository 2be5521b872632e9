-- The recount of each user's live sessions (`memstore recount`, store/recount.py): the kept
-- count (user_session_counts, migration 0010) made equal to the rows again where it is not.
-- Every session write keeps it in step in its own transaction, so it is off only where a
-- node lost part of a committed write (a Citus worker's asynchronous standby promoted after
-- it was cut off: docs/scaling.md).

-- recount_users --
-- A keyset batch of users, every project's, by (project_id, user_id), with their kept counts
-- (0 without a row). Under Citus a fan-out: user_session_counts is placed with users.
SELECT u.project_id, u.user_id, coalesce(c.session_count, 0) AS kept
FROM users u
LEFT JOIN user_session_counts c ON c.project_id = u.project_id AND c.user_id = u.user_id
WHERE (u.project_id, u.user_id) > (%(after_project)s::bigint, %(after_user)s::text)
ORDER BY u.project_id, u.user_id
LIMIT %(limit)s;

-- recount_live --
-- The live sessions of the batch's users (the pairs are matched by the caller). Under Citus a
-- fan-out: sessions are placed by session.
SELECT s.project_id, s.user_id, count(*) AS live
FROM sessions s
WHERE s.user_id = ANY(%(user_ids)s::text[]) AND s.project_id = ANY(%(project_ids)s::bigint[])
  AND s.deleted_at IS NULL
GROUP BY s.project_id, s.user_id;

-- recount_hold --
-- The user's count row, made (at 0) where there is none, so that it can be locked; no row
-- when the user is gone. The user is locked FOR KEY SHARE, as a session write made for them
-- locks it (own_new_session). Under Citus one shard, the user's.
INSERT INTO user_session_counts AS c (project_id, user_id, session_count)
SELECT u.project_id, u.user_id, 0 FROM users u
WHERE u.project_id = %(project_id)s AND u.user_id = %(user_id)s
FOR KEY SHARE
ON CONFLICT (project_id, user_id) DO NOTHING;

-- recount_lock --
-- The user's count row, locked: a session write of theirs that changes it waits for this
-- transaction, and one that changed it before has committed, so the next statement's count
-- of the sessions sees its session. No row: the user is gone. Under Citus one shard.
SELECT c.session_count FROM user_session_counts c
WHERE c.project_id = %(project_id)s AND c.user_id = %(user_id)s
FOR UPDATE;

-- recount_user --
-- One user's live sessions, counted under the lock of their count row. Under Citus a fan-out.
SELECT count(*) AS live FROM sessions s
WHERE s.project_id = %(project_id)s AND s.user_id = %(user_id)s AND s.deleted_at IS NULL;

-- recount_set --
-- The user's count, made equal to their rows. Under Citus one shard.
UPDATE user_session_counts SET session_count = %(live)s
WHERE project_id = %(project_id)s AND user_id = %(user_id)s;

-- recount_kept --
-- The kept counts of some users now (the pairs are matched by the caller), as recount_users
-- reads them. Under Citus on those users' shards only.
SELECT u.project_id, u.user_id, coalesce(c.session_count, 0) AS kept
FROM users u
LEFT JOIN user_session_counts c ON c.project_id = u.project_id AND c.user_id = u.user_id
WHERE u.user_id = ANY(%(user_ids)s::text[]) AND u.project_id = ANY(%(project_ids)s::bigint[]);

-- recount_named_users --
-- A keyset batch of the users that sessions name, every project's, by (project_id, user_id).
-- Under Citus, where no foreign key ties sessions to users, a lost write may have taken a
-- user's row and left sessions naming it (recount_kept then finds no such user). A fan-out.
SELECT DISTINCT s.project_id, s.user_id
FROM sessions s
WHERE s.user_id IS NOT NULL
  AND (s.project_id, s.user_id) > (%(after_project)s::bigint, %(after_user)s::text)
ORDER BY s.project_id, s.user_id
LIMIT %(limit)s;
