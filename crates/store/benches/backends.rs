//! Durable purchases per second on each store, side by side in one run, against the
//! design Stampede replaces: a row lock per purchase (`UPDATE … SET remaining =
//! remaining - 1 WHERE remaining >= 1`, then the order, in one transaction).
//!
//! Every variant answers a buyer only once the order is committed, and every variant
//! has the same 512 concurrent buyers. Stampede's variants go through the engine and
//! its group-commit writer; a counting wrapper around the store records how many
//! batches (and so round trips) the database saw per 1,000 orders.
//!
//! `stampede_*_outbox` is the same with the transactional outbox on (what `--nats-url`
//! turns on): every order also writes its event row in the same transaction.
//!
//! `stampede_*_cluster` is two nodes (two engines with their own connections) writing one
//! database as a cluster, the buyers split between them: each node sells from stock it
//! leased, each batch also updates the shoppers' holdings and the node's lease.
//!
//! `stampede_postgres_redis_gate` is Stampede with `stock_gate = "redis"`: the same engine,
//! writer and PostgreSQL store, but each purchase takes its stock with the Lua script in
//! Redis instead of in memory (the conventional gate, selectable by flag).
//!
//! `durable_purchases_peak` runs the server stores again under constant pressure:
//! `PEAK_BUYERS` buyers each placing their next purchase as soon as the last is answered
//! (the other groups fire rounds of 512 that drain before the next), with `PEAK_BATCH` as
//! the writer's batch bound, as at the peak of a sale: batches fill up, and the round
//! trips per 1,000 orders fall to what a batch costs over its size.
//!
//! `redis_lua_then_postgres` is the conventional design: a Lua script in Redis checks and
//! takes the stock and the shopper's count, then the order is inserted (and committed)
//! in PostgreSQL before the answer — two round trips (one to each server) per order.
//!
//! Needs the PostgreSQL and MariaDB servers the tests use (see `stampede_store::testing`)
//! and Redis (`STAMPEDE_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`).
//!
//! cargo bench -p stampede-store --bench backends

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sqlx::Connection;
use stampede_engine::testing::live_sale;
use stampede_engine::{AckMode, Engine, EngineConfig, StoreError, SystemClock, WriteOp};
use stampede_store::testing::{Backend, Call, Intercepted, Interceptor, TestDatabase};
use stampede_types::SaleId;

mod common;

use common::{BUYERS, purchase_round_on, purchase_stream_on};

/// Purchases in flight in the peak group, and the writer's batch bound there.
const PEAK_BUYERS: u64 = 8_192;
const PEAK_BATCH: usize = 4_096;

/// Connections of the row-lock design's pool (each buyer needs one for its transaction).
const ROW_LOCK_CONNECTIONS: u32 = 32;

/// Counts the database round trips of each batch. On a server: BEGIN, the owner stamp,
/// one INSERT for all the orders (UNNEST / JSON_TABLE), other statements one each,
/// COMMIT. SQLite has no stamp and inserts in chunks of 256/64/16/4/1 rows (in-process
/// calls, not network round trips).
struct Counting {
    /// The store also writes the outbox: one more INSERT per 1,024 events.
    outbox: bool,
    sqlite: bool,
    /// A cluster node: each batch also upserts the shoppers' holdings (one statement per
    /// 1,024 shoppers) and updates the node's lease (one per sale); leases, heartbeats,
    /// reclaim checks and catalogue reads are counted too.
    cluster: bool,
    orders: AtomicU64,
    round_trips: AtomicU64,
}

#[async_trait]
impl Interceptor for Counting {
    async fn before(&self, call: Call<'_>) -> Result<(), StoreError> {
        let round_trips = match call {
            Call::Commit(ops) => self.commit_round_trips(ops),
            Call::Lease => 7,
            Call::Release => 5,
            Call::Heartbeat | Call::Reclaim => 1,
            Call::Catalog => 2,
            _ => 0,
        };
        self.round_trips.fetch_add(round_trips, Ordering::Relaxed);
        Ok(())
    }
}

