-- Small named documents kept beside the orders, such as the guard's rules (JSON).
CREATE TABLE settings (
    key            TEXT PRIMARY KEY,
    value          TEXT NOT NULL,
    updated_at_ms  INTEGER NOT NULL
) WITHOUT ROWID;
