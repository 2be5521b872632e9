-- 0017: memstore_touch never passes the last microsecond of 9999.
-- Restore keeps a backup's timestamps, and accepts any a Timestamp can hold up to
-- 9999-12-31T23:59:59.999999Z. One microsecond past such an updated_at is the year 10000,
-- which PostgreSQL stores but Python's datetime cannot hold: after one AddMemory (or update)
-- of that session, every read of it, and every ListSessions, ExportSessions and backup of
-- its project, failed ("timestamp too large (after year 10K)", answered as INVALID_ARGUMENT
-- naming a field of the request). The touch now stops at that microsecond: updated_at stays
-- strictly increasing everywhere a clock can reach, and equal there.
-- A CASE rather than least(): least() skips a NULL, and a NULL `last` must still give `now`.
-- Still only immutable operators and constants, so PostgreSQL inlines it (0015) and Citus
-- accepts it in ON CONFLICT DO UPDATE (0011).
CREATE OR REPLACE FUNCTION memstore_touch(now timestamptz, last timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT greatest(now, timezone('UTC', CASE
    WHEN timezone('UTC', last) >= timestamp '9999-12-31 23:59:59.999999'
    THEN timestamp '9999-12-31 23:59:59.999999'
    ELSE timezone('UTC', last) + interval '1 microsecond'
END))
$$;
