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
//! A third design, `direct`, reads a cold piece straight from the drive (direct I/O through
//! the drive's ring, on a thread of its pool) into an aligned buffer, keeps it in a RAM cache
//! of recent reads, and has the worker send it from there: a copy into the socket, where
//! sendfile copies nothing. The cache is keyed by version (the file's SHA-256, its publication
//! time, the offset in the file), never by where the bytes lie on the drive, so a reclaimed
//! and rewritten segment can never be answered from a stale entry, nor a version refilled
//! after the scrubber removed it from bytes read off the rotted one.
//!
//! A job owns everything it touches: a duplicate of the socket descriptor and the file
//! handle (whose pins keep the segments from being reused while the thread reads them), so a
//! connection that goes away while its job waits can never make a thread send the wrong bytes
//! or to the wrong socket.

use appliance_device::warm::{WarmRequest, Warmer};
use appliance_device::zerocopy;
use appliance_device::AlignedBuf;
use appliance_store::FileHandle;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
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
    /// A cold piece is read by direct I/O on a thread of its drive's pool into a buffer kept
    /// in a RAM cache, and sent from that buffer.
    Direct,
}

/// The cold-read settings.
#[derive(Clone, Copy, Debug)]
pub struct ColdConfig {
    pub mode: ColdRead,
    /// Threads per drive for cold sendfiles (or direct reads).
    pub threads_per_drive: usize,
    /// RAM for recent direct reads (`Direct` only); 0 keeps none.
    pub direct_cache_bytes: u64,
}

impl Default for ColdConfig {
    fn default() -> ColdConfig {
        ColdConfig {
            mode: ColdRead::Pool,
            threads_per_drive: 16,
            direct_cache_bytes: 64 << 20,
        }
    }
}

/// The most bytes of direct reads being read or sent at once, besides the cache: the buffers
/// are the process's own memory, not page cache the kernel can take back, so they are
/// bounded like the write buffers. A piece sent from the cache takes its share too, since the
/// cache may evict its buffer while a slow client still holds it. A read waits (without
/// blocking the worker) for room.
const DIRECT_IN_FLIGHT_BYTES_MAX: u64 = 64 << 20;
/// The unit of that budget.
const DIRECT_BUDGET_UNIT_BYTES: u64 = 64 << 10;

/// A direct read being sent: its bytes, and its share of the in-flight budget (returned when
/// this is dropped).
pub struct DirectPiece {
    pub bytes: DirectBytes,
    /// The time the read spent on the drive (queued for a thread of the drive's pool and read
    /// there); not the wait for the in-flight budget, which other clients' sends hold.
    pub drive_time: std::time::Duration,
    _budget: tokio::sync::OwnedSemaphorePermit,
}

/// Bytes read from a drive by direct I/O: a shared aligned buffer and the part asked for.
#[derive(Clone)]
pub struct DirectBytes {
    buf: Arc<AlignedBuf>,
    start: usize,
    len: usize,
}

impl DirectBytes {
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

/// A version's bytes: its SHA-256 and publication time, the offset in the file, the length.
/// The publication time tells a version refilled after the scrubber removed it (bytes read
/// before from a rotted sector must never answer for it) from the one it replaces.
type CacheKey = ([u8; 32], u64, u64, u64);

/// Recent direct reads under a byte budget; the least recently used go first. Every call is
/// O(log n) in the entries held: `order` keeps them by their last use.
struct DirectCache {
    bytes_max: u64,
    inner: Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    /// Each entry with the tick of its last use, the key of `order`.
    entries: HashMap<CacheKey, (DirectBytes, u64)>,
    order: BTreeMap<u64, CacheKey>,
    bytes: u64,
    clock: u64,
}

impl CacheInner {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }
}

