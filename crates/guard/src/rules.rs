//! The rules, as written in the config file and sent to the admin API, and their
//! validation. Every error names the field it is about.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Request classes, most important first. Under pressure the last are shed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    Pay,
    Purchase,
    Browse,
    Stats,
}

impl Class {
    pub const ALL: [Class; 4] = [Class::Pay, Class::Purchase, Class::Browse, Class::Stats];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Class::Pay => "pay",
            Class::Purchase => "purchase",
            Class::Browse => "browse",
            Class::Stats => "stats",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardRules {
    /// Bumped on every accepted change; a change must name the version it replaces.
    #[serde(default)]
    pub version: u64,
    /// Log and count what would be blocked, block nothing.
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub flow: Vec<FlowRule>,
    #[serde(default = "default_hot")]
    pub hot: Vec<HotRule>,
    #[serde(default = "default_breakers")]
    pub breakers: Vec<BreakerRule>,
    #[serde(default)]
    pub system: SystemRule,
    /// Classes switched off by hand (they answer 503 `degraded`).
    #[serde(default)]
    pub degraded: Vec<Class>,
}

impl Default for GuardRules {
    fn default() -> Self {
        GuardRules {
            version: 0,
            dry_run: false,
            flow: Vec::new(),
            hot: default_hot(),
            breakers: default_breakers(),
            system: SystemRule::default(),
            degraded: Vec::new(),
        }
    }
}

/// The shipped default: one shopper may attempt at most 10 purchases per second with a
/// burst of 20. Scalpers get 429s; people never notice.
pub fn default_hot() -> Vec<HotRule> {
    vec![HotRule {
        name: "purchase_per_shopper".into(),
        resource: "purchase".into(),
        param: Param::Shopper,
        qps: 10.0,
        burst: 20,
        dry_run: false,
    }]
}

/// The shipped default breakers: on the payment provider and on the database.
pub fn default_breakers() -> Vec<BreakerRule> {
    vec![
        BreakerRule::payment_default(),
        BreakerRule::database_default(),
    ]
}

/// QPS and concurrency for one resource (a route such as `purchase`, or a named one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowRule {
    pub resource: String,
    pub qps: Option<f64>,
    #[serde(default = "one")]
    pub burst: u32,
    #[serde(default)]
    pub behavior: Behavior,
    /// Requests of this resource in flight at most.
    pub max_concurrency: Option<u32>,
    #[serde(default)]
    pub dry_run: bool,
}

fn one() -> u32 {
    1
}

