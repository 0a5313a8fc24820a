//! A failed commit returns the stock, answers `Unavailable` (503), and leaves nothing
//! half-written; a later retry with the same key places a fresh order.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use stampede_engine::testing::live_sale;
use stampede_engine::{
    Actor, Engine, EngineConfig, OpOutcome, OrderRecord, PurchaseError, SaleTally, StoreError,
    SystemClock, WriteOp,
};
use stampede_store::testing::{
    Backend, Call, Intercepted, Interceptor, Link, LinkMode, TestDatabase,
};
use stampede_store::{on_every_backend, on_server_backends};
use stampede_types::{Cents, IdempotencyKey, OrderId, OrderStatus, Quantity, SaleId, Sku, UserId};

/// Switches around the real store: `fail` makes commits fail the way a full disk
/// would; `unknown` commits, then says the outcome is unknown, as a connection lost
/// during `COMMIT` that cannot be re-established would.
#[derive(Default)]
struct Flaky {
    fail: AtomicBool,
    unknown: AtomicBool,
    /// A bug in the writer's path: the commit panics.
    panic: AtomicBool,
}

#[async_trait]
impl Interceptor for Flaky {
    async fn before(&self, call: Call<'_>) -> Result<(), StoreError> {
        if matches!(call, Call::Commit(_)) && self.panic.load(Ordering::SeqCst) {
            panic!("a bug in the commit path (injected)");
        }
        // A full disk fails every write: the batches and the writer's probe (a setting).
        if matches!(call, Call::Commit(_) | Call::Setting) && self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("disk full (injected)".into()));
        }
        Ok(())
    }
    fn after_commit(
        &self,
        outcome: Result<Vec<OpOutcome>, StoreError>,
    ) -> Result<Vec<OpOutcome>, StoreError> {
        let outcomes = outcome?;
        if self.unknown.load(Ordering::SeqCst) {
            return Err(StoreError::Indeterminate(
                "connection lost during COMMIT (injected)".into(),
            ));
        }
        Ok(outcomes)
    }
}

/// An engine over a real store of `backend` wrapped in `Flaky`; the directory and the
/// database live as long as it does.
struct Rig {
    flaky: Arc<Intercepted<Flaky>>,
    engine: Arc<Engine>,
    _database: TestDatabase,
    _dir: tempfile::TempDir,
}

async fn rig(backend: Backend) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let database = TestDatabase::create(backend).await;
    let flaky = Arc::new(Intercepted {
        inner: database.open(dir.path()).await,
        hooks: Flaky::default(),
    });
    let engine = Engine::open(
        flaky.clone(),
        Arc::new(SystemClock),
        EngineConfig::default(),
    )
    .await
    .unwrap();
    Rig {
        flaky,
        engine: Arc::new(engine),
        _database: database,
        _dir: dir,
    }
}

fn q(n: i64) -> Quantity {
    Quantity::parse(n).unwrap()
}

on_every_backend!(
    failed_commit_returns_stock_and_answers_unavailable,
    a_batch_that_fails_midway_leaves_nothing,
    a_large_batch_reads_back_order_for_order,
    a_commit_of_unknown_outcome_halts_the_writer_and_keeps_the_stock_taken,
    a_writer_that_panics_halts_the_node,
);

on_server_backends!(a_lost_commit_of_the_writers_probe_does_not_halt_the_node);

