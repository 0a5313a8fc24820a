//! An engine crashed in process (`Engine::crash`, stopped as `kill -9` would stop it)
//! leaves nobody waiting: every job that reached its queue is dropped unanswered, even one
//! whose caller had its place in the queue as the writer stopped and pushed it after.
//! (A tokio receiver, dropped, drops what is queued but not such a straggler: its caller
//! waited as long as the engine lived, and the property test hung on it once.) A
//! refund owed when a crash comes is still owed after it. And a restart that reads
//! thousands of orders (streamed, in chunks) rebuilds what the engine had. The ledger's
//! sweep of the entries left behind never fills the writer's queue.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use stampede_engine::testing::{key, live_sale, one, take_queue_place, user};
use stampede_engine::{
    Actor, Engine, EngineConfig, ManualClock, NewProduct, NewSale, OrderError, PaymentError,
    PaymentGateway, PurchaseError, StoreError, SystemClock, WriteOp,
};
use stampede_store::on_every_backend;
use stampede_store::testing::{Backend, Call, Intercepted, Interceptor, TestDatabase};
use stampede_types::{Cents, OrderId, OrderStatus, SaleId, Sku};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_pushed_into_the_queue_as_the_writer_stops_is_dropped_unanswered() {
    let dir = tempfile::tempdir().unwrap();
    let database = TestDatabase::create(Backend::Sqlite).await;
    let store = database.open(dir.path()).await;
    let engine = Arc::new(
        Engine::open(store, Arc::new(SystemClock), EngineConfig::default())
            .await
            .unwrap(),
    );
    let place = take_queue_place(&engine).await;
    let crash = tokio::spawn({
        let engine = engine.clone();
        async move { engine.crash().await }
    });
    // The writer is aborted and its end of the queue closed while the place is held;
    // the crash waits for whoever holds a place.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !crash.is_finished(),
        "the crash returned while a caller held a place in the queue"
    );
    let answered = tokio::time::timeout(Duration::from_secs(10), place.fill())
        .await
        .expect("a job pushed as the writer stopped waited for an answer that never comes");
    assert!(!answered, "a crashed engine's writer answered a job");
    tokio::time::timeout(Duration::from_secs(10), crash)
        .await
        .expect("the crash returned once the place was filled")
        .unwrap();
}

/// A provider whose charge lands late: a charge waits for `land`, is then made and
/// answered as `answer` says. While `down` is set, every refund fails. With
/// `hold_first_refund`, the first refund asked (its answer decided then) waits for
/// `release` before it answers, and says so on `refund_held`.
#[derive(Default)]
struct LateProvider {
    answer: LateAnswer,
    charging: tokio::sync::Notify,
    land: tokio::sync::Notify,
    charged: std::sync::Mutex<HashSet<String>>,
    refunded: std::sync::Mutex<HashSet<String>>,
    down: AtomicBool,
    refunds_failed: AtomicU32,
    hold_first_refund: bool,
    refund_held: tokio::sync::Notify,
    release: tokio::sync::Notify,
    held_once: AtomicBool,
}

#[async_trait::async_trait]
impl PaymentGateway for LateProvider {
    async fn charge(&self, key: &str, _: Cents) -> Result<(), PaymentError> {
        self.charging.notify_one();
        self.land.notified().await;
        self.charged.lock().unwrap().insert(key.to_owned());
        match self.answer {
            LateAnswer::Charged => Ok(()),
            LateAnswer::TimedOut => Err(PaymentError::Timeout),
            LateAnswer::GatewayFailed => Err(PaymentError::Unavailable(
                "provider answered 504 Gateway Timeout".into(),
            )),
        }
    }

    async fn refund(&self, key: &str, _: Cents) -> Result<(), PaymentError> {
        if self.down.load(Ordering::SeqCst) {
            self.refunds_failed.fetch_add(1, Ordering::SeqCst);
            return Err(PaymentError::Unavailable("down".into()));
        }
        let charged = self.charged.lock().unwrap().contains(key);
        if self.hold_first_refund && !self.held_once.swap(true, Ordering::SeqCst) {
            self.refund_held.notify_one();
            self.release.notified().await;
        }
        if !charged {
            return Err(PaymentError::NotCharged);
        }
        self.refunded.lock().unwrap().insert(key.to_owned());
        Ok(())
    }
}