impl FlowRule {
    /// Whether the rule has no use for a `burst`: pacing spaces every request at the
    /// rate (a queue, not a bucket), and a concurrency limit has no rate.
    pub fn takes_no_burst(&self) -> bool {
        self.qps.is_none() || matches!(self.behavior, Behavior::Pace { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Behavior {
    /// Over the rate: 429 at once. (A struct variant, not a unit one: serde lets a unit
    /// variant of an internally tagged enum ignore unknown fields, so `{"kind":
    /// "reject", "max_queue": "5s"}`, a pacing rule mistyped, would be taken silently.)
    Reject {},
    /// After an idle spell the rate starts at qps / cold_factor and rises linearly to
    /// qps over `period`, so a cold cache is not hit with the full rate at once.
    WarmUp {
        #[serde(default = "cold_factor")]
        cold_factor: f64,
        #[serde(with = "humantime_serde")]
        period: Duration,
    },
    /// Requests are spaced evenly at the rate; one that would wait longer than
    /// `max_queue` is refused.
    Pace {
        #[serde(with = "humantime_serde")]
        max_queue: Duration,
    },
}

/// The longest a warm-up period, a breaker's open spell or slow-call bound, or the
/// automatic degradation's delay may be: longer is a typo (and a few hundred years would
/// overflow the guard's nanosecond clock).
const DURATION_MAX: Duration = Duration::from_secs(3_600);

impl Default for Behavior {
    fn default() -> Self {
        Behavior::Reject {}
    }
}

fn cold_factor() -> f64 {
    3.0
}

/// What a hot-parameter rule keys on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Param {
    Shopper,
    ClientIp,
    Sale,
    Tenant,
}

/// A rate per distinct value of a parameter (per shopper, per IP, …), in bounded memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HotRule {
    pub name: String,
    pub resource: String,
    pub param: Param,
    pub qps: f64,
    #[serde(default = "one")]
    pub burst: u32,
    #[serde(default)]
    pub dry_run: bool,
}

/// A circuit breaker on an outbound dependency.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerRule {
    /// The dependency: `payment`, `database`, …
    pub name: String,
    /// A call slower than this counts as slow.
    #[serde(with = "humantime_serde")]
    pub slow_call: Duration,
    /// Open when this share of calls in the window is slow.
    pub slow_ratio: Option<f64>,
    /// Open when this share of calls in the window failed.
    pub error_ratio: Option<f64>,
    /// Open when this many calls in the window failed.
    pub error_count: Option<u64>,
    /// Ratios are judged only over at least this many calls.
    #[serde(default = "min_calls")]
    pub min_calls: u64,
    /// Rolling window of the statistics (ten buckets).
    #[serde(with = "humantime_serde", default = "window")]
    pub window: Duration,
    /// How long the breaker stays open before half-open probes.
    #[serde(with = "humantime_serde", default = "open_for")]
    pub open_for: Duration,
    /// Probes let through while half-open; all must succeed to close.
    #[serde(default = "probes")]
    pub half_open_probes: u32,
}

fn min_calls() -> u64 {
    20
}
fn window() -> Duration {
    Duration::from_secs(10)
}
fn open_for() -> Duration {
    Duration::from_secs(5)
}
fn probes() -> u32 {
    3
}

impl BreakerRule {
    /// On the writer's commits (one per batch). A healthy commit takes milliseconds;
    /// half of them failing, or taking a second, over at least five in ten seconds means
    /// the database is in trouble: purchases are then refused at once for two seconds,
    /// after which the next commits probe it.
    pub fn database_default() -> BreakerRule {
        BreakerRule {
            name: "database".into(),
            slow_call: Duration::from_secs(1),
            slow_ratio: Some(0.5),
            error_ratio: Some(0.5),
            error_count: None,
            min_calls: 5,
            window: window(),
            open_for: Duration::from_secs(2),
            half_open_probes: probes(),
        }
    }

    pub fn payment_default() -> BreakerRule {
        BreakerRule {
            name: "payment".into(),
            slow_call: Duration::from_secs(1),
            slow_ratio: Some(0.5),
            error_ratio: Some(0.5),
            error_count: None,
            min_calls: min_calls(),
            window: window(),
            open_for: open_for(),
            half_open_probes: probes(),
        }
    }
}

/// Whole-process protection and the priority of request classes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemRule {
    /// Share of the machine's cores (0..1) above which the BBR check applies: a request
    /// is refused when in-flight requests exceed max completions/s × min response time.
    pub cpu_threshold: Option<f64>,
    /// A hard bound on requests in flight (before the priority shares).
    pub max_inflight: Option<u64>,
    /// Share of the in-flight limit each class may use, in the order pay, purchase,
    /// browse, stats: lower classes meet their limit first and are shed first.
    #[serde(default = "shares")]
    pub class_shares: [f64; 4],
    /// Switch `stats` and `browse` off while the system check has refused requests for
    /// this long, and back on after as long without. Judged per whole second (a part of
    /// one counts as one: `"1500ms"` is two seconds).
    #[serde(with = "humantime_serde", default)]
    pub auto_degrade_after: Option<Duration>,
    /// An adaptive concurrency limit (Gradient2) on requests in flight, scaled by the
    /// class shares like `max_inflight`; off when unset.
    #[serde(default)]
    pub adaptive: Option<crate::adaptive::AdaptiveRule>,
    /// A refusal with `Retry-After` starts a hold on the client's connection, as long as
    /// that `Retry-After` and at most this; refused again on it within the hold, the
    /// client gets that answer when the hold ends or its own hold has passed, whichever
    /// comes first (and a new hold starts). Admitted requests never wait; a client that
    /// honours `Retry-After` never meets a hold; one that retries at once gets about one
    /// refusal per `Retry-After` (at most 1 / (1 − `hold_spread`)) instead of taking
    /// the server's time from the requests it admitted. Connections from trusted proxies are never held: they carry
    /// many clients. 0s: off. At most 1m.
    #[serde(with = "humantime_serde", default = "hold_refused")]
    pub hold_refused: Duration,
    /// The share of each hold (0 to 0.9) cut off at random, so that a crowd refused in
    /// the same moment is not answered, and does not come back, in the same moment: a
    /// hold of 8 s with 0.5 lasts 4 to 8 s. A hold never lasts longer than its
    /// `Retry-After`, so this never makes a client that honours it meet one. 0: every
    /// hold lasts its whole length.
    #[serde(default = "hold_spread")]
    pub hold_spread: f64,
    /// The longest `Retry-After` of a system-protection refusal (503 `overloaded`). It is
    /// 1 s while refusals are few, and grows, once a second (and at once when a crowd
    /// refused within a second calls for it), while they outnumber an
    /// eighth of the requests admitted: clients refused and coming back once per
    /// `Retry-After` then cost the server at most about an eighth of what it serves.
    /// Whole seconds, 1s to 1m; 1s keeps it fixed.
    #[serde(with = "humantime_serde", default = "overload_retry_after_max")]
    pub overload_retry_after_max: Duration,
}

