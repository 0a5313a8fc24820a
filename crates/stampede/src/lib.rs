//! The thin layer behind the `stampede` binary: configuration, secrets, wiring.
//! Kept as a library so tests start a real server in-process (`start`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use stampede_api::{AppState, Auth, Secret};
use stampede_engine::{AckMode, Engine, EngineConfig, SystemClock};
use tokio::sync::oneshot;

pub mod alloc;

/// Where a purchase takes its stock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum StockGateKind {
    /// In the node's memory (Stampede's design).
    Memory,
    /// In Redis, by a Lua script per purchase (the conventional design, for comparison).
    Redis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Ack {
    /// Answer 201 after the order's batch is committed and fsync'd.
    Durable,
    /// Answer 201 once stock is reserved and the order is queued; a crash can lose the
    /// orders still queued.
    Reserved,
}

/// Every setting of `stampede serve`. Layered: defaults → TOML file (`--config`) →
/// `STAMPEDE_*` environment → command-line flags.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// `sqlite://…`, `postgres://…` or `mysql://…`; unset means `<data_dir>/stampede.db`.
    pub database_url: Option<String>,
    /// How long to wait at start for the node that owned a server database to let go.
    #[serde(with = "humantime_serde")]
    pub owner_wait: Duration,
    /// Longest a statement of a server database's writer may run or wait for a lock;
    /// a stalled database then fails the commit instead of holding the writer. `0s`: no
    /// deadline of ours.
    #[serde(with = "humantime_serde")]
    pub database_timeout: Duration,
    /// A read replica of the server database for order lists; unset: the primary.
    pub replica_url: Option<String>,
    /// Several nodes write the server database, each selling stock leased from it.
    pub cluster: bool,
    /// In a cluster: a node silent this long is declared dead and its leases reclaimed.
    #[serde(with = "humantime_serde")]
    pub node_ttl: Duration,
    /// In a cluster: most units of a sale one node leases at once.
    pub lease_max: u64,
    /// In a cluster: a lease nobody bought from for this long goes back to the sale.
    #[serde(with = "humantime_serde")]
    pub lease_idle: Duration,
    /// Where purchases take stock: memory, or Redis + Lua (the conventional design).
    pub stock_gate: StockGateKind,
    /// Redis for `stock_gate = "redis"`.
    pub redis_url: String,
    /// Prefix of the stock gate's Redis keys.
    pub redis_prefix: String,
    pub ack: Ack,
    #[serde(with = "humantime_serde")]
    pub payment_window: Duration,
    pub payment_url: String,
    #[serde(with = "humantime_serde")]
    pub payment_timeout: Duration,
    pub queue_capacity: usize,
    pub batch_size_max: usize,
    pub body_limit_bytes: usize,
    /// Client connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// A connection whose request is still arriving or unanswered this long after its
    /// first byte, or that is idle this long, is closed: a client trickling a request
    /// cannot hold a connection slot.
    #[serde(with = "humantime_serde")]
    pub client_timeout: Duration,
    /// Comma-separated addresses and CIDR blocks of the load balancers or gateways in
    /// front: only they may name the client (`X-Forwarded-For`) and the tenant
    /// (`X-Tenant`) for the guard's hot-key rules. Empty: nobody.
    pub trusted_proxies: String,
    pub admin_token: Option<String>,
    pub jwt_secret: Option<String>,
    pub log: String,
    /// Threads of the async runtime; unset means one per core.
    pub worker_threads: Option<usize>,
    /// NATS server for the order-event stream (`nats://host:4222`); unset: no events.
    pub nats_url: Option<String>,
    /// JetStream stream the order events go to.
    pub nats_stream: String,
    /// Order events are published on `<nats_subject_prefix>.<event>`.
    pub nats_subject_prefix: String,
    /// How long JetStream remembers an event's id to drop a repeat (set when the stream
    /// is created).
    #[serde(with = "humantime_serde")]
    pub nats_duplicate_window: Duration,
    /// The guard's rules (`[guard]` in the TOML file). Rules changed through the admin
    /// API are kept in the store and win over these unless these carry a higher version.
    pub guard: stampede_guard::GuardRules,
    /// The TOML file this came from; its `[guard]` section is re-read when it changes.
    #[serde(skip)]
    pub config_file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().expect("valid address"),
            data_dir: PathBuf::from("./stampede-data"),
            database_url: None,
            owner_wait: stampede_store::OWNER_WAIT_DEFAULT,
            database_timeout: stampede_store::STATEMENT_TIMEOUT_DEFAULT,
            replica_url: None,
            cluster: false,
            node_ttl: Duration::from_secs(5),
            lease_max: 16_384,
            lease_idle: Duration::from_secs(2),
            stock_gate: StockGateKind::Memory,
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_prefix: "stampede".into(),
            ack: Ack::Durable,
            payment_window: Duration::from_secs(15 * 60),
            payment_url: "http://127.0.0.1:8090".into(),
            payment_timeout: Duration::from_secs(3),
            queue_capacity: 16_384,
            batch_size_max: 1_024,
            body_limit_bytes: stampede_api::BODY_LIMIT_BYTES_DEFAULT,
            max_connections: 16_384,
            client_timeout: Duration::from_secs(150),
            trusted_proxies: String::new(),
            admin_token: None,
            jwt_secret: None,
            log: "info".into(),
            worker_threads: None,
            nats_url: None,
            nats_stream: "STAMPEDE_ORDERS".into(),
            nats_subject_prefix: "stampede.orders".into(),
            nats_duplicate_window: Duration::from_secs(120),
            guard: stampede_guard::GuardRules::default(),
            config_file: None,
        }
    }
}

/// Command-line values; `None` means "not given", so lower layers show through.
#[derive(Debug, Clone, Default, Serialize, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file (keys as in the README's table).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Directory of the embedded database and generated secrets [default: ./stampede-data].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Database URL: sqlite://PATH, postgres://USER@HOST:PORT/DB or mysql://USER@HOST:PORT/DB (MariaDB, MySQL, TiDB, PolarDB-X). Unset: <data-dir>/stampede.db.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// How long to wait at start for the node that owned a server database to let go, e.g. 15s [default: 15s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_wait: Option<String>,
    /// Longest a statement of a server database's writer may run or wait for a lock (PostgreSQL statement_timeout unless the URL sets one, or lock_timeout when COMMIT waits for a synchronous standby; MariaDB max_statement_time; MySQL its lock wait timeouts), and the longest a guard rules change waits for its save; 0s: none [default: 5s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_timeout: Option<String>,
    /// Read replica of the server database for order lists (same URL forms; not for SQLite) [default: none].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica_url: Option<String>,
    /// Join the cluster of nodes writing this server database; each sells stock leased from it (not for SQLite) [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<bool>,
    /// In a cluster: a node silent this long is declared dead and its leases reclaimed, e.g. 5s [default: 5s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_ttl: Option<String>,
    /// In a cluster: most units of a sale one node leases at once [default: 16384].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_max: Option<u64>,
    /// In a cluster: a lease nobody bought from for this long goes back to the sale, e.g. 2s [default: 2s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_idle: Option<String>,
    /// Where purchases take stock: memory (Stampede) or redis (a Lua script per purchase, the conventional design, for comparison) [default: memory].
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stock_gate: Option<StockGateKind>,
    /// Redis for --stock-gate redis [default: redis://127.0.0.1:6379].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// Prefix of the stock gate's Redis keys [default: stampede].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_prefix: Option<String>,
    /// When a purchase is answered: after its order is durable, or once reserved [default: durable].
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack: Option<Ack>,
    /// How long an order waits for payment before it expires and its stock returns, e.g. 15m, 2s; 100ms to 30 days [default: 15m].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment_window: Option<String>,
    /// Base URL of the payment provider, plain http:// (an https provider goes behind a TLS-originating proxy) [default: http://127.0.0.1:8090].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment_url: Option<String>,
    /// Timeout of one call to the payment provider [default: 3s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment_timeout: Option<String>,
    /// Bound of the writer's queue; beyond it purchases get 503 overloaded [default: 16384].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_capacity: Option<usize>,
    /// Most writes committed in one transaction [default: 1024].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size_max: Option<usize>,
    /// Largest accepted request body in bytes [default: 16384].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_limit_bytes: Option<usize>,
    /// Client connections served at once; more wait to be accepted [default: 16384].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// A connection whose request is still arriving or unanswered this long after its first byte, or idle this long, is closed; longer than the guard rules' longest answer (paced waits + 1s for room to note a charge attempt + payment_timeout + held refusal + 1s) [default: 150s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_timeout: Option<String>,
    /// Load balancers or gateways in front, e.g. 10.0.0.0/8,192.0.2.1: only they may name the client (X-Forwarded-For) and tenant (X-Tenant) [default: none].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trusted_proxies: Option<String>,
    /// Log filter, e.g. info, stampede=debug [default: info].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
    /// Threads of the async runtime [default: one per core].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_threads: Option<usize>,
    /// NATS server (JetStream) to publish order events to, e.g. nats://127.0.0.1:4222 [default: none].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_url: Option<String>,
    /// JetStream stream for order events, created if missing [default: STAMPEDE_ORDERS].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_stream: Option<String>,
    /// Subject prefix of order events: <prefix>.created, .paid, .cancelled, .expired [default: stampede.orders].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_subject_prefix: Option<String>,
    /// How long JetStream drops a repeated order event; applies when the stream is created, must cover a relay's restart or hand-over [default: 2m].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_duplicate_window: Option<String>,
}

