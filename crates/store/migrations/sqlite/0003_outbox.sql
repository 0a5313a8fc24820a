-- The transactional outbox: one row per order event (created, paid, cancelled, expired),
-- written in the same transaction as the change, removed once published to NATS
-- JetStream. Filled only when a relay is configured (`nats_url`).
CREATE TABLE outbox (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    order_id  TEXT NOT NULL,
    event     TEXT NOT NULL,
    at_ms     INTEGER NOT NULL
);
