//! The real drive: one io_uring ring per data drive, owned by that drive's own thread.
//!
//! It owns the ring thread, its table of in-flight operations (and so every buffer the kernel
//! may be reading or writing), and the synchronous side calls (discard, page-cache reads). It
//! moves aligned blocks and must not interpret them.
//!
//! Callers send commands through a bounded channel and bump an eventfd; the ring thread keeps
//! one read of that eventfd pending in the ring, so a new command wakes it even while it waits
//! on completions. Its loop: admit commands while it has a free slot, start flushes whose
//! writes have all completed, keep the wake-up read armed, wait for a completion, reap.

use crate::open::{context, invalid, open_drive, OpenedDrive, BLKDISCARD};
use crate::{assert_aligned, AlignedBuf, Completion, Drive, DriveInfo, DriveKind, Ticket};
use io_uring::{opcode, squeue, types, IoUring};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

/// The user data of the eventfd read; every other completion carries its slot index.
const WAKE_USER_DATA: u64 = u64::MAX;

/// The most bytes one read or write SQE moves; a longer buffer goes as several submissions.
const CHUNK_BYTES_MAX: usize = 1 << 30;

/// How often an operation that failed with EINTR or EAGAIN is resubmitted before failing.
const RETRY_COUNT_MAX: u32 = 64;

/// How to set up a drive's ring.
#[derive(Clone, Copy, Debug)]
pub struct UringConfig {
    /// Operations in flight at once; also the capacity of the command channel.
    pub queue_depth: u32,
}

impl Default for UringConfig {
    fn default() -> UringConfig {
        UringConfig { queue_depth: 32 }
    }
}

/// A block device or file driven through io_uring with direct I/O.
///
/// The drive holds an exclusive `flock` on its path (and, for a block device, an `O_EXCL`
/// claim) until it is dropped. Dropping it waits for every submitted operation to complete.
pub struct UringDrive {
    info: DriveInfo,
    /// The `O_DIRECT` descriptor; the ring thread holds the other reference.
    direct: Arc<File>,
    /// The buffered descriptor for `read_cached`, `drop_cached` and sendfile(2).
    cached: File,
    commands: SyncSender<Command>,
    wake: Arc<File>,
    thread: Option<JoinHandle<()>>,
    read_bytes: std::sync::atomic::AtomicU64,
    written_bytes: std::sync::atomic::AtomicU64,
}

