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
        // Read the body under the same timeout: a provider that stalls mid-body is a timeout.
        let body = match response.text().await {
            Ok(body) => body,
            Err(e) if e.is_timeout() => return Err(PaymentError::Timeout),
            Err(e) => return Err(PaymentError::Unavailable(e.to_string())),
        };
        if status.is_success() {
            metrics::counter!("stampede_payment_calls_total", "outcome" => "ok").increment(1);
            Ok(())
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

#[async_trait]
impl PaymentGateway for HttpPayments {
    async fn charge(&self, idempotency_key: &str, amount: Cents) -> Result<(), PaymentError> {
        self.post("/v1/charges", idempotency_key, amount).await
    }

    async fn refund(&self, idempotency_key: &str, amount: Cents) -> Result<(), PaymentError> {
        self.post("/v1/refunds", idempotency_key, amount).await
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
        }
        let call = match self.guard.outbound("payment") {
            Ok(call) => call,
            Err(rejection) => {
                // Not called: the rate slot goes back, as for any request never made.
                admission.give_back();
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