async fn failed_commit_returns_stock_and_answers_unavailable(backend: Backend) {
    let rig = rig(backend).await;
    let (flaky, engine) = (&rig.flaky, rig.engine.clone());
    let sale = live_sale(&engine, "P", 10, 5, 50, 5).await;
    let alice = UserId::parse("alice").unwrap();
    let key = IdempotencyKey::parse("k1").unwrap();

    flaky.hooks.fail.store(true, Ordering::SeqCst);
    let failed = engine
        .purchase(alice.clone(), key.clone(), sale, q(3))
        .await;
    assert_eq!(failed, Err(PurchaseError::Unavailable));
    assert_eq!(engine.sale(sale).unwrap().remaining, 5, "stock came back");
    // Many failures in one batch: all get their stock back too.
    let many: Vec<_> = (0..5)
        .map(|i| {
            let (engine, key) = (engine.clone(), key.clone());
            tokio::spawn(async move {
                engine
                    .purchase(UserId::parse(&format!("u{i}")).unwrap(), key, sale, q(1))
                    .await
            })
        })
        .collect();
    for handle in many {
        assert_eq!(handle.await.unwrap(), Err(PurchaseError::Unavailable));
    }
    assert_eq!(engine.sale(sale).unwrap().remaining, 5);
    // Not ready while commits fail, however many idle ticks (with nothing to commit)
    // the writer runs meanwhile: only a commit that lands makes it ready again.
    assert!(!engine.ready().await);
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    assert!(
        !engine.ready().await,
        "an idle tick is not a successful commit"
    );

    // Once the store takes writes again the writer's probe makes the node ready, with
    // no purchase to commit (a node that is not ready gets none).
    flaky.hooks.fail.store(false, Ordering::SeqCst);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !engine.ready().await {
        assert!(std::time::Instant::now() < deadline, "never ready again");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let placed = engine
        .purchase(alice.clone(), key.clone(), sale, q(3))
        .await
        .unwrap();
    assert!(
        !placed.replay,
        "the failed attempt left no idempotency record"
    );
    assert_eq!(engine.sale(sale).unwrap().remaining, 2);
    assert!(engine.ready().await);
    // Only the order placed after the store came back is durable: the failed attempts
    // left none (the injected failure stops their commits before the store, so this is
    // the engine's word; `a_batch_that_fails_midway_leaves_nothing` fails a real one).
    let audit = engine.audit(sale).await.unwrap().unwrap();
    assert!(audit.consistent);
    assert_eq!(audit.tally.pending_payment, 3);
    assert_eq!(engine.orders_of(&alice, 10).await.unwrap().len(), 1);

    // A cancel whose commit fails changes nothing either.
    flaky.hooks.fail.store(true, Ordering::SeqCst);
    assert!(
        engine
            .cancel(&Actor::Admin, placed.placed.order_id)
            .await
            .is_err()
    );
    flaky.hooks.fail.store(false, Ordering::SeqCst);
    let order = engine
        .order(&Actor::Admin, placed.placed.order_id)
        .await
        .unwrap();
    assert_eq!(order.status, OrderStatus::PendingPayment);
    assert_eq!(engine.sale(sale).unwrap().remaining, 2);
    engine.shutdown().await;
}

/// A store with a product and a sale of 4 units on it, for batches of orders.
async fn store_with_a_sale(
    backend: Backend,
    dir: &std::path::Path,
) -> (
    TestDatabase,
    Arc<dyn stampede_engine::Store>,
    Sku,
    stampede_engine::SaleRecord,
) {
    let database = TestDatabase::create(backend).await;
    let store = database.open(dir).await;
    let sku = Sku::parse("P").unwrap();
    store
        .commit(&[WriteOp::InsertProduct(stampede_engine::ProductRecord {
            sku: sku.clone(),
            name: Arc::from("p"),
            price: Cents::parse("p", 1).unwrap(),
            available: 10,
            created_at_ms: 0,
        })])
        .await
        .unwrap();
    let sale = stampede_engine::SaleRecord {
        id: SaleId::new(),
        sku: sku.clone(),
        price: Cents::parse("p", 1).unwrap(),
        quantity: 4,
        per_user_limit: 4,
        starts_at_ms: 0,
        ends_at_ms: 10,
        created_at_ms: 0,
    };
    store
        .commit(&[WriteOp::InsertSale(sale.clone())])
        .await
        .unwrap();
    (database, store, sku, sale)
}

async fn a_batch_that_fails_midway_leaves_nothing(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (_database, store, sku, sale) = store_with_a_sale(backend, dir.path()).await;
    let order = |id: OrderId, key: &str| OrderRecord {
        id,
        user_id: UserId::parse("u").unwrap(),
        sale_id: sale.id,
        sku: sku.clone(),
        quantity: Quantity::parse(1).unwrap(),
        amount: Cents::parse("a", 1).unwrap(),
        status: OrderStatus::PendingPayment,
        idempotency_key: IdempotencyKey::parse(key).unwrap(),
        created_at_ms: 0,
        expires_at_ms: 5,
        updated_at_ms: 0,
    };
    let first = OrderId::new();
    // The second row reuses the first's id: the primary key fails the batch after the
    // first row was inserted.
    let result = store
        .commit(&[
            WriteOp::InsertOrder(order(first, "k1")),
            WriteOp::InsertOrder(order(first, "k2")),
        ])
        .await;
    assert!(result.is_err());
    assert_eq!(
        store.order(first).await.unwrap(),
        None,
        "first row rolled back with the batch"
    );
    assert_eq!(store.tally(sale.id, 4).await.unwrap(), SaleTally::default());
    // Transitions and inserts in one batch, then the same again after a failure.
    let result = store
        .commit(&[
            WriteOp::InsertOrder(order(first, "k")),
            WriteOp::Transition {
                order_id: first,
                to: OrderStatus::Cancelled,
                at_ms: 1,
            },
            WriteOp::InsertSale(stampede_engine::SaleRecord {
                id: SaleId::new(),
                quantity: 1_000,
                ..sale.clone()
            }),
        ])
        .await;
    assert!(
        result.is_err(),
        "the sale lacks stock, so the whole batch fails"
    );
    assert_eq!(store.order(first).await.unwrap(), None);
    // A batch larger than the embedded store's multi-row insert (32 orders a
    // statement) whose 51st order repeats the 1st's id: the first 32 went in, the
    // statement of the next 32 fails, and all of it is rolled back.
    let ids: Vec<OrderId> = (0..70).map(|_| OrderId::new()).collect();
    let batch: Vec<WriteOp> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let id = if i == 50 { ids[0] } else { *id };
            WriteOp::InsertOrder(order(id, &format!("many-{i}")))
        })
        .collect();
    assert!(store.commit(&batch).await.is_err());
    assert!(store.orders_by_id(&ids).await.unwrap().is_empty());
}

