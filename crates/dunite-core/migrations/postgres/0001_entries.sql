-- Entries of every cache kept in this database, one namespace per cache. The same schema as
-- the SQLite migration (see there for what each column means), in PostgreSQL's types.
CREATE TABLE entries (
    namespace  TEXT     NOT NULL,
    key        TEXT     NOT NULL,
    file       TEXT     NOT NULL,
    size       BIGINT   NOT NULL CHECK (size >= 0),
    version    BIGINT   NOT NULL,
    stored_at  BIGINT   NOT NULL,
    state      BIGINT   NOT NULL DEFAULT 0,
    meta       TEXT     NOT NULL DEFAULT '',
    PRIMARY KEY (namespace, key)
);

CREATE INDEX entries_lru ON entries (namespace, state, version);

-- One row per namespace. Every write transaction locks its namespace's row first
-- (SELECT ... FOR UPDATE), which serialises writers across instances the way SQLite's
-- database lock does within one.
CREATE TABLE totals (
    namespace TEXT   PRIMARY KEY,
    bytes     BIGINT NOT NULL CHECK (bytes >= 0),
    entries   BIGINT NOT NULL CHECK (entries >= 0)
);
