//! The embedded default: one SQLite file in WAL mode with `synchronous=FULL`, so a
//! committed batch has been fsync'd before `commit` returns.
//!
//! One connection writes (the engine has one writer); a small pool reads.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Connection, QueryBuilder, Row, Sqlite, SqlitePool};
use stampede_engine::{
    OpOutcome, OrderRecord, OutboxEvent, PendingTally, ProductRecord, SaleRecord, SaleTally,
    Snapshot, Store, StoreError, WriteOp,
};
use stampede_types::{Cents, IdempotencyKey, OrderId, OrderStatus, Quantity, SaleId, Sku, UserId};
use tokio::sync::Mutex;

use crate::rows::{corrupt, count_units, outbox_events, unavailable};

/// Multi-row inserts use one of these row counts, so only a handful of statement shapes
/// are ever prepared (sqlx caches prepared statements by SQL text).
const INSERT_CHUNK_ROWS: [usize; 5] = [256, 64, 16, 4, 1];

pub struct SqliteStore {
    writer: Mutex<SqliteConnection>,
    readers: SqlitePool,
    checkpointer: tokio::task::JoinHandle<()>,
    /// Whether commits also write order events to the outbox (a relay publishes them).
    outbox: bool,
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.checkpointer.abort();
    }
}

/// How often the background connection copies the WAL back into the database file.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(500);

/// Runs `wal_checkpoint(PASSIVE)` on its own connection, so the writer never pays for a
/// checkpoint (copying pages and fsyncing the database file) inside a commit: that was
/// the source of multi-millisecond stalls in the purchase latency tail. PASSIVE never
/// blocks the writer or readers.
async fn checkpoint_forever(mut connection: SqliteConnection) {
    let mut tick = tokio::time::interval(CHECKPOINT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&mut connection)
            .await
        {
            tracing::warn!(%error, "WAL checkpoint failed; will retry");
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and brings its schema up to date.
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        Self::open_with(SqliteConnectOptions::new().filename(path)).await
    }

    /// Opens from a `sqlite://path` URL.
    pub async fn open_url(url: &str) -> Result<SqliteStore, StoreError> {
        Self::open_with(SqliteConnectOptions::from_str(url).map_err(unavailable)?).await
    }

    async fn open_with(options: SqliteConnectOptions) -> Result<SqliteStore, StoreError> {
        // Durable commits: WAL, fsync'd at every commit. 64 MiB of page cache keeps the hot
        // B-tree pages of a sale's orders in memory.
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5))
            .statement_cache_capacity(64)
            .pragma("cache_size", "-65536");
        // The writer never checkpoints; `checkpoint_forever` does, beside it.
        let mut writer =
            SqliteConnection::connect_with(&options.clone().pragma("wal_autocheckpoint", "0"))
                .await
                .map_err(unavailable)?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&mut writer)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migration failed: {e}")))?;
        let readers = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .connect_with(options.clone().read_only(true))
            .await
            .map_err(unavailable)?;
        let checkpoint_connection = SqliteConnection::connect_with(&options)
            .await
            .map_err(unavailable)?;
        let checkpointer = tokio::spawn(checkpoint_forever(checkpoint_connection));
        Ok(SqliteStore {
            writer: Mutex::new(writer),
            readers,
            checkpointer,
            outbox: false,
        })
    }

    /// Makes every commit also write its order events to the outbox.
    pub fn with_outbox(mut self, outbox: bool) -> Self {
        self.outbox = outbox;
        self
    }

    pub fn into_arc(self) -> Arc<dyn Store> {
        Arc::new(self)
    }
}

fn order_from_row(row: &SqliteRow) -> Result<OrderRecord, StoreError> {
    order_from_row!(row)
}

fn sale_from_row(row: &SqliteRow) -> Result<SaleRecord, StoreError> {
    sale_from_row!(row)
}

async fn insert_orders(
    conn: &mut SqliteConnection,
    orders: &[&OrderRecord],
) -> Result<(), sqlx::Error> {
    let mut rest = orders;
    while !rest.is_empty() {
        let rows = *INSERT_CHUNK_ROWS
            .iter()
            .find(|&&n| n <= rest.len())
            .expect("1 always fits");
        let (chunk, tail) = rest.split_at(rows);
        let mut query: QueryBuilder<Sqlite> =
            QueryBuilder::new(concat!("INSERT INTO orders (", order_columns!(), ") "));
        push_order_values!(query, chunk);
        query.build().persistent(true).execute(&mut *conn).await?;
        rest = tail;
    }
    Ok(())
}

