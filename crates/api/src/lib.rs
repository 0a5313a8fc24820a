//! Stampede's HTTP API.
//!
//! **Architecture invariant:** this is the only crate that knows HTTP and JSON. It parses
//! requests into domain types at the edge, calls the engine, and turns every failure into
//! `{"error": {"code", "message"}}` in one place ([`error::ApiError`]).
//!
//! **Architecture invariant:** no request can make the server hold unbounded memory:
//! bodies are capped (`body_limit_bytes`), lists are capped, and the engine's queue is
//! bounded.

pub mod auth;
pub mod client;
pub mod database;
pub mod error;
pub mod explain;
pub mod handlers;
pub mod hold;
pub mod payment;
pub mod payment_sim;
pub mod testing;
pub mod watch;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use stampede_engine::{Engine, PaymentGateway};
use stampede_guard::{Class, Guard, HotTaken, Param};
use tower_http::catch_panic::CatchPanicLayer;
use utoipa::OpenApi;

pub use auth::{Auth, Credential, Secret, mint_shopper_token};
use error::ApiError;

/// Request bodies larger than this are refused with 413 `body_too_large`.
pub const BODY_LIMIT_BYTES_DEFAULT: usize = 16 * 1024;

/// What every handler shares. One `Arc`, so the per-request clone axum makes of the
/// state is a single reference-count increment.
#[derive(Clone)]
pub struct AppState(pub Arc<App>);

pub struct App {
    pub engine: Arc<Engine>,
    pub auth: Auth,
    pub payments: Arc<dyn PaymentGateway>,
    pub metrics: PrometheusHandle,
    pub openapi: Arc<str>,
    pub guard: Arc<Guard>,
    pub guarded: GuardedRoutes,
    /// One rules change at a time (validate, persist, swap).
    pub rules_change: tokio::sync::Mutex<()>,
    /// Proxies allowed to name the client (`X-Forwarded-For`) and tenant (`X-Tenant`).
    pub proxies: client::TrustedProxies,
    /// The connection watchdog's timeout and the payment provider's: a rules change
    /// whose longest answer (`longest_answer`) would not fit is refused.
    pub client_timeout: Duration,
    pub payment_timeout: Duration,
    /// Bounds the admin's writes to the store outside the writer (the guard's rules);
    /// zero: none.
    pub database_timeout: Duration,
}

/// The longest a well-behaved request may wait for its answer on the server's own
/// account under `rules`: a pay request paced by its route's rule and again by the
/// `payment` resource's, its wait for room to note the charge attempt
/// (`LEDGER_QUEUE_WAIT`), the provider's `payment_timeout`, and a held refusal, with a
/// second to spare. The connection watchdog's `client_timeout` must be longer, or it
/// would cut such requests off.
pub fn longest_answer(rules: &stampede_guard::GuardRules, payment_timeout: Duration) -> Duration {
    let longest_route = GUARDED
        .iter()
        .map(|route| paced(rules, route.name))
        .max()
        .unwrap_or_default();
    longest_route
        + paced(rules, "payment")
        + stampede_engine::LEDGER_QUEUE_WAIT
        + payment_timeout
        + rules.system.hold_refused
        + Duration::from_secs(1)
}

/// The longest a pay may be held back by pacing between its arrival and its charge:
/// the `pay` route's rule, then the `payment` resource's. Pending orders expire that
/// much later (`Engine::set_payment_wait_max`), so a pay that arrived in time is decided
/// as in time however long the server's own pacing held it.
pub fn pay_held_max(rules: &stampede_guard::GuardRules) -> Duration {
    paced(rules, "pay") + paced(rules, "payment")
}

/// The longest a pacing rule of `rules` on `resource` may hold a call back
/// (`max_queue`); zero without one.
pub fn paced(rules: &stampede_guard::GuardRules, resource: &str) -> Duration {
    rules
        .flow
        .iter()
        .filter(|rule| rule.resource == resource)
        .filter_map(|rule| match rule.behavior {
            stampede_guard::Behavior::Pace { max_queue } => Some(max_queue),
            _ => None,
        })
        .max()
        .unwrap_or_default()
}

/// When a request the guard paced arrived whole, before its wait (set only on paced
/// requests).
#[derive(Clone, Copy, Debug)]
pub struct Arrived(pub Instant);

