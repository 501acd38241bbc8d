//! Reclaim: moving the few live files out of mostly dead segments, then reusing the segments.
//!
//! A data segment is a victim when it is sealed, unpinned and its live share is below the
//! configured percentage. Its live files are found by scanning the index and reading their
//! records; each is republished with the victim's extents copied to a new place and its other
//! extents kept. A retired log segment (behind both checkpoints) is emptied by republishing its
//! live records. A segment whose live count reaches zero is reused only once no reader pins it,
//! after its page cache is dropped and the range discarded.
//!
//! Rules that keep a pass from ever publishing a wrong byte (each one was a real bug):
//! - one pass per drive at a time (`DriveRt::reclaim`): a second pass could free and discard a
//!   segment the first is still copying from;
//! - a file is moved only after its path is claimed and the version read at the start of the
//!   pass is still the live one, else a republished file would go back to its old bytes;
//! - the version's segments stay pinned (through its `FileHandle`) while they are copied;
//! - every copied extent is checked against its CRC-32C before the copy is published; a
//!   mismatch takes the file out (logged, counted) and never republishes it under a new CRC;
//! - a moved file keeps its publish time;
//! - freeing never depends on relocation succeeding (a full drive still frees what is dead).

use crate::drive::{location_drive, lock, DriveRt, OFFSET_MASK};
use crate::error::StoreError;
use crate::layout::{to_usize, Extent, FileMeta, SegmentKind};
use crate::reader::FileHandle;
use crate::store::{fail_drive, Inner};
use crate::writer::FileWriter;
use appliance_device::{read_exact_at, AlignedBuf, BLOCK_BYTES};
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Victims taken in one pass, to bound the work of one call.
const VICTIMS_PER_PASS_MAX: usize = 8;
/// Retired log segments with at most this many live records are emptied by republishing.
const LOG_LIVE_RELOCATE_MAX: u64 = 256;
/// Bytes copied at a time when relocating.
const COPY_CHUNK_BYTES: u64 = 1 << 20;

/// Reclaims when free segments run low; always reuses segments that became free. Skips the
/// drive when another pass is running on it (that pass does the work).
pub(crate) fn reclaim_drive(inner: &Arc<Inner>, rt: &Arc<DriveRt>) -> Result<u64, StoreError> {
    let _pass = match rt.reclaim.try_lock() {
        Ok(guard) => guard,
        Err(std::sync::TryLockError::Poisoned(poison)) => poison.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return Ok(0),
    };
    let low = lock(&rt.space).free_count() < inner.config.reclaim_free_segments_min;
    if low {
        reclaim_pass(inner, rt)
    } else {
        Ok(free_pending(rt))
    }
}

/// Reclaims now, whatever the free space; waits for a pass already running on the drive.
pub(crate) fn reclaim_drive_forced(
    inner: &Arc<Inner>,
    rt: &Arc<DriveRt>,
) -> Result<u64, StoreError> {
    let _pass = lock(&rt.reclaim);
    reclaim_pass(inner, rt)
}

/// One pass over a drive; the caller holds the drive's reclaim lock.
fn reclaim_pass(inner: &Arc<Inner>, rt: &Arc<DriveRt>) -> Result<u64, StoreError> {
    let mut freed = free_pending(rt);
    let (data_victims, log_victims) = choose_victims(inner, rt);
    if data_victims.is_empty() && log_victims.is_empty() {
        // Segments the scan found dead are free now, not at the next pass: the fill writes
        // into them right after its deletes.
        return Ok(freed + free_pending(rt));
    }
    let moved = relocate(inner, rt, &data_victims, &log_victims);
    {
        let mut space = lock(&rt.space);
        for &segment in data_victims.iter().chain(&log_victims) {
            if space.live(segment) == 0 {
                space.queue_for_free(segment);
            }
        }
    }
    inner.interleave("reclaim:free");
    freed += free_pending(rt);
    match moved {
        Ok(()) => Ok(freed),
        // A full drive stops relocation, never freeing: what is dead was freed above.
        Err(StoreError::DriveFull(_)) => {
            tracing::warn!(drive = %rt.path().display(), freed, "relocation stopped: drive full");
            Ok(freed)
        }
        Err(error) => Err(error),
    }
}

