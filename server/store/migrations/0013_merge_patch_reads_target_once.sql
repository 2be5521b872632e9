-- 0013: memstore_merge_patch reads the stored object once.
-- 0005's function looks each patched key up in the target (`target -> key`). When the
-- target is the row's stored metadata, a large object is TOASTed and PostgreSQL 15
-- detoasts it again on every lookup: quadratic in the number of keys again (6,000 keys
-- into a stored 6,000-key object: 1.7-2.1 s of CPU under the row lock on PostgreSQL 15,
-- and on Citus's PostgreSQL 15 workers; PostgreSQL 18 did not show it). This one expands
-- the target once (jsonb_each) and joins the patch to it by key: 60 ms for the same merge.
-- Same result, RFC 7396: the target's keys the patch does not name, then each patched key
-- (null removes it, objects merge recursively, everything else replaces).
CREATE OR REPLACE FUNCTION memstore_merge_patch(target jsonb, patch jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT CASE
    WHEN patch IS NULL OR jsonb_typeof(patch) <> 'object' THEN patch
    ELSE (
        SELECT coalesce(jsonb_object_agg(merged.key, merged.value), '{}'::jsonb)
        FROM (
            SELECT coalesce(patched.key, kept.key) AS key,
                   CASE WHEN patched.key IS NULL THEN kept.value
                        ELSE memstore_merge_patch(kept.value, patched.value) END AS value
            FROM jsonb_each(CASE WHEN jsonb_typeof(target) = 'object' THEN target END) AS kept
            FULL JOIN jsonb_each(patch) AS patched ON patched.key = kept.key
            WHERE patched.key IS NULL OR jsonb_typeof(patched.value) <> 'null'
        ) AS merged
    )
END
$$;
