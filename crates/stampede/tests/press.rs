//! `stampede press` end to end: the binary presses a real `stampede serve` (embedded
//! SQLite, payment simulator in its own process) and the books check passes; a missed
//! threshold makes it exit non-zero.

mod common;

use common::spawn_app;
use serde_json::Value;

async fn press(app: &common::TestApp, extra: &[&str]) -> (std::process::ExitStatus, Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let html = dir.path().join("report.html");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_stampede"))
        .arg("press")
        .args(["--target", &app.base, "--quiet"])
        .args([
            "--json",
            json.to_str().unwrap(),
            "--html",
            html.to_str().unwrap(),
        ])
        .args(extra)
        .env("STAMPEDE_ADMIN_TOKEN", &app.admin)
        .env("STAMPEDE_JWT_SECRET", app.jwt_secret.expose())
        .output()
        .await
        .expect("run stampede press");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap_or_else(|e| {
        panic!(
            "no report ({e}); stdout: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    }))
    .unwrap();
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("uPlot") && page.contains(r#"id="report""#));
    (output.status, report, stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flash_sale_press_against_the_server_balances_its_books() {
    let app = spawn_app().await;
    let (status, report, stdout) = press(&app, &["--scenario", "flash-sale"]).await;
    assert!(status.success(), "{stdout}");
    let books = &report["books"];
    assert_eq!(books["checked"], true);
    assert_eq!(books["ok"], true, "{books:#}");
    // 2,000 shoppers for 500 units, one each: the sale sells out exactly and every
    // order is paid through the payment simulator.
    assert_eq!(books["acknowledged_units"], 500, "{stdout}");
    assert_eq!(books["paid_orders"], 500, "{stdout}");
    assert_eq!(books["oversold_units"], 0);
    assert_eq!(books["audit"]["paid"], 500);
    assert_eq!(books["audit"]["remaining"], 0);
    assert_eq!(report["errors"], 0, "{stdout}");
    let purchase = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "buyer/purchase")
        .unwrap();
    assert_eq!(purchase["requests"], 2000);
    assert_eq!(purchase["statuses"]["201"], 500);
    assert_eq!(purchase["error_codes"]["sold_out"], 1500);
    // The server's metrics were on the timeline.
    let server = report["server"].as_array().unwrap();
    assert!(!server.is_empty(), "no server samples");
    assert!(
        server
            .iter()
            .any(|s| s["queue_capacity"].as_f64() > Some(0.0))
    );
    assert!(server.iter().any(|s| s["cpu_cores"].is_number()));
    assert!(stdout.contains("books: OK"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_threshold_exits_non_zero() {
    let app = spawn_app().await;
    let (status, report, stdout) = press(
        &app,
        &[
            "--scenario",
            "healthz",
            "--rate",
            "200/s",
            "--duration",
            "1s",
            "--slo-p99",
            "1us",
        ],
    )
    .await;
    assert!(!status.success(), "{stdout}");
    assert_eq!(report["passed"], false);
    let p99 = report["thresholds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "p99_ms")
        .unwrap();
    assert_eq!(p99["ok"], false);
    assert!(stdout.contains("threshold p99_ms: MISSED"), "{stdout}");
}
