//! A request's cost through the whole router in process, without sockets or a load
//! generator sharing the CPU: `/healthz`, a guarded read (`GET` a sale) and a purchase
//! (acknowledged once reserved, so the bench measures the request path, not the fsync),
//! each through the same middlewares (`track`, the guard's `protect`) and handlers as
//! on the server.
//!
//!   cargo bench -p stampede-api --bench router

use axum::body::Body;
use axum::http::{Request, header};
use criterion::{Criterion, criterion_group, criterion_main};
use stampede_api::{Secret, mint_shopper_token};
use tower::ServiceExt;

fn router(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let jwt = Secret::new("bench-jwt-secret");
    let (app, sale) = runtime.block_on(async {
        let engine =
            stampede_store::testing::reserved_sqlite_engine(&dir.path().join("bench.db")).await;
        let sale =
            stampede_api::testing::open_sale(&engine, "BENCH", 1_000_000_000, 1_000_000).await;
        let app = stampede_api::testing::router(engine, &jwt);
        (app, sale)
    });
    // As the server's connections give them (one connection carries every request).
    let peer = stampede_api::testing::peer();
    // Enough shoppers that each stays well under the shipped per-shopper limit (10
    // purchases a second) even at 3 µs a purchase (5.6/s), and few enough that every
    // token stays in the server's token cache (65,536 in 16 shards of 4,096), so the
    // bench measures a cached token's check as the capacity runs do.
    let tokens: Vec<String> = (0..48_000)
        .map(|i| {
            format!(
                "Bearer {}",
                mint_shopper_token(&jwt, &format!("shopper-{i}"), None)
            )
        })
        .collect();
    let purchase_path = format!("/v1/flash-sales/{sale}/purchase");
    let sale_path = format!("/v1/flash-sales/{sale}");

    let mut group = c.benchmark_group("router");
    group.bench_function("healthz", |b| {
        b.to_async(&runtime).iter(|| {
            let mut request = Request::get("/healthz").body(Body::empty()).unwrap();
            request.extensions_mut().insert(peer.clone());
            let app = app.clone();
            async move {
                let response = app.oneshot(request).await.unwrap();
                assert!(response.status().is_success());
            }
        })
    });
    group.bench_function("get_sale", |b| {
        b.to_async(&runtime).iter(|| {
            let mut request = Request::get(sale_path.as_str())
                .body(Body::empty())
                .unwrap();
            request.extensions_mut().insert(peer.clone());
            let app = app.clone();
            async move {
                let response = app.oneshot(request).await.unwrap();
                assert!(response.status().is_success());
            }
        })
    });
    let mut n = 0usize;
    group.bench_function("purchase_reserved", |b| {
        b.to_async(&runtime).iter(|| {
            n += 1;
            let mut request = Request::post(purchase_path.as_str())
                .header(header::AUTHORIZATION, tokens[n % tokens.len()].as_str())
                .header("idempotency-key", format!("k-{n}"))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(r#"{"quantity":1}"#))
                .unwrap();
            request.extensions_mut().insert(peer.clone());
            let app = app.clone();
            async move {
                let response = app.oneshot(request).await.unwrap();
                if response.status() != 201 {
                    let status = response.status();
                    let body = axum::body::to_bytes(response.into_body(), 4096).await;
                    panic!("purchase {n} answered {status}: {body:?}");
                }
            }
        })
    });
    group.finish();
}

criterion_group!(benches, router);
criterion_main!(benches);
