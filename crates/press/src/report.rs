//! The run's report: one JSON document (what CI reads), rendered to the terminal and to
//! a self-contained HTML page.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::books::Books;
use crate::server::{Saturation, ServerSample};
use crate::stats::LatencyMs;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub target: String,
    pub model: String,
    pub started_at: String,
    /// From the start to the last answer: the schedule, then the wait for the answers
    /// still out at its end (a refusal a server holds for its `Retry-After`, say).
    pub duration_s: f64,
    /// The schedule's length: requests were sent only within it. A rate of answers
    /// over the load (goodput) divides by this, not by `duration_s`, whose tail of
    /// answers still out sends nothing. (0 in reports from before this field.)
    #[serde(default)]
    pub schedule_s: f64,
    pub requests: u64,
    pub errors: u64,
    pub error_rate: f64,
    /// Requests answered per second over `duration_s`, the whole run.
    pub achieved_rps: f64,
    /// Open model: sessions per second the schedule asked for.
    pub scheduled_rps: Option<f64>,
    pub sessions: Sessions,
    pub latency_ms: LatencyMs,
    pub statuses: BTreeMap<String, u64>,
    pub error_codes: BTreeMap<String, u64>,
    pub steps: Vec<StepReport>,
    pub generator: Generator,
    pub timeline: Vec<Second>,
    pub server: Vec<ServerSample>,
    pub saturation: Option<Saturation>,
    pub books: Books,
    pub thresholds: Vec<ThresholdResult>,
    pub passed: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Sessions {
    pub scheduled: Option<u64>,
    pub started: u64,
    pub finished: u64,
    pub abandoned: u64,
    /// Sessions started within the schedule's window, per second of it, against
    /// `scheduled_rps`; sessions a lagging generator started after the window are not
    /// counted here (they are in `started`).
    pub achieved_per_s: f64,
}

