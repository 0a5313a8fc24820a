//! `stampede press`: pressure tests of a Stampede server that model user paths, hold an
//! arrival rate without coordinated omission, find the capacity against an SLO, read
//! the server's own saturation on the same timeline, and check the books afterwards.
//!
//! It talks to the server only through its public HTTP API.

pub mod books;
pub mod capacity;
pub mod html;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod schedule;
pub mod server;
pub mod stats;
pub mod template;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use hyper::header::HeaderValue;

use crate::books::{Books, HttpLedger, SaleRef};
use crate::capacity::{Capacity, Probe, SearchLimits};
use crate::report::{
    Generator, RefusedSecond, Report, Second, Sessions, StepReport, ThresholdResult,
};
use crate::runner::{Inputs, RunSpec, Target, slot};
use crate::scenario::{Auth, Plan, Thresholds};
use crate::schedule::Model;
use crate::server::ClientSecond;
use crate::stats::{Interval, LatencyMs, StepStats, new_histogram};

/// CPU time (user + system) this process has used, in seconds.
pub fn cpu_seconds() -> f64 {
    cpu_time::ProcessTime::now().as_duration().as_secs_f64()
}

/// A rate such as `2000`, `2000/s` or `583000/s`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate(pub f64);

/// The highest arrival rate a run may ask for: well above what one generator sends
/// (a few hundred thousand a second), low enough that a typo (`2e30/s`) is refused
/// instead of scheduling more sessions than a `u64` counts.
pub const RATE_MAX: f64 = 10_000_000.0;

/// The most connections one run opens: each is a file descriptor here and one on the
/// server, and all are opened before the clock starts.
pub const CONNECTIONS_MAX: usize = 65_536;

/// `2000/s` or `2000`: a positive, finite number of arrivals a second.
fn positive_rate(s: &str) -> Result<f64, String> {
    let value: f64 = s
        .trim()
        .trim_end_matches("/s")
        .parse()
        .map_err(|_| format!("`{s}` is not a rate (e.g. 2000/s)"))?;
    if !(value > 0.0 && value.is_finite()) {
        return Err(format!("rate `{s}` must be positive"));
    }
    Ok(value)
}

impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let value = positive_rate(s)?;
        if value > RATE_MAX {
            return Err(format!(
                "rate `{s}` must be positive and at most {RATE_MAX}/s"
            ));
        }
        Ok(Rate(value))
    }
}

/// A peak to size a cluster for: any positive rate, since nothing is scheduled at it.
fn parse_peak(s: &str) -> Result<Rate, String> {
    positive_rate(s).map(Rate)
}

/// A share such as `0.1%` or `0.001`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Share(pub f64);

impl std::str::FromStr for Share {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let value = match s.strip_suffix('%') {
            Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
            None => s.parse::<f64>(),
        }
        .map_err(|_| format!("`{s}` is not a share (e.g. 0.1% or 0.001)"))?;
        if !(0.0..=1.0).contains(&value) {
            return Err(format!("share `{s}` must be within 0%..=100%"));
        }
        Ok(Share(value))
    }
}

fn parse_var(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .ok_or_else(|| format!("`{s}` is not NAME=VALUE"))
}

