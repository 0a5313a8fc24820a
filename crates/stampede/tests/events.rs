//! The order-event stream end to end, on every store: `stampede serve --nats-url …`
//! publishes created, paid, cancelled and expired to NATS JetStream (the real server at
//! `STAMPEDE_TEST_NATS_URL`, default `nats://127.0.0.1:4222`), each once, an order's
//! events in order; and events committed while NATS was unreachable are published once
//! it is back, after a restart.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use stampede_store::on_every_backend;
use stampede_store::testing::Backend;

on_every_backend!(
    every_order_event_reaches_the_stream_once_and_in_order,
    events_wait_in_the_outbox_while_nats_is_unreachable,
);

fn nats_url() -> String {
    std::env::var("STAMPEDE_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// Points the app at NATS with a stream and subjects of this test's own.
fn with_events(config: &mut stampede::Config, url: &str) -> (String, String) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let tag = format!("T{}_{nanos}", std::process::id());
    config.nats_url = Some(url.to_owned());
    config.nats_stream = format!("STAMPEDE_{tag}");
    config.nats_subject_prefix = format!("stampede_{tag}.orders");
    (
        config.nats_stream.clone(),
        config.nats_subject_prefix.clone(),
    )
}

/// Every message of `stream` as (order id, event), in stream order, once it holds `n`
/// and still holds `n` a few relay rounds later (an event published late, under an id
/// of its own, would arrive after the first `n`; a repeat of an id JetStream drops).
async fn events_in(stream_name: &str, n: u64) -> Vec<(String, String)> {
    let client = async_nats::connect(nats_url()).await.unwrap_or_else(|e| {
        panic!(
            "NATS does not answer at {} ({e}); start it or set STAMPEDE_TEST_NATS_URL",
            nats_url()
        )
    });
    let jetstream = async_nats::jetstream::new(client);
    let mut stored = 0;
    for _ in 0..200 {
        if let Ok(mut stream) = jetstream.get_stream(stream_name).await {
            stored = stream.info().await.unwrap().state.messages;
            if stored >= n {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stored, n, "messages in {stream_name}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut stream = jetstream.get_stream(stream_name).await.unwrap();
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        n,
        "no more messages arrive in {stream_name}"
    );
    let mut events = Vec::new();
    for sequence in 1..=n {
        let message = stream.get_raw_message(sequence).await.unwrap();
        let body: Value = serde_json::from_slice(&message.payload).unwrap();
        events.push((
            body["order_id"].as_str().unwrap().to_owned(),
            body["event"].as_str().unwrap().to_owned(),
        ));
    }
    jetstream.delete_stream(stream_name).await.unwrap();
    events
}

async fn every_order_event_reaches_the_stream_once_and_in_order(backend: Backend) {
    let mut stream = String::new();
    let app = spawn_app_on_with(backend, |config| {
        config.payment_window = Duration::from_secs(1);
        config.payment_timeout = Duration::from_millis(200);
        stream = with_events(config, &nats_url()).0;
    })
    .await;
    let sale = app.live_sale("EV-1", 10, 5).await;
    let (ann, bob, cyd) = (app.shopper("ann"), app.shopper("bob"), app.shopper("cyd"));
    let paid = app.buy(&ann, &sale, "k1", 1).await;
    let cancelled = app.buy(&bob, &sale, "k2", 2).await;
    let expired = app.buy(&cyd, &sale, "k3", 1).await;
    assert_eq!(app.pay(&ann, &paid).await.status, 200);
    assert_eq!(app.cancel(&bob, &cancelled).await.status, 200);
    eventually("cyd's order to expire", || async {
        (app.order_status(&cyd, &expired).await == "expired").then_some(())
    })
    .await;

    let events = events_in(&stream, 6).await;
    let position = |order: &str, event: &str| {
        events
            .iter()
            .position(|(o, e)| o == order && e == event)
            .unwrap_or_else(|| panic!("{event} of {order} missing from {events:?}"))
    };
    assert!(position(&paid, "created") < position(&paid, "paid"));
    assert!(position(&cancelled, "created") < position(&cancelled, "cancelled"));
    assert!(position(&expired, "created") < position(&expired, "expired"));
}

async fn events_wait_in_the_outbox_while_nats_is_unreachable(backend: Backend) {
    let mut names = (String::new(), String::new());
    // Nothing listens on port 1: the relay keeps retrying while orders sell.
    let mut app = spawn_app_on_with(backend, |config| {
        names = with_events(config, "nats://127.0.0.1:1");
    })
    .await;
    let sale = app.live_sale("EV-2", 10, 5).await;
    let first = app.buy(&app.shopper("ann"), &sale, "k1", 1).await;
    let second = app.buy(&app.shopper("bob"), &sale, "k2", 1).await;
    app.stop().await;

    app.config.nats_url = Some(nats_url());
    app.start().await;
    let events = events_in(&names.0, 2).await;
    assert_eq!(
        events,
        vec![
            (first, "created".to_owned()),
            (second, "created".to_owned())
        ]
    );
}
