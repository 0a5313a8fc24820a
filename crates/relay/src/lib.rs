//! The outbox relay: publishes order events (created, paid, cancelled, expired) from
//! the store's transactional outbox to NATS JetStream — the change stream reports, the
//! warehouse and other services consume instead of reading the order database.
//!
//! How it keeps its promises:
//!
//! - **Nothing lost.** An event is written in the same transaction as the change it
//!   reports (`Store::commit`), and removed from the outbox only after JetStream has
//!   acknowledged it. A crash anywhere in between leaves it in the outbox, and the next
//!   relay (after a restart) publishes it again: at-least-once, resuming where it stopped.
//!   A round removes exactly the events it published: cluster nodes commit concurrently,
//!   so an event with a lower `seq` can become visible after a higher one was read, and
//!   it stays for the next round.
//! - **One publisher.** Every node may run a relay; it publishes only on its node's turn
//!   (`Store::relay_turn`: the oldest live cluster member whose relay is ready, i.e.
//!   connected and not failing), so the stream is fed once, and a node that cannot
//!   publish never holds the turn.
//! - **Deduplicated.** Every message carries `Nats-Msg-Id: <order id>.<event>`; JetStream
//!   drops a repeat inside the stream's duplicate window (`duplicate_window`, default
//!   2 min, which must cover a restart). Consumers that need exactly-once dedupe on the
//!   same id.
//! - **Per-order order.** Events are read in `seq` order (an order's next event is
//!   written only after its previous one committed), and an order has at most one
//!   event on its way to JetStream at a time: a round skips every event of an order
//!   after its first (and goes on with the other orders'), and is acknowledged in full
//!   before the next is read, so an order's "paid" is never stored before its
//!   "created", even when a failed send goes again.
//! - **Bounded.** A round publishes at most `batch_max` events; the outbox is bounded by
//!   the orders themselves.
//!
//! Subjects: `<subject_prefix>.<event>`, e.g. `stampede.orders.created`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use serde::Serialize;
use stampede_engine::{Clock, OutboxEvent, Store, SystemClock};
use stampede_types::OrderStatus;

#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub nats_url: String,
    /// JetStream stream the events go to; created if missing.
    pub stream: String,
    /// Events are published on `<subject_prefix>.<event>`.
    pub subject_prefix: String,
    /// How long JetStream remembers message ids to drop repeats.
    pub duplicate_window: Duration,
    /// Most events in one publishing round.
    pub batch_max: usize,
    /// How long to wait when the outbox is empty, and after a first failure.
    pub idle_wait: Duration,
    /// Longest wait between retries while rounds keep failing (the wait doubles).
    pub retry_max: Duration,
    /// How often a node asks whether it is its turn to publish (`Store::relay_turn`);
    /// a cluster's standby relays take over within this after the publisher's node
    /// stops heartbeating.
    pub turn_check: Duration,
}

