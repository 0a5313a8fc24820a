//! kill -9 in the middle of a stampede. The server is a child process (`stampede serve`,
//! durable acknowledgements, the default); it is SIGKILLed while purchases are in flight
//! and restarted on the same data directory. Every acknowledged (201) order must have
//! survived, replays must answer the same order, the books must agree, and selling must
//! go on to sell out exactly.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::child::{Server, shopper};
use common::*;
use serde_json::{Value, json};
use stampede_store::testing::{Backend, TestDatabase};

const UNITS: usize = 300;
const SHOPPERS: usize = 1_000;

/// What the client saw of one purchase fired before the kill.
enum Seen {
    Acked(Value),
    Refused(u16, String),
    Lost,
}

fn held(audit: &Value) -> usize {
    (audit["pending_payment"].as_u64().expect("pending") + audit["paid"].as_u64().expect("paid"))
        as usize
}

/// `extra_args` go to both starts of `stampede serve`.
async fn crash_mid_stampede(kill_after_acks: usize, extra_args: &[&str]) {
    raise_fd_limit();
    let data_dir = tempfile::tempdir().expect("data directory");
    let server = Server::start(data_dir.path(), extra_args).await;

    let sale = server.live_sale("CRASH-1", UNITS).await;

    let tokens: Arc<Vec<String>> = Arc::new(
        (0..SHOPPERS)
            .map(|i| shopper(&format!("shopper-{i:04}")))
            .collect(),
    );
    let key = |i: usize| format!("crash-key-{i}");

    // The stampede. The task that reads the Nth 201 sends SIGKILL at once.
    let pid = server.pid();
    let acks = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let answered_at_kill = Arc::new(AtomicUsize::new(usize::MAX));
    let barrier = Arc::new(tokio::sync::Barrier::new(SHOPPERS));
    let url = server.url(&format!("/v1/flash-sales/{sale}/purchase"));
    let tasks: Vec<_> = (0..SHOPPERS)
        .map(|i| {
            let (client, url, tokens, barrier) = (
                server.client.clone(),
                url.clone(),
                tokens.clone(),
                barrier.clone(),
            );
            let (acks, answered, answered_at_kill) =
                (acks.clone(), answered.clone(), answered_at_kill.clone());
            let key = key(i);
            tokio::spawn(async move {
                barrier.wait().await;
                let sent = client
                    .post(&url)
                    .bearer_auth(&tokens[i])
                    .header("idempotency-key", &key)
                    .json(&json!({"quantity": 1}))
                    .send()
                    .await;
                let Ok(response) = sent else {
                    return Seen::Lost;
                };
                let status = response.status().as_u16();
                let Ok(text) = response.text().await else {
                    return Seen::Lost;
                };
                answered.fetch_add(1, Ordering::SeqCst);
                if status == 201 {
                    if acks.fetch_add(1, Ordering::SeqCst) + 1 == kill_after_acks {
                        answered_at_kill.store(answered.load(Ordering::SeqCst), Ordering::SeqCst);
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                    return Seen::Acked(serde_json::from_str(&text).expect("201 body is JSON"));
                }
                let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
                Seen::Refused(
                    status,
                    body["error"]["code"].as_str().unwrap_or("?").to_owned(),
                )
            })
        })
        .collect();
    let seen: Vec<Seen> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .collect();
    let answered_at_kill = answered_at_kill.load(Ordering::SeqCst);
    assert!(
        answered_at_kill < SHOPPERS,
        "the kill was sent mid-load (after {kill_after_acks} acks)"
    );
    server.kill9().await;

    let acked: Vec<(usize, Value)> = seen
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s {
            Seen::Acked(body) => Some((i, body.clone())),
            _ => None,
        })
        .collect();
    let lost: Vec<usize> = seen
        .iter()
        .enumerate()
        .filter(|(_, s)| matches!(s, Seen::Lost))
        .map(|(i, _)| i)
        .collect();
    for s in &seen {
        if let Seen::Refused(status, code) = s {
            assert_eq!(
                (*status, code.as_str()),
                (409, "sold_out"),
                "refused before the kill"
            );
        }
    }
    println!(
        "kill after {kill_after_acks} acks: {} acked, {} lost in flight, {} refused; {answered_at_kill} answered when killed",
        acked.len(),
        lost.len(),
        SHOPPERS - acked.len() - lost.len()
    );
    assert!(acked.len() >= kill_after_acks);

    // Restart on the same data directory.
    let server = Server::start(data_dir.path(), extra_args).await;
    let audit = server.audit(&sale).await;
    assert_books(&audit);
    let durable = held(&audit);
    println!(
        "after the restart: {durable} units held by durable orders ({} acknowledged)",
        acked.len()
    );
    assert!(
        durable >= acked.len(),
        "acknowledged orders were lost: {} acked, {durable} durable: {audit}",
        acked.len()
    );
    assert!(durable <= UNITS, "{audit}");
    assert_eq!(
        audit["remaining"].as_u64(),
        Some((UNITS - durable) as u64),
        "{audit}"
    );

    // Every acknowledged order is there, and its replay answers the same order.
    let mut order_ids = HashSet::new();
    for (i, body) in &acked {
        let order_id = body["order_id"].as_str().expect("order id");
        assert!(
            order_ids.insert(order_id.to_owned()),
            "order id {order_id} acknowledged twice"
        );
        let reply = server.admin_get(&format!("/v1/orders/{order_id}")).await;
        assert_eq!(
            reply.status, 200,
            "acknowledged order {order_id} is gone: {}",
            reply.body
        );
        assert_eq!(reply.body["user_id"], format!("shopper-{i:04}"));
        assert_eq!(reply.body["sale_id"], sale.as_str());
        assert_eq!(reply.body["quantity"], 1);
        assert_eq!(reply.body["status"], "pending_payment");
        let replay = server.purchase(&tokens[*i], &sale, &key(*i)).await;
        assert_eq!(
            replay.status, 200,
            "replay of an acknowledged purchase: {}",
            replay.body
        );
        assert_eq!(&replay.body, body, "a replay answers the acknowledged body");
    }

    // The purchases lost in flight: retrying them (same key) finds the order if it was
    // committed, or places it now; never twice, never over the limit.
    let mut placed_after_restart = 0;
    for &i in &lost {
        let reply = server.purchase_decided(&tokens[i], &sale, &key(i)).await;
        match (reply.status, reply.body["error"]["code"].as_str()) {
            (200, _) => {}
            (201, _) => placed_after_restart += 1,
            (409, Some("sold_out")) => {}
            other => panic!("retry of a lost purchase: {other:?} {}", reply.body),
        }
        let reply = send(
            server
                .client
                .get(server.url("/v1/orders"))
                .bearer_auth(&tokens[i]),
        )
        .await;
        assert!(
            reply.body["orders"].as_array().expect("orders").len() <= 1,
            "shopper {i} holds more than one order"
        );
    }

    // Selling goes on and stops exactly at the sale's quantity.
    let fresh: Vec<(String, String)> = (0..UNITS + 20)
        .map(|i| (shopper(&format!("fresh-{i:04}")), format!("fresh-key-{i}")))
        .collect();
    let replies = futures::future::join_all(
        fresh
            .iter()
            .map(|(token, key)| server.purchase_decided(token, &sale, key)),
    )
    .await;
    let mut fresh_sold = 0;
    for reply in &replies {
        match (reply.status, reply.body["error"]["code"].as_str()) {
            (201, _) => fresh_sold += 1,
            (409, Some("sold_out")) => {}
            other => panic!("fresh purchase after the restart: {other:?} {}", reply.body),
        }
    }
    let after_retries = durable + placed_after_restart;
    assert_eq!(
        fresh_sold,
        UNITS - after_retries,
        "sells out exactly at {UNITS}"
    );

    let audit = server.audit(&sale).await;
    assert_books(&audit);
    assert_eq!(audit["remaining"], 0, "{audit}");
    assert_eq!(held(&audit), UNITS, "{audit}");
    let view = send(
        server
            .client
            .get(server.url(&format!("/v1/flash-sales/{sale}"))),
    )
    .await;
    assert_eq!(view.body["remaining"], 0);
    assert_eq!(view.body["status"], "sold_out");
    let product = send(server.client.get(server.url("/v1/products/CRASH-1"))).await;
    assert_eq!(product.body["available"], 0, "{}", product.body);

    // Leave no child behind.
    server.kill9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_right_after_the_first_ack() {
    crash_mid_stampede(1, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_halfway_through_the_sale() {
    // Small batches, so half the sale is acknowledged while the other half is still being
    // committed batch by batch when the kill lands.
    crash_mid_stampede(UNITS / 2, &["--batch-size-max", "8"]).await;
}

/// The same SIGKILL on a server database: the killed node's connection (and owner lock)
/// dies with it, the restarted node takes over and rebuilds from what was committed.
async fn kill9_halfway_on(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let url = database.url.clone().expect("a server database has a URL");
    crash_mid_stampede(
        UNITS / 2,
        &["--batch-size-max", "8", "--database-url", &url],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_halfway_through_the_sale_on_postgres() {
    kill9_halfway_on(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_halfway_through_the_sale_on_mysql() {
    kill9_halfway_on(Backend::MySql).await;
}

async fn buy(server: &Server, sale: &str, who: &str) -> (String, String) {
    let token = shopper(who);
    let reply = server.purchase(&token, sale, &format!("{who}-key")).await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let order = reply.body["order_id"]
        .as_str()
        .expect("order id")
        .to_owned();
    (token, order)
}

async fn pay(server: &Server, token: &str, order: &str) -> Reply {
    send(
        server
            .client
            .post(server.url(&format!("/v1/orders/{order}/pay")))
            .bearer_auth(token),
    )
    .await
}

async fn order_status(server: &Server, order: String) -> String {
    let reply = server.admin_get(&format!("/v1/orders/{order}")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.body["status"].as_str().expect("status").to_owned()
}

/// The charge ledger across kill -9: a charge the provider made for an order whose pay
/// timed out, or whose refund could not be made yet, is not forgotten with the process.
/// Order B closes unpaid while the provider refuses refunds and the server dies before it
/// could refund; order A's pay times out, the server dies at once and the charge lands
/// while it is down. After each restart the shopper gets the money back: the refund owed
/// for B is made at start, A's when it expires. A paid order C is never refunded.
async fn kill9_keeps_no_money_for_unpaid_orders_on(backend: Backend) {
    let sim = PaymentSim::spawn().await;
    let data_dir = tempfile::tempdir().expect("data directory");
    let database = TestDatabase::create(backend).await;
    let mut args = vec![
        "--payment-url",
        sim.url.as_str(),
        "--payment-timeout",
        "300ms",
        "--payment-window",
        "3s",
    ];
    if let Some(url) = &database.url {
        args.extend(["--database-url", url.as_str()]);
    }
    let server = Server::start(data_dir.path(), &args).await;
    let sale = server.live_sale("LEDGER-1", 10).await;
    // B: the charge lands after our timeout; the order expires while every refund call
    // fails, and the server is killed before its retries get through.
    let (token_b, order_b) = buy(&server, &sale, "bea").await;
    sim.configure(1_000, 0.0).await;
    assert_error(
        &pay(&server, &token_b, &order_b).await,
        504,
        "payment_timeout",
    );
    eventually("B's late charge to land", || async {
        sim.charge(&order_b).await.filter(|c| c["charged"] == 1)
    })
    .await;
    sim.configure(0, 1.0).await;
    eventually("B to expire", || async {
        (order_status(&server, order_b.clone()).await == "expired").then_some(())
    })
    .await;
    server.kill9().await;
    assert_eq!(sim.charge(&order_b).await.expect("B")["refunded"], false);

    // The provider heals; the restart makes the refund the ledger says is owed.
    sim.configure(0, 0.0).await;
    let server = Server::start(data_dir.path(), &args).await;
    let charge = eventually(
        "the refund owed for B to be made after the restart",
        || async { sim.charge(&order_b).await.filter(|c| c["refunded"] == true) },
    )
    .await;
    assert_eq!(charge["charged"], 1, "{charge}");

    // A: the pay times out and the server dies at once; the charge lands while it is down.
    let (token_a, order_a) = buy(&server, &sale, "abe").await;
    sim.configure(1_000, 0.0).await;
    assert_error(
        &pay(&server, &token_a, &order_a).await,
        504,
        "payment_timeout",
    );
    server.kill9().await;
    eventually("A's late charge to land", || async {
        sim.charge(&order_a).await.filter(|c| c["charged"] == 1)
    })
    .await;
    sim.configure(0, 0.0).await;

    // The restarted server expires A (its window is over) and refunds the charge; C, paid
    // meanwhile, keeps its charge.
    let server = Server::start(data_dir.path(), &args).await;
    let (token_c, order_c) = buy(&server, &sale, "cyd").await;
    let reply = pay(&server, &token_c, &order_c).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    eventually("A to expire after the restart", || async {
        (order_status(&server, order_a.clone()).await == "expired").then_some(())
    })
    .await;
    eventually("A's charge to be refunded", || async {
        sim.charge(&order_a).await.filter(|c| c["refunded"] == true)
    })
    .await;
    let charge_c = sim.charge(&order_c).await.expect("C charged");
    assert_eq!(charge_c["refunded"], false, "{charge_c}");
    assert_eq!(order_status(&server, order_c.clone()).await, "paid");
    let stats = sim.stats().await;
    assert_eq!(stats["charges"], 3, "{stats}");
    assert_eq!(stats["refunds"], 2, "{stats}");
    assert_books(&server.audit(&sale).await);
    server.kill9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_keeps_no_money_for_unpaid_orders() {
    kill9_keeps_no_money_for_unpaid_orders_on(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_keeps_no_money_for_unpaid_orders_on_postgres() {
    kill9_keeps_no_money_for_unpaid_orders_on(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_keeps_no_money_for_unpaid_orders_on_mysql() {
    kill9_keeps_no_money_for_unpaid_orders_on(Backend::MySql).await;
}
