//! Can the relay keep up with a sale? Order events published to JetStream per second
//! against durable orders committed with the outbox on, per store, side by side in one
//! run (needs NATS with JetStream, PostgreSQL and MariaDB as the tests do).
//!
//! - `sell/<store>`: durable purchases, 512 in flight, each writing its event to the
//!   outbox in the order's transaction: the rate events enter the outbox.
//! - `relay/<store>/<batch>`: the relay publishing the waiting events in rounds of up to
//!   `batch_max` and removing them: the rate events leave it. 1,024 as shipped, 256 as
//!   the first design had it.
//! - `sell_while_relaying/<store>`: the purchases with the relay running beside them, as
//!   `serve --nats-url` does: the sale's rate with the relay's reads and removals on the
//!   same database. After each sample it prints how many events were still waiting when
//!   the last purchase was answered, and how long the relay took to publish them.
//!
//! `relay ÷ sell` above 1 means the stream keeps up at the peak of a sale; below 1, the
//! outbox (and the stream's lag) grows while the sale lasts.
//!
//! cargo bench -p stampede-relay --bench drain

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use stampede_engine::testing::live_sale;
use stampede_engine::{AckMode, Engine, EngineConfig, Store, SystemClock};
use stampede_relay::{Relay, RelayConfig};
use stampede_store::testing::{Backend, TestDatabase};
use stampede_types::SaleId;

#[path = "../../store/benches/common/mod.rs"]
mod common;

use common::{BUYERS, purchase_stream_on};

/// Orders (and so events) per iteration.
const EVENTS: u64 = 4_096;

fn nats_url() -> String {
    std::env::var("STAMPEDE_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A stream of this run's own.
fn relay_config(backend: Backend) -> RelayConfig {
    let tag = format!("B{}_{}", std::process::id(), backend.name());
    RelayConfig {
        stream: format!("STAMPEDE_BENCH_{tag}"),
        subject_prefix: format!("stampede_bench_{tag}.orders"),
        ..RelayConfig::new(nats_url())
    }
}

struct Setup {
    engine: Arc<Engine>,
    store: Arc<dyn Store>,
    sale: SaleId,
    config: RelayConfig,
    counter: Arc<AtomicU64>,
}

impl Setup {
    async fn open(database: &TestDatabase, dir: &std::path::Path) -> Setup {
        let options = stampede_store::StoreOptions {
            outbox: true,
            ..Default::default()
        };
        let store = database.open_with(dir, &options).await;
        let config = EngineConfig {
            ack: AckMode::Durable,
            ..EngineConfig::default()
        };
        let engine = Arc::new(
            Engine::open(store.clone(), Arc::new(SystemClock), config)
                .await
                .unwrap(),
        );
        let sale = live_sale(&engine, "BENCH", 1_000_000_000, 1_000_000_000, 50, 1_000).await;
        Setup {
            engine,
            store,
            sale,
            config: relay_config(database.backend),
            counter: Arc::new(AtomicU64::new(0)),
        }
    }

    async fn relay(&self, config: RelayConfig) -> Relay {
        Relay::connect(self.store.clone(), config)
            .await
            .unwrap_or_else(|e| panic!("NATS JetStream does not answer at {} ({e})", nats_url()))
    }

    async fn sell(&self, orders: u64) {
        purchase_stream_on(
            std::slice::from_ref(&self.engine),
            self.sale,
            &self.counter,
            BUYERS,
            orders,
        )
        .await;
    }

    /// Publishes until the outbox is empty; answers how many events.
    async fn drain(&self, relay: &Relay) -> u64 {
        relay.publish_all().await.unwrap()
    }

    async fn waiting(&self) -> usize {
        self.store.outbox_read(usize::MAX >> 1).await.unwrap().len()
    }

    async fn close(self) {
        self.engine.shutdown().await;
        let client = async_nats::connect(nats_url()).await.unwrap();
        let _ = async_nats::jetstream::new(client)
            .delete_stream(&self.config.stream)
            .await;
    }
}

fn drain(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("relay_keeps_up");
    group.throughput(Throughput::Elements(EVENTS));
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));
    let mut lags = Vec::new();
    for backend in Backend::ALL {
        let dir = tempfile::tempdir().unwrap();
        let database = runtime.block_on(TestDatabase::create(backend));
        let setup = runtime.block_on(Setup::open(&database, dir.path()));
        let relay = runtime.block_on(setup.relay(setup.config.clone()));
        let name = backend.name();

        group.bench_function(format!("sell/{name}"), |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let (setup, relay) = (&setup, &relay);
                async move {
                    let started = Instant::now();
                    setup.sell(iters * EVENTS).await;
                    let elapsed = started.elapsed();
                    setup.drain(relay).await;
                    elapsed
                }
            })
        });

        // The relay as shipped (rounds of up to 1,024) against the first design's rounds
        // of 256.
        for (variant, batch_max) in [("1024", 1_024), ("256", 256)] {
            let config = RelayConfig {
                batch_max,
                ..setup.config.clone()
            };
            let relay = runtime.block_on(setup.relay(config));
            group.bench_function(format!("relay/{name}/{variant}"), |b| {
                b.to_async(&runtime).iter_custom(|iters| {
                    let (setup, relay) = (&setup, &relay);
                    async move {
                        setup.sell(iters * EVENTS).await;
                        let started = Instant::now();
                        let published = setup.drain(relay).await;
                        let elapsed = started.elapsed();
                        assert_eq!(published, iters * EVENTS, "every event published");
                        elapsed
                    }
                })
            });
        }

        let waiting_after = std::sync::Mutex::new(Vec::new());
        group.bench_function(format!("sell_while_relaying/{name}"), |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let setup = &setup;
                let waiting_after = &waiting_after;
                async move {
                    let relay = setup.relay(setup.config.clone()).await;
                    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                    let running = tokio::spawn(relay.run(async move {
                        let _ = stopped.await;
                    }));
                    let started = Instant::now();
                    setup.sell(iters * EVENTS).await;
                    let elapsed = started.elapsed();
                    let caught_up = Instant::now();
                    let waiting = setup.waiting().await;
                    while !setup.store.outbox_read(1).await.unwrap().is_empty() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    let per_1000 = waiting as f64 * 1_000.0 / (iters * EVENTS) as f64;
                    waiting_after
                        .lock()
                        .unwrap()
                        .push((per_1000, caught_up.elapsed()));
                    stop.send(()).unwrap();
                    running.await.unwrap();
                    elapsed
                }
            })
        });
        lags.push((name, waiting_after.into_inner().unwrap()));
        runtime.block_on(setup.close());
        drop(relay);
    }
    group.finish();

    println!("\nevents still in the outbox when the last purchase was answered, relay running:");
    for (name, samples) in lags {
        let n = samples.len().max(1) as f64;
        let per_1000 = samples.iter().map(|s| s.0).sum::<f64>() / n;
        let worst = samples.iter().map(|s| s.0).fold(0.0, f64::max);
        let catch_up = samples.iter().map(|s| s.1.as_secs_f64()).sum::<f64>() / n;
        println!(
            "  {name:<9} {per_1000:>7.1} per 1,000 orders (worst {worst:.1}), published {:.0} ms later on average",
            catch_up * 1_000.0
        );
    }
}

criterion_group!(benches, drain);
criterion_main!(benches);
