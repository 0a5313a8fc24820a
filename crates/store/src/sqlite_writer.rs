//! The embedded store's write connection: one rusqlite connection owned by a thread of
//! its own, so a commit is one hand-off to that thread and one back, whatever the batch
//! holds.
//!
//! Why not sqlx here (it still serves every read): its SQLite driver runs each statement
//! as a round trip between its own thread and the calling task: `BEGIN`, every insert,
//! `COMMIT`. On two busy cores each hop back waited for a worker behind the connection
//! tasks, and a commit of 31 orders took 1.4 ms of which its CPU was 0.4 ms; the writer
//! was busy 92% of the time while the machine had most of a core idle (BENCHMARKS.md,
//! "one hand-off per commit").
//!
//! **Invariant:** this thread is the only writer of the database file; a commit either
//! lands whole (fsync'd: WAL, `synchronous=FULL`) or not at all (the transaction rolls
//! back when it is dropped on an error), and a `COMMIT` that fails is answered
//! `Indeterminate`, never "nothing written" (see [`committed`]).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use stampede_engine::{OpOutcome, OrderRecord, StoreError, WriteOp};
use stampede_types::{Cents, ID_TEXT_MAX, OrderStatus};

use crate::rows::{charge_refusal, corrupt, outbox_events, transitioned};
use crate::sqlite::{BUSY_TIMEOUT, CONNECTION_PRAGMAS};

type Task = Box<dyn FnOnce(&mut Connection) + Send>;

enum Message {
    Run(Task),
    /// Close the connection and end the thread, then say so.
    Stop(tokio::sync::oneshot::Sender<()>),
}

/// How many calls may wait for the write thread. The engine has one writer, which waits
/// for each commit; the relay removes at most one round of published events at a time
/// (one call), and settings are rare. A full queue makes callers wait (async), it never
/// grows.
const QUEUE_BOUND: usize = 16;

/// The WAL file is cut back to this size when it starts over after a burst grew it.
const WAL_SIZE_LIMIT_BYTES: i64 = 64 * 1024 * 1024;

/// Dropping it closes the queue: the thread finishes the call it is running, skips the
/// queued ones whose callers are gone, closes the connection and ends. Nothing waits for
/// it, so a drop on a runtime worker never blocks behind a commit.
pub(crate) struct WriteConnection {
    tasks: tokio::sync::mpsc::Sender<Message>,
}

