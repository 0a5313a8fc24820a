//! The engine's memory during a sale, over the embedded store: the idempotency map has
//! room for the running sales' orders from the moment each opens, so no purchase waits
//! while a shard of it doubles and moves its entries (BENCHMARKS.md, "Room for the
//! orders before the sale"). And a shopper's order list in memory stays bounded however
//! many orders they place and cancel.

use std::sync::Arc;

use stampede_engine::testing::{live_sale, one};
use stampede_engine::{Actor, Engine, EngineConfig, ORDERS_LISTED_MAX, SystemClock};
use stampede_store::testing::{Backend, TestDatabase};
use stampede_types::{IdempotencyKey, UserId};

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
    // place order after order.
    let sale = live_sale(&engine, "CHURN", 1, 1, 50, 1).await;
    let user = UserId::parse("churner").unwrap();
    let rounds = 2 * ORDERS_LISTED_MAX + 50;
    let mut placed = Vec::new();
    for round in 0..rounds {
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