impl DirectCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn get(&self, key: &CacheKey) -> Option<DirectBytes> {
        let mut guard = self.lock();
        let clock = guard.tick();
        let inner = &mut *guard;
        let (bytes, used) = inner.entries.get_mut(key)?;
        inner.order.remove(used);
        inner.order.insert(clock, *key);
        *used = clock;
        Some(bytes.clone())
    }

    fn insert(&self, key: CacheKey, bytes: DirectBytes) {
        let size = bytes.buf.len() as u64;
        if size > self.bytes_max {
            return;
        }
        let mut inner = self.lock();
        if inner.entries.contains_key(&key) {
            return;
        }
        while inner.bytes + size > self.bytes_max {
            let Some((_, oldest)) = inner.order.pop_first() else {
                break;
            };
            if let Some((gone, _)) = inner.entries.remove(&oldest) {
                inner.bytes -= gone.buf.len() as u64;
            }
        }
        let clock = inner.tick();
        inner.bytes += size;
        inner.order.insert(clock, key);
        inner.entries.insert(key, (bytes, clock));
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// One drive's threads, taking jobs from one queue. The queue is crossbeam's MPMC channel, so
/// an idle thread waits on the queue itself: a job wakes one thread, where a std receiver
/// shared behind a mutex wakes the holder and then a waiter for the mutex (two wake-ups and
/// thread switches per cold piece, measured in the profile of BENCHMARKS.md).
struct Pool {
    jobs: crossbeam_channel::Sender<Job>,
}

impl Pool {
    fn start(drive_number: u8, threads: usize) -> io::Result<Pool> {
        let (sender, receiver) = crossbeam_channel::unbounded::<Job>();
        for thread in 0..threads.max(1) {
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name(format!("cold-{drive_number}-{thread}"))
                .spawn(move || {
                    for job in receiver {
                        job();
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
    /// Cold pieces answered from the direct-read cache (`direct` only).
    pub direct_cache_hits: Counter,
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
        registry.register(
            "direct_cache_hits",
            "Cold pieces sent from the RAM cache of direct reads (cold_read = direct)",
            self.direct_cache_hits.clone(),
        );
    }
}

/// The pools of every drive, started on a drive's first cold range.
pub struct ColdReads {
    config: ColdConfig,
    pools: Box<[OnceLock<Option<Pool>>]>,
    warmers: Box<[OnceLock<Option<Warmer>>]>,
    cache: DirectCache,
    direct_budget: Arc<tokio::sync::Semaphore>,
    pub counts: ColdCounts,
}

/// What a worker should do with the next piece of a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Inline,
    Pool,
    Warm,
    Direct,
}

impl ColdReads {
    pub fn new(config: ColdConfig) -> ColdReads {
        if config.mode == ColdRead::Direct {
            // Direct reads allocate a buffer per cold piece on the pool's threads and free it
            // on a worker: without this, the freed buffers pile up in malloc's arenas.
            appliance_device::return_large_frees_to_the_system();
        }
        ColdReads {
            config,
            pools: (0..=u8::MAX).map(|_| OnceLock::new()).collect(),
            warmers: (0..=u8::MAX).map(|_| OnceLock::new()).collect(),
            cache: DirectCache {
                bytes_max: config.direct_cache_bytes,
                inner: Mutex::new(CacheInner::default()),
            },
            direct_budget: Arc::new(tokio::sync::Semaphore::new(
                (DIRECT_IN_FLIGHT_BYTES_MAX / DIRECT_BUDGET_UNIT_BYTES) as usize,
            )),
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
                ColdRead::Direct => Route::Direct,
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
        let in_flight = InFlight::count(&self.counts.pool_jobs);
        let (reply, answer) = tokio::sync::oneshot::channel();
        // The handle's pins keep the segments from reuse until the reads are done.
        let handle = Arc::clone(handle);
        warmer.warm(WarmRequest {
            fd,
            offset_bytes,
            length_bytes,
            done: Box::new(move |outcome| {
                drop(handle);
                drop(in_flight);
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
        let handle = Arc::clone(handle);
        self.on_pool(handle.drive_number(), move || {
            inline_sendfile(&socket, &handle, offset_bytes, count)
        })
        .await
    }

    /// The device bytes `offset_bytes..+length_bytes` of `handle`, which are file bytes from
    /// `file_offset`: from the cache of direct reads, else read by direct I/O on a thread of
    /// the drive's pool (and cached). The worker waits without blocking.
    pub async fn read_direct(
        &self,
        handle: &Arc<FileHandle>,
        file_offset: u64,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> io::Result<DirectPiece> {
        // Room for the aligned buffer (a block more on each side at most).
        let units = (length_bytes + 2 * appliance_device::BLOCK_BYTES)
            .div_ceil(DIRECT_BUDGET_UNIT_BYTES)
            .min(DIRECT_IN_FLIGHT_BYTES_MAX / DIRECT_BUDGET_UNIT_BYTES);
        let budget = Arc::clone(&self.direct_budget)
            .acquire_many_owned(units as u32)
            .await
            .map_err(|_| io::Error::other("the direct-read budget is closed"))?;
        let key = (
            handle.sha256(),
            handle.published_unix_s(),
            file_offset,
            length_bytes,
        );
        if let Some(bytes) = self.cache.get(&key) {
            self.counts.direct_cache_hits.inc();
            return Ok(DirectPiece {
                bytes,
                drive_time: std::time::Duration::ZERO,
                _budget: budget,
            });
        }
        let read = {
            let handle = Arc::clone(handle);
            move || -> io::Result<DirectBytes> {
                let (buf, start) = handle
                    .read_direct(offset_bytes, length_bytes)
                    .map_err(io::Error::other)?;
                let len = usize::try_from(length_bytes).expect("a piece fits in memory");
                Ok(DirectBytes {
                    buf: Arc::new(buf),
                    start,
                    len,
                })
            }
        };
        let began = std::time::Instant::now();
        let bytes = self.on_pool(handle.drive_number(), read).await?;
        let drive_time = began.elapsed();
        if self.cache.bytes_max > 0 {
            self.cache.insert(key, bytes.clone());
        }
        Ok(DirectPiece {
            bytes,
            drive_time,
            _budget: budget,
        })
    }

    /// Runs `work` on a thread of the drive's pool (inline when the pool cannot start) and
    /// waits for it without blocking; a job whose caller is gone is dropped unrun.
    async fn on_pool<T: Send + 'static>(
        &self,
        drive: u8,
        work: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let pool = self.pools[usize::from(drive)].get_or_init(|| {
            Pool::start(drive, self.config.threads_per_drive)
                .map_err(|error| {
                    tracing::error!(drive, %error, "cannot start the cold-read threads; cold ranges go out inline");
                })
                .ok()
        });
        let Some(pool) = pool else {
            return work();
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let in_flight = InFlight::count(&self.counts.pool_jobs);
        let job: Job = Box::new(move || {
            let _in_flight = in_flight;
            // A caller gone while its job was queued (a client cut, the connection closed):
            // its bytes are no longer wanted, and what the job holds (a duplicate of the
            // socket, the handle's pins) would otherwise live until the drive got to it.
            if reply.is_closed() {
                return;
            }
            let _ = reply.send(work());
        });
        self.counts.pool_sends.inc();
        match pool.jobs.send(job) {
            Ok(()) => answer
                .await
                .unwrap_or_else(|_| Err(io::Error::other("a cold-read thread dropped its job"))),
            Err(_) => Err(io::Error::other("the cold-read threads are gone")),
        }
    }
}

/// Counts a job from the moment it is queued until the thread is done with it (or drops it).
struct InFlight(Gauge);

impl InFlight {
    fn count(gauge: &Gauge) -> InFlight {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(size: usize) -> DirectBytes {
        DirectBytes {
            buf: Arc::new(AlignedBuf::new(size)),
            start: 0,
            len: size,
        }
    }

    fn key(number: u8) -> CacheKey {
        ([number; 32], 1_700_000_000, 0, 4096)
    }

    #[test]
    fn the_direct_cache_evicts_the_least_recently_used_within_its_budget() {
        let cache = DirectCache {
            bytes_max: 3 * 4096,
            inner: Mutex::new(CacheInner::default()),
        };
        for number in 1..=3 {
            cache.insert(key(number), piece(4096));
        }
        // 1 is used again, so 2 is now the oldest and goes first, then 3.
        assert!(cache.get(&key(1)).is_some());
        cache.insert(key(4), piece(4096));
        assert!(cache.get(&key(2)).is_none());
        cache.insert(key(5), piece(4096));
        assert!(cache.get(&key(3)).is_none());
        for number in [1, 4, 5] {
            assert!(
                cache.get(&key(number)).is_some(),
                "entry {number} was evicted"
            );
        }
        // A piece that needs two places evicts the two oldest; one over the budget is not kept.
        cache.insert(key(6), piece(2 * 4096));
        assert!(cache.get(&key(1)).is_none() && cache.get(&key(4)).is_none());
        assert!(cache.get(&key(5)).is_some() && cache.get(&key(6)).is_some());
        cache.insert(key(7), piece(4 * 4096));
        assert!(cache.get(&key(7)).is_none());
        let inner = cache.lock();
        assert_eq!(inner.bytes, 3 * 4096);
        assert_eq!(inner.entries.len(), inner.order.len());
    }
}
