//! On a server database exactly one node writes: a second is refused while the first
//! holds it, and a node whose connection (and with it the owner lock) was lost while
//! another took over can never write again with the stock it holds in memory.

use std::sync::Arc;
use std::time::Duration;

use stampede_engine::testing::{key, live_sale, one, user};
use stampede_engine::{Engine, EngineConfig, PurchaseError, SystemClock};
use stampede_store::on_server_backends;
use stampede_store::testing::{Backend, TestDatabase};

async fn open_engine(database: &TestDatabase) -> Engine {
    let store = database.open(std::path::Path::new(".")).await;
    Engine::open(store, Arc::new(SystemClock), EngineConfig::default())
        .await
        .unwrap()
}

async fn a_second_owner_is_refused_while_the_first_holds_the_database(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let url = database.url.as_deref();
    let first = open_engine(&database).await;
    let impatient = stampede_store::StoreOptions {
        owner_wait: Duration::from_millis(300),
        ..Default::default()
    };
    let second = stampede_store::open(url, std::path::Path::new("."), &impatient).await;
    let refusal = second
        .err()
        .expect("the second node is refused")
        .to_string();
    assert!(refusal.contains("owns this database"), "{refusal}");
    // The offline audit reads beside the owner without taking over.
    let reader = stampede_store::open_read_only(url, std::path::Path::new("."))
        .await
        .unwrap();
    assert!(reader.snapshot().await.unwrap().sales.is_empty());
    drop(reader);
    let sale = live_sale(&first, "P", 10, 5, 50, 5).await;
    first
        .purchase(user("a"), key("k"), sale, one())
        .await
        .unwrap();
    first.shutdown().await;
    drop(first);
    // Once the first has gone, a new node takes over and sees what it sold.
    let next = open_engine(&database).await;
    assert_eq!(next.sale(sale).unwrap().remaining, 4);
    next.shutdown().await;
}

async fn a_node_that_lost_ownership_is_fenced_and_halts(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let old = open_engine(&database).await;
    let sale = live_sale(&old, "P", 10, 5, 50, 5).await;
    old.purchase(user("a"), key("k1"), sale, one())
        .await
        .unwrap();

    // The old node's connection drops; a new node takes over and sells.
    database.kill_owner_connection().await;
    let new = open_engine(&database).await;
    assert_eq!(new.sale(sale).unwrap().remaining, 4);
    new.purchase(user("b"), key("k2"), sale, one())
        .await
        .unwrap();

    // The old node still believes 4 units remain. While the new node holds the
    // database it cannot get back in...
    assert_eq!(
        old.purchase(user("c"), key("k3"), sale, one()).await,
        Err(PurchaseError::Unavailable)
    );
    assert!(!old.halted());
    // Nor does it read ready meanwhile, whatever its writer's probes (one a second)
    // find: they go through the writer's own connection, which cannot take the owner
    // lock. A probe through any other connection would answer, and the node would be
    // sent purchases it cannot commit.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert!(
        !old.ready().await,
        "ready while another node owns the database"
    );
    assert!(!old.halted());
    new.shutdown().await;
    drop(new);
    // ...and once it could, the epoch tells its next probe that another node has owned
    // the stock since: it is fenced off and halts on its own, before any purchase,
    // instead of selling from stale memory.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !old.halted() {
        assert!(
            std::time::Instant::now() < deadline,
            "the old node never learned it was fenced off"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        old.purchase(user("d"), key("k4"), sale, one()).await,
        Err(PurchaseError::Unavailable)
    );
    drop(old);

    let audit_node = open_engine(&database).await;
    let audit = audit_node.audit(sale).await.unwrap().unwrap();
    assert!(audit.consistent);
    assert_eq!(
        audit.tally.pending_payment, 2,
        "only the two owners' sales exist"
    );
    audit_node.shutdown().await;
}

on_server_backends!(
    a_second_owner_is_refused_while_the_first_holds_the_database,
    a_node_that_lost_ownership_is_fenced_and_halts,
);

/// A database whose commits would not be durable when the node answers 201 is refused at
/// open, with the setting named: here PostgreSQL with `synchronous_commit = off` set
/// for the connection in the URL. (MariaDB's settings are the server's own, shared by
/// every test, so its checks, `innodb_flush_log_at_trx_commit` and `sync_binlog` with
/// the binary log on, are read the same way but not changed here.)
#[tokio::test]
async fn a_database_that_would_not_make_commits_durable_is_refused() {
    let database = TestDatabase::create(Backend::Postgres).await;
    let url = database.url.as_deref().expect("a PostgreSQL URL");
    let separator = if url.contains('?') { '&' } else { '?' };
    let lazy = format!("{url}{separator}options=-c%20synchronous_commit%3Doff");
    let refusal = stampede_store::open(Some(&lazy), std::path::Path::new("."), &Default::default())
        .await
        .err()
        .expect("a database that would lose acknowledged commits is refused")
        .to_string();
    assert!(refusal.contains("synchronous_commit = off"), "{refusal}");
    // The same database with its settings as they are opens.
    drop(open_engine(&database).await);
}
