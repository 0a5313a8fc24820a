//! The relay against a real NATS JetStream server (`STAMPEDE_TEST_NATS_URL`, default
//! `nats://127.0.0.1:4222`) and the real SQLite store with its outbox: every committed
//! order event reaches the stream once, in commit order per order, even when the relay
//! dies between JetStream's acknowledgement and the outbox clean-up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use stampede_engine::testing::live_sale;
use stampede_engine::{Actor, Engine, EngineConfig, Store, StoreError, SystemClock};
use stampede_relay::{Relay, RelayConfig};
use stampede_store::testing::{Call, Intercepted, Interceptor};
use stampede_types::{IdempotencyKey, Quantity, UserId};

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

/// Makes `outbox_remove` fail once, as a relay killed after JetStream acknowledged a
/// round but before it removed the round from the outbox.
struct DiesBeforeRemoval {
    die: AtomicBool,
}

#[async_trait]
impl Interceptor for DiesBeforeRemoval {
    async fn before(&self, call: Call<'_>) -> Result<(), StoreError> {
        if matches!(call, Call::OutboxRemove) && self.die.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Unavailable(
                "killed before removal (injected)".into(),
            ));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_reaches_the_stream_once_in_order_even_after_a_crash_before_removal() {
    let dir = tempfile::tempdir().unwrap();
    let options = stampede_store::StoreOptions {
        outbox: true,
        ..Default::default()
    };
    let store = Arc::new(Intercepted {
        inner: stampede_store::open(None, dir.path(), &options)
            .await
            .unwrap(),
        hooks: DiesBeforeRemoval {
            die: AtomicBool::new(true),
        },
    });
    let engine = Engine::open(
        store.clone(),
        Arc::new(SystemClock),
        EngineConfig::default(),
    )
    .await
    .unwrap();
    let sale = live_sale(&engine, "EV-1", 10, 10, 100, 5).await;
    let one = Quantity::parse(1).unwrap();
    let mut order_ids = Vec::new();
    for user in ["ann", "bob", "cyd"] {
        let placed = engine
            .purchase(
                UserId::parse(user).unwrap(),
                IdempotencyKey::parse("k").unwrap(),
                sale,
                one,
            )
            .await
            .unwrap();
        order_ids.push(placed.placed.order_id);
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
    let mut published = 0;
    loop {
        let n = relay.publish_round().await.unwrap();
        if n == 0 {
            break;
        }
        published += n;
    }
    assert_eq!(
        published, 4,
        "3 created + 1 cancelled, the round after the crash included"
    );
    assert!(
        store.outbox_read(100).await.unwrap().is_empty(),
        "the outbox is empty"
    );

    let client = async_nats::connect(nats_url()).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    let mut stream = jetstream.get_stream(&config.stream).await.unwrap();
    let n_messages = stream.info().await.unwrap().state.messages;
    assert_eq!(n_messages, 4, "each event stored once");
    let mut seen = Vec::new();
    for sequence in 1..=n_messages {
        let message = stream.get_raw_message(sequence).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(
            message.subject.as_str(),
            format!(
                "{}.{}",
                config.subject_prefix,
                body["event"].as_str().unwrap()
            )
        );
        seen.push((
            body["order_id"].as_str().unwrap().to_owned(),
            body["event"].as_str().unwrap().to_owned(),
        ));
    }
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
    jetstream.delete_stream(&config.stream).await.unwrap();
    engine.shutdown().await;
}
