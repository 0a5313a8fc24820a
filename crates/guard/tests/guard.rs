//! The guard as the API uses it: precision of limits, the warm-up curve, the pacing
//! bound, breakers through `outbound`, priority shedding, rule replacement and dry run.
//! (The memory bound of hot keys is in `hot_memory.rs`, a process of its own.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use stampede_guard::rules::SystemRule;
use stampede_guard::{
    Behavior, BreakerRule, BreakerState, Class, FlowRule, Guard, GuardRules, HotRule, Param,
    Rejection,
};

/// Rules with this system protection and nothing else.
fn with_system(system: SystemRule) -> GuardRules {
    GuardRules {
        system,
        ..GuardRules::default()
    }
}

/// System protection by a bound on requests in flight alone.
fn bounded(max_inflight: u64) -> SystemRule {
    SystemRule {
        max_inflight: Some(max_inflight),
        ..Default::default()
    }
}

fn rules_with(flow: Vec<FlowRule>) -> GuardRules {
    GuardRules {
        flow,
        ..GuardRules::default()
    }
}

fn flow(resource: &str, qps: f64, burst: u32, behavior: Behavior) -> FlowRule {
    FlowRule {
        resource: resource.into(),
        qps: Some(qps),
        burst,
        behavior,
        max_concurrency: None,
        dry_run: false,
    }
}

/// A guard whose one rule warms `purchase` up to `qps` (burst `burst`) over `period`,
/// from a third of it.
fn warm_up_guard(qps: f64, burst: u32, period: Duration) -> Arc<Guard> {
    Guard::new(rules_with(vec![flow(
        "purchase",
        qps,
        burst,
        Behavior::WarmUp {
            cold_factor: 3.0,
            period,
        },
    )]))
    .unwrap()
}

/// A guard whose one rule paces `pay` to `qps` with `max_queue` of queue.
fn paced_pay_guard(qps: f64, max_queue: Duration) -> Arc<Guard> {
    Guard::new(rules_with(vec![flow(
        "pay",
        qps,
        1,
        Behavior::Pace { max_queue },
    )]))
    .unwrap()
}

/// One resource's totals, from the guard's stats.
fn totals(guard: &Guard, resource: &str) -> stampede_guard::CounterValues {
    guard
        .stats()
        .resources
        .into_iter()
        .find(|r| r.resource == resource)
        .unwrap_or_else(|| panic!("no resource {resource}"))
        .total
}

/// Tests whose counts depend on their threads getting the CPU when they ask take this
/// first, so they never run beside each other: on two cores, two of them hammering at
/// once left each thread off the CPU long enough to miss slots (a CI run counted 225
/// where 270-315 were due).
fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static CPU: std::sync::Mutex<()> = std::sync::Mutex::new(());
    CPU.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Two threads ask as fast as they can for `for_how_long`; returns admission times.
fn hammer(guard: &Arc<Guard>, resource: &str, for_how_long: Duration) -> Vec<Duration> {
    let start = Instant::now();
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let guard = guard.clone();
            let resource = resource.to_owned();
            std::thread::spawn(move || {
                let res = guard.resource(&resource);
                let mut admitted = Vec::new();
                while start.elapsed() < for_how_long {
                    if let Ok(a) = guard.admit(&res, Class::Purchase) {
                        admitted.push(start.elapsed());
                        drop(a);
                    }
                }
                admitted
            })
        })
        .collect();
    let mut all: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    all.sort();
    all
}

#[test]
fn a_qps_limit_holds_within_five_percent_over_five_seconds() {
    let _cpu = exclusive();
    // A burst of 10 banks 10 ms of slots, so a caller thread descheduled for a few
    // milliseconds on a busy machine does not lose any.
    let guard = Guard::new(rules_with(vec![flow(
        "purchase",
        1000.0,
        10,
        Behavior::Reject {},
    )]))
    .unwrap();
    let admitted = hammer(&guard, "purchase", Duration::from_secs(5));
    let n = admitted.len() as f64;
    assert!(
        (4750.0..=5250.0).contains(&n),
        "{n} admitted in 5 s at 1000/s"
    );
    // And no second holds double the limit (no two-bucket window edge).
    for start_ms in (0..4000).step_by(250) {
        let from = Duration::from_millis(start_ms);
        let to = from + Duration::from_secs(1);
        let in_window = admitted.iter().filter(|t| **t >= from && **t < to).count();
        assert!(
            in_window <= 1060,
            "{in_window} in the second from {start_ms} ms"
        );
    }
    let purchase = totals(&guard, "purchase");
    assert_eq!(purchase.passed, admitted.len() as u64);
    assert!(purchase.blocked_throttled > 0);
}

#[test]
fn warm_up_starts_at_a_third_and_reaches_the_rate() {
    let _cpu = exclusive();
    let guard = warm_up_guard(600.0, 5, Duration::from_secs(2));
    let admitted = hammer(&guard, "purchase", Duration::from_secs(3));
    let count = |from_ms: u64, to_ms: u64| {
        admitted
            .iter()
            .filter(|t| **t >= Duration::from_millis(from_ms) && **t < Duration::from_millis(to_ms))
            .count() as f64
    };
    // Over the first 0.5 s the rate climbs from 200/s to 300/s: ~125 admitted.
    let first = count(0, 500);
    // Warm: 600/s, 300 per half second.
    let last = count(2_500, 3_000);
    assert!(
        (100.0..=150.0).contains(&first),
        "first half second: {first}"
    );
    assert!((285.0..=315.0).contains(&last), "last half second: {last}");
    // The curve rises in between.
    let middle = count(1_000, 1_500);
    assert!(first < middle && middle < last, "{first} {middle} {last}");

    // Then a trickle well under the cold rate (50/s against 200/s) for 2.2 s, so that a
    // whole second of the guard's clock holds nothing else, never pausing as long as
    // the period: it does not keep the rule warm, so the spike after it starts cold.
    let purchase = guard.resource("purchase");
    let trickle = Instant::now();
    while trickle.elapsed() < Duration::from_millis(2_200) {
        // The first may meet the bucket the spike above left full: refused or not,
        // each is demand of 50/s.
        drop(guard.admit(&purchase, Class::Purchase));
        std::thread::sleep(Duration::from_millis(20));
    }
    let again = hammer(&guard, "purchase", Duration::from_millis(500)).len() as f64;
    assert!(
        (100.0..=170.0).contains(&again),
        "after the trickle: {again}"
    );
}

