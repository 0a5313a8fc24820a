//! Fresh databases for tests, on each backend: the store's own tests and the server's
//! black-box tests run the same cases against SQLite, PostgreSQL and MariaDB. The server
//! never calls this.
//!
//! The servers are real. Where they are is read from `STAMPEDE_TEST_POSTGRES_URL`
//! (default `postgres://postgres@127.0.0.1:5432/postgres`) and `STAMPEDE_TEST_MYSQL_URL`
//! (default `mysql://root@127.0.0.1:3306/test`): an account allowed to create databases.
//! A server that does not answer fails the test with a message saying which and how to
//! point the tests elsewhere; nothing is skipped.

use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::Connection;

/// Runs each named `async fn name(backend: Backend)` once per backend, as the tests
/// `name::sqlite`, `name::postgres` and `name::mysql` (so `cargo test postgres` runs one
/// backend's share).
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                $crate::backend_test!($name, sqlite, Sqlite);
                $crate::backend_test!($name, postgres, Postgres);
                $crate::backend_test!($name, mysql, MySql);
            }
        )*
    };
}

/// As `on_every_backend!`, for PostgreSQL and MariaDB only: what SQLite does not have
/// (owner locks, replicas).
#[macro_export]
macro_rules! on_server_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                $crate::backend_test!($name, postgres, Postgres);
                $crate::backend_test!($name, mysql, MySql);
            }
        )*
    };
}

/// One test `$test` that runs `super::$name` on `Backend::$backend` (for the two macros
/// above).
#[doc(hidden)]
#[macro_export]
macro_rules! backend_test {
    ($name:ident, $test:ident, $backend:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            super::$name($crate::testing::Backend::$backend).await
        }
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    MySql,
}

impl Backend {
    pub const ALL: [Backend; 3] = [Backend::Sqlite, Backend::Postgres, Backend::MySql];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
            Backend::MySql => "mysql",
        }
    }

    fn admin_url(self) -> Option<(String, &'static str)> {
        let (variable, default) = match self {
            Backend::Sqlite => return None,
            Backend::Postgres => (
                "STAMPEDE_TEST_POSTGRES_URL",
                "postgres://postgres@127.0.0.1:5432/postgres",
            ),
            Backend::MySql => (
                "STAMPEDE_TEST_MYSQL_URL",
                "mysql://root@127.0.0.1:3306/test",
            ),
        };
        Some((
            std::env::var(variable).unwrap_or_else(|_| default.to_owned()),
            variable,
        ))
    }
}

enum AdminError {
    Connect(sqlx::Error),
    Execute(sqlx::Error),
}

/// Runs one statement on a fresh connection to the server's admin URL.
async fn admin_execute(backend: Backend, admin_url: &str, sql: String) -> Result<(), AdminError> {
    macro_rules! on {
        ($conn:ty) => {{
            let mut admin = <$conn>::connect(admin_url)
                .await
                .map_err(AdminError::Connect)?;
            let done = sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut admin)
                .await;
            let _ = admin.close().await;
            done.map(drop).map_err(AdminError::Execute)
        }};
    }
    match backend {
        Backend::Postgres => on!(sqlx::PgConnection),
        Backend::MySql => on!(sqlx::MySqlConnection),
        Backend::Sqlite => Ok(()),
    }
}

/// A database created for one test and dropped with it. For SQLite, nothing: the store
/// lives in the test's data directory (`url` is `None`).
pub struct TestDatabase {
    pub backend: Backend,
    /// What to pass as `--database-url`.
    pub url: Option<String>,
    admin_url: String,
    name: String,
}

/// `url` with its database (the path) replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