/// Polls `done` every 20 ms for at most 10 s.
async fn eventually<F: Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
    for _ in 0..500 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not within 10 s: {what}");
}

/// A pay's charge lands only after its order was cancelled, and after the cancel's
/// refund, finding nothing for its whole patience, settled the order's ledger entry. The
/// provider then fails every refund until the process crashes. The refund is owed in the
/// ledger all the same (written again when the late charge timed out), and the next start
/// makes it.
async fn a_charge_that_lands_after_its_close_gave_up_is_refunded_after_a_crash(backend: Backend) {
    late_charge_then_crash(backend, LateAnswer::TimedOut).await;
}

/// As above, with the charge answered by a gateway's 5xx in front of the provider (it
/// charged all the same): an error whose outcome is unknown is owed a refund as a
/// timeout is.
async fn a_charge_behind_a_failing_gateway_is_refunded_after_a_crash(backend: Backend) {
    late_charge_then_crash(backend, LateAnswer::GatewayFailed).await;
}

/// As above, with the late charge answered: the pay loses its race to the cancel and its
/// own refund fails.
async fn a_charge_that_lost_to_a_close_that_gave_up_is_refunded_after_a_crash(backend: Backend) {
    late_charge_then_crash(backend, LateAnswer::Charged).await;
}

/// What the late charge's call answers once the charge has landed.
#[derive(Default, Clone, Copy)]
enum LateAnswer {
    /// Charged, answered in time.
    Charged,
    /// The caller stopped waiting.
    #[default]
    TimedOut,
    /// A gateway in front of the provider answered 5xx.
    GatewayFailed,
}

async fn late_charge_then_crash(backend: Backend, answer: LateAnswer) {
    let dir = tempfile::tempdir().unwrap();
    let database = TestDatabase::create(backend).await;
    let config = EngineConfig {
        expiry_grace_ms: 0,
        refund_patience_min_ms: 300,
        charge_sweep_ms: 200,
        ..EngineConfig::default()
    };
    let engine = Arc::new(open(&database, dir.path(), config.clone()).await);
    let provider = Arc::new(LateProvider {
        answer,
        ..LateProvider::default()
    });
    let (id, pay) = pay_in_flight(&engine, "LATE", provider.clone()).await;
    tokio::time::timeout(Duration::from_secs(10), provider.charging.notified())
        .await
        .expect("the pay called the provider");
    engine.cancel(&Actor::Shopper(user("x")), id).await.unwrap();
    // The cancel's refund finds no charge for its patience and settles the entry.
    let store = engine.store();
    eventually("the close's refund settled the ledger entry", || {
        let (store, engine) = (store.clone(), engine.clone());
        async move { store.charges_to_settle().await.unwrap().is_empty() && engine.refunds_open() == 0 }
    })
    .await;
    // Now the charge lands, and the provider fails every refund.
    provider.down.store(true, Ordering::SeqCst);
    provider.land.notify_one();
    let lost = match answer {
        LateAnswer::Charged => OrderError::Cancelled,
        LateAnswer::TimedOut => OrderError::PaymentTimeout,
        LateAnswer::GatewayFailed => OrderError::PaymentFailed(
            "payment provider failed: provider answered 504 Gateway Timeout".into(),
        ),
    };
    assert_eq!(pay.await.unwrap(), Err(lost));
    eventually("the late charge's refund was tried", || {
        let provider = provider.clone();
        async move { provider.refunds_failed.load(Ordering::SeqCst) >= 1 }
    })
    .await;
    // Past that refund's patience: it has given up.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(provider.refunded.lock().unwrap().is_empty());
    engine.crash().await;
    drop((engine, store));

    provider.down.store(false, Ordering::SeqCst);
    let engine = open(&database, dir.path(), config).await;
    engine.use_payments(provider.clone());
    eventually(
        "the charge that landed late was refunded after the restart",
        || {
            let provider = provider.clone();
            async move { provider.refunded.lock().unwrap().contains(&id.to_string()) }
        },
    )
    .await;
    let store = engine.store();
    eventually("the refunded charge's entry was settled", || {
        let store = store.clone();
        async move { store.charges_to_settle().await.unwrap().is_empty() }
    })
    .await;
    engine.shutdown().await;
}

