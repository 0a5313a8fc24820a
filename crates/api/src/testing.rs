//! The router in process, for benchmarks and tests that drive it without sockets: the
//! same middlewares and handlers as on the server, the guard's shipped rules, and a
//! payment provider that is never reached. The server never calls it.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use stampede_engine::{Engine, NewProduct, NewSale};
use stampede_types::{Cents, Sku};

use crate::{App, AppState, Auth, GuardedRoutes, Secret};

/// The router over `engine`, its shoppers' tokens signed with `jwt`.
pub fn router(engine: Arc<Engine>, jwt: &Secret) -> axum::Router {
    crate::router(state(engine, jwt), crate::BODY_LIMIT_BYTES_DEFAULT)
}

/// What [`router`] serves: the app over `engine` with the guard's shipped rules.
pub(crate) fn state(engine: Arc<Engine>, jwt: &Secret) -> AppState {
    let guard = stampede_guard::Guard::new(stampede_guard::GuardRules::default())
        .expect("the shipped guard rules are valid");
    AppState(Arc::new(App {
        engine,
        auth: Auth::new(Secret::new("in-process-admin"), jwt),
        payments: Arc::new(crate::payment::HttpPayments::new(
            "http://127.0.0.1:9",
            Duration::from_secs(1),
        )),
        metrics: crate::metrics_handle(),
        openapi: Arc::from("{}"),
        guarded: GuardedRoutes::new(&guard),
        guard,
        rules_change: tokio::sync::Mutex::new(()),
        proxies: crate::client::TrustedProxies::parse("").expect("no proxies"),
        client_timeout: Duration::from_secs(150),
        payment_timeout: Duration::from_secs(3),
        database_timeout: Duration::from_secs(5),
    }))
}

/// What the server's connections give each request: the peer, for the client-IP checks,
/// and its hold. Insert it into a request's extensions; one value stands for one
/// connection.
pub fn peer() -> ConnectInfo<crate::hold::Peer> {
    ConnectInfo(crate::hold::Peer::new(std::net::SocketAddr::from((
        [127, 0, 0, 1],
        40_000,
    ))))
}

/// A product of `stock` units under `sku` at 100 cents, and a sale of all of them at 50
/// cents, at most `per_user_limit` a shopper, started a second ago and open for an
/// hour: what the benchmarks and tests that drive the router buy from. The sale's id.
pub async fn open_sale(engine: &Engine, sku: &str, stock: u64, per_user_limit: u32) -> String {
    let sku = Sku::parse(sku).expect("a valid SKU");
    engine
        .create_product(NewProduct {
            sku: sku.clone(),
            name: "in process".into(),
            price: Cents::parse("price_cents", 100).expect("valid"),
            stock,
        })
        .await
        .expect("the product is created");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64;
    engine
        .create_sale(NewSale {
            sku,
            price: Cents::parse("price_cents", 50).expect("valid"),
            quantity: stock,
            per_user_limit,
            starts_at_ms: now - 1_000,
            ends_at_ms: now + 3_600_000,
        })
        .await
        .expect("the sale is created")
        .record
        .id
        .to_string()
}