/// The guard's resources for each guarded route, resolved once.
pub struct GuardedRoutes {
    routes: Vec<(&'static GuardedRoute, stampede_guard::Resource)>,
    pub purchase: stampede_guard::Resource,
}

/// Routes the guard decides on, their class, and the method the route answers (a `GET`
/// route answers `HEAD` too). Another method on the same path is answered
/// `405 method_not_allowed` by the router and costs nothing of the route's limits. Not
/// listed, and never refused by the guard: `/healthz`, `/readyz`, `/metrics` (probes and
/// scrapes must see the truth under load) and the admin writes (products, sales, guard
/// rules: operators must be able to act during the surge).
pub const GUARDED: &[GuardedRoute] = &[
    GuardedRoute::new("pay", Class::Pay, Method::POST, Credential::Shopper),
    GuardedRoute::new(
        "purchase",
        Class::Purchase,
        Method::POST,
        Credential::Shopper,
    ),
    GuardedRoute::new("cancel", Class::Purchase, Method::POST, Credential::Caller),
    GuardedRoute::new("get_sale", Class::Browse, Method::GET, Credential::Public),
    GuardedRoute::new(
        "get_product",
        Class::Browse,
        Method::GET,
        Credential::Public,
    ),
    GuardedRoute::new("get_order", Class::Browse, Method::GET, Credential::Caller),
    GuardedRoute::new(
        "list_orders",
        Class::Browse,
        Method::GET,
        Credential::Shopper,
    ),
    GuardedRoute::new("audit", Class::Stats, Method::GET, Credential::Admin),
    GuardedRoute::new("openapi", Class::Stats, Method::GET, Credential::Public),
    GuardedRoute::new("guard_stats", Class::Stats, Method::GET, Credential::Public),
];

/// A route the guard decides on (see [`GUARDED`]).
pub struct GuardedRoute {
    pub name: &'static str,
    pub class: Class,
    /// The method the guard decides on (`HEAD` too for `GET`).
    pub method: Method,
    /// What the handler asks of the caller first. On a paced route it is checked before
    /// the guard books the request a place in the route's queue: a request the handler
    /// would refuse 401 must not hold a payer's place while it waits.
    pub credential: Credential,
}

impl GuardedRoute {
    const fn new(name: &'static str, class: Class, method: Method, credential: Credential) -> Self {
        GuardedRoute {
            name,
            class,
            method,
            credential,
        }
    }
}

/// Resources the code asks the guard about besides the routes: `payment` is each call
/// to the payment provider, so a flow rule on it limits the calls' rate and how many
/// are in flight at once (the third party's capacity, not ours).
pub const NAMED_RESOURCES: &[&str] = &["payment"];

/// The outbound dependencies that ask their breaker before each call.
pub const DEPENDENCIES: &[&str] = &["payment", "database"];

/// Every problem of `rules` at once, each with its field: the values' (`validate`), then
/// the names nothing asks (`check_rule_targets`), a field refused for its value not
/// again for its name. Over the bounds on how many rules there may be, only that.
pub fn check_rules(
    rules: &stampede_guard::GuardRules,
) -> Result<(), Vec<stampede_guard::RuleError>> {
    let mut problems = rules.validate().err().unwrap_or_default();
    let within_bounds = !problems
        .iter()
        .any(|p| p.field == "rules" || p.field == "hot");
    if within_bounds {
        let targets = check_rule_targets(rules).err().unwrap_or_default();
        let fresh: Vec<_> = targets
            .into_iter()
            .filter(|t| !problems.iter().any(|p| p.field == t.field))
            .collect();
        problems.extend(fresh);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Refuses rules that nothing would ever ask: a flow rule on a resource that is neither
/// a guarded route nor a named resource, a shopper or sale limit anywhere but on
/// `purchase` (the handler that knows them), a client or tenant limit on a route the
/// guard does not decide, a breaker for a dependency that has none. Accepted, such a
/// rule would look in force and protect nothing.
pub fn check_rule_targets(
    rules: &stampede_guard::GuardRules,
) -> Result<(), Vec<stampede_guard::RuleError>> {
    let route = |name: &str| GUARDED.iter().any(|r| r.name == name);
    let named = |name: &str| NAMED_RESOURCES.contains(&name);
    let known = || {
        GUARDED
            .iter()
            .map(|r| r.name)
            .chain(NAMED_RESOURCES.iter().copied())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut errors = Vec::new();
    let mut err =
        |field: String, message: String| errors.push(stampede_guard::RuleError { field, message });
    for (i, rule) in rules.flow.iter().enumerate() {
        if !route(&rule.resource) && !named(&rule.resource) {
            err(
                format!("flow[{i}].resource"),
                format!("no such resource; one of {}", known()),
            );
        }
    }
    for (i, rule) in rules.hot.iter().enumerate() {
        match rule.param {
            Param::Shopper | Param::Sale if rule.resource != "purchase" => err(
                format!("hot[{i}].resource"),
                "shopper and sale limits apply to purchase only".into(),
            ),
            Param::ClientIp | Param::Tenant if !route(&rule.resource) => err(
                format!("hot[{i}].resource"),
                format!(
                    "no such route; one of {}",
                    GUARDED
                        .iter()
                        .map(|r| r.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            _ => {}
        }
    }
    for (i, rule) in rules.breakers.iter().enumerate() {
        if !DEPENDENCIES.contains(&rule.name.as_str()) {
            err(
                format!("breakers[{i}].name"),
                format!("no such dependency; one of {}", DEPENDENCIES.join(", ")),
            );
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

impl GuardedRoutes {
    pub fn new(guard: &Guard) -> GuardedRoutes {
        GuardedRoutes {
            routes: GUARDED
                .iter()
                .map(|route| (route, guard.resource(route.name)))
                .collect(),
            purchase: guard.resource("purchase"),
        }
    }

    /// The guarded route named `route` and its resource, when the guard decides on
    /// `method` there.
    fn get(
        &self,
        route: &str,
        method: &Method,
    ) -> Option<(&'static GuardedRoute, &stampede_guard::Resource)> {
        self.routes
            .iter()
            .find(|(guarded, _)| guarded.name == route)
            .filter(|(guarded, _)| {
                *method == guarded.method
                    || (guarded.method == Method::GET && method == Method::HEAD)
            })
            .map(|(guarded, resource)| (*guarded, resource))
    }
}

impl std::ops::Deref for AppState {
    type Target = App;
    fn deref(&self) -> &App {
        &self.0
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Stampede",
        description = "Retail transaction core for traffic that arrives as a stampede. API contract v1."
    ),
    paths(
        handlers::create_product,
        handlers::get_product,
        handlers::create_sale,
        handlers::get_sale,
        handlers::purchase,
        handlers::get_order,
        handlers::list_orders,
        handlers::pay_order,
        handlers::cancel_order,
        handlers::audit_sale,
        handlers::healthz,
        handlers::readyz,
        handlers::metrics,
        handlers::get_guard_rules,
        handlers::put_guard_rules,
        handlers::degrade,
        handlers::guard_stats,
        handlers::openapi,
    ),
    components(schemas(error::ErrorBody, error::ErrorDetail)),
    modifiers(&BearerSchemes, &CommonAnswers)
)]
pub struct ApiDoc;

/// Declares the two bearer schemes the paths require: `admin` (the admin token) and
/// `shopper` (an HS256 JWT with `sub` and `exp`).
struct BearerSchemes;

impl utoipa::Modify for BearerSchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The admin token (admin_token)."))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "shopper",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("A shopper token: HS256 JWT with sub and exp."))
                    .build(),
            ),
        );
    }
}

/// The answers that come from the layers around the handlers rather than from the
/// handlers themselves, added to every operation they can reach (an answer the
/// operation's own annotation describes is left as it says): 401 where a token is
/// required; 400 for a body that is not the JSON asked, 413 and 415 where a request
/// carries one; 429 and 503 from the guard on the routes it decides.
struct CommonAnswers;

impl utoipa::Modify for CommonAnswers {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for (path, item) in openapi.paths.paths.iter_mut() {
            let route = ROUTES
                .iter()
                .find(|(template, _)| template == path)
                .map(|(_, label)| *label);
            // The method the guard decides on at this path, if any.
            let guarded =
                route.and_then(|label| GUARDED.iter().find(|r| r.name == label).map(|r| &r.method));
            let operations = [
                (&mut item.get, false, Method::GET),
                (&mut item.put, true, Method::PUT),
                (&mut item.post, true, Method::POST),
                (&mut item.delete, false, Method::DELETE),
            ];
            for (operation, sends, method) in operations {
                let Some(operation) = operation.as_mut() else {
                    continue;
                };
                let mut add = |status: &str, description: &str| {
                    operation
                        .responses
                        .responses
                        .entry(status.to_owned())
                        .or_insert_with(|| error(description).into());
                };
                if operation.security.as_ref().is_some_and(|s| !s.is_empty()) {
                    add("401", "unauthorized: no token, or a bad or expired one");
                }
                if sends {
                    add(
                        "400",
                        "malformed_json, invalid_body (also a body sent where none is taken), invalid_field",
                    );
                    add("413", "body_too_large");
                }
                if operation.request_body.is_some() {
                    add(
                        "415",
                        "unsupported_media_type: the body must be application/json",
                    );
                }
                if guarded == Some(&method) {
                    add("429", "throttled by a rule of the guard, with Retry-After");
                    add(
                        "503",
                        "overloaded (system protection) or degraded (the route's class switched off), with Retry-After",
                    );
                }
            }
        }
    }
}

/// The OpenAPI document, generated from the handlers' annotations.
pub fn openapi_json() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serialises")
}

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 5.0,
                ])
                .expect("static buckets are valid")
                // A count of operations, not seconds: the time buckets above would put
                // every batch of more than five into +Inf.
                .set_buckets_for_metric(
                    Matcher::Full("stampede_writer_batch_ops".into()),
                    &[
                        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
                    ],
                )
                .expect("static buckets are valid")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            export_alerting_counters_at_zero();
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .expect("spawn metrics upkeep thread");
            handle
        })
        .clone()
}