/// Places an order of one unit of a new sale of `sku` for shopper `x` and starts paying
/// for it through `provider`, in the background.
async fn pay_in_flight(
    engine: &Arc<Engine>,
    sku: &str,
    provider: Arc<dyn PaymentGateway>,
) -> (
    OrderId,
    tokio::task::JoinHandle<Result<OrderStatus, OrderError>>,
) {
    let sale = live_sale(engine, sku, 10, 10, 500, 1).await;
    let id = engine
        .purchase(user("x"), key("k"), sale, one())
        .await
        .unwrap()
        .placed
        .order_id;
    let engine = engine.clone();
    (
        id,
        tokio::spawn(async move { engine.pay(&user("x"), id, provider).await }),
    )
}

/// An engine on `database`: the first start, or the restart after a crash (a kill -9)
/// of the last one.
async fn open(database: &TestDatabase, dir: &std::path::Path, config: EngineConfig) -> Engine {
    Engine::open(database.open(dir).await, Arc::new(SystemClock), config)
        .await
        .unwrap()
}

/// Buys one unit for each of `shoppers` (named `s{n}`, key `{keys}{n}`), 500 at once.
async fn buy_for(engine: &Arc<Engine>, sale: SaleId, keys: &str, shoppers: usize) {
    for wave in (0..shoppers).step_by(500) {
        let buyers: Vec<_> = (wave..(wave + 500).min(shoppers))
            .map(|n| {
                let engine = engine.clone();
                let (shopper, key) = (user(&format!("s{n}")), key(&format!("{keys}{n}")));
                tokio::spawn(
                    async move { engine.purchase(shopper, key, sale, one()).await.unwrap() },
                )
            })
            .collect();
        for buyer in buyers {
            buyer.await.unwrap();
        }
    }
}

/// Several load chunks' worth of orders, of a sale that ended long ago and of one still
/// running, some cancelled: the engine opened next has the same books, answers, order
/// lists and per-shopper limits, and the store hands every order over once, in id order.
async fn a_restart_rebuilds_thousands_of_orders(backend: Backend) {
    const ENDED: usize = 1_300;
    const RUNNING: usize = 2_500;
    const CANCELLED: usize = 10;
    let dir = tempfile::tempdir().unwrap();
    let database = TestDatabase::create(backend).await;
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let config = EngineConfig {
        payment_window_ms: 60_000,
        expiry_grace_ms: 1_000,
        ..EngineConfig::default()
    };
    let open = || async {
        Arc::new(
            Engine::open(
                database.open(dir.path()).await,
                clock.clone(),
                config.clone(),
            )
            .await
            .unwrap(),
        )
    };
    let engine = open().await;
    let price = Cents::parse("price_cents", 50).unwrap();
    let sku = Sku::parse("ENDED").unwrap();
    engine
        .create_product(NewProduct {
            sku: sku.clone(),
            name: Arc::from("ended"),
            price,
            stock: ENDED as u64,
        })
        .await
        .unwrap();
    let ended = engine
        .create_sale(NewSale {
            sku,
            price,
            quantity: ENDED as u64,
            per_user_limit: 1,
            starts_at_ms: engine.now_ms() - 1_000,
            ends_at_ms: engine.now_ms() + 10_000,
        })
        .await
        .unwrap()
        .record
        .id;
    buy_for(&engine, ended, "e", ENDED).await;
    // Its payment window and grace pass: the ended sale's orders expire, and it retires.
    clock.advance_ms(10_000 + 60_000 + 1_000 + 1);
    let running = live_sale(&engine, "RUNNING", 5_000, 5_000, 50, 2).await;
    buy_for(&engine, running, "r", RUNNING).await;
    for n in 0..CANCELLED {
        let shopper = user(&format!("s{n}"));
        let listed = engine.orders_of(&shopper, 10).await.unwrap();
        let order = listed.iter().find(|o| o.sale_id == running).unwrap();
        engine
            .cancel(&Actor::Shopper(shopper), order.id)
            .await
            .unwrap();
    }
    let before = engine.audit(running).await.unwrap().unwrap();
    engine.shutdown().await;
    drop(engine);

    let orders = database
        .open(dir.path())
        .await
        .snapshot()
        .await
        .unwrap()
        .orders;
    assert_eq!(orders.len(), ENDED + RUNNING, "every order, once");
    assert!(
        orders.windows(2).all(|pair| pair[0].id < pair[1].id),
        "in id order"
    );
    let engine = open().await;
    let after = engine.audit(running).await.unwrap().unwrap();
    assert!(after.consistent, "{after:?}");
    assert_eq!(
        (after.remaining, after.tally),
        (before.remaining, before.tally)
    );
    assert_eq!(after.remaining, 5_000 - (RUNNING - CANCELLED) as u64);
    // The running sale's answers and counts are back; the ended one's are not kept.
    assert_eq!(engine.idempotency_answers(), RUNNING);
    assert_eq!(engine.shopper_counts(), RUNNING - CANCELLED);
    let last = user(&format!("s{}", RUNNING - 1));
    let again = engine
        .purchase(
            last.clone(),
            key(&format!("r{}", RUNNING - 1)),
            running,
            one(),
        )
        .await
        .unwrap();
    assert!(again.replay, "the last order read is answered as a replay");
    // Each shopper's list holds both sales' orders, newest first.
    let listed = engine.orders_of(&user("s20"), 10).await.unwrap();
    assert_eq!(
        listed.iter().map(|o| o.sale_id).collect::<Vec<_>>(),
        [running, ended]
    );
    // The per-shopper limit counts the unit held from before the restart.
    engine
        .purchase(last.clone(), key("second"), running, one())
        .await
        .unwrap();
    assert!(matches!(
        engine.purchase(last, key("third"), running, one()).await,
        Err(PurchaseError::LimitExceeded { limit: 2, held: 2 })
    ));
    engine.shutdown().await;
}

