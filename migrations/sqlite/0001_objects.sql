-- Every object of every kind; cluster-scoped kinds use project ''.
CREATE TABLE objects (
    kind             TEXT    NOT NULL,
    project          TEXT    NOT NULL,
    name             TEXT    NOT NULL,
    uid              TEXT    NOT NULL UNIQUE,
    resource_version INTEGER NOT NULL,
    body             TEXT    NOT NULL,
    PRIMARY KEY (kind, project, name)
);

-- The change log watches replay from; resource_version is global and
-- strictly increasing across all kinds.
CREATE TABLE changes (
    resource_version INTEGER PRIMARY KEY,
    kind             TEXT    NOT NULL,
    project          TEXT    NOT NULL,
    name             TEXT    NOT NULL,
    event_type       TEXT    NOT NULL,
    body             TEXT    NOT NULL
);
CREATE INDEX changes_by_kind ON changes (kind, resource_version);

-- One row per mutation, committed in the same transaction as the mutation.
CREATE TABLE audit (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    at               TEXT    NOT NULL,
    request_id       TEXT    NOT NULL,
    actor            TEXT    NOT NULL,
    verb             TEXT    NOT NULL,
    kind             TEXT    NOT NULL,
    project          TEXT    NOT NULL,
    name             TEXT    NOT NULL,
    resource_version INTEGER NOT NULL,
    result           TEXT    NOT NULL
);
