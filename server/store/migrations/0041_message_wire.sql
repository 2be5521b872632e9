-- 0041: every message's protobuf wire encoding kept beside it, so ExportMessages streams bytes.
-- As users.wire (0040): messages.wire holds memstore.v1.Message's fields 1-3 and 5-9 (all but
-- content, which the export reads from its own column, so no message's text is stored twice),
-- written by a trigger on every insert and update (soft deletes and restores included).
-- Protobuf parsers take fields in any order, so the export appends content (field 4) after
-- them and wraps both in an ExportedMessage with the session id.

CREATE FUNCTION memstore_message_wire(
    uuid uuid, role text, role_type text, metadata jsonb, created_at timestamptz,
    updated_at timestamptz, sequence bigint, deleted_at timestamptz
) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT memstore_pb_string('\x0a'::bytea, uuid::text)
    || memstore_pb_string('\x12'::bytea, role)
    -- role_type: the RoleType number (ROLE_TYPES' order from 1; unknown text is NOROLE).
    || '\x18'::bytea || memstore_pb_varint(CASE role_type
           WHEN 'user' THEN 1 WHEN 'assistant' THEN 2 WHEN 'system' THEN 3
           WHEN 'tool' THEN 4 WHEN 'function' THEN 5 ELSE 6 END)
    || CASE WHEN metadata = '{}'::jsonb THEN ''::bytea
            ELSE memstore_pb_field('\x2a'::bytea, memstore_pb_struct(metadata)) END
    || memstore_pb_timestamp('\x32'::bytea, created_at)
    || memstore_pb_timestamp('\x3a'::bytea, updated_at)
    || CASE WHEN sequence = 0 THEN ''::bytea
            ELSE '\x40'::bytea || memstore_pb_varint(sequence) END
    || CASE WHEN deleted_at IS NULL THEN ''::bytea
            ELSE memstore_pb_timestamp('\x4a'::bytea, deleted_at) END
$$;

CREATE FUNCTION memstore_messages_wire() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.wire := memstore_message_wire(NEW.uuid, NEW.role, NEW.role_type, NEW.metadata,
                                      NEW.created_at, NEW.updated_at, NEW.sequence,
                                      NEW.deleted_at);
    RETURN NEW;
END
$$;

ALTER TABLE messages ADD COLUMN wire bytea;
UPDATE messages SET wire = memstore_message_wire(uuid, role, role_type, metadata, created_at,
                                                 updated_at, sequence, deleted_at);
ALTER TABLE messages ALTER COLUMN wire SET NOT NULL;
CREATE TRIGGER messages_wire BEFORE INSERT OR UPDATE ON messages
    FOR EACH ROW EXECUTE FUNCTION memstore_messages_wire();