impl Config {
    /// How `serve` opens its store: the outbox is written when events are published.
    pub fn store_options(&self) -> stampede_store::StoreOptions {
        stampede_store::StoreOptions {
            owner_wait: self.owner_wait,
            outbox: self.nats_url.is_some(),
            replica_url: self.replica_url.clone(),
            cluster_node_ttl: self.cluster.then_some(self.node_ttl),
            statement_timeout: Some(self.database_timeout).filter(|t| !t.is_zero()),
        }
    }

    /// The settings whose environment variables are text, never read as a number or a
    /// boolean: names, paths, URLs, the secrets, and the durations (humantime text such
    /// as `2s`; `0` is a duration too).
    pub const TEXT_KEYS: &'static [&'static str] = &[
        "admin_token",
        "jwt_secret",
        "data_dir",
        "database_url",
        "replica_url",
        "redis_url",
        "redis_prefix",
        "payment_url",
        "trusted_proxies",
        "log",
        "nats_url",
        "nats_stream",
        "nats_subject_prefix",
        "owner_wait",
        "database_timeout",
        "node_ttl",
        "lease_idle",
        "payment_window",
        "payment_timeout",
        "client_timeout",
        "nats_duplicate_window",
    ];

    /// Builds the configuration from its layers. Secrets come only from the file or the
    /// environment (`STAMPEDE_ADMIN_TOKEN`, `STAMPEDE_JWT_SECRET`), never from flags
    /// that would show in `ps`.
    pub fn load(args: &ServeArgs) -> anyhow::Result<Config> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = &args.config {
            anyhow::ensure!(
                path.exists(),
                "config file {} does not exist",
                path.display()
            );
            refuse_unknown_keys(path)?;
            figment = figment.merge(Toml::file(path));
        }
        // Text settings are taken as text: figment would read an all-digit value (a
        // token, a Redis prefix or NATS stream named `2024`, a timeout of `0`) as a
        // number and refuse it. The secrets are taken exactly as given, quotes and
        // spaces included; the rest trimmed, as figment trims. Names match in any case,
        // as figment matches them.
        let not_typed = [Self::TEXT_KEYS, &["cluster"]].concat();
        figment = figment.merge(Env::prefixed("STAMPEDE_").ignore(&not_typed));
        // Each key once: two spellings of one name that disagree (a stale lower-case
        // copy of a secret) stop the start rather than one winning by the environment's
        // order.
        let mut seen: std::collections::HashMap<String, (String, std::ffi::OsString)> =
            Default::default();
        for (name, value) in std::env::vars_os() {
            let Some(key) = name
                .to_str()
                .and_then(|name| name.get(..9).zip(name.get(9..)))
                .filter(|(prefix, _)| prefix.eq_ignore_ascii_case("STAMPEDE_"))
                .map(|(_, key)| key.to_ascii_lowercase())
                .filter(|key| not_typed.contains(&key.as_str()))
            else {
                continue;
            };
            let variable = name.to_string_lossy().into_owned();
            if let Some((other, earlier)) = seen.get(&key) {
                anyhow::ensure!(
                    *earlier == value,
                    "invalid configuration: {other} and {variable} name one setting with different values"
                );
                continue;
            }
            seen.insert(key.clone(), (variable.clone(), value.clone()));
            let Some(value) = value.to_str() else {
                anyhow::bail!("invalid configuration: {variable} is not UTF-8 text");
            };
            if key == "cluster" {
                // A switch, as environments spell them.
                let on = match value.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" | "on" => true,
                    "false" | "0" | "no" | "off" => false,
                    _ => anyhow::bail!(
                        "invalid configuration: {variable} is {value:?}; give true or false (1 or 0, yes or no, on or off)"
                    ),
                };
                figment = figment.merge(Serialized::default("cluster", on));
            } else if key == "admin_token" || key == "jwt_secret" {
                figment = figment.merge(Serialized::default(&key, value));
            } else {
                figment = figment.merge(Serialized::default(&key, value.trim()));
            }
        }
        figment = figment.merge(Serialized::globals(args));
        let mut config: Config = figment.extract().context("invalid configuration")?;
        config.config_file = args.config.clone();
        // Empty is unset, as for the database URLs: `STAMPEDE_NATS_URL=` must not turn
        // the outbox on with a relay that can never connect.
        config.nats_url = config.nats_url.take().filter(|url| !url.trim().is_empty());
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        const JWT_SECRET_MIN_BYTES: usize = 32;
        const ADMIN_TOKEN_MIN_BYTES: usize = 16;
        let token = |s: &str, extra: char| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == extra)
        };
        anyhow::ensure!(
            token(&self.nats_stream, '_'),
            "nats_stream must be letters, digits, '_' or '-'"
        );
        anyhow::ensure!(
            token(&self.nats_subject_prefix, '.')
                && !self.nats_subject_prefix.starts_with('.')
                && !self.nats_subject_prefix.ends_with('.'),
            "nats_subject_prefix must be dot-separated tokens of letters, digits, '_' or '-'"
        );
        if let Some(url) = &self.nats_url {
            // Found wrong at start, not by a relay retrying for ever while the outbox grows.
            stampede_relay::check_nats_url(url)
                .map_err(|e| anyhow::anyhow!("nats_url `{url}`: {e}"))?;
        }
        for (name, value) in [
            ("node_ttl", self.node_ttl),
            ("lease_idle", self.lease_idle),
            ("client_timeout", self.client_timeout),
            ("database_timeout", self.database_timeout),
            ("payment_timeout", self.payment_timeout),
            ("nats_duplicate_window", self.nats_duplicate_window),
        ] {
            // Longer is a typo, and would overflow the sums the server makes of them.
            anyhow::ensure!(
                value <= Duration::from_secs(DURATION_SETTING_MAX_DAYS * 86_400),
                "{name} must be at most {DURATION_SETTING_MAX_DAYS} day"
            );
        }
        anyhow::ensure!(
            self.nats_url.is_none()
                || (self.nats_duplicate_window >= Duration::from_secs(10)
                    && self.nats_duplicate_window > self.node_ttl + Duration::from_secs(5)),
            "nats_duplicate_window must be at least 10s and longer than node_ttl + 5s (a \
             relay's hand-over)"
        );
        // Unset or empty: one is generated.
        let long_enough = |secret: &Option<String>, min: usize| {
            secret
                .as_deref()
                .is_none_or(|secret| secret.is_empty() || secret.len() >= min)
        };
        // RFC 7518 §3.2: an HS256 key must be at least as long as the hash, 256 bits.
        anyhow::ensure!(
            long_enough(&self.jwt_secret, JWT_SECRET_MIN_BYTES),
            "jwt_secret must be at least {JWT_SECRET_MIN_BYTES} bytes: HS256 needs a key as long as its hash (RFC 7518); leave it unset and one is generated"
        );
        // The admin token opens every merchant call: 128 bits at least, so it cannot be
        // guessed in the time a promotion runs.
        anyhow::ensure!(
            long_enough(&self.admin_token, ADMIN_TOKEN_MIN_BYTES),
            "admin_token must be at least {ADMIN_TOKEN_MIN_BYTES} bytes; leave it unset and one is generated"
        );
        // Sent as `Authorization: Bearer <token>`: a header carries visible ASCII, and
        // the spaces around a value are not part of it. A token with a trailing newline
        // (a secret made from a file) or a space would start a server no call can use.
        anyhow::ensure!(
            self.admin_token
                .as_deref()
                .is_none_or(|token| token.bytes().all(|b| b.is_ascii_graphic())),
            "admin_token must be visible ASCII, with no spaces or line ends: it is sent as \
             `Authorization: Bearer <token>`"
        );
        anyhow::ensure!(
            self.node_ttl >= Duration::from_millis(500),
            "node_ttl must be at least 500ms"
        );
        anyhow::ensure!(self.lease_max >= 1, "lease_max must be at least 1");
        stampede_api::client::TrustedProxies::parse(&self.trusted_proxies)?;
        anyhow::ensure!(
            !(self.cluster && self.ack == Ack::Reserved),
            "a cluster acknowledges only durable orders: another node may hold a shopper's key or limit, which only the commit finds out"
        );
        anyhow::ensure!(
            !(self.cluster && self.stock_gate == StockGateKind::Redis),
            "a cluster leases its stock from the database; stock_gate = \"redis\" is for one node"
        );
        anyhow::ensure!(
            self.queue_capacity >= 1,
            "queue_capacity must be at least 1"
        );
        anyhow::ensure!(
            self.worker_threads.is_none_or(|n| (1..=1024).contains(&n)),
            "worker_threads must be within 1..=1024"
        );
        anyhow::ensure!(
            (1..=65_536).contains(&self.batch_size_max),
            "batch_size_max must be within 1..=65536"
        );
        anyhow::ensure!(
            self.payment_window >= Duration::from_millis(100),
            "payment_window must be at least 100ms"
        );
        anyhow::ensure!(
            self.database_timeout.is_zero() || self.database_timeout >= Duration::from_millis(10),
            "database_timeout must be 0s (none) or at least 10ms"
        );
        anyhow::ensure!(
            self.payment_timeout >= Duration::from_millis(10),
            "payment_timeout must be at least 10ms"
        );
        anyhow::ensure!(
            self.payment_window <= Duration::from_secs(PAYMENT_WINDOW_MAX_DAYS * 86_400),
            "payment_window must be at most {PAYMENT_WINDOW_MAX_DAYS} days"
        );
        check_payment_url(&self.payment_url)?;
        anyhow::ensure!(
            self.guard.version <= stampede_guard::rules::FILE_VERSION_MAX,
            "guard.version must be at most {}, leaving room for the admin API's changes after it",
            stampede_guard::rules::FILE_VERSION_MAX
        );
        anyhow::ensure!(
            (256..=1 << 20).contains(&self.body_limit_bytes),
            "body_limit_bytes must be within 256..=1048576"
        );
        anyhow::ensure!(
            (1..=1 << 20).contains(&self.max_connections),
            "max_connections must be within 1..=1048576"
        );
        anyhow::ensure!(
            self.client_timeout >= Duration::from_secs(1),
            "client_timeout must be at least 1s"
        );
        Ok(())
    }
}

