//! An adaptive concurrency limit after Netflix's Gradient2: the limit follows the ratio
//! of the long-term response time to the recent one. When requests start queueing the
//! recent time rises above the long-term one and the limit shrinks; while they do not,
//! the limit grows by a queue allowance of √limit per update, smoothed (`smoothing` ×
//! √limit when response times hold).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveRule {
    #[serde(default = "initial")]
    pub initial_limit: f64,
    #[serde(default = "min")]
    pub min_limit: f64,
    #[serde(default = "max")]
    pub max_limit: f64,
    /// How far the recent response time may exceed the long-term one before the limit
    /// shrinks (1.5: by half again).
    #[serde(default = "tolerance")]
    pub rtt_tolerance: f64,
    /// Weight of each update in the limit (0..1].
    #[serde(default = "smoothing")]
    pub smoothing: f64,
}

fn initial() -> f64 {
    64.0
}
/// A group-commit writer needs purchases in flight to fill its batches: below a few
/// dozen, throughput falls with the limit while latency does not improve.
fn min() -> f64 {
    32.0
}
fn max() -> f64 {
    4096.0
}
fn tolerance() -> f64 {
    1.5
}
fn smoothing() -> f64 {
    0.2
}

impl Default for AdaptiveRule {
    fn default() -> Self {
        AdaptiveRule {
            initial_limit: initial(),
            min_limit: min(),
            max_limit: max(),
            rtt_tolerance: tolerance(),
            smoothing: smoothing(),
        }
    }
}

impl AdaptiveRule {
    pub fn problems(&self) -> Vec<(&'static str, &'static str)> {
        let mut p = Vec::new();
        if !(self.min_limit >= 1.0 && self.min_limit <= self.max_limit) {
            p.push(("min_limit", "must be at least 1 and at most max_limit"));
        }
        if !(self.max_limit.is_finite() && self.max_limit <= 1_000_000.0) {
            p.push(("max_limit", "must be at most 1000000"));
        }
        if !(self.initial_limit >= self.min_limit && self.initial_limit <= self.max_limit) {
            p.push(("initial_limit", "must be within min_limit..=max_limit"));
        }
        if !(self.rtt_tolerance >= 1.0 && self.rtt_tolerance <= 10.0) {
            p.push(("rtt_tolerance", "must be within 1..=10"));
        }
        if !(self.smoothing > 0.0 && self.smoothing <= 1.0) {
            p.push(("smoothing", "must be within (0, 1]"));
        }
        p
    }
}

/// The limit's state; updated once per sampling interval from that interval's mean
/// response time.
#[derive(Debug, Clone)]
pub struct Gradient2 {
    rule: AdaptiveRule,
    limit: f64,
    /// Exponential average of the response time over ~the last 600 updates.
    long_rtt: Option<f64>,
}

impl Gradient2 {
    pub fn new(rule: AdaptiveRule) -> Gradient2 {
        Gradient2 {
            limit: rule.initial_limit,
            rule,
            long_rtt: None,
        }
    }

    pub fn limit(&self) -> f64 {
        self.limit
    }

    /// One update: `rtt` is the interval's mean response time (any unit), `inflight`
    /// the requests in flight at the sample, `reached` whether the limit refused anyone
    /// during the interval. Returns the new limit.
    pub fn update(&mut self, rtt: f64, inflight: f64, reached: bool) -> f64 {
        if rtt.is_nan() || rtt <= 0.0 {
            return self.limit;
        }
        let long = match self.long_rtt {
            None => rtt,
            Some(long) => long + (rtt - long) / 600.0,
        };
        // Drift back down faster when the long average is far above the recent time
        // (after a spell of overload), as Gradient2 does.
        let long = if long / rtt > 2.0 { long * 0.95 } else { long };
        self.long_rtt = Some(long);
        // Do not grow while the limit is not even used. A sample of those in flight can
        // miss a limit that refused requests all interval long: that counts as used, or a
        // limit squeezed to its minimum by a storm could never grow back.
        if inflight < self.limit / 2.0 && !reached {
            return self.limit;
        }
        let gradient = (self.rule.rtt_tolerance * long / rtt).clamp(0.5, 1.0);
        let queue = self.limit.sqrt();
        let target = self.limit * gradient + queue;
        self.limit = (self.limit * (1.0 - self.rule.smoothing) + target * self.rule.smoothing)
            .clamp(self.rule.min_limit, self.rule.max_limit);
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_grows_while_response_times_hold() {
        let mut g = Gradient2::new(AdaptiveRule::default());
        for _ in 0..50 {
            let limit = g.limit();
            g.update(1.0, limit, false);
            // Each update adds smoothing × √limit (the README's rate).
            let step = g.limit() - limit;
            let expected = 0.2 * limit.sqrt();
            assert!((step - expected).abs() < 1e-9, "{limit} grew by {step}");
        }
        assert!(g.limit() > 100.0, "{}", g.limit());
    }

    #[test]
    fn the_limit_shrinks_when_requests_queue() {
        let mut g = Gradient2::new(AdaptiveRule {
            initial_limit: 500.0,
            ..AdaptiveRule::default()
        });
        for _ in 0..20 {
            g.update(1.0, 500.0, false);
        }
        let before = g.limit();
        // Response times triple: requests are queueing.
        for _ in 0..20 {
            let limit = g.limit();
            g.update(3.0, limit, true);
        }
        assert!(g.limit() < before * 0.5, "{} → {}", before, g.limit());
        assert!(g.limit() >= 32.0);
    }

    #[test]
    fn an_idle_limit_does_not_grow() {
        let mut g = Gradient2::new(AdaptiveRule::default());
        for _ in 0..50 {
            g.update(1.0, 1.0, false);
        }
        assert_eq!(g.limit(), 64.0);
    }

    #[test]
    fn a_limit_squeezed_by_a_storm_grows_back_once_response_times_recover() {
        let mut g = Gradient2::new(AdaptiveRule::default());
        for _ in 0..20 {
            g.update(1.0, 64.0, true);
        }
        // A storm: response times ten times the usual, the limit at its minimum.
        for _ in 0..100 {
            let limit = g.limit();
            g.update(10.0, limit, true);
        }
        assert_eq!(g.limit(), 32.0);
        // After it, few are in flight at each sample, but the limit still refuses
        // requests (it is used): it grows back.
        for _ in 0..50 {
            g.update(1.0, 2.0, true);
        }
        assert!(g.limit() > 100.0, "{}", g.limit());
    }

    #[test]
    fn bad_settings_are_named() {
        let rule = AdaptiveRule {
            min_limit: 0.0,
            smoothing: 2.0,
            ..AdaptiveRule::default()
        };
        let fields: Vec<_> = rule.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(fields, ["min_limit", "smoothing"]);
    }
}
