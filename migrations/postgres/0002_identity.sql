-- API tokens: the secret is stored only as an Argon2id hash (PHC string).
CREATE TABLE tokens (
    id           TEXT PRIMARY KEY,
    subject      TEXT NOT NULL,
    description  TEXT NOT NULL,
    hash         TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    created_by   TEXT NOT NULL,
    expires_at   TEXT,
    last_used_at TEXT,
    revoked_at   TEXT,
    replaced_by  TEXT
);
CREATE INDEX tokens_by_subject ON tokens (subject);

-- Each node agent's API credential, which the controller presents to it.
CREATE TABLE node_credentials (
    node       TEXT PRIMARY KEY,
    secret     TEXT NOT NULL,
    previous   TEXT,
    updated_at TEXT NOT NULL
);

-- Audit: the server's request id, the client's as a correlation id, the
-- token, the HTTP status, what changed and why a request was refused.
ALTER TABLE audit ADD COLUMN correlation_id TEXT;
ALTER TABLE audit ADD COLUMN token_id TEXT;
ALTER TABLE audit ADD COLUMN status_code INTEGER NOT NULL DEFAULT 0;
ALTER TABLE audit ADD COLUMN changes TEXT NOT NULL DEFAULT '';
ALTER TABLE audit ADD COLUMN message TEXT NOT NULL DEFAULT '';
CREATE INDEX audit_by_object ON audit (kind, project, name, id);
