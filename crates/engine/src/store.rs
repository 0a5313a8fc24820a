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
    /// Records, before the provider is called, that money may move for this order: the
    /// charge ledger. Only for a pending order (`Written`): a closed or paid one answers
    /// `Refused` with its status and records nothing, decided under the same lock as
    /// `Transition`, so a charge is never attempted for an order already closed. A second
    /// record of the same order changes nothing.
    ChargeAttempt {
        order_id: OrderId,
        amount: Cents,
        at_ms: i64,
    },
    /// Records, for an order that is closed (or still pending), that a refund is owed
    /// for a charge that may have landed after the close: a pay that timed out or lost
    /// its race to the close, or a refund that gave up while the provider failed. Unlike
    /// `ChargeAttempt` it is written for a cancelled or expired order, so the ledger's
    /// sweep keeps refunding even if the close's own refund had already settled the
    /// entry. A paid order answers `Refused` (its charge is the sale's) and records
    /// nothing; a second record changes nothing.
    ChargeOwed {
        order_id: OrderId,
        amount: Cents,
        at_ms: i64,
    },
    /// Removes the order's ledger entry: it was paid, nothing was charged, or the charge
    /// was refunded. Removing an entry that is not there changes nothing.
    ChargeSettled {
        order_id: OrderId,
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
        /// For a move to cancelled or expired: the amount of the order's charge-ledger
        /// entry, if it has one (a pay may have charged it, and the caller refunds it).
        /// Read in the transaction that closed the order.
        charge: Option<Cents>,
    },
    /// The order was no longer pending; nothing changed.
    Refused {
        current: OrderStatus,
    },
    NotFound,
    /// Cluster only: another node already placed an order under this shopper's
    /// idempotency key; this one was not inserted.
    Duplicate(Box<OrderRecord>),
    /// Cluster only: orders placed on other nodes leave this shopper `held` units of the
    /// sale, and this order would exceed its per-user limit; it was not inserted.
    OverLimit {
        held: u32,
    },
    /// Cluster only: another node got there first (the product exists, its stock went to
    /// another sale); this op was not applied.
    Conflict,
}

/// What `Store::load` hands the durable state to, as it reads it: the catalog first,
/// then every order, one at a time. The engine rebuilds its state from each order as it
/// comes, so a restart never holds every order ever taken in memory at once.
pub trait Rebuild: Send {
    /// The products and sales, before any order.
    fn catalog(&mut self, products: Vec<ProductRecord>, sales: Vec<SaleRecord>);
    /// One order, in any state, in id order (time order): stock and per-user counts come
    /// from those holding stock, idempotency answers and shoppers' order lists from all.
    fn order(&mut self, order: OrderRecord);
}

/// Everything a restart reads, held in memory at once (`Store::snapshot`): for tests and
/// tools, not for the engine.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub products: Vec<ProductRecord>,
    pub sales: Vec<SaleRecord>,
    pub orders: Vec<OrderRecord>,
}

impl Rebuild for Snapshot {
    fn catalog(&mut self, products: Vec<ProductRecord>, sales: Vec<SaleRecord>) {
        self.products = products;
        self.sales = sales;
    }
    fn order(&mut self, order: OrderRecord) {
        self.orders.push(order);
    }
}

/// One entry of the charge ledger (`WriteOp::ChargeAttempt`), with its order's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChargeAttempt {
    pub order_id: OrderId,
    pub amount: Cents,
    pub status: OrderStatus,
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
    /// On a cluster store: units held by no order, counted in the database (the sale's
    /// unleased pool plus every node's lease), on the same snapshot.
    pub unsold: Option<u64>,
}

/// Stock a node leased from a sale (`Store::lease`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseGrant {
    pub units: u64,
    /// Units left in the sale's unleased pool after this grant.
    pub unleased: u64,
}

/// What `Store::reclaim` took back from nodes that stopped heartbeating.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reclaimed {
    pub nodes: u64,
    /// Leased units returned to their sales' unleased pools.
    pub units: u64,
}

/// The catalogue as the database has it, for nodes that learn of products and sales
/// created by other nodes.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub products: Vec<ProductRecord>,
    /// Each sale with its units held by no order (unleased plus leased).
    pub sales: Vec<(SaleRecord, u64)>,
}