/// The longest payment window taken: stock held for a shopper longer than this is stock
/// not sold, and an order's `expires_at` must stay a time the API can write.
const PAYMENT_WINDOW_MAX_DAYS: u64 = 30;

/// The longest timeout, heartbeat TTL, idle lease or duplicate window taken.
const DURATION_SETTING_MAX_DAYS: u64 = 1;

/// The payment provider's base URL must be one every pay can reach: `http://host[:port]`
/// with an optional path. Found wrong at start, not by every shopper's pay answering 502.
/// This build speaks plain HTTP to the provider (no TLS in the client): an `https://`
/// provider goes behind a local TLS-originating proxy.
fn check_payment_url(url: &str) -> anyhow::Result<()> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| anyhow::anyhow!("payment_url `{url}` is not a URL: {e}"))?;
    anyhow::ensure!(
        parsed.scheme() == "http",
        "payment_url `{url}` must start with http:// (this build has no TLS towards the provider; put a TLS-originating proxy in front of an https provider)"
    );
    anyhow::ensure!(
        parsed.host_str().is_some_and(|host| !host.is_empty()),
        "payment_url `{url}` has no host"
    );
    anyhow::ensure!(
        parsed.query().is_none() && parsed.fragment().is_none(),
        "payment_url `{url}` must not have a query or a fragment: the charge's path is added to it"
    );
    Ok(())
}

