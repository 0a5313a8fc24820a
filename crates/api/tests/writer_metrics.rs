//! The writer's own histograms, as `/metrics` shows them: how long purchases waited for
//! the writer, and how many operations each commit carried, in buckets of counts (not
//! seconds). Its own test binary, so the process-wide recorder counts only these
//! purchases.

use stampede_engine::testing::live_sale;
use stampede_engine::{AckMode, EngineConfig};
use stampede_types::{IdempotencyKey, Quantity, UserId};

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|n| n.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_reports_queue_waits_and_batch_sizes_in_buckets_of_their_own() {
    let metrics = stampede_api::metrics_handle();
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        ack: AckMode::Durable,
        ..EngineConfig::default()
    };
    let engine =
        stampede_store::testing::sqlite_engine(&dir.path().join("writer.db"), config).await;
    let sale = live_sale(&engine, "WRITER-1", 100, 100, 100, 10).await;
    // Durable: each answer comes after its commit, so the writer has recorded it.
    for i in 0..3 {
        engine
            .purchase(
                UserId::parse(&format!("shopper-{i}")).unwrap(),
                IdempotencyKey::parse(&format!("key-{i}")).unwrap(),
                sale,
                Quantity::parse(1).unwrap(),
            )
            .await
            .unwrap();
    }

    let text = metrics.render();
    // Every purchase waited in the queue once; nothing else is counted there.
    assert_eq!(
        value(&text, "stampede_writer_queue_wait_seconds_count"),
        Some(3.0),
        "{text}"
    );
    let wait = value(
        &text,
        r#"stampede_writer_queue_wait_seconds_bucket{le="5"}"#,
    );
    assert_eq!(wait, Some(3.0), "a queue wait is in seconds: {text}");
    // Batch sizes have count buckets: every commit here carried at most 4 operations,
    // and the bucket for 1,024 (the largest batch) holds every commit.
    let commits = value(&text, "stampede_writer_batch_ops_count").unwrap();
    assert!(commits >= 3.0, "{text}");
    assert_eq!(
        value(&text, r#"stampede_writer_batch_ops_bucket{le="4"}"#),
        Some(commits),
        "{text}"
    );
    assert_eq!(
        value(&text, r#"stampede_writer_batch_ops_bucket{le="1024"}"#),
        Some(commits),
        "{text}"
    );
    engine.shutdown().await;
}