/// Queues dead segments for freeing and picks this pass's victims.
fn choose_victims(inner: &Inner, rt: &DriveRt) -> (BTreeSet<u32>, BTreeSet<u32>) {
    let (chain, current_log) = {
        let log = lock(&rt.log);
        (log.chain.iter().copied().collect::<Vec<u32>>(), log.segment)
    };
    let mut space = lock(&rt.space);
    // Room relocation may write into: free segments above the one it leaves for the log, and
    // what is left in partly written segments.
    let budget_bytes = rt.free_bytes_in(&space, crate::store::RELOCATION_KEEPS_FREE_SEGMENTS);
    let threshold = rt.superblock.segment_bytes * inner.config.reclaim_live_percent_max / 100;
    let mut data = Vec::new();
    let mut log = Vec::new();
    for segment in 0..rt.superblock.segment_count {
        if space.is_open(segment) || rt.is_pinned(segment) || space.is_queued_for_free(segment) {
            continue;
        }
        let live = space.live(segment);
        match space.kind(segment) {
            SegmentKind::Data if live == 0 => space.queue_for_free(segment),
            SegmentKind::Data if live < threshold => data.push((live, segment)),
            SegmentKind::Log if chain.contains(&segment) || segment == current_log => {}
            SegmentKind::Log if live == 0 => space.queue_for_free(segment),
            SegmentKind::Log if live <= LOG_LIVE_RELOCATE_MAX => log.push(segment),
            _ => {}
        }
    }
    // Emptiest first, and only as many as the free room can take: a pass that ran out of room
    // halfway would use segments without freeing any.
    data.sort_unstable();
    let mut planned_bytes = 0u64;
    let data: BTreeSet<u32> = data
        .into_iter()
        .take(VICTIMS_PER_PASS_MAX)
        .take_while(|(live, _)| {
            planned_bytes += relocation_cost_bytes(*live);
            planned_bytes <= budget_bytes
        })
        .map(|(_, segment)| segment)
        .collect();
    let log: BTreeSet<u32> = log.into_iter().take(VICTIMS_PER_PASS_MAX).collect();
    (data, log)
}

/// Room that moving `live_bytes` may take: files start on block boundaries and the last
/// block of each is padded, so allow for that.
fn relocation_cost_bytes(live_bytes: u64) -> u64 {
    live_bytes + live_bytes / 8 + 16 * BLOCK_BYTES
}

/// The segments a pass empties.
struct Victims<'a> {
    superblock: &'a crate::layout::Superblock,
    data: &'a BTreeSet<u32>,
    log: &'a BTreeSet<u32>,
}

impl Victims<'_> {
    fn holds_extent(&self, extent: &Extent) -> bool {
        self.superblock
            .segment_of(extent.offset_bytes)
            .is_some_and(|segment| self.data.contains(&segment))
    }

    /// True when the version whose record is at `meta_offset_bytes` has anything to move.
    fn touches(&self, meta_offset_bytes: u64, meta: &FileMeta) -> bool {
        let record_in_victim = self
            .superblock
            .segment_of(meta_offset_bytes)
            .is_some_and(|segment| self.log.contains(&segment));
        record_in_victim || meta.extents.iter().any(|extent| self.holds_extent(extent))
    }
}

