//! The engine's heap per order it holds while the order's sale runs (its idempotency
//! answer, its shopper's count and order list, its expiry): measured by a counting
//! allocator (requested sizes, so the same on any allocator) over 50,000 purchases of
//! as many shoppers, each with a key of the usual UUID length. The idempotency map's room
//! is made when the sale opens and is not counted here. A bound, not a timing: what a
//! sale of N orders needs in memory is N times this, so it must not creep up unnoticed.
//! In a process of its own (its own test binary), since it counts every allocation.
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};

use stampede_engine::EngineConfig;
use stampede_engine::testing::{live_sale, one};
use stampede_store::testing::sqlite_engine;
use stampede_types::{IdempotencyKey, UserId};

/// The system allocator, counting the bytes requested and not yet freed.
struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LIVE.fetch_add(n as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}
#[global_allocator]
static COUNTING: Counting = Counting;

/// Measured 244 bytes when written (292 before a shopper's order list started with room
/// for one order instead of four).
const BYTES_PER_ORDER_MAX: isize = 280;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_held_costs_the_engine_a_bounded_few_hundred_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let engine =
        Arc::new(sqlite_engine(&dir.path().join("memory.db"), EngineConfig::default()).await);
    const N: u64 = 50_000;
    let sale = live_sale(&engine, "MEM", 1_000_000_000, 1_000_000_000, 50, 1000).await;
    let before = LIVE.load(Ordering::Relaxed);
    for wave in 0..N / 1000 {
        let buyers: Vec<_> = (0..1000)
            .map(|i| {
                let engine = engine.clone();
                let n = wave * 1000 + i;
                tokio::spawn(async move {
                    let user = UserId::parse(&format!("shopper-{n:06}")).unwrap();
                    let key =
                        IdempotencyKey::parse(&format!("0f8fad5b-d9cb-469f-a165-{n:012}")).unwrap();
                    engine.purchase(user, key, sale, one()).await.unwrap()
                })
            })
            .collect();
        for b in buyers {
            b.await.unwrap();
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let after = LIVE.load(Ordering::Relaxed);
    let per_order = (after - before) / N as isize;
    eprintln!("{per_order} bytes of heap per order held ({N} orders)");
    assert!(
        per_order <= BYTES_PER_ORDER_MAX,
        "{per_order} bytes per order, over {BYTES_PER_ORDER_MAX}"
    );
    engine.shutdown().await;
}
