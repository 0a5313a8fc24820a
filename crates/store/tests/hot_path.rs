//! The purchase path as issue 2 asks for it, counted at the store's door: a purchase
//! reads nothing from the database (sale state, stock, per-user counts and idempotency
//! results are in memory), a sold-out sale answers without reaching the writer, and a
//! durable acknowledgement waits for its commit while a reserved one does not.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use stampede_engine::testing::live_sale;
use stampede_engine::{AckMode, Engine, EngineConfig, PurchaseError, StoreError, SystemClock};
use stampede_store::on_every_backend;
use stampede_store::testing::{Backend, Call, Intercepted, Interceptor, TestDatabase};
use stampede_types::{IdempotencyKey, Quantity, UserId};

/// Counts what reaches the store, and holds commits while `hold` is set.
#[derive(Default)]
struct Door {
    reads: AtomicU64,
    commits: AtomicU64,
    committed_ops: AtomicU64,
    hold: AtomicBool,
    released: tokio::sync::Notify,
}

#[async_trait]
impl Interceptor for Door {
    async fn before(&self, call: Call<'_>) -> Result<(), StoreError> {
        match call {
            Call::Commit(ops) => {
                while self.hold.load(Ordering::SeqCst) {
                    let released = self.released.notified();
                    if !self.hold.load(Ordering::SeqCst) {
                        break;
                    }
                    released.await;
                }
                self.commits.fetch_add(1, Ordering::SeqCst);
                self.committed_ops
                    .fetch_add(ops.len() as u64, Ordering::SeqCst);
            }
            Call::Load
            | Call::Read
            | Call::Catalog
            | Call::PendingOrders
            | Call::OutboxRead
            | Call::Lease
            | Call::Reclaim => {
                self.reads.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
        Ok(())
    }
}

impl Door {
    fn release(&self) {
        self.hold.store(false, Ordering::SeqCst);
        self.released.notify_waiters();
    }
}

struct Rig {
    door: Arc<Intercepted<Door>>,
    engine: Arc<Engine>,
    _database: TestDatabase,
    _dir: tempfile::TempDir,
}

async fn rig(backend: Backend, ack: AckMode) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let database = TestDatabase::create(backend).await;
    let door = Arc::new(Intercepted {
        inner: database.open(dir.path()).await,
        hooks: Door::default(),
    });
    let config = EngineConfig {
        ack,
        // No sweep of the charge ledger (a read) during the test.
        charge_sweep_ms: 3_600_000,
        ..EngineConfig::default()
    };
    let engine = Engine::open(door.clone(), Arc::new(SystemClock), config)
        .await
        .unwrap();
    Rig {
        door,
        engine: Arc::new(engine),
        _database: database,
        _dir: dir,
    }
}

fn one() -> Quantity {
    Quantity::parse(1).unwrap()
}

fn shopper(i: usize) -> (UserId, IdempotencyKey) {
    (
        UserId::parse(&format!("shopper-{i}")).unwrap(),
        IdempotencyKey::parse(&format!("key-{i}")).unwrap(),
    )
}

on_every_backend!(
    purchases_read_nothing_and_sold_out_never_reaches_the_writer,
    a_durable_answer_waits_for_its_commit_and_a_reserved_one_does_not,
);

async fn purchases_read_nothing_and_sold_out_never_reaches_the_writer(backend: Backend) {
    let rig = rig(backend, AckMode::Durable).await;
    let (door, engine) = (&rig.door.hooks, rig.engine.clone());
    let sale = live_sale(&engine, "HOT", 50, 50, 100, 1).await;
    let reads_before = door.reads.load(Ordering::SeqCst);
    assert!(
        reads_before > 0,
        "the door counts reads (the start loads the store)"
    );
    let ops_before = door.committed_ops.load(Ordering::SeqCst);

    // 50 shoppers buy the 50 units at once: every one is placed, and none of them made
    // the store read anything.
    let bought: Vec<_> = (0..50)
        .map(|i| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let (user, key) = shopper(i);
                engine.purchase(user, key, sale, one()).await
            })
        })
        .collect();
    for purchase in bought {
        assert!(purchase.await.unwrap().is_ok());
    }
    assert_eq!(
        door.committed_ops.load(Ordering::SeqCst) - ops_before,
        50,
        "each order committed once"
    );
    // Replays of placed orders are answered from memory too.
    for i in 0..10 {
        let (user, key) = shopper(i);
        assert!(
            engine
                .purchase(user, key, sale, one())
                .await
                .unwrap()
                .replay
        );
    }

    // Sold out: 500 more shoppers are refused without a single commit.
    let commits = door.commits.load(Ordering::SeqCst);
    for i in 50..550 {
        let (user, key) = shopper(i);
        assert!(matches!(
            engine.purchase(user, key, sale, one()).await,
            Err(PurchaseError::SoldOut { .. })
        ));
    }
    assert_eq!(
        door.commits.load(Ordering::SeqCst),
        commits,
        "a sold-out refusal reached the writer"
    );
    assert_eq!(
        door.reads.load(Ordering::SeqCst),
        reads_before,
        "a purchase read the database"
    );

    // With every commit held, a sold-out answer still comes at once: it waits for
    // nothing the writer does.
    door.hold.store(true, Ordering::SeqCst);
    let (user, key) = shopper(600);
    let refused = tokio::time::timeout(
        Duration::from_secs(1),
        engine.purchase(user, key, sale, one()),
    )
    .await
    .expect("a sold-out answer waited for the writer");
    assert!(matches!(refused, Err(PurchaseError::SoldOut { .. })));
    door.release();
}

async fn a_durable_answer_waits_for_its_commit_and_a_reserved_one_does_not(backend: Backend) {
    for ack in [AckMode::Durable, AckMode::Reserved] {
        let rig = rig(backend, ack).await;
        let (door, engine) = (&rig.door.hooks, rig.engine.clone());
        let sale = live_sale(&engine, "ACK", 10, 10, 100, 1).await;
        let (commits, ops) = (
            door.commits.load(Ordering::SeqCst),
            door.committed_ops.load(Ordering::SeqCst),
        );

        door.hold.store(true, Ordering::SeqCst);
        let purchase = tokio::spawn({
            let engine = engine.clone();
            async move {
                let (user, key) = shopper(1);
                engine.purchase(user, key, sale, one()).await
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        match ack {
            AckMode::Durable => {
                assert!(
                    !purchase.is_finished(),
                    "a durable purchase was answered before its commit"
                );
                assert_eq!(door.commits.load(Ordering::SeqCst), commits);
                door.release();
                let placed = tokio::time::timeout(Duration::from_secs(5), purchase)
                    .await
                    .expect("answered once the commit went through")
                    .unwrap();
                assert!(placed.is_ok());
                assert_eq!(door.commits.load(Ordering::SeqCst), commits + 1);
            }
            AckMode::Reserved => {
                // Answered while the commit is still held (given time, on a loaded
                // machine, to be scheduled at all).
                let waiting = std::time::Instant::now();
                while !purchase.is_finished() {
                    assert!(
                        waiting.elapsed() < Duration::from_secs(5),
                        "a reserved purchase waited for the commit"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                assert!(purchase.await.unwrap().is_ok());
                assert_eq!(door.commits.load(Ordering::SeqCst), commits, "still held");
                door.release();
            }
        }
        // Either way the order is durable once the writer is through.
        let engine = rig.engine.clone();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while door.committed_ops.load(Ordering::SeqCst) < ops + 1 {
            assert!(std::time::Instant::now() < deadline, "never committed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(engine.sale(sale).unwrap().remaining, 9);
    }
}
