//! Several nodes writing one server database (`cluster = true`): each sells stock it
//! leased from the sale, a sale sells out exactly between them, a node that stops
//! heartbeating has its lease reclaimed (and its pending orders expired by a survivor),
//! and a node declared dead can never commit again.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use stampede_engine::testing::{RecordingProvider, key, live_sale, one, sale_ending_in, user};
use stampede_engine::{
    Actor, AdminError, Engine, EngineConfig, ManualClock, NewProduct, NewSale, OrderError,
    OrderRecord, PurchaseError, Store, StoreError, SystemClock, WriteOp,
};
use stampede_store::on_server_backends;
use stampede_store::testing::{
    Backend, Call, Intercepted, Interceptor, Link, LinkMode, TestDatabase,
};
use stampede_types::{OrderId, OrderStatus, SaleId};

const NODE_TTL: Duration = Duration::from_millis(1_500);

fn cluster_options() -> stampede_store::StoreOptions {
    stampede_store::StoreOptions {
        cluster_node_ttl: Some(NODE_TTL),
        ..Default::default()
    }
}

async fn join(database: &TestDatabase) -> (Arc<dyn Store>, Engine) {
    join_with(database, 15 * 60 * 1_000, 300).await
}

async fn join_with(
    database: &TestDatabase,
    payment_window_ms: i64,
    lease_idle_ms: i64,
) -> (Arc<dyn Store>, Engine) {
    let store = database
        .open_with(std::path::Path::new("."), &cluster_options())
        .await;
    assert!(store.node().is_some(), "the store joined as a cluster node");
    let config = EngineConfig {
        cluster_tick_ms: 100,
        lease_idle_ms,
        payment_window_ms,
        expiry_grace_ms: 0,
        expiry_tick_ms: 100,
        charge_sweep_ms: 200,
        ..EngineConfig::default()
    };
    let engine = Engine::open(store.clone(), Arc::new(SystemClock), config)
        .await
        .unwrap();
    (store, engine)
}