/// Holds every commit writing a `ChargeOwed` for `OWED_COMMIT_HELD` before making it,
/// and says when one begins: the race of a late charge's note with a refund that gives
/// up, widened from a commit's milliseconds to something a test can hit.
#[derive(Default)]
struct SlowOwed {
    owed_commit: tokio::sync::Notify,
}

const OWED_COMMIT_HELD: Duration = Duration::from_millis(300);

#[async_trait::async_trait]
impl Interceptor for SlowOwed {
    async fn before(&self, call: Call<'_>) -> Result<(), StoreError> {
        if let Call::Commit(ops) = call
            && ops
                .iter()
                .any(|op| matches!(op, WriteOp::ChargeOwed { .. }))
        {
            self.owed_commit.notify_one();
            tokio::time::sleep(OWED_COMMIT_HELD).await;
        }
        Ok(())
    }
}

/// The close's refund is asking the provider one last time, past its patience, when the
/// pay's charge lands and times out: the late charge notes the refund owed while that
/// last ask is still out, and the ask then comes back `NotCharged`. The refund that gave
/// up must not remove the ledger entry after the late charge's note is written: here the
/// note's commit is held, so a removal queued when the refund gives up lands after it.
/// A crash while the provider is down then leaves the refund owed, and the next start
/// makes it.
async fn a_refund_giving_up_as_a_late_charge_is_noted_leaves_the_refund_owed(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let database = TestDatabase::create(backend).await;
    let config = EngineConfig {
        expiry_grace_ms: 0,
        refund_patience_min_ms: 300,
        charge_sweep_ms: 60_000,
        ..EngineConfig::default()
    };
    let store = Arc::new(Intercepted {
        inner: database.open(dir.path()).await,
        hooks: SlowOwed::default(),
    });
    let engine = Arc::new(
        Engine::open(store.clone(), Arc::new(SystemClock), config.clone())
            .await
            .unwrap(),
    );
    let provider = Arc::new(LateProvider {
        hold_first_refund: true,
        ..LateProvider::default()
    });
    let (id, pay) = pay_in_flight(&engine, "HELD", provider.clone()).await;
    let wait = Duration::from_secs(10);
    tokio::time::timeout(wait, provider.charging.notified())
        .await
        .expect("the pay called the provider");
    engine.cancel(&Actor::Shopper(user("x")), id).await.unwrap();
    tokio::time::timeout(wait, provider.refund_held.notified())
        .await
        .expect("the close's refund asked the provider");
    // Past the close's refund's patience while its ask is out.
    tokio::time::sleep(Duration::from_millis(400)).await;
    provider.land.notify_one();
    assert_eq!(pay.await.unwrap(), Err(OrderError::PaymentTimeout));
    tokio::time::timeout(wait, store.hooks.owed_commit.notified())
        .await
        .expect("the late charge noted the refund owed");
    // The note's commit is held; the close's refund hears `NotCharged` now.
    provider.down.store(true, Ordering::SeqCst);
    provider.release.notify_one();
    // The note lands, then whatever the close's refund queued; a crash follows while the
    // refunds still try (the provider is down).
    tokio::time::sleep(OWED_COMMIT_HELD + Duration::from_millis(150)).await;
    assert!(provider.refunded.lock().unwrap().is_empty());
    engine.crash().await;
    drop((engine, store));

    provider.down.store(false, Ordering::SeqCst);
    let engine = open(&database, dir.path(), config).await;
    let owed = engine.store().charges_to_settle().await.unwrap();
    assert!(
        owed.iter().any(|entry| entry.order_id == id),
        "the refund owed for the late charge was removed from the ledger: {owed:?}"
    );
    engine.use_payments(provider.clone());
    eventually("the late charge was refunded after the restart", || {
        let provider = provider.clone();
        async move { provider.refunded.lock().unwrap().contains(&id.to_string()) }
    })
    .await;
    engine.shutdown().await;
}