#[test]
fn after_a_trickle_the_warm_up_takes_its_period_not_a_second_more() {
    let _cpu = exclusive();
    let guard = warm_up_guard(600.0, 5, Duration::from_secs(2));
    // A trickle (50/s against a cold rate of 200/s) for over two seconds, kept up until
    // just after a second of the guard's clock begins: the spike then starts early in a
    // second, as long before its end as it can.
    let purchase = guard.resource("purchase");
    let trickle = Instant::now();
    let mut sent = Instant::now() - Duration::from_secs(1);
    while trickle.elapsed() < Duration::from_millis(2_200)
        || !(10_000_000..40_000_000).contains(&(guard.now() % 1_000_000_000))
    {
        if sent.elapsed() >= Duration::from_millis(20) {
            drop(guard.admit(&purchase, Class::Purchase));
            sent = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // The warm-up starts with the spike and is done a period later: the last half second
    // of period + 0.5 s runs at the full 600/s.
    let admitted = hammer(&guard, "purchase", Duration::from_millis(2_500));
    let last = admitted
        .iter()
        .filter(|t| **t >= Duration::from_millis(2_000))
        .count() as f64;
    assert!((270.0..=315.0).contains(&last), "last half second: {last}");
}

/// Sparse requests (one every 2.1 s, each in a second of its own, never a pause as long
/// as the period) after the rule warmed up: no second near the cold rate in a whole
/// period, so the spike after them starts cold. Before, a pass within the period kept
/// the rule warm, and the spike got the full rate at once.
#[test]
fn sparse_requests_do_not_keep_a_warm_up_rule_warm() {
    let _cpu = exclusive();
    let guard = warm_up_guard(600.0, 5, Duration::from_millis(2_500));
    let warm = hammer(&guard, "purchase", Duration::from_secs(3));
    let last = warm
        .iter()
        .filter(|t| **t >= Duration::from_millis(2_600))
        .count() as f64;
    assert!((210.0..=260.0).contains(&last), "warm: {last} in 0.4 s");
    let purchase = guard.resource("purchase");
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(2_100));
        drop(guard.admit(&purchase, Class::Purchase));
    }
    // Cold: from 200/s rising towards 600/s over 2.5 s, ~120 in the first half second
    // (300 had it stayed warm).
    let again = hammer(&guard, "purchase", Duration::from_millis(500)).len() as f64;
    assert!(
        (100.0..=170.0).contains(&again),
        "after sparse requests: {again}"
    );
}

/// Paced requests waiting their turn are not in flight: before, ten pays queued by a
/// pacing rule filled a bound of five in flight, so a purchase was shed 503 while the
/// server served nothing (here the queue itself was refused past five).
#[test]
fn paced_requests_are_not_in_flight_while_they_wait() {
    let mut rules = rules_with(vec![flow(
        "pay",
        10.0,
        1,
        Behavior::Pace {
            max_queue: Duration::from_secs(2),
        },
    )]);
    rules.system = bounded(5);
    let guard = Guard::new(rules).unwrap();
    let (pay, purchase) = (guard.resource("pay"), guard.resource("purchase"));
    let mut queued: Vec<_> = (0..11)
        .map(|_| guard.admit(&pay, Class::Pay).expect("paced, not refused"))
        .collect();
    assert!(
        queued[9].wait >= Duration::from_millis(800),
        "{:?}",
        queued[9].wait
    );
    // One whose client gave up while it waited: never served, so not counted as passed
    // or completed.
    drop(queued.pop());
    // Only the first, sent at once, is in flight.
    assert_eq!(guard.inflight(), 1);
    drop(
        guard
            .admit(&purchase, Class::Purchase)
            .expect("room in flight"),
    );
    // Sent (as the API does once the wait is over), each counts in flight.
    for admission in &mut queued {
        admission.sent();
    }
    assert_eq!(guard.inflight(), 10);
    assert!(matches!(
        guard.admit(&purchase, Class::Purchase),
        Err(Rejection::Overloaded { .. })
    ));
    drop(queued);
    assert_eq!(guard.inflight(), 0);
    let pay = totals(&guard, "pay");
    assert_eq!((pay.passed, pay.completed), (10, 10));
}

/// A paced request's response time starts when it is sent, not when it was told to
/// wait: five pays paced 100 ms apart, each served at once when its turn comes, took
/// next to nothing (before, their waits, 1 s in all, were counted as their time).
#[test]
fn a_paced_wait_is_no_response_time() {
    let _cpu = exclusive();
    let guard = paced_pay_guard(10.0, Duration::from_secs(1));
    let pay = guard.resource("pay");
    let told = Instant::now();
    let queued: Vec<_> = (0..5)
        .map(|_| guard.admit(&pay, Class::Pay).expect("paced, not refused"))
        .collect();
    for mut admission in queued {
        std::thread::sleep((told + admission.wait).saturating_duration_since(Instant::now()));
        admission.sent();
    }
    let pay = totals(&guard, "pay");
    assert_eq!(pay.completed, 5);
    assert!(
        pay.rt_ns < 500_000_000,
        "{} ms of response time in all",
        pay.rt_ns / 1_000_000
    );
}

/// The same where the cold rate is so low (1/s) that a single request reaches 0.8 of
/// it: a lone request is no demand, so sparse ones (every 1.5 s, never a whole second
/// judged between two busy ones) still let the rule cool. Before, each counted as a busy
/// second and kept it warm.
#[test]
fn sparse_requests_do_not_keep_a_low_rate_warm_up_rule_warm() {
    let _cpu = exclusive();
    let guard = Guard::new(rules_with(vec![flow(
        "purchase",
        30.0,
        1,
        Behavior::WarmUp {
            cold_factor: 30.0,
            period: Duration::from_secs(3),
        },
    )]))
    .unwrap();
    let warm = hammer(&guard, "purchase", Duration::from_millis(3_500));
    let last = warm
        .iter()
        .filter(|t| **t >= Duration::from_millis(3_000))
        .count();
    assert!((10..=17).contains(&last), "warm: {last} in 0.5 s");
    let purchase = guard.resource("purchase");
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1_500));
        drop(guard.admit(&purchase, Class::Purchase));
    }
    // Cold: from 1/s, rising towards 30/s over 3 s: a handful in the first half second
    // (15 had it stayed warm).
    let again = hammer(&guard, "purchase", Duration::from_millis(500)).len();
    assert!(again <= 7, "after sparse requests: {again}");
}

#[test]
fn a_paced_slot_given_back_never_sends_two_requests_at_once() {
    let _cpu = exclusive();
    let guard = paced_pay_guard(10.0, Duration::from_secs(1));
    let pay = guard.resource("pay");
    // When each admitted request may go (admitted now, plus its wait).
    let slot = |a: &stampede_guard::Admission<'_>| Instant::now() + a.wait;
    let mut a = guard.admit(&pay, Class::Pay).unwrap();
    let b = guard.admit(&pay, Class::Pay).unwrap();
    let c = guard.admit(&pay, Class::Pay).unwrap();
    let c_at = slot(&c);
    // A is refused by a later check after B and C were booked behind it: its slot stays
    // spent, and D goes 100 ms after C, not with it.
    a.give_back();
    let mut d = guard.admit(&pay, Class::Pay).unwrap();
    let d_at = slot(&d);
    let gap = d_at.saturating_duration_since(c_at);
    assert!(
        gap >= Duration::from_millis(95) && gap <= Duration::from_millis(105),
        "{gap:?}"
    );
    // D, the last booked, given back: E takes its place.
    d.give_back();
    let e = guard.admit(&pay, Class::Pay).unwrap();
    let gap = slot(&e).saturating_duration_since(d_at);
    assert!(gap <= Duration::from_millis(5), "{gap:?}");
    drop((b, c, e));
}

