//! The store's pool of aligned write buffers: allocated once at start-up, bounded, shared by
//! all writers. A writer that finds the pool empty waits for a bounded time and then gets a
//! retryable error: memory for writes never grows with the number of writers.

use crate::drive::lock;
use crate::error::StoreError;
use appliance_device::AlignedBuf;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// A fixed set of equally sized aligned buffers.
pub(crate) struct BufferPool {
    free: Mutex<Vec<AlignedBuf>>,
    returned: Condvar,
    buffer_bytes: usize,
}

impl BufferPool {
    /// Allocates `count` buffers of `buffer_bytes` now (zeroed pages cost no memory until used).
    pub fn new(count: usize, buffer_bytes: usize) -> BufferPool {
        BufferPool {
            free: Mutex::new((0..count).map(|_| AlignedBuf::new(buffer_bytes)).collect()),
            returned: Condvar::new(),
            buffer_bytes,
        }
    }

    /// Takes a buffer, waiting up to `wait` for one to come back.
    pub fn take(&self, wait: Duration) -> Result<AlignedBuf, StoreError> {
        let mut free = lock(&self.free);
        let deadline = std::time::Instant::now() + wait;
        loop {
            if let Some(mut buffer) = free.pop() {
                buffer.set_len(buffer.capacity());
                return Ok(buffer);
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

    /// Gives a buffer back.
    pub fn give(&self, buffer: AlignedBuf) {
        assert_eq!(
            buffer.capacity(),
            self.buffer_bytes,
            "a buffer of another pool"
        );
        lock(&self.free).push(buffer);
        self.returned.notify_one();
    }
}
