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

// SAFETY: every pointer returned comes from mimalloc, is aligned to `layout.align()` (checked
// before it is returned) and is released with `mi_free`, which accepts blocks from all of
// mimalloc's allocation functions.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        if align <= PLAIN_ALIGN {
            // SAFETY: plain FFI call; any size is accepted.
            let p = unsafe { mi::mi_malloc(size) };
            if aligned(p, align) {
                return p.cast();
            }
            // SAFETY: `p` came from mi_malloc just above and is not used again.
            unsafe { mi::mi_free(p) };
        }
        // SAFETY: `align` is a power of two (a `Layout` invariant).
        unsafe { mi::mi_malloc_aligned(size, align).cast() }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        if align <= PLAIN_ALIGN {
            // SAFETY: as in `alloc`.
            let p = unsafe { mi::mi_zalloc(size) };
            if aligned(p, align) {
                return p.cast();
            }
            // SAFETY: as in `alloc`.
            unsafe { mi::mi_free(p) };
        }
        // SAFETY: as in `alloc`.
        unsafe { mi::mi_zalloc_aligned(size, align).cast() }
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
