//! The guard over HTTP: the shipped per-shopper limit, flow rules and degradation set
//! through the admin API, rules kept across a restart, the payment and database
//! breakers, dry run and the stats endpoint.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use stampede_store::testing::Backend;

/// A flow rule refusing `resource` past `qps` a second, with a burst of `burst`.
fn reject_past(resource: &str, qps: f64, burst: u32) -> stampede_guard::FlowRule {
    stampede_guard::FlowRule {
        resource: resource.into(),
        qps: Some(qps),
        burst,
        behavior: stampede_guard::Behavior::Reject {},
        max_concurrency: None,
        dry_run: false,
    }
}

/// An app whose purchases share a rate of `burst` at once (one more each 10 s), with no
/// held refusals: every attempt reaches the limiter at once (a held retry would arrive
/// after tokens came back; holds have their own test below).
async fn app_with_purchase_burst(burst: u32) -> TestApp {
    spawn_app_with(|config| {
        config.guard.system.hold_refused = Duration::ZERO;
        config.guard.flow = vec![reject_past("purchase", 0.1, burst)];
    })
    .await
}

async fn put_rules(app: &TestApp, token: Option<&str>, rules: &Value) -> Reply {
    let mut request = app.client.put(app.url("/v1/guard/rules")).json(rules);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    send(request).await
}

async fn rules(app: &TestApp) -> Value {
    let reply = app.get("/v1/guard/rules", Some(&app.admin)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.body
}

#[tokio::test]
async fn a_scalper_gets_429s_and_other_shoppers_do_not_notice() {
    // A purchase rate everyone shares, with room for the scalper's 20 and a few more:
    // the scalper's refused attempts must not use it up.
    let app = app_with_purchase_burst(25).await;
    let sale = app.live_sale("GUARD-SCALP", 1_000, 1_000).await;
    let scalper = app.shopper("scalper");
    let mut statuses = Vec::new();
    let started = Instant::now();
    for i in 0..30 {
        let reply = app
            .purchase_reply(&scalper, &sale, &format!("scalp-{i}"), 1)
            .await;
        if reply.status == 429 {
            assert_error(&reply, 429, "throttled");
            let retry: u64 = reply.headers["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(retry >= 1);
        }
        statuses.push(reply.status);
    }
    // The shipped default: a burst of 20 at once, then 10/s, so a slow run (a busy
    // machine) earns one more for each 100 ms the attempts took.
    let refilled = (started.elapsed().as_millis() / 100) as usize;
    let ok = statuses.iter().filter(|s| **s == 201).count();
    let throttled = statuses.iter().filter(|s| **s == 429).count();
    assert!((20..=21 + refilled).contains(&ok), "{statuses:?}");
    assert_eq!(ok + throttled, 30, "{statuses:?}");
    // A person buying next to the scalper is not affected: the shared rate still has
    // room, since only the scalper's admitted attempts took from it.
    let (status, _) = app.purchase(&app.shopper("person"), &sale, "p-1", 1).await;
    assert_eq!(status, 201);
    let purchase = resource_totals(&app, "purchase").await;
    assert_eq!(purchase["blocked_throttled"], 0, "{purchase}");
    // Throttled attempts took no stock.
    let audit = app
        .get(&format!("/v1/flash-sales/{sale}/audit"), Some(&app.admin))
        .await;
    assert_eq!(audit.body["pending_payment"], ok as u64 + 1);
}

#[tokio::test]
async fn a_shoppers_malformed_attempts_count_against_their_own_limit_not_the_shared_rate() {
    // A purchase rate everyone shares with room for the scalper's 20 and a few more:
    // malformed attempts (no key, a bad body) past the shopper's own burst must be
    // refused per key, which gives the shared rate back, and not use it up.
    let app = app_with_purchase_burst(30).await;
    let sale = app.live_sale("GUARD-MALFORMED", 100, 100).await;
    let scalper = app.shopper("scalper");
    let url = app.url(&format!("/v1/flash-sales/{sale}/purchase"));
    let mut statuses = Vec::new();
    let started = Instant::now();
    for i in 0..40 {
        let request = app.client.post(&url).bearer_auth(&scalper);
        let request = if i % 2 == 0 {
            request.json(&json!({"quantity": 1}))
        } else {
            request
                .header("idempotency-key", format!("bad-{i}"))
                .json(&json!({"quantity": 0}))
        };
        let reply = send(request).await;
        match reply.status {
            400 => assert_error_shape(&reply.body),
            _ => assert_error(&reply, 429, "throttled"),
        }
        statuses.push(reply.status);
    }
    let refilled = (started.elapsed().as_millis() / 100) as usize;
    let malformed = statuses.iter().filter(|s| **s == 400).count();
    assert!((20..=21 + refilled).contains(&malformed), "{statuses:?}");
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        40 - malformed
    );
    // The shared rate kept room for the others, and refused none of the scalper's.
    for i in 0..3 {
        let reply = app
            .purchase_reply(&app.shopper(&format!("p{i}")), &sale, "k", 1)
            .await;
        assert_eq!(reply.status, 201, "{}", reply.body);
    }
    let purchase = resource_totals(&app, "purchase").await;
    assert_eq!(purchase["blocked_throttled"], 0, "{purchase}");
    // Nothing was sold for the malformed attempts.
    let audit = app
        .get(&format!("/v1/flash-sales/{sale}/audit"), Some(&app.admin))
        .await;
    assert_eq!(audit.body["pending_payment"], 3);
}

#[tokio::test]
async fn requests_without_a_valid_token_spend_nothing_of_the_routes_rate() {
    // A purchase rate of 3 at once for everyone: a flood without a token (or with a
    // forged one) must not use it up before a shopper's request arrives.
    let app = app_with_purchase_burst(3).await;
    let sale = app.live_sale("GUARD-ANON", 100, 100).await;
    for i in 0..10 {
        let mut request = app
            .client
            .post(app.url(&format!("/v1/flash-sales/{sale}/purchase")))
            .header("idempotency-key", format!("anon-{i}"))
            .json(&json!({"quantity": 1}));
        if i % 2 == 1 {
            request = request.bearer_auth("not.a.token");
        }
        let reply = send(request).await;
        assert_eq!(reply.status, 401, "{}", reply.body);
    }
    for i in 0..3 {
        let reply = app
            .purchase_reply(&app.shopper(&format!("s{i}")), &sale, "k", 1)
            .await;
        assert_eq!(reply.status, 201, "{}", reply.body);
    }
    // The rate itself still holds.
    let reply = app.purchase_reply(&app.shopper("s3"), &sale, "k", 1).await;
    assert_error(&reply, 429, "throttled");
}

/// On a paced route, a request without a valid token is refused 401 before the guard
/// books it a place in the route's queue, so a flood of them cannot fill the queue and
/// push a payer past `max_queue`. Before, each kept its place for its whole wait: with
/// one pay a second and two seconds of queue, the first two of the flood held the
/// queue, the rest of it was refused 429, and so was the payer who came just after.
#[tokio::test]
async fn requests_without_a_valid_token_take_no_place_in_a_paced_queue() {
    let app = spawn_app_with(|config| {
        config.guard.system.hold_refused = Duration::ZERO;
        config.guard.flow = vec![stampede_guard::FlowRule {
            resource: "pay".into(),
            qps: Some(1.0),
            burst: 1,
            behavior: stampede_guard::Behavior::Pace {
                max_queue: Duration::from_secs(2),
            },
            max_concurrency: None,
            dry_run: false,
        }];
    })
    .await;
    let sale = app.live_sale("GUARD-PACED-ANON", 10, 1).await;
    let payers: Vec<_> = (0..2).map(|i| app.shopper(&format!("payer-{i}"))).collect();
    let mut orders = Vec::new();
    for payer in &payers {
        orders.push(app.buy(payer, &sale, "k", 1).await);
    }
    // The first payer takes this second's place: whatever comes next waits its turn.
    let reply = app.pay(&payers[0], &orders[0]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let url = app.url(&format!("/v1/orders/{}/pay", orders[1]));
    // No token, a forged one, and the admin's (pay is a shopper's): all at once.
    let flood = futures::future::join_all((0..9).map(|i| {
        let request = app.client.post(&url);
        send(match i % 3 {
            0 => request,
            1 => request.bearer_auth("not.a.token"),
            _ => request.bearer_auth(&app.admin),
        })
    }));
    let payer = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        app.pay(&payers[1], &orders[1]).await
    };
    let (flood, reply) = tokio::join!(flood, payer);
    for refused in flood {
        assert_error(&refused, 401, "unauthorized");
    }
    assert_eq!(reply.status, 200, "{}", reply.body);
    let pay = resource_totals(&app, "pay").await;
    assert_eq!(pay["passed"], 2, "{pay}");
    assert_eq!(pay["blocked_throttled"], 0, "{pay}");
}

/// Purchases paced to `qps` with `max_queue` of queue, no held refusals, and a per-sale
/// limit of `sale_burst` at once (and one more each 1,000 s) when given.
fn pace_purchases(
    config: &mut stampede::Config,
    qps: f64,
    max_queue: Duration,
    sale_burst: Option<u32>,
) {
    config.guard.system.hold_refused = Duration::ZERO;
    config.guard.flow = vec![stampede_guard::FlowRule {
        resource: "purchase".into(),
        qps: Some(qps),
        burst: 1,
        behavior: stampede_guard::Behavior::Pace { max_queue },
        max_concurrency: None,
        dry_run: false,
    }];
    if let Some(burst) = sale_burst {
        config.guard.hot.push(stampede_guard::HotRule {
            name: "per-sale".into(),
            resource: "purchase".into(),
            param: stampede_guard::Param::Sale,
            qps: 0.001,
            burst,
            dry_run: false,
        });
    }
}

/// An app whose purchases are paced to 20 a second with 3 s of queue (60 places), with
/// a per-sale limit of `sale_burst` when given.
async fn app_with_paced_purchases(sale_burst: Option<u32>) -> TestApp {
    spawn_app_with(|config| pace_purchases(config, 20.0, Duration::from_secs(3), sale_burst)).await
}

/// Sixty purchases at once, `buyer(i)`'s each, in `sale`, and a person's purchase in
/// `person_sale` 300 ms later: the 60 purchases' replies, and the person's, which is
/// checked to be a 201 served within 2 s. Behind the 20 a second of the flood's that
/// pass their per-key limits it waits ~0.7 s; behind all 60, ~2.7 s.
async fn flood_then_a_person(
    app: &TestApp,
    buyer: impl Fn(usize) -> String,
    sale: &str,
    person_sale: &str,
) -> Vec<Reply> {
    let buyers: Vec<_> = (0..60).map(|i| (buyer(i), format!("k-{i}"))).collect();
    let flood = futures::future::join_all(
        buyers
            .iter()
            .map(|(token, key)| app.purchase_reply(token, sale, key, 1)),
    );
    let person = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let sent = Instant::now();
        let reply = app
            .purchase_reply(&app.shopper("person"), person_sale, "p-1", 1)
            .await;
        (reply, sent.elapsed())
    };
    let (flood, (reply, waited)) = tokio::join!(flood, person);
    assert_eq!(reply.status, 201, "{}", reply.body);
    assert!(
        waited < Duration::from_secs(2),
        "the person waited {waited:?}"
    );
    flood
}