/// What callers ask of the ring thread.
enum Command {
    Transfer(Transfer),
    Flush(SyncSender<io::Result<()>>),
    Stop,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Direction {
    Read,
    Write,
}

/// A read or write of a whole buffer, possibly completed by several submissions.
struct Transfer {
    direction: Direction,
    offset_bytes: u64,
    /// Bytes already moved; the next submission starts here.
    done_bytes: usize,
    buf: AlignedBuf,
    reply: SyncSender<Completion>,
    /// Admission order among writes, for flush barriers (0 for reads).
    write_sequence: u64,
    retry_count: u32,
}

/// What occupies a slot of the in-flight table.
enum InFlight {
    Transfer(Transfer),
    Fsync {
        reply: SyncSender<io::Result<()>>,
        retry_count: u32,
    },
}

/// A flush waiting for the writes admitted before it to complete.
struct PendingFlush {
    /// Writes with a smaller sequence number must complete before the fsync is submitted.
    write_sequence_barrier: u64,
    reply: SyncSender<io::Result<()>>,
}

impl UringDrive {
    /// Opens a block device or regular file and starts its ring thread.
    ///
    /// Fails, naming the path, when the drive is in use by another process, is not a block
    /// device or file, has a logical block size above 4096 bytes, or io_uring is unavailable.
    pub fn open(path: &Path, config: &UringConfig) -> io::Result<UringDrive> {
        if config.queue_depth == 0 {
            return Err(invalid(path, "queue depth must be at least 1"));
        }
        let OpenedDrive {
            info,
            direct,
            cached,
        } = open_drive(path)?;
        let ring = IoUring::new(config.queue_depth)
            .map_err(|error| context(path, "cannot set up io_uring", error))?;
        let wake =
            Arc::new(new_eventfd().map_err(|error| context(path, "cannot create eventfd", error))?);
        let direct = Arc::new(direct);
        let depth = usize::try_from(config.queue_depth).expect("a u32 queue depth fits usize");
        let (commands, receiver) = mpsc::sync_channel(depth);
        let ring_thread = RingThread::new(RingParts {
            path: path.to_path_buf(),
            ring,
            commands: receiver,
            direct: Arc::clone(&direct),
            wake: Arc::clone(&wake),
            depth,
        });
        let name = path
            .file_name()
            .unwrap_or(path.as_os_str())
            .to_string_lossy();
        let thread = thread::Builder::new()
            .name(format!("drive-{name}"))
            .spawn(move || ring_thread.run())
            .map_err(|error| context(path, "cannot start ring thread", error))?;
        Ok(UringDrive {
            info,
            direct,
            cached,
            commands,
            wake,
            thread: Some(thread),
            read_bytes: std::sync::atomic::AtomicU64::new(0),
            written_bytes: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn check_range(&self, offset_bytes: u64, length_bytes: u64) -> io::Result<()> {
        match offset_bytes.checked_add(length_bytes) {
            Some(end) if end <= self.info.size_bytes => Ok(()),
            _ => Err(invalid(
                &self.info.path,
                &format!(
                    "range {offset_bytes}+{length_bytes} is past the end of the drive ({} bytes)",
                    self.info.size_bytes
                ),
            )),
        }
    }

    /// Sends a command and wakes the ring thread; gives the command back if the thread is gone.
    fn send(&self, command: Command) -> Result<(), Command> {
        self.commands
            .send(command)
            .map_err(|mpsc::SendError(command)| command)?;
        (&*self.wake)
            .write_all(&1u64.to_ne_bytes())
            .expect("an eventfd write of 1 cannot fail");
        Ok(())
    }

    fn submit(&self, direction: Direction, offset_bytes: u64, buf: AlignedBuf) -> Ticket {
        let length_bytes = buf.len() as u64;
        assert_aligned("offset", offset_bytes);
        assert_aligned("length", length_bytes);
        if let Err(error) = self.check_range(offset_bytes, length_bytes) {
            return Ticket::ready(Err(error), buf);
        }
        if buf.is_empty() {
            return Ticket::ready(Ok(()), buf);
        }
        let (reply, receiver) = mpsc::sync_channel(1);
        let transfer = Transfer {
            direction,
            offset_bytes,
            done_bytes: 0,
            buf,
            reply,
            write_sequence: 0,
            retry_count: 0,
        };
        match self.send(Command::Transfer(transfer)) {
            Ok(()) => Ticket::pending(receiver),
            Err(Command::Transfer(transfer)) => Ticket::ready(Err(self.stopped()), transfer.buf),
            Err(_) => unreachable!("send gives back the command it was given"),
        }
    }

    fn stopped(&self) -> io::Error {
        io::Error::other(format!(
            "{}: the drive's ring thread has stopped",
            self.info.path.display()
        ))
    }

    fn discard_range(&self, offset_bytes: u64, length_bytes: u64) -> io::Result<()> {
        let fd = self.direct.as_raw_fd();
        let status = match self.info.kind {
            DriveKind::BlockDevice => {
                let range: [u64; 2] = [offset_bytes, length_bytes];
                // SAFETY: BLKDISCARD reads two u64 through the pointer, which points at a live
                // local array of exactly that shape.
                unsafe { libc::ioctl(fd, BLKDISCARD, &range) }
            }
            DriveKind::RegularFile => {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                let offset = to_off_t(offset_bytes);
                let length = to_off_t(length_bytes);
                // SAFETY: fallocate takes no pointers; the descriptor is open while self lives.
                unsafe { libc::fallocate(fd, mode, offset, length) }
            }
            DriveKind::Simulated => unreachable!("a UringDrive is never simulated"),
        };
        if status == 0 {
            return Ok(());
        }
        match io::Error::last_os_error() {
            error if error.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            error => Err(context(&self.info.path, "discard failed", error)),
        }
    }
}

impl Drive for UringDrive {
    fn info(&self) -> &DriveInfo {
        &self.info
    }

    fn write_at(&self, offset_bytes: u64, buf: AlignedBuf) -> Ticket {
        self.written_bytes
            .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.submit(Direction::Write, offset_bytes, buf)
    }

    fn read_at(&self, offset_bytes: u64, buf: AlignedBuf) -> Ticket {
        self.read_bytes
            .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.submit(Direction::Read, offset_bytes, buf)
    }

    fn io_bytes(&self) -> (u64, u64) {
        (
            self.read_bytes.load(std::sync::atomic::Ordering::Relaxed),
            self.written_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Submits a datasync fsync once every write sent before this call has completed.
    fn flush(&self) -> io::Result<()> {
        let (reply, receiver) = mpsc::sync_channel(1);
        if self.send(Command::Flush(reply)).is_err() {
            return Err(self.stopped());
        }
        receiver.recv().unwrap_or_else(|_| Err(self.stopped()))
    }

    /// Runs on the caller's thread, unordered with the ring: callers must not discard a range
    /// with writes in flight.
    fn discard(&self, offset_bytes: u64, length_bytes: u64) -> io::Result<()> {
        assert_aligned("discard offset", offset_bytes);
        assert_aligned("discard length", length_bytes);
        self.check_range(offset_bytes, length_bytes)?;
        if length_bytes == 0 {
            return Ok(());
        }
        self.discard_range(offset_bytes, length_bytes)
    }

    fn read_cached(&self, offset_bytes: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset_bytes, buf.len() as u64)?;
        // read_exact_at loops over pread, retries EINTR, and reports a short file as
        // UnexpectedEof.
        self.cached
            .read_exact_at(buf, offset_bytes)
            .map_err(|error| context(&self.info.path, "cached read failed", error))
    }

    fn drop_cached(&self, offset_bytes: u64, length_bytes: u64) -> io::Result<()> {
        self.check_range(offset_bytes, length_bytes)?;
        if length_bytes == 0 {
            // A zero length would mean "to the end of the file" to posix_fadvise.
            return Ok(());
        }
        let fd = self.cached.as_raw_fd();
        let (offset, length) = (to_off_t(offset_bytes), to_off_t(length_bytes));
        // SAFETY: posix_fadvise takes no pointers; the descriptor is open while self lives.
        let status = unsafe { libc::posix_fadvise(fd, offset, length, libc::POSIX_FADV_DONTNEED) };
        match status {
            0 => Ok(()),
            errno => Err(context(
                &self.info.path,
                "dropping cached pages failed",
                io::Error::from_raw_os_error(errno),
            )),
        }
    }

    fn serve_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.cached.as_fd())
    }
}

impl Drop for UringDrive {
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        // If the thread is already gone the send fails and the join returns at once.
        let _ = self.send(Command::Stop);
        // A ring thread that panicked has reported it already; its buffers are leaked, not
        // freed, so nothing more is owed here.
        let _ = thread.join();
    }
}

/// A range end already checked against the drive size, which came from the kernel as an off_t.
fn to_off_t(bytes: u64) -> libc::off_t {
    libc::off_t::try_from(bytes).expect("a checked drive range fits off_t")
}

pub(crate) fn new_eventfd() -> io::Result<File> {
    // SAFETY: eventfd takes no pointers; its result is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a descriptor just returned by eventfd, owned by nothing else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// What `open` hands to the ring thread.
struct RingParts {
    path: PathBuf,
    ring: IoUring,
    commands: Receiver<Command>,
    direct: Arc<File>,
    wake: Arc<File>,
    depth: usize,
}

/// The state of one drive's ring thread.
///
/// Soundness rests on one rule: a buffer whose address is in a submitted SQE stays owned by
/// this struct (in `slots`, or `wake_buf`) until that SQE's completion is reaped. Nothing hands
/// it out or frees it before then, and `Drop` leaks whatever the kernel may still hold.
struct RingThread {
    path: PathBuf,
    ring: IoUring,
    commands: Receiver<Command>,
    direct: Arc<File>,
    wake: Arc<File>,
    /// Where the pending eventfd read lands; its contents are never looked at.
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
    /// The in-flight table: an operation's user data is its index here.
    slots: Vec<Option<InFlight>>,
    free_slots: Vec<usize>,
    pending_flushes: VecDeque<PendingFlush>,
    next_write_sequence: u64,
    stopping: bool,
    reaped: Vec<(u64, i32)>,
}

impl RingThread {
    fn new(parts: RingParts) -> RingThread {
        RingThread {
            path: parts.path,
            ring: parts.ring,
            commands: parts.commands,
            direct: parts.direct,
            wake: parts.wake,
            wake_buf: Box::new([0; 8]),
            wake_armed: false,
            slots: (0..parts.depth).map(|_| None).collect(),
            free_slots: (0..parts.depth).rev().collect(),
            pending_flushes: VecDeque::new(),
            next_write_sequence: 1,
            stopping: false,
            reaped: Vec::with_capacity(parts.depth + 1),
        }
    }

    fn run(mut self) {
        loop {
            self.admit_commands();
            self.start_ready_flushes();
            if !self.stopping && !self.wake_armed {
                self.arm_wake();
            }
            if self.is_finished() {
                return;
            }
            self.wait_for_completion();
            self.reap_completions();
        }
    }

    /// Stopping, and nothing left in the kernel's hands or waiting to start.
    fn is_finished(&self) -> bool {
        self.stopping
            && !self.wake_armed
            && self.in_flight_count() == 0
            && self.pending_flushes.is_empty()
    }

    fn in_flight_count(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    /// Takes commands while a slot is free for each; the rest wait in the bounded channel.
    fn admit_commands(&mut self) {
        while !self.stopping
            && self.in_flight_count() + self.pending_flushes.len() < self.slots.len()
        {
            match self.commands.try_recv() {
                Ok(Command::Transfer(transfer)) => self.start_transfer(transfer),
                Ok(Command::Flush(reply)) => self.pending_flushes.push_back(PendingFlush {
                    write_sequence_barrier: self.next_write_sequence,
                    reply,
                }),
                Ok(Command::Stop) | Err(TryRecvError::Disconnected) => self.stop(),
                Err(TryRecvError::Empty) => return,
            }
        }
    }

    /// Stops taking commands, and completes the armed wake-up read by bumping the eventfd:
    /// the caller's own bump may already have been consumed by an earlier read.
    fn stop(&mut self) {
        self.stopping = true;
        if self.wake_armed {
            (&*self.wake)
                .write_all(&1u64.to_ne_bytes())
                .expect("an eventfd write of 1 cannot fail");
        }
    }

    fn start_transfer(&mut self, mut transfer: Transfer) {
        if transfer.direction == Direction::Write {
            transfer.write_sequence = self.next_write_sequence;
            self.next_write_sequence += 1;
        }
        let slot = self
            .free_slots
            .pop()
            .expect("commands are admitted only into free slots");
        self.slots[slot] = Some(InFlight::Transfer(transfer));
        self.submit_transfer(slot);
    }

    /// Submits the remainder of the transfer in `slot`.
    fn submit_transfer(&mut self, slot: usize) {
        let fd = types::Fd(self.direct.as_raw_fd());
        let Some(InFlight::Transfer(transfer)) = &mut self.slots[slot] else {
            panic!("slot {slot} holds no transfer");
        };
        let remaining_bytes = transfer.buf.len() - transfer.done_bytes;
        assert!(
            remaining_bytes > 0,
            "a complete transfer is never resubmitted"
        );
        let chunk_bytes =
            u32::try_from(remaining_bytes.min(CHUNK_BYTES_MAX)).expect("CHUNK_BYTES_MAX fits u32");
        let address = transfer.buf.as_mut_ptr().wrapping_add(transfer.done_bytes);
        let offset_bytes = transfer.offset_bytes + transfer.done_bytes as u64;
        let entry = match transfer.direction {
            Direction::Write => opcode::Write::new(fd, address, chunk_bytes)
                .offset(offset_bytes)
                .build(),
            Direction::Read => opcode::Read::new(fd, address, chunk_bytes)
                .offset(offset_bytes)
                .build(),
        };
        // SAFETY: the SQE points at chunk_bytes bytes inside the transfer's AlignedBuf (done_bytes
        // + chunk_bytes <= len). That heap allocation does not move when the AlignedBuf value
        // moves, and the transfer stays in `slots[slot]` until this SQE's completion is reaped
        // (complete_transfer takes it out only then), so the memory outlives the operation and
        // nothing else touches it meanwhile.
        unsafe { self.push(&entry.user_data(slot as u64)) };
    }

    /// Starts the fsync of every pending flush whose writes have all completed, in order.
    fn start_ready_flushes(&mut self) {
        while let Some(flush) = self.pending_flushes.front() {
            let blocked = self
                .oldest_write_in_flight()
                .is_some_and(|sequence| sequence < flush.write_sequence_barrier);
            if blocked || self.free_slots.is_empty() {
                return;
            }
            let flush = self.pending_flushes.pop_front().expect("front was Some");
            let slot = self.free_slots.pop().expect("checked non-empty");
            self.slots[slot] = Some(InFlight::Fsync {
                reply: flush.reply,
                retry_count: 0,
            });
            self.submit_fsync(slot);
        }
    }

    fn oldest_write_in_flight(&self) -> Option<u64> {
        let writes = self.slots.iter().filter_map(|slot| match slot {
            Some(InFlight::Transfer(t)) if t.direction == Direction::Write => {
                Some(t.write_sequence)
            }
            _ => None,
        });
        writes.min()
    }

    fn submit_fsync(&mut self, slot: usize) {
        let fd = types::Fd(self.direct.as_raw_fd());
        let entry = opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(slot as u64);
        // SAFETY: an fsync SQE points at no memory; the descriptor is kept open by self.direct.
        unsafe { self.push(&entry) };
    }

    fn arm_wake(&mut self) {
        let fd = types::Fd(self.wake.as_raw_fd());
        let entry = opcode::Read::new(fd, self.wake_buf.as_mut_ptr(), 8)
            .build()
            .user_data(WAKE_USER_DATA);
        // SAFETY: the SQE points at the 8 bytes of wake_buf, a heap allocation owned by self
        // that is neither read nor freed while wake_armed is true; wake_armed turns false only
        // when this read's completion is reaped, and Drop leaks the buffer if it is still true.
        unsafe { self.push(&entry) };
        self.wake_armed = true;
    }

    /// Queues an SQE, submitting what is queued first if the submission queue is full.
    ///
    /// # Safety
    ///
    /// Every buffer `entry` points at must stay valid, and untouched by anything else, until
    /// its completion is reaped.
    unsafe fn push(&mut self, entry: &squeue::Entry) {
        loop {
            // SAFETY: the caller guarantees the entry's buffers outlive the operation.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return;
            }
            if let Err(error) = self.ring.submit() {
                self.check_retryable(error);
            }
        }
    }

    fn wait_for_completion(&mut self) {
        assert!(
            self.wake_armed || self.in_flight_count() > 0,
            "waiting with nothing in flight would block forever"
        );
        if let Err(error) = self.ring.submit_and_wait(1) {
            self.check_retryable(error);
        }
    }

    /// EINTR, EAGAIN and EBUSY from io_uring_enter mean "try again"; anything else is a broken
    /// ring, and the thread panics (its Drop leaks what the kernel may still hold).
    fn check_retryable(&self, error: io::Error) {
        let retryable = matches!(
            error.raw_os_error(),
            Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
        );
        assert!(
            retryable,
            "{}: io_uring_enter failed: {error}",
            self.path.display()
        );
    }

    fn reap_completions(&mut self) {
        let mut reaped = std::mem::take(&mut self.reaped);
        reaped.extend(
            self.ring
                .completion()
                .map(|entry| (entry.user_data(), entry.result())),
        );
        for &(user_data, result) in &reaped {
            self.complete(user_data, result);
        }
        reaped.clear();
        self.reaped = reaped;
    }

    fn complete(&mut self, user_data: u64, result: i32) {
        if user_data == WAKE_USER_DATA {
            // Whatever the read returned, the loop now drains the channel and re-arms.
            self.wake_armed = false;
            return;
        }
        let slot = usize::try_from(user_data).expect("user data is a slot index");
        let operation = self.slots[slot]
            .take()
            .expect("a completion arrives only for an occupied slot");
        // The kernel is done with this slot's buffer: it may be resubmitted or handed back.
        match operation {
            InFlight::Transfer(transfer) => self.complete_transfer(slot, transfer, result),
            InFlight::Fsync { reply, retry_count } => {
                if is_retryable(result) && retry_count < RETRY_COUNT_MAX {
                    self.slots[slot] = Some(InFlight::Fsync {
                        reply,
                        retry_count: retry_count + 1,
                    });
                    self.submit_fsync(slot);
                    return;
                }
                self.free_slots.push(slot);
                let outcome = match result {
                    0.. => Ok(()),
                    _ => Err(context(&self.path, "flush failed", errno_error(result))),
                };
                // A flush caller that went away is not an error.
                let _ = reply.send(outcome);
            }
        }
    }

    fn complete_transfer(&mut self, slot: usize, mut transfer: Transfer, result: i32) {
        let outcome = match usize::try_from(result) {
            Ok(0) => Some(Err(
                self.transfer_error(&transfer, zero_transfer_error(transfer.direction))
            )),
            Ok(moved_bytes) => {
                transfer.done_bytes += moved_bytes;
                assert!(
                    transfer.done_bytes <= transfer.buf.len(),
                    "the kernel moved too much"
                );
                (transfer.done_bytes == transfer.buf.len()).then_some(Ok(()))
            }
            Err(_) if is_retryable(result) && transfer.retry_count < RETRY_COUNT_MAX => {
                transfer.retry_count += 1;
                None
            }
            Err(_) => Some(Err(self.transfer_error(&transfer, errno_error(result)))),
        };
        let Some(outcome) = outcome else {
            // Short transfer or retryable error: submit the remainder from the same slot.
            self.slots[slot] = Some(InFlight::Transfer(transfer));
            self.submit_transfer(slot);
            return;
        };
        self.free_slots.push(slot);
        // A dropped ticket is allowed: the completion, buffer included, is freed right here.
        let _ = transfer.reply.send((outcome, transfer.buf));
    }

    fn transfer_error(&self, transfer: &Transfer, error: io::Error) -> io::Error {
        let what = format!(
            "{:?} of {} bytes at offset {} failed after {} bytes",
            transfer.direction,
            transfer.buf.len(),
            transfer.offset_bytes,
            transfer.done_bytes
        );
        context(&self.path, &what, error)
    }
}

impl Drop for RingThread {
    /// After a clean stop nothing is in flight. After a panic the kernel may still write into
    /// in-flight buffers, so they are leaked rather than freed; their repliers are dropped,
    /// which fails the waiting tickets.
    fn drop(&mut self) {
        for slot in &mut self.slots {
            if let Some(InFlight::Transfer(transfer)) = slot.take() {
                std::mem::forget(transfer.buf);
            }
        }
        if self.wake_armed {
            std::mem::forget(std::mem::take(&mut self.wake_buf));
        }
    }
}

fn is_retryable(result: i32) -> bool {
    result == -libc::EINTR || result == -libc::EAGAIN
}

/// The error of a negative CQE result.
fn errno_error(result: i32) -> io::Error {
    io::Error::from_raw_os_error(-result)
}

fn zero_transfer_error(direction: Direction) -> io::Error {
    match direction {
        Direction::Read => io::Error::new(io::ErrorKind::UnexpectedEof, "read returned 0 bytes"),
        Direction::Write => io::Error::new(io::ErrorKind::WriteZero, "write returned 0 bytes"),
    }
}
