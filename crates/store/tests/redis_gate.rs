//! `stock_gate = "redis"`: the conventional design (stock and shoppers' counts in Redis,
//! taken by a Lua script) behind the same engine, writer and durable log, against the
//! real Redis. It must sell exactly the stock, keep the limit, take back what a
//! cancellation returns, and be reloaded from the durable orders at start; a shopper who
//! buys and cancels over and over is stopped at the closed-orders limit, before and
//! after a restart alike. With a gate
//! that answers slowly (a stand-in, not Redis): a client that hangs up during the take,
//! or after its answer came and before it was read, leaves no units taken, and a duplicate whose first attempt was refused is decided on
//! its own request. A give-back or take from a process replaced since the sale was
//! loaded again is refused, so nothing is counted twice. The sale's view follows the
//! units handed back.

use std::sync::Arc;

use stampede_engine::testing::{live_sale, one};
use stampede_engine::{
    Actor, CLOSED_ORDERS_PER_SHOPPER_MAX, Engine, EngineConfig, GateCount, GateRefusal,
    PurchaseError, StockGate, Store, SystemClock,
};
use stampede_store::RedisGate;
use stampede_store::testing::{Backend, TestDatabase};
use stampede_types::{IdempotencyKey, SaleId, SaleStatus, UserId};

