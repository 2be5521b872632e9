-- Citus: where the users table's rows are (store/placement.py).

-- users_shards_citus --
-- The users table's shards: each one's lowest hash of user_id and the node group holding it
-- (the first, were a shard kept on several). store/placement.py groups GetUser's shared
-- reads by node with them.
SELECT s.shardminvalue::int4 AS lowest, min(p.groupid) AS node_group
FROM pg_dist_shard s
JOIN pg_dist_placement p ON p.shardid = s.shardid
WHERE s.logicalrelid = 'users'::regclass
GROUP BY s.shardid, s.shardminvalue
ORDER BY lowest;
