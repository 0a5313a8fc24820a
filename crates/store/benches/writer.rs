//! Durable orders per second through the group-commit writer, against the same writer
//! forced to commit (and fsync) every order on its own. Same engine, same SQLite file
//! settings (WAL, synchronous=FULL), same 512 concurrent buyers; only `batch_size_max`
//! differs. The ratio is what group commit buys.
//!
//! cargo bench -p stampede-store --bench writer

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use stampede_engine::testing::live_sale;
use stampede_engine::{AckMode, Engine, EngineConfig, SystemClock};
use stampede_store::SqliteStore;
use stampede_types::{IdempotencyKey, Quantity, SaleId, UserId};

const BUYERS: u64 = 512;

async fn setup(dir: &std::path::Path, batch_size_max: usize) -> (Arc<Engine>, SaleId) {
    let store = SqliteStore::open(&dir.join("bench.db"))
        .await
        .unwrap()
        .into_arc();
    let config = EngineConfig {
        batch_size_max,
        ack: AckMode::Durable,
        ..EngineConfig::default()
    };
    let engine = Engine::open(store, Arc::new(SystemClock), config)
        .await
        .unwrap();
    let sale = live_sale(&engine, "BENCH", 1_000_000_000, 1_000_000_000, 50, 1_000).await;
    (Arc::new(engine), sale)
}

/// `BUYERS` concurrent purchases, each answered only once durable.
async fn round(engine: &Arc<Engine>, sale: SaleId, counter: &AtomicU64) {
    let one = Quantity::parse(1).unwrap();
    let handles: Vec<_> = (0..BUYERS)
        .map(|_| {
            let n = counter.fetch_add(1, Ordering::Relaxed);
            let engine = engine.clone();
            tokio::spawn(async move {
                let user = UserId::parse(&format!("u{}", n % 100_000)).unwrap();
                let key = IdempotencyKey::parse(&format!("k{n}")).unwrap();
                engine
                    .purchase(user, key, sale, one)
                    .await
                    .expect("durable purchase");
            })
        })
        .collect();
    for handle in handles {
        handle.await.unwrap();
    }
}

fn group_commit(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("durable_orders");
    group.throughput(Throughput::Elements(BUYERS));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for (name, batch_size_max) in [("group_commit_1024", 1_024), ("commit_per_order", 1)] {
        let dir = tempfile::tempdir().unwrap();
        let (engine, sale) = runtime.block_on(setup(dir.path(), batch_size_max));
        let counter = AtomicU64::new(0);
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let engine = engine.clone();
                let counter = &counter;
                async move {
                    let started = Instant::now();
                    for _ in 0..iters {
                        round(&engine, sale, counter).await;
                    }
                    started.elapsed()
                }
            })
        });
        runtime.block_on(engine.shutdown());
    }
    group.finish();
}

criterion_group!(benches, group_commit);
criterion_main!(benches);
