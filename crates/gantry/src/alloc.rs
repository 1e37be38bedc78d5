//! The global allocator: mimalloc, called the way `std`'s system allocator calls `malloc`.
//!
//! mimalloc's thread-local free lists cut the gateway's per-request allocation cost by about a
//! third against glibc malloc (measured with bench/gateway.sh). The `mimalloc` crate's adapter
//! passes every request to `mi_malloc_aligned`, whose fast path only covers blocks up to 1 KiB:
//! anything larger with an ordinary alignment (a request's future, header tables, read buffers)
//! takes mimalloc's over-allocating path, several hundred instructions per call and up to the
//! alignment in wasted bytes. Here ordinary alignments go to plain `mi_malloc`, which hands out
//! blocks aligned to a word always and usually to 16 bytes; the result's alignment is checked, and
//! a block that misses it is given back for an aligned one, so no layout is ever served wrong
//! (`realloc` goes the plain way only for word alignment, which cannot miss).
//!
//! The gateway's threads also keep their most recently freed small blocks and hand them out
//! first ([`HotBlocks`]), so that a request's new objects land in memory still in the cache.
use std::alloc::{GlobalAlloc, Layout};
use std::cell::UnsafeCell;
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// Alignments `mi_malloc` is asked for directly (`max_align_t` on the 64-bit targets).
const PLAIN_ALIGN: usize = 16;
/// The alignment every mimalloc block has (a pointer's).
const WORD_ALIGN: usize = std::mem::align_of::<usize>();

pub struct Mimalloc;

/// Blocks up to this size are kept for reuse on threads that asked for it ([`reuse_hot_blocks`]).
const HOT_MAX: usize = 2048;
/// One stack of freed blocks per 16 bytes of size.
const HOT_CLASSES: usize = HOT_MAX / 16;
/// Blocks kept per class: a request's objects of one size are few.
const HOT_DEPTH: usize = 4;

/// A thread's most recently freed small blocks, handed out again last in, first out.
///
/// mimalloc gives a freed block back only after the rest of its page's free blocks: with a
/// thousand requests in flight, a request's new objects land in memory last touched a
/// thousand requests ago, long gone from the core's caches, and every write to them waits
/// for the line to come in (the first atomic operation after them waits for all of them). The
/// block a request freed a moment ago is still in L1/L2: reusing it first (as glibc's tcache
/// does) keeps the gateway's working set at what its requests in flight actually hold.
struct HotBlocks {
    on: bool,
    len: [u8; HOT_CLASSES],
    /// Each block with the size it was allocated for: a class holds sizes up to 15 bytes apart,
    /// and a block is reused only for a size it covers.
    blocks: [[(*mut u8, usize); HOT_DEPTH]; HOT_CLASSES],
}

thread_local! {
    // No destructor (const, plain data): the allocator may run while a thread is being torn
    // down, and registering one could allocate. A thread that turns reuse on gives its blocks
    // back with `release_hot_blocks` before it ends. At most HOT_CLASSES * HOT_DEPTH blocks, in
    // practice the few sizes a request allocates.
    static HOT: UnsafeCell<HotBlocks> = const {
        UnsafeCell::new(HotBlocks {
            on: false,
            len: [0; HOT_CLASSES],
            blocks: [[(std::ptr::null_mut(), 0); HOT_DEPTH]; HOT_CLASSES],
        })
    };
}

/// Reuse this thread's freed small blocks first (see [`HotBlocks`]); the gateway's threads do.
/// Call [`release_hot_blocks`] before the thread ends.
pub fn reuse_hot_blocks() {
    // SAFETY: the cell is this thread's, and no reference into it outlives this statement.
    HOT.with(|h| unsafe { (*h.get()).on = true });
}

/// Stop keeping blocks on this thread and free those kept: before a thread that called
/// [`reuse_hot_blocks`] ends.
pub fn release_hot_blocks() {
    let _ = HOT.try_with(|h| {
        // SAFETY: this thread's cell; `mi_free` does not come back into this allocator.
        let h = unsafe { &mut *h.get() };
        h.on = false;
        for c in 0..HOT_CLASSES {
            for &(p, _) in &h.blocks[c][..h.len[c] as usize] {
                // SAFETY: a block of this allocator's, kept instead of being freed.
                unsafe { mi::mi_free(p.cast()) };
            }
            h.len[c] = 0;
        }
    });
}

