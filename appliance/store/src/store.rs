//! The store as its users see it: open drives, place and write files, look them up for
//! serving, delete them, and keep checkpoints and free space up to date.

use crate::drive::{location_drive, lock, DriveRt, DriveStatus, OFFSET_MASK};
use crate::error::StoreError;
use crate::index::{tag_of, Index};
use crate::layout::{Deletion, Replaced, PATH_BYTES_MAX};
use crate::log::{commit, write_checkpoint, Mutation};
use crate::reader::FileHandle;
use crate::recovery::open_drive;
use crate::writer::FileWriter;
use appliance_device::Drive;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// Free segments each drive keeps for its log and for relocation; data writers cannot take
/// them.
pub(crate) const LOG_RESERVE_SEGMENTS: usize = 2;
/// Free segments each drive keeps for relocation, on top of the log's: new files cannot take
/// them, so reclaim can always make progress on a full drive.
pub(crate) const RELOCATION_RESERVE_SEGMENTS: usize = 2;
/// Free segments relocation leaves alone: one, for the log records of what it moves. A pass
/// only takes victims whose live bytes fit in what is above this (see `reclaim.rs`), so it
/// always frees more than it uses and a full drive cannot wedge itself.
pub(crate) const RELOCATION_KEEPS_FREE_SEGMENTS: usize = 1;
/// Free segments new files leave alone.
pub(crate) const NEW_FILE_RESERVE_SEGMENTS: usize =
    LOG_RESERVE_SEGMENTS + RELOCATION_RESERVE_SEGMENTS;

/// Settings of a running store; every limit is explicit.
#[derive(Clone)]
pub struct StoreConfig {
    /// Bytes of each writer's aligned append buffer (a multiple of 4 KiB).
    pub write_buffer_bytes: usize,
    /// Appends each writer keeps in flight before waiting for the oldest.
    pub writes_in_flight_max: usize,
    /// Data writes (full write buffers) in flight on one drive at once, shared by all of its
    /// writers (the fill, reclaim, imports), so that serving's reads never queue behind a burst
    /// of them. A writer waits for a slot at most `write_buffer_wait_ms`, and only while it has
    /// no write of its own in flight. Log and checkpoint writes are exempt. Default 4.
    pub writes_in_flight_per_drive_max: usize,
    /// Write buffers shared by all writers, allocated at start-up.
    pub write_buffer_count: usize,
    /// How long a writer waits for a free write buffer before a retryable error.
    pub write_buffer_wait_ms: u64,
    /// A checkpoint is due once this many log bytes were written since the last one.
    pub checkpoint_interval_log_bytes: u64,
    /// How long a write or delete waits for reclaim to finish moving its path before it
    /// fails with `PathBusy` (moving one file takes milliseconds).
    pub relocation_wait_ms: u64,
    /// Reclaim runs when a drive has fewer free segments than this.
    pub reclaim_free_segments_min: usize,
    /// A sealed segment whose live share is below this percentage may be reclaimed.
    pub reclaim_live_percent_max: u64,
    /// UUIDs of drives marked failed earlier; they are not used.
    pub failed_drive_uuids: Vec<[u8; 16]>,
    /// The clock for publish times (seconds since the Unix epoch).
    pub clock: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// Called once when a drive is taken out of service: its UUID and the reason.
    pub on_drive_failed: crate::DriveFailureHook,
    /// Test-only: called at the points where a reclaim pass may be overtaken by other work
    /// (between files, after a claim, between copied chunks) and where a scrub may be (between
    /// its check and its claim), so that the tests can run other actors there. `None` in the
    /// daemon.
    pub interleave: Option<InterleaveHook>,
}

