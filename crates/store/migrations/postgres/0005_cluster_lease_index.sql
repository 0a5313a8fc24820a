-- A reclaim or a clean leave reads one node's leases: by index, so it neither scans nor
-- (on InnoDB) locks the other nodes' lease rows.
CREATE INDEX stock_leases_node ON stock_leases (node);
