//! A database server that accepts connections but never answers (hung, or a proxy in
//! front of a dead one) fails a connection within the writer's connect timeout instead
//! of holding the caller for ever: at start here, and the same function makes every
//! reconnect and every probe of the writer.

use std::time::{Duration, Instant};

/// A listener that accepts every connection and never writes a byte; the connections
/// stay open as long as the task runs.
async fn silent_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    addr
}

async fn a_silent_server_fails_the_open_in_time(scheme: &str) {
    let addr = silent_server().await;
    let url = format!("{scheme}://stampede:secret@{addr}/stampede");
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let opened = tokio::time::timeout(
        Duration::from_secs(30),
        stampede_store::open(Some(&url), dir.path(), &Default::default()),
    )
    .await
    .expect("the open gave up on the silent server within 30 s");
    let error = opened.err().expect("nothing answered").to_string();
    assert!(error.contains("did not answer"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_silent_postgres_fails_the_open_in_time() {
    a_silent_server_fails_the_open_in_time("postgres").await;
}

#[tokio::test]
async fn a_silent_mysql_fails_the_open_in_time() {
    a_silent_server_fails_the_open_in_time("mysql").await;
}
