//! Per-check overhead of the guard, uncontended (target < 200 ns).
//!
//!   cargo bench -p stampede-guard --bench check

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use stampede_guard::{Behavior, Class, FlowRule, Guard, GuardRules, Param};

fn checks(c: &mut Criterion) {
    let rules = GuardRules {
        flow: vec![FlowRule {
            resource: "purchase".into(),
            // The most a rule allows; a fresh guard every CHUNK admissions (below) keeps
            // the bench measuring admissions, not refusals, however fast they get.
            qps: Some(1e7),
            burst: 1_000_000,
            behavior: Behavior::Reject {},
            max_concurrency: Some(1_000_000),
            dry_run: false,
        }],
        system: stampede_guard::rules::SystemRule {
            max_inflight: Some(1_000_000),
            ..Default::default()
        },
        ..GuardRules::default()
    };
    let guard = Guard::new(rules.clone()).unwrap();
    let browse = guard.resource("browse");
    let purchase = guard.resource("purchase");
    let mut group = c.benchmark_group("guard");
    group.bench_function("admit_no_rule", |b| {
        b.iter(|| drop(black_box(guard.admit(&browse, Class::Browse).unwrap())))
    });
    group.bench_function("admit_flow_rule", |b| {
        // A rule's burst (at most 1,000,000) lasts for CHUNK admissions at any speed:
        // each chunk gets a fresh guard, made outside the timed loop.
        const CHUNK: u64 = 500_000;
        b.iter_custom(|iters| {
            let mut timed = std::time::Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(CHUNK);
                left -= n;
                let guard = Guard::new(rules.clone()).unwrap();
                let purchase = guard.resource("purchase");
                let start = std::time::Instant::now();
                for _ in 0..n {
                    drop(black_box(guard.admit(&purchase, Class::Purchase).unwrap()));
                }
                timed += start.elapsed();
            }
            timed
        })
    });
    let keys: Vec<String> = (0..100_000).map(|i| format!("shopper-{i}")).collect();
    let mut i = 0;
    group.bench_function("hot_shopper", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            let _ = black_box(guard.check_hot(&purchase, Param::Shopper, &keys[i]));
        })
    });
    group.bench_function("hot_same_shopper", |b| {
        b.iter(|| {
            let _ = black_box(guard.check_hot(&purchase, Param::Shopper, "shopper-1"));
        })
    });
    group.bench_function("clock", |b| b.iter(|| black_box(guard.now())));
    group.bench_function("outbound_breaker", |b| {
        b.iter(|| guard.outbound("payment").unwrap().unwrap().finish(true))
    });
    // Asked on every purchase before it takes stock: the database breaker, closed.
    group.bench_function("database_admits", |b| {
        b.iter(|| black_box(guard.dependency_admits(black_box("database")).is_ok()))
    });
    group.finish();
}

criterion_group!(benches, checks);
criterion_main!(benches);
