//! `stampede payment-sim`: a stand-in for the third-party payment provider, run as its
//! own process. Latency and failure rate are configurable at start and at run time
//! (`POST /v1/config`), so tests can make it slow or failing while Stampede runs.
//!
//! Charges are idempotent by key: the same key never charges twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use parking_lot::Mutex;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// The simulator refuses new charges beyond this many keys rather than grow forever.
pub const CHARGES_MAX: usize = 1_000_000;

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// Added before every answer.
    pub latency_ms: u64,
    /// Share of calls (0.0..=1.0) answered 503 without charging.
    pub failure_rate: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Charge {
    pub amount_cents: i64,
    /// Calls made with this key, including failed and replayed ones.
    pub attempts: u64,
    /// Times money actually moved: 0 or 1.
    pub charged: u64,
    pub refunded: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct Stats {
    pub charges: u64,
    pub attempts: u64,
    pub injected_failures: u64,
    pub refunds: u64,
}

struct Sim {
    config: Mutex<SimConfig>,
    charges: Mutex<HashMap<String, Charge>>,
    stats: Mutex<Stats>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChargeRequest {
    idempotency_key: String,
    amount_cents: i64,
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(serde_json::json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

async fn delay_and_maybe_fail(sim: &Sim) -> Option<Response> {
    let config = *sim.config.lock();
    if config.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(config.latency_ms)).await;
    }
    if config.failure_rate > 0.0 && rand::rng().random_bool(config.failure_rate.clamp(0.0, 1.0)) {
        sim.stats.lock().injected_failures += 1;
        return Some(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "provider_unavailable",
            "injected failure",
        ));
    }
    None
}

/// A real provider finishes a charge even when the caller has stopped waiting, so the
/// work runs in its own task: a caller's timeout does not cancel it.
async fn charge(State(sim): State<Arc<Sim>>, Json(request): Json<ChargeRequest>) -> Response {
    tokio::spawn(process_charge(sim, request))
        .await
        .unwrap_or_else(|_| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "charge task failed",
            )
        })
}

async fn process_charge(sim: Arc<Sim>, request: ChargeRequest) -> Response {
    sim.stats.lock().attempts += 1;
    if request.idempotency_key.is_empty()
        || request.idempotency_key.len() > 200
        || request.amount_cents < 0
    {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "bad key or amount",
        );
    }
    {
        let mut charges = sim.charges.lock();
        if let Some(charge) = charges.get_mut(&request.idempotency_key) {
            charge.attempts += 1;
        } else if charges.len() >= CHARGES_MAX {
            return error(
                StatusCode::INSUFFICIENT_STORAGE,
                "full",
                "simulator is full",
            );
        }
    }
    if let Some(failure) = delay_and_maybe_fail(&sim).await {
        return failure;
    }
    let mut charges = sim.charges.lock();
    let charge = charges
        .entry(request.idempotency_key)
        .or_insert_with(|| Charge {
            amount_cents: request.amount_cents,
            attempts: 1,
            ..Charge::default()
        });
    if charge.amount_cents != request.amount_cents {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "key_reused",
            "same key, other amount",
        );
    }
    if charge.charged == 0 {
        charge.charged = 1;
        sim.stats.lock().charges += 1;
        (StatusCode::CREATED, Json(charge.clone())).into_response()
    } else {
        (StatusCode::OK, Json(charge.clone())).into_response()
    }
}

async fn refund(State(sim): State<Arc<Sim>>, Json(request): Json<ChargeRequest>) -> Response {
    if let Some(failure) = delay_and_maybe_fail(&sim).await {
        return failure;
    }
    let mut charges = sim.charges.lock();
    match charges.get_mut(&request.idempotency_key) {
        Some(charge) if charge.charged == 1 => {
            if !charge.refunded {
                charge.refunded = true;
                sim.stats.lock().refunds += 1;
            }
            Json(charge.clone()).into_response()
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "no_charge",
            "nothing was charged under this key",
        ),
    }
}

async fn get_charge(State(sim): State<Arc<Sim>>, Path(key): Path<String>) -> Response {
    match sim.charges.lock().get(&key) {
        Some(charge) => Json(charge.clone()).into_response(),
        None => error(StatusCode::NOT_FOUND, "no_charge", "no such key"),
    }
}

async fn stats(State(sim): State<Arc<Sim>>) -> Response {
    let stats = sim.stats.lock();
    Json(serde_json::json!({
        "charges": stats.charges,
        "attempts": stats.attempts,
        "injected_failures": stats.injected_failures,
        "refunds": stats.refunds,
    }))
    .into_response()
}

async fn set_config(State(sim): State<Arc<Sim>>, Json(config): Json<SimConfig>) -> Response {
    if !(0.0..=1.0).contains(&config.failure_rate) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "failure_rate must be within 0..=1",
        );
    }
    *sim.config.lock() = config;
    Json(config).into_response()
}

pub fn router(config: SimConfig) -> Router {
    let sim = Arc::new(Sim {
        config: Mutex::new(config),
        charges: Mutex::new(HashMap::new()),
        stats: Mutex::new(Stats::default()),
    });
    Router::new()
        .route("/v1/charges", post(charge))
        .route("/v1/charges/{key}", get(get_charge))
        .route("/v1/refunds", post(refund))
        .route("/v1/stats", get(stats))
        .route("/v1/config", post(set_config))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(sim)
}

pub async fn serve(listener: tokio::net::TcpListener, config: SimConfig) -> std::io::Result<()> {
    axum::serve(listener, router(config)).await
}
