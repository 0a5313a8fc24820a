//! The generator against local stubs: rate accuracy, coordinated omission, templating
//! and extraction end to end, a books check that catches a server that lies, and users
//! who keep their own connections.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use clap::Parser;
use parking_lot::Mutex;
use serde_json::{Value, json};
use stampede_press::PressArgs;
use tokio::time::Instant;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    press: PressArgs,
}

fn args(target: &str, extra: &[&str]) -> PressArgs {
    let mut argv = vec![
        "press",
        "--target",
        target,
        "--quiet",
        "--scrape-every",
        "0s",
    ];
    argv.extend_from_slice(extra);
    Cli::parse_from(argv).press
}

async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

/// The built-in `healthz` scenario, open model: `rate` arrivals per second for
/// `duration`, over `connections`.
async fn open_healthz(
    base: &str,
    rate: &str,
    duration: &str,
    connections: &str,
) -> stampede_press::report::Report {
    stampede_press::press(&args(
        base,
        &[
            "--scenario",
            "healthz",
            "--rate",
            rate,
            "--duration",
            duration,
            "--connections",
            connections,
        ],
    ))
    .await
    .unwrap()
}

fn write_scenario(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("scenario.toml");
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_model_holds_its_arrival_rate_within_two_percent() {
    let base = serve_healthz_hanging(|_| false).await;
    let report = open_healthz(&base, "1000/s", "5s", "16").await;
    assert_eq!(report.errors, 0, "{}", report.summary());
    assert_eq!(report.sessions.scheduled, Some(5000));
    let ratio = report.achieved_rps / 1000.0;
    assert!(
        (0.98..=1.02).contains(&ratio),
        "achieved {} req/s",
        report.achieved_rps
    );
    let started = report.sessions.achieved_per_s / 1000.0;
    assert!(
        (0.98..=1.02).contains(&started),
        "started {}/s",
        report.sessions.achieved_per_s
    );
    // Every whole second of the run carried its share, not a burst at the end.
    let full: Vec<_> = report
        .timeline
        .iter()
        .filter(|s| (1..=5).contains(&s.t))
        .collect();
    assert_eq!(full.len(), 5, "{:?}", report.timeline);
    for s in full {
        assert!(
            (950..=1050).contains(&s.requests),
            "second {}: {}",
            s.t,
            s.requests
        );
    }
    assert!(report.passed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_second_stall_shows_in_the_tail() {
    // Every request that arrives between 1 s and 2 s after the first one is held until
    // 2 s: the server "stalls" for a second.
    let first: Arc<Mutex<Option<Instant>>> = Arc::default();
    let router = axum::Router::new()
        .route(
            "/healthz",
            get(
                |State(first): State<Arc<Mutex<Option<Instant>>>>| async move {
                    let start = *first.lock().get_or_insert_with(Instant::now);
                    let since = start.elapsed();
                    if since >= Duration::from_secs(1) && since < Duration::from_secs(2) {
                        tokio::time::sleep_until(start + Duration::from_secs(2)).await;
                    }
                    "ok"
                },
            ),
        )
        .with_state(first);
    let base = serve(router).await;
    let report = open_healthz(&base, "200/s", "5s", "8").await;
    // About a fifth of the arrivals were due during the stall and waited up to 1 s.
    // Measured from when each request was sent, only the 8 requests on the wire would
    // look slow and p90 would be under a millisecond.
    let l = report.latency_ms;
    assert!(l.max >= 900.0, "{l:?}");
    assert!(l.p99 >= 800.0, "{l:?}");
    assert!(l.p90 >= 100.0, "{l:?}");
    // And the stalled second shows on the timeline.
    let worst = report
        .timeline
        .iter()
        .map(|s| s.latency_ms.max)
        .fold(0.0, f64::max);
    assert!(worst >= 900.0, "{:?}", report.timeline);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_show_on_the_timeline_with_their_own_latency() {
    // Every third request is refused after 30 ms; the others are answered at once.
    let hits = Arc::new(AtomicU64::new(0));
    let router = axum::Router::new()
        .route(
            "/healthz",
            get(|State(hits): State<Arc<AtomicU64>>| async move {
                if hits.fetch_add(1, Ordering::Relaxed) % 3 == 0 {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        [("retry-after", "1")],
                        "busy",
                    )
                        .into_response()
                } else {
                    "ok".into_response()
                }
            }),
        )
        .with_state(hits.clone());
    let base = serve(router).await;
    let report = open_healthz(&base, "300/s", "2s", "16").await;
    let refusals = report.steps[0].statuses["503"];
    assert!(refusals > 100, "{}", report.summary());
    let on_timeline: Vec<_> = report
        .timeline
        .iter()
        .filter_map(|s| s.refused.as_ref())
        .collect();
    assert_eq!(
        on_timeline.iter().map(|r| r.count).sum::<u64>(),
        refusals,
        "{:?}",
        report.timeline
    );
    // Their own latency, not the mix's: every refusal took its 30 ms.
    for refused in &on_timeline {
        assert!(refused.latency_ms.p50 >= 29.0, "{:?}", report.timeline);
    }
    assert!(report.latency_ms.p50 < 29.0, "{:?}", report.latency_ms);
}

/// `/healthz` at 200/s for a second, from a scenario that sets no thresholds.
const NO_THRESHOLDS: &str = r#"
name = "no-thresholds"

[load]
rate = 200
duration = "1s"

[[flows]]
name = "probe"
steps = [{ name = "healthz", path = "/healthz", expect = [200] }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_without_one_expected_answer_fails_the_run_without_thresholds() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = write_scenario(&dir, NO_THRESHOLDS);
    let run = |base: String| {
        let scenario = scenario.clone();
        async move {
            stampede_press::press(&args(
                &base,
                &["--scenario", &scenario, "--connections", "4"],
            ))
            .await
            .unwrap()
        }
    };

    let failing = axum::Router::new().route(
        "/healthz",
        get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "broken") }),
    );
    let report = run(serve(failing).await).await;
    assert!(report.requests > 100, "{}", report.summary());
    assert_eq!(report.errors, report.requests, "{}", report.summary());
    assert!(!report.passed, "{}", report.summary());
    let names: Vec<_> = report.thresholds.iter().map(|t| (&*t.name, t.ok)).collect();
    assert_eq!(
        names,
        [("expected_answers:probe/healthz", false)],
        "{}",
        report.summary()
    );

    // One expected answer among the failures is a measurement: with no thresholds, the
    // run stands.
    let hits = Arc::new(AtomicU64::new(0));
    let mostly_failing = axum::Router::new()
        .route(
            "/healthz",
            get(|State(hits): State<Arc<AtomicU64>>| async move {
                if hits.fetch_add(1, Ordering::Relaxed) == 0 {
                    StatusCode::OK
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            }),
        )
        .with_state(hits);
    let report = run(serve(mostly_failing).await).await;
    assert_eq!(report.errors + 1, report.requests, "{}", report.summary());
    assert!(report.thresholds.is_empty(), "{}", report.summary());
    assert!(report.passed, "{}", report.summary());

    // A step that never got an expected answer fails the run, however well the others
    // went.
    let scenario = write_scenario(
        &dir,
        &NO_THRESHOLDS.replace(
            r#"steps = [{ name = "healthz", path = "/healthz", expect = [200] }]"#,
            r#"steps = [{ name = "healthz", path = "/healthz", expect = [200] }, { name = "buy", path = "/buy", expect = [201] }]"#,
        ),
    );
    let half = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/buy",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "broken") }),
        );
    let report = stampede_press::press(&args(
        &serve(half).await,
        &["--scenario", &scenario, "--connections", "4"],
    ))
    .await
    .unwrap();
    assert!(report.errors * 2 >= report.requests, "{}", report.summary());
    assert!(!report.passed, "{}", report.summary());
    let names: Vec<_> = report.thresholds.iter().map(|t| &*t.name).collect();
    assert_eq!(
        names,
        ["expected_answers:probe/buy"],
        "{}",
        report.summary()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_model_keeps_its_users_busy() {
    let hits = Arc::new(AtomicU64::new(0));
    let router = axum::Router::new()
        .route(
            "/healthz",
            get(|State(hits): State<Arc<AtomicU64>>| async move {
                hits.fetch_add(1, Ordering::Relaxed);
                "ok"
            }),
        )
        .with_state(hits.clone());
    let base = serve(router).await;
    let report = stampede_press::press(&args(
        &base,
        &["--scenario", "healthz", "--vus", "4", "--duration", "1s"],
    ))
    .await
    .unwrap();
    assert!(report.requests > 100, "{}", report.summary());
    assert_eq!(report.requests, hits.load(Ordering::Relaxed));
    assert_eq!(report.sessions.scheduled, None);
    assert_eq!(report.generator.connections, 64);
}

/// A shop that records what it was sent, answers each purchase with a fresh order and
/// knows every order it handed out.
#[derive(Default)]
struct Shop {
    orders: Mutex<Vec<String>>,
    paid_paths: Mutex<Vec<String>>,
    keys: Mutex<HashSet<String>>,
    auth_headers: Mutex<HashSet<String>>,
    /// Forget every other order and claim consistent books: a broken server.
    broken: bool,
}

fn shop_router(shop: Arc<Shop>, quantity: u64) -> axum::Router {
    axum::Router::new()
        .route(
            "/v1/products",
            post(|Json(body): Json<Value>| async move { (StatusCode::CREATED, Json(body)) }),
        )
        .route(
            "/v1/flash-sales",
            post(move |Json(body): Json<Value>| async move {
                assert_eq!(body["quantity"], quantity);
                (StatusCode::CREATED, Json(json!({"id": "sale_stub", "quantity": quantity})))
            }),
        )
        .route(
            "/v1/flash-sales/{id}",
            get(move |Path(id): Path<String>| async move {
                Json(json!({"id": id, "sku": "S", "quantity": quantity, "per_user_limit": 1}))
            }),
        )
        .route(
            "/v1/flash-sales/{id}/purchase",
            post(
                |State(shop): State<Arc<Shop>>, headers: HeaderMap, Json(body): Json<Value>| async move {
                    let key = headers["idempotency-key"].to_str().unwrap().to_owned();
                    shop.keys.lock().insert(key);
                    shop.auth_headers
                        .lock()
                        .insert(headers["authorization"].to_str().unwrap().to_owned());
                    let mut orders = shop.orders.lock();
                    let id = format!("ord_{}", orders.len());
                    orders.push(id.clone());
                    // It sells every request: more than it has.
                    (
                        StatusCode::CREATED,
                        Json(json!({"order_id": id, "sale_id": "sale_stub", "quantity": body["quantity"], "status": "pending_payment"})),
                    )
                },
            ),
        )
        .route(
            "/v1/orders/{id}/pay",
            post(|State(shop): State<Arc<Shop>>, Path(id): Path<String>| async move {
                shop.paid_paths.lock().push(id);
                Json(json!({"status": "paid"}))
            }),
        )
        .route(
            "/v1/orders/{id}",
            get(|State(shop): State<Arc<Shop>>, Path(id): Path<String>| async move {
                let n: usize = id.trim_start_matches("ord_").parse().unwrap_or(usize::MAX);
                let known = shop.orders.lock().contains(&id) && !(shop.broken && n % 2 == 1);
                if known {
                    Ok(Json(json!({"order_id": id, "quantity": 1, "status": "paid"})))
                } else {
                    Err(StatusCode::NOT_FOUND)
                }
            }),
        )
        .route(
            "/v1/flash-sales/{id}/audit",
            get(move |State(shop): State<Arc<Shop>>| async move {
                let sold = shop.orders.lock().len() as u64;
                let held = if shop.broken { quantity } else { sold };
                Json(json!({"quantity": quantity, "remaining": quantity.saturating_sub(held),
                    "pending_payment": 0, "paid": held, "cancelled": 0, "expired": 0, "consistent": true}))
            }),
        )
        .with_state(shop)
}

const SHOPPERS: &str = r#"
name = "stub-shoppers"
[load]
rate = 200
duration = "1s"
[data]
users = 200
[setup.sale]
quantity = 1000
[[flows]]
name = "buyer"
[[flows.steps]]
name = "purchase"
method = "POST"
path = "/v1/flash-sales/{{sale_id}}/purchase"
auth = "shopper"
headers = { Idempotency-Key = "{{run}}-{{user}}-{{iteration}}" }
body = { quantity = 1 }
expect = [201]
extract = { order_id = "/order_id" }
book = "purchase"
[[flows.steps]]
name = "pay"
method = "POST"
path = "/v1/orders/{{order_id}}/pay"
auth = "shopper"
expect = [200]
book = "pay"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_extracted_from_answers_feed_later_steps() {
    let shop = Arc::new(Shop::default());
    let base = serve(shop_router(shop.clone(), 1000)).await;
    let dir = tempfile::tempdir().unwrap();
    let scenario = write_scenario(&dir, SHOPPERS);
    let report = stampede_press::press(&args(
        &base,
        &[
            "--scenario",
            &scenario,
            "--admin-token",
            "adm",
            "--jwt-secret",
            "s3cret",
        ],
    ))
    .await
    .unwrap();
    assert!(report.passed, "{}", report.summary());
    // 200 sessions: each bought under its own templated key, then paid the order id
    // the purchase answered with.
    assert_eq!(shop.keys.lock().len(), 200);
    let mut paid = shop.paid_paths.lock().clone();
    paid.sort();
    let mut ordered = shop.orders.lock().clone();
    ordered.sort();
    assert_eq!(paid, ordered);
    // One minted JWT per shopper, sent as a bearer token.
    let auth = shop.auth_headers.lock();
    assert_eq!(auth.len(), 200);
    assert!(auth.iter().all(|h| h.starts_with("Bearer ey")));
    assert!(report.books.ok, "{:?}", report.books);
    assert_eq!(report.books.acknowledged_orders, 200);
    assert_eq!(report.books.paid_orders, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_books_check_fails_a_server_that_oversells_and_loses_orders() {
    let shop = Arc::new(Shop {
        broken: true,
        ..Shop::default()
    });
    // Only 50 units, but the stub sells to all 200 shoppers and forgets half the orders.
    let base = serve(shop_router(shop.clone(), 50)).await;
    let dir = tempfile::tempdir().unwrap();
    let scenario = write_scenario(&dir, &SHOPPERS.replace("quantity = 1000", "quantity = 50"));
    let report = stampede_press::press(&args(
        &base,
        &[
            "--scenario",
            &scenario,
            "--admin-token",
            "adm",
            "--jwt-secret",
            "s3cret",
        ],
    ))
    .await
    .unwrap();
    let books = &report.books;
    assert!(books.checked);
    assert!(!books.ok);
    assert_eq!(books.oversold_units, 150, "{books:?}");
    assert_eq!(books.unknown_orders, 100, "{books:?}");
    assert!(!report.passed, "a failed books check fails the run");
    assert!(report.summary().contains("books: FAILED"));
}

#[tokio::test]
async fn a_scenario_that_needs_secrets_says_so() {
    let base = serve(axum::Router::new()).await;
    let err = stampede_press::press(&args(&base, &["--scenario", "flash-sale"]))
        .await
        .expect_err("no admin token");
    assert!(format!("{err:#}").contains("admin token"), "{err:#}");
    let err = stampede_press::press(&args(&base, &["--scenario", "nonesuch"]))
        .await
        .expect_err("unknown scenario");
    assert!(
        format!("{err:#}").contains("no scenario `nonesuch`"),
        "{err:#}"
    );
    // A server that is not there is a clear error, not a report of zeros.
    let err = stampede_press::press(&args(
        "http://127.0.0.1:1",
        &["--scenario", "healthz", "--duration", "1s"],
    ))
    .await
    .expect_err("nothing listens");
    assert!(format!("{err:#}").contains("cannot connect"), "{err:#}");
}

const WHO: &str = r#"
name = "who"
[load]
vus = 8
duration = "3s"
[data]
users = 8
[[flows]]
name = "visitor"
steps = [{ name = "who", path = "/who", headers = { x-user = "{{user}}" }, expect = [200, 503] }]
"#;

/// Which connections (client ports) each user's requests came on.
type Seen = Arc<Mutex<std::collections::HashMap<String, HashSet<u16>>>>;

/// Answers each user's first request with 503 and `Retry-After: 1`, then 200s, and
/// notes the connection of every request.
async fn serve_who(seen: Seen) -> String {
    use axum::extract::ConnectInfo;
    use axum::response::IntoResponse;
    let router = axum::Router::new()
        .route(
            "/who",
            get(
                |State(seen): State<Seen>,
                 ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
                 headers: HeaderMap| async move {
                    let user = headers["x-user"].to_str().unwrap().to_owned();
                    let mut seen = seen.lock();
                    let first = !seen.contains_key(&user);
                    seen.entry(user).or_default().insert(peer.port());
                    if first {
                        (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "1")]).into_response()
                    } else {
                        "ok".into_response()
                    }
                },
            ),
        )
        .with_state(seen);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await
        .unwrap()
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_model_users_keep_a_connection_each_when_there_are_enough() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = write_scenario(&dir, WHO);
    let run = |base: String, connections: &'static str| {
        let scenario = scenario.clone();
        async move {
            let argv = [
                "--scenario",
                &scenario,
                "--threads",
                "2",
                "--connections",
                connections,
                "--retry-after",
                "honor",
            ];
            stampede_press::press(&args(&base, &argv)).await.unwrap()
        }
    };

    // 8 users, 64 connections: each user on one connection of its own, as a browser,
    // even after each was refused and waited while the others went on.
    let seen = Seen::default();
    let report = run(serve_who(seen.clone()).await, "64").await;
    assert!(report.requests > 8, "{}", report.summary());
    let seen = seen.lock().clone();
    assert_eq!(seen.len(), 8, "{seen:?}");
    for (user, ports) in &seen {
        assert_eq!(ports.len(), 1, "{user} used {ports:?}");
    }
    let ports: HashSet<u16> = seen.values().flatten().copied().collect();
    assert_eq!(ports.len(), 8, "users shared connections: {seen:?}");

    // 8 users, 2 connections: they share them, as behind a gateway.
    let shared = Seen::default();
    let report = run(serve_who(shared.clone()).await, "2").await;
    assert!(report.requests > 8, "{}", report.summary());
    let ports: HashSet<u16> = shared.lock().values().flatten().copied().collect();
    assert_eq!(ports.len(), 2, "{:?}", shared.lock());
}

/// One session at a time (`--max-sessions 1`, one thread) for one second at `rate`,
/// against answers that take 100 ms: a generator that cannot keep its schedule.
async fn behind_schedule(rate: &str, extra: &[&str]) -> stampede_press::report::Report {
    let router = axum::Router::new().route(
        "/healthz",
        get(|| async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            "ok"
        }),
    );
    let base = serve(router).await;
    let mut argv = vec![
        "--scenario",
        "healthz",
        "--rate",
        rate,
        "--duration",
        "1s",
        "--max-sessions",
        "1",
        "--threads",
        "1",
    ];
    argv.extend_from_slice(extra);
    stampede_press::press(&args(&base, &argv)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_started_after_the_schedule_do_not_count_as_kept() {
    // At most ~10 of the 100 arrivals due in the second can start within it; the rest
    // start late.
    let report = behind_schedule("100/s", &[]).await;
    assert_eq!(report.sessions.started, 100, "{}", report.summary());
    assert!(
        report.sessions.achieved_per_s <= 15.0,
        "{}",
        report.summary()
    );
    assert!(
        report
            .generator
            .warnings
            .iter()
            .any(|w| w.contains("started late")),
        "{:?}",
        report.generator.warnings
    );
}

/// A generator far behind its schedule stops starting sessions at the drain deadline:
/// the run lasts at most its duration and the drain, whatever the rate asked (it used to
/// start every scheduled arrival, however late: a mistyped rate ran until killed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generator_behind_its_schedule_stops_at_the_drain_deadline() {
    let began = Instant::now();
    // 1,000 arrivals one at a time at 100 ms each would take 100 s.
    let report = behind_schedule("1000/s", &["--drain", "1s"]).await;
    let took = began.elapsed();
    assert!(took < Duration::from_secs(10), "ran {took:?}");
    assert_eq!(report.sessions.scheduled, Some(1000));
    assert!(
        (5..=40).contains(&report.sessions.started),
        "{}",
        report.summary()
    );
    // The arrivals never started fail the run, as requests cut off at the deadline do.
    assert!(!report.passed, "{}", report.summary());
    assert!(
        report
            .generator
            .warnings
            .iter()
            .any(|w| w.contains("never started")),
        "{:?}",
        report.generator.warnings
    );
}

#[test]
fn rates_beyond_what_a_run_can_schedule_are_refused() {
    for rate in ["1e300/s", "inf/s", "0/s", "-5/s", "20000001/s"] {
        let parsed = Cli::try_parse_from(["press", "--rate", rate]);
        assert!(parsed.is_err(), "{rate} was taken");
    }
    assert!(Cli::try_parse_from(["press", "--rate", "10000000/s"]).is_ok());
    // A peak to size a cluster for is never sent: any positive rate.
    #[derive(Parser)]
    struct Capacity {
        #[command(flatten)]
        capacity: stampede_press::CapacityArgs,
    }
    let sized = Capacity::try_parse_from(["capacity", "--target-peak", "50000000/s"]).unwrap();
    assert_eq!(sized.capacity.target_peak.unwrap().0, 50_000_000.0);
}

/// A closed model with more users than `--max-sessions` is refused: the users past the
/// bound would have waited for a place until the run was over and never sent, without
/// a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_users_than_sessions_allowed_is_refused() {
    let base = serve_healthz_hanging(|_| false).await;
    let refused = stampede_press::press(&args(
        &base,
        &[
            "--scenario",
            "healthz",
            "--vus",
            "4",
            "--max-sessions",
            "2",
            "--duration",
            "1s",
        ],
    ))
    .await
    .expect_err("4 users in 2 sessions");
    assert!(refused.to_string().contains("--max-sessions"), "{refused}");
}

