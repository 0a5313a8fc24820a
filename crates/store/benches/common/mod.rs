//! Shared by the store's benchmarks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use stampede_engine::Engine;
use stampede_types::{IdempotencyKey, Quantity, SaleId, UserId};

/// Purchases in flight at once in every durable-orders benchmark.
pub const BUYERS: u64 = 512;

/// `BUYERS` concurrent purchases of one unit, each answered only once durable; `counter`
/// numbers them so every key is new.
pub async fn purchase_round(engine: &Arc<Engine>, sale: SaleId, counter: &AtomicU64) {
    purchase_round_on(std::slice::from_ref(engine), sale, counter, BUYERS).await;
}

/// As `purchase_round`, with `buyers` in flight spread over several nodes of a cluster.
pub async fn purchase_round_on(
    engines: &[Arc<Engine>],
    sale: SaleId,
    counter: &AtomicU64,
    buyers: u64,
) {
    let one = Quantity::parse(1).unwrap();
    let handles: Vec<_> = (0..buyers)
        .map(|_| {
            let n = counter.fetch_add(1, Ordering::Relaxed);
            let engine = engines[n as usize % engines.len()].clone();
            tokio::spawn(async move {
                let user = UserId::parse(&format!("u{}", n % 100_000)).unwrap();
                let key = IdempotencyKey::parse(&format!("k{n}")).unwrap();
                engine
                    .purchase(user, key, sale, one)
                    .await
                    .expect("durable purchase");
            })
        })
        .collect();
    for handle in handles {
        handle.await.unwrap();
    }
}
