//! `stampede`: one binary for the server, its demo, the payment simulator and upkeep.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use stampede::{Config, ServeArgs, shutdown_signal, start};
use stampede_api::mint_shopper_token;
use tokio::io::AsyncBufReadExt;

#[global_allocator]
static GLOBAL: stampede::alloc::MiMalloc = stampede::alloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "stampede",
    version,
    about = "A retail transaction core for traffic that arrives as a stampede."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How `serve` and `demo` read their settings, for their `--help`.
const LAYERS: &str = "\
Settings come in layers, each overriding the one before: the built-in defaults, the \
--config TOML file (keys as in the README's configuration table, e.g. \
payment_window = \"2s\"), STAMPEDE_<KEY> environment variables (e.g. \
STAMPEDE_PAYMENT_WINDOW=2s), then the flags above.

The two secrets have no flag, so they never show in ps: admin_token and jwt_secret in \
the file, or STAMPEDE_ADMIN_TOKEN and STAMPEDE_JWT_SECRET. Without them a new data \
directory gets generated ones, kept there (the admin token in <data-dir>/admin-token; \
`stampede token --data-dir <data-dir>` signs shopper tokens with the kept secret).";

#[derive(Subcommand)]
enum Command {
    /// Serve the API (embedded SQLite by default).
    #[command(after_help = LAYERS)]
    Serve(ServeArgs),
    /// Start a server with a demo product, a live flash sale and a payment simulator,
    /// and print how to buy with curl.
    #[command(after_help = LAYERS)]
    Demo {
        #[command(flatten)]
        serve: ServeArgs,
        /// Stop after this long (e.g. 10s) instead of waiting for Ctrl-C.
        #[arg(long)]
        run_for: Option<humantime::Duration>,
    },
    /// Pressure-test a server: modelled user paths at an arrival rate or with virtual
    /// users, latency from the scheduled send, the server's metrics on the same
    /// timeline, and the books checked afterwards. Exits non-zero when a threshold or
    /// the books check fails.
    #[command(args_conflicts_with_subcommands = true)]
    Press {
        #[command(subcommand)]
        mode: Option<PressMode>,
        #[command(flatten)]
        args: Box<stampede_press::PressArgs>,
    },
    /// Run the stand-in payment provider.
    PaymentSim {
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: std::net::SocketAddr,
        /// Delay added to every answer, e.g. 50ms.
        #[arg(long, default_value = "0ms")]
        latency: humantime::Duration,
        /// Share of calls (0..=1) that fail with 503 without charging.
        #[arg(long, default_value_t = 0.0)]
        failure_rate: f64,
    },
    /// Create or upgrade the database schema, then exit.
    Migrate(ServeArgs),
    /// Rebuild state from the durable orders and print every sale's books (offline).
    Audit(ServeArgs),
    /// Print shopper tokens (HS256 JWTs) signed with the server's JWT secret, one per line.
    Token {
        /// The shopper id (`sub`); with --count N, ids are SUB-0 … SUB-(N-1).
        #[arg(long)]
        sub: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Lifetime of each token.
        #[arg(long, default_value = "24h")]
        ttl: humantime::Duration,
        #[command(flatten)]
        serve: ServeArgs,
    },
}

#[derive(Subcommand)]
enum PressMode {
    /// Step up, then bisect, the arrival rate to find the highest that meets the SLO
    /// (--slo-p99, default 50ms; --max-error-rate, default 0.1%); with --target-peak,
    /// the nodes that peak needs.
    Capacity(Box<stampede_press::CapacityArgs>),
}

fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let worker_threads = match &cli.command {
        Command::Serve(args) | Command::Demo { serve: args, .. } => {
            Config::load(args)?.worker_threads
        }
        _ => None,
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        runtime.worker_threads(n);
    }
    runtime.enable_all().build()?.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Demo { serve, run_for } => demo(serve, run_for.map(Into::into)).await,
        Command::PaymentSim {
            listen,
            latency,
            failure_rate,
        } => {
            init_tracing("info");
            anyhow::ensure!(
                (0.0..=1.0).contains(&failure_rate),
                "--failure-rate must be within 0..=1"
            );
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("listen on {listen}"))?;
            // The first line on stdout is the address, for whoever started us.
            println!("payment-sim listening on http://{}", listener.local_addr()?);
            let config = stampede_api::payment_sim::SimConfig {
                latency_ms: Duration::from(latency).as_millis() as u64,
                failure_rate,
            };
            stampede_api::payment_sim::serve(listener, config).await?;
            Ok(())
        }
        Command::Migrate(args) => {
            let config = Config::load(&args)?;
            init_tracing(&config.log);
            std::fs::create_dir_all(&config.data_dir)?;
            let _locks = stampede::lock_for_writing(&config)?;
            stampede_store::open(
                config.database_url.as_deref(),
                &config.data_dir,
                &config.store_options(),
            )
            .await?;
            println!("schema is up to date");
            Ok(())
        }
        Command::Audit(args) => audit(args).await,
        Command::Press { mode: None, args } => {
            let report = stampede_press::press(&args).await?;
            print!("{}", report.summary());
            anyhow::ensure!(
                report.passed,
                "the run failed a threshold or the books check"
            );
            Ok(())
        }
        Command::Press {
            mode: Some(PressMode::Capacity(args)),
            ..
        } => {
            eprintln!(
                "capacity search on {} ({})",
                args.press.target, args.press.scenario
            );
            let result = stampede_press::capacity(&args).await?;
            match result.capacity_rps {
                Some(rate) => println!("capacity: {rate:.0} sessions/s meet the SLO"),
                None => println!("capacity: not even {:.0}/s met the SLO", args.start_rate.0),
            }
            if let Some(rate) = result.first_failing_rps {
                println!("first failing rate: {rate:.0}/s");
            }
            if let Some(s) = &result.sizing {
                println!(
                    "sizing: {:.0}/s at {:.0}/s per node with {:.0}% headroom needs {} nodes",
                    s.target_peak_rps,
                    s.per_node_rps,
                    s.headroom * 100.0,
                    s.nodes
                );
            }
            anyhow::ensure!(result.capacity_rps.is_some(), "no rate met the SLO");
            Ok(())
        }
        Command::Token {
            sub,
            count,
            ttl,
            serve,
        } => {
            let config = Config::load(&serve)?;
            anyhow::ensure!(
                (1..=10_000_000).contains(&count),
                "--count must be within 1..=10000000"
            );
            let ttl = Duration::from(ttl);
            anyhow::ensure!(
                ttl >= Duration::from_secs(1),
                "--ttl must be at least 1s: a shorter token has expired when the server reads it"
            );
            // The id given, and the longest the tokens carry, must be ones the server
            // takes as `sub`.
            let longest = if count == 1 {
                sub.clone()
            } else {
                format!("{sub}-{}", count - 1)
            };
            for id in [&sub, &longest] {
                stampede_types::UserId::parse_sub(id).map_err(|e| {
                    anyhow::anyhow!("--sub {sub:?} makes shopper ids the server refuses: {e}")
                })?;
            }
            let secret = stampede::jwt_secret(&config)?;
            let exp = (chrono::Utc::now().timestamp() as u64).saturating_add(ttl.as_secs());
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for i in 0..count {
                let sub = if count == 1 {
                    sub.clone()
                } else {
                    format!("{sub}-{i}")
                };
                std::io::Write::write_all(
                    &mut out,
                    mint_shopper_token(&secret, &sub, Some(exp)).as_bytes(),
                )?;
                std::io::Write::write_all(&mut out, b"\n")?;
            }
            Ok(())
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::load(&args)?;
    init_tracing(&config.log);
    let (running, generated) = start(&config, shutdown_signal()).await?;
    if generated {
        eprintln!(
            "generated admin token (kept in {}): {}",
            config.data_dir.join("admin-token").display(),
            running.admin_token.expose()
        );
    }
    tracing::info!(addr = %running.addr, ack = ?config.ack, data_dir = %config.data_dir.display(), "stampede serving");
    println!("stampede listening on {}", running.url());
    running.wait().await
}

/// Reads the durable orders and prints every sale's books. Read-only: it starts no
/// writer, expires nothing, and may run beside a live server.
async fn audit(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::load(&args)?;
    init_tracing("warn");
    let store =
        stampede_store::open_read_only(config.database_url.as_deref(), &config.data_dir).await?;
    // The sales only: each one's books are counted by the store.
    struct Sales(Vec<stampede_engine::SaleRecord>);
    impl stampede_engine::Rebuild for Sales {
        fn catalog(
            &mut self,
            _: Vec<stampede_engine::ProductRecord>,
            sales: Vec<stampede_engine::SaleRecord>,
        ) {
            self.0 = sales;
        }
        fn order(&mut self, _: stampede_engine::OrderRecord) {}
    }
    let mut sales = Sales(Vec::new());
    store.load(&mut sales).await?;
    let mut all_consistent = true;
    for sale in &sales.0 {
        let tally = store.tally(sale.id, sale.per_user_limit).await?;
        let held = tally.pending_payment + tally.paid;
        let consistent = held <= sale.quantity && tally.users_over_limit == 0;
        all_consistent &= consistent;
        println!(
            "{} quantity={} remaining={} pending_payment={} paid={} cancelled={} expired={} users_over_limit={} consistent={consistent}",
            sale.id,
            sale.quantity,
            sale.quantity.saturating_sub(held),
            tally.pending_payment,
            tally.paid,
            tally.cancelled,
            tally.expired,
            tally.users_over_limit,
        );
    }
    anyhow::ensure!(all_consistent, "books are inconsistent");
    Ok(())
}