pub(crate) fn sql(error: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

fn stopped() -> StoreError {
    StoreError::Unavailable("the SQLite write thread has stopped".into())
}

impl WriteConnection {
    /// Opens the (already migrated) database file for writing, with the same durability
    /// as every other connection: WAL, fsync'd at each commit. The store's checkpointer
    /// copies the WAL beside it; when a pass of it finds the WAL past its bound, it raises
    /// `tail` and this thread copies the tail the pass left (frames committed while it
    /// ran) between two calls, so the next commit starts the WAL over instead of growing
    /// it.
    pub(crate) fn open(path: &Path, tail: Arc<AtomicBool>) -> Result<WriteConnection, StoreError> {
        let mut connection = Connection::open(path).map_err(sql)?;
        connection.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
        let mode: String = connection
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(sql)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Unavailable(format!(
                "SQLite refused WAL mode (journal_mode is {mode})"
            )));
        }
        for (name, value) in CONNECTION_PRAGMAS {
            // Constants of ours, not input: safe to write into the statement.
            connection
                .execute_batch(&format!("PRAGMA {name} = {value};"))
                .map_err(sql)?;
        }
        // No checkpoint inside a commit: only the tail, between calls (below).
        let _: i64 = connection
            .query_row("PRAGMA wal_autocheckpoint = 0", [], |row| row.get(0))
            .map_err(sql)?;
        // When the WAL starts over, a file that a burst grew beyond this is cut back.
        let _: i64 = connection
            .query_row(
                &format!("PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES}"),
                [],
                |row| row.get(0),
            )
            .map_err(sql)?;
        connection.set_prepared_statement_cache_capacity(64);
        let (tasks, mut queue) = tokio::sync::mpsc::channel::<Message>(QUEUE_BOUND);
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                let stopped = loop {
                    match queue.blocking_recv() {
                        Some(Message::Run(task)) => {
                            // A panic inside a task drops its transaction (rolled back)
                            // and its reply (the caller gets `Unavailable`); the thread
                            // goes on.
                            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                task(&mut connection)
                            }));
                            if tail.swap(false, Ordering::Acquire) {
                                copy_tail(&connection);
                            }
                        }
                        Some(Message::Stop(done)) => break Some(done),
                        None => break None,
                    }
                };
                // Closed before anyone hears of the stop: nothing of this thread's lands
                // after. Calls still queued are dropped with `queue`: their callers get
                // `stopped()`.
                drop(connection);
                drop(queue);
                if let Some(done) = stopped {
                    let _ = done.send(());
                }
            })
            .map_err(|e| StoreError::Unavailable(format!("spawn the SQLite write thread: {e}")))?;
        Ok(WriteConnection { tasks })
    }

    /// Runs `work` on the write connection and waits for its answer.
    pub(crate) async fn call<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tell, told) = tokio::sync::oneshot::channel();
        let task: Task = Box::new(move |connection| {
            // A caller that went away before its turn (a writer stopped mid-batch) wrote
            // nothing: the same as a transaction dropped before it began.
            if !tell.is_closed() {
                let _ = tell.send(work(connection));
            }
        });
        self.tasks
            .send(Message::Run(task))
            .await
            .map_err(|_| stopped())?;
        told.await.map_err(|_| stopped())?
    }

    /// Ends the thread as a killed process's writes end: returns once the call it is
    /// running (a commit whose caller was aborted still runs to its end) and the ones
    /// queued before have finished and the connection is closed. Every later call fails.
    pub(crate) async fn stop(&self) {
        let (done, stopped) = tokio::sync::oneshot::channel();
        if self.tasks.send(Message::Stop(done)).await.is_ok() {
            let _ = stopped.await;
        }
    }
}

/// Copies what the checkpointer's last pass left in the WAL: the frames committed while
/// it ran, then the database file's fsync (2.5–5 ms on the benchmark machine). Once the
/// whole WAL is copied, the next commit writes it over from the start (same blocks, same
/// file size) instead of appending. PASSIVE: a checkpoint already running or a reader's
/// snapshot makes it copy less or nothing, never wait.
fn copy_tail(connection: &Connection) {
    let started = std::time::Instant::now();
    match checkpoint_passive(connection) {
        Ok((frames, copied)) => {
            metrics::histogram!("stampede_sqlite_tail_checkpoint_seconds")
                .record(started.elapsed().as_secs_f64());
            if copied < frames {
                metrics::counter!("stampede_sqlite_tail_checkpoint_short_total").increment(1);
            }
        }
        Err(error) => tracing::warn!(%error, "WAL tail checkpoint failed; the next pass retries"),
    }
}

/// Runs a PASSIVE checkpoint: the frames in the WAL as it found them, and how many of
/// them are now copied into the database.
fn checkpoint_passive(connection: &Connection) -> rusqlite::Result<(i64, i64)> {
    connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        Ok((row.get(1)?, row.get(2)?))
    })
}

/// Applies `ops` in one transaction and commits it (fsync'd), or changes nothing.
pub(crate) fn commit(
    connection: &mut Connection,
    ops: &[WriteOp],
    outbox: bool,
) -> Result<Vec<OpOutcome>, StoreError> {
    let tx = connection
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql)?;
    let outcomes = apply(&tx, ops)?;
    if outbox {
        let mut insert = tx
            .prepare_cached("INSERT INTO outbox (order_id, event, at_ms) VALUES (?1, ?2, ?3)")
            .map_err(sql)?;
        for (order_id, event, at_ms) in outbox_events(ops, &outcomes) {
            insert
                .execute((order_id.to_string(), event, at_ms))
                .map_err(sql)?;
        }
    }
    // On any error above `tx` is dropped and rolled back: nothing half-written.
    committed(tx.commit())?;
    Ok(outcomes)
}