/// Options of one pressure run.
#[derive(Debug, Clone, clap::Args)]
pub struct PressArgs {
    /// Base URL of the server under test.
    #[arg(
        long,
        env = "STAMPEDE_PRESS_TARGET",
        default_value = "http://127.0.0.1:8080"
    )]
    pub target: String,
    /// A built-in scenario (healthz, flash-sale, browse, mixed-day) or a TOML file.
    #[arg(long, default_value = "healthz")]
    pub scenario: String,
    /// Open model: sessions started per second, e.g. 2000/s.
    #[arg(long, conflicts_with = "vus")]
    pub rate: Option<Rate>,
    /// Closed model: virtual users running sessions back to back.
    #[arg(long)]
    pub vus: Option<usize>,
    /// Rise from 0 to the rate (or start the users evenly) over this long.
    #[arg(long)]
    pub ramp: Option<humantime::Duration>,
    /// How long to hold the rate or the users.
    #[arg(long)]
    pub duration: Option<humantime::Duration>,
    /// Generator threads, each with its own event loop (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// TCP connections across all threads.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Sessions in flight at most. Open model: later arrivals wait, and the wait counts;
    /// closed model: at least `--vus` (each user is one session for the whole run).
    #[arg(long, default_value_t = 100_000)]
    pub max_sessions: usize,
    /// Per-request timeout.
    #[arg(long, default_value = "10s")]
    pub timeout: humantime::Duration,
    /// How long sessions may still run after the last arrival.
    #[arg(long, default_value = "30s")]
    pub drain: humantime::Duration,
    /// Write the JSON report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the self-contained HTML report here.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// The server's admin token (sale setup, audit, order lookups).
    #[arg(long, env = "STAMPEDE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// The server's JWT secret, to mint shopper tokens.
    #[arg(long, env = "STAMPEDE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Read the admin token and JWT secret the server generated in this data directory
    /// when they are not given otherwise.
    #[arg(long)]
    pub secrets_from: Option<PathBuf>,
    /// Set a scenario variable, e.g. --var sale_id=sale_… to press an existing sale.
    #[arg(long = "var", value_parser = parse_var)]
    pub vars: Vec<(String, String)>,
    /// Fail the run when the overall p99 exceeds this (overrides the scenario's).
    #[arg(long)]
    pub slo_p99: Option<humantime::Duration>,
    /// Fail the run when more than this share of requests fail, e.g. 0.1%.
    #[arg(long)]
    pub max_error_rate: Option<Share>,
    /// Scrape the target's /metrics this often (0s: do not scrape).
    #[arg(long, default_value = "1s")]
    pub scrape_every: humantime::Duration,
    /// No live progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// On 429/503 with Retry-After: `honor` ends the session and, for virtual users,
    /// waits at least that long (up to 1.5×) before the next, as well-behaved clients
    /// do; `ignore` carries on at once.
    #[arg(long, value_enum, default_value = "ignore")]
    pub retry_after: RetryAfter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RetryAfter {
    Honor,
    Ignore,
}

impl PressArgs {
    /// Options as they would be written after `stampede press`, for runs built in code.
    pub fn parse_from<I, T>(args: I) -> Result<PressArgs, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            press: PressArgs,
        }
        let argv = std::iter::once(std::ffi::OsString::from("press"))
            .chain(args.into_iter().map(Into::into));
        <Wrapper as clap::Parser>::try_parse_from(argv).map(|w| w.press)
    }
}

/// Options of a capacity search.
#[derive(Debug, Clone, clap::Args)]
pub struct CapacityArgs {
    #[command(flatten)]
    pub press: PressArgs,
    /// Report how many nodes this peak needs, e.g. 583000/s (only sized for, never
    /// sent: no cap).
    #[arg(long, value_parser = parse_peak)]
    pub target_peak: Option<Rate>,
    /// Share of each node's capacity to keep free when sizing.
    #[arg(long, default_value_t = 0.3)]
    pub headroom: f64,
    /// First rate to try.
    #[arg(long, default_value = "500/s")]
    pub start_rate: Rate,
    /// Never try above this rate.
    #[arg(long, default_value = "1000000/s")]
    pub max_rate: Rate,
    /// Length of each probe.
    #[arg(long, default_value = "10s")]
    pub step_duration: humantime::Duration,
    /// Stop bisecting when the bracket is within this share.
    #[arg(long, default_value_t = 0.05)]
    pub precision: f64,
    /// At most this many probes.
    #[arg(long, default_value_t = 16)]
    pub max_probes: usize,
}

/// Everything a run needs, prepared before the clock starts.
struct Prepared {
    plan: Arc<Plan>,
    target: Target,
    model: Model,
    inputs: Arc<Inputs>,
    sale: Option<SaleRef>,
    thresholds: Thresholds,
    admin_token: Option<String>,
}

