//! The stampede: thousands of shoppers over real HTTP at once, against one sale.
//! Nothing is oversold, nobody holds more than the per-user limit, and the books agree.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::json;

/// How one purchase ended, after retrying transport errors and 503s with the same key
/// (safe: the key makes the retry a replay).
#[derive(Debug, Clone)]
struct Outcome {
    buyer: usize,
    key: String,
    status: u16,
    code: Option<String>,
    order_id: Option<String>,
    overloaded: u32,
    transport_errors: u32,
}

async fn purchase_until_decided(
    client: reqwest::Client,
    url: String,
    token: String,
    buyer: usize,
    key: String,
    quantity: u32,
) -> Outcome {
    let mut outcome = Outcome {
        buyer,
        key,
        status: 0,
        code: None,
        order_id: None,
        overloaded: 0,
        transport_errors: 0,
    };
    for attempt in 0u64..200 {
        let sent = client
            .post(&url)
            .bearer_auth(&token)
            .header("idempotency-key", &outcome.key)
            .json(&json!({"quantity": quantity}))
            .send()
            .await;
        let reply = match sent {
            Ok(response) => read(response).await,
            Err(error) => {
                outcome.transport_errors += 1;
                assert!(
                    outcome.transport_errors <= 20,
                    "buyer {buyer}: the server keeps failing: {error}"
                );
                tokio::time::sleep(Duration::from_millis(10 + 10 * attempt.min(20))).await;
                continue;
            }
        };
        if reply.status == 503 {
            assert_eq!(reply.error_code(), "overloaded", "{}", reply.body);
            assert!(
                reply.headers.contains_key("retry-after"),
                "503 without Retry-After"
            );
            outcome.overloaded += 1;
            // Back off (shorter than Retry-After, to keep the test quick), with jitter.
            let jitter = (buyer as u64 * 7 + attempt * 13) % 20;
            tokio::time::sleep(Duration::from_millis(10 + 5 * attempt.min(20) + jitter)).await;
            continue;
        }
        outcome.status = reply.status;
        match reply.status {
            200 | 201 => {
                outcome.order_id = Some(
                    reply.body["order_id"]
                        .as_str()
                        .expect("order_id")
                        .to_owned(),
                );
                assert_eq!(reply.body["quantity"], quantity, "{}", reply.body);
                assert_eq!(reply.body["status"], "pending_payment", "{}", reply.body);
            }
            _ => outcome.code = Some(reply.error_code().to_owned()),
        }
        return outcome;
    }
    panic!("buyer {buyer}: still overloaded after 200 attempts");
}

/// Fires every `(buyer, key, quantity)` at once (released together by a barrier).
async fn stampede(
    app: &TestApp,
    sale: &str,
    tokens: &[String],
    requests: Vec<(usize, String, u32)>,
) -> Vec<Outcome> {
    let client = client();
    let url = app.url(&format!("/v1/flash-sales/{sale}/purchase"));
    let barrier = Arc::new(tokio::sync::Barrier::new(requests.len()));
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|(buyer, key, quantity)| {
            let (client, url, token, barrier) = (
                client.clone(),
                url.clone(),
                tokens[buyer].clone(),
                barrier.clone(),
            );
            tokio::spawn(async move {
                barrier.wait().await;
                purchase_until_decided(client, url, token, buyer, key, quantity).await
            })
        })
        .collect();
    futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("buyer task"))
        .collect()
}