/// The counters of things that go wrong, exported at 0 from the start: a counter appears
/// in `/metrics` only once it is first touched, and an alert on one that has never moved
/// would see "no data" instead of 0 (and `increase()` misses its first step).
fn export_alerting_counters_at_zero() {
    for name in [
        "stampede_writer_commit_failures_total",
        "stampede_gate_give_back_failures_total",
        "stampede_refund_failures_total",
        "stampede_refunds_started_total",
        "stampede_relay_failures_total",
        "stampede_guard_refusals_held_total",
        "stampede_http_panics_total",
        "stampede_connections_timed_out_total",
        "stampede_sqlite_tail_checkpoint_short_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    for outcome in ["refunded", "nothing_charged", "failed"] {
        metrics::counter!("stampede_refunds_total", "outcome" => outcome).increment(0);
    }
    for outcome in ["ok", "declined", "not_charged", "error", "timeout"] {
        metrics::counter!("stampede_payment_calls_total", "outcome" => outcome).increment(0);
    }
    for status in ["400", "414", "431"] {
        metrics::counter!("stampede_http_unparsable_total", "status" => status).increment(0);
    }
}

/// Every route's matched path and its label, the last one for requests no route
/// matched. Route labels are a closed set of static strings: no allocation per request
/// and no unbounded label cardinality from client-chosen paths.
const ROUTES: [(&str, &str); 18] = [
    ("/v1/flash-sales/{id}/purchase", "purchase"),
    ("/v1/flash-sales/{id}", "get_sale"),
    ("/v1/flash-sales/{id}/audit", "audit"),
    ("/v1/flash-sales", "create_sale"),
    ("/v1/products", "create_product"),
    ("/v1/products/{sku}", "get_product"),
    ("/v1/orders", "list_orders"),
    ("/v1/orders/{id}", "get_order"),
    ("/v1/orders/{id}/pay", "pay"),
    ("/v1/orders/{id}/cancel", "cancel"),
    ("/healthz", "healthz"),
    ("/readyz", "readyz"),
    ("/metrics", "metrics"),
    ("/openapi.json", "openapi"),
    ("/v1/guard/rules", "guard_rules"),
    ("/v1/guard/stats", "guard_stats"),
    ("/v1/guard/degrade", "guard_degrade"),
    ("", "unmatched"),
];

/// A request's route: its index in `ROUTES`, worked out once per request by `guard_and_time`.
#[derive(Clone, Copy)]
struct RouteLabel(usize);

impl RouteLabel {
    /// `ROUTES[0]`, the purchase.
    const PURCHASE: RouteLabel = RouteLabel(0);

    fn of(path: Option<&MatchedPath>) -> RouteLabel {
        let path = path.map_or("", MatchedPath::as_str);
        RouteLabel(
            ROUTES
                .iter()
                .position(|(route, _)| *route == path)
                .unwrap_or(ROUTES.len() - 1),
        )
    }

    fn name(self) -> &'static str {
        ROUTES[self.0].1
    }
}

/// Response classes of `stampede_http_requests_total` and `stampede_http_request_seconds`:
/// an answer's time is kept apart by class, so refusals (fast, or held on purpose for
/// up to their `Retry-After`) never blur the latency of the requests that were served.
const STATUS_CLASSES: [&str; 4] = ["2xx", "4xx", "5xx", "other"];

/// One route's request metrics, registered once: looking a labelled metric up by name
/// and labels on every request cost an allocation and a hash of the key each time.
struct RouteMetrics {
    requests: [metrics::Counter; 4],
    seconds: [metrics::Histogram; 4],
}

fn route_metrics(route: RouteLabel) -> &'static RouteMetrics {
    // Built on the first request, after `metrics_handle` installed the recorder (every
    // `App` holds its handle), so the handles reach it.
    static TABLE: OnceLock<Vec<RouteMetrics>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        ROUTES
            .iter()
            .map(|&(_, route)| RouteMetrics {
                requests: STATUS_CLASSES.map(|class| {
                    metrics::counter!("stampede_http_requests_total", "route" => route, "class" => class)
                }),
                seconds: STATUS_CLASSES.map(|class| {
                    metrics::histogram!("stampede_http_request_seconds", "route" => route, "class" => class)
                }),
            })
            .collect()
    });
    &table[route.0]
}

/// The one middleware of every route, the fallbacks included: the request's route from
/// the path the router matched, the guard for guarded routes, then the answer counted
/// and timed by status class. One layer, inside the routing, so a request pays for one
/// boxed service level here, not one per concern.
async fn guard_and_time(
    axum::extract::State((app, body_limit)): axum::extract::State<(AppState, usize)>,
    request: Request,
    next: Next,
) -> Response {
    let route = RouteLabel::of(request.extensions().get::<MatchedPath>());
    timed(&app, route, body_limit, request, |request| {
        next.run(request)
    })
    .await
}