/// The purchases of `flood` bought, each other one refused 429 `throttled`, and the
/// route's flow rule passed those and the person's and refused none.
async fn bought_the_rest_refused_per_key(app: &TestApp, flood: &[Reply]) -> usize {
    let bought = flood.iter().filter(|r| r.status == 201).count();
    for refused in flood.iter().filter(|r| r.status != 201) {
        assert_error(refused, 429, "throttled");
    }
    let purchase = resource_totals(app, "purchase").await;
    assert_eq!(purchase["blocked_throttled"], 0, "{purchase}");
    assert_eq!(purchase["passed"], bought as u64 + 1, "{purchase}");
    bought
}

/// On a paced purchase route, a shopper's attempts past their own limit are refused
/// before the guard books them a place in the route's queue: before, each waited for its
/// turn and was refused only then, so a scalper's 60 at once held the whole queue (20 a
/// second, 3 s of it) and a person who came just after waited behind all of them.
#[tokio::test]
async fn a_scalpers_attempts_past_their_limit_take_no_place_in_a_paced_queue() {
    let app = app_with_paced_purchases(None).await;
    let sale = app.live_sale("GUARD-PACED-SCALP", 1_000, 1_000).await;
    let scalper = app.shopper("scalper");
    let flood = flood_then_a_person(&app, |_| scalper.clone(), &sale, &sale).await;
    // The shipped shopper limit: a burst of 20, then 10 a second while the flood waits.
    let bought = bought_the_rest_refused_per_key(&app, &flood).await;
    assert!((20..=40).contains(&bought), "{bought} of 60 bought");
}

/// The same for a sale's own limit: a rush on one sale past its limit is refused before
/// the queue, and a shopper buying in another sale just after is served.
#[tokio::test]
async fn a_rush_past_a_sales_limit_takes_no_place_in_a_paced_queue() {
    let app = app_with_paced_purchases(Some(20)).await;
    let hot = app.live_sale("GUARD-PACED-HOT", 1_000, 1).await;
    let quiet = app.live_sale("GUARD-PACED-QUIET", 10, 1).await;
    let flood =
        flood_then_a_person(&app, |i| app.shopper(&format!("rush-{i}")), &hot, &quiet).await;
    assert_eq!(bought_the_rest_refused_per_key(&app, &flood).await, 20);
}

/// A paced purchase whose client gives up while it waits spends nothing of the sale's
/// limit: the allowance taken before the queue goes back when the request is dropped.
/// Before, it stayed spent, so buyers who left the queue used up a sale's limit
/// without buying.
#[tokio::test]
async fn a_paced_purchase_given_up_in_the_queue_spends_none_of_the_sales_limit() {
    let app =
        spawn_app_with(|config| pace_purchases(config, 2.0, Duration::from_secs(10), Some(4)))
            .await;
    let sale = app.live_sale("GUARD-PACED-GONE", 100, 1).await;
    // Four at once: the first is sent at once, the others wait 0.5, 1 and 1.5 s, and
    // their clients stop waiting after 250 ms.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(250))
        .build()
        .unwrap();
    let url = app.url(&format!("/v1/flash-sales/{sale}/purchase"));
    let gave_up = futures::future::join_all((0..4).map(|i| {
        impatient
            .post(&url)
            .bearer_auth(app.shopper(&format!("gone-{i}")))
            .header("idempotency-key", "k")
            .json(&json!({"quantity": 1}))
            .send()
    }))
    .await;
    let timed_out = gave_up
        .iter()
        .filter(|r| r.as_ref().is_err_and(reqwest::Error::is_timeout))
        .count();
    assert!(timed_out >= 3, "{timed_out} of 4 gave up");
    // The three that left the queue left the sale's allowance: three others buy now.
    for i in 0..3 {
        let reply = app
            .purchase_reply(&app.shopper(&format!("stayed-{i}")), &sale, "k", 1)
            .await;
        assert_eq!(reply.status, 201, "{i}: {}", reply.body);
    }
}

#[tokio::test]
async fn another_method_on_a_guarded_path_spends_nothing_of_its_rate() {
    // The same purchase rate of 3 at once: GETs, PUTs and DELETEs on the purchase path
    // (with a shopper's token, or none) are answered 405 by the router and must not use
    // it up, nor count as purchases the guard let through.
    let app = app_with_purchase_burst(3).await;
    let sale = app.live_sale("GUARD-METHOD", 100, 100).await;
    let shopper = app.shopper("browser");
    let url = app.url(&format!("/v1/flash-sales/{sale}/purchase"));
    for i in 0..9 {
        let request = match i % 3 {
            0 => app.client.get(&url),
            1 => app.client.put(&url).json(&json!({"quantity": 1})),
            _ => app.client.delete(&url),
        };
        let request = if i < 6 {
            request.bearer_auth(&shopper)
        } else {
            request
        };
        let reply = send(request.header("idempotency-key", format!("m-{i}"))).await;
        assert_error(&reply, 405, "method_not_allowed");
    }
    assert_eq!(resource_totals(&app, "purchase").await["passed"], 0);
    for i in 0..3 {
        let reply = app
            .purchase_reply(&app.shopper(&format!("s{i}")), &sale, "k", 1)
            .await;
        assert_eq!(reply.status, 201, "{}", reply.body);
    }
    let reply = app.purchase_reply(&app.shopper("s3"), &sale, "k", 1).await;
    assert_error(&reply, 429, "throttled");
    let purchase = resource_totals(&app, "purchase").await;
    assert_eq!(purchase["passed"], 3, "{purchase}");
    assert_eq!(purchase["blocked_throttled"], 1, "{purchase}");
}

/// A purchase whose body is still arriving holds none of the route's concurrency: with
/// one purchase at a time allowed, a connection trickling its body does not lock the
/// shoppers out, and is itself admitted once its body is whole.
#[tokio::test]
async fn a_body_still_arriving_holds_no_concurrency_slot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app_with(|config| {
        config.guard.flow = vec![stampede_guard::FlowRule {
            resource: "purchase".into(),
            qps: None,
            burst: 1,
            behavior: stampede_guard::Behavior::Reject {},
            max_concurrency: Some(1),
            dry_run: false,
        }];
    })
    .await;
    let sale = app.live_sale("GUARD-TRICKLE", 10, 10).await;
    let slow = app.shopper("slow");
    let body = r#"{"quantity": 1}"#;
    let mut trickler = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap();
    trickler
        .write_all(
            format!(
                "POST /v1/flash-sales/{sale}/purchase HTTP/1.1\r\nHost: x\r\n\
                 Authorization: Bearer {slow}\r\nIdempotency-Key: slow-1\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
                body.len(),
                &body[..1]
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Meanwhile shoppers buy, one at a time, as the rule allows.
    for i in 0..3 {
        let reply = app
            .purchase_reply(&app.shopper(&format!("quick-{i}")), &sale, "k", 1)
            .await;
        assert_eq!(reply.status, 201, "{}", reply.body);
    }
    // The rest of the body: the slow purchase is admitted and placed too.
    trickler.write_all(&body.as_bytes()[1..]).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), trickler.read(&mut answer))
        .await
        .expect("an answer to the slow purchase")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    assert_eq!(app.remaining(&sale).await, 6);
}

#[tokio::test]
async fn a_per_sale_limit_counts_every_spelling_of_the_sale_as_one() {
    let app = spawn_app_with(|config| {
        config.guard.system.hold_refused = Duration::ZERO;
        config.guard.hot.push(stampede_guard::HotRule {
            name: "per-sale".into(),
            resource: "purchase".into(),
            param: stampede_guard::Param::Sale,
            qps: 0.1,
            burst: 2,
            dry_run: false,
        });
    })
    .await;
    let sale = app.live_sale("GUARD-SPELL", 1_000, 1_000).await;
    let uuid = sale.strip_prefix("sale_").unwrap().to_owned();
    let spellings = [
        sale.clone(),
        format!("sale_{}", uuid.to_uppercase()),
        format!(
            "sale_{}-{}-{}-{}-{}",
            &uuid[..8],
            &uuid[8..12],
            &uuid[12..16],
            &uuid[16..20],
            &uuid[20..]
        ),
    ];
    let mut statuses = Vec::new();
    for (i, spelling) in spellings.iter().enumerate() {
        let buyer = app.shopper(&format!("spelling-{i}"));
        statuses.push(app.purchase(&buyer, spelling, &format!("s-{i}"), 1).await.0);
    }
    assert_eq!(statuses, [201, 201, 429]);
}

