//! Traffic protection that knows what a shop is for.
//!
//! The [`Guard`] decides, per request and without I/O: is this request class switched
//! off, is the process past its safe concurrency (priority-scaled, so stats and browse
//! go before purchase and pay), does the resource's flow rule let it through (reject,
//! warm-up or pacing; concurrency), and, once the caller knows the shopper or sale, is
//! that key over its own limit. Outbound calls go through circuit breakers. The HTTP
//! side (status codes, `Retry-After`, JSON) belongs to the API crate.

pub mod adaptive;
pub mod breaker;
pub mod gcra;
pub mod hot;
pub mod rules;

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::RwLock;
use serde::Serialize;

pub use breaker::{Breaker, Call, State as BreakerState};
pub use rules::{Behavior, BreakerRule, Class, FlowRule, GuardRules, HotRule, Param, RuleError};

use gcra::{Gcra, interval_ns};
use hot::HotTable;

/// Slots per hot-parameter rule: 2^18 × 16 bytes = 4 MiB, allocated once.
pub const HOT_SLOTS: usize = 1 << 18;

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// A flow or hot-parameter rule (429 `throttled`).
    Throttled {
        rule: Arc<str>,
        retry_after: Duration,
    },
    /// System protection (503 `overloaded`).
    Overloaded { retry_after: Duration },
    /// The request's class is switched off (503 `degraded`).
    Degraded { class: Class },
    /// The dependency's breaker is open (503 `circuit_open`).
    CircuitOpen { name: String, retry_after: Duration },
}

impl Rejection {
    pub fn reason(&self) -> Reason {
        match self {
            Rejection::Throttled { .. } => Reason::Throttled,
            Rejection::Overloaded { .. } => Reason::Overloaded,
            Rejection::Degraded { .. } => Reason::Degraded,
            Rejection::CircuitOpen { .. } => Reason::CircuitOpen,
        }
    }

    pub fn retry_after(&self) -> Duration {
        match self {
            Rejection::Throttled { retry_after, .. }
            | Rejection::Overloaded { retry_after }
            | Rejection::CircuitOpen { retry_after, .. } => *retry_after,
            Rejection::Degraded { .. } => Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Throttled,
    Overloaded,
    Degraded,
    CircuitOpen,
}

const REASONS: [Reason; 4] = [
    Reason::Throttled,
    Reason::Overloaded,
    Reason::Degraded,
    Reason::CircuitOpen,
];

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::Throttled => "throttled",
            Reason::Overloaded => "overloaded",
            Reason::Degraded => "degraded",
            Reason::CircuitOpen => "circuit_open",
        }
    }
}

// ---- per-resource counters -------------------------------------------------------------

#[derive(Debug, Default)]
pub struct Counters {
    pub passed: AtomicU64,
    pub blocked: [AtomicU64; 4],
    /// Dry run: would have been blocked.
    pub would_block: AtomicU64,
    pub errors: AtomicU64,
    pub completed: AtomicU64,
    pub rt_ns: AtomicU64,
    /// Requests admitted under a concurrency limit and still in flight. Kept with the
    /// resource, not the rule: a rule removed and added again (or changed) counts the
    /// requests admitted under the one before, which give their place back here.
    held: AtomicU64,
    /// Whether the rules in force pace this resource ([`Guard::paces`]): set with each
    /// rules change, so the question costs a request one load, not the rules'.
    paced: AtomicBool,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CounterValues {
    pub passed: u64,
    pub blocked_throttled: u64,
    pub blocked_overloaded: u64,
    pub blocked_degraded: u64,
    pub blocked_circuit_open: u64,
    pub would_block: u64,
    pub errors: u64,
    pub completed: u64,
    pub rt_ns: u64,
}

impl Counters {
    /// A refusal of this resource: counted as blocked by its reason and returned, or in
    /// dry run counted as would-block and let through (`None`).
    fn refusal(&self, rejection: Rejection, dry_run: bool) -> Option<Rejection> {
        if dry_run {
            self.would_block.fetch_add(1, Ordering::Relaxed);
            None
        } else {
            self.blocked[rejection.reason() as usize].fetch_add(1, Ordering::Relaxed);
            Some(rejection)
        }
    }