impl TestDatabase {
    /// Creates an empty database named after this process and a counter.
    pub async fn create(backend: Backend) -> TestDatabase {
        static N_CREATED: AtomicU32 = AtomicU32::new(0);
        let Some((admin_url, variable)) = backend.admin_url() else {
            return TestDatabase {
                backend,
                url: None,
                admin_url: String::new(),
                name: String::new(),
            };
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "stampede_t_{}_{}_{nanos}",
            std::process::id(),
            N_CREATED.fetch_add(1, Ordering::Relaxed)
        );
        let unreachable = |error: sqlx::Error| -> ! {
            panic!(
                "the {} server for the backend tests does not answer at {admin_url} ({error}); \
                 start it, or set {variable} to an account that may create databases",
                backend.name()
            )
        };
        let create = format!("CREATE DATABASE {name}");
        match admin_execute(backend, &admin_url, create).await {
            Ok(()) => {}
            Err(AdminError::Connect(error)) => unreachable(error),
            Err(AdminError::Execute(error)) => panic!("create the test database: {error}"),
        }
        TestDatabase {
            backend,
            url: Some(with_database(&admin_url, &name)),
            admin_url,
            name,
        }
    }
}

impl TestDatabase {
    /// Opens this database's store as `stampede serve` would (SQLite in `data_dir`).
    pub async fn open(
        &self,
        data_dir: &std::path::Path,
    ) -> std::sync::Arc<dyn stampede_engine::Store> {
        self.open_with(data_dir, &crate::StoreOptions::default())
            .await
    }

    pub async fn open_with(
        &self,
        data_dir: &std::path::Path,
        options: &crate::StoreOptions,
    ) -> std::sync::Arc<dyn stampede_engine::Store> {
        crate::open(self.url.as_deref(), data_dir, options)
            .await
            .unwrap_or_else(|e| panic!("open the {} store: {e}", self.backend.name()))
    }
}

impl TestDatabase {
    /// Kills, from the server's side, the connection holding this database's owner lock
    /// (as a network partition or a database failover would drop it).
    pub async fn kill_owner_connection(&self) {
        let name = &self.name;
        match self.backend {
            Backend::Postgres => {
                let mut admin = sqlx::PgConnection::connect(&self.admin_url)
                    .await
                    .expect("admin connection");
                let killed: Vec<bool> = sqlx::query_scalar(
                    "SELECT pg_terminate_backend(l.pid) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
                     WHERE l.locktype = 'advisory' AND l.granted AND d.datname = $1",
                )
                .bind(name)
                .fetch_all(&mut admin)
                .await
                .expect("terminate the owner's backend");
                assert_eq!(killed, vec![true], "exactly one owner connection to kill");
            }
            Backend::MySql => {
                let mut admin = sqlx::MySqlConnection::connect(&self.admin_url)
                    .await
                    .expect("admin connection");
                let id: Option<i64> = sqlx::query_scalar(
                    "SELECT CAST(IS_USED_LOCK(CONCAT('stampede.owner.', ?)) AS SIGNED)",
                )
                .bind(name)
                .fetch_one(&mut admin)
                .await
                .expect("find the owner's connection");
                let id = id.expect("somebody holds the owner lock");
                sqlx::query(sqlx::AssertSqlSafe(format!("KILL {id}")))
                    .execute(&mut admin)
                    .await
                    .expect("kill the owner's connection");
            }
            Backend::Sqlite => panic!("SQLite has no owner connection"),
        }
    }
}

impl TestDatabase {
    /// Makes the database refuse every new order, with a trigger that raises an error on
    /// insert, the way a full disk or a broken table would: each commit carrying orders
    /// fails and is rolled back. [`TestDatabase::heal_order_inserts`] removes it.
    pub async fn break_order_inserts(&self, data_dir: &std::path::Path) {
        let statements: &[&str] = match self.backend {
            Backend::Sqlite => &["CREATE TRIGGER stampede_t_broken BEFORE INSERT ON orders \
                 BEGIN SELECT RAISE(ABORT, 'orders are broken (injected)'); END"],
            Backend::Postgres => &[
                "CREATE FUNCTION stampede_t_broken() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'orders are broken (injected)'; END $$",
                "CREATE TRIGGER stampede_t_broken BEFORE INSERT ON orders \
                 FOR EACH STATEMENT EXECUTE FUNCTION stampede_t_broken()",
            ],
            Backend::MySql => &["CREATE TRIGGER stampede_t_broken BEFORE INSERT ON orders \
                 FOR EACH ROW SIGNAL SQLSTATE '45000' \
                 SET MESSAGE_TEXT = 'orders are broken (injected)'"],
        };
        self.execute_all(data_dir, statements).await;
    }

