//! Durable orders per second through the group-commit writer, against the same writer
//! forced to commit (and fsync) every order on its own. Same engine, same SQLite file
//! settings (WAL, synchronous=FULL), same 512 concurrent buyers; only `batch_size_max`
//! differs. The ratio is what group commit buys.
//!
//! cargo bench -p stampede-store --bench writer

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use stampede_engine::testing::live_sale;
use stampede_engine::{AckMode, Engine, EngineConfig};
use stampede_types::SaleId;

mod common;

use common::{BUYERS, purchase_round_on};

async fn setup(dir: &std::path::Path, batch_size_max: usize) -> (Arc<Engine>, SaleId) {
    let config = EngineConfig {
        batch_size_max,
        ack: AckMode::Durable,
        ..EngineConfig::default()
    };
    let engine = stampede_store::testing::sqlite_engine(&dir.join("bench.db"), config).await;
    let sale = live_sale(&engine, "BENCH", 1_000_000_000, 1_000_000_000, 50, 1_000).await;
    (Arc::new(engine), sale)
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
                        purchase_round_on(std::slice::from_ref(&engine), sale, counter, BUYERS)
                            .await;
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
