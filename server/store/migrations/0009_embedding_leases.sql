-- 0009: the embedding queue leases its rows instead of holding their locks. A worker used
-- to keep its claimed rows locked while the model ran, and its writes then waited on
-- sessions and messages that DeleteUser was removing while DeleteUser waited on those
-- rows: a deadlock that failed DeleteUser. Now a claim only stamps leased_until and
-- commits; the worker holds no lock while it embeds, and a worker that dies leaves its
-- rows to be claimed again when the lease runs out.
ALTER TABLE embedding_queue ADD COLUMN leased_until timestamptz;
