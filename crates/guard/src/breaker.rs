//! Circuit breaker: closed → open on slow-call ratio, error ratio or error count over a
//! rolling window of ten buckets; open → half-open after `open_for`; half-open lets a
//! few probes through and closes only if all of them succeed.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use serde::Serialize;

use crate::rules::BreakerRule;

const BUCKETS: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which bucket period this is (now / bucket_len), to reset stale buckets.
    epoch: u64,
    calls: u64,
    errors: u64,
    slow: u64,
}

struct Inner {
    state: State,
    opened_at: u64,
    probes_in_flight: u32,
    probes_ok: u32,
    /// Half-open spells so far: which spell a probe belongs to.
    spell: u64,
    buckets: [Bucket; BUCKETS],
}

pub struct Breaker {
    pub rule: BreakerRule,
    bucket_ns: u64,
    /// While open: when it may let calls through again (ns); 0 otherwise. Lets
    /// [`Breaker::admits`], asked on every purchase, decide without the lock.
    open_until: AtomicU64,
    inner: Mutex<Inner>,
}

/// A call the breaker let through; report how it went with [`Breaker::record`].
#[derive(Debug)]
#[must_use]
pub struct Call {
    probe: bool,
    /// The half-open spell a probe was let through in: a probe still running when its
    /// spell ended (another probe failed) is no probe of the next one.
    spell: u64,
}

impl Breaker {
    pub fn new(rule: BreakerRule) -> Breaker {
        let bucket_ns = (rule.window.as_nanos() as u64 / BUCKETS as u64).max(1);
        Breaker {
            rule,
            bucket_ns,
            open_until: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                state: State::Closed,
                opened_at: 0,
                probes_in_flight: 0,
                probes_ok: 0,
                spell: 0,
                buckets: [Bucket::default(); BUCKETS],
            }),
        }
    }

    pub fn state(&self, now: u64) -> State {
        let mut inner = self.inner.lock();
        self.advance(&mut inner, now);
        inner.state
    }

    fn advance(&self, inner: &mut Inner, now: u64) {
        if inner.state == State::Open
            && now.saturating_sub(inner.opened_at) >= self.rule.open_for.as_nanos() as u64
        {
            inner.state = State::HalfOpen;
            self.open_until.store(0, Ordering::Relaxed);
            inner.probes_in_flight = 0;
            inner.probes_ok = 0;
            inner.spell += 1;
        }
    }

    /// Lets a call through, or says how long until the breaker may let one through.
    pub fn try_call(&self, now: u64) -> Result<Call, u64> {
        let mut inner = self.inner.lock();
        self.advance(&mut inner, now);
        match inner.state {
            State::Closed => Ok(Call {
                probe: false,
                spell: inner.spell,
            }),
            State::Open => {
                let until = inner.opened_at.saturating_add(nanos(self.rule.open_for));
                Err(until.saturating_sub(now).max(1))
            }
            State::HalfOpen => {
                if inner.probes_in_flight + inner.probes_ok < self.rule.half_open_probes {
                    inner.probes_in_flight += 1;
                    Ok(Call {
                        probe: true,
                        spell: inner.spell,
                    })
                } else {
                    Err(self.bucket_ns)
                }
            }
        }
    }

    /// For a dependency whose calls are made on behalf of many requests (the writer's
    /// commits, each carrying a batch of purchases): whether new work may join, without
    /// taking a call. Closed and half-open let work in (its commits are the probes);
    /// open says how long until it may.
    /// Reads the clock (`now`) only while open.
    pub fn admits(&self, now: impl FnOnce() -> u64) -> Result<(), u64> {
        // Lock-free: the next `observe` moves an expired open state to half-open.
        let until = self.open_until.load(Ordering::Relaxed);
        if until == 0 {
            return Ok(());
        }
        match now() {
            now if now < until => Err((until - now).max(1)),
            _ => Ok(()),
        }
    }

    /// Records a call made without [`Breaker::try_call`] (see [`Breaker::admits`]). While
    /// half-open it is a probe: enough good ones close the breaker, one bad one opens it.
    pub fn observe(&self, now: u64, ok: bool, rt_ns: u64) {
        let call = {
            let mut inner = self.inner.lock();
            self.advance(&mut inner, now);
            let probe = inner.state == State::HalfOpen;
            inner.probes_in_flight += u32::from(probe);
            Call {
                probe,
                spell: inner.spell,
            }
        };
        self.record(call, now, ok, rt_ns);
    }

    /// Records a finished call: `ok` false for an error or timeout, `rt_ns` its time.
    pub fn record(&self, call: Call, now: u64, ok: bool, rt_ns: u64) {
        let slow = rt_ns >= self.rule.slow_call.as_nanos() as u64;
        let mut inner = self.inner.lock();
        if call.spell != inner.spell {
            // A call let through before a half-open spell that has begun since: a probe
            // of an earlier spell (that spell's verdict is in: the breaker opened again)
            // or a call made while closed, before the breaker opened. Its outcome says
            // nothing of the dependency now, and counted in the window the breaker
            // closed with, a batch of calls that hung before it opened would open it
            // again against a dependency that recovered.
            return;
        }
        let epoch = now / self.bucket_ns;
        let b = &mut inner.buckets[(epoch % BUCKETS as u64) as usize];
        if b.epoch != epoch {
            *b = Bucket {
                epoch,
                ..Bucket::default()
            };
        }
        b.calls += 1;
        b.errors += u64::from(!ok);
        b.slow += u64::from(slow);
        if call.probe {
            inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
            if inner.state == State::HalfOpen {
                if ok && !slow {
                    inner.probes_ok += 1;
                    if inner.probes_ok >= self.rule.half_open_probes {
                        inner.state = State::Closed;
                        inner.buckets = [Bucket::default(); BUCKETS];
                    }
                } else {
                    self.open(&mut inner, now);
                }
            }
            return;
        }
        if inner.state != State::Closed {
            return;
        }
        // Totals over the buckets still inside the window.
        let oldest = epoch.saturating_sub(BUCKETS as u64 - 1);
        let (mut calls, mut errors, mut slows) = (0, 0, 0);
        for b in inner
            .buckets
            .iter()
            .filter(|b| b.epoch >= oldest && b.calls > 0)
        {
            calls += b.calls;
            errors += b.errors;
            slows += b.slow;
        }
        let r = &self.rule;
        let by_count = r.error_count.is_some_and(|n| errors >= n);
        let enough = calls >= r.min_calls.max(1);
        let by_error = enough
            && r.error_ratio
                .is_some_and(|x| errors as f64 >= x * calls as f64);
        let by_slow = enough
            && r.slow_ratio
                .is_some_and(|x| slows as f64 >= x * calls as f64);
        if by_count || by_error || by_slow {
            self.open(&mut inner, now);
        }
    }

    fn open(&self, inner: &mut Inner, now: u64) {
        inner.state = State::Open;
        inner.opened_at = now;
        self.open_until.store(
            now.saturating_add(nanos(self.rule.open_for)).max(1),
            Ordering::Relaxed,
        );
    }
}

