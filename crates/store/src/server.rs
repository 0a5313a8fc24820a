//! PostgreSQL and MySQL-protocol backends (MariaDB here; MySQL, TiDB and PolarDB-X speak
//! the same protocol): the engine's `Store` on a database server.
//!
//! One code path serves both. The statements are written once with `?` placeholders and
//! rewritten to `$n` for PostgreSQL when the store opens (`Sql::new`); the handful that
//! differ between the two dialects are spelled out in `Dialect`. The `server_store!`
//! macro expands the same implementation for each sqlx driver, so both backends are
//! concrete code with no generic trait gymnastics, and no logic exists twice.
//!
//! **Ownership and fencing.** The engine keeps the stock in memory, so exactly one node
//! may write a database at a time. A node takes a session-level lock (PostgreSQL
//! advisory lock, MySQL `GET_LOCK`) on its writer connection, waiting up to
//! `owner_wait` for a node that is going away, and bumps `stampede_owner.epoch`. Every
//! batch then updates the owner row `WHERE epoch = <ours>` inside its own transaction:
//! if another node has taken ownership since (our connection dropped, the lock went with
//! it), the batch finds no row and commits nothing. A node that lost ownership can never
//! write with stale memory.
//!
//! **Commit outcome.** On a server a `COMMIT` can be lost in flight: the connection
//! breaks and nobody knows whether the batch landed. Each batch also stamps
//! `stampede_owner.batch_seq`; after a failure during `COMMIT` the store reconnects (as
//! the owner) and reads it back. Equal to the batch's number: it landed, and `commit`
//! answers `Ok`. Anything else: it did not. If the database cannot be reached to find
//! out, `commit` answers `StoreError::Indeterminate` and the engine halts rather than
//! hand back stock that may be sold.
//!
//! Round trips per batch: `BEGIN`, the owner stamp, one `INSERT` of all its orders,
//! `COMMIT` — four, however many orders. The insert has one shape whatever the row
//! count (PostgreSQL `UNNEST` of one array per column, MySQL `JSON_TABLE` over one JSON
//! array), so it is prepared once and costs one round trip.
//!
//! **Cluster** (`open_cluster`). Several nodes write one database, each selling stock
//! it leased (`stock_leases`) from the sale's `unleased` pool. Each member stamps its
//! own `stampede_nodes` row first in every transaction (row lock, heartbeat on the
//! database's clock); a member silent for the time to live is deleted by another
//! (`reclaim`), its leases returned. A commit takes its orders' units from this node's
//! lease in the same transaction, and keeps `sale_holdings` (units per shopper, with a
//! `CHECK` against the limit); a unique index keeps idempotency keys unique. An order
//! that conflicts with another member's is set aside (`OpOutcome::Duplicate`,
//! `OpOutcome::OverLimit`) and the rest of the batch committed again. Six round trips
//! per batch: `BEGIN`, stamp, `INSERT`, holdings upsert, lease update, `COMMIT`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use sqlx::{AssertSqlSafe, Connection, QueryBuilder, Row};
use stampede_engine::{
    AUDIT_CONNECTIONS, Catalog, ChargeAttempt, LeaseGrant, OpOutcome, OrderRecord, OutboxEvent,
    PendingTally, ProductRecord, Rebuild, Reclaimed, SaleRecord, SaleTally, Store, StoreError,
    WriteOp, lease_size,
};
use stampede_types::{Cents, IdempotencyKey, OrderId, OrderStatus, Quantity, SaleId, Sku, UserId};
use tokio::sync::Mutex;

use crate::rows::{
    charge_refusal, corrupt, count_units, order_values, outbox_events, transitioned, unavailable,
};

/// Shoppers per holdings upsert in a cluster commit (4 parameters each).
const HOLDINGS_CHUNK_ROWS: usize = 1024;

/// Readers in the pool: order lookups, lists, audits, pings.
const READER_CONNECTIONS_MAX: u32 = 8;

/// How long `open` waits for the owner lock of a node that is going away.
pub const OWNER_WAIT_DEFAULT: Duration = Duration::from_secs(15);

/// How long an order-list read waits for a replica connection before it reads the
/// primary instead.
const REPLICA_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);

/// Longest a writer connection may take to connect and log in. sqlx sets none for a
/// single connection, and a server that accepts the TCP connection but never answers
/// (hung, or a proxy in front of a dead one) would hold the writer task, and every
/// purchase behind it, for ever: at start, at each reconnect and at each probe.
const WRITER_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a commit whose outcome is unknown keeps trying to reach the database to find
/// out before it gives up with `Indeterminate`.
const RESOLVE_DEADLINE: Duration = Duration::from_secs(10);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Who this process is, for `stampede_owner.node` (shown to the operator of a node that
/// is refused because another owns the database).
fn node_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown-host".into());
    format!("{host}/{}", std::process::id())
}

