//! The engine's memory during a sale, over the embedded store: the idempotency map has
//! room for the running sales' orders from the moment each opens, so no purchase waits
//! while a shard of it doubles and moves its entries (BENCHMARKS.md, "Room for the
//! orders before the sale"). And a shopper's order list in memory stays bounded however
//! many orders they place and cancel. And an ended sale's idempotency answers leave
//! memory once its payment window is over, while its replays are still answered. And
//! a transaction stays within `batch_size_max` when orders fall due under a full queue.

use std::sync::Arc;

use stampede_engine::testing::{live_sale, one, sale_ending_in};
use stampede_engine::{
    Actor, CLOSED_ORDERS_PER_SHOPPER_MAX, Engine, EngineConfig, ManualClock, ORDERS_LISTED_MAX,
    PurchaseError, SystemClock,
};
use stampede_store::testing::{Backend, TestDatabase};
use stampede_types::{IdempotencyKey, Quantity, UserId};

const UNITS: u64 = 20_000;
const AT_ONCE: u64 = 1_000;

#[tokio::test]
async fn a_sale_makes_room_for_its_orders_before_it_sells() {
    let dir = tempfile::tempdir().unwrap();
    let database = TestDatabase::create(Backend::Sqlite).await;
    let engine = Arc::new(
        Engine::open(
            database.open(dir.path()).await,
            Arc::new(SystemClock),
            EngineConfig::default(),
        )
        .await
        .unwrap(),
    );
    // Two sales at once, half the units each: the second one's room comes on top of the
    // first one's, not in place of it.
    let sales = [
        live_sale(&engine, "ROOM-A", UNITS / 2, UNITS / 2, 50, 1).await,
        live_sale(&engine, "ROOM-B", UNITS / 2, UNITS / 2, 50, 1).await,
    ];
    let room = engine.idempotency_capacity();
    assert!(
        room >= UNITS as usize,
        "room for {room} orders, not {UNITS}"
    );

    // Every unit of both sold, a thousand shoppers at a time, each with a key of their own.
    for wave in 0..UNITS / AT_ONCE {
        let buyers: Vec<_> = (0..AT_ONCE)
            .map(|i| {
                let engine = engine.clone();
                let n = wave * AT_ONCE + i;
                let sale = sales[(n % 2) as usize];
                tokio::spawn(async move {
                    let user = UserId::parse(&format!("shopper-{n}")).unwrap();
                    let key = IdempotencyKey::parse(&format!("key-{n}")).unwrap();
                    engine.purchase(user, key, sale, one()).await
                })
            })
            .collect();
        for buyer in buyers {
            buyer.await.unwrap().expect("a unit for every shopper");
        }
    }
    for sale in sales {
        assert_eq!(engine.sale(sale).unwrap().remaining, 0);
    }
    assert_eq!(
        engine.idempotency_capacity(),
        room,
        "a shard grew while the sale sold"
    );
}

#[tokio::test]
async fn a_shopper_who_buys_and_cancels_over_and_over_is_listed_from_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let database = TestDatabase::create(Backend::Sqlite).await;
    let open = || async {
        Engine::open(
            database.open(dir.path()).await,
            Arc::new(SystemClock),
            EngineConfig::default(),
        )
        .await
        .unwrap()
    };
    let engine = open().await;
    // One unit, one per shopper: each cancel gives both back, so the same shopper can
    // place order after order (in a sale at most CLOSED_ORDERS_PER_SHOPPER_MAX, so
    // over several sales).
    let per_sale = CLOSED_ORDERS_PER_SHOPPER_MAX as usize;
    let rounds = 2 * ORDERS_LISTED_MAX + 50;
    let mut sales = Vec::new();
    for n in 0..rounds.div_ceil(per_sale) {
        sales.push(live_sale(&engine, &format!("CHURN-{n}"), 1, 1, 50, 1).await);
    }
    let user = UserId::parse("churner").unwrap();
    let mut placed = Vec::new();
    for round in 0..rounds {
        let sale = sales[round / per_sale];
        let key = IdempotencyKey::parse(&format!("churn-{round}")).unwrap();
        let order = engine
            .purchase(user.clone(), key, sale, one())
            .await
            .unwrap();
        let id = order.placed.order_id;
        engine
            .cancel(&Actor::Shopper(user.clone()), id)
            .await
            .unwrap();
        placed.push(id);
        assert!(engine.orders_remembered(&user) <= 2 * ORDERS_LISTED_MAX);
    }
    // The newest are listed, newest first, as before.
    let newest: Vec<_> = placed
        .iter()
        .rev()
        .take(ORDERS_LISTED_MAX)
        .copied()
        .collect();
    let listed = |engine: Engine| {
        let user = user.clone();
        async move {
            let ids: Vec<_> = engine
                .orders_of(&user, ORDERS_LISTED_MAX as u32)
                .await
                .unwrap()
                .iter()
                .map(|o| o.id)
                .collect();
            assert!(engine.orders_remembered(&user) <= 2 * ORDERS_LISTED_MAX);
            engine.shutdown().await;
            ids
        }
    };
    assert_eq!(listed(engine).await, newest);
    // A restart rebuilds the list from every stored order within the same bound.
    assert_eq!(listed(open().await).await, newest);
}