    /// Makes every insert into orders take `seconds` (a server database), with a
    /// trigger that sleeps, the way a database stalled on a lock or a slow disk would.
    pub async fn slow_order_inserts(&self, seconds: f64) {
        self.slow_writes("orders", "stampede_t_broken", false, seconds)
            .await;
    }

    /// Makes every save of a setting (the guard's rules: a first one inserts, the next
    /// ones update) take `seconds` (a server database), the same way.
    pub async fn slow_setting_saves(&self, seconds: f64) {
        self.slow_writes("settings", "stampede_t_slow_settings", true, seconds)
            .await;
    }

    /// Inserts into `table`, and with `updates` its updates too, take `seconds`.
    async fn slow_writes(&self, table: &str, trigger: &str, updates: bool, seconds: f64) {
        let statements = match self.backend {
            Backend::Postgres => vec![
                format!(
                    "CREATE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql AS \
                     $$ BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$"
                ),
                format!(
                    "CREATE TRIGGER {trigger} BEFORE INSERT{} ON {table} \
                     FOR EACH STATEMENT EXECUTE FUNCTION {trigger}()",
                    if updates { " OR UPDATE" } else { "" }
                ),
            ],
            // One trigger per event.
            Backend::MySql => [("INSERT", ""), ("UPDATE", "_u")]
                .into_iter()
                .take(if updates { 2 } else { 1 })
                .map(|(event, suffix)| {
                    format!(
                        "CREATE TRIGGER {trigger}{suffix} BEFORE {event} ON {table} \
                         FOR EACH ROW SET @stampede_stalled = SLEEP({seconds})"
                    )
                })
                .collect(),
            Backend::Sqlite => panic!("a server database only"),
        };
        let statements: Vec<&str> = statements.iter().map(String::as_str).collect();
        self.execute_all(std::path::Path::new(""), &statements)
            .await;
    }

    /// Undoes [`TestDatabase::break_order_inserts`] and [`TestDatabase::slow_order_inserts`].
    pub async fn heal_order_inserts(&self, data_dir: &std::path::Path) {
        let statements: &[&str] = match self.backend {
            Backend::Postgres => &[
                "DROP TRIGGER stampede_t_broken ON orders",
                "DROP FUNCTION stampede_t_broken()",
            ],
            Backend::Sqlite | Backend::MySql => &["DROP TRIGGER stampede_t_broken"],
        };
        self.execute_all(data_dir, statements).await;
    }

    /// Undoes [`TestDatabase::slow_setting_saves`].
    pub async fn heal_setting_saves(&self) {
        let statements: &[&str] = match self.backend {
            Backend::Postgres => &[
                "DROP TRIGGER stampede_t_slow_settings ON settings",
                "DROP FUNCTION stampede_t_slow_settings()",
            ],
            Backend::MySql => &[
                "DROP TRIGGER stampede_t_slow_settings",
                "DROP TRIGGER stampede_t_slow_settings_u",
            ],
            Backend::Sqlite => &["DROP TRIGGER stampede_t_slow_settings"],
        };
        self.execute_all(std::path::Path::new(""), statements).await;
    }