#[test]
fn pacing_spaces_requests_and_refuses_beyond_the_queue_bound() {
    let _cpu = exclusive();
    let guard = paced_pay_guard(100.0, Duration::from_millis(200));
    let pay = guard.resource("pay");
    let mut waits = Vec::new();
    // When each admitted request may go: the instant it was admitted plus its wait, so
    // a test thread descheduled between two calls does not move the spacing.
    let mut slots = Vec::new();
    let mut refused = 0;
    let mut held = Vec::new();
    let started = Instant::now();
    for _ in 0..50 {
        match guard.admit(&pay, Class::Pay) {
            Ok(a) => {
                waits.push(a.wait);
                slots.push(Instant::now() + a.wait);
                held.push(a);
            }
            Err(Rejection::Throttled { .. }) => refused += 1,
            Err(other) => panic!("{other:?}"),
        }
    }
    // 10 ms apart, the longest wait at most 200 ms: 21 admitted, the rest refused (one
    // more for each 10 ms the loop itself took, on a busy machine).
    let late = (started.elapsed().as_millis() / 10) as usize;
    assert!(
        (21..=21 + late).contains(&waits.len()),
        "{} admitted in {:?}: {waits:?}",
        waits.len(),
        started.elapsed()
    );
    assert_eq!(refused, 50 - waits.len());
    assert!(waits.iter().all(|w| *w <= Duration::from_millis(200)));
    for pair in slots.windows(2) {
        let gap = pair[1].saturating_duration_since(pair[0]);
        assert!(
            gap >= Duration::from_millis(9) && gap <= Duration::from_millis(11),
            "{gap:?}"
        );
    }
}

/// `paces` answers for the rules in force: from the start, after a change that adds or
/// takes away pacing, and never in a dry run (which paces nothing).
#[test]
fn paces_follows_the_rules_in_force() {
    let pace = || {
        flow(
            "pay",
            10.0,
            1,
            Behavior::Pace {
                max_queue: Duration::from_secs(1),
            },
        )
    };
    let guard = Guard::new(rules_with(vec![pace()])).unwrap();
    let (pay, purchase) = (guard.resource("pay"), guard.resource("purchase"));
    assert!(guard.paces(&pay));
    assert!(!guard.paces(&purchase));
    let mut next = rules_with(vec![flow("purchase", 10.0, 1, Behavior::Reject {})]);
    next.version = 1;
    guard.replace(next).unwrap();
    assert!(!guard.paces(&pay) && !guard.paces(&purchase));
    let mut next = rules_with(vec![pace(), {
        let mut rule = pace();
        rule.resource = "purchase".into();
        rule
    }]);
    next.version = 2;
    guard.replace(next.clone()).unwrap();
    assert!(guard.paces(&pay) && guard.paces(&purchase));
    next.version = 3;
    next.dry_run = true;
    guard.replace(next).unwrap();
    assert!(!guard.paces(&pay) && !guard.paces(&purchase));
}

#[test]
fn a_concurrency_limit_counts_requests_in_flight() {
    let mut rule = flow("pay", 1.0, 1, Behavior::Reject {});
    rule.qps = None;
    rule.max_concurrency = Some(2);
    let guard = Guard::new(rules_with(vec![rule])).unwrap();
    let pay = guard.resource("pay");
    let a = guard.admit(&pay, Class::Pay).unwrap();
    let b = guard.admit(&pay, Class::Pay).unwrap();
    assert!(matches!(
        guard.admit(&pay, Class::Pay),
        Err(Rejection::Throttled { .. })
    ));
    drop(a);
    let c = guard.admit(&pay, Class::Pay).unwrap();
    drop((b, c));
    assert_eq!(guard.inflight(), 0);
}

#[test]
fn a_concurrency_rule_removed_and_added_again_still_counts_its_requests() {
    let mut rule = flow("pay", 1.0, 1, Behavior::Reject {});
    rule.qps = None;
    rule.max_concurrency = Some(1);
    let mut rules = rules_with(vec![rule]);
    let guard = Guard::new(rules.clone()).unwrap();
    let pay = guard.resource("pay");
    let held = guard.admit(&pay, Class::Pay).unwrap();
    let flows = std::mem::take(&mut rules.flow);
    rules.version = 2;
    guard.replace(rules.clone()).unwrap();
    rules.flow = flows;
    rules.version = 3;
    guard.replace(rules).unwrap();
    // The request admitted under the first rule is still in flight: the limit of one
    // is reached.
    assert!(matches!(
        guard.admit(&pay, Class::Pay),
        Err(Rejection::Throttled { .. })
    ));
    drop(held);
    drop(guard.admit(&pay, Class::Pay).unwrap());
}

#[test]
fn lower_classes_are_shed_first() {
    let rules = with_system(bounded(100));
    let guard = Guard::new(rules).unwrap();
    let (probe, hold) = (guard.resource("probe"), guard.resource("hold"));
    let mut held = Vec::new();
    let mut shed_at = std::collections::BTreeMap::new();
    // Fill up with pay requests (share 1.0) and note when each class is first refused.
    for inflight in 0..100 {
        for class in Class::ALL {
            if let std::collections::btree_map::Entry::Vacant(e) = shed_at.entry(class) {
                match guard.admit(&probe, class) {
                    Ok(a) => drop(a),
                    Err(Rejection::Overloaded { .. }) => {
                        e.insert(inflight);
                    }
                    Err(other) => panic!("{other:?}"),
                }
            }
        }
        held.push(guard.admit(&hold, Class::Pay).unwrap());
    }
    assert_eq!(shed_at.get(&Class::Stats), Some(&50));
    assert_eq!(shed_at.get(&Class::Browse), Some(&70));
    assert_eq!(shed_at.get(&Class::Purchase), Some(&90));
    assert_eq!(
        shed_at.get(&Class::Pay),
        None,
        "pay is shed only at the full limit"
    );
    assert!(matches!(
        guard.admit(&probe, Class::Pay),
        Err(Rejection::Overloaded { .. })
    ));
    held.clear();
    assert!(guard.admit(&probe, Class::Stats).is_ok());
}

