//! The relay against a real NATS JetStream server (`STAMPEDE_TEST_NATS_URL`, default
//! `nats://127.0.0.1:4222`) and the real SQLite store with its outbox: every committed
//! order event reaches the stream once, in commit order per order, even when the relay
//! dies between JetStream's acknowledgement and the outbox clean-up, and (against the
//! PostgreSQL and MariaDB servers) when another node's event with a lower sequence
//! number commits while a round is in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use stampede_engine::testing::live_sale;
use stampede_engine::{Actor, Engine, EngineConfig, Store, StoreError, SystemClock};
use stampede_relay::{Relay, RelayConfig};
use stampede_store::testing::{Backend, Call, Intercepted, Interceptor, TestDatabase};
use stampede_types::{IdempotencyKey, OrderId, Quantity, SaleId, UserId};

fn nats_url() -> String {
    std::env::var("STAMPEDE_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A stream and subject prefix of this test's own.
fn test_config() -> RelayConfig {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let tag = format!("T{}_{nanos}", std::process::id());
    RelayConfig {
        stream: format!("STAMPEDE_{tag}"),
        subject_prefix: format!("stampede_{tag}.orders"),
        ..RelayConfig::new(nats_url())
    }
}

fn with_outbox() -> stampede_store::StoreOptions {
    stampede_store::StoreOptions {
        outbox: true,
        ..Default::default()
    }
}

/// The embedded store with its outbox, in `dir`.
async fn sqlite_outbox(dir: &std::path::Path) -> Arc<dyn Store> {
    stampede_store::open(None, dir, &with_outbox())
        .await
        .unwrap()
}

/// An engine on `store` and a live sale of 10 units (5 a shopper).
async fn engine_with_sale(store: Arc<dyn Store>, sku: &str) -> (Engine, SaleId) {
    let engine = Engine::open(store, Arc::new(SystemClock), EngineConfig::default())
        .await
        .unwrap();
    let sale = live_sale(&engine, sku, 10, 10, 100, 5).await;
    (engine, sale)
}

/// One unit of `sale` bought by `user`; the order's id.
async fn buy(engine: &Engine, sale: SaleId, user: &str) -> OrderId {
    engine
        .purchase(
            UserId::parse(user).unwrap(),
            IdempotencyKey::parse("k").unwrap(),
            sale,
            Quantity::parse(1).unwrap(),
        )
        .await
        .unwrap()
        .placed
        .order_id
}

/// The stream's messages as (order id, event), in stream order, each on its event's
/// subject; deletes the stream.
async fn stored(config: &RelayConfig) -> Vec<(String, String)> {
    let client = async_nats::connect(nats_url()).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    let mut stream = jetstream.get_stream(&config.stream).await.unwrap();
    let n = stream.info().await.unwrap().state.messages;
    let mut seen = Vec::new();
    for sequence in 1..=n {
        let message = stream.get_raw_message(sequence).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        let event = body["event"].as_str().unwrap().to_owned();
        assert_eq!(
            message.subject.as_str(),
            format!("{}.{event}", config.subject_prefix)
        );
        seen.push((body["order_id"].as_str().unwrap().to_owned(), event));
    }
    jetstream.delete_stream(&config.stream).await.unwrap();
    seen
}

/// Fails the calls `picks` chooses while `armed` (only the first one with `once`).
struct Fails {
    picks: fn(&Call<'_>) -> bool,
    armed: AtomicBool,
    once: bool,
}

#[async_trait]
impl Interceptor for Fails {
    async fn before(&self, call: Call<'_>) -> Result<(), StoreError> {
        if !(self.picks)(&call) {
            return Ok(());
        }
        let armed = if self.once {
            self.armed.swap(false, Ordering::SeqCst)
        } else {
            self.armed.load(Ordering::SeqCst)
        };
        if armed {
            return Err(StoreError::Unavailable("injected".into()));
        }
        Ok(())
    }
}

/// The embedded store with its outbox in `dir`, failing the calls `picks` chooses
/// (armed from the start; only the first with `once`).
async fn sqlite_outbox_failing(
    dir: &std::path::Path,
    picks: fn(&Call<'_>) -> bool,
    once: bool,
) -> Arc<Intercepted<Fails>> {
    Arc::new(Intercepted {
        inner: sqlite_outbox(dir).await,
        hooks: Fails {
            picks,
            armed: AtomicBool::new(true),
            once,
        },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_reaches_the_stream_once_in_order_even_after_a_crash_before_removal() {
    let dir = tempfile::tempdir().unwrap();
    // `outbox_remove` fails once: a relay killed after JetStream acknowledged a round
    // but before it removed the round from the outbox.
    let store =
        sqlite_outbox_failing(dir.path(), |call| matches!(call, Call::OutboxRemove), true).await;
    let (engine, sale) = engine_with_sale(store.clone(), "EV-1").await;
    let mut order_ids = Vec::new();
    for user in ["ann", "bob", "cyd"] {
        order_ids.push(buy(&engine, sale, user).await);
    }
    // bob's order is cancelled: created and cancelled are both in the outbox, in order.
    engine.cancel(&Actor::Admin, order_ids[1]).await.unwrap();

    let config = test_config();
    let relay = Relay::connect(store.clone(), config.clone()).await.unwrap_or_else(|e| {
        panic!("NATS JetStream does not answer at {} ({e}); start it or set STAMPEDE_TEST_NATS_URL", nats_url())
    });
    // The first round is acknowledged by JetStream, then the relay "dies".
    assert!(
        relay.publish_round().await.is_err(),
        "removal was made to fail"
    );
    // A new relay resumes from the outbox: it publishes the same round again (JetStream
    // drops the repeats by message id), then the rest.
    let relay = Relay::connect(store.clone(), config.clone()).await.unwrap();
    assert_eq!(
        relay.publish_all().await.unwrap(),
        4,
        "3 created + 1 cancelled, the round after the crash included"
    );
    assert!(
        store.outbox_read(100).await.unwrap().is_empty(),
        "the outbox is empty"
    );

    let seen = stored(&config).await;
    assert_eq!(seen.len(), 4, "each event stored once: {seen:?}");
    let bob = order_ids[1].to_string();
    let created = seen
        .iter()
        .position(|e| *e == (bob.clone(), "created".to_owned()))
        .unwrap();
    let cancelled = seen
        .iter()
        .position(|e| *e == (bob.clone(), "cancelled".to_owned()))
        .unwrap();
    assert!(
        created < cancelled,
        "an order's events keep their order: {seen:?}"
    );
    for id in &order_ids {
        assert!(seen.contains(&(id.to_string(), "created".to_owned())));
    }
    engine.shutdown().await;
}

/// Another node's transaction, begun (its outbox row holds a sequence number) but not
/// yet committed.
enum OtherNode {
    Postgres(sqlx::PgConnection),
    MySql(sqlx::MySqlConnection),
}

impl OtherNode {
    async fn connect(database: &TestDatabase) -> OtherNode {
        use sqlx::Connection;
        let url = database.url.as_deref().expect("a server database");
        match database.backend {
            Backend::Postgres => {
                OtherNode::Postgres(sqlx::PgConnection::connect(url).await.unwrap())
            }
            Backend::MySql => OtherNode::MySql(sqlx::MySqlConnection::connect(url).await.unwrap()),
            Backend::Sqlite => unreachable!("one writer: sequence numbers commit in order"),
        }
    }

    async fn execute(&mut self, sql: &'static str) {
        match self {
            OtherNode::Postgres(connection) => {
                sqlx::raw_sql(sql).execute(connection).await.unwrap();
            }
            OtherNode::MySql(connection) => {
                sqlx::raw_sql(sql).execute(connection).await.unwrap();
            }
        }
    }

    /// Writes `event` for `order` into the outbox, in an open transaction when `commit`
    /// is false.
    async fn add_event(&mut self, order: &str, event: &str, commit: bool) {
        self.execute("BEGIN").await;
        let at_ms = 1_i64;
        let inserted = match self {
            OtherNode::Postgres(connection) => {
                sqlx::query("INSERT INTO outbox (order_id, event, at_ms) VALUES ($1, $2, $3)")
                    .bind(order)
                    .bind(event)
                    .bind(at_ms)
                    .execute(connection)
                    .await
                    .unwrap()
                    .rows_affected()
            }
            OtherNode::MySql(connection) => {
                sqlx::query("INSERT INTO outbox (order_id, event, at_ms) VALUES (?, ?, ?)")
                    .bind(order)
                    .bind(event)
                    .bind(at_ms)
                    .execute(connection)
                    .await
                    .unwrap()
                    .rows_affected()
            }
        };
        assert_eq!(inserted, 1);
        if commit {
            self.execute("COMMIT").await;
        }
    }
}

/// Commits the other node's open transaction just before the relay removes its round:
/// the late event, with the lower sequence number, becomes visible after the round was
/// read.
struct CommitsLate {
    other: tokio::sync::Mutex<Option<OtherNode>>,
}

#[async_trait]
impl Interceptor for CommitsLate {
    async fn before(&self, call: Call<'_>) -> Result<(), StoreError> {
        if matches!(call, Call::OutboxRemove)
            && let Some(mut other) = self.other.lock().await.take()
        {
            other.execute("COMMIT").await;
        }
        Ok(())
    }
}

/// With several nodes committing to one database, sequence numbers do not become
/// visible in order. A round removes exactly the events it published, so an event that
/// commits late with a lower number is published by the next round, never dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_committed_late_by_another_node_is_published_not_dropped() {
    for backend in [Backend::Postgres, Backend::MySql] {
        let database = TestDatabase::create(backend).await;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Intercepted {
            inner: database.open_with(dir.path(), &with_outbox()).await,
            hooks: CommitsLate {
                other: tokio::sync::Mutex::new(None),
            },
        });
        let (engine, sale) = engine_with_sale(store.clone(), "EV-2").await;
        let mut order_ids = Vec::new();
        for user in ["ann", "bob"] {
            order_ids.push(buy(&engine, sale, user).await.to_string());
        }
        let config = test_config();
        let relay = Relay::connect(store.clone(), config.clone()).await.unwrap();
        while relay.publish_round().await.unwrap() > 0 {}

        // Node A takes the lower sequence number for ann's "paid" but has not committed;
        // node B commits bob's "paid" with the higher one.
        let mut late = OtherNode::connect(&database).await;
        late.add_event(&order_ids[0], "paid", false).await;
        let mut early = OtherNode::connect(&database).await;
        early.add_event(&order_ids[1], "paid", true).await;
        *store.hooks.other.lock().await = Some(late);

        assert_eq!(
            relay.publish_round().await.unwrap(),
            1,
            "{}: the round read only the committed event",
            backend.name()
        );
        assert_eq!(
            relay.publish_round().await.unwrap(),
            1,
            "{}: the event committed during the round is still there, published next",
            backend.name()
        );
        assert_eq!(relay.publish_round().await.unwrap(), 0);

        let seen = stored(&config).await;
        assert_eq!(seen.len(), 4, "2 created + 2 paid, each stored once");
        let mut paid: Vec<String> = seen
            .into_iter()
            .filter(|(_, event)| event == "paid")
            .map(|(order, _)| order)
            .collect();
        paid.sort();
        let mut expected = order_ids.clone();
        expected.sort();
        assert_eq!(
            paid,
            expected,
            "{}: both payments reached the stream",
            backend.name()
        );
        engine.shutdown().await;
    }
}

/// A relay publishes only on its node's turn, and starts within `turn_check` of getting
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_publishes_only_on_its_nodes_turn() {
    let dir = tempfile::tempdir().unwrap();
    // The question "is it this node's turn?" fails while armed, as a node whose
    // database cannot answer would be told no.
    let store =
        sqlite_outbox_failing(dir.path(), |call| matches!(call, Call::RelayTurn), false).await;
    let (engine, sale) = engine_with_sale(store.clone(), "EV-3").await;
    buy(&engine, sale, "ann").await;
    let config = RelayConfig {
        turn_check: std::time::Duration::from_millis(100),
        ..test_config()
    };
    let relay = Relay::connect(store.clone(), config.clone()).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        store.inner.outbox_read(100).await.unwrap().len(),
        1,
        "a standing-by relay publishes nothing"
    );
    store.hooks.armed.store(false, Ordering::SeqCst);
    let mut waited = 0;
    while !store.inner.outbox_read(100).await.unwrap().is_empty() {
        assert!(waited < 100, "the relay never took its turn");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        waited += 1;
    }
    stop.send(()).unwrap();
    running.await.unwrap();
    assert_eq!(stored(&config).await.len(), 1);
    engine.shutdown().await;
}

/// An engine whose outbox holds, in order: ann, bob and cyd created, bob cancelled, dan
/// created. Answers the engine, its store and bob's order id.
async fn five_events(dir: &std::path::Path) -> (Engine, Arc<dyn Store>, String) {
    let store = sqlite_outbox(dir).await;
    let (engine, sale) = engine_with_sale(store.clone(), "EV-4").await;
    let mut bob = None;
    for user in ["ann", "bob", "cyd", "dan"] {
        if user == "dan" {
            engine.cancel(&Actor::Admin, bob.unwrap()).await.unwrap();
        }
        let order = buy(&engine, sale, user).await;
        if user == "bob" {
            bob = Some(order);
        }
    }
    assert_eq!(store.outbox_read(100).await.unwrap().len(), 5);
    (engine, store, bob.unwrap().to_string())
}

/// A round skips an order's second event (it waits for the first to be acknowledged)
/// but goes on with the other orders' events after it, instead of stopping there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_skips_an_orders_second_event_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, store, bob) = five_events(dir.path()).await;
    let config = test_config();
    let relay = Relay::connect(store.clone(), config.clone()).await.unwrap();
    assert_eq!(
        relay.publish_round().await.unwrap(),
        4,
        "ann, bob, cyd and dan created; bob's cancel waits"
    );
    assert_eq!(relay.publish_round().await.unwrap(), 1, "bob cancelled");
    assert_eq!(relay.publish_round().await.unwrap(), 0);
    let seen = stored(&config).await;
    assert_eq!(seen.len(), 5);
    assert_eq!(seen[4], (bob, "cancelled".to_owned()), "{seen:?}");
    engine.shutdown().await;
}