/// The outcome of `COMMIT`. An error there is not a clean rollback: the batch's frames
/// may already be in the WAL when writing the commit frame or its fsync fails, and WAL
/// recovery at the next open replays every frame up to a valid commit frame. Answered
/// as "failed" with its stock returned, the batch could come back after a crash and
/// oversell what was sold again meanwhile; `Indeterminate` keeps the stock taken and
/// halts the writer, and a restart rebuilds from what is durable.
fn committed(result: rusqlite::Result<()>) -> Result<(), StoreError> {
    result.map_err(|error| StoreError::Indeterminate(format!("COMMIT failed: {error}")))
}

/// Orders one multi-row `INSERT` carries. A statement's run has a fixed cost (SQLite's
/// `sqlite3VdbeHalt` and reset, rusqlite's call) that a single-row insert paid per
/// order; 32 rows of 11 parameters are well within SQLite's 32,766.
const ORDERS_PER_INSERT: usize = 32;

/// `INSERT INTO orders (…) VALUES (?, …), … ` with `rows` rows, numbered in order.
fn insert_orders_sql(rows: usize) -> String {
    let mut sql = String::from(concat!(
        "INSERT INTO orders (",
        order_columns!(),
        ") VALUES "
    ));
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for column in 0..ORDER_COLUMNS {
            if column > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("?{}", row * ORDER_COLUMNS + column + 1));
        }
        sql.push(')');
    }
    sql
}

/// Columns of `order_columns!`.
const ORDER_COLUMNS: usize = 11;

/// Binds `order`'s values in the column order of `order_columns!` (as `order_values`
/// gives them to the server backends) to parameters `first..first + 11`. The ids are
/// written into stack buffers: SQLite copies text it is given.
fn bind_order(
    insert: &mut rusqlite::CachedStatement<'_>,
    first: usize,
    order: &OrderRecord,
) -> rusqlite::Result<()> {
    let (mut id, mut sale) = ([0; ID_TEXT_MAX], [0; ID_TEXT_MAX]);
    insert.raw_bind_parameter(first, order.id.encode(&mut id))?;
    insert.raw_bind_parameter(first + 1, order.user_id.as_str())?;
    insert.raw_bind_parameter(first + 2, order.sale_id.encode(&mut sale))?;
    insert.raw_bind_parameter(first + 3, order.sku.as_str())?;
    insert.raw_bind_parameter(first + 4, i64::from(order.quantity.get()))?;
    insert.raw_bind_parameter(first + 5, order.amount.get())?;
    insert.raw_bind_parameter(first + 6, order.status.as_str())?;
    insert.raw_bind_parameter(first + 7, order.idempotency_key.as_str())?;
    insert.raw_bind_parameter(first + 8, order.created_at_ms)?;
    insert.raw_bind_parameter(first + 9, order.expires_at_ms)?;
    insert.raw_bind_parameter(first + 10, order.updated_at_ms)
}

/// Inserts `orders` (a run of consecutive `InsertOrder`s of the batch) and empties it:
/// [`ORDERS_PER_INSERT`] a statement, the rest one by one.
fn insert_orders(
    tx: &rusqlite::Transaction<'_>,
    orders: &mut Vec<&OrderRecord>,
) -> Result<(), StoreError> {
    static MANY: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| insert_orders_sql(ORDERS_PER_INSERT));
    static ONE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| insert_orders_sql(1));
    let mut chunks = orders.chunks_exact(ORDERS_PER_INSERT);
    if chunks.len() > 0 {
        let mut insert = tx.prepare_cached(&MANY).map_err(sql)?;
        for chunk in &mut chunks {
            for (row, order) in chunk.iter().enumerate() {
                bind_order(&mut insert, row * ORDER_COLUMNS + 1, order).map_err(sql)?;
            }
            insert.raw_execute().map_err(sql)?;
        }
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut insert = tx.prepare_cached(&ONE).map_err(sql)?;
        for order in rest {
            bind_order(&mut insert, 1, order).map_err(sql)?;
            insert.raw_execute().map_err(sql)?;
        }
    }
    orders.clear();
    Ok(())
}