/// What [`guard_and_time`] does for a request whose route is known: the guard, then the
/// answer counted and timed by status class. `next` answers a request the guard let in.
async fn timed<F: std::future::Future<Output = Response>>(
    app: &AppState,
    route: RouteLabel,
    body_limit: usize,
    request: Request,
    next: impl FnOnce(Request) -> F,
) -> Response {
    let started = Instant::now();
    let response = protect(app, route, started, body_limit, request, next).await;
    let class = match response.status().as_u16() {
        200..=299 => 0,
        400..=499 => 1,
        500..=599 => 2,
        _ => 3,
    };
    let metrics = route_metrics(route);
    metrics.requests[class].increment(1);
    metrics.seconds[class].record(started.elapsed().as_secs_f64());
    response
}

/// What comes before and after the sale id in a purchase's path.
const PURCHASE_PATH: (&str, &str) = ("/v1/flash-sales/", "/purchase");

/// The sale id of `POST /v1/flash-sales/{id}/purchase` when the path spells it plainly
/// (no `%`, which only the router decodes), for [`PurchaseFirst`].
fn purchase_sale_id(request: &Request) -> Option<&str> {
    if request.method() != Method::POST {
        return None;
    }
    let id = request
        .uri()
        .path()
        .strip_prefix(PURCHASE_PATH.0)?
        .strip_suffix(PURCHASE_PATH.1)?;
    // Bytes, not chars: a `char` pattern decodes UTF-8 as it goes, several times the cost.
    (!id.is_empty() && !id.bytes().any(|b| b == b'/' || b == b'%')).then_some(id)
}

/// The purchase route ahead of axum's router; every other request goes on to it.
///
/// A purchase is the request a sale is made of, and routing it was ~11% of its
/// instructions: matching the path, its parameter percent-decoded into a map of its
/// own, the matched path put in the request's extensions, the route's boxed service
/// cloned, the middleware's own boxed level (BENCHMARKS.md, "The purchase route ahead
/// of the router"). Here a plainly spelled purchase path goes straight to
/// [`timed`] under the purchase route's label, then to the same extractors in the order
/// axum runs them and to the same handler ([`handlers::purchase_request`]), so it is
/// guarded, counted and answered as through the router; a spelling only the router can
/// read (percent-encoded) and every other route still go through it. The test
/// `a_purchase_answers_the_same_ahead_of_the_router_and_through_it` holds the two ways
/// to the same answers.
#[derive(Clone)]
struct PurchaseFirst {
    purchase: PurchaseRoute,
    routes: Router,
}

impl tower::Service<Request> for PurchaseFirst {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = tower::util::future::EitherResponseFuture<
        <Router as tower::Service<Request>>::Future,
        <PurchaseRoute as tower::Service<Request>>::Future,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // Both are always ready (axum's `Router` is).
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        use tower::util::Either;
        if purchase_sale_id(&request).is_some() {
            Either::<&mut Router, _>::Right(&mut self.purchase).call(request)
        } else {
            Either::<_, &mut PurchaseRoute>::Left(&mut self.routes).call(request)
        }
    }
}

/// `POST /v1/flash-sales/{id}/purchase` with the id spelled plainly ([`PurchaseFirst`]).
#[derive(Clone)]
struct PurchaseRoute {
    app: AppState,
    body_limit: usize,
}

impl tower::Service<Request> for PurchaseRoute {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response, Self::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let (app, body_limit) = (self.app.clone(), self.body_limit);
        Box::pin(async move {
            // `PurchaseFirst` checked the path: the id is what lies between its two ends.
            let path = request.uri().path();
            let id = path[PURCHASE_PATH.0.len()..path.len() - PURCHASE_PATH.1.len()].to_owned();
            let handler = app.clone();
            Ok(
                timed(&app, RouteLabel::PURCHASE, body_limit, request, |request| {
                    handlers::purchase_request(handler, id, request)
                })
                .await,
            )
        })
    }
}

/// The guard in front of every guarded route: degradation, system protection with class
/// priority, the route's flow rule, and per-client-IP / per-tenant hot keys when rules
/// for them exist. Refusals answer 429 `throttled` or 503 `overloaded`, `degraded` with
/// `Retry-After`, before any other work.
async fn protect<F: std::future::Future<Output = Response>>(
    app: &AppState,
    route: RouteLabel,
    started: Instant,
    body_limit: usize,
    request: Request,
    next: impl FnOnce(Request) -> F,
) -> Response {
    let Some((guarded, resource)) = app.guarded.get(route.name(), request.method()) else {
        return next(request).await;
    };
    // The body first: a request counts against the route's concurrency and the system's
    // requests in flight only once it has arrived whole. Read by the handler instead, a
    // body trickled in a byte at a time would hold a slot until the connection
    // watchdog's `client_timeout`, and a few dozen such connections would lock a route's
    // shoppers out.
    let request = match whole_body(request, body_limit).await {
        Ok(request) => request,
        Err(error) => return error.into_response(),
    };
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<hold::Peer>>()
        .map(|axum::extract::ConnectInfo(peer)| peer.clone());
    // On a paced route, the credential before the route's rules: a request admitted
    // there books its place in the route's queue and keeps it while it waits, so one
    // its handler would refuse 401 would hold a place a shopper could have had (a flood
    // of them would push payers past `max_queue`). Its client's allowance is spent all
    // the same, as it is for a 401 on any other route.
    let paced = guarded.credential != Credential::Public && app.guard.paces(resource);
    let shopper = match paced {
        false => None,
        true => match app.auth.check(guarded.credential, request.headers()) {
            Ok(shopper) => shopper,
            Err(error) => {
                if let Some(peer) = &peer
                    && let Err(rejection) = client_admits(app, resource, peer, request.headers())
                {
                    let response = ApiError::from(rejection).into_response();
                    return refused(app, started, Some(peer), response).await;
                }
                return error.into_response();
            }
        },
    };
    // A paced purchase's per-key limits too, for the same reason: a scalper's attempts
    // past the shopper's limit would each hold a place until their turn came.
    let mut keys = None;
    if let Some(user) = shopper
        && guarded.name == "purchase"
    {
        match handlers::PurchaseKeys::take(app, user, purchase_sale_id(&request)) {
            Ok(taken) => keys = Some(taken),
            Err(error) => {
                return refused(app, started, peer.as_ref(), error.into_response()).await;
            }
        }
    }
    // The route's rules, then the client's own limits; a client refused by those gives
    // the route's rate slot back, so it cannot use up the rate the route's clients
    // share, and a request the route refuses costs the client none of its allowance.
    let admitted = app
        .guard
        .admit(resource, guarded.class)
        .and_then(|mut admission| {
            match &peer {
                Some(peer) => client_admits(app, resource, peer, request.headers()).map(Some),
                None => Ok(None),
            }
            .inspect_err(|_| admission.withdraw())
            // Dropped on a refusal: not in flight while its answer waits for a hold.
            .map(|client| (admission, client))
        });
    let (mut admission, mut client) = match admitted {
        Ok(admission) => admission,
        Err(rejection) => {
            // `keys`, dropped, gives the shopper's and the sale's allowance back.
            let response = ApiError::from(rejection).into_response();
            return refused(app, started, peer.as_ref(), response).await;
        }
    };
    let mut request = request;
    if let Some(keys) = &keys {
        request.extensions_mut().insert(keys.checked());
    }
    if !admission.wait.is_zero() {
        // The handler decides deadlines from the arrival, not from the end of the wait
        // the server itself imposed (a pay paced past its order's deadline is in time).
        request.extensions_mut().insert(Arrived(Instant::now()));
        tokio::time::sleep(admission.wait).await;
        admission.sent();
    }
    if let Some(keys) = &mut keys {
        keys.hand_over();
    }
    let response = caught(|| next(request)).await;
    if response.status().is_server_error() {
        admission.failed();
    }
    let per_key = response
        .extensions()
        .get::<error::PerKeyRefusal>()
        .is_some();
    let unauthorized = response.status() == axum::http::StatusCode::UNAUTHORIZED;
    if let Some(keys) = keys {
        keys.answered(unauthorized || per_key);
    }
    if unauthorized {
        // No valid token: it costs the route's shared rate nothing, so requests without
        // one cannot use up what the shoppers share. Its client's allowance stays spent:
        // a flood of them from one address is still that address's to answer for.
        admission.give_back();
    } else if per_key {
        // Refused by a shopper's or a sale's own limit: it costs the route's shared
        // rate nothing, nor its client's or tenant's allowance (a scalper must not use
        // up what others behind the same address or tenant share). Counted as blocked
        // where it was refused, not as passed here.
        admission.withdraw();
        if let Some(client) = &mut client {
            client.give_back();
        }
    }
    // Otherwise through every limit (a request without a valid token too: its client's
    // allowance stays spent): `client`, dropped, counts it as passed.
    // The request is finished: no longer in flight, whether or not its answer waits.
    drop(admission);
    // The handler's own refusals (a shopper over the hot limit, a full writer queue)
    // carry `Retry-After` too.
    if response
        .headers()
        .contains_key(axum::http::header::RETRY_AFTER)
    {
        return refused(app, started, peer.as_ref(), response).await;
    }
    response
}