/// A `/healthz` whose `n`th request (from 0) never gets its answer when `hangs(n)`.
async fn serve_healthz_hanging(hangs: fn(u64) -> bool) -> String {
    let hits = Arc::new(AtomicU64::new(0));
    let router = axum::Router::new()
        .route(
            "/healthz",
            get(move |State(hits): State<Arc<AtomicU64>>| async move {
                if hangs(hits.fetch_add(1, Ordering::SeqCst)) {
                    std::future::pending::<()>().await;
                }
                "ok"
            }),
        )
        .with_state(hits);
    serve(router).await
}

/// `stampede press capacity` with `extra` against `target`.
fn capacity_args(target: &str, extra: &[&str]) -> stampede_press::CapacityArgs {
    #[derive(Parser)]
    struct Capacity {
        #[command(flatten)]
        capacity: stampede_press::CapacityArgs,
    }
    let mut argv = vec![
        "capacity",
        "--target",
        target,
        "--quiet",
        "--scrape-every",
        "0s",
    ];
    argv.extend_from_slice(extra);
    Capacity::parse_from(argv).capacity
}

/// A probe with a ramp is judged against what its schedule asked for, ramp included.
/// Before, it was held to the plateau's rate over the whole run: a 2 s ramp before 4 s
/// at 200/s schedules ~167/s on average, under the 190/s bar, so every probe failed and
/// the search found no capacity against any server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capacity_probe_with_a_ramp_is_held_to_its_own_schedule() {
    let base = serve_healthz_hanging(|_| false).await;
    let found = stampede_press::capacity(&capacity_args(
        &base,
        &[
            "--scenario",
            "healthz",
            "--ramp",
            "2s",
            "--step-duration",
            "4s",
            "--start-rate",
            "200/s",
            "--max-rate",
            "200/s",
            "--max-probes",
            "1",
        ],
    ))
    .await
    .unwrap();
    assert_eq!(found.capacity_rps, Some(200.0), "{:?}", found.probes);
}

