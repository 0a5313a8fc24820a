//! The memory bound of hot keys: a million distinct shoppers do not grow the process
//! past the table's fixed size. The resident size is the whole process's, so this test
//! has a test binary of its own: in `guard.rs` the other tests' guards touched their own
//! tables meanwhile and were counted against this one.

use stampede_guard::{Guard, GuardRules, Param, Rejection};

fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc");
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn a_million_distinct_shoppers_do_not_grow_memory_past_the_bound() {
    // Read before the guard exists: the table is written whole when it is made, so its
    // own pages count against the bound too.
    let before = resident_bytes();
    let guard = Guard::new(GuardRules::default()).unwrap();
    let bound = guard.stats().hot_memory_bytes;
    assert_eq!(bound, stampede_guard::HOT_SLOTS * 16);
    let mut key = String::new();
    for i in 0..1_000_000u32 {
        key.clear();
        use std::fmt::Write;
        write!(key, "shopper-{i}").unwrap();
        let _ = guard.check_hot(&guard.resource("purchase"), Param::Shopper, &key);
    }
    let grown = resident_bytes().saturating_sub(before);
    // The table (its stated size) and at most 2 MiB besides: a map keyed by shopper
    // would have grown by tens of bytes a key, tens of MiB here.
    assert!(
        grown <= bound + (2 << 20),
        "grew {grown} bytes, bound {bound}"
    );
    // The limit still holds per shopper after all of that.
    for _ in 0..20 {
        guard
            .check_hot(&guard.resource("purchase"), Param::Shopper, "scalper")
            .unwrap();
    }
    assert!(matches!(
        guard.check_hot(&guard.resource("purchase"), Param::Shopper, "scalper"),
        Err(Rejection::Throttled { .. })
    ));
}
