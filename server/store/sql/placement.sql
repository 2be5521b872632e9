-- Citus: where the rows of users and sessions are (store/placement.py).

-- shards_citus --
-- The shards of the tables named: each one's lowest hash of the distribution column and the
-- node group holding it (the first, were a shard kept on several), in order.
SELECT s.logicalrelid::regclass::text AS table_name, s.shardminvalue::int4 AS lowest,
       min(p.groupid) AS node_group
FROM pg_dist_shard s
JOIN pg_dist_placement p ON p.shardid = s.shardid
WHERE s.logicalrelid::regclass::text = ANY(%(tables)s::text[])
GROUP BY s.logicalrelid, s.shardid, s.shardminvalue
ORDER BY table_name, lowest;
