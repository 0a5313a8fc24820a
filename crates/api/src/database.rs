//! The database behind the guard's `database` circuit breaker: the writer reports every
//! commit to it, and while it is open purchases answer 503 `circuit_open` at once
//! instead of taking stock and queueing for a commit that is going to fail.

use std::sync::Arc;
use std::time::Duration;

use stampede_engine::CommitBreaker;

pub struct GuardedDatabase {
    pub guard: Arc<stampede_guard::Guard>,
}

impl CommitBreaker for GuardedDatabase {
    fn admit(&self) -> Result<(), Duration> {
        self.guard
            .dependency_admits("database")
            .map_err(|rejection| rejection.retry_after())
    }

    fn record(&self, elapsed: Duration, ok: bool) {
        self.guard.dependency_called("database", elapsed, ok);
    }
}
