-- 0011: updated_at strictly increasing under the row lock.
-- Every update took greatest(clock, the row's updated_at): never back, but equal when the
-- clock was read before the row lock and a concurrent update of the row committed a later
-- time first. Citus reads the clock on the coordinator before the statement reaches the
-- shard (tests/reliability/test_races.py saw two UpdateUser answers with one updated_at), and
-- any clock can step back. Then the order of two updates cannot be told from their times.
-- memstore_touch(now, last) is `now`, or one microsecond past `last` when the clock has not
-- passed it. IMMUTABLE, so Citus accepts it over a column in an UPDATE's SET and in ON
-- CONFLICT DO UPDATE (where it refuses a stable function or operator): adding microseconds to
-- a timestamptz does not depend on the time zone (only days and months do).
CREATE FUNCTION memstore_touch(now timestamptz, last timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT greatest(now, last + interval '1 microsecond')
$$;