/// A key of the configuration file that no setting has (a typo such as
/// `queue_capactiy`) is refused, naming it, instead of leaving the default silently in
/// force. Only the file: the environment carries other programs' `STAMPEDE_*` too.
fn refuse_unknown_keys(path: &Path) -> anyhow::Result<()> {
    let known = serde_json::to_value(Config::default()).expect("the defaults serialise");
    let known = known.as_object().expect("settings are a table");
    let file: std::collections::BTreeMap<String, figment::value::Value> =
        Figment::from(Toml::file(path))
            .extract()
            .with_context(|| format!("read {}", path.display()))?;
    let unknown: Vec<&str> = file
        .keys()
        .map(String::as_str)
        .filter(|key| !known.contains_key(*key))
        .collect();
    anyhow::ensure!(
        unknown.is_empty(),
        "{}: unknown setting {} (see `stampede serve --help` and the README's configuration table)",
        path.display(),
        unknown
            .iter()
            .map(|key| format!("`{key}`"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut buffer = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buffer);
    buffer.iter().map(|b| format!("{b:02x}")).collect()
}

/// Returns the configured secret, or the one kept in `data_dir/file`, or generates,
/// keeps (mode 0600) and returns a new one. The bool says whether it was generated.
fn secret(configured: Option<&str>, data_dir: &Path, file: &str) -> anyhow::Result<(Secret, bool)> {
    if let Some(value) = configured.filter(|v| !v.is_empty()) {
        return Ok((Secret::new(value), false));
    }
    let path = data_dir.join(file);
    // Only a file that is not there is made: one that cannot be read (its owner, a
    // directory, bytes that are not text) is named in the error, never replaced.
    match std::fs::read_to_string(&path) {
        Ok(existing) => {
            let existing = existing.trim();
            anyhow::ensure!(!existing.is_empty(), "{} is empty", path.display());
            return Ok((Secret::new(existing), false));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    }
    // Written whole under a temporary name, synced, then linked into place and the
    // directory synced: a kill at any moment leaves either no secret (the next start
    // makes one) or the whole one, never an empty file that stops every later start.
    let value = random_hex(32);
    let temporary = data_dir.join(format!(".{file}.tmp"));
    let _ = std::fs::remove_file(&temporary); // left by a start killed mid-write
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut out = options
        .open(&temporary)
        .with_context(|| format!("create {}", temporary.display()))?;
    std::io::Write::write_all(&mut out, value.as_bytes())?;
    out.sync_all()?;
    drop(out);
    // A hard link fails if the name exists: a second start that made its own secret
    // meanwhile keeps it, and this one reads it back instead of replacing it.
    let linked = std::fs::hard_link(&temporary, &path);
    let _ = std::fs::remove_file(&temporary);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return secret(None, data_dir, file);
        }
        Err(e) => {
            return Err(e).with_context(|| format!("keep the new secret in {}", path.display()));
        }
    }
    std::fs::File::open(data_dir)
        .and_then(|dir| dir.sync_all())
        .with_context(|| format!("sync {}", data_dir.display()))?;
    Ok((Secret::new(value), true))
}

/// The JWT secret a server with this configuration uses: configured, or kept in the
/// data directory by the server's first start. None is made here: a secret made for a
/// data directory no server uses (a mistyped `--data-dir`, another working directory)
/// would sign tokens every server refuses.
pub fn jwt_secret(config: &Config) -> anyhow::Result<Secret> {
    if let Some(value) = config.jwt_secret.as_deref().filter(|v| !v.is_empty()) {
        return Ok(Secret::new(value));
    }
    let path = config.data_dir.join("jwt-secret");
    anyhow::ensure!(
        path.exists(),
        "no JWT secret: {} does not exist. Give the --data-dir of a server that has started once (it keeps its secret there), or set STAMPEDE_JWT_SECRET to the server's",
        path.display()
    );
    Ok(secret(None, &config.data_dir, "jwt-secret")?.0)
}

/// A running server.
pub struct Running {
    pub addr: SocketAddr,
    pub admin_token: Secret,
    pub jwt_secret: Secret,
    pub engine: Arc<Engine>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    /// Re-reads the configuration file's `[guard]` section when the file changes.
    reload: Option<tokio::task::JoinHandle<()>>,
    /// Takes up rules another node sharing the database changed (`follow_stored_rules`).
    follow: tokio::task::JoinHandle<()>,
    /// The outbox relay to NATS, when configured: its stop signal and task.
    relay: Option<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
    /// Held for the server's life: a second process on the same data directory (or
    /// SQLite file) would keep its own stock in memory and oversell.
    _locks: Vec<std::fs::File>,
}

/// Takes an exclusive lock on `data_dir/LOCK`, or says who holds the directory.
pub fn lock_data_dir(data_dir: &Path) -> anyhow::Result<std::fs::File> {
    lock_file(&data_dir.join("LOCK"), data_dir)
}

/// Takes the locks a writer of this configuration holds for its life: the data
/// directory's, and for SQLite the database file's (`<file>.lock` beside it), so two
/// servers with data directories of their own cannot write one `sqlite://` file.
pub fn lock_for_writing(config: &Config) -> anyhow::Result<Vec<std::fs::File>> {
    let mut locks = vec![lock_data_dir(&config.data_dir)?];
    if let Some(file) =
        stampede_store::sqlite_file(config.database_url.as_deref(), &config.data_dir)
    {
        let mut name = file.clone().into_os_string();
        name.push(".lock");
        locks.push(lock_file(Path::new(&name), &file)?);
    }
    Ok(locks)
}

/// How long a start waits for a lock another holder may be about to let go: a server
/// of the same process that just stopped, whose lock a child being spawned elsewhere in
/// the process still holds until it executes its program (the lock belongs to the open
/// file, which the child's copy of the descriptors keeps open that long), or a previous
/// process still exiting.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// An exclusive lock on `path`, held while the file is open, or an error saying that
/// another process serves `what` (still held after `LOCK_WAIT`).
fn lock_file(path: &Path, what: &Path) -> anyhow::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let started = std::time::Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if started.elapsed() < LOCK_WAIT => {
                // Blocks the caller's thread, only while contended and at most
                // LOCK_WAIT, once at start.
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "another stampede process is serving {}; two writers on one database would oversell",
                what.display()
            ),
            Err(std::fs::TryLockError::Error(error)) => {
                return Err(error).with_context(|| format!("lock {}", path.display()));
            }
        }
    }
}