    /// One call of the resource finished after `rt_ns`, failed or not.
    fn finished(&self, rt_ns: u64, error: bool) {
        self.completed.fetch_add(1, Ordering::Relaxed);
        self.rt_ns.fetch_add(rt_ns, Ordering::Relaxed);
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn values(&self) -> CounterValues {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CounterValues {
            passed: l(&self.passed),
            blocked_throttled: l(&self.blocked[0]),
            blocked_overloaded: l(&self.blocked[1]),
            blocked_degraded: l(&self.blocked[2]),
            blocked_circuit_open: l(&self.blocked[3]),
            would_block: l(&self.would_block),
            errors: l(&self.errors),
            completed: l(&self.completed),
            rt_ns: l(&self.rt_ns),
        }
    }
}

/// One resource in the last whole second.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SecondView {
    pub passed: u64,
    pub blocked: HashMap<&'static str, u64>,
    pub would_block: u64,
    pub errors: u64,
    pub avg_rt_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ResourceStats {
    pub resource: String,
    pub last_second: SecondView,
    pub total: CounterValues,
}

#[derive(Debug, Clone, Serialize)]
pub struct GuardStats {
    pub version: u64,
    pub dry_run: bool,
    pub inflight: u64,
    /// Process CPU as a share of the machine's cores, sampled every 100 ms.
    pub cpu: f64,
    /// The BBR estimate of safe requests in flight (max completions/s × min mean RT).
    pub bbr_limit: f64,
    /// The adaptive (Gradient2) limit on requests in flight, when enabled.
    pub adaptive_limit: Option<f64>,
    /// The `Retry-After` (s) system protection answers with now.
    pub overload_retry_after_s: u64,
    pub degraded: Vec<Class>,
    pub breakers: Vec<(String, BreakerState)>,
    pub hot_evictions: u64,
    /// Bytes held by hot-parameter tables (fixed).
    pub hot_memory_bytes: usize,
    pub resources: Vec<ResourceStats>,
}

// ---- compiled rules --------------------------------------------------------------------

struct Flow {
    rule: FlowRule,
    /// Names used in rejections, made once.
    rate_name: Arc<str>,
    concurrency_name: Arc<str>,
    /// Carried into the next rules while this rule stays the same.
    limiter: Arc<FlowLimiter>,
}

/// A flow rule's limiter state: the GCRA's theoretical arrival time and the warm-up's
/// progress.
#[derive(Default)]
struct FlowLimiter {
    gcra: Gcra,
    warm_start: AtomicU64,
    /// When demand last reached `COOL_BELOW` × the cold rate within a second (0: never).
    last_busy: AtomicU64,
    /// Warm-up's demand: the second (on the guard's clock, + 1; 0: none) whose requests
    /// `attempts` counts (admitted or not: a rule that refuses is under demand, however
    /// few it passes), and the first second of the current run of busy seconds.
    second: AtomicU64,
    attempts: AtomicU64,
    run_start: AtomicU64,
}

impl FlowLimiter {
    /// Moves the per-second count on to `now`'s second. For the one call that moves it,
    /// returns the requests of the whole second just finished, if it was one (traffic in
    /// it and in the one before); every other call gets `None`, so what follows from that
    /// second is decided once, at its end.
    fn second_just_finished(&self, now: u64) -> Option<u64> {
        let second = now / 1_000_000_000 + 1;
        let current = self.second.load(Ordering::Relaxed);
        if current == second
            || self
                .second
                .compare_exchange(current, second, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return None;
        }
        let passes = self.attempts.swap(0, Ordering::Relaxed);
        let next = current != 0 && second == current + 1;
        let whole = next && self.run_start.load(Ordering::Relaxed) < current;
        if !next {
            self.run_start.store(second, Ordering::Relaxed);
        }
        whole.then_some(passes)
    }
}

struct Hot {
    rule: HotRule,
    /// Carried into the next rules while this rule stays the same: a scalper's
    /// allowance does not come back with a rules change.
    table: Arc<HotTable>,
    interval: u64,
    /// `hot:<name>`: its counters and the name used in rejections.
    resource: Resource,
}

/// Rules resolved against resource ids, so a decision indexes instead of hashing names.
struct Compiled {
    rules: GuardRules,
    /// By resource id; ids registered after this compilation have no rule.
    flows: Vec<Option<Flow>>,
    hot: Vec<Vec<Hot>>,
    /// Changes only when the hot-parameter rules change (not with every version of the
    /// rules): a `HotTaken` of the same generation names the same rules by the same
    /// places, so a flow rule's change or a degradation switch while a request is in
    /// flight still lets it give back or count what it took.
    hot_generation: u64,
    /// Each breaker with the `outbound:<name>` resource that counts its calls.
    breakers: HashMap<String, (Arc<Breaker>, Resource), foldhash::fast::RandomState>,
}

impl Compiled {
    /// Compiles `rules`. What a rule has learned (a flow rule's limiter, a hot rule's
    /// table, a breaker's state) is taken over from `previous` where the same rule is
    /// there unchanged, so a rules change (or a degradation switch) does not hand every
    /// limit a fresh burst, start warm-up rules cold again mid-peak or close open
    /// breakers. Requests in flight are counted on across any change.
    fn new(rules: GuardRules, registry: &Registry, previous: Option<&Compiled>) -> Compiled {
        let mut flows: Vec<Option<Flow>> = Vec::new();
        let mut hot: Vec<Vec<Hot>> = Vec::new();
        for r in &rules.flow {
            let id = registry.resolve(&r.resource).id;
            if flows.len() <= id {
                flows.resize_with(id + 1, || None);
            }
            let before = previous.and_then(|p| p.flow(id));
            flows[id] = Some(Flow {
                rule: r.clone(),
                rate_name: Arc::from(format!("flow:{}", r.resource)),
                concurrency_name: Arc::from(format!("flow:{}:concurrency", r.resource)),
                limiter: before
                    .filter(|b| b.rule == *r)
                    .map_or_else(Arc::default, |b| b.limiter.clone()),
            });
        }
        for r in &rules.hot {
            let id = registry.resolve(&r.resource).id;
            if hot.len() <= id {
                hot.resize_with(id + 1, Vec::new);
            }
            let table = previous
                .and_then(|p| p.hot.get(id))
                .and_then(|before| before.iter().find(|h| h.rule == *r))
                .map_or_else(|| Arc::new(HotTable::new(HOT_SLOTS)), |h| h.table.clone());
            hot[id].push(Hot {
                rule: r.clone(),
                table,
                interval: interval_ns(r.qps),
                resource: registry.resolve(&format!("hot:{}", r.name)),
            });
        }
        let breakers = rules
            .breakers
            .iter()
            .map(|r| {
                let resource = registry.resolve(&format!("outbound:{}", r.name));
                let breaker = previous
                    .and_then(|p| p.breakers.get(&r.name))
                    .filter(|(b, _)| b.rule == *r)
                    .map_or_else(|| Arc::new(Breaker::new(r.clone())), |(b, _)| b.clone());
                (r.name.clone(), (breaker, resource))
            })
            .collect();
        let hot_generation = match previous {
            Some(p) if p.rules.hot == rules.hot => p.hot_generation,
            Some(p) => p.hot_generation + 1,
            None => 0,
        };
        Compiled {
            rules,
            flows,
            hot,
            hot_generation,
            breakers,
        }
    }

    fn flow(&self, id: usize) -> Option<&Flow> {
        self.flows.get(id).and_then(Option::as_ref)
    }
}

/// A resource name resolved once (at startup, per route) to its id and counters.
#[derive(Clone, Debug)]
pub struct Resource {
    id: usize,
    name: Arc<str>,
    counters: Arc<Counters>,
}

impl Resource {
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Every resource name the guard has seen, with its counters. Names come from code
/// (routes, dependencies) and from rules (at most `MAX_RULES` of each kind, each name at
/// most 64 characters), never from requests. A name stays for the process's life (ids
/// index the compiled rules), so only an admin who keeps introducing new rule names
/// grows it, by a few hundred bytes and six metric series a name; a restart resets it.
#[derive(Default)]
struct Registry {
    by_name: RwLock<HashMap<Arc<str>, Resource, foldhash::fast::RandomState>>,
}

/// Most resources the guard tracks. Every name a rule ever used stays registered, with
/// its counters, its stats row and its metrics series, for the process's life (ids index
/// the compiled rules); a rules change that would register more is refused, so repeated
/// admin changes with new names cannot grow memory without bound.
pub const RESOURCES_MAX: usize = 4_096;

impl Registry {
    fn len(&self) -> usize {
        self.by_name.read().len()
    }

    fn contains(&self, name: &str) -> bool {
        self.by_name.read().contains_key(name)
    }

    fn resolve(&self, name: &str) -> Resource {
        if let Some(r) = self.by_name.read().get(name) {
            return r.clone();
        }
        let mut map = self.by_name.write();
        let id = map.len();
        map.entry(Arc::from(name))
            .or_insert_with(|| Resource {
                id,
                name: Arc::from(name),
                counters: Arc::default(),
            })
            .clone()
    }
}

// ---- system protection -----------------------------------------------------------------

const SYS_BUCKETS: usize = 10;
const SYS_BUCKET_NS: u64 = 100_000_000;

#[derive(Default)]
struct SysBucket {
    epoch: AtomicU64,
    count: AtomicU64,
    rt_sum: AtomicU64,
}

#[derive(Default)]
struct System {
    inflight: AtomicU64,
    buckets: [SysBucket; SYS_BUCKETS],
}

impl System {
    fn record(&self, now: u64, rt: u64) {
        let epoch = now / SYS_BUCKET_NS;
        let b = &self.buckets[(epoch % SYS_BUCKETS as u64) as usize];
        let seen = b.epoch.load(Ordering::Relaxed);
        if seen != epoch
            && b.epoch
                .compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            b.count.store(0, Ordering::Relaxed);
            b.rt_sum.store(0, Ordering::Relaxed);
        }
        b.count.fetch_add(1, Ordering::Relaxed);
        b.rt_sum.fetch_add(rt, Ordering::Relaxed);
    }

    /// Completions and mean response time (ns) of the last whole 100 ms bucket.
    fn last_bucket(&self, now: u64) -> Option<(u64, f64)> {
        let epoch = now / SYS_BUCKET_NS;
        let b = &self.buckets[((epoch + SYS_BUCKETS as u64 - 1) % SYS_BUCKETS as u64) as usize];
        if b.epoch.load(Ordering::Relaxed) + 1 != epoch {
            return None;
        }
        let count = b.count.load(Ordering::Relaxed);
        (count > 0).then(|| {
            (
                count,
                b.rt_sum.load(Ordering::Relaxed) as f64 / count as f64,
            )
        })
    }

    /// Requests `admit` let through that completed in the last second: the whole
    /// buckets of it (nine tenths: the current bucket is still filling), scaled to a
    /// second, as the refusals they are set against are counted.
    fn completed_last_second(&self, now: u64) -> u64 {
        let whole: u64 = self
            .last_second(now)
            .map(|b| b.count.load(Ordering::Relaxed))
            .sum();
        whole * SYS_BUCKETS as u64 / (SYS_BUCKETS as u64 - 1)
    }

