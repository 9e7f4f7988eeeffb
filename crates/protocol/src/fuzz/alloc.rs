//! A global allocator wrapper that remembers, per thread, the largest single
//! allocation since the last [`reset`]: a length field that makes a decoder
//! allocate gigabytes shows up here even when the machine has the memory.
//!
//! Install it in a test or bench binary:
//! `#[global_allocator] static A: bhatti_protocol::fuzz::alloc::Tracker = bhatti_protocol::fuzz::alloc::Tracker;`

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

std::thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // try_with: the thread's locals may be gone while it exits.
    let _ = LARGEST.try_with(|l| {
        if size > l.get() {
            l.set(size);
        }
    });
}

/// Forgets the largest allocation seen on this thread so far.
pub fn reset() {
    let _ = LARGEST.try_with(|l| l.set(0));
}

/// The largest single allocation on this thread since [`reset`].
pub fn largest() -> usize {
    LARGEST.try_with(|l| l.get()).unwrap_or(0)
}

/// [`System`], plus the bookkeeping above.
pub struct Tracker;

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged; the bookkeeping allocates nothing (const thread-local Cell).
unsafe impl GlobalAlloc for Tracker {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded as is; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