impl Running {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Graceful stop: no new connections, in-flight requests finish, the writer drains.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.context("server task")??;
        self.stop_relay().await;
        Ok(())
    }

    /// Waits until the server stops (e.g. on a signal passed to `start`).
    pub async fn wait(mut self) -> anyhow::Result<()> {
        (&mut self.task).await.context("server task")??;
        self.stop_relay().await;
        Ok(())
    }

    /// After the writer drained: lets the relay finish its round (bounded), then stops it.
    /// Whatever it did not publish stays in the outbox for the next start.
    async fn stop_relay(&mut self) {
        if let Some((stop, task)) = self.relay.take() {
            let _ = stop.send(());
            if tokio::time::timeout(RELAY_STOP_WAIT, task).await.is_err() {
                tracing::warn!("outbox relay did not stop in time; its events stay in the outbox");
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(reload) = &self.reload {
            reload.abort();
        }
        self.follow.abort();
        if let Some((_, relay)) = &self.relay {
            relay.abort();
        }
    }
}

/// Opens the store, rebuilds the engine from it, binds and serves.
/// `shutdown` resolving stops the server gracefully (as does `Running::stop`).
pub async fn start(
    config: &Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(Running, bool)> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("create data directory {}", config.data_dir.display()))?;
    let locks = lock_for_writing(config)?;
    // Before anything records: the engine and the API register some metrics once per
    // process, and handles taken before the recorder exists would count nowhere.
    let metrics = stampede_api::metrics_handle();
    let (admin_token, admin_generated) = secret(
        config.admin_token.as_deref(),
        &config.data_dir,
        "admin-token",
    )?;
    let (jwt_secret, _) = secret(config.jwt_secret.as_deref(), &config.data_dir, "jwt-secret")?;

    let store = stampede_store::open(
        config.database_url.as_deref(),
        &config.data_dir,
        &config.store_options(),
    )
    .await
    .context("open the store")?;
    let engine_config = EngineConfig {
        queue_capacity: config.queue_capacity,
        batch_size_max: config.batch_size_max,
        payment_window_ms: config.payment_window.as_millis() as i64,
        // A payment may start until expires_at and lasts at most its wait to note the
        // charge attempt and one provider timeout; expiry waits for it (plus a second
        // for the writer) so the payer is not robbed; pacing rules on the `pay` route and on
        // `payment` add their longest waits (`Engine::set_payment_wait_max`).
        expiry_grace_ms: (stampede_engine::LEDGER_QUEUE_WAIT + config.payment_timeout).as_millis()
            as i64
            + 1_000,
        expiry_tick_ms: (config.payment_window.as_millis() as u64 / 20).clamp(10, 1_000),
        ack: match config.ack {
            Ack::Durable => AckMode::Durable,
            Ack::Reserved => AckMode::Reserved,
        },
        lease_max: config.lease_max,
        lease_idle_ms: config.lease_idle.as_millis() as i64,
        // Heartbeats well inside the time to live.
        cluster_tick_ms: (config.node_ttl.as_millis() as u64 / 5).clamp(100, 1_000),
        ..EngineConfig::default()
    };
    let relay_store = store.clone();
    let gate: Option<Arc<dyn stampede_engine::StockGate>> = match config.stock_gate {
        StockGateKind::Memory => None,
        StockGateKind::Redis => Some(Arc::new(
            stampede_store::RedisGate::connect(&config.redis_url, &config.redis_prefix)
                .await
                .with_context(|| format!("connect the stock gate at {}", config.redis_url))?,
        )),
    };
    let engine = Arc::new(
        Engine::open_with_gate(store, Arc::new(SystemClock), engine_config, gate)
            .await
            .context("rebuild state from the store")?,
    );
    let (rules, to_keep) = guard_rules(config, &engine).await?;
    let longest = stampede_api::longest_answer(&rules, config.payment_timeout);
    anyhow::ensure!(
        longest <= config.client_timeout,
        "client_timeout ({:?}) must be at least {longest:?}, the longest a request may wait \
         for its answer on the server's own account under the guard rules (paced waits, \
         payment_timeout, a refusal held up to guard.system.hold_refused), so no such \
         request is cut off",
        config.client_timeout
    );
    // A pay the pacing rules hold back (the `pay` route's, then the `payment`
    // resource's) must not be overtaken by its order's expiry: the grace grows by their
    // longest waits (again on every rules change).
    engine.set_payment_wait_max(stampede_api::pay_held_max(&rules));
    let invalid = |errors: Vec<stampede_guard::RuleError>| {
        let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("invalid guard rules: {}", all.join("; "))
    };
    stampede_api::check_rules(&rules).map_err(invalid)?;
    if let Some(KeepOver(over)) = to_keep {
        keep_configured_rules(&engine, &rules, over).await;
    }
    let guard = stampede_guard::Guard::new(rules).map_err(invalid)?;
    engine.guard_commits(Arc::new(stampede_api::database::GuardedDatabase {
        guard: guard.clone(),
    }));
    let payments: Arc<stampede_api::payment::GuardedPayments> =
        Arc::new(stampede_api::payment::GuardedPayments::new(
            Arc::new(stampede_api::payment::HttpPayments::new(
                &config.payment_url,
                config.payment_timeout,
            )),
            guard.clone(),
        ));
    // Refunds the charge ledger says are owed (orders that closed unpaid after a charge
    // attempt, before this start) are made now, not at the first pay.
    engine.use_payments(payments.clone());
    let state = AppState(Arc::new(stampede_api::App {
        engine: engine.clone(),
        auth: Auth::new(admin_token.clone(), &jwt_secret),
        payments,
        metrics,
        openapi: Arc::from(stampede_api::openapi_json()),
        guarded: stampede_api::GuardedRoutes::new(&guard),
        guard,
        rules_change: tokio::sync::Mutex::new(()),
        proxies: stampede_api::client::TrustedProxies::parse(&config.trusted_proxies)?,
        client_timeout: config.client_timeout,
        payment_timeout: config.payment_timeout,
        database_timeout: config.database_timeout,
    }));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let reload = config
        .config_file
        .clone()
        .map(|path| tokio::spawn(watch_guard_rules(path, config.clone(), state.clone())));
    let follow = tokio::spawn(follow_stored_rules(state.clone()));
    let relay = config.nats_url.as_ref().map(|url| {
        let relay_config = stampede_relay::RelayConfig {
            stream: config.nats_stream.clone(),
            subject_prefix: config.nats_subject_prefix.clone(),
            duplicate_window: config.nats_duplicate_window,
            ..stampede_relay::RelayConfig::new(url.clone())
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(stampede_relay::Relay::connect_and_run(
            relay_store,
            relay_config,
            async move {
                let _ = stopped.await;
            },
        ));
        (stop, task)
    });
    let (stop, stopped) = oneshot::channel::<()>();
    let limits = stampede_api::ConnectionLimits {
        body_limit_bytes: config.body_limit_bytes,
        max_connections: config.max_connections,
        client_timeout: config.client_timeout,
    };
    let task = tokio::spawn(stampede_api::serve(listener, state, limits, async move {
        tokio::select! {
            _ = stopped => {}
            _ = shutdown => {}
        }
    }));
    Ok((
        Running {
            addr,
            admin_token,
            jwt_secret,
            engine,
            stop: Some(stop),
            task,
            reload,
            follow,
            relay,
            _locks: locks,
        },
        admin_generated,
    ))
}

/// How long a stopping server waits for the relay's last round.
const RELAY_STOP_WAIT: Duration = Duration::from_secs(5);

/// How often the configuration file is checked for a new `[guard]` section.
pub const GUARD_RELOAD_EVERY: Duration = Duration::from_secs(1);

/// Every `RULES_FOLLOWED_EVERY`, takes up the guard rules kept in the store when another
/// node sharing the database made them newer (its admin API or its file), so one change
/// reaches every node of a cluster.
async fn follow_stored_rules(state: AppState) {
    loop {
        tokio::time::sleep(stampede_api::handlers::RULES_FOLLOWED_EVERY).await;
        match stampede_api::handlers::follow_stored_rules(&state).await {
            Ok(_) => {}
            // Newer rules this node cannot run: it stays on older ones until they change.
            Err(e) if e.status.as_u16() == 409 => {
                tracing::error!(error = %e.message, "not following the stored guard rules")
            }
            Err(e) => {
                tracing::debug!(error = %e.message, "could not read the stored guard rules; trying again")
            }
        }
    }
}

/// Hot reload: when the configuration file changes and its `[guard]` section carries a
/// higher version than the running rules, they are validated, kept in the store and
/// swapped in, exactly as an admin API change. A lower or equal version is left alone
/// (the running rules were changed through the API since), and logged.
async fn watch_guard_rules(path: PathBuf, running: Config, state: AppState) {
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let mut seen = modified(&path);
    loop {
        tokio::time::sleep(GUARD_RELOAD_EVERY).await;
        let now = modified(&path);
        if now == seen {
            continue;
        }
        seen = now;
        // A file the next start would refuse is not half taken now: its rules would be
        // live until the restart that then fails.
        if let Err(e) = would_start_with(&path, &running) {
            tracing::error!(file = %path.display(), error = %format!("{e:#}"), "the configuration file would be refused at start; guard rules unchanged");
            continue;
        }
        let rules = Figment::from(Serialized::default(
            "guard",
            stampede_guard::GuardRules::default(),
        ))
        .merge(Toml::file(&path))
        .focus("guard")
        .extract::<stampede_guard::GuardRules>();
        let rules = match rules {
            Ok(rules) => rules,
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "the [guard] section cannot be read; rules unchanged");
                continue;
            }
        };
        let current = state.guard.rules().version;
        if rules.version <= current {
            tracing::info!(file = %path.display(), file_version = rules.version, current, "the file's guard rules are not newer; unchanged");
            continue;
        }
        match stampede_api::handlers::reload_rules(&state, rules).await {
            Ok(rules) => tracing::info!(
                version = rules.version,
                "guard rules reloaded from the file"
            ),
            Err(e) if e.status.as_u16() == 503 => {
                // The store could not keep them in time: tried again at the next look,
                // not only once the file changes again.
                seen = None;
                tracing::warn!(file = %path.display(), error = %e.message, "the file's guard rules could not be kept; trying again")
            }
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e.message, "the file's guard rules were refused; unchanged")
            }
        }
    }
}