#[test]
fn the_overload_retry_after_grows_with_the_refusals_and_falls_back_when_calm() {
    use stampede_guard::next_overload_retry_after as next;
    // Calm, or refusals within an eighth of the admissions: 1 s.
    assert_eq!(next(1, 0, 10_000, 8), 1);
    assert_eq!(next(1, 1_000, 10_000, 8), 1);
    // 16,000 clients refused once a second against 8,000 admitted: as long as allowed.
    assert_eq!(next(1, 16_000, 8_000, 8), 8);
    assert_eq!(next(1, 16_000, 8_000, 4), 4);
    // At 8 s those clients come back 2,000 a second: 7 s keeps them at an eighth of
    // 20,000 admissions a second.
    assert_eq!(next(8, 2_000, 20_000, 8), 7);
    // Nothing admitted (the bound held by long requests): the longest.
    assert_eq!(next(1, 50, 0, 8), 8);
    // The storm over: a second less each second, down to 1 s.
    assert_eq!(next(8, 0, 20_000, 8), 7);
    assert_eq!(next(4, 0, 20_000, 8), 3);
    assert_eq!(next(2, 0, 0, 8), 1);
    assert_eq!(next(1, 0, 0, 8), 1);
    // A maximum of 1 s keeps it fixed; a lowered maximum applies at once.
    assert_eq!(next(1, 16_000, 8_000, 1), 1);
    assert_eq!(next(8, 16_000, 8_000, 2), 2);

    // Through the guard: refused past the bound, the Retry-After grows (once a second,
    // and at once for a crowd: these refusals, 10 ms apart, reach 64 within a second).
    let rules = with_system(SystemRule {
        max_inflight: Some(1),
        overload_retry_after_max: Duration::from_secs(4),
        ..Default::default()
    });
    let guard = Guard::new(rules).unwrap();
    let (probe, hold) = (guard.resource("probe"), guard.resource("hold"));
    let held = guard.admit(&hold, Class::Pay).unwrap();
    let refused = |guard: &Guard| match guard.admit(&probe, Class::Purchase) {
        Err(Rejection::Overloaded { retry_after }) => retry_after,
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("admitted past the bound"),
    };
    assert_eq!(refused(&guard), Duration::from_secs(1));
    let started = Instant::now();
    while refused(&guard) < Duration::from_secs(4) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the Retry-After stayed at {:?}",
            refused(&guard)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(guard.stats().overload_retry_after_s, 4);
    // The pressure over, it falls back to 1 s, a second each second.
    drop(held);
    let calm = Instant::now();
    while guard.overload_retry_after() > Duration::from_secs(1) {
        assert!(
            calm.elapsed() < Duration::from_secs(10),
            "the Retry-After stayed at {:?}",
            guard.overload_retry_after()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sustained_pressure_turns_browse_and_stats_off_until_a_calm_spell() {
    let after = Duration::from_secs(1);
    let rules = with_system(SystemRule {
        max_inflight: Some(10),
        auto_degrade_after: Some(after),
        ..Default::default()
    });
    let guard = Guard::new(rules).unwrap();
    let (probe, hold) = (guard.resource("probe"), guard.resource("hold"));
    let held: Vec<_> = (0..10)
        .map(|_| guard.admit(&hold, Class::Pay).unwrap())
        .collect();
    // Under pressure (purchases refused for the bound), browse is refused for the bound
    // too at first; after a second of it, browse and stats are switched off as such.
    let started = Instant::now();
    let degraded_after = loop {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "never degraded under sustained pressure"
        );
        assert!(matches!(
            guard.admit(&probe, Class::Purchase),
            Err(Rejection::Overloaded { .. })
        ));
        match guard.admit(&probe, Class::Browse) {
            Err(Rejection::Degraded { .. }) => break started.elapsed(),
            Err(Rejection::Overloaded { .. }) => {}
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("browse admitted past the bound"),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        degraded_after >= after / 2,
        "degraded after {degraded_after:?} of pressure"
    );
    // Pay and purchase are never switched off: with the bound free again they pass,
    // while browse and stats stay off until a calm spell as long.
    drop(held);
    assert!(guard.admit(&probe, Class::Pay).is_ok());
    assert!(guard.admit(&probe, Class::Purchase).is_ok());
    assert!(matches!(
        guard.admit(&probe, Class::Stats),
        Err(Rejection::Degraded { .. })
    ));
    let calm = Instant::now();
    while guard.admit(&probe, Class::Browse).is_err() {
        assert!(
            calm.elapsed() < Duration::from_secs(5),
            "browse never came back after the pressure ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        calm.elapsed() >= after / 2,
        "browse came back after {:?} of calm",
        calm.elapsed()
    );
    assert!(guard.admit(&probe, Class::Stats).is_ok());
}

#[test]
fn requests_admitted_side_by_side_never_pass_the_inflight_bound() {
    // Eight threads admit, hold and release as fast as they can against a bound of 3.
    // Each counts itself in while it holds an admission: were the bound's check and the
    // count two steps, two threads could both see 2 and both be let in.
    const BOUND: u64 = 3;
    let rules = with_system(bounded(BOUND));
    let guard = Guard::new(rules).unwrap();
    let held = std::sync::atomic::AtomicU64::new(0);
    let most = std::sync::atomic::AtomicU64::new(0);
    let (admitted, refused) = (
        std::sync::atomic::AtomicU64::new(0),
        std::sync::atomic::AtomicU64::new(0),
    );
    let start = std::sync::Barrier::new(8);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                let hold = guard.resource("hold");
                start.wait();
                for _ in 0..20_000 {
                    match guard.admit(&hold, Class::Pay) {
                        Ok(admission) => {
                            use std::sync::atomic::Ordering::SeqCst;
                            let now = held.fetch_add(1, SeqCst) + 1;
                            most.fetch_max(now, SeqCst);
                            std::hint::spin_loop();
                            held.fetch_sub(1, SeqCst);
                            drop(admission);
                            admitted.fetch_add(1, SeqCst);
                        }
                        Err(Rejection::Overloaded { .. }) => {
                            refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        Err(other) => panic!("{other:?}"),
                    }
                }
            });
        }
    });
    let most = most.into_inner();
    assert!(
        most <= BOUND,
        "{most} held at once against a bound of {BOUND}"
    );
    assert_eq!(admitted.into_inner() + refused.into_inner(), 8 * 20_000);
    assert_eq!(guard.inflight(), 0, "every refusal gave its place back");
}

