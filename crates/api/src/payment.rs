//! The payment provider over HTTP, with a hard timeout and the order id as the
//! idempotency key, so a retried pay never charges twice.

use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use stampede_engine::{PaymentError, PaymentGateway};
use stampede_types::Cents;

pub struct HttpPayments {
    client: reqwest::Client,
    base_url: String,
}

#[derive(Serialize)]
struct ChargeRequest<'a> {
    idempotency_key: &'a str,
    amount_cents: i64,
}

impl HttpPayments {
    pub fn new(base_url: &str, timeout: Duration) -> Self {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_max_idle_per_host(64)
            // A charge is never followed elsewhere: a 301/302/303 would be re-sent as a
            // GET without its body, and a 2xx to that would read as paid with nothing
            // charged. A redirect is the provider failing to answer (502).
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("reqwest client builds without TLS");
        Self {
            client,
            base_url: base_url.trim_end_matches('/').to_owned(),
        }
    }

    async fn post(&self, path: &str, key: &str, amount: Cents) -> Result<(), PaymentError> {
        let result = self
            .client
            .post(format!("{}{path}", self.base_url))
            .json(&ChargeRequest {
                idempotency_key: key,
                amount_cents: amount.get(),
            })
            .send()
            .await;
        let response = match result {
            Ok(response) => response,
            Err(e) if e.is_timeout() => {
                metrics::counter!("stampede_payment_calls_total", "outcome" => "timeout")
                    .increment(1);
                return Err(PaymentError::Timeout);
            }
            Err(e) => {
                metrics::counter!("stampede_payment_calls_total", "outcome" => "error")
                    .increment(1);
                return Err(PaymentError::Unavailable(e.to_string()));
            }
        };
        let status = response.status();
        // Read the body under the same timeout (a provider that stalls mid-body is a
        // timeout), and no more of it than a decline's reason needs.
        let body = match read_prefix(response, BODY_READ_MAX).await {
            Ok(body) => String::from_utf8_lossy(&body).into_owned(),
            Err(e) if e.is_timeout() => return Err(PaymentError::Timeout),
            Err(e) => return Err(PaymentError::Unavailable(e.to_string())),
        };
        if status.is_success() {
            metrics::counter!("stampede_payment_calls_total", "outcome" => "ok").increment(1);
            Ok(())
        } else if path == REFUNDS && status.as_u16() == 404 && says_no_charge(&body) {
            // The provider's own answer: no charge under this key (yet). A bare 404 (a
            // wrong URL, a proxy) is a failure: it must not settle the ledger entry.
            metrics::counter!("stampede_payment_calls_total", "outcome" => "not_charged")
                .increment(1);
            Err(PaymentError::NotCharged)
        } else if status.as_u16() == 402 {
            metrics::counter!("stampede_payment_calls_total", "outcome" => "declined").increment(1);
            Err(PaymentError::Declined(body.chars().take(200).collect()))
        } else {
            metrics::counter!("stampede_payment_calls_total", "outcome" => "error").increment(1);
            Err(PaymentError::Unavailable(format!(
                "provider answered {status}"
            )))
        }
    }
}

const REFUNDS: &str = "/v1/refunds";

/// Whether a refund's 404 is the provider saying it holds no charge under the key
/// (`{"error": {"code": "no_charge"}}`).
fn says_no_charge(body: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(body)
        .is_ok_and(|body| body["error"]["code"] == "no_charge")
}

/// The most of a provider's answer read: its decline reason is cut to 200 characters.
const BODY_READ_MAX: usize = 4 * 1024;

/// Up to `max` bytes of the body; the rest is not read.
async fn read_prefix(mut response: reqwest::Response, max: usize) -> reqwest::Result<Vec<u8>> {
    let mut body = Vec::new();
    while body.len() < max {
        let Some(chunk) = response.chunk().await? else {
            break;
        };
        body.extend_from_slice(&chunk[..chunk.len().min(max - body.len())]);
    }
    Ok(body)
}

#[async_trait]
impl PaymentGateway for HttpPayments {
    async fn charge(&self, idempotency_key: &str, amount: Cents) -> Result<(), PaymentError> {
        self.post("/v1/charges", idempotency_key, amount).await
    }

    async fn refund(&self, idempotency_key: &str, amount: Cents) -> Result<(), PaymentError> {
        self.post(REFUNDS, idempotency_key, amount).await
    }
}

/// A payment provider behind the guard's `payment` circuit breaker: while the breaker is
/// open, charges fail at once with `CircuitOpen` (503 `circuit_open`) instead of waiting
/// for a provider that is down. Declines are the provider answering, not failing, so
/// they do not count against it. Refunds always go through: money owed is never held
/// back by a breaker.
pub struct GuardedPayments {
    pub inner: std::sync::Arc<dyn PaymentGateway>,
    pub guard: std::sync::Arc<stampede_guard::Guard>,
    /// The `payment` resource: its flow rule (rate, pacing, calls in flight) applies to
    /// each charge.
    pub resource: stampede_guard::Resource,
}