    /// Requests `admit` let through that completed in the last second, the bucket still
    /// filling included (for a look within a second, which the whole buckets alone would
    /// miss at a storm's start).
    fn completed_within_second(&self, now: u64) -> u64 {
        self.within_second(now)
            .map(|(_, b)| b.count.load(Ordering::Relaxed))
            .sum()
    }

    /// The buckets of the last second, the one still filling included, each with
    /// whether it is that one.
    fn within_second(&self, now: u64) -> impl Iterator<Item = (bool, &SysBucket)> {
        let epoch = now / SYS_BUCKET_NS;
        self.buckets.iter().filter_map(move |b| {
            let e = b.epoch.load(Ordering::Relaxed);
            (e + SYS_BUCKETS as u64 > epoch).then_some((e == epoch, b))
        })
    }

    /// The whole buckets of the last second (not the one still filling).
    fn last_second(&self, now: u64) -> impl Iterator<Item = &SysBucket> {
        self.within_second(now)
            .filter_map(|(filling, b)| (!filling).then_some(b))
    }

    /// max completions per second × min mean response time, over the last second; at
    /// least `MIN_BBR_LIMIT`, which is also the limit while nothing completes.
    fn bbr_limit(&self, now: u64) -> f64 {
        let mut max_qps: f64 = 0.0;
        let mut min_rt = f64::MAX;
        for b in self.last_second(now) {
            let count = b.count.load(Ordering::Relaxed);
            if count == 0 {
                continue;
            }
            max_qps = max_qps.max(count as f64 / (SYS_BUCKET_NS as f64 / 1e9));
            min_rt = min_rt.min(b.rt_sum.load(Ordering::Relaxed) as f64 / count as f64 / 1e9);
        }
        if min_rt == f64::MAX {
            // Nothing finished in the last second: a stall (or a start under pressure)
            // is no reason to admit without bound. The floor holds until answers come.
            return MIN_BBR_LIMIT;
        }
        (max_qps * min_rt).max(MIN_BBR_LIMIT)
    }
}

/// A warm-up rule cools down after a whole second in which fewer requests than this
/// share of its cold rate (qps / cold_factor) asked for it.
const COOL_BELOW: f64 = 0.8;
/// The most two busy marks of a warm-up rule are apart under steady demand (ns): the mark
/// is reached once in each second of the guard's clock, anywhere in it.
const BUSY_SECONDS_APART_MAX: u64 = 2_000_000_000;

/// The BBR estimate never goes below this many requests in flight.
pub const MIN_BBR_LIMIT: f64 = 16.0;

// ---- the guard -------------------------------------------------------------------------

pub struct Guard {
    base: Instant,
    compiled: ArcSwap<Compiled>,
    registry: Registry,
    last_second: RwLock<HashMap<String, SecondView>>,
    system: System,
    /// f64 bits: process CPU as a share of the machine's cores.
    cpu: AtomicU64,
    /// The adaptive limit's state (when the rules ask for one) and its current value
    /// (f64 bits) for the decision path.
    adaptive: parking_lot::Mutex<Option<adaptive::Gradient2>>,
    adaptive_limit: AtomicU64,
    /// Set by `pin_cpu`: the sampler leaves the CPU figure alone.
    cpu_pinned: AtomicBool,
    /// Set by system-protection refusals, cleared by the sampler once a second.
    pressure_seen: AtomicBool,
    /// Set when the adaptive limit refused a request, cleared by each limit update: the
    /// limit was in use during the interval, however few are in flight at the sample.
    adaptive_reached: AtomicBool,
    auto_degraded: AtomicBool,
    /// The `Retry-After` of system-protection refusals, whole seconds (1 when calm).
    overload_retry_after: AtomicU64,
    /// The whole second (of [`Guard::now`]) `storm_refused` counts in, and its
    /// system-protection refusals so far: a crowd refused within a second raises the
    /// `Retry-After` at once ([`Guard::overload_refusal`]).
    storm_second: AtomicU64,
    storm_refused: AtomicU64,
    /// The `Retry-After` in force when `storm_second` began: the one this second's
    /// refusals so far were told (a raise within the second must not compound).
    storm_base: AtomicU64,
    hasher: foldhash::fast::FixedState,
}

/// One request's refusals while it is decided: counted as blocked, or, in a dry run, noted
/// and let through; the admission then counts one would-block when it finishes
/// (`Admission::would_block`), however many of its checks said so.
struct Refusals<'a> {
    counters: &'a Counters,
    dry_run: bool,
    would_block: std::cell::Cell<bool>,
}

impl<'a> Refusals<'a> {
    fn new(compiled: &Compiled, counters: &'a Counters) -> Self {
        Refusals {
            counters,
            dry_run: compiled.rules.dry_run,
            would_block: Default::default(),
        }
    }

    fn refuse(&self, rejection: Rejection, rule_dry_run: bool) -> Option<Rejection> {
        if self.dry_run || rule_dry_run {
            self.would_block.set(true);
            None
        } else {
            self.counters.refusal(rejection, false)
        }
    }
}

/// A request the guard let through. Dropping it marks the request finished.
#[must_use]
pub struct Admission<'a> {
    guard: &'a Guard,
    resource: &'a Resource,
    /// Counted in the resource's requests held under a concurrency limit: its place
    /// goes back there, whatever rules are in force by then.
    concurrency: bool,
    /// Counted in the system's requests in flight and response times (a request, not a
    /// named resource's call).
    system: bool,
    /// Paced, and not yet sent on ([`Admission::sent`]).
    waiting: bool,
    /// A paced request's place in flight, taken once it is sent.
    in_flight_once_sent: bool,
    /// The rate slot it took, for [`Admission::give_back`] (which finds the limiter
    /// then: only a refused request pays for the lookup).
    rate: Option<RateSlot>,
    start: u64,
    /// Pacing: send after this long.
    pub wait: Duration,
    error: bool,
    /// Refused after all by a later check ([`Admission::withdraw`]): not counted as
    /// passed or completed.
    withdrawn: bool,
    /// A dry run let it through a rule that would have refused it: counted once as
    /// would-block when it finishes (withdrawn or not), however many of the resource's
    /// checks said so.
    would_block: bool,
}

impl Admission<'_> {
    /// The paced wait (`wait`) is over and the request goes on to be served: it counts
    /// in the system's requests in flight from now on. It was admitted by the system's
    /// check when it arrived, so it is not checked again (a request told to wait is not
    /// refused at the end of its wait).
    pub fn sent(&mut self) {
        self.waiting = false;
        if std::mem::take(&mut self.in_flight_once_sent) {
            self.guard.system.inflight.fetch_add(1, Ordering::Relaxed);
            self.system = true;
        }
    }

    /// Marks the request as failed (a 5xx), for the error counts.
    pub fn failed(&mut self) {
        self.error = true;
    }

    /// Returns the resource's rate slot this request took, when a check after the
    /// admission (a per-shopper or per-sale limit) refused it: a scalper's refused
    /// attempts must not use up the rate everyone shares. At most once.
    pub fn give_back(&mut self) {
        if let Some(slot) = self.rate.take()
            && let Some(flow) = self.guard.compiled.load().flow(self.resource.id)
        {
            match slot.paced_to {
                // A paced slot only while no later request was given the one after it:
                // else two would be sent at the same moment.
                Some(end) => flow.limiter.gcra.give_back_last(end, slot.interval),
                None => flow.limiter.gcra.give_back(self.guard.now(), slot.interval),
            }
        }
    }

    /// A check after the admission refused the request after all (a client's, a
    /// shopper's or a sale's limit, or an open breaker before the call): the rate slot
    /// goes back ([`Admission::give_back`]) and the request is not counted as passed
    /// or completed here, only as blocked where it was refused.
    pub fn withdraw(&mut self) {
        self.give_back();
        self.withdrawn = true;
    }
}

