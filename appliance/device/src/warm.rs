//! Warming ranges of a drive's page cache with io_uring buffered reads: one thread and ring per
//! drive that reads ranges of the buffered descriptor into a scratch buffer it then ignores,
//! and says when each range is in the page cache (the `warm` cold-read design, measured
//! against the thread pools in BENCHMARKS.md).
//!
//! A buffered read through io_uring that misses the page cache does not block the ring: the
//! kernel reads the pages asynchronously and completes the request when they are there. Every
//! range being warmed is a request at the drive, so the drive's queue depth is the number of
//! cold ranges in flight. The bytes land in the page cache, where sendfile(2) then finds them;
//! the copy into the scratch buffer is the price of asking the kernel through read(2) rather
//! than a hint it may drop.
//!
//! Callers hand over a duplicate of the descriptor (the job owns it until its reads complete)
//! and a callback; a command channel plus an eventfd that the ring keeps a read armed on wake
//! the thread, as in `uring.rs`.

use crate::uring::new_eventfd;
use io_uring::{opcode, types, IoUring};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;

/// The most bytes one read SQE asks for; longer ranges are several reads into the same buffer.
const READ_BYTES_MAX: usize = 1 << 20;
/// Read SQEs in flight at once; further ranges wait in the thread's queue.
const READS_IN_FLIGHT_MAX: usize = 128;
const RING_ENTRIES: u32 = 256;
const WAKE_USER_DATA: u64 = u64::MAX;

/// What a finished warm-up reports: `Ok` once every page of the range was read (or the read
/// ended early at the end of the device), else the first error.
pub type WarmDone = Box<dyn FnOnce(io::Result<()>) + Send>;

/// One range to bring into the page cache.
pub struct WarmRequest {
    /// A descriptor of the drive opened without O_DIRECT (a duplicate the job owns).
    pub fd: OwnedFd,
    pub offset_bytes: u64,
    pub length_bytes: u64,
    pub done: WarmDone,
}

enum Command {
    Warm(WarmRequest),
    Stop,
}

/// A drive's warming thread. Dropping it stops the thread once its reads have completed.
pub struct Warmer {
    commands: Sender<Command>,
    wake: Arc<File>,
}

impl Warmer {
    /// Starts the thread (named `name`) and its ring.
    pub fn start(name: String) -> io::Result<Warmer> {
        let ring = IoUring::new(RING_ENTRIES)?;
        let wake = Arc::new(new_eventfd()?);
        let (commands, receiver) = mpsc::channel();
        let mut thread = WarmThread {
            ring,
            commands: receiver,
            wake: Arc::clone(&wake),
            wake_buf: Box::new([0u8; 8]),
            wake_armed: false,
            scratch: vec![0u8; READ_BYTES_MAX].into_boxed_slice(),
            jobs: Vec::new(),
            free: Vec::new(),
            queued: VecDeque::new(),
            reads_in_flight: 0,
            stopping: false,
        };
        std::thread::Builder::new()
            .name(name)
            .spawn(move || thread.run())?;
        Ok(Warmer { commands, wake })
    }

    /// Queues `request`; its callback runs on the warming thread when the range is read. If
    /// the thread is gone, the callback runs here with the error.
    pub fn warm(&self, request: WarmRequest) {
        if let Err(mpsc::SendError(Command::Warm(request))) =
            self.commands.send(Command::Warm(request))
        {
            (request.done)(Err(io::Error::other("the warming thread is gone")));
            return;
        }
        self.poke();
    }

    fn poke(&self) {
        let _ = (&*self.wake).write(&1u64.to_ne_bytes());
    }
}

impl Drop for Warmer {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        self.poke();
    }
}

/// A range being read: its descriptor, where the next read starts, reads still out.
struct Job {
    fd: OwnedFd,
    next_bytes: u64,
    end_bytes: u64,
    reads_out: usize,
    error: Option<io::Error>,
    done: Option<WarmDone>,
}

