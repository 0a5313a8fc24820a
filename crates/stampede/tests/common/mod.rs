//! Black-box test harness: a real `stampede` server started in-process on an ephemeral
//! port, a fresh data directory, and the payment simulator as a separate process.
//!
//! Every helper speaks plain HTTP through `reqwest`; nothing here reaches into the
//! engine or the store.

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use stampede::{Config, Running};
use stampede_api::Secret;
use stampede_store::testing::{Backend, TestDatabase};
use tempfile::TempDir;
use tokio::io::AsyncBufReadExt;

pub mod child;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";
pub const JWT_SECRET: &str = "test-jwt-secret-fedcba9876543210";

/// Upper bound of every "wait until the server has done X" loop.
pub const POLL_LIMIT: Duration = Duration::from_secs(10);

// ---- HTTP plumbing -----------------------------------------------------------------------

/// One answer: status, body (JSON, or the raw text as a JSON string) and headers.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub headers: HeaderMap,
}

impl Reply {
    /// The `error.code` of an error body, after checking the body has exactly the shape
    /// `{"error": {"code": "...", "message": "..."}}`.
    pub fn error_code(&self) -> &str {
        assert_error_shape(&self.body);
        self.body["error"]["code"].as_str().expect("checked above")
    }
}

pub async fn send(request: reqwest::RequestBuilder) -> Reply {
    let response = request.send().await.expect("the server answers");
    read(response).await
}

pub async fn read(response: reqwest::Response) -> Reply {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.expect("read the response body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Reply {
        status,
        body,
        headers,
    }
}

/// Checks `{"error": {"code": "<snake_case>", "message": "<text>"}}` and nothing else.
pub fn assert_error_shape(body: &Value) {
    let top = body
        .as_object()
        .unwrap_or_else(|| panic!("error body is not an object: {body}"));
    assert_eq!(
        top.len(),
        1,
        "error body has keys other than \"error\": {body}"
    );
    let error = top
        .get("error")
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("error body has no \"error\" object: {body}"));
    assert_eq!(
        error.len(),
        2,
        "error object must hold exactly code and message: {body}"
    );
    let code = error
        .get("code")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string code: {body}"));
    assert!(
        !code.is_empty()
            && code
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
        "code is not snake_case: {body}"
    );
    assert!(
        error.get("message").and_then(Value::as_str).is_some(),
        "no string message: {body}"
    );
}

/// Asserts an error answer: its status, its code and its shape.
#[track_caller]
pub fn assert_error(reply: &Reply, status: u16, code: &str) {
    assert_eq!(
        reply.status, status,
        "expected {status} {code}, got {} {}",
        reply.status, reply.body
    );
    assert_error_shape(&reply.body);
    assert_eq!(
        reply.body["error"]["code"], code,
        "unexpected error code: {}",
        reply.body
    );
}

pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

pub fn rfc3339_in(offset: chrono::Duration) -> String {
    (chrono::Utc::now() + offset).to_rfc3339()
}

/// A client fit for many concurrent requests to one host.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(4_096)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("reqwest client builds")
}

/// Raises the soft limit of open files to the hard limit (best effort), so thousands of
/// concurrent connections (client and server sides in one process) fit.
pub fn raise_fd_limit() {
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

// ---- the payment simulator (its own process) -----------------------------------------------

pub struct PaymentSim {
    pub url: String,
    client: reqwest::Client,
    _child: tokio::process::Child,
}

impl PaymentSim {
    pub async fn spawn() -> PaymentSim {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_stampede"))
            .args([
                "payment-sim",
                "--listen",
                "127.0.0.1:0",
                "--latency",
                "0ms",
                "--failure-rate",
                "0",
            ])
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the payment simulator");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut first_line = String::new();
        tokio::time::timeout(
            Duration::from_secs(30),
            tokio::io::BufReader::new(stdout).read_line(&mut first_line),
        )
        .await
        .expect("the payment simulator prints its address in time")
        .expect("read the simulator's stdout");
        let url = first_line
            .trim()
            .strip_prefix("payment-sim listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from the simulator: {first_line:?}"))
            .to_owned();
        PaymentSim {
            url,
            client: reqwest::Client::new(),
            _child: child,
        }
    }

    /// Changes latency and failure rate while everything runs.
    pub async fn configure(&self, latency_ms: u64, failure_rate: f64) {
        let reply = send(
            self.client
                .post(format!("{}/v1/config", self.url))
                .json(&json!({"latency_ms": latency_ms, "failure_rate": failure_rate})),
        )
        .await;
        assert_eq!(reply.status, 200, "configure the simulator: {}", reply.body);
    }

    /// `{amount_cents, attempts, charged, refunded}` of one key, or `None` if never charged.
    pub async fn charge(&self, key: &str) -> Option<Value> {
        let reply = send(self.client.get(format!("{}/v1/charges/{key}", self.url))).await;
        match reply.status {
            200 => Some(reply.body),
            404 => None,
            other => panic!("simulator answered {other}: {}", reply.body),
        }
    }

    pub async fn stats(&self) -> Value {
        let reply = send(self.client.get(format!("{}/v1/stats", self.url))).await;
        assert_eq!(reply.status, 200);
        reply.body
    }
}

