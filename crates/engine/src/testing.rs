//! Set-up shared by tests and benchmarks of code built on the engine. The server never
//! calls it.

use std::sync::Arc;

use stampede_types::{Cents, IdempotencyKey, Quantity, SaleId, Sku, UserId};

use crate::{Engine, NewProduct, NewSale};

/// Creates product `sku` with `stock` units and a sale of `quantity` of them at
/// `price_cents`, live from a second ago for a year. Panics on failure: for tests only.
pub async fn live_sale(
    engine: &Engine,
    sku: &str,
    stock: u64,
    quantity: u64,
    price_cents: i64,
    per_user_limit: u32,
) -> SaleId {
    let ends_in_ms = 365 * 24 * 3_600_000;
    let sale = (quantity, price_cents, per_user_limit, ends_in_ms);
    product_and_sale(engine, sku, stock, sale).await
}

/// Creates product `sku` with `units` units and a sale of all of them at 50 cents, started
/// a second ago and ending `ends_in_ms` from now by the engine's clock. Panics on
/// failure: for tests only.
pub async fn sale_ending_in(
    engine: &Engine,
    sku: &str,
    units: u64,
    per_user_limit: u32,
    ends_in_ms: i64,
) -> SaleId {
    product_and_sale(engine, sku, units, (units, 50, per_user_limit, ends_in_ms)).await
}

/// Product `sku` of `stock` units, and a sale of (quantity, price in cents, per-user
/// limit, ends in ms) started a second ago by the engine's clock.
async fn product_and_sale(
    engine: &Engine,
    sku: &str,
    stock: u64,
    (quantity, price_cents, per_user_limit, ends_in_ms): (u64, i64, u32, i64),
) -> SaleId {
    let sku = Sku::parse(sku).expect("valid sku");
    let price = Cents::parse("price_cents", price_cents).expect("valid price");
    engine
        .create_product(NewProduct {
            sku: sku.clone(),
            name: Arc::from("test product"),
            price,
            stock,
        })
        .await
        .expect("create product");
    let now = engine.now_ms();
    engine
        .create_sale(NewSale {
            sku,
            price,
            quantity,
            per_user_limit,
            starts_at_ms: now - 1_000,
            ends_at_ms: now + ends_in_ms,
        })
        .await
        .expect("create sale")
        .record
        .id
}

/// A shopper id; panics if `name` is not one.
pub fn user(name: &str) -> UserId {
    UserId::parse(name).expect("valid user id")
}

/// An idempotency key; panics if `name` is not one.
pub fn key(name: &str) -> IdempotencyKey {
    IdempotencyKey::parse(name).expect("valid idempotency key")
}

/// A quantity of one unit.
pub fn one() -> Quantity {
    Quantity::parse(1).expect("1 is a quantity")
}

/// For crash tests: a place taken in the writer's queue and not yet filled, as a caller
/// holds one between taking its permit and pushing its job (`take_queue_place`).
pub struct QueuePlace(tokio::sync::mpsc::OwnedPermit<crate::writer::Job>);

impl QueuePlace {
    /// Fills the place with a job that only asks for an answer, and waits for it: true if
    /// the writer answered, false if the job was dropped unanswered.
    pub async fn fill(self) -> bool {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.0.send(crate::writer::Job::ExpireDue { reply });
        answer.await.is_ok()
    }
}

/// Takes a place in `engine`'s writer queue without filling it yet.
pub async fn take_queue_place(engine: &Engine) -> QueuePlace {
    QueuePlace(
        engine
            .jobs
            .clone()
            .reserve_owned()
            .await
            .expect("the writer's queue is open"),
    )
}

/// A payment provider in memory that keeps its books: which keys were charged and how
/// often each was refunded. With `time_out` set, a charge is made and answered
/// `Timeout`, as a reply lost on the way back would be. A refund of a key never charged
/// answers `NotCharged`, as the provider would.
#[derive(Default)]
pub struct RecordingProvider {
    pub charged: parking_lot::Mutex<std::collections::HashMap<String, Cents>>,
    pub refunds: parking_lot::Mutex<std::collections::HashMap<String, u32>>,
    pub time_out: std::sync::atomic::AtomicBool,
}

impl RecordingProvider {
    /// Whether the key holds a charge not refunded.
    pub fn keeps(&self, key: &str) -> bool {
        self.charged.lock().contains_key(key) && !self.refunds.lock().contains_key(key)
    }
}

#[async_trait::async_trait]
impl crate::PaymentGateway for RecordingProvider {
    async fn charge(&self, key: &str, amount: Cents) -> Result<(), crate::PaymentError> {
        self.charged.lock().entry(key.to_owned()).or_insert(amount);
        if self.time_out.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(crate::PaymentError::Timeout);
        }
        Ok(())
    }

    async fn refund(&self, key: &str, _: Cents) -> Result<(), crate::PaymentError> {
        if !self.charged.lock().contains_key(key) {
            return Err(crate::PaymentError::NotCharged);
        }
        *self.refunds.lock().entry(key.to_owned()).or_default() += 1;
        Ok(())
    }
}