impl Sessions {
    /// Sessions the schedule asked for that never started (the generator was still
    /// behind at the drain deadline): a run with any does not pass.
    pub fn not_started(&self) -> u64 {
        self.scheduled
            .map_or(0, |scheduled| scheduled.saturating_sub(self.started))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepReport {
    pub name: String,
    pub requests: u64,
    pub errors: u64,
    pub skipped: u64,
    pub achieved_rps: f64,
    pub latency_ms: LatencyMs,
    pub statuses: BTreeMap<String, u64>,
    /// Latency of the answers with each status.
    #[serde(default)]
    pub latency_by_status: BTreeMap<String, LatencyMs>,
    pub error_codes: BTreeMap<String, u64>,
    pub transport_errors: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Generator {
    pub threads: usize,
    pub connections: usize,
    /// Cores the generator used on average over the run.
    pub cpu_cores: f64,
    /// How late sessions started after their scheduled time (open model).
    pub dispatch_lag_ms: LatencyMs,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Second {
    /// End of the second, counted from the start.
    pub t: u64,
    pub requests: u64,
    /// Requests per second over the part of this second the run covered (the last
    /// second is usually partial).
    pub rps: f64,
    pub errors: u64,
    pub latency_ms: LatencyMs,
    /// The refusals (429 and 503) of this second and their latency, when there were any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<RefusedSecond>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefusedSecond {
    pub count: u64,
    pub latency_ms: LatencyMs,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ThresholdResult {
    pub name: String,
    pub limit: f64,
    pub actual: f64,
    pub ok: bool,
}

impl Report {
    /// The terminal summary.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\n{} against {} ({})",
            self.scenario, self.target, self.model
        );
        let _ = writeln!(
            out,
            "  {} requests in {:.1} s: {:.0} req/s, {} errors ({:.3}%)",
            self.requests,
            self.duration_s,
            self.achieved_rps,
            self.errors,
            self.error_rate * 100.0
        );
        if self.schedule_s > 0.0 && self.duration_s - self.schedule_s >= 0.5 {
            let _ = writeln!(
                out,
                "  the schedule ran {:.1} s; the last {:.1} s waited for answers still out",
                self.schedule_s,
                self.duration_s - self.schedule_s
            );
        }
        if let Some(scheduled) = self.scheduled_rps {
            let _ = writeln!(
                out,
                "  sessions: {:.0}/s started in time of {scheduled:.0}/s scheduled; {} finished, {} abandoned",
                self.sessions.achieved_per_s, self.sessions.finished, self.sessions.abandoned
            );
        }
        let l = &self.latency_ms;
        let _ = writeln!(
            out,
            "  latency from scheduled send: p50 {:.2} ms, p90 {:.2}, p99 {:.2}, p99.9 {:.2}, max {:.2}",
            l.p50, l.p90, l.p99, l.p999, l.max
        );
        let _ = writeln!(
            out,
            "  {:<28} {:>9} {:>7} {:>8} {:>9} {:>9}  statuses",
            "step", "requests", "errors", "skipped", "p50 ms", "p99 ms"
        );
        for s in &self.steps {
            let statuses: Vec<String> = s
                .statuses
                .iter()
                .map(|(k, v)| match s.latency_by_status.get(k) {
                    Some(l) if s.statuses.len() > 1 => format!("{k}:{v} (p99 {:.2} ms)", l.p99),
                    _ => format!("{k}:{v}"),
                })
                .chain(s.error_codes.iter().map(|(k, v)| format!("{k}:{v}")))
                .chain(s.transport_errors.iter().map(|(k, v)| format!("{k}:{v}")))
                .collect();
            let _ = writeln!(
                out,
                "  {:<28} {:>9} {:>7} {:>8} {:>9.2} {:>9.2}  {}",
                s.name,
                s.requests,
                s.errors,
                s.skipped,
                s.latency_ms.p50,
                s.latency_ms.p99,
                statuses.join(" ")
            );
        }
        let _ = writeln!(
            out,
            "  generator: {} threads, {} connections, {:.2} cores used",
            self.generator.threads, self.generator.connections, self.generator.cpu_cores
        );
        for w in &self.generator.warnings {
            let _ = writeln!(out, "  warning: {w}");
        }
        if let Some(s) = &self.saturation {
            let _ = writeln!(
                out,
                "  first saturated: {} at {:.0} s ({})",
                s.resource, s.at_s, s.detail
            );
        }
        if self.books.checked {
            let b = &self.books;
            let _ = writeln!(
                out,
                "  books: {} — {} orders / {} units acknowledged, {} paid, oversold {}, unknown {}, duplicates {}",
                if b.ok { "OK" } else { "FAILED" },
                b.acknowledged_orders,
                b.acknowledged_units,
                b.paid_orders,
                b.oversold_units,
                b.unknown_orders,
                b.duplicates
            );
            for d in b.details.iter().take(10) {
                let _ = writeln!(out, "    {d}");
            }
        }
        for t in &self.thresholds {
            let _ = writeln!(
                out,
                "  threshold {}: {} (limit {}, actual {:.4})",
                t.name,
                if t.ok { "met" } else { "MISSED" },
                t.limit,
                t.actual
            );
        }
        let _ = writeln!(
            out,
            "  result: {}",
            if self.passed { "PASSED" } else { "FAILED" }
        );
        out
    }
}

#[cfg(test)]
pub(crate) fn sample_report() -> Report {
    Report {
        scenario: "flash-sale".into(),
        target: "http://127.0.0.1:8080".into(),
        model: "open: 100/s for 1s".into(),
        started_at: "2026-11-22T00:00:00Z".into(),
        duration_s: 1.0,
        schedule_s: 1.0,
        requests: 3,
        errors: 0,
        error_rate: 0.0,
        achieved_rps: 3.0,
        scheduled_rps: Some(100.0),
        sessions: Sessions::default(),
        latency_ms: LatencyMs::default(),
        statuses: BTreeMap::from([("201".into(), 3)]),
        error_codes: BTreeMap::new(),
        steps: vec![StepReport {
            name: "buyer/purchase".into(),
            requests: 3,
            errors: 0,
            skipped: 0,
            achieved_rps: 3.0,
            latency_ms: LatencyMs::default(),
            statuses: BTreeMap::from([("201".into(), 3)]),
            latency_by_status: BTreeMap::new(),
            error_codes: BTreeMap::new(),
            transport_errors: BTreeMap::new(),
        }],
        generator: Generator::default(),
        timeline: vec![Second {
            t: 1,
            requests: 3,
            rps: 3.0,
            errors: 0,
            latency_ms: LatencyMs::default(),
            refused: None,
        }],
        server: vec![ServerSample {
            t: 1.0,
            cpu_cores: Some(0.5),
            ..ServerSample::default()
        }],
        saturation: None,
        books: Books {
            checked: true,
            ok: true,
            ..Books::default()
        },
        thresholds: vec![],
        passed: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_report_has_the_documented_shape() {
        let value = serde_json::to_value(sample_report()).unwrap();
        for key in [
            "requests",
            "errors",
            "achieved_rps",
            "latency_ms",
            "steps",
            "books",
        ] {
            assert!(value.get(key).is_some(), "missing {key}");
        }
        for key in ["p50", "p90", "p99", "p999", "max"] {
            assert!(value["latency_ms"].get(key).is_some(), "latency_ms.{key}");
            assert!(
                value["steps"][0]["latency_ms"].get(key).is_some(),
                "steps[].latency_ms.{key}"
            );
        }
        for key in ["requests", "errors", "achieved_rps"] {
            assert!(value["steps"][0].get(key).is_some(), "steps[].{key}");
        }
        for key in ["checked", "ok", "details"] {
            assert!(value["books"].get(key).is_some(), "books.{key}");
        }
        // And it reads back.
        let back: Report = serde_json::from_value(value).unwrap();
        assert_eq!(back.requests, 3);
    }

    #[test]
    fn the_summary_names_the_verdict() {
        let mut report = sample_report();
        assert!(report.summary().contains("result: PASSED"));
        report.passed = false;
        report.books.ok = false;
        report
            .books
            .details
            .push("acknowledged order ord_x is unknown to the server".into());
        let text = report.summary();
        assert!(text.contains("books: FAILED"), "{text}");
        assert!(text.contains("ord_x"), "{text}");
        assert!(text.contains("result: FAILED"), "{text}");
    }
}
