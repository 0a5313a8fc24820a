//! What the generator counts: per step, per second, and merged across threads.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are kept in microseconds, from 1 µs to one hour, at 3 significant figures.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

pub fn record(hist: &mut Histogram<u64>, micros: u64) {
    hist.saturating_record(micros.clamp(1, 3_600_000_000));
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct LatencyMs {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl LatencyMs {
    pub fn of(hist: &Histogram<u64>) -> LatencyMs {
        if hist.is_empty() {
            return LatencyMs::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        LatencyMs {
            p50: ms(hist.value_at_quantile(0.50)),
            p90: ms(hist.value_at_quantile(0.90)),
            p99: ms(hist.value_at_quantile(0.99)),
            p999: ms(hist.value_at_quantile(0.999)),
            max: ms(hist.max()),
            mean: hist.mean() / 1000.0,
        }
    }
}

/// One step's totals.
#[derive(Debug, Clone)]
pub struct StepStats {
    pub hist: Histogram<u64>,
    /// Requests that got an answer or failed in transport.
    pub requests: u64,
    /// Unexpected statuses plus transport failures.
    pub errors: u64,
    /// Not sent because a variable they need had no value (e.g. no order to pay).
    pub skipped: u64,
    pub statuses: BTreeMap<u16, u64>,
    /// Latency per status, e.g. how fast refusals were answered.
    pub by_status: BTreeMap<u16, Histogram<u64>>,
    /// Error codes from `{"error":{"code":…}}` answers, expected or not.
    pub codes: BTreeMap<String, u64>,
    /// Transport failures by kind: connect, io, timeout.
    pub transport: BTreeMap<&'static str, u64>,
}

impl Default for StepStats {
    fn default() -> Self {
        StepStats {
            hist: new_histogram(),
            requests: 0,
            errors: 0,
            skipped: 0,
            statuses: BTreeMap::new(),
            by_status: BTreeMap::new(),
            codes: BTreeMap::new(),
            transport: BTreeMap::new(),
        }
    }
}

impl StepStats {
    pub fn merge(&mut self, other: &StepStats) {
        self.hist.add(&other.hist).expect("same histogram bounds");
        self.requests += other.requests;
        self.errors += other.errors;
        self.skipped += other.skipped;
        for (k, v) in &other.statuses {
            *self.statuses.entry(*k).or_default() += v;
        }
        for (k, h) in &other.by_status {
            self.by_status
                .entry(*k)
                .or_insert_with(new_histogram)
                .add(h)
                .expect("same histogram bounds");
        }
        for (k, v) in &other.codes {
            *self.codes.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.transport {
            *self.transport.entry(k).or_default() += v;
        }
    }
}

fn interval_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid histogram bounds")
}

/// One second of one thread (or, merged, of all threads).
#[derive(Debug, Clone)]
pub struct Interval {
    pub second: u64,
    pub requests: u64,
    pub errors: u64,
    pub hist: Histogram<u64>,
    /// Latency of the refusals (429 and 503) alone, made at the first one: whether a
    /// guard answers its refusals fast, second by second (the first second of a closed
    /// model is every connection's first request at once).
    pub refused: Option<Histogram<u64>>,
}

impl Interval {
    /// Per-second histograms keep 2 significant figures (~20 KiB each instead of
    /// ~190 KiB): enough for a timeline, and the totals keep 3.
    pub fn new(second: u64) -> Interval {
        Interval {
            second,
            requests: 0,
            errors: 0,
            hist: interval_histogram(),
            refused: None,
        }
    }

    /// Counts one refusal's latency, in µs.
    pub fn refusal(&mut self, micros: u64) {
        record(self.refused.get_or_insert_with(interval_histogram), micros);
    }

    pub fn merge(&mut self, other: &Interval) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.hist.add(&other.hist).expect("same histogram bounds");
        if let Some(theirs) = &other.refused {
            self.refused
                .get_or_insert_with(interval_histogram)
                .add(theirs)
                .expect("same histogram bounds");
        }
    }
}

/// What one generator thread hands back at the end.
#[derive(Debug, Default)]
pub struct ThreadTotals {
    pub steps: Vec<StepStats>,
    pub sessions_started: u64,
    /// Sessions started before the schedule ended (all of them in the closed model): a
    /// generator that falls behind starts the rest late, after the run's window.
    pub sessions_started_in_time: u64,
    pub sessions_finished: u64,
    /// Sessions still running when the drain deadline passed.
    pub sessions_abandoned: u64,
    /// How late the dispatcher started sessions after their scheduled time, in µs.
    pub dispatch_lag: Option<Histogram<u64>>,
    pub books: Vec<crate::books::Receipt>,
    /// Receipts not kept because the per-run bound was reached.
    pub receipts_dropped: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_out_in_milliseconds() {
        let mut hist = new_histogram();
        for us in 1..=1000u64 {
            record(&mut hist, us * 1000);
        }
        let l = LatencyMs::of(&hist);
        assert!((l.p50 - 500.0).abs() < 1.0, "{l:?}");
        assert!((l.p99 - 990.0).abs() < 1.0, "{l:?}");
        assert!((l.max - 1000.0).abs() < 1.0, "{l:?}");
        assert_eq!(LatencyMs::of(&new_histogram()), LatencyMs::default());
    }

    #[test]
    fn merging_adds_everything() {
        let mut a = StepStats {
            requests: 2,
            errors: 1,
            ..StepStats::default()
        };
        a.statuses.insert(201, 1);
        a.codes.insert("sold_out".into(), 1);
        record(&mut a.hist, 100);
        let mut b = a.clone();
        b.transport.insert("timeout", 3);
        a.merge(&b);
        assert_eq!(a.requests, 4);
        assert_eq!(a.statuses[&201], 2);
        assert_eq!(a.codes["sold_out"], 2);
        assert_eq!(a.transport["timeout"], 3);
        assert_eq!(a.hist.len(), 2);
    }
}
