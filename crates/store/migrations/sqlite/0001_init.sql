-- Stampede's embedded schema. Times are milliseconds since the Unix epoch (UTC);
-- money is integer cents; ids are their prefixed text form.
CREATE TABLE products (
    sku            TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    price_cents    INTEGER NOT NULL CHECK (price_cents >= 0),
    available      INTEGER NOT NULL CHECK (available >= 0),
    created_at_ms  INTEGER NOT NULL
);

CREATE TABLE flash_sales (
    id              TEXT PRIMARY KEY,
    sku             TEXT NOT NULL REFERENCES products (sku),
    price_cents     INTEGER NOT NULL CHECK (price_cents >= 0),
    quantity        INTEGER NOT NULL CHECK (quantity > 0),
    per_user_limit  INTEGER NOT NULL CHECK (per_user_limit > 0),
    starts_at_ms    INTEGER NOT NULL,
    ends_at_ms      INTEGER NOT NULL CHECK (ends_at_ms > starts_at_ms),
    created_at_ms   INTEGER NOT NULL
);

CREATE TABLE orders (
    id               TEXT PRIMARY KEY,
    user_id          TEXT NOT NULL,
    sale_id          TEXT NOT NULL REFERENCES flash_sales (id),
    sku              TEXT NOT NULL,
    quantity         INTEGER NOT NULL CHECK (quantity > 0),
    amount_cents     INTEGER NOT NULL CHECK (amount_cents >= 0),
    status           TEXT NOT NULL CHECK (status IN ('pending_payment', 'paid', 'cancelled', 'expired')),
    idempotency_key  TEXT NOT NULL,
    created_at_ms    INTEGER NOT NULL,
    expires_at_ms    INTEGER NOT NULL,
    updated_at_ms    INTEGER NOT NULL
    -- The idempotency record (user_id, idempotency_key) lives in the same row, written
    -- in the same transaction as the order it guards. Its uniqueness is kept by the
    -- engine, which owns every write; the engine also keeps each shopper's order ids in
    -- memory. So the hot insert touches only B-trees keyed by time-ordered ids, and
    -- appends: no index here is keyed by shopper (random inserts cost ~10x the WAL).
) WITHOUT ROWID; -- ids are time-ordered (UUID v7): inserts append to one B-tree.

-- No secondary index either: the hot insert appends to one B-tree. Audits scan a sale's
-- orders on a read snapshot, off the writer.