/// Called with the name of the point a reclaim pass or a scrub reached; see
/// `StoreConfig::interleave`.
pub type InterleaveHook = Arc<dyn Fn(&'static str) + Send + Sync>;

impl Default for StoreConfig {
    fn default() -> StoreConfig {
        StoreConfig {
            write_buffer_bytes: 1 << 20,
            writes_in_flight_max: 4,
            writes_in_flight_per_drive_max: 4,
            write_buffer_count: 64,
            write_buffer_wait_ms: 30_000,
            relocation_wait_ms: 10_000,
            checkpoint_interval_log_bytes: 64 << 20,
            reclaim_free_segments_min: 8,
            reclaim_live_percent_max: 50,
            failed_drive_uuids: Vec::new(),
            clock: Arc::new(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|elapsed| elapsed.as_secs())
                    .unwrap_or(0)
            }),
            on_drive_failed: Arc::new(|_, _| {}),
            interleave: None,
        }
    }
}

/// A configured drive: opened, or the reason it could not be.
pub enum DriveSource {
    Opened(Arc<dyn Drive>),
    Unavailable { path: PathBuf, reason: String },
}

/// One configured drive slot.
pub(crate) enum DriveSlot {
    Ready(Arc<DriveRt>),
    Failed {
        path: PathBuf,
        uuid: Option<[u8; 16]>,
        reason: String,
    },
}

pub(crate) struct Inner {
    pub config: StoreConfig,
    pub index: Index,
    pub drives: Vec<DriveSlot>,
    /// Paths being written, deleted or relocated right now; true for relocation's claims.
    pub busy: Mutex<HashMap<String, bool>>,
    /// Signalled when a relocation gives a path back.
    pub released: std::sync::Condvar,
    pub files_max: u64,
    pub buffers: crate::buffers::BufferPool,
    /// Files taken out because reclaim or the scrubber found their bytes did not match their
    /// checksums.
    pub corrupt_files_removed: std::sync::atomic::AtomicU64,
    /// Files reclaim moved since start.
    pub relocated_files: std::sync::atomic::AtomicU64,
}

/// The segment store over a set of drives.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

/// A published file as listings show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredFile {
    pub path: String,
    pub size_bytes: u64,
    pub sha256: [u8; 32],
    pub published_unix_s: u64,
}

/// Figures for status displays and benchmarks.
#[derive(Clone, Debug)]
pub struct StoreStats {
    pub files: u64,
    pub index_memory_bytes: u64,
    /// Files reclaim or the scrubber took out since start because their bytes failed their
    /// checksums.
    pub corrupt_files_removed: u64,
    /// Files reclaim moved since start.
    pub relocated_files: u64,
    pub drives: Vec<DriveStats>,
}

/// Figures of one drive.
#[derive(Clone, Debug)]
pub struct DriveStats {
    pub path: PathBuf,
    pub model: Option<String>,
    pub serial: Option<String>,
    pub uuid: Option<[u8; 16]>,
    pub status: DriveStatus,
    pub size_bytes: u64,
    pub segment_bytes: u64,
    pub segment_count: u32,
    pub free_segments: u64,
    pub live_bytes: u64,
    pub files: u64,
    pub recovery_ms: u64,
    /// Bytes read and written through the drive's ring since start.
    pub bytes_read: u64,
    pub bytes_written: u64,
}

impl Store {
    /// Opens every drive (recovering each) and builds the index. A drive that cannot be opened
    /// or recovered is reported failed; the others serve.
    pub fn open(sources: Vec<DriveSource>, config: StoreConfig) -> Store {
        assert!(sources.len() < 255, "at most 254 drives");
        let files_max: u64 = sources
            .iter()
            .filter_map(|source| match source {
                DriveSource::Opened(drive) => peek_files_max(&**drive),
                DriveSource::Unavailable { .. } => None,
            })
            .sum();
        let index = Index::with_capacity(files_max);
        let mut drives = Vec::with_capacity(sources.len());
        for (number, source) in sources.into_iter().enumerate() {
            let number = u8::try_from(number).expect("checked above");
            drives.push(open_slot(number, source, &index, &config));
        }
        let buffers =
            crate::buffers::BufferPool::new(config.write_buffer_count, config.write_buffer_bytes);
        let store = Store {
            inner: Arc::new(Inner {
                buffers,
                config,
                index,
                drives,
                busy: Mutex::new(HashMap::new()),
                released: std::sync::Condvar::new(),
                files_max,
                corrupt_files_removed: Default::default(),
                relocated_files: Default::default(),
            }),
        };
        store.resolve_duplicates();
        store
    }

