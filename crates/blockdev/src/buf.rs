//! Aligned memory for O_DIRECT.
//!
//! O_DIRECT needs the buffer's address aligned (to the logical sector on the devices we
//! meet). Callers that hand us an [`AlignedBuf`] take the zero-copy path; any other
//! memory is copied through a bounce buffer taken from a [`BufPool`], so the
//! filesystem may pass plain `Vec`s and slices of its caches without thinking about it.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Mutex;

/// Alignment of buffers made by [`AlignedBuf::new`]: a page, which satisfies every
/// logical sector size up to 4 KiB and lets the kernel pin whole pages.
pub const DEFAULT_ALIGN: usize = 4096;

/// Buffers of at least this size are aligned to it and asked to be backed by
/// transparent huge pages (`MADV_HUGEPAGE`, which the default THP mode
/// `madvise` honours). A device request can carry only so many memory
/// segments (128 on a loop device, each at most 64 KiB): in 4 KiB pages a
/// direct read splits at 512 KiB, in 2 MiB pages it goes out whole; pinning
/// it is cheaper too.
pub const HUGE: usize = 2 << 20;

/// The kernel's transparent-huge-page mode (`always`, `madvise` or `never`),
/// read from sysfs; `None` if the kernel has no THP. Under `never`, buffers of
/// [`HUGE`] bytes and more still work but sit in 4 KiB pages, so a direct
/// read or write of a megabyte goes to a loop device in 512 KiB pieces.
pub fn huge_page_mode() -> Option<String> {
    let s = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    selected_mode(&s).map(str::to_string)
}

/// The bracketed word of a sysfs choice list: `always [madvise] never` → `madvise`.
fn selected_mode(s: &str) -> Option<&str> {
    let a = s.find('[')?;
    let b = a + s[a..].find(']')?;
    Some(&s[a + 1..b])
}

/// A heap buffer whose start is aligned (to [`DEFAULT_ALIGN`] unless asked otherwise).
/// Owns its memory; `Send + Sync` like a `Vec<u8>`.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    align: usize,
    /// Made by [`AlignedBuf::huge`]: unmapped on drop, not freed.
    mapped: bool,
}

// SAFETY: AlignedBuf uniquely owns its allocation, exactly as Vec<u8> does.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` zeroed bytes, page-aligned.
    pub fn new(len: usize) -> AlignedBuf {
        AlignedBuf::with_alignment(len, DEFAULT_ALIGN)
    }

    /// `len` zeroed bytes aligned to `align`, which must be a power of two (anything
    /// else is rounded up to one).
    pub fn with_alignment(len: usize, align: usize) -> AlignedBuf {
        let align = align.max(1).next_power_of_two();
        if len == 0 {
            return AlignedBuf {
                ptr: dangling(align),
                len: 0,
                cap: 0,
                align,
                mapped: false,
            };
        }
        if len >= HUGE && align <= HUGE {
            if let Some(b) = AlignedBuf::huge(len) {
                return b;
            }
        }
        let layout = match Layout::from_size_align(len, align) {
            Ok(l) => l,
            Err(_) => alloc::handle_alloc_error(Layout::new::<u8>()),
        };
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf {
            ptr,
            len,
            cap: len,
            align,
            mapped: false,
        }
    }

    /// `len` zeroed bytes in fresh anonymous memory, [`HUGE`]-aligned and
    /// advised into huge pages before anything touches it (memory from the
    /// allocator may already be faulted in small pages). The capacity is
    /// rounded up to a whole huge page. None if the mapping fails: the caller
    /// falls back to the allocator.
    fn huge(len: usize) -> Option<AlignedBuf> {
        let cap = len.checked_next_multiple_of(HUGE)?;
        let span = cap.checked_add(HUGE)?;
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let raw = unsafe { libc::mmap(std::ptr::null_mut(), span, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        if raw == libc::MAP_FAILED {
            return None;
        }
        let start = (raw as usize).next_multiple_of(HUGE);
        let head = start - raw as usize;
        let tail = span - head - cap;
        // SAFETY: both ranges lie inside the mapping made above and outside
        // [start, start + cap), which is all we keep; madvise is advice only.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((start + cap) as *mut libc::c_void, tail);
            }
            libc::madvise(start as *mut libc::c_void, cap, libc::MADV_HUGEPAGE);
        }
        Some(AlignedBuf {
            ptr: NonNull::new(start as *mut u8)?,
            len,
            cap,
            align: HUGE,
            mapped: true,
        })
    }

    /// A page-aligned copy of `data`.
    pub fn from_slice(data: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::new(data.len());
        b.copy_from_slice(data);
        b
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    pub fn alignment(&self) -> usize {
        self.align
    }

    /// Shorten to `len` bytes (no-op if already shorter). Capacity is kept, so a pooled
    /// buffer can be reused for a smaller request.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Set the length to `len` within the capacity, exposing whatever the reused memory
    /// held (never uninitialised: allocations are zeroed). Returns false if `len` does
    /// not fit.
    pub fn set_len_within_capacity(&mut self, len: usize) -> bool {
        if len > self.cap {
            return false;
        }
        self.len = len;
        true
    }

    /// Zero-copy conversion into [`bytes::Bytes`], for callers that keep block images in
    /// `Bytes` (caches, gRPC payloads).
    pub fn freeze(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self)
    }
}

