//! Readiness asks the store at most about once a second, one ping at a time, however
//! many probes arrive; a ping that fails or hangs makes the node not ready, and a store
//! that answers again makes it ready again. Audits that take long to count never hold
//! the writer up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use stampede_engine::testing::live_sale;
use stampede_engine::{AUDITS_AT_ONCE, Engine, EngineConfig, OrderError, StoreError, SystemClock};
use stampede_store::on_every_backend;
use stampede_store::testing::{Backend, Call, Intercepted, Interceptor, TestDatabase};
use stampede_types::{IdempotencyKey, Quantity, UserId};

/// Counts the pings that reach the store; `down` fails them, `hang` holds them.
#[derive(Default)]
struct Pings {
    seen: AtomicU32,
    down: AtomicBool,
    hang: AtomicBool,
}

#[async_trait]
impl Interceptor for Pings {
    async fn before(&self, call: Call<'_>) -> Result<(), StoreError> {
        if matches!(call, Call::Ping) {
            self.seen.fetch_add(1, Ordering::SeqCst);
            if self.hang.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("database down (injected)".into()));
            }
        }
        Ok(())
    }
}

/// An engine, with its default configuration, over `inner` with `hooks` around it.
async fn engine_over<I: Interceptor>(
    inner: Arc<dyn stampede_engine::Store>,
    hooks: I,
) -> (Arc<Intercepted<I>>, Arc<Engine>) {
    let store = Arc::new(Intercepted { inner, hooks });
    let engine = Engine::open(
        store.clone(),
        Arc::new(SystemClock),
        EngineConfig::default(),
    )
    .await
    .unwrap();
    (store, Arc::new(engine))
}

/// Waits until `engine.ready()` says `want`, asking every 50 ms, for at most `within`.
async fn until_ready_is(engine: &Engine, want: bool, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if engine.ready().await == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "ready() never became {want} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_probes_pings_the_store_once_a_second_and_follows_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let inner = stampede_store::SqliteStore::open(&dir.path().join("r.db"))
        .await
        .unwrap()
        .into_arc();
    let (store, engine) = engine_over(inner, Pings::default()).await;

    // 2,000 probes at once: all ready, from one ping.
    let probes: Vec<_> = (0..2_000)
        .map(|_| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.ready().await })
        })
        .collect();
    for probe in probes {
        assert!(probe.await.unwrap());
    }
    assert_eq!(
        store.hooks.seen.load(Ordering::SeqCst),
        1,
        "one ping for the flood"
    );

    // Probes for 1.5 s, every millisecond: two or three pings, not 1,500.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1_500) {
        assert!(engine.ready().await);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let pings = store.hooks.seen.load(Ordering::SeqCst);
    assert!((2..=3).contains(&pings), "{pings} pings in 1.5 s of probes");

    // The database goes away: not ready within a ping's freshness.
    store.hooks.down.store(true, Ordering::SeqCst);
    let took = until_ready_is(&engine, false, Duration::from_secs(3)).await;
    // Bounded by the answer's freshness (1 s), not the ping's timeout (2 s).
    assert!(
        took < Duration::from_millis(1_900),
        "noticed after {took:?}"
    );
    // And back.
    store.hooks.down.store(false, Ordering::SeqCst);
    until_ready_is(&engine, true, Duration::from_secs(3)).await;

    // A database that accepts the ping and never answers: the probe is not held past
    // the ping's timeout, and the probes meanwhile answer at once from the last ping.
    store.hooks.hang.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let seen = store.hooks.seen.load(Ordering::SeqCst);
    let pinging = {
        let engine = engine.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            (engine.ready().await, start.elapsed())
        })
    };
    until_pinged(&store.hooks, seen + 1).await;
    let start = Instant::now();
    assert!(
        engine.ready().await,
        "the last answer stands while a ping is out"
    );
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "a probe waited {:?} behind the hung ping",
        start.elapsed()
    );
    let (ready, took) = pinging.await.unwrap();
    assert!(!ready, "a ping that never comes back is not ready");
    assert!(
        took >= Duration::from_millis(1_900) && took < Duration::from_secs(4),
        "the hung ping was given up after {took:?}"
    );
    assert!(!engine.ready().await);
    store.hooks.hang.store(false, Ordering::SeqCst);
    until_ready_is(&engine, true, Duration::from_secs(3)).await;

    // The same, with the probe that starts the ping giving up first, as a kubelet's
    // does after its own timeout (1 s by default): the ping still ends and is recorded,
    // so the node turns not ready for every prober, without another ping.
    store.hooks.hang.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let seen = store.hooks.seen.load(Ordering::SeqCst);
    let start = Instant::now();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), engine.ready())
            .await
            .is_err(),
        "the probe gave up while its ping hung"
    );
    until_ready_is(&engine, false, Duration::from_secs(4)).await;
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1_900),
        "not ready after {took:?}, before the ping's timeout"
    );
    assert_eq!(
        store.hooks.seen.load(Ordering::SeqCst),
        seen + 1,
        "the abandoned ping's answer was recorded, not asked again"
    );
    store.hooks.hang.store(false, Ordering::SeqCst);
    until_ready_is(&engine, true, Duration::from_secs(3)).await;
}