/// A body [`whole_body`] has read, beside the request's body (the same bytes, shared):
/// `JsonBody` takes it instead of collecting the body a second time.
#[derive(Clone)]
pub(crate) struct WholeBody(pub(crate) axum::body::Bytes);

/// The request with its body read within `limit` (the 413 and 400 the handler's
/// extractor would give), also as a [`WholeBody`]; a request without one passes as it
/// is.
async fn whole_body(request: Request, limit: usize) -> Result<Request, ApiError> {
    use axum::body::HttpBody as _;
    use http_body_util::BodyExt as _;
    if request.body().size_hint().exact() == Some(0) {
        return Ok(request);
    }
    let (parts, body) = request.into_parts();
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => {
            let bytes = collected.to_bytes();
            let mut request = Request::from_parts(parts, axum::body::Body::from(bytes.clone()));
            request.extensions_mut().insert(WholeBody(bytes));
            Ok(request)
        }
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(
            ApiError::body_too_large(format!("the body is over {limit} bytes")),
        ),
        Err(error) => Err(ApiError::bad_request(
            "invalid_body",
            format!("the body could not be read: {error}"),
        )),
    }
}

/// The client's keys a request was admitted under, so a later refusal can give their
/// allowance back. Dropped, it counts the request as passed by the client's and
/// tenant's rules, however the request ended (answered, its handler panicking, its
/// client gone), unless a later limit refused it and it gave its allowance back.
struct ClientKeys<'a> {
    guard: &'a Guard,
    resource: &'a stampede_guard::Resource,
    ip: std::net::IpAddr,
    ip_taken: HotTaken,
    /// Only behind a trusted proxy that names one.
    tenant: Option<(axum::http::HeaderValue, HotTaken)>,
    given_back: bool,
}

impl ClientKeys<'_> {
    fn give_back(&mut self) {
        self.guard
            .give_back_hot(self.resource, &self.ip, self.ip_taken);
        if let Some((tenant, taken)) = &self.tenant {
            self.guard
                .give_back_hot(self.resource, tenant.as_bytes(), *taken);
        }
        self.given_back = true;
    }
}

impl Drop for ClientKeys<'_> {
    fn drop(&mut self) {
        if self.given_back {
            return;
        }
        self.guard.hot_passed(self.resource, self.ip_taken);
        if let Some((_, taken)) = &self.tenant {
            self.guard.hot_passed(self.resource, *taken);
        }
    }
}

/// The per-client-IP and per-tenant hot keys, for a request that came from `peer`. A
/// tenant's refusal gives the client's allowance back.
fn client_admits<'a>(
    app: &'a App,
    resource: &'a stampede_guard::Resource,
    peer: &hold::Peer,
    headers: &axum::http::HeaderMap,
) -> Result<ClientKeys<'a>, stampede_guard::Rejection> {
    let peer_ip = peer.addr.ip();
    let ip = client::client_key(app.proxies.client_ip(peer_ip, headers));
    let ip_taken = app
        .guard
        .check_hot_uncounted(resource, Param::ClientIp, &ip)?;
    let tenant = match app.proxies.tenant(peer_ip, headers) {
        None => None,
        Some(value) => {
            match app
                .guard
                .check_hot_uncounted(resource, Param::Tenant, value.as_bytes())
            {
                // The value the rule counted (the header's reference-counted bytes).
                Ok(taken) => Some((value, taken)),
                Err(rejection) => {
                    app.guard.give_back_hot(resource, &ip, ip_taken);
                    return Err(rejection);
                }
            }
        }
    };
    Ok(ClientKeys {
        guard: &app.guard,
        resource,
        ip,
        ip_taken,
        tenant,
        given_back: false,
    })
}