/// What [`Guard::check_hot`] took from the hot-parameter rules for one key: the rules
/// (by their place among the resource's rules, in the hot rules of `generation`) that
/// admitted it. Handed to [`Guard::give_back_hot`] when a later check refuses the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HotTaken {
    generation: u64,
    taken: u64,
    /// The rules that let it through (those that took, and dry-run rules that would
    /// have refused), for [`Guard::hot_passed`].
    passed: u64,
}

/// Counts a request as passed by each of `rules` whose bit is set in `passed`.
fn count_hot_passed(rules: &[Hot], passed: u64) {
    for (i, hot) in rules.iter().enumerate() {
        if passed & (1 << i) != 0 {
            hot.resource.counters.passed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Gives `hash`'s allowance back to each of `rules` whose bit is set in `taken`.
fn give_back_taken(rules: &[Hot], hash: u64, now: u64, taken: u64) {
    for (_, hot) in rules
        .iter()
        .enumerate()
        .filter(|(i, _)| taken & (1 << i) != 0)
    {
        hot.table.give_back(hash, now, hot.interval);
    }
}

/// A rate slot an admission took.
#[derive(Clone, Copy)]
struct RateSlot {
    interval: u64,
    /// Pacing: where the schedule stood after this slot (its send time + interval).
    paced_to: Option<u64>,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if self.waiting {
            // Dropped while it waited its paced turn (its client gone, or a pay's
            // request): never served, so neither passed nor completed, and its place
            // goes back if no later request was given the one after it.
            self.withdraw();
        }
        let now = self.guard.now();
        let rt = now.saturating_sub(self.start);
        if self.system {
            self.guard.system.inflight.fetch_sub(1, Ordering::Relaxed);
            // A request a later limit refused is no completion: it would pass for an
            // admission in the overload's Retry-After and lower BBR's minimum RT.
            if !self.withdrawn {
                self.guard.system.record(now, rt);
            }
        }
        if self.concurrency {
            self.resource.counters.held.fetch_sub(1, Ordering::Relaxed);
        }
        let counters = &self.resource.counters;
        // What a dry run let through counts whatever a later check said.
        if self.would_block {
            counters.would_block.fetch_add(1, Ordering::Relaxed);
        }
        if !self.withdrawn {
            // Counted when it finishes, not when admitted: a later refusal withdraws it
            // first, and counters never go back (Prometheus would read a reset). One
            // dropped while its handler panics failed.
            counters.passed.fetch_add(1, Ordering::Relaxed);
            counters.finished(rt, self.error || std::thread::panicking());
        }
    }
}

/// An outbound call the breaker let through.
#[must_use]
pub struct Outbound {
    breaker: Arc<Breaker>,
    /// None for a call a dry run let through an open breaker: counted, not recorded.
    call: Option<Call>,
    /// `outbound:<name>`: the call's time and failure go to its counters.
    resource: Resource,
    start: u64,
    guard: Arc<Guard>,
    done: bool,
}

impl Outbound {
    /// Reports the call's result to its breaker and its resource's counters.
    pub fn finish(mut self, ok: bool) {
        self.record(ok);
    }

    fn record(&mut self, ok: bool) {
        self.done = true;
        let now = self.guard.now();
        let rt = now.saturating_sub(self.start);
        if let Some(call) = self.call.take() {
            self.breaker.record(call, now, ok, rt);
        }
        self.resource.counters.finished(rt, !ok);
    }
}

impl Drop for Outbound {
    fn drop(&mut self) {
        // Dropped without a result (the caller gave up): count it as failed.
        if !self.done {
            self.record(false);
        }
    }
}

impl Guard {
    /// A guard with these rules (validated) and its sampler thread (CPU every 100 ms,
    /// per-second views, automatic degradation). The thread ends with the guard.
    pub fn new(rules: GuardRules) -> Result<Arc<Guard>, Vec<RuleError>> {
        rules.validate()?;
        let registry = Registry::default();
        let adaptive = rules.system.adaptive.clone().map(adaptive::Gradient2::new);
        let adaptive_limit = adaptive.as_ref().map_or(f64::MAX, |a| a.limit());
        let compiled = Compiled::new(rules, &registry, None);
        let guard = Arc::new(Guard {
            base: Instant::now(),
            compiled: ArcSwap::from_pointee(compiled),
            registry,
            last_second: RwLock::new(HashMap::new()),
            system: System::default(),
            cpu: AtomicU64::new(0f64.to_bits()),
            adaptive: parking_lot::Mutex::new(adaptive),
            adaptive_limit: AtomicU64::new(adaptive_limit.to_bits()),
            cpu_pinned: AtomicBool::new(false),
            pressure_seen: AtomicBool::new(false),
            adaptive_reached: AtomicBool::new(false),
            auto_degraded: AtomicBool::new(false),
            overload_retry_after: AtomicU64::new(1),
            storm_second: AtomicU64::new(0),
            storm_refused: AtomicU64::new(0),
            storm_base: AtomicU64::new(1),
            hasher: foldhash::fast::FixedState::with_seed(0x5ca1ab1e),
        });
        guard.mark_paced();
        let weak = Arc::downgrade(&guard);
        std::thread::Builder::new()
            .name("guard-sampler".into())
            .spawn(move || sampler(weak))
            .expect("spawn the guard sampler");
        Ok(guard)
    }

    /// Nanoseconds on the guard's clock (starts at 1 s so that 0 means "never").
    pub fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64 + 1_000_000_000
    }

    pub fn rules(&self) -> GuardRules {
        self.compiled.load().rules.clone()
    }

    /// How long a refusal with `Retry-After` holds the client's connection: the most
    /// (`system.hold_refused`; zero: off) and the share of it cut off at random
    /// (`system.hold_spread`). Asked once per refusal, never on admission.
    pub fn hold_refused(&self) -> (Duration, f64) {
        let system = &self.compiled.load().rules.system;
        (system.hold_refused, system.hold_spread)
    }

    /// Resolves a resource name once; keep the handle and pass it to `admit`.
    pub fn resource(&self, name: &str) -> Resource {
        self.registry.resolve(name)
    }

    /// Refuses rules whose new resource and rule names would make the guard track more
    /// than `RESOURCES_MAX` resources. `replace` asks it too; a caller that stores the
    /// rules first asks it before, so it never stores rules the guard then refuses.
    pub fn check_room(&self, rules: &GuardRules) -> Result<(), Vec<RuleError>> {
        let unseen: std::collections::HashSet<String> = rules
            .flow
            .iter()
            .map(|r| r.resource.clone())
            .chain(
                rules
                    .hot
                    .iter()
                    .flat_map(|r| [r.resource.clone(), format!("hot:{}", r.name)]),
            )
            .chain(
                rules
                    .breakers
                    .iter()
                    .map(|r| format!("outbound:{}", r.name)),
            )
            .filter(|name| !self.registry.contains(name))
            .collect();
        let known = self.registry.len();
        if known + unseen.len() > RESOURCES_MAX {
            return Err(vec![RuleError {
                field: "rules".into(),
                message: format!(
                    "{} new resource or rule names would make the guard track more than {RESOURCES_MAX} (it tracks {known}, and keeps every name a rule used until a restart): reuse names",
                    unseen.len()
                ),
            }]);
        }
        Ok(())
    }

    /// Replaces the rules if `rules.version` is newer than the current version (the
    /// admin API asks for exactly the next one; a reloaded file may skip). A rule that is
    /// the same in both keeps its limiter state (see `Compiled::new`); a changed or new
    /// one starts fresh; counters carry on.
    pub fn replace(&self, rules: GuardRules) -> Result<u64, Vec<RuleError>> {
        rules.validate()?;
        // One writer at a time; readers never wait.
        static REPLACING: parking_lot::Mutex<()> = parking_lot::Mutex::new(());
        let _one = REPLACING.lock();
        let current = self.compiled.load().rules.version;
        if rules.version <= current {
            return Err(vec![RuleError {
                field: "version".into(),
                message: format!("must be above {current}, the current version"),
            }]);
        }
        self.check_room(&rules)?;
        let version = rules.version;
        let mut adaptive = self.adaptive.lock();
        if rules.system.adaptive != self.compiled.load().rules.system.adaptive {
            *adaptive = rules.system.adaptive.clone().map(adaptive::Gradient2::new);
            let limit = adaptive.as_ref().map_or(f64::MAX, |a| a.limit());
            self.adaptive_limit
                .store(limit.to_bits(), Ordering::Relaxed);
        }
        let previous = self.compiled.load();
        let next = Compiled::new(rules, &self.registry, Some(&previous));
        self.compiled.store(Arc::new(next));
        self.mark_paced();
        Ok(version)
    }

    pub fn cpu(&self) -> f64 {
        f64::from_bits(self.cpu.load(Ordering::Relaxed))
    }

    /// For tests and benchmarks: pretend the process uses this share of the cores
    /// from now on (the sampler stops measuring).
    pub fn pin_cpu(&self, share: f64) {
        self.cpu_pinned.store(true, Ordering::Relaxed);
        self.cpu.store(share.to_bits(), Ordering::Relaxed);
    }

    /// The adaptive concurrency limit, when the rules ask for one.
    pub fn adaptive_limit(&self) -> f64 {
        f64::from_bits(self.adaptive_limit.load(Ordering::Relaxed))
    }

    pub fn inflight(&self) -> u64 {
        self.system.inflight.load(Ordering::Relaxed)
    }

    /// The `Retry-After` system protection answers with now (see
    /// `system.overload_retry_after_max`).
    pub fn overload_retry_after(&self) -> Duration {
        Duration::from_secs(self.overload_retry_after.load(Ordering::Relaxed))
    }

    /// The `Retry-After` of a system-protection refusal at `now`, counting it. Every
    /// [`STORM_LOOK_EVERY`] refusals within a second, the ones so far are set against
    /// the requests completed over the last second (the one filling included), as the
    /// sampler sets a whole second's: when even these call for a longer `Retry-After`,
    /// it is raised at once. A storm's opening crowd is then told to come back later in
    /// its first second, not sent back within a second to be refused again.
    fn overload_refusal(&self, compiled: &Compiled, now: u64) -> Duration {
        let second = now / 1_000_000_000;
        let seen = self.storm_second.load(Ordering::Relaxed);
        // Forward only: a request that read the clock just before the second turned must
        // not start the count over.
        if second > seen
            && self
                .storm_second
                .compare_exchange(seen, second, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.storm_refused.store(0, Ordering::Relaxed);
            self.storm_base.store(
                self.overload_retry_after.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
        }
        let refused = self.storm_refused.fetch_add(1, Ordering::Relaxed) + 1;
        if refused.is_multiple_of(STORM_LOOK_EVERY) {
            let current = self.overload_retry_after.load(Ordering::Relaxed);
            // Set from the value this second began with, as the sampler would set it
            // from the second's refusals: each look may only find more refusals, never
            // multiply them again by what an earlier look raised.
            let wanted = next_overload_retry_after(
                self.storm_base.load(Ordering::Relaxed),
                refused,
                self.system.completed_within_second(now),
                compiled.rules.system.overload_retry_after_max.as_secs(),
            );
            if wanted > current {
                self.overload_retry_after
                    .fetch_max(wanted, Ordering::Relaxed);
            }
        }
        self.overload_retry_after()
    }

    /// Whether `resource`'s flow rule in force paces its requests (holds them back to
    /// the rate instead of refusing): a request admitted there books a place in the
    /// queue that is its own until it is sent, so the caller checks what can be checked
    /// without the guard (the credential) first. A dry run paces nothing.
    pub fn paces(&self, resource: &Resource) -> bool {
        resource.counters.paced.load(Ordering::Relaxed)
    }

    /// Sets every resource's [`Guard::paces`] from the rules in force (at the start and
    /// after each change; changes are made one at a time).
    fn mark_paced(&self) {
        let compiled = self.compiled.load();
        for resource in self.registry.by_name.read().values() {
            let paced = !compiled.rules.dry_run
                && compiled.flow(resource.id).is_some_and(|flow| {
                    flow.rule.qps.is_some()
                        && !flow.rule.dry_run
                        && matches!(flow.rule.behavior, Behavior::Pace { .. })
                });
            resource.counters.paced.store(paced, Ordering::Relaxed);
        }
    }

    fn degraded(&self, compiled: &Compiled, class: Class) -> bool {
        compiled.rules.degraded.contains(&class)
            || (self.auto_degraded.load(Ordering::Relaxed)
                && matches!(class, Class::Browse | Class::Stats))
    }

    /// Decides one request of `resource` in `class`.
    pub fn admit<'a>(
        &'a self,
        resource: &'a Resource,
        class: Class,
    ) -> Result<Admission<'a>, Rejection> {
        let now = self.now();
        let compiled = self.compiled.load();
        let refusals = Refusals::new(&compiled, &resource.counters);
        let refuse = |rejection, rule_dry_run| refusals.refuse(rejection, rule_dry_run);

        if self.degraded(&compiled, class)
            && let Some(r) = refuse(Rejection::Degraded { class }, false)
        {
            return Err(r);
        }

        // System protection, scaled by the class's share. The request's place in flight
        // is taken before it is checked, so workers deciding at the same moment each see
        // the others: a bound can never be passed by requests admitted side by side.
        let inflight = self.system.inflight.fetch_add(1, Ordering::Relaxed);
        let release = || {
            self.system.inflight.fetch_sub(1, Ordering::Relaxed);
        };
        let sys = &compiled.rules.system;
        let share = sys.class_shares[class.index()];
        let mut over = sys
            .max_inflight
            .is_some_and(|max| inflight as f64 >= max as f64 * share);
        if !over && sys.adaptive.is_some() {
            over = inflight as f64 >= self.adaptive_limit() * share;
            if over {
                self.adaptive_reached.store(true, Ordering::Relaxed);
            }
        }
        if !over
            && let Some(threshold) = sys.cpu_threshold
            && self.cpu() >= threshold
        {
            over = inflight as f64 >= self.system.bbr_limit(now) * share;
        }
        if over {
            self.pressure_seen.store(true, Ordering::Relaxed);
            if let Some(r) = refuse(
                Rejection::Overloaded {
                    // A dry run refuses nothing: it moves no Retry-After.
                    retry_after: if compiled.rules.dry_run {
                        self.overload_retry_after()
                    } else {
                        self.overload_refusal(&compiled, now)
                    },
                },
                false,
            ) {
                release();
                return Err(r);
            }
        }

        self.flow_admission(&compiled, resource, now, true, refusals)
            .inspect_err(|_| release())
    }

    /// Decides one call of a named resource (such as `payment`, the calls to the payment
    /// provider) by its flow rule alone: the request that makes the call was already
    /// through degradation and system protection, and is already counted in flight.
    pub fn admit_named<'a>(&'a self, resource: &'a Resource) -> Result<Admission<'a>, Rejection> {
        let compiled = self.compiled.load();
        let refusals = Refusals::new(&compiled, &resource.counters);
        self.flow_admission(&compiled, resource, self.now(), false, refusals)
    }

    /// The resource's flow rule; then the admission, whose drop gives back the system's
    /// in-flight place (taken by [`Guard::admit`]) and records its response time when
    /// `system`.
    fn flow_admission<'a>(
        &'a self,
        compiled: &Compiled,
        resource: &'a Resource,
        now: u64,
        system: bool,
        refusals: Refusals<'_>,
    ) -> Result<Admission<'a>, Rejection> {
        let counters = &resource.counters;
        let dry_run = compiled.rules.dry_run;
        let refuse = |rejection, rule_dry_run| refusals.refuse(rejection, rule_dry_run);
        let mut wait = Duration::ZERO;
        let flow = compiled.flow(resource.id);
        let mut concurrency = false;
        let mut rate = None;
        if let Some(flow) = flow {
            let rule = &flow.rule;
            if let Some(max) = rule.max_concurrency {
                // Counted even when a dry run lets an over-limit request through, so the
                // drop that gives it back stays balanced.
                let current = counters.held.fetch_add(1, Ordering::Relaxed);
                concurrency = true;
                if current >= u64::from(max)
                    && let Some(r) = refuse(
                        Rejection::Throttled {
                            rule: flow.concurrency_name.clone(),
                            retry_after: Duration::from_millis(100),
                        },
                        rule.dry_run,
                    )
                {
                    counters.held.fetch_sub(1, Ordering::Relaxed);
                    return Err(r);
                }
            }
            let limiter = &flow.limiter;
            if let Some(qps) = rule.qps {
                let (verdict, interval) = match &rule.behavior {
                    Behavior::Reject {} => {
                        let interval = interval_ns(qps);
                        let verdict = limiter.gcra.try_admit(now, interval, rule.burst);
                        (verdict.map(|_| 0), interval)
                    }
                    Behavior::WarmUp {
                        cold_factor,
                        period,
                    } => {
                        let period = period.as_nanos() as u64;
                        let busy = limiter.last_busy.load(Ordering::Relaxed);
                        let cold = qps / cold_factor;
                        // Cold again once no second of the last period held demand near
                        // the cold rate (a pause, or a sparse trickle: a request every
                        // few seconds keeps nothing warm), or after a whole second of
                        // demand well under it: a trickle does not keep the rule warm
                        // for the spike that follows it. While cold, the warm-up starts
                        // over with each request, so it rises from the moment demand
                        // reaches that mark within a second (at three times the cold
                        // rate, a quarter of a second into the spike at most).
                        let trickle = limiter
                            .second_just_finished(now)
                            .is_some_and(|asked| (asked as f64) < cold * COOL_BELOW);
                        // Busy: the mark reached within a second, by two requests at
                        // least (a lone request every few seconds is no demand, however
                        // low the rate). The mark is reached at most 2 s apart under
                        // steady demand, so a shorter period waits that long.
                        let asked = limiter.attempts.fetch_add(1, Ordering::Relaxed) + 1;
                        if asked >= 2 && asked as f64 >= cold * COOL_BELOW {
                            limiter.last_busy.store(now, Ordering::Relaxed);
                        }
                        let idle_after = period.max(BUSY_SECONDS_APART_MAX);
                        if busy == 0 || now.saturating_sub(busy) > idle_after || trickle {
                            limiter.warm_start.store(now, Ordering::Relaxed);
                        }
                        let warm = limiter.warm_start.load(Ordering::Relaxed);
                        let progress = (now.saturating_sub(warm) as f64 / period as f64).min(1.0);
                        let interval = interval_ns(cold + (qps - cold) * progress);
                        let verdict = limiter.gcra.try_admit(now, interval, rule.burst);
                        (verdict.map(|_| 0), interval)
                    }
                    Behavior::Pace { max_queue } => {
                        let interval = interval_ns(qps);
                        let max_wait = max_queue.as_nanos() as u64;
                        (limiter.gcra.reserve(now, interval, max_wait), interval)
                    }
                };
                match verdict {
                    Ok(w) => {
                        // A dry run changes nothing, pacing included: no wait.
                        if !(dry_run || rule.dry_run) {
                            wait = Duration::from_nanos(w);
                        }
                        rate = Some(RateSlot {
                            interval,
                            paced_to: matches!(rule.behavior, Behavior::Pace { .. })
                                .then(|| now + w + interval),
                        });
                    }
                    Err(retry) => {
                        if let Some(r) = refuse(
                            Rejection::Throttled {
                                rule: flow.rate_name.clone(),
                                retry_after: Duration::from_nanos(retry),
                            },
                            rule.dry_run,
                        ) {
                            if concurrency {
                                counters.held.fetch_sub(1, Ordering::Relaxed);
                            }
                            return Err(r);
                        }
                    }
                }
            }
        }

        // A system admission's place in flight was taken by `admit`. A paced one gives
        // it up while it waits ([`Admission::sent`] takes it again): a queue of paced
        // requests, which pacing exists to hold, is no load on the server, and must not
        // pass for overload and get other classes shed. Nor is its wait response time
        // (BBR's minimum, the stats'): timed from when it is sent. Passed is counted when
        // it finishes (its drop), unless a later check withdraws it.
        let waits = system && !wait.is_zero();
        if waits {
            self.system.inflight.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(Admission {
            guard: self,
            resource,
            system: system && !waits,
            waiting: !wait.is_zero(),
            in_flight_once_sent: waits,
            concurrency,
            rate,
            start: now.saturating_add(wait.as_nanos() as u64),
            wait,
            error: false,
            withdrawn: false,
            would_block: refusals.would_block.get(),
        })
    }

    /// Checks the hot-parameter rules of `resource` for `param` = `key`, and counts the
    /// request as passed by the rules that let it through.
    pub fn check_hot<K: Hash + ?Sized>(
        &self,
        resource: &Resource,
        param: Param,
        key: &K,
    ) -> Result<HotTaken, Rejection> {
        self.check_hot_counting(resource, param, key, true)
    }

    /// As [`Guard::check_hot`], for a request that another limit may still refuse (the
    /// sale's after the shopper's, the handler's after the client's): the caller counts
    /// it as passed with [`Guard::hot_passed`] once every limit let it through, or gives
    /// it back with [`Guard::give_back_hot`]. A request one limit refused then counts
    /// as passed by none (counters never go back).
    pub fn check_hot_uncounted<K: Hash + ?Sized>(
        &self,
        resource: &Resource,
        param: Param,
        key: &K,
    ) -> Result<HotTaken, Rejection> {
        self.check_hot_counting(resource, param, key, false)
    }

    fn check_hot_counting<K: Hash + ?Sized>(
        &self,
        resource: &Resource,
        param: Param,
        key: &K,
        count: bool,
    ) -> Result<HotTaken, Rejection> {
        let compiled = self.compiled.load();
        let generation = compiled.hot_generation;
        let Some(rules) = compiled.hot.get(resource.id).filter(|r| !r.is_empty()) else {
            return Ok(HotTaken {
                generation,
                taken: 0,
                passed: 0,
            });
        };
        let now = self.now();

        let hash = self.hasher.hash_one(key);
        // Which of the rules (at most `MAX_HOT_RULES`, 16) admitted it so far.
        let mut admitted = 0u64;
        // Let through by a dry run although over the limit: passed, and would-block.
        let mut let_through = 0u64;
        for (i, hot) in rules
            .iter()
            .enumerate()
            .filter(|(_, h)| h.rule.param == param)
        {
            if let Err(retry) = hot.table.try_admit(hash, now, hot.interval, hot.rule.burst) {
                let counters = &hot.resource.counters;
                if compiled.rules.dry_run || hot.rule.dry_run {
                    counters.would_block.fetch_add(1, Ordering::Relaxed);
                    let_through |= 1 << i;
                    continue;
                }
                counters.blocked[0].fetch_add(1, Ordering::Relaxed);
                // The rules before it that admitted this request give their allowance
                // back: a refused request costs nothing.
                give_back_taken(rules, hash, now, admitted);
                return Err(Rejection::Throttled {
                    rule: hot.resource.name.clone(),
                    retry_after: Duration::from_nanos(retry),
                });
            }
            admitted |= 1 << i;
        }
        // Passed once every rule has admitted it (here, or by `hot_passed`): a request a
        // later rule refused did not pass the earlier ones either (they gave their
        // allowance back).
        let passed = admitted | let_through;
        if count {
            count_hot_passed(rules, passed);
        }
        Ok(HotTaken {
            generation,
            taken: admitted,
            passed,
        })
    }

    /// Counts a request [`Guard::check_hot_uncounted`] let through as passed by those of
    /// `resource`'s hot rules that let it through (hot rules replaced since count
    /// nothing; a change of other rules leaves them be).
    pub fn hot_passed(&self, resource: &Resource, taken: HotTaken) {
        if taken.passed == 0 {
            return;
        }
        let compiled = self.compiled.load();
        if compiled.hot_generation != taken.generation {
            return;
        }
        if let Some(rules) = compiled.hot.get(resource.id) {
            count_hot_passed(rules, taken.passed);
        }
    }

    /// Gives back what [`Guard::check_hot`] took for `key` on `resource` (its answer,
    /// `taken`, names the rules), for a request a later check refused (a per-sale limit
    /// after the per-shopper one): a refused request must not spend the shopper's
    /// allowance. Only the rules that took something give back: a dry-run rule that would
    /// have refused took nothing. Hot rules replaced in between give nothing back (a
    /// change of other rules leaves them be).
    pub fn give_back_hot<K: Hash + ?Sized>(&self, resource: &Resource, key: &K, taken: HotTaken) {
        let compiled = self.compiled.load();
        if compiled.hot_generation != taken.generation || taken.taken == 0 {
            return;
        }
        if let Some(rules) = compiled.hot.get(resource.id) {
            give_back_taken(rules, self.hasher.hash_one(key), self.now(), taken.taken);
        }
    }

    /// Asks the breaker of `dependency` for a call. Without a breaker for it, always yes.
    pub fn outbound(self: &Arc<Self>, dependency: &str) -> Result<Option<Outbound>, Rejection> {
        let compiled = self.compiled.load();
        let Some((breaker, resource)) = compiled.breakers.get(dependency) else {
            return Ok(None);
        };
        let counters = &resource.counters;
        let now = self.now();
        let call = match breaker.try_call(now) {
            Ok(call) => Some(call),
            Err(retry) => {
                let rejection = Rejection::CircuitOpen {
                    name: dependency.to_owned(),
                    retry_after: Duration::from_nanos(retry),
                };
                if let Some(rejection) = counters.refusal(rejection, compiled.rules.dry_run) {
                    return Err(rejection);
                }
                None
            }
        };
        counters.passed.fetch_add(1, Ordering::Relaxed);
        Ok(Some(Outbound {
            breaker: breaker.clone(),
            call,
            resource: resource.clone(),
            start: now,
            guard: self.clone(),
            done: false,
        }))
    }

    /// For the database breaker, asked before a purchase joins the writer's queue:
    /// refused while the breaker of `dependency` is open (counted as blocked, or only
    /// as would-block in dry run). Without a breaker for it, always yes.
    pub fn dependency_admits(&self, dependency: &str) -> Result<(), Rejection> {
        let compiled = self.compiled.load();
        let Some((breaker, resource)) = compiled.breakers.get(dependency) else {
            return Ok(());
        };
        match breaker.admits(|| self.now()) {
            Ok(()) => Ok(()),
            Err(retry) => {
                let rejection = Rejection::CircuitOpen {
                    name: dependency.to_owned(),
                    retry_after: Duration::from_nanos(retry),
                };
                match resource.counters.refusal(rejection, compiled.rules.dry_run) {
                    Some(rejection) => Err(rejection),
                    None => Ok(()),
                }
            }
        }
    }

    /// For the database breaker: one call to `dependency` (a commit) finished after
    /// `elapsed`, `ok` or not. Counted as passed, completed, with its time and errors.
    pub fn dependency_called(&self, dependency: &str, elapsed: Duration, ok: bool) {
        let compiled = self.compiled.load();
        let Some((breaker, resource)) = compiled.breakers.get(dependency) else {
            return;
        };
        let rt = elapsed.as_nanos() as u64;
        breaker.observe(self.now(), ok, rt);
        resource.counters.passed.fetch_add(1, Ordering::Relaxed);
        resource.counters.finished(rt, !ok);
    }

    pub fn stats(&self) -> GuardStats {
        let compiled = self.compiled.load();
        let now = self.now();
        let last = self.last_second.read();
        let mut resources: Vec<ResourceStats> = self
            .registry
            .by_name
            .read()
            .values()
            .map(|r| ResourceStats {
                resource: r.name.to_string(),
                last_second: last.get(&*r.name).cloned().unwrap_or_default(),
                total: r.counters.values(),
            })
            .collect();
        resources.sort_by(|a, b| a.resource.cmp(&b.resource));
        let mut degraded: Vec<Class> = Class::ALL
            .into_iter()
            .filter(|c| self.degraded(&compiled, *c))
            .collect();
        degraded.dedup();
        let mut breakers: Vec<(String, BreakerState)> = compiled
            .breakers
            .iter()
            .map(|(n, (b, _))| (n.clone(), b.state(now)))
            .collect();
        breakers.sort_by(|a, b| a.0.cmp(&b.0));
        let hot_tables = compiled.hot.iter().flatten();
        GuardStats {
            version: compiled.rules.version,
            dry_run: compiled.rules.dry_run,
            inflight: self.inflight(),
            cpu: self.cpu(),
            bbr_limit: match self.system.bbr_limit(now) {
                f if f == f64::MAX => 0.0,
                f => f,
            },
            adaptive_limit: compiled
                .rules
                .system
                .adaptive
                .as_ref()
                .map(|_| self.adaptive_limit()),
            overload_retry_after_s: self.overload_retry_after().as_secs(),
            degraded,
            breakers,
            hot_evictions: hot_tables
                .clone()
                .map(|h| h.table.evictions.load(Ordering::Relaxed))
                .sum(),
            hot_memory_bytes: hot_tables.map(|h| h.table.memory_bytes()).sum(),
            resources,
        }
    }

    /// Writes the counters into the `metrics` registry (call before rendering
    /// `/metrics`): `stampede_guard_passed_total{resource}`,
    /// `stampede_guard_blocked_total{resource,reason}`, `stampede_guard_would_block_total`,
    /// `stampede_guard_errors_total`, `stampede_guard_completed_total` and
    /// `stampede_guard_rt_microseconds_total` (their ratio is the mean RT; counters are
    /// whole numbers, so the time is kept in microseconds), and gauges.
    pub fn export_metrics(&self) {
        for resource in self.registry.by_name.read().values() {
            let v = resource.counters.values();
            let r = resource.name.to_string();
            metrics::counter!("stampede_guard_passed_total", "resource" => r.clone())
                .absolute(v.passed);
            for (reason, n) in REASONS.iter().zip([
                v.blocked_throttled,
                v.blocked_overloaded,
                v.blocked_degraded,
                v.blocked_circuit_open,
            ]) {
                metrics::counter!("stampede_guard_blocked_total", "resource" => r.clone(), "reason" => reason.name())
                    .absolute(n);
            }
            metrics::counter!("stampede_guard_would_block_total", "resource" => r.clone())
                .absolute(v.would_block);
            metrics::counter!("stampede_guard_errors_total", "resource" => r.clone())
                .absolute(v.errors);
            metrics::counter!("stampede_guard_completed_total", "resource" => r.clone())
                .absolute(v.completed);
            metrics::counter!("stampede_guard_rt_microseconds_total", "resource" => r)
                .absolute(v.rt_ns / 1_000);
        }
        metrics::gauge!("stampede_guard_inflight").set(self.inflight() as f64);
        metrics::gauge!("stampede_guard_cpu_share").set(self.cpu());
        metrics::gauge!("stampede_guard_overload_retry_after_seconds")
            .set(self.overload_retry_after().as_secs_f64());
        if self.compiled.load().rules.system.adaptive.is_some() {
            metrics::gauge!("stampede_guard_adaptive_limit").set(self.adaptive_limit());
        }
        metrics::gauge!("stampede_guard_rules_version")
            .set(self.compiled.load().rules.version as f64);
    }
}

