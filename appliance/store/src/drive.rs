//! One opened data drive at run time: its geometry, segment table, log position, reader pins
//! and health. Other modules lock its parts in one order: commit queue, log, space, index.

use crate::error::StoreError;
use crate::layout::to_usize;
use crate::layout::{
    record_salt, DecodeError, FileMeta, LogPosition, RecordHeader, SegmentKind, SegmentRow,
    Superblock, RECORD_HEADER_BYTES,
};
use crate::log::CommitQueue;
use appliance_device::Drive;
use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Bytes of a file's record read at once for a lookup.
const META_READ_BYTES: usize = 1024;

/// Bits of a location that hold the device offset; the top byte holds the drive number.
pub(crate) const OFFSET_MASK: u64 = (1 << 56) - 1;

/// Packs a drive number and a device offset into an index location.
pub(crate) fn location(drive_number: u8, offset_bytes: u64) -> u64 {
    assert!(offset_bytes <= OFFSET_MASK && offset_bytes != 0);
    (u64::from(drive_number) << 56) | offset_bytes
}

/// The drive number of an index location.
pub(crate) fn location_drive(location: u64) -> u8 {
    u8::try_from(location >> 56).expect("top byte")
}

/// A data segment with room left, open for appends.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OpenSegment {
    pub segment: u32,
    /// Device offset of the next append (block-aligned).
    pub cursor_bytes: u64,
}

/// Segment allocation state of one drive: what each segment holds, how much of it is live,
/// and which lists it is on. Every change is one of the transitions below, each taken under
/// the drive's space lock.
pub(crate) struct Space {
    kinds: Vec<SegmentKind>,
    /// Data segments: live bytes. Log segments: live Publish records.
    live: Vec<u64>,
    /// Segments currently open for appends (pooled or owned by a writer).
    open: Vec<bool>,
    /// Free segments, oldest-freed first (spreads wear).
    free: VecDeque<u32>,
    /// Partly written data segments that writers may continue.
    pool: Vec<OpenSegment>,
    /// Segments with nothing live, waiting for their readers to leave before reuse.
    pending_free: Vec<u32>,
    /// Files published on this drive.
    files: u64,
    /// Writers of new files (not replacements) placed on this drive and not yet finished: each
    /// may add a file.
    writers: u64,
}

impl Space {
    /// The state a checkpoint recorded: one row per segment and its file count. Nothing is
    /// open, pooled or free until replay and `rebuild_free_list` have run.
    pub fn from_checkpoint(rows: &[SegmentRow], files: u64) -> Space {
        Space {
            kinds: rows.iter().map(|row| row.kind).collect(),
            live: rows.iter().map(|row| row.live).collect(),
            open: vec![false; rows.len()],
            free: VecDeque::new(),
            pool: Vec::new(),
            pending_free: Vec::new(),
            files,
            writers: 0,
        }
    }

    pub fn kind(&self, segment: u32) -> SegmentKind {
        self.kinds[segment as usize]
    }

    /// Live bytes of a data segment, live Publish records of a log segment.
    pub fn live(&self, segment: u32) -> u64 {
        self.live[segment as usize]
    }

    /// Whether a writer owns the segment or it waits in the pool for one.
    pub fn is_open(&self, segment: u32) -> bool {
        self.open[segment as usize]
    }

