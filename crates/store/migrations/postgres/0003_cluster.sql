-- Several nodes writing one database (`cluster = true`): each sells from stock it has
-- leased from the sale. A sale's units are always in exactly one place:
--   quantity = unleased + Σ stock_leases.units + units of pending and paid orders,
-- and every commit moves units between those places in one transaction.
ALTER TABLE flash_sales ADD COLUMN unleased BIGINT NOT NULL DEFAULT 0 CHECK (unleased >= 0);
UPDATE flash_sales SET unleased = quantity - COALESCE(
    (SELECT SUM(quantity) FROM orders
     WHERE orders.sale_id = flash_sales.id AND orders.status IN ('pending_payment', 'paid')), 0);

-- The nodes of a cluster. A node stamps its row (row-locked) in every transaction it
-- commits; a node whose row is gone has been declared dead, its leases reclaimed, and
-- can commit nothing. `heartbeat_ms` is the database's clock, so node clocks never matter.
CREATE TABLE stampede_nodes (
    node          TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    joined_ms     BIGINT NOT NULL,
    heartbeat_ms  BIGINT NOT NULL,
    batch_seq     BIGINT NOT NULL
);

-- Units of a sale a node may sell from memory. An order insert takes its units from the
-- inserting node's lease in the same transaction, so it fails if the lease is gone.
CREATE TABLE stock_leases (
    sale_id  TEXT NOT NULL REFERENCES flash_sales (id),
    node     TEXT NOT NULL,
    units    BIGINT NOT NULL CHECK (units >= 0),
    PRIMARY KEY (sale_id, node)
);
