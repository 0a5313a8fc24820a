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
//! - **Deduplicated.** Every message carries `Nats-Msg-Id: <order id>.<event>`; JetStream
//!   drops a repeat inside the stream's duplicate window (`duplicate_window`, default
//!   2 min, which must cover a restart). Consumers that need exactly-once dedupe on the
//!   same id.
//! - **Per-order order.** Events are read in commit order; one publishing round holds at
//!   most one event per order, and a round is acknowledged in full before the next
//!   starts, so an order's "paid" is never stored before its "created".
//! - **Bounded.** A round publishes at most `batch_max` events; the outbox is bounded by
//!   the orders themselves.
//!
//! Subjects: `<subject_prefix>.<event>`, e.g. `stampede.orders.created`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use serde::Serialize;
use stampede_engine::{OutboxEvent, Store};
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
    /// How long to wait when the outbox is empty, or after a failure.
    pub idle_wait: Duration,
}

impl RelayConfig {
    pub fn new(nats_url: impl Into<String>) -> RelayConfig {
        RelayConfig {
            nats_url: nats_url.into(),
            stream: "STAMPEDE_ORDERS".into(),
            subject_prefix: "stampede.orders".into(),
            duplicate_window: Duration::from_secs(120),
            batch_max: 256,
            idle_wait: Duration::from_millis(50),
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
        let jetstream = jetstream::new(client);
        jetstream
            .get_or_create_stream(jetstream::stream::Config {
                name: config.stream.clone(),
                subjects: vec![format!("{}.>", config.subject_prefix)],
                duplicate_window: config.duplicate_window,
                ..Default::default()
            })
            .await
            .map_err(nats)?;
        Ok(Relay {
            store,
            config,
            jetstream,
        })
    }

    /// One publishing round: reads the oldest events (at most one per order), publishes
    /// them, waits for every acknowledgement, then removes them. Answers how many were
    /// published; 0 means the outbox was empty.
    pub async fn publish_round(&self) -> Result<usize, RelayError> {
        let events = self.store.outbox_read(self.config.batch_max).await?;
        let mut orders = HashSet::with_capacity(events.len());
        // Stop before an order's second event: it goes in the next round, after the
        // first is acknowledged.
        let round: Vec<&OutboxEvent> = events
            .iter()
            .take_while(|event| orders.insert(event.order.id))
            .collect();
        let Some(last) = round.last() else {
            return Ok(0);
        };
        let mut acks = Vec::with_capacity(round.len());
        for event in &round {
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
        }
        for ack in
            futures::future::join_all(acks.into_iter().map(std::future::IntoFuture::into_future))
                .await
        {
            ack.map_err(nats)?;
        }
        self.store.outbox_remove(last.seq).await?;
        metrics::counter!("stampede_relay_published_total").increment(round.len() as u64);
        Ok(round.len())
    }

    /// Connects (retrying every `idle_wait`×20 while NATS is unreachable: orders keep
    /// selling, their events wait in the outbox) and publishes until `shutdown` resolves.
    pub async fn connect_and_run(
        store: Arc<dyn Store>,
        config: RelayConfig,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            match Relay::connect(store.clone(), config.clone()).await {
                Ok(relay) => return relay.run(shutdown).await,
                Err(error) => {
                    metrics::counter!("stampede_relay_failures_total").increment(1);
                    tracing::warn!(%error, url = %config.nats_url, "outbox relay cannot reach NATS; retrying");
                }
            }
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(config.idle_wait * 20) => {}
            }
        }
    }

    /// Publishes until `shutdown` resolves. Failures are logged and retried after
    /// `idle_wait`; nothing is removed from the outbox that JetStream has not stored.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let wait = match self.publish_round().await {
                Ok(0) => self.config.idle_wait,
                Ok(_) => Duration::ZERO,
                Err(error) => {
                    metrics::counter!("stampede_relay_failures_total").increment(1);
                    tracing::warn!(%error, "outbox relay round failed; retrying");
                    self.config.idle_wait
                }
            };
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        tracing::info!("outbox relay stopped");
    }
}