    /// Each segment's kind and live count, in segment order (a checkpoint's rows).
    pub fn rows(&self) -> impl Iterator<Item = SegmentRow> + '_ {
        self.kinds
            .iter()
            .zip(&self.live)
            .map(|(kind, live)| SegmentRow {
                kind: *kind,
                live: *live,
            })
    }

    /// Live bytes in data segments.
    pub fn data_live_bytes(&self) -> u64 {
        self.rows()
            .filter(|row| row.kind == SegmentKind::Data)
            .map(|row| row.live)
            .sum()
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// Partly written data segments waiting for a writer.
    pub fn pooled(&self) -> &[OpenSegment] {
        &self.pool
    }

    pub fn files(&self) -> u64 {
        self.files
    }

    /// Replay: a Link record names `segment` as where the log continued.
    pub fn mark_log(&mut self, segment: u32) {
        self.kinds[segment as usize] = SegmentKind::Log;
    }

    /// Applying a Publish: an extent of the file lies in `segment`, which is data from now on
    /// (in replay it may have been taken after the checkpoint was written).
    pub fn mark_data(&mut self, segment: u32) {
        if self.kinds[segment as usize] != SegmentKind::Data {
            self.kinds[segment as usize] = SegmentKind::Data;
            self.free.retain(|&free| free != segment);
        }
    }

    /// End of recovery: every segment that is free, data with nothing live, or log with
    /// nothing live outside `chain` goes on the free list.
    pub fn rebuild_free_list(&mut self, chain: &VecDeque<u32>) {
        for segment in 0..self.segment_count() {
            let at = segment as usize;
            let dead = self.live[at] == 0;
            let unused = match self.kinds[at] {
                SegmentKind::Free => true,
                SegmentKind::Data => dead,
                SegmentKind::Log => dead && !chain.contains(&segment),
            };
            if unused {
                self.kinds[at] = SegmentKind::Free;
                self.free.push_back(segment);
            }
        }
    }

    /// Takes a free segment for the log, down to the last one.
    pub fn allocate_log(&mut self) -> Option<u32> {
        self.allocate(SegmentKind::Log, 0)
    }

    /// Takes a free segment for a writer's data, keeping `reserve` free segments for the log;
    /// the segment is open until the writer seals it.
    pub fn open_new_data(&mut self, reserve: usize) -> Option<u32> {
        let segment = self.allocate(SegmentKind::Data, reserve)?;
        self.open[segment as usize] = true;
        Some(segment)
    }

    /// Takes a free segment for `kind`, keeping `reserve` free segments for the log.
    fn allocate(&mut self, kind: SegmentKind, reserve: usize) -> Option<u32> {
        if self.free.len() <= reserve {
            return None;
        }
        let segment = self.free.pop_front()?;
        assert_eq!(
            self.kinds[segment as usize],
            SegmentKind::Free,
            "segment {segment} on the free list is not free"
        );
        self.kinds[segment as usize] = kind;
        self.live[segment as usize] = 0;
        Some(segment)
    }

    /// Takes the pooled segment with the most room (`room_bytes` of each), for a writer.
    pub fn take_pooled(&mut self, room_bytes: impl Fn(&OpenSegment) -> u64) -> Option<OpenSegment> {
        let at = (0..self.pool.len()).max_by_key(|&at| room_bytes(&self.pool[at]))?;
        Some(self.pool.swap_remove(at))
    }

    /// A writer hands back a segment with room left; it stays open for the next writer.
    pub fn return_to_pool(&mut self, open: OpenSegment) {
        self.pool.push(open);
    }

    /// A writer is done with a full segment: no more appends, reclaim may choose it.
    pub fn seal(&mut self, segment: u32) {
        self.open[segment as usize] = false;
    }

    /// Adds `bytes` of live data to a data segment.
    pub fn add_live(&mut self, segment: u32, amount: u64) {
        self.live[segment as usize] += amount;
    }

    /// Removes live data or records; an underflow means the accounting is broken.
    pub fn remove_live(&mut self, segment: u32, amount: u64) -> Result<(), String> {
        let live = &mut self.live[segment as usize];
        *live = live
            .checked_sub(amount)
            .ok_or_else(|| format!("segment {segment} live count underflow"))?;
        Ok(())
    }

    /// Counts a writer of a new file unless files and such writers already reach
    /// `files_max`; false when there is no room for another file.
    pub fn reserve_new_file(&mut self, files_max: u64) -> bool {
        if self.files + self.writers >= files_max {
            return false;
        }
        self.writers += 1;
        true
    }

    /// A writer counted by `reserve_new_file` finished (published or not).
    pub fn release_new_file(&mut self) {
        self.writers -= 1;
    }

    pub fn file_added(&mut self) {
        self.files += 1;
    }

    pub fn file_removed(&mut self) {
        self.files -= 1;
    }

    pub fn is_queued_for_free(&self, segment: u32) -> bool {
        self.pending_free.contains(&segment)
    }

    /// Queues a segment with nothing live to be freed once no reader pins it.
    pub fn queue_for_free(&mut self, segment: u32) {
        if !self.pending_free.contains(&segment) {
            self.pending_free.push(segment);
        }
    }

    /// Frees the queued segments that are still dead and not `is_pinned`, calling
    /// `before_reuse` on each first (drop its cache, discard it); pinned ones stay queued.
    /// Returns how many were freed.
    pub fn free_queued(
        &mut self,
        is_pinned: impl Fn(u32) -> bool,
        mut before_reuse: impl FnMut(u32),
    ) -> u64 {
        let pending = std::mem::take(&mut self.pending_free);
        let mut freed = 0;
        for segment in pending {
            let at = segment as usize;
            if self.live[at] != 0 || self.kinds[at] == SegmentKind::Free {
                continue;
            }
            if is_pinned(segment) {
                self.pending_free.push(segment);
                continue;
            }
            before_reuse(segment);
            self.kinds[at] = SegmentKind::Free;
            self.free.push_back(segment);
            freed += 1;
        }
        freed
    }

    fn segment_count(&self) -> u32 {
        u32::try_from(self.kinds.len()).expect("segment count fits u32")
    }
}

