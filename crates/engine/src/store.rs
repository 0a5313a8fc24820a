//! The storage seam. The engine decides; a `Store` only makes decisions durable.
//!
//! **Architecture invariant:** `commit` applies a whole batch in one transaction or
//! nothing at all. The engine relies on that to hand stock back after a failed commit.

use std::sync::Arc;

use async_trait::async_trait;
use stampede_types::{Cents, IdempotencyKey, OrderId, OrderStatus, Quantity, SaleId, Sku, UserId};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductRecord {
    pub sku: Sku,
    pub name: Arc<str>,
    pub price: Cents,
    /// Units not carved into any flash sale.
    pub available: u64,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaleRecord {
    pub id: SaleId,
    pub sku: Sku,
    pub price: Cents,
    pub quantity: u64,
    pub per_user_limit: u32,
    pub starts_at_ms: i64,
    pub ends_at_ms: i64,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRecord {
    pub id: OrderId,
    pub user_id: UserId,
    pub sale_id: SaleId,
    pub sku: Sku,
    pub quantity: Quantity,
    pub amount: Cents,
    pub status: OrderStatus,
    pub idempotency_key: IdempotencyKey,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub updated_at_ms: i64,
}

/// One durable change. A batch is a slice of these, committed as one transaction.
#[derive(Debug, Clone)]
pub enum WriteOp {
    InsertProduct(ProductRecord),
    /// Inserts the sale and takes `quantity` from the product's `available`.
    InsertSale(SaleRecord),
    InsertOrder(OrderRecord),
    /// Moves an order out of `pending_payment` if, and only if, it is still there.
    Transition {
        order_id: OrderId,
        to: OrderStatus,
        at_ms: i64,
    },
}

/// What a `WriteOp` did, in the same order as the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpOutcome {
    Written,
    Transitioned {
        sale_id: SaleId,
        user_id: UserId,
        quantity: Quantity,
    },
    /// The order was no longer pending; nothing changed.
    Refused {
        current: OrderStatus,
    },
    NotFound,
}

/// Everything a restart needs to rebuild the in-memory state.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub products: Vec<ProductRecord>,
    pub sales: Vec<SaleRecord>,
    /// Every order, in any state: stock and per-user counts come from those holding
    /// stock, idempotency answers from all of them.
    pub orders: Vec<OrderRecord>,
}

/// One order event waiting in the transactional outbox: written in the same transaction
/// as the change it reports, removed once published (`Store::outbox_remove`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    /// Commit order: an order's events have increasing `seq`.
    pub seq: i64,
    /// The state the order entered: `pending_payment` means "created".
    pub event: OrderStatus,
    pub at_ms: i64,
    /// The order as it is now (its immutable fields are what the event carries).
    pub order: OrderRecord,
}

/// Units of a sale per order state, counted from durable orders.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SaleTally {
    pub pending_payment: u64,
    pub paid: u64,
    pub cancelled: u64,
    pub expired: u64,
    /// Shoppers whose pending + paid units exceed the sale's per-user limit.
    pub users_over_limit: u64,
}

/// A tally being counted on a pinned snapshot.
pub type PendingTally =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<SaleTally, StoreError>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// Another node took ownership of the database: this one must never write again
    /// with the state it holds in memory. Nothing of the batch was written.
    #[error("fenced off: {0}")]
    Fenced(String),
    /// A commit may or may not have landed (the connection broke during `COMMIT` and the
    /// database could not be asked). Stock must not be handed back: it may be sold.
    #[error("commit outcome unknown: {0}")]
    Indeterminate(String),
}

impl StoreError {
    /// Whether the engine must stop writing: its memory can no longer be trusted to
    /// match the durable state. A restart rebuilds it from the store.
    pub fn halts(&self) -> bool {
        matches!(self, StoreError::Fenced(_) | StoreError::Indeterminate(_))
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads everything needed to rebuild the engine after a restart.
    async fn load(&self) -> Result<Snapshot, StoreError>;
    /// Applies `ops` in one durable transaction (fsync'd before returning `Ok`).
    async fn commit(&self, ops: &[WriteOp]) -> Result<Vec<OpOutcome>, StoreError>;
    async fn order(&self, id: OrderId) -> Result<Option<OrderRecord>, StoreError>;
    /// The orders with these ids (any order; missing ids are skipped). The engine keeps
    /// each shopper's order ids in memory, so the store needs no per-shopper index on the
    /// hot insert path.
    async fn orders_by_id(&self, ids: &[OrderId]) -> Result<Vec<OrderRecord>, StoreError>;
    async fn tally(&self, sale: SaleId, per_user_limit: u32) -> Result<SaleTally, StoreError>;
    /// Pins a read snapshot of the durable state before returning; the returned future
    /// counts the tally on that snapshot, however many commits happen meanwhile. The
    /// writer calls this between batches and awaits the count elsewhere, so an audit of
    /// a large sale never stalls writes.
    async fn snapshot_tally(
        &self,
        sale: SaleId,
        per_user_limit: u32,
    ) -> Result<PendingTally, StoreError>;
    async fn ping(&self) -> Result<(), StoreError>;
    /// The oldest `limit` events in the outbox, oldest first. Stores opened without an
    /// outbox keep none.
    async fn outbox_read(&self, limit: usize) -> Result<Vec<OutboxEvent>, StoreError> {
        let _ = limit;
        Ok(Vec::new())
    }
    /// Removes the events up to and including `seq` (they have been published).
    async fn outbox_remove(&self, through_seq: i64) -> Result<(), StoreError> {
        let _ = through_seq;
        Ok(())
    }
    /// A small named document kept beside the orders (e.g. the guard's rules), durable
    /// when `save_setting` returns. Stores that keep none say `None` and refuse saves.
    async fn load_setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        let _ = key;
        Ok(None)
    }
    async fn save_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let _ = (key, value);
        Err(StoreError::Unavailable(
            "this store keeps no settings".into(),
        ))
    }
}