async fn apply(conn: &mut SqliteConnection, ops: &[WriteOp]) -> Result<Vec<OpOutcome>, StoreError> {
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
                insert_orders(conn, &run).await.map_err(unavailable)?;
                outcomes.extend(run.iter().map(|_| OpOutcome::Written));
                index += run.len();
                continue;
            }
            WriteOp::InsertProduct(product) => {
                sqlx::query(
                    "INSERT INTO products (sku, name, price_cents, available, created_at_ms) VALUES (?, ?, ?, ?, ?)",
                )
                .bind(product.sku.as_str())
                .bind(&*product.name)
                .bind(product.price.get())
                .bind(product.available as i64)
                .bind(product.created_at_ms)
                .execute(&mut *conn)
                .await
                .map_err(unavailable)?;
                outcomes.push(OpOutcome::Written);
            }
            WriteOp::InsertSale(sale) => {
                let taken = sqlx::query("UPDATE products SET available = available - ? WHERE sku = ? AND available >= ?")
                    .bind(sale.quantity as i64)
                    .bind(sale.sku.as_str())
                    .bind(sale.quantity as i64)
                    .execute(&mut *conn)
                    .await
                    .map_err(unavailable)?;
                if taken.rows_affected() != 1 {
                    return Err(StoreError::Unavailable(format!(
                        "product {} lacks {} units for a sale",
                        sale.sku, sale.quantity
                    )));
                }
                sqlx::query(
                    "INSERT INTO flash_sales (id, sku, price_cents, quantity, per_user_limit, starts_at_ms, \
                     ends_at_ms, created_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(sale.id.to_string())
                .bind(sale.sku.as_str())
                .bind(sale.price.get())
                .bind(sale.quantity as i64)
                .bind(i64::from(sale.per_user_limit))
                .bind(sale.starts_at_ms)
                .bind(sale.ends_at_ms)
                .bind(sale.created_at_ms)
                .execute(&mut *conn)
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
                let moved = sqlx::query(
                    "UPDATE orders SET status = ?, updated_at_ms = ? WHERE id = ? AND status = 'pending_payment' \
                     RETURNING sale_id, user_id, quantity",
                )
                .bind(to.as_str())
                .bind(*at_ms)
                .bind(&id)
                .fetch_optional(&mut *conn)
                .await
                .map_err(unavailable)?;
                let outcome = match moved {
                    Some(row) => {
                        let sale_id: String = row.try_get("sale_id").map_err(unavailable)?;
                        let user_id: String = row.try_get("user_id").map_err(unavailable)?;
                        let quantity: i64 = row.try_get("quantity").map_err(unavailable)?;
                        OpOutcome::Transitioned {
                            sale_id: SaleId::parse(&sale_id)
                                .ok_or_else(|| corrupt("sale id", &sale_id))?,
                            user_id: UserId::parse(&user_id)
                                .map_err(|_| corrupt("user id", &user_id))?,
                            quantity: Quantity::parse(quantity)
                                .map_err(|e| corrupt("quantity", &e.to_string()))?,
                        }
                    }
                    None => {
                        let status: Option<String> =
                            sqlx::query_scalar("SELECT status FROM orders WHERE id = ?")
                                .bind(&id)
                                .fetch_optional(&mut *conn)
                                .await
                                .map_err(unavailable)?;
                        match status {
                            Some(status) => OpOutcome::Refused {
                                current: OrderStatus::parse(&status)
                                    .ok_or_else(|| corrupt("status", &status))?,
                            },
                            None => OpOutcome::NotFound,
                        }
                    }
                };
                outcomes.push(outcome);
            }
        }
        index += 1;
    }
    Ok(outcomes)
}

/// Units per state and shoppers over the limit for one sale. Scans the sale's orders:
/// there is deliberately no index on `sale_id`, so the hot insert only appends; audits
/// run on a snapshot, off the writer.
async fn tally_on(
    connection: &mut SqliteConnection,
    sale: SaleId,
    per_user_limit: u32,
) -> Result<SaleTally, StoreError> {
    let sale_id = sale.to_string();
    let mut tally = SaleTally::default();
    let rows = sqlx::query(
        "SELECT status, SUM(quantity) AS units FROM orders WHERE sale_id = ? GROUP BY status",
    )
    .bind(&sale_id)
    .fetch_all(&mut *connection)
    .await
    .map_err(unavailable)?;
    for row in rows {
        let status: String = row.try_get("status").map_err(unavailable)?;
        let units: i64 = row.try_get("units").map_err(unavailable)?;
        count_units(&mut tally, &status, units)?;
    }
    let over: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT user_id FROM orders WHERE sale_id = ? \
         AND status IN ('pending_payment', 'paid') GROUP BY user_id HAVING SUM(quantity) > ?)",
    )
    .bind(&sale_id)
    .bind(i64::from(per_user_limit))
    .fetch_one(&mut *connection)
    .await
    .map_err(unavailable)?;
    tally.users_over_limit = over as u64;
    Ok(tally)
}

