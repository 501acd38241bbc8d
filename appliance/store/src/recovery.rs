//! Opening a formatted drive: superblock checks, the newest valid checkpoint, replay of the log
//! written since, and a fresh checkpoint for the new run.
//!
//! Nothing is written to a drive before its superblock and checkpoint checked out: a drive in a
//! format version this build does not read is refused and left exactly as it was.
//!
//! Replay stops at the first record that does not check out (bad header, checksum, sequence or
//! an epoch older than the one before it): that is the torn tail of the last run, never
//! acknowledged to anyone. Recovery reads the checkpoint and the log tail only, never the data.

use crate::drive::{location, lock, DriveRt, LogState, Space};
use crate::index::Index;
use crate::layout::to_usize;
use crate::layout::{
    decode_link, CheckpointHeader, DecodeError, Deletion, FileMeta, RecordHeader, RecordKind,
    SegmentRow, Superblock, CHECKPOINT_HEADER_BYTES, ENTRY_ROW_BYTES, RECORD_HEADER_BYTES,
    SEGMENT_ROW_BYTES, SUPERBLOCK_BYTES,
};
use crate::log::{apply, write_checkpoint, Mutation};
use appliance_device::{read_exact_at, AlignedBuf, Drive, BLOCK_BYTES};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// Bytes the replay reader fetches at a time.
const REPLAY_WINDOW_BYTES: u64 = 4 << 20;

/// Opens and recovers one drive; the error is a reason fit for the drive's status line.
pub(crate) fn open_drive(
    number: u8,
    drive: Arc<dyn Drive>,
    index: &Index,
    write_slots: crate::buffers::WriteSlots,
    on_failed: crate::DriveFailureHook,
) -> Result<DriveRt, String> {
    let started = Instant::now();
    let superblock = read_superblock(&*drive)?;
    let (checkpoint, slot, rows) = load_checkpoint(&*drive, &superblock, index, number)?;
    let mut rt = DriveRt {
        number,
        salt: DriveRt::salt_for(&superblock),
        pins: (0..superblock.segment_count)
            .map(|_| AtomicU32::new(0))
            .collect(),
        space: Mutex::new(Space::from_checkpoint(&rows, checkpoint.entry_count)),
        log: Mutex::new(LogState {
            segment: 0,
            cursor_bytes: 0,
            next_seq: 0,
            epoch: 0,
            chain: VecDeque::new(),
            bytes_since_checkpoint: 0,
            generation: checkpoint.generation,
            slot,
            newest_head: checkpoint.log_head,
        }),
        superblock,
        drive,
        failed: AtomicBool::new(false),
        failure: Mutex::new(None),
        queue: Mutex::new(Default::default()),
        committed: Condvar::new(),
        reclaim: Mutex::new(()),
        quarantined: Mutex::new(Default::default()),
        recovery_ms: 0,
        write_slots,
        on_failed,
    };
    let result = replay(index, &rt, &checkpoint).and_then(|end| finish(&rt, end, checkpoint.epoch));
    if let Err(why) = result {
        index.remove_where(|location| crate::drive::location_drive(location) == number);
        return Err(why);
    }
    write_checkpoint(index, &rt).map_err(|error| {
        index.remove_where(|location| crate::drive::location_drive(location) == number);
        format!("writing the recovery checkpoint: {error}")
    })?;
    rt.recovery_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    Ok(rt)
}

/// Why a drive whose superblock names `error`'s version is refused, with what the operator can
/// do; `None` when `error` is not about the version.
pub(crate) fn version_refusal(error: &DecodeError) -> Option<String> {
    let remedy = match error {
        DecodeError::VersionNewer(_) => "boot the newer image",
        DecodeError::VersionOlder(_) => "boot an image that reads it",
        _ => return None,
    };
    Some(format!(
        "{error}; the drive is left untouched ({remedy}, or reformat it by hand with \
         applianced format --force)"
    ))
}

