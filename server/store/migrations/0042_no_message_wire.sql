-- 0042: messages keep no protobuf encoding of their own (migration 0041, withdrawn, made one).
-- Its trigger cost every AddMemory: 0.80 of the store-level write rate for one message, +44 us
-- of PostgreSQL CPU per message (docs/performance.md, "Export as bytes"); encoding at read
-- time instead made ExportMessages slower than building objects in Python. Writes are what an
-- agent waits for on every turn, an export is a bulk job: ExportMessages builds its chunks in
-- Python again. A database that applied 0041 loses its column, trigger and functions here;
-- on any other this changes nothing.
DROP TRIGGER IF EXISTS messages_wire ON messages;
DROP FUNCTION IF EXISTS memstore_messages_wire();
DROP FUNCTION IF EXISTS memstore_message_wire(
    uuid, text, text, jsonb, timestamptz, timestamptz, bigint, timestamptz);
ALTER TABLE messages DROP COLUMN IF EXISTS wire;