fn summary(outcomes: &[Outcome]) -> String {
    let mut by: HashMap<String, usize> = HashMap::new();
    for o in outcomes {
        *by.entry(format!("{} {}", o.status, o.code.as_deref().unwrap_or("")))
            .or_default() += 1;
    }
    let overloaded: u32 = outcomes.iter().map(|o| o.overloaded).sum();
    let transport: u32 = outcomes.iter().map(|o| o.transport_errors).sum();
    format!(
        "{by:?}; 503 overloaded retried {overloaded} times; transport errors retried {transport} times"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_buyers_one_hundred_units() {
    raise_fd_limit();
    const BUYERS: usize = 2_000;
    const UNITS: u64 = 100;
    let app = spawn_app().await;
    let sale = app.live_sale("HOT-PHONE", UNITS as i64, 1).await;
    let tokens: Vec<String> = (0..BUYERS)
        .map(|i| app.shopper(&format!("buyer-{i:04}")))
        .collect();

    let requests = (0..BUYERS)
        .map(|i| (i, format!("stampede-{i}"), 1))
        .collect();
    let outcomes = stampede(&app, &sale, &tokens, requests).await;
    let summary = summary(&outcomes);
    println!("{summary}");

    let created = outcomes.iter().filter(|o| o.status == 201).count();
    // A 200 is possible only when a buyer's earlier attempt was lost in transport and the
    // retry found the order already placed.
    let replayed: Vec<_> = outcomes.iter().filter(|o| o.status == 200).collect();
    assert!(
        replayed.iter().all(|o| o.transport_errors > 0),
        "a replay without a lost attempt: {summary}"
    );
    let winners: Vec<&Outcome> = outcomes.iter().filter(|o| o.order_id.is_some()).collect();
    assert_eq!(
        winners.len() as u64,
        UNITS,
        "exactly {UNITS} buyers get a unit: {summary}"
    );
    assert_eq!(created + replayed.len(), UNITS as usize, "{summary}");
    for loser in outcomes.iter().filter(|o| o.order_id.is_none()) {
        assert_eq!(
            (loser.status, loser.code.as_deref()),
            (409, Some("sold_out")),
            "buyer {}: {summary}",
            loser.buyer
        );
    }
    let order_ids: HashSet<&str> = winners
        .iter()
        .map(|o| o.order_id.as_deref().expect("winner"))
        .collect();
    assert_eq!(
        order_ids.len(),
        UNITS as usize,
        "every winner has an order of its own"
    );

    // No buyer holds more than one, as each buyer sees it.
    for winner in &winners {
        let orders = app.orders(&tokens[winner.buyer]).await;
        assert_eq!(
            orders.len(),
            1,
            "buyer {} holds {} orders",
            winner.buyer,
            orders.len()
        );
        assert_eq!(orders[0]["order_id"].as_str(), winner.order_id.as_deref());
    }
    for loser in outcomes.iter().filter(|o| o.order_id.is_none()).take(50) {
        assert!(
            app.orders(&tokens[loser.buyer]).await.is_empty(),
            "buyer {} was refused but holds an order",
            loser.buyer
        );
    }

    // Pay for a few, so the books hold both states.
    for winner in winners.iter().take(10) {
        let reply = app
            .pay(
                &tokens[winner.buyer],
                winner.order_id.as_deref().expect("winner"),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }

    let view = app.sale(&sale).await;
    assert_eq!(view["remaining"], 0);
    assert_eq!(view["status"], "sold_out");
    let audit = app.audit(&sale).await;
    assert_books(&audit);
    assert_eq!(audit["remaining"], 0, "{audit}");
    assert_eq!(audit["paid"], 10, "{audit}");
    assert_eq!(audit["pending_payment"], UNITS - 10, "{audit}");
    assert_eq!(audit["cancelled"], 0, "{audit}");

    // Late buyers are still refused, and a winner's replay is still the same order.
    let late = app.shopper("late-buyer");
    assert_error(
        &app.purchase_reply(&late, &sale, "late-1", 1).await,
        409,
        "sold_out",
    );
    let first = winners[0];
    let (status, body) = app
        .purchase(&tokens[first.buyer], &sale, &first.key, 1)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["order_id"].as_str(), first.order_id.as_deref());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_buyers_five_keys_each_limit_two() {
    raise_fd_limit();
    const BUYERS: usize = 500;
    const KEYS_PER_BUYER: usize = 5;
    const LIMIT: u64 = 2;
    // Scarcer than the limits allow (500 × 2 = 1,000 > 600), so both refusals occur.
    const UNITS: u64 = 600;
    let app = spawn_app().await;
    let sale = app
        .live_sale("HOT-CONSOLE", UNITS as i64, LIMIT as i64)
        .await;
    let tokens: Vec<String> = (0..BUYERS)
        .map(|i| app.shopper(&format!("greedy-{i:03}")))
        .collect();

    let requests = (0..BUYERS)
        .flat_map(|i| (0..KEYS_PER_BUYER).map(move |k| (i, format!("greedy-{i}-{k}"), 1)))
        .collect();
    let outcomes = stampede(&app, &sale, &tokens, requests).await;
    let summary = summary(&outcomes);
    println!("{summary}");

    let mut held: HashMap<usize, u64> = HashMap::new();
    for outcome in &outcomes {
        match (outcome.status, outcome.code.as_deref()) {
            (200 | 201, _) => *held.entry(outcome.buyer).or_default() += 1,
            (409, Some("sold_out" | "limit_exceeded")) => {}
            other => panic!(
                "buyer {}: unexpected answer {other:?}: {summary}",
                outcome.buyer
            ),
        }
    }
    let sold: u64 = held.values().sum();
    assert_eq!(sold, UNITS, "the sale sells out exactly: {summary}");
    let over: Vec<_> = held.iter().filter(|(_, units)| **units > LIMIT).collect();
    assert!(
        over.is_empty(),
        "buyers over the limit of {LIMIT}: {over:?}"
    );
    assert!(
        outcomes
            .iter()
            .any(|o| o.code.as_deref() == Some("limit_exceeded")),
        "the per-user limit was exercised: {summary}"
    );

    // Each buyer's own view agrees.
    for (buyer, token) in tokens.iter().enumerate() {
        let units: u64 = app
            .orders(token)
            .await
            .iter()
            .map(|o| o["quantity"].as_u64().expect("quantity"))
            .sum();
        assert!(units <= LIMIT, "buyer {buyer} holds {units} units");
        assert_eq!(
            units,
            held.get(&buyer).copied().unwrap_or(0),
            "buyer {buyer}: orders and answers disagree"
        );
    }

    let audit = app.audit(&sale).await;
    assert_books(&audit);
    assert_eq!(audit["remaining"], 0, "{audit}");
    assert_eq!(audit["pending_payment"], UNITS, "{audit}");
}

/// One shopper's retry storm: the same key fired 50 times at once places one order;
/// everyone else is answered that order with 200. The same key with another quantity is
/// refused with 422, never placed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_fired_concurrently_places_one_order() {
    // 50 attempts by one shopper at once: without the shipped per-shopper limit (10/s,
    // burst 20), which would answer 429 to 30 of them before idempotency is reached.
    let app = common::spawn_app_with(|config| config.guard.hot.clear()).await;
    let sale = app.live_sale("HOT-DUP", 10, 5).await;
    let token = app.shopper("double-clicker");

    let storm = (0..50).map(|i| {
        let quantity = if i % 10 == 9 { 3 } else { 2 };
        let (app, token, sale) = (&app, &token, &sale);
        async move {
            (
                quantity,
                app.purchase(token, sale, "the-one-key", quantity).await,
            )
        }
    });
    let answers = futures::future::join_all(storm).await;

    let created: Vec<_> = answers
        .iter()
        .filter(|(_, (status, _))| *status == 201)
        .collect();
    assert_eq!(
        created.len(),
        1,
        "exactly one request places the order: {answers:?}"
    );
    let (winning_quantity, (_, placed)) = created[0];
    for (quantity, (status, body)) in &answers {
        match *status {
            201 => {}
            200 => {
                assert_eq!(quantity, winning_quantity, "{body}");
                assert_eq!(body, placed, "every replay answers the placed order");
            }
            422 => {
                assert_ne!(quantity, winning_quantity, "{body}");
                assert_eq!(body["error"]["code"], "idempotency_key_reused", "{body}");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let orders = app.orders(&token).await;
    assert_eq!(orders.len(), 1, "{orders:?}");
    let audit = app.audit(&sale).await;
    assert_books(&audit);
    assert_eq!(audit["pending_payment"], *winning_quantity);
}

/// With a writer queue of one slot, a burst is shed with 503 `overloaded` + Retry-After
/// rather than queued without bound; the shed requests took nothing, and retrying them
/// with the same key sells out exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_queue_sheds_load_with_503_and_never_oversells() {
    raise_fd_limit();
    const BUYERS: usize = 400;
    const UNITS: usize = 150;
    let app = spawn_app_with(|config| {
        config.queue_capacity = 1;
        config.batch_size_max = 1;
    })
    .await;
    let sale = app.live_sale("HOT-SHED", UNITS as i64, 1).await;
    let tokens: Vec<String> = (0..BUYERS)
        .map(|i| app.shopper(&format!("shed-{i:03}")))
        .collect();

    let requests = (0..BUYERS).map(|i| (i, format!("shed-{i}"), 1)).collect();
    let outcomes = stampede(&app, &sale, &tokens, requests).await;
    let summary = summary(&outcomes);
    println!("{summary}");

    assert!(
        outcomes.iter().any(|o| o.overloaded > 0),
        "a one-slot queue sheds some of {BUYERS} at once: {summary}"
    );
    let sold = outcomes.iter().filter(|o| o.order_id.is_some()).count();
    assert_eq!(sold, UNITS, "{summary}");
    for o in outcomes.iter().filter(|o| o.order_id.is_none()) {
        assert_eq!(
            (o.status, o.code.as_deref()),
            (409, Some("sold_out")),
            "buyer {}: {summary}",
            o.buyer
        );
    }
    let audit = app.audit(&sale).await;
    assert_books(&audit);
    assert_eq!(audit["remaining"], 0, "{audit}");
    assert_eq!(audit["pending_payment"], UNITS as u64, "{audit}");
}

/// A graceful stop in the middle of a burst: requests already taken are finished and
/// their orders are durable; after a start on the same data directory every 201 is there,
/// and the requests cut off by the stop can be retried with their keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_under_load_keeps_every_acknowledged_order() {
    raise_fd_limit();
    const BUYERS: usize = 600;
    const UNITS: u64 = 400;
    // Without the database breaker: slow commits on a loaded machine could open it and
    // answer 503 for a reason other than the stop, which this test is not about.
    let mut app =
        spawn_app_with(|config| config.guard.breakers.retain(|b| b.name != "database")).await;
    let sale = app.live_sale("HOT-STOP", UNITS as i64, 1).await;
    let tokens: Vec<String> = (0..BUYERS)
        .map(|i| app.shopper(&format!("stop-{i:03}")))
        .collect();
    let client = client();
    let url = app.url(&format!("/v1/flash-sales/{sale}/purchase"));
    let (first_ack, first_ack_seen) = tokio::sync::oneshot::channel::<()>();
    let first_ack = Arc::new(std::sync::Mutex::new(Some(first_ack)));

    let tasks: Vec<_> = (0..BUYERS)
        .map(|i| {
            let (client, url, token) = (client.clone(), url.clone(), tokens[i].clone());
            let first_ack = first_ack.clone();
            tokio::spawn(async move {
                let sent = client
                    .post(&url)
                    .bearer_auth(&token)
                    .header("idempotency-key", format!("stop-{i}"))
                    .json(&json!({"quantity": 1}))
                    .send()
                    .await;
                // A request the stop kept from being taken fails to send (no answer).
                let reply = read(sent.ok()?).await;
                if reply.status == 201
                    && let Some(signal) = first_ack.lock().expect("not poisoned").take()
                {
                    let _ = signal.send(());
                }
                Some(reply)
            })
        })
        .collect();
    first_ack_seen
        .await
        .expect("a first purchase is acknowledged");
    app.stop().await;
    let answered: Vec<(usize, Reply)> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| r.expect("task").map(|reply| (i, reply)))
        .collect();
    // Every request the server took was finished: bought, or refused for stock. A drain
    // that dropped queued purchases would answer them 503 (their stock returned, so the
    // books below would still balance).
    for (i, reply) in &answered {
        assert!(
            reply.status == 201 || (reply.status == 409 && reply.error_code() == "sold_out"),
            "purchase {i} was answered {} during the stop: {}",
            reply.status,
            reply.body
        );
    }
    let acked: Vec<(usize, serde_json::Value)> = answered
        .into_iter()
        .filter(|(_, reply)| reply.status == 201)
        .map(|(i, reply)| (i, reply.body))
        .collect();
    println!("{} purchases acknowledged before the stop", acked.len());

    app.start().await;
    let audit = app.audit(&sale).await;
    assert_books(&audit);
    assert_eq!(
        audit["pending_payment"].as_u64(),
        Some(acked.len() as u64),
        "exactly the acknowledged orders: {audit}"
    );
    for (i, body) in &acked {
        let order_id = body["order_id"].as_str().expect("order id");
        assert_eq!(
            app.order_status(&app.admin, order_id).await,
            "pending_payment"
        );
        let (status, replay) = app
            .purchase(&tokens[*i], &sale, &format!("stop-{i}"), 1)
            .await;
        assert_eq!(status, 200, "{replay}");
        assert_eq!(&replay, body);
    }
}

/// `--stock-gate redis`: the same stampede with the stock taken by a Lua script in the
/// real Redis (the conventional design, offered for comparison) sells exactly the stock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_stock_gate_sells_exactly_the_stock_too() {
    raise_fd_limit();
    const BUYERS: usize = 400;
    const UNITS: u64 = 50;
    let prefix = format!("stampede-test:{}:api-gate", std::process::id());
    let app = spawn_app_with(|config| {
        config.stock_gate = stampede::StockGateKind::Redis;
        if let Ok(url) = std::env::var("STAMPEDE_TEST_REDIS_URL") {
            config.redis_url = url;
        }
        config.redis_prefix = prefix;
    })
    .await;
    let sale = app.live_sale("REDIS-PHONE", UNITS as i64, 1).await;
    let tokens: Vec<String> = (0..BUYERS)
        .map(|i| app.shopper(&format!("buyer-{i:04}")))
        .collect();
    let requests = (0..BUYERS).map(|i| (i, format!("gate-{i}"), 1)).collect();
    let outcomes = stampede(&app, &sale, &tokens, requests).await;
    let summary = summary(&outcomes);
    let winners = outcomes.iter().filter(|o| o.order_id.is_some()).count();
    assert_eq!(winners as u64, UNITS, "{summary}");
    for loser in outcomes.iter().filter(|o| o.order_id.is_none()) {
        assert_eq!(
            (loser.status, loser.code.as_deref()),
            (409, Some("sold_out")),
            "{summary}"
        );
    }
    let audit = app.audit(&sale).await;
    assert_books(&audit);
    assert_eq!(audit["remaining"], 0, "{audit}");
}