/// Reads and checks both superblock copies. A copy whose checksum holds but whose version this
/// build does not read refuses the drive, whatever the other copy says: a newer build has been
/// at it, and nothing here may touch it.
fn read_superblock(drive: &dyn Drive) -> Result<Superblock, String> {
    let bytes = read_exact_at(drive, 0, AlignedBuf::new(2 * to_usize(SUPERBLOCK_BYTES)))
        .map_err(|error| format!("reading the superblock: {error}"))?;
    let first = Superblock::decode(&bytes[..4096]);
    let second = Superblock::decode(&bytes[4096..]);
    for copy in [&first, &second] {
        if let Some(refusal) = copy.as_ref().err().and_then(version_refusal) {
            return Err(refusal);
        }
    }
    let superblock = match (first, second) {
        (Ok(a), Ok(b)) if a.format_version != b.format_version => {
            return Err(format!(
                "the superblock copies name different format versions (copy A: {}; copy B: \
                 {}); the drive is left untouched",
                a.format_version, b.format_version
            ))
        }
        (Ok(superblock), _) | (Err(_), Ok(superblock)) => superblock,
        (Err(DecodeError::BadMagic), Err(DecodeError::BadMagic)) => {
            return Err("not formatted as an appliance drive (no superblock)".into())
        }
        (Err(a), Err(b)) => return Err(format!("no valid superblock (copy A: {a}; copy B: {b})")),
    };
    let size_bytes = drive.info().size_bytes;
    if superblock.drive_size_bytes > size_bytes {
        return Err(format!(
            "geometry mismatch: formatted for {} bytes but the drive has {size_bytes}",
            superblock.drive_size_bytes
        ));
    }
    Ok(superblock)
}

/// Loads the newest checkpoint whose header and body check out: its segment rows are
/// returned and its entries are in the index. The body streams through a bounded window. A
/// header in a version this build does not read refuses the drive, as the superblock's does.
fn load_checkpoint(
    drive: &dyn Drive,
    superblock: &Superblock,
    index: &Index,
    number: u8,
) -> Result<(CheckpointHeader, u64, Vec<SegmentRow>), String> {
    let mut candidates = Vec::new();
    let mut problems = Vec::new();
    for slot in 0..2 {
        let offset = superblock.checkpoint_offset_bytes(slot);
        let block = read_exact_at(
            drive,
            offset,
            AlignedBuf::new(to_usize(CHECKPOINT_HEADER_BYTES)),
        )
        .map_err(|error| format!("reading checkpoint {slot}: {error}"))?;
        match CheckpointHeader::decode(&block) {
            Ok(header) => candidates.push((header, slot)),
            Err(error) => match version_refusal(&error) {
                // Another build has written here: refused before anything is written.
                Some(refusal) => return Err(format!("checkpoint {slot}: {refusal}")),
                None => problems.push(format!("slot {slot}: {error}")),
            },
        }
    }
    candidates.sort_by_key(|(header, _)| std::cmp::Reverse(header.generation));
    for (header, slot) in candidates {
        if header.format_version != superblock.format_version
            || header.drive_uuid != superblock.drive_uuid
            || header.segment_count != superblock.segment_count
            || header.entry_count > superblock.files_max
            || CHECKPOINT_HEADER_BYTES.saturating_add(header.body_bytes)
                > superblock.checkpoint_region_bytes
        {
            problems.push(format!("slot {slot}: does not match the superblock"));
            continue;
        }
        match load_body(drive, superblock, &header, slot, index, number) {
            Ok(rows) => return Ok((header, slot, rows)),
            Err(problem) => {
                index.remove_where(|location| crate::drive::location_drive(location) == number);
                problems.push(format!("slot {slot}: {problem}"));
            }
        }
    }
    Err(format!("no valid checkpoint ({})", problems.join("; ")))
}

fn load_body(
    drive: &dyn Drive,
    superblock: &Superblock,
    header: &CheckpointHeader,
    slot: u64,
    index: &Index,
    number: u8,
) -> Result<Vec<SegmentRow>, String> {
    let mut reader = LogReader {
        drive,
        start: 0,
        window: AlignedBuf::new(0),
    };
    let body_start = superblock.checkpoint_offset_bytes(slot) + CHECKPOINT_HEADER_BYTES;
    let mut crc = 0u32;
    let mut rows = Vec::with_capacity(superblock.segment_count as usize);
    let mut offset = body_start;
    for segment in 0..superblock.segment_count {
        let bytes = reader.bytes(offset, SEGMENT_ROW_BYTES)?;
        crc = crc32c::crc32c_append(crc, bytes);
        rows.push(
            SegmentRow::decode(bytes).map_err(|error| format!("segment row {segment}: {error}"))?,
        );
        offset += SEGMENT_ROW_BYTES;
    }
    for row in 0..header.entry_count {
        let bytes = reader.bytes(offset, ENTRY_ROW_BYTES)?;
        crc = crc32c::crc32c_append(crc, bytes);
        let tag = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        let entry_offset = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        if tag == 0 || superblock.segment_of(entry_offset).is_none() {
            return Err(format!("entry {row} is out of range"));
        }
        index
            .insert(tag, location(number, entry_offset))
            .map_err(|_| "the index is too small for the checkpoint".to_string())?;
        offset += ENTRY_ROW_BYTES;
    }
    if crc != header.body_crc {
        return Err("body checksum mismatch".into());
    }
    Ok(rows)
}

/// Reads a drive's log through a window of a few MiB.
struct LogReader<'a> {
    drive: &'a dyn Drive,
    start: u64,
    window: AlignedBuf,
}