    /// Runs `statements` on this database, from a connection of its own.
    async fn execute_all(&self, data_dir: &std::path::Path, statements: &[&str]) {
        macro_rules! on {
            ($conn:ty, $url:expr) => {{
                let mut conn = <$conn>::connect(&$url)
                    .await
                    .expect("connect to the test database");
                for sql in statements {
                    sqlx::query(sqlx::AssertSqlSafe(*sql))
                        .execute(&mut conn)
                        .await
                        .unwrap_or_else(|e| panic!("{sql}: {e}"));
                }
                let _ = conn.close().await;
            }};
        }
        match (self.backend, &self.url) {
            (Backend::Postgres, Some(url)) => on!(sqlx::PgConnection, url),
            (Backend::MySql, Some(url)) => on!(sqlx::MySqlConnection, url),
            _ => on!(
                sqlx::SqliteConnection,
                format!("sqlite://{}", data_dir.join("stampede.db").display())
            ),
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return;
        }
        let (backend, admin_url, name) = (self.backend, self.admin_url.clone(), self.name.clone());
        // Drop may run inside a runtime: do the async clean-up on a thread of its own.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the clean-up");
            runtime.block_on(async {
                let drop = match backend {
                    Backend::Postgres => format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                    _ => format!("DROP DATABASE IF EXISTS {name}"),
                };
                // Best effort: a database left behind is named stampede_t_*.
                let _ = admin_execute(backend, &admin_url, drop).await;
            });
        });
        let _ = cleanup.join();
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn the_database_of_a_url_is_replaced() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "t1"),
            "postgres://postgres@127.0.0.1:5432/t1"
        );
        assert_eq!(
            with_database("mysql://root@127.0.0.1:3306/test?ssl-mode=disabled", "t1"),
            "mysql://root@127.0.0.1:3306/t1?ssl-mode=disabled"
        );
        assert_eq!(
            with_database("postgres://u@h:5432", "t1"),
            "postgres://u@h:5432/t1"
        );
    }
}

/// A store call, as an [`Interceptor`] sees it before it reaches the real store.
#[derive(Debug, Clone, Copy)]
pub enum Call<'a> {
    Load,
    Commit(&'a [stampede_engine::WriteOp]),
    Read,
    /// `ping`, the readiness check.
    Ping,
    Lease,
    Release,
    Heartbeat,
    Reclaim,
    /// `pending_orders`, the survivors' scan after a reclaim.
    PendingOrders,
    Catalog,
    Leave,
    OutboxRead,
    OutboxRemove,
    /// `relay_turn`, the relay's question whether it publishes.
    RelayTurn,
    Setting,
}

/// What a test or benchmark does around a real store: fail a call, slow it down, count
/// it, or change a commit's answer. Every method has a default that changes nothing.
#[async_trait::async_trait]
pub trait Interceptor: Send + Sync + 'static {
    /// Before `call` reaches the store; an error answers it instead.
    async fn before(&self, call: Call<'_>) -> Result<(), stampede_engine::StoreError> {
        let _ = call;
        Ok(())
    }
    /// Awaited after an audit's snapshot is pinned, before its tally is counted (its
    /// connection held all the while): a count that takes long, as over a large sale.
    /// `None` counts at once.
    fn before_count(&self) -> Option<futures::future::BoxFuture<'static, ()>> {
        None
    }
    /// After a commit reached the store: may replace its answer (a lost `COMMIT`).
    fn after_commit(
        &self,
        outcome: Result<Vec<stampede_engine::OpOutcome>, stampede_engine::StoreError>,
    ) -> Result<Vec<stampede_engine::OpOutcome>, stampede_engine::StoreError> {
        outcome
    }
}

/// A real store with an [`Interceptor`] around every call: the one forwarding store the
/// tests and benchmarks share, so each says only what it does differently.
pub struct Intercepted<I> {
    pub inner: std::sync::Arc<dyn stampede_engine::Store>,
    pub hooks: I,
}

