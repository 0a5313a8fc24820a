//! The embedded default: one SQLite file in WAL mode with `synchronous=FULL`, so a
//! committed batch has been fsync'd before `commit` returns.
//!
//! One connection writes, on a thread of its own (`sqlite_writer`: one hand-off per
//! commit); a small sqlx pool reads.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteRow,
};
use sqlx::{Connection, QueryBuilder, Row, Sqlite, SqlitePool};
use stampede_engine::{
    AUDIT_CONNECTIONS, ChargeAttempt, OpOutcome, OrderRecord, OutboxEvent, PendingTally,
    ProductRecord, Rebuild, SaleRecord, SaleTally, Store, StoreError, WriteOp,
};
use stampede_types::{Cents, IdempotencyKey, OrderId, OrderStatus, Quantity, SaleId, Sku, UserId};

use crate::rows::{corrupt, count_units, unavailable};
use crate::sqlite_writer::{self, WriteConnection, sql};

pub struct SqliteStore {
    /// The database file (`load` reads it on a connection of its own).
    path: std::path::PathBuf,
    /// `None` when opened read-only (`open_read_only`): every write is refused.
    writer: Option<WriteConnection>,
    readers: SqlitePool,
    /// [`AUDIT_CONNECTIONS`] connections for `snapshot_tally` alone, which the writer calls
    /// between batches: shoppers' reads never make it wait.
    audits: SqlitePool,
    /// `None` when opened read-only: the live writer's process copies the WAL.
    checkpointer: Option<tokio::task::JoinHandle<()>>,
    /// Whether commits also write order events to the outbox (a relay publishes them).
    outbox: bool,
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        if let Some(checkpointer) = &self.checkpointer {
            checkpointer.abort();
        }
    }
}

/// What every connection to the file sets (WAL mode besides), the sqlx ones and the write
/// thread's alike: durable commits, fsync'd at every commit; foreign keys enforced; 64 MiB
/// of page cache for the hot B-tree pages of a sale's orders.
pub(crate) const CONNECTION_PRAGMAS: [(&str, &str); 3] = [
    ("synchronous", "FULL"),
    ("foreign_keys", "ON"),
    ("cache_size", "-65536"),
];

/// How long a connection waits for a lock another connection holds.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the background connection copies the WAL back into the database file.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(500);

/// A checkpoint pass that finds at least this many frames in the WAL (32 MiB of 4 KiB
/// pages) asks the write thread to copy the tail, so the WAL starts over.
const WAL_TAIL_COPY_FRAMES: i64 = 8192;