/// A fresh id for a node joining a cluster: a restarted process is a new member (its
/// previous self's leases are reclaimed like any dead node's).
fn new_node_id() -> String {
    use std::hash::BuildHasher;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let noise =
        std::collections::hash_map::RandomState::new().hash_one((nanos, std::process::id()));
    format!("node-{:x}-{noise:016x}", nanos as u64)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Placeholders {
    /// `?` (MySQL).
    Question,
    /// `$1, $2, …` (PostgreSQL).
    Dollar,
}

/// What differs between the two dialects, spelled out once.
struct Dialect {
    name: &'static str,
    placeholders: Placeholders,
    /// Takes the owner lock without waiting; answers one row, one column: 1/true if taken.
    try_lock: &'static str,
    /// Begins a read-only transaction whose snapshot is fixed by its first read (or at once).
    begin_snapshot: &'static str,
    /// Begins a read-only transaction (on a replica).
    begin_read_only: &'static str,
    /// `SUM(quantity)` as a 64-bit integer (both servers widen it to a decimal).
    sum_quantity: &'static str,
    save_setting: &'static str,
    /// Writes a charge-ledger entry unless the order has one.
    record_charge: &'static str,
    /// Reads the durability settings: one row of (name, value) per setting that must hold.
    durability: &'static [(&'static str, &'static str, &'static [&'static str])],
    /// Gives the owner lock back (a cluster node only checks that nobody holds it).
    unlock: &'static str,
    /// Drops a cluster's unique index on the orders' idempotency keys.
    drop_key_index: &'static str,
    /// Part of the error `drop_key_index` answers when there is no such index.
    no_such_index: &'static str,
    /// The database's clock in milliseconds since the epoch: heartbeats and their
    /// deadlines use it, so the nodes' clocks never matter. Whatever the session's time
    /// zone (a URL may name one with summer time, whose hour back would repeat an hour).
    now_ms: &'static str,
    /// Run on each reader connection as it opens: what the snapshots and consistent
    /// reads assume of the session, whatever the server's defaults.
    reader_session: Option<&'static str>,
    /// `SUM(units)` of stock leases as a 64-bit integer.
    sum_units: &'static str,
    /// Adds `(sale_id, node, units)` to a lease, creating it if needed.
    add_to_lease: &'static str,
    /// Ends a multi-row insert into `sale_holdings` so existing rows add the units.
    add_holdings: &'static str,
    /// Bounds each of the session's statements (see `StoreOptions::statement_timeout`):
    /// given whether `COMMIT` waits for a synchronous standby, the statement that bounds
    /// them, and whether it bounds a whole statement's run or only its lock waits.
    deadline: fn(Duration, bool) -> (String, Bound),
    /// Answers one boolean, `waits`: whether `COMMIT` waits for a synchronous standby.
    /// A deadline must not cut that wait short: PostgreSQL would keep the commit locally
    /// (with a warning) and answer success for orders the standby lacks.
    commit_waits_on_standby: Option<&'static str>,
    /// Bounds how long each statement may run, where the server knows how (MariaDB's
    /// `max_statement_time`; MySQL has none for writes, and answers "Unknown system
    /// variable").
    deadline_where_known: Option<fn(Duration) -> String>,
}

/// What a writer's deadline bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bound {
    /// Every statement's whole run, lock waits included.
    Statements,
    /// Only its waits for locks.
    LockWaits,
}

const POSTGRES: Dialect = Dialect {
    name: "PostgreSQL",
    placeholders: Placeholders::Dollar,
    // Advisory locks are scoped to the database, so one server can hold many Stampedes.
    try_lock: "SELECT pg_try_advisory_lock(7261346573) AS taken",
    begin_snapshot: "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
    begin_read_only: "BEGIN READ ONLY",
    sum_quantity: "CAST(SUM(quantity) AS BIGINT)",
    save_setting: "INSERT INTO settings (name, value, updated_at_ms) VALUES (?, ?, ?) \
                   ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, updated_at_ms = EXCLUDED.updated_at_ms",
    record_charge: "INSERT INTO charge_attempts (order_id, amount_cents, attempted_at_ms) VALUES (?, ?, ?) \
                    ON CONFLICT (order_id) DO NOTHING",
    durability: &[
        ("SHOW fsync", "fsync", &["on"]),
        (
            "SHOW synchronous_commit",
            "synchronous_commit",
            &["on", "local", "remote_write", "remote_apply"],
        ),
    ],
    unlock: "SELECT pg_advisory_unlock(7261346573)",
    drop_key_index: "DROP INDEX orders_idempotency",
    no_such_index: "does not exist",
    now_ms: "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
    // `BEGIN ISOLATION LEVEL REPEATABLE READ` names it per snapshot.
    reader_session: None,
    sum_units: "CAST(SUM(units) AS BIGINT)",
    add_to_lease: "INSERT INTO stock_leases (sale_id, node, units) VALUES (?, ?, ?) \
                   ON CONFLICT (sale_id, node) DO UPDATE SET units = stock_leases.units + EXCLUDED.units",
    add_holdings: " ON CONFLICT (sale_id, user_id) DO UPDATE SET units = sale_holdings.units + EXCLUDED.units",
    // Session settings, so they outlive the transactions. `statement_timeout` covers
    // lock waits too, but it also cuts short `COMMIT`'s wait for a synchronous standby:
    // with one, only lock waits are bounded.
    deadline: |d, commit_waits_on_standby| {
        let ms = d.as_millis().max(1);
        if commit_waits_on_standby {
            (format!("SET lock_timeout = {ms}"), Bound::LockWaits)
        } else {
            (format!("SET statement_timeout = {ms}"), Bound::Statements)
        }
    },
    commit_waits_on_standby: Some(
        "SELECT current_setting('synchronous_standby_names') <> '' \
         AND current_setting('synchronous_commit') IN ('on', 'remote_write', 'remote_apply') AS waits",
    ),
    deadline_where_known: None,
};

const MYSQL: Dialect = Dialect {
    name: "MySQL",
    placeholders: Placeholders::Question,
    // GET_LOCK is per server, not per database: the name carries the database.
    try_lock: "SELECT CAST(COALESCE(GET_LOCK(CONCAT('stampede.owner.', DATABASE()), 0), 0) AS SIGNED) AS taken",
    begin_snapshot: "START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY",
    begin_read_only: "START TRANSACTION READ ONLY",
    sum_quantity: "CAST(SUM(quantity) AS SIGNED)",
    save_setting: "INSERT INTO settings (name, value, updated_at_ms) VALUES (?, ?, ?) \
                   ON DUPLICATE KEY UPDATE value = VALUES(value), updated_at_ms = VALUES(updated_at_ms)",
    record_charge: "INSERT INTO charge_attempts (order_id, amount_cents, attempted_at_ms) VALUES (?, ?, ?) \
                    ON DUPLICATE KEY UPDATE order_id = order_id",
    durability: &[
        (
            "SELECT CAST(@@innodb_flush_log_at_trx_commit AS CHAR)",
            "innodb_flush_log_at_trx_commit",
            &["1"],
        ),
        // With the binary log on, crash recovery keeps a prepared transaction only if
        // its entry reached the binary log: that log must be synced at each commit too.
        (
            "SELECT CASE WHEN @@log_bin = 0 THEN 'off' ELSE CAST(@@sync_binlog AS CHAR) END",
            "sync_binlog (the binary log is on)",
            &["off", "1"],
        ),
    ],
    unlock: "SELECT RELEASE_LOCK(CONCAT('stampede.owner.', DATABASE()))",
    drop_key_index: "DROP INDEX orders_idempotency ON orders",
    no_such_index: "; check that",
    // Not `UNIX_TIMESTAMP(NOW(3))`: `NOW` is the session's local time, which an hour
    // back in autumn makes ambiguous.
    now_ms: "CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) DIV 1000 AS SIGNED)",
    // `START TRANSACTION WITH CONSISTENT SNAPSHOT` is one only under REPEATABLE READ,
    // InnoDB's default, which a server (or a managed database's parameter group) may
    // have changed to READ COMMITTED: a start's three reads, and an audit's, would then
    // each see other commits.
    reader_session: Some("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ"),
    sum_units: "CAST(SUM(units) AS SIGNED)",
    add_to_lease: "INSERT INTO stock_leases (sale_id, node, units) VALUES (?, ?, ?) \
                   ON DUPLICATE KEY UPDATE units = units + VALUES(units)",
    add_holdings: " ON DUPLICATE KEY UPDATE units = units + VALUES(units)",
    // Row locks (InnoDB) and metadata locks (another session's `ALTER TABLE` or `LOCK
    // TABLES`), in whole seconds, at least one; `deadline_where_known` bounds the rest.
    deadline: |d, _| {
        let s = d.as_millis().div_ceil(1000).max(1);
        (
            format!("SET SESSION innodb_lock_wait_timeout = {s}, lock_wait_timeout = {s}"),
            Bound::LockWaits,
        )
    },
    commit_waits_on_standby: None,
    // Seconds, to the millisecond.
    deadline_where_known: Some(|d| {
        let ms = d.as_millis().max(1);
        format!(
            "SET SESSION max_statement_time = {}.{:03}",
            ms / 1000,
            ms % 1000
        )
    }),
};

/// Every statement with parameters, in the store's dialect, built once at open.
struct Sql {
    insert_product: Arc<str>,
    take_for_sale: Arc<str>,
    insert_sale: Arc<str>,
    lock_order: Arc<str>,
    move_order: Arc<str>,
    order_by_id: Arc<str>,
    tally_by_status: Arc<str>,
    users_over_limit: Arc<str>,
    load_setting: Arc<str>,
    save_setting: Arc<str>,
    insert_setting: Arc<str>,
    swap_setting: Arc<str>,
    record_charge: Arc<str>,
    settle_charge: Arc<str>,
    charge_of: Arc<str>,
    stamp_owner: Arc<str>,
    claim_owner: Arc<str>,
    // Cluster (several writing nodes).
    join_node: Arc<str>,
    stamp_node: Arc<str>,
    heartbeat: Arc<str>,
    node_batch_seq: Arc<str>,
    /// The same, waiting for a transaction that holds the row (a batch still committing).
    node_batch_seq_locked: Arc<str>,
    live_nodes: Arc<str>,
    /// The live member with a ready relay that joined first (the relay's publisher).
    oldest_live_node: Arc<str>,
    dead_nodes: Arc<str>,
    remove_dead_node: Arc<str>,
    remove_node: Arc<str>,
    /// A clean leave: the row stays, as a node whose heartbeat stopped long ago, so the
    /// next survivor's reclaim removes it and takes over its pending orders' expiry.
    depart_node: Arc<str>,
    add_to_lease: Arc<str>,
    take_from_lease: Arc<str>,
    node_leases: Arc<str>,
    remove_node_leases: Arc<str>,
    lock_unleased: Arc<str>,
    take_unleased: Arc<str>,
    give_unleased: Arc<str>,
    rebase_unleased: Arc<str>,
    unsold: Arc<str>,
    catalog_sales: Arc<str>,
    add_holdings: Arc<str>,
    release_holdings: Arc<str>,
    rebase_holdings: Arc<str>,
    sale_limit: Arc<str>,
    orders_of_user: Arc<str>,
    order_by_key: Arc<str>,
    product_available: Arc<str>,
}

impl Sql {
    fn new(dialect: &Dialect) -> Sql {
        let style = dialect.placeholders;
        let sql = |text: &str| -> Arc<str> {
            match style {
                Placeholders::Question => Arc::from(text),
                Placeholders::Dollar => {
                    let mut out = String::with_capacity(text.len() + 8);
                    let mut n = 0;
                    for c in text.chars() {
                        if c == '?' {
                            n += 1;
                            out.push('$');
                            out.push_str(&n.to_string());
                        } else {
                            out.push(c);
                        }
                    }
                    Arc::from(out)
                }
            }
        };
        Sql {
            insert_product: sql(
                "INSERT INTO products (sku, name, price_cents, available, created_at_ms) VALUES (?, ?, ?, ?, ?)",
            ),
            take_for_sale: sql(
                "UPDATE products SET available = available - ? WHERE sku = ? AND available >= ?",
            ),
            insert_sale: sql(
                "INSERT INTO flash_sales (id, sku, price_cents, quantity, per_user_limit, starts_at_ms, \
                 ends_at_ms, created_at_ms, unleased) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ),
            lock_order: sql(
                "SELECT sale_id, user_id, quantity, status FROM orders WHERE id = ? FOR UPDATE",
            ),
            move_order: sql("UPDATE orders SET status = ?, updated_at_ms = ? WHERE id = ?"),
            order_by_id: sql(concat!(
                "SELECT ",
                order_columns!(),
                " FROM orders WHERE id = ?"
            )),
            tally_by_status: sql(&format!(
                "SELECT status, {} AS units FROM orders WHERE sale_id = ? GROUP BY status",
                dialect.sum_quantity
            )),
            users_over_limit: sql(
                "SELECT COUNT(*) AS n FROM (SELECT user_id FROM orders WHERE sale_id = ? \
                 AND status IN ('pending_payment', 'paid') GROUP BY user_id HAVING SUM(quantity) > ?) AS over_limit",
            ),
            load_setting: sql("SELECT value FROM settings WHERE name = ?"),
            save_setting: sql(dialect.save_setting),
            insert_setting: sql(
                "INSERT INTO settings (name, value, updated_at_ms) VALUES (?, ?, ?)",
            ),
            // The sessions' client flags make MySQL count rows matched, not changed.
            swap_setting: sql(
                "UPDATE settings SET value = ?, updated_at_ms = ? WHERE name = ? AND value = ?",
            ),
            record_charge: sql(dialect.record_charge),
            settle_charge: sql("DELETE FROM charge_attempts WHERE order_id = ?"),
            charge_of: sql("SELECT amount_cents FROM charge_attempts WHERE order_id = ?"),
            stamp_owner: sql("UPDATE stampede_owner SET batch_seq = ? WHERE id = 1 AND epoch = ?"),
            claim_owner: sql(
                "UPDATE stampede_owner SET epoch = ?, node = ?, since_ms = ?, batch_seq = 0 WHERE id = 1",
            ),
            join_node: sql(&format!(
                "INSERT INTO stampede_nodes (node, name, joined_ms, heartbeat_ms, batch_seq) \
                 VALUES (?, ?, {now}, {now}, 0)",
                now = dialect.now_ms
            )),
            stamp_node: sql(&format!(
                "UPDATE stampede_nodes SET batch_seq = ?, heartbeat_ms = {} WHERE node = ?",
                dialect.now_ms
            )),
            // The relay's readiness rides on the stamp: no write of its own to the row
            // every commit of the node locks.
            heartbeat: sql(&format!(
                "UPDATE stampede_nodes SET heartbeat_ms = {now}, \
                 relay_ms = CASE WHEN ? THEN {now} ELSE relay_ms END WHERE node = ?",
                now = dialect.now_ms
            )),
            node_batch_seq: sql("SELECT batch_seq FROM stampede_nodes WHERE node = ?"),
            node_batch_seq_locked: sql(
                "SELECT batch_seq FROM stampede_nodes WHERE node = ? FOR UPDATE",
            ),
            live_nodes: sql(&format!(
                "SELECT COUNT(*) AS n FROM stampede_nodes WHERE heartbeat_ms >= {} - ?",
                dialect.now_ms
            )),
            oldest_live_node: sql(&format!(
                "SELECT node FROM stampede_nodes WHERE heartbeat_ms >= {now} - ? \
                 AND relay_ms >= {now} - ? ORDER BY joined_ms, node LIMIT 1",
                now = dialect.now_ms
            )),
            dead_nodes: sql(&format!(
                "SELECT node FROM stampede_nodes WHERE heartbeat_ms < {} - ?",
                dialect.now_ms
            )),
            remove_dead_node: sql(&format!(
                "DELETE FROM stampede_nodes WHERE node = ? AND heartbeat_ms < {} - ?",
                dialect.now_ms
            )),
            remove_node: sql("DELETE FROM stampede_nodes WHERE node = ?"),
            depart_node: sql("UPDATE stampede_nodes SET heartbeat_ms = 0 WHERE node = ?"),
            add_to_lease: sql(dialect.add_to_lease),
            take_from_lease: sql(
                "UPDATE stock_leases SET units = units - ? WHERE sale_id = ? AND node = ? AND units >= ?",
            ),
            // Read after the node's row is locked (deleted or stamped), which stops its
            // commits: the rows cannot change. No FOR UPDATE, so InnoDB takes no gap
            // locks here; the sales' rows are then locked in id order, like a lease does.
            node_leases: sql(
                "SELECT sale_id, units FROM stock_leases WHERE node = ? ORDER BY sale_id",
            ),
            remove_node_leases: sql("DELETE FROM stock_leases WHERE node = ?"),
            lock_unleased: sql("SELECT unleased FROM flash_sales WHERE id = ? FOR UPDATE"),
            take_unleased: sql(
                "UPDATE flash_sales SET unleased = unleased - ? WHERE id = ? AND unleased >= ?",
            ),
            give_unleased: sql("UPDATE flash_sales SET unleased = unleased + ? WHERE id = ?"),
            rebase_unleased: sql(&format!(
                "UPDATE flash_sales SET unleased = quantity - COALESCE((SELECT {} FROM orders \
                 WHERE orders.sale_id = flash_sales.id AND orders.status IN ('pending_payment', 'paid')), 0)",
                dialect.sum_quantity
            )),
            unsold: sql(&format!(
                "SELECT unleased + COALESCE((SELECT {} FROM stock_leases WHERE stock_leases.sale_id = flash_sales.id), 0) \
                 AS unsold FROM flash_sales WHERE id = ?",
                dialect.sum_units
            )),
            catalog_sales: sql(&format!(
                "SELECT id, sku, price_cents, quantity, per_user_limit, starts_at_ms, ends_at_ms, created_at_ms, \
                 unleased + COALESCE((SELECT {} FROM stock_leases WHERE stock_leases.sale_id = flash_sales.id), 0) \
                 AS unsold FROM flash_sales ORDER BY created_at_ms, id",
                dialect.sum_units
            )),
            add_holdings: Arc::from(dialect.add_holdings),
            release_holdings: sql(
                "UPDATE sale_holdings SET units = units - ? WHERE sale_id = ? AND user_id = ?",
            ),
            rebase_holdings: sql(&format!(
                "INSERT INTO sale_holdings (sale_id, user_id, units, per_user_limit) \
                 SELECT orders.sale_id, orders.user_id, {}, flash_sales.per_user_limit \
                 FROM orders JOIN flash_sales ON flash_sales.id = orders.sale_id \
                 WHERE orders.status IN ('pending_payment', 'paid') \
                 GROUP BY orders.sale_id, orders.user_id, flash_sales.per_user_limit",
                dialect.sum_quantity.replace("quantity", "orders.quantity")
            )),
            sale_limit: sql("SELECT per_user_limit FROM flash_sales WHERE id = ?"),
            product_available: sql("SELECT available FROM products WHERE sku = ?"),
            orders_of_user: sql(concat!(
                "SELECT ",
                order_columns!(),
                " FROM orders WHERE user_id = ? ORDER BY created_at_ms DESC, id DESC LIMIT ?"
            )),
            order_by_key: sql(concat!(
                "SELECT ",
                order_columns!(),
                " FROM orders WHERE user_id = ? AND idempotency_key = ?"
            )),
        }
    }
}

fn q(text: &Arc<str>) -> AssertSqlSafe<Arc<str>> {
    AssertSqlSafe(Arc::clone(text))
}

macro_rules! server_store {
    (
        $(#[$meta:meta])*
        $store:ident, $db:ty, $conn:ty, $options:ty, $pool_options:ty, $dialect:expr, $migrations:literal, $insert_orders:ident
    ) => {
        $(#[$meta])*
        pub struct $store {
            /// `None` after a failure broke the connection; the next commit reconnects
            /// and takes the owner lock again (or finds it has been fenced off).
            writer: Mutex<Option<$conn>>,
            readers: sqlx::Pool<$db>,
            /// [`AUDIT_CONNECTIONS`] connections for `snapshot_tally` alone, which the
            /// writer calls between batches: shoppers' reads never make it wait.
            audits: sqlx::Pool<$db>,
            options: $options,
            sql: Sql,
            /// Our ownership term; batches commit only while the owner row carries it.
            epoch: i64,
            /// Number of the last batch this node committed (in `stampede_owner.batch_seq`).
            batch_seq: std::sync::atomic::AtomicI64,
            /// Whether commits also write order events to the outbox.
            outbox: bool,
            /// A read replica for order lists (`with_replica`); the primary answers
            /// whatever it lacks or when it fails.
            replica: Option<sqlx::Pool<$db>>,
            /// In a cluster (`open_cluster`): this node's id in `stampede_nodes`.
            node: Option<String>,
            /// In a cluster: a node whose heartbeat is older than this is dead.
            node_ttl_ms: i64,
            /// In a cluster: whether this node's relay is ready to publish, stamped as
            /// `relay_ms` with every heartbeat (`Store::relay_turn`).
            relay_ready: std::sync::atomic::AtomicBool,
            /// Longest a writer's statement may run (`with_statement_timeout`).
            deadline: Option<Duration>,
        }

        impl $store {
            /// Connects, migrates, checks the server's durability settings, takes
            /// ownership of the database (waiting up to `owner_wait` for a previous owner
            /// to go away) and opens a reader pool.
            pub async fn open(url: &str, owner_wait: Duration) -> Result<$store, StoreError> {
                Self::open_as(url, Some(owner_wait)).await
            }

            /// Opens for reading only (the offline audit beside a live node): no
            /// migration, no ownership; every commit is refused as fenced.
            pub async fn open_read_only(url: &str) -> Result<$store, StoreError> {
                Self::open_as(url, None).await
            }

            /// A writer connection, with TCP_NODELAY set, within `WRITER_CONNECT_TIMEOUT`.
            async fn connect_writer(options: &$options) -> Result<$conn, StoreError> {
                let writer = tokio::time::timeout(WRITER_CONNECT_TIMEOUT, <$conn>::connect_with(options))
                    .await
                    .map_err(|_| {
                        StoreError::Unavailable(format!(
                            "the database did not answer a new connection within {WRITER_CONNECT_TIMEOUT:?}"
                        ))
                    })?
                    .map_err(unavailable)?;
                crate::nodelay::set_on_connections_to(options.get_port());
                Ok(writer)
            }

            /// A writer connection on a migrated schema whose server commits durably.
            async fn migrated_writer(options: &$options) -> Result<$conn, StoreError> {
                let mut writer = Self::connect_writer(options).await?;
                sqlx::migrate!($migrations)
                    .run(&mut writer)
                    .await
                    .map_err(|e| StoreError::Unavailable(format!("migration failed: {e}")))?;
                check_durability!(&mut writer, &$dialect);
                Ok(writer)
            }

            /// Pool settings for readers and replicas: TCP_NODELAY on every connection,
            /// and the dialect's `reader_session`.
            fn pool_options(port: u16) -> $pool_options {
                <$pool_options>::new().after_connect(move |connection, _| {
                    Box::pin(async move {
                        crate::nodelay::set_on_connections_to(port);
                        if let Some(setup) = $dialect.reader_session {
                            sqlx::Executor::execute(&mut *connection, setup).await?;
                        }
                        Ok(())
                    })
                })
            }

            /// A pool of `min`..=`max` connections.
            async fn reader_pool(
                options: &$options,
                min: u32,
                max: u32,
            ) -> Result<sqlx::Pool<$db>, StoreError> {
                Self::pool_options(options.get_port())
                    .max_connections(max)
                    .min_connections(min)
                    .connect_with(options.clone())
                    .await
                    .map_err(unavailable)
            }

            /// The store around its connections; `epoch` < 0 never commits (read-only).
            #[allow(clippy::too_many_arguments)]
            fn assemble(
                writer: Option<$conn>,
                readers: sqlx::Pool<$db>,
                audits: sqlx::Pool<$db>,
                options: $options,
                sql: Sql,
                epoch: i64,
                node: Option<String>,
                node_ttl: Duration,
            ) -> $store {
                $store {
                    writer: Mutex::new(writer),
                    readers,
                    audits,
                    options,
                    sql,
                    epoch,
                    batch_seq: std::sync::atomic::AtomicI64::new(0),
                    outbox: false,
                    replica: None,
                    node,
                    node_ttl_ms: node_ttl.as_millis() as i64,
                    relay_ready: std::sync::atomic::AtomicBool::new(false),
                    deadline: None,
                }
            }

            async fn open_as(url: &str, owner_wait: Option<Duration>) -> Result<$store, StoreError> {
                let options: $options = url.parse().map_err(unavailable)?;
                let dialect = &$dialect;
                let sql = Sql::new(dialect);
                let Some(owner_wait) = owner_wait else {
                    let readers = Self::reader_pool(&options, 1, 2).await?;
                    // No writer pins snapshots here: the audits share the readers.
                    let audits = readers.clone();
                    // No owner ever has a negative epoch: commits find no row.
                    return Ok(Self::assemble(None, readers, audits, options, sql, -1, None, Duration::ZERO));
                };
                let mut writer = Self::migrated_writer(&options).await?;
                take_owner_lock!(&mut writer, dialect, owner_wait);
                // A single owner and a cluster never share a database. (A cluster node
                // joins first, then checks this lock, so one of the two always refuses.)
                let live: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
                    "SELECT COUNT(*) FROM stampede_nodes WHERE heartbeat_ms >= {} - 60000",
                    dialect.now_ms
                )))
                .fetch_one(&mut writer)
                .await
                .map_err(unavailable)?;
                if live > 0 {
                    return Err(StoreError::Unavailable(format!(
                        "{live} cluster node(s) use this database: start this node with cluster = true too"
                    )));
                }
                // Stale members of a cluster that is gone: the next cluster to start
                // recounts the unleased stock from the orders.
                sqlx::query("DELETE FROM stock_leases").execute(&mut writer).await.map_err(unavailable)?;
                sqlx::query("DELETE FROM stampede_nodes").execute(&mut writer).await.map_err(unavailable)?;
                // A cluster's unique index on the keys goes with it. A single owner keeps
                // keys unique itself, lets a retired key be used again in another sale (see
                // the README), which the index would turn into a failed batch, and keeps
                // the hot insert to one index.
                if let Err(error) = sqlx::query(dialect.drop_key_index).execute(&mut writer).await
                    && !error.to_string().contains(dialect.no_such_index)
                {
                    return Err(unavailable(error));
                }
                // Bump the epoch: from here on, a node still holding the old one is fenced.
                let epoch = {
                    let mut tx = writer.begin().await.map_err(unavailable)?;
                    let previous: i64 =
                        sqlx::query_scalar("SELECT epoch FROM stampede_owner WHERE id = 1 FOR UPDATE")
                            .fetch_one(&mut *tx)
                            .await
                            .map_err(unavailable)?;
                    let epoch = previous + 1;
                    sqlx::query(q(&sql.claim_owner))
                        .bind(epoch)
                        .bind(node_name())
                        .bind(now_ms())
                        .execute(&mut *tx)
                        .await
                        .map_err(unavailable)?;
                    tx.commit().await.map_err(unavailable)?;
                    epoch
                };
                let readers = Self::reader_pool(&options, 1, READER_CONNECTIONS_MAX).await?;
                let audits = Self::reader_pool(&options, AUDIT_CONNECTIONS, AUDIT_CONNECTIONS).await?;
                tracing::info!(backend = dialect.name, epoch, "took ownership of the database");
                Ok(Self::assemble(Some(writer), readers, audits, options, sql, epoch, None, Duration::ZERO))
            }

            /// Joins the cluster of nodes writing this database: several nodes each sell
            /// stock leased from the sales (see `Store::lease`). A node whose heartbeat
            /// is older than `node_ttl` is declared dead by the others and its leases
            /// reclaimed; it can commit nothing after that.
            pub async fn open_cluster(url: &str, node_ttl: Duration) -> Result<$store, StoreError> {
                let options: $options = url.parse().map_err(unavailable)?;
                let dialect = &$dialect;
                let sql = Sql::new(dialect);
                let mut writer = Self::migrated_writer(&options).await?;
                let node = new_node_id();
                {
                    let mut tx = writer.begin().await.map_err(unavailable)?;
                    // Joins one at a time; every member's row locked, so no member
                    // commits while the unleased stock may be recounted.
                    sqlx::query("SELECT epoch FROM stampede_owner WHERE id = 1 FOR UPDATE")
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(unavailable)?;
                    sqlx::query("SELECT node FROM stampede_nodes FOR UPDATE")
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(unavailable)?;
                    let leases: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM stock_leases")
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(unavailable)?;
                    if leases == 0 {
                        // Nobody holds a lease: every unit not in an order is unleased.
                        // (A single owner before us kept no count of it.)
                        sqlx::query(q(&sql.rebase_unleased))
                            .execute(&mut *tx)
                            .await
                            .map_err(unavailable)?;
                        sqlx::query("DELETE FROM sale_holdings")
                            .execute(&mut *tx)
                            .await
                            .map_err(unavailable)?;
                        sqlx::query(q(&sql.rebase_holdings))
                            .execute(&mut *tx)
                            .await
                            .map_err(unavailable)?;
                    }
                    sqlx::query(q(&sql.join_node))
                        .bind(&node)
                        .bind(node_name())
                        .execute(&mut *tx)
                        .await
                        .map_err(unavailable)?;
                    tx.commit().await.map_err(unavailable)?;
                }
                let owner_lock = async {
                    take_owner_lock!(&mut writer, dialect, Duration::ZERO);
                    Ok::<_, StoreError>(())
                }
                .await;
                if let Err(error) = owner_lock {
                    let _ = sqlx::query(q(&sql.remove_node)).bind(&node).execute(&mut writer).await;
                    return Err(StoreError::Unavailable(format!(
                        "a single-owner node uses this database, so no cluster can: {error}"
                    )));
                }
                let fenced = async {
                    // No single owner is here. One whose connection dropped (the lock went
                    // with it) may still be running: bumping the epoch under the lock fences
                    // it, so when it reconnects it halts instead of writing beside the
                    // cluster. Cluster batches stamp their node's row, not this one.
                    sqlx::query("UPDATE stampede_owner SET epoch = epoch + 1 WHERE id = 1")
                        .execute(&mut writer)
                        .await
                        .map_err(unavailable)?;
                    sqlx::query(dialect.unlock).execute(&mut writer).await.map_err(unavailable)?;
                    Ok::<_, StoreError>(())
                }
                .await;
                if let Err(error) = fenced {
                    let _ = sqlx::query(q(&sql.remove_node)).bind(&node).execute(&mut writer).await;
                    return Err(error);
                }
                // Idempotency keys must be unique across nodes: a retry that reaches
                // another node finds the first order (outside the join transaction:
                // MySQL commits around DDL). Only once no owner holds the database: a
                // join refused beside a live owner must not leave the index to fail
                // that owner's batches (it lets a retired key be used again), nor build
                // it under the owner's inserts. No member commits before its open
                // returns, so none writes without the index.
                if let Err(error) = sqlx::query(
                    "CREATE UNIQUE INDEX orders_idempotency ON orders (user_id, idempotency_key)",
                )
                .execute(&mut writer)
                .await
                {
                    let text = error.to_string();
                    if !(text.contains("already exists")
                        || text.contains("Duplicate key name")
                        || text.contains("pg_class_relname_nsp_index"))
                    {
                        let _ = sqlx::query(q(&sql.remove_node)).bind(&node).execute(&mut writer).await;
                        return Err(StoreError::Unavailable(format!(
                            "cannot index idempotency keys for a cluster (a single owner lets a shopper use a retired idempotency key again in another sale, and a cluster needs each key to name one order: see the README): {error}"
                        )));
                    }
                }
                let readers = Self::reader_pool(&options, 1, READER_CONNECTIONS_MAX).await?;
                let audits = Self::reader_pool(&options, AUDIT_CONNECTIONS, AUDIT_CONNECTIONS).await?;
                tracing::info!(backend = dialect.name, %node, "joined the cluster");
                Ok(Self::assemble(Some(writer), readers, audits, options, sql, 0, Some(node), node_ttl))
            }

            fn cluster_node(&self) -> Result<&str, StoreError> {
                self.node
                    .as_deref()
                    .ok_or_else(|| StoreError::Unavailable("this store is not in a cluster".into()))
            }

            /// Makes every commit also write its order events to the outbox.
            pub fn with_outbox(mut self, outbox: bool) -> Self {
                self.outbox = outbox;
                self
            }

            /// Bounds each statement of the writer (a batch's inserts and updates, its
            /// `COMMIT`, leases, heartbeats) to `deadline`, on the writer connection now
            /// and on every one made later, so a stalled database fails a commit instead
            /// of holding the writer. Readers are not bounded: an audit or the load at
            /// start may rightly take long on a big table. `None`: no deadline of ours.
            pub async fn with_statement_timeout(
                mut self,
                deadline: Option<Duration>,
            ) -> Result<Self, StoreError> {
                self.deadline = deadline;
                if let (Some(deadline), Some(writer)) = (deadline, self.writer.get_mut().as_mut()) {
                    if Self::bound_statements(writer, deadline).await? == Bound::LockWaits {
                        tracing::warn!(
                            ?deadline,
                            backend = $dialect.name,
                            "database_timeout bounds only the writer's lock waits here: MySQL has no deadline for a write's run, and on PostgreSQL a COMMIT that waits for a synchronous standby must not be cut short"
                        );
                    }
                }
                Ok(self)
            }

            /// Sets the writer's deadline on `writer`; what it bounds.
            async fn bound_statements(writer: &mut $conn, deadline: Duration) -> Result<Bound, StoreError> {
                let dialect = &$dialect;
                let waits = match dialect.commit_waits_on_standby {
                    Some(query) => sqlx::query_scalar::<_, bool>(query)
                        .fetch_one(&mut *writer)
                        .await
                        .map_err(unavailable)?,
                    None => false,
                };
                let (set, bound) = (dialect.deadline)(deadline, waits);
                sqlx::query(AssertSqlSafe(set))
                    .execute(&mut *writer)
                    .await
                    .map_err(unavailable)?;
                let Some(where_known) = dialect.deadline_where_known else {
                    return Ok(bound);
                };
                match sqlx::query(AssertSqlSafe(where_known(deadline)))
                    .execute(&mut *writer)
                    .await
                {
                    Ok(_) => Ok(Bound::Statements),
                    Err(error) if error.to_string().contains("Unknown system variable") => Ok(bound),
                    Err(error) => Err(unavailable(error)),
                }
            }

            /// A new writer connection with the deadline, before anything runs on it.
            async fn connect_deadlined(&self) -> Result<$conn, StoreError> {
                let mut writer = Self::connect_writer(&self.options).await?;
                if let Some(deadline) = self.deadline {
                    Self::bound_statements(&mut writer, deadline).await?;
                }
                Ok(writer)
            }

            /// Sends order-list reads to a read replica at `url`, in read-only
            /// transactions. Connects lazily: a replica that is down at start, or later,
            /// only sends the reads back to the primary.
            pub fn with_replica(mut self, url: &str) -> Result<Self, StoreError> {
                let options: $options = url.parse().map_err(unavailable)?;
                self.replica = Some(
                    Self::pool_options(options.get_port())
                        .max_connections(READER_CONNECTIONS_MAX)
                        .acquire_timeout(REPLICA_ACQUIRE_TIMEOUT)
                        .connect_lazy_with(options),
                );
                Ok(self)
            }

            pub fn into_arc(self) -> Arc<dyn Store> {
                Arc::new(self)
            }

            /// A new writer connection holding the owner lock, still under our epoch (in
            /// a cluster: while this node is still a member).
            async fn reconnect(&self) -> Result<$conn, StoreError> {
                if let Some(node) = &self.node {
                    let mut writer = self.connect_deadlined().await?;
                    let member: Option<i64> = sqlx::query_scalar(q(&self.sql.node_batch_seq))
                        .bind(node)
                        .fetch_optional(&mut writer)
                        .await
                        .map_err(unavailable)?;
                    if member.is_none() {
                        return Err(StoreError::Fenced(format!(
                            "node {node} was declared dead and its leases reclaimed"
                        )));
                    }
                    return Ok(writer);
                }
                if self.epoch < 0 {
                    return Err(StoreError::Fenced("opened read-only".into()));
                }
                let dialect = &$dialect;
                let mut writer = self.connect_deadlined().await?;
                take_owner_lock!(&mut writer, dialect, Duration::ZERO);
                let epoch: i64 = sqlx::query_scalar("SELECT epoch FROM stampede_owner WHERE id = 1")
                    .fetch_one(&mut writer)
                    .await
                    .map_err(unavailable)?;
                if epoch != self.epoch {
                    return Err(StoreError::Fenced(format!(
                        "another node took ownership of the database (epoch {epoch}, ours {})",
                        self.epoch
                    )));
                }
                Ok(writer)
            }

            /// After a failed `COMMIT`: did batch `seq` land? Keeps trying to ask until
            /// `RESOLVE_DEADLINE`. The stamp is read where a `COMMIT` still on its way
            /// cannot be overtaken: a single owner's under the owner lock, which the old
            /// session holds until its transaction ends; a cluster node's with a locking
            /// read, which waits for the transaction that stamped the row. A plain read
            /// could see the old stamp, call a batch that then lands failed, and give its
            /// stock back.
            async fn resolve(&self, seq: i64) -> Result<(bool, $conn), StoreError> {
                let deadline = tokio::time::Instant::now() + RESOLVE_DEADLINE;
                loop {
                    let asked = async {
                        let mut writer = self.reconnect().await?;
                        let landed: i64 = match &self.node {
                            Some(node) => sqlx::query_scalar(q(&self.sql.node_batch_seq_locked))
                                .bind(node)
                                .fetch_one(&mut writer)
                                .await
                                .map_err(unavailable)?,
                            None => sqlx::query_scalar("SELECT batch_seq FROM stampede_owner WHERE id = 1")
                                .fetch_one(&mut writer)
                                .await
                                .map_err(unavailable)?,
                        };
                        Ok::<_, StoreError>((landed == seq, writer))
                    }
                    .await;
                    match asked {
                        Ok(answer) => return Ok(answer),
                        // Declared dead since: the batch may have landed before that.
                        Err(StoreError::Fenced(why)) if self.node.is_some() => {
                            return Err(StoreError::Indeterminate(format!("batch {seq}: {why}")));
                        }
                        Err(StoreError::Fenced(why)) => return Err(StoreError::Fenced(why)),
                        Err(error) if tokio::time::Instant::now() >= deadline => {
                            return Err(StoreError::Indeterminate(format!(
                                "batch {seq}: the commit's outcome is unknown and the database \
                                 cannot be reached to find out ({error})"
                            )));
                        }
                        Err(error) => {
                            tracing::warn!(%error, seq, "resolving a lost commit; retrying");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            }
        }

        #[async_trait]
        impl Store for $store {
            async fn load(&self, into: &mut dyn Rebuild) -> Result<(), StoreError> {
                // One snapshot for the three reads: a node starting while others sell must
                // not see orders of a sale created after it read the sales.
                let mut connection = self
                    .readers
                    .begin_with($dialect.begin_snapshot)
                    .await
                    .map_err(unavailable)?;
                let products = fetch_products!(&mut *connection)?;
                let sales = sqlx::query(
                    "SELECT id, sku, price_cents, quantity, per_user_limit, starts_at_ms, ends_at_ms, \
                     created_at_ms FROM flash_sales ORDER BY created_at_ms, id",
                )
                .fetch_all(&mut *connection)
                .await
                .map_err(unavailable)?
                .iter()
                .map(|row| sale_from_row!(row))
                .collect::<Result<_, _>>()?;
                into.catalog(products, sales);
                // Streamed: each order is handed over as its row arrives.
                let mut orders =
                    sqlx::query(concat!("SELECT ", order_columns!(), " FROM orders ORDER BY id"))
                        .fetch(&mut *connection);
                while let Some(row) = orders.try_next().await.map_err(unavailable)? {
                    into.order(order_from_row!(&row)?);
                }
                Ok(())
            }

            async fn commit(&self, ops: &[WriteOp]) -> Result<Vec<OpOutcome>, StoreError> {
                // Held for the whole commit: one batch at a time, as the engine sends them.
                let mut guard = self.writer.lock().await;
                let mut writer = match guard.take() {
                    Some(writer) => writer,
                    None => self.reconnect().await?,
                };
                // In a cluster another node may have been first with a shopper's
                // idempotency key or per-user limit: the batch fails on a constraint, those
                // orders are set aside with what they ran into, and the rest is retried.
                let mut set_aside: Vec<Option<OpOutcome>> = vec![None; ops.len()];
                let mut retries = 0;
                loop {
                    let live: std::borrow::Cow<'_, [WriteOp]> = if retries == 0 {
                        std::borrow::Cow::Borrowed(ops)
                    } else {
                        ops.iter()
                            .zip(&set_aside)
                            .filter(|(_, aside)| aside.is_none())
                            .map(|(op, _)| op.clone())
                            .collect()
                    };
                    let seq = self.batch_seq.load(std::sync::atomic::Ordering::Relaxed) + 1;
                    let prepared = async {
                        let mut tx = writer.begin().await.map_err(unavailable)?;
                        let stamped = match &self.node {
                            Some(node) => sqlx::query(q(&self.sql.stamp_node)).bind(seq).bind(node),
                            None => sqlx::query(q(&self.sql.stamp_owner)).bind(seq).bind(self.epoch),
                        }
                        .execute(&mut *tx)
                        .await
                        .map_err(unavailable)?;
                        if stamped.rows_affected() != 1 {
                            return Err(StoreError::Fenced(match &self.node {
                                Some(node) => format!("node {node} was declared dead and its leases reclaimed"),
                                None => format!(
                                    "another node took ownership of the database (our epoch {})",
                                    self.epoch
                                ),
                            }));
                        }
                        // On any error the transaction is dropped and rolled back.
                        let outcomes = apply!(&mut *tx, &live, &self.sql, $db, $insert_orders);
                        if let Some(node) = &self.node {
                            settle_cluster!(&mut *tx, &self.sql, node, &live, &outcomes, $db);
                        }
                        if self.outbox {
                            insert_outbox!(&mut *tx, $db, outbox_events(&live, &outcomes));
                        }
                        // Whether COMMIT answered: its error is resolved below.
                        let committed = tx.commit().await;
                        Ok((committed, outcomes))
                    }
                    .await;
                    let (committed, outcomes) = match prepared {
                        Ok(prepared) => prepared,
                        Err(StoreError::Unavailable(why)) if self.node.is_some() && retries < 3 => {
                            let conflicts = find_conflicts!(&mut writer, &self.sql, $db, &live);
                            let conflicts = match conflicts {
                                Ok(conflicts) if !conflicts.is_empty() => conflicts,
                                // Two nodes' batches locked shoppers' holdings in opposite
                                // orders; the database rolled this one back: again.
                                Ok(_) if why.to_lowercase().contains("deadlock") => {
                                    metrics::counter!("stampede_cluster_deadlocks_total").increment(1);
                                    retries += 1;
                                    continue;
                                }
                                // Not a conflict (or the connection broke): a failed batch.
                                _ => return Err(StoreError::Unavailable(why)),
                            };
                            let live_indexes: Vec<usize> =
                                (0..ops.len()).filter(|&i| set_aside[i].is_none()).collect();
                            for (index, outcome) in conflicts {
                                set_aside[live_indexes[index]] = Some(outcome);
                            }
                            metrics::counter!("stampede_cluster_conflicts_total").increment(1);
                            retries += 1;
                            continue;
                        }
                        // On an error before COMMIT nothing was written; the connection
                        // is dropped (a fresh one next time) in case the error broke it.
                        Err(error) => return Err(error),
                    };
                    let landed = match committed {
                        Ok(()) => {
                            *guard = Some(writer);
                            true
                        }
                        Err(error) if ops.is_empty() => {
                            // The writer's probe: nothing at stake, so nothing to resolve
                            // (resolving could only halt the node for a batch that held no
                            // orders). Its number is used up whether or not it landed, so
                            // the next batch's stamp is new either way.
                            drop(writer);
                            self.batch_seq.store(seq, std::sync::atomic::Ordering::Relaxed);
                            return Err(unavailable(error));
                        }
                        Err(error) => {
                            drop(writer);
                            tracing::warn!(%error, seq, "COMMIT failed; finding out whether the batch landed");
                            let (landed, writer) = self.resolve(seq).await?;
                            *guard = Some(writer);
                            if !landed {
                                // Its number is used up: were the next batch to reuse it
                                // and lose its COMMIT too, a stamp of this one's could
                                // read as the next one landing.
                                self.batch_seq.store(seq, std::sync::atomic::Ordering::Relaxed);
                                return Err(unavailable(error));
                            }
                            true
                        }
                    };
                    debug_assert!(landed);
                    self.batch_seq.store(seq, std::sync::atomic::Ordering::Relaxed);
                    let mut outcomes = outcomes.into_iter();
                    return Ok(set_aside
                        .into_iter()
                        .map(|aside| {
                            aside.unwrap_or_else(|| outcomes.next().expect("one outcome per live op"))
                        })
                        .collect());
                }
            }
            async fn order(&self, id: OrderId) -> Result<Option<OrderRecord>, StoreError> {
                sqlx::query(q(&self.sql.order_by_id))
                    .bind(id.to_string())
                    .fetch_optional(&self.readers)
                    .await
                    .map_err(unavailable)?
                    .as_ref()
                    .map(|row| order_from_row!(row))
                    .transpose()
            }

            async fn orders_by_id(&self, ids: &[OrderId]) -> Result<Vec<OrderRecord>, StoreError> {
                if let Some(replica) = &self.replica {
                    let from_replica = async {
                        let mut tx = replica
                            .begin_with($dialect.begin_read_only)
                            .await
                            .map_err(unavailable)?;
                        let found = fetch_orders!(&mut *tx, $db, ids);
                        drop(tx);
                        found
                    }
                    .await;
                    match from_replica {
                        Ok(mut found) => {
                            metrics::counter!("stampede_replica_reads_total").increment(1);
                            // Read your writes: what the replica has not caught up with yet
                            // comes from the primary.
                            let have: std::collections::HashSet<OrderId> =
                                found.iter().map(|order| order.id).collect();
                            let missing: Vec<OrderId> =
                                ids.iter().copied().filter(|id| !have.contains(id)).collect();
                            if !missing.is_empty() {
                                found.extend(fetch_orders!(&self.readers, $db, &missing)?);
                            }
                            return Ok(found);
                        }
                        Err(error) => {
                            metrics::counter!("stampede_replica_fallbacks_total").increment(1);
                            tracing::warn!(%error, "read replica failed; reading the primary");
                        }
                    }
                }
                fetch_orders!(&self.readers, $db, ids)
            }

            async fn tally(&self, sale: SaleId, per_user_limit: u32) -> Result<SaleTally, StoreError> {
                let mut connection = self.readers.acquire().await.map_err(unavailable)?;
                let sql_unsold = self.node.as_ref().map(|_| Arc::clone(&self.sql.unsold));
                tally_on!(&mut *connection, &self.sql, sale, per_user_limit, sql_unsold)
            }

            async fn snapshot_tally(
                &self,
                sale: SaleId,
                per_user_limit: u32,
            ) -> Result<PendingTally, StoreError> {
                let mut snapshot = self
                    .audits
                    .begin_with($dialect.begin_snapshot)
                    .await
                    .map_err(unavailable)?;
                // PostgreSQL fixes the snapshot at the first statement; MySQL already has.
                sqlx::query("SELECT 1 FROM stampede_owner WHERE id = 1")
                    .fetch_optional(&mut *snapshot)
                    .await
                    .map_err(unavailable)?;
                let sql_tally = Arc::clone(&self.sql.tally_by_status);
                let sql_over = Arc::clone(&self.sql.users_over_limit);
                let sql_unsold = self.node.as_ref().map(|_| Arc::clone(&self.sql.unsold));
                Ok(Box::pin(async move {
                    let tally = tally_with!(&mut *snapshot, sql_tally, sql_over, sale, per_user_limit, sql_unsold);
                    // Dropping the read-only transaction rolls it back: nothing to keep.
                    drop(snapshot);
                    tally
                }))
            }

            async fn ping(&self) -> Result<(), StoreError> {
                sqlx::query("SELECT 1").execute(&self.readers).await.map_err(unavailable)?;
                Ok(())
            }

            fn node(&self) -> Option<&str> {
                self.node.as_deref()
            }

            async fn lease(&self, sale: SaleId, wanted: u64, max: u64) -> Result<LeaseGrant, StoreError> {
                let node = self.cluster_node()?;
                on_writer!(self, |writer| {
                    let sale_id = sale.to_string();
                    let mut tx = writer.begin().await.map_err(unavailable)?;
                    still_member!(&mut *tx, self, node);
                    let unleased: Option<i64> = sqlx::query_scalar(q(&self.sql.lock_unleased))
                        .bind(&sale_id)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(unavailable)?;
                    let Some(unleased) = unleased else {
                        return Err(StoreError::Unavailable(format!("no sale {sale_id}")));
                    };
                    let unleased = u64::try_from(unleased)
                        .map_err(|_| corrupt("unleased units", &unleased.to_string()))?;
                    let live: i64 = sqlx::query_scalar(q(&self.sql.live_nodes))
                        .bind(self.node_ttl_ms)
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(unavailable)?;
                    let units = if unleased == 0 { 0 } else { lease_size(unleased, live.max(1) as u64, wanted, max) };
                    if units > 0 {
                        sqlx::query(q(&self.sql.take_unleased))
                            .bind(units as i64)
                            .bind(&sale_id)
                            .bind(units as i64)
                            .execute(&mut *tx)
                            .await
                            .map_err(unavailable)?;
                        sqlx::query(q(&self.sql.add_to_lease))
                            .bind(&sale_id)
                            .bind(node)
                            .bind(units as i64)
                            .execute(&mut *tx)
                            .await
                            .map_err(unavailable)?;
                    }
                    tx.commit().await.map_err(unavailable)?;
                    Ok(LeaseGrant { units, unleased: unleased - units })
                })
            }

            async fn release(&self, sale: SaleId, units: u64) -> Result<(), StoreError> {
                let node = self.cluster_node()?;
                on_writer!(self, |writer| {
                    let sale_id = sale.to_string();
                    let mut tx = writer.begin().await.map_err(unavailable)?;
                    still_member!(&mut *tx, self, node);
                    let taken = sqlx::query(q(&self.sql.take_from_lease))
                        .bind(units as i64)
                        .bind(&sale_id)
                        .bind(node)
                        .bind(units as i64)
                        .execute(&mut *tx)
                        .await
                        .map_err(unavailable)?;
                    if taken.rows_affected() != 1 {
                        return Err(StoreError::Fenced(format!(
                            "node {node}'s lease of sale {sale_id} holds fewer than {units} units"
                        )));
                    }
                    sqlx::query(q(&self.sql.give_unleased))
                        .bind(units as i64)
                        .bind(&sale_id)
                        .execute(&mut *tx)
                        .await
                        .map_err(unavailable)?;
                    tx.commit().await.map_err(unavailable)?;
                    Ok(())
                })
            }

            async fn heartbeat(&self) -> Result<(), StoreError> {
                let node = self.cluster_node()?;
                on_writer!(self, |writer| {
                    still_member!(&mut *writer, self, node);
                    Ok(())
                })
            }

            async fn reclaim(&self) -> Result<Reclaimed, StoreError> {
                let node = self.cluster_node()?;
                on_writer!(self, |writer| {
                    let dead: Vec<String> = sqlx::query_scalar(q(&self.sql.dead_nodes))
                        .bind(self.node_ttl_ms)
                        .fetch_all(&mut *writer)
                        .await
                        .map_err(unavailable)?;
                    let mut reclaimed = Reclaimed::default();
                    for dead in dead.iter().filter(|dead| dead.as_str() != node) {
                        let mut tx = writer.begin().await.map_err(unavailable)?;
                        // Deleting the row waits for a commit of that node in flight and
                        // re-checks its heartbeat: a node that is alive after all stays.
                        let removed = sqlx::query(q(&self.sql.remove_dead_node))
                            .bind(dead)
                            .bind(self.node_ttl_ms)
                            .execute(&mut *tx)
                            .await
                            .map_err(unavailable)?;
                        if removed.rows_affected() == 1 {
                            reclaimed.units += return_leases!(&mut *tx, &self.sql, dead);
                            reclaimed.nodes += 1;
                            tracing::warn!(node = %dead, "removed a node that left or stopped heartbeating, and reclaimed its leases");
                        }
                        tx.commit().await.map_err(unavailable)?;
                    }
                    Ok(reclaimed)
                })
            }

            async fn pending_orders(&self) -> Result<Vec<(OrderId, i64)>, StoreError> {
                // On a reader: the scan reads the whole table, which may rightly take
                // longer than the writer's deadline. The writer asks again until a scan
                // succeeds, since the nodes it adopts from are already gone.
                let mut rows = sqlx::query(
                    "SELECT id, expires_at_ms FROM orders WHERE status = 'pending_payment'",
                )
                .fetch(&self.readers);
                let mut pending = Vec::new();
                while let Some(row) = rows.try_next().await.map_err(unavailable)? {
                    let id: String = row.try_get("id").map_err(unavailable)?;
                    let expires_at_ms: i64 = row.try_get("expires_at_ms").map_err(unavailable)?;
                    pending.push((
                        OrderId::parse(&id).ok_or_else(|| corrupt("order id", &id))?,
                        expires_at_ms,
                    ));
                }
                Ok(pending)
            }

            async fn catalog(&self) -> Result<Catalog, StoreError> {
                let mut connection = self.readers.acquire().await.map_err(unavailable)?;
                let products = fetch_products!(&mut *connection)?;
                let mut sales = Vec::new();
                for row in sqlx::query(q(&self.sql.catalog_sales))
                    .fetch_all(&mut *connection)
                    .await
                    .map_err(unavailable)?
                {
                    let unsold: i64 = row.try_get("unsold").map_err(unavailable)?;
                    sales.push((sale_from_row!(&row)?, unsold.max(0) as u64));
                }
                Ok(Catalog { products, sales })
            }

            async fn orders_of_user(
                &self,
                user: &UserId,
                limit: u32,
            ) -> Result<Option<Vec<OrderRecord>>, StoreError> {
                if self.node.is_none() {
                    return Ok(None);
                }
                // The cluster's unique (user_id, idempotency_key) index serves this.
                let orders = sqlx::query(q(&self.sql.orders_of_user))
                    .bind(user.as_str())
                    .bind(i64::from(limit))
                    .fetch_all(&self.readers)
                    .await
                    .map_err(unavailable)?
                    .iter()
                    .map(|row| order_from_row!(row))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Some(orders))
            }

            async fn order_by_key(
                &self,
                user: &UserId,
                key: &IdempotencyKey,
            ) -> Result<Option<OrderRecord>, StoreError> {
                if self.node.is_none() {
                    return Ok(None);
                }
                // The cluster's unique (user_id, idempotency_key) index serves this.
                sqlx::query(q(&self.sql.order_by_key))
                    .bind(user.as_str())
                    .bind(key.as_str())
                    .fetch_optional(&self.readers)
                    .await
                    .map_err(unavailable)?
                    .as_ref()
                    .map(|row| order_from_row!(row))
                    .transpose()
            }

            async fn leave(&self) -> Result<(), StoreError> {
                let node = self.cluster_node()?;
                on_writer!(self, |writer| {
                    let mut tx = writer.begin().await.map_err(unavailable)?;
                    let member: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
                        "{} FOR UPDATE",
                        self.sql.node_batch_seq
                    )))
                    .bind(node)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(unavailable)?;
                    if member.is_none() {
                        // Declared dead already: the leases were reclaimed.
                        return Ok(());
                    }
                    return_leases!(&mut *tx, &self.sql, node);
                    // Its pending orders still need someone to expire them (and return
                    // their stock): the row stays as a departed node's, which the next
                    // reclaim on any survivor removes, adopting those orders' expiry as
                    // it does a dead node's.
                    sqlx::query(q(&self.sql.depart_node))
                        .bind(node)
                        .execute(&mut *tx)
                        .await
                        .map_err(unavailable)?;
                    tx.commit().await.map_err(unavailable)?;
                    Ok(())
                })
            }

            async fn outbox_read(&self, limit: usize) -> Result<Vec<OutboxEvent>, StoreError> {
                read_outbox!(&self.readers, $db, limit)
            }

            async fn relay_turn(&self, ready: bool) -> Result<bool, StoreError> {
                let Some(node) = self.node.as_deref() else {
                    return Ok(true);
                };
                let was_ready = self.relay_ready.swap(ready, std::sync::atomic::Ordering::Relaxed);
                if !ready {
                    // Its last claim lapses after the node time to live.
                    return Ok(false);
                }
                if !was_ready {
                    // Claimed now rather than at the next heartbeat; from then on every
                    // heartbeat renews it.
                    Store::heartbeat(self).await?;
                }
                let oldest: Option<String> = sqlx::query_scalar(q(&self.sql.oldest_live_node))
                    .bind(self.node_ttl_ms)
                    .bind(self.node_ttl_ms)
                    .fetch_optional(&self.readers)
                    .await
                    .map_err(unavailable)?;
                Ok(oldest.as_deref() == Some(node))
            }

            async fn outbox_remove(&self, seqs: &[i64]) -> Result<(), StoreError> {
                remove_outbox!(&self.readers, $db, seqs)
            }

            async fn charges_to_settle(&self) -> Result<Vec<ChargeAttempt>, StoreError> {
                fetch_charges_to_settle!(&self.readers)
            }

            async fn load_setting(&self, key: &str) -> Result<Option<String>, StoreError> {
                let row = sqlx::query(q(&self.sql.load_setting))
                    .bind(key)
                    .fetch_optional(&self.readers)
                    .await
                    .map_err(unavailable)?;
                row.map(|r| r.try_get::<String, _>("value").map_err(unavailable)).transpose()
            }

            async fn save_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
                // Through the readers' pool: a setting is not stock, and needs no owner.
                sqlx::query(q(&self.sql.save_setting))
                    .bind(key)
                    .bind(value)
                    .bind(now_ms())
                    .execute(&self.readers)
                    .await
                    .map_err(unavailable)?;
                Ok(())
            }
            async fn save_setting_if(
                &self,
                key: &str,
                value: &str,
                expected: Option<&str>,
            ) -> Result<bool, StoreError> {
                let saved = match expected {
                    // A plain insert: another node's at the same moment is a unique
                    // violation, not an update (MySQL's upsert counts a row it found as
                    // changed, so it could not tell).
                    None => sqlx::query(q(&self.sql.insert_setting))
                        .bind(key)
                        .bind(value)
                        .bind(now_ms())
                        .execute(&self.readers)
                        .await,
                    Some(expected) => sqlx::query(q(&self.sql.swap_setting))
                        .bind(value)
                        .bind(now_ms())
                        .bind(key)
                        .bind(expected)
                        .execute(&self.readers)
                        .await,
                };
                match saved {
                    Ok(done) => Ok(done.rows_affected() == 1),
                    Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(false),
                    Err(e) => Err(unavailable(e)),
                }
            }
        }
    };
}