impl Counting {
    fn commit_round_trips(&self, ops: &[WriteOp]) -> u64 {
        let n_orders = ops
            .iter()
            .filter(|op| matches!(op, WriteOp::InsertOrder(_)))
            .count() as u64;
        let others = ops.len() as u64 - n_orders;
        self.orders.fetch_add(n_orders, Ordering::Relaxed);
        let cluster = if self.cluster {
            let mut shoppers = std::collections::HashSet::new();
            let mut sales = std::collections::HashSet::new();
            for op in ops {
                if let WriteOp::InsertOrder(order) = op {
                    shoppers.insert((order.sale_id, order.user_id.clone()));
                    sales.insert(order.sale_id);
                }
            }
            (shoppers.len() as u64).div_ceil(1_024) + sales.len() as u64
        } else {
            0
        };
        let (frame, inserts) = if self.sqlite {
            // BEGIN and COMMIT; greedy chunks of the fixed shapes.
            let mut left = n_orders;
            let mut chunks = 0;
            for rows in [256, 64, 16, 4, 1] {
                chunks += left / rows;
                left %= rows;
            }
            (2, chunks)
        } else {
            (3, u64::from(n_orders > 0))
        };
        let outbox = if self.outbox {
            n_orders.div_ceil(1_024)
        } else {
            0
        };
        frame + inserts + outbox + others + cluster
    }
}

async fn engine_on(
    database: &TestDatabase,
    dir: &std::path::Path,
    outbox: bool,
) -> (Arc<Engine>, SaleId, Arc<Intercepted<Counting>>) {
    let (engine, counting) = open_node(database, dir, outbox, false, 1_024).await;
    let sale = live_sale(&engine, "BENCH", 1_000_000_000, 1_000_000_000, 50, 1_000).await;
    (engine, sale, counting)
}

async fn open_node(
    database: &TestDatabase,
    dir: &std::path::Path,
    outbox: bool,
    cluster: bool,
    batch_size_max: usize,
) -> (Arc<Engine>, Arc<Intercepted<Counting>>) {
    let options = stampede_store::StoreOptions {
        outbox,
        cluster_node_ttl: cluster.then_some(Duration::from_secs(5)),
        ..Default::default()
    };
    let counting = Arc::new(Intercepted {
        inner: database.open_with(dir, &options).await,
        hooks: Counting {
            outbox,
            sqlite: database.backend == Backend::Sqlite,
            cluster,
            orders: AtomicU64::new(0),
            round_trips: AtomicU64::new(0),
        },
    });
    let config = EngineConfig {
        ack: AckMode::Durable,
        batch_size_max,
        ..EngineConfig::default()
    };
    let engine = Engine::open(counting.clone(), Arc::new(SystemClock), config)
        .await
        .unwrap();
    (Arc::new(engine), counting)
}

/// Two cluster nodes on one database and a sale both know of.
/// One engine on `database` taking its stock in Redis, and a sale.
async fn redis_gate_on(
    database: &TestDatabase,
    dir: &std::path::Path,
) -> (Vec<Arc<Engine>>, SaleId, Vec<Arc<Intercepted<Counting>>>) {
    let redis_url = std::env::var("STAMPEDE_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let counting = Arc::new(Intercepted {
        inner: database.open(dir).await,
        hooks: Counting {
            outbox: false,
            sqlite: database.backend == Backend::Sqlite,
            cluster: false,
            orders: AtomicU64::new(0),
            round_trips: AtomicU64::new(0),
        },
    });
    let gate = stampede_store::RedisGate::connect(
        &redis_url,
        &format!("stampede-bench:{}", std::process::id()),
    )
    .await
    .unwrap_or_else(|e| panic!("Redis does not answer at {redis_url} ({e})"));
    let engine = Engine::open_with_gate(
        counting.clone(),
        Arc::new(SystemClock),
        EngineConfig::default(),
        Some(Arc::new(gate)),
    )
    .await
    .unwrap();
    let engine = Arc::new(engine);
    let sale = live_sale(&engine, "BENCH", 1_000_000_000, 1_000_000_000, 50, 1_000).await;
    (vec![engine], sale, vec![counting])
}