// ---- the app under test ----------------------------------------------------------------------

pub struct TestApp {
    /// `None` only between `stop` and `start`.
    pub running: Option<Running>,
    pub config: Config,
    pub base: String,
    pub admin: String,
    pub jwt_secret: Secret,
    pub client: reqwest::Client,
    pub sim: PaymentSim,
    /// Kept alive for the app's lifetime (and across restarts); removed on drop.
    pub data_dir: TempDir,
    /// The server database of this app (none for SQLite); dropped after the server.
    pub database: TestDatabase,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(customise: impl FnOnce(&mut Config)) -> TestApp {
    spawn_app_on_with(Backend::Sqlite, customise).await
}

/// An app on a fresh database of `backend`.
pub async fn spawn_app_on(backend: Backend) -> TestApp {
    spawn_app_on_with(backend, |_| {}).await
}

pub async fn spawn_app_on_with(backend: Backend, customise: impl FnOnce(&mut Config)) -> TestApp {
    let sim = PaymentSim::spawn().await;
    let data_dir = tempfile::tempdir().expect("create a temporary data directory");
    let database = TestDatabase::create(backend).await;
    let mut config = Config {
        listen: "127.0.0.1:0".parse().expect("valid address"),
        database_url: database.url.clone(),
        data_dir: data_dir.path().to_path_buf(),
        admin_token: Some(ADMIN_TOKEN.into()),
        jwt_secret: Some(JWT_SECRET.into()),
        payment_url: sim.url.clone(),
        log: "warn".into(),
        ..Config::default()
    };
    customise(&mut config);
    config.validate().expect("the test configuration is valid");
    let running = start_running(&config).await;
    TestApp {
        base: running.url(),
        admin: running.admin_token.expose().to_owned(),
        jwt_secret: running.jwt_secret.clone(),
        running: Some(running),
        config,
        client: client(),
        sim,
        data_dir,
        database,
    }
}

async fn start_running(config: &Config) -> Running {
    let (running, generated) = stampede::start(config, std::future::pending())
        .await
        .expect("the server starts");
    assert!(
        !generated,
        "the admin token is configured, nothing should be generated"
    );
    running
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Graceful stop: in-flight requests finish and the writer drains.
    pub async fn stop(&mut self) {
        let running = self.running.take().expect("the app is running");
        running.stop().await.expect("graceful stop");
    }

    /// Starts again with the same configuration and data directory (new port).
    pub async fn start(&mut self) {
        assert!(self.running.is_none(), "stop the app first");
        let running = start_running(&self.config).await;
        self.base = running.url();
        self.running = Some(running);
    }

    pub async fn restart(&mut self) {
        self.stop().await;
        self.start().await;
    }

    /// A shopper JWT for `sub`, valid for an hour.
    pub fn shopper(&self, sub: &str) -> String {
        stampede_api::mint_shopper_token(&self.jwt_secret, sub, Some(now_s() + 3_600))
    }

    // ---- raw requests -----------------------------------------------------------------------

    pub async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        let mut request = self.client.get(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        send(request).await
    }

    pub async fn post_json(&self, path: &str, token: Option<&str>, body: &Value) -> Reply {
        let mut request = self.client.post(self.url(path)).json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        send(request).await
    }

    /// POST with a raw body sent as `application/json`.
    pub async fn post_raw(
        &self,
        path: &str,
        token: Option<&str>,
        idempotency_key: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> Reply {
        let mut request = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        send(request).await
    }

    // ---- products and sales -------------------------------------------------------------------

    pub async fn post_product(&self, sku: &str, stock: i64) -> Reply {
        self.post_json(
            "/v1/products",
            Some(&self.admin),
            &json!({"sku": sku, "name": format!("Product {sku}"), "price_cents": 1_999, "stock": stock}),
        )
        .await
    }

    pub async fn create_product(&self, sku: &str, stock: i64) -> Value {
        let reply = self.post_product(sku, stock).await;
        assert_eq!(reply.status, 201, "create product: {}", reply.body);
        reply.body
    }

    pub async fn post_sale(&self, body: &Value) -> Reply {
        self.post_json("/v1/flash-sales", Some(&self.admin), body)
            .await
    }

    /// A sale of `quantity` units at 999 cents, live from a second ago for an hour.
    pub async fn create_sale(&self, sku: &str, quantity: i64, per_user_limit: i64) -> String {
        self.create_sale_between(
            sku,
            quantity,
            per_user_limit,
            chrono::Duration::seconds(-1),
            chrono::Duration::hours(1),
        )
        .await
    }

    pub async fn create_sale_between(
        &self,
        sku: &str,
        quantity: i64,
        per_user_limit: i64,
        starts_in: chrono::Duration,
        ends_in: chrono::Duration,
    ) -> String {
        let reply = self
            .post_sale(&json!({
                "sku": sku,
                "price_cents": 999,
                "quantity": quantity,
                "per_user_limit": per_user_limit,
                "starts_at": rfc3339_in(starts_in),
                "ends_at": rfc3339_in(ends_in),
            }))
            .await;
        assert_eq!(reply.status, 201, "create sale: {}", reply.body);
        reply.body["id"].as_str().expect("sale id").to_owned()
    }

    /// A fresh product with exactly `quantity` units and a live sale of all of them.
    pub async fn live_sale(&self, sku: &str, quantity: i64, per_user_limit: i64) -> String {
        self.create_product(sku, quantity).await;
        self.create_sale(sku, quantity, per_user_limit).await
    }

    pub async fn product(&self, sku: &str) -> Value {
        let reply = self.get(&format!("/v1/products/{sku}"), None).await;
        assert_eq!(reply.status, 200, "get product: {}", reply.body);
        reply.body
    }

    pub async fn sale(&self, sale_id: &str) -> Value {
        let reply = self.get(&format!("/v1/flash-sales/{sale_id}"), None).await;
        assert_eq!(reply.status, 200, "get sale: {}", reply.body);
        reply.body
    }

    pub async fn remaining(&self, sale_id: &str) -> u64 {
        self.sale(sale_id).await["remaining"]
            .as_u64()
            .expect("remaining")
    }

    pub async fn audit(&self, sale_id: &str) -> Value {
        let reply = self
            .get(
                &format!("/v1/flash-sales/{sale_id}/audit"),
                Some(&self.admin),
            )
            .await;
        assert_eq!(reply.status, 200, "audit: {}", reply.body);
        reply.body
    }

    // ---- purchases and orders -------------------------------------------------------------------

    pub async fn purchase(
        &self,
        token: &str,
        sale_id: &str,
        key: &str,
        quantity: i64,
    ) -> (u16, Value) {
        let reply = self.purchase_reply(token, sale_id, key, quantity).await;
        (reply.status, reply.body)
    }

    pub async fn purchase_reply(
        &self,
        token: &str,
        sale_id: &str,
        key: &str,
        quantity: i64,
    ) -> Reply {
        send(
            self.client
                .post(self.url(&format!("/v1/flash-sales/{sale_id}/purchase")))
                .bearer_auth(token)
                .header("idempotency-key", key)
                .json(&json!({"quantity": quantity})),
        )
        .await
    }

    /// Purchases and asserts 201; returns the order id.
    pub async fn buy(&self, token: &str, sale_id: &str, key: &str, quantity: i64) -> String {
        let (status, body) = self.purchase(token, sale_id, key, quantity).await;
        assert_eq!(status, 201, "purchase: {body}");
        body["order_id"].as_str().expect("order id").to_owned()
    }

    pub async fn order(&self, token: &str, order_id: &str) -> Reply {
        self.get(&format!("/v1/orders/{order_id}"), Some(token))
            .await
    }

    pub async fn order_status(&self, token: &str, order_id: &str) -> String {
        let reply = self.order(token, order_id).await;
        assert_eq!(reply.status, 200, "get order: {}", reply.body);
        reply.body["status"].as_str().expect("status").to_owned()
    }

    pub async fn orders(&self, token: &str) -> Vec<Value> {
        let reply = self.get("/v1/orders", Some(token)).await;
        assert_eq!(reply.status, 200, "list orders: {}", reply.body);
        reply.body["orders"]
            .as_array()
            .expect("orders array")
            .clone()
    }

    pub async fn pay(&self, token: &str, order_id: &str) -> Reply {
        send(
            self.client
                .post(self.url(&format!("/v1/orders/{order_id}/pay")))
                .bearer_auth(token),
        )
        .await
    }

    pub async fn cancel(&self, token: &str, order_id: &str) -> Reply {
        send(
            self.client
                .post(self.url(&format!("/v1/orders/{order_id}/cancel")))
                .bearer_auth(token),
        )
        .await
    }
}

/// Polls `probe` (bounded by [`POLL_LIMIT`]) until it yields `Some`; panics with `what`
/// otherwise. The pause between probes only paces the loop; nothing is asserted on time.
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + POLL_LIMIT;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks the books of a sale: `consistent`, nothing in flight, nobody over the limit and
/// `quantity == remaining + pending_payment + paid`. Returns the audit.
#[track_caller]
pub fn assert_books(audit: &Value) {
    let n = |field: &str| {
        audit[field]
            .as_u64()
            .unwrap_or_else(|| panic!("audit.{field} missing: {audit}"))
    };
    assert_eq!(audit["consistent"], true, "audit not consistent: {audit}");
    assert_eq!(n("users_over_limit"), 0, "{audit}");
    assert_eq!(n("in_flight"), 0, "{audit}");
    assert_eq!(
        n("quantity"),
        n("remaining") + n("pending_payment") + n("paid"),
        "units do not add up: {audit}"
    );
}