fn dangling(align: usize) -> NonNull<u8> {
    // An aligned, non-null address that is never dereferenced (length 0), built the
    // strict-provenance way.
    NonNull::<u8>::dangling().with_addr(
        std::num::NonZeroUsize::new(align).unwrap_or(std::num::NonZeroUsize::MIN),
    )
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: mapped in AlignedBuf::huge with exactly this range.
            unsafe {
                libc::munmap(self.ptr.as_ptr().cast(), self.cap);
            }
        } else if self.cap != 0 {
            // SAFETY: allocated in with_alignment with exactly this layout.
            unsafe {
                alloc::dealloc(
                    self.ptr.as_ptr(),
                    Layout::from_size_align_unchecked(self.cap, self.align),
                )
            }
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised (zeroed at allocation) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self gives unique access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> AlignedBuf {
        let mut b = AlignedBuf::with_alignment(self.len, self.align);
        b.copy_from_slice(self);
        b
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("align", &self.align)
            .finish()
    }
}

impl PartialEq for AlignedBuf {
    fn eq(&self, other: &AlignedBuf) -> bool {
        self[..] == other[..]
    }
}

/// Power-of-two size classes from 512 B up to this; larger buffers are not kept.
const MAX_POOLED: usize = 4 << 20;
const MIN_CLASS_SHIFT: u32 = 9;
const CLASSES: usize = (MAX_POOLED.trailing_zeros() - MIN_CLASS_SHIFT + 1) as usize;
/// Buffers kept per class: enough for a full queue of small bounce buffers.
const KEEP_PER_CLASS: usize = 64;

/// A pool of aligned buffers in power-of-two size classes, so bounce buffers cost no
/// allocation in the steady state.
pub struct BufPool {
    align: usize,
    classes: Mutex<Vec<Vec<AlignedBuf>>>,
}

impl BufPool {
    pub fn new(align: usize) -> BufPool {
        BufPool {
            align: align.max(1).next_power_of_two(),
            classes: Mutex::new((0..CLASSES).map(|_| Vec::new()).collect()),
        }
    }

    pub fn alignment(&self) -> usize {
        self.align
    }

    fn class_of(len: usize) -> Option<usize> {
        if len > MAX_POOLED {
            return None;
        }
        let shift = len.max(1).next_power_of_two().trailing_zeros().max(MIN_CLASS_SHIFT);
        Some((shift - MIN_CLASS_SHIFT) as usize)
    }

    /// A buffer of exactly `len` bytes. Its contents are unspecified (a reused buffer
    /// keeps old data): callers overwrite it completely.
    pub fn take(&self, len: usize) -> AlignedBuf {
        if let Some(c) = BufPool::class_of(len) {
            let reused = self.classes.lock().ok().and_then(|mut cl| cl[c].pop());
            if let Some(mut b) = reused {
                if b.set_len_within_capacity(len) {
                    return b;
                }
            }
            let mut b = AlignedBuf::with_alignment(1 << (c as u32 + MIN_CLASS_SHIFT), self.align);
            b.truncate(len);
            return b;
        }
        AlignedBuf::with_alignment(len, self.align)
    }

