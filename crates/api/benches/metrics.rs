//! What recording a request's metrics costs: a labelled counter and histogram looked up
//! by name and labels on every request, against handles registered once.
//!
//!   cargo bench -p stampede-api --bench metrics

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};

fn record(c: &mut Criterion) {
    let _handle = stampede_api::metrics_handle();
    let mut group = c.benchmark_group("metrics");
    group.bench_function("looked_up_each_time", |b| {
        b.iter(|| {
            let (route, class) = (black_box("purchase"), black_box("2xx"));
            metrics::counter!("bench_requests_total", "route" => route, "class" => class)
                .increment(1);
            metrics::histogram!("bench_request_seconds", "route" => route).record(0.001);
        })
    });
    group.bench_function("registered_once", |b| {
        let counter =
            metrics::counter!("bench_requests_total", "route" => "purchase", "class" => "2xx");
        let histogram = metrics::histogram!("bench_request_seconds", "route" => "purchase");
        b.iter(|| {
            black_box(&counter).increment(1);
            black_box(&histogram).record(0.001);
        })
    });
    group.finish();
}

criterion_group!(benches, record);
criterion_main!(benches);