/// The order's status, read in the open transaction.
fn order_status(
    tx: &rusqlite::Transaction<'_>,
    id: &str,
) -> Result<Option<OrderStatus>, StoreError> {
    let status: Option<String> = tx
        .prepare_cached("SELECT status FROM orders WHERE id = ?1")
        .map_err(sql)?
        .query_row([id], |row| row.get(0))
        .optional()
        .map_err(sql)?;
    status
        .map(|status| OrderStatus::parse(&status).ok_or_else(|| corrupt("status", &status)))
        .transpose()
}

/// Writes a charge-ledger entry for order `id`; an entry already there stays as it is.
fn record_charge(
    tx: &rusqlite::Transaction<'_>,
    id: &str,
    amount: Cents,
    at_ms: i64,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO charge_attempts (order_id, amount_cents, attempted_at_ms) \
         VALUES (?1, ?2, ?3) ON CONFLICT (order_id) DO NOTHING",
    )
    .map_err(sql)?
    .execute((id, amount.get(), at_ms))
    .map_err(sql)?;
    Ok(())
}

fn apply(tx: &rusqlite::Transaction<'_>, ops: &[WriteOp]) -> Result<Vec<OpOutcome>, StoreError> {
    let mut outcomes = Vec::with_capacity(ops.len());
    // Consecutive orders go in together; anything else first writes the orders before
    // it, so a transition of an order of the same batch finds it.
    let mut orders: Vec<&OrderRecord> = Vec::with_capacity(ops.len());
    for op in ops {
        if let WriteOp::InsertOrder(order) = op {
            orders.push(order);
            outcomes.push(OpOutcome::Written);
            continue;
        }
        insert_orders(tx, &mut orders)?;
        let outcome = match op {
            WriteOp::InsertOrder(_) => unreachable!("orders are gathered above"),
            WriteOp::InsertProduct(product) => {
                tx.execute(
                    "INSERT INTO products (sku, name, price_cents, available, created_at_ms) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    (
                        product.sku.as_str(),
                        &*product.name,
                        product.price.get(),
                        product.available as i64,
                        product.created_at_ms,
                    ),
                )
                .map_err(sql)?;
                OpOutcome::Written
            }
            WriteOp::InsertSale(sale) => {
                let taken = tx
                    .execute(
                        "UPDATE products SET available = available - ?1 \
                         WHERE sku = ?2 AND available >= ?1",
                        (sale.quantity as i64, sale.sku.as_str()),
                    )
                    .map_err(sql)?;
                if taken != 1 {
                    return Err(StoreError::Unavailable(format!(
                        "product {} lacks {} units for a sale",
                        sale.sku, sale.quantity
                    )));
                }
                tx.execute(
                    "INSERT INTO flash_sales (id, sku, price_cents, quantity, per_user_limit, \
                     starts_at_ms, ends_at_ms, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    (
                        sale.id.to_string(),
                        sale.sku.as_str(),
                        sale.price.get(),
                        sale.quantity as i64,
                        i64::from(sale.per_user_limit),
                        sale.starts_at_ms,
                        sale.ends_at_ms,
                        sale.created_at_ms,
                    ),
                )
                .map_err(sql)?;
                OpOutcome::Written
            }
            WriteOp::Transition {
                order_id,
                to,
                at_ms,
            } => {
                let id = order_id.to_string();
                let moved = tx
                    .prepare_cached(
                        "UPDATE orders SET status = ?1, updated_at_ms = ?2 \
                         WHERE id = ?3 AND status = 'pending_payment' \
                         RETURNING sale_id, user_id, quantity",
                    )
                    .map_err(sql)?
                    .query_row((to.as_str(), *at_ms, &id), |row| {
                        Ok((
                            row.get::<_, String>(0)?,
                            row.get::<_, String>(1)?,
                            row.get::<_, i64>(2)?,
                        ))
                    })
                    .optional()
                    .map_err(sql)?;
                match moved {
                    Some((sale_id, user_id, quantity)) => {
                        // Closed unpaid: a pay may have charged it (the ledger says).
                        let charge = if to.holds_stock() {
                            None
                        } else {
                            tx.prepare_cached(
                                "SELECT amount_cents FROM charge_attempts WHERE order_id = ?1",
                            )
                            .map_err(sql)?
                            .query_row([&id], |row| row.get::<_, i64>(0))
                            .optional()
                            .map_err(sql)?
                        };
                        transitioned(&sale_id, &user_id, quantity, charge)?
                    }
                    None => match order_status(tx, &id)? {
                        Some(current) => OpOutcome::Refused { current },
                        None => OpOutcome::NotFound,
                    },
                }
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
                let owed = matches!(op, WriteOp::ChargeOwed { .. });
                // This thread is the only writer: the status read here cannot change
                // before the insert.
                match charge_refusal(owed, order_status(tx, &id)?) {
                    Some(refused) => refused,
                    None => {
                        record_charge(tx, &id, *amount, *at_ms)?;
                        OpOutcome::Written
                    }
                }
            }
            WriteOp::ChargeSettled { order_id } => {
                tx.prepare_cached("DELETE FROM charge_attempts WHERE order_id = ?1")
                    .map_err(sql)?
                    .execute([order_id.to_string()])
                    .map_err(sql)?;
                OpOutcome::Written
            }
        };
        outcomes.push(outcome);
    }
    insert_orders(tx, &mut orders)?;
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn insert(value: i64) -> impl FnOnce(&mut Connection) -> Result<(), StoreError> + Send {
        move |c| {
            c.execute("INSERT INTO t VALUES (?1)", [value])
                .map(drop)
                .map_err(sql)
        }
    }

    /// A write thread on a fresh database with one table `t`; the directory lives as
    /// long as the returned guard.
    fn writer_on_a_fresh_table(
        tail: Arc<AtomicBool>,
    ) -> (tempfile::TempDir, std::path::PathBuf, WriteConnection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("writer.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE t (v INTEGER NOT NULL)")
            .unwrap();
        let writer = WriteConnection::open(&path, tail).unwrap();
        (dir, path, writer)
    }

    #[test]
    fn a_multi_row_insert_numbers_every_column_of_every_row() {
        assert_eq!(order_columns!().split(", ").count(), ORDER_COLUMNS);
        let sql = insert_orders_sql(2);
        assert!(
            sql.ends_with(
                "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11), \
                 (?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22)"
            ),
            "{sql}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_whose_caller_left_before_its_turn_writes_nothing() {
        let (_dir, _, writer) = writer_on_a_fresh_table(Arc::default());
        let writer = Arc::new(writer);
        // The first call holds the thread until released.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let first = tokio::spawn({
            let writer = writer.clone();
            async move {
                writer
                    .call(move |_| {
                        held.recv().unwrap();
                        Ok(())
                    })
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The second is queued behind it, and its caller leaves (a writer stopped).
        let second = tokio::spawn({
            let writer = writer.clone();
            async move { writer.call(insert(1)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        second.abort();
        assert!(second.await.unwrap_err().is_cancelled());
        release.send(()).unwrap();
        first.await.unwrap().unwrap();
        let rows: i64 = writer
            .call(|c| {
                c.query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
                    .map_err(sql)
            })
            .await
            .unwrap();
        assert_eq!(rows, 0, "the abandoned insert ran");
        // A caller that stays gets its answer.
        writer.call(insert(2)).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stop_returns_after_the_running_call_has_landed_and_refuses_later_calls() {
        let (_dir, path, writer) = writer_on_a_fresh_table(Arc::default());
        let writer = Arc::new(writer);
        // A commit under way when its caller is aborted (a crashed engine's writer).
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started, running) = tokio::sync::oneshot::channel::<()>();
        let abandoned = tokio::spawn({
            let writer = writer.clone();
            async move {
                writer
                    .call(move |c| {
                        let _ = started.send(());
                        held.recv().unwrap();
                        insert(7)(c)
                    })
                    .await
            }
        });
        running.await.unwrap();
        abandoned.abort();
        assert!(abandoned.await.unwrap_err().is_cancelled());
        let stop = tokio::spawn({
            let writer = writer.clone();
            async move { writer.stop().await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !stop.is_finished(),
            "stop returned while a call was running"
        );
        release.send(()).unwrap();
        stop.await.unwrap();
        // Whatever the stopped thread began is on disk once `stop` returns.
        let rows: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            rows, 1,
            "the running call had not landed when stop returned"
        );
        assert!(matches!(
            writer.call(insert(8)).await,
            Err(StoreError::Unavailable(_))
        ));
        // Stopping twice waits for nothing.
        writer.stop().await;
    }

    /// A WAL with a tail the checkpointer could not copy (commits it did not see), then
    /// `frames_after` for one more commit, with `raise` telling the thread to copy the
    /// tail first or not.
    async fn wal_after_a_tail(raise: bool) -> (i64, i64) {
        let tail = Arc::new(AtomicBool::new(false));
        let (_dir, path, writer) = writer_on_a_fresh_table(tail.clone());
        for v in 0..50 {
            writer.call(insert(v)).await.unwrap();
        }
        // A reader's snapshot stands where the checkpointer's pass began: the pass copies
        // up to it and not the commits after it, as when commits land during a pass.
        let reader = Connection::open(&path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let _: i64 = reader
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        for v in 50..100 {
            writer.call(insert(v)).await.unwrap();
        }
        let checkpointer = Connection::open(&path).unwrap();
        let (frames, copied) = checkpoint_passive(&checkpointer).unwrap();
        assert!(
            copied < frames,
            "the pass left no tail: {copied} of {frames}"
        );
        reader.execute_batch("COMMIT").unwrap();
        tail.store(raise, Ordering::Release);
        writer.call(insert(100)).await.unwrap();
        writer.call(insert(101)).await.unwrap();
        let (frames_after, _) = checkpoint_passive(&checkpointer).unwrap();
        (frames, frames_after)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tail_left_by_the_checkpointer_is_copied_so_the_wal_starts_over() {
        // Raised: the thread copies the tail after its call, and the next commit writes
        // the WAL from its start.
        let (frames, frames_after) = wal_after_a_tail(true).await;
        assert!(
            frames_after <= 2,
            "the WAL did not start over: {frames_after} frames after {frames}"
        );
        // Not raised: the same commits append to a WAL that never starts over.
        let (frames, frames_after) = wal_after_a_tail(false).await;
        assert!(
            frames_after > frames,
            "the WAL started over without the tail copy: {frames_after} after {frames}"
        );
    }

    #[test]
    fn a_failed_commit_is_indeterminate_not_a_rollback() {
        // A real COMMIT that fails after its statements ran: a deferred foreign key is
        // checked only then.
        let mut connection = rusqlite::Connection::open_in_memory().unwrap();
        connection
            .execute_batch(
                "PRAGMA foreign_keys = ON;
                 CREATE TABLE parent (id INTEGER PRIMARY KEY);
                 CREATE TABLE child (parent INTEGER REFERENCES parent (id)
                     DEFERRABLE INITIALLY DEFERRED);",
            )
            .unwrap();
        let tx = connection.transaction().unwrap();
        tx.execute("INSERT INTO child (parent) VALUES (7)", [])
            .unwrap();
        match committed(tx.commit()) {
            Err(StoreError::Indeterminate(message)) => assert!(message.contains("COMMIT")),
            other => panic!("{other:?}"),
        }
        // And the engine halts on it instead of handing the stock back.
        assert!(StoreError::Indeterminate(String::new()).halts());
    }
}