/// Runs `$body` with the writer connection (`$conn: &mut Connection`), reconnecting if
/// an earlier failure dropped it; a failure drops it again (it may be broken).
macro_rules! on_writer {
    ($self:expr, |$conn:ident| $body:expr) => {{
        let mut guard = $self.writer.lock().await;
        let mut connection = match guard.take() {
            Some(connection) => connection,
            None => $self.reconnect().await?,
        };
        let result = async {
            let $conn = &mut connection;
            $body
        }
        .await;
        if result.is_ok() {
            *guard = Some(connection);
        }
        result
    }};
}

/// Returns every lease of `$node` to its sale's unleased pool and deletes them, in an
/// open transaction that already holds `$node`'s row (so its commits are stopped);
/// answers the units returned. Sales are locked in id order, as a lease locks them.
macro_rules! return_leases {
    ($conn:expr, $sql:expr, $node:expr) => {{
        let leases = sqlx::query(q(&$sql.node_leases))
            .bind($node)
            .fetch_all(&mut *$conn)
            .await
            .map_err(unavailable)?;
        let mut returned: u64 = 0;
        for lease in leases {
            let sale_id: String = lease.try_get("sale_id").map_err(unavailable)?;
            let units: i64 = lease.try_get("units").map_err(unavailable)?;
            sqlx::query(q(&$sql.give_unleased))
                .bind(units)
                .bind(&sale_id)
                .execute(&mut *$conn)
                .await
                .map_err(unavailable)?;
            returned += units.max(0) as u64;
        }
        sqlx::query(q(&$sql.remove_node_leases))
            .bind($node)
            .execute(&mut *$conn)
            .await
            .map_err(unavailable)?;
        returned
    }};
}

