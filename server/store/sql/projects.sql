-- Projects and their API keys (stored as salted hashes; see migrations/0003).

-- create_project --
-- Inserts a project; a taken name raises UniqueViolation (AlreadyExists).
INSERT INTO projects (name) VALUES (%(name)s)
RETURNING project_id, name, created_at;

-- get_project --
-- One project by name; no row means NotFound.
SELECT project_id, name, created_at FROM projects WHERE name = %(name)s;

-- list_projects --
-- Every project, oldest first, with how many live keys each has.
SELECT p.project_id, p.name, p.created_at,
       (SELECT count(*) FROM api_keys k
        WHERE k.project_id = p.project_id AND k.revoked_at IS NULL) AS live_keys
FROM projects p ORDER BY p.project_id;

-- create_api_key --
-- Stores a new key's prefix and salted digest under a project found by get_project (in the
-- same transaction). A plain VALUES row: Citus writes it to its reference table in one step
-- (an INSERT ... SELECT there loses its parameters' types).
INSERT INTO api_keys (project_id, prefix, salt, digest, label)
VALUES (%(project_id)s, %(prefix)s, %(salt)s, %(digest)s, %(label)s)
RETURNING prefix, label, created_at, revoked_at, %(project)s::text AS project;

-- find_api_key --
-- What authentication needs to check one presented key: found by its public prefix.
SELECT project_id, salt, digest, revoked_at FROM api_keys WHERE prefix = %(prefix)s;

-- match_api_keys --
-- How many keys' prefixes start with %(prefix)s (revoked ones too), and the first of them:
-- `keys revoke` takes any start of a prefix that names one key. starts_with, not LIKE: the
-- prefix's `_` would be a wildcard there.
SELECT count(*) AS matching, min(prefix) AS prefix
FROM api_keys WHERE starts_with(prefix, %(prefix)s);

-- revoke_api_key --
-- Marks a key revoked (idempotent: the first revocation time stays).
-- The clock is read in FROM: Citus refuses a non-immutable function in SET.
UPDATE api_keys k SET revoked_at = coalesce(k.revoked_at, t.now)
FROM projects p, (SELECT clock_timestamp() AS now) AS t
WHERE k.prefix = %(prefix)s AND p.project_id = k.project_id
RETURNING k.prefix, k.label, k.created_at, k.revoked_at, p.name AS project;

-- list_api_keys --
-- Keys of one project (or of all when project is NULL): prefix and state, never a secret.
SELECT k.prefix, k.label, k.created_at, k.revoked_at, p.name AS project
FROM api_keys k JOIN projects p ON p.project_id = k.project_id
WHERE %(project)s::text IS NULL OR p.name = %(project)s
ORDER BY k.key_id;

-- any_api_key --
-- Whether any key was ever made (revoked ones count): authentication is then on.
SELECT EXISTS (SELECT 1 FROM api_keys) AS any_key;
