//! An engine crashed in process (`Engine::crash`, stopped as `kill -9` would stop it)
//! leaves nobody waiting: every job that reached its queue is dropped unanswered, even one
//! whose caller had its place in the queue as the writer stopped and pushed it after.
//! (A tokio receiver, dropped, drops what is queued but not such a straggler: its caller
//! waited as long as the engine lived, and the property test hung on it once.)

use std::sync::Arc;
use std::time::Duration;

use stampede_engine::testing::take_queue_place;
use stampede_engine::{Engine, EngineConfig, SystemClock};
use stampede_store::testing::{Backend, TestDatabase};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_pushed_into_the_queue_as_the_writer_stops_is_dropped_unanswered() {
    let dir = tempfile::tempdir().unwrap();
    let database = TestDatabase::create(Backend::Sqlite).await;
    let store = database.open(dir.path()).await;
    let engine = Arc::new(
        Engine::open(store, Arc::new(SystemClock), EngineConfig::default())
            .await
            .unwrap(),
    );
    let place = take_queue_place(&engine).await;
    let crash = tokio::spawn({
        let engine = engine.clone();
        async move { engine.crash().await }
    });
    // The writer is aborted and its end of the queue closed while the place is held;
    // the crash waits for whoever holds a place.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !crash.is_finished(),
        "the crash returned while a caller held a place in the queue"
    );
    let answered = tokio::time::timeout(Duration::from_secs(10), place.fill())
        .await
        .expect("a job pushed as the writer stopped waited for an answer that never comes");
    assert!(!answered, "a crashed engine's writer answered a job");
    tokio::time::timeout(Duration::from_secs(10), crash)
        .await
        .expect("the crash returned once the place was filled")
        .unwrap();
}
