//! Settings (the guard's rules) are saved with a compare-and-swap: only over the copy
//! the saver read, so nodes sharing a database cannot overwrite each other unseen.

use stampede_store::on_every_backend;
use stampede_store::testing::{Backend, TestDatabase};

async fn a_setting_is_saved_only_over_the_copy_read(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let store = database.open(dir.path()).await;
    let stored = || async { store.load_setting("k").await.unwrap() };
    assert_eq!(stored().await, None);
    assert!(store.save_setting_if("k", "v1", None).await.unwrap());
    // A first save by someone who also read nothing: refused, the first kept.
    assert!(!store.save_setting_if("k", "other", None).await.unwrap());
    // Over a copy that never was, or one since replaced: refused.
    assert!(!store.save_setting_if("k", "v2", Some("v0")).await.unwrap());
    assert_eq!(stored().await.as_deref(), Some("v1"));
    assert!(store.save_setting_if("k", "v2", Some("v1")).await.unwrap());
    assert!(!store.save_setting_if("k", "v3", Some("v1")).await.unwrap());
    assert_eq!(stored().await.as_deref(), Some("v2"));
    // Another key is another setting.
    assert!(store.save_setting_if("other", "x", None).await.unwrap());
    // A plain save is a copy like any other.
    store.save_setting("k", "v9").await.unwrap();
    assert!(!store.save_setting_if("k", "v10", Some("v2")).await.unwrap());
    assert!(store.save_setting_if("k", "v10", Some("v9")).await.unwrap());
    assert_eq!(stored().await.as_deref(), Some("v10"));
}

on_every_backend!(a_setting_is_saved_only_over_the_copy_read);
