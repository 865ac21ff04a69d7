-- The same as the SQLite migration (see there for what each part means), in PostgreSQL's
-- types.
ALTER TABLE entries ADD COLUMN pinned BIGINT NOT NULL DEFAULT 0;

DROP INDEX entries_lru;
CREATE INDEX entries_lru ON entries (namespace, state, pinned, version);

CREATE TABLE entry_origins (
    namespace TEXT NOT NULL,
    key       TEXT NOT NULL,
    origin    TEXT NOT NULL,
    PRIMARY KEY (namespace, key, origin)
);

CREATE INDEX entry_origins_by_origin ON entry_origins (namespace, origin);