/// Whether a server could start with the configuration file at `path` as it now reads:
/// no unknown setting, every value of the right type and valid. The running
/// configuration stands in for what the environment and the flags gave at start.
fn would_start_with(path: &Path, running: &Config) -> anyhow::Result<()> {
    refuse_unknown_keys(path)?;
    let config: Config = Figment::from(Serialized::defaults(running))
        .merge(Toml::file(path))
        .extract()
        .context("invalid configuration")?;
    config.validate()
}

/// The rules the guard starts with: those kept in the store (changed through the admin
/// API) unless the configuration carries a higher version; then also the stored copy
/// the configured ones are to be kept over once checked (`keep_configured_rules`).
async fn guard_rules(
    config: &Config,
    engine: &Engine,
) -> anyhow::Result<(stampede_guard::GuardRules, Option<KeepOver>)> {
    let text = engine
        .store()
        .load_setting(stampede_api::handlers::GUARD_RULES_KEY)
        .await
        .context("read the guard rules")?;
    let stored = match text
        .as_deref()
        .map(serde_json::from_str::<stampede_guard::GuardRules>)
    {
        None => None,
        Some(Ok(mut rules)) => {
            // Kept by an earlier version, which took a burst on a pacing or
            // concurrency-only rule and ignored it: dropped, the rules act the same.
            for rule in &mut rules.flow {
                if rule.burst != 1 && rule.takes_no_burst() {
                    tracing::warn!(resource = %rule.resource, burst = rule.burst, "the stored guard rules give a burst this rule never used; dropped");
                    rule.burst = 1;
                }
            }
            match stampede_api::check_rules(&rules) {
                Ok(()) => Some(rules),
                // Kept by an earlier version that accepted rules this one refuses (names
                // nothing asks): starting with the configured ones beats refusing to
                // start at all.
                Err(errors) => {
                    let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
                    tracing::error!(errors = %all.join("; "), "the stored guard rules are not valid here; using the configured ones");
                    None
                }
            }
        }
        Some(Err(e)) => {
            tracing::error!(error = %e, "the stored guard rules cannot be read; using the configured ones");
            None
        }
    };
    let stored_version = stored.as_ref().map(|rules| rules.version);
    if let Some(rules) = stored
        && rules.version >= config.guard.version
    {
        return Ok((rules, None));
    }
    // The file's rules win. Once the start has checked them they are kept in the store
    // too, over the copy read (nothing, or an older version), so that nodes sharing the
    // database take them up and a later change on another node is made against them. A
    // copy this release cannot read or run is another release's, and is left.
    let older = text.is_none() || stored_version.is_some_and(|v| v < config.guard.version);
    Ok((config.guard.clone(), older.then_some(KeepOver(text))))
}

/// Configured rules that won at the start are to be kept in the store over this copy
/// of the stored rules (none: nothing was stored).
struct KeepOver(Option<String>);

