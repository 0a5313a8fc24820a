//! `stampede serve` as a child process, for tests that kill it (SIGKILL) or run several.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use stampede_api::{Secret, mint_shopper_token};

use super::*;

/// A `stampede serve` child process.
pub struct Server {
    child: tokio::process::Child,
    pub base: String,
    pub client: reqwest::Client,
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

impl Server {
    pub async fn start(data_dir: &Path, extra_args: &[&str]) -> Server {
        let client = client();
        for _ in 0..5 {
            let port = free_port();
            let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_stampede"));
            for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("STAMPEDE_")) {
                command.env_remove(name);
            }
            let mut child = command
                .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
                .arg("--data-dir")
                .arg(data_dir)
                .args(extra_args)
                .env("STAMPEDE_ADMIN_TOKEN", ADMIN_TOKEN)
                .env("STAMPEDE_JWT_SECRET", JWT_SECRET)
                .env("RUST_LOG", "error")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("start stampede serve");
            let base = format!("http://127.0.0.1:{port}");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = child.try_wait().expect("poll the child") {
                    eprintln!("stampede serve exited early ({status}); trying another port");
                    break;
                }
                if let Ok(response) = client.get(format!("{base}/healthz")).send().await
                    && response.status() == 200
                {
                    return Server {
                        child,
                        base,
                        client,
                    };
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "stampede serve did not answer /healthz"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        panic!("stampede serve did not start");
    }

    pub fn pid(&self) -> i32 {
        self.child.id().expect("the child runs") as i32
    }

    /// SIGKILL and reap.
    pub async fn kill9(mut self) {
        if let Some(pid) = self.child.id() {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let status = self.child.wait().await.expect("reap the child");
        assert!(!status.success(), "the child was killed: {status}");
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn admin_post(&self, path: &str, body: &Value) -> Reply {
        send(
            self.client
                .post(self.url(path))
                .bearer_auth(ADMIN_TOKEN)
                .json(body),
        )
        .await
    }

    pub async fn admin_get(&self, path: &str) -> Reply {
        send(self.client.get(self.url(path)).bearer_auth(ADMIN_TOKEN)).await
    }

    pub async fn purchase(&self, token: &str, sale: &str, key: &str) -> Reply {
        send(
            self.client
                .post(self.url(&format!("/v1/flash-sales/{sale}/purchase")))
                .bearer_auth(token)
                .header("idempotency-key", key)
                .json(&json!({"quantity": 1})),
        )
        .await
    }

    /// Purchases, retrying 503 overloaded with backoff (same key: a retry is a replay).
    pub async fn purchase_decided(&self, token: &str, sale: &str, key: &str) -> Reply {
        for attempt in 0..100u64 {
            let reply = self.purchase(token, sale, key).await;
            if reply.status != 503 {
                return reply;
            }
            tokio::time::sleep(Duration::from_millis(10 + 5 * attempt.min(20))).await;
        }
        panic!("purchase still overloaded after 100 attempts");
    }

    /// A product of `units` and a sale of all of them at one per shopper, live for an
    /// hour: the sale's id.
    pub async fn live_sale(&self, sku: &str, units: usize) -> String {
        let reply = self
            .admin_post(
                "/v1/products",
                &json!({"sku": sku, "name": "test product", "price_cents": 1_000, "stock": units}),
            )
            .await;
        assert_eq!(reply.status, 201, "{}", reply.body);
        let now = chrono::Utc::now();
        let reply = self
            .admin_post(
                "/v1/flash-sales",
                &json!({
                    "sku": sku, "price_cents": 500, "quantity": units, "per_user_limit": 1,
                    "starts_at": (now - chrono::Duration::seconds(1)).to_rfc3339(),
                    "ends_at": (now + chrono::Duration::hours(1)).to_rfc3339(),
                }),
            )
            .await;
        assert_eq!(reply.status, 201, "{}", reply.body);
        reply.body["id"].as_str().expect("sale id").to_owned()
    }

    pub async fn audit(&self, sale: &str) -> Value {
        let reply = self
            .admin_get(&format!("/v1/flash-sales/{sale}/audit"))
            .await;
        assert_eq!(reply.status, 200, "audit: {}", reply.body);
        reply.body
    }
}

/// A shopper's token, valid for an hour.
pub fn shopper(sub: &str) -> String {
    mint_shopper_token(&Secret::new(JWT_SECRET), sub, Some(now_s() + 3_600))
}
