-- The transactional outbox: one row per order event (created, paid, cancelled, expired),
-- written in the same transaction as the change, removed once published to NATS
-- JetStream. Filled only when a relay is configured (`nats_url`). One writer commits
-- batches in order, so sequence numbers become visible in order.
CREATE TABLE outbox (
    seq       BIGINT AUTO_INCREMENT PRIMARY KEY,
    order_id  VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    event     VARCHAR(16) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    at_ms     BIGINT NOT NULL
) ENGINE = InnoDB;
