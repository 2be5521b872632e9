-- 0015: memstore_touch as PostgreSQL can inline it.
-- 0011's body adds the microsecond to a timestamptz (timestamptz + interval, a STABLE
-- operator: with months or days it depends on the time zone). PostgreSQL inlines an IMMUTABLE
-- SQL function only when its body is immutable too, so every statement that set an updated_at
-- (every AddMemory, UpdateUser, UpdateSession, ...) ran it as a function call instead: its
-- body parsed and planned again at each execution, ~5% of AddMemory(1)'s CPU in PostgreSQL
-- (docs/performance.md, "AddMemory's cost inside PostgreSQL"). The same value from immutable
-- operators only: the time as a UTC timestamp (no zone offsets, no daylight saving), plus the
-- microsecond, back to a timestamptz. Same result for every input (NULL and infinity too);
-- still IMMUTABLE, as Citus requires of a function in ON CONFLICT DO UPDATE.
CREATE OR REPLACE FUNCTION memstore_touch(now timestamptz, last timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT greatest(now, timezone('UTC', timezone('UTC', last) + interval '1 microsecond'))
$$;
