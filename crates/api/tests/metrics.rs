//! Request latency is kept per status class: a refusal's time (fast, or held for a
//! second on purpose) never blurs the time of the requests that were served. Its own
//! test binary, so the process-wide recorder counts only these requests.

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use stampede_api::{Secret, mint_shopper_token};
use stampede_engine::testing::live_sale;
use tower::ServiceExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_latency_is_kept_apart_by_status_class() {
    let dir = tempfile::tempdir().unwrap();
    let engine =
        stampede_store::testing::reserved_sqlite_engine(&dir.path().join("metrics.db")).await;
    let sale = live_sale(&engine, "METRICS-1", 10, 10, 100, 5).await;
    let jwt = Secret::new("metrics-jwt-secret");
    let app = stampede_api::testing::router(engine, &jwt);
    let metrics = stampede_api::metrics_handle();
    let peer = stampede_api::testing::peer();
    let token = format!("Bearer {}", mint_shopper_token(&jwt, "shopper-1", None));
    let purchase = |key: Option<&str>| {
        let mut request = Request::post(format!("/v1/flash-sales/{sale}/purchase"))
            .header(header::AUTHORIZATION, token.as_str())
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let mut request = request.body(Body::from(r#"{"quantity":1}"#)).unwrap();
        request.extensions_mut().insert(peer.clone());
        request
    };
    let served = app.clone().oneshot(purchase(Some("k-1"))).await.unwrap();
    assert_eq!(served.status(), StatusCode::CREATED);
    for _ in 0..2 {
        let refused = app.clone().oneshot(purchase(None)).await.unwrap();
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    }

    let text = metrics.render();
    let count = |class: &str| {
        let series =
            format!(r#"stampede_http_request_seconds_count{{route="purchase",class="{class}"}} "#);
        text.lines()
            .find_map(|line| line.strip_prefix(series.as_str()))
            .map(|n| n.trim().parse::<u64>().unwrap())
            .unwrap_or(0)
    };
    assert_eq!(count("2xx"), 1, "{text}");
    assert_eq!(count("4xx"), 2, "{text}");
    assert_eq!(count("5xx"), 0, "{text}");
}
