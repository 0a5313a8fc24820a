//! The seam to a circuit breaker that watches the database. The engine knows no guard;
//! the api crate implements this trait over the guard's `database` breaker.

use std::time::Duration;

/// The database seen as an outbound dependency: asked before a purchase takes stock,
/// told how each of the writer's commits went.
///
/// While the database fails or crawls, purchases are refused at once (503
/// `circuit_open`) instead of each taking stock, waiting in the queue for a commit that
/// fails or times out, and handing the stock back. Work already queued is always
/// committed: the breaker only stops new work from joining the queue.
pub trait CommitBreaker: Send + Sync + 'static {
    /// `Err(retry_after)` while the breaker is open.
    fn admit(&self) -> Result<(), Duration>;
    /// One commit of the writer (one batch, one transaction): how long it took and
    /// whether it held.
    fn record(&self, elapsed: Duration, ok: bool);
}
