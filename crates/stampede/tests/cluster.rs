//! Three `stampede serve` processes on loopback share one PostgreSQL (and again one
//! MariaDB) database as a cluster, each selling stock it leased. One is SIGKILLed in the
//! middle of the stampede. Nothing may be oversold, every acknowledged order must be
//! there, the dead node's lease must come back to the survivors, and the sale must sell
//! out exactly. And two nodes with `--nats-url` feed the order-event stream once, one
//! publishing at a time, the survivor taking over when the publisher is killed.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::child::{Server, shopper};
use common::*;
use serde_json::{Value, json};
use stampede_store::on_server_backends;
use stampede_store::testing::{Backend, TestDatabase};

const UNITS: u64 = 300;
const SHOPPERS: usize = 600;
const NODES: usize = 3;
/// Node 1 is killed when it has acknowledged this many purchases: early enough that it
/// still holds most of a lease.
const KILL_AFTER_ACKS: usize = 5;

fn held(audit: &Value) -> u64 {
    audit["pending_payment"].as_u64().expect("pending") + audit["paid"].as_u64().expect("paid")
}

async fn three_nodes_one_killed_sell_out_exactly(backend: Backend) {
    raise_fd_limit();
    let database = TestDatabase::create(backend).await;
    let url = database.url.clone().expect("a server database has a URL");
    let args = [
        "--database-url",
        url.as_str(),
        "--cluster",
        "--node-ttl",
        "2s",
        "--lease-idle",
        "500ms",
    ];
    let dirs: Vec<tempfile::TempDir> = (0..NODES)
        .map(|_| tempfile::tempdir().expect("data directory"))
        .collect();
    let mut nodes = Vec::new();
    for dir in &dirs {
        nodes.push(Server::start(dir.path(), &args).await);
    }

    let sale = nodes[0].live_sale("CLUSTER-1", UNITS as usize).await;
    for node in &nodes[1..] {
        eventually("the other nodes learn of the sale", || async {
            let view = send(
                node.client
                    .get(node.url(&format!("/v1/flash-sales/{sale}"))),
            )
            .await;
            (view.status == 200).then_some(())
        })
        .await;
    }

    // The stampede, spread over the three nodes. The task that reads node 1's fifth 201
    // sends it SIGKILL at once.
    let victim = nodes[1].pid();
    let victim_acks = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(SHOPPERS));
    let tasks: Vec<_> = (0..SHOPPERS)
        .map(|i| {
            let node = i % NODES;
            let client = nodes[node].client.clone();
            let url = nodes[node].url(&format!("/v1/flash-sales/{sale}/purchase"));
            let (barrier, victim_acks) = (barrier.clone(), victim_acks.clone());
            tokio::spawn(async move {
                let token = shopper(&format!("shopper-{i:04}"));
                barrier.wait().await;
                let sent = client
                    .post(&url)
                    .bearer_auth(&token)
                    .header("idempotency-key", format!("key-{i}"))
                    .json(&json!({"quantity": 1}))
                    .send()
                    .await;
                let Ok(response) = sent else {
                    return None;
                };
                let status = response.status().as_u16();
                let Ok(text) = response.text().await else {
                    return None;
                };
                let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
                if status == 201
                    && node == 1
                    && victim_acks.fetch_add(1, Ordering::SeqCst) + 1 == KILL_AFTER_ACKS
                {
                    unsafe { libc::kill(victim, libc::SIGKILL) };
                }
                Some((status, body))
            })
        })
        .collect();
    let mut acked: Vec<Value> = Vec::new();
    let mut lost = 0;
    for task in futures::future::join_all(tasks).await {
        match task.expect("task") {
            Some((201, body)) => acked.push(body),
            Some((status, body)) => {
                // Before the kill a node refuses only what is sold out (or, for a moment
                // after its lease ran dry, overloaded while it leases more).
                let code = body["error"]["code"].as_str().unwrap_or("?").to_owned();
                assert!(
                    (status, code.as_str()) == (409, "sold_out")
                        || (status, code.as_str()) == (503, "overloaded"),
                    "unexpected refusal {status} {body}"
                );
            }
            None => lost += 1,
        }
    }
    assert!(
        victim_acks.load(Ordering::SeqCst) >= KILL_AFTER_ACKS,
        "node 1 was killed mid-load"
    );
    let victim = nodes.remove(1);
    victim.kill9().await;
    println!(
        "{} acknowledged, {lost} lost with the killed node",
        acked.len()
    );

    // The survivors go on selling to fresh shoppers until the database holds no unsold
    // unit: that needs the dead node's lease, reclaimed once its heartbeat is 2 s old.
    let mut fresh_acked: Vec<Value> = Vec::new();
    let mut next = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let audit = nodes[0].audit(&sale).await;
        assert_books(&audit);
        if audit["remaining"] == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sale never sold out: {audit}"
        );
        let round: Vec<_> = (0..60)
            .map(|_| {
                next += 1;
                let node = &nodes[next % 2];
                let sale = &sale;
                let (token, key) = (
                    shopper(&format!("fresh-{next:05}")),
                    format!("fresh-{next}"),
                );
                async move { node.purchase(&token, sale, &key).await }
            })
            .collect();
        for reply in futures::future::join_all(round).await {
            match (reply.status, reply.body["error"]["code"].as_str()) {
                (201, _) => fresh_acked.push(reply.body),
                (409, Some("sold_out")) | (503, Some("overloaded")) => {}
                other => panic!("purchase on a survivor: {other:?} {}", reply.body),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every acknowledged order is durable, once; the books agree; exactly UNITS are held.
    let mut ids = HashSet::new();
    for body in acked.iter().chain(&fresh_acked) {
        let id = body["order_id"].as_str().expect("order id");
        assert!(ids.insert(id.to_owned()), "order {id} acknowledged twice");
        let reply = nodes[0].admin_get(&format!("/v1/orders/{id}")).await;
        assert_eq!(reply.status, 200, "acknowledged order {id} is gone");
        assert_eq!(reply.body["status"], "pending_payment");
    }
    let audit = nodes[1].audit(&sale).await;
    assert_books(&audit);
    assert_eq!(
        held(&audit),
        UNITS,
        "sold out exactly, nothing oversold: {audit}"
    );
    assert_eq!(audit["users_over_limit"], 0, "{audit}");
    assert!(
        ids.len() as u64 <= UNITS,
        "{} orders acknowledged for {UNITS} units",
        ids.len()
    );
    // The killed node was declared dead by a survivor, which took its lease back. When
    // the first burst sold the sale out, nothing above waited for that (it comes once
    // the dead node's heartbeat is 2 s old), so wait for it here.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let reclaimed = loop {
        let mut reclaimed = 0.0;
        for node in &nodes {
            let metrics = node
                .client
                .get(node.url("/metrics"))
                .send()
                .await
                .expect("metrics");
            let text = metrics.text().await.expect("metrics text");
            reclaimed += text
                .lines()
                .filter(|line| line.starts_with("stampede_nodes_reclaimed_total"))
                .filter_map(|line| line.split_whitespace().last()?.parse::<f64>().ok())
                .sum::<f64>();
        }
        if reclaimed >= 1.0 || tokio::time::Instant::now() >= deadline {
            break reclaimed;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(reclaimed, 1.0, "exactly one node was declared dead");
    println!(
        "{} acknowledged before the kill, {} after; {} units held",
        acked.len(),
        fresh_acked.len(),
        held(&audit)
    );
    for node in nodes {
        node.kill9().await;
    }
}

/// A guard rules change made through one node reaches the other, and a change sent to a
/// node that has not taken up another node's yet does not overwrite it: before, each
/// node saved its own version over the stored copy, so one switch's change was lost
/// (the stored rules went back a version), and the other node never heard of either.
async fn a_rules_change_on_one_node_reaches_the_other_and_overwrites_none(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let url = database.url.clone().expect("a server database has a URL");
    let args = ["--database-url", url.as_str(), "--cluster"];
    let dirs: Vec<tempfile::TempDir> = (0..2)
        .map(|_| tempfile::tempdir().expect("data directory"))
        .collect();
    let mut nodes = Vec::new();
    for dir in &dirs {
        nodes.push(Server::start(dir.path(), &args).await);
    }
    let version = nodes[0].admin_get("/v1/guard/rules").await.body["version"]
        .as_u64()
        .unwrap();
    let degrade = |class: &'static str| json!({"class": class, "off": true});
    let reply = nodes[0]
        .admin_post("/v1/guard/degrade", &degrade("stats"))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    // Sent to the other node at once: either it took up the first change already, or it
    // does now and refuses this one, which was sent against the older rules.
    let mut reply = nodes[1]
        .admin_post("/v1/guard/degrade", &degrade("browse"))
        .await;
    if reply.status == 409 {
        assert_eq!(
            reply.body["error"]["code"], "version_conflict",
            "{}",
            reply.body
        );
        reply = nodes[1]
            .admin_post("/v1/guard/degrade", &degrade("browse"))
            .await;
    }
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body["version"], version + 2, "{}", reply.body);
    // Both changes are in force on both nodes.
    for node in &nodes {
        eventually("each node runs both changes", || async {
            let rules = node.admin_get("/v1/guard/rules").await.body;
            let degraded = rules["degraded"].as_array().cloned().unwrap_or_default();
            (rules["version"] == version + 2
                && degraded.contains(&json!("stats"))
                && degraded.contains(&json!("browse")))
            .then_some(())
        })
        .await;
    }
    for node in nodes {
        node.kill9().await;
    }
}

on_server_backends!(
    three_nodes_one_killed_sell_out_exactly,
    two_nodes_feed_the_stream_once_and_the_survivor_takes_over,
    a_rules_change_on_one_node_reaches_the_other_and_overwrites_none,
);

/// A counter or gauge from `node`'s `/metrics` (0 when absent).
async fn metric(node: &Server, name: &str) -> f64 {
    let text = node
        .client
        .get(node.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// How many messages `stream` holds (0 before it exists).
async fn messages_in(jetstream: &async_nats::jetstream::Context, stream: &str) -> u64 {
    match jetstream.get_stream(stream).await {
        Ok(mut stream) => stream.info().await.expect("stream info").state.messages,
        Err(_) => 0,
    }
}

/// Two cluster nodes, both publishing order events: only the older one's relay
/// publishes (the nodes' published counters add up to the events, not twice that);
/// when it is killed, the survivor takes the turn within `node_ttl` + 1 s and the
/// orders it sells after reach the stream too.
async fn two_nodes_feed_the_stream_once_and_the_survivor_takes_over(backend: Backend) {
    let nats_url =
        std::env::var("STAMPEDE_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let tag = format!("C{}_{}", std::process::id(), backend.name());
    let (stream, prefix) = (format!("STAMPEDE_{tag}"), format!("stampede_{tag}.orders"));
    let database = TestDatabase::create(backend).await;
    let url = database.url.clone().expect("a server database has a URL");
    let args = [
        "--database-url",
        url.as_str(),
        "--cluster",
        "--node-ttl",
        "2s",
        "--nats-url",
        nats_url.as_str(),
        "--nats-stream",
        stream.as_str(),
        "--nats-subject-prefix",
        prefix.as_str(),
    ];
    let dirs: Vec<tempfile::TempDir> = (0..2)
        .map(|_| tempfile::tempdir().expect("data directory"))
        .collect();
    let older = Server::start(dirs[0].path(), &args).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let younger = Server::start(dirs[1].path(), &args).await;
    eventually("the older node's relay to publish", || async {
        (metric(&older, "stampede_relay_publishing").await == 1.0).then_some(())
    })
    .await;
    assert_eq!(metric(&younger, "stampede_relay_publishing").await, 0.0);

    let sale = older.live_sale("CLUSTER-EV", 20).await;
    eventually("the younger node to learn of the sale", || async {
        let view = send(
            younger
                .client
                .get(younger.url(&format!("/v1/flash-sales/{sale}"))),
        )
        .await;
        (view.status == 200).then_some(())
    })
    .await;
    for i in 0..8 {
        let node = if i % 2 == 0 { &older } else { &younger };
        let reply = node
            .purchase_decided(&shopper(&format!("ev-{i}")), &sale, "k")
            .await;
        assert_eq!(reply.status, 201, "{}", reply.body);
    }
    let client = async_nats::connect(&nats_url)
        .await
        .unwrap_or_else(|e| panic!("NATS does not answer at {nats_url} ({e})"));
    let jetstream = async_nats::jetstream::new(client);
    eventually("8 created events on the stream", || async {
        (messages_in(&jetstream, &stream).await == 8).then_some(())
    })
    .await;
    // Give a second publisher time to show itself.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let published = metric(&older, "stampede_relay_published_total").await
        + metric(&younger, "stampede_relay_published_total").await;
    assert_eq!(published, 8.0, "each event published by one node only");

    older.kill9().await;
    for i in 8..10 {
        let reply = younger
            .purchase_decided(&shopper(&format!("ev-{i}")), &sale, "k")
            .await;
        assert_eq!(reply.status, 201, "{}", reply.body);
    }
    eventually(
        "the survivor to publish the events sold after the kill",
        || async { (messages_in(&jetstream, &stream).await == 10).then_some(()) },
    )
    .await;
    assert_eq!(metric(&younger, "stampede_relay_publishing").await, 1.0);
    let _ = jetstream.delete_stream(&stream).await;
    younger.kill9().await;
}
