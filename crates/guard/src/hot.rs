//! Per-key rate limits in a fixed-size table: memory is allocated once and never grows,
//! however many distinct shoppers, IPs or sales arrive.
//!
//! The table is sharded; each shard is a set-associative array of (key hash, TAT)
//! slots. A key whose TAT has passed holds no state (a new key would start the same), so
//! its slot is free for reuse. Only when every slot of a set is busy with keys still
//! inside their limit is the one nearest to replenished evicted; that key's next request
//! starts fresh (counted in `evictions`). With the guard's 2^18 slots (`HOT_SLOTS`) in
//! sets of four, a set first overflows when about 20,000 keys are active within one
//! emission interval (five of them hashed to one set); evictions grow common only as
//! the active keys near 262,144, and each takes the key nearest to replenished, whose
//! allowance is then the least lost.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

const WAYS: usize = 4;
const SHARDS: usize = 64;

#[derive(Clone, Copy, Default)]
struct Slot {
    key: u64,
    tat: u64,
}

pub struct HotTable {
    shards: Box<[Mutex<Box<[Slot]>>]>,
    sets_per_shard: usize,
    pub evictions: AtomicU64,
}

impl HotTable {
    /// A table of at least `slots` slots (rounded up to whole sets per shard).
    pub fn new(slots: usize) -> HotTable {
        let sets_per_shard = slots.div_ceil(SHARDS * WAYS).max(1);
        let shards = (0..SHARDS)
            .map(|_| Mutex::new(vec![Slot::default(); sets_per_shard * WAYS].into_boxed_slice()))
            .collect();
        HotTable {
            shards,
            sets_per_shard,
            evictions: AtomicU64::new(0),
        }
    }

    /// Bytes the slots take; fixed at construction.
    pub fn memory_bytes(&self) -> usize {
        SHARDS * self.sets_per_shard * WAYS * std::mem::size_of::<Slot>()
    }

    /// GCRA for one key (`key` is its hash; 0 is reserved for empty and mapped to 1).
    pub fn try_admit(&self, key: u64, now: u64, interval: u64, burst: u32) -> Result<(), u64> {
        let key = key.max(1);
        let tolerance = interval.saturating_mul(u64::from(burst.max(1)) - 1);
        let shard = (key as usize) % SHARDS;
        let set = ((key >> 32) as usize) % self.sets_per_shard;
        let mut slots = self.shards[shard].lock();
        let ways = &mut slots[set * WAYS..(set + 1) * WAYS];
        let index = match ways.iter().position(|s| s.key == key) {
            Some(i) => i,
            None => {
                // A free slot: empty, or a key whose limit has fully replenished.
                let i = match ways.iter().position(|s| s.key == 0 || s.tat <= now) {
                    Some(i) => i,
                    None => {
                        self.evictions.fetch_add(1, Ordering::Relaxed);
                        (0..WAYS).min_by_key(|&i| ways[i].tat).expect("ways")
                    }
                };
                ways[i] = Slot { key, tat: 0 };
                i
            }
        };
        let slot = &mut ways[index];
        let new_tat = slot.tat.max(now).saturating_add(interval);
        let allowed_at = new_tat.saturating_sub(tolerance.saturating_add(interval));
        if allowed_at > now {
            return Err(allowed_at - now);
        }
        slot.tat = new_tat;
        Ok(())
    }

    /// Returns one request's allowance that `try_admit` took for `key`, for a request a
    /// later check refused. Nothing if the key has left the table meanwhile, and never
    /// below `now` (an allowance whose time has passed is not owed).
    pub fn give_back(&self, key: u64, now: u64, interval: u64) {
        let key = key.max(1);
        let shard = (key as usize) % SHARDS;
        let set = ((key >> 32) as usize) % self.sets_per_shard;
        let mut slots = self.shards[shard].lock();
        if let Some(slot) = slots[set * WAYS..(set + 1) * WAYS]
            .iter_mut()
            .find(|s| s.key == key)
            && slot.tat > now
        {
            slot.tat = slot.tat.saturating_sub(interval).max(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn each_key_has_its_own_limit() {
        let t = HotTable::new(1024);
        let interval = S / 10;
        for key in [11u64, 22, 33] {
            for _ in 0..20 {
                assert!(t.try_admit(key, S, interval, 20).is_ok());
            }
            assert!(t.try_admit(key, S, interval, 20).is_err());
        }
        // A tenth of a second later each may buy one more.
        assert!(t.try_admit(11, S + interval, interval, 20).is_ok());
    }

    /// An allowance given back counts only while it still weighs on the key: returned
    /// long after, it adds at most the key's burst, not one each.
    #[test]
    fn allowances_whose_time_has_passed_are_not_given_back() {
        let t = HotTable::new(1024);
        let interval = S / 10;
        for i in 0..100 {
            assert!(t.try_admit(7, S + i * interval, interval, 20).is_ok());
        }
        let busy = 100 * S;
        let admitted = |t: &HotTable| {
            (0..1_000)
                .filter(|_| t.try_admit(7, busy, interval, 20).is_ok())
                .count()
        };
        assert_eq!(admitted(&t), 20);
        for _ in 0..100 {
            t.give_back(7, busy, interval);
        }
        assert_eq!(admitted(&t), 20, "at most one burst more, never a hundred");
    }

    /// Counts this thread's allocations (other tests run on other threads).
    struct Counting;

    thread_local! {
        static ALLOCATIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    unsafe impl std::alloc::GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
            unsafe { std::alloc::System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
            unsafe { std::alloc::System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    #[test]
    fn a_million_keys_allocate_nothing_after_construction() {
        let t = HotTable::new(1 << 20);
        assert_eq!(t.memory_bytes(), (1 << 20) * 16);
        let before = ALLOCATIONS.with(|n| n.get());
        let mut now = S;
        for key in 1..=1_000_000u64 {
            let _ = t.try_admit(key.wrapping_mul(0x9E37_79B9_7F4A_7C15), now, S / 10, 20);
            now += 1_000;
        }
        assert_eq!(ALLOCATIONS.with(|n| n.get()) - before, 0);
    }
}