#[tokio::test]
async fn rule_changes_are_validated_versioned_and_survive_a_restart() {
    // The shoppers' purchases below share the test client's connection, as behind a
    // gateway: without a hold, each reaches the rate limit the moment it is sent.
    let mut app = spawn_app_with(|config| config.guard.system.hold_refused = Duration::ZERO).await;
    let current = rules(&app).await;
    assert_eq!(current["version"], 0);
    assert_eq!(current["hot"][0]["qps"], 10.0);

    // Only the admin may change them.
    let mut next = current.clone();
    next["version"] = json!(1);
    next["flow"] = json!([{"resource": "purchase", "qps": 5.0, "burst": 5}]);
    let reply = put_rules(&app, Some(&app.shopper("eve")), &next).await;
    assert_error(&reply, 401, "unauthorized");
    // A stale version is a conflict.
    let mut stale = next.clone();
    stale["version"] = json!(0);
    assert_error(
        &put_rules(&app, Some(&app.admin), &stale).await,
        409,
        "version_conflict",
    );
    // Invalid rules: 400 naming each field; nothing changes.
    let mut bad = next.clone();
    bad["flow"] = json!([{"resource": "purchase", "qps": -1.0, "burst": 0}]);
    let reply = put_rules(&app, Some(&app.admin), &bad).await;
    assert_error(&reply, 400, "invalid_rules");
    let message = reply.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("flow[0].qps") && message.contains("flow[0].burst"),
        "{message}"
    );
    // Rules that nothing would ask are refused too, each naming its field: a flow rule
    // on no resource, a shopper limit on a route that does not know the shopper, a
    // breaker on no dependency.
    let mut unasked = next.clone();
    unasked["flow"] = json!([{"resource": "checkout", "qps": 5.0}]);
    unasked["hot"] = json!([{"name": "x", "resource": "get_sale", "param": "shopper", "qps": 1.0}]);
    unasked["breakers"][0]["name"] = json!("inventory");
    let reply = put_rules(&app, Some(&app.admin), &unasked).await;
    assert_error(&reply, 400, "invalid_rules");
    let message = reply.body["error"]["message"].as_str().unwrap();
    for field in ["flow[0].resource", "hot[0].resource", "breakers[0].name"] {
        assert!(message.contains(field), "{field}: {message}");
    }
    // A bad value and a name nothing asks, in one change: both are reported.
    let mut both = next.clone();
    both["flow"] = json!([{"resource": "checkout", "qps": 0.0}]);
    let reply = put_rules(&app, Some(&app.admin), &both).await;
    assert_error(&reply, 400, "invalid_rules");
    let message = reply.body["error"]["message"].as_str().unwrap();
    for field in ["flow[0].qps", "flow[0].resource"] {
        assert!(message.contains(field), "{field}: {message}");
    }
    // A field refused for its value is not refused again for its name.
    both["flow"] = json!([{"resource": "", "qps": 1.0}]);
    let reply = put_rules(&app, Some(&app.admin), &both).await;
    assert_error(&reply, 400, "invalid_rules");
    let message = reply.body["error"]["message"].as_str().unwrap();
    assert_eq!(message.matches("flow[0].resource").count(), 1, "{message}");
    let mut unknown = next.clone();
    unknown["flow"][0]["bogus"] = json!(1);
    assert_error(
        &put_rules(&app, Some(&app.admin), &unknown).await,
        400,
        "invalid_body",
    );
    assert_eq!(rules(&app).await["version"], 0);

    // A valid change is live at once: the sixth purchase in a burst is throttled.
    let reply = put_rules(&app, Some(&app.admin), &next).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let sale = app.live_sale("GUARD-FLOW", 100, 10).await;
    let mut statuses = Vec::new();
    for i in 0..8 {
        let (status, _) = app
            .purchase(&app.shopper(&format!("s{i}")), &sale, "k", 1)
            .await;
        statuses.push(status);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        3,
        "{statuses:?}"
    );

    // Kept in the store: a restart comes back with version 1 and the flow rule.
    app.restart().await;
    let after = rules(&app).await;
    assert_eq!(after["version"], 1);
    assert_eq!(after["flow"][0]["resource"], "purchase");
    assert_eq!(after["flow"][0]["qps"], 5.0);
}