impl RelayConfig {
    pub fn new(nats_url: impl Into<String>) -> RelayConfig {
        RelayConfig {
            nats_url: nats_url.into(),
            stream: "STAMPEDE_ORDERS".into(),
            subject_prefix: "stampede.orders".into(),
            duplicate_window: Duration::from_secs(120),
            batch_max: 1_024,
            idle_wait: Duration::from_millis(50),
            retry_max: Duration::from_secs(5),
            turn_check: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("NATS: {0}")]
    Nats(String),
    #[error("store: {0}")]
    Store(#[from] stampede_engine::StoreError),
}

fn nats(error: impl std::fmt::Display) -> RelayError {
    RelayError::Nats(error.to_string())
}

/// Checks `url` as the relay's connection reads it: one NATS server address
/// (`nats://host:port`, or `host:port`). A server that starts with one it cannot read
/// would retry it for ever while the outbox grew.
pub fn check_nats_url(url: &str) -> Result<(), String> {
    url.parse::<async_nats::ServerAddr>()
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The event name on the wire: an order entering `pending_payment` was created.
pub fn event_name(event: OrderStatus) -> &'static str {
    match event {
        OrderStatus::PendingPayment => "created",
        OrderStatus::Paid => "paid",
        OrderStatus::Cancelled => "cancelled",
        OrderStatus::Expired => "expired",
    }
}

/// The message body: the event and the order's immutable facts.
#[derive(Debug, Serialize)]
pub struct EventBody<'a> {
    pub event: &'static str,
    pub order_id: String,
    pub user_id: &'a str,
    pub sale_id: String,
    pub sku: &'a str,
    pub quantity: u32,
    pub amount_cents: i64,
    /// When the order entered this state, milliseconds since the Unix epoch.
    pub at_ms: i64,
}

impl<'a> EventBody<'a> {
    pub fn of(event: &'a OutboxEvent) -> EventBody<'a> {
        EventBody {
            event: event_name(event.event),
            order_id: event.order.id.to_string(),
            user_id: event.order.user_id.as_str(),
            sale_id: event.order.sale_id.to_string(),
            sku: event.order.sku.as_str(),
            quantity: event.order.quantity.get(),
            amount_cents: event.order.amount.get(),
            at_ms: event.at_ms,
        }
    }
}

/// The dedupe id of an event: one per order and state.
pub fn message_id(event: &OutboxEvent) -> String {
    format!("{}.{}", event.order.id, event_name(event.event))
}

pub struct Relay {
    store: Arc<dyn Store>,
    config: RelayConfig,
    /// The connection, asked whether it is up before the relay claims the turn.
    client: async_nats::Client,
    jetstream: jetstream::Context,
}

impl Relay {
    /// Connects to NATS and makes sure the stream exists.
    pub async fn connect(store: Arc<dyn Store>, config: RelayConfig) -> Result<Relay, RelayError> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(config.nats_url.as_str())
            .await
            .map_err(nats)?;
        let jetstream = jetstream::new(client.clone());
        let stream = jetstream
            .get_or_create_stream(jetstream::stream::Config {
                name: config.stream.clone(),
                subjects: vec![format!("{}.>", config.subject_prefix)],
                duplicate_window: config.duplicate_window,
                ..Default::default()
            })
            .await
            .map_err(nats)?;
        // An existing stream is the operator's: say so rather than change it.
        let existing = stream.cached_info().config.duplicate_window;
        if existing != config.duplicate_window {
            tracing::warn!(
                stream = %config.stream,
                existing = ?existing,
                configured = ?config.duplicate_window,
                "the stream's duplicate window is not the configured one; it applies"
            );
        }
        Ok(Relay {
            store,
            config,
            client,
            jetstream,
        })
    }

    /// One publishing round: reads the oldest events (at most one per order), publishes
    /// them, waits for every acknowledgement, then removes exactly them. Answers how many
    /// were published; 0 means the outbox was empty.
    pub async fn publish_round(&self) -> Result<usize, RelayError> {
        let events = self.store.outbox_read(self.config.batch_max).await?;
        report_lag(events.first());
        let mut orders = HashSet::with_capacity(events.len());
        let mut acks = Vec::with_capacity(events.len());
        let mut published = Vec::with_capacity(events.len());
        for event in &events {
            // Events are read in `seq` order, an order's in the order they happened: its
            // second waits for the next round, after the first is acknowledged (so a
            // failed send that goes again can never land after it); the other orders'
            // events go on.
            if !orders.insert(event.order.id) {
                continue;
            }
            let subject = format!("{}.{}", self.config.subject_prefix, event_name(event.event));
            let body = serde_json::to_vec(&EventBody::of(event)).map_err(nats)?;
            let publish = jetstream::message::PublishMessage::build()
                .payload(body.into())
                .message_id(message_id(event));
            acks.push(
                self.jetstream
                    .send_publish(subject, publish)
                    .await
                    .map_err(nats)?,
            );
            published.push(event.seq);
        }
        if published.is_empty() {
            return Ok(0);
        }
        for ack in
            futures::future::join_all(acks.into_iter().map(std::future::IntoFuture::into_future))
                .await
        {
            ack.map_err(nats)?;
        }
        // Exactly what was acknowledged: a lower seq another node committed after this
        // read is not in the round and stays for the next.
        self.store.outbox_remove(&published).await?;
        metrics::counter!("stampede_relay_published_total").increment(published.len() as u64);
        Ok(published.len())
    }

    /// Publishes rounds until the outbox is empty; answers how many events.
    pub async fn publish_all(&self) -> Result<u64, RelayError> {
        let mut published = 0;
        loop {
            match self.publish_round().await? {
                0 => return Ok(published),
                n => published += n as u64,
            }
        }
    }

