//! Stampede's inventory engine.
//!
//! Sale state, remaining stock, per-user counts and idempotency answers live in memory;
//! stock is taken under a per-sale lock that is held for a few hundred nanoseconds and
//! never across I/O. Accepted purchases travel through one bounded queue to a single
//! writer that commits them in batches (one transaction per batch) and only then
//! releases the answers.
//!
//! **Architecture invariant:** this crate does no HTTP and no SQL. Storage is the
//! [`Store`] trait, the payment provider is the [`PaymentGateway`] trait.
//!
//! **Architecture invariant:** for every sale, at every moment,
//! `quantity == remaining + in_flight + durable(pending_payment + paid)`, and no shopper
//! holds more than `per_user_limit` units. Checked when state is rebuilt from storage
//! and by the audit.

mod breaker;
mod clock;
mod engine;
mod gate;
mod payment;
mod store;
pub mod testing;
mod writer;

pub use breaker::CommitBreaker;
pub use clock::{Clock, ManualClock, SystemClock};
pub use engine::{
    AckMode, Actor, AdminError, Audit, CLOSED_ORDERS_PER_SHOPPER_MAX, Engine, EngineConfig,
    LEDGER_QUEUE_WAIT, NewProduct, NewSale, ORDERS_LISTED_MAX, OrderError, Placed, ProductView,
    Purchase, PurchaseError, SaleView,
};
pub use gate::{GateCount, GateRefusal, StockGate};
pub use payment::{PaymentError, PaymentGateway};
pub use store::{
    AUDIT_CONNECTIONS, AUDITS_AT_ONCE, Catalog, ChargeAttempt, LeaseGrant, OpOutcome, OrderRecord,
    OutboxEvent, PendingTally, ProductRecord, Rebuild, Reclaimed, SaleRecord, SaleTally, Snapshot,
    Store, StoreError, WriteOp, lease_size,
};
