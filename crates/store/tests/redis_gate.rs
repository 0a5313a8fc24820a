//! `stock_gate = "redis"`: the conventional design (stock and shoppers' counts in Redis,
//! taken by a Lua script) behind the same engine, writer and durable log, against the
//! real Redis. It must sell exactly the stock, keep the limit, take back what a
//! cancellation returns, and be reloaded from the durable orders at start.

use std::sync::Arc;

use stampede_engine::testing::{live_sale, one};
use stampede_engine::{Actor, Engine, EngineConfig, PurchaseError, StockGate, Store, SystemClock};
use stampede_store::RedisGate;
use stampede_store::testing::{Backend, TestDatabase};
use stampede_types::{IdempotencyKey, UserId};

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