/// Where the log stands and which checkpoints cover it.
pub(crate) struct LogState {
    /// The log segment being appended to.
    pub segment: u32,
    /// Device offset of the next append (block-aligned).
    pub cursor_bytes: u64,
    pub next_seq: u64,
    /// This run's epoch, carried by every record it writes.
    pub epoch: u32,
    /// Log segments from the older checkpoint's head to the current one, oldest first.
    pub chain: VecDeque<u32>,
    pub bytes_since_checkpoint: u64,
    /// Generation and slot of the newest checkpoint.
    pub generation: u64,
    pub slot: u64,
    pub newest_head: LogPosition,
}

/// Health of a drive as the status display shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DriveStatus {
    Ok,
    Failed(String),
}

/// One opened drive.
pub(crate) struct DriveRt {
    pub number: u8,
    pub drive: Arc<dyn Drive>,
    pub superblock: Superblock,
    pub salt: u32,
    pub failed: AtomicBool,
    pub failure: Mutex<Option<String>>,
    pub pins: Box<[AtomicU32]>,
    pub space: Mutex<Space>,
    pub log: Mutex<LogState>,
    pub queue: Mutex<CommitQueue>,
    pub committed: Condvar,
    /// Held for a whole reclaim pass: one pass per drive at a time, whoever starts it (the
    /// upkeep thread, the fill, an operator).
    pub reclaim: Mutex<()>,
    /// Record offsets whose index entries were dropped at run time because the record no
    /// longer reads back (see `quarantine`); a commit retiring one of them finds it here.
    pub quarantined: Mutex<std::collections::HashSet<u64>>,
    pub recovery_ms: u64,
    /// Data writes in flight on this drive, shared by all its writers
    /// (`StoreConfig::writes_in_flight_per_drive_max`).
    pub write_slots: crate::buffers::WriteSlots,
    /// Told once when this drive is taken out of service.
    pub on_failed: crate::DriveFailureHook,
}