/// On a cluster, another node's refund of the same order can settle its ledger entry
/// (its provider answered `NotCharged`, say a replica that had not seen the charge yet)
/// while this node's refund is still failing. A refund that gives up on a failure writes
/// the entry again, so the refund stays owed: here the other node's removal is made
/// through the store while the provider is down, and after the refund gives up the entry
/// is back; a crash follows, and the next start, with the provider up, makes the refund.
async fn a_refund_giving_up_on_failures_writes_back_an_entry_removed_meanwhile(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let database = TestDatabase::create(backend).await;
    let config = EngineConfig {
        expiry_grace_ms: 0,
        refund_patience_min_ms: 1_000,
        charge_sweep_ms: 60_000,
        ..EngineConfig::default()
    };
    let engine = Arc::new(open(&database, dir.path(), config.clone()).await);
    let provider = Arc::new(LateProvider::default());
    let (id, pay) = pay_in_flight(&engine, "BACK", provider.clone()).await;
    tokio::time::timeout(Duration::from_secs(10), provider.charging.notified())
        .await
        .expect("the pay called the provider");
    // Charged, but the answer timed out: the order stays payable, the charge owed.
    provider.land.notify_one();
    assert_eq!(pay.await.unwrap(), Err(OrderError::PaymentTimeout));
    provider.down.store(true, Ordering::SeqCst);
    engine.cancel(&Actor::Shopper(user("x")), id).await.unwrap();
    eventually("the cancel's refund was tried", || {
        let provider = provider.clone();
        async move { provider.refunds_failed.load(Ordering::SeqCst) >= 1 }
    })
    .await;
    let store = engine.store();
    let owes = |store: Arc<dyn stampede_engine::Store>| async move {
        store
            .charges_to_settle()
            .await
            .unwrap()
            .iter()
            .any(|entry| entry.order_id == id)
    };
    assert!(owes(store.clone()).await, "the charge was not owed");
    assert_eq!(
        engine.refunds_open(),
        1,
        "the refund ended before its patience"
    );
    // Another node settles the entry.
    store
        .commit(&[WriteOp::ChargeSettled { order_id: id }])
        .await
        .unwrap();
    assert!(!owes(store.clone()).await, "the entry was not removed");
    eventually("the refund gave up", || {
        let engine = engine.clone();
        async move { engine.refunds_open() == 0 }
    })
    .await;
    assert!(
        owes(store.clone()).await,
        "a refund that gave up on failures left the charge unowed"
    );
    assert!(provider.refunded.lock().unwrap().is_empty());
    engine.crash().await;
    drop((engine, store));

    provider.down.store(false, Ordering::SeqCst);
    let engine = open(&database, dir.path(), config).await;
    engine.use_payments(provider.clone());
    eventually("the charge was refunded after the restart", || {
        let provider = provider.clone();
        async move { provider.refunded.lock().unwrap().contains(&id.to_string()) }
    })
    .await;
    engine.shutdown().await;
}