#[test]
fn the_bbr_check_applies_only_under_cpu_pressure() {
    let _cpu = exclusive();
    let rules = with_system(SystemRule {
        cpu_threshold: Some(0.8),
        ..Default::default()
    });
    let guard = Guard::new(rules).unwrap();
    let x = guard.resource("x");
    guard.pin_cpu(0.95);
    // With no completions in the last second (a stall, or a start under pressure) the
    // estimate is its floor: requests pile up only that far.
    let mut held = Vec::new();
    let refused_at = (0..100)
        .position(|_| match guard.admit(&x, Class::Purchase) {
            Ok(a) => {
                held.push(a);
                false
            }
            Err(_) => true,
        })
        .expect("refused while nothing completes") as f64;
    assert!(
        (refused_at - stampede_guard::MIN_BBR_LIMIT * 0.9).abs() <= 1.0,
        "refused at {refused_at}"
    );
    held.clear();
    // Teach it a rate with no CPU pressure (no check): 32 clients each holding a
    // request for 5 ms, over a few hundred milliseconds. About 6,400 completions a
    // second of 5 ms each: an estimate of ~32 in flight, twice the floor.
    guard.pin_cpu(0.1);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..32 {
            scope.spawn(|| {
                let x = guard.resource("x");
                while start.elapsed() < Duration::from_millis(400) {
                    let admitted = guard.admit(&x, Class::Pay).unwrap();
                    std::thread::sleep(Duration::from_millis(5));
                    drop(admitted);
                }
            });
        }
    });
    guard.pin_cpu(0.95);
    let limit = guard.stats().bbr_limit;
    assert!(
        (1.5 * stampede_guard::MIN_BBR_LIMIT..=40.0).contains(&limit),
        "max completions/s × min response time: {limit}"
    );
    // Hold requests until refusals start: at about the limit × the class share.
    let mut refused_at = None;
    for i in 0..100_000 {
        match guard.admit(&x, Class::Purchase) {
            Ok(a) => held.push(a),
            Err(Rejection::Overloaded { .. }) => {
                refused_at = Some(i);
                break;
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    let refused_at = refused_at.expect("refused under pressure") as f64;
    let limit = guard.stats().bbr_limit;
    assert!(
        (refused_at - limit * 0.9).abs() <= 2.0,
        "refused at {refused_at}, limit {limit}"
    );
    // Without CPU pressure the same in-flight count passes.
    guard.pin_cpu(0.1);
    assert!(guard.admit(&x, Class::Purchase).is_ok());
}

#[test]
fn an_open_breaker_refuses_outbound_calls_at_once() {
    let rules = GuardRules {
        breakers: vec![BreakerRule {
            min_calls: 5,
            open_for: Duration::from_millis(200),
            half_open_probes: 1,
            ..BreakerRule::payment_default()
        }],
        ..GuardRules::default()
    };
    let guard = Guard::new(rules).unwrap();
    for _ in 0..5 {
        guard.outbound("payment").unwrap().unwrap().finish(false);
    }
    let t = Instant::now();
    let refused = guard.outbound("payment").err().expect("open");
    // At once: not after waiting out the open spell (200 ms). The bound leaves room for
    // a test thread descheduled on a busy CI machine; the cost of the check itself is
    // measured by the criterion benchmark, not here.
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
    assert!(matches!(refused, Rejection::CircuitOpen { .. }));
    assert!(refused.retry_after() <= Duration::from_millis(200));
    let state = guard.stats().breakers;
    assert_eq!(state, vec![("payment".to_owned(), BreakerState::Open)]);
    std::thread::sleep(Duration::from_millis(210));
    let probe = guard.outbound("payment").unwrap().unwrap();
    probe.finish(true);
    assert_eq!(guard.stats().breakers[0].1, BreakerState::Closed);
    // A dependency without a breaker is never refused.
    assert!(guard.outbound("nowhere").unwrap().is_none());
    // Every call is counted on `outbound:payment`: the six made, the one failure
    // reported, the one refused.
    let outbound = totals(&guard, "outbound:payment");
    assert_eq!(
        (
            outbound.passed,
            outbound.completed,
            outbound.errors,
            outbound.blocked_circuit_open
        ),
        (6, 6, 5, 1)
    );
}

#[test]
fn a_dry_run_lets_calls_through_an_open_breaker_and_counts_them() {
    let rules = GuardRules {
        breakers: vec![BreakerRule {
            min_calls: 5,
            open_for: Duration::from_secs(60),
            ..BreakerRule::payment_default()
        }],
        ..GuardRules::default()
    };
    let guard = Guard::new(rules.clone()).unwrap();
    for _ in 0..5 {
        guard.outbound("payment").unwrap().unwrap().finish(false);
    }
    assert!(guard.outbound("payment").is_err());
    let mut dry = rules;
    dry.version = 1;
    dry.dry_run = true;
    guard.replace(dry).unwrap();
    // Still open (an unchanged rule keeps its state), but the call goes ahead.
    assert_eq!(guard.stats().breakers[0].1, BreakerState::Open);
    guard.outbound("payment").unwrap().unwrap().finish(true);
    let outbound = totals(&guard, "outbound:payment");
    assert_eq!(
        (outbound.would_block, outbound.blocked_circuit_open),
        (1, 1)
    );
}

#[test]
fn the_shipped_default_limits_each_shopper_to_ten_a_second_with_a_burst_of_twenty() {
    let guard = Guard::new(GuardRules::default()).unwrap();
    let admitted = (0..100)
        .filter(|_| {
            guard
                .check_hot(&guard.resource("purchase"), Param::Shopper, "bot")
                .is_ok()
        })
        .count();
    assert_eq!(admitted, 20);
    // Another shopper is not affected.
    assert!(
        guard
            .check_hot(&guard.resource("purchase"), Param::Shopper, "person")
            .is_ok()
    );
    // Other resources have no shopper rule.
    assert!(
        guard
            .check_hot(&guard.resource("browse"), Param::Shopper, "bot")
            .is_ok()
    );
    // The rule's own counters show what it let through and what it refused.
    let rule = totals(&guard, "hot:purchase_per_shopper");
    assert_eq!((rule.passed, rule.blocked_throttled), (21, 80));
}

#[test]
fn rules_are_replaced_by_version_and_dry_run_blocks_nothing() {
    let guard = Guard::new(GuardRules::default()).unwrap();
    let mut next = rules_with(vec![flow("purchase", 1.0, 1, Behavior::Reject {})]);
    next.version = 0;
    let err = guard.replace(next.clone()).unwrap_err();
    assert_eq!(err[0].field, "version");
    next.version = 1;
    next.dry_run = true;
    assert_eq!(guard.replace(next.clone()), Ok(1));
    assert_eq!(guard.rules(), next);
    for _ in 0..10 {
        drop(
            guard
                .admit(&guard.resource("purchase"), Class::Purchase)
                .unwrap(),
        );
    }
    let purchase = totals(&guard, "purchase");
    assert_eq!(purchase.would_block, 9);
    assert_eq!(purchase.blocked_throttled, 0);
    assert_eq!(purchase.passed, 10, "let through, so passed");
    // An invalid change is refused whole and the old rules stay.
    let mut bad = next.clone();
    bad.version = 2;
    bad.flow[0].qps = Some(-1.0);
    assert!(guard.replace(bad).is_err());
    assert_eq!(guard.rules().version, 1);
    // Versions only go forward, by one or by more.
    next.version = 4;
    assert_eq!(guard.replace(next.clone()), Ok(4));
    next.version = 3;
    assert_eq!(guard.replace(next).unwrap_err()[0].field, "version");
}

#[test]
fn a_slot_taken_before_a_rules_change_goes_back_to_the_same_count() {
    let mut rule = flow("pay", 1.0, 1, Behavior::Reject {});
    rule.qps = None;
    rule.max_concurrency = Some(1);
    let guard = Guard::new(rules_with(vec![rule.clone()])).unwrap();
    let pay = guard.resource("pay");
    let before = guard.admit(&pay, Class::Pay).unwrap();
    // The same limit, and then a higher one, while the request is in flight.
    for (version, max) in [(1, 1), (2, 2)] {
        let mut next = rules_with(vec![rule.clone()]);
        next.version = version;
        next.flow[0].max_concurrency = Some(max);
        guard.replace(next).unwrap();
    }
    // The request admitted before still counts against the new limit of 2 ...
    let second = guard.admit(&pay, Class::Pay).unwrap();
    assert!(matches!(
        guard.admit(&pay, Class::Pay),
        Err(Rejection::Throttled { .. })
    ));
    // ... and gives its slot back to it, not to a count that would wrap below zero and
    // refuse the resource for good.
    drop(before);
    let third = guard.admit(&pay, Class::Pay).unwrap();
    drop((second, third));
    let again: Vec<_> = (0..2).map(|_| guard.admit(&pay, Class::Pay)).collect();
    assert!(again.iter().all(Result::is_ok));
}

#[test]
fn rules_changes_with_ever_new_names_stop_at_the_resource_bound() {
    let guard = Guard::new(GuardRules::default()).unwrap();
    let named = |version: u64, names: std::ops::Range<usize>| GuardRules {
        version,
        flow: names
            .map(|i| flow(&format!("r-{i}"), 100.0, 5, Behavior::Reject {}))
            .collect(),
        ..GuardRules::default()
    };
    // 256 new names a change (the most rules of a kind), until the bound refuses one.
    let mut version = 1;
    let refusal = loop {
        let from = version as usize * 256;
        match guard.replace(named(version, from..from + 256)) {
            Ok(_) => version += 1,
            Err(errors) => break errors,
        }
        assert!(version < 100, "never refused");
    };
    assert_eq!(refusal[0].field, "rules", "{refusal:?}");
    assert!(refusal[0].message.contains("4096"), "{refusal:?}");
    let tracked = guard.stats().resources.len();
    assert!(
        tracked <= stampede_guard::RESOURCES_MAX && tracked > stampede_guard::RESOURCES_MAX - 256,
        "{tracked}"
    );
    // Names the guard knows still change freely.
    guard.replace(named(version, 256..512)).unwrap();
    assert_eq!(guard.stats().resources.len(), tracked);
}

#[test]
fn a_rules_change_keeps_what_unchanged_rules_have_learned() {
    let scalper = HotRule {
        name: "per-shopper".into(),
        resource: "purchase".into(),
        param: Param::Shopper,
        qps: 1.0,
        burst: 3,
        dry_run: false,
    };
    let rules = GuardRules {
        flow: vec![
            flow("purchase", 1.0, 5, Behavior::Reject {}),
            flow("browse", 1.0, 5, Behavior::Reject {}),
        ],
        hot: vec![scalper],
        breakers: vec![BreakerRule {
            min_calls: 5,
            open_for: Duration::from_secs(60),
            ..BreakerRule::payment_default()
        }],
        ..GuardRules::default()
    };
    let guard = Guard::new(rules.clone()).unwrap();
    let (purchase, browse) = (guard.resource("purchase"), guard.resource("browse"));
    let admitted = |resource| {
        (0..10)
            .filter(|_| guard.admit(resource, Class::Purchase).is_ok())
            .count()
    };
    let shopper = |guard: &Guard| {
        (0..10)
            .filter(|_| {
                guard
                    .check_hot(&guard.resource("purchase"), Param::Shopper, "bot")
                    .is_ok()
            })
            .count()
    };
    assert_eq!((admitted(&purchase), admitted(&browse)), (5, 5));
    assert_eq!(shopper(&guard), 3);
    for _ in 0..5 {
        guard.outbound("payment").unwrap().unwrap().finish(false);
    }
    assert_eq!(guard.stats().breakers[0].1, BreakerState::Open);

    // Degrade tracking (a change elsewhere) and double browse's burst.
    let mut next = rules.clone();
    next.version = 1;
    next.degraded = vec![Class::Stats];
    next.flow[1].burst = 10;
    guard.replace(next).unwrap();
    // The unchanged purchase rule, scalper rule and breaker carry on where they were:
    // no fresh burst, no closed breaker. Browse's changed rule starts over.
    assert_eq!(admitted(&purchase), 0);
    assert_eq!(shopper(&guard), 0);
    assert!(matches!(
        guard.outbound("payment"),
        Err(Rejection::CircuitOpen { .. })
    ));
    assert_eq!(admitted(&browse), 10);
}

#[test]
fn degraded_classes_answer_at_once() {
    let guard = Guard::new(GuardRules {
        degraded: vec![Class::Stats],
        hot: vec![HotRule {
            name: "per_ip".into(),
            resource: "browse".into(),
            param: Param::ClientIp,
            qps: 1.0,
            burst: 1,
            dry_run: false,
        }],
        ..GuardRules::default()
    })
    .unwrap();
    assert!(matches!(
        guard.admit(&guard.resource("stats"), Class::Stats),
        Err(Rejection::Degraded {
            class: Class::Stats
        })
    ));
    assert!(
        guard
            .admit(&guard.resource("browse"), Class::Browse)
            .is_ok()
    );
    assert!(
        guard
            .check_hot(&guard.resource("browse"), Param::ClientIp, "10.0.0.1")
            .is_ok()
    );
    assert!(
        guard
            .check_hot(&guard.resource("browse"), Param::ClientIp, "10.0.0.1")
            .is_err()
    );
}

#[test]
fn the_adaptive_limit_bounds_requests_in_flight() {
    let rules = GuardRules {
        system: SystemRule {
            adaptive: Some(stampede_guard::adaptive::AdaptiveRule {
                initial_limit: 20.0,
                min_limit: 20.0,
                max_limit: 20.0,
                ..Default::default()
            }),
            ..Default::default()
        },
        ..GuardRules::default()
    };
    let guard = Guard::new(rules).unwrap();
    let purchase = guard.resource("purchase");
    let mut held = Vec::new();
    while let Ok(a) = guard.admit(&purchase, Class::Purchase) {
        held.push(a);
        assert!(held.len() <= 20);
    }
    // Purchase may use 0.9 of the limit; pay all of it.
    assert_eq!(held.len(), 18);
    assert!(guard.admit(&guard.resource("pay"), Class::Pay).is_ok());
    assert_eq!(guard.stats().adaptive_limit, Some(20.0));
}

#[test]
fn a_dry_run_pacing_rule_delays_nothing_and_counts_what_it_would_refuse() {
    let mut rule = flow(
        "pay",
        100.0,
        1,
        Behavior::Pace {
            max_queue: Duration::from_millis(200),
        },
    );
    rule.dry_run = true;
    let guard = Guard::new(rules_with(vec![rule])).unwrap();
    let pay = guard.resource("pay");
    for _ in 0..50 {
        let admission = guard
            .admit(&pay, Class::Pay)
            .expect("a dry run refuses nothing");
        assert_eq!(admission.wait, Duration::ZERO);
    }
    let total = totals(&guard, "pay");
    // The paced queue holds about 21 (200 ms at 10 ms apart); the rest would be refused.
    assert!(
        (25..=29).contains(&total.would_block),
        "{}",
        total.would_block
    );
    assert_eq!(total.blocked_throttled, 0);
}

#[test]
fn a_low_rate_warm_up_rule_warms_up_under_demand() {
    let _cpu = exclusive();
    // A cold rate of 5/3 per second admits 1 or 2 a second, under 0.8 × the cold rate
    // every other second: the demand, not the few it passes, says whether the rule is
    // in use.
    let guard = warm_up_guard(5.0, 1, Duration::from_secs(2));
    let admitted = hammer(&guard, "purchase", Duration::from_millis(4_500));
    let last = admitted
        .iter()
        .filter(|t| **t >= Duration::from_millis(3_500))
        .count();
    // Warm by then: 5/s, 5 in the last second (1 or 2 had it stayed cold).
    assert!(
        (4..=6).contains(&last),
        "{last} in the last second: {admitted:?}"
    );
}

#[test]
fn a_request_a_later_hot_rule_refuses_spends_no_earlier_allowance() {
    let hot = |name: &str, param: Param, qps: f64, burst: u32| HotRule {
        name: name.into(),
        resource: "purchase".into(),
        param,
        qps,
        burst,
        dry_run: false,
    };
    let guard = Guard::new(GuardRules {
        hot: vec![
            hot("wide", Param::Shopper, 1.0, 5),
            hot("narrow", Param::Shopper, 1.0, 1),
            hot("per-sale", Param::Sale, 1.0, 1),
        ],
        ..GuardRules::default()
    })
    .unwrap();
    let purchase = guard.resource("purchase");
    let refused_by = |shopper: &str| match guard.check_hot(&purchase, Param::Shopper, shopper) {
        Ok(_) => None,
        Err(Rejection::Throttled { rule, .. }) => Some(rule.to_string()),
        Err(other) => panic!("{other:?}"),
    };
    // Within one check: the narrow rule refuses every attempt after the first, and the
    // wide one, asked first, gets its allowance back each time: it never refuses.
    assert_eq!(refused_by("a"), None);
    for _ in 0..20 {
        assert_eq!(refused_by("a").as_deref(), Some("hot:narrow"));
    }
    // Across checks: B is refused for the sale A bought from; the handler gives B's
    // shopper allowance back, so B's next attempt is refused for the sale again, not
    // for having spent its own.
    assert_eq!(refused_by("b"), None);
    guard.check_hot(&purchase, Param::Sale, "s").unwrap();
    let taken = guard.check_hot(&purchase, Param::Shopper, "c").unwrap();
    assert!(guard.check_hot(&purchase, Param::Sale, "s").is_err());
    guard.give_back_hot(&purchase, "c", taken);
    assert_eq!(refused_by("c"), None, "c's allowance came back");
}

#[test]
fn each_request_counts_once_whatever_its_checks_said() {
    // A dry run over the system bound, a concurrency limit and a rate at once: each
    // request that any of them would refuse counts once as would-block, and every one
    // counts as passed (let through) when it finishes.
    let mut rules = rules_with(vec![FlowRule {
        max_concurrency: Some(1),
        ..flow("purchase", 0.001, 1, Behavior::Reject {})
    }]);
    rules.dry_run = true;
    rules.system.max_inflight = Some(1);
    let guard = Guard::new(rules).unwrap();
    let purchase = guard.resource("purchase");
    let held: Vec<_> = (0..20)
        .map(|_| guard.admit(&purchase, Class::Purchase).unwrap())
        .collect();
    assert_eq!(totals(&guard, "purchase").passed, 0, "none has finished");
    drop(held);
    let t = totals(&guard, "purchase");
    assert_eq!(
        (t.passed, t.would_block, t.completed),
        (20, 19, 20),
        "{t:?}"
    );

    // A dry-run hot rule that would refuse lets the request through: passed too.
    let guard = Guard::new(GuardRules {
        hot: vec![HotRule {
            name: "watch".into(),
            resource: "purchase".into(),
            param: Param::Shopper,
            qps: 0.001,
            burst: 1,
            dry_run: true,
        }],
        ..GuardRules::default()
    })
    .unwrap();
    let purchase = guard.resource("purchase");
    for _ in 0..5 {
        guard.check_hot(&purchase, Param::Shopper, "d").unwrap();
    }
    let t = totals(&guard, "hot:watch");
    assert_eq!((t.passed, t.would_block), (5, 4), "{t:?}");

    // Checked uncounted, then a change of the flow rules only while the request is in
    // flight: its pass still counts, and its allowance can still go back.
    let taken = guard
        .check_hot_uncounted(&purchase, Param::Shopper, "e")
        .unwrap();
    let mut next = guard.rules();
    next.version += 1;
    next.flow = vec![flow("get_sale", 5.0, 1, Behavior::Reject {})];
    guard.replace(next.clone()).unwrap();
    guard.hot_passed(&purchase, taken);
    assert_eq!(totals(&guard, "hot:watch").passed, 6);
    guard.give_back_hot(&purchase, "e", taken);
    guard
        .check_hot(&purchase, Param::Shopper, "e")
        .expect("the allowance came back");
    assert_eq!(
        totals(&guard, "hot:watch").would_block,
        4,
        "e had its burst again"
    );
    // A change of the hot rules themselves: an older check counts nothing.
    let taken = guard
        .check_hot_uncounted(&purchase, Param::Shopper, "f")
        .unwrap();
    next.version += 1;
    next.hot[0].qps = 0.002;
    guard.replace(next).unwrap();
    guard.hot_passed(&purchase, taken);
    assert_eq!(totals(&guard, "hot:watch").passed, 7);

    // An admission a later check withdraws (a shopper's limit, an open breaker) is
    // neither passed nor completed, and its rate slot goes back.
    let guard = Guard::new(rules_with(vec![flow("pay", 0.001, 1, Behavior::Reject {})])).unwrap();
    let pay = guard.resource("pay");
    let mut admission = guard.admit(&pay, Class::Pay).unwrap();
    admission.withdraw();
    drop(admission);
    let t = totals(&guard, "pay");
    assert_eq!((t.passed, t.completed), (0, 0), "{t:?}");
    drop(
        guard
            .admit(&pay, Class::Pay)
            .expect("the slot was given back"),
    );
    let t = totals(&guard, "pay");
    assert_eq!((t.passed, t.completed), (1, 1), "{t:?}");

    // A dry run's would-block counts even when a later check withdraws the request.
    let mut dry = rules_with(vec![flow("pay", 0.001, 1, Behavior::Reject {})]);
    dry.dry_run = true;
    let guard = Guard::new(dry).unwrap();
    let pay = guard.resource("pay");
    drop(guard.admit(&pay, Class::Pay).unwrap());
    let mut second = guard.admit(&pay, Class::Pay).unwrap();
    second.withdraw();
    drop(second);
    let t = totals(&guard, "pay");
    assert_eq!((t.passed, t.would_block), (1, 1), "{t:?}");
}

#[test]
fn a_dry_run_hot_rule_that_would_refuse_gets_nothing_back() {
    let hot = |name: &str, burst: u32, dry_run: bool| HotRule {
        name: name.into(),
        resource: "purchase".into(),
        param: Param::Shopper,
        qps: 0.001,
        burst,
        dry_run,
    };
    let guard = Guard::new(GuardRules {
        hot: vec![hot("watch", 1, true), hot("enforced", 10, false)],
        ..GuardRules::default()
    })
    .unwrap();
    let purchase = guard.resource("purchase");
    let would_block = || totals(&guard, "hot:watch").would_block;
    guard.check_hot(&purchase, Param::Shopper, "d").unwrap();
    // The watch rule's one allowance is spent: it only counts from here.
    let taken = guard.check_hot(&purchase, Param::Shopper, "d").unwrap();
    assert_eq!(would_block(), 1);
    // A later check refuses the request; the enforced rule gets its allowance back, the
    // watch rule took nothing and gets nothing: it still would refuse, and says so.
    guard.give_back_hot(&purchase, "d", taken);
    guard.check_hot(&purchase, Param::Shopper, "d").unwrap();
    assert_eq!(
        would_block(),
        2,
        "the watch rule was credited what it never took"
    );
    // The enforced rule did get its allowance back: of its burst of 10, three were
    // taken and one given back, so eight more pass and the next is refused.
    for _ in 0..8 {
        guard.check_hot(&purchase, Param::Shopper, "d").unwrap();
    }
    assert!(guard.check_hot(&purchase, Param::Shopper, "d").is_err());
}

#[test]
fn a_request_counts_as_one_admission_however_many_resources_it_passes() {
    // Each admitted purchase also passes a shopper rule and a named resource (its
    // batch's SQL). The overload's Retry-After sets refusals against admissions: one
    // refusal to six purchases asks for ceil(8 / 6) = 2 s. Counting a purchase once per
    // resource it passed (16 to one refusal) would keep it at 1 s. Some 50 refusals a
    // second, under the 64 that make a crowd: only the once-a-second look decides.
    let rules = GuardRules {
        system: bounded(1),
        hot: vec![HotRule {
            name: "per-shopper".into(),
            resource: "purchase".into(),
            param: Param::Shopper,
            qps: 1_000.0,
            burst: 1_000,
            dry_run: false,
        }],
        ..GuardRules::default()
    };
    let guard = Guard::new(rules).unwrap();
    let (purchase, sql) = (
        guard.resource("purchase"),
        guard.resource("sql:order_batch"),
    );
    let started = Instant::now();
    let mut shopper = 0u64;
    while guard.overload_retry_after() == Duration::from_secs(1) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "one refusal to six admissions left the Retry-After at 1 s"
        );
        for _ in 0..5 {
            let admitted = guard.admit(&purchase, Class::Purchase).unwrap();
            shopper += 1;
            guard
                .check_hot(&purchase, Param::Shopper, &shopper)
                .unwrap();
            let batch = guard.admit_named(&sql).unwrap();
            drop((batch, admitted));
        }
        let held = guard.admit(&purchase, Class::Purchase).unwrap();
        assert!(matches!(
            guard.admit(&purchase, Class::Purchase),
            Err(Rejection::Overloaded { .. })
        ));
        drop(held);
        std::thread::sleep(Duration::from_millis(20));
    }
    // 2 s; up to 4 s if the sampler's second runs long on a loaded machine. Counting
    // no admissions at all would ask for the longest, 8 s.
    let raised = guard.overload_retry_after();
    assert!(
        (Duration::from_secs(2)..=Duration::from_secs(4)).contains(&raised),
        "{raised:?}"
    );
}