/// A batch of 100 orders, with a transition of one of them and other writes between
/// them (so the inserts go in as runs: 40, then 60 = one multi-row statement of 32 and
/// the rest one by one on the embedded store), reads back order for order, field for
/// field.
async fn a_large_batch_reads_back_order_for_order(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (_database, store, sku, sale) = store_with_a_sale(backend, dir.path()).await;
    let orders: Vec<OrderRecord> = (0..100)
        .map(|i| OrderRecord {
            id: OrderId::new(),
            user_id: UserId::parse(&format!("user-{}", i % 7)).unwrap(),
            sale_id: sale.id,
            sku: sku.clone(),
            quantity: Quantity::parse(1 + i % 3).unwrap(),
            amount: Cents::parse("a", 100 + i).unwrap(),
            status: OrderStatus::PendingPayment,
            idempotency_key: IdempotencyKey::parse(&format!("key-{i}")).unwrap(),
            created_at_ms: 1_000 + i,
            expires_at_ms: 900_000 + i,
            updated_at_ms: 1_000 + i,
        })
        .collect();
    let mut batch: Vec<WriteOp> = orders[..40]
        .iter()
        .cloned()
        .map(WriteOp::InsertOrder)
        .collect();
    batch.push(WriteOp::Transition {
        order_id: orders[10].id,
        to: OrderStatus::Cancelled,
        at_ms: 5_000,
    });
    batch.extend(orders[40..].iter().cloned().map(WriteOp::InsertOrder));
    let outcomes = store.commit(&batch).await.unwrap();
    assert_eq!(outcomes.len(), 101);
    assert!(
        outcomes
            .iter()
            .enumerate()
            .all(|(i, o)| (i == 40) != matches!(o, OpOutcome::Written)),
        "{outcomes:?}"
    );
    assert!(matches!(outcomes[40], OpOutcome::Transitioned { .. }));
    let ids: Vec<OrderId> = orders.iter().map(|o| o.id).collect();
    let mut stored = store.orders_by_id(&ids).await.unwrap();
    stored.sort_by_key(|o| o.id);
    let mut expected = orders.clone();
    expected[10].status = OrderStatus::Cancelled;
    expected[10].updated_at_ms = 5_000;
    expected.sort_by_key(|o| o.id);
    assert_eq!(stored, expected);
}