impl LogReader<'_> {
    fn bytes(&mut self, offset: u64, length: u64) -> Result<&[u8], String> {
        let end = offset + length;
        if offset < self.start || end > self.start + self.window.len() as u64 {
            let start = offset - offset % BLOCK_BYTES;
            let wanted = (end - start).max(REPLAY_WINDOW_BYTES).div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
            let available = self.drive.info().size_bytes - start;
            let length = wanted.min(available);
            self.window = read_exact_at(self.drive, start, AlignedBuf::new(to_usize(length)))
                .map_err(|error| format!("reading the log at {start}: {error}"))?;
            self.start = start;
        }
        let from = to_usize(offset - self.start);
        Ok(&self.window[from..from + to_usize(length)])
    }
}

/// Where replay ended: the offset after the last good record and the next sequence number.
struct LogEnd {
    offset_bytes: u64,
    seq: u64,
    epoch: u32,
    chain: VecDeque<u32>,
}

fn replay(index: &Index, rt: &DriveRt, checkpoint: &CheckpointHeader) -> Result<LogEnd, String> {
    let superblock = &rt.superblock;
    let mut reader = LogReader {
        drive: &*rt.drive,
        start: 0,
        window: AlignedBuf::new(0),
    };
    let mut position = checkpoint.log_head.offset_bytes;
    let mut seq = checkpoint.log_head.seq;
    let mut epoch = checkpoint.epoch;
    let mut segment = superblock
        .segment_of(position)
        .ok_or("checkpoint log head outside the segment area")?;
    let mut chain = VecDeque::from([segment]);
    loop {
        let segment_end = superblock.segment_offset_bytes(segment) + superblock.segment_bytes;
        let remainder = BLOCK_BYTES - position % BLOCK_BYTES;
        if remainder < RECORD_HEADER_BYTES {
            position += remainder;
        }
        if position + RECORD_HEADER_BYTES > segment_end {
            break;
        }
        let Ok(header) =
            RecordHeader::decode(reader.bytes(position, RECORD_HEADER_BYTES)?, rt.salt)
        else {
            break;
        };
        if header.seq != seq
            || header.epoch < epoch
            || position + header.record_bytes() > segment_end
        {
            break;
        }
        let payload = reader.bytes(
            position + RECORD_HEADER_BYTES,
            u64::from(header.payload_bytes),
        )?;
        if header.check_payload(payload).is_err() {
            break;
        }
        let payload = payload.to_vec();
        epoch = header.epoch;
        seq += 1;
        match header.kind {
            RecordKind::Pad => {}
            RecordKind::Link => {
                let next =
                    decode_link(&payload).map_err(|error| format!("link record: {error}"))?;
                if next >= superblock.segment_count {
                    return Err(format!("link to segment {next} out of range"));
                }
                lock(&rt.space).mark_log(next);
                chain.push_back(next);
                segment = next;
                position = superblock.segment_offset_bytes(next);
                continue;
            }
            RecordKind::Publish => {
                let meta = FileMeta::decode(&payload)
                    .map_err(|error| format!("publish record at {position}: {error}"))?;
                let tag = crate::index::tag_of(&meta.path);
                let mutation = Mutation::Publish { tag, meta };
                apply(index, rt, &mut lock(&rt.space), &mutation, position)?;
            }
            RecordKind::Delete => {
                let deletion = Deletion::decode(&payload)
                    .map_err(|error| format!("delete record at {position}: {error}"))?;
                let tag = crate::index::tag_of(&deletion.path);
                let mutation = Mutation::Delete { tag, deletion };
                apply(index, rt, &mut lock(&rt.space), &mutation, position)?;
            }
        }
        position += header.record_bytes();
    }
    Ok(LogEnd {
        offset_bytes: position,
        seq,
        epoch,
        chain,
    })
}

/// Sets up the new run: free list, sealed segments, and the log continuing on a block boundary
/// after the last good record, in a new epoch.
fn finish(rt: &DriveRt, end: LogEnd, checkpoint_epoch: u32) -> Result<(), String> {
    let superblock = &rt.superblock;
    let mut space = lock(&rt.space);
    let mut log = lock(&rt.log);
    let tail_segment = *end.chain.back().expect("chain holds the head segment");
    space.rebuild_free_list(&end.chain);
    let aligned = end.offset_bytes.div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
    let segment_end = superblock.segment_offset_bytes(tail_segment) + superblock.segment_bytes;
    log.segment = tail_segment;
    log.cursor_bytes = aligned.min(segment_end);
    log.next_seq = end.seq;
    log.epoch = end
        .epoch
        .max(checkpoint_epoch)
        .checked_add(1)
        .ok_or("epoch overflow")?;
    log.chain = end.chain;
    Ok(())
}