/// Waits until the store has seen `pings` pings.
async fn until_pinged(hooks: &Pings, pings: u32) {
    let start = Instant::now();
    while hooks.seen.load(Ordering::SeqCst) < pings {
        assert!(start.elapsed() < Duration::from_secs(3), "no ping came");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Holds every audit's count, its snapshot's connection taken, until `done` is set: a
/// count over a sale of millions of orders.
struct SlowCounts {
    done: tokio::sync::watch::Sender<bool>,
}

impl Interceptor for SlowCounts {
    fn before_count(&self) -> Option<futures::future::BoxFuture<'static, ()>> {
        let mut done = self.done.subscribe();
        Some(Box::pin(async move {
            let _ = done.wait_for(|done| *done).await;
        }))
    }
}

on_every_backend!(audits_that_count_long_never_hold_the_writer_up);

/// The writer pins each audit's snapshot between its batches, on a connection kept for
/// audits, and at most `AUDITS_AT_ONCE` count at once: one more is refused at once, and
/// purchases commit while the counts go on. Before, a dozen audits took every reader
/// connection, and the writer waited for one to pin the next audit's snapshot (up to
/// the pool's 30 s), every commit behind it.
async fn audits_that_count_long_never_hold_the_writer_up(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let database = TestDatabase::create(backend).await;
    let slow = SlowCounts {
        done: tokio::sync::watch::channel(false).0,
    };
    let (store, engine) = engine_over(database.open(dir.path()).await, slow).await;
    let sale = live_sale(&engine, "AUDITED", 10, 10, 100, 10).await;
    let audits: Vec<_> = (0..12)
        .map(|_| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.audit(sale).await })
        })
        .collect();
    // Those past the bound are answered at once, while the others count.
    let others = audits.len() - AUDITS_AT_ONCE as usize;
    let start = Instant::now();
    while audits.iter().filter(|audit| audit.is_finished()).count() < others {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the audits past the bound were not answered while the others counted"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let buyer = UserId::parse("buyer").unwrap();
    let key = IdempotencyKey::parse("k").unwrap();
    let quantity = Quantity::parse(1).unwrap();
    let bought = tokio::time::timeout(
        Duration::from_secs(10),
        engine.purchase(buyer, key, sale, quantity),
    )
    .await
    .expect("a purchase waited behind the audits' counts");
    assert!(bought.is_ok(), "{bought:?}");
    store.hooks.done.send_replace(true);
    let mut done = 0;
    for audit in audits {
        match audit.await.unwrap() {
            Ok(Some(audit)) => {
                assert!(audit.consistent, "{audit:?}");
                done += 1;
            }
            Err(OrderError::AuditsBusy) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(done, AUDITS_AT_ONCE, "the audits let in all counted");
    // Their places given back: the next audit counts.
    let audit = engine.audit(sale).await.unwrap().unwrap();
    assert!(audit.consistent, "{audit:?}");
    assert_eq!(audit.tally.pending_payment, 1, "{audit:?}");
}