async fn demo(args: ServeArgs, run_for: Option<Duration>) -> anyhow::Result<()> {
    let mut config = Config::load(&args)?;
    init_tracing(&config.log);

    // The payment provider is a separate process, as the real one would be.
    let mut sim = tokio::process::Command::new(std::env::current_exe()?)
        .args([
            "payment-sim",
            "--listen",
            "127.0.0.1:0",
            "--latency",
            "20ms",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start the payment simulator")?;
    let mut first_line = String::new();
    tokio::io::BufReader::new(sim.stdout.take().context("simulator stdout")?)
        .read_line(&mut first_line)
        .await?;
    config.payment_url = first_line
        .trim()
        .rsplit(' ')
        .next()
        .context("simulator did not print its address")?
        .to_owned();

    let stop = async move {
        match run_for {
            Some(duration) => tokio::time::sleep(duration).await,
            None => shutdown_signal().await,
        }
    };
    let (running, _) = start(&config, stop).await?;
    let base = running.url();
    let admin = running.admin_token.expose().to_owned();
    let client = reqwest::Client::new();
    let sku = format!("DEMO-PHONE-{}", chrono::Utc::now().timestamp());
    let response = client
        .post(format!("{base}/v1/products"))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"sku": sku, "name": "Demo phone", "price_cents": 99_900, "stock": 1_000}))
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "create product: {}",
        response.text().await?
    );
    let now = chrono::Utc::now();
    let sale: serde_json::Value = client
        .post(format!("{base}/v1/flash-sales"))
        .bearer_auth(&admin)
        .json(&serde_json::json!({
            "sku": sku, "price_cents": 59_900, "quantity": 100, "per_user_limit": 2,
            "starts_at": now.to_rfc3339(), "ends_at": (now + chrono::Duration::hours(2)).to_rfc3339(),
        }))
        .send()
        .await?
        .json()
        .await?;
    let sale_id = sale["id"].as_str().context("sale id")?.to_owned();
    let exp = (now + chrono::Duration::hours(24)).timestamp() as u64;
    let alice = mint_shopper_token(&running.jwt_secret, "alice", Some(exp));

    println!(
        "Stampede demo is running on {base} (data in {})",
        config.data_dir.display()
    );
    println!("A flash sale of 100 units of {sku} is live: {sale_id}\n");
    println!("  export ADMIN={admin}");
    println!("  export ALICE={alice}\n");
    println!("  # look at the sale");
    println!("  curl -s {base}/v1/flash-sales/{sale_id}");
    println!("  # buy two units (run it twice: the same key answers the same order)");
    println!(
        "  curl -s -X POST {base}/v1/flash-sales/{sale_id}/purchase -H \"Authorization: Bearer $ALICE\" \\\n       -H 'Idempotency-Key: alice-1' -H 'Content-Type: application/json' -d '{{\"quantity\": 2}}'"
    );
    println!("  # pay it (ORDER is the order_id from the answer)");
    println!("  curl -s -X POST {base}/v1/orders/$ORDER/pay -H \"Authorization: Bearer $ALICE\"");
    println!("  # check the books");
    println!(
        "  curl -s {base}/v1/flash-sales/{sale_id}/audit -H \"Authorization: Bearer $ADMIN\"\n"
    );

    // A short flash sale against this server, as `stampede press` would run it.
    println!(
        "A flash sale rehearsal: 2,000 shoppers in one second for 500 units (stampede press --scenario flash-sale)"
    );
    let json = config.data_dir.join("press-flash-sale.json");
    let html = config.data_dir.join("press-flash-sale.html");
    let press_args = stampede_press::PressArgs::parse_from([
        "--target".into(),
        base.clone(),
        "--scenario".into(),
        "flash-sale".into(),
        "--admin-token".into(),
        admin.clone(),
        "--jwt-secret".into(),
        running.jwt_secret.expose().to_owned(),
        "--json".into(),
        json.display().to_string(),
        "--html".into(),
        html.display().to_string(),
    ])?;
    match stampede_press::press(&press_args).await {
        Ok(report) => {
            print!("{}", report.summary());
            println!("  reports: {} and {}\n", json.display(), html.display());
        }
        Err(e) => println!("the rehearsal could not run: {e:#}\n"),
    }
    println!("Press Ctrl-C to stop.");
    running.wait().await?;
    let _ = sim.kill().await;
    Ok(())
}
