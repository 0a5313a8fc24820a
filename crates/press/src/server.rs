//! The server's side of the timeline: `/metrics` scraped once a second during the run,
//! turned into per-second figures, and the first resource that saturated.

use std::time::Duration;

use serde::Serialize;

/// The Prometheus text format, reduced to what the scraper needs: sums of samples by
/// metric name, optionally filtered by one label.
#[derive(Debug, Default, Clone)]
pub struct Exposition {
    samples: Vec<(String, String, f64)>,
}

impl Exposition {
    pub fn parse(text: &str) -> Exposition {
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = match line.rsplit_once(' ') {
                Some(parts) => parts,
                None => continue,
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            samples.push((name.to_owned(), labels.to_owned(), value));
        }
        Exposition { samples }
    }

    /// Sum of every sample of `name`; `None` when the metric is absent.
    pub fn sum(&self, name: &str) -> Option<f64> {
        self.sum_where(name, None)
    }

    /// Sum of the samples of `name` that carry `label="value"`.
    pub fn sum_where(&self, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
        let wanted = label.map(|(k, v)| format!("{k}=\"{v}\""));
        let mut found = None;
        for (n, labels, value) in &self.samples {
            if n != name {
                continue;
            }
            if let Some(wanted) = &wanted
                && !labels.split(',').any(|l| l.trim() == wanted)
            {
                continue;
            }
            *found.get_or_insert(0.0) += value;
        }
        found
    }
}

/// One second of the server, as its metrics tell it.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct ServerSample {
    /// Seconds since the schedule began, the timeline's clock (negative while the
    /// connections were still being opened).
    pub t: f64,
    /// CPU cores the server process used over the last interval.
    pub cpu_cores: Option<f64>,
    /// Cores the server's machine has.
    pub cores: Option<f64>,
    pub queue_depth: Option<f64>,
    pub queue_capacity: Option<f64>,
    /// Mean orders per committed batch over the interval.
    pub batch_mean: Option<f64>,
    /// Mean commit time over the interval, ms.
    pub commit_ms: Option<f64>,
    /// Purchases refused as overloaded, per second.
    pub rejections_per_s: Option<f64>,
    /// 5xx answers per second.
    pub errors_5xx_per_s: Option<f64>,
    /// Resident memory, MiB.
    pub memory_mib: Option<f64>,
    /// Requests the guard had admitted and not yet answered, at the scrape. Under
    /// overload, set against the same server's unloaded runs: fewer in flight than
    /// those means the guard's refusals left the server short of work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard_inflight: Option<f64>,
    /// Refusals the server held before answering, per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_per_s: Option<f64>,
}

/// Turns two scrapes `dt` apart into one sample.
pub fn sample(t: f64, before: &Exposition, now: &Exposition, dt: f64) -> ServerSample {
    let rate = |name: &str, label: Option<(&str, &str)>| -> Option<f64> {
        let a = before.sum_where(name, label).unwrap_or(0.0);
        let b = now.sum_where(name, label)?;
        Some(((b - a) / dt).max(0.0))
    };
    let mean = |sum: &str, count: &str| -> Option<f64> {
        let ds = now.sum(sum)? - before.sum(sum).unwrap_or(0.0);
        let dc = now.sum(count)? - before.sum(count).unwrap_or(0.0);
        (dc > 0.0).then(|| ds / dc)
    };
    ServerSample {
        t,
        // Our own microsecond counter first; the standard one counts whole seconds.
        cpu_cores: rate("stampede_cpu_seconds_total", None)
            .or_else(|| rate("process_cpu_seconds_total", None)),
        cores: now.sum("stampede_cpu_cores"),
        queue_depth: now.sum("stampede_writer_queue_depth"),
        queue_capacity: now.sum("stampede_writer_queue_capacity"),
        batch_mean: mean(
            "stampede_writer_batch_ops_sum",
            "stampede_writer_batch_ops_count",
        ),
        commit_ms: mean(
            "stampede_writer_commit_seconds_sum",
            "stampede_writer_commit_seconds_count",
        )
        .map(|s| s * 1000.0),
        rejections_per_s: rate("stampede_purchases_total", Some(("outcome", "overloaded"))),
        errors_5xx_per_s: rate("stampede_http_requests_total", Some(("class", "5xx"))),
        memory_mib: now
            .sum("process_resident_memory_bytes")
            .map(|b| b / (1024.0 * 1024.0)),
        guard_inflight: now.sum("stampede_guard_inflight"),
        held_per_s: rate("stampede_guard_refusals_held_total", None),
    }
}