    /// Give a buffer back for reuse (dropped if its class is full or it is not ours).
    pub fn put(&self, buf: AlignedBuf) {
        if buf.align < self.align || !buf.cap.is_power_of_two() {
            return;
        }
        let Some(c) = BufPool::class_of(buf.cap) else {
            return;
        };
        if 1usize << (c as u32 + MIN_CLASS_SHIFT) != buf.cap {
            return;
        }
        if let Ok(mut cl) = self.classes.lock() {
            if cl[c].len() < KEEP_PER_CLASS {
                cl[c].push(buf);
            }
        }
    }
}

impl fmt::Debug for BufPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufPool").field("align", &self.align).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_page_mode_is_the_bracketed_choice() {
        assert_eq!(selected_mode("always [madvise] never\n"), Some("madvise"));
        assert_eq!(selected_mode("always madvise [never]\n"), Some("never"));
        assert_eq!(selected_mode("[always] madvise never"), Some("always"));
        assert_eq!(selected_mode("always madvise never"), None);
        assert_eq!(selected_mode("[broken"), None);
    }

    #[test]
    fn alignment_and_zeroing() {
        for len in [0usize, 1, 512, 4096, 100_000] {
            let b = AlignedBuf::new(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % DEFAULT_ALIGN, 0);
            assert!(b.iter().all(|&x| x == 0));
        }
        let b = AlignedBuf::with_alignment(10, 65536);
        assert_eq!(b.as_ptr() as usize % 65536, 0);
    }

    #[test]
    fn large_buffers_are_whole_huge_pages() {
        for len in [HUGE, HUGE + 1, 3 * HUGE - 4096] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % HUGE, 0);
            assert_eq!(b.alignment(), HUGE);
            assert_eq!(b.capacity() % HUGE, 0);
            assert!(b.capacity() >= len && b.capacity() < len + HUGE);
            // the rounding is usable and zeroed too
            let cap = b.capacity();
            assert!(b.set_len_within_capacity(cap));
            assert!(b.iter().all(|&x| x == 0));
            b.fill(0xa5);
            let c = b.clone();
            assert_eq!(c.len(), cap);
            assert!(c.iter().all(|&x| x == 0xa5));
            let bytes = b.freeze();
            assert_eq!(bytes.len(), cap);
        }
        // an alignment above a huge page still takes the allocator
        let b = AlignedBuf::with_alignment(HUGE, 2 * HUGE);
        assert_eq!(b.as_ptr() as usize % (2 * HUGE), 0);
        assert_eq!(b.capacity(), HUGE);
    }

    #[test]
    fn from_slice_clone_freeze() {
        let b = AlignedBuf::from_slice(b"hello");
        let c = b.clone();
        assert_eq!(&c[..], b"hello");
        assert_eq!(c.as_ptr() as usize % DEFAULT_ALIGN, 0);
        let bytes = b.freeze();
        assert_eq!(&bytes[..], b"hello");
        assert_eq!(bytes.as_ptr() as usize % DEFAULT_ALIGN, 0);
    }

    #[test]
    fn pool_reuses_by_class() {
        let pool = BufPool::new(4096);
        let mut a = pool.take(3000);
        assert_eq!(a.len(), 3000);
        assert_eq!(a.capacity(), 4096);
        a[0] = 7;
        let addr = a.as_ptr() as usize;
        pool.put(a);
        let b = pool.take(4096);
        assert_eq!(b.as_ptr() as usize, addr, "same class reuses the buffer");
        assert_eq!(b.len(), 4096);
        let big = pool.take(MAX_POOLED + 1);
        assert_eq!(big.len(), MAX_POOLED + 1);
        assert_eq!(big.as_ptr() as usize % 4096, 0);
        pool.put(big); // not pooled, just dropped
    }
}
