//! Cold reads off the serving workers: the per-drive pools of threads that run sendfile(2)
//! for ranges not in the page cache, so a worker never waits for a drive.
//!
//! A worker asks the kernel (cachestat(2)) whether a range is cached. A resident range goes
//! out inline with sendfile from the worker, as before. A cold one first gets a read-ahead
//! hint for the whole range (posix_fadvise WILLNEED, which queues the reads at once, so the
//! drive sees as many requests as there are cold ranges being served), then its sendfile runs
//! on one of the drive's threads while the worker serves other connections. This is nginx's
//! `aio threads` pattern with a residency check in front (which nginx on Linux lacks), and a
//! pool per drive so a slow drive cannot take the threads of the others.
//!
//! A second design, `warm`, keeps the sendfile on the worker but first has the drive's warming
//! thread read the cold piece into the page cache through io_uring (`appliance_device::warm`)
//! while the worker serves others. Both are measured in BENCHMARKS.md; `pool` is the default.
//!
//! A job owns everything it touches: a duplicate of the socket descriptor and the file
//! handle (whose pins keep the segments from being reused while the thread reads them), so a
//! connection that goes away while its job waits can never make a thread send the wrong bytes
//! or to the wrong socket.

use appliance_device::warm::{WarmRequest, Warmer};
use appliance_device::zerocopy;
use appliance_store::FileHandle;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};

/// Where the bytes of a range that is not in the page cache are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ColdRead {
    /// sendfile on the worker whatever the residency (a cold range blocks the worker).
    Inline,
    /// A cold range's sendfile runs on a thread of its drive's pool.
    Pool,
    /// A cold piece is first read into the page cache by io_uring on the drive's warming
    /// thread; the worker waits without blocking, then sends it inline.
    Warm,
}

/// The cold-read settings.
#[derive(Clone, Copy, Debug)]
pub struct ColdConfig {
    pub mode: ColdRead,
    /// Threads per drive for cold sendfiles.
    pub threads_per_drive: usize,
}

impl Default for ColdConfig {
    fn default() -> ColdConfig {
        ColdConfig {
            mode: ColdRead::Pool,
            threads_per_drive: 16,
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// One drive's threads.
struct Pool {
    jobs: mpsc::Sender<Job>,
}

impl Pool {
    fn start(drive_number: u8, threads: usize) -> io::Result<Pool> {
        let (sender, receiver) = mpsc::channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        for thread in 0..threads.max(1) {
            let receiver = Arc::clone(&receiver);
            std::thread::Builder::new()
                .name(format!("cold-{drive_number}-{thread}"))
                .spawn(move || loop {
                    let job = {
                        let receiver = receiver.lock().unwrap_or_else(|poison| poison.into_inner());
                        receiver.recv()
                    };
                    match job {
                        Ok(job) => job(),
                        Err(mpsc::RecvError) => return,
                    }
                })?;
        }
        Ok(Pool { jobs: sender })
    }
}

/// Counters of the cold path, registered in the daemon's registry.
#[derive(Default)]
pub struct ColdCounts {
    /// sendfile calls made on a worker because the range was resident (or the mode inline).
    pub inline_sends: Counter,
    /// Cold pieces: sendfile calls handed to a drive's pool, or pieces warmed before sending.
    pub pool_sends: Counter,
    /// Pool jobs or warm-ups queued or running now.
    pub pool_jobs: Gauge,
}

impl ColdCounts {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "sendfile_inline",
            "sendfile calls made on a serving worker (the range was in the page cache)",
            self.inline_sends.clone(),
        );
        registry.register(
            "sendfile_cold",
            "Pieces not in the page cache, sent by a drive's cold-read threads or warmed first",
            self.pool_sends.clone(),
        );
        registry.register(
            "sendfile_cold_in_flight",
            "Cold pieces being sent or warmed on the drives' threads now",
            self.pool_jobs.clone(),
        );
    }
}

/// The pools of every drive, started on a drive's first cold range.
pub struct ColdReads {
    config: ColdConfig,
    pools: Box<[OnceLock<Option<Pool>>]>,
    warmers: Box<[OnceLock<Option<Warmer>>]>,
    pub counts: ColdCounts,
}

/// What a worker should do with the next piece of a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Inline,
    Pool,
    Warm,
}

impl ColdReads {
    pub fn new(config: ColdConfig) -> ColdReads {
        ColdReads {
            config,
            pools: (0..=u8::MAX).map(|_| OnceLock::new()).collect(),
            warmers: (0..=u8::MAX).map(|_| OnceLock::new()).collect(),
            counts: ColdCounts::default(),
        }
    }