#[async_trait]
impl Store for SqliteStore {
    async fn load(&self) -> Result<Snapshot, StoreError> {
        let mut conn = self.writer.lock().await;
        let products = fetch_products!(&mut *conn)?;
        let sales = sqlx::query("SELECT * FROM flash_sales ORDER BY created_at_ms")
            .fetch_all(&mut *conn)
            .await
            .map_err(unavailable)?
            .iter()
            .map(sale_from_row)
            .collect::<Result<_, _>>()?;
        let orders = sqlx::query(concat!(
            "SELECT ",
            order_columns!(),
            " FROM orders ORDER BY id"
        ))
        .fetch_all(&mut *conn)
        .await
        .map_err(unavailable)?
        .iter()
        .map(order_from_row)
        .collect::<Result<_, _>>()?;
        Ok(Snapshot {
            products,
            sales,
            orders,
        })
    }

    async fn commit(&self, ops: &[WriteOp]) -> Result<Vec<OpOutcome>, StoreError> {
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin().await.map_err(unavailable)?;
        // On any error the transaction is dropped and rolled back: nothing half-written.
        let outcomes = apply(&mut tx, ops).await?;
        if self.outbox {
            insert_outbox!(&mut *tx, Sqlite, outbox_events(ops, &outcomes));
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(outcomes)
    }

    async fn outbox_read(&self, limit: usize) -> Result<Vec<OutboxEvent>, StoreError> {
        read_outbox!(&self.readers, Sqlite, limit)
    }

    async fn outbox_remove(&self, through_seq: i64) -> Result<(), StoreError> {
        // The readers are read-only; between the writer's batches.
        let mut conn = self.writer.lock().await;
        remove_outbox!(&mut *conn, Sqlite, through_seq)
    }

    async fn order(&self, id: OrderId) -> Result<Option<OrderRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            order_columns!(),
            " FROM orders WHERE id = ?"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.readers)
        .await
        .map_err(unavailable)?
        .as_ref()
        .map(order_from_row)
        .transpose()
    }

    async fn orders_by_id(&self, ids: &[OrderId]) -> Result<Vec<OrderRecord>, StoreError> {
        fetch_orders!(&self.readers, Sqlite, ids)
    }

    async fn tally(&self, sale: SaleId, per_user_limit: u32) -> Result<SaleTally, StoreError> {
        let mut connection = self.readers.acquire().await.map_err(unavailable)?;
        tally_on(&mut connection, sale, per_user_limit).await
    }

    async fn snapshot_tally(
        &self,
        sale: SaleId,
        per_user_limit: u32,
    ) -> Result<PendingTally, StoreError> {
        let mut snapshot = self.readers.begin().await.map_err(unavailable)?;
        // In WAL mode the first read fixes the snapshot the transaction sees.
        sqlx::query("SELECT 1 FROM orders LIMIT 1")
            .fetch_optional(&mut *snapshot)
            .await
            .map_err(unavailable)?;
        Ok(Box::pin(async move {
            let tally = tally_on(&mut snapshot, sale, per_user_limit).await;
            // Dropping the read-only transaction rolls it back: nothing to keep.
            drop(snapshot);
            tally
        }))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.readers)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn load_setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT value FROM settings WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.readers)
            .await
            .map_err(unavailable)?;
        Ok(row.map(|r| r.get::<String, _>("value")))
    }

    async fn save_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        // On the write connection, between the writer's batches; fsync'd (FULL) on commit.
        let mut conn = self.writer.lock().await;
        sqlx::query(
            "INSERT INTO settings (key, value, updated_at_ms) VALUES (?, ?, ?) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at_ms = excluded.updated_at_ms",
        )
        .bind(key)
        .bind(value)
        .bind(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
        )
        .execute(&mut *conn)
        .await
        .map_err(unavailable)?;
        Ok(())
    }
}