/// Waits until `engine` has learnt of `sale` (created on another node).
async fn learns_of(engine: &Engine, sale: SaleId) {
    for _ in 0..100 {
        if engine.sale(sale).is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the node never learnt of sale {sale}");
}

async fn three_nodes_sell_a_sale_out_exactly(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(Arc::new(join(&database).await.1));
    }
    const QUANTITY: u64 = 150;
    let sale = live_sale(&nodes[0], "P", QUANTITY, QUANTITY, 50, 1).await;
    for node in &nodes[1..] {
        learns_of(node, sale).await;
    }

    // Rounds of buyers spread over the nodes until the database holds no unsold unit:
    // the tail of the stock may sit in one node's lease until it goes idle and returns.
    let mut placed: HashSet<OrderId> = HashSet::new();
    let mut next_user = 0;
    for _round in 0..40 {
        let mut buyers = Vec::new();
        for _ in 0..120 {
            next_user += 1;
            let node = nodes[next_user % 3].clone();
            let name = format!("u{next_user}");
            buyers.push(tokio::spawn(async move {
                node.purchase(user(&name), key(&name), sale, one()).await
            }));
        }
        for buyer in buyers {
            match buyer.await.unwrap() {
                Ok(purchase) => assert!(placed.insert(purchase.placed.order_id)),
                Err(PurchaseError::SoldOut { .. }) => {}
                Err(other) => panic!("unexpected refusal: {other:?}"),
            }
        }
        let audit = nodes[0].audit(sale).await.unwrap().unwrap();
        assert!(audit.consistent, "{audit:?}");
        if audit.remaining == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(placed.len() as u64, QUANTITY, "the sale sold out exactly");
    let audit = nodes[2].audit(sale).await.unwrap().unwrap();
    assert!(audit.consistent, "{audit:?}");
    assert_eq!(audit.tally.pending_payment, QUANTITY);
    assert_eq!(audit.remaining, 0);
    assert_eq!(audit.tally.users_over_limit, 0);
    for node in &nodes {
        node.shutdown().await;
    }
}

async fn a_dead_nodes_lease_is_reclaimed_and_it_can_never_commit_again(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    // A's orders wait 1.5 s for payment; B's a quarter of an hour.
    let (store_a, a) = join_with(&database, 1_500, 300).await;
    let (_store_b, b) = join(&database).await;
    const QUANTITY: u64 = 100;
    let sale = live_sale(&a, "P", QUANTITY, QUANTITY, 50, 1).await;
    let first = a
        .purchase(user("first"), key("k"), sale, one())
        .await
        .unwrap();
    // A dies with a lease and a pending order; it stops heartbeating.
    a.crash().await;
    learns_of(&b, sale).await;

    // B sells everything else: what it leased, then A's reclaimed lease, then the unit
    // of A's order once a survivor expires it.
    let mut sold = 0;
    let mut n = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while sold < QUANTITY && tokio::time::Instant::now() < deadline {
        n += 1;
        let name = format!("b{n}");
        match b.purchase(user(&name), key(&name), sale, one()).await {
            Ok(_) => sold += 1,
            Err(PurchaseError::SoldOut { .. }) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(other) => panic!("unexpected refusal: {other:?}"),
        }
    }
    assert_eq!(sold, QUANTITY, "B sold A's lease and the expired unit too");
    let expired = b.order(&Actor::Admin, first.placed.order_id).await.unwrap();
    assert_eq!(expired.status, OrderStatus::Expired);
    let audit = b.audit(sale).await.unwrap().unwrap();
    assert!(audit.consistent, "{audit:?}");
    assert_eq!(
        (audit.remaining, audit.tally.pending_payment),
        (0, QUANTITY)
    );

    // A, declared dead, cannot heartbeat, lease or insert an order.
    assert!(matches!(
        store_a.heartbeat().await,
        Err(StoreError::Fenced(_))
    ));
    assert!(matches!(
        store_a.lease(sale, 1, 10).await,
        Err(StoreError::Fenced(_))
    ));
    let now = a.now_ms();
    let late = OrderRecord {
        id: OrderId::new(),
        user_id: user("late"),
        sale_id: sale,
        sku: expired.sku.clone(),
        quantity: one(),
        amount: expired.amount,
        status: OrderStatus::PendingPayment,
        idempotency_key: key("late"),
        created_at_ms: now,
        expires_at_ms: now + 60_000,
        updated_at_ms: now,
    };
    let refused = store_a.commit(&[WriteOp::InsertOrder(late)]).await;
    assert!(matches!(refused, Err(StoreError::Fenced(_))), "{refused:?}");
    let audit = b.audit(sale).await.unwrap().unwrap();
    assert_eq!(audit.tally.pending_payment, QUANTITY, "nothing oversold");
    b.shutdown().await;
}

async fn a_cancelled_order_returns_its_unit_to_the_cancelling_nodes_lease(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let (_, a) = join(&database).await;
    let (_, b) = join(&database).await;
    let sale = live_sale(&a, "P", 3, 3, 50, 3).await;
    learns_of(&b, sale).await;
    let order = a.purchase(user("x"), key("k"), sale, one()).await.unwrap();
    b.cancel(&Actor::Admin, order.placed.order_id)
        .await
        .unwrap();
    let audit = a.audit(sale).await.unwrap().unwrap();
    assert!(audit.consistent, "{audit:?}");
    assert_eq!((audit.remaining, audit.tally.cancelled), (3, 1));
    a.shutdown().await;
    b.shutdown().await;
}

/// Two nodes, a sale, and an order placed on node `a` whose pay through `a` timed out
/// after the provider charged it.
struct ChargedThroughA {
    a: Arc<Engine>,
    b: Engine,
    provider: Arc<RecordingProvider>,
    id: OrderId,
}

async fn a_pay_through_a_that_timed_out(database: &TestDatabase) -> ChargedThroughA {
    let (_, a) = join(database).await;
    let (_, b) = join(database).await;
    let provider = Arc::new(RecordingProvider::default());
    let sale = live_sale(&a, "P", 3, 3, 50, 3).await;
    learns_of(&b, sale).await;
    let order = a.purchase(user("x"), key("k"), sale, one()).await.unwrap();
    let id = order.placed.order_id;
    let a = Arc::new(a);
    provider
        .time_out
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        a.pay(&user("x"), id, provider.clone()).await,
        Err(OrderError::PaymentTimeout)
    );
    provider
        .time_out
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(provider.keeps(&id.to_string()), "the provider charged");
    ChargedThroughA { a, b, provider, id }
}