/// The shipped default for `system.hold_refused`.
pub const HOLD_REFUSED_DEFAULT: Duration = Duration::from_secs(8);

fn hold_refused() -> Duration {
    HOLD_REFUSED_DEFAULT
}

/// The shipped default for `system.hold_spread`.
pub const HOLD_SPREAD_DEFAULT: f64 = 0.5;

fn hold_spread() -> f64 {
    HOLD_SPREAD_DEFAULT
}

/// The shipped default for `system.overload_retry_after_max`.
pub const OVERLOAD_RETRY_AFTER_MAX_DEFAULT: Duration = Duration::from_secs(8);

fn overload_retry_after_max() -> Duration {
    OVERLOAD_RETRY_AFTER_MAX_DEFAULT
}

fn shares() -> [f64; 4] {
    [1.0, 0.9, 0.7, 0.5]
}

impl Default for SystemRule {
    fn default() -> Self {
        SystemRule {
            cpu_threshold: None,
            max_inflight: None,
            class_shares: shares(),
            auto_degrade_after: None,
            adaptive: None,
            hold_refused: HOLD_REFUSED_DEFAULT,
            hold_spread: HOLD_SPREAD_DEFAULT,
            overload_retry_after_max: OVERLOAD_RETRY_AFTER_MAX_DEFAULT,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{field}: {message}")]
pub struct RuleError {
    pub field: String,
    pub message: String,
}

/// The longest a paced request may be made to wait (`behavior.max_queue`).
pub const PACE_MAX_QUEUE: Duration = Duration::from_secs(60);

/// The lowest rate a rule may set, requests per second (a warm-up's cold rate included).
pub const RATE_MIN: f64 = 0.001;

/// The highest rules version: the largest whole number a JSON number carries exactly,
/// so the next version (the admin API's `current + 1`) never overflows.
pub const VERSION_MAX: u64 = (1 << 53) - 1;

/// The highest version a configuration file may state. A file's version may jump (it
/// says which edit of the file it is), so it must leave room for the changes that follow
/// it one at a time (`VERSION_MAX` is where they stop): at `VERSION_MAX` itself, the admin
/// API's next change and the degradation switch could never be made again.
pub const FILE_VERSION_MAX: u64 = 1 << 52;

/// Most rules of each kind (the tables behind them are allocated per rule).
pub const MAX_RULES: usize = 256;

/// Most hot-parameter rules: each has a table of its own (4 MiB, allocated and written
/// when the rule is made), so 16 hold at most 64 MiB, and 128 MiB while a change that
/// replaces them all builds the new tables beside the old.
pub const MAX_HOT_RULES: usize = 16;

impl GuardRules {
    /// Checks every rule; all problems are reported, not just the first.
    pub fn validate(&self) -> Result<(), Vec<RuleError>> {
        let mut errors = Vec::new();
        let mut err = |field: String, message: &str| {
            errors.push(RuleError {
                field,
                message: message.to_owned(),
            })
        };
        // At least one request in about 17 minutes: a rate's interval times the largest
        // burst then stays far inside the limiter's 64-bit nanoseconds, which a smaller
        // one would overflow and so admit everything.
        let rate_ok = |q: f64| q.is_finite() && (RATE_MIN..=10_000_000.0).contains(&q);
        if self.version > VERSION_MAX {
            err("version".into(), "must be at most 9007199254740991");
        }
        if self.flow.len() > MAX_RULES || self.breakers.len() > MAX_RULES {
            err("rules".into(), "at most 256 rules of each kind");
        }
        if self.hot.len() > MAX_HOT_RULES {
            err(
                "hot".into(),
                "at most 16 hot-parameter rules (each holds a 4 MiB table)",
            );
        }
        let mut seen = std::collections::HashSet::new();
        for (i, r) in self.flow.iter().enumerate() {
            let f = |name: &str| format!("flow[{i}].{name}");
            if r.resource.is_empty() || r.resource.len() > 64 {
                err(f("resource"), "must be 1..=64 characters");
            }
            if !seen.insert(r.resource.clone()) {
                err(f("resource"), "another flow rule has this resource");
            }
            if r.qps.is_none() && r.max_concurrency.is_none() {
                err(f("qps"), "give qps, max_concurrency or both");
            }
            if let Some(q) = r.qps
                && !rate_ok(q)
            {
                err(f("qps"), "must be within [0.001, 10000000]");
            }
            if r.burst == 0 || r.burst > 1_000_000 {
                err(f("burst"), "must be within 1..=1000000");
            } else if r.burst != 1 && r.takes_no_burst() {
                // A burst there would be taken and ignored.
                err(
                    f("burst"),
                    "applies to a rate that rejects or warms up; a pacing or concurrency-only rule takes none",
                );
            }
            if r.max_concurrency == Some(0) {
                err(f("max_concurrency"), "must be at least 1");
            }
            match &r.behavior {
                Behavior::Reject {} => {}
                Behavior::WarmUp {
                    cold_factor,
                    period,
                } => {
                    if !(cold_factor.is_finite() && *cold_factor >= 1.0 && *cold_factor <= 100.0) {
                        err(f("behavior.cold_factor"), "must be within 1..=100");
                    }
                    if period.is_zero() || *period > DURATION_MAX {
                        err(f("behavior.period"), "must be within (0, 1h]");
                    }
                    if r.qps.is_none() {
                        err(f("behavior"), "warm-up needs qps");
                    }
                    if let Some(q) = r.qps
                        && cold_factor.is_finite()
                        && *cold_factor >= 1.0
                        && q / cold_factor < RATE_MIN
                    {
                        err(
                            f("behavior.cold_factor"),
                            "qps / cold_factor (the cold rate) must be at least 0.001",
                        );
                    }
                }
                Behavior::Pace { max_queue } => {
                    if *max_queue > PACE_MAX_QUEUE {
                        err(f("behavior.max_queue"), "at most 60s");
                    }
                    if r.qps.is_none() {
                        err(f("behavior"), "pacing needs qps");
                    }
                }
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, r) in self.hot.iter().enumerate() {
            let f = |name: &str| format!("hot[{i}].{name}");
            // Each distinct name registers its counters and metric series for the
            // process's life: short names keep that small.
            if r.name.is_empty() || r.name.len() > 64 || !names.insert(r.name.clone()) {
                err(f("name"), "must be 1..=64 characters and unique");
            }
            if r.resource.is_empty() || r.resource.len() > 64 {
                err(f("resource"), "must be 1..=64 characters");
            }
            if !rate_ok(r.qps) {
                err(f("qps"), "must be within [0.001, 10000000]");
            }
            if r.burst == 0 || r.burst > 1_000_000 {
                err(f("burst"), "must be within 1..=1000000");
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, r) in self.breakers.iter().enumerate() {
            let f = |name: &str| format!("breakers[{i}].{name}");
            if r.name.is_empty() || r.name.len() > 64 || !names.insert(r.name.clone()) {
                err(f("name"), "must be 1..=64 characters and unique");
            }
            if r.slow_call.is_zero() {
                err(
                    f("slow_call"),
                    "must be longer than 0 (else every call is slow)",
                );
            } else if r.slow_call > DURATION_MAX {
                err(f("slow_call"), "at most 1h");
            }
            if r.error_count == Some(0) {
                err(
                    f("error_count"),
                    "must be at least 1 (else any call opens the breaker)",
                );
            }
            for (field, ratio) in [("slow_ratio", r.slow_ratio), ("error_ratio", r.error_ratio)] {
                if let Some(x) = ratio
                    && !(x > 0.0 && x <= 1.0)
                {
                    err(f(field), "must be within (0, 1]");
                }
            }
            if r.slow_ratio.is_none() && r.error_ratio.is_none() && r.error_count.is_none() {
                err(
                    f("error_ratio"),
                    "give slow_ratio, error_ratio or error_count",
                );
            }
            if r.window < Duration::from_millis(100) || r.window > Duration::from_secs(600) {
                err(f("window"), "must be within 100ms..=600s");
            }
            if r.open_for.is_zero() || r.open_for > DURATION_MAX {
                err(f("open_for"), "must be within (0, 1h]");
            }
            if r.half_open_probes == 0 || r.half_open_probes > 1000 {
                err(f("half_open_probes"), "must be within 1..=1000");
            }
        }
        let s = &self.system;
        if let Some(c) = s.cpu_threshold
            && !(c > 0.0 && c <= 1.0)
        {
            err("system.cpu_threshold".into(), "must be within (0, 1]");
        }
        if let Some(after) = s.auto_degrade_after
            && (after.is_zero() || after > DURATION_MAX)
        {
            err("system.auto_degrade_after".into(), "must be within (0, 1h]");
        }
        if s.max_inflight == Some(0) {
            err("system.max_inflight".into(), "must be at least 1");
        }
        for (i, share) in s.class_shares.iter().enumerate() {
            if !(*share > 0.0 && *share <= 1.0) {
                err(format!("system.class_shares[{i}]"), "must be within (0, 1]");
            }
        }
        if s.hold_refused > Duration::from_secs(60) {
            err("system.hold_refused".into(), "must be at most 1m");
        }
        if !(0.0..=0.9).contains(&s.hold_spread) {
            err("system.hold_spread".into(), "must be within [0, 0.9]");
        }
        let most = s.overload_retry_after_max;
        if most < Duration::from_secs(1)
            || most > Duration::from_secs(60)
            || most.subsec_nanos() != 0
        {
            err(
                "system.overload_retry_after_max".into(),
                "must be whole seconds within [1s, 1m] (Retry-After is in seconds)",
            );
        }
        if let Some(adaptive) = &s.adaptive {
            for (field, message) in adaptive.problems() {
                err(format!("system.adaptive.{field}"), message);
            }
        }
        if s.class_shares.windows(2).any(|w| w[1] > w[0]) {
            err(
                "system.class_shares".into(),
                "must not increase from pay to stats: a lower class may not get more than a higher one",
            );
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_limit_shoppers() {
        let rules = GuardRules::default();
        rules.validate().unwrap();
        assert_eq!(rules.hot[0].qps, 10.0);
        assert_eq!(rules.hot[0].burst, 20);
        assert_eq!(rules.hot[0].param, Param::Shopper);
    }

    #[test]
    fn every_problem_is_named_by_its_field() {
        let rules: GuardRules = serde_json::from_value(serde_json::json!({
            "version": u64::MAX,
            "flow": [
                {"resource": "purchase", "qps": -1.0},
                {"resource": "purchase", "qps": 5.0, "burst": 0},
                {"resource": "pay", "behavior": {"kind": "warm_up", "cold_factor": 0.5, "period": "0s"}},
                {"resource": "payment", "qps": 1.0, "burst": 5, "behavior": {"kind": "pace", "max_queue": "1s"}},
                {"resource": "get_sale", "max_concurrency": 4, "burst": 5}
            ],
            "breakers": [
                {"name": "payment", "slow_call": "1s", "window": "1ms"},
                {"name": "database", "slow_call": "0s", "error_count": 0}
            ],
            "hot": (0..17)
                .map(|i| serde_json::json!({"name": if i == 0 { "n".repeat(65) } else { format!("h{i}") }, "resource": "purchase", "param": "shopper", "qps": 1.0}))
                .collect::<Vec<_>>(),
            "system": {"cpu_threshold": 1.5, "class_shares": [0.5, 0.9, 0.7, 0.5]}
        }))
        .unwrap();
        let errors = rules.validate().unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        for expected in [
            "flow[0].qps",
            "flow[1].resource",
            "flow[1].burst",
            "flow[2].qps",
            "flow[2].behavior.cold_factor",
            "flow[2].behavior.period",
            "flow[2].behavior",
            "flow[3].burst",
            "flow[4].burst",
            "breakers[0].error_ratio",
            "breakers[0].window",
            "breakers[1].slow_call",
            "breakers[1].error_count",
            "hot[0].name",
            "hot",
            "system.cpu_threshold",
            "system.class_shares",
            "version",
        ] {
            assert!(
                fields.contains(&expected),
                "{expected} missing from {fields:?}"
            );
        }
    }

    /// Rates too small for the limiter's nanoseconds (they would overflow and admit
    /// everything) are refused, a warm-up's cold rate included.
    #[test]
    fn rates_below_one_in_a_thousand_seconds_are_refused() {
        let rules: GuardRules = serde_json::from_value(serde_json::json!({
            "flow": [
                {"resource": "purchase", "qps": 1e-9, "burst": 20},
                {"resource": "pay", "qps": 0.002, "behavior": {"kind": "warm_up", "cold_factor": 3.0, "period": "10s"}},
                {"resource": "browse", "qps": 0.001, "burst": 1000000}
            ],
            "hot": [{"name": "h", "resource": "purchase", "param": "shopper", "qps": 1e-11, "burst": 20}]
        }))
        .unwrap();
        let errors = rules.validate().unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["flow[0].qps", "flow[1].behavior.cold_factor", "hot[0].qps"],
            "{errors:?}"
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_value::<GuardRules>(
            serde_json::json!({"flow": [{"resource": "x", "qps": 1, "nope": 1}]}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("nope"));
        // Also beside a behaviour without fields: a pacing rule mistyped as reject.
        let err = serde_json::from_value::<GuardRules>(serde_json::json!({"flow": [
            {"resource": "x", "qps": 1, "behavior": {"kind": "reject", "max_queue": "5s"}}
        ]}))
        .unwrap_err();
        assert!(err.to_string().contains("max_queue"), "{err}");
        let rules: GuardRules = serde_json::from_value(serde_json::json!({"flow": [
            {"resource": "x", "qps": 1, "behavior": {"kind": "reject"}}
        ]}))
        .unwrap();
        assert_eq!(rules.flow[0].behavior, Behavior::Reject {});
    }

    #[test]
    fn durations_past_an_hour_are_refused() {
        let rules: GuardRules = serde_json::from_value(serde_json::json!({
            "flow": [
                {"resource": "pay", "qps": 5.0, "behavior": {"kind": "warm_up", "period": "18446744073s"}}
            ],
            "breakers": [
                {"name": "payment", "slow_call": "2h", "error_ratio": 0.5, "open_for": "18446744073s"}
            ],
            "system": {"auto_degrade_after": "600years"}
        }))
        .unwrap();
        let errors = rules.validate().unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "flow[0].behavior.period",
                "breakers[0].slow_call",
                "breakers[0].open_for",
                "system.auto_degrade_after"
            ]
        );
    }
}