#[test]
fn a_crowd_refused_within_a_second_is_told_the_longer_retry_after_at_once() {
    let rules = with_system(SystemRule {
        max_inflight: Some(1),
        overload_retry_after_max: Duration::from_secs(4),
        ..Default::default()
    });
    let retry_after = |guard: &Guard, probe| match guard.admit(probe, Class::Purchase) {
        Err(Rejection::Overloaded { retry_after }) => retry_after.as_secs(),
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("admitted past the bound"),
    };
    // A busy server (a hundred requests completed to each refusal) refusing 128: a
    // crowd by number, but an eighth of what it serves is not a storm.
    let guard = Guard::new(rules.clone()).unwrap();
    let probe = guard.resource("probe");
    let busy: Vec<u64> = (0..128)
        .map(|_| {
            for _ in 0..100 {
                drop(guard.admit(&probe, Class::Purchase).unwrap());
            }
            let held = guard.admit(&probe, Class::Purchase).unwrap();
            let refused = retry_after(&guard, &probe);
            drop(held);
            refused
        })
        .collect();
    assert!(busy.iter().all(|&s| s == 1), "{busy:?}");

    // A storm at an idle server: its first refusals say 1 s, and within the same
    // moment (long before the once-a-second look), the crowd is told the longest.
    let guard = Guard::new(rules).unwrap();
    let probe = guard.resource("probe");
    let held = guard.admit(&probe, Class::Purchase).unwrap();
    let storm: Vec<u64> = (0..128).map(|_| retry_after(&guard, &probe)).collect();
    assert_eq!(storm[0], 1, "{storm:?}");
    assert_eq!(storm[127], 4, "{storm:?}");
    drop(held);
}