#[tokio::test]
async fn an_ended_sales_answers_leave_memory_and_its_replays_are_still_answered() {
    let retiring = Retiring::new().await;
    let clock = &retiring.clock;
    let open = || retiring.open();
    let engine = open().await;
    let short = sale_ending_in(&engine, "SHORT", 100, 2, 10_000).await;
    let shopper = |n: usize| UserId::parse(&format!("shopper-{n}")).unwrap();
    let key = |n: usize| IdempotencyKey::parse(&format!("key-{n}")).unwrap();
    let mut placed = Vec::new();
    for n in 0..50 {
        let order = engine
            .purchase(shopper(n), key(n), short, one())
            .await
            .unwrap();
        assert!(!order.replay);
        placed.push(order.placed);
    }
    assert_eq!(engine.idempotency_answers(), 50);
    assert_eq!(engine.shopper_counts(), 50);

    // Ended, but within the payment window: still answered from memory.
    clock.advance_ms(10_000);
    let again = engine
        .purchase(shopper(0), key(0), short, one())
        .await
        .unwrap();
    assert!(again.replay);
    assert_eq!(again.placed, placed[0]);
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    assert_eq!(
        engine.idempotency_answers(),
        50,
        "answers left memory too early"
    );

    // A sale still running keeps its answers when the short one's leave.
    clock.advance_ms(60_000 + 5_000);
    let running = live_sale(&engine, "LONG", 10, 10, 50, 1).await;
    let kept = engine
        .purchase(shopper(0), key(1_000), running, one())
        .await
        .unwrap();
    until_answers_are(&engine, 1).await;
    assert_eq!(
        engine.shopper_counts(),
        1,
        "the ended sale's per-shopper counts left with its answers"
    );

    let check = |engine: Engine| {
        let placed = placed.clone();
        let kept = kept.placed.clone();
        async move {
            // A late replay is the same order, read from the store.
            for n in [0, 17, 49] {
                let again = engine
                    .purchase(shopper(n), key(n), short, one())
                    .await
                    .unwrap();
                assert!(again.replay);
                assert_eq!(again.placed, placed[n]);
            }
            // The same key on another request is still refused as reused.
            let two = Quantity::parse(2).unwrap();
            assert_eq!(
                engine
                    .purchase(shopper(3), key(3), short, two)
                    .await
                    .unwrap_err(),
                PurchaseError::KeyReused
            );
            // A new key, or a shopper who never bought, finds the sale ended.
            assert_eq!(
                engine
                    .purchase(shopper(3), key(77), short, one())
                    .await
                    .unwrap_err(),
                PurchaseError::Ended
            );
            assert_eq!(
                engine
                    .purchase(shopper(99), key(99), short, one())
                    .await
                    .unwrap_err(),
                PurchaseError::Ended
            );
            // The running sale's answer is still in memory.
            let again = engine
                .purchase(shopper(0), key(1_000), running, one())
                .await
                .unwrap();
            assert!(again.replay);
            assert_eq!(again.placed, kept);
            assert_eq!(
                engine.idempotency_answers(),
                1,
                "lookups left nothing behind"
            );
            engine.shutdown().await;
        }
    };
    check(engine).await;
    // A restart loads the running sale's answers and counts only, and answers the same.
    let engine = open().await;
    assert_eq!(engine.idempotency_answers(), 1);
    assert_eq!(engine.shopper_counts(), 1);
    check(engine).await;
}

