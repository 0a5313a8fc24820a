//! The binary's global allocator: mimalloc, asked through its plain `mi_malloc` wherever
//! that already gives the alignment, and through its aligned entry points only where it
//! does not.
//!
//! Why not the `mimalloc` crate's `MiMalloc`: it passes every request to
//! `mi_malloc_aligned`, alignment 8 included. mimalloc v3 serves such a request on its
//! fast path only while the size class's current page has a free block at hand; when
//! that list runs dry, it takes the generic aligned path, and for a size whose block is
//! not a power of two (24, 40, 48, 80 … bytes) that path over-allocates into a larger
//! class (`mi_theap_malloc_zero_aligned_at_overalloc`): a slower path and a bigger block
//! for most of a request's small allocations (BENCHMARKS.md, "The allocator's aligned
//! path"). Rust's own `System` allocator makes the same split for `malloc`.
//!
//! **When plain calls are enough:** `mi_malloc` returns blocks aligned to
//! `MI_MAX_ALIGN_SIZE` (16 bytes) for sizes of 16 bytes and more, and to the size below
//! that: its size classes are rounded to two words on 64-bit targets (`MI_ALIGN2W`), and
//! a page's first block is 16-byte aligned (`MI_PAGE_MIN_START_BLOCK_ALIGN`). The test
//! here is stricter than Rust's `System` (alignment at most the size): a size that is a
//! multiple of an alignment of at most 16 lands in a class whose blocks keep it. Every
//! other request (alignment above 16, or a size not a multiple of it) takes the aligned
//! calls as before. The tests below allocate sizes up to several pages at each alignment
//! and check every pointer.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as ffi;

/// mimalloc's `MI_MAX_ALIGN_SIZE`: the largest alignment its size classes keep.
const PLAIN_ALIGN_MAX: usize = 16;

/// The global allocator of the `stampede` binary.
pub struct MiMalloc;

/// Whether `mi_malloc(size)` returns a block aligned to `align` (see the module's
/// comment).
#[inline]
fn plain(size: usize, align: usize) -> bool {
    align <= PLAIN_ALIGN_MAX && size.is_multiple_of(align)
}

// SAFETY: every call hands mimalloc a size and alignment it supports and returns its
// block (or null); `plain` only picks the unaligned call where its blocks are known to
// be aligned; `mi_free` and `mi_realloc` accept blocks from either kind of call.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe {
            if plain(layout.size(), layout.align()) {
                ffi::mi_malloc(layout.size()).cast()
            } else {
                ffi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        unsafe {
            if plain(layout.size(), layout.align()) {
                ffi::mi_zalloc(layout.size()).cast()
            } else {
                ffi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        unsafe { ffi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        unsafe {
            // `mi_realloc` keeps the block when it fits (its alignment unchanged) or moves
            // it to `mi_malloc(new_size)`, which `plain` says is aligned.
            if plain(new_size, layout.align()) {
                ffi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                ffi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALIGNS: [usize; 7] = [1, 2, 4, 8, 16, 32, 4096];

    /// Sizes from one byte to several pages, small ones all, larger ones on a stride that
    /// still meets every size class's boundary region.
    fn sizes() -> impl Iterator<Item = usize> {
        (1..=1024).chain((1025..=70_000).step_by(61)).chain([
            (1 << 20) - 8,
            1 << 20,
            (4 << 20) + 16,
        ])
    }

    #[test]
    fn every_block_keeps_the_alignment_it_was_asked_for() {
        for align in ALIGNS {
            for size in sizes() {
                let layout = Layout::from_size_align(size, align).unwrap();
                // Several at once, so blocks come from within a page, not only its start.
                let blocks: Vec<*mut u8> = (0..4)
                    .map(|i| unsafe {
                        let p = if i % 2 == 0 {
                            MiMalloc.alloc(layout)
                        } else {
                            MiMalloc.alloc_zeroed(layout)
                        };
                        assert!(!p.is_null(), "{layout:?}");
                        assert_eq!(p as usize % align, 0, "{layout:?}");
                        if i % 2 == 1 {
                            let bytes = std::slice::from_raw_parts(p, size);
                            let (head, tail) =
                                (&bytes[..size.min(256)], &bytes[size.saturating_sub(256)..]);
                            assert!(
                                head.iter().chain(tail).all(|&b| b == 0),
                                "zeroed {layout:?}"
                            );
                        }
                        p.write_bytes(0xA5, size);
                        p
                    })
                    .collect();
                for p in blocks {
                    unsafe { MiMalloc.dealloc(p, layout) };
                }
            }
        }
    }

    #[test]
    fn realloc_keeps_the_contents_and_the_alignment() {
        for align in ALIGNS {
            let mut size = align;
            let mut layout = Layout::from_size_align(size, align).unwrap();
            let mut p = unsafe { MiMalloc.alloc(layout) };
            unsafe { p.write_bytes(7, size) };
            // Grow through many size classes, by sizes that are and are not multiples of
            // the alignment, then shrink.
            let steps = (1..60)
                .map(|i| align * i + (i % 3) * (align / 2))
                .chain((1..20).rev().map(|i| align * i));
            for new_size in steps {
                let kept = size.min(new_size);
                p = unsafe { MiMalloc.realloc(p, layout, new_size) };
                assert!(!p.is_null());
                assert_eq!(p as usize % align, 0, "align {align}, {size} -> {new_size}");
                let bytes = unsafe { std::slice::from_raw_parts(p, kept) };
                assert!(
                    bytes.iter().all(|&b| b == 7),
                    "align {align}, {size} -> {new_size}"
                );
                unsafe { p.write_bytes(7, new_size) };
                size = new_size;
                layout = Layout::from_size_align(size, align).unwrap();
            }
            unsafe { MiMalloc.dealloc(p, layout) };
        }
    }

    #[test]
    fn the_plain_calls_are_taken_only_where_the_classes_keep_the_alignment() {
        assert!(plain(24, 8));
        assert!(plain(48, 16));
        assert!(plain(3, 1));
        assert!(!plain(24, 16), "a 24-byte class is only 8-byte aligned");
        assert!(!plain(64, 32));
        assert!(!plain(8, 16));
    }
}