async fn a_commit_of_unknown_outcome_halts_the_writer_and_keeps_the_stock_taken(backend: Backend) {
    let Rig {
        flaky,
        engine,
        _database: database,
        _dir: dir,
    } = rig(backend).await;
    let sale = live_sale(&engine, "P", 10, 5, 50, 5).await;
    let alice = UserId::parse("alice").unwrap();
    let key = IdempotencyKey::parse("k1").unwrap();

    flaky.hooks.unknown.store(true, Ordering::SeqCst);
    let answered = engine
        .purchase(alice.clone(), key.clone(), sale, q(2))
        .await;
    assert_eq!(answered, Err(PurchaseError::Unavailable));
    assert!(engine.halted(), "the writer halts");
    assert!(!engine.ready().await, "a halted node is not ready");
    // The order did land: its stock must not be sold again by this node.
    assert_eq!(engine.sale(sale).unwrap().remaining, 3, "stock stays taken");
    flaky.hooks.unknown.store(false, Ordering::SeqCst);
    let bob = UserId::parse("bob").unwrap();
    assert_eq!(
        engine.purchase(bob, key.clone(), sale, q(1)).await,
        Err(PurchaseError::Unavailable),
        "a halted node sells nothing"
    );
    // The halted node goes away (a server database's owner lock goes with it).
    drop(engine);
    drop(flaky);

    // A restart rebuilds from what is durable: the order is there, the books balance,
    // and the shopper's retry with the same key answers it.
    let engine = Engine::open(
        database.open(dir.path()).await,
        Arc::new(SystemClock),
        EngineConfig::default(),
    )
    .await
    .unwrap();
    assert!(!engine.halted());
    let again = engine.purchase(alice, key, sale, q(2)).await.unwrap();
    assert!(again.replay, "the landed order answers the retry");
    assert_eq!(engine.sale(sale).unwrap().remaining, 3);
    assert!(engine.audit(sale).await.unwrap().unwrap().consistent);
    engine.shutdown().await;
}

async fn a_writer_that_panics_halts_the_node(backend: Backend) {
    let rig = rig(backend).await;
    let (flaky, engine) = (&rig.flaky, &rig.engine);
    let sale = live_sale(engine, "PANIC", 10, 5, 50, 5).await;
    assert!(!engine.halted());
    flaky.hooks.panic.store(true, Ordering::SeqCst);
    let alice = UserId::parse("alice").unwrap();
    let refused = engine
        .purchase(
            alice.clone(),
            IdempotencyKey::parse("k").unwrap(),
            sale,
            q(1),
        )
        .await;
    assert!(refused.is_err(), "{refused:?}");
    // The node says so (liveness fails) as the writer's task unwinds (the refusal above
    // may reach the buyer a moment before), and refuses what comes next at once.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while !engine.halted() {
        assert!(std::time::Instant::now() < deadline, "not halted");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(!engine.ready().await);
    let next = engine
        .purchase(alice, IdempotencyKey::parse("k2").unwrap(), sale, q(1))
        .await;
    assert!(next.is_err(), "{next:?}");
}

/// After failed commits the writer probes with an empty batch. If that probe's `COMMIT`
/// is lost and the database then stays out of reach for longer than a batch's outcome
/// is looked for, the node must not halt as if orders were at stake: the probe held
/// none. It stays up, not ready, and sells again once the database is back.
async fn a_lost_commit_of_the_writers_probe_does_not_halt_the_node(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let link = Link::in_front_of(&database).await;
    let dir = tempfile::tempdir().unwrap();
    let store = stampede_store::open(Some(&link.url), dir.path(), &Default::default())
        .await
        .unwrap();
    let engine = Engine::open(store, Arc::new(SystemClock), EngineConfig::default())
        .await
        .unwrap();
    let sale = live_sale(&engine, "P", 10, 5, 50, 5).await;
    let buy = |who: &str, k: &str| {
        engine.purchase(
            UserId::parse(who).unwrap(),
            IdempotencyKey::parse(k).unwrap(),
            sale,
            q(1),
        )
    };
    buy("alice", "k1").await.unwrap();

    // The database goes out of reach: the next batch fails, and the writer starts probing.
    link.set(LinkMode::Down);
    assert_eq!(buy("bob", "k2").await, Err(PurchaseError::Unavailable));
    assert_eq!(
        engine.sale(sale).unwrap().remaining,
        4,
        "the failed order's stock is back"
    );

    // It comes back just long enough for a probe to send COMMIT, and the answer is lost.
    // The link then stays down past the 10 s a batch's lost COMMIT is looked into.
    link.set(LinkMode::LoseNextCommit {
        then_down_for: Duration::from_secs(12),
    });
    let waited = std::time::Instant::now();
    while link.commits_caught() == 0 {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "no probe sent COMMIT"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while link.mode() != LinkMode::Up {
        assert!(!engine.halted(), "a lost probe halted the node");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Back: a later probe lands, the node is ready and sells, and the books balance.
    let waited = std::time::Instant::now();
    while !engine.ready().await {
        assert!(!engine.halted(), "a lost probe halted the node");
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "not ready again once the database was back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    buy("carol", "k3").await.unwrap();
    assert_eq!(engine.sale(sale).unwrap().remaining, 3);
    assert!(engine.audit(sale).await.unwrap().unwrap().consistent);
    engine.shutdown().await;
}
