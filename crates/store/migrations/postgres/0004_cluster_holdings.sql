-- Per-user limits across a cluster: units each shopper holds (pending + paid) in each
-- sale, kept by every cluster commit beside the orders. The CHECK makes an insert that
-- would take a shopper over the limit fail, whichever node placed the other orders.
-- (A single owner keeps these counts in memory; a cluster recounts them from the
-- orders when it starts.)
CREATE TABLE sale_holdings (
    sale_id         TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    units           BIGINT NOT NULL,
    per_user_limit  BIGINT NOT NULL,
    PRIMARY KEY (sale_id, user_id),
    CONSTRAINT sale_holdings_within_limit CHECK (units >= 0 AND units <= per_user_limit)
);