fn redis_url() -> String {
    std::env::var("STAMPEDE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A key prefix of its own per test, so tests never share Redis keys.
fn prefix(test: &str) -> String {
    format!("stampede-test:{}:{test}", std::process::id())
}

async fn gate(prefix: &str) -> Arc<RedisGate> {
    Arc::new(
        RedisGate::connect(&redis_url(), prefix)
            .await
            .unwrap_or_else(|e| panic!("Redis does not answer at {} ({e})", redis_url())),
    )
}

async fn open(store: Arc<dyn Store>, gate: Arc<RedisGate>) -> Arc<Engine> {
    Arc::new(
        Engine::open_with_gate(
            store,
            Arc::new(SystemClock),
            EngineConfig::default(),
            Some(gate as Arc<dyn StockGate>),
        )
        .await
        .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_gate_sells_exactly_the_stock_within_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let database = TestDatabase::create(Backend::Sqlite).await;
    let gate = gate(&prefix("sells")).await;
    let engine = open(database.open(dir.path()).await, gate.clone()).await;
    let sale = live_sale(&engine, "P", 100, 100, 50, 2).await;

    let mut buyers = Vec::new();
    for n in 0..300 {
        let engine = engine.clone();
        buyers.push(tokio::spawn(async move {
            let user = UserId::parse(&format!("u{}", n % 150)).unwrap();
            let key = IdempotencyKey::parse(&format!("k{n}")).unwrap();
            engine.purchase(user, key, sale, one()).await
        }));
    }
    let mut sold = 0;
    for buyer in buyers {
        match buyer.await.unwrap() {
            Ok(_) => sold += 1,
            Err(PurchaseError::SoldOut { .. } | PurchaseError::LimitExceeded { .. }) => {}
            Err(other) => panic!("unexpected refusal {other:?}"),
        }
    }
    assert_eq!(sold, 100);
    assert_eq!(gate.remaining(sale).await.unwrap(), 0);
    let audit = engine.audit(sale).await.unwrap().unwrap();
    assert!(audit.consistent, "{audit:?}");
    assert_eq!(audit.tally.users_over_limit, 0);
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buying_and_cancelling_over_and_over_stops_at_the_closed_orders_limit() {
    let dir = tempfile::tempdir().unwrap();
    let database = TestDatabase::create(Backend::Sqlite).await;
    let prefix = prefix("churn");
    let engine = open(database.open(dir.path()).await, gate(&prefix).await).await;
    let sale = live_sale(&engine, "P", 1, 1, 50, 1).await;
    let user = UserId::parse("churner").unwrap();
    let buy = |engine: Arc<Engine>, n: u32| {
        let user = user.clone();
        async move {
            let key = IdempotencyKey::parse(&format!("churn-{n}")).unwrap();
            engine.purchase(user, key, sale, one()).await
        }
    };
    for n in 0..CLOSED_ORDERS_PER_SHOPPER_MAX {
        // The cancel's unit (and the shopper's count) go back to Redis asynchronously:
        // wait for them.
        let mut placed = buy(engine.clone(), n).await;
        for _ in 0..100 {
            if !matches!(
                placed,
                Err(PurchaseError::SoldOut { .. } | PurchaseError::LimitExceeded { .. })
            ) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            placed = buy(engine.clone(), n).await;
        }
        let id = placed.unwrap().placed.order_id;
        engine
            .cancel(&Actor::Shopper(user.clone()), id)
            .await
            .unwrap();
    }
    let refused = PurchaseError::ClosedLimitExceeded {
        max: CLOSED_ORDERS_PER_SHOPPER_MAX,
    };
    assert_eq!(
        buy(engine.clone(), 1_000).await.unwrap_err(),
        refused,
        "while the server runs"
    );
    engine.shutdown().await;
    drop(engine);
    let engine = open(database.open(dir.path()).await, gate(&prefix).await).await;
    assert_eq!(
        buy(engine.clone(), 1_001).await.unwrap_err(),
        refused,
        "after a restart"
    );
    engine.shutdown().await;
}

/// A process replaced while its give-back was still on its way: the next process loaded
/// the sale from the durable orders (which count the order closed), so the old process's
/// give-back, landing after, would count the unit twice. It is refused, and so is the old
/// process's take; the new process sells from what it loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_give_back_from_a_process_replaced_since_is_not_counted_twice() {
    let prefix = prefix("fenced");
    let (old, new) = (gate(&prefix).await, gate(&prefix).await);
    let sale = SaleId::new();
    let user = UserId::parse("x").unwrap();
    old.load(sale, 10, &[]).await.unwrap();
    assert_eq!(old.take(sale, &user, 1, 5).await.unwrap().remaining, 9);
    // The order closed and the process died; the next one loads the durable state.
    new.load(sale, 10, &[]).await.unwrap();
    let late = old.give_back(sale, &user, 1).await;
    assert!(
        matches!(late, Err(GateRefusal::Unavailable(_))),
        "a replaced process's give-back was taken: {late:?}"
    );
    assert_eq!(new.remaining(sale).await.unwrap(), 10);
    assert!(matches!(
        old.take(sale, &user, 1, 5).await,
        Err(GateRefusal::Unavailable(_))
    ));
    assert_eq!(new.remaining(sale).await.unwrap(), 10);
    let taken = new.take(sale, &user, 2, 5).await.unwrap();
    assert_eq!(taken.remaining, 8);
    let back = new.give_back(sale, &user, 2).await.unwrap().unwrap();
    assert_eq!(back.remaining, 10);
    assert!(back.seq > taken.seq, "{back:?} after {taken:?}");
    assert_eq!(new.remaining(sale).await.unwrap(), 10);
    // A gate that never loaded the sale neither sells nor hands back.
    let stranger = gate(&prefix).await;
    assert!(stranger.take(sale, &user, 1, 5).await.is_err());
    assert!(stranger.give_back(sale, &user, 1).await.is_err());
    assert_eq!(new.remaining(sale).await.unwrap(), 10);
}

/// The sale's public view counts what the gate holds: a sale whose only unit was bought
/// shows sold out, and once the order is cancelled and the unit is back in Redis it shows
/// the unit for sale again, before anyone buys (the view used to move only with a take,
/// so a shop front hiding its button on `sold_out` never sold the unit again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sales_view_shows_units_handed_back_to_the_gate() {
    let dir = tempfile::tempdir().unwrap();
    let database = TestDatabase::create(Backend::Sqlite).await;
    let gate = gate(&prefix("view")).await;
    let engine = open(database.open(dir.path()).await, gate.clone()).await;
    let sale = live_sale(&engine, "P", 1, 1, 50, 1).await;
    let view = engine.sale(sale).unwrap();
    assert_eq!((view.remaining, view.status), (1, SaleStatus::Live));
    let placed = engine
        .purchase(
            UserId::parse("x").unwrap(),
            IdempotencyKey::parse("k").unwrap(),
            sale,
            one(),
        )
        .await
        .unwrap();
    let view = engine.sale(sale).unwrap();
    assert_eq!((view.remaining, view.status), (0, SaleStatus::SoldOut));
    engine
        .cancel(&Actor::Admin, placed.placed.order_id)
        .await
        .unwrap();
    // The hand-back is asynchronous: Redis and the database are two systems.
    let mut view = engine.sale(sale).unwrap();
    for _ in 0..100 {
        if view.remaining == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        view = engine.sale(sale).unwrap();
    }
    assert_eq!((view.remaining, view.status), (1, SaleStatus::Live));
    assert_eq!(gate.remaining(sale).await.unwrap(), 1);
    let audit = engine.audit(sale).await.unwrap().unwrap();
    assert!(audit.consistent, "{audit:?}");
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancellation_returns_its_unit_to_redis_and_a_restart_reloads_it() {
    let dir = tempfile::tempdir().unwrap();
    let database = TestDatabase::create(Backend::Sqlite).await;
    let prefix = prefix("reload");
    let gate_a = gate(&prefix).await;
    let engine = open(database.open(dir.path()).await, gate_a.clone()).await;
    let sale = live_sale(&engine, "P", 5, 5, 50, 1).await;
    let user = UserId::parse("x").unwrap();
    let placed = engine
        .purchase(
            user.clone(),
            IdempotencyKey::parse("k").unwrap(),
            sale,
            one(),
        )
        .await
        .unwrap();
    let over = engine
        .purchase(
            user.clone(),
            IdempotencyKey::parse("k2").unwrap(),
            sale,
            one(),
        )
        .await;
    assert_eq!(
        over.unwrap_err(),
        PurchaseError::LimitExceeded { limit: 1, held: 1 }
    );
    assert_eq!(gate_a.remaining(sale).await.unwrap(), 4);
    engine
        .cancel(&Actor::Admin, placed.placed.order_id)
        .await
        .unwrap();
    // The hand-back is asynchronous: Redis and the database are two systems.
    for _ in 0..100 {
        if gate_a.remaining(sale).await.unwrap() == 5 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(gate_a.remaining(sale).await.unwrap(), 5);
    let again = engine
        .purchase(
            user.clone(),
            IdempotencyKey::parse("k3").unwrap(),
            sale,
            one(),
        )
        .await
        .unwrap();
    engine.shutdown().await;
    drop(engine);

    // Redis drifts (a failover lost writes): the restart reloads it from the orders.
    let mut redis = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("{prefix}:sale:{sale}:stock"))
        .arg(5)
        .query_async(&mut redis)
        .await
        .unwrap();
    let engine = open(database.open(dir.path()).await, gate(&prefix).await).await;
    assert_eq!(
        gate_a.remaining(sale).await.unwrap(),
        4,
        "reloaded from the orders"
    );
    let replay = engine
        .purchase(user, IdempotencyKey::parse("k3").unwrap(), sale, one())
        .await
        .unwrap();
    assert!(replay.replay);
    assert_eq!(replay.placed.order_id, again.placed.order_id);
    let audit = engine.audit(sale).await.unwrap().unwrap();
    assert!(audit.consistent, "{audit:?}");
    engine.shutdown().await;
}

/// A gate in memory whose takes land at once and answer `delay` later, as a Redis whose
/// reply is slow to come back.
struct SlowGate {
    delay: std::time::Duration,
    stock: std::sync::Mutex<std::collections::HashMap<stampede_types::SaleId, u64>>,
    held: std::sync::Mutex<std::collections::HashMap<UserId, u32>>,
    seq: std::sync::atomic::AtomicU64,
}

impl SlowGate {
    fn count(&self, remaining: u64) -> GateCount {
        let seq = 1 + self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        GateCount { remaining, seq }
    }
}

#[async_trait::async_trait]
impl StockGate for SlowGate {
    async fn load(
        &self,
        sale: stampede_types::SaleId,
        remaining: u64,
        _: &[(UserId, u32)],
    ) -> Result<(), stampede_engine::GateRefusal> {
        self.stock.lock().unwrap().insert(sale, remaining);
        Ok(())
    }
    async fn take(
        &self,
        sale: stampede_types::SaleId,
        user: &UserId,
        units: u32,
        limit: u32,
    ) -> Result<GateCount, stampede_engine::GateRefusal> {
        // Decided at once, as the script runs; the answer takes `delay` to come back.
        let answer = {
            let mut stock = self.stock.lock().unwrap();
            let mut held = self.held.lock().unwrap();
            let mine = held.entry(user.clone()).or_default();
            let left = stock.entry(sale).or_default();
            if *mine + units > limit {
                Err(stampede_engine::GateRefusal::LimitExceeded { held: *mine })
            } else if *left < u64::from(units) {
                Err(stampede_engine::GateRefusal::SoldOut { remaining: *left })
            } else {
                *left -= u64::from(units);
                *mine += units;
                Ok(self.count(*left))
            }
        };
        tokio::time::sleep(self.delay).await;
        answer
    }
    async fn give_back(
        &self,
        sale: stampede_types::SaleId,
        user: &UserId,
        units: u32,
    ) -> Result<Option<GateCount>, stampede_engine::GateRefusal> {
        let mut stock = self.stock.lock().unwrap();
        let left = stock.entry(sale).or_default();
        *left += u64::from(units);
        let mut held = self.held.lock().unwrap();
        let mine = held.entry(user.clone()).or_default();
        *mine = mine.saturating_sub(units);
        Ok(Some(self.count(*left)))
    }
    async fn remaining(
        &self,
        sale: stampede_types::SaleId,
    ) -> Result<u64, stampede_engine::GateRefusal> {
        Ok(self.stock.lock().unwrap().get(&sale).copied().unwrap_or(0))
    }
}

async fn slow_gate_engine(dir: &std::path::Path) -> (Arc<SlowGate>, Arc<Engine>) {
    let gate = Arc::new(SlowGate {
        delay: std::time::Duration::from_millis(100),
        stock: Default::default(),
        held: Default::default(),
        seq: Default::default(),
    });
    let database = TestDatabase::create(Backend::Sqlite).await;
    let engine = Arc::new(
        Engine::open_with_gate(
            database.open(dir).await,
            Arc::new(SystemClock),
            EngineConfig::default(),
            Some(gate.clone() as Arc<dyn StockGate>),
        )
        .await
        .unwrap(),
    );
    (gate, engine)
}

#[tokio::test]
async fn a_client_that_hangs_up_during_the_gates_take_leaves_no_units_taken() {
    let dir = tempfile::tempdir().unwrap();
    let (gate, engine) = slow_gate_engine(dir.path()).await;
    let sale = live_sale(&engine, "SLOW", 5, 5, 50, 2).await;
    let user = UserId::parse("leaver").unwrap();
    let gave_up = tokio::time::timeout(
        std::time::Duration::from_millis(20),
        engine.purchase(
            user.clone(),
            IdempotencyKey::parse("k").unwrap(),
            sale,
            one(),
        ),
    )
    .await;
    assert!(gave_up.is_err(), "the client left before the gate answered");
    // The take landed in the gate; its answer came after the client left. Its units
    // come back.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(gate.remaining(sale).await.unwrap(), 5);
    assert_eq!(
        gate.held.lock().unwrap().get(&user).copied().unwrap_or(0),
        0
    );
    // The shopper may buy again with the same key.
    let placed = engine
        .purchase(user, IdempotencyKey::parse("k").unwrap(), sale, one())
        .await
        .unwrap();
    assert!(!placed.replay);
}

/// A purchase dropped after the gate's answer arrived and before it was read (the
/// client hung up between the take's answer and the purchase's next turn): its units
/// come back too. Before, the take's task saw its answer delivered and kept them, and
/// the gate stayed a unit short until a restart reloaded it.
#[tokio::test]
async fn a_purchase_dropped_with_the_gates_answer_unread_leaves_no_units_taken() {
    let dir = tempfile::tempdir().unwrap();
    let (gate, engine) = slow_gate_engine(dir.path()).await;
    let sale = live_sale(&engine, "SLOW-UNREAD", 5, 5, 50, 2).await;
    let user = UserId::parse("leaver").unwrap();
    let mut purchase = Box::pin(engine.purchase(
        user.clone(),
        IdempotencyKey::parse("k").unwrap(),
        sale,
        one(),
    ));
    // One turn: the take is sent. Then its answer comes back while the purchase is not
    // polled again.
    assert!(futures::poll!(purchase.as_mut()).is_pending());
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(gate.remaining(sale).await.unwrap(), 4, "the take landed");
    drop(purchase);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(gate.remaining(sale).await.unwrap(), 5);
    assert_eq!(
        gate.held.lock().unwrap().get(&user).copied().unwrap_or(0),
        0
    );
    assert_eq!(
        engine.sale(sale).unwrap().remaining,
        5,
        "the view shows them"
    );
}

/// The units of a client that left during the take come back to the view too: the last
/// unit's buyer took it after the leaver's take and its answer came back after the
/// leaver's hand-back, so without the leaver's counts the view would stay sold out.
#[tokio::test]
async fn units_of_a_client_that_left_during_the_take_show_in_the_sales_view() {
    let dir = tempfile::tempdir().unwrap();
    let (gate, engine) = slow_gate_engine(dir.path()).await;
    let sale = live_sale(&engine, "SLOW-VIEW", 2, 2, 50, 1).await;
    let leaver = tokio::time::timeout(
        std::time::Duration::from_millis(20),
        engine.purchase(
            UserId::parse("leaver").unwrap(),
            IdempotencyKey::parse("k").unwrap(),
            sale,
            one(),
        ),
    )
    .await;
    assert!(leaver.is_err(), "the client left before the gate answered");
    // The last unit, taken while the leaver's is still out; answered after it is back.
    let placed = engine
        .purchase(
            UserId::parse("buyer").unwrap(),
            IdempotencyKey::parse("k").unwrap(),
            sale,
            one(),
        )
        .await
        .unwrap();
    assert!(!placed.replay);
    assert_eq!(gate.remaining(sale).await.unwrap(), 1);
    let view = engine.sale(sale).unwrap();
    assert_eq!((view.remaining, view.status), (1, SaleStatus::Live));
}

#[tokio::test]
async fn a_duplicate_is_decided_on_its_own_request_when_the_first_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_gate, engine) = slow_gate_engine(dir.path()).await;
    let sale = live_sale(&engine, "SLOW", 5, 5, 50, 2).await;
    let user = UserId::parse("twice").unwrap();
    let key = IdempotencyKey::parse("same").unwrap();
    // Over the limit of 2, under way in the gate...
    let first = {
        let (engine, user, key) = (engine.clone(), user.clone(), key.clone());
        tokio::spawn(async move {
            engine
                .purchase(user, key, sale, stampede_types::Quantity::parse(3).unwrap())
                .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    // ...when the same key comes for one unit: it waits for the first, which is refused.
    let second = engine.purchase(user, key, sale, one()).await;
    assert!(matches!(
        first.await.unwrap(),
        Err(PurchaseError::LimitExceeded { .. })
    ));
    let second = second.expect("one unit is within the limit");
    assert!(!second.replay);
}
