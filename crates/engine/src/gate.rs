//! The stock gate outside the engine's memory: the conventional flash-sale design keeps
//! each sale's stock and the shoppers' counts in Redis and takes them with a Lua script.
//! Stampede offers it (`stock_gate = "redis"`) to compare with its own in-memory gate on
//! the same server, the same writer and the same durable log.
//!
//! **What it gives up.** The gate and the database are two systems: a crash after the
//! gate took stock and before the order's batch committed leaves the gate short (it
//! undersells until reloaded), so does a take whose reply was lost (the engine answers
//! 503 and cannot know whether to hand units back), and a gate that fails over loses
//! decrements: it then sells more than the sale holds, and nothing in the database
//! refuses those orders. The audit shows it (`consistent: false`), and `Engine::open`
//! refuses to start on such books. `Engine::open` reloads the gate from the durable
//! orders. A client that hangs up while a take is on its way costs nothing: the take
//! runs in a task of its own, which hands the units back when nobody awaits it.

use async_trait::async_trait;
use stampede_types::{SaleId, UserId};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateRefusal {
    #[error("sold out: {remaining} left")]
    SoldOut { remaining: u64 },
    #[error("per-user limit reached ({held} held)")]
    LimitExceeded { held: u32 },
    #[error("stock gate unavailable: {0}")]
    Unavailable(String),
}

/// The gate's stock of a sale right after one of its operations. Takes and give-backs
/// run side by side and their answers come back in any order, so each carries `seq`, the
/// sale's operation count in the gate when it ran: a count with a larger `seq` is the
/// later one, and the sale's view never goes back to an older count (see
/// `SaleInner::see_gate_count`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateCount {
    pub remaining: u64,
    pub seq: u64,
}

#[async_trait]
pub trait StockGate: Send + Sync + 'static {
    /// Sets a sale's remaining stock and the units each shopper holds (at start, from
    /// the durable orders; for a new sale, its quantity and nobody).
    async fn load(
        &self,
        sale: SaleId,
        remaining: u64,
        held: &[(UserId, u32)],
    ) -> Result<(), GateRefusal>;
    /// Takes `units` for `user` if the stock and the shopper's `limit` allow, atomically;
    /// answers what remains.
    async fn take(
        &self,
        sale: SaleId,
        user: &UserId,
        units: u32,
        limit: u32,
    ) -> Result<GateCount, GateRefusal>;
    /// Hands back units of an order that will not be (or no longer is) held; answers
    /// what remains after, or `None` for a sale the gate does not hold.
    async fn give_back(
        &self,
        sale: SaleId,
        user: &UserId,
        units: u32,
    ) -> Result<Option<GateCount>, GateRefusal>;
    async fn remaining(&self, sale: SaleId) -> Result<u64, GateRefusal>;
}
