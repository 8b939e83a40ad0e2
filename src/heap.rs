//! Heap allocation counting: [`CountingAllocator`], a thin wrapper over the system allocator
//! that counts every allocation and the bytes it asked for, and [`totals`], which reads them.
//!
//! The `flux` binary installs it as the global allocator, so `/metrics` and the dashboard show
//! the whole process's allocation rate live (issue 16: the budget is under 1 MB/s at a million
//! deliveries a second). A program that links the library without installing it (the unit
//! tests, a test binary that does not ask for it) reads zeros, and [`totals`] says so.
//!
//! The counters are relaxed atomics spread over a few cache-line-padded shards, one per thread
//! as far as they go: two workers allocating at once each add to a line their own core holds,
//! instead of both bouncing one shared line between the cores. A reader adds the shards up.
//! Frees are not counted: the budget is about what is asked of the allocator, and each free
//! has its allocation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Shards of counters. More than the threads that allocate often (the workers, the acceptor,
/// the cluster's and dashboard's threads); threads beyond it share shards, still correctly.
const SHARDS: usize = 16;

/// One shard's counters, alone on its cache line (two lines, for CPUs that prefetch in pairs).
#[repr(align(128))]
struct Shard {
    allocations: AtomicU64,
    bytes: AtomicU64,
}

static COUNTS: [Shard; SHARDS] = [const { Shard { allocations: AtomicU64::new(0), bytes: AtomicU64::new(0) } }; SHARDS];

/// The next shard to give a thread, round robin.
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    // Const-initialized and without a destructor, so reading it never allocates and works
    // while a thread is being torn down: what an allocator needs.
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// This thread's shard, chosen on its first allocation.
#[inline]
fn shard() -> &'static Shard {
    let index = SHARD.with(|shard| {
        let mut index = shard.get();
        if index == usize::MAX {
            index = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
            shard.set(index);
        }
        index
    });
    &COUNTS[index]
}

#[inline]
fn count(bytes: usize) {
    let shard = shard();
    shard.allocations.fetch_add(1, Ordering::Relaxed);
    shard.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
}

/// The system allocator, counting. Install it with
/// `#[global_allocator] static GLOBAL: CountingAllocator = CountingAllocator;`.
#[derive(Debug, Clone, Copy, Default)]
pub struct CountingAllocator;

// SAFETY: every call is passed unchanged to `System`, which upholds `GlobalAlloc`'s contract;
// counting touches only atomics and a const thread-local, and never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        System.alloc(layout)
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        System.alloc_zeroed(layout)
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    /// A reallocation is one allocation of the new size: what a `Vec` that grows costs.
    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

/// The process's allocations since it started, every thread's added up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct HeapCounts {
    /// Allocations and reallocations.
    pub allocations: u64,
    /// Bytes they asked for.
    pub bytes: u64,
}

impl HeapCounts {
    /// Whether the counting allocator is installed: a process that has counted nothing has
    /// not got it (any program allocates before it could ask).
    pub fn counting(&self) -> bool {
        self.allocations > 0
    }
}

/// Reads the counters. Zeros unless [`CountingAllocator`] is the global allocator.
pub fn totals() -> HeapCounts {
    COUNTS.iter().fold(HeapCounts::default(), |sum, shard| HeapCounts {
        allocations: sum.allocations + shard.allocations.load(Ordering::Relaxed),
        bytes: sum.bytes + shard.bytes.load(Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // The library's own tests count too, so these can see the counters move.
    #[global_allocator]
    static GLOBAL: CountingAllocator = CountingAllocator;

    #[test]
    fn allocations_and_their_bytes_are_counted_on_every_thread() {
        let before = totals();
        let kept = std::thread::spawn(|| {
            let mut grown: Vec<u8> = Vec::with_capacity(1000);
            grown.reserve_exact(3000);
            grown
        })
        .join()
        .expect("the allocating thread finishes");
        let after = totals();
        assert!(after.counting());
        // Other tests allocate meanwhile: the counts grow by at least these two.
        assert!(after.allocations >= before.allocations + 2, "{before:?} -> {after:?}");
        assert!(after.bytes >= before.bytes + 1000 + 3000, "{before:?} -> {after:?}");
        assert!(kept.capacity() >= 3000);
    }

    #[test]
    fn threads_are_spread_over_the_shards() {
        let shards: Vec<usize> =
            (0..4).map(|_| std::thread::spawn(|| std::ptr::from_ref(shard()) as usize).join().expect("the thread finishes")).collect();
        // Shards are handed out in turn, so four threads started one after another do not all
        // share one (whatever threads other tests start in between).
        let mut distinct = shards.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() >= 2, "{shards:?}");
    }
}
