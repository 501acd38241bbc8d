//! The store's bounded pools, allocated once at start-up: the aligned write buffers shared by
//! all writers, and each drive's write slots (how many data writes may be in flight on that
//! drive at once, whoever issues them). A writer that finds a pool empty waits for a bounded
//! time and then gets a retryable error: neither memory for writes nor a drive's queue of
//! writes grows with the number of writers.

use crate::drive::lock;
use crate::error::StoreError;
use appliance_device::AlignedBuf;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// A fixed set of items handed out and given back.
pub(crate) struct Pool<T> {
    free: Mutex<Vec<T>>,
    returned: Condvar,
}

impl<T> Pool<T> {
    pub fn new(items: Vec<T>) -> Pool<T> {
        Pool {
            free: Mutex::new(items),
            returned: Condvar::new(),
        }
    }

    /// Takes an item if one is free now.
    pub fn try_take(&self) -> Option<T> {
        lock(&self.free).pop()
    }

    /// Takes an item, waiting up to `wait` for one to come back.
    pub fn take(&self, wait: Duration) -> Result<T, StoreError> {
        let mut free = lock(&self.free);
        let deadline = std::time::Instant::now() + wait;
        loop {
            if let Some(item) = free.pop() {
                return Ok(item);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(StoreError::OutOfBuffers);
            }
            free = self
                .returned
                .wait_timeout(free, left)
                .unwrap_or_else(|poison| poison.into_inner())
                .0;
        }
    }

    /// Gives an item back.
    pub fn give(&self, item: T) {
        lock(&self.free).push(item);
        self.returned.notify_one();
    }
}

/// Equally sized aligned write buffers.
pub(crate) struct BufferPool {
    pool: Pool<AlignedBuf>,
    buffer_bytes: usize,
}

impl BufferPool {
    /// Allocates `count` buffers of `buffer_bytes` now (zeroed pages cost no memory until used).
    pub fn new(count: usize, buffer_bytes: usize) -> BufferPool {
        BufferPool {
            pool: Pool::new((0..count).map(|_| AlignedBuf::new(buffer_bytes)).collect()),
            buffer_bytes,
        }
    }

    /// Takes a buffer, waiting up to `wait` for one to come back.
    pub fn take(&self, wait: Duration) -> Result<AlignedBuf, StoreError> {
        let mut buffer = self.pool.take(wait)?;
        buffer.set_len(buffer.capacity());
        Ok(buffer)
    }

    /// Gives a buffer back.
    pub fn give(&self, buffer: AlignedBuf) {
        assert_eq!(
            buffer.capacity(),
            self.buffer_bytes,
            "a buffer of another pool"
        );
        self.pool.give(buffer);
    }
}

/// The right to have one data write in flight on a drive: taken before the write is
/// submitted, given back when its writer has reaped the completion. Not `Clone`: a drive never
/// has more writes in flight than slots were made for it.
pub(crate) struct WriteSlot(());

/// One drive's write slots.
pub(crate) type WriteSlots = Pool<WriteSlot>;

/// `count` write slots for one drive.
pub(crate) fn write_slots(count: usize) -> WriteSlots {
    assert!(count > 0, "a drive needs at least one write slot");
    Pool::new((0..count).map(|_| WriteSlot(())).collect())
}
