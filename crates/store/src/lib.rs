//! Durable storage for Stampede, behind the engine's [`Store`] trait.
//!
//! **Architecture invariant:** the store decides nothing. It applies a batch of
//! already-decided writes in one transaction, and reads. Backends are chosen by URL
//! scheme; each keeps its own migrations under `migrations/<backend>`.

mod nodelay;
mod redis_gate;
#[macro_use]
mod rows;
mod server;
mod sqlite;
mod sqlite_writer;
pub mod testing;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use redis_gate::RedisGate;
pub use server::{MySqlStore, OWNER_WAIT_DEFAULT, PostgresStore};
pub use sqlite::SqliteStore;
use stampede_engine::{Store, StoreError};

/// How to open a store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// A server database is owned by one node at a time: how long to wait for a previous
    /// owner to go away.
    pub owner_wait: Duration,
    /// Write every order event to the transactional outbox (for the NATS relay).
    pub outbox: bool,
    /// A read replica of the server database for order lists (not for SQLite).
    pub replica_url: Option<String>,
    /// Join the cluster of nodes writing this server database, selling leased stock,
    /// with this heartbeat time to live (not for SQLite). `None`: one node owns it.
    pub cluster_node_ttl: Option<Duration>,
    /// Longest a statement of a server database's writer may run or wait for a lock
    /// (PostgreSQL `statement_timeout`, or only `lock_timeout` when `COMMIT` waits for a
    /// synchronous standby; MariaDB `max_statement_time`; MySQL only its lock wait
    /// timeouts), so a stalled database fails a commit rather than hold the writer.
    /// Left to the URL when it sets `statement_timeout` itself. `None`: no deadline of
    /// ours. SQLite has its own (`busy_timeout`, 5 s).
    pub statement_timeout: Option<Duration>,
}

/// The writer's statement deadline unless configured otherwise.
pub const STATEMENT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            owner_wait: OWNER_WAIT_DEFAULT,
            outbox: false,
            replica_url: None,
            cluster_node_ttl: None,
            statement_timeout: Some(STATEMENT_TIMEOUT_DEFAULT),
        }
    }
}

/// The SQLite database file a `--database-url` names (the embedded `stampede.db` in
/// `data_dir` when it is empty), or `None` for a server database. A server locks the
/// file's `.lock` beside it, so two processes with data directories of their own cannot
/// both write one file (each would sell the whole stock from its memory).
pub fn sqlite_file(database_url: Option<&str>, data_dir: &Path) -> Option<std::path::PathBuf> {
    match database_url {
        None | Some("") => Some(data_dir.join("stampede.db")),
        Some(url) if url.starts_with("sqlite:") => {
            <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(url)
                .ok()
                .map(|options| options.get_filename().to_path_buf())
        }
        Some(_) => None,
    }
}

/// Opens the store a `--database-url` names: `sqlite://PATH`, `postgres://…` (also
/// `postgresql://`) or `mysql://…` (MariaDB, MySQL, TiDB, PolarDB-X). An empty URL means
/// the embedded SQLite file `stampede.db` in `data_dir`.
pub async fn open(
    database_url: Option<&str>,
    data_dir: &Path,
    options: &StoreOptions,
) -> Result<Arc<dyn Store>, StoreError> {
    let outbox = options.outbox;
    // A URL that sets its own statement_timeout (PostgreSQL's `options=-c …`, its
    // underscore written plainly or percent-encoded) keeps it.
    let deadline = options.statement_timeout.filter(|_| {
        !database_url.is_some_and(|url| {
            url.to_ascii_lowercase()
                .replace("%5f", "_")
                .contains("statement_timeout")
        })
    });
    let replica = options.replica_url.as_deref().filter(|url| !url.is_empty());
    let is_sqlite = database_url.is_none_or(|url| url.is_empty() || url.starts_with("sqlite:"));
    if replica.is_some() && is_sqlite {
        return Err(StoreError::Unavailable(
            "replica_url needs a PostgreSQL or MySQL-protocol database_url; the embedded SQLite has no replicas".into(),
        ));
    }
    if options.cluster_node_ttl.is_some() && is_sqlite {
        return Err(StoreError::Unavailable(
            "cluster needs a PostgreSQL or MySQL-protocol database_url; the embedded SQLite is one node's".into(),
        ));
    }
    match database_url {
        None | Some("") => Ok(SqliteStore::open(&data_dir.join("stampede.db"))
            .await?
            .with_outbox(outbox)
            .into_arc()),
        Some(url) if url.starts_with("sqlite:") => Ok(SqliteStore::open_url(url)
            .await?
            .with_outbox(outbox)
            .into_arc()),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let store = match options.cluster_node_ttl {
                Some(ttl) => PostgresStore::open_cluster(url, ttl).await?,
                None => PostgresStore::open(url, options.owner_wait).await?,
            }
            .with_outbox(outbox)
            .with_statement_timeout(deadline)
            .await?;
            let store = match replica {
                Some(replica) => store.with_replica(replica)?,
                None => store,
            };
            Ok(store.into_arc())
        }
        Some(url) if url.starts_with("mysql://") || url.starts_with("mariadb://") => {
            let url = url.replacen("mariadb://", "mysql://", 1);
            let store = match options.cluster_node_ttl {
                Some(ttl) => MySqlStore::open_cluster(&url, ttl).await?,
                None => MySqlStore::open(&url, options.owner_wait).await?,
            }
            .with_outbox(outbox)
            .with_statement_timeout(deadline)
            .await?;
            let store = match replica {
                Some(replica) => {
                    store.with_replica(&replica.replacen("mariadb://", "mysql://", 1))?
                }
                None => store,
            };
            Ok(store.into_arc())
        }
        Some(url) => {
            let scheme = url.split(':').next().unwrap_or_default();
            Err(StoreError::Unavailable(format!(
                "database scheme {scheme:?} is not supported; use sqlite://, postgres:// or mysql://"
            )))
        }
    }
}

/// Opens the store for reading only, beside a live node (`stampede audit`): a database
/// is neither migrated nor taken over, nothing is written, and a SQLite file that is not
/// there is an error rather than a new empty database (its WAL lets a reader run beside
/// the writer).
pub async fn open_read_only(
    database_url: Option<&str>,
    data_dir: &Path,
) -> Result<Arc<dyn Store>, StoreError> {
    match database_url {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(PostgresStore::open_read_only(url).await?.into_arc())
        }
        Some(url) if url.starts_with("mysql://") || url.starts_with("mariadb://") => {
            let url = url.replacen("mariadb://", "mysql://", 1);
            Ok(MySqlStore::open_read_only(&url).await?.into_arc())
        }
        _ => {
            let path = sqlite_file(database_url, data_dir).ok_or_else(|| {
                StoreError::Unavailable(format!(
                    "unknown database URL {:?}: use sqlite://, postgres:// or mysql://",
                    database_url.unwrap_or_default()
                ))
            })?;
            let options = match database_url {
                Some(url) if url.starts_with("sqlite:") => {
                    <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(url)
                        .map_err(|e| StoreError::Unavailable(e.to_string()))?
                }
                _ => sqlx::sqlite::SqliteConnectOptions::new().filename(&path),
            };
            Ok(SqliteStore::open_read_only(options).await?.into_arc())
        }
    }
}
