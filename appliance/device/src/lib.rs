//! The drive layer: the one home of `unsafe` in the appliance.
//!
//! It owns opening data drives (block devices or regular files) for direct I/O, the io_uring
//! ring thread of each drive, page-aligned buffers, and a deterministic simulated drive for the
//! store's simulation tests. It knows nothing of segments, records or files: it moves aligned
//! blocks at byte offsets and reports errors as `io::Error` values.

mod aligned;
mod open;
pub mod priority;
mod sim;
mod uring;
pub mod warm;
pub mod zerocopy;

pub use aligned::{return_large_frees_to_the_system, AlignedBuf};
pub use open::{DriveInfo, DriveKind};
pub use sim::{SimConfig, SimDrive, SimFaults, SplitMix64};
pub use uring::{UringConfig, UringDrive};

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::mpsc;

/// Alignment of every direct-I/O offset, length and buffer address, in bytes.
///
/// 4 KiB covers every logical block size NVMe namespaces ship with (512 B and 4 KiB).
pub const BLOCK_BYTES: u64 = 4096;

/// The outcome of one submitted operation: the result and the buffer handed back.
pub type Completion = (io::Result<()>, AlignedBuf);

/// A submitted read or write; `wait` blocks until the drive completes it.
///
/// Dropping a ticket without waiting is allowed: the operation still completes and its buffer is
/// freed by the drive.
pub struct Ticket {
    state: TicketState,
}

enum TicketState {
    Ready(Box<Completion>),
    Pending(mpsc::Receiver<Completion>),
}

impl Ticket {
    /// A ticket that is already complete (used by drives that execute operations inline).
    pub fn ready(result: io::Result<()>, buf: AlignedBuf) -> Ticket {
        Ticket {
            state: TicketState::Ready(Box::new((result, buf))),
        }
    }

    /// A ticket completed later through the sender side of `receiver`.
    pub fn pending(receiver: mpsc::Receiver<Completion>) -> Ticket {
        Ticket {
            state: TicketState::Pending(receiver),
        }
    }

    /// Blocks until the operation completes; returns its result and the buffer.
    pub fn wait(self) -> Completion {
        match self.state {
            TicketState::Ready(completion) => *completion,
            TicketState::Pending(receiver) => match receiver.recv() {
                Ok(completion) => completion,
                Err(_) => (
                    Err(io::Error::other("drive thread stopped before completing")),
                    AlignedBuf::new(0),
                ),
            },
        }
    }
}

/// One data drive as the store sees it.
///
/// Every offset and length passed to `write_at`, `read_at` and `discard` is a multiple of
/// [`BLOCK_BYTES`]; implementations assert it. A write is durable only after a later `flush`
/// returns `Ok`.
pub trait Drive: Send + Sync + 'static {
    /// What the drive is: path, size, logical block size.
    fn info(&self) -> &DriveInfo;
    /// Submits a direct write of all of `buf` at `offset_bytes`.
    fn write_at(&self, offset_bytes: u64, buf: AlignedBuf) -> Ticket;
    /// Submits a direct read filling all of `buf` from `offset_bytes`.
    fn read_at(&self, offset_bytes: u64, buf: AlignedBuf) -> Ticket;
    /// Makes every completed write durable (fdatasync through the ring).
    fn flush(&self) -> io::Result<()>;
    /// Tells the drive a range holds nothing of value (BLKDISCARD, or a punched hole).
    fn discard(&self, offset_bytes: u64, length_bytes: u64) -> io::Result<()>;
    /// Reads through the page cache, as sendfile(2) does; any offset and length.
    fn read_cached(&self, offset_bytes: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Drops the page cache of a range, so a reused range is never served from stale pages.
    fn drop_cached(&self, offset_bytes: u64, length_bytes: u64) -> io::Result<()>;
    /// The buffered descriptor that the serving layer passes to sendfile(2), if any.
    fn serve_fd(&self) -> Option<BorrowedFd<'_>>;
    /// Bytes read and written through this drive so far (for metrics; sendfile not included).
    fn io_bytes(&self) -> (u64, u64) {
        (0, 0)
    }
}

/// Waits for a write and turns the buffer-carrying completion into a plain result.
pub fn write_all_at(
    drive: &dyn Drive,
    offset_bytes: u64,
    buf: AlignedBuf,
) -> io::Result<AlignedBuf> {
    let (result, buf) = drive.write_at(offset_bytes, buf).wait();
    result.map(|()| buf)
}

/// Waits for a read and returns the filled buffer.
pub fn read_exact_at(
    drive: &dyn Drive,
    offset_bytes: u64,
    buf: AlignedBuf,
) -> io::Result<AlignedBuf> {
    let (result, buf) = drive.read_at(offset_bytes, buf).wait();
    result.map(|()| buf)
}

/// Panics unless `value` is a multiple of [`BLOCK_BYTES`]; callers pass only aligned values.
pub(crate) fn assert_aligned(what: &str, value: u64) {
    assert!(
        value.is_multiple_of(BLOCK_BYTES),
        "{what} {value} is not a multiple of {BLOCK_BYTES}"
    );
}