impl GuardedPayments {
    pub fn new(
        inner: std::sync::Arc<dyn PaymentGateway>,
        guard: std::sync::Arc<stampede_guard::Guard>,
    ) -> GuardedPayments {
        let resource = guard.resource("payment");
        GuardedPayments {
            inner,
            guard,
            resource,
        }
    }
}

#[async_trait]
impl PaymentGateway for GuardedPayments {
    async fn charge(&self, idempotency_key: &str, amount: Cents) -> Result<(), PaymentError> {
        // The flow rule first (a refused charge never reaches the breaker's counts),
        // held for the whole call so `max_concurrency` counts calls in flight.
        let mut admission = self
            .guard
            .admit_named(&self.resource)
            .map_err(|rejection| PaymentError::Throttled {
                retry_after_ms: rejection.retry_after().as_millis() as u64,
            })?;
        if !admission.wait.is_zero() {
            tokio::time::sleep(admission.wait).await;
            admission.sent();
        }
        let call = match self.guard.outbound("payment") {
            Ok(call) => call,
            Err(rejection) => {
                // Not called: the rate slot goes back, as for any request never made, and
                // the charge counts as blocked (on `outbound:payment`), not as passed here.
                admission.withdraw();
                return Err(PaymentError::CircuitOpen {
                    retry_after_ms: rejection.retry_after().as_millis() as u64,
                });
            }
        };
        let result = self.inner.charge(idempotency_key, amount).await;
        let ok = matches!(result, Ok(()) | Err(PaymentError::Declined(_)));
        if let Some(call) = call {
            call.finish(ok);
        }
        if !ok {
            admission.failed();
        }
        result
    }

    async fn refund(&self, idempotency_key: &str, amount: Cents) -> Result<(), PaymentError> {
        self.inner.refund(idempotency_key, amount).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A provider at `router`'s address.
    async fn provider(router: axum::Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        format!("http://{addr}")
    }

    /// Only the provider's own "no charge under this key" settles a refund as nothing to
    /// give back; a bare 404 (a wrong URL, a proxy) is a failure, retried later.
    #[tokio::test]
    async fn only_the_providers_no_charge_answer_means_nothing_to_refund() {
        let answer = |body: &'static str| {
            axum::Router::new().route(
                "/v1/refunds",
                axum::routing::post(
                    move || async move { (axum::http::StatusCode::NOT_FOUND, body) },
                ),
            )
        };
        let amount = Cents::parse("amount", 50).unwrap();
        let said = HttpPayments::new(
            &provider(answer(r#"{"error":{"code":"no_charge","message":"none"}}"#)).await,
            Duration::from_secs(5),
        )
        .refund("ord_1", amount)
        .await;
        assert_eq!(said, Err(PaymentError::NotCharged));
        let bare = HttpPayments::new(&provider(answer("Not Found")).await, Duration::from_secs(5))
            .refund("ord_1", amount)
            .await;
        assert!(
            matches!(bare, Err(PaymentError::Unavailable(_))),
            "{bare:?}"
        );
    }

    #[tokio::test]
    async fn a_redirected_charge_is_a_failure_not_a_payment() {
        // The provider redirects the charge to a page that answers any GET with 200.
        let followed = Arc::new(AtomicU32::new(0));
        let seen = followed.clone();
        let router = axum::Router::new()
            .route(
                "/v1/charges",
                axum::routing::post(|| async { axum::response::Redirect::to("/elsewhere") }),
            )
            .route(
                "/elsewhere",
                axum::routing::get(move || async move {
                    seen.fetch_add(1, Ordering::SeqCst);
                    "ok"
                }),
            );
        let payments = HttpPayments::new(&provider(router).await, Duration::from_secs(5));
        let charged = payments
            .charge("ord_1", Cents::parse("amount", 50).unwrap())
            .await;
        assert!(
            matches!(charged, Err(PaymentError::Unavailable(ref why)) if why.contains("303")),
            "{charged:?}"
        );
        assert_eq!(
            followed.load(Ordering::SeqCst),
            0,
            "the redirect was followed"
        );
    }

    #[tokio::test]
    async fn a_decline_reads_no_more_than_its_reason_needs() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A provider that declines with a body that never ends: reading it whole would
        // wait out the timeout (and hold ever more memory meanwhile).
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            let head = "HTTP/1.1 402 Payment Required\r\ntransfer-encoding: chunked\r\n\r\n";
            socket.write_all(head.as_bytes()).await.unwrap();
            let chunk = format!("{:x}\r\n{}\r\n", 1400, "card declined ".repeat(100));
            while socket.write_all(chunk.as_bytes()).await.is_ok() {}
        });
        let payments = HttpPayments::new(&format!("http://{addr}"), Duration::from_secs(5));
        match payments
            .charge("ord_1", Cents::parse("amount", 50).unwrap())
            .await
        {
            Err(PaymentError::Declined(reason)) => {
                assert!(reason.starts_with("card declined"), "{reason}");
                assert!(reason.chars().count() <= 200);
            }
            other => panic!("{other:?}"),
        }
    }
}