    /// Connects (retrying, with the waits of `retry_wait`, while NATS is unreachable:
    /// orders keep selling, their events wait in the outbox) and publishes until
    /// `shutdown` resolves.
    pub async fn connect_and_run(
        store: Arc<dyn Store>,
        config: RelayConfig,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut failures = 0u32;
        loop {
            match Relay::connect(store.clone(), config.clone()).await {
                Ok(relay) => return relay.run(shutdown).await,
                Err(error) => {
                    failures = failures.saturating_add(1);
                    metrics::counter!("stampede_relay_failures_total").increment(1);
                    tracing::warn!(%error, url = %config.nats_url, failures, "outbox relay cannot reach NATS; retrying");
                    // The lag goes on growing while NATS is out of reach: say how much.
                    if let Ok(oldest) = store.outbox_read(1).await {
                        report_lag(oldest.first());
                    }
                }
            }
            let wait = retry_wait(config.idle_wait, config.retry_max, failures);
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Publishes until `shutdown` resolves, while it is this node's turn
    /// (`Store::relay_turn`, asked every `turn_check`, ready while connected and no
    /// round failed in the last 2 × `retry_max`). Failures are logged and retried
    /// after a wait that doubles from `idle_wait` up to `retry_max`, back to `idle_wait`
    /// after a round succeeds; nothing is removed from the outbox that JetStream has not
    /// stored.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut turn = Turn::default();
        let mut failures = 0u32;
        let mut last_failure: Option<std::time::Instant> = None;
        loop {
            if turn.due(self.config.turn_check) {
                // Ready to publish: connected, and no round failed lately (a relay that
                // keeps failing lets another node's take over, and asks again later).
                let ready = self.client.connection_state()
                    == async_nats::connection::State::Connected
                    && last_failure.is_none_or(|at| at.elapsed() >= self.config.retry_max * 2);
                let mine = match self.store.relay_turn(ready).await {
                    Ok(mine) => mine,
                    Err(error) => {
                        tracing::warn!(%error, "outbox relay cannot ask whose turn it is");
                        false
                    }
                };
                turn.set(mine);
            }
            let wait = if !turn.mine {
                self.config.turn_check
            } else {
                match self.publish_round().await {
                    Ok(published) => {
                        failures = 0;
                        if published > 0 {
                            Duration::ZERO
                        } else {
                            self.config.idle_wait
                        }
                    }
                    Err(error) => {
                        failures = failures.saturating_add(1);
                        last_failure = Some(std::time::Instant::now());
                        metrics::counter!("stampede_relay_failures_total").increment(1);
                        tracing::warn!(%error, failures, "outbox relay round failed; retrying");
                        retry_wait(self.config.idle_wait, self.config.retry_max, failures)
                    }
                }
            };
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        metrics::gauge!("stampede_relay_publishing").set(0.0);
        metrics::gauge!("stampede_relay_lag_seconds").set(0.0);
        tracing::info!("outbox relay stopped");
    }
}

/// Sets `stampede_relay_lag_seconds`: how far the stream is behind the orders, the age
/// of the oldest event still waiting (0 when none is).
fn report_lag(oldest: Option<&OutboxEvent>) {
    let lag_ms = oldest.map_or(0, |oldest| {
        SystemClock.now_ms().saturating_sub(oldest.at_ms).max(0)
    });
    metrics::gauge!("stampede_relay_lag_seconds").set(lag_ms as f64 / 1_000.0);
}

/// Whether this node publishes, and when that was last asked.
#[derive(Default)]
struct Turn {
    mine: bool,
    asked: Option<std::time::Instant>,
}

impl Turn {
    fn due(&self, every: Duration) -> bool {
        self.asked.is_none_or(|asked| asked.elapsed() >= every)
    }

    fn set(&mut self, mine: bool) {
        if mine != self.mine || self.asked.is_none() {
            if mine {
                tracing::info!("outbox relay publishing: this node's turn");
            } else {
                tracing::info!("outbox relay standing by: another node publishes");
            }
        }
        metrics::gauge!("stampede_relay_publishing").set(if mine { 1.0 } else { 0.0 });
        if !mine {
            // The lag is the publishing node's to report.
            metrics::gauge!("stampede_relay_lag_seconds").set(0.0);
        }
        self.mine = mine;
        self.asked = Some(std::time::Instant::now());
    }
}

/// The wait after the `failures`-th failure in a row: `first`, doubling, at most `max`.
pub fn retry_wait(first: Duration, max: Duration, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    first.saturating_mul(1 << doublings).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_relay_backs_off_doubling_up_to_the_cap() {
        let (first, max) = (Duration::from_millis(50), Duration::from_secs(5));
        let waits: Vec<u128> = (1..=10)
            .map(|n| retry_wait(first, max, n).as_millis())
            .collect();
        assert_eq!(
            waits,
            [50, 100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]
        );
        assert_eq!(retry_wait(first, max, u32::MAX), max, "no overflow");
    }
}