/// Scrapes `/metrics` every `every` until `stop` fires; returns one sample per interval.
pub async fn scrape(
    client: reqwest::Client,
    url: String,
    started: std::time::Instant,
    every: Duration,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Vec<ServerSample> {
    let fetch = |client: reqwest::Client, url: String| async move {
        let response = client.get(&url).send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        Some(Exposition::parse(&response.text().await.ok()?))
    };
    let mut samples = Vec::new();
    let mut last = fetch(client.clone(), url.clone())
        .await
        .map(|e| (std::time::Instant::now(), e));
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = ticker.tick() => {}
        }
        let Some(now) = fetch(client.clone(), url.clone()).await else {
            continue;
        };
        let at = std::time::Instant::now();
        if let Some((then, before)) = &last {
            let dt = at.duration_since(*then).as_secs_f64().max(1e-3);
            let t = at.saturating_duration_since(started).as_secs_f64();
            samples.push(sample(t, before, &now, dt));
        }
        last = Some((at, now));
    }
    samples
}

/// The first resource that ran out, and when.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Saturation {
    pub resource: String,
    /// Seconds since the start of the run.
    pub at_s: f64,
    pub detail: String,
}

/// One second of the client's view, for the saturation search.
#[derive(Debug, Clone, Copy)]
pub struct ClientSecond {
    pub t: f64,
    pub p99_ms: f64,
    pub error_share: f64,
}

