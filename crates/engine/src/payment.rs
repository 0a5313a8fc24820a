//! The seam to the payment provider. The engine never speaks HTTP; the api crate
//! implements this trait over HTTP with a timeout.

use async_trait::async_trait;
use stampede_types::Cents;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    #[error("payment declined: {0}")]
    Declined(String),
    #[error("payment provider failed: {0}")]
    Unavailable(String),
    #[error("payment provider timed out")]
    Timeout,
    /// Not called: the provider's circuit breaker is open. Nothing was charged.
    #[error("payment provider unavailable (circuit open), retry in {retry_after_ms} ms")]
    CircuitOpen { retry_after_ms: u64 },
    /// Not called: the calls to the provider are at their configured limit (rate or
    /// in flight). Nothing was charged.
    #[error("too many payments in progress, retry in {retry_after_ms} ms")]
    Throttled { retry_after_ms: u64 },
    /// A refund's answer: the provider holds no charge under the key (never charged,
    /// or not yet: a charge that timed out may still land).
    #[error("the provider holds no charge under this key")]
    NotCharged,
}

#[async_trait]
pub trait PaymentGateway: Send + Sync + 'static {
    /// Charges `amount` once per `idempotency_key`: a retry with the same key must not
    /// charge again.
    async fn charge(&self, idempotency_key: &str, amount: Cents) -> Result<(), PaymentError>;
    /// Refunds the charge made under `idempotency_key`; `NotCharged` when there is none.
    /// Refunding twice refunds once.
    async fn refund(&self, idempotency_key: &str, amount: Cents) -> Result<(), PaymentError>;
}
