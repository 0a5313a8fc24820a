//! In-memory reservations per second: the stock gate, per-user count, idempotency entry
//! and queue hand-off of one purchase, without storage cost (`AckMode::Reserved` over a
//! store that keeps nothing). Compare with `stampede-store`'s `writer` bench for the cost
//! of durability.
//!
//! cargo bench -p stampede-engine --bench reserve

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use stampede_engine::testing::live_sale;
use stampede_engine::{
    AckMode, Engine, EngineConfig, OpOutcome, OrderRecord, PendingTally, Rebuild, SaleTally, Store,
    StoreError, SystemClock, WriteOp,
};
use stampede_types::{IdempotencyKey, OrderId, Quantity, SaleId, UserId};

/// Accepts every batch and keeps nothing: isolates the engine's own cost.
struct Discard;

#[async_trait]
impl Store for Discard {
    async fn load(&self, _: &mut dyn Rebuild) -> Result<(), StoreError> {
        Ok(())
    }
    async fn commit(&self, ops: &[WriteOp]) -> Result<Vec<OpOutcome>, StoreError> {
        Ok(ops.iter().map(|_| OpOutcome::Written).collect())
    }
    async fn order(&self, _: OrderId) -> Result<Option<OrderRecord>, StoreError> {
        Ok(None)
    }
    async fn orders_by_id(&self, _: &[OrderId]) -> Result<Vec<OrderRecord>, StoreError> {
        Ok(Vec::new())
    }
    async fn tally(&self, _: SaleId, _: u32) -> Result<SaleTally, StoreError> {
        Ok(SaleTally::default())
    }
    async fn snapshot_tally(&self, _: SaleId, _: u32) -> Result<PendingTally, StoreError> {
        Ok(Box::pin(async { Ok(SaleTally::default()) }))
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

fn reservations(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let engine = runtime.block_on(async {
        let config = EngineConfig {
            queue_capacity: 1 << 20,
            ack: AckMode::Reserved,
            ..EngineConfig::default()
        };
        let engine = Engine::open(Arc::new(Discard), Arc::new(SystemClock), config)
            .await
            .unwrap();
        let sale = live_sale(&engine, "BENCH", 1_000_000_000, 1_000_000_000, 50, 1_000).await;
        (Arc::new(engine), sale)
    });
    let (engine, sale) = engine;
    let users: Vec<UserId> = (0..1_000_000)
        .map(|i| UserId::parse(&format!("user-{i}")).unwrap())
        .collect();
    let counter = AtomicU64::new(0);
    let one = Quantity::parse(1).unwrap();

    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(1));
    group.bench_function("reserve_one_unit", |b| {
        b.to_async(&runtime).iter(|| {
            let n = counter.fetch_add(1, Ordering::Relaxed);
            let user = users[(n % users.len() as u64) as usize].clone();
            let key = IdempotencyKey::parse(&format!("k{n}")).unwrap();
            let engine = engine.clone();
            async move {
                engine
                    .purchase(user, key, sale, one)
                    .await
                    .expect("bench sale never sells out");
            }
        })
    });
    group.finish();
}

criterion_group!(benches, reservations);
criterion_main!(benches);
