-- Stampede's MySQL-protocol schema (MariaDB, MySQL, TiDB, PolarDB-X). Times are
-- milliseconds since the Unix epoch (UTC); money is integer cents; ids are their
-- prefixed text form (UUID v7, time-ordered: InnoDB's clustered primary key appends).
-- Text compares byte for byte (utf8mb4_bin): shopper "Bob" is not shopper "bob".
CREATE TABLE products (
    sku            VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PRIMARY KEY,
    name           VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    price_cents    BIGINT NOT NULL CHECK (price_cents >= 0),
    available      BIGINT NOT NULL CHECK (available >= 0),
    created_at_ms  BIGINT NOT NULL
) ENGINE = InnoDB;

CREATE TABLE flash_sales (
    id              VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PRIMARY KEY,
    sku             VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    price_cents     BIGINT NOT NULL CHECK (price_cents >= 0),
    quantity        BIGINT NOT NULL CHECK (quantity > 0),
    per_user_limit  BIGINT NOT NULL CHECK (per_user_limit > 0),
    starts_at_ms    BIGINT NOT NULL,
    ends_at_ms      BIGINT NOT NULL,
    created_at_ms   BIGINT NOT NULL,
    CONSTRAINT flash_sales_product FOREIGN KEY (sku) REFERENCES products (sku),
    CONSTRAINT flash_sales_window CHECK (ends_at_ms > starts_at_ms)
) ENGINE = InnoDB;

-- The idempotency record (user_id, idempotency_key) lives in the order's row, written in
-- the same transaction. Its uniqueness is kept by the engine, which owns every write.
-- No foreign key to flash_sales: InnoDB would add an index on sale_id to every insert.
CREATE TABLE orders (
    id               VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PRIMARY KEY,
    user_id          VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    sale_id          VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    sku              VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    quantity         BIGINT NOT NULL CHECK (quantity > 0),
    amount_cents     BIGINT NOT NULL CHECK (amount_cents >= 0),
    status           VARCHAR(16) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL
                     CHECK (status IN ('pending_payment', 'paid', 'cancelled', 'expired')),
    idempotency_key  VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    created_at_ms    BIGINT NOT NULL,
    expires_at_ms    BIGINT NOT NULL,
    updated_at_ms    BIGINT NOT NULL
) ENGINE = InnoDB;

-- Small named documents kept beside the orders, such as the guard's rules (JSON).
CREATE TABLE settings (
    name           VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PRIMARY KEY,
    value          MEDIUMTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    updated_at_ms  BIGINT NOT NULL
) ENGINE = InnoDB;

-- Which node owns the stock. A node bumps `epoch` when it takes ownership and checks it,
-- row-locked, inside every batch it commits: a node that lost ownership cannot write.
CREATE TABLE stampede_owner (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    epoch          BIGINT NOT NULL,
    node           VARCHAR(256) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    since_ms       BIGINT NOT NULL,
    -- Number of the owner's last committed batch: after a COMMIT lost in flight, the
    -- owner reads it back to learn whether that batch landed.
    batch_seq      BIGINT NOT NULL
) ENGINE = InnoDB;
INSERT INTO stampede_owner (id, epoch, node, since_ms, batch_seq) VALUES (1, 0, '', 0, 0);
