-- Cross-instance fill leases (PostgreSQL only; SQLite serves one process, whose fills are
-- single-flight in memory). The first instance to miss a key inserts its lease; the others
-- follow its spool in the shared cache directory instead of asking the upstream again. See
-- `dunite_core::fill::lease` for the protocol.
--
-- The version is a timestamp, not the next small number, so that migrations added on other
-- branches cannot collide with it.
CREATE TABLE fill_leases (
    namespace  TEXT        NOT NULL,
    key        TEXT        NOT NULL,
    -- The instance that owns the fill (host, pid and a random nonce), and the lease's number
    -- within it: together they name this lease, so a release or a heartbeat never touches a
    -- successor's row.
    owner      TEXT        NOT NULL,
    lease      BIGINT      NOT NULL,
    -- The owner's liveness, on the database's clock (hosts' clocks may differ): a lease
    -- whose heartbeat is older than the fill lease timeout is taken over.
    heartbeat  TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The spool's file name in the cache's `tmp/` directory ('' until the upstream answered),
    -- the body's announced size, and what the fill learnt from the answer, encoded.
    spool      TEXT        NOT NULL DEFAULT '',
    total      BIGINT,
    head       TEXT        NOT NULL DEFAULT '',
    PRIMARY KEY (namespace, key)
);