#[async_trait::async_trait]
impl<I: Interceptor> stampede_engine::Store for Intercepted<I> {
    async fn load(
        &self,
        into: &mut dyn stampede_engine::Rebuild,
    ) -> Result<(), stampede_engine::StoreError> {
        self.hooks.before(Call::Load).await?;
        self.inner.load(into).await
    }
    async fn commit(
        &self,
        ops: &[stampede_engine::WriteOp],
    ) -> Result<Vec<stampede_engine::OpOutcome>, stampede_engine::StoreError> {
        self.hooks.before(Call::Commit(ops)).await?;
        let outcome = self.inner.commit(ops).await;
        self.hooks.after_commit(outcome)
    }
    async fn order(
        &self,
        id: stampede_types::OrderId,
    ) -> Result<Option<stampede_engine::OrderRecord>, stampede_engine::StoreError> {
        self.hooks.before(Call::Read).await?;
        self.inner.order(id).await
    }
    async fn orders_by_id(
        &self,
        ids: &[stampede_types::OrderId],
    ) -> Result<Vec<stampede_engine::OrderRecord>, stampede_engine::StoreError> {
        self.hooks.before(Call::Read).await?;
        self.inner.orders_by_id(ids).await
    }
    async fn tally(
        &self,
        sale: stampede_types::SaleId,
        per_user_limit: u32,
    ) -> Result<stampede_engine::SaleTally, stampede_engine::StoreError> {
        self.hooks.before(Call::Read).await?;
        self.inner.tally(sale, per_user_limit).await
    }
    async fn snapshot_tally(
        &self,
        sale: stampede_types::SaleId,
        per_user_limit: u32,
    ) -> Result<stampede_engine::PendingTally, stampede_engine::StoreError> {
        self.hooks.before(Call::Read).await?;
        let pending = self.inner.snapshot_tally(sale, per_user_limit).await?;
        Ok(match self.hooks.before_count() {
            None => pending,
            Some(wait) => Box::pin(async move {
                wait.await;
                pending.await
            }),
        })
    }
    async fn ping(&self) -> Result<(), stampede_engine::StoreError> {
        self.hooks.before(Call::Ping).await?;
        self.inner.ping().await
    }
    async fn stop_writes(&self) {
        self.inner.stop_writes().await
    }
    fn node(&self) -> Option<&str> {
        self.inner.node()
    }
    async fn lease(
        &self,
        sale: stampede_types::SaleId,
        wanted: u64,
        max: u64,
    ) -> Result<stampede_engine::LeaseGrant, stampede_engine::StoreError> {
        self.hooks.before(Call::Lease).await?;
        self.inner.lease(sale, wanted, max).await
    }
    async fn release(
        &self,
        sale: stampede_types::SaleId,
        units: u64,
    ) -> Result<(), stampede_engine::StoreError> {
        self.hooks.before(Call::Release).await?;
        self.inner.release(sale, units).await
    }
    async fn heartbeat(&self) -> Result<(), stampede_engine::StoreError> {
        self.hooks.before(Call::Heartbeat).await?;
        self.inner.heartbeat().await
    }
    async fn reclaim(&self) -> Result<stampede_engine::Reclaimed, stampede_engine::StoreError> {
        self.hooks.before(Call::Reclaim).await?;
        self.inner.reclaim().await
    }
    async fn pending_orders(
        &self,
    ) -> Result<Vec<(stampede_types::OrderId, i64)>, stampede_engine::StoreError> {
        self.hooks.before(Call::PendingOrders).await?;
        self.inner.pending_orders().await
    }
    async fn catalog(&self) -> Result<stampede_engine::Catalog, stampede_engine::StoreError> {
        self.hooks.before(Call::Catalog).await?;
        self.inner.catalog().await
    }
    async fn orders_of_user(
        &self,
        user: &stampede_types::UserId,
        limit: u32,
    ) -> Result<Option<Vec<stampede_engine::OrderRecord>>, stampede_engine::StoreError> {
        self.hooks.before(Call::Read).await?;
        self.inner.orders_of_user(user, limit).await
    }
    async fn order_by_key(
        &self,
        user: &stampede_types::UserId,
        key: &stampede_types::IdempotencyKey,
    ) -> Result<Option<stampede_engine::OrderRecord>, stampede_engine::StoreError> {
        self.hooks.before(Call::Read).await?;
        self.inner.order_by_key(user, key).await
    }
    async fn leave(&self) -> Result<(), stampede_engine::StoreError> {
        self.hooks.before(Call::Leave).await?;
        self.inner.leave().await
    }
    async fn outbox_read(
        &self,
        limit: usize,
    ) -> Result<Vec<stampede_engine::OutboxEvent>, stampede_engine::StoreError> {
        self.hooks.before(Call::OutboxRead).await?;
        self.inner.outbox_read(limit).await
    }
    async fn relay_turn(&self, ready: bool) -> Result<bool, stampede_engine::StoreError> {
        self.hooks.before(Call::RelayTurn).await?;
        self.inner.relay_turn(ready).await
    }
    async fn outbox_remove(&self, seqs: &[i64]) -> Result<(), stampede_engine::StoreError> {
        self.hooks.before(Call::OutboxRemove).await?;
        self.inner.outbox_remove(seqs).await
    }
    async fn charges_to_settle(
        &self,
    ) -> Result<Vec<stampede_engine::ChargeAttempt>, stampede_engine::StoreError> {
        self.hooks.before(Call::Read).await?;
        self.inner.charges_to_settle().await
    }
    async fn load_setting(&self, key: &str) -> Result<Option<String>, stampede_engine::StoreError> {
        self.hooks.before(Call::Setting).await?;
        self.inner.load_setting(key).await
    }
    async fn save_setting(
        &self,
        key: &str,
        value: &str,
    ) -> Result<(), stampede_engine::StoreError> {
        self.hooks.before(Call::Setting).await?;
        self.inner.save_setting(key, value).await
    }
    async fn save_setting_if(
        &self,
        key: &str,
        value: &str,
        expected: Option<&str>,
    ) -> Result<bool, stampede_engine::StoreError> {
        self.hooks.before(Call::Setting).await?;
        self.inner.save_setting_if(key, value, expected).await
    }
}