#[tokio::test]
async fn rule_changes_that_keep_naming_new_rules_are_refused_at_the_resource_bound() {
    // Every name a rule used stays tracked until a restart: an admin script that names
    // its hot rules afresh at every change would grow the guard without end. At
    // `RESOURCES_MAX` names it is refused, the rules in force stay, and a change that
    // reuses names still goes through.
    let app = spawn_app().await;
    let mut next = rules(&app).await;
    let hot = |version: u64| -> Value {
        (0..stampede_guard::rules::MAX_HOT_RULES)
            .map(|i| json!({"name": format!("v{version}-{i}"), "resource": "purchase", "param": "shopper", "qps": 10.0, "burst": 20}))
            .collect()
    };
    let most = (stampede_guard::RESOURCES_MAX / stampede_guard::rules::MAX_HOT_RULES) as u64 + 1;
    let mut refused_at = None;
    for version in 1..=most {
        next["version"] = json!(version);
        next["hot"] = hot(version);
        let reply = put_rules(&app, Some(&app.admin), &next).await;
        if reply.status == 400 {
            assert_error(&reply, 400, "invalid_rules");
            let message = reply.body["error"]["message"].as_str().unwrap();
            assert!(message.contains("reuse names"), "{message}");
            refused_at = Some(version);
            break;
        }
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let refused_at = refused_at.expect("new names were taken past the bound");
    let kept = rules(&app).await;
    assert_eq!(
        kept["version"],
        refused_at - 1,
        "the refused change left nothing"
    );
    assert_eq!(kept["hot"][0]["name"], format!("v{}-0", refused_at - 1));
    // The names in force, reused: accepted.
    next["version"] = json!(refused_at);
    next["hot"] = hot(refused_at - 1);
    next["hot"][0]["qps"] = json!(5.0);
    let reply = put_rules(&app, Some(&app.admin), &next).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    // Still serving, its stats bounded by the same count.
    let stats = app.get("/v1/guard/stats", Some(&app.admin)).await;
    assert_eq!(stats.status, 200);
    assert!(stats.body["resources"].as_array().unwrap().len() <= stampede_guard::RESOURCES_MAX);
}

#[tokio::test]
async fn a_degraded_class_answers_503_and_the_rest_carries_on() {
    let app = spawn_app().await;
    let sale = app.live_sale("GUARD-DEGRADE", 10, 1).await;
    let reply = app
        .post_json(
            "/v1/guard/degrade",
            Some(&app.admin),
            &json!({"class": "browse", "off": true}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body["degraded"], json!(["browse"]));
    let reply = app.get(&format!("/v1/flash-sales/{sale}"), None).await;
    assert_error(&reply, 503, "degraded");
    assert!(reply.headers.contains_key("retry-after"));
    // Buying, health checks and metrics are untouched.
    let (status, _) = app.purchase(&app.shopper("buyer"), &sale, "k1", 1).await;
    assert_eq!(status, 201);
    assert_eq!(app.get("/healthz", None).await.status, 200);
    assert_eq!(app.get("/metrics", None).await.status, 200);
    // And back on.
    let reply = app
        .post_json(
            "/v1/guard/degrade",
            Some(&app.admin),
            &json!({"class": "browse", "off": false}),
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        app.get(&format!("/v1/flash-sales/{sale}"), None)
            .await
            .status,
        200
    );
    // An unknown class is bad input.
    let reply = app
        .post_json(
            "/v1/guard/degrade",
            Some(&app.admin),
            &json!({"class": "vip", "off": true}),
        )
        .await;
    assert_error(&reply, 400, "invalid_body");
    // Well-formed JSON of the wrong shape is an invalid body too, not malformed JSON
    // (serde_json calls an array in a class name's place a syntax error).
    let reply = app
        .post_json(
            "/v1/guard/degrade",
            Some(&app.admin),
            &json!({"class": ["stats"], "off": false}),
        )
        .await;
    assert_error(&reply, 400, "invalid_body");
    assert_eq!(
        app.get(&format!("/v1/flash-sales/{sale}"), None)
            .await
            .status,
        200
    );
}

/// System protection over HTTP: with the in-flight bound taken by two pays waiting on a
/// slow provider, a purchase gets 503 `overloaded` with `Retry-After` and takes no
/// stock, while the probes (not guarded) still answer; once the pays finish, the
/// purchase goes through.
#[tokio::test]
async fn past_the_inflight_bound_a_request_gets_503_overloaded_and_the_probes_still_answer() {
    let app = spawn_app_with(|config| {
        config.guard.system.max_inflight = Some(2);
        // The provider answers in 3 s below: room for that, and the answer's 1 s on top.
        config.payment_timeout = Duration::from_secs(10);
        config.client_timeout = Duration::from_secs(60);
    })
    .await;
    let sale = app.live_sale("GUARD-INFLIGHT", 20, 10).await;
    let buyer = app.shopper("slow-payer");
    let mut orders = Vec::new();
    for i in 0..2 {
        let (status, body) = app.purchase(&buyer, &sale, &format!("i{i}"), 1).await;
        assert_eq!(status, 201, "{body}");
        orders.push(body["order_id"].as_str().unwrap().to_owned());
    }
    app.sim.configure(3_000, 0.0).await;
    let attempts = |stats: Value| stats["attempts"].as_u64().expect("attempts");
    let before = attempts(app.sim.stats().await);
    let (first, second, ()) = tokio::join!(
        app.pay(&buyer, &orders[0]),
        app.pay(&buyer, &orders[1]),
        async {
            // Both pays are in flight once both reached the provider (pay may use the
            // whole bound; a purchase 0.9 of it). The provider, a process of its own, is
            // asked: the guard's stats are a guarded route too.
            let waiting = Instant::now();
            while attempts(app.sim.stats().await) < before + 2 {
                assert!(
                    waiting.elapsed() < Duration::from_secs(5),
                    "the pays never reached the provider"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let started = Instant::now();
            let reply = app.purchase_reply(&buyer, &sale, "i-refused", 1).await;
            assert_error(&reply, 503, "overloaded");
            assert!(
                started.elapsed() < Duration::from_millis(500),
                "the refusal took {:?}",
                started.elapsed()
            );
            // The first refusal of a calm server: the shortest Retry-After.
            assert_eq!(reply.headers["retry-after"], "1");
            for probe in ["/healthz", "/readyz", "/metrics"] {
                assert_eq!(app.get(probe, None).await.status, 200, "{probe}");
            }
        }
    );
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(app.remaining(&sale).await, 18, "the refusal took stock");
    app.sim.configure(0, 0.0).await;
    let (status, body) = app.purchase(&buyer, &sale, "i-after", 1).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        resource_totals(&app, "purchase").await["blocked_overloaded"],
        1
    );
}

#[tokio::test]
async fn an_open_payment_breaker_answers_at_once_and_closes_when_the_provider_heals() {
    let app = spawn_app_with(|config| {
        config.guard.breakers[0].min_calls = 4;
        config.guard.breakers[0].open_for = Duration::from_millis(500);
        config.guard.breakers[0].half_open_probes = 1;
    })
    .await;
    let sale = app.live_sale("GUARD-BREAKER", 20, 10).await;
    let buyer = app.shopper("payer");
    let mut orders = Vec::new();
    for i in 0..6 {
        let (status, body) = app.purchase(&buyer, &sale, &format!("b{i}"), 1).await;
        assert_eq!(status, 201);
        orders.push(body["order_id"].as_str().unwrap().to_owned());
    }
    app.sim.configure(0, 1.0).await; // every charge fails
    for order in &orders[..4] {
        assert_error(&app.pay(&buyer, order).await, 502, "payment_failed");
    }
    // Open: refused without calling the provider, fast, with Retry-After.
    let calls_before = app.sim.stats().await;
    let t = Instant::now();
    let reply = app.pay(&buyer, &orders[4]).await;
    assert_error(&reply, 503, "circuit_open");
    assert!(reply.headers.contains_key("retry-after"));
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(
        app.sim.stats().await,
        calls_before,
        "the provider was not called"
    );
    assert_eq!(breaker(&app, "payment").await, "open");
    // The order stays payable: once the provider heals and the breaker has waited,
    // a probe goes through and closes it.
    app.sim.configure(0, 0.0).await;
    tokio::time::sleep(Duration::from_millis(550)).await;
    assert_eq!(app.pay(&buyer, &orders[4]).await.status, 200);
    assert_eq!(app.pay(&buyer, &orders[5]).await.status, 200);
    assert_eq!(breaker(&app, "payment").await, "closed");
}

#[tokio::test]
async fn a_flow_rule_on_payment_limits_the_calls_to_the_provider() {
    let app = spawn_app_with(|config| {
        config.guard.flow = vec![reject_past("payment", 0.1, 2)];
    })
    .await;
    let sale = app.live_sale("GUARD-PAY-FLOW", 20, 10).await;
    let buyer = app.shopper("payer");
    let mut orders = Vec::new();
    for i in 0..3 {
        let (status, body) = app.purchase(&buyer, &sale, &format!("p{i}"), 1).await;
        assert_eq!(status, 201);
        orders.push(body["order_id"].as_str().unwrap().to_owned());
    }
    let calls_before = app.sim.stats().await;
    assert_eq!(app.pay(&buyer, &orders[0]).await.status, 200);
    assert_eq!(app.pay(&buyer, &orders[1]).await.status, 200);
    // The third call would pass the provider's allowance: refused before it is made,
    // with Retry-After, and the order stays payable.
    let reply = app.pay(&buyer, &orders[2]).await;
    assert_error(&reply, 429, "throttled");
    assert!(reply.headers.contains_key("retry-after"));
    let calls = app.sim.stats().await;
    assert_eq!(
        calls["attempts"].as_u64().unwrap(),
        calls_before["attempts"].as_u64().unwrap() + 2,
        "the third charge never reached the provider: {calls}"
    );
    let order = app
        .get(&format!("/v1/orders/{}", orders[2]), Some(&buyer))
        .await;
    assert_eq!(order.body["status"], "pending_payment");
    let payment = resource_totals(&app, "payment").await;
    assert_eq!(payment["passed"], 2, "{payment}");
    assert_eq!(payment["blocked_throttled"], 1, "{payment}");
    // The provider's calls are timed and counted on the breaker's resource.
    let outbound = resource_totals(&app, "outbound:payment").await;
    assert_eq!(outbound["passed"], 2, "{outbound}");
    assert_eq!(outbound["errors"], 0, "{outbound}");
}

/// The state of the breaker on `dependency`, from the stats endpoint.
async fn breaker(app: &TestApp, dependency: &str) -> String {
    let stats = app.get("/v1/guard/stats", None).await.body;
    let found = stats["breakers"]
        .as_array()
        .expect("breakers")
        .iter()
        .find(|b| b[0] == dependency)
        .unwrap_or_else(|| panic!("no breaker on {dependency}: {stats}"));
    found[1].as_str().expect("a state").to_owned()
}

/// The totals of one guard resource, from the stats endpoint.
async fn resource_totals(app: &TestApp, resource: &str) -> Value {
    let stats = app.get("/v1/guard/stats", None).await.body;
    stats["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .find(|r| r["resource"] == resource)
        .unwrap_or_else(|| panic!("no resource {resource}: {stats}"))["total"]
        .clone()
}

/// The shipped `database` breaker rule of `config`, to tune for a test.
fn database_breaker(config: &mut stampede::Config) -> &mut stampede_guard::BreakerRule {
    config
        .guard
        .breakers
        .iter_mut()
        .find(|b| b.name == "database")
        .expect("a database breaker is shipped")
}

stampede_store::on_every_backend!(
    an_open_database_breaker_refuses_purchases_at_once_and_closes_when_the_database_heals
);

async fn an_open_database_breaker_refuses_purchases_at_once_and_closes_when_the_database_heals(
    backend: Backend,
) {
    let app = spawn_app_on_with(backend, |config| {
        // The test's client sends every refused retry down one pooled connection at
        // once; a hold would make the repeats wait for it (holds have their own test).
        config.guard.system.hold_refused = Duration::ZERO;
        let database = database_breaker(config);
        database.min_calls = 3;
        database.open_for = Duration::from_millis(700);
        database.half_open_probes = 2;
    })
    .await;
    assert_eq!(breaker(&app, "database").await, "closed");
    let sale = app.live_sale("GUARD-DB", 100, 100).await;
    let buyer = app.shopper("db-buyer");
    assert_eq!(app.purchase(&buyer, &sale, "before", 1).await.0, 201);

    // The database refuses every order: commits fail and purchases answer 503
    // `unavailable` until the breaker has seen enough of them.
    app.database.break_order_inserts(app.data_dir.path()).await;
    let mut failed_commits = 0;
    let mut opened = None;
    for i in 0..20 {
        let reply = app
            .purchase_reply(&buyer, &sale, &format!("down-{i}"), 1)
            .await;
        match reply.error_code() {
            "unavailable" => failed_commits += 1,
            "circuit_open" => {
                opened = Some((i, reply));
                break;
            }
            other => panic!("{other}: {}", reply.body),
        }
    }
    let (first_refused, reply) = opened.expect("the breaker opened");
    assert!((1..=5).contains(&failed_commits), "{failed_commits}");
    assert_error(&reply, 503, "circuit_open");
    assert!(reply.headers.contains_key("retry-after"));
    assert_eq!(breaker(&app, "database").await, "open");

    // Open: refused at once, without joining the writer's queue (no commit is tried).
    let commits = resource_totals(&app, "outbound:database").await["passed"].clone();
    for i in 0..10 {
        let t = Instant::now();
        let reply = app
            .purchase_reply(&buyer, &sale, &format!("open-{i}"), 1)
            .await;
        assert_error(&reply, 503, "circuit_open");
        assert!(
            t.elapsed() < Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
    }
    let totals = resource_totals(&app, "outbound:database").await;
    assert_eq!(totals["passed"], commits, "no commit while open: {totals}");
    assert!(
        totals["blocked_circuit_open"].as_u64().unwrap() >= 11,
        "{totals}"
    );
    assert!(
        totals["errors"].as_u64().unwrap() >= failed_commits,
        "{totals}"
    );
    // Nothing was sold or left taken.
    let audit = app.audit(&sale).await;
    assert_eq!(audit["pending_payment"], 1, "{audit}");
    assert_eq!(audit["remaining"], 99, "{audit}");
    assert_eq!(audit["consistent"], true, "{audit}");

    // The database heals; after `open_for` purchases go through again (their commits are
    // the probes) and the breaker closes. A key refused while open was not used up.
    app.database.heal_order_inserts(app.data_dir.path()).await;
    tokio::time::sleep(Duration::from_millis(750)).await;
    let (status, _) = app
        .purchase(&buyer, &sale, &format!("down-{first_refused}"), 1)
        .await;
    assert_eq!(status, 201);
    assert_eq!(breaker(&app, "database").await, "half_open");
    assert_eq!(app.purchase(&buyer, &sale, "after", 1).await.0, 201);
    assert_eq!(breaker(&app, "database").await, "closed");
    let audit = app.audit(&sale).await;
    assert_eq!(audit["pending_payment"], 3, "{audit}");
    assert_eq!(audit["consistent"], true, "{audit}");
}

#[tokio::test]
async fn dry_run_counts_what_it_would_block_and_blocks_nothing() {
    let app = spawn_app_with(|config| {
        config.guard.dry_run = true;
        config.guard.flow = vec![reject_past("get_sale", 1.0, 1)];
    })
    .await;
    let sale = app.live_sale("GUARD-DRY", 10, 1).await;
    for _ in 0..5 {
        assert_eq!(
            app.get(&format!("/v1/flash-sales/{sale}"), None)
                .await
                .status,
            200
        );
    }
    let stats = app.get("/v1/guard/stats", None).await.body;
    assert_eq!(stats["dry_run"], true);
    let get_sale = stats["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["resource"] == "get_sale")
        .unwrap();
    assert_eq!(get_sale["total"]["passed"], 5);
    assert_eq!(get_sale["total"]["would_block"], 4);
    assert_eq!(get_sale["total"]["blocked_throttled"], 0);
    // The same figures, per resource and reason, in /metrics.
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"stampede_guard_would_block_total{resource="get_sale"} 4"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"stampede_guard_passed_total{resource="get_sale"} 5"#));
    assert!(metrics.contains("stampede_guard_blocked_total{"));
    // The RT is a counter beside the calls it sums, so a rate of one over the other is
    // the mean (a gauge named `_total` would be neither).
    assert!(
        metrics.contains("# TYPE stampede_guard_rt_microseconds_total counter"),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"stampede_guard_completed_total{resource="get_sale"} 5"#),
        "{metrics}"
    );
    let rt = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(r#"stampede_guard_rt_microseconds_total{resource="get_sale"} "#)
        })
        .and_then(|v| v.parse::<u64>().ok())
        .expect("the RT of get_sale");
    assert!(rt > 0, "five calls took no time: {rt}");
}

#[tokio::test]
async fn the_stats_endpoint_shows_the_last_second_per_resource() {
    let app = spawn_app().await;
    let sale = app.live_sale("GUARD-STATS", 10, 1).await;
    for _ in 0..3 {
        app.get(&format!("/v1/flash-sales/{sale}"), None).await;
    }
    // The per-second view is taken once a second: the three fall into one second or
    // two, so some view shows at least two of them, and a later one, of a second with
    // no traffic, none (a view that kept the totals would not).
    let get_sale = |stats: &serde_json::Value| {
        stats["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["resource"] == "get_sale")
            .unwrap()
            .clone()
    };
    let (mut busiest, mut quiet_after) = (0, false);
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_millis(3_500) && !(busiest >= 2 && quiet_after) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let stats = app.get("/v1/guard/stats", None).await.body;
        let passed = get_sale(&stats)["last_second"]["passed"].as_u64().unwrap();
        assert!(passed <= 3, "{passed} passed in one second of 3 requests");
        busiest = busiest.max(passed);
        quiet_after |= busiest >= 2 && passed == 0;
    }
    assert!(
        busiest >= 2 && quiet_after,
        "busiest second {busiest}, quiet after: {quiet_after}"
    );
    let stats = app.get("/v1/guard/stats", None).await.body;
    assert_eq!(get_sale(&stats)["total"]["passed"], 3);
    for key in [
        "inflight",
        "cpu",
        "bbr_limit",
        "degraded",
        "breakers",
        "hot_memory_bytes",
    ] {
        assert!(stats.get(key).is_some(), "stats.{key}");
    }
    assert_eq!(stats["hot_memory_bytes"], stampede_guard::HOT_SLOTS * 16);
}

#[tokio::test]
async fn a_newer_guard_section_in_the_config_file_is_reloaded_live() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stampede.toml");
    std::fs::write(&file, "[guard]\nversion = 0\n").unwrap();
    let path = file.clone();
    let mut app = spawn_app_with(move |config| config.config_file = Some(path)).await;
    assert_eq!(rules(&app).await["version"], 0);
    // A newer version in the file: picked up within a couple of seconds, no restart.
    std::fs::write(
        &file,
        "[guard]\nversion = 1\n[[guard.flow]]\nresource = \"get_sale\"\nqps = 2.0\nburst = 2\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while rules(&app).await["version"] != 1 {
        assert!(Instant::now() < deadline, "not reloaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sale = app.live_sale("GUARD-RELOAD", 10, 1).await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            app.get(&format!("/v1/flash-sales/{sale}"), None)
                .await
                .status,
        );
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        2,
        "{statuses:?}"
    );
    // A file that is not newer than the running rules changes nothing; a broken one
    // neither.
    std::fs::write(&file, "[guard]\nversion = 1\ndry_run = true\n").unwrap();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(rules(&app).await["dry_run"], false);
    std::fs::write(&file, "[guard]\nversion = 2\nbogus = 1\n").unwrap();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(rules(&app).await["version"], 1);
    // A file the next start would refuse (a mistyped setting outside `[guard]`) is not
    // half taken now; nor is a version that leaves no room for the admin API's changes.
    for refused in [
        "listenn = \"x\"\n[guard]\nversion = 2\n",
        "payment_url = \"https://pay.example\"\n[guard]\nversion = 2\n",
        "queue_capacity = \"many\"\n[guard]\nversion = 2\n",
    ] {
        std::fs::write(&file, refused).unwrap();
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        assert_eq!(rules(&app).await["version"], 1, "{refused}");
    }
    std::fs::write(&file, "[guard]\nversion = 9007199254740991\n").unwrap();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(rules(&app).await["version"], 1);
    // A file may skip versions: it is newer, so it is applied as the version it says.
    std::fs::write(&file, "[guard]\nversion = 5\ndry_run = true\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while rules(&app).await["version"] != 5 {
        assert!(
            Instant::now() < deadline,
            "a skipped version was not reloaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rules(&app).await["dry_run"], true);
    // What was reloaded is kept in the store like an API change.
    std::fs::write(&file, "[guard]\nversion = 0\n").unwrap();
    app.restart().await;
    assert_eq!(rules(&app).await["version"], 5);
}

/// A stalled database (every order insert sleeps 5 s): the writer's statement deadline
/// turns each stalled commit into a failed one, and the database breaker opens. Nothing
/// waits out the stall, and the order before it stays.
async fn a_stalled_database_times_out_and_opens_the_breaker(
    backend: Backend,
    configure: impl FnOnce(&mut stampede::Config),
) {
    let app = spawn_app_on_with(backend, |config| {
        configure(config);
        database_breaker(config).min_calls = 3;
    })
    .await;
    let sale = app.live_sale("GUARD-STALL", 100, 100).await;
    let buyer = app.shopper("stalled");
    assert_eq!(app.purchase(&buyer, &sale, "before", 1).await.0, 201);
    app.database.slow_order_inserts(5.0).await;
    let mut codes = Vec::new();
    for i in 0..10 {
        let t = Instant::now();
        let reply = app
            .purchase_reply(&buyer, &sale, &format!("stalled-{i}"), 1)
            .await;
        // Never the five-second stall: the deadline (300 ms) or the open breaker answers.
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        codes.push(reply.error_code().to_owned());
        if codes.last().is_some_and(|c| c == "circuit_open") {
            break;
        }
    }
    assert!(codes.starts_with(&["unavailable".to_owned()]), "{codes:?}");
    assert_eq!(
        codes.last().map(String::as_str),
        Some("circuit_open"),
        "{codes:?}"
    );
    let audit = app.audit(&sale).await;
    assert_eq!(audit["pending_payment"], 1, "{audit}");
    assert_eq!(audit["consistent"], true, "{audit}");
}

/// `database_timeout`, Stampede's own deadline on the writer's statements.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_postgres_times_out_at_database_timeout() {
    a_stalled_database_times_out_and_opens_the_breaker(Backend::Postgres, |config| {
        config.database_timeout = Duration::from_millis(300);
    })
    .await;
}

/// MariaDB's `max_statement_time`, set from `database_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_mariadb_times_out_at_database_timeout() {
    a_stalled_database_times_out_and_opens_the_breaker(Backend::MySql, |config| {
        config.database_timeout = Duration::from_millis(300);
    })
    .await;
}

/// A rules change while the database stalls: answered 503 within `database_timeout`,
/// the rules in force unchanged, and the change in force once it heals (taken up if the
/// stalled save landed after all, else sent again).
async fn a_rules_change_on_a_stalled_database_is_refused_in_time(backend: Backend) {
    let app = spawn_app_on_with(backend, |config| {
        config.database_timeout = Duration::from_millis(300);
    })
    .await;
    let mut next = rules(&app).await;
    let version = next["version"].as_u64().unwrap();
    next["version"] = json!(version + 1);
    next["dry_run"] = json!(true);
    app.database.slow_setting_saves(5.0).await;
    let started = Instant::now();
    let reply = put_rules(&app, Some(&app.admin), &next).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_error(&reply, 503, "unavailable");
    assert_eq!(
        rules(&app).await["version"],
        version,
        "the rules in force are unchanged"
    );
    app.database.heal_setting_saves().await;
    // The refused save may still have landed once the stall ended: then the node takes
    // it up and refuses the resend (written against the older rules); else the resend
    // goes through. Either way the change is in force once.
    let reply = put_rules(&app, Some(&app.admin), &next).await;
    if reply.status == 409 {
        assert_error(&reply, 409, "version_conflict");
    } else {
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let now = rules(&app).await;
    assert_eq!(now["version"], version + 1);
    assert_eq!(now["dry_run"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rules_change_on_a_stalled_postgres_is_refused_in_time() {
    a_rules_change_on_a_stalled_database_is_refused_in_time(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rules_change_on_a_stalled_mariadb_is_refused_in_time() {
    a_rules_change_on_a_stalled_database_is_refused_in_time(Backend::MySql).await;
}

/// A `statement_timeout` in the PostgreSQL URL (what the README offered before
/// `database_timeout`) wins over the 5 s default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_postgres_times_out_at_the_urls_statement_timeout() {
    a_stalled_database_times_out_and_opens_the_breaker(Backend::Postgres, |config| {
        let url = config.database_url.clone().expect("a PostgreSQL URL");
        let joiner = if url.contains('?') { '&' } else { '?' };
        config.database_url = Some(format!("{url}{joiner}options=-c%20statement_timeout%3D300"));
        assert_eq!(config.database_timeout, Duration::from_secs(5));
    })
    .await;
}

/// Hot-key rules on the client address and the tenant, behind a load balancer: only a
/// trusted proxy names them; from anyone else `X-Forwarded-For` and `X-Tenant` are
/// ignored, so a shopper can neither dodge the client limit nor spend another tenant's.
#[tokio::test]
async fn client_and_tenant_limits_believe_only_trusted_proxies() {
    use stampede_guard::Param;
    let rules = |trusted: &str, params: &[Param]| {
        let (trusted, params) = (trusted.to_owned(), params.to_vec());
        move |config: &mut stampede::Config| {
            config.trusted_proxies = trusted;
            for param in params {
                config.guard.hot.push(stampede_guard::HotRule {
                    name: format!("{param:?}"),
                    resource: "get_sale".into(),
                    param,
                    qps: 0.001,
                    burst: 3,
                    dry_run: false,
                });
            }
        }
    };
    let get = |app: &TestApp, sale: &str, forwarded: &str, tenant: &str| {
        let request = app
            .client
            .get(app.url(&format!("/v1/flash-sales/{sale}")))
            .header("x-forwarded-for", forwarded)
            .header("x-tenant", tenant);
        async move { send(request).await.status }
    };

    // Behind a trusted proxy (the test client's 127.0.0.1): each client and each tenant
    // has its own burst of 3.
    let app = spawn_app_with(rules("127.0.0.1/32", &[Param::ClientIp, Param::Tenant])).await;
    let sale = app.live_sale("GUARD-PROXY", 10, 10).await;
    for i in 0..3 {
        assert_eq!(
            get(&app, &sale, "198.51.100.1", &format!("t{i}")).await,
            200
        );
    }
    assert_eq!(
        get(&app, &sale, "198.51.100.1", "t9").await,
        429,
        "client over its burst"
    );
    for i in 0..3 {
        assert_eq!(
            get(&app, &sale, &format!("198.51.100.{}", 10 + i), "acme").await,
            200
        );
    }
    assert_eq!(
        get(&app, &sale, "198.51.100.20", "acme").await,
        429,
        "tenant over its burst"
    );
    assert_eq!(
        get(&app, &sale, "198.51.100.21", "globex").await,
        200,
        "others unaffected"
    );

    // Nobody trusted: every request is the peer's (127.0.0.1) whatever it claims, so the
    // fourth is over the client's burst ...
    let app = spawn_app_with(rules("", &[Param::ClientIp])).await;
    let sale = app.live_sale("GUARD-DIRECT", 10, 10).await;
    for i in 0..3 {
        assert_eq!(
            get(&app, &sale, &format!("198.51.100.{i}"), "acme").await,
            200
        );
    }
    assert_eq!(get(&app, &sale, "198.51.100.99", "acme").await, 429);
    // ... and a tenant header is not counted at all: no tenant's quota can be spent.
    let app = spawn_app_with(rules("", &[Param::Tenant])).await;
    let sale = app.live_sale("GUARD-TENANT", 10, 10).await;
    for _ in 0..6 {
        assert_eq!(get(&app, &sale, "198.51.100.1", "acme").await, 200);
    }
}

/// Shoppers behind one address (a shop's till network, a campus NAT) share its allowance:
/// a scalper's attempts refused by the scalper's own limit must not spend it, nor may a
/// request its tenant refuses spend its client's.
#[tokio::test]
async fn a_request_refused_by_a_later_limit_spends_nothing_of_its_clients() {
    use stampede_guard::Param;
    let app = spawn_app_with(|config| {
        config.guard.system.hold_refused = Duration::ZERO;
        config.trusted_proxies = "127.0.0.1/32".into();
        for (resource, param, burst) in [
            ("purchase", Param::ClientIp, 25),
            ("get_sale", Param::ClientIp, 3),
            ("get_sale", Param::Tenant, 1),
        ] {
            config.guard.hot.push(stampede_guard::HotRule {
                name: format!("{resource}-{param:?}"),
                resource: resource.into(),
                param,
                qps: 0.001,
                burst,
                dry_run: false,
            });
        }
    })
    .await;
    let sale = app.live_sale("GUARD-NAT", 1_000, 1_000).await;

    // The scalper's 30 attempts: the shipped per-shopper burst of 20 admits 20, which
    // the address's 25 covers; the 10 the shopper limit refuses cost the address nothing.
    let scalper = app.shopper("scalper");
    let mut statuses = Vec::new();
    for i in 0..30 {
        let reply = app
            .purchase_reply(&scalper, &sale, &format!("nat-{i}"), 1)
            .await;
        statuses.push(reply.status);
    }
    let ok = statuses.iter().filter(|s| **s == 201).count();
    assert!((20..=21).contains(&ok), "{statuses:?}");
    // Another shopper at the same address still buys.
    let (status, body) = app
        .purchase(&app.shopper("neighbour"), &sale, "n-1", 1)
        .await;
    assert_eq!(status, 201, "{body}");

    // A client's request that its tenant refuses gives the client's allowance back.
    let get = |tenant: &str| {
        let request = app
            .client
            .get(app.url(&format!("/v1/flash-sales/{sale}")))
            .header("x-forwarded-for", "198.51.100.7")
            .header("x-tenant", tenant);
        async move { send(request).await.status }
    };
    assert_eq!(get("acme").await, 200);
    assert_eq!(get("acme").await, 429, "tenant over its burst");
    assert_eq!(get("globex").await, 200);
    assert_eq!(
        get("initech").await,
        200,
        "the refused request cost the client nothing"
    );
    assert_eq!(get("umbrella").await, 429, "client over its burst of 3");

    // Each request counts as passed only by the limits it got through whole: one a
    // later limit refused is blocked there, not passed by the earlier ones.
    let counted = |name: &'static str| {
        let app = &app;
        async move {
            let t = resource_totals(app, name).await;
            (
                t["passed"].as_u64().unwrap(),
                t["blocked_throttled"].as_u64().unwrap(),
            )
        }
    };
    let bought = ok as u64 + 1;
    assert_eq!(counted("purchase").await, (bought, 0));
    assert_eq!(counted("hot:purchase-ClientIp").await, (bought, 0));
    assert_eq!(
        counted("hot:purchase_per_shopper").await,
        (bought, 30 - ok as u64)
    );
    assert_eq!(counted("get_sale").await, (3, 0));
    assert_eq!(counted("hot:get_sale-ClientIp").await, (3, 1));
    assert_eq!(counted("hot:get_sale-Tenant").await, (3, 1));
}

/// One HTTP/1.1 exchange on a raw keep-alive connection: the status and the whole
/// answer (head and body).
async fn exchange(conn: &mut tokio::net::TcpStream, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: stampede\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head_end, length) = loop {
        let n = conn.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the server closed the connection");
        raw.extend_from_slice(&chunk[..n]);
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
            break (end + 4, length);
        }
    };
    while raw.len() < head_end + length {
        let n = conn.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the server closed the connection mid-body");
        raw.extend_from_slice(&chunk[..n]);
    }
    let status = String::from_utf8_lossy(&raw[9..12]).parse().unwrap();
    (status, String::from_utf8_lossy(&raw).into_owned())
}

/// The `Retry-After` of an answer `exchange` returned, in seconds.
fn retry_after_of(answer: &str) -> u64 {
    answer
        .lines()
        .find_map(|l| {
            l.to_lowercase()
                .strip_prefix("retry-after:")
                .map(|v| v.trim().to_owned())
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After: {answer}"))
}

/// A hold lasts the refusal's own `Retry-After` (here 2 s, under the shipped cap of 8 s):
/// a client that asks again at once waits that long, not the cap, and one that honours
/// it is never held.
#[tokio::test]
async fn a_hold_lasts_the_refusals_retry_after_so_a_client_honouring_it_never_waits() {
    let app = spawn_app_with(|config| {
        config.guard.flow = vec![reject_past("get_sale", 0.5, 1)];
        // Every hold its whole length (none cut at random), to time it.
        config.guard.system.hold_spread = 0.0;
    })
    .await;
    let sale = app.live_sale("GUARD-HOLD-RA", 10, 1).await;
    let address = app.base.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(address).await.unwrap();
    let path = format!("/v1/flash-sales/{sale}");
    assert_eq!(exchange(&mut conn, &path).await.0, 200);
    let (status, answer) = exchange(&mut conn, &path).await;
    assert_eq!(status, 429, "{answer}");
    let retry_after = retry_after_of(&answer);
    assert!(retry_after >= 2, "Retry-After {retry_after}");
    // Again at once: answered when the hold ends, after the Retry-After and not the cap.
    let started = Instant::now();
    let (status, answer) = exchange(&mut conn, &path).await;
    let waited = started.elapsed();
    assert_eq!(status, 429, "{answer}");
    assert!(
        waited >= Duration::from_secs(retry_after) - Duration::from_millis(500)
            && waited < Duration::from_secs(retry_after) + Duration::from_millis(900),
        "held {waited:?} for a Retry-After of {retry_after} s"
    );
    // Honouring that answer's Retry-After: not held, whatever the answer.
    tokio::time::sleep(Duration::from_secs(retry_after_of(&answer))).await;
    let started = Instant::now();
    let (status, answer) = exchange(&mut conn, &path).await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "a client that honoured Retry-After waited {:?} ({status}: {answer})",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_refusal_repeated_on_one_connection_waits_out_its_hold_and_an_admitted_request_never_does()
 {
    const HOLD: Duration = Duration::from_secs(1);
    let degrade = |app: &TestApp, off: bool| {
        let request = app
            .client
            .post(app.url("/v1/guard/degrade"))
            .bearer_auth(&app.admin)
            .json(&json!({"class": "browse", "off": off}));
        async move { assert_eq!(send(request).await.status, 200) }
    };
    for (trusted, held) in [("", true), ("127.0.0.1/32", false)] {
        let app = spawn_app_with(|config| {
            config.trusted_proxies = trusted.into();
            config.guard.system.hold_refused = HOLD;
            config.guard.system.hold_spread = 0.0;
        })
        .await;
        let sale = app.live_sale(&format!("GUARD-HOLD-{held}"), 10, 1).await;
        degrade(&app, true).await;
        let address = app.base.trim_start_matches("http://");
        let mut conn = tokio::net::TcpStream::connect(address).await.unwrap();
        let path = format!("/v1/flash-sales/{sale}");

        // Refused, then refused again at once on the same connection: the second answer
        // comes when the hold that the first started ends.
        let started = Instant::now();
        let (status, body) = exchange(&mut conn, &path).await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("\"degraded\""), "{body}");
        let (status, _) = exchange(&mut conn, &path).await;
        assert_eq!(status, 503);
        let elapsed = started.elapsed();
        if held {
            assert!(
                elapsed >= HOLD,
                "the repeated refusal came after {elapsed:?}"
            );
        } else {
            assert!(
                elapsed < HOLD,
                "a trusted proxy's refusal waited {elapsed:?}"
            );
        }
        // Other connections are not held.
        let (status, _) = exchange(
            &mut tokio::net::TcpStream::connect(address).await.unwrap(),
            "/healthz",
        )
        .await;
        assert_eq!(status, 200);

        // Inside the hold the second refusal started, a request the guard admits is
        // served without waiting.
        degrade(&app, false).await;
        let started = Instant::now();
        let (status, body) = exchange(&mut conn, &path).await;
        assert_eq!(status, 200, "{body}");
        assert!(
            started.elapsed() < HOLD,
            "an admitted request waited {:?}",
            started.elapsed()
        );
        if held {
            // (The metrics are the process's: counted here, but not only by this app.)
            let metrics = app.get("/metrics", None).await;
            let metrics = metrics.body.as_str().expect("metrics are text");
            assert!(
                metrics
                    .lines()
                    .any(|l| l.starts_with("stampede_guard_refusals_held_total ")),
                "{metrics}"
            );
        }
    }
}

#[tokio::test]
async fn a_refusal_waiting_for_its_hold_is_not_in_flight() {
    // Every hold its whole length (none cut at random), to time it.
    let app = spawn_app_with(|config| config.guard.system.hold_spread = 0.0).await;
    let sale = app.live_sale("GUARD-HOLD-INFLIGHT", 1_000, 1_000).await;
    let scalper = app.shopper("held-scalper");
    // One connection, as one browser: the shipped per-shopper burst of 20, then 429s.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let purchase = |key: String| {
        let request = client
            .post(app.url(&format!("/v1/flash-sales/{sale}/purchase")))
            .bearer_auth(&scalper)
            .header("idempotency-key", key)
            .json(&json!({"quantity": 1}));
        async move { send(request).await }
    };
    let mut first_refusal = None;
    for i in 0..40 {
        let reply = purchase(format!("held-{i}")).await;
        if reply.status == 429 {
            first_refusal = Some(i);
            break;
        }
        assert_eq!(reply.status, 201, "{}", reply.body);
    }
    assert!(first_refusal.is_some(), "the scalper was never throttled");
    // Refused again at once: this answer waits for the hold (its Retry-After, 1 s) ...
    let started = Instant::now();
    let held = tokio::spawn(purchase("held-again".into()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ... and meanwhile it is not counted in flight, so it takes no one's place: the
    // one request in flight is the stats request itself (a guarded route).
    let stats = app.get("/v1/guard/stats", None).await;
    assert!(!held.is_finished(), "the repeated refusal was not held");
    assert_eq!(stats.status, 200, "{}", stats.body);
    assert_eq!(stats.body["inflight"], 1, "{}", stats.body);
    let reply = held.await.unwrap();
    assert_eq!(reply.status, 429, "{}", reply.body);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn holds_and_overload_retry_afters_past_a_minute_and_spreads_past_nine_tenths_are_refused() {
    let mut rules = stampede_guard::GuardRules::default();
    rules.system.hold_refused = Duration::from_secs(61);
    let errors = rules.validate().unwrap_err();
    assert_eq!(errors[0].field, "system.hold_refused", "{errors:?}");
    rules.system.hold_refused = Duration::ZERO;
    rules.validate().unwrap();
    // Retry-After is whole seconds: a fraction, zero or more than a minute is refused.
    for most in [0, 1_500, 61_000] {
        rules.system.overload_retry_after_max = Duration::from_millis(most);
        let errors = rules.validate().unwrap_err();
        assert_eq!(
            errors[0].field, "system.overload_retry_after_max",
            "{most} ms: {errors:?}"
        );
    }
    rules.system.overload_retry_after_max = Duration::from_secs(1);
    rules.validate().unwrap();
    // At most 0.9 of a hold is cut at random.
    for share in [-0.1, 0.95, f64::NAN] {
        rules.system.hold_spread = share;
        let errors = rules.validate().unwrap_err();
        assert_eq!(errors[0].field, "system.hold_spread", "{share}: {errors:?}");
    }
    rules.system.hold_spread = 0.9;
    rules.validate().unwrap();
}

/// Whether the server has closed `conn`: a read that returns end of file (or a reset).
async fn closed_within(conn: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(wait, conn.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn a_client_trickling_its_request_or_idle_is_cut_off_and_connections_are_bounded() {
    use tokio::io::AsyncWriteExt;
    // Near the shortest client timeout the rules allow: no pacing, no holds, a pay's
    // second of waiting for room to note its charge attempt, a 100 ms provider timeout,
    // and the second to spare make 2.1 s.
    let app = spawn_app_with(|config| {
        config.client_timeout = Duration::from_secs(3);
        config.payment_timeout = Duration::from_millis(100);
        config.guard.system.hold_refused = Duration::ZERO;
        config.max_connections = 3;
    })
    .await;
    // A rules change whose paced wait would outlast the timeout is refused: a request
    // waiting its turn would be cut off.
    let mut paced = rules(&app).await;
    paced["version"] = json!(1);
    paced["flow"] = json!([{"resource": "pay", "qps": 1.0,
        "behavior": {"kind": "pace", "max_queue": "5s"}}]);
    let reply = put_rules(&app, Some(&app.admin), &paced).await;
    assert_error(&reply, 400, "invalid_rules");
    let message = reply.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("client_timeout"), "{message}");
    let address = app.base.trim_start_matches("http://").to_owned();
    let connect = || tokio::net::TcpStream::connect(address.clone());

    // Headers trickled a byte at a time, each well inside the timeout: the request as a
    // whole is not, so the connection is closed.
    let mut slow = connect().await.unwrap();
    let started = Instant::now();
    let mut cut = false;
    for byte in b"GET /healthz HTTP/1.1\r\nHost: stampede\r\nX-Slow: "
        .iter()
        .cycle()
    {
        if slow.write_all(&[*byte]).await.is_err()
            || closed_within(&mut slow, Duration::from_millis(200)).await
        {
            cut = true;
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(7), "never cut off");
    }
    assert!(cut);
    assert!(
        started.elapsed() >= Duration::from_millis(2_900),
        "{:?}",
        started.elapsed()
    );

    // A keep-alive connection that asks now and then is served throughout; one that
    // goes quiet past the timeout is closed.
    let mut steady = connect().await.unwrap();
    for _ in 0..4 {
        assert_eq!(exchange(&mut steady, "/healthz").await.0, 200);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(
        closed_within(&mut steady, Duration::from_secs(5)).await,
        "idle, not closed"
    );

    // At most three connections are served at once: a fourth is answered only when one
    // of the three closes.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut conn = connect().await.unwrap();
        assert_eq!(exchange(&mut conn, "/healthz").await.0, 200);
        held.push(conn);
    }
    let mut fourth = connect().await.unwrap();
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let status = exchange(&mut fourth, "/healthz").await.0;
        (status, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "a fourth connection was served while three were open"
    );
    held.pop();
    let (status, waited) = waiting.await.unwrap();
    assert_eq!(status, 200);
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
}

/// A pacing rule on `payment` (one charge a second, a queue of up to 10 s) and five pays
/// sent together half a second before their orders' deadline, with a provider timeout
/// of 0.5 s (a configured expiry grace of 2.5 s: a second to note the charge, the
/// timeout, a second for the writer). The charges are made a second apart, the last
/// four after the deadline and the last two after that grace: every pay started in
/// time, so every one is charged and paid, and nothing is refunded. Before the grace
/// grew by the pacing rule's wait, the fifth was charged after its order had expired
/// (409 and a refund).
#[tokio::test]
async fn a_pay_started_in_time_and_paced_past_the_deadline_is_still_paid() {
    paced_pays_before_the_deadline("payment", false, false).await;
}

/// As above, with the pacing rule added through the admin API while the server runs.
#[tokio::test]
async fn a_pacing_rule_added_at_run_time_grows_the_expiry_grace_too() {
    paced_pays_before_the_deadline("payment", true, false).await;
}

/// As above, with the pacing rule on the `pay` route: the pays are held before their
/// handler runs, so the later ones reach it after their orders' deadline. They arrived
/// in time and are decided as in time. Before, all but the first were answered 409
/// `order_expired` and their stock went back to the sale.
#[tokio::test]
async fn a_pay_the_pay_route_paced_past_the_deadline_is_still_paid() {
    paced_pays_before_the_deadline("pay", false, false).await;
}

/// As above, with the pacing rule removed through the admin API while the pays are
/// held under it: the grace stays until they could have finished their wait. Before,
/// it shrank at once and the last pays' orders expired under them (409).
#[tokio::test]
async fn a_pacing_rule_lifted_while_pays_wait_keeps_their_grace() {
    paced_pays_before_the_deadline("pay", false, true).await;
}

async fn paced_pays_before_the_deadline(
    resource: &str,
    rule_at_run_time: bool,
    lift_while_held: bool,
) {
    let window = Duration::from_secs(3);
    let pacing = stampede_guard::FlowRule {
        resource: resource.into(),
        qps: Some(1.0),
        burst: 1,
        behavior: stampede_guard::Behavior::Pace {
            max_queue: Duration::from_secs(10),
        },
        max_concurrency: None,
        dry_run: false,
    };
    let app = spawn_app_with(|config| {
        config.payment_window = window;
        config.payment_timeout = Duration::from_millis(500);
        if !rule_at_run_time {
            config.guard.flow = vec![pacing.clone()];
        }
    })
    .await;
    if rule_at_run_time {
        let mut next = rules(&app).await;
        next["version"] = json!(next["version"].as_u64().unwrap() + 1);
        next["flow"] = json!([pacing]);
        let reply = put_rules(&app, Some(&app.admin), &next).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let sale = app.live_sale("GUARD-PACED-PAY", 10, 1).await;
    let mut orders = Vec::new();
    for n in 0..5 {
        let token = app.shopper(&format!("payer-{n}"));
        let order = app.buy(&token, &sale, "k", 1).await;
        orders.push((token, order));
    }
    let placed = Instant::now();
    tokio::time::sleep(window - Duration::from_millis(500)).await;
    assert!(
        placed.elapsed() < window - Duration::from_millis(200),
        "the pays would not be sent before the deadline"
    );
    let started = Instant::now();
    let pays: Vec<_> = orders
        .iter()
        .map(|(token, order)| {
            let app = &app;
            async move { (app.pay(token, order).await, started.elapsed()) }
        })
        .collect();
    let lift = async {
        if lift_while_held {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut next = rules(&app).await;
            next["version"] = json!(next["version"].as_u64().unwrap() + 1);
            next["flow"] = json!([]);
            let reply = put_rules(&app, Some(&app.admin), &next).await;
            assert_eq!(reply.status, 200, "{}", reply.body);
        }
    };
    let (answers, ()) = tokio::join!(futures::future::join_all(pays), lift);
    let statuses: Vec<u16> = answers.iter().map(|(reply, _)| reply.status).collect();
    assert_eq!(statuses, [200; 5], "{answers:?}");
    let last = answers.iter().map(|(_, took)| *took).max().unwrap();
    assert!(
        last >= Duration::from_millis(3_500),
        "the pays were not paced: {last:?}"
    );
    for (token, order) in &orders {
        let charge = app.sim.charge(order).await.expect("charged");
        assert_eq!(charge["charged"], 1, "{charge}");
        assert_eq!(charge["refunded"], false, "{charge}");
        assert_eq!(app.order_status(token, order).await, "paid");
    }
    assert_books(&app.audit(&sale).await);
}

/// Sends `head` (a request head without its end) in writes of `write` bytes, then its
/// end; answers the status the server gave, or 0 when it closed without one. The
/// server may refuse and close while the head is still being written.
/// Sends `head` (and the blank line ending it) in writes of at most `write` bytes; the
/// answer's status (0 if none came) and its head and body.
async fn send_head(address: &str, head: &[u8], write: usize) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(address).await.unwrap();
    for part in head.chunks(write).chain([&b"\r\n\r\n"[..]]) {
        if conn.write_all(part).await.is_err() {
            break;
        }
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer)).await;
    let status = std::str::from_utf8(answer.get(9..12).unwrap_or_default())
        .ok()
        .and_then(|status| status.parse().ok())
        .unwrap_or(0);
    (status, String::from_utf8_lossy(&answer).into_owned())
}

/// An answer hyper gives itself (the request never reached the router) carries the
/// API's JSON error body with its stable code, and says the connection closes.
fn assert_explained(answer: &str, code: &str) {
    let (head, body) = answer.split_once("\r\n\r\n").expect(answer);
    let head = head.to_ascii_lowercase();
    assert!(
        head.contains("\r\ncontent-type: application/json\r\n"),
        "{answer}"
    );
    assert!(head.contains("\r\nconnection: close\r\n"), "{answer}");
    let body: Value = serde_json::from_str(body).expect(answer);
    assert_eq!(body["error"]["code"], code, "{answer}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{answer}"
    );
}

/// A request head longer than `READ_BUFFER_MAX_BYTES` and one read's chunk is refused
/// with 431 `header_too_large` however it arrives: in one write (where unbounded reads
/// once let a 100 KB head through a 64 KiB cap) or trickled. One under the cap is
/// served, and the server goes on serving.
#[tokio::test]
async fn a_request_head_over_the_cap_is_refused_however_it_arrives() {
    let app = spawn_app().await;
    let address = app.base.trim_start_matches("http://").to_owned();
    let cap = stampede_api::READ_BUFFER_MAX_BYTES;
    let head = |len: usize| {
        let mut head =
            b"GET /healthz HTTP/1.1\r\nHost: stampede\r\nConnection: close\r\nX-Padding: ".to_vec();
        head.resize(len, b'a');
        head
    };
    assert_eq!(send_head(&address, &head(cap - 1024), cap).await.0, 200);
    // Refused once `cap` bytes are buffered without the head's end; a read brings at
    // most one chunk more, so a head longer than both never gets through. A client
    // still writing when the server closes may see a reset instead of the answer.
    let over = cap + stampede_api::watch::READ_CHUNK_MAX_BYTES + 1;
    let mut answered = 0;
    for (len, write) in [
        (over, 1 << 20),
        (100_000, 1 << 20),
        (4 * cap, 1 << 20),
        (over, 1000),
    ] {
        let (status, answer) = send_head(&address, &head(len), write).await;
        assert!(
            status == 431 || status == 0,
            "a {len}-byte head in writes of {write} was answered {status}"
        );
        if status == 431 {
            assert_explained(&answer, "header_too_large");
            answered += 1;
        }
    }
    assert!(answered > 0, "no 431 was read in four tries");
    assert_eq!(app.get("/healthz", None).await.status, 200);
}

/// Heads hyper cannot parse are answered 400 `malformed_request` with the API's error
/// body, not an empty one; the connection is closed and the server goes on serving.
#[tokio::test]
async fn a_head_that_is_not_http_gets_the_apis_error_body() {
    let app = spawn_app().await;
    let address = app.base.trim_start_matches("http://").to_owned();
    for head in [
        &b"GET /healthz HTTP/1.1\r\nHost: stampede\r\nnot a header"[..],
        b"GET /healthz HTTP/7.0\r\nHost: stampede",
        b"GET /he\x01lthz HTTP/1.1\r\nHost: stampede",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ] {
        let (status, answer) = send_head(&address, head, 1 << 20).await;
        assert_eq!(status, 400, "{:?}: {answer}", String::from_utf8_lossy(head));
        assert_explained(&answer, "malformed_request");
    }
    // A second request on a keep-alive connection is parsed as freshly as the first;
    // after an HTTP/1.0 keep-alive request, hyper answers in HTTP/1.0.
    for (first, answered_in) in [
        (
            &b"GET /healthz HTTP/1.1\r\nHost: stampede\r\n\r\n"[..],
            "HTTP/1.1 400 ",
        ),
        (
            b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            "HTTP/1.0 400 ",
        ),
    ] {
        let head = [first, b"GET /healthz HTTP/1.1\r\nbad"].concat();
        let (status, answer) = send_head(&address, &head, 1 << 20).await;
        assert_eq!(status, 200, "{answer}");
        let second = &answer[answer.find("\r\n\r\n").unwrap()..];
        let second = &second[second.find("HTTP/1.").expect(&answer)..];
        assert!(second.starts_with(answered_in), "{answer}");
        assert_explained(second, "malformed_request");
    }
    // A small head with more header fields than hyper parses (100) is too large too.
    let mut many = b"GET /healthz HTTP/1.1\r\nHost: stampede".to_vec();
    for n in 0..120 {
        many.extend_from_slice(format!("\r\nX-{n}: a").as_bytes());
    }
    let (status, answer) = send_head(&address, &many, 1 << 20).await;
    assert_eq!(status, 431, "{answer}");
    assert_explained(&answer, "header_too_large");
    // None reached the router's counters; they have their own. (The metrics are the
    // process's: counted here, but not only by this app.)
    let metrics = app.get("/metrics", None).await;
    let metrics = metrics.body.as_str().expect("metrics are text");
    for (status, at_least) in [("400", 6.0), ("431", 1.0)] {
        let counted: f64 = metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "stampede_http_unparsable_total{{status=\"{status}\"}} "
                ))
            })
            .unwrap_or_else(|| panic!("no {status} counted: {metrics}"))
            .parse()
            .unwrap();
        assert!(counted >= at_least, "{status}: {counted}");
    }
    assert_eq!(app.get("/healthz", None).await.status, 200);
}

/// Keeps `stored` as the rules an earlier version saved, restarts, and answers the
/// rules the server then runs with.
async fn restart_with_stored_rules(app: &mut TestApp, stored: &Value) -> Value {
    store_rules_text(app, &serde_json::to_string(stored).unwrap()).await;
    app.restart().await;
    rules(app).await
}

#[tokio::test]
async fn stored_rules_that_name_what_nothing_asks_give_way_to_the_configured_ones() {
    let mut app = spawn_app().await;
    // What an earlier version could have kept: a shopper limit on `pay`, which nothing
    // asks. Starting must not fail on it.
    let mut stored = rules(&app).await;
    stored["version"] = json!(7);
    stored["hot"] = json!([{"name": "x", "resource": "pay", "param": "shopper", "qps": 1.0}]);
    let running = restart_with_stored_rules(&mut app, &stored).await;
    assert_eq!(running["version"], 0, "{running}");
    assert_eq!(running["hot"][0]["resource"], "purchase");

    // A burst on a pacing rule and on a concurrency-only rule, which an earlier version
    // took and ignored and this one refuses in a change: the stored rules start, the
    // bursts dropped.
    let mut stored = rules(&app).await;
    stored["version"] = json!(8);
    stored["flow"] = json!([
        {"resource": "pay", "qps": 5.0, "burst": 10, "behavior": {"kind": "pace", "max_queue": "1s"}},
        {"resource": "get_sale", "max_concurrency": 64, "burst": 3}
    ]);
    let running = restart_with_stored_rules(&mut app, &stored).await;
    assert_eq!(running["version"], 8, "{running}");
    assert_eq!(running["flow"][0]["burst"], 1, "{running}");
    assert_eq!(running["flow"][0]["qps"], 5.0, "{running}");
    assert_eq!(running["flow"][1]["burst"], 1, "{running}");
    assert_eq!(running["flow"][1]["max_concurrency"], 64, "{running}");
}

/// The stored rules of `app`, as JSON.
async fn stored_rules(app: &TestApp) -> Option<Value> {
    stored_rules_text(app)
        .await
        .map(|text| serde_json::from_str(&text).unwrap())
}

/// The stored rules of `app`, as the store keeps them.
async fn stored_rules_text(app: &TestApp) -> Option<String> {
    let engine = app.running.as_ref().unwrap().engine.clone();
    engine
        .store()
        .load_setting(stampede_api::handlers::GUARD_RULES_KEY)
        .await
        .unwrap()
}

/// Keeps `text` as the stored rules of `app`, as another node, or another release,
/// would have.
async fn store_rules_text(app: &TestApp, text: &str) {
    let engine = app.running.as_ref().unwrap().engine.clone();
    engine
        .store()
        .save_setting(stampede_api::handlers::GUARD_RULES_KEY, text)
        .await
        .unwrap();
}

/// `reply` is 409 `version_conflict`, its message saying `why`.
fn assert_conflict_saying(reply: &Reply, why: &str) {
    assert_error(reply, 409, "version_conflict");
    assert!(
        reply.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(why),
        "{}",
        reply.body
    );
}

/// A newer stored copy this node cannot run (another node's, with a pacing queue longer
/// than this node's `client_timeout` allows) is neither taken up nor saved over: a
/// change sent here is answered 409 saying so. Before, the node saved its own next
/// version over it, and the other node's change was gone.
#[tokio::test]
async fn rules_are_never_saved_over_a_newer_stored_copy_this_node_cannot_run() {
    let app = spawn_app().await;
    let ours = rules(&app).await;
    let version = ours["version"].as_u64().unwrap();
    let mut theirs: stampede_guard::GuardRules = serde_json::from_value(ours.clone()).unwrap();
    theirs.version = version + 1;
    theirs.flow = vec![stampede_guard::FlowRule {
        resource: "pay".into(),
        qps: Some(1.0),
        burst: 1,
        behavior: stampede_guard::Behavior::Pace {
            max_queue: Duration::from_secs(600),
        },
        max_concurrency: None,
        dry_run: false,
    }];
    let theirs = serde_json::to_value(&theirs).unwrap();
    store_rules_text(&app, &serde_json::to_string(&theirs).unwrap()).await;
    let mut next = ours.clone();
    next["version"] = json!(version + 1);
    next["dry_run"] = json!(true);
    let reply = put_rules(&app, Some(&app.admin), &next).await;
    assert_conflict_saying(&reply, "cannot be in force");
    let reply = app
        .post_json(
            "/v1/guard/degrade",
            Some(&app.admin),
            &json!({"class": "stats", "off": true}),
        )
        .await;
    assert_error(&reply, 409, "version_conflict");
    assert_eq!(stored_rules(&app).await, Some(theirs));
    assert_eq!(
        rules(&app).await,
        ours,
        "this node's rules are as they were"
    );
}

/// Configured rules that win at a start (a higher version than the stored copy, or
/// none stored) are stored too, so other nodes sharing the database take them up and
/// make their changes against them. Before, they were only in force on the node that
/// started with them.
#[tokio::test]
async fn configured_rules_that_win_at_a_start_are_stored() {
    let app = spawn_app_with(|config| config.guard.version = 5).await;
    let stored = stored_rules(&app).await.expect("stored at the start");
    assert_eq!(stored["version"], 5);
    assert_eq!(stored, rules(&app).await);
}

/// Configured rules a start refuses are not stored: before, they were kept before the
/// start checked them, and every node sharing the database then found newer stored
/// rules it could not run.
#[tokio::test]
async fn configured_rules_a_start_refuses_are_not_stored() {
    let mut app = spawn_app().await;
    app.stop().await;
    let good = app.config.clone();
    app.config.guard.version = 5;
    // A shopper limit on `pay`, which nothing asks: refused at start.
    app.config.guard.hot.push(stampede_guard::HotRule {
        name: "nothing-asks".into(),
        resource: "pay".into(),
        param: stampede_guard::Param::Shopper,
        qps: 1.0,
        burst: 1,
        dry_run: false,
    });
    let error = stampede::start(&app.config, std::future::pending())
        .await
        .err()
        .expect("refused");
    assert!(
        format!("{error:#}").contains("invalid guard rules"),
        "{error:#}"
    );
    app.config = good;
    app.start().await;
    assert_eq!(stored_rules(&app).await.expect("stored")["version"], 0);
}

/// A paced purchase whose client hangs up once the handler has it (waiting for a slow
/// commit) spent the shopper's and the sale's allowance: the order is placed all the
/// same. Before, they were given back when the request was dropped, so a client that
/// sent and hung up could buy past a sale's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_purchase_whose_client_hangs_up_in_the_handler_spends_its_allowance() {
    let app = spawn_app_on_with(Backend::Postgres, |config| {
        pace_purchases(config, 20.0, Duration::from_secs(3), Some(1))
    })
    .await;
    let sale = app.live_sale("GUARD-PACED-HUNG", 10, 1).await;
    app.database.slow_order_inserts(1.0).await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let gone = impatient
        .post(app.url(&format!("/v1/flash-sales/{sale}/purchase")))
        .bearer_auth(app.shopper("gone"))
        .header("idempotency-key", "k")
        .json(&json!({"quantity": 1}))
        .send()
        .await;
    assert!(gone.is_err_and(|e| e.is_timeout()), "the client hung up");
    // Waits for the stalled insert, which then commits.
    app.database.heal_order_inserts(app.data_dir.path()).await;
    eventually("the order is placed", || async {
        (app.remaining(&sale).await == 9).then_some(())
    })
    .await;
    let reply = app
        .purchase_reply(&app.shopper("next"), &sale, "k", 1)
        .await;
    assert_error(&reply, 429, "throttled");
}

/// A stored copy this release cannot read (another release's) is not saved over: a
/// change answers 409 saying so. Before, the change was saved over it, whatever the
/// other release's version.
#[tokio::test]
async fn rules_are_never_saved_over_a_stored_copy_this_release_cannot_read() {
    let app = spawn_app().await;
    let theirs = r#"{"version": 9, "a_field_of_a_later_release": true}"#;
    store_rules_text(&app, theirs).await;
    let mut next = rules(&app).await;
    next["version"] = json!(next["version"].as_u64().unwrap() + 1);
    let reply = put_rules(&app, Some(&app.admin), &next).await;
    assert_conflict_saying(&reply, "cannot be read");
    assert_eq!(stored_rules_text(&app).await.as_deref(), Some(theirs));
}