/// Heartbeats this cluster node's row, row-locking it for the rest of the transaction:
/// `Fenced` if the node was declared dead.
macro_rules! still_member {
    ($conn:expr, $store:expr, $node:expr) => {{
        let stamped = sqlx::query(q(&$store.sql.heartbeat))
            .bind(
                $store
                    .relay_ready
                    .load(std::sync::atomic::Ordering::Relaxed),
            )
            .bind($node)
            .execute($conn)
            .await
            .map_err(unavailable)?;
        if stamped.rows_affected() != 1 {
            return Err(StoreError::Fenced(format!(
                "node {} was declared dead and its leases reclaimed",
                $node
            )));
        }
    }};
}

/// In a cluster: counts the units each shopper holds, and takes the units of the batch's inserted orders from this node's leases
/// and adds the units its cancellations and expiries returned, one statement per sale.
/// A lease that no longer covers the orders fails the whole batch.
macro_rules! settle_cluster {
    ($conn:expr, $sql:expr, $node:expr, $ops:expr, $outcomes:expr, $db:ty) => {{
        let mut deltas: std::collections::BTreeMap<SaleId, i64> = Default::default();
        for (op, outcome) in $ops.iter().zip($outcomes.iter()) {
            match (op, outcome) {
                (WriteOp::InsertOrder(order), OpOutcome::Written) => {
                    *deltas.entry(order.sale_id).or_default() -= i64::from(order.quantity.get());
                }
                (
                    WriteOp::Transition { to, .. },
                    OpOutcome::Transitioned {
                        sale_id, quantity, ..
                    },
                ) if !to.holds_stock() => {
                    *deltas.entry(*sale_id).or_default() += i64::from(quantity.get());
                }
                _ => {}
            }
        }
        // Units each shopper holds: inserts add (one multi-row upsert, whose CHECK fails
        // the batch if another node's orders already took a shopper to the limit),
        // cancellations and expiries take away.
        let mut holdings: std::collections::BTreeMap<(SaleId, &UserId), i64> = Default::default();
        for (op, outcome) in $ops.iter().zip($outcomes.iter()) {
            match (op, outcome) {
                (WriteOp::InsertOrder(order), OpOutcome::Written) => {
                    *holdings.entry((order.sale_id, &order.user_id)).or_default() +=
                        i64::from(order.quantity.get());
                }
                (
                    WriteOp::Transition { to, .. },
                    OpOutcome::Transitioned {
                        sale_id,
                        user_id,
                        quantity,
                        ..
                    },
                ) if !to.holds_stock() => {
                    *holdings.entry((*sale_id, user_id)).or_default() -= i64::from(quantity.get());
                }
                _ => {}
            }
        }
        let added: Vec<(String, &UserId, i64)> = holdings
            .iter()
            .filter(|(_, units)| **units > 0)
            .map(|((sale, user), units)| (sale.to_string(), *user, *units))
            .collect();
        for chunk in added.chunks(HOLDINGS_CHUNK_ROWS) {
            let mut query: QueryBuilder<$db> = QueryBuilder::new(
                "INSERT INTO sale_holdings (sale_id, user_id, units, per_user_limit) ",
            );
            query.push_values(chunk, |mut row, (sale, user, units)| {
                row.push_bind(sale.as_str())
                    .push_bind(user.as_str())
                    .push_bind(*units)
                    .push("(SELECT per_user_limit FROM flash_sales WHERE id = ")
                    .push_bind_unseparated(sale.as_str())
                    .push_unseparated(")");
            });
            query.push(&*$sql.add_holdings);
            query
                .build()
                .execute(&mut *$conn)
                .await
                .map_err(unavailable)?;
        }
        for ((sale, user), units) in holdings.iter().filter(|(_, units)| **units < 0) {
            sqlx::query(q(&$sql.release_holdings))
                .bind(-*units)
                .bind(sale.to_string())
                .bind(user.as_str())
                .execute(&mut *$conn)
                .await
                .map_err(unavailable)?;
        }
        for (sale_id, delta) in deltas {
            let sale_id = sale_id.to_string();
            if delta < 0 {
                let taken = sqlx::query(q(&$sql.take_from_lease))
                    .bind(-delta)
                    .bind(&sale_id)
                    .bind($node)
                    .bind(-delta)
                    .execute(&mut *$conn)
                    .await
                    .map_err(unavailable)?;
                if taken.rows_affected() != 1 {
                    return Err(StoreError::Fenced(format!(
                        "node {}'s lease of sale {sale_id} does not cover {} units",
                        $node, -delta
                    )));
                }
            } else if delta > 0 {
                sqlx::query(q(&$sql.add_to_lease))
                    .bind(&sale_id)
                    .bind($node)
                    .bind(delta)
                    .execute(&mut *$conn)
                    .await
                    .map_err(unavailable)?;
            }
        }
    }};
}