/// How big a lease to grant: a quarter of a node's fair share of what is left, so blocks
/// shrink as the stock runs low and as nodes join, down to one unit at the tail; at
/// least the units buyers are waiting for (`wanted`), never more than `max` or what is
/// left.
pub fn lease_size(unleased: u64, live_nodes: u64, wanted: u64, max: u64) -> u64 {
    let share = unleased / (live_nodes.max(1) * 4);
    share.max(wanted).clamp(1, max.max(1)).min(unleased)
}

/// The most audits counting at once. The engine refuses one more (`AuditsBusy`, which
/// the API answers 503 `overloaded`), and a store keeps [`AUDIT_CONNECTIONS`] for
/// [`Store::snapshot_tally`] alone: the writer pins each audit's snapshot between its
/// batches, and must never wait there for a connection that shoppers' reads, or audits
/// still counting, hold.
pub const AUDITS_AT_ONCE: u32 = 2;

/// The connections a store keeps for [`Store::snapshot_tally`], all open from the start
/// so the writer never waits for one to connect: one per audit that may count, and one
/// more, so an audit let in as another's count ends does not wait for that connection's
/// rollback to bring it back to its pool.
pub const AUDIT_CONNECTIONS: u32 = AUDITS_AT_ONCE + 1;

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
    /// Reads everything needed to rebuild the engine after a restart, on one read
    /// snapshot, and hands it to `into` as it is read (`Rebuild`): the orders are
    /// streamed, never collected.
    async fn load(&self, into: &mut dyn Rebuild) -> Result<(), StoreError>;
    /// All of `load`, collected in memory.
    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let mut snapshot = Snapshot::default();
        self.load(&mut snapshot).await?;
        Ok(snapshot)
    }
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
    /// a large sale never stalls writes. A store keeps [`AUDIT_CONNECTIONS`] for this
    /// call alone, one more than the [`AUDITS_AT_ONCE`] the engine lets count at once:
    /// the writer's call never waits for a connection behind other reads.
    async fn snapshot_tally(
        &self,
        sale: SaleId,
        per_user_limit: u32,
    ) -> Result<PendingTally, StoreError>;
    async fn ping(&self) -> Result<(), StoreError>;
    /// Stops this store's writes as a killed process's writes stop: returns once no write
    /// it began can still land; later writes fail. `Engine::crash` (crash tests) calls it,
    /// so a store opened next on the same database loads all the dead one wrote. The
    /// server databases keep the default: a new owner takes the owner lock only once the
    /// dead writer's session, and with it its last statement, has ended.
    async fn stop_writes(&self) {}

    // ---- several writing nodes ------------------------------------------------------
    //
    // A cluster store is shared by several nodes. Each sells only stock it leased, and
    // its `commit` takes inserted orders' units from this node's lease (returned units
    // go back to it) in the same transaction, failing with `Fenced` if the lease or the
    // node's membership is gone. A single-writer store answers `None` to `node` and
    // keeps the defaults below.

    /// This node's id in a cluster store; `None` for a store with one writer.
    fn node(&self) -> Option<&str> {
        None
    }
    /// Moves `lease_size(unleased, live nodes, wanted, max)` units of the sale from its
    /// unleased pool to this node's lease.
    async fn lease(&self, sale: SaleId, wanted: u64, max: u64) -> Result<LeaseGrant, StoreError> {
        let _ = (sale, wanted, max);
        Err(StoreError::Unavailable("this store has no leases".into()))
    }
    /// Returns `units` of this node's lease to the sale's unleased pool.
    async fn release(&self, sale: SaleId, units: u64) -> Result<(), StoreError> {
        let _ = (sale, units);
        Err(StoreError::Unavailable("this store has no leases".into()))
    }
    /// Tells the cluster this node is alive (`Fenced` if it was declared dead).
    async fn heartbeat(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Declares dead the nodes whose heartbeat is older than the time to live and
    /// returns their leases to the sales.
    async fn reclaim(&self) -> Result<Reclaimed, StoreError> {
        Ok(Reclaimed::default())
    }
    /// A cluster store: every pending order in the database with its deadline, so a
    /// survivor of a reclaim expires what the removed nodes would have. Other stores
    /// answer nothing (their writer knows each pending order already).
    async fn pending_orders(&self) -> Result<Vec<(OrderId, i64)>, StoreError> {
        Ok(Vec::new())
    }
    async fn catalog(&self) -> Result<Catalog, StoreError> {
        Ok(Catalog::default())
    }
    /// A shopper's newest `limit` orders, newest first, read from the database. A
    /// cluster node cannot list from memory (orders placed on other nodes); a single
    /// writer can, and answers `None`.
    async fn orders_of_user(
        &self,
        user: &UserId,
        limit: u32,
    ) -> Result<Option<Vec<OrderRecord>>, StoreError> {
        let _ = (user, limit);
        Ok(None)
    }
    /// A cluster store: the shopper's order under this key, whichever node placed it (on
    /// a cluster a key names at most one order). A node that would refuse a purchase
    /// before its commit (sold out, ended) asks this first: the request may be a retry
    /// of an order another node placed. Other stores answer `None` (their engine holds
    /// every key it placed).
    async fn order_by_key(
        &self,
        user: &UserId,
        key: &IdempotencyKey,
    ) -> Result<Option<OrderRecord>, StoreError> {
        let _ = (user, key);
        Ok(None)
    }
    /// Leaves the cluster on a clean shutdown: every lease goes back to its sale, and the
    /// node's pending orders pass to the survivors (their next `reclaim` adopts them, as
    /// a dead node's).
    async fn leave(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// The oldest `limit` events in the outbox, oldest first. Stores opened without an
    /// outbox keep none.
    async fn outbox_read(&self, limit: usize) -> Result<Vec<OutboxEvent>, StoreError> {
        let _ = limit;
        Ok(Vec::new())
    }
    /// Whether this node's relay should publish the outbox now, given whether it is
    /// `ready` (connected to NATS, no recent failure; a ready relay's claim lasts the
    /// cluster's node time to live). In a cluster every node may run a relay but one
    /// publishes at a time: the oldest live member whose relay is ready, so the stream
    /// is not fed the same events by every node, and a node that stops heartbeating or
    /// whose relay cannot publish (no NATS, failing rounds) hands the turn on. A store
    /// with one writer: always.
    async fn relay_turn(&self, ready: bool) -> Result<bool, StoreError> {
        let _ = ready;
        Ok(true)
    }
    /// Removes exactly these events (they have been published). Not "everything up to
    /// the highest": with several nodes committing at once a lower `seq` can commit
    /// after a higher one was read, and must stay until it is published itself.
    async fn outbox_remove(&self, seqs: &[i64]) -> Result<(), StoreError> {
        let _ = seqs;
        Ok(())
    }
    /// The charge ledger's entries whose orders are no longer pending, for the engine's
    /// sweep: paid ones only need removing, closed ones are refunds a close did not
    /// start or that did not get through. A store that writes nothing durable keeps no
    /// ledger.
    async fn charges_to_settle(&self) -> Result<Vec<ChargeAttempt>, StoreError> {
        Ok(Vec::new())
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
    /// Saves `value` under `key` only if the stored one is still `expected` (`None`: no
    /// value yet), and says whether it did: a compare-and-swap, so that nodes sharing a
    /// database cannot overwrite each other's change unseen (the guard's rules).
    async fn save_setting_if(
        &self,
        key: &str,
        value: &str,
        expected: Option<&str>,
    ) -> Result<bool, StoreError> {
        let _ = (key, value, expected);
        Err(StoreError::Unavailable(
            "this store keeps no settings".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::lease_size;

    #[test]
    fn leases_shrink_with_the_stock_and_the_nodes() {
        // A quarter of a node's fair share...
        assert_eq!(lease_size(10_000, 1, 0, 100_000), 2_500);
        assert_eq!(lease_size(10_000, 5, 0, 100_000), 500);
        // ...capped, down to one unit at the tail, never more than is left.
        assert_eq!(lease_size(10_000, 1, 0, 1_024), 1_024);
        assert_eq!(lease_size(7, 3, 0, 1_024), 1);
        assert_eq!(lease_size(0, 3, 0, 1_024), 0);
        // Waiting buyers get what they wait for, if it is there.
        assert_eq!(lease_size(7, 3, 5, 1_024), 5);
        assert_eq!(lease_size(3, 3, 5, 1_024), 3);
    }
}
