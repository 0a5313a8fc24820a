-- When this node's outbox relay last said it could publish (connected to NATS, no recent
-- failure), on the database's clock, renewed by the node's heartbeat; 0 for a node
-- without a relay. The cluster's
-- publisher is the oldest live member whose relay is ready, so a node that cannot
-- publish never holds the turn.
ALTER TABLE stampede_nodes ADD COLUMN relay_ms BIGINT NOT NULL DEFAULT 0;
