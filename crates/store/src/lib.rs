//! Durable storage for Stampede, behind the engine's [`Store`] trait.
//!
//! **Architecture invariant:** the store decides nothing. It applies a batch of
//! already-decided writes in one transaction, and reads. Backends are chosen by URL
//! scheme; each keeps its own migrations under `migrations/<backend>`.

mod sqlite;

use std::path::Path;
use std::sync::Arc;

pub use sqlite::SqliteStore;
use stampede_engine::{Store, StoreError};

/// Opens the store a `--database-url` names. An empty URL means the embedded SQLite file
/// `stampede.db` in `data_dir`.
pub async fn open(
    database_url: Option<&str>,
    data_dir: &Path,
) -> Result<Arc<dyn Store>, StoreError> {
    match database_url {
        None | Some("") => Ok(SqliteStore::open(&data_dir.join("stampede.db"))
            .await?
            .into_arc()),
        Some(url) if url.starts_with("sqlite:") => Ok(SqliteStore::open_url(url).await?.into_arc()),
        Some(url) => {
            let scheme = url.split(':').next().unwrap_or_default();
            Err(StoreError::Unavailable(format!(
                "database scheme {scheme:?} is not supported by this build; use sqlite:// or leave it unset"
            )))
        }
    }
}