/// A refusal with `Retry-After`: recorded in `stampede_guard_refusal_seconds` (from the
/// router's first look at the request to the decision), then answered at once, unless
/// the same connection is held from its last refusal: then it is answered when that
/// hold ends or its own hold has passed, whichever comes first ([`hold`]). A refusal's
/// hold lasts its own `Retry-After`, at most `guard.system.hold_refused`, less a random
/// share of at most `guard.system.hold_spread`, so a client that honours it never meets
/// the hold. Never for trusted proxies, which carry many
/// clients.
async fn refused(
    app: &App,
    started: Instant,
    peer: Option<&hold::Peer>,
    response: Response,
) -> Response {
    let now = Instant::now();
    metrics::histogram!("stampede_guard_refusal_seconds")
        .record(now.duration_since(started).as_secs_f64());
    if let Some(peer) = peer
        && !app.proxies.is_trusted(peer.addr.ip())
    {
        let retry_after = response
            .headers()
            .get(axum::http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .map_or(Duration::from_secs(1), Duration::from_secs);
        let (most, share) = app.guard.hold_refused();
        let duration = hold::spread(retry_after.min(most), share, rand::random::<f64>());
        let wait = peer.hold.refused(now, duration);
        if !wait.is_zero() {
            metrics::counter!("stampede_guard_refusals_held_total").increment(1);
            tokio::time::sleep(wait).await;
        }
    }
    response
}

/// `answer`'s response, or the 500 `internal` a panic inside it becomes
/// ([`panic_response`]), for a request the guard admitted. Caught here, inside the guard
/// and the timing, so the guard counts the request as failed (its error ratio and
/// response times feed the breakers and the BBR check) and `timed` counts and times it
/// as the 5xx it is. Left to the router's outer `CatchPanicLayer`, it would unwind past
/// both: counted by neither, and by the guard as a success once its admission was
/// dropped. Only there: catching around every request's answer cost a `healthz` ~250
/// instructions, which the routes the guard does not decide on (`/healthz` among them)
/// need not pay; a panic of theirs is the outer layer's 500, counted by
/// `stampede_http_panics_total` (BENCHMARKS.md, "A handler's panic caught where it is
/// counted").
async fn caught<F: std::future::Future<Output = Response>>(answer: impl FnOnce() -> F) -> Response {
    let mut answer = std::pin::pin!(answer());
    std::future::poll_fn(|cx| {
        // Nothing of the future is used after a panic: it is dropped with its state.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| answer.as_mut().poll(cx))) {
            Ok(poll) => poll,
            Err(panic) => std::task::Poll::Ready(panic_response(panic)),
        }
    })
    .await
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    metrics::counter!("stampede_http_panics_total").increment(1);
    ApiError::new(
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error",
    )
    .into_response()
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

pub fn router(state: AppState, body_limit_bytes: usize) -> Router {
    use handlers::*;
    let routes = Router::new()
        .route("/v1/products", post(create_product))
        .route("/v1/products/{sku}", get(get_product))
        .route("/v1/flash-sales", post(create_sale))
        .route("/v1/flash-sales/{id}", get(get_sale))
        .route("/v1/flash-sales/{id}/purchase", post(purchase))
        .route("/v1/flash-sales/{id}/audit", get(audit_sale))
        .route("/v1/orders", get(list_orders))
        .route("/v1/orders/{id}", get(get_order))
        .route("/v1/orders/{id}/pay", post(pay_order))
        .route("/v1/orders/{id}/cancel", post(cancel_order))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(handlers::metrics))
        .route("/openapi.json", get(openapi))
        .route("/v1/guard/rules", get(get_guard_rules).put(put_guard_rules))
        .route("/v1/guard/degrade", post(degrade))
        .route("/v1/guard/stats", get(guard_stats))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            (state.clone(), body_limit_bytes),
            guard_and_time,
        ))
        .with_state(state.clone());
    let purchase = PurchaseRoute {
        app: state,
        body_limit: body_limit_bytes,
    };
    around_routes(PurchaseFirst { purchase, routes }, body_limit_bytes)
}

/// What holds for every request before routing: a panic anywhere becomes a 500
/// `internal` (never a dropped connection), and bodies are capped. Around the whole
/// router, not each route: `Router::layer` wraps every route in another boxed service,
/// which each request clones on its way in (an allocation per level).
fn around_routes<S>(routes: S, body_limit_bytes: usize) -> Router
where
    S: tower::Service<Request, Response = Response, Error = std::convert::Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    Router::new().fallback_service(
        tower::ServiceBuilder::new()
            .layer(CatchPanicLayer::custom(panic_response))
            .layer(DefaultBodyLimit::max(body_limit_bytes))
            .service(routes),
    )
}

/// What one server lets its clients' connections hold.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Largest request body, in bytes.
    pub body_limit_bytes: usize,
    /// Connections served at once; beyond it new ones wait in the kernel's accept queue.
    pub max_connections: usize,
    /// A connection whose request is still arriving or unanswered this long after its
    /// first byte, or that is idle this long, is closed ([`watch`]).
    pub client_timeout: Duration,
}

/// A request head is refused (431) once this much of it is buffered without its end;
/// reads of at most `watch::READ_CHUNK_MAX_BYTES` keep what a connection holds of one
/// under this plus that. Bodies have their own cap (`body_limit_bytes`). With
/// `max_connections`, this bounds what clients can make the server hold.
pub const READ_BUFFER_MAX_BYTES: usize = 64 * 1024;

/// Serves until `shutdown` resolves, then stops taking connections, lets in-flight
/// requests finish, and drains the engine's writer.
///
/// The loop is hyper's HTTP/1 connection with a bound on connections and on each one's
/// read buffer, a watchdog that closes slow and idle connections, and a graceful drain,
/// so no client can make the server hold memory without bound (at most
/// `max_connections` × (`READ_BUFFER_MAX_BYTES` + `watch::READ_CHUNK_MAX_BYTES` + the body
/// limit) of requests) or hold a connection
/// slot by trickling a request.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::TokioIo;
    use tower::ServiceExt;

    let engine = state.engine.clone();
    let app = router(state, limits.body_limit_bytes);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.max_buf_size(READ_BUFFER_MAX_BYTES);
    let watchdog = watch::Watchdog::new();
    tokio::spawn(watchdog.clone().run(limits.client_timeout));
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors, or a connection reset before it was taken:
                    // the listener stays; wait a moment rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let peer = axum::extract::ConnectInfo(hold::Peer::new(addr));
        let service = app
            .clone()
            .map_request(move |request: Request<hyper::body::Incoming>| {
                let mut request = request.map(axum::body::Body::new);
                request.extensions_mut().insert(peer.clone());
                request
            });
        let (stream, registration) = watchdog.watch(stream);
        let connection = http.serve_connection(
            TokioIo::new(explain::Explained::new(stream)),
            hyper_util::service::TowerToHyperService::new(service),
        );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            tokio::select! {
                result = connection => if let Err(error) = result {
                    tracing::trace!(%error, "connection ended with an error");
                },
                () = registration.marks.close.notified() => {
                    tracing::debug!(%addr, "connection closed: a request too slow, or idle too long");
                }
            }
            drop(registration);
            drop(slot);
        });
    }
    drop(listener);
    // Connections get `DRAIN_DEADLINE` to finish once shutdown starts; a client that
    // never finishes its request must not keep the writer from draining.
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(DRAIN_DEADLINE) => tracing::warn!(?DRAIN_DEADLINE, "connections still open after the drain deadline; closing them"),
    }
    engine.shutdown().await;
    Ok(())
}