/// `nodes` engines on one database (a cluster when more than one) and a sale all of them
/// know of.
async fn cluster_on(
    database: &TestDatabase,
    dir: &std::path::Path,
    nodes: usize,
    batch_size_max: usize,
) -> (Vec<Arc<Engine>>, SaleId, Vec<Arc<Intercepted<Counting>>>) {
    let mut engines = Vec::new();
    let mut countings = Vec::new();
    for _ in 0..nodes {
        let (engine, counting) = open_node(database, dir, false, nodes > 1, batch_size_max).await;
        engines.push(engine);
        countings.push(counting);
    }
    let sale = live_sale(
        &engines[0],
        "BENCH",
        1_000_000_000,
        1_000_000_000,
        50,
        1_000,
    )
    .await;
    for engine in &engines[1..] {
        while engine.sale(sale).is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    (engines, sale, countings)
}

/// Benchmarks `$engines` as `$name`: each sample runs `$body` with `$nodes` (the
/// engines), `$counter` (numbers every purchase, so every key is new) and `$iters`
/// bound. Then stops the engines and records the round trips per 1,000 orders.
macro_rules! nodes_bench {
    (
        $group:expr, $runtime:expr, $name:expr, $engines:expr, $countings:expr, $round_trips:expr,
        |$nodes:ident, $counter:ident, $iters:ident| $body:expr
    ) => {{
        let engines: Vec<Arc<Engine>> = $engines;
        let countings: Vec<Arc<Intercepted<Counting>>> = $countings;
        let counter = Arc::new(AtomicU64::new(0));
        $group.bench_function(&$name, |b| {
            b.to_async(&$runtime).iter_custom(|$iters| {
                let ($nodes, $counter) = (engines.clone(), counter.clone());
                async move {
                    let started = Instant::now();
                    $body;
                    started.elapsed()
                }
            })
        });
        for engine in &engines {
            $runtime.block_on(engine.shutdown());
        }
        let orders: u64 = countings
            .iter()
            .map(|c| c.hooks.orders.load(Ordering::Relaxed))
            .sum();
        let trips: u64 = countings
            .iter()
            .map(|c| c.hooks.round_trips.load(Ordering::Relaxed))
            .sum();
        $round_trips.push(($name, trips as f64 * 1_000.0 / orders.max(1) as f64));
        $runtime.block_on(async { tokio::time::sleep(Duration::from_millis(200)).await });
    }};
}

/// `nodes_bench!` in rounds of `BUYERS` that drain before the next.
macro_rules! rounds_bench {
    ($group:expr, $runtime:expr, $name:expr, $engines:expr, $sale:expr, $countings:expr, $round_trips:expr) => {
        nodes_bench!(
            $group,
            $runtime,
            $name,
            $engines,
            $countings,
            $round_trips,
            |nodes, counter, iters| for _ in 0..iters {
                purchase_round_on(&nodes, $sale, &counter, BUYERS).await;
            }
        )
    };
}

const ROW_LOCK_SCHEMA: [&str; 3] = [
    "CREATE TABLE rl_sales (id INTEGER PRIMARY KEY, remaining BIGINT NOT NULL)",
    "CREATE TABLE rl_orders (id VARCHAR(64) PRIMARY KEY, user_id VARCHAR(128) NOT NULL, \
     sale_id INTEGER NOT NULL, quantity BIGINT NOT NULL, created_at_ms BIGINT NOT NULL)",
    "INSERT INTO rl_sales (id, remaining) VALUES (1, 1000000000)",
];

/// The conventional database-only design, one purchase = one transaction holding the
/// sale's row lock from its UPDATE to its COMMIT (four round trips).
macro_rules! row_lock_round {
    ($pool:expr, $counter:expr, $take:literal, $insert:literal) => {{
        let handles: Vec<_> = (0..BUYERS)
            .map(|_| {
                let n = $counter.fetch_add(1, Ordering::Relaxed);
                let pool = $pool.clone();
                tokio::spawn(async move {
                    let mut tx = pool.begin().await.unwrap();
                    let taken = sqlx::query($take).execute(&mut *tx).await.unwrap();
                    assert_eq!(taken.rows_affected(), 1, "stock left");
                    sqlx::query($insert)
                        .bind(format!("ord-{n}"))
                        .bind(format!("u{}", n % 100_000))
                        .bind(n as i64)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    tx.commit().await.unwrap();
                })
            })
            .collect();
        for handle in handles {
            handle.await.unwrap();
        }
    }};
}

/// Sets up the row-lock schema on `$url`, then benchmarks `row_lock_round!` on a pool.
macro_rules! row_lock_bench {
    ($group:expr, $runtime:expr, $name:expr, $counter:expr, $url:expr, $conn:ty, $pool_options:ty, $insert:literal) => {{
        let pool = $runtime.block_on(async {
            let mut setup = <$conn>::connect(&$url).await.unwrap();
            for statement in ROW_LOCK_SCHEMA {
                sqlx::query(statement).execute(&mut setup).await.unwrap();
            }
            <$pool_options>::new()
                .max_connections(ROW_LOCK_CONNECTIONS)
                .connect(&$url)
                .await
                .unwrap()
        });
        $group.bench_function(&$name, |b| {
            b.to_async(&$runtime).iter_custom(|iters| {
                let (pool, counter) = (pool.clone(), &$counter);
                async move {
                    let started = Instant::now();
                    for _ in 0..iters {
                        row_lock_round!(
                            pool,
                            counter,
                            "UPDATE rl_sales SET remaining = remaining - 1 WHERE id = 1 AND remaining >= 1",
                            $insert
                        );
                    }
                    started.elapsed()
                }
            })
        });
        $runtime.block_on(pool.close());
    }};
}

fn backends(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("durable_purchases");
    group.throughput(Throughput::Elements(BUYERS));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));

    let mut round_trips = Vec::new();
    // Each store without and with the outbox (order events for the NATS relay).
    let variants = Backend::ALL
        .into_iter()
        .flat_map(|backend| [(backend, false), (backend, true)]);
    for (backend, outbox) in variants {
        let name = format!(
            "stampede_{}{}",
            backend.name(),
            if outbox { "_outbox" } else { "" }
        );
        let dir = tempfile::tempdir().unwrap();
        let database = runtime.block_on(TestDatabase::create(backend));
        let (engine, sale, counting) = runtime.block_on(engine_on(&database, dir.path(), outbox));
        rounds_bench!(
            group,
            runtime,
            name,
            vec![engine],
            sale,
            vec![counting],
            round_trips
        );
    }

    // Two nodes leasing the stock of one database.
    for backend in [Backend::Postgres, Backend::MySql] {
        let name = format!("stampede_{}_cluster", backend.name());
        let dir = tempfile::tempdir().unwrap();
        let database = runtime.block_on(TestDatabase::create(backend));
        let (engines, sale, countings) =
            runtime.block_on(cluster_on(&database, dir.path(), 2, 1_024));
        rounds_bench!(group, runtime, name, engines, sale, countings, round_trips);
    }

    // Stampede with the conventional Redis + Lua gate in front of the same writer.
    {
        let name = "stampede_postgres_redis_gate".to_owned();
        let dir = tempfile::tempdir().unwrap();
        let database = runtime.block_on(TestDatabase::create(Backend::Postgres));
        let (engines, sale, countings) = runtime.block_on(redis_gate_on(&database, dir.path()));
        rounds_bench!(group, runtime, name, engines, sale, countings, round_trips);
    }

    // The row-lock design on the same servers.
    for backend in [Backend::Postgres, Backend::MySql] {
        let database = runtime.block_on(TestDatabase::create(backend));
        let url = database.url.clone().unwrap();
        let counter = AtomicU64::new(0);
        let name = format!("row_lock_{}", backend.name());
        match backend {
            Backend::Postgres => row_lock_bench!(
                group,
                runtime,
                name,
                counter,
                url,
                sqlx::PgConnection,
                sqlx::postgres::PgPoolOptions,
                "INSERT INTO rl_orders (id, user_id, sale_id, quantity, created_at_ms) VALUES ($1, $2, 1, 1, $3)"
            ),
            Backend::MySql => row_lock_bench!(
                group,
                runtime,
                name,
                counter,
                url,
                sqlx::MySqlConnection,
                sqlx::mysql::MySqlPoolOptions,
                "INSERT INTO rl_orders (id, user_id, sale_id, quantity, created_at_ms) VALUES (?, ?, 1, 1, ?)"
            ),
            Backend::Sqlite => unreachable!(),
        }
        round_trips.push((name, 4_000.0));
    }
    // The conventional flash-sale design: stock and per-shopper counts checked and taken
    // by a Lua script in Redis, then the order written to PostgreSQL (its durable log),
    // answered after that commit. No hot row, but two round trips and one commit per
    // order, and Redis and the database can drift (a crash between the two).
    {
        let database = runtime.block_on(TestDatabase::create(Backend::Postgres));
        let url = database.url.clone().unwrap();
        let redis_url = std::env::var("STAMPEDE_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let stock_key = format!("stampede:bench:{}:stock", std::process::id());
        let held_key = format!("stampede:bench:{}:held", std::process::id());
        let (pool, redis) = runtime.block_on(async {
            let mut setup = sqlx::PgConnection::connect(&url).await.unwrap();
            for statement in ROW_LOCK_SCHEMA {
                sqlx::query(statement).execute(&mut setup).await.unwrap();
            }
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(ROW_LOCK_CONNECTIONS)
                .connect(&url)
                .await
                .unwrap();
            let client = redis::Client::open(redis_url.as_str()).unwrap();
            let mut redis = client
                .get_multiplexed_async_connection()
                .await
                .unwrap_or_else(|e| panic!("Redis does not answer at {redis_url} ({e})"));
            let _: () = redis::cmd("SET")
                .arg(&stock_key)
                .arg(1_000_000_000u64)
                .query_async(&mut redis)
                .await
                .unwrap();
            let _: () = redis::cmd("DEL")
                .arg(&held_key)
                .query_async(&mut redis)
                .await
                .unwrap();
            (pool, redis)
        });
        let take = Arc::new(redis::Script::new(
            r"local left = tonumber(redis.call('GET', KEYS[1]))
              local n = tonumber(ARGV[2])
              local held = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
              if left < n then return -1 end
              if held + n > tonumber(ARGV[3]) then return -2 end
              redis.call('DECRBY', KEYS[1], n)
              redis.call('HINCRBY', KEYS[2], ARGV[1], n)
              return left - n",
        ));
        let counter = AtomicU64::new(0);
        group.bench_function("redis_lua_then_postgres", |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let (pool, redis, take, counter) = (pool.clone(), redis.clone(), take.clone(), &counter);
                let (stock_key, held_key) = (stock_key.clone(), held_key.clone());
                async move {
                    let started = Instant::now();
                    for _ in 0..iters {
                        let handles: Vec<_> = (0..BUYERS)
                            .map(|_| {
                                let n = counter.fetch_add(1, Ordering::Relaxed);
                                let (pool, mut redis, take) = (pool.clone(), redis.clone(), take.clone());
                                let (stock_key, held_key) = (stock_key.clone(), held_key.clone());
                                tokio::spawn(async move {
                                    let user = format!("u{}", n % 100_000);
                                    let left: i64 = take
                                        .key(&stock_key)
                                        .key(&held_key)
                                        .arg(&user)
                                        .arg(1)
                                        .arg(1_000)
                                        .invoke_async(&mut redis)
                                        .await
                                        .unwrap();
                                    assert!(left >= 0, "stock left and under the limit");
                                    sqlx::query(
                                        "INSERT INTO rl_orders (id, user_id, sale_id, quantity, created_at_ms) VALUES ($1, $2, 1, 1, $3)",
                                    )
                                    .bind(format!("ord-{n}"))
                                    .bind(user)
                                    .bind(n as i64)
                                    .execute(&pool)
                                    .await
                                    .unwrap();
                                })
                            })
                            .collect();
                        for handle in handles {
                            handle.await.unwrap();
                        }
                    }
                    started.elapsed()
                }
            })
        });
        runtime.block_on(async {
            let mut redis = redis.clone();
            let _: () = redis::cmd("DEL")
                .arg(&stock_key)
                .arg(&held_key)
                .query_async(&mut redis)
                .await
                .unwrap();
            pool.close().await;
        });
        round_trips.push(("redis_lua_then_postgres".into(), 2_000.0));
    }
    group.finish();

    // The peak: many more buyers in flight, larger batches allowed.
    let mut peak = c.benchmark_group("durable_purchases_peak");
    peak.throughput(Throughput::Elements(PEAK_BUYERS));
    peak.sample_size(10);
    peak.measurement_time(Duration::from_secs(10));
    for (backend, nodes) in [
        (Backend::Postgres, 1),
        (Backend::Postgres, 2),
        (Backend::MySql, 1),
        (Backend::MySql, 2),
    ] {
        let name = format!(
            "peak_{}{}",
            backend.name(),
            if nodes > 1 { "_cluster" } else { "" }
        );
        let dir = tempfile::tempdir().unwrap();
        let database = runtime.block_on(TestDatabase::create(backend));
        let (engines, sale, countings) =
            runtime.block_on(cluster_on(&database, dir.path(), nodes, PEAK_BATCH));
        // Constant pressure: every buyer comes back as soon as it is answered.
        nodes_bench!(
            peak,
            runtime,
            name,
            engines,
            countings,
            round_trips,
            |nodes, counter, iters| purchase_stream_on(
                &nodes,
                sale,
                &counter,
                PEAK_BUYERS,
                iters * PEAK_BUYERS
            )
            .await
        );
    }
    peak.finish();

    println!("\ndatabase round trips per 1,000 durable orders:");
    for (name, per_1000) in round_trips {
        println!("  {name:<22} {per_1000:>8.1}");
    }
}

criterion_group!(benches, backends);
criterion_main!(benches);