#[inline(always)]
fn hot_class(layout: Layout) -> Option<usize> {
    let size = layout.size();
    (size != 0 && size <= HOT_MAX && layout.align() <= PLAIN_ALIGN).then(|| (size - 1) / 16)
}

/// A kept block for `layout`, if this thread keeps blocks and has one that covers it.
#[inline(always)]
fn hot_take(layout: Layout) -> Option<*mut u8> {
    let c = hot_class(layout)?;
    HOT.try_with(|h| {
        // SAFETY: this thread's cell; the reference ends with the closure, and nothing in it
        // allocates.
        let h = unsafe { &mut *h.get() };
        let n = h.len[c] as usize;
        if n == 0 {
            return None;
        }
        let (p, size) = h.blocks[c][n - 1];
        if size < layout.size() {
            return None;
        }
        h.len[c] -= 1;
        Some(p)
    })
    .ok()
    .flatten()
}

/// Keep a freed block for reuse; false when this thread does not keep blocks or the class is
/// full. Only 16-byte-aligned blocks are kept, so any alignment up to 16 can reuse them.
#[inline(always)]
fn hot_put(ptr: *mut u8, layout: Layout) -> bool {
    let Some(c) = hot_class(layout) else {
        return false;
    };
    if !aligned(ptr.cast(), PLAIN_ALIGN) {
        return false;
    }
    HOT.try_with(|h| {
        // SAFETY: as in `hot_take`.
        let h = unsafe { &mut *h.get() };
        let n = h.len[c] as usize;
        if !h.on || n == HOT_DEPTH {
            return false;
        }
        h.blocks[c][n] = (ptr, layout.size());
        h.len[c] += 1;
        true
    })
    .unwrap_or(false)
}

#[inline]
fn aligned(p: *mut c_void, align: usize) -> bool {
    (p as usize) & (align - 1) == 0
}

/// A plain allocation when its alignment is ordinary and the block has it; an aligned one
/// otherwise (`plain` and `aligned_alloc` are the same function of mimalloc's, zeroing or not).
///
/// # Safety
/// `layout.align()` is a power of two (a `Layout` invariant); the functions are mimalloc's.
#[inline(always)]
unsafe fn allocate(
    layout: Layout,
    plain: unsafe extern "C" fn(usize) -> *mut c_void,
    aligned_alloc: unsafe extern "C" fn(usize, usize) -> *mut c_void,
) -> *mut u8 {
    let (size, align) = (layout.size(), layout.align());
    if align <= PLAIN_ALIGN {
        // SAFETY: plain FFI call; any size is accepted.
        let p = unsafe { plain(size) };
        if aligned(p, align) {
            return p.cast();
        }
        // SAFETY: `p` came from mimalloc just above and is not used again.
        unsafe { mi::mi_free(p) };
    }
    // SAFETY: `align` is a power of two.
    unsafe { aligned_alloc(size, align).cast() }
}

