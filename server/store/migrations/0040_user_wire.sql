-- 0040: every user's protobuf wire encoding kept beside it, so ListUsersChunked streams bytes.
-- Protobuf messages concatenate: a chunk of ListUsersChunkedResponse is its `users` entries
-- (tag, length, User bytes) one after another, then the token. users.wire holds the bytes of
-- fields 1-7 of memstore.v1.User (everything but session_count, which is counted at read
-- time and appended as field 8), written by a trigger on every insert and update, so every
-- writer (the API, restore, COPY) keeps it; the stream then concatenates it in SQL instead of
-- building one Python object per user (docs/performance.md, "Export as bytes").
-- The encoders follow https://protobuf.dev/programming-guides/encoding/: proto3 scalars are
-- omitted when default, oneof members (google.protobuf.Value's kind) never are.

-- A base-128 varint; negative numbers as their 64-bit two's complement (ten bytes).
CREATE FUNCTION memstore_pb_varint_long(n bigint) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    encoded bytea := ''::bytea;
    low int;
BEGIN
    LOOP
        low := (n & 127)::int;
        -- A logical shift: the arithmetic one would copy a negative number's sign bits.
        n := (n >> 7) & 144115188075855871;
        IF n = 0 THEN
            RETURN encoded || set_byte('\x00'::bytea, 0, low);
        END IF;
        encoded := encoded || set_byte('\x00'::bytea, 0, low | 128);
    END LOOP;
END
$$;

-- The same, inlinable into a query: the one- to three-byte cases without PL/pgSQL.
CREATE FUNCTION memstore_pb_varint(n bigint) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT CASE
    WHEN n >= 0 AND n < 128 THEN substring(int4send(n::int4) FROM 4)
    WHEN n >= 0 AND n < 16384 THEN
        substring(int4send(((((n & 127) | 128) << 8) | (n >> 7))::int4) FROM 3)
    WHEN n >= 0 AND n < 2097152 THEN
        substring(int4send(((((n & 127) | 128) << 16) | ((((n >> 7) & 127) | 128) << 8)
                            | (n >> 14))::int4) FROM 2)
    ELSE memstore_pb_varint_long(n)
END
$$;

-- A length-delimited field: its one-byte tag, the length, the bytes (always written).
CREATE FUNCTION memstore_pb_field(tag bytea, body bytea) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT tag || memstore_pb_varint(length(body)) || body
$$;

-- A proto3 string field: omitted when empty.
CREATE FUNCTION memstore_pb_string(tag bytea, value text) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT CASE WHEN value = '' THEN ''::bytea
            ELSE memstore_pb_field(tag, convert_to(value, 'UTF8')) END
$$;

-- A google.protobuf.Timestamp field (always written): seconds floored, nanos in [0, 1e9).
CREATE FUNCTION memstore_pb_timestamp(tag bytea, at timestamptz) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    micros bigint := (extract(epoch FROM at) * 1000000)::bigint;
    seconds bigint := floor(micros / 1000000.0)::bigint;
    nanos bigint := (micros - seconds * 1000000) * 1000;
BEGIN
    RETURN memstore_pb_field(tag,
        CASE WHEN seconds <> 0 THEN '\x08'::bytea || memstore_pb_varint(seconds)
             ELSE ''::bytea END
        || CASE WHEN nanos <> 0 THEN '\x10'::bytea || memstore_pb_varint(nanos)
                ELSE ''::bytea END);
END
$$;

-- The body of a google.protobuf.Value holding a JSON value (Struct's numbers are doubles).
CREATE FUNCTION memstore_pb_value(value jsonb) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    big_endian bytea;
    items bytea := ''::bytea;
    item jsonb;
BEGIN
    CASE jsonb_typeof(value)
    WHEN 'null' THEN
        RETURN '\x0800'::bytea;  -- null_value = NULL_VALUE (0)
    WHEN 'number' THEN
        big_endian := float8send(value::float8);
        RETURN '\x11'::bytea  -- number_value: fixed64, little-endian
            || substring(big_endian FROM 8 FOR 1) || substring(big_endian FROM 7 FOR 1)
            || substring(big_endian FROM 6 FOR 1) || substring(big_endian FROM 5 FOR 1)
            || substring(big_endian FROM 4 FOR 1) || substring(big_endian FROM 3 FOR 1)
            || substring(big_endian FROM 2 FOR 1) || substring(big_endian FROM 1 FOR 1);
    WHEN 'string' THEN
        RETURN memstore_pb_field('\x1a'::bytea, convert_to(value #>> '{}', 'UTF8'));
    WHEN 'boolean' THEN
        RETURN CASE WHEN value::boolean THEN '\x2001'::bytea ELSE '\x2000'::bytea END;
    WHEN 'object' THEN
        RETURN memstore_pb_field('\x2a'::bytea, memstore_pb_struct(value));
    ELSE  -- array: list_value, a ListValue of repeated Value `values` (field 1)
        FOR item IN SELECT elements FROM jsonb_array_elements(value) AS elements LOOP
            items := items || memstore_pb_field('\x0a'::bytea, memstore_pb_value(item));
        END LOOP;
        RETURN memstore_pb_field('\x32'::bytea, items);
    END CASE;
END
$$;

-- The body of a google.protobuf.Struct: one map entry (key 1, Value 2) per key.
CREATE FUNCTION memstore_pb_struct(value jsonb) RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
SELECT coalesce(string_agg(memstore_pb_field('\x0a'::bytea,
           memstore_pb_field('\x0a'::bytea, convert_to(entry.key, 'UTF8'))
           || memstore_pb_field('\x12'::bytea, memstore_pb_value(entry.value))), ''::bytea),
       ''::bytea)
FROM jsonb_each(value) AS entry
$$;

-- memstore.v1.User's fields 1-7 (metadata omitted when {}, as the object path leaves it unset).
CREATE FUNCTION memstore_user_wire(
    user_id text, email text, first_name text, last_name text, metadata jsonb,
    created_at timestamptz, updated_at timestamptz
) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT memstore_pb_string('\x0a'::bytea, user_id)
    || memstore_pb_string('\x12'::bytea, email)
    || memstore_pb_string('\x1a'::bytea, first_name)
    || memstore_pb_string('\x22'::bytea, last_name)
    || CASE WHEN metadata = '{}'::jsonb THEN ''::bytea
            ELSE memstore_pb_field('\x2a'::bytea, memstore_pb_struct(metadata)) END
    || memstore_pb_timestamp('\x32'::bytea, created_at)
    || memstore_pb_timestamp('\x3a'::bytea, updated_at)
$$;

CREATE FUNCTION memstore_users_wire() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.wire := memstore_user_wire(NEW.user_id, NEW.email, NEW.first_name, NEW.last_name,
                                   NEW.metadata, NEW.created_at, NEW.updated_at);
    RETURN NEW;
END
$$;

ALTER TABLE users ADD COLUMN wire bytea;
UPDATE users SET wire = memstore_user_wire(user_id, email, first_name, last_name, metadata,
                                           created_at, updated_at);
ALTER TABLE users ALTER COLUMN wire SET NOT NULL;
CREATE TRIGGER users_wire BEFORE INSERT OR UPDATE ON users
    FOR EACH ROW EXECUTE FUNCTION memstore_users_wire();