/// Republishes every live file with an extent in `data_victims` or a record in `log_victims`.
fn relocate(
    inner: &Arc<Inner>,
    rt: &Arc<DriveRt>,
    data_victims: &BTreeSet<u32>,
    log_victims: &BTreeSet<u32>,
) -> Result<(), StoreError> {
    let mut locations = Vec::new();
    inner.index.for_each(|_, location| {
        if location_drive(location) == rt.number {
            locations.push(location & OFFSET_MASK);
        }
    });
    let victims = Victims {
        superblock: &rt.superblock,
        data: data_victims,
        log: log_victims,
    };
    let store = crate::store::Store {
        inner: Arc::clone(inner),
    };
    for offset in locations {
        inner.interleave("relocate:next");
        if rt.is_failed() {
            return Err(StoreError::DriveFailed(rt.path()));
        }
        // The listing is a snapshot: the record may have been replaced since. Reading it is
        // only a filter; what gets moved is decided again once the path is claimed.
        let meta = match rt.read_meta(offset) {
            Ok(meta) => meta,
            Err(error @ StoreError::Io { .. }) => return Err(fail_drive(&inner.index, rt, error)),
            Err(_) => continue,
        };
        if !victims.touches(offset, &meta) {
            continue;
        }
        let Some((writer, handle)) = store.claim_for_relocation(&meta.path, rt, offset)? else {
            continue;
        };
        inner.interleave("relocate:claimed");
        move_file(inner, &store, rt, &victims, writer, &handle)?;
    }
    Ok(())
}

/// Copies the victim extents of the claimed, pinned version `handle` and republishes it; takes
/// the file out when a source extent fails its checksum.
fn move_file(
    inner: &Arc<Inner>,
    store: &crate::store::Store,
    rt: &DriveRt,
    victims: &Victims<'_>,
    mut writer: FileWriter,
    handle: &FileHandle,
) -> Result<(), StoreError> {
    let meta = handle.meta();
    for extent in &meta.extents {
        if !victims.holds_extent(extent) {
            writer.append_existing(*extent)?;
            continue;
        }
        match copy_extent(inner, rt, extent, &mut writer) {
            Ok(()) => {}
            Err(StoreError::Corrupt { what, .. }) => {
                // Under the writer's claim: nobody else can touch the path meanwhile.
                let removed = store.remove_corrupt_claimed(handle, &what);
                writer.abort();
                return removed;
            }
            Err(error) => return Err(error),
        }
    }
    writer.publish_relocated(meta.sha256, meta.published_unix_s)?;
    inner.relocated_files.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Copies one extent into `writer`, checking the bytes read against the extent's CRC-32C.
fn copy_extent(
    inner: &Inner,
    rt: &DriveRt,
    extent: &Extent,
    writer: &mut FileWriter,
) -> Result<(), StoreError> {
    let mut done = 0u64;
    let mut crc = 0u32;
    while done < extent.length_bytes {
        let want = (extent.length_bytes - done).min(COPY_CHUNK_BYTES);
        let aligned = want.div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
        let buf = read_exact_at(
            &*rt.drive,
            extent.offset_bytes + done,
            AlignedBuf::new(to_usize(aligned)),
        )
        .map_err(|error| fail_drive(&inner.index, rt, rt.io_error("relocation read", error)))?;
        let bytes = &buf[..to_usize(want)];
        crc = crc32c::crc32c_append(crc, bytes);
        inner.interleave("relocate:copied");
        writer.append(bytes)?;
        done += want;
    }
    if crc != extent.crc {
        return Err(rt.corrupt(format!(
            "extent at {} of {} bytes: CRC-32C {crc:#010x}, recorded {:#010x}",
            extent.offset_bytes, extent.length_bytes, extent.crc
        )));
    }
    Ok(())
}

/// Returns segments with nothing live and no readers to the free list.
fn free_pending(rt: &DriveRt) -> u64 {
    lock(&rt.space).free_queued(
        |segment| rt.is_pinned(segment),
        |segment| {
            let offset = rt.superblock.segment_offset_bytes(segment);
            let length = rt.superblock.segment_bytes;
            // Coherence rule: no cached page of a reused range may outlive its reuse.
            let _ = rt.drive.drop_cached(offset, length);
            let _ = rt.drive.discard(offset, length);
        },
    )
}