    /// Where `offset_bytes..+length_bytes` of the drive should be sent from.
    pub fn route(&self, handle: &FileHandle, offset_bytes: u64, length_bytes: u64) -> Route {
        if self.config.mode == ColdRead::Inline {
            return Route::Inline;
        }
        let Some(source) = handle.serve_fd() else {
            return Route::Inline;
        };
        match zerocopy::residency(source, offset_bytes, length_bytes) {
            zerocopy::Residency::Resident => Route::Inline,
            zerocopy::Residency::Cold | zerocopy::Residency::Unknown => match self.config.mode {
                ColdRead::Warm => Route::Warm,
                ColdRead::Pool | ColdRead::Inline => Route::Pool,
            },
        }
    }

    /// Has the drive's warming thread read `offset_bytes..+length_bytes` into the page cache,
    /// and waits (without blocking the worker) until it has. An error only means the sendfile
    /// that follows may block; the bytes it sends are right either way.
    pub async fn warm(
        &self,
        handle: &Arc<FileHandle>,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> io::Result<()> {
        let Some(source) = handle.serve_fd() else {
            return Ok(());
        };
        let fd = source.try_clone_to_owned()?;
        let drive = handle.drive_number();
        let warmer = self.warmers[usize::from(drive)].get_or_init(|| {
            Warmer::start(format!("warm-{drive}"))
                .map_err(|error| {
                    tracing::error!(drive, %error, "cannot start the warming thread; cold ranges go out inline");
                })
                .ok()
        });
        let Some(warmer) = warmer else {
            return Ok(());
        };
        self.counts.pool_sends.inc();
        let _in_flight = InFlight::count(&self.counts.pool_jobs);
        let (reply, answer) = tokio::sync::oneshot::channel();
        // The handle's pins keep the segments from reuse until the reads are done.
        let handle = Arc::clone(handle);
        warmer.warm(WarmRequest {
            fd,
            offset_bytes,
            length_bytes,
            done: Box::new(move |outcome| {
                drop(handle);
                let _ = reply.send(outcome);
            }),
        });
        answer
            .await
            .unwrap_or_else(|_| Err(io::Error::other("the warming thread dropped a warm-up")))
    }

    /// Sends up to `count` bytes of the drive at `offset_bytes` to `socket` on a thread of
    /// the file's drive: what sendfile(2) returned (a full socket is `WouldBlock`). The caller
    /// hints the range for read-ahead first, so its reads are queued at once.
    pub async fn sendfile(
        &self,
        socket: OwnedFd,
        handle: &Arc<FileHandle>,
        offset_bytes: u64,
        count: usize,
    ) -> io::Result<usize> {
        let drive = handle.drive_number();
        let pool = self.pools[usize::from(drive)].get_or_init(|| {
            Pool::start(drive, self.config.threads_per_drive)
                .map_err(|error| {
                    tracing::error!(drive, %error, "cannot start the cold-read threads; cold ranges go out inline");
                })
                .ok()
        });
        let Some(pool) = pool else {
            return inline_sendfile(&socket, handle, offset_bytes, count);
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let handle = Arc::clone(handle);
        let job: Job = Box::new(move || {
            let _ = reply.send(inline_sendfile(&socket, &handle, offset_bytes, count));
        });
        self.counts.pool_sends.inc();
        let _in_flight = InFlight::count(&self.counts.pool_jobs);
        match pool.jobs.send(job) {
            Ok(()) => answer
                .await
                .unwrap_or_else(|_| Err(io::Error::other("a cold-read thread dropped its job"))),
            Err(_) => Err(io::Error::other("the cold-read threads are gone")),
        }
    }
}

/// Counts a job for as long as its caller waits for it (dropped callers included).
struct InFlight<'a>(&'a Gauge);

impl<'a> InFlight<'a> {
    fn count(gauge: &'a Gauge) -> InFlight<'a> {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn inline_sendfile(
    socket: &OwnedFd,
    handle: &FileHandle,
    offset_bytes: u64,
    count: usize,
) -> io::Result<usize> {
    let source = handle
        .serve_fd()
        .ok_or_else(|| io::Error::other("the drive has no descriptor to send from"))?;
    let mut offset = offset_bytes;
    zerocopy::sendfile(socket.as_fd(), source, &mut offset, count)
}