/// Waits up to 5 s for the provider to no longer keep the order's charge.
async fn refunded(provider: &RecordingProvider, id: OrderId) -> bool {
    for _ in 0..100 {
        if !provider.keeps(&id.to_string()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A pay on one node times out after the provider charged; a load balancer sends the
/// shopper's cancel to another node. The closing node finds the charge in the ledger (in
/// the transaction that closed the order) and refunds it; a pay that comes after the
/// close charges nothing.
async fn a_charge_made_through_one_node_is_refunded_by_the_node_that_closes_the_order(
    backend: Backend,
) {
    let database = TestDatabase::create(backend).await;
    let ChargedThroughA { a, b, provider, id } = a_pay_through_a_that_timed_out(&database).await;
    b.use_payments(provider.clone());
    b.cancel(&Actor::Shopper(user("x")), id).await.unwrap();
    assert!(
        refunded(&provider, id).await,
        "the node that closed the order refunded the charge made through the other"
    );
    assert_eq!(
        a.pay(&user("x"), id, provider.clone()).await,
        Err(OrderError::Cancelled)
    );
    assert_eq!(
        provider.charged.lock().len(),
        1,
        "nothing charged after the close"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// The node that closes an order cannot refund it (it has never talked to the provider,
/// or its refund failed): the ledger's sweep on another node makes the refund.
async fn a_refund_the_closing_node_cannot_make_is_made_by_the_sweep(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let ChargedThroughA { a, b, provider, id } = a_pay_through_a_that_timed_out(&database).await;
    // b knows no provider: its close owes the refund and cannot make it.
    b.cancel(&Actor::Shopper(user("x")), id).await.unwrap();
    assert!(
        refunded(&provider, id).await,
        "the sweep on the node that knows the provider refunded the charge"
    );
    a.shutdown().await;
    b.shutdown().await;
}

async fn idempotency_keys_and_per_user_limits_hold_across_nodes(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let (_, a) = join(&database).await;
    let (_, b) = join(&database).await;
    let sale = live_sale(&a, "P", 10, 10, 50, 2).await;
    learns_of(&b, sale).await;

    let first = a.purchase(user("x"), key("k1"), sale, one()).await.unwrap();
    assert!(!first.replay);
    // The retry reaches the other node, which has never seen the key: the database has.
    let retry = b.purchase(user("x"), key("k1"), sale, one()).await.unwrap();
    assert!(retry.replay, "a retry on another node is a replay");
    assert_eq!(retry.placed.order_id, first.placed.order_id);
    // And from then on B answers it from memory.
    let again = b.purchase(user("x"), key("k1"), sale, one()).await.unwrap();
    assert_eq!(again.placed.order_id, first.placed.order_id);

    b.purchase(user("x"), key("k2"), sale, one()).await.unwrap();
    // A knows of one unit of x's; the database knows of two, the limit.
    let over = a.purchase(user("x"), key("k3"), sale, one()).await;
    assert_eq!(
        over.unwrap_err(),
        PurchaseError::LimitExceeded { limit: 2, held: 2 }
    );
    // Others buying in the same batches are not disturbed.
    let mut buyers = Vec::new();
    let a = Arc::new(a);
    for n in 0..6 {
        let a = a.clone();
        buyers.push(tokio::spawn(async move {
            a.purchase(user(&format!("y{n}")), key("k"), sale, one())
                .await
        }));
    }
    for buyer in buyers {
        buyer.await.unwrap().unwrap();
    }
    let audit = b.audit(sale).await.unwrap().unwrap();
    assert!(audit.consistent, "{audit:?}");
    assert_eq!(
        (audit.tally.pending_payment, audit.tally.users_over_limit),
        (8, 0)
    );
    // Either node lists all of x's orders, wherever they were placed.
    for node in [&*a, &b] {
        let listed = node.orders_of(&user("x"), 10).await.unwrap();
        assert_eq!(listed.len(), 2, "{listed:?}");
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// Leases that take a while to be granted.
struct SlowLeases;

#[async_trait::async_trait]
impl Interceptor for SlowLeases {
    async fn before(&self, call: Call<'_>) -> Result<(), StoreError> {
        if matches!(call, Call::Lease) {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok(())
    }
}

async fn a_buyer_who_hangs_up_while_waiting_for_a_lease_frees_its_key(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let store = database
        .open_with(std::path::Path::new("."), &cluster_options())
        .await;
    let engine = Engine::open(
        Arc::new(Intercepted {
            inner: store,
            hooks: SlowLeases,
        }),
        Arc::new(SystemClock),
        EngineConfig {
            cluster_tick_ms: 100,
            ..EngineConfig::default()
        },
    )
    .await
    .unwrap();
    let sale = live_sale(&engine, "P", 10, 10, 50, 1).await;
    // The buyer hangs up while its node waits for the first lease.
    let hung_up = tokio::time::timeout(
        Duration::from_millis(100),
        engine.purchase(user("x"), key("k"), sale, one()),
    )
    .await;
    assert!(
        hung_up.is_err(),
        "the purchase was still waiting for a lease"
    );
    // Its retry is answered (not left waiting for the abandoned attempt).
    let retry = tokio::time::timeout(
        Duration::from_secs(5),
        engine.purchase(user("x"), key("k"), sale, one()),
    )
    .await
    .expect("the retry is answered");
    assert!(
        !retry.unwrap().replay,
        "the abandoned attempt placed nothing"
    );
    let audit = engine.audit(sale).await.unwrap().unwrap();
    assert!(audit.consistent, "{audit:?}");
    assert_eq!(audit.tally.pending_payment, 1);
    engine.shutdown().await;
}

/// Buys one unit at a time on `node` until it answers sold out for a second; answers
/// how many it bought.
async fn buy_until_sold_out(node: &Engine, sale: SaleId, prefix: &str) -> u64 {
    let mut bought = 0;
    let mut sold_out_since = None;
    for n in 0.. {
        let name = format!("{prefix}{n}");
        match node.purchase(user(&name), key(&name), sale, one()).await {
            Ok(_) => {
                bought += 1;
                sold_out_since = None;
            }
            Err(PurchaseError::SoldOut { .. }) => {
                let since = *sold_out_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() > Duration::from_secs(1) {
                    return bought;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(other) => panic!("unexpected refusal: {other:?}"),
        }
    }
    unreachable!()
}

async fn a_node_returns_what_it_does_not_use(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    // A's leases go back when idle for 300 ms; C's only when it leaves.
    let (_, a) = join_with(&database, 15 * 60 * 1_000, 300).await;
    let (_, b) = join(&database).await;
    let (_, c) = join_with(&database, 15 * 60 * 1_000, 3_600_000).await;
    let sale = live_sale(&a, "P", 60, 60, 50, 1).await;
    learns_of(&b, sale).await;
    learns_of(&c, sale).await;
    // A and C each take a lease of several units and sell one.
    a.purchase(user("a"), key("k"), sale, one()).await.unwrap();
    c.purchase(user("c"), key("k"), sale, one()).await.unwrap();
    // B sells all but C's lease: A's idle lease came back while A stays alive.
    let before_leave = buy_until_sold_out(&b, sale, "b").await;
    let audit = b.audit(sale).await.unwrap().unwrap();
    assert!(audit.consistent, "{audit:?}");
    let held_by_c = audit.remaining;
    assert!(held_by_c > 0, "C still holds its unused lease: {audit:?}");
    assert_eq!(before_leave + 2 + held_by_c, 60);
    // C leaves cleanly: its lease goes back at once and B sells it.
    c.shutdown().await;
    let after_leave = buy_until_sold_out(&b, sale, "b2-").await;
    assert_eq!(after_leave, held_by_c, "C's lease came back when it left");
    let audit = a.audit(sale).await.unwrap().unwrap();
    assert!(audit.consistent, "{audit:?}");
    assert_eq!((audit.remaining, audit.tally.pending_payment), (0, 60));
    a.shutdown().await;
    b.shutdown().await;
}

async fn a_single_owner_and_a_cluster_never_share_a_database(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let url = database.url.as_deref();
    let here = std::path::Path::new(".");
    let (_, member) = join(&database).await;
    let owner = stampede_store::open(
        url,
        here,
        &stampede_store::StoreOptions {
            owner_wait: Duration::from_millis(200),
            ..Default::default()
        },
    )
    .await;
    let refusal = owner.err().expect("a single owner is refused").to_string();
    assert!(refusal.contains("cluster"), "{refusal}");
    member.shutdown().await;
    drop(member);

    let owner = database.open(here).await;
    let joining = stampede_store::open(url, here, &cluster_options()).await;
    let refusal = joining
        .err()
        .expect("a cluster node is refused")
        .to_string();
    assert!(refusal.contains("single-owner"), "{refusal}");
    drop(owner);
}

/// A single owner whose connection dropped (and its lock with it) while a cluster node
/// joined is fenced when it reconnects: it halts, and never sells beside the cluster
/// from its stale memory. Before, its reconnect took the free lock, found the epoch
/// unchanged, and went on committing: two writers selling the same units.
async fn an_owner_whose_connection_dropped_while_a_cluster_joined_is_fenced(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let owner = Engine::open(
        database.open(std::path::Path::new(".")).await,
        Arc::new(SystemClock),
        EngineConfig::default(),
    )
    .await
    .unwrap();
    let sale = live_sale(&owner, "P", 10, 5, 50, 5).await;
    owner
        .purchase(user("a"), key("k1"), sale, one())
        .await
        .unwrap();
    database.kill_owner_connection().await;
    let (_, member) = join(&database).await;
    assert_eq!(
        owner.purchase(user("b"), key("k2"), sale, one()).await,
        Err(PurchaseError::Unavailable)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !owner.halted() {
        assert!(
            std::time::Instant::now() < deadline,
            "the owner never learned a cluster had joined"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The cluster sells what the owner sold before it left, and nothing of it twice.
    let audit = member.audit(sale).await.unwrap().unwrap();
    assert!(audit.consistent, "{audit:?}");
    assert_eq!(audit.tally.pending_payment, 1, "{audit:?}");
    member.shutdown().await;
}

/// A cluster leaves a unique index on the orders' keys behind. A single owner after it
/// lets a retired key be used again for a purchase in another sale (as on a database no
/// cluster ever used): that purchase must land, not fail the batch it is in. A cluster
/// after such a reuse is refused with a reason, not half-started.
async fn a_single_owner_after_a_cluster_takes_a_retired_key_in_another_sale(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let here = std::path::Path::new(".");
    let (_, member) = join(&database).await;
    member.shutdown().await;
    drop(member);

    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let config = EngineConfig {
        payment_window_ms: 60_000,
        expiry_grace_ms: 5_000,
        ..EngineConfig::default()
    };
    let engine = Engine::open(database.open(here).await, clock.clone(), config)
        .await
        .unwrap();
    // A cluster node started by mistake beside the owner is refused, and leaves no
    // unique index behind to fail the owner's batch below (before, it built the index
    // first and was refused after).
    let mistaken = stampede_store::open(database.url.as_deref(), here, &cluster_options()).await;
    let refusal = mistaken
        .err()
        .expect("refused beside the owner")
        .to_string();
    assert!(refusal.contains("single-owner"), "{refusal}");
    let short = sale_ending_in(&engine, "SHORT", 10, 1, 10_000).await;
    let first = engine
        .purchase(user("a"), key("k"), short, one())
        .await
        .unwrap();
    // Ended and past its payment window: its answers leave memory.
    clock.advance_ms(10_000 + 60_000 + 5_000 + 1);
    let long = live_sale(&engine, "LONG", 10, 10, 50, 1).await;
    for _ in 0..100 {
        if engine.idempotency_answers() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(engine.idempotency_answers(), 0, "the answer never retired");
    let second = engine
        .purchase(user("a"), key("k"), long, one())
        .await
        .expect("a retired key buys in another sale");
    assert!(!second.replay);
    assert_ne!(second.placed.order_id, first.placed.order_id);
    let audit = engine.audit(long).await.unwrap().unwrap();
    assert!(audit.consistent, "{audit:?}");
    assert_eq!(audit.tally.pending_payment, 1, "{audit:?}");
    engine.shutdown().await;
    drop(engine);

    let joining = stampede_store::open(database.url.as_deref(), here, &cluster_options()).await;
    let refusal = joining
        .err()
        .expect("a cluster is refused while a key names two orders")
        .to_string();
    assert!(refusal.contains("idempotency key"), "{refusal}");
}

on_server_backends!(
    three_nodes_sell_a_sale_out_exactly,
    a_dead_nodes_lease_is_reclaimed_and_it_can_never_commit_again,
    a_cancelled_order_returns_its_unit_to_the_cancelling_nodes_lease,
    a_charge_made_through_one_node_is_refunded_by_the_node_that_closes_the_order,
    a_refund_the_closing_node_cannot_make_is_made_by_the_sweep,
    idempotency_keys_and_per_user_limits_hold_across_nodes,
    a_buyer_who_hangs_up_while_waiting_for_a_lease_frees_its_key,
    a_node_returns_what_it_does_not_use,
    a_single_owner_and_a_cluster_never_share_a_database,
    an_owner_whose_connection_dropped_while_a_cluster_joined_is_fenced,
    a_single_owner_after_a_cluster_takes_a_retired_key_in_another_sale,
    a_commit_still_on_its_way_when_its_answer_is_lost_is_not_called_failed,
    a_node_that_leaves_cleanly_hands_its_pending_orders_to_the_survivors,
    a_survivor_that_fails_to_read_the_pending_orders_reads_them_again,
    a_product_or_sale_another_node_made_first_is_a_conflict_not_a_failure,
    a_retry_on_another_node_of_a_sold_out_or_ended_sale_gets_its_order,
    one_node_at_a_time_publishes_the_outbox_and_the_turn_passes_on,
);

/// Every node may run the outbox relay, but only the oldest live member whose relay is
/// ready publishes (one copy of each event on the stream, not one per node). A node
/// whose relay is not ready (no NATS, failing rounds) never holds the turn, and loses it
/// once its last claim lapses; when the publisher leaves, the next oldest takes over,
/// and a node that joins later stands by.
async fn one_node_at_a_time_publishes_the_outbox_and_the_turn_passes_on(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let (a_store, a) = join(&database).await;
    // Joined in a later millisecond than A.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (b_store, b) = join(&database).await;
    assert!(
        !a_store.relay_turn(false).await.unwrap(),
        "A's relay is not ready"
    );
    assert!(
        b_store.relay_turn(true).await.unwrap(),
        "the oldest member with a ready relay publishes, however old the others"
    );
    assert!(
        a_store.relay_turn(true).await.unwrap(),
        "ready, A is the oldest"
    );
    assert!(
        !b_store.relay_turn(true).await.unwrap(),
        "a younger one stands by"
    );

    // A's relay stops being ready (say NATS went away): once its claim lapses, B.
    assert!(!a_store.relay_turn(false).await.unwrap());
    tokio::time::sleep(NODE_TTL + Duration::from_millis(300)).await;
    assert!(b_store.relay_turn(true).await.unwrap(), "A's claim lapsed");
    assert!(
        a_store.relay_turn(true).await.unwrap(),
        "ready again, A is the oldest"
    );

    a.shutdown().await;
    drop(a);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (c_store, c) = join(&database).await;
    assert!(
        !a_store.relay_turn(true).await.unwrap(),
        "a node that left publishes no more"
    );
    assert!(
        b_store.relay_turn(true).await.unwrap(),
        "the next oldest took over"
    );
    assert!(
        !c_store.relay_turn(true).await.unwrap(),
        "a newcomer stands by"
    );
    b.shutdown().await;
    c.shutdown().await;
}

/// A batch's `COMMIT` is held up on its way to the database while the node's connection
/// breaks, so the node asks over a new connection whether the batch landed before it
/// has. It must wait for the answer rather than read the old stamp, call the batch
/// failed and give its stock back (the orders would then land unacknowledged, and the
/// node's memory would hold more stock than its lease).
async fn a_commit_still_on_its_way_when_its_answer_is_lost_is_not_called_failed(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let link = Link::in_front_of(&database).await;
    let store = stampede_store::open(
        Some(&link.url),
        std::path::Path::new("."),
        &cluster_options(),
    )
    .await
    .unwrap();
    let config = EngineConfig {
        cluster_tick_ms: 100,
        expiry_tick_ms: 100,
        ..EngineConfig::default()
    };
    let engine = Engine::open(store, Arc::new(SystemClock), config)
        .await
        .unwrap();
    let sale = live_sale(&engine, "P", 10, 10, 50, 5).await;

    // The first purchase on the writer's connection (the link knows an order batch by
    // its statement's text, which a connection sends only the first time).
    link.set(LinkMode::DelayNextOrderCommit {
        by: Duration::from_millis(1_500),
    });
    let answered = engine.purchase(user("a"), key("k1"), sale, one()).await;
    assert_eq!(
        link.commits_caught(),
        1,
        "the purchase's COMMIT was held up"
    );
    let placed = answered.expect("the batch landed: its purchase is answered 201");
    assert!(!placed.replay);
    let audit = engine.audit(sale).await.unwrap().unwrap();
    assert_eq!(audit.tally.pending_payment, 1, "{audit:?}");
    assert!(audit.consistent, "{audit:?}");
    // And the node sells on.
    engine
        .purchase(user("b"), key("k2"), sale, one())
        .await
        .unwrap();
    let audit = engine.audit(sale).await.unwrap().unwrap();
    assert_eq!(audit.tally.pending_payment, 2, "{audit:?}");
    assert!(audit.consistent, "{audit:?}");
    engine.shutdown().await;
}

/// Waits (at most 15 s) until `survivor` has expired the departed node's order `first`
/// and sold its one unit again; the sale's books then hold one order of each.
async fn expires_then_sells(survivor: &Engine, sale: SaleId, first: OrderId) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match survivor
            .purchase(user("second"), key("k2"), sale, one())
            .await
        {
            Ok(_) => break,
            Err(PurchaseError::SoldOut { .. }) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the departed node's order never expired"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(other) => panic!("unexpected refusal: {other:?}"),
        }
    }
    let expired = survivor.order(&Actor::Admin, first).await.unwrap();
    assert_eq!(expired.status, OrderStatus::Expired);
    let audit = survivor.audit(sale).await.unwrap().unwrap();
    assert!(audit.consistent, "{audit:?}");
    assert_eq!((audit.tally.pending_payment, audit.tally.expired), (1, 1));
}

/// A node that stops cleanly (a scale-in, a rolling update) hands its leases back at once,
/// and its unpaid orders still expire and return their stock: a survivor takes them
/// over as it would a dead node's.
async fn a_node_that_leaves_cleanly_hands_its_pending_orders_to_the_survivors(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    // A's orders wait 1 s for payment.
    let (_, a) = join_with(&database, 1_000, 300).await;
    let (_, b) = join(&database).await;
    let sale = live_sale(&a, "P", 1, 1, 50, 1).await;
    learns_of(&b, sale).await;
    let first = a
        .purchase(user("first"), key("k1"), sale, one())
        .await
        .unwrap();
    a.shutdown().await;
    drop(a);

    // Once A's order is past its window, B expires it and sells its unit.
    expires_then_sells(&b, sale, first.placed.order_id).await;
    b.shutdown().await;
}

/// Fails the first `failures` reads of the pending orders, as a reader connection lost
/// just after a reclaim committed would.
struct PendingReadsFail {
    failures: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl Interceptor for PendingReadsFail {
    async fn before(&self, call: Call<'_>) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering::Relaxed;
        if matches!(call, Call::PendingOrders)
            && self
                .failures
                .fetch_update(Relaxed, Relaxed, |left| left.checked_sub(1))
                .is_ok()
        {
            return Err(StoreError::Unavailable("reader connection lost".into()));
        }
        Ok(())
    }
}

/// The survivor removes the departed node (committed), then fails to read its pending
/// orders: it must read them again at a later tick, not leave them pending for good with
/// their units held.
async fn a_survivor_that_fails_to_read_the_pending_orders_reads_them_again(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let (_, a) = join_with(&database, 1_000, 300).await;
    let store = database
        .open_with(std::path::Path::new("."), &cluster_options())
        .await;
    let b = Engine::open(
        Arc::new(Intercepted {
            inner: store,
            hooks: PendingReadsFail { failures: 3.into() },
        }),
        Arc::new(SystemClock),
        EngineConfig {
            cluster_tick_ms: 100,
            lease_idle_ms: 300,
            payment_window_ms: 1_000,
            expiry_grace_ms: 0,
            expiry_tick_ms: 100,
            ..EngineConfig::default()
        },
    )
    .await
    .unwrap();
    let sale = live_sale(&a, "P", 1, 1, 50, 1).await;
    learns_of(&b, sale).await;
    let first = a
        .purchase(user("first"), key("k1"), sale, one())
        .await
        .unwrap();
    a.shutdown().await;
    drop(a);

    expires_then_sells(&b, sale, first.placed.order_id).await;
    b.shutdown().await;
}

/// Two nodes make the same product, or carve the same stock, before either has read the
/// other's catalogue: the second is told what happened (409 `sku_exists`,
/// `insufficient_stock`), not to retry a failure (503), and learns the real catalogue.
async fn a_product_or_sale_another_node_made_first_is_a_conflict_not_a_failure(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    // B reads the catalogue rarely (every 3 s): it has not seen A's product when it
    // makes its own. Nodes wait 10 s for a heartbeat here, so B is not declared dead.
    let node = |tick_ms: u64| {
        let database = &database;
        async move {
            let options = stampede_store::StoreOptions {
                cluster_node_ttl: Some(Duration::from_secs(10)),
                ..Default::default()
            };
            let store = database
                .open_with(std::path::Path::new("."), &options)
                .await;
            let config = EngineConfig {
                cluster_tick_ms: tick_ms,
                ..EngineConfig::default()
            };
            Engine::open(store, Arc::new(SystemClock), config)
                .await
                .unwrap()
        }
    };
    let a = node(100).await;
    let b = node(3_000).await;
    product(&a, "A's").await.unwrap();
    assert_eq!(product(&b, "B's").await, Err(AdminError::SkuExists));
    // Once B has read the catalogue, it knows A's product, not its own attempt.
    let mut learnt = None;
    for _ in 0..200 {
        learnt = b.product("DUP");
        if learnt.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(&*learnt.expect("B learnt the product").name, "A's");

    // Both carve all ten units: A first; B still believes ten are free.
    sale(&a).await.unwrap();
    assert!(matches!(
        sale(&b).await,
        Err(AdminError::InsufficientStock { .. })
    ));
    a.shutdown().await;
    b.shutdown().await;
}

/// Product `DUP` (10 units) made on `engine`.
async fn product(engine: &Engine, name: &str) -> Result<stampede_engine::ProductView, AdminError> {
    engine
        .create_product(NewProduct {
            sku: stampede_types::Sku::parse("DUP").unwrap(),
            name: Arc::from(name),
            price: stampede_types::Cents::parse("price_cents", 50).unwrap(),
            stock: 10,
        })
        .await
}

/// A sale of all ten units of `DUP`, made on `engine`.
async fn sale(engine: &Engine) -> Result<stampede_engine::SaleView, AdminError> {
    let now = engine.now_ms();
    engine
        .create_sale(NewSale {
            sku: stampede_types::Sku::parse("DUP").unwrap(),
            price: stampede_types::Cents::parse("price_cents", 50).unwrap(),
            quantity: 10,
            per_user_limit: 1,
            starts_at_ms: now,
            ends_at_ms: now + 3_600_000,
        })
        .await
}

/// The order went through on A but its answer was lost; the shopper's retry reaches B,
/// which never saw the key and has nothing to sell (the sale is sold out, later over).
/// B finds the order the key names in the database and answers it (200), rather than
/// telling the shopper it has no order.
async fn a_retry_on_another_node_of_a_sold_out_or_ended_sale_gets_its_order(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let (_, a) = join(&database).await;
    let (_, b) = join(&database).await;
    // Two units, selling for two seconds.
    a.create_product(NewProduct {
        sku: stampede_types::Sku::parse("ONE").unwrap(),
        name: Arc::from("one"),
        price: stampede_types::Cents::parse("price_cents", 50).unwrap(),
        stock: 2,
    })
    .await
    .unwrap();
    let now = a.now_ms();
    let sale = a
        .create_sale(NewSale {
            sku: stampede_types::Sku::parse("ONE").unwrap(),
            price: stampede_types::Cents::parse("price_cents", 50).unwrap(),
            quantity: 2,
            per_user_limit: 1,
            starts_at_ms: now - 1_000,
            ends_at_ms: now + 2_000,
        })
        .await
        .unwrap()
        .record
        .id;
    learns_of(&b, sale).await;
    let first = a.purchase(user("x"), key("k1"), sale, one()).await.unwrap();
    let other = a.purchase(user("w"), key("k2"), sale, one()).await.unwrap();

    // Sold out everywhere: B's answer is the order.
    let retry = b.purchase(user("x"), key("k1"), sale, one()).await.unwrap();
    assert!(retry.replay);
    assert_eq!(retry.placed.order_id, first.placed.order_id);
    // The same key on another request is still a reused key; a new key is sold out.
    assert_eq!(
        b.purchase(
            user("x"),
            key("k1"),
            sale,
            stampede_types::Quantity::parse(2).unwrap()
        )
        .await,
        Err(PurchaseError::KeyReused)
    );
    assert!(matches!(
        b.purchase(user("y"), key("k1"), sale, one()).await,
        Err(PurchaseError::SoldOut { .. })
    ));

    // Over: another shopper, whose retry first lands on B after the end, gets its order.
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    let late = b.purchase(user("w"), key("k2"), sale, one()).await.unwrap();
    assert!(late.replay);
    assert_eq!(late.placed.order_id, other.placed.order_id);
    assert_eq!(
        b.purchase(user("z"), key("k9"), sale, one()).await,
        Err(PurchaseError::Ended)
    );
    a.shutdown().await;
    b.shutdown().await;
}