/// The README lets a retired key buy again in another, running sale: each purchase keeps
/// its own order, and a late replay of the first is answered with the first's order
/// (before, the running sale's answer in memory refused it as a reused key until that
/// sale retired too).
#[tokio::test]
async fn a_retired_key_used_again_in_another_sale_leaves_each_purchase_its_own_order() {
    let retiring = Retiring::new().await;
    let clock = &retiring.clock;
    let open = || retiring.open();
    let engine = open().await;
    let short = sale_ending_in(&engine, "SHORT", 10, 1, 10_000).await;
    let shopper = UserId::parse("shopper").unwrap();
    let key = IdempotencyKey::parse("k").unwrap();
    let first = engine
        .purchase(shopper.clone(), key.clone(), short, one())
        .await
        .unwrap();
    clock.advance_ms(10_000 + 60_000 + 5_000);
    let running = live_sale(&engine, "LONG", 10, 10, 50, 1).await;
    until_answers_are(&engine, 0).await;
    let second = engine
        .purchase(shopper.clone(), key.clone(), running, one())
        .await
        .unwrap();
    assert!(!second.replay);
    assert_ne!(second.placed.order_id, first.placed.order_id);

    let check = |engine: Engine| {
        let (shopper, key) = (shopper.clone(), key.clone());
        let (first, second) = (first.placed.clone(), second.placed.clone());
        async move {
            let again = engine
                .purchase(shopper.clone(), key.clone(), short, one())
                .await
                .unwrap();
            assert!(again.replay);
            assert_eq!(again.placed, first);
            let again = engine
                .purchase(shopper.clone(), key.clone(), running, one())
                .await
                .unwrap();
            assert!(again.replay);
            assert_eq!(again.placed, second);
            // Another request under the key is still refused, in either sale.
            let two = Quantity::parse(2).unwrap();
            for sale in [short, running] {
                assert_eq!(
                    engine
                        .purchase(shopper.clone(), key.clone(), sale, two)
                        .await
                        .unwrap_err(),
                    PurchaseError::KeyReused
                );
            }
            engine.shutdown().await;
        }
    };
    check(engine).await;
    check(open().await).await;
}

/// Holds every read of orders while `hold` is set.
#[derive(Default)]
struct SlowReads {
    hold: std::sync::atomic::AtomicBool,
}

