-- Stampede's PostgreSQL schema. Times are milliseconds since the Unix epoch (UTC);
-- money is integer cents; ids are their prefixed text form (UUID v7, time-ordered, so
-- inserts land at the right edge of the primary key's B-tree).
CREATE TABLE products (
    sku            TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    price_cents    BIGINT NOT NULL CHECK (price_cents >= 0),
    available      BIGINT NOT NULL CHECK (available >= 0),
    created_at_ms  BIGINT NOT NULL
);

CREATE TABLE flash_sales (
    id              TEXT PRIMARY KEY,
    sku             TEXT NOT NULL REFERENCES products (sku),
    price_cents     BIGINT NOT NULL CHECK (price_cents >= 0),
    quantity        BIGINT NOT NULL CHECK (quantity > 0),
    per_user_limit  BIGINT NOT NULL CHECK (per_user_limit > 0),
    starts_at_ms    BIGINT NOT NULL,
    ends_at_ms      BIGINT NOT NULL CHECK (ends_at_ms > starts_at_ms),
    created_at_ms   BIGINT NOT NULL
);

-- The idempotency record (user_id, idempotency_key) lives in the order's row, written in
-- the same transaction. Its uniqueness is kept by the engine, which owns every write, so
-- the hot insert maintains one index only: the primary key.
CREATE TABLE orders (
    id               TEXT PRIMARY KEY,
    user_id          TEXT NOT NULL,
    sale_id          TEXT NOT NULL REFERENCES flash_sales (id),
    sku              TEXT NOT NULL,
    quantity         BIGINT NOT NULL CHECK (quantity > 0),
    amount_cents     BIGINT NOT NULL CHECK (amount_cents >= 0),
    status           TEXT NOT NULL CHECK (status IN ('pending_payment', 'paid', 'cancelled', 'expired')),
    idempotency_key  TEXT NOT NULL,
    created_at_ms    BIGINT NOT NULL,
    expires_at_ms    BIGINT NOT NULL,
    updated_at_ms    BIGINT NOT NULL
);

-- Small named documents kept beside the orders, such as the guard's rules (JSON).
CREATE TABLE settings (
    name           TEXT PRIMARY KEY,
    value          TEXT NOT NULL,
    updated_at_ms  BIGINT NOT NULL
);

-- Which node owns the stock. A node bumps `epoch` when it takes ownership and checks it,
-- row-locked, inside every batch it commits: a node that lost ownership cannot write.
CREATE TABLE stampede_owner (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    epoch          BIGINT NOT NULL,
    node           TEXT NOT NULL,
    since_ms       BIGINT NOT NULL,
    -- Number of the owner's last committed batch: after a COMMIT lost in flight, the
    -- owner reads it back to learn whether that batch landed.
    batch_seq      BIGINT NOT NULL
);
INSERT INTO stampede_owner (id, epoch, node, since_ms, batch_seq) VALUES (1, 0, '', 0, 0);
