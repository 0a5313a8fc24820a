//! GCRA (generic cell rate algorithm) on one atomic: the theoretical arrival time (TAT).
//!
//! One compare-and-swap per decision, no window edges: a limit of N/s admits N per
//! second however the second is cut (a two-bucket window can admit 2N across an edge).
//! Written here rather than taken from governor because warm-up changes the emission
//! interval per decision and pacing must reserve a future slot with a bound on the
//! wait; governor's API offers neither.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Gcra {
    /// Theoretical arrival time, nanoseconds on the guard's clock.
    tat: AtomicU64,
}

impl Gcra {
    pub fn new() -> Gcra {
        Gcra::default()
    }

    /// Admits one request if it fits the rate (`interval` ns per request) with a burst
    /// of `burst` requests; otherwise says how long until one would fit.
    pub fn try_admit(&self, now: u64, interval: u64, burst: u32) -> Result<(), u64> {
        let tolerance = interval.saturating_mul(u64::from(burst.max(1)) - 1);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let new_tat = tat.max(now).saturating_add(interval);
            let allowed_at = new_tat.saturating_sub(tolerance.saturating_add(interval));
            if allowed_at > now {
                return Err(allowed_at - now);
            }
            match self
                .tat
                .compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(actual) => tat = actual,
            }
        }
    }

    /// Returns one request's slot (`interval` ns) taken by `try_admit` or `reserve`, for
    /// a request that a later check refused: as if it had never been admitted. Never
    /// below `now`: a limiter that has caught up holds no slot to give back, so slots
    /// taken in a quiet spell and returned later cannot add to a busy one's rate.
    pub fn give_back(&self, now: u64, interval: u64) {
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |tat| {
                (tat > now).then(|| tat.saturating_sub(interval).max(now))
            });
    }

    /// Returns a paced slot whose reservation left the schedule at `end`, if no later
    /// reservation has been made since: then the next request takes its place. A slot
    /// with later ones booked after it stays spent (sending its successor early would
    /// send two requests at once).
    pub fn give_back_last(&self, end: u64, interval: u64) {
        let _ = self.tat.compare_exchange(
            end,
            end.saturating_sub(interval),
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }

    /// Reserves the next free slot for a paced request: `Ok(wait)` to send after `wait`
    /// ns, or `Err(excess)` when the wait would pass `max_wait` (nothing is reserved).
    pub fn reserve(&self, now: u64, interval: u64, max_wait: u64) -> Result<u64, u64> {
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let slot = tat.max(now);
            let wait = slot - now;
            if wait > max_wait {
                return Err(wait - max_wait);
            }
            match self.tat.compare_exchange_weak(
                tat,
                slot.saturating_add(interval),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(wait),
                Err(actual) => tat = actual,
            }
        }
    }
}

/// Nanoseconds between requests at `per_second`.
pub fn interval_ns(per_second: f64) -> u64 {
    if per_second <= 0.0 {
        u64::MAX / 4
    } else {
        (1e9 / per_second).round().max(1.0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn admits_the_burst_then_the_rate() {
        let g = Gcra::new();
        let t = interval_ns(10.0);
        let now = 10 * S;
        for _ in 0..20 {
            assert!(g.try_admit(now, t, 20).is_ok());
        }
        let wait = g.try_admit(now, t, 20).unwrap_err();
        assert_eq!(wait, t);
        // One more every 100 ms afterwards.
        assert!(g.try_admit(now + t, t, 20).is_ok());
        assert!(g.try_admit(now + t, t, 20).is_err());
    }

    #[test]
    fn a_slot_given_back_admits_another_request() {
        let g = Gcra::new();
        let t = interval_ns(10.0);
        let now = 10 * S;
        for _ in 0..5 {
            assert!(g.try_admit(now, t, 5).is_ok());
        }
        assert!(g.try_admit(now, t, 5).is_err());
        g.give_back(now, t);
        g.give_back(now, t);
        assert!(g.try_admit(now, t, 5).is_ok());
        assert!(g.try_admit(now, t, 5).is_ok());
        assert!(g.try_admit(now, t, 5).is_err());
    }

    /// Slots taken in a quiet spell and given back during a busy one add at most what
    /// the limiter holds now (its burst), not one each: a client cannot bank slots.
    #[test]
    fn slots_whose_time_has_passed_are_not_given_back() {
        let g = Gcra::new();
        let t = interval_ns(10.0);
        for i in 0..100 {
            assert!(g.try_admit(S + i * t, t, 5).is_ok());
        }
        // Much later, the burst is spent, then the hundred old slots come back.
        let busy = 100 * S;
        let admitted = |g: &Gcra| {
            (0..1_000)
                .filter(|_| g.try_admit(busy, t, 5).is_ok())
                .count()
        };
        assert_eq!(admitted(&g), 5);
        for _ in 0..100 {
            g.give_back(busy, t);
        }
        assert_eq!(admitted(&g), 5, "at most one burst more, never a hundred");
        // And a limiter that has caught up gives nothing back at all.
        let idle = Gcra::new();
        assert!(idle.try_admit(S, t, 1).is_ok());
        idle.give_back(2 * S, t);
        assert!(idle.try_admit(2 * S, t, 1).is_ok());
        assert!(idle.try_admit(2 * S, t, 1).is_err());
    }

    #[test]
    fn a_second_cut_anywhere_admits_the_rate() {
        // Steady traffic far above the limit: any 1 s window admits burst + rate·1 s at
        // most, never twice the rate.
        let g = Gcra::new();
        let t = interval_ns(100.0);
        let mut admitted = Vec::new();
        let mut now = 5 * S;
        while now < 8 * S {
            if g.try_admit(now, t, 1).is_ok() {
                admitted.push(now);
            }
            now += S / 10_000;
        }
        for start in (6 * S..7 * S).step_by((S / 7) as usize) {
            let n = admitted
                .iter()
                .filter(|&&a| a >= start && a < start + S)
                .count();
            assert!((99..=101).contains(&n), "{n} in the second from {start}");
        }
    }

    #[test]
    fn pacing_spaces_requests_and_bounds_the_queue() {
        let g = Gcra::new();
        let t = interval_ns(10.0); // 100 ms apart
        let now = 3 * S;
        assert_eq!(g.reserve(now, t, 250_000_000), Ok(0));
        assert_eq!(g.reserve(now, t, 250_000_000), Ok(t));
        assert_eq!(g.reserve(now, t, 250_000_000), Ok(2 * t));
        // A fourth would wait 300 ms, over the 250 ms bound: refused, nothing reserved.
        assert_eq!(g.reserve(now, t, 250_000_000), Err(50_000_000));
        assert_eq!(g.reserve(now + t, t, 250_000_000), Ok(2 * t));
    }
}
