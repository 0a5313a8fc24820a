//! What a shopper token costs: verified for the first time (every shopper's first
//! request in a flash sale) against found in the cache of verified tokens (a shopper
//! who comes back).
//!
//!   cargo bench -p stampede-api --bench auth

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use stampede_api::{Auth, Secret, mint_shopper_token};

fn tokens(c: &mut Criterion) {
    let secret = Secret::new("bench-jwt-secret");
    let exp = Some(4_102_444_800); // 2100-01-01
    let pool: Vec<String> = (0..200_000)
        .map(|i| mint_shopper_token(&secret, &format!("shopper-{i}"), exp))
        .collect();
    let mut group = c.benchmark_group("auth");
    group.bench_function("shopper_cached", |b| {
        let auth = Auth::new(Secret::new("admin"), &secret);
        auth.shopper(&pool[0]).unwrap();
        b.iter(|| auth.shopper(black_box(&pool[0])).unwrap())
    });
    group.bench_function("shopper_first_seen", |b| {
        // A fresh cache whenever the pool wraps, so every call verifies.
        let mut auth = Auth::new(Secret::new("admin"), &secret);
        let mut next = 0;
        b.iter(|| {
            if next == pool.len() {
                auth = Auth::new(Secret::new("admin"), &secret);
                next = 0;
            }
            next += 1;
            auth.shopper(black_box(&pool[next - 1])).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, tokens);
criterion_main!(benches);