/// Runs `wal_checkpoint(PASSIVE)` on its own connection, so the writer never pays for
/// copying the bulk of the WAL (pages and the database file's fsync) inside a commit: that
/// was the source of multi-millisecond stalls in the purchase latency tail. PASSIVE never
/// blocks the writer or readers.
///
/// Under steady load the writer commits while a pass runs, so a pass alone never finds
/// the whole WAL copied, and SQLite only starts the WAL over from its beginning when a
/// write transaction finds it whole copied: the file grew without end (220 MB after 240k
/// orders) and every commit's fdatasync also synced the growing file's size and block
/// map. So a pass over a WAL past `WAL_TAIL_COPY_FRAMES` raises `tail`; the write thread
/// copies the short tail itself between two commits (`WriteConnection`), and its next
/// commit starts the WAL over.
async fn checkpoint_forever(mut connection: SqliteConnection, tail: Arc<AtomicBool>) {
    let mut tick = tokio::time::interval(CHECKPOINT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let started = std::time::Instant::now();
        match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&mut connection)
            .await
        {
            Ok((_busy, frames, _copied)) => {
                metrics::histogram!("stampede_sqlite_checkpoint_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::gauge!("stampede_sqlite_wal_frames").set(frames as f64);
                // `frames` is the WAL as this pass found it: whatever was committed while
                // it copied is not counted, so any pass over a WAL in use leaves a tail.
                // Copying it stalls the writer for a few milliseconds (two fsyncs), so it
                // is asked for only once the WAL has grown past the bound.
                if frames >= WAL_TAIL_COPY_FRAMES {
                    tail.store(true, Ordering::Release);
                }
            }
            Err(error) => tracing::warn!(%error, "WAL checkpoint failed; will retry"),
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
        if url.contains(":memory:") || url.contains("mode=memory") {
            // Nothing in memory is durable, and the write connection (rusqlite) and the
            // readers (sqlx) would each see a database of their own.
            return Err(StoreError::Unavailable(format!(
                "{url}: an in-memory SQLite database cannot hold orders durably; give a file, sqlite://PATH"
            )));
        }
        Self::open_with(SqliteConnectOptions::from_str(url).map_err(unavailable)?).await
    }

    async fn open_with(options: SqliteConnectOptions) -> Result<SqliteStore, StoreError> {
        let options = CONNECTION_PRAGMAS.iter().fold(
            options
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(BUSY_TIMEOUT)
                .statement_cache_capacity(64),
            |options, (name, value)| options.pragma(*name, *value),
        );
        // Migrations run on a short-lived sqlx connection; then the write thread opens its
        // own connection (`checkpoint_forever` copies the WAL beside it; the thread only
        // copies the tail a pass left).
        let mut migrator = SqliteConnection::connect_with(&options)
            .await
            .map_err(unavailable)?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&mut migrator)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migration failed: {e}")))?;
        migrator.close().await.map_err(unavailable)?;
        let path = options.get_filename().to_owned();
        let tail = Arc::new(AtomicBool::new(false));
        let tail_for_writer = tail.clone();
        let writer_path = path.clone();
        let writer = tokio::task::spawn_blocking(move || {
            WriteConnection::open(&writer_path, tail_for_writer)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("open the write connection: {e}")))??;
        let readers = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .connect_with(options.clone().read_only(true))
            .await
            .map_err(unavailable)?;
        let audits = SqlitePoolOptions::new()
            .max_connections(AUDIT_CONNECTIONS)
            .min_connections(AUDIT_CONNECTIONS)
            .connect_with(options.clone().read_only(true))
            .await
            .map_err(unavailable)?;
        let checkpoint_connection = SqliteConnection::connect_with(&options)
            .await
            .map_err(unavailable)?;
        let checkpointer = tokio::spawn(checkpoint_forever(checkpoint_connection, tail));
        Ok(SqliteStore {
            path,
            writer: Some(writer),
            readers,
            audits,
            checkpointer: Some(checkpointer),
            outbox: false,
        })
    }

    /// Opens an existing database file to read it only (`stampede audit`, beside a live
    /// server or not): no migration, no write connection, no checkpoints, and a missing
    /// file is an error, never created. Every write answers `Unavailable`.
    pub async fn open_read_only(options: SqliteConnectOptions) -> Result<SqliteStore, StoreError> {
        let path = options.get_filename().to_owned();
        if !path.is_file() {
            return Err(StoreError::Unavailable(format!(
                "no database at {}: nothing to read",
                path.display()
            )));
        }
        // Not SQLite's read-only mode: a WAL database's shared-memory file may have to be
        // made by the first reader when no server runs. These connections only read.
        let options = options
            .create_if_missing(false)
            .busy_timeout(BUSY_TIMEOUT)
            .statement_cache_capacity(64);
        let readers = SqlitePoolOptions::new()
            .max_connections(2)
            .min_connections(1)
            .connect_with(options)
            .await
            .map_err(unavailable)?;
        Ok(SqliteStore {
            path,
            writer: None,
            // No writer pins snapshots here: the audits share the readers.
            audits: readers.clone(),
            readers,
            checkpointer: None,
            outbox: false,
        })
    }

    fn writer(&self) -> Result<&WriteConnection, StoreError> {
        self.writer.as_ref().ok_or_else(|| {
            StoreError::Unavailable(format!("{} is open read-only", self.path.display()))
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

/// Orders per chunk a load's reader hands over, and chunks in flight: at most ~2 MiB of
/// orders between the reader and the engine.
const LOAD_CHUNK: usize = 1024;
const LOAD_CHUNKS_IN_FLIGHT: usize = 4;

/// What the load's reader hands over: the catalog, then the orders in chunks.
enum Loading {
    Catalog(Vec<ProductRecord>, Vec<SaleRecord>),
    Orders(Vec<OrderRecord>),
}

/// A rusqlite row with sqlx's `try_get`, so the row macros read it too.
struct Columns<'a, 'r>(&'a rusqlite::Row<'r>);

impl Columns<'_, '_> {
    fn try_get<T: rusqlite::types::FromSql, I: rusqlite::RowIndex>(
        &self,
        index: I,
    ) -> rusqlite::Result<T> {
        self.0.get(index)
    }
}

/// Reads the catalog and every order on one read transaction of a connection of its own
/// (rusqlite, on the calling blocking thread) and sends them to `chunks`; stops early,
/// without an error, when nobody receives any more.
fn read_everything(
    path: &Path,
    chunks: &tokio::sync::mpsc::Sender<Result<Loading, StoreError>>,
) -> Result<(), StoreError> {
    use crate::sqlite_writer::sql;
    let mut connection = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql)?;
    connection.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
    let snapshot = connection.transaction().map_err(sql)?;
    let products = snapshot
        .prepare(
            "SELECT sku, name, price_cents, available, created_at_ms FROM products ORDER BY sku",
        )
        .map_err(sql)?
        .query_map([], |row| Ok(product_from_row!(&Columns(row))))
        .map_err(sql)?
        .map(|row| row.map_err(sql).and_then(std::convert::identity))
        .collect::<Result<Vec<_>, _>>()?;
    let sales = snapshot
        .prepare(
            "SELECT id, sku, price_cents, quantity, per_user_limit, starts_at_ms, ends_at_ms, \
             created_at_ms FROM flash_sales ORDER BY created_at_ms, id",
        )
        .map_err(sql)?
        .query_map([], |row| Ok(sale_from_row!(&Columns(row))))
        .map_err(sql)?
        .map(|row| row.map_err(sql).and_then(std::convert::identity))
        .collect::<Result<Vec<_>, _>>()?;
    if chunks
        .blocking_send(Ok(Loading::Catalog(products, sales)))
        .is_err()
    {
        return Ok(());
    }
    let mut statement = snapshot
        .prepare(concat!(
            "SELECT ",
            order_columns!(),
            " FROM orders ORDER BY id"
        ))
        .map_err(sql)?;
    let mut rows = statement.query([]).map_err(sql)?;
    let mut chunk = Vec::with_capacity(LOAD_CHUNK);
    while let Some(row) = rows.next().map_err(sql)? {
        chunk.push(order_from_row!(&Columns(row))?);
        if chunk.len() == LOAD_CHUNK {
            let full = std::mem::replace(&mut chunk, Vec::with_capacity(LOAD_CHUNK));
            if chunks.blocking_send(Ok(Loading::Orders(full))).is_err() {
                return Ok(());
            }
        }
    }
    if !chunk.is_empty() {
        let _ = chunks.blocking_send(Ok(Loading::Orders(chunk)));
    }
    Ok(())
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
    async fn load(&self, into: &mut dyn Rebuild) -> Result<(), StoreError> {
        // Read with rusqlite on a blocking thread, a bounded channel of chunks between
        // it and `into`: sqlx's per-row hand-offs made reading a million orders ~9× slower
        // than the file allows, and collecting them all held every order twice.
        let (chunks, mut read) = tokio::sync::mpsc::channel(LOAD_CHUNKS_IN_FLIGHT);
        let path = self.path.clone();
        let reader = tokio::task::spawn_blocking(move || {
            if let Err(error) = read_everything(&path, &chunks) {
                let _ = chunks.blocking_send(Err(error));
            }
        });
        while let Some(chunk) = read.recv().await {
            match chunk? {
                Loading::Catalog(products, sales) => into.catalog(products, sales),
                Loading::Orders(orders) => {
                    for order in orders {
                        into.order(order);
                    }
                }
            }
        }
        reader
            .await
            .map_err(|error| StoreError::Unavailable(format!("the load's reader: {error}")))
    }

    async fn commit(&self, ops: &[WriteOp]) -> Result<Vec<OpOutcome>, StoreError> {
        let (ops, outbox) = (ops.to_vec(), self.outbox);
        self.writer()?
            .call(move |connection| sqlite_writer::commit(connection, &ops, outbox))
            .await
    }

    async fn outbox_read(&self, limit: usize) -> Result<Vec<OutboxEvent>, StoreError> {
        read_outbox!(&self.readers, Sqlite, limit)
    }

    async fn outbox_remove(&self, seqs: &[i64]) -> Result<(), StoreError> {
        // The readers are read-only; between the writer's batches.
        let seqs = seqs.to_vec();
        self.writer()?
            .call(move |connection| {
                // One transaction, one fsync, however many chunks: this is the write
                // thread the orders' commits wait for.
                let tx = connection.transaction().map_err(sql)?;
                for chunk in seqs.chunks(crate::rows::OUTBOX_REMOVE_CHUNK) {
                    let list = vec!["?"; chunk.len()].join(", ");
                    tx.execute(
                        &format!("DELETE FROM outbox WHERE seq IN ({list})"),
                        rusqlite::params_from_iter(chunk),
                    )
                    .map_err(sql)?;
                }
                tx.commit().map_err(sql)
            })
            .await
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
        let mut snapshot = self.audits.begin().await.map_err(unavailable)?;
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

    async fn stop_writes(&self) {
        if let Some(writer) = &self.writer {
            writer.stop().await;
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.readers)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn charges_to_settle(&self) -> Result<Vec<ChargeAttempt>, StoreError> {
        fetch_charges_to_settle!(&self.readers)
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
        let (key, value) = (key.to_owned(), value.to_owned());
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        self.writer()?
            .call(move |connection| {
                connection
                    .execute(
                        "INSERT INTO settings (key, value, updated_at_ms) VALUES (?1, ?2, ?3) \
                         ON CONFLICT (key) DO UPDATE SET value = excluded.value, \
                         updated_at_ms = excluded.updated_at_ms",
                        (key, value, now_ms),
                    )
                    .map(drop)
                    .map_err(sql)
            })
            .await
    }
    async fn save_setting_if(
        &self,
        key: &str,
        value: &str,
        expected: Option<&str>,
    ) -> Result<bool, StoreError> {
        let (key, value, expected) = (
            key.to_owned(),
            value.to_owned(),
            expected.map(str::to_owned),
        );
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        self.writer()?
            .call(move |connection| {
                match expected {
                    None => connection.execute(
                        "INSERT INTO settings (key, value, updated_at_ms) VALUES (?1, ?2, ?3) \
                         ON CONFLICT (key) DO NOTHING",
                        (key, value, now_ms),
                    ),
                    Some(expected) => connection.execute(
                        "UPDATE settings SET value = ?2, updated_at_ms = ?3 \
                         WHERE key = ?1 AND value = ?4",
                        (key, value, now_ms, expected),
                    ),
                }
                .map(|changed| changed == 1)
                .map_err(sql)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_in_memory_database_is_refused_with_a_clear_error() {
        for url in ["sqlite::memory:", "sqlite://orders.db?mode=memory"] {
            let Err(StoreError::Unavailable(message)) = SqliteStore::open_url(url).await else {
                panic!("{url} opened");
            };
            assert!(message.contains("sqlite://PATH"), "{message}");
        }
    }

    #[tokio::test]
    async fn a_file_url_opens_and_commits_through_the_write_thread() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("stampede.db").display());
        let store = SqliteStore::open_url(&url).await.unwrap();
        // The write connection is as durable as the sqlx ones: WAL, FULL (2), keys on.
        let settings = store
            .writer()
            .unwrap()
            .call(|c| {
                let get = |pragma: &str| {
                    c.query_row(&format!("PRAGMA {pragma}"), [], |r| {
                        r.get::<_, rusqlite::types::Value>(0)
                    })
                    .map_err(sql)
                };
                Ok((
                    get("journal_mode")?,
                    get("synchronous")?,
                    get("foreign_keys")?,
                ))
            })
            .await
            .unwrap();
        use rusqlite::types::Value::{Integer, Text};
        assert_eq!(settings, (Text("wal".into()), Integer(2), Integer(1)));
        store.save_setting("k", "v1").await.unwrap();
        store.save_setting("k", "v2").await.unwrap();
        assert_eq!(
            store.load_setting("k").await.unwrap().as_deref(),
            Some("v2")
        );
        drop(store);
        // Committed before the call returned: a store reopened on the file holds it.
        let store = SqliteStore::open_url(&url).await.unwrap();
        assert_eq!(
            store.load_setting("k").await.unwrap().as_deref(),
            Some("v2")
        );
    }
}