impl SlowReads {
    fn hold(&self, on: bool) {
        self.hold.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl stampede_store::testing::Interceptor for SlowReads {
    async fn before(
        &self,
        call: stampede_store::testing::Call<'_>,
    ) -> Result<(), stampede_engine::StoreError> {
        if matches!(call, stampede_store::testing::Call::Read)
            && self.hold.load(std::sync::atomic::Ordering::SeqCst)
        {
            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_replay_given_up_while_the_store_looks_it_up_leaves_the_key_free() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(stampede_store::testing::Intercepted {
        inner: stampede_store::SqliteStore::open(&dir.path().join("m.db"))
            .await
            .unwrap()
            .into_arc(),
        hooks: SlowReads::default(),
    });
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let config = EngineConfig {
        payment_window_ms: 60_000,
        expiry_grace_ms: 5_000,
        ..EngineConfig::default()
    };
    let engine = Engine::open(store.clone(), clock.clone(), config)
        .await
        .unwrap();
    let sale = sale_ending_in(&engine, "GONE", 10, 1, 1_000).await;
    let shopper = UserId::parse("late-buyer").unwrap();
    let key = IdempotencyKey::parse("late-key").unwrap();
    let first = engine
        .purchase(shopper.clone(), key.clone(), sale, one())
        .await
        .unwrap();
    clock.advance_ms(1_000 + 60_000 + 5_000);
    until_answers_are(&engine, 0).await;

    // A client replays and hangs up while the store is slow to look the order up.
    store.hooks.hold(true);
    let gave_up = tokio::time::timeout(
        std::time::Duration::from_millis(200),
        engine.purchase(shopper.clone(), key.clone(), sale, one()),
    )
    .await;
    assert!(gave_up.is_err(), "the lookup was held");
    assert_eq!(
        engine.idempotency_answers(),
        0,
        "the key was left in flight"
    );

    // Its retry is answered, not left waiting on the request that went away.
    store.hooks.hold(false);
    let again = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        engine.purchase(shopper, key, sale, one()),
    )
    .await
    .expect("the retry waited on a request that had gone away")
    .unwrap();
    assert!(again.replay);
    assert_eq!(again.placed, first.placed);
    assert_eq!(engine.idempotency_answers(), 0);
    engine.shutdown().await;
}

/// Engines on one SQLite database under a manual clock, with a 60 s payment window and a
/// 5 s grace: an ended sale's answers retire once the clock is 65 s past its end.
struct Retiring {
    dir: tempfile::TempDir,
    database: TestDatabase,
    clock: Arc<ManualClock>,
}

impl Retiring {
    async fn new() -> Self {
        Retiring {
            dir: tempfile::tempdir().unwrap(),
            database: TestDatabase::create(Backend::Sqlite).await,
            clock: Arc::new(ManualClock::new(1_800_000_000_000)),
        }
    }

    async fn open(&self) -> Engine {
        let config = EngineConfig {
            payment_window_ms: 60_000,
            expiry_grace_ms: 5_000,
            ..EngineConfig::default()
        };
        Engine::open(
            self.database.open(self.dir.path()).await,
            self.clock.clone(),
            config,
        )
        .await
        .unwrap()
    }
}

/// Waits (at most 10 s) until memory holds `answers` idempotency answers: the writer
/// retires an ended sale's within a second of its payment window and grace.
async fn until_answers_are(engine: &Engine, answers: usize) {
    let forgotten = async {
        while engine.idempotency_answers() != answers {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), forgotten)
        .await
        .expect("the ended sale's answers leave memory within seconds");
}

/// Buying and cancelling over and over keeps the memory of a running sale bounded: a
/// shopper may have `CLOSED_ORDERS_PER_SHOPPER_MAX` orders of a sale cancelled (or
/// expired), then places no more in it, also after a restart; the writer's expiry heap
/// drops the entries of closed orders instead of keeping one per order ever placed.
#[tokio::test]
async fn buying_and_cancelling_over_and_over_is_held_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let database = TestDatabase::create(Backend::Sqlite).await;
    let open = || async {
        Engine::open(
            database.open(dir.path()).await,
            Arc::new(SystemClock),
            EngineConfig::default(),
        )
        .await
        .unwrap()
    };
    let engine = open().await;
    let sale = live_sale(&engine, "CHURN", 1, 1, 50, 1).await;
    let max = CLOSED_ORDERS_PER_SHOPPER_MAX as usize;
    // Twenty shoppers churn the one unit to their cap: 640 orders placed and cancelled.
    for shopper in 0..20 {
        let user = UserId::parse(&format!("churner-{shopper}")).unwrap();
        for round in 0..max {
            let key = IdempotencyKey::parse(&format!("churn-{round}")).unwrap();
            let order = engine
                .purchase(user.clone(), key, sale, one())
                .await
                .unwrap();
            engine
                .cancel(&Actor::Shopper(user.clone()), order.placed.order_id)
                .await
                .unwrap();
        }
        let key = IdempotencyKey::parse("one-more").unwrap();
        assert_eq!(
            engine.purchase(user.clone(), key, sale, one()).await,
            Err(PurchaseError::ClosedLimitExceeded {
                max: CLOSED_ORDERS_PER_SHOPPER_MAX
            })
        );
        // An earlier key still answers its (cancelled) order.
        let again = engine
            .purchase(user, IdempotencyKey::parse("churn-0").unwrap(), sale, one())
            .await
            .unwrap();
        assert!(again.replay);
    }
    // Answers: one per order placed, at most the cap per shopper.
    assert!(engine.idempotency_answers() <= 20 * max);
    // No order is pending: the heap holds at most its compaction slack, not 640.
    assert!(
        engine.expiry_entries() <= 256,
        "{} expiry entries",
        engine.expiry_entries()
    );
    engine.shutdown().await;
    // The cap holds across a restart: the closed orders are counted from the store.
    let engine = open().await;
    let user = UserId::parse("churner-0").unwrap();
    assert_eq!(
        engine
            .purchase(user, IdempotencyKey::parse("after").unwrap(), sale, one())
            .await,
        Err(PurchaseError::ClosedLimitExceeded {
            max: CLOSED_ORDERS_PER_SHOPPER_MAX
        })
    );
    // Others still buy.
    engine
        .purchase(
            UserId::parse("newcomer").unwrap(),
            IdempotencyKey::parse("k").unwrap(),
            sale,
            one(),
        )
        .await
        .unwrap();
    engine.shutdown().await;
}

/// Counts what each commit holds: the most operations, and the commits that carried
/// expiries beside other writes. Commits wait `slow` each while set, so the writer's
/// queue stays full.
#[derive(Default)]
struct Batches {
    slow: std::sync::atomic::AtomicBool,
    most_ops: std::sync::atomic::AtomicUsize,
    mixed: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl stampede_store::testing::Interceptor for Batches {
    async fn before(
        &self,
        call: stampede_store::testing::Call<'_>,
    ) -> Result<(), stampede_engine::StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        if let stampede_store::testing::Call::Commit(ops) = call {
            self.most_ops.fetch_max(ops.len(), SeqCst);
            let expiring = ops
                .iter()
                .filter(|op| {
                    matches!(
                        op,
                        stampede_engine::WriteOp::Transition {
                            to: stampede_types::OrderStatus::Expired,
                            ..
                        }
                    )
                })
                .count();
            if expiring > 0 && expiring < ops.len() {
                self.mixed.fetch_add(1, SeqCst);
            }
            if self.slow.load(SeqCst) {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
        Ok(())
    }
}

/// Orders falling due while the writer's queue is full: each transaction stays within
/// `batch_size_max` operations, expiries and purchases together, and batches carry
/// expiries while the queue is still full (they are not left for after the flood).
#[tokio::test]
async fn expiries_and_a_full_queue_share_a_batch_within_its_bound() {
    use std::sync::atomic::Ordering::SeqCst;
    const BATCH: usize = 8;
    const UNPAID: u64 = 40;
    const FLOOD: u64 = 400;
    let dir = tempfile::tempdir().unwrap();
    let database = TestDatabase::create(Backend::Sqlite).await;
    let store = Arc::new(stampede_store::testing::Intercepted {
        inner: database.open(dir.path()).await,
        hooks: Batches::default(),
    });
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let config = EngineConfig {
        batch_size_max: BATCH,
        queue_capacity: 1_024,
        payment_window_ms: 60_000,
        expiry_grace_ms: 0,
        expiry_tick_ms: 5,
        ..EngineConfig::default()
    };
    let engine = Arc::new(
        Engine::open(store.clone(), clock.clone(), config)
            .await
            .unwrap(),
    );
    let units = UNPAID + FLOOD;
    let sale = live_sale(&engine, "DUE-1", units, units, 50, 1).await;
    let shopper = |n: u64| UserId::parse(&format!("shopper-{n}")).unwrap();
    let key = |n: u64| IdempotencyKey::parse(&format!("key-{n}")).unwrap();
    for n in 0..UNPAID {
        engine
            .purchase(shopper(n), key(n), sale, one())
            .await
            .unwrap();
    }
    // Half a window later, slow commits and a flood of purchases: the queue fills, then
    // the first orders fall due (the flood's are half a window from it).
    clock.advance_ms(30_000);
    store.hooks.slow.store(true, SeqCst);
    let flood: Vec<_> = (UNPAID..UNPAID + FLOOD)
        .map(|n| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.purchase(shopper(n), key(n), sale, one()).await })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    clock.advance_ms(30_001);
    for buyer in flood {
        buyer.await.unwrap().expect("a unit for every shopper");
    }
    store.hooks.slow.store(false, SeqCst);
    let most = store.hooks.most_ops.load(SeqCst);
    assert!(most <= BATCH, "a transaction of {most} operations");
    assert!(
        store.hooks.mixed.load(SeqCst) > 0,
        "no batch carried expiries beside purchases: the test did not fill the queue"
    );
    let books = engine.audit(sale).await.unwrap().expect("the sale's books");
    assert_eq!(books.tally.expired, UNPAID, "{:?}", books.tally);
    assert_eq!(books.tally.pending_payment, FLOOD, "{:?}", books.tally);
}

/// The expiry grace follows the pacing waits: it grows at once, and shrinks only once a
/// pay held under the longer wait could have finished its wait and then its charge (the
/// configured grace), however often it shrinks in between.
#[tokio::test]
async fn the_expiry_grace_shrinks_only_after_pays_held_under_the_old_wait_could_finish() {
    let dir = tempfile::tempdir().unwrap();
    let store = stampede_store::SqliteStore::open(&dir.path().join("g.db"))
        .await
        .unwrap()
        .into_arc();
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let config = EngineConfig {
        expiry_grace_ms: 5_000,
        ..EngineConfig::default()
    };
    let engine = Engine::open(store, clock.clone(), config).await.unwrap();
    let s = std::time::Duration::from_secs;
    assert_eq!(engine.expiry_grace(), s(5));
    engine.set_payment_wait_max(s(10));
    assert_eq!(engine.expiry_grace(), s(15), "grows at once");

    // Lifted: a pay held 10 s from now still needs its 5 s after that.
    engine.set_payment_wait_max(s(0));
    assert_eq!(engine.expiry_grace(), s(15));
    clock.advance_ms(14_999);
    assert_eq!(engine.expiry_grace(), s(15));
    clock.advance_ms(1);
    assert_eq!(
        engine.expiry_grace(),
        s(5),
        "shrinks once they could have finished"
    );

    // Shortened twice: the longest wait still owed counts until its pays could finish.
    engine.set_payment_wait_max(s(10));
    engine.set_payment_wait_max(s(4));
    clock.advance_ms(2_000);
    engine.set_payment_wait_max(s(1));
    assert_eq!(engine.expiry_grace(), s(15));
    clock.advance_ms(15_000);
    assert_eq!(engine.expiry_grace(), s(6));
    // Growing again needs nothing kept.
    engine.set_payment_wait_max(s(3));
    assert_eq!(engine.expiry_grace(), s(8));
}