#[test]
fn a_dry_run_past_the_bound_leaves_the_overload_retry_after_alone() {
    let guard = Guard::new(GuardRules {
        dry_run: true,
        system: SystemRule {
            max_inflight: Some(1),
            ..Default::default()
        },
        ..GuardRules::default()
    })
    .unwrap();
    let probe = guard.resource("probe");
    let held = guard.admit(&probe, Class::Purchase).unwrap();
    // Would-be refusals of a crowd: let through, and they raise no Retry-After.
    let passed: Vec<_> = (0..256)
        .map(|_| guard.admit(&probe, Class::Purchase).unwrap())
        .collect();
    assert_eq!(guard.overload_retry_after(), Duration::from_secs(1));
    drop((passed, held));
}

#[test]
fn a_crowd_raises_the_retry_after_once_for_its_second_not_at_every_look() {
    // 1,000 requests completed, then 256 refused within the second: set against the
    // Retry-After the second began with (1 s), ceil(256 × 8 / 1,000) = 3 s. Looks that
    // multiplied by what the one before them raised would climb 2, 4, 8.
    let guard = Guard::new(with_system(bounded(1))).unwrap();
    let probe = guard.resource("probe");
    for _ in 0..1_000 {
        drop(guard.admit(&probe, Class::Purchase).unwrap());
    }
    let held = guard.admit(&probe, Class::Purchase).unwrap();
    for _ in 0..256 {
        assert!(guard.admit(&probe, Class::Purchase).is_err());
    }
    let raised = guard.overload_retry_after();
    assert!(
        (Duration::from_secs(2)..=Duration::from_secs(3)).contains(&raised),
        "{raised:?}"
    );
    drop(held);
}
