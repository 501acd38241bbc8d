//! Page-aligned, zero-initialised heap buffers for direct I/O.
//!
//! Owns the only raw allocation in the appliance; a buffer's length is fixed at creation and a
//! multiple of [`crate::BLOCK_BYTES`] whenever it is handed to a drive.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

const ALIGN_BYTES: usize = 4096;

/// A heap buffer aligned to 4 KiB, as O_DIRECT requires.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads of the owned bytes.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes aligned to 4 KiB; `len` of zero allocates nothing.
    pub fn new(len: usize) -> AlignedBuf {
        if len == 0 {
            return AlignedBuf {
                ptr: NonNull::dangling(),
                len: 0,
                capacity: 0,
            };
        }
        let layout = Self::layout(len);
        // SAFETY: layout has a non-zero size (len > 0) and a valid power-of-two alignment.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout);
        };
        AlignedBuf {
            ptr,
            len,
            capacity: len,
        }
    }

    /// A buffer holding a copy of `bytes`, its length rounded up to whole blocks.
    pub fn from_slice_padded(bytes: &[u8]) -> AlignedBuf {
        let padded = bytes.len().div_ceil(ALIGN_BYTES) * ALIGN_BYTES;
        let mut buf = AlignedBuf::new(padded.max(ALIGN_BYTES));
        buf[..bytes.len()].copy_from_slice(bytes);
        buf
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, ALIGN_BYTES).expect("buffer length overflows a Layout")
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Bytes allocated; `set_len` may grow the length up to this.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Changes the length within the allocation; bytes past the old length keep their values.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity,
            "length {len} exceeds capacity {}",
            self.capacity
        );
        self.len = len;
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Raw pointer for submitting to the kernel.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.capacity == 0 {
            return;
        }
        // SAFETY: ptr was allocated in `new` with exactly this layout and is freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.capacity)) };
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points to capacity >= len initialised (zeroed at allocation) bytes owned
        // by self;
        // for len == 0 a dangling, aligned pointer is valid for an empty slice.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// Has glibc's malloc serve allocations of 128 KiB and more with their own mappings, returned
/// to the system when freed. By default glibc raises that threshold after the first such free
/// (up to 32 MiB), so large buffers allocated on one thread and freed on another, across many
/// per-thread arenas, stay in the arenas: with the direct cold-read design in a memory cgroup
/// of 256 MiB the process's own memory grew past the limit and the kernel killed it, with
/// 80 MiB of buffers live at most. A fixed threshold turns that growth off for the process.
pub fn return_large_frees_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's tuning; any value is valid for M_MMAP_THRESHOLD.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_padded() {
        for len in [4096, 8192, 1 << 20] {
            let buf = AlignedBuf::new(len);
            assert_eq!(buf.as_ptr() as usize % ALIGN_BYTES, 0);
            assert!(buf.iter().all(|&b| b == 0));
            assert_eq!(buf.len(), len);
        }
        let padded = AlignedBuf::from_slice_padded(b"hello");
        assert_eq!(padded.len(), 4096);
        assert_eq!(&padded[..5], b"hello");
        assert!(AlignedBuf::new(0).is_empty());
        let mut shrunk = AlignedBuf::new(8192);
        shrunk.set_len(4096);
        assert_eq!((shrunk.len(), shrunk.capacity()), (4096, 8192));
    }
}
