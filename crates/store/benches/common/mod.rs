//! Shared by the store's benchmarks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use stampede_engine::Engine;
use stampede_types::{IdempotencyKey, Quantity, SaleId, UserId};

/// Purchases in flight at once in every durable-orders benchmark.
pub const BUYERS: u64 = 512;

/// `buyers` concurrent purchases of one unit spread over `engines` (one, or the nodes of
/// a cluster), each answered only once durable; `counter` numbers them so every key is
/// new.
#[allow(dead_code)] // the store's benches'; the relay's drain bench includes this module too
pub async fn purchase_round_on(
    engines: &[Arc<Engine>],
    sale: SaleId,
    counter: &AtomicU64,
    buyers: u64,
) {
    let handles: Vec<_> = (0..buyers)
        .map(|_| {
            let n = counter.fetch_add(1, Ordering::Relaxed);
            let engine = engines[n as usize % engines.len()].clone();
            tokio::spawn(async move { buy_one(&engine, sale, n).await })
        })
        .collect();
    for handle in handles {
        handle.await.unwrap();
    }
}

/// `total` purchases kept at `concurrency` in flight the whole time, spread over the
/// nodes: each buyer places its next purchase as soon as its last is answered (constant
/// pressure, as during a stampede, rather than waves that drain between rounds).
#[allow(dead_code)] // not the writer bench's, which includes this module too
pub async fn purchase_stream_on(
    engines: &[Arc<Engine>],
    sale: SaleId,
    counter: &Arc<AtomicU64>,
    concurrency: u64,
    total: u64,
) {
    let issued = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..concurrency)
        .map(|buyer| {
            let engine = engines[buyer as usize % engines.len()].clone();
            let (issued, counter) = (issued.clone(), counter.clone());
            tokio::spawn(async move {
                while issued.fetch_add(1, Ordering::Relaxed) < total {
                    buy_one(&engine, sale, counter.fetch_add(1, Ordering::Relaxed)).await;
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.unwrap();
    }
}

/// Purchase number `n`: one unit for shopper `u<n mod 100,000>` under a key of its own,
/// answered once durable.
async fn buy_one(engine: &Engine, sale: SaleId, n: u64) {
    let user = UserId::parse(&format!("u{}", n % 100_000)).unwrap();
    let key = IdempotencyKey::parse(&format!("k{n}")).unwrap();
    engine
        .purchase(user, key, sale, Quantity::parse(1).unwrap())
        .await
        .expect("durable purchase");
}