/// How long a graceful shutdown waits for open requests before draining the writer.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    #[test]
    fn every_security_scheme_the_paths_require_is_declared() {
        let document: serde_json::Value = serde_json::from_str(&super::openapi_json()).unwrap();
        let declared = document["components"]["securitySchemes"]
            .as_object()
            .expect("securitySchemes");
        let mut required = std::collections::BTreeSet::new();
        for path in document["paths"].as_object().unwrap().values() {
            for operation in path.as_object().unwrap().values() {
                for requirement in operation["security"].as_array().into_iter().flatten() {
                    required.extend(requirement.as_object().unwrap().keys().cloned());
                }
            }
        }
        assert_eq!(
            required.iter().collect::<Vec<_>>(),
            ["admin", "shopper"],
            "the paths' requirements"
        );
        for scheme in &required {
            assert_eq!(declared[scheme]["scheme"], "bearer", "{scheme}");
        }
    }

    /// A guarded route's `credential` is what the guard checks ahead of a paced queue:
    /// it must be what the route's operation requires, as its handler declares it.
    #[test]
    fn each_guarded_routes_credential_is_what_its_operation_requires() {
        use super::{Credential, GUARDED, ROUTES};
        let document: serde_json::Value = serde_json::from_str(&super::openapi_json()).unwrap();
        for route in GUARDED {
            let (path, _) = ROUTES
                .iter()
                .find(|(_, label)| *label == route.name)
                .unwrap_or_else(|| panic!("{} is a route", route.name));
            let operation = &document["paths"][path][route.method.as_str().to_lowercase()];
            assert!(operation.is_object(), "{} {path}", route.method);
            let mut required: Vec<&str> = operation["security"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|requirement| requirement.as_object().unwrap().keys())
                .map(String::as_str)
                .collect();
            required.sort_unstable();
            let expected: &[&str] = match route.credential {
                Credential::Public => &[],
                Credential::Shopper => &["shopper"],
                Credential::Caller => &["admin", "shopper"],
                Credential::Admin => &["admin"],
            };
            assert_eq!(required, expected, "{}", route.name);
        }
    }

    use axum::body::Body;
    use axum::http::StatusCode;
    use tower::ServiceExt;

    use super::*;

    async fn answer(app: Router, request: Request) -> (StatusCode, serde_json::Value) {
        let response = app.oneshot(request).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    async fn boom() -> &'static str {
        panic!("a handler's bug")
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_500_internal_and_an_oversized_body_413() {
        let routes = Router::new()
            .route("/boom", get(boom))
            .route("/echo", post(|body: axum::body::Bytes| async move { body }));
        let app = around_routes(routes, 8);

        let (status, body) = answer(
            app.clone(),
            Request::get("/boom").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["error"]["code"], "internal", "{body}");

        // The cap reaches extractors inside the routes.
        let response = app
            .oneshot(
                Request::post("/echo")
                    .body(Body::from("more than eight bytes"))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn a_panic_inside_a_guarded_route_counts_as_its_5xx_and_as_the_guards_error() {
        let dir = tempfile::tempdir().unwrap();
        let engine =
            stampede_store::testing::reserved_sqlite_engine(&dir.path().join("panic.db")).await;
        let app = testing::state(engine, &Secret::new("panic-jwt-secret"));
        let route = RouteLabel(
            ROUTES
                .iter()
                .position(|(_, name)| *name == "get_sale")
                .unwrap(),
        );
        let counted = |app: &AppState| {
            app.guard
                .stats()
                .resources
                .into_iter()
                .find(|r| r.resource == "get_sale")
                .map(|r| (r.total.passed, r.total.errors, r.total.completed))
        };
        let before = counted(&app).unwrap_or_default();
        let request = Request::get("/v1/flash-sales/sale_1")
            .body(Body::empty())
            .unwrap();
        let response = timed(&app, route, 1 << 16, request, |_| async {
            boom().await.into_response()
        })
        .await;
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let (passed, errors, completed) = counted(&app).unwrap();
        assert_eq!(
            (passed - before.0, errors - before.1, completed - before.2),
            (1, 1, 1),
            "passed, errors, completed"
        );
        // Counted and timed as a 5xx of its route.
        let rendered = app.metrics.render();
        let line = rendered
            .lines()
            .find(|l| {
                l.starts_with("stampede_http_requests_total")
                    && l.contains(r#"route="get_sale""#)
                    && l.contains(r#"class="5xx""#)
            })
            .unwrap_or_else(|| panic!("no 5xx of get_sale in {rendered}"));
        let count: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(count >= 1.0, "{line}");
    }

    #[test]
    fn only_a_plainly_spelled_purchase_path_goes_ahead_of_the_router() {
        let id = |method: &str, path: &str| {
            let request = Request::builder()
                .method(method)
                .uri(path)
                .body(Body::empty())
                .unwrap();
            purchase_sale_id(&request).map(str::to_owned)
        };
        assert_eq!(
            id("POST", "/v1/flash-sales/sale_1/purchase?x=1").as_deref(),
            Some("sale_1")
        );
        assert_eq!(id("GET", "/v1/flash-sales/sale_1/purchase"), None);
        assert_eq!(id("POST", "/v1/flash-sales//purchase"), None);
        assert_eq!(id("POST", "/v1/flash-sales/a/b/purchase"), None);
        assert_eq!(id("POST", "/v1/flash-sales/%73ale_1/purchase"), None);
        assert_eq!(id("POST", "/v1/flash-sales/sale_1/purchase/"), None);
        assert_eq!(id("POST", "/v1/flash-sales/sale_1"), None);
        // Counted and guarded under the label the router's match would give it.
        assert_eq!(RouteLabel::PURCHASE.name(), "purchase");
        assert_eq!(
            ROUTES[RouteLabel::PURCHASE.0].0,
            "/v1/flash-sales/{id}/purchase"
        );
    }

    /// Every answer a purchase can get, asked once by a path that goes ahead of the router
    /// and once by the same path with its first letter percent-encoded, which only the
    /// router reads: same status, same error code, and one order for one key across both.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_purchase_answers_the_same_ahead_of_the_router_and_through_it() {
        let dir = tempfile::tempdir().unwrap();
        let engine =
            stampede_store::testing::reserved_sqlite_engine(&dir.path().join("fast.db")).await;
        let sale = testing::open_sale(&engine, "FAST", 100, 3).await;
        let jwt = Secret::new("fast-path-jwt-secret");
        let app = testing::router(engine, &jwt);
        let token = format!("Bearer {}", mint_shopper_token(&jwt, "shopper-1", None));
        let plain = format!("/v1/flash-sales/{sale}/purchase");
        let encoded = format!(
            "/v1/flash-sales/%{:02X}{}/purchase",
            sale.as_bytes()[0],
            &sale[1..]
        );
        let unknown = "/v1/flash-sales/sale_0190a0b0-0000-7000-8000-000000000000/purchase";
        let unknown_encoded =
            "/v1/flash-sales/%73ale_0190a0b0-0000-7000-8000-000000000000/purchase";

        // (what is asked, token, keys, content type, body)
        type Case<'a> = (&'a str, Option<&'a str>, &'a [&'a str], &'a str, &'a str);
        let cases: [Case; 11] = [
            // Everything wrong at once: the first extractor's refusal (the token's) wins.
            ("nothing right", None, &[], "text/plain", "{"),
            (
                "no token",
                None,
                &["k-none"],
                "application/json",
                r#"{"quantity":1}"#,
            ),
            (
                "a bad token",
                Some("Bearer nope"),
                &["k-bad"],
                "application/json",
                r#"{"quantity":1}"#,
            ),
            (
                "no key",
                Some(&token),
                &[],
                "application/json",
                r#"{"quantity":1}"#,
            ),
            (
                "two keys",
                Some(&token),
                &["k-a", "k-b"],
                "application/json",
                r#"{"quantity":1}"#,
            ),
            (
                "malformed JSON",
                Some(&token),
                &["k-json"],
                "application/json",
                r#"{"quantity":"#,
            ),
            (
                "an unknown field",
                Some(&token),
                &["k-field"],
                "application/json",
                r#"{"quantity":1,"x":1}"#,
            ),
            (
                "quantity 0",
                Some(&token),
                &["k-zero"],
                "application/json",
                r#"{"quantity":0}"#,
            ),
            (
                "over the limit",
                Some(&token),
                &["k-many"],
                "application/json",
                r#"{"quantity":4}"#,
            ),
            (
                "not JSON",
                Some(&token),
                &["k-text"],
                "text/plain",
                r#"{"quantity":1}"#,
            ),
            (
                "an empty body",
                Some(&token),
                &["k-empty"],
                "application/json",
                "",
            ),
        ];
        let ask =
            |path: &str, token: Option<&str>, keys: &[&str], content_type: &str, body: &str| {
                let mut request = Request::post(path).header("content-type", content_type);
                if let Some(token) = token {
                    request = request.header("authorization", token);
                }
                for key in keys {
                    request = request.header("idempotency-key", *key);
                }
                let mut request = request.body(Body::from(body.to_owned())).unwrap();
                request.extensions_mut().insert(testing::peer());
                answer(app.clone(), request)
            };
        for (what, token, keys, content_type, body) in cases {
            let (fast, fast_body) = ask(&plain, token, keys, content_type, body).await;
            let (routed, routed_body) = ask(&encoded, token, keys, content_type, body).await;
            assert!(!fast.is_success(), "{what}: {fast} {fast_body}");
            assert!(
                fast_body["error"]["code"].is_string(),
                "{what}: {fast_body}"
            );
            assert_eq!(
                (fast, &fast_body["error"]["code"]),
                (routed, &routed_body["error"]["code"]),
                "{what}"
            );
        }
        let (fast, fast_body) = ask(
            unknown,
            Some(&token),
            &["k-u"],
            "application/json",
            r#"{"quantity":1}"#,
        )
        .await;
        let (routed, routed_body) = ask(
            unknown_encoded,
            Some(&token),
            &["k-u"],
            "application/json",
            r#"{"quantity":1}"#,
        )
        .await;
        assert_eq!(
            (fast, &fast_body["error"]["code"]),
            (StatusCode::NOT_FOUND, &"sale_not_found".into())
        );
        assert_eq!(
            (routed, &routed_body["error"]["code"]),
            (fast, &fast_body["error"]["code"])
        );

        // One order for one key, whichever way it came; a new key through either way buys.
        // Another shopper: the refusals above spent most of the first one's burst of 20
        // attempts (the shipped per-shopper limit counts malformed attempts too).
        let buyer = format!("Bearer {}", mint_shopper_token(&jwt, "shopper-2", None));
        let one = r#"{"quantity":1}"#;
        let (status, placed) = ask(&plain, Some(&buyer), &["k-1"], "application/json", one).await;
        assert_eq!(status, StatusCode::CREATED, "{placed}");
        let (status, replayed) =
            ask(&encoded, Some(&buyer), &["k-1"], "application/json", one).await;
        assert_eq!((status, &replayed), (StatusCode::OK, &placed));
        let (status, again) = ask(&plain, Some(&buyer), &["k-1"], "application/json", one).await;
        assert_eq!((status, &again), (StatusCode::OK, &placed));
        let (status, other) = ask(&encoded, Some(&buyer), &["k-2"], "application/json", one).await;
        assert_eq!(status, StatusCode::CREATED, "{other}");
        assert_ne!(other["order_id"], placed["order_id"]);
        assert_eq!(other["sale_id"], placed["sale_id"]);
        // The same key with another body: refused the same either way.
        let two = r#"{"quantity":2}"#;
        let (fast, fast_body) = ask(&plain, Some(&buyer), &["k-1"], "application/json", two).await;
        let (routed, routed_body) =
            ask(&encoded, Some(&buyer), &["k-1"], "application/json", two).await;
        assert_eq!(fast, StatusCode::UNPROCESSABLE_ENTITY, "{fast_body}");
        assert_eq!(
            (fast, &fast_body["error"]["code"]),
            (routed, &routed_body["error"]["code"])
        );
    }
}