/// An engine on a fresh SQLite file at `path` that answers purchases once reserved, for
/// benchmarks and tests of the request path (not of the fsync).
pub async fn reserved_sqlite_engine(
    path: &std::path::Path,
) -> std::sync::Arc<stampede_engine::Engine> {
    let config = stampede_engine::EngineConfig {
        ack: stampede_engine::AckMode::Reserved,
        ..stampede_engine::EngineConfig::default()
    };
    std::sync::Arc::new(sqlite_engine(path, config).await)
}

/// An engine with `config` on a fresh SQLite file at `path`, on the system clock.
/// Panics on failure: for tests and benchmarks only.
pub async fn sqlite_engine(
    path: &std::path::Path,
    config: stampede_engine::EngineConfig,
) -> stampede_engine::Engine {
    let store = crate::SqliteStore::open(path)
        .await
        .expect("open the SQLite store")
        .into_arc();
    stampede_engine::Engine::open(
        store,
        std::sync::Arc::new(stampede_engine::SystemClock),
        config,
    )
    .await
    .expect("open the engine")
}

/// A TCP link between a store and its test database that a test can break, as a network
/// or a failover would. The link carries the database's protocol in clear (TLS off), so
/// it can see statements go by.
pub struct Link {
    /// The database's URL through the link.
    pub url: String,
    state: std::sync::Arc<LinkState>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LinkMode {
    Up,
    /// Every open connection cut, new ones refused.
    Down,
    /// Traffic passes until a client sends `COMMIT`; it is forwarded, then every
    /// connection is cut before the answer comes back and the link stays down for the
    /// given time, so the client cannot learn whether the commit landed.
    LoseNextCommit {
        then_down_for: std::time::Duration,
    },
    /// Down until then, then up.
    DownUntil(std::time::Instant),
    /// The next `COMMIT` of a transaction that inserted orders is held back for the given
    /// time while its client's connection is cut at once; then it reaches the database
    /// (and lands). Meanwhile the link is up for everyone else: the client finds out
    /// what happened over a new connection while the commit is still on its way.
    DelayNextOrderCommit {
        by: std::time::Duration,
    },
}

struct LinkState {
    mode: std::sync::Mutex<LinkMode>,
    /// Bumped to cut every open connection.
    cuts: tokio::sync::watch::Sender<u64>,
    commits_caught: AtomicU32,
}

impl Link {
    /// A link to `database` (a server database), and its URL through the link.
    pub async fn in_front_of(database: &TestDatabase) -> Link {
        let url = database.url.as_deref().expect("a server database");
        let start = url.find("://").expect("a URL") + 3;
        let end = start + url[start..].find('/').unwrap_or(url.len() - start);
        let host_start = start + url[start..end].rfind('@').map_or(0, |at| at + 1);
        let upstream = tokio::net::lookup_host(&url[host_start..end])
            .await
            .expect("the database's address")
            .next()
            .expect("an address");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut through = format!("{}{addr}{}", &url[..host_start], &url[end..]);
        if database.backend == Backend::Postgres {
            through.push(if through.contains('?') { '&' } else { '?' });
            through.push_str("sslmode=disable");
        }
        let state = std::sync::Arc::new(LinkState {
            mode: std::sync::Mutex::new(LinkMode::Up),
            cuts: tokio::sync::watch::channel(0).0,
            commits_caught: AtomicU32::new(0),
        });
        tokio::spawn(accept(listener, upstream, state.clone()));
        Link {
            url: through,
            state,
        }
    }