// SAFETY: every pointer returned comes from mimalloc, is aligned to `layout.align()` (checked
// before it is returned) and is released with `mi_free`, which accepts blocks from all of
// mimalloc's allocation functions.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if let Some(p) = hot_take(layout) {
            return p;
        }
        // SAFETY: a `Layout`'s alignment is a power of two; mimalloc's own functions.
        unsafe { allocate(layout, mi::mi_malloc, mi::mi_malloc_aligned) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe { allocate(layout, mi::mi_zalloc, mi::mi_zalloc_aligned) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // A kept block was allocated (or reallocated) for `layout.size()` bytes: the
        // `GlobalAlloc` contract says a block is freed with the layout it was given out for.
        if hot_put(ptr, layout) {
            return;
        }
        // SAFETY: `ptr` was returned by this allocator (the `GlobalAlloc` contract).
        unsafe { mi::mi_free(ptr.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        if align <= WORD_ALIGN {
            // SAFETY: `ptr` is a live block of this allocator (the `GlobalAlloc` contract); every
            // mimalloc block is word-aligned, so the result needs no check.
            let p = unsafe { mi::mi_realloc(ptr.cast(), new_size) };
            debug_assert!(aligned(p, align));
            return p.cast();
        }
        // SAFETY: as above; `align` is a power of two.
        unsafe { mi::mi_realloc_aligned(ptr.cast(), new_size, align).cast() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a thread that keeps blocks, a freed block comes back first for a size it covers, never
    /// for a larger one or a stricter alignment than it has; the thread gives them all back.
    #[test]
    fn hot_blocks_are_reused_last_in_first_out() {
        std::thread::spawn(|| {
            let a = Mimalloc;
            let l = |size, align| Layout::from_size_align(size, align).expect("valid layout");
            // SAFETY: every block is written within its layout and freed with it.
            unsafe {
                // Off by default: a freed block goes back to mimalloc.
                let p = a.alloc(l(1720, 8));
                a.dealloc(p, l(1720, 8));
                assert!(hot_take(l(1720, 8)).is_none());

                reuse_hot_blocks();
                let p = a.alloc(l(1720, 8));
                let q = a.alloc(l(1720, 8));
                std::ptr::write_bytes(p, 1, 1720);
                a.dealloc(p, l(1720, 8));
                a.dealloc(q, l(1720, 8));
                // Last in, first out.
                assert_eq!(a.alloc(l(1720, 8)), q);
                assert_eq!(a.alloc(l(1716, 16)), p, "a smaller size of the class");
                a.dealloc(q, l(1720, 8));
                a.dealloc(p, l(1716, 16));
                // The top block was allocated for 1716 bytes: not reused for 1720.
                let r = a.alloc(l(1720, 8));
                assert!(r != p);
                std::ptr::write_bytes(r, 2, 1720);
                // Alignments above 16 and sizes above HOT_MAX never use kept blocks.
                let big = a.alloc(l(1720, 64));
                assert!((big as usize).is_multiple_of(64));
                a.dealloc(big, l(1720, 64));
                let large = a.alloc(l(HOT_MAX + 1, 8));
                a.dealloc(large, l(HOT_MAX + 1, 8));
                assert!(hot_take(l(HOT_MAX + 1, 8)).is_none());
                // A full class hands further blocks to mimalloc.
                let many: Vec<*mut u8> = (0..HOT_DEPTH + 3).map(|_| a.alloc(l(40, 8))).collect();
                for &m in &many {
                    a.dealloc(m, l(40, 8));
                }
                let kept = HOT.with(|h| (*h.get()).len[(40 - 1) / 16]);
                assert_eq!(kept as usize, HOT_DEPTH);
                a.dealloc(r, l(1720, 8));
                release_hot_blocks();
                HOT.with(|h| assert!((*h.get()).len.iter().all(|&n| n == 0)));
                assert!(hot_take(l(40, 8)).is_none());
                let s = a.alloc(l(40, 8));
                a.dealloc(s, l(40, 8));
                assert!(hot_take(l(40, 8)).is_none(), "released: off again");
            }
        })
        .join()
        .expect("test thread");
    }

    /// Every alignment and a spread of sizes (both sides of mimalloc's 1 KiB small-block limit)
    /// get blocks that are aligned, writable, kept across `realloc` and zeroed when asked.
    #[test]
    fn layouts_are_served_aligned() {
        let a = Mimalloc;
        for align in [1, 2, 4, 8, 16, 32, 64, 4096] {
            for size in [1, 7, 8, 24, 100, 1024, 1025, 5000, 70_000] {
                let layout = Layout::from_size_align(size, align).expect("valid layout");
                // SAFETY: a non-zero-size layout; every block is freed with its layout.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(
                        !p.is_null() && (p as usize).is_multiple_of(align),
                        "{size}/{align}"
                    );
                    std::ptr::write_bytes(p, 0xab, size);
                    let q = a.realloc(p, layout, size * 3);
                    assert!(
                        !q.is_null() && (q as usize).is_multiple_of(align),
                        "{size}/{align}"
                    );
                    assert!((0..size).all(|i| *q.add(i) == 0xab));
                    a.dealloc(
                        q,
                        Layout::from_size_align(size * 3, align).expect("valid layout"),
                    );
                    let z = a.alloc_zeroed(layout);
                    assert!(
                        !z.is_null() && (z as usize).is_multiple_of(align),
                        "{size}/{align}"
                    );
                    assert!((0..size).all(|i| *z.add(i) == 0));
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