/// In a cluster, after a batch failed: the orders of `$ops` that another node got to
/// first, by index in `$ops`: a shopper's idempotency key already used
/// (`OpOutcome::Duplicate`), or a per-user limit the shopper's orders on other nodes
/// already reach (`OpOutcome::OverLimit`).
macro_rules! find_conflicts {
    ($conn:expr, $sql:expr, $db:ty, $ops:expr) => {
        async {
            let ops: &[WriteOp] = $ops;
            let orders: Vec<(usize, &OrderRecord)> = ops
                .iter()
                .enumerate()
                .filter_map(|(i, op)| match op {
                    WriteOp::InsertOrder(order) => Some((i, order)),
                    _ => None,
                })
                .collect();
            let mut conflicts: Vec<(usize, OpOutcome)> = Vec::new();
            // Another node created the product, or took its stock for a sale, first.
            for (i, op) in ops.iter().enumerate() {
                match op {
                    WriteOp::InsertProduct(product) => {
                        let found: Option<i64> = sqlx::query_scalar(q(&$sql.product_available))
                            .bind(product.sku.as_str())
                            .fetch_optional(&mut *$conn)
                            .await
                            .map_err(unavailable)?;
                        if found.is_some() {
                            conflicts.push((i, OpOutcome::Conflict));
                        }
                    }
                    WriteOp::InsertSale(sale) => {
                        let available: Option<i64> = sqlx::query_scalar(q(&$sql.product_available))
                            .bind(sale.sku.as_str())
                            .fetch_optional(&mut *$conn)
                            .await
                            .map_err(unavailable)?;
                        if available.is_none_or(|units| units < sale.quantity as i64) {
                            conflicts.push((i, OpOutcome::Conflict));
                        }
                    }
                    _ => {}
                }
            }
            let mut existing: std::collections::HashMap<(String, String), OrderRecord> =
                Default::default();
            for chunk in orders.chunks(256) {
                let mut query: QueryBuilder<$db> = QueryBuilder::new(concat!(
                    "SELECT ",
                    order_columns!(),
                    " FROM orders WHERE (user_id, idempotency_key) IN ("
                ));
                for (n, (_, order)) in chunk.iter().enumerate() {
                    if n > 0 {
                        query.push(", ");
                    }
                    query.push("(");
                    query.push_bind(order.user_id.as_str());
                    query.push(", ");
                    query.push_bind(order.idempotency_key.as_str());
                    query.push(")");
                }
                query.push(")");
                for row in query
                    .build()
                    .fetch_all(&mut *$conn)
                    .await
                    .map_err(unavailable)?
                {
                    let found = order_from_row!(&row)?;
                    existing.insert(
                        (
                            found.user_id.to_string(),
                            found.idempotency_key.as_str().to_owned(),
                        ),
                        found,
                    );
                }
            }
            let mut by_sale: std::collections::BTreeMap<SaleId, Vec<(usize, &OrderRecord)>> =
                Default::default();
            for (i, order) in &orders {
                let id = (
                    order.user_id.to_string(),
                    order.idempotency_key.as_str().to_owned(),
                );
                match existing.get(&id) {
                    Some(found) if found.id != order.id => {
                        conflicts.push((*i, OpOutcome::Duplicate(Box::new(found.clone()))))
                    }
                    _ => by_sale.entry(order.sale_id).or_default().push((*i, order)),
                }
            }
            for (sale_id, orders) in by_sale {
                let sale = sale_id.to_string();
                let limit: i64 = sqlx::query_scalar(q(&$sql.sale_limit))
                    .bind(&sale)
                    .fetch_one(&mut *$conn)
                    .await
                    .map_err(unavailable)?;
                let mut held: std::collections::HashMap<String, i64> = Default::default();
                for chunk in orders.chunks(256) {
                    let mut query: QueryBuilder<$db> = QueryBuilder::new(
                        "SELECT user_id, units FROM sale_holdings WHERE sale_id = ",
                    );
                    query.push_bind(sale.as_str());
                    query.push(" AND user_id IN (");
                    let mut users = query.separated(", ");
                    for (_, order) in chunk {
                        users.push_bind(order.user_id.as_str());
                    }
                    query.push(")");
                    for row in query
                        .build()
                        .fetch_all(&mut *$conn)
                        .await
                        .map_err(unavailable)?
                    {
                        let user: String = row.try_get("user_id").map_err(unavailable)?;
                        let units: i64 = row.try_get("units").map_err(unavailable)?;
                        held.insert(user, units);
                    }
                }
                for (i, order) in orders {
                    let units = held.entry(order.user_id.to_string()).or_default();
                    let wanted = i64::from(order.quantity.get());
                    if *units + wanted > limit {
                        conflicts.push((
                            i,
                            OpOutcome::OverLimit {
                                held: (*units).clamp(0, i64::from(u32::MAX)) as u32,
                            },
                        ));
                    } else {
                        *units += wanted;
                    }
                }
            }
            Ok::<_, StoreError>(conflicts)
        }
        .await
    };
}

