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
use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// Alignments `mi_malloc` is asked for directly (`max_align_t` on the 64-bit targets).
const PLAIN_ALIGN: usize = 16;
/// The alignment every mimalloc block has (a pointer's).
const WORD_ALIGN: usize = std::mem::align_of::<usize>();

pub struct Mimalloc;

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
        // SAFETY: a `Layout`'s alignment is a power of two; mimalloc's own functions.
        unsafe { allocate(layout, mi::mi_malloc, mi::mi_malloc_aligned) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe { allocate(layout, mi::mi_zalloc, mi::mi_zalloc_aligned) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
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
