//! Capacity search: raise the arrival rate in steps until the SLO breaks, then bisect
//! between the last rate that held and the first that did not.

use serde::{Deserialize, Serialize};

/// One measured rate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Probe {
    pub rate: f64,
    pub achieved_rps: f64,
    pub p99_ms: f64,
    pub error_rate: f64,
    pub ok: bool,
    /// Why the probe failed, when it did.
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SearchLimits {
    pub start_rate: f64,
    pub max_rate: f64,
    /// Stop bisecting when the bracket is narrower than this share of the good rate.
    pub precision: f64,
    pub max_probes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Capacity {
    /// The highest arrival rate that met the SLO (`None`: not even the first).
    pub capacity_rps: Option<f64>,
    /// The lowest rate that missed it, when one was found.
    pub first_failing_rps: Option<f64>,
    pub probes: Vec<Probe>,
    pub sizing: Option<Sizing>,
}

/// How many nodes a peak needs, from the measured per-node capacity.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sizing {
    pub target_peak_rps: f64,
    pub per_node_rps: f64,
    /// Share of each node's capacity kept free (0.3 = run nodes at 70%).
    pub headroom: f64,
    pub nodes: u64,
}

pub fn size(target_peak_rps: f64, per_node_rps: f64, headroom: f64) -> Sizing {
    let usable = per_node_rps * (1.0 - headroom);
    let nodes = if usable > 0.0 {
        (target_peak_rps / usable).ceil().max(1.0) as u64
    } else {
        0
    };
    Sizing {
        target_peak_rps,
        per_node_rps,
        headroom,
        nodes,
    }
}

/// Runs the search; `measure` runs one probe at a rate.
pub async fn search<F, Fut>(limits: &SearchLimits, mut measure: F) -> anyhow::Result<Capacity>
where
    F: FnMut(f64) -> Fut,
    Fut: Future<Output = anyhow::Result<Probe>>,
{
    anyhow::ensure!(
        limits.start_rate > 0.0 && limits.max_rate >= limits.start_rate,
        "the start rate must be positive and no more than the maximum rate"
    );
    let mut probes = Vec::new();
    let mut good: Option<f64> = None;
    let mut bad: Option<f64> = None;
    // Step up: double until a rate fails or the maximum is reached.
    let mut rate = limits.start_rate;
    while probes.len() < limits.max_probes {
        let probe = measure(rate).await?;
        let ok = probe.ok;
        probes.push(probe);
        if ok {
            good = Some(rate);
            if rate >= limits.max_rate {
                break;
            }
            rate = (rate * 2.0).min(limits.max_rate);
        } else {
            bad = Some(rate);
            break;
        }
    }
    // Bisect between the last good and the first bad rate.
    if let (Some(mut lo), Some(mut hi)) = (good, bad) {
        while probes.len() < limits.max_probes && (hi - lo) > limits.precision * lo {
            let mid = ((lo + hi) / 2.0).round();
            if mid <= lo || mid >= hi {
                break;
            }
            let probe = measure(mid).await?;
            if probe.ok {
                lo = mid;
            } else {
                hi = mid;
            }
            probes.push(probe);
        }
        good = Some(lo);
        bad = Some(hi);
    }
    Ok(Capacity {
        capacity_rps: good,
        first_failing_rps: bad,
        probes,
        sizing: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(true_capacity: f64) -> impl FnMut(f64) -> std::future::Ready<anyhow::Result<Probe>> {
        move |rate| {
            let ok = rate <= true_capacity;
            std::future::ready(Ok(Probe {
                rate,
                achieved_rps: rate.min(true_capacity),
                p99_ms: if ok { 5.0 } else { 500.0 },
                error_rate: 0.0,
                ok,
                reason: (!ok).then(|| "p99".into()),
            }))
        }
    }

    fn limits() -> SearchLimits {
        SearchLimits {
            start_rate: 500.0,
            max_rate: 1_000_000.0,
            precision: 0.05,
            max_probes: 20,
        }
    }

    #[tokio::test]
    async fn the_search_brackets_the_true_capacity() {
        let result = search(&limits(), fake(11_300.0)).await.unwrap();
        let found = result.capacity_rps.unwrap();
        assert!((11_300.0 * 0.95..=11_300.0).contains(&found), "{found}");
        let failing = result.first_failing_rps.unwrap();
        assert!(failing > 11_300.0 && (failing - found) <= 0.05 * found + 1.0);
        // Steps were doubling before the bisection: 500, 1000, …, 16000.
        let rates: Vec<f64> = result.probes.iter().take(6).map(|p| p.rate).collect();
        assert_eq!(rates, [500.0, 1000.0, 2000.0, 4000.0, 8000.0, 16000.0]);
    }

    #[tokio::test]
    async fn a_server_that_fails_at_once_has_no_capacity() {
        let result = search(&limits(), fake(100.0)).await.unwrap();
        assert_eq!(result.capacity_rps, None);
        assert_eq!(result.probes.len(), 1);
    }

    #[tokio::test]
    async fn the_maximum_rate_caps_the_search() {
        let mut l = limits();
        l.max_rate = 3000.0;
        let result = search(&l, fake(1e9)).await.unwrap();
        assert_eq!(result.capacity_rps, Some(3000.0));
        assert_eq!(result.first_failing_rps, None);
    }

    #[test]
    fn sizing_keeps_headroom() {
        // 583,000/s at 11,000/s per node run at 70%: 583000 / 7700 = 75.7 → 76 nodes.
        let s = size(583_000.0, 11_000.0, 0.3);
        assert_eq!(s.nodes, 76);
        assert_eq!(size(1000.0, 0.0, 0.3).nodes, 0);
        assert_eq!(size(1.0, 1000.0, 0.3).nodes, 1);
    }
}
