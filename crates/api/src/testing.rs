//! The router in process, for benchmarks and tests that drive it without sockets: the
//! same middlewares and handlers as on the server, the guard's shipped rules, and a
//! payment provider that is never reached. The server never calls it.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use stampede_engine::Engine;

use crate::{App, AppState, Auth, GuardedRoutes, Secret};

/// The router over `engine`, its shoppers' tokens signed with `jwt`.
pub fn router(engine: Arc<Engine>, jwt: &Secret) -> axum::Router {
    let guard = stampede_guard::Guard::new(stampede_guard::GuardRules::default())
        .expect("the shipped guard rules are valid");
    crate::router(
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
        })),
        crate::BODY_LIMIT_BYTES_DEFAULT,
    )
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