struct WarmThread {
    ring: IoUring,
    commands: Receiver<Command>,
    wake: Arc<File>,
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
    /// Where every read puts its bytes; nobody reads them.
    scratch: Box<[u8]>,
    jobs: Vec<Option<Job>>,
    free: Vec<usize>,
    /// Jobs with reads still to submit, in arrival order.
    queued: VecDeque<usize>,
    reads_in_flight: usize,
    stopping: bool,
}

impl WarmThread {
    fn run(&mut self) {
        loop {
            self.admit_commands();
            self.submit_reads();
            if self.stopping && self.reads_in_flight == 0 {
                break;
            }
            if !self.wake_armed {
                self.arm_wake();
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(error) if error.raw_os_error() == Some(libc::EINTR) => continue,
                Err(error) => {
                    // Every pending warm-up reports the error; their callers send inline.
                    self.fail_all(error);
                    break;
                }
            }
            self.reap();
        }
        // A wake-up read may still be armed: its buffer must outlive the ring, which the
        // kernel tears down when `ring` drops; leak the 8 bytes rather than risk it.
        if self.wake_armed {
            std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new([0u8; 8])));
        }
    }

    fn admit_commands(&mut self) {
        loop {
            match self.commands.try_recv() {
                Ok(Command::Warm(request)) => {
                    let job = Job {
                        fd: request.fd,
                        next_bytes: request.offset_bytes,
                        end_bytes: request.offset_bytes.saturating_add(request.length_bytes),
                        reads_out: 0,
                        error: None,
                        done: Some(request.done),
                    };
                    let slot = match self.free.pop() {
                        Some(slot) => {
                            self.jobs[slot] = Some(job);
                            slot
                        }
                        None => {
                            self.jobs.push(Some(job));
                            self.jobs.len() - 1
                        }
                    };
                    self.queued.push_back(slot);
                }
                Ok(Command::Stop) | Err(TryRecvError::Disconnected) => self.stopping = true,
                Err(TryRecvError::Empty) => return,
            }
            if self.stopping {
                return;
            }
        }
    }

    /// Pushes reads of the queued jobs while the in-flight cap allows.
    fn submit_reads(&mut self) {
        while self.reads_in_flight < READS_IN_FLIGHT_MAX {
            let Some(&slot) = self.queued.front() else {
                return;
            };
            let job = self.jobs[slot].as_ref().expect("a queued job is present");
            if job.next_bytes >= job.end_bytes {
                self.queued.pop_front();
                self.finish_if_done(slot);
                continue;
            }
            let (fd, next_bytes) = (job.fd.as_raw_fd(), job.next_bytes);
            let length = (job.end_bytes - next_bytes).min(READ_BYTES_MAX as u64);
            let entry = opcode::Read::new(
                types::Fd(fd),
                self.scratch.as_mut_ptr(),
                u32::try_from(length).expect("a read of at most 1 MiB fits u32"),
            )
            .offset(next_bytes)
            .build()
            .user_data(slot as u64);
            // SAFETY: the SQE points into `scratch`, owned by this thread for as long as the
            // ring lives and never read; concurrent reads into it only overwrite bytes nobody
            // looks at. The descriptor is owned by the job, which stays in its slot until its
            // last read completes.
            if !unsafe { self.push(&entry) } {
                return;
            }
            let job = self.jobs[slot].as_mut().expect("a queued job is present");
            job.next_bytes += length;
            job.reads_out += 1;
            self.reads_in_flight += 1;
        }
    }

    /// Pushes an SQE, submitting first if the queue is full; false if it still cannot.
    ///
    /// # Safety
    /// Whatever the entry points at must stay valid until its completion is reaped.
    unsafe fn push(&mut self, entry: &io_uring::squeue::Entry) -> bool {
        // SAFETY: forwarded to the caller.
        if unsafe { self.ring.submission().push(entry) }.is_ok() {
            return true;
        }
        if self.ring.submit().is_err() {
            return false;
        }
        // SAFETY: forwarded to the caller.
        unsafe { self.ring.submission().push(entry) }.is_ok()
    }

    fn arm_wake(&mut self) {
        let entry = opcode::Read::new(
            types::Fd(self.wake.as_raw_fd()),
            self.wake_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(WAKE_USER_DATA);
        // SAFETY: the SQE points at the 8 bytes of wake_buf, owned by self and leaked at the
        // end of `run` if this read is still armed; the eventfd is held by self.
        self.wake_armed = unsafe { self.push(&entry) };
    }

    fn reap(&mut self) {
        let completions: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        for (user_data, result) in completions {
            if user_data == WAKE_USER_DATA {
                self.wake_armed = false;
                continue;
            }
            let slot = usize::try_from(user_data).expect("a slot index fits usize");
            self.reads_in_flight -= 1;
            let job = self.jobs[slot]
                .as_mut()
                .expect("a completion's job is present");
            job.reads_out -= 1;
            if result < 0 && job.error.is_none() {
                job.error = Some(io::Error::from_raw_os_error(-result));
                // No point reading the rest of a range that failed.
                job.next_bytes = job.end_bytes;
            } else if result == 0 {
                // The end of the device: nothing further to read.
                job.next_bytes = job.end_bytes;
            }
            self.finish_if_done(slot);
        }
    }

    /// Reports a job whose reads are all submitted and completed, and frees its slot.
    fn finish_if_done(&mut self, slot: usize) {
        let job = self.jobs[slot].as_ref().expect("the job is present");
        if job.reads_out > 0 || job.next_bytes < job.end_bytes {
            return;
        }
        if self.queued.contains(&slot) {
            self.queued.retain(|&queued| queued != slot);
        }
        let mut job = self.jobs[slot].take().expect("the job is present");
        self.free.push(slot);
        if let Some(done) = job.done.take() {
            done(job.error.take().map_or(Ok(()), Err));
        }
    }

    fn fail_all(&mut self, error: io::Error) {
        for job in self.jobs.iter_mut().filter_map(Option::take) {
            if let Some(done) = job.done {
                done(Err(io::Error::new(error.kind(), error.to_string())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zerocopy::{residency, Residency};
    use std::os::fd::AsFd;

    /// Ranges of a file dropped from the page cache come back resident once their warm-up
    /// reports; many at once, longer than one read, and one past the end of the file.
    #[test]
    fn warmed_ranges_are_resident_when_reported() {
        let dir = std::env::temp_dir().join(format!("warm-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("drive");
        let bytes: Vec<u8> = (0..(24u32 << 20)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = File::open(&path).unwrap();
        // Dirty pages stay cached whatever the advice: write them back first.
        file.sync_all().unwrap();
        // SAFETY: a valid descriptor; the advice takes no pointers.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(residency(file.as_fd(), 4097, 2_500_000), Residency::Cold);
        let warmer = Warmer::start("warm-test".into()).unwrap();
        let ranges: Vec<(u64, u64)> = (0..8u64)
            .map(|i| (i * (3 << 20) + 4097, 2_500_000))
            .chain([(24 << 20, 1 << 20)])
            .collect();
        let (sender, receiver) = mpsc::channel();
        for &(offset, length) in &ranges {
            let sender = sender.clone();
            warmer.warm(WarmRequest {
                fd: file.as_fd().try_clone_to_owned().unwrap(),
                offset_bytes: offset,
                length_bytes: length,
                done: Box::new(move |outcome| sender.send((offset, outcome)).unwrap()),
            });
        }
        for _ in &ranges {
            let (offset, outcome) = receiver
                .recv_timeout(std::time::Duration::from_secs(20))
                .unwrap();
            outcome.unwrap();
            if offset < 24 << 20 {
                assert_eq!(
                    residency(file.as_fd(), offset, 2_500_000),
                    Residency::Resident,
                    "{offset}"
                );
            }
        }
        drop(warmer);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