/// A duration in nanoseconds, saturating (validation bounds the rules' durations well
/// below; this keeps an unvalidated one from wrapping).
fn nanos(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MS: u64 = 1_000_000;

    fn rule() -> BreakerRule {
        BreakerRule {
            name: "payment".into(),
            slow_call: Duration::from_millis(100),
            slow_ratio: Some(0.5),
            error_ratio: Some(0.5),
            error_count: None,
            min_calls: 10,
            window: Duration::from_secs(1),
            open_for: Duration::from_millis(500),
            half_open_probes: 2,
        }
    }

    fn call(b: &Breaker, now: u64, ok: bool, rt: u64) {
        let c = b.try_call(now).expect("let through");
        b.record(c, now, ok, rt);
    }

    #[test]
    fn errors_open_it_probes_close_it() {
        let b = Breaker::new(rule());
        // Nine failures are below min_calls: still closed.
        for i in 0..9 {
            call(&b, i * MS, false, MS);
        }
        assert_eq!(b.state(10 * MS), State::Closed);
        call(&b, 10 * MS, false, MS);
        assert_eq!(b.state(10 * MS), State::Open);
        // Open: refused at once, with the time left.
        assert_eq!(b.try_call(20 * MS).unwrap_err(), 490 * MS);
        // After open_for: half-open, two probes and no more.
        let p1 = b.try_call(510 * MS).unwrap();
        let p2 = b.try_call(510 * MS).unwrap();
        assert!(b.try_call(510 * MS).is_err());
        assert_eq!(b.state(510 * MS), State::HalfOpen);
        b.record(p1, 520 * MS, true, MS);
        b.record(p2, 520 * MS, true, MS);
        assert_eq!(b.state(520 * MS), State::Closed);
        // Closed again with a clean window.
        call(&b, 530 * MS, false, MS);
        assert_eq!(b.state(530 * MS), State::Closed);
    }

    #[test]
    fn calls_made_before_the_breaker_opened_count_for_nothing_once_it_closed() {
        let b = Breaker::new(rule());
        // Ten calls go out while closed and hang; ten more fail and open the breaker.
        let hung: Vec<_> = (0..10).map(|_| b.try_call(0).unwrap()).collect();
        for _ in 0..10 {
            call(&b, MS, false, MS);
        }
        assert!(b.try_call(2 * MS).is_err(), "open");
        // Half-open after 500 ms; two good probes close it.
        call(&b, 600 * MS, true, MS);
        call(&b, 600 * MS, true, MS);
        assert_eq!(b.state(600 * MS), State::Closed);
        // The hung calls time out now, against a dependency that recovered.
        for c in hung {
            b.record(c, 700 * MS, false, 600 * MS);
        }
        assert_eq!(b.state(700 * MS), State::Closed);
        assert!(b.try_call(700 * MS).is_ok());
    }

    #[test]
    fn a_probe_of_an_earlier_half_open_spell_counts_for_nothing() {
        let b = Breaker::new(rule());
        for i in 0..10 {
            call(&b, i * MS, false, MS);
        }
        // First half-open spell: two probes; the second fails and opens it again while
        // the first is still out.
        let p1 = b.try_call(510 * MS).unwrap();
        let p2 = b.try_call(510 * MS).unwrap();
        b.record(p2, 520 * MS, false, MS);
        assert_eq!(b.state(520 * MS), State::Open);
        // Second spell: one probe out, then the first spell's probe comes back fine.
        let p3 = b.try_call(1_030 * MS).unwrap();
        b.record(p1, 1_040 * MS, true, 50 * MS);
        b.record(p3, 1_040 * MS, true, MS);
        // One real probe of two has passed: still half-open, one more let through.
        assert_eq!(b.state(1_040 * MS), State::HalfOpen);
        let p4 = b
            .try_call(1_040 * MS)
            .expect("a second probe of this spell");
        assert!(b.try_call(1_040 * MS).is_err(), "no third");
        b.record(p4, 1_050 * MS, true, MS);
        assert_eq!(b.state(1_050 * MS), State::Closed);
    }

    #[test]
    fn a_failed_probe_opens_it_again() {
        let b = Breaker::new(rule());
        for i in 0..10 {
            call(&b, i * MS, false, MS);
        }
        let p = b.try_call(600 * MS).unwrap();
        b.record(p, 610 * MS, false, MS);
        assert_eq!(b.state(610 * MS), State::Open);
        assert!(b.try_call(700 * MS).is_err());
        assert!(b.try_call(1_200 * MS).is_ok());
    }

    #[test]
    fn slow_calls_open_it_and_old_buckets_do_not_count() {
        let b = Breaker::new(rule());
        // Slow calls spread over more than the window never reach the ratio at once.
        for i in 0..6 {
            call(&b, i * 400 * MS, true, 200 * MS);
            for j in 1..=2 {
                call(&b, i * 400 * MS + j * MS, true, MS);
            }
        }
        assert_eq!(b.state(2_400 * MS), State::Closed);
        for i in 0..10 {
            call(&b, 3_000 * MS + i * MS, true, 150 * MS);
        }
        assert_eq!(b.state(3_010 * MS), State::Open);
    }

    #[test]
    fn observed_calls_open_it_and_probe_it_without_tokens() {
        let b = Breaker::new(rule());
        // Admitted while closed; ten slow commits open it (at the tenth, 9 ms).
        assert!(b.admits(|| 0).is_ok());
        for i in 0..10 {
            b.observe(i * MS, true, 150 * MS);
        }
        assert_eq!(b.admits(|| 20 * MS).unwrap_err(), 489 * MS);
        // Half-open after open_for: work is admitted, and its commits are the probes.
        assert!(b.admits(|| 510 * MS).is_ok());
        b.observe(520 * MS, true, MS);
        assert_eq!(b.state(520 * MS), State::HalfOpen);
        // A failed probe opens it again for open_for.
        b.observe(530 * MS, false, MS);
        assert!(b.admits(|| 600 * MS).is_err());
        assert!(b.admits(|| 1_030 * MS).is_ok());
        b.observe(1_040 * MS, true, MS);
        b.observe(1_050 * MS, true, MS);
        assert_eq!(b.state(1_050 * MS), State::Closed);
        // Closed with a clean window: one slow commit does not open it.
        b.observe(1_060 * MS, true, 150 * MS);
        assert!(b.admits(|| 1_070 * MS).is_ok());
    }

    #[test]
    fn an_error_count_opens_it_without_a_ratio() {
        let mut r = rule();
        r.error_ratio = None;
        r.slow_ratio = None;
        r.error_count = Some(3);
        let b = Breaker::new(r);
        for i in 0..50 {
            call(&b, i * MS, true, MS);
        }
        for i in 0..3 {
            call(&b, (60 + i) * MS, false, MS);
        }
        assert_eq!(b.state(70 * MS), State::Open);
    }
}