    /// Keeps only the newest version of a path found on several drives (a drive whose failure
    /// was not recorded comes back with versions that were since written elsewhere).
    fn resolve_duplicates(&self) {
        if self.inner.ready_drives().count() < 2 {
            return;
        }
        let mut entries = Vec::new();
        self.inner
            .index
            .for_each(|tag, location| entries.push((tag, location)));
        entries.sort_unstable();
        let mut versions: Vec<(u64, u8, u64, Arc<DriveRt>, crate::layout::FileMeta)> = Vec::new();
        for pair in entries.windows(2) {
            if pair[0].0 != pair[1].0 {
                continue;
            }
            for (tag, location) in [pair[0], pair[1]] {
                let number = location_drive(location);
                let Some(rt) = self.inner.drive_rt(number) else {
                    continue;
                };
                let offset = location & OFFSET_MASK;
                if versions
                    .iter()
                    .any(|(t, n, o, _, _)| (*t, *n, *o) == (tag, number, offset))
                {
                    continue;
                }
                if let Ok(meta) = rt.read_meta(offset) {
                    versions.push((tag, number, offset, Arc::clone(rt), meta));
                }
            }
        }
        versions.sort_by(|a, b| {
            (
                &a.4.path,
                std::cmp::Reverse((a.4.published_unix_s, a.1, a.2)),
            )
                .cmp(&(
                    &b.4.path,
                    std::cmp::Reverse((b.4.published_unix_s, b.1, b.2)),
                ))
        });
        for pair in versions.windows(2) {
            let (newer, older) = (&pair[0], &pair[1]);
            if newer.4.path != older.4.path {
                continue;
            }
            let (tag, _, offset, rt, meta) = older;
            tracing::warn!(path = %meta.path, drive = %rt.path().display(), "dropping an older duplicate");
            let deletion = Deletion {
                path: meta.path.clone(),
                retired: Replaced {
                    meta_offset_bytes: *offset,
                    segments: meta.segment_bytes(&rt.superblock),
                },
            };
            let _ = commit(
                &self.inner.index,
                rt,
                vec![Mutation::Delete {
                    tag: *tag,
                    deletion,
                }],
            );
        }
    }

    /// Starts writing a file at `path`, placed on one drive; `size_hint_bytes` steers placement.
    pub fn create(&self, path: &str, size_hint_bytes: u64) -> Result<FileWriter, StoreError> {
        self.create_keeping(path, size_hint_bytes, NEW_FILE_RESERVE_SEGMENTS)
    }

    /// Claims `path` for relocation when its live version is still the record at
    /// `meta_offset_bytes` on `rt`: returns a writer that may use the relocation reserve and
    /// replaces exactly that version, and a handle that pins the version's segments while its
    /// bytes are copied. `None` when the path is busy, gone, or was republished meanwhile.
    pub(crate) fn claim_for_relocation(
        &self,
        path: &str,
        rt: &Arc<DriveRt>,
        meta_offset_bytes: u64,
    ) -> Result<Option<(FileWriter, FileHandle)>, StoreError> {
        let Some(claim) = PathClaim::take_for_relocation(&self.inner, path) else {
            return Ok(None);
        };
        let Some(handle) = self.find(path)? else {
            return Ok(None);
        };
        if handle.drive_rt().number != rt.number || handle.meta_offset_bytes() != meta_offset_bytes
        {
            return Ok(None);
        }
        let writer = FileWriter::new(
            Arc::clone(&self.inner),
            Arc::clone(rt),
            claim,
            Some(handle.replaced()),
            RELOCATION_KEEPS_FREE_SEGMENTS,
        );
        Ok(Some((writer, handle)))
    }

