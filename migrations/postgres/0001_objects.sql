-- Every object of every kind; cluster-scoped kinds use project ''.
-- "C" collation: list order and continue tokens compare bytes, as on SQLite.
CREATE TABLE objects (
    kind             TEXT COLLATE "C" NOT NULL,
    project          TEXT COLLATE "C" NOT NULL,
    name             TEXT COLLATE "C" NOT NULL,
    uid              TEXT   NOT NULL UNIQUE,
    resource_version BIGINT NOT NULL,
    body             TEXT   NOT NULL,
    PRIMARY KEY (kind, project, name)
);

-- The change log watches replay from; resource_version is global and
-- strictly increasing across all kinds and all apiserver replicas.
CREATE TABLE changes (
    resource_version BIGINT PRIMARY KEY,
    kind             TEXT   NOT NULL,
    project          TEXT   NOT NULL,
    name             TEXT   NOT NULL,
    event_type       TEXT   NOT NULL,
    body             TEXT   NOT NULL
);
CREATE INDEX changes_by_kind ON changes (kind, resource_version);

-- One row per mutation, committed in the same transaction as the mutation.
CREATE TABLE audit (
    id               BIGSERIAL PRIMARY KEY,
    at               TEXT   NOT NULL,
    request_id       TEXT   NOT NULL,
    actor            TEXT   NOT NULL,
    verb             TEXT   NOT NULL,
    kind             TEXT   NOT NULL,
    project          TEXT   NOT NULL,
    name             TEXT   NOT NULL,
    resource_version BIGINT NOT NULL,
    result           TEXT   NOT NULL
);
