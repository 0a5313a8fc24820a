//! Refusals repeated on one connection wait (`guard.system.hold_refused`).
//!
//! Why: a client that resends the moment it is refused turns each refusal into another
//! request. A closed loop of thousands of them keeps thousands of connection tasks ready
//! on the runtime's workers; an admitted purchase, woken when its batch commits, queues
//! behind all of them before it can answer, so it holds its in-flight slot many times
//! longer and the guard admits that many times fewer (BENCHMARKS.md, "The guard").
//!
//! So a connection refused with `Retry-After` gets a hold. Its next request is read and
//! decided at once, as any other: admitted, it is served without waiting. Refused again
//! inside the hold, its refusal is answered when the hold ends or its own hold has
//! passed, whichever comes first, and a new hold starts. Waiting on a timer, the
//! connection is not in the run queue and sends nothing more; a client that ignores
//! `Retry-After` gets about one refusal per `Retry-After` (at most 1 / (1 −
//! `hold_spread`), the share cut off below). A hold lasts the refusal's
//! own `Retry-After` (at most `hold_refused`), so a client that honours it never meets
//! a hold; nor does any request the guard admits. A share of each hold
//! (`hold_spread`) is cut off at random: a crowd refused together is then answered, and
//! comes back, spread out, where holds of one length would keep it together for good. Connections from trusted proxies are
//! never held: they carry many clients.
//!
//! **Invariant:** a hold costs one atomic per connection and, while a refusal waits, one
//! timer; it never delays an admitted request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One connection's hold: its end, in nanoseconds after [`epoch`] + 1 (0: none yet).
#[derive(Clone, Debug, Default)]
pub struct Hold(Arc<AtomicU64>);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Hold {
    /// Called on a refusal at `now` whose hold is `duration`: how long its answer must
    /// wait (zero when the connection was not held; never longer than its own hold,
    /// whatever a longer refusal before it left), and the hold it leaves, `duration`
    /// after the answer.
    pub fn refused(&self, now: Instant, duration: Duration) -> Duration {
        if duration.is_zero() {
            return Duration::ZERO;
        }
        let wait = match self.0.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            raw => (epoch() + Duration::from_nanos(raw - 1)).saturating_duration_since(now),
        }
        .min(duration);
        let until = (now + wait + duration)
            .saturating_duration_since(epoch())
            .as_nanos() as u64
            + 1;
        self.0.fetch_max(until, Ordering::Relaxed);
        wait
    }
}

/// A hold of `duration` with the share `spread` of it cut off at random (`u` uniform in
/// [0, 1)): a crowd refused in the same moment is answered, and comes back, spread over
/// that share instead of all at once, where a fixed hold would keep it together for
/// good. Never longer than `duration`.
pub fn spread(duration: Duration, spread: f64, u: f64) -> Duration {
    duration.mul_f64(1.0 - spread * u.clamp(0.0, 1.0))
}

/// What each request knows of its connection: the peer's address and the connection's
/// hold (the request's `ConnectInfo`, set by `serve` for each connection).
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    pub hold: Hold,
}

impl Peer {
    /// A peer with a hold of its own (one per connection).
    pub fn new(addr: SocketAddr) -> Peer {
        Peer {
            addr,
            hold: Hold::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOLD: Duration = Duration::from_millis(250);

    #[test]
    fn the_first_refusal_waits_for_nothing_and_a_repeat_inside_the_hold_waits_out_the_rest() {
        let hold = Hold::default();
        let t0 = Instant::now();
        assert_eq!(hold.refused(t0, HOLD), Duration::ZERO);
        // Refused again 10 ms later: answered when the hold ends, 240 ms on.
        let wait = hold.refused(t0 + Duration::from_millis(10), HOLD);
        assert_eq!(wait, Duration::from_millis(240));
        // That answer (at t0 + 250 ms) starts the next hold, to t0 + 500 ms.
        let wait = hold.refused(t0 + Duration::from_millis(260), HOLD);
        assert_eq!(wait, Duration::from_millis(240));
        // Refused after the hold: at once.
        assert_eq!(
            hold.refused(t0 + Duration::from_millis(2_000), HOLD),
            Duration::ZERO
        );
    }

    #[test]
    fn a_refusal_never_waits_longer_than_its_own_hold() {
        let hold = Hold::default();
        let t0 = Instant::now();
        // An 8 s hold (a 503 with Retry-After 8), then at once a refusal whose own hold
        // is 1 s (a 429 with Retry-After 1): it waits 1 s, not the 8 s left.
        assert_eq!(hold.refused(t0, Duration::from_secs(8)), Duration::ZERO);
        let wait = hold.refused(t0 + Duration::from_millis(10), Duration::from_secs(1));
        assert_eq!(wait, Duration::from_secs(1));
        // The longer hold still stands for a refusal with as long a hold of its own.
        let wait = hold.refused(t0 + Duration::from_millis(20), Duration::from_secs(8));
        assert_eq!(wait, Duration::from_millis(7_980));
    }

    #[test]
    fn a_spread_hold_is_cut_by_at_most_its_share() {
        let eight = Duration::from_secs(8);
        assert_eq!(spread(eight, 0.0, 0.7), eight);
        assert_eq!(spread(eight, 0.25, 0.0), eight);
        assert_eq!(spread(eight, 0.25, 0.5), Duration::from_secs(7));
        assert_eq!(spread(eight, 0.25, 1.0), Duration::from_secs(6));
        // A crowd of holds started together ends spread over the last quarter.
        let ends: Vec<_> = (0..4)
            .map(|i| spread(eight, 0.25, i as f64 / 4.0))
            .collect();
        assert_eq!(
            ends,
            [8_000, 7_500, 7_000, 6_500]
                .map(Duration::from_millis)
                .to_vec()
        );
    }

    #[test]
    fn a_zero_hold_never_waits() {
        let hold = Hold::default();
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(
                hold.refused(t0 + Duration::from_millis(i), Duration::ZERO),
                Duration::ZERO
            );
        }
    }

    #[test]
    fn connections_hold_apart() {
        let (a, b) = (Hold::default(), Hold::default());
        let t0 = Instant::now();
        a.refused(t0, HOLD);
        assert_eq!(b.refused(t0, HOLD), Duration::ZERO, "b was never refused");
        assert!(!a.refused(t0, HOLD).is_zero());
    }
}