/// Within a second, the system-protection refusals so far are set against the
/// admissions once per this many ([`Guard::overload_refusal`]): a crowd, not a few.
const STORM_LOOK_EVERY: u64 = 64;

/// At most one system-protection refusal per this many requests admitted is what the
/// growing `Retry-After` aims for: a refusal costs the server about what a cheap request
/// does, so refusals then take at most about an eighth of what it serves.
const ADMITTED_PER_REFUSAL: u64 = 8;

/// The next `Retry-After` (whole seconds) of system-protection refusals, after a second
/// with `refused` of them and `admitted` requests let through, the current one
/// `current`: long enough that the clients refused, each coming back once per
/// `Retry-After`, make at most one refusal per [`ADMITTED_PER_REFUSAL`] admissions;
/// within `1..=most`, and falling by at most a second each second, so the clients a
/// storm's refusals told to come back later still meet a long `Retry-After` when they do.
pub fn next_overload_retry_after(current: u64, refused: u64, admitted: u64, most: u64) -> u64 {
    let most = most.max(1);
    let wanted = refused
        .saturating_mul(current.max(1))
        .saturating_mul(ADMITTED_PER_REFUSAL)
        .div_ceil(admitted.max(1));
    wanted.max(current.saturating_sub(1)).clamp(1, most)
}

