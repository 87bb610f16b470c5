-- The runtime's tables, owned by each service alongside its own (see shared/runtime/src/db.rs).

-- Transactional outbox: rows are written in the same transaction as the change they describe.
-- The relay later gives each committed row a delivery cursor, in commit order, so a watcher
-- reading "cursor > N" never misses a row that committed late.
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    event_type TEXT NOT NULL,
    subject TEXT NOT NULL,
    payload TEXT NOT NULL,
    occurred_at_us BIGINT NOT NULL,
    delivery_cursor BIGINT UNIQUE
);
CREATE INDEX outbox_undelivered ON outbox (id) WHERE delivery_cursor IS NULL;

-- One row: the next delivery cursor. Locking it serializes relays across replicas.
CREATE TABLE outbox_relay (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    next_cursor BIGINT NOT NULL
);
INSERT INTO outbox_relay (id, next_cursor) VALUES (1, 1);

-- Idempotency keys: the first outcome of each mutation, replayed on retry.
CREATE TABLE idempotency_keys (
    idempotency_key TEXT PRIMARY KEY,
    operation TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    status_code INTEGER NOT NULL,
    response BLOB NOT NULL,
    created_at_us BIGINT NOT NULL
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at_us);
