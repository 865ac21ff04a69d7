-- Operators' pins: 1 keeps the entry out of eviction (it still counts against the cap); set
-- and cleared through `EntryStore::set_pinned`, kept when the entry is replaced.
ALTER TABLE entries ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0;

-- LRU selection skips pinned rows by the index, not by reading them.
DROP INDEX entries_lru;
CREATE INDEX entries_lru ON entries (namespace, state, pinned, version);

-- Which origins (for OCI: repositories) an entry was served through. Content-addressed
-- entries are shared, so a key may have several. Rows whose entry is gone are pruned by
-- `EntryStore::usage_by_origin` and by purges; the table holds at most one row per entry and
-- origin that served it.
CREATE TABLE entry_origins (
    namespace TEXT NOT NULL,
    key       TEXT NOT NULL,
    origin    TEXT NOT NULL,
    PRIMARY KEY (namespace, key, origin)
);

CREATE INDEX entry_origins_by_origin ON entry_origins (namespace, origin);
