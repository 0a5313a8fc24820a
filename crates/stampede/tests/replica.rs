//! Read/write splitting: with `--replica-url`, order lists are read from the replica in
//! read-only transactions; what the replica has not caught up with comes from the
//! primary, and a replica that is down sends the reads to the primary. Single orders,
//! writes and audits always use the primary.
//!
//! There is no streaming replication on the test machines, so the "replica" is a second
//! database the test fills by hand: a copy of the primary's catalogue plus one order in
//! a state the primary does not hold, which shows which database answered.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use stampede_engine::{OrderRecord, Store, WriteOp};
use stampede_store::on_server_backends;
use stampede_store::testing::{Backend, TestDatabase};
use stampede_types::{OrderId, OrderStatus};

/// Copies the primary's products and sales into `replica`, and `order` in `status`.
async fn replicate_by_hand(
    primary_url: &str,
    replica: &Arc<dyn Store>,
    order: OrderId,
    status: OrderStatus,
) {
    let primary = stampede_store::open_read_only(Some(primary_url), Path::new("."))
        .await
        .unwrap();
    let snapshot = primary.snapshot().await.unwrap();
    for product in &snapshot.products {
        // The sales below carve their quantity out of the product again.
        let carved: u64 = snapshot
            .sales
            .iter()
            .filter(|s| s.sku == product.sku)
            .map(|s| s.quantity)
            .sum();
        let mut product = product.clone();
        product.available += carved;
        replica
            .commit(&[WriteOp::InsertProduct(product)])
            .await
            .unwrap();
    }
    for sale in &snapshot.sales {
        replica
            .commit(&[WriteOp::InsertSale(sale.clone())])
            .await
            .unwrap();
    }
    let record: OrderRecord = primary
        .order(order)
        .await
        .unwrap()
        .expect("the order is on the primary");
    replica
        .commit(&[WriteOp::InsertOrder(OrderRecord { status, ..record })])
        .await
        .unwrap();
}

async fn order_lists_read_the_replica_and_the_primary_fills_what_it_lacks(backend: Backend) {
    let replica_db = TestDatabase::create(backend).await;
    let replica_url = replica_db.url.clone().unwrap();
    let app = spawn_app_on_with(backend, |config| {
        config.replica_url = Some(replica_url.clone())
    })
    .await;
    let sale = app.live_sale("REP-1", 10, 5).await;
    let ann = app.shopper("ann");
    let first = app.buy(&ann, &sale, "k1", 1).await;
    let second = app.buy(&ann, &sale, "k2", 2).await;

    // The replica is empty (it "lags"): the primary answers both.
    let orders = app.orders(&ann).await;
    assert_eq!(orders.len(), 2, "{orders:?}");

    // The replica now holds the first order as paid, which the primary never wrote: the
    // list shows it, so the list was read from the replica; the second still comes from
    // the primary.
    let dir = tempfile::tempdir().unwrap();
    let replica = replica_db.open(dir.path()).await;
    let primary_url = app.database.url.clone().unwrap();
    replicate_by_hand(
        &primary_url,
        &replica,
        OrderId::parse(&first).unwrap(),
        OrderStatus::Paid,
    )
    .await;
    drop(replica);
    let orders = app.orders(&ann).await;
    let status_of = |id: &str| {
        orders
            .iter()
            .find(|o| o["order_id"] == id)
            .unwrap_or_else(|| panic!("{id} missing from {orders:?}"))["status"]
            .clone()
    };
    assert_eq!(status_of(&first), "paid", "read from the replica");
    assert_eq!(
        status_of(&second),
        "pending_payment",
        "filled in from the primary"
    );

    // A single order is always read from the primary.
    assert_eq!(app.order_status(&ann, &first).await, "pending_payment");
}

async fn a_replica_that_is_down_sends_reads_to_the_primary(backend: Backend) {
    let app = spawn_app_on_with(backend, |config| {
        let scheme = if backend == Backend::Postgres {
            "postgres"
        } else {
            "mysql"
        };
        config.replica_url = Some(format!("{scheme}://nobody@127.0.0.1:1/none"));
    })
    .await;
    let sale = app.live_sale("REP-2", 10, 5).await;
    let bob = app.shopper("bob");
    let order = app.buy(&bob, &sale, "k1", 1).await;
    let orders = app.orders(&bob).await;
    assert_eq!(orders.len(), 1);
    assert_eq!(orders[0]["order_id"], order.as_str());
}

on_server_backends!(
    order_lists_read_the_replica_and_the_primary_fills_what_it_lacks,
    a_replica_that_is_down_sends_reads_to_the_primary,
);

#[tokio::test]
async fn a_replica_url_beside_the_embedded_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = stampede::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        admin_token: Some(ADMIN_TOKEN.into()),
        jwt_secret: Some(JWT_SECRET.into()),
        replica_url: Some("postgres://postgres@127.0.0.1:5432/postgres".into()),
        ..stampede::Config::default()
    };
    let refused = stampede::start(&config, std::future::pending())
        .await
        .err()
        .expect("refused");
    assert!(
        format!("{refused:#}").contains("replica_url needs"),
        "{refused:#}"
    );
}