/// Keeps the configured rules `rules`, which won at the start and passed its checks, in
/// the store over the copy read then (`over`). Another node may store rules meanwhile:
/// while what it stored is older, this node's are saved over it; a newer copy is taken
/// up by `follow_stored_rules` within 2 s.
async fn keep_configured_rules(
    engine: &Engine,
    rules: &stampede_guard::GuardRules,
    mut over: Option<String>,
) {
    let json = serde_json::to_string(rules).expect("rules serialise");
    let store = engine.store();
    for _ in 0..3 {
        match store
            .save_setting_if(
                stampede_api::handlers::GUARD_RULES_KEY,
                &json,
                over.as_deref(),
            )
            .await
        {
            Ok(true) => return,
            Ok(false) => {}
            Err(error) => {
                tracing::debug!(%error, "the configured guard rules are not kept in the store");
                return;
            }
        }
        over = match store
            .load_setting(stampede_api::handlers::GUARD_RULES_KEY)
            .await
        {
            Ok(text) => text,
            Err(error) => {
                tracing::warn!(%error, "the configured guard rules could not be kept in the store");
                return;
            }
        };
        match over
            .as_deref()
            .map(serde_json::from_str::<stampede_guard::GuardRules>)
        {
            None => {}
            Some(Ok(stored)) if stored.version < rules.version => {}
            Some(Ok(stored)) => {
                tracing::warn!(
                    stored = stored.version,
                    configured = rules.version,
                    "another node stored guard rules as new as the configured ones \
                     meanwhile; a newer version is taken up, the same version is not"
                );
                return;
            }
            Some(Err(error)) => {
                tracing::warn!(%error, "another release stored guard rules meanwhile; left");
                return;
            }
        }
    }
    tracing::warn!(
        "the configured guard rules could not be kept in the store: other nodes kept changing them"
    );
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    tracing::info!("shutdown signal received; draining");
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail speaks figment::Error
mod tests {
    use super::*;

    fn load(args: &ServeArgs) -> figment::error::Result<Config> {
        Config::load(args).map_err(|e| figment::Error::from(format!("{e:#}")))
    }

    #[test]
    fn layers_apply_file_then_environment_then_flags() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "stampede.toml",
                r#"
                    listen = "127.0.0.1:9001"
                    payment_window = "30s"
                    queue_capacity = 100
                    batch_size_max = 10
                "#,
            )?;
            jail.set_env("STAMPEDE_QUEUE_CAPACITY", "200");
            jail.set_env("STAMPEDE_ACK", "reserved");
            jail.set_env("STAMPEDE_BATCH_SIZE_MAX", "15");
            let args = ServeArgs {
                config: Some("stampede.toml".into()),
                batch_size_max: Some(20),
                ..ServeArgs::default()
            };
            let config = load(&args)?;
            assert_eq!(config.listen.port(), 9001, "from the file");
            assert_eq!(
                config.payment_window,
                Duration::from_secs(30),
                "from the file"
            );
            assert_eq!(config.queue_capacity, 200, "the environment beats the file");
            assert_eq!(config.ack, Ack::Reserved, "from the environment");
            assert_eq!(config.batch_size_max, 20, "a flag beats both");
            assert_eq!(
                config.body_limit_bytes,
                Config::default().body_limit_bytes,
                "default"
            );
            Ok(())
        });
    }

    /// A secret in the environment is the text as given: digits stay a string, quotes
    /// and spaces stay in it.
    #[test]
    fn secrets_in_the_environment_are_taken_as_text() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("STAMPEDE_ADMIN_TOKEN", "2024111120241111");
            jail.set_env(
                "STAMPEDE_JWT_SECRET",
                "\"quoted\" secret of 32 bytes or more ",
            );
            let config = load(&ServeArgs::default())?;
            assert_eq!(config.admin_token.as_deref(), Some("2024111120241111"));
            assert_eq!(
                config.jwt_secret.as_deref(),
                Some("\"quoted\" secret of 32 bytes or more ")
            );
            let refused_saying = |reason: &str| {
                let error = load(&ServeArgs::default()).unwrap_err().to_string();
                assert!(error.contains(reason), "{error}");
            };
            // Shorter than HS256's hash: refused, with the reason.
            jail.set_env("STAMPEDE_JWT_SECRET", "short");
            refused_saying("jwt_secret must be at least 32 bytes");
            jail.set_env("STAMPEDE_JWT_SECRET", "[1, 2] and enough bytes to be a key");
            // An admin token under 128 bits: refused, with the reason.
            jail.set_env("STAMPEDE_ADMIN_TOKEN", "letmein");
            refused_saying("admin_token must be at least 16 bytes");
            // One no request could present: refused, not a server no call can use.
            for unusable in [
                "a-token-of-16-bytes-or-more\n",
                " a-token-of-16-bytes-or-more",
                "a token of 16 bytes or more",
                "a-token-of-16-bytes-or-moré",
            ] {
                jail.set_env("STAMPEDE_ADMIN_TOKEN", unusable);
                refused_saying("admin_token must be visible ASCII");
            }
            jail.set_env("STAMPEDE_ADMIN_TOKEN", "1.50000000000000");
            let config = load(&ServeArgs::default())?;
            assert_eq!(config.admin_token.as_deref(), Some("1.50000000000000"));
            assert_eq!(
                config.jwt_secret.as_deref(),
                Some("[1, 2] and enough bytes to be a key")
            );
            Ok(())
        });
    }

    /// Every text setting in the environment is the text as given (a Redis prefix or a
    /// NATS stream named `2024` used to stop the start: figment read it as a number),
    /// and the cluster switch takes what environments spell.
    #[test]
    fn text_settings_in_the_environment_stay_text() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("STAMPEDE_REDIS_PREFIX", "123");
            jail.set_env("STAMPEDE_NATS_STREAM", "2024");
            jail.set_env("STAMPEDE_NATS_SUBJECT_PREFIX", "11.11");
            jail.set_env("STAMPEDE_DATA_DIR", "2024");
            jail.set_env("STAMPEDE_LOG", "true");
            jail.set_env("STAMPEDE_CLUSTER", "1");
            jail.set_env("STAMPEDE_DATABASE_TIMEOUT", "0");
            jail.set_env("stampede_redis_url", " redis://cache.example:6379 ");
            jail.set_env("Stampede_Redis_Url", " redis://cache.example:6379 ");
            let config = load(&ServeArgs::default())?;
            assert_eq!(config.database_timeout, Duration::ZERO);
            assert_eq!(config.redis_url, "redis://cache.example:6379");
            assert_eq!(config.redis_prefix, "123");
            assert_eq!(config.nats_stream, "2024");
            assert_eq!(config.nats_subject_prefix, "11.11");
            assert_eq!(config.data_dir, PathBuf::from("2024"));
            assert_eq!(config.log, "true");
            assert!(config.cluster);
            for (value, on) in [("0", false), ("true", true), ("OFF", false), ("yes", true)] {
                jail.set_env("STAMPEDE_CLUSTER", value);
                assert_eq!(load(&ServeArgs::default())?.cluster, on, "{value}");
            }
            jail.set_env("STAMPEDE_CLUSTER", "maybe");
            let error = load(&ServeArgs::default()).unwrap_err().to_string();
            assert!(error.contains("STAMPEDE_CLUSTER"), "{error}");
            jail.set_env("STAMPEDE_CLUSTER", "0");
            // Two spellings of one name that disagree stop the start.
            jail.set_env(
                "stampede_jwt_secret",
                "an old secret of thirty-two bytes or more",
            );
            jail.set_env(
                "STAMPEDE_JWT_SECRET",
                "the new secret of thirty-two bytes or more",
            );
            let error = load(&ServeArgs::default()).unwrap_err().to_string();
            assert!(
                error.contains("name one setting with different values"),
                "{error}"
            );
            // Every text key is one of the configuration's (a misspelt one would be
            // ignored here and read as typed).
            let keys = serde_json::to_value(Config::default()).unwrap();
            for key in Config::TEXT_KEYS {
                assert!(keys.get(key).is_some(), "{key} is not a setting");
            }
            Ok(())
        });
    }

    #[test]
    fn bad_configuration_is_refused_with_the_key_named() {
        figment::Jail::expect_with(|jail| {
            let missing = ServeArgs {
                config: Some("nope.toml".into()),
                ..ServeArgs::default()
            };
            assert!(
                load(&missing)
                    .unwrap_err()
                    .to_string()
                    .contains("nope.toml")
            );
            let zero = ServeArgs {
                queue_capacity: Some(0),
                ..ServeArgs::default()
            };
            assert!(
                load(&zero)
                    .unwrap_err()
                    .to_string()
                    .contains("queue_capacity")
            );
            jail.create_file(
                "typo.toml",
                "queue_capactiy = 64\nlisten = \"127.0.0.1:9001\"\n[guard]\nversion = 0\n",
            )?;
            let typo = ServeArgs {
                config: Some("typo.toml".into()),
                ..ServeArgs::default()
            };
            let error = load(&typo).unwrap_err().to_string();
            assert!(error.contains("`queue_capactiy`"), "{error}");
            assert!(
                !error.contains("`listen`") && !error.contains("`guard`"),
                "{error}"
            );
            // A file's guard version leaves room for the admin API's changes after it.
            jail.create_file("far.toml", "[guard]\nversion = 9007199254740991\n")?;
            let far = ServeArgs {
                config: Some("far.toml".into()),
                ..ServeArgs::default()
            };
            let error = load(&far).unwrap_err().to_string();
            assert!(error.contains("guard.version must be at most"), "{error}");
            jail.set_env("STAMPEDE_CLIENT_TIMEOUT", "0s");
            let error = load(&ServeArgs::default()).unwrap_err().to_string();
            assert!(error.contains("client_timeout must be at least"), "{error}");
            jail.set_env("STAMPEDE_CLIENT_TIMEOUT", "150s");
            let too_short = ServeArgs {
                database_timeout: Some("5ms".into()),
                ..ServeArgs::default()
            };
            let error = load(&too_short).unwrap_err().to_string();
            assert!(error.contains("database_timeout must be"), "{error}");
            let none = ServeArgs {
                database_timeout: Some("0s".into()),
                ..ServeArgs::default()
            };
            assert_eq!(load(&none).unwrap().store_options().statement_timeout, None);
            assert_eq!(
                load(&ServeArgs::default())
                    .unwrap()
                    .store_options()
                    .statement_timeout,
                Some(Duration::from_secs(5))
            );
            jail.set_env("STAMPEDE_PAYMENT_WINDOW", "soon");
            let error = load(&ServeArgs::default()).unwrap_err().to_string();
            assert!(error.to_lowercase().contains("payment_window"), "{error}");
            jail.set_env("STAMPEDE_PAYMENT_WINDOW", "200000000d");
            let error = load(&ServeArgs::default()).unwrap_err().to_string();
            assert!(error.contains("payment_window must be at most"), "{error}");
            jail.set_env("STAMPEDE_PAYMENT_WINDOW", "15m");
            for bad in [
                "notaurl",
                "ftp://127.0.0.1:8090",
                "https://pay.example",
                "http://127.0.0.1:8090/?x=1",
            ] {
                jail.set_env("STAMPEDE_PAYMENT_URL", bad);
                let error = load(&ServeArgs::default()).unwrap_err().to_string();
                assert!(error.contains("payment_url"), "{bad}: {error}");
            }
            jail.set_env("STAMPEDE_PAYMENT_URL", "http://payments.internal:8090/v2/");
            assert!(load(&ServeArgs::default()).is_ok());
            jail.set_env("STAMPEDE_PAYMENT_URL", "http://127.0.0.1:8090");
            // The duplicate window must outlast a relay's hand-over; it only matters
            // with a stream to publish to.
            let short_window = ServeArgs {
                nats_duplicate_window: Some("5s".into()),
                ..ServeArgs::default()
            };
            assert!(
                load(&short_window).is_ok(),
                "no NATS, no stream to configure"
            );
            jail.set_env("STAMPEDE_NATS_URL", "nats://127.0.0.1:4222");
            let error = load(&short_window).unwrap_err().to_string();
            assert!(error.contains("nats_duplicate_window must be"), "{error}");
            let window = ServeArgs {
                nats_duplicate_window: Some("10m".into()),
                ..ServeArgs::default()
            };
            assert_eq!(
                load(&window).unwrap().nats_duplicate_window,
                Duration::from_secs(600)
            );
            // A duration past a day is refused, not overflowed into a panic (the
            // duplicate window's check adds to the node TTL).
            jail.set_env("STAMPEDE_NODE_TTL", "584542046090y");
            let error = load(&ServeArgs::default()).unwrap_err().to_string();
            assert!(error.contains("node_ttl must be at most"), "{error}");
            jail.set_env("STAMPEDE_NODE_TTL", "5s");
            jail.set_env("STAMPEDE_PAYMENT_TIMEOUT", "2d");
            let error = load(&ServeArgs::default()).unwrap_err().to_string();
            assert!(error.contains("payment_timeout must be at most"), "{error}");
            jail.set_env("STAMPEDE_PAYMENT_TIMEOUT", "2s");
            // A NATS URL that is not one is refused at start (a list too: the relay
            // connects to one server); an empty one is unset (no outbox), as an empty
            // database URL is.
            for bad in [
                "nats://bad host:4222",
                "nats://a:4222,b:4223",
                "http://a:4222",
            ] {
                jail.set_env("STAMPEDE_NATS_URL", bad);
                let error = load(&ServeArgs::default()).unwrap_err().to_string();
                assert!(error.contains("nats_url"), "{bad}: {error}");
            }
            jail.set_env("STAMPEDE_NATS_URL", "nats.internal:4222");
            assert!(load(&ServeArgs::default()).is_ok());
            jail.set_env("STAMPEDE_NATS_URL", "");
            let config = load(&ServeArgs::default()).unwrap();
            assert_eq!(config.nats_url, None);
            assert!(!config.store_options().outbox);
            Ok(())
        });
    }

    /// Every setting is in the README's configuration table, and every one that may be
    /// given as a flag (all but the secrets, and the `[guard]` section) is in
    /// `stampede serve --help`, so neither can fall behind the code.
    #[test]
    fn every_setting_is_documented_in_the_readme_and_in_help() {
        use clap::Args;
        let defaults = serde_json::to_value(Config::default()).unwrap();
        let settings: Vec<&String> = defaults.as_object().unwrap().keys().collect();
        assert!(settings.len() > 20, "{settings:?}");
        let readme = repo_file("README.md");
        let help = ServeArgs::augment_args(clap::Command::new("serve"))
            .render_long_help()
            .to_string();
        for key in settings {
            if key != "guard" {
                assert!(
                    readme.contains(&format!("| `{key}` |")),
                    "README's table lacks `{key}`"
                );
            }
            if !matches!(key.as_str(), "guard" | "admin_token" | "jwt_secret") {
                let flag = format!("--{}", key.replace('_', "-"));
                assert!(help.contains(&flag), "`serve --help` lacks {flag}");
            }
        }
    }

    fn repo_file(path: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(path);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    /// The Kubernetes manifest's environment is a configuration `serve` accepts, and
    /// it runs the nodes as a cluster with the probes on the health endpoints.
    #[test]
    fn the_kubernetes_manifest_configures_a_cluster() {
        let manifest = repo_file("deploy/k8s/stampede.yaml");
        for kind in [
            "kind: Deployment",
            "kind: Service",
            "kind: HorizontalPodAutoscaler",
            "kind: PodDisruptionBudget",
            "path: /readyz",
            "path: /healthz",
            "name: cpu",
        ] {
            assert!(manifest.contains(kind), "the manifest lacks {kind:?}");
        }
        // `- name: STAMPEDE_X` then `value: "…"` (or a secret, given a test value here).
        let lines: Vec<&str> = manifest.lines().map(str::trim).collect();
        let mut env = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            let Some(name) = line.strip_prefix("- name: STAMPEDE_") else {
                continue;
            };
            let value = match lines.get(i + 1).and_then(|l| l.strip_prefix("value: ")) {
                Some(value) => value.trim_matches('"').to_owned(),
                None if name == "DATABASE_URL" => "postgres://stampede@db.example/stampede".into(),
                None => "a-test-secret-0123456789abcdef-0123456789".into(),
            };
            env.push((format!("STAMPEDE_{name}"), value));
        }
        assert!(env.len() >= 5, "{env:?}");
        figment::Jail::expect_with(|jail| {
            for (name, value) in &env {
                jail.set_env(name, value);
            }
            let config = load(&ServeArgs::default())?;
            assert!(config.cluster);
            assert_eq!(config.listen.to_string(), "0.0.0.0:8080");
            assert_eq!(config.node_ttl, Duration::from_secs(5));
            assert!(config.store_options().cluster_node_ttl.is_some());
            Ok(())
        });
    }

    /// The image builds with a toolchain the workspace accepts.
    #[test]
    fn the_dockerfile_builds_with_a_supported_toolchain() {
        let dockerfile = repo_file("Dockerfile");
        let image: Vec<u32> = dockerfile
            .lines()
            .find_map(|line| line.strip_prefix("FROM rust:"))
            .and_then(|rest| rest.split('-').next())
            .expect("a FROM rust:<version> line")
            .split('.')
            .map(|part| part.parse().expect("numeric version"))
            .collect();
        let workspace = repo_file("Cargo.toml");
        let needed: Vec<u32> = workspace
            .lines()
            .find_map(|line| line.strip_prefix("rust-version = "))
            .expect("rust-version")
            .trim_matches('"')
            .split('.')
            .map(|part| part.parse().expect("numeric version"))
            .collect();
        assert!(
            image >= needed,
            "image rust {image:?} < rust-version {needed:?}"
        );
        assert!(dockerfile.contains("STAMPEDE_LISTEN=0.0.0.0:8080"));
    }
}

