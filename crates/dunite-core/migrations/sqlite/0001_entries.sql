-- Entries of every cache kept in this database, one namespace per cache.
CREATE TABLE entries (
    namespace  TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    -- Payload file, relative to the cache's data directory. Unique per store: a path is
    -- never reused, so a reader holding an old file is never handed new bytes.
    file       TEXT    NOT NULL,
    size       INTEGER NOT NULL CHECK (size >= 0),
    -- Last store or access stamp (microseconds, strictly increasing per process): the LRU
    -- order, and the condition an eviction's removal checks.
    version    INTEGER NOT NULL,
    stored_at  INTEGER NOT NULL,
    -- 0: live; 1: being removed (the file may already be gone; never handed to readers).
    state      INTEGER NOT NULL DEFAULT 0,
    -- What the cache kind records beyond the core columns; opaque to the core.
    meta       TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (namespace, key)
);

-- LRU selection walks this index: a pass costs what it evicts, not what the cache holds.
CREATE INDEX entries_lru ON entries (namespace, state, version);

-- The accounted total, updated in the same transaction as the rows: O(1) to read.
CREATE TABLE totals (
    namespace TEXT    PRIMARY KEY,
    bytes     INTEGER NOT NULL CHECK (bytes >= 0),
    entries   INTEGER NOT NULL CHECK (entries >= 0)
);