macro_rules! check_durability {
    ($conn:expr, $dialect:expr) => {
        for (query, name, durable) in $dialect.durability {
            let value: String = sqlx::query_scalar(*query)
                .fetch_one(&mut *$conn)
                .await
                .map_err(unavailable)?;
            if !durable.iter().any(|d| d.eq_ignore_ascii_case(value.trim())) {
                return Err(StoreError::Unavailable(format!(
                    "{} has {name} = {value}: a commit would not be durable when Stampede \
                     answers 201; set it to {}",
                    $dialect.name,
                    durable.join(" or ")
                )));
            }
        }
    };
}

macro_rules! take_owner_lock {
    ($conn:expr, $dialect:expr, $wait:expr) => {{
        let deadline = tokio::time::Instant::now() + $wait;
        loop {
            let row = sqlx::query($dialect.try_lock)
                .fetch_one(&mut *$conn)
                .await
                .map_err(unavailable)?;
            // PostgreSQL answers a boolean, MySQL an integer.
            let taken = row
                .try_get::<bool, _>("taken")
                .or_else(|_| row.try_get::<i64, _>("taken").map(|n| n == 1))
                .map_err(unavailable)?;
            if taken {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                let owner: Option<String> =
                    sqlx::query_scalar("SELECT node FROM stampede_owner WHERE id = 1")
                        .fetch_optional(&mut *$conn)
                        .await
                        .map_err(unavailable)?;
                return Err(StoreError::Unavailable(format!(
                    "another stampede node ({}) owns this database; one node writes a \
                     database at a time",
                    owner.unwrap_or_default()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }};
}

macro_rules! tally_on {
    ($conn:expr, $sql:expr, $sale:expr, $limit:expr, $unsold:expr) => {{
        let sql_tally = Arc::clone(&$sql.tally_by_status);
        let sql_over = Arc::clone(&$sql.users_over_limit);
        tally_with!($conn, sql_tally, sql_over, $sale, $limit, $unsold)
    }};
}

/// Units per state and shoppers over the limit for one sale, on one connection.
macro_rules! tally_with {
    ($conn:expr, $sql_tally:expr, $sql_over:expr, $sale:expr, $limit:expr, $sql_unsold:expr) => {
        async {
            let sale_id = $sale.to_string();
            let mut tally = SaleTally::default();
            let rows = sqlx::query(AssertSqlSafe($sql_tally))
                .bind(&sale_id)
                .fetch_all(&mut *$conn)
                .await
                .map_err(unavailable)?;
            for row in rows {
                let status: String = row.try_get("status").map_err(unavailable)?;
                let units: i64 = row.try_get("units").map_err(unavailable)?;
                count_units(&mut tally, &status, units)?;
            }
            let over: i64 = sqlx::query_scalar(AssertSqlSafe($sql_over))
                .bind(&sale_id)
                .bind(i64::from($limit))
                .fetch_one(&mut *$conn)
                .await
                .map_err(unavailable)?;
            tally.users_over_limit = over as u64;
            let sql_unsold: Option<Arc<str>> = $sql_unsold;
            if let Some(sql_unsold) = sql_unsold {
                let unsold: i64 = sqlx::query_scalar(AssertSqlSafe(sql_unsold))
                    .bind(&sale_id)
                    .fetch_one(&mut *$conn)
                    .await
                    .map_err(unavailable)?;
                tally.unsold = Some(
                    u64::try_from(unsold)
                        .map_err(|_| corrupt("unsold units", &unsold.to_string()))?,
                );
            }
            Ok::<_, StoreError>(tally)
        }
        .await
    };
}

/// Applies a batch on an open transaction; answers one outcome per op.
/// One column of a run of orders, as an array parameter.
fn column<'a, T>(orders: &[&'a OrderRecord], field: impl Fn(&'a OrderRecord) -> T) -> Vec<T> {
    orders.iter().map(|order| field(order)).collect()
}

/// PostgreSQL: a run of orders as one `INSERT … SELECT * FROM UNNEST(arrays)`, one
/// array per column: one statement, one shape, one round trip for any number of rows.
macro_rules! insert_orders_unnest {
    ($conn:expr, $orders:expr) => {{
        let orders: &[&OrderRecord] = $orders;
        sqlx::query(concat!(
            "INSERT INTO orders (",
            order_columns!(),
            ") SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], \
             $6::bigint[], $7::text[], $8::text[], $9::bigint[], $10::bigint[], $11::bigint[])"
        ))
        .bind(column(orders, |o| o.id.to_string()))
        .bind(column(orders, |o| o.user_id.as_str()))
        .bind(column(orders, |o| o.sale_id.to_string()))
        .bind(column(orders, |o| o.sku.as_str()))
        .bind(column(orders, |o| i64::from(o.quantity.get())))
        .bind(column(orders, |o| o.amount.get()))
        .bind(column(orders, |o| o.status.as_str()))
        .bind(column(orders, |o| o.idempotency_key.as_str()))
        .bind(column(orders, |o| o.created_at_ms))
        .bind(column(orders, |o| o.expires_at_ms))
        .bind(column(orders, |o| o.updated_at_ms))
        .execute(&mut *$conn)
        .await
        .map_err(unavailable)?;
    }};
}

/// MySQL protocol: a run of orders as one `INSERT … SELECT * FROM JSON_TABLE(?)` over a
/// JSON array of rows (MySQL 8.0.4+, MariaDB 10.6+): one statement, one shape, one round
/// trip for any number of rows.
macro_rules! insert_orders_json_table {
    ($conn:expr, $orders:expr) => {{
        let orders: &[&OrderRecord] = $orders;
        let rows = orders
            .iter()
            .map(|o| serde_json::to_value(order_values(o)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Unavailable(format!("encode orders: {e}")))?;
        let rows = serde_json::Value::Array(rows).to_string();
        sqlx::query(concat!(
            "INSERT INTO orders (",
            order_columns!(),
            ") SELECT * FROM JSON_TABLE(?, '$[*]' COLUMNS (\
             id VARCHAR(64) CHARACTER SET utf8mb4 PATH '$[0]', \
             user_id VARCHAR(128) CHARACTER SET utf8mb4 PATH '$[1]', \
             sale_id VARCHAR(64) CHARACTER SET utf8mb4 PATH '$[2]', \
             sku VARCHAR(64) CHARACTER SET utf8mb4 PATH '$[3]', \
             quantity BIGINT PATH '$[4]', \
             amount_cents BIGINT PATH '$[5]', \
             status VARCHAR(16) CHARACTER SET utf8mb4 PATH '$[6]', \
             idempotency_key VARCHAR(128) CHARACTER SET utf8mb4 PATH '$[7]', \
             created_at_ms BIGINT PATH '$[8]', \
             expires_at_ms BIGINT PATH '$[9]', \
             updated_at_ms BIGINT PATH '$[10]')) AS batch"
        ))
        .bind(rows)
        .execute(&mut *$conn)
        .await
        .map_err(unavailable)?;
    }};
}

/// Locks order `$id`'s row for the rest of the transaction (a close and a charge attempt
/// take the same lock): `Ok(row)` when the order is pending, else `Err` with the outcome
/// that refuses the op (`NotFound`, or `Refused` with its status).
macro_rules! lock_pending {
    ($conn:expr, $sql:expr, $id:expr) => {
        match sqlx::query(q(&$sql.lock_order))
            .bind($id)
            .fetch_optional(&mut *$conn)
            .await
            .map_err(unavailable)?
        {
            None => Err(OpOutcome::NotFound),
            Some(row) => {
                let status: String = row.try_get("status").map_err(unavailable)?;
                match OrderStatus::parse(&status).ok_or_else(|| corrupt("status", &status))? {
                    OrderStatus::PendingPayment => Ok(row),
                    current => Err(OpOutcome::Refused { current }),
                }
            }
        }
    };
}

macro_rules! apply {
    ($conn:expr, $ops:expr, $sql:expr, $db:ty, $insert_orders:ident) => {{
        let ops: &[WriteOp] = $ops;
        let sql: &Sql = $sql;
        let mut outcomes = Vec::with_capacity(ops.len());
        let mut index = 0;
        while index < ops.len() {
            match &ops[index] {
                WriteOp::InsertOrder(_) => {
                    let run: Vec<&OrderRecord> = ops[index..]
                        .iter()
                        .map_while(|op| match op {
                            WriteOp::InsertOrder(order) => Some(order),
                            _ => None,
                        })
                        .collect();
                    // One statement of one shape for the whole run, however long.
                    $insert_orders!(&mut *$conn, &run);
                    outcomes.extend(run.iter().map(|_| OpOutcome::Written));
                    index += run.len();
                    continue;
                }
                WriteOp::InsertProduct(product) => {
                    sqlx::query(q(&sql.insert_product))
                        .bind(product.sku.as_str())
                        .bind(&*product.name)
                        .bind(product.price.get())
                        .bind(product.available as i64)
                        .bind(product.created_at_ms)
                        .execute(&mut *$conn)
                        .await
                        .map_err(unavailable)?;
                    outcomes.push(OpOutcome::Written);
                }
                WriteOp::InsertSale(sale) => {
                    let taken = sqlx::query(q(&sql.take_for_sale))
                        .bind(sale.quantity as i64)
                        .bind(sale.sku.as_str())
                        .bind(sale.quantity as i64)
                        .execute(&mut *$conn)
                        .await
                        .map_err(unavailable)?;
                    if taken.rows_affected() != 1 {
                        return Err(StoreError::Unavailable(format!(
                            "product {} lacks {} units for a sale",
                            sale.sku, sale.quantity
                        )));
                    }
                    sqlx::query(q(&sql.insert_sale))
                        .bind(sale.id.to_string())
                        .bind(sale.sku.as_str())
                        .bind(sale.price.get())
                        .bind(sale.quantity as i64)
                        .bind(i64::from(sale.per_user_limit))
                        .bind(sale.starts_at_ms)
                        .bind(sale.ends_at_ms)
                        .bind(sale.created_at_ms)
                        .bind(sale.quantity as i64)
                        .execute(&mut *$conn)
                        .await
                        .map_err(unavailable)?;
                    outcomes.push(OpOutcome::Written);
                }
                WriteOp::ChargeAttempt {
                    order_id,
                    amount,
                    at_ms,
                }
                | WriteOp::ChargeOwed {
                    order_id,
                    amount,
                    at_ms,
                } => {
                    let id = order_id.to_string();
                    let owed = matches!(&ops[index], WriteOp::ChargeOwed { .. });
                    // The order's row lock, as a close and a pay take it: a close on
                    // another node either committed first or waits and finds the entry.
                    let current = match lock_pending!($conn, sql, &id) {
                        Ok(_) => Some(OrderStatus::PendingPayment),
                        Err(OpOutcome::Refused { current }) => Some(current),
                        Err(_) => None,
                    };
                    let outcome = match charge_refusal(owed, current) {
                        Some(refused) => refused,
                        None => {
                            sqlx::query(q(&sql.record_charge))
                                .bind(&id)
                                .bind(amount.get())
                                .bind(*at_ms)
                                .execute(&mut *$conn)
                                .await
                                .map_err(unavailable)?;
                            OpOutcome::Written
                        }
                    };
                    outcomes.push(outcome);
                }
                WriteOp::ChargeSettled { order_id } => {
                    sqlx::query(q(&sql.settle_charge))
                        .bind(order_id.to_string())
                        .execute(&mut *$conn)
                        .await
                        .map_err(unavailable)?;
                    outcomes.push(OpOutcome::Written);
                }
                WriteOp::Transition {
                    order_id,
                    to,
                    at_ms,
                } => {
                    let id = order_id.to_string();
                    // MariaDB has no UPDATE … RETURNING: lock the row, read it, move it.
                    let outcome = match lock_pending!($conn, sql, &id) {
                        Err(refused) => refused,
                        Ok(row) => {
                            sqlx::query(q(&sql.move_order))
                                .bind(to.as_str())
                                .bind(*at_ms)
                                .bind(&id)
                                .execute(&mut *$conn)
                                .await
                                .map_err(unavailable)?;
                            let sale_id: String = row.try_get("sale_id").map_err(unavailable)?;
                            let user_id: String = row.try_get("user_id").map_err(unavailable)?;
                            let quantity: i64 = row.try_get("quantity").map_err(unavailable)?;
                            // Closed unpaid: a pay may have charged it (the ledger says;
                            // its entry was written under this row's lock).
                            let charge: Option<i64> = if to.holds_stock() {
                                None
                            } else {
                                sqlx::query_scalar(q(&sql.charge_of))
                                    .bind(&id)
                                    .fetch_optional(&mut *$conn)
                                    .await
                                    .map_err(unavailable)?
                            };
                            transitioned(&sale_id, &user_id, quantity, charge)?
                        }
                    };
                    outcomes.push(outcome);
                }
            }
            index += 1;
        }
        outcomes
    }};
}

server_store!(
    /// PostgreSQL (`postgres://…`).
    PostgresStore,
    sqlx::Postgres,
    sqlx::PgConnection,
    sqlx::postgres::PgConnectOptions,
    sqlx::postgres::PgPoolOptions,
    POSTGRES,
    "./migrations/postgres",
    insert_orders_unnest
);

server_store!(
    /// MySQL protocol (`mysql://…`): MariaDB, MySQL, TiDB, PolarDB-X.
    MySqlStore,
    sqlx::MySql,
    sqlx::MySqlConnection,
    sqlx::mysql::MySqlConnectOptions,
    sqlx::mysql::MySqlPoolOptions,
    MYSQL,
    "./migrations/mysql",
    insert_orders_json_table
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_bound_what_each_server_can_without_cutting_a_standbys_commit_short() {
        let d = Duration::from_millis(300);
        assert_eq!(
            (POSTGRES.deadline)(d, false),
            ("SET statement_timeout = 300".to_owned(), Bound::Statements)
        );
        // With a synchronous standby, `statement_timeout` would cancel `COMMIT`'s wait
        // for it and keep the commit locally: only lock waits are bounded.
        assert_eq!(
            (POSTGRES.deadline)(d, true),
            ("SET lock_timeout = 300".to_owned(), Bound::LockWaits)
        );
        // MySQL's lock timeouts are whole seconds, row and metadata locks alike.
        assert_eq!(
            (MYSQL.deadline)(d, false),
            (
                "SET SESSION innodb_lock_wait_timeout = 1, lock_wait_timeout = 1".to_owned(),
                Bound::LockWaits
            )
        );
        assert_eq!(
            (MYSQL.deadline)(Duration::from_millis(5_001), false).0,
            "SET SESSION innodb_lock_wait_timeout = 6, lock_wait_timeout = 6"
        );
        let mariadb = MYSQL
            .deadline_where_known
            .expect("MariaDB's max_statement_time");
        assert_eq!(mariadb(d), "SET SESSION max_statement_time = 0.300");
        assert_eq!(
            mariadb(Duration::from_millis(5_000)),
            "SET SESSION max_statement_time = 5.000"
        );
    }

    #[test]
    fn postgres_placeholders_are_numbered_in_order() {
        let sql = Sql::new(&POSTGRES);
        assert_eq!(
            &*sql.move_order,
            "UPDATE orders SET status = $1, updated_at_ms = $2 WHERE id = $3"
        );
        let mysql = Sql::new(&MYSQL);
        assert_eq!(
            &*mysql.move_order,
            "UPDATE orders SET status = ?, updated_at_ms = ? WHERE id = ?"
        );
    }
}
