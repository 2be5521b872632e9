// memstore from Node.js with @grpc/grpc-js and @grpc/proto-loader, reading the
// repository's protos: creates a user, adds memory to a session, reads it back
// and streams every user with ListUsersChunked. Prints a JSON summary.
//
//   npm ci && node example.js [host:port]     (default localhost:50051)
//
// MEMSTORE_API_KEY, when set, is sent as "authorization: Bearer <key>".
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTOS = path.join(__dirname, "..", "..", "protos");
const definition = protoLoader.loadSync(
  ["memstore/v1/user_service.proto", "memstore/v1/session_service.proto"],
  // keepCase: fields as in the protos (user_id); longs as strings (int64 counts);
  // oneofs: Struct values name their kind.
  { includeDirs: [PROTOS], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true },
);
const v1 = grpc.loadPackageDefinition(definition).memstore.v1;

// google.protobuf.Struct travels as {fields: {key: {stringValue: ...}}}; these
// two helpers convert plain JSON objects to and from it.
function toValue(value) {
  if (value === null) return { nullValue: "NULL_VALUE" };
  if (Array.isArray(value)) return { listValue: { values: value.map(toValue) } };
  switch (typeof value) {
    case "number": return { numberValue: value };
    case "string": return { stringValue: value };
    case "boolean": return { boolValue: value };
    default: return { structValue: toStruct(value) };
  }
}

function toStruct(object) {
  const fields = {};
  for (const [key, value] of Object.entries(object)) fields[key] = toValue(value);
  return { fields };
}

function fromValue(value) {
  switch (value.kind) {
    case "nullValue": return null;
    case "numberValue": return value.numberValue;
    case "stringValue": return value.stringValue;
    case "boolValue": return value.boolValue;
    case "listValue": return (value.listValue.values || []).map(fromValue);
    default: return fromStruct(value.structValue);
  }
}

function fromStruct(struct) {
  const out = {};
  for (const [key, value] of Object.entries((struct && struct.fields) || {})) {
    out[key] = fromValue(value);
  }
  return out;
}

// Unary calls as promises, with the API key (if any) in the call metadata.
function caller(client, metadata) {
  return (method, request) =>
    new Promise((resolve, reject) => {
      client[method](request, metadata, { deadline: Date.now() + 10000 }, (err, reply) =>
        err ? reject(err) : resolve(reply),
      );
    });
}

async function listAllUsers(users, metadata) {
  // ListUsersChunked is a server stream: each chunk holds users and a resume token.
  const ids = [];
  let chunks = 0;
  const stream = users.ListUsersChunked({ chunk_size: 2 }, metadata);
  for await (const chunk of stream) {
    chunks += 1;
    for (const user of chunk.users) ids.push(user.user_id);
  }
  return { ids, chunks };
}

async function main() {
  const address = process.argv[2] || "localhost:50051";
  const credentials = grpc.credentials.createInsecure();
  const users = new v1.UserService(address, credentials);
  const sessions = new v1.SessionService(address, credentials);
  const metadata = new grpc.Metadata();
  if (process.env.MEMSTORE_API_KEY) {
    metadata.set("authorization", `Bearer ${process.env.MEMSTORE_API_KEY}`);
  }
  const user = caller(users, metadata);
  const session = caller(sessions, metadata);

  const userId = `node-${Date.now()}`;
  const created = await user("CreateUser", {
    user_id: userId,
    email: "ada@example.com",
    metadata: toStruct({ plan: "pro", languages: ["en", "fr"] }),
  });
  const sessionId = `${userId}-chat`;
  await session("AddMemory", {
    session_id: sessionId,
    user_id: userId,
    messages: [
      { role: "Ada", role_type: "ROLE_TYPE_USER", content: "I prefer tea." },
      { role: "agent", role_type: "ROLE_TYPE_ASSISTANT", content: "Tea it is." },
    ],
  });
  const memory = await session("GetMemory", { session_id: sessionId, lastn: 10 });
  const listed = await listAllUsers(users, metadata);
  users.close();
  sessions.close();
  console.log(JSON.stringify({
    user_id: created.user.user_id,
    metadata: fromStruct(created.user.metadata),
    memory: memory.messages.map((m) => ({ role_type: m.role_type, content: m.content })),
    session_message_count: Number(memory.session.message_count),
    chunked_users: listed.ids,
    chunks: listed.chunks,
  }));
}

main().catch((err) => {
  console.error(`memstore example failed: ${err.code !== undefined ? `code ${err.code}: ` : ""}${err.message}`);
  process.exit(1);
});