    /// Takes out the version `handle` holds, whose bytes failed their checksums (`what`), so
    /// it stops being served and the next fill fetches it again: logged and counted in
    /// `StoreStats::corrupt_files_removed`. The caller holds the path's claim (relocation's
    /// writer, or the scrubber's) and made sure the version is still the live one.
    pub(crate) fn remove_corrupt_claimed(
        &self,
        handle: &FileHandle,
        what: &str,
    ) -> Result<(), StoreError> {
        let path = handle.path().to_string();
        tracing::error!(
            %path, drive = %handle.drive_path().display(), %what,
            "stored bytes fail their checksum; taking the file out"
        );
        let mutation = Mutation::Delete {
            tag: tag_of(&path),
            deletion: Deletion {
                path,
                retired: handle.replaced(),
            },
        };
        commit(&self.inner.index, handle.drive_rt(), vec![mutation])?;
        self.inner
            .corrupt_files_removed
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn create_keeping(
        &self,
        path: &str,
        size_hint_bytes: u64,
        reserve_segments: usize,
    ) -> Result<FileWriter, StoreError> {
        check_path(path)?;
        let claim = PathClaim::take(&self.inner, path)?;
        let existing = self.find(path)?;
        let rt = match &existing {
            Some(handle) => Arc::clone(handle.drive_rt()),
            None => self.place(path, size_hint_bytes)?,
        };
        let replaced = existing.map(|handle| handle.replaced());
        // Only writers of new files can add a file; a replacing writer (or relocation) cannot.
        if replaced.is_none() {
            let mut space = lock(&rt.space);
            if self.inner.index.len() >= self.inner.files_max
                || !space.reserve_new_file(rt.superblock.files_max)
            {
                return Err(StoreError::IndexFull);
            }
        }
        Ok(FileWriter::new(
            Arc::clone(&self.inner),
            rt,
            claim,
            replaced,
            reserve_segments,
        ))
    }

    /// Looks up a published file for reading; `None` when the store does not hold it.
    pub fn open_file(&self, path: &str) -> Result<Option<FileHandle>, StoreError> {
        if path.len() > PATH_BYTES_MAX {
            return Ok(None);
        }
        self.find(path)
    }

    fn find(&self, path: &str) -> Result<Option<FileHandle>, StoreError> {
        let tag = tag_of(path);
        for _ in 0..64 {
            let mut retry = false;
            let mut error = None;
            let found = self.inner.index.find(tag, |location| {
                match FileHandle::open(&self.inner, tag, location, Some(path)) {
                    Ok(Some(handle)) => Some(handle),
                    Ok(None) => None,
                    Err(OpenError::Moved) => {
                        retry = true;
                        None
                    }
                    Err(OpenError::Store(failure)) => {
                        error = Some(failure);
                        None
                    }
                }
            });
            if found.is_some() {
                return Ok(found);
            }
            if let Some(error) = error {
                return Err(error);
            }
            if !retry {
                return Ok(None);
            }
        }
        // The path was republished under the lookup 64 times in a row: transient, not broken.
        Err(StoreError::PathBusy(path.to_string()))
    }

    /// Deletes a file: invisible at once, durable when this returns; false when absent.
    pub fn delete(&self, path: &str) -> Result<bool, StoreError> {
        check_path(path)?;
        let _claim = PathClaim::take(&self.inner, path)?;
        let Some(handle) = self.find(path)? else {
            return Ok(false);
        };
        let rt = Arc::clone(handle.drive_rt());
        let Replaced {
            meta_offset_bytes,
            segments,
        } = handle.replaced();
        drop(handle);
        let deletion = Deletion {
            path: path.to_string(),
            retired: Replaced {
                meta_offset_bytes,
                segments,
            },
        };
        let mutation = Mutation::Delete {
            tag: tag_of(path),
            deletion,
        };
        commit(&self.inner.index, &rt, vec![mutation])?;
        Ok(true)
    }

    /// Number of published files.
    pub fn file_count(&self) -> u64 {
        self.inner.index.len()
    }

    /// Every published file with its size, checksum and publish time (reads each record).
    pub fn list_files(&self) -> Result<Vec<StoredFile>, StoreError> {
        let mut files = Vec::new();
        self.for_each_meta(|meta| {
            files.push(StoredFile {
                path: meta.path.clone(),
                size_bytes: meta.size_bytes,
                sha256: meta.sha256,
                published_unix_s: meta.published_unix_s,
            })
        })?;
        Ok(files)
    }

    /// True when every drive in service answers a small read through its ring (the watchdog's
    /// liveness probe: a wedged ring thread never answers).
    pub fn drives_alive(&self) -> bool {
        self.inner.ready_drives().all(|rt| {
            let probe = appliance_device::AlignedBuf::new(4096);
            appliance_device::read_exact_at(&*rt.drive, 0, probe).is_ok() || rt.is_failed()
        })
    }

    /// Bytes new files can still take, over every healthy drive.
    pub fn free_bytes(&self) -> u64 {
        self.inner
            .ready_drives()
            .map(|rt| rt.free_bytes(NEW_FILE_RESERVE_SEGMENTS))
            .sum()
    }

    /// Calls `visit` with the path and size of every published file (reads each record).
    pub fn for_each_file(&self, mut visit: impl FnMut(&str, u64)) -> Result<(), StoreError> {
        self.for_each_meta(|meta| visit(&meta.path, meta.size_bytes))
    }

    fn for_each_meta(
        &self,
        mut visit: impl FnMut(&crate::layout::FileMeta),
    ) -> Result<(), StoreError> {
        let mut locations = Vec::new();
        self.inner
            .index
            .for_each(|_, location| locations.push(location));
        for location in locations {
            let Some(rt) = self.inner.drive_rt(location_drive(location)) else {
                continue;
            };
            if rt.is_failed() {
                continue;
            }
            match rt.read_meta(location & OFFSET_MASK) {
                Ok(meta) => visit(&meta),
                Err(error @ StoreError::Io { .. }) => {
                    return Err(fail_drive(&self.inner.index, rt, error))
                }
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Writes a checkpoint on every healthy drive (at a clean stop, and when due).
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        for rt in self.inner.ready_drives() {
            write_checkpoint(&self.inner.index, rt)?;
        }
        Ok(())
    }

    /// Periodic upkeep: checkpoints that are due, reclaim where free space runs low, reuse of
    /// segments whose readers have left. Returns how many segments were freed.
    pub fn maintain(&self) -> Result<u64, StoreError> {
        let mut freed = 0;
        for rt in self.inner.ready_drives() {
            let due = lock(&rt.log).bytes_since_checkpoint
                >= self.inner.config.checkpoint_interval_log_bytes;
            if due {
                write_checkpoint(&self.inner.index, rt)?;
            }
            freed += crate::reclaim::reclaim_drive(&self.inner, rt)?;
        }
        Ok(freed)
    }

    /// Reclaims on every drive now, whatever the free space (operators and tests).
    pub fn reclaim_now(&self) -> Result<u64, StoreError> {
        let mut freed = 0;
        for rt in self.inner.ready_drives() {
            freed += crate::reclaim::reclaim_drive_forced(&self.inner, rt)?;
        }
        Ok(freed)
    }

    /// Figures for status displays.
    pub fn stats(&self) -> StoreStats {
        let drives = self
            .inner
            .drives
            .iter()
            .map(|slot| match slot {
                DriveSlot::Ready(rt) => {
                    let space = lock(&rt.space);
                    let superblock = &rt.superblock;
                    let live_bytes = space.data_live_bytes();
                    DriveStats {
                        path: rt.path(),
                        model: rt.drive.info().model.clone(),
                        serial: rt.drive.info().serial.clone(),
                        uuid: Some(superblock.drive_uuid),
                        status: rt.status(),
                        size_bytes: rt.drive.info().size_bytes,
                        segment_bytes: superblock.segment_bytes,
                        segment_count: superblock.segment_count,
                        free_segments: space.free_count() as u64,
                        live_bytes,
                        files: if rt.is_failed() { 0 } else { space.files() },
                        recovery_ms: rt.recovery_ms,
                        bytes_read: rt.drive.io_bytes().0,
                        bytes_written: rt.drive.io_bytes().1,
                    }
                }
                DriveSlot::Failed { path, uuid, reason } => DriveStats {
                    path: path.clone(),
                    model: None,
                    serial: None,
                    uuid: *uuid,
                    status: DriveStatus::Failed(reason.clone()),
                    size_bytes: 0,
                    segment_bytes: 0,
                    segment_count: 0,
                    free_segments: 0,
                    live_bytes: 0,
                    files: 0,
                    recovery_ms: 0,
                    bytes_read: 0,
                    bytes_written: 0,
                },
            })
            .collect();
        StoreStats {
            files: self.inner.index.len(),
            index_memory_bytes: self.inner.index.memory_bytes(),
            corrupt_files_removed: self.inner.corrupt_files_removed.load(Ordering::Relaxed),
            relocated_files: self.inner.relocated_files.load(Ordering::Relaxed),
            drives,
        }
    }

    /// Chooses a drive for a new file: rendezvous hashing weighted by free space, so a file's
    /// drive is stable while the drive set is, and a lost drive loses only its own files.
    fn place(&self, path: &str, size_hint_bytes: u64) -> Result<Arc<DriveRt>, StoreError> {
        let mut best: Option<(f64, &Arc<DriveRt>)> = None;
        let mut any_healthy = false;
        for rt in self.inner.ready_drives() {
            any_healthy = true;
            let free = rt.free_bytes(NEW_FILE_RESERVE_SEGMENTS);
            if free < size_hint_bytes.max(1) {
                continue;
            }
            let mut key = path.as_bytes().to_vec();
            key.extend_from_slice(&rt.superblock.drive_uuid);
            let hash = xxhash_rust::xxh3::xxh3_64(&key);
            let unit = (hash >> 11) as f64 / (1u64 << 53) as f64;
            let score = free as f64 / -(unit.max(f64::MIN_POSITIVE)).ln();
            if best.is_none_or(|(top, _)| score > top) {
                best = Some((score, rt));
            }
        }
        match best {
            Some((_, rt)) => Ok(Arc::clone(rt)),
            None if any_healthy => Err(StoreError::AllDrivesFull),
            None => Err(StoreError::NoDrive),
        }
    }
}

impl Inner {
    /// Lets the simulation run other work here (test-only hook; a no-op in the daemon).
    pub(crate) fn interleave(&self, point: &'static str) {
        if let Some(hook) = &self.config.interleave {
            hook(point);
        }
    }

    pub(crate) fn drive_rt(&self, number: u8) -> Option<&Arc<DriveRt>> {
        match self.drives.get(usize::from(number))? {
            DriveSlot::Ready(rt) => Some(rt),
            DriveSlot::Failed { .. } => None,
        }
    }

    pub(crate) fn ready_drives(&self) -> impl Iterator<Item = &Arc<DriveRt>> {
        self.drives.iter().filter_map(|slot| match slot {
            DriveSlot::Ready(rt) if !rt.is_failed() => Some(rt),
            _ => None,
        })
    }
}

pub(crate) enum OpenError {
    /// The entry moved while being opened: look it up again.
    Moved,
    Store(StoreError),
}

/// Takes a drive out of service after an I/O error: its files leave the index at once and the
/// failure is reported once. Returns the error for the caller to pass on.
pub(crate) fn fail_drive(index: &Index, rt: &DriveRt, error: StoreError) -> StoreError {
    let reason = error.to_string();
    let first = !rt.failed.swap(true, Ordering::SeqCst);
    if first {
        *lock(&rt.failure) = Some(reason.clone());
        index.remove_where(|location| location_drive(location) == rt.number);
        (rt.on_failed)(rt.superblock.drive_uuid, &reason);
    }
    error
}

fn open_slot(number: u8, source: DriveSource, index: &Index, config: &StoreConfig) -> DriveSlot {
    let drive = match source {
        DriveSource::Opened(drive) => drive,
        DriveSource::Unavailable { path, reason } => {
            return DriveSlot::Failed {
                path,
                uuid: None,
                reason,
            }
        }
    };
    let path = drive.info().path.clone();
    let uuid = peek_uuid(&*drive);
    if let Some(uuid) = uuid {
        if config.failed_drive_uuids.contains(&uuid) {
            return DriveSlot::Failed {
                path,
                uuid: Some(uuid),
                reason: "marked failed earlier (reformat the drive to reuse it)".into(),
            };
        }
    }
    let write_slots = crate::buffers::write_slots(config.writes_in_flight_per_drive_max);
    match open_drive(
        number,
        drive,
        index,
        write_slots,
        Arc::clone(&config.on_drive_failed),
    ) {
        Ok(rt) => DriveSlot::Ready(Arc::new(rt)),
        Err(reason) => {
            tracing::error!(drive = %path.display(), %reason, "data drive not opened");
            DriveSlot::Failed { path, uuid, reason }
        }
    }
}

fn peek_superblock(drive: &dyn Drive) -> Option<crate::layout::Superblock> {
    let bytes =
        appliance_device::read_exact_at(drive, 0, appliance_device::AlignedBuf::new(8192)).ok()?;
    crate::layout::Superblock::decode(&bytes[..4096])
        .or_else(|_| crate::layout::Superblock::decode(&bytes[4096..]))
        .ok()
}

fn peek_uuid(drive: &dyn Drive) -> Option<[u8; 16]> {
    peek_superblock(drive).map(|superblock| superblock.drive_uuid)
}

fn peek_files_max(drive: &dyn Drive) -> Option<u64> {
    peek_superblock(drive).map(|superblock| superblock.files_max)
}

/// Checks a content path: absolute, at most 1 KiB, no NUL.
fn check_path(path: &str) -> Result<(), StoreError> {
    if !path.starts_with('/') {
        return Err(StoreError::InvalidPath(format!(
            "{path:?} does not start with '/'"
        )));
    }
    if path.len() > PATH_BYTES_MAX {
        return Err(StoreError::InvalidPath(format!(
            "path of {} bytes exceeds {PATH_BYTES_MAX}",
            path.len()
        )));
    }
    if path.contains('\0') {
        return Err(StoreError::InvalidPath("path contains NUL".into()));
    }
    Ok(())
}

/// Exclusive use of a path by one writer or delete; released on drop.
pub(crate) struct PathClaim {
    inner: Arc<Inner>,
    pub path: String,
}

impl PathClaim {
    /// Claims `path` for a writer or a delete; waits (bounded) while reclaim moves it, and
    /// fails with `PathBusy` at once when another writer or delete holds it.
    pub(crate) fn take(inner: &Arc<Inner>, path: &str) -> Result<PathClaim, StoreError> {
        let wait = std::time::Duration::from_millis(inner.config.relocation_wait_ms);
        let deadline = std::time::Instant::now() + wait;
        let mut busy = lock(&inner.busy);
        loop {
            match busy.get(path) {
                None => break,
                Some(true) => {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return Err(StoreError::PathBusy(path.to_string()));
                    }
                    busy = inner
                        .released
                        .wait_timeout(busy, left)
                        .unwrap_or_else(|poison| poison.into_inner())
                        .0;
                }
                Some(false) => return Err(StoreError::PathBusy(path.to_string())),
            }
        }
        busy.insert(path.to_string(), false);
        Ok(PathClaim {
            inner: Arc::clone(inner),
            path: path.to_string(),
        })
    }

    /// Claims `path` for relocation, which never waits: a busy path is skipped this pass.
    fn take_for_relocation(inner: &Arc<Inner>, path: &str) -> Option<PathClaim> {
        let mut busy = lock(&inner.busy);
        if busy.contains_key(path) {
            return None;
        }
        busy.insert(path.to_string(), true);
        Some(PathClaim {
            inner: Arc::clone(inner),
            path: path.to_string(),
        })
    }
}

impl Drop for PathClaim {
    fn drop(&mut self) {
        if lock(&self.inner.busy).remove(&self.path) == Some(true) {
            self.inner.released.notify_all();
        }
    }
}