/// CPU every 100 ms, per-second views, system protection's `Retry-After`, and automatic
/// degradation. Ends when the guard is dropped.
fn sampler(guard: Weak<Guard>) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let mut last_cpu = cpu_time::ProcessTime::now();
    let mut last_wall = Instant::now();
    let mut previous: HashMap<String, CounterValues> = HashMap::new();
    let mut tick = 0u64;
    let mut pressure_for = 0u64;
    let mut calm_for = 0u64;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let Some(guard) = guard.upgrade() else {
            return;
        };
        let cpu = cpu_time::ProcessTime::now();
        let wall = Instant::now();
        let used = cpu.duration_since(last_cpu).as_secs_f64();
        let elapsed = wall.duration_since(last_wall).as_secs_f64().max(1e-3);
        if !guard.cpu_pinned.load(Ordering::Relaxed) {
            let share = (used / elapsed / cores).min(1.0);
            guard.cpu.store(share.to_bits(), Ordering::Relaxed);
        }
        last_cpu = cpu;
        last_wall = wall;
        // The adaptive limit follows each 100 ms of response times.
        if let Some((_, rtt)) = guard.system.last_bucket(guard.now())
            && let Some(g) = guard.adaptive.lock().as_mut()
        {
            let reached = guard.adaptive_reached.swap(false, Ordering::Relaxed);
            let limit = g.update(rtt, guard.inflight() as f64, reached);
            guard
                .adaptive_limit
                .store(limit.to_bits(), Ordering::Relaxed);
        }
        tick += 1;
        if !tick.is_multiple_of(10) {
            continue;
        }
        // Once a second: the per-resource view of the last second.
        let mut views = HashMap::new();
        for resource in guard.registry.by_name.read().values() {
            let name = resource.name.to_string();
            let now = resource.counters.values();
            let before = previous.get(&name).copied().unwrap_or_default();
            let completed = now.completed - before.completed;
            let mut blocked = HashMap::new();
            for (reason, (a, b)) in REASONS.iter().zip([
                (now.blocked_throttled, before.blocked_throttled),
                (now.blocked_overloaded, before.blocked_overloaded),
                (now.blocked_degraded, before.blocked_degraded),
                (now.blocked_circuit_open, before.blocked_circuit_open),
            ]) {
                if a > b {
                    blocked.insert(reason.name(), a - b);
                }
            }
            views.insert(
                name.clone(),
                SecondView {
                    passed: now.passed - before.passed,
                    blocked,
                    would_block: now.would_block - before.would_block,
                    errors: now.errors - before.errors,
                    avg_rt_ms: if completed > 0 {
                        (now.rt_ns - before.rt_ns) as f64 / completed as f64 / 1e6
                    } else {
                        0.0
                    },
                },
            );
            previous.insert(name.clone(), now);
        }
        // Dry run logs what it would block, once a second per resource.
        for (resource, view) in views.iter().filter(|(_, v)| v.would_block > 0) {
            tracing::info!(
                resource = %resource,
                would_block = view.would_block,
                "dry run: these requests would have been refused in the last second"
            );
        }
        // System protection's Retry-After follows the last second's refusals (only
        // `admit` refuses as overloaded) against the requests `admit` let through that
        // completed (the other resources' passes are parts of those requests).
        let refused: u64 = views
            .values()
            .map(|v| {
                v.blocked
                    .get(Reason::Overloaded.name())
                    .copied()
                    .unwrap_or(0)
            })
            .sum();
        let admitted = guard.system.completed_last_second(guard.now());
        let compiled = guard.compiled.load_full();
        let system = &compiled.rules.system;
        let most = system.overload_retry_after_max.as_secs();
        let current = guard.overload_retry_after.load(Ordering::Relaxed);
        let next = next_overload_retry_after(current, refused, admitted, most);
        // A crowd may have raised it since it was read: then it only rises further.
        if guard
            .overload_retry_after
            .compare_exchange(current, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            guard
                .overload_retry_after
                .fetch_max(next, Ordering::Relaxed);
        }
        *guard.last_second.write() = views;
        // Automatic degradation of browse and stats under sustained pressure.
        let after = system.auto_degrade_after;
        let pressure = guard.pressure_seen.swap(false, Ordering::Relaxed);
        if pressure {
            pressure_for += 1;
            calm_for = 0;
        } else {
            calm_for += 1;
            pressure_for = 0;
        }
        match after {
            Some(after) => {
                // Pressure is judged per whole second: a part of one counts as one.
                let secs = after.as_nanos().div_ceil(1_000_000_000).max(1) as u64;
                if pressure_for >= secs {
                    guard.auto_degraded.store(true, Ordering::Relaxed);
                } else if calm_for >= secs {
                    guard.auto_degraded.store(false, Ordering::Relaxed);
                }
            }
            None => guard.auto_degraded.store(false, Ordering::Relaxed),
        }
    }
}
