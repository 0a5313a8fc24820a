//! The embedded schema's table rebuild (`0004_orders_status_check.sql`) applied to a file
//! that already holds orders: every row survives, every check still holds, and the order
//! insert no longer builds an ephemeral table per row (why the rebuild exists).

use rusqlite::Connection;

const BEFORE_REBUILD: [&str; 3] = [
    include_str!("../migrations/sqlite/0001_init.sql"),
    include_str!("../migrations/sqlite/0002_settings.sql"),
    include_str!("../migrations/sqlite/0003_outbox.sql"),
];
const REBUILD: &str = include_str!("../migrations/sqlite/0004_orders_status_check.sql");

const INSERT: &str = "INSERT INTO orders (id, user_id, sale_id, sku, quantity, amount_cents, \
     status, idempotency_key, created_at_ms, expires_at_ms, updated_at_ms) \
     VALUES (?1, ?2, ?3, 'SKU-1', ?4, 500, ?5, ?6, 1, 2, 3)";

type Row = (
    String,
    String,
    String,
    String,
    i64,
    i64,
    String,
    String,
    i64,
    i64,
    i64,
);

fn rows(connection: &Connection) -> Vec<Row> {
    let mut select = connection
        .prepare(
            "SELECT id, user_id, sale_id, sku, quantity, amount_cents, status, idempotency_key, \
             created_at_ms, expires_at_ms, updated_at_ms FROM orders ORDER BY id",
        )
        .unwrap();
    select
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
                r.get(8)?,
                r.get(9)?,
                r.get(10)?,
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn insert(connection: &Connection, id: &str, quantity: i64, status: &str) -> rusqlite::Result<()> {
    connection
        .execute(INSERT, (id, "alice", "sale-1", quantity, status, id))
        .map(drop)
}

#[test]
fn rebuilding_the_orders_table_keeps_every_row_and_every_check() {
    let dir = tempfile::tempdir().unwrap();
    let connection = Connection::open(dir.path().join("stampede.db")).unwrap();
    connection
        .execute_batch("PRAGMA foreign_keys = ON;")
        .unwrap();
    for migration in BEFORE_REBUILD {
        connection.execute_batch(migration).unwrap();
    }
    connection
        .execute_batch(
            "INSERT INTO products VALUES ('SKU-1', 'one', 1000, 10, 0);
             INSERT INTO flash_sales VALUES ('sale-1', 'SKU-1', 500, 5, 2, 0, 10, 0);",
        )
        .unwrap();
    for (id, status) in [
        ("ord-1", "pending_payment"),
        ("ord-2", "paid"),
        ("ord-3", "cancelled"),
        ("ord-4", "expired"),
    ] {
        insert(&connection, id, 1, status).unwrap();
    }
    let before = rows(&connection);

    connection.execute_batch(REBUILD).unwrap();

    assert_eq!(rows(&connection), before, "every order survives unchanged");
    let schema: String = connection
        .query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'orders'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(schema.contains("WITHOUT ROWID"), "{schema}");
    // The checks hold as before: status, quantity, the sale's existence, the key.
    assert!(insert(&connection, "ord-5", 1, "shipped").is_err());
    assert!(insert(&connection, "ord-5", 0, "paid").is_err());
    assert!(
        insert(&connection, "ord-1", 1, "paid").is_err(),
        "duplicate id"
    );
    assert!(
        connection
            .execute(INSERT, ("ord-5", "bob", "no-such-sale", 1, "paid", "k"))
            .is_err(),
        "unknown sale"
    );
    assert!(
        connection
            .execute("UPDATE orders SET status = 'lost' WHERE id = 'ord-1'", [])
            .is_err()
    );
    insert(&connection, "ord-5", 2, "pending_payment").unwrap();
    assert_eq!(rows(&connection).len(), 5);

    // What the rebuild is for: the insert runs no ephemeral table for the status check.
    let mut explain = connection.prepare(&format!("EXPLAIN {INSERT}")).unwrap();
    let opcodes: Vec<String> = explain
        .query_map([rusqlite::types::Null; 6], |r| r.get(1))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(opcodes.iter().any(|op| op == "IdxInsert"), "{opcodes:?}");
    assert!(
        !opcodes.iter().any(|op| op == "OpenEphemeral"),
        "the order insert opens an ephemeral table: {opcodes:?}"
    );
}
