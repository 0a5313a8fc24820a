//! Load models. The open model is a piecewise-linear arrival rate; the n-th arrival's
//! send time is computed exactly from the integral of the rate, so every generator
//! thread knows its own arrivals without talking to the others.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub enum Model {
    /// Arrivals per second, in stages; a session starts at each arrival whether or not
    /// earlier ones have finished.
    Open { stages: Vec<Stage> },
    /// `vus` users, each running sessions back to back; they start evenly over `ramp`.
    Closed {
        vus: usize,
        ramp: Duration,
        duration: Duration,
    },
}

/// Over `duration`, the rate moves linearly from the previous stage's target (0 for the
/// first stage) to `target`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stage {
    pub duration: Duration,
    pub target: f64,
}

impl Model {
    /// `rate` for `duration`, reached after a linear `ramp` from 0 when one is given.
    pub fn constant_rate(rate: f64, ramp: Duration, duration: Duration) -> Model {
        let mut stages = Vec::new();
        if !ramp.is_zero() {
            stages.push(Stage {
                duration: ramp,
                target: rate,
            });
        } else {
            // A zero-length stage jumps straight to the rate.
            stages.push(Stage {
                duration: Duration::ZERO,
                target: rate,
            });
        }
        stages.push(Stage {
            duration,
            target: rate,
        });
        Model::Open { stages }
    }

    pub fn duration(&self) -> Duration {
        match self {
            Model::Open { stages } => stages.iter().map(|s| s.duration).sum(),
            Model::Closed { ramp, duration, .. } => *ramp + *duration,
        }
    }

    /// The scheduled number of sessions (open model only).
    pub fn scheduled_sessions(&self) -> Option<u64> {
        match self {
            Model::Open { stages } => Some(Schedule::new(stages).total()),
            Model::Closed { .. } => None,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Model::Open { stages } => {
                let parts: Vec<String> = stages
                    .iter()
                    .filter(|s| !s.duration.is_zero())
                    .map(|s| {
                        format!(
                            "{}/s for {}",
                            s.target,
                            humantime::format_duration(s.duration)
                        )
                    })
                    .collect();
                format!("open: {}", parts.join(", then "))
            }
            Model::Closed {
                vus,
                ramp,
                duration,
            } => format!(
                "closed: {vus} virtual users, ramp {}, for {}",
                humantime::format_duration(*ramp),
                humantime::format_duration(*duration)
            ),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Piece {
    start: f64,
    end: f64,
    /// Arrivals before this piece and by its end.
    before: f64,
    after: f64,
    rate0: f64,
    /// Rate change per second.
    slope: f64,
}

/// Exact arrival times of a piecewise-linear rate.
#[derive(Debug, Clone)]
pub struct Schedule {
    pieces: Vec<Piece>,
    total: u64,
}

impl Schedule {
    pub fn new(stages: &[Stage]) -> Schedule {
        let mut pieces = Vec::with_capacity(stages.len());
        let mut t = 0.0;
        let mut before = 0.0;
        let mut rate = 0.0;
        for stage in stages {
            let d = stage.duration.as_secs_f64();
            if d > 0.0 {
                let slope = (stage.target - rate) / d;
                let after = before + (rate + stage.target) / 2.0 * d;
                pieces.push(Piece {
                    start: t,
                    end: t + d,
                    before,
                    after,
                    rate0: rate,
                    slope,
                });
                before = after;
                t += d;
            }
            rate = stage.target;
        }
        // Guard against rounding: the last arrival must fall inside the schedule.
        let total = (before + 1e-9).floor() as u64;
        Schedule { pieces, total }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// When arrival `n` (0-based) is due, measured from the start; `None` after the end.
    /// Arrival n is the moment the cumulative count reaches n + 1/2, so a constant rate r
    /// sends at 0.5/r, 1.5/r, … and exactly r·d arrivals fall within d seconds.
    pub fn time_of(&self, n: u64) -> Option<Duration> {
        if n >= self.total {
            return None;
        }
        let target = n as f64 + 0.5;
        let piece = self.pieces.iter().find(|p| target <= p.after + 1e-9)?;
        let need = target - piece.before;
        let dt = if piece.slope.abs() < 1e-12 {
            need / piece.rate0
        } else {
            // rate0·t + slope·t²/2 = need
            let disc = piece.rate0 * piece.rate0 + 2.0 * piece.slope * need;
            (-piece.rate0 + disc.max(0.0).sqrt()) / piece.slope
        };
        let t = (piece.start + dt).clamp(piece.start, piece.end);
        Some(Duration::from_secs_f64(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn a_constant_rate_spaces_arrivals_evenly() {
        let Model::Open { stages } = Model::constant_rate(100.0, Duration::ZERO, secs(2.0)) else {
            unreachable!()
        };
        let s = Schedule::new(&stages);
        assert_eq!(s.total(), 200);
        assert_eq!(s.time_of(0), Some(secs(0.005)));
        assert_eq!(s.time_of(1), Some(secs(0.015)));
        let last = s.time_of(199).unwrap().as_secs_f64();
        assert!((last - 1.995).abs() < 1e-9, "{last}");
        assert_eq!(s.time_of(200), None);
    }

    #[test]
    fn a_ramp_sends_half_the_arrivals_of_its_plateau() {
        // 0 → 1000/s over 2 s is 1000 arrivals, then 1000/s for 1 s is 1000 more.
        let Model::Open { stages } = Model::constant_rate(1000.0, secs(2.0), secs(1.0)) else {
            unreachable!()
        };
        let s = Schedule::new(&stages);
        assert_eq!(s.total(), 2000);
        // Half-way through the ramp only a quarter of its arrivals have been sent.
        let t = s.time_of(250).unwrap().as_secs_f64();
        assert!((t - 1.0).abs() < 0.01, "{t}");
        let t = s.time_of(1500).unwrap().as_secs_f64();
        assert!((t - 2.5).abs() < 0.01, "{t}");
        // Times never go backwards.
        let mut last = Duration::ZERO;
        for n in 0..s.total() {
            let t = s.time_of(n).unwrap();
            assert!(t >= last);
            last = t;
        }
    }

    #[test]
    fn stages_can_ramp_down() {
        let s = Schedule::new(&[
            Stage {
                duration: Duration::ZERO,
                target: 400.0,
            },
            Stage {
                duration: secs(1.0),
                target: 400.0,
            },
            Stage {
                duration: secs(1.0),
                target: 0.0,
            },
        ]);
        assert_eq!(s.total(), 600);
        let t = s.time_of(599).unwrap().as_secs_f64();
        assert!(t > 1.9 && t <= 2.0, "{t}");
    }

    #[test]
    fn closed_models_report_their_length() {
        let m = Model::Closed {
            vus: 10,
            ramp: secs(1.0),
            duration: secs(5.0),
        };
        assert_eq!(m.duration(), secs(6.0));
        assert_eq!(m.scheduled_sessions(), None);
        assert!(m.describe().contains("10 virtual users"));
    }
}