on_every_backend!(
    a_restart_rebuilds_thousands_of_orders,
    a_charge_that_lands_after_its_close_gave_up_is_refunded_after_a_crash,
    a_charge_that_lost_to_a_close_that_gave_up_is_refunded_after_a_crash,
    a_charge_behind_a_failing_gateway_is_refunded_after_a_crash,
    a_refund_giving_up_as_a_late_charge_is_noted_leaves_the_refund_owed,
    a_refund_giving_up_on_failures_writes_back_an_entry_removed_meanwhile,
);

/// Holds every commit while `hold` is set, and says when the first one is waiting.
#[derive(Default)]
struct HeldCommits {
    hold: AtomicBool,
    waiting: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl Interceptor for HeldCommits {
    async fn before(&self, call: Call<'_>) -> Result<(), StoreError> {
        if matches!(call, Call::Commit(_)) && self.hold.load(Ordering::SeqCst) {
            let released = self.release.notified();
            self.waiting.notify_one();
            released.await;
        }
        Ok(())
    }
}

/// A sweep that finds many paid orders' ledger entries (their removals dropped while the
/// queue was full in the surge, or lost to a crash) takes at most half of the writer's
/// queue with their removals, so a purchase that comes meanwhile still has room; the
/// next sweeps settle the rest. Before, the sweep sent a removal for every entry, filled
/// the queue, and the purchase was refused `Overloaded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_of_many_ledger_entries_leaves_the_shoppers_room_in_the_queue() {
    const ENTRIES: u32 = 100;
    let dir = tempfile::tempdir().unwrap();
    let database = TestDatabase::create(Backend::Sqlite).await;
    let store = database.open(dir.path()).await;
    let engine = Engine::open(
        store.clone(),
        Arc::new(SystemClock),
        EngineConfig::default(),
    )
    .await
    .unwrap();
    let sale = live_sale(&engine, "SWEPT", 200, 200, 50, 200).await;
    let mut orders = Vec::new();
    for n in 0..ENTRIES {
        let placed = engine
            .purchase(user("payer"), key(&format!("k{n}")), sale, one())
            .await
            .unwrap();
        orders.push(placed.placed);
    }
    engine.shutdown().await;
    // Paid, each with the ledger entry its charge wrote, and none removed.
    let now = stampede_engine::Clock::now_ms(&SystemClock);
    let mut ops: Vec<WriteOp> = orders
        .iter()
        .map(|placed| WriteOp::ChargeAttempt {
            order_id: placed.order_id,
            amount: placed.amount,
            at_ms: now,
        })
        .collect();
    ops.extend(orders.iter().map(|placed| WriteOp::Transition {
        order_id: placed.order_id,
        to: OrderStatus::Paid,
        at_ms: now,
    }));
    store.commit(&ops).await.unwrap();
    assert_eq!(
        store.charges_to_settle().await.unwrap().len(),
        ENTRIES as usize
    );

    let held = Arc::new(Intercepted {
        inner: store.clone(),
        hooks: HeldCommits::default(),
    });
    let queue = 64;
    let engine = Arc::new(
        Engine::open(
            held.clone(),
            Arc::new(SystemClock),
            EngineConfig {
                queue_capacity: queue,
                // The writer takes one job and holds it: what the sweep sent stays queued.
                batch_size_max: 1,
                charge_sweep_ms: 100,
                ..EngineConfig::default()
            },
        )
        .await
        .unwrap(),
    );
    held.hooks.hold.store(true, Ordering::SeqCst);
    let waiting = held.hooks.waiting.notified();
    engine.use_payments(Arc::new(
        stampede_engine::testing::RecordingProvider::default(),
    ));
    waiting.await;
    // The sweep's turn is over (it sends without waiting).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let buying = tokio::spawn({
        let engine = engine.clone();
        async move {
            engine
                .purchase(user("shopper"), key("k"), sale, one())
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !buying.is_finished(),
        "the purchase was answered while the writer held its first commit: {:?}",
        buying.await
    );
    held.hooks.hold.store(false, Ordering::SeqCst);
    held.hooks.release.notify_waiters();
    held.hooks.release.notify_one();
    let placed = buying.await.unwrap();
    assert!(placed.is_ok(), "{placed:?}");
    // The later sweeps settle what the first left.
    eventually("the later sweeps settle every entry", || async {
        store.charges_to_settle().await.unwrap().is_empty()
    })
    .await;
    engine.shutdown().await;
}