/// A probe whose run would not pass as `stampede press` fails: one request abandoned at
/// the drain deadline is under a 1% error limit, and was taken as a pass before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capacity_probe_with_a_request_abandoned_at_the_drain_fails() {
    // One request in the run hangs for good.
    let base = serve_healthz_hanging(|n| n == 5).await;
    let found = stampede_press::capacity(&capacity_args(
        &base,
        &[
            "--scenario",
            "healthz",
            "--step-duration",
            "2s",
            "--start-rate",
            "200/s",
            "--max-rate",
            "200/s",
            "--max-probes",
            "1",
            "--timeout",
            "60s",
            "--drain",
            "1s",
            "--max-error-rate",
            "1%",
        ],
    ))
    .await
    .unwrap();
    assert_eq!(found.capacity_rps, None, "{:?}", found.probes);
    let reason = found.probes[0].reason.as_deref().unwrap_or_default();
    assert!(reason.contains("abandoned"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_still_out_at_the_drain_deadline_counts_as_failed() {
    // The first request is answered; every later one hangs for good.
    let base = serve_healthz_hanging(|n| n > 0).await;
    let report = stampede_press::press(&args(
        &base,
        &[
            "--scenario",
            "healthz",
            "--rate",
            "2/s",
            "--duration",
            "1s",
            "--timeout",
            "60s",
            "--drain",
            "1s",
        ],
    ))
    .await
    .unwrap();
    assert_eq!(report.requests, 2, "{}", report.summary());
    assert_eq!(report.errors, 1, "{}", report.summary());
    assert_eq!(report.steps[0].transport_errors.get("abandoned"), Some(&1));
    // It waited from its schedule to the deadline: the tail shows it.
    assert!(report.latency_ms.max >= 900.0, "{:?}", report.latency_ms);
    assert_eq!(report.sessions.abandoned, 1);
    assert!(!report.passed, "{}", report.summary());
}