fn read_secret(dir: &Option<PathBuf>, name: &str) -> Option<String> {
    let path = dir.as_ref()?.join(name);
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn model_for(args: &PressArgs, plan: &Plan, rate_override: Option<f64>) -> anyhow::Result<Model> {
    let ramp = args
        .ramp
        .map(Into::into)
        .or(plan.load.ramp)
        .unwrap_or(Duration::ZERO);
    let duration = args
        .duration
        .map(Into::into)
        .or(plan.load.duration)
        .unwrap_or(Duration::from_secs(30));
    let model = if let Some(rate) = rate_override.or(args.rate.map(|r| r.0)) {
        Model::constant_rate(rate, ramp, duration)
    } else if let Some(vus) = args.vus {
        Model::Closed {
            vus,
            ramp,
            duration,
        }
    } else if !plan.load.stages.is_empty() {
        Model::Open {
            stages: plan
                .load
                .stages
                .iter()
                .map(|s| schedule::Stage {
                    duration: s.duration,
                    target: s.target,
                })
                .collect(),
        }
    } else if let Some(rate) = plan.load.rate {
        Model::constant_rate(rate, ramp, duration)
    } else if let Some(vus) = plan.load.vus {
        Model::Closed {
            vus,
            ramp,
            duration,
        }
    } else {
        Model::constant_rate(100.0, ramp, duration)
    };
    ensure!(!model.duration().is_zero(), "the run has no duration");
    match &model {
        Model::Open { stages } => {
            for stage in stages {
                ensure!(
                    (0.0..=RATE_MAX).contains(&stage.target),
                    "stage targets must be within 0..={RATE_MAX} per second"
                );
            }
        }
        Model::Closed { vus, .. } => ensure!(*vus > 0, "--vus must be at least 1"),
    }
    Ok(model)
}

async fn prepare(args: &PressArgs, rate_override: Option<f64>) -> anyhow::Result<Prepared> {
    let plan = Arc::new(Plan::load(&args.scenario)?);
    let target = Target::parse(&args.target)?;
    let model = model_for(args, &plan, rate_override)?;
    let admin_token = args
        .admin_token
        .clone()
        .or_else(|| read_secret(&args.secrets_from, "admin-token"));
    let jwt_secret = args
        .jwt_secret
        .clone()
        .or_else(|| read_secret(&args.secrets_from, "jwt-secret"));
    let run: String = format!("{:08x}", rand::random::<u32>());
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;

    let mut values: Vec<Option<Arc<str>>> = vec![None; plan.vars.len()];
    values[slot::RUN] = Some(Arc::from(run.as_str()));
    if let Some(token) = &admin_token {
        values[slot::ADMIN_TOKEN] = Some(Arc::from(token.as_str()));
    }
    for (slot, value) in &plan.constants {
        values[*slot] = Some(value.clone());
    }
    for (name, value) in &args.vars {
        let slot = plan
            .vars
            .get(name)
            .with_context(|| format!("--var {name}: the scenario has no variable `{name}`"))?;
        values[slot] = Some(Arc::from(value.as_str()));
    }

    // The sale: the one given with --var sale_id, or one made for this run.
    let given_sale = values[slot::SALE_ID].clone();
    let sale = if let Some(sale_id) = given_sale {
        let sale: serde_json::Value = client
            .get(format!("{}/v1/flash-sales/{sale_id}", target.base))
            .send()
            .await
            .context("read the sale")?
            .error_for_status()
            .context("read the sale")?
            .json()
            .await?;
        if values[slot::SKU].is_none() {
            values[slot::SKU] = sale["sku"].as_str().map(Arc::from);
        }
        Some(SaleRef {
            sale_id: sale_id.to_string(),
            quantity: sale["quantity"].as_u64().unwrap_or(0),
            per_user_limit: sale["per_user_limit"].as_u64().unwrap_or(0),
            exclusive: false,
        })
    } else if let Some(setup) = &plan.setup {
        let token = admin_token.as_deref().context(
            "this scenario creates a sale: give the admin token (STAMPEDE_ADMIN_TOKEN, --admin-token or --secrets-from)",
        )?;
        let sku = format!("PRESS-{run}");
        let response = client
            .post(format!("{}/v1/products", target.base))
            .bearer_auth(token)
            .json(&serde_json::json!({
                "sku": sku, "name": format!("press run {run}"),
                "price_cents": setup.price_cents * 2,
                "stock": setup.stock.unwrap_or(setup.quantity),
            }))
            .send()
            .await
            .context("create the product")?;
        ensure!(
            response.status().is_success(),
            "create the product: {} {}",
            response.status(),
            response.text().await?
        );
        let now = chrono::Utc::now();
        let response = client
            .post(format!("{}/v1/flash-sales", target.base))
            .bearer_auth(token)
            .json(&serde_json::json!({
                "sku": sku, "price_cents": setup.price_cents, "quantity": setup.quantity,
                "per_user_limit": setup.per_user_limit,
                "starts_at": now.to_rfc3339(),
                "ends_at": (now + chrono::Duration::hours(6)).to_rfc3339(),
            }))
            .send()
            .await
            .context("create the sale")?;
        ensure!(
            response.status().is_success(),
            "create the sale: {} {}",
            response.status(),
            response.text().await?
        );
        let sale: serde_json::Value = response.json().await?;
        let sale_id = sale["id"]
            .as_str()
            .context("the sale has no id")?
            .to_owned();
        values[slot::SALE_ID] = Some(Arc::from(sale_id.as_str()));
        values[slot::SKU] = Some(Arc::from(sku.as_str()));
        Some(SaleRef {
            sale_id,
            quantity: setup.quantity,
            per_user_limit: u64::from(setup.per_user_limit),
            exclusive: true,
        })
    } else {
        None
    };

    // Shoppers and their tokens. Only as many as the run can use are minted.
    let sessions = model.scheduled_sessions();
    let csv_users = plan.csv.as_ref().and_then(|csv| {
        let user_col = csv.columns.iter().position(|&s| s == slot::USER)?;
        Some(
            csv.rows
                .iter()
                .map(|row| row[user_col].clone())
                .collect::<Vec<_>>(),
        )
    });
    let users: Vec<Arc<str>> = match csv_users {
        Some(users) => users,
        None => {
            let count = match sessions {
                Some(n) => plan.users.min(n.max(1) as usize),
                None => plan.users,
            };
            (0..count)
                .map(|n| Arc::from(format!("{}-{run}-{n}", plan.user_prefix)))
                .collect()
        }
    };
    let needs_tokens = plan.flows.iter().flat_map(|f| &f.steps).any(|s| {
        s.auth == Auth::Shopper
            || s.path.slots().any(|x| x == slot::TOKEN)
            || s.headers
                .iter()
                .any(|(_, t)| t.slots().any(|x| x == slot::TOKEN))
            || s.body
                .as_ref()
                .is_some_and(|b| b.slots().any(|x| x == slot::TOKEN))
    });
    let csv_tokens = plan.csv.as_ref().and_then(|csv| {
        let col = csv.columns.iter().position(|&s| s == slot::TOKEN)?;
        Some(
            csv.rows
                .iter()
                .map(|row| row[col].clone())
                .collect::<Vec<_>>(),
        )
    });
    let tokens: Vec<Arc<str>> = match (csv_tokens, needs_tokens) {
        (Some(tokens), _) => tokens,
        (None, false) => vec![Arc::from(""); users.len()],
        (None, true) => {
            let secret = jwt_secret.as_deref().context(
                "this scenario acts as shoppers: give the JWT secret (STAMPEDE_JWT_SECRET, --jwt-secret or --secrets-from)",
            )?;
            let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
            let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
            let exp = chrono::Utc::now().timestamp() + 24 * 3600;
            users
                .iter()
                .map(|user| {
                    jsonwebtoken::encode(
                        &header,
                        &serde_json::json!({"sub": &**user, "exp": exp}),
                        &key,
                    )
                    .map(|t| Arc::from(t.as_str()))
                })
                .collect::<Result<_, _>>()?
        }
    };
    ensure!(
        tokens.len() == users.len(),
        "the CSV's token column must have one token per user"
    );
    let shopper_auth = tokens
        .iter()
        .map(|t| HeaderValue::from_str(&format!("Bearer {t}")))
        .collect::<Result<Vec<_>, _>>()
        .context("a shopper token is not a valid header value")?;
    let needs_admin = plan
        .flows
        .iter()
        .flat_map(|f| &f.steps)
        .any(|s| s.auth == Auth::Admin);
    if needs_admin && admin_token.is_none() {
        bail!("this scenario makes admin calls: give the admin token");
    }
    let admin_auth =
        HeaderValue::from_str(&format!("Bearer {}", admin_token.as_deref().unwrap_or("")))
            .context("the admin token is not a valid header value")?;

    let mut thresholds = plan.thresholds.clone();
    if let Some(p99) = args.slo_p99 {
        thresholds.p99 = Some(p99.into());
    }
    if let Some(share) = args.max_error_rate {
        thresholds.max_error_rate = Some(share.0);
    }
    let inputs = Arc::new(Inputs {
        plan: plan.clone(),
        base_values: values,
        users,
        tokens,
        shopper_auth,
        admin_auth,
    });
    Ok(Prepared {
        plan,
        target,
        model,
        inputs,
        sale,
        thresholds,
        admin_token,
    })
}

/// Runs one pressure test and returns its report (written to --json/--html if asked).
pub async fn press(args: &PressArgs) -> anyhow::Result<Report> {
    let prepared = prepare(args, None).await?;
    let report = execute(args, prepared, !args.quiet).await?;
    write_reports(args, &report)?;
    Ok(report)
}

fn write_reports(args: &PressArgs, report: &Report) -> anyhow::Result<()> {
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(report)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    if let Some(path) = &args.html {
        std::fs::write(path, html::render(report))
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

async fn execute(args: &PressArgs, p: Prepared, progress: bool) -> anyhow::Result<Report> {
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, 256);
    ensure!(
        (1..=CONNECTIONS_MAX).contains(&args.connections),
        "--connections must be within 1..={CONNECTIONS_MAX} (each is a socket at both ends)"
    );
    ensure!(args.max_sessions >= 1, "--max-sessions must be at least 1");
    if let Model::Closed { vus, .. } = &p.model {
        // Each user is a session for the whole run: those past the bound would wait for
        // a place until the run was over, and never send.
        ensure!(
            *vus <= args.max_sessions,
            "--vus {vus} is more than --max-sessions {}: each user is a session for the whole run",
            args.max_sessions
        );
    }
    let spec = RunSpec {
        target: p.target.clone(),
        model: p.model.clone(),
        threads,
        connections: args.connections.max(threads),
        max_sessions: args.max_sessions,
        timeout: args.timeout.into(),
        drain: args.drain.into(),
        max_receipts: 2_000_000,
        honor_retry_after: args.retry_after == RetryAfter::Honor,
    };
    let duration = p.model.duration();
    let started_at = chrono::Utc::now();

    // The server's side, once a second.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let scrape_every: Duration = args.scrape_every.into();
    let (stop_scrape, scrape_stopped) = tokio::sync::oneshot::channel();
    let wall_start = std::time::Instant::now();
    let scraper = (!scrape_every.is_zero()).then(|| {
        tokio::spawn(server::scrape(
            client.clone(),
            format!("{}/metrics", p.target.base),
            wall_start,
            scrape_every,
            scrape_stopped,
        ))
    });

    // Per-second intervals from every thread, merged as they complete.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Interval>(4096);
    let bar = if progress {
        let bar = indicatif::ProgressBar::new(duration.as_secs().max(1));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} s  {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let reporter_bar = bar.clone();
    let reporter = tokio::spawn(async move {
        // Seconds still waiting for some thread's interval; a complete second is reduced
        // to its summary at once, so memory does not grow with histograms per second.
        let mut pending: BTreeMap<u64, (Interval, usize)> = BTreeMap::new();
        type Summary = (u64, u64, LatencyMs, Option<RefusedSecond>);
        let summary = |all: &Interval| -> Summary {
            let refused = all.refused.as_ref().map(|h| RefusedSecond {
                count: h.len(),
                latency_ms: LatencyMs::of(h),
            });
            (all.requests, all.errors, LatencyMs::of(&all.hist), refused)
        };
        let mut done: BTreeMap<u64, Summary> = BTreeMap::new();
        while let Some(interval) = rx.recv().await {
            let second = interval.second;
            let entry = pending
                .entry(second)
                .or_insert_with(|| (Interval::new(second), 0));
            entry.0.merge(&interval);
            entry.1 += 1;
            if entry.1 == threads {
                let (all, _) = pending.remove(&second).expect("just updated");
                let reduced = summary(&all);
                reporter_bar.set_position(second.min(reporter_bar.length().unwrap_or(0)));
                reporter_bar.set_message(format!(
                    "{} req/s  p99 {:.1} ms  errors {}",
                    reduced.0, reduced.2.p99, reduced.1
                ));
                done.insert(second, reduced);
            }
        }
        for (second, (all, _)) in pending {
            done.insert(second, summary(&all));
        }
        done
    });

    let inputs = p.inputs.clone();
    let run_spec = spec.clone();
    let output = tokio::task::spawn_blocking(move || runner::run(&run_spec, inputs, tx))
        .await
        .context("the generator stopped")??;
    bar.finish_and_clear();
    let _ = stop_scrape.send(());
    let mut server_samples = match scraper {
        Some(handle) => handle.await.unwrap_or_default(),
        None => Vec::new(),
    };
    // The scrapes began before the connections were opened, the timeline once they all
    // were: the samples are set on the timeline's clock, so that a server second and a
    // client second of one `t` are the same second (16,384 connections take seconds
    // to open, and the server idles meanwhile).
    let opening = output
        .started
        .saturating_duration_since(wall_start)
        .as_secs_f64();
    for sample in &mut server_samples {
        sample.t -= opening;
    }
    let seconds = reporter.await.unwrap_or_default();

    // Merge the threads.
    let mut steps = vec![StepStats::default(); p.plan.step_names.len()];
    let mut lag = new_histogram();
    let mut sessions = Sessions {
        scheduled: p.model.scheduled_sessions(),
        ..Sessions::default()
    };
    let mut receipts = Vec::new();
    let mut receipts_dropped = 0;
    let mut started_in_time = 0;
    for t in output.totals {
        for (all, one) in steps.iter_mut().zip(&t.steps) {
            all.merge(one);
        }
        if let Some(h) = &t.dispatch_lag {
            lag.add(h).expect("same bounds");
        }
        sessions.started += t.sessions_started;
        started_in_time += t.sessions_started_in_time;
        sessions.finished += t.sessions_finished;
        sessions.abandoned += t.sessions_abandoned;
        receipts.extend(t.books);
        receipts_dropped += t.receipts_dropped;
    }
    // Only sessions started within the schedule: a generator that fell behind starts
    // the rest after it, and they do not count towards the rate it kept.
    sessions.achieved_per_s = started_in_time as f64 / duration.as_secs_f64();
    let elapsed = output.elapsed.as_secs_f64().max(1e-3);
    let mut overall = StepStats::default();
    for s in &steps {
        overall.merge(s);
    }
    let step_reports: Vec<StepReport> = steps
        .iter()
        .zip(&p.plan.step_names)
        .map(|(s, name)| StepReport {
            name: name.clone(),
            requests: s.requests,
            errors: s.errors,
            skipped: s.skipped,
            achieved_rps: s.requests as f64 / elapsed,
            latency_ms: LatencyMs::of(&s.hist),
            statuses: s
                .statuses
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            latency_by_status: s
                .by_status
                .iter()
                .map(|(k, h)| (k.to_string(), LatencyMs::of(h)))
                .collect(),
            error_codes: s.codes.clone(),
            transport_errors: s
                .transport
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
        })
        .collect();
    let timeline: Vec<Second> = seconds
        .into_iter()
        .map(|(t, (requests, errors, latency_ms, refused))| Second {
            t,
            requests,
            rps: requests as f64 / (elapsed.min(t as f64) - (t as f64 - 1.0)).clamp(0.001, 1.0),
            errors,
            latency_ms,
            refused,
        })
        .collect();

    // The generator's own health.
    let cpu_cores = output.cpu_seconds / elapsed;
    let dispatch_lag = LatencyMs::of(&lag);
    let mut warnings = Vec::new();
    if cpu_cores >= 0.9 * threads as f64 {
        warnings.push(format!(
            "the generator used {cpu_cores:.2} of its {threads} threads' cores: it, not the server, may be the bottleneck (run it on another machine or add --threads)"
        ));
    }
    if let Some(scheduled) = sessions.scheduled {
        let scheduled_rate = scheduled as f64 / duration.as_secs_f64();
        if sessions.achieved_per_s < 0.98 * scheduled_rate || dispatch_lag.p99 > 10.0 {
            warnings.push(format!(
                "sessions started late (dispatch lag p99 {:.1} ms, {:.0}/s of {scheduled_rate:.0}/s): the generator or --max-sessions could not keep the schedule; latencies still count from the schedule",
                dispatch_lag.p99, sessions.achieved_per_s
            ));
        }
    }
    let not_started = sessions.not_started();
    if not_started > 0 {
        warnings.push(format!(
            "{not_started} scheduled sessions never started: the generator was still behind its schedule at the drain deadline; the run does not pass"
        ));
    }
    if sessions.abandoned > 0 {
        warnings.push(format!(
            "{} sessions were still running at the drain deadline; their requests in flight count as failed (abandoned) and the run does not pass",
            sessions.abandoned
        ));
    }

    let same_host = p.target.addr.ip().is_loopback();
    let client_seconds: Vec<ClientSecond> = timeline
        .iter()
        .map(|s| ClientSecond {
            t: s.t as f64,
            p99_ms: s.latency_ms.p99,
            error_share: if s.requests > 0 {
                s.errors as f64 / s.requests as f64
            } else {
                0.0
            },
        })
        .collect();
    let saturation = server::first_saturated(
        &server_samples,
        &client_seconds,
        p.thresholds.p99.map(|d| d.as_secs_f64() * 1000.0),
        cpu_cores,
        threads,
        same_host,
    );

    // The books.
    let books = match (&p.sale, p.plan.has_books()) {
        (Some(sale), true) => match &p.admin_token {
            Some(token) => {
                let ledger = HttpLedger::new(client.clone(), p.target.base.clone(), token.clone());
                books::check(&ledger, sale, &receipts, receipts_dropped, 32).await
            }
            None => {
                let mut b = Books::not_checked("no admin token: the audit cannot be read");
                b.checked = true;
                b
            }
        },
        (None, true) => Books::not_checked("no sale: give --var sale_id or a [setup.sale]"),
        _ => Books::not_checked("the scenario has no purchase step marked for the books"),
    };

    let latency = LatencyMs::of(&overall.hist);
    let error_rate = if overall.requests > 0 {
        overall.errors as f64 / overall.requests as f64
    } else {
        0.0
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut thresholds: Vec<ThresholdResult> = [
        ("p99_ms", p.thresholds.p99.map(ms), latency.p99),
        ("p999_ms", p.thresholds.p999.map(ms), latency.p999),
        ("error_rate", p.thresholds.max_error_rate, error_rate),
    ]
    .into_iter()
    .filter_map(|(name, limit, actual)| {
        limit.map(|limit| ThresholdResult {
            name: name.into(),
            limit,
            actual,
            ok: actual <= limit,
        })
    })
    .collect();
    // A run that sent nothing, or a step that sent requests and got no answer it
    // expects, measured nothing: the run fails whatever thresholds were given (a server
    // answering 500 to every purchase would otherwise pass a run without
    // `--max-error-rate`, its browsing steps answered).
    if overall.requests == 0 {
        thresholds.push(ThresholdResult {
            name: "requests".into(),
            limit: 1.0,
            actual: 0.0,
            ok: false,
        });
    }
    for step in step_reports
        .iter()
        .filter(|s| s.requests > 0 && s.errors >= s.requests)
    {
        thresholds.push(ThresholdResult {
            name: format!("expected_answers:{}", step.name),
            limit: 1.0,
            actual: 0.0,
            ok: false,
        });
    }
    let passed = thresholds.iter().all(|t| t.ok)
        && (!books.checked || books.ok)
        && sessions.abandoned == 0
        && not_started == 0;
    let scheduled_rps = sessions
        .scheduled
        .map(|n| n as f64 / duration.as_secs_f64());
    Ok(Report {
        scenario: p.plan.name.clone(),
        target: p.target.base.clone(),
        model: p.model.describe(),
        started_at: started_at.to_rfc3339(),
        duration_s: elapsed,
        schedule_s: duration.as_secs_f64(),
        requests: overall.requests,
        errors: overall.errors,
        error_rate,
        achieved_rps: overall.requests as f64 / elapsed,
        scheduled_rps,
        sessions,
        latency_ms: latency,
        statuses: overall
            .statuses
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
        error_codes: overall.codes.clone(),
        steps: step_reports,
        generator: Generator {
            threads,
            connections: spec.connections,
            cpu_cores,
            dispatch_lag_ms: dispatch_lag,
            warnings,
        },
        timeline,
        server: server_samples,
        saturation,
        books,
        thresholds,
        passed,
    })
}

/// Finds the highest arrival rate that meets the SLO, probe by probe.
pub async fn capacity(args: &CapacityArgs) -> anyhow::Result<Capacity> {
    let mut press_args = args.press.clone();
    let slo: Duration = press_args
        .slo_p99
        .map(Into::into)
        .unwrap_or(Duration::from_millis(50));
    let max_error = press_args.max_error_rate.map_or(0.001, |s| s.0);
    press_args.slo_p99 = Some(slo.into());
    press_args.max_error_rate = Some(Share(max_error));
    press_args.duration = Some(args.step_duration);
    ensure!(
        (0.0..1.0).contains(&args.headroom),
        "--headroom must be within 0..1"
    );
    let limits = SearchLimits {
        start_rate: args.start_rate.0,
        max_rate: args.max_rate.0,
        precision: args.precision,
        max_probes: args.max_probes,
    };
    let last_report: std::cell::RefCell<Option<Report>> = std::cell::RefCell::new(None);
    let mut result = capacity::search(&limits, |rate| {
        let press_args = press_args.clone();
        let last = &last_report;
        async move {
            let prepared = prepare(&press_args, Some(rate)).await?;
            let report = execute(&press_args, prepared, false).await?;
            let achieved = report.sessions.achieved_per_s;
            let mut reasons = Vec::new();
            for t in report.thresholds.iter().filter(|t| !t.ok) {
                reasons.push(format!("{} {:.3} over {}", t.name, t.actual, t.limit));
            }
            // Against what the schedule asked for over the whole run: with a ramp, less
            // than `rate` on average (the ramp climbs to it), so the plateau's rate
            // would fail every probe.
            let asked = report.scheduled_rps.unwrap_or(rate);
            if achieved < 0.95 * asked {
                reasons.push(format!(
                    "only {achieved:.0}/s of {asked:.0}/s started (plateau {rate:.0}/s)"
                ));
            }
            if report.books.checked && !report.books.ok {
                reasons.push("books failed".into());
            }
            // A run that did not pass as `stampede press` does not pass here either:
            // sessions abandoned at the drain deadline, or never started, are failures
            // however few (they are not in the error rate the thresholds read).
            if report.sessions.abandoned > 0 {
                reasons.push(format!(
                    "{} sessions abandoned at the drain deadline",
                    report.sessions.abandoned
                ));
            }
            let never_started = report.sessions.not_started();
            if never_started > 0 {
                reasons.push(format!("{never_started} scheduled sessions never started"));
            }
            let probe = Probe {
                rate,
                achieved_rps: report.achieved_rps,
                p99_ms: report.latency_ms.p99,
                error_rate: report.error_rate,
                ok: reasons.is_empty(),
                reason: (!reasons.is_empty()).then(|| reasons.join("; ")),
            };
            eprintln!(
                "  {:>10.0}/s: {:>9.0} req/s, p99 {:>8.2} ms, errors {:.3}% -> {}",
                rate,
                probe.achieved_rps,
                probe.p99_ms,
                probe.error_rate * 100.0,
                probe.reason.as_deref().unwrap_or("ok")
            );
            *last.borrow_mut() = Some(report);
            Ok(probe)
        }
    })
    .await?;
    if let (Some(peak), Some(per_node)) = (args.target_peak, result.capacity_rps) {
        result.sizing = Some(capacity::size(peak.0, per_node, args.headroom));
    }
    if let Some(path) = &args.press.json {
        std::fs::write(path, serde_json::to_vec_pretty(&result)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    if let (Some(path), Some(report)) = (&args.press.html, &*last_report.borrow()) {
        std::fs::write(path, html::render(report))
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_shares_parse() {
        assert_eq!("583000/s".parse::<Rate>().unwrap(), Rate(583_000.0));
        assert_eq!("2000".parse::<Rate>().unwrap(), Rate(2000.0));
        assert!("0/s".parse::<Rate>().is_err());
        assert!("fast".parse::<Rate>().is_err());
        assert_eq!("0.1%".parse::<Share>().unwrap(), Share(0.001));
        assert_eq!("0.02".parse::<Share>().unwrap(), Share(0.02));
        assert!("150%".parse::<Share>().is_err());
        assert_eq!(
            parse_var("sale_id=x=y").unwrap(),
            ("sale_id".into(), "x=y".into())
        );
        assert!(parse_var("nothing").is_err());
    }

    #[test]
    fn cpu_time_advances() {
        let before = cpu_seconds();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(cpu_seconds() > before);
    }
}