#[cfg(test)]
mod secrets {
    use super::*;

    #[test]
    fn a_generated_secret_is_kept_whole_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        // What a start killed mid-write leaves: a partial temporary file. It is no
        // obstacle, and no empty secret file is ever left.
        std::fs::write(dir.path().join(".jwt-secret.tmp"), "3f").unwrap();
        let (first, generated) = secret(None, dir.path(), "jwt-secret").unwrap();
        assert!(generated);
        assert_eq!(first.expose().len(), 64);
        assert!(!dir.path().join(".jwt-secret.tmp").exists());
        let kept = dir.path().join("jwt-secret");
        assert_eq!(std::fs::read_to_string(&kept).unwrap(), first.expose());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&kept).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // The next start reads it; a configured one wins and is not written.
        let (again, generated) = secret(None, dir.path(), "jwt-secret").unwrap();
        assert_eq!((again.expose(), generated), (first.expose(), false));
        let (configured, generated) = secret(Some("set"), dir.path(), "jwt-secret").unwrap();
        assert_eq!((configured.expose(), generated), ("set", false));
        assert_eq!(std::fs::read_to_string(&kept).unwrap(), first.expose());
    }

    /// A secret file that is there but cannot be read is an error naming it, never
    /// replaced (the start used to retry its own creation without end).
    #[test]
    fn an_unreadable_secret_file_is_an_error_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let kept = dir.path().join("jwt-secret");
        std::fs::write(&kept, [0xff, 0xfe, 0x00]).unwrap();
        let error = format!("{:#}", secret(None, dir.path(), "jwt-secret").unwrap_err());
        assert!(error.contains("jwt-secret"), "{error}");
        assert_eq!(std::fs::read(&kept).unwrap(), [0xff, 0xfe, 0x00]);
        std::fs::remove_file(&kept).unwrap();
        std::fs::create_dir(&kept).unwrap();
        let error = format!("{:#}", secret(None, dir.path(), "jwt-secret").unwrap_err());
        assert!(error.contains("jwt-secret"), "{error}");
        assert!(kept.is_dir());
    }
}
