-- The charge ledger: an order the payment provider may have charged, written before the
-- provider is called and removed once the order is paid, nothing was charged, or the
-- charge was refunded. A restart refunds the entries whose orders closed unpaid.
CREATE TABLE charge_attempts (
    order_id         VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PRIMARY KEY,
    amount_cents     BIGINT NOT NULL,
    attempted_at_ms  BIGINT NOT NULL
) ENGINE = InnoDB;