/// Names the first resource that saturated. `generator_cores` is what the generator
/// used on average and `generator_threads` what it may use; `same_host` says the
/// generator shares the server's machine (so their CPU adds up).
pub fn first_saturated(
    server: &[ServerSample],
    client: &[ClientSecond],
    slo_p99_ms: Option<f64>,
    generator_cores: f64,
    generator_threads: usize,
    same_host: bool,
) -> Option<Saturation> {
    let mut found: Vec<Saturation> = Vec::new();
    for s in server {
        let cores = s.cores.unwrap_or(0.0);
        if let (Some(cpu), true) = (s.cpu_cores, cores > 0.0) {
            if cpu >= 0.9 * cores {
                found.push(Saturation {
                    resource: "server_cpu".into(),
                    at_s: s.t,
                    detail: format!("the server used {cpu:.2} of {cores} cores"),
                });
            } else if same_host && cpu + generator_cores >= 0.9 * cores {
                found.push(Saturation {
                    resource: "host_cpu".into(),
                    at_s: s.t,
                    detail: format!(
                        "server {cpu:.2} + generator {generator_cores:.2} cores of the {cores} this machine has"
                    ),
                });
            }
        }
        if let (Some(depth), Some(capacity)) = (s.queue_depth, s.queue_capacity)
            && capacity > 0.0
            && depth >= 0.8 * capacity
        {
            found.push(Saturation {
                resource: "writer_queue".into(),
                at_s: s.t,
                detail: format!("the writer queue held {depth} of {capacity}"),
            });
        }
        if let Some(r) = s.rejections_per_s
            && r > 0.0
        {
            found.push(Saturation {
                resource: "admission".into(),
                at_s: s.t,
                detail: format!("the server refused {r:.0} purchases/s as overloaded"),
            });
        }
    }
    if generator_threads > 0 && generator_cores >= 0.9 * generator_threads as f64 {
        found.push(Saturation {
            resource: "generator_cpu".into(),
            at_s: 0.0,
            detail: format!(
                "the generator used {generator_cores:.2} of its {generator_threads} threads' cores: it, not the server, may be the limit"
            ),
        });
    }
    if let Some(slo) = slo_p99_ms
        && let Some(c) = client.iter().find(|c| c.p99_ms > slo)
    {
        found.push(Saturation {
            resource: "latency".into(),
            at_s: c.t,
            detail: format!("client p99 {:.1} ms passed the SLO of {slo} ms", c.p99_ms),
        });
    }
    if let Some(c) = client.iter().find(|c| c.error_share > 0.01) {
        found.push(Saturation {
            resource: "errors".into(),
            at_s: c.t,
            detail: format!("{:.1}% of requests failed", c.error_share * 100.0),
        });
    }
    // Earliest first; at the same second, resources before symptoms (the push order).
    found
        .into_iter()
        .enumerate()
        .min_by(|(ia, a), (ib, b)| a.at_s.total_cmp(&b.at_s).then(ia.cmp(ib)))
        .map(|(_, s)| s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# TYPE stampede_purchases_total counter
stampede_purchases_total{outcome="created"} 100
stampede_purchases_total{outcome="overloaded"} 10
stampede_writer_queue_depth 5
stampede_writer_queue_capacity 100
stampede_writer_batch_ops_sum 100
stampede_writer_batch_ops_count 10
process_cpu_seconds_total 2.5
stampede_cpu_cores 2
stampede_guard_inflight 7
stampede_guard_refusals_held_total 40
"#;

    #[test]
    fn exposition_sums_by_name_and_label() {
        let e = Exposition::parse(TEXT);
        assert_eq!(e.sum("stampede_purchases_total"), Some(110.0));
        assert_eq!(
            e.sum_where("stampede_purchases_total", Some(("outcome", "overloaded"))),
            Some(10.0)
        );
        assert_eq!(e.sum("nope"), None);
    }

    #[test]
    fn samples_are_rates_and_means_over_the_interval() {
        let before = Exposition::parse(TEXT);
        let after = Exposition::parse(
            &TEXT
                .replace("} 10\n", "} 30\n")
                .replace(
                    "process_cpu_seconds_total 2.5",
                    "process_cpu_seconds_total 4.5",
                )
                .replace("batch_ops_sum 100", "batch_ops_sum 400")
                .replace("batch_ops_count 10", "batch_ops_count 20")
                .replace("inflight 7", "inflight 288")
                .replace("held_total 40", "held_total 100"),
        );
        let s = sample(1.0, &before, &after, 2.0);
        assert_eq!(s.cpu_cores, Some(1.0));
        assert_eq!(s.rejections_per_s, Some(10.0));
        assert_eq!(s.batch_mean, Some(30.0));
        assert_eq!(s.queue_capacity, Some(100.0));
        // The in-flight count is the scrape's own, not a rate.
        assert_eq!(s.guard_inflight, Some(288.0));
        assert_eq!(s.held_per_s, Some(30.0));
    }

    #[test]
    fn the_earliest_saturation_is_named() {
        let quiet = ServerSample {
            t: 1.0,
            cpu_cores: Some(0.5),
            cores: Some(2.0),
            queue_depth: Some(0.0),
            queue_capacity: Some(100.0),
            rejections_per_s: Some(0.0),
            ..ServerSample::default()
        };
        let busy = ServerSample {
            t: 2.0,
            cpu_cores: Some(1.95),
            ..quiet.clone()
        };
        let full = ServerSample {
            t: 3.0,
            queue_depth: Some(95.0),
            rejections_per_s: Some(50.0),
            ..busy.clone()
        };
        let s = first_saturated(&[quiet.clone(), busy, full], &[], None, 0.2, 2, false).unwrap();
        assert_eq!(s.resource, "server_cpu");
        assert_eq!(s.at_s, 2.0);
        // Sharing the machine, the generator's CPU counts too.
        let shared = ServerSample {
            cpu_cores: Some(1.2),
            ..quiet.clone()
        };
        let s = first_saturated(&[shared], &[], None, 0.7, 2, true).unwrap();
        assert_eq!(s.resource, "host_cpu");
        // Nothing saturated: nothing named.
        assert_eq!(
            first_saturated(&[quiet], &[], Some(50.0), 0.1, 2, false),
            None
        );
        // Client symptoms when the server says nothing.
        let client = [ClientSecond {
            t: 4.0,
            p99_ms: 80.0,
            error_share: 0.0,
        }];
        let s = first_saturated(&[], &client, Some(50.0), 0.1, 2, false).unwrap();
        assert_eq!(s.resource, "latency");
    }
}