    pub fn mode(&self) -> LinkMode {
        self.state.mode()
    }

    pub fn set(&self, mode: LinkMode) {
        self.state.set(mode)
    }

    /// How many `COMMIT`s the link has lost or held back.
    pub fn commits_caught(&self) -> u32 {
        self.state.commits_caught.load(Ordering::SeqCst)
    }
}

impl LinkState {
    fn mode(&self) -> LinkMode {
        let mut mode = self.mode.lock().unwrap();
        if let LinkMode::DownUntil(until) = *mode
            && std::time::Instant::now() >= until
        {
            *mode = LinkMode::Up;
        }
        *mode
    }

    fn set(&self, mode: LinkMode) {
        *self.mode.lock().unwrap() = mode;
        if matches!(mode, LinkMode::Down | LinkMode::DownUntil(_)) {
            self.cuts.send_modify(|n| *n += 1);
        }
    }
}

async fn accept(
    listener: tokio::net::TcpListener,
    upstream: std::net::SocketAddr,
    state: std::sync::Arc<LinkState>,
) {
    while let Ok((client, _)) = listener.accept().await {
        if matches!(state.mode(), LinkMode::Down | LinkMode::DownUntil(_)) {
            continue; // dropped: the client's connection is reset
        }
        tokio::spawn(carry(client, upstream, state.clone()));
    }
}

/// One connection through the link.
async fn carry(
    mut client: tokio::net::TcpStream,
    upstream: std::net::SocketAddr,
    state: std::sync::Arc<LinkState>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut cuts = state.cuts.subscribe();
    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
        return;
    };
    let (mut up, mut down) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let contains = |chunk: &[u8], word: &[u8]| chunk.windows(word.len()).any(|w| w == word);
    let mut inserted_orders = false;
    loop {
        tokio::select! {
            read = client.read(&mut up) => {
                let Ok(n @ 1..) = read else { return };
                let chunk = &up[..n];
                inserted_orders |= contains(chunk, b"INSERT INTO orders");
                if contains(chunk, b"COMMIT") {
                    match state.mode() {
                        LinkMode::LoseNextCommit { then_down_for } => {
                            let _ = server.write_all(chunk).await;
                            state.commits_caught.fetch_add(1, Ordering::SeqCst);
                            state.set(LinkMode::DownUntil(std::time::Instant::now() + then_down_for));
                            return;
                        }
                        LinkMode::DelayNextOrderCommit { by } if inserted_orders => {
                            state.commits_caught.fetch_add(1, Ordering::SeqCst);
                            state.set(LinkMode::Up);
                            drop(client);
                            tokio::time::sleep(by).await;
                            let _ = server.write_all(chunk).await;
                            // Let the database answer (and finish the commit) before the
                            // connection goes.
                            let _ = tokio::time::timeout(
                                std::time::Duration::from_secs(5),
                                server.read(&mut down),
                            )
                            .await;
                            return;
                        }
                        _ => inserted_orders = false,
                    }
                }
                if server.write_all(chunk).await.is_err() {
                    return;
                }
            }
            read = server.read(&mut down) => {
                let Ok(n @ 1..) = read else { return };
                if client.write_all(&down[..n]).await.is_err() {
                    return;
                }
            }
            _ = cuts.changed() => return,
        }
    }
}