/// Locks a mutex, ignoring poisoning: every structure stays consistent between statements
/// that could panic, the daemon aborts on any panic (its panic hook, and `panic = "abort"` in
/// release), and the one flag a panic could leave set (the commit leader's) is released by a
/// guard for callers that catch panics.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl DriveRt {
    pub fn path(&self) -> PathBuf {
        self.drive.info().path.clone()
    }

    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    pub fn status(&self) -> DriveStatus {
        match &*lock(&self.failure) {
            Some(reason) => DriveStatus::Failed(reason.clone()),
            None => DriveStatus::Ok,
        }
    }

    /// The error for an I/O failure on this drive.
    pub fn io_error(&self, operation: &'static str, source: io::Error) -> StoreError {
        StoreError::Io {
            drive: self.path(),
            operation,
            source,
        }
    }

    pub fn corrupt(&self, what: String) -> StoreError {
        StoreError::Corrupt {
            drive: self.path(),
            what,
        }
    }

    /// Counts a reader or writer on `segment`; the segment is not reused while counted.
    pub fn pin(&self, segment: u32) {
        self.pins[segment as usize].fetch_add(1, Ordering::SeqCst);
    }

    pub fn unpin(&self, segment: u32) {
        let before = self.pins[segment as usize].fetch_sub(1, Ordering::SeqCst);
        assert!(
            before > 0,
            "segment {segment} unpinned more often than pinned"
        );
    }

    pub fn is_pinned(&self, segment: u32) -> bool {
        self.pins[segment as usize].load(Ordering::SeqCst) > 0
    }

    /// Reads and checks the Publish record at `offset_bytes` through the page cache.
    pub fn read_meta(&self, offset_bytes: u64) -> Result<FileMeta, StoreError> {
        // One read usually covers header and payload (a file's record is a few hundred bytes);
        // it never reaches past the record's segment.
        let segment_end = self
            .superblock
            .segment_of(offset_bytes)
            .map(|segment| {
                self.superblock.segment_offset_bytes(segment) + self.superblock.segment_bytes
            })
            .ok_or_else(|| {
                self.corrupt(format!("record offset {offset_bytes} outside segments"))
            })?;
        let first_bytes = (segment_end - offset_bytes).min(META_READ_BYTES as u64);
        let mut first = [0u8; META_READ_BYTES];
        let first = &mut first[..to_usize(first_bytes)];
        self.drive
            .read_cached(offset_bytes, first)
            .map_err(|error| self.io_error("metadata read", error))?;
        let header = RecordHeader::decode(first, self.salt)
            .map_err(|error| self.meta_corrupt(offset_bytes, error))?;
        let payload_bytes = header.payload_bytes as usize;
        let have = first.len() - to_usize(RECORD_HEADER_BYTES);
        let mut payload = Vec::with_capacity(payload_bytes);
        payload
            .extend_from_slice(&first[to_usize(RECORD_HEADER_BYTES)..][..have.min(payload_bytes)]);
        if payload_bytes > have {
            let mut rest = vec![0u8; payload_bytes - have];
            self.drive
                .read_cached(offset_bytes + first_bytes, &mut rest)
                .map_err(|error| self.io_error("metadata read", error))?;
            payload.extend_from_slice(&rest);
        }
        header
            .check_payload(&payload)
            .map_err(|error| self.meta_corrupt(offset_bytes, error))?;
        FileMeta::decode(&payload).map_err(|error| self.meta_corrupt(offset_bytes, error))
    }

    /// Drops the index entry of a record that fails its checks, so lookups stop tripping on
    /// it; the file counts as gone until a restart finds the record again (and drops it again)
    /// or a writer that opened the version before the rot replaces it.
    pub fn quarantine(&self, index: &crate::index::Index, tag: u64, location: u64) {
        let mut space = lock(&self.space);
        if index.remove(tag, location) {
            space.file_removed();
            lock(&self.quarantined).insert(location & OFFSET_MASK);
        }
    }

    fn meta_corrupt(&self, offset_bytes: u64, error: DecodeError) -> StoreError {
        self.corrupt(format!("file record at offset {offset_bytes}: {error}"))
    }

    /// Free bytes this drive can still take: free segments plus room in open segments.
    pub fn free_bytes(&self, reserve: usize) -> u64 {
        self.free_bytes_in(&lock(&self.space), reserve)
    }

    /// `free_bytes` for a caller that already holds the space lock.
    pub fn free_bytes_in(&self, space: &Space, reserve: usize) -> u64 {
        let whole = space.free_count().saturating_sub(reserve) as u64;
        let segment_end = |open: &OpenSegment| {
            self.superblock.segment_offset_bytes(open.segment) + self.superblock.segment_bytes
        };
        let partial: u64 = space
            .pooled()
            .iter()
            .map(|open| segment_end(open) - open.cursor_bytes)
            .sum();
        whole * self.superblock.segment_bytes + partial
    }

    pub fn salt_for(superblock: &Superblock) -> u32 {
        record_salt(&superblock.drive_uuid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: SegmentKind, live: u64) -> SegmentRow {
        SegmentRow { kind, live }
    }

    /// Segments 0..4 as a checkpoint left them: free, data with 5 live bytes, the log (in the
    /// chain, nothing live), dead data; one file.
    fn recovered() -> Space {
        let rows = [
            row(SegmentKind::Free, 0),
            row(SegmentKind::Data, 5),
            row(SegmentKind::Log, 0),
            row(SegmentKind::Data, 0),
        ];
        let mut space = Space::from_checkpoint(&rows, 1);
        space.rebuild_free_list(&VecDeque::from([2]));
        space
    }

    #[test]
    fn recovery_frees_what_holds_nothing_outside_the_chain() {
        let space = recovered();
        let kinds: Vec<SegmentKind> = (0..4).map(|segment| space.kind(segment)).collect();
        use SegmentKind::{Data, Free, Log};
        assert_eq!(kinds, [Free, Data, Log, Free]);
        assert_eq!(space.free_count(), 2);
        assert_eq!(space.data_live_bytes(), 5);
    }

    #[test]
    fn allocation_keeps_the_reserve_and_takes_the_oldest_free() {
        let mut space = recovered();
        assert_eq!(space.open_new_data(1), Some(0));
        assert!(space.is_open(0));
        assert_eq!(space.kind(0), SegmentKind::Data);
        assert_eq!(
            space.open_new_data(1),
            None,
            "the last free segment is the log's"
        );
        assert_eq!(space.allocate_log(), Some(3));
        assert_eq!(space.allocate_log(), None);
        space.seal(0);
        assert!(!space.is_open(0));
        space.add_live(0, 10);
        assert!(space.remove_live(0, 11).is_err());
        assert_eq!(space.remove_live(0, 10), Ok(()));
    }

    #[test]
    fn a_queued_segment_is_freed_once_unpinned_and_dropped_first() {
        let mut space = recovered();
        space.queue_for_free(3);
        space.queue_for_free(3);
        let segment = space.open_new_data(0).expect("segment 0 is free");
        space.queue_for_free(segment);
        assert_eq!(space.free_queued(|_| true, |_| panic!("pinned")), 0);
        assert!(space.is_queued_for_free(segment));
        let mut dropped = Vec::new();
        let freed = space.free_queued(|_| false, |segment| dropped.push(segment));
        // Segment 3 was already free: it is dropped from the queue, not freed twice.
        assert_eq!((freed, dropped), (1, vec![segment]));
        assert_eq!(space.kind(segment), SegmentKind::Free);
        assert!(!space.is_queued_for_free(3));
        assert_eq!(space.free_count(), 2);
    }

    #[test]
    fn new_file_writers_count_against_files_max() {
        let mut space = recovered();
        assert!(space.reserve_new_file(2));
        assert!(
            !space.reserve_new_file(2),
            "one file and one writer fill two"
        );
        space.release_new_file();
        space.file_removed();
        assert!(space.reserve_new_file(2));
        assert!(space.reserve_new_file(2));
        assert_eq!(space.files(), 0);
    }
}
