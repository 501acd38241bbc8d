//! Reclaim: moving the few live files out of mostly dead segments, then reusing the segments.
//!
//! A data segment is a victim when it is sealed, unpinned and its live share is below the
//! configured percentage. Its live files are found by scanning the index and reading their
//! records; each is republished with the victim's extents copied to a new place and its other
//! extents kept. A retired log segment (behind both checkpoints) is emptied by republishing its
//! live records. A segment whose live count reaches zero is reused only once no reader pins it,
//! after its page cache is dropped and the range discarded.

use crate::drive::{location_drive, lock, DriveRt, OFFSET_MASK};
use crate::error::StoreError;
use crate::layout::{to_usize, Extent, SegmentKind};
use crate::store::{fail_drive, Inner};
use appliance_device::{read_exact_at, AlignedBuf, BLOCK_BYTES};
use std::collections::BTreeSet;
use std::sync::Arc;

/// Victims taken in one pass, to bound the work of one call.
const VICTIMS_PER_PASS_MAX: usize = 8;
/// Retired log segments with at most this many live records are emptied by republishing.
const LOG_LIVE_RELOCATE_MAX: u64 = 256;
/// Bytes copied at a time when relocating.
const COPY_CHUNK_BYTES: u64 = 1 << 20;

/// Reclaims when free segments run low; always reuses segments that became free.
pub(crate) fn reclaim_drive(inner: &Arc<Inner>, rt: &Arc<DriveRt>) -> Result<u64, StoreError> {
    let low = lock(&rt.space).free_count() < inner.config.reclaim_free_segments_min;
    if low {
        reclaim_drive_forced(inner, rt)
    } else {
        Ok(free_pending(rt))
    }
}

/// Reclaims now, whatever the free space.
pub(crate) fn reclaim_drive_forced(
    inner: &Arc<Inner>,
    rt: &Arc<DriveRt>,
) -> Result<u64, StoreError> {
    let chain: Vec<u32> = lock(&rt.log).chain.iter().copied().collect();
    let current_log = lock(&rt.log).segment;
    let (data_victims, log_victims) = {
        let mut space = lock(&rt.space);
        let threshold = rt.superblock.segment_bytes * inner.config.reclaim_live_percent_max / 100;
        let mut data = Vec::new();
        let mut log = Vec::new();
        for segment in 0..rt.superblock.segment_count {
            let at = segment as usize;
            if space.open[at] || rt.is_pinned(segment) || space.pending_free.contains(&segment) {
                continue;
            }
            let live = space.live[at];
            match space.kinds[at] {
                SegmentKind::Data if live == 0 => space.pending_free.push(segment),
                SegmentKind::Data if live < threshold => data.push((live, segment)),
                SegmentKind::Log if chain.contains(&segment) || segment == current_log => {}
                SegmentKind::Log if live == 0 => space.pending_free.push(segment),
                SegmentKind::Log if live <= LOG_LIVE_RELOCATE_MAX => log.push(segment),
                _ => {}
            }
        }
        data.sort_unstable();
        data.truncate(VICTIMS_PER_PASS_MAX);
        let data: BTreeSet<u32> = data.into_iter().map(|(_, segment)| segment).collect();
        let log: BTreeSet<u32> = log.into_iter().take(VICTIMS_PER_PASS_MAX).collect();
        (data, log)
    };
    if !data_victims.is_empty() || !log_victims.is_empty() {
        relocate(inner, rt, &data_victims, &log_victims)?;
        let mut space = lock(&rt.space);
        for segment in data_victims.iter().chain(&log_victims) {
            if space.live[*segment as usize] == 0 && !space.pending_free.contains(segment) {
                space.pending_free.push(*segment);
            }
        }
    }
    Ok(free_pending(rt))
}

/// Republishes every file with an extent in `data_victims` or a record in `log_victims`.
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
    let superblock = &rt.superblock;
    let in_victim = |extent: &Extent| {
        superblock
            .segment_of(extent.offset_bytes)
            .is_some_and(|segment| data_victims.contains(&segment))
    };
    for offset in locations {
        let meta = match rt.read_meta(offset) {
            Ok(meta) => meta,
            Err(error @ StoreError::Io { .. }) => return Err(fail_drive(&inner.index, rt, error)),
            Err(error) => return Err(error),
        };
        let record_in_victim = superblock
            .segment_of(offset)
            .is_some_and(|segment| log_victims.contains(&segment));
        if !record_in_victim && !meta.extents.iter().any(in_victim) {
            continue;
        }
        let store = crate::store::Store {
            inner: Arc::clone(inner),
        };
        let mut writer = match store.create_for_relocation(&meta.path) {
            Ok(writer) => writer,
            Err(StoreError::PathBusy(_)) => continue,
            Err(error) => return Err(error),
        };
        if writer.drive_path() != rt.path() {
            continue;
        }
        for extent in &meta.extents {
            if in_victim(extent) {
                copy_extent(inner, rt, extent, &mut writer)?;
            } else {
                writer.append_existing(*extent)?;
            }
        }
        writer.publish(meta.sha256)?;
    }
    Ok(())
}

fn copy_extent(
    inner: &Inner,
    rt: &DriveRt,
    extent: &Extent,
    writer: &mut crate::writer::FileWriter,
) -> Result<(), StoreError> {
    let mut done = 0u64;
    while done < extent.length_bytes {
        let want = (extent.length_bytes - done).min(COPY_CHUNK_BYTES);
        let aligned = want.div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
        let buf = read_exact_at(
            &*rt.drive,
            extent.offset_bytes + done,
            AlignedBuf::new(to_usize(aligned)),
        )
        .map_err(|error| fail_drive(&inner.index, rt, rt.io_error("relocation read", error)))?;
        writer.append(&buf[..want as usize])?;
        done += want;
    }
    Ok(())
}

/// Returns segments with nothing live and no readers to the free list.
fn free_pending(rt: &DriveRt) -> u64 {
    let mut space = lock(&rt.space);
    let pending = std::mem::take(&mut space.pending_free);
    let mut freed = 0;
    for segment in pending {
        let at = segment as usize;
        if space.live[at] != 0 || space.kinds[at] == SegmentKind::Free {
            continue;
        }
        if rt.is_pinned(segment) {
            space.pending_free.push(segment);
            continue;
        }
        let offset = rt.superblock.segment_offset_bytes(segment);
        let length = rt.superblock.segment_bytes;
        // Coherence rule: no cached page of a reused range may outlive its reuse.
        let _ = rt.drive.drop_cached(offset, length);
        let _ = rt.drive.discard(offset, length);
        space.kinds[at] = SegmentKind::Free;
        space.free.push_back(segment);
        freed += 1;
    }
    freed
}
