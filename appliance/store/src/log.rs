//! The per-drive metadata log: group commit of Publish and Delete records, and checkpoints.
//!
//! A commit makes data durable first (flush), then appends its records in whole blocks and
//! flushes again, so a durable record never names data that is not. The first committer to find
//! no leader becomes the leader for everyone queued behind it (group commit). Mutations are
//! applied to the index and the segment table in log order, by the leader, after the flush.

use crate::drive::{location, location_drive, lock, DriveRt, LogState, Space, OFFSET_MASK};
use crate::error::StoreError;
use crate::index::Index;
use crate::layout::to_usize;
use crate::layout::{
    encode_link, CheckpointHeader, Deletion, FileMeta, LogPosition, RecordHeader, RecordKind,
    CHECKPOINT_HEADER_BYTES, RECORD_HEADER_BYTES,
};
use appliance_device::{write_all_at, AlignedBuf, BLOCK_BYTES};
use std::collections::HashMap;

/// Room always kept at the end of a log segment for a Link record and the skip before it.
const LINK_RESERVE_BYTES: u64 = BLOCK_BYTES + 128;

/// A change to the store that one log record makes durable.
pub(crate) enum Mutation {
    Publish { tag: u64, meta: FileMeta },
    Delete { tag: u64, deletion: Deletion },
}

impl Mutation {
    fn record(&self) -> (RecordKind, Vec<u8>) {
        match self {
            Mutation::Publish { meta, .. } => (RecordKind::Publish, meta.encode()),
            Mutation::Delete { deletion, .. } => (RecordKind::Delete, deletion.encode()),
        }
    }
}

type Batch = Vec<(u64, Vec<Mutation>)>;

/// Commits waiting for a leader, and results waiting for their committers.
#[derive(Default)]
pub(crate) struct CommitQueue {
    pending: Batch,
    leader_active: bool,
    next_ticket: u64,
    done: HashMap<u64, Result<Vec<u64>, StoreError>>,
}

/// Makes `mutations` durable and visible, in order; returns each record's device offset.
pub(crate) fn commit(
    index: &Index,
    rt: &DriveRt,
    mutations: Vec<Mutation>,
) -> Result<Vec<u64>, StoreError> {
    let mut queue = lock(&rt.queue);
    let ticket = queue.next_ticket;
    queue.next_ticket += 1;
    queue.pending.push((ticket, mutations));
    loop {
        if let Some(result) = queue.done.remove(&ticket) {
            return result;
        }
        if queue.leader_active {
            queue = rt
                .committed
                .wait(queue)
                .unwrap_or_else(|poison| poison.into_inner());
            continue;
        }
        queue.leader_active = true;
        let batch = std::mem::take(&mut queue.pending);
        drop(queue);
        let mut leader = Leader {
            rt,
            tickets: batch.iter().map(|(ticket, _)| *ticket).collect(),
        };
        let results = write_batch(index, rt, batch);
        leader.tickets.clear();
        drop(leader);
        queue = lock(&rt.queue);
        queue.done.extend(results);
        queue.leader_active = false;
        rt.committed.notify_all();
    }
}

/// The leader's duty while it writes a batch: should it unwind (a panic where the daemon does
/// not abort, as in tests that catch panics), the flag is released and every committer of the
/// batch gets an error, so no later commit on the drive waits forever.
struct Leader<'a> {
    rt: &'a DriveRt,
    tickets: Vec<u64>,
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        if self.tickets.is_empty() {
            return;
        }
        let mut queue = lock(&self.rt.queue);
        for ticket in self.tickets.drain(..) {
            queue
                .done
                .insert(ticket, Err(StoreError::DriveFailed(self.rt.path())));
        }
        queue.leader_active = false;
        self.rt.committed.notify_all();
    }
}

fn write_batch(
    index: &Index,
    rt: &DriveRt,
    batch: Batch,
) -> Vec<(u64, Result<Vec<u64>, StoreError>)> {
    let mut log = lock(&rt.log);
    match append_batch(index, rt, &mut log, &batch) {
        Ok(offsets) => batch
            .iter()
            .zip(offsets)
            .map(|((ticket, _), offsets)| (*ticket, Ok(offsets)))
            .collect(),
        Err(error) => {
            let failed = rt.is_failed();
            let mut first = Some(error);
            batch
                .iter()
                .map(|(ticket, _)| {
                    let error = first.take().unwrap_or_else(|| {
                        if failed {
                            StoreError::DriveFailed(rt.path())
                        } else {
                            StoreError::DriveFull(rt.path())
                        }
                    });
                    (*ticket, Err(error))
                })
                .collect()
        }
    }
}

/// Bytes being laid out for one commit: runs of contiguous bytes at device offsets.
struct Layout {
    runs: Vec<(u64, Vec<u8>)>,
    segment: u32,
    segment_end: u64,
    epoch: u32,
    seq: u64,
    linked: Vec<u32>,
}

impl Layout {
    fn position(&self) -> u64 {
        let (start, bytes) = self.runs.last().expect("one run at least");
        start + bytes.len() as u64
    }

    fn push(&mut self, bytes: &[u8]) {
        self.runs
            .last_mut()
            .expect("one run")
            .1
            .extend_from_slice(bytes);
    }

    /// A header never starts in the last 31 bytes of a block: readers skip them.
    fn skip_block_tail(&mut self) {
        let remainder = block_remainder(self.position());
        if remainder < RECORD_HEADER_BYTES {
            self.push(&vec![0u8; to_usize(remainder)]);
        }
    }

    fn push_record(&mut self, salt: u32, kind: RecordKind, payload: &[u8]) -> u64 {
        self.skip_block_tail();
        let offset = self.position();
        let header = RecordHeader::for_payload(kind, self.epoch, self.seq, payload);
        self.seq += 1;
        self.push(&header.encode(salt));
        self.push(payload);
        let padding = header.record_bytes() - RECORD_HEADER_BYTES - payload.len() as u64;
        self.push(&vec![0u8; to_usize(padding)]);
        offset
    }

    /// Ends the current run on a block boundary with a Pad record (or zeros if too short).
    fn pad_to_block(&mut self, salt: u32) {
        let remainder = block_remainder(self.position());
        if remainder == BLOCK_BYTES {
            return;
        }
        if remainder < RECORD_HEADER_BYTES {
            self.push(&vec![0u8; to_usize(remainder)]);
            return;
        }
        let filler = vec![0u8; to_usize(remainder - RECORD_HEADER_BYTES)];
        self.push_record(salt, RecordKind::Pad, &filler);
    }
}

/// Bytes left before the next block boundary (a full block when on one).
fn block_remainder(offset_bytes: u64) -> u64 {
    BLOCK_BYTES - offset_bytes % BLOCK_BYTES
}

fn append_batch(
    index: &Index,
    rt: &DriveRt,
    log: &mut LogState,
    batch: &Batch,
) -> Result<Vec<Vec<u64>>, StoreError> {
    if rt.is_failed() {
        return Err(StoreError::DriveFailed(rt.path()));
    }
    rt.drive
        .flush()
        .map_err(|error| crate::store::fail_drive(index, rt, rt.io_error("data flush", error)))?;
    let superblock = &rt.superblock;
    let mut layout = Layout {
        runs: vec![(log.cursor_bytes, Vec::new())],
        segment: log.segment,
        segment_end: superblock.segment_offset_bytes(log.segment) + superblock.segment_bytes,
        epoch: log.epoch,
        seq: log.next_seq,
        linked: Vec::new(),
    };
    let mut offsets = Vec::with_capacity(batch.len());
    for (_, mutations) in batch {
        let mut these = Vec::with_capacity(mutations.len());
        for mutation in mutations {
            let (kind, payload) = mutation.record();
            let needed = RecordHeader::for_payload(kind, 0, 0, &payload).record_bytes();
            if layout.position() + RECORD_HEADER_BYTES + needed + LINK_RESERVE_BYTES
                > layout.segment_end
            {
                link_new_segment(rt, &mut layout)?;
            }
            these.push(layout.push_record(rt.salt, kind, &payload));
        }
        offsets.push(these);
    }
    layout.pad_to_block(rt.salt);
    let written: u64 = layout
        .runs
        .iter()
        .map(|(_, bytes)| bytes.len() as u64)
        .sum();
    for (start, bytes) in &layout.runs {
        let buf = AlignedBuf::from_slice_padded(bytes);
        write_all_at(&*rt.drive, *start, buf).map_err(|error| {
            crate::store::fail_drive(index, rt, rt.io_error("log write", error))
        })?;
    }
    rt.drive
        .flush()
        .map_err(|error| crate::store::fail_drive(index, rt, rt.io_error("log flush", error)))?;
    log.cursor_bytes = layout.position();
    log.segment = layout.segment;
    log.next_seq = layout.seq;
    log.chain.extend(layout.linked.iter().copied());
    log.bytes_since_checkpoint += written;
    let mut space = lock(&rt.space);
    for ((_, mutations), offsets) in batch.iter().zip(&offsets) {
        for (mutation, offset) in mutations.iter().zip(offsets) {
            apply(index, rt, &mut space, mutation, *offset)
                .unwrap_or_else(|why| panic!("drive {}: {why}", rt.path().display()));
        }
    }
    // Another thread's I/O error may have taken the drive out while this commit was in
    // flight (its writes and flushes still worked): its files left the index, so this commit
    // did not make anything visible either.
    if rt.is_failed() {
        return Err(StoreError::DriveFailed(rt.path()));
    }
    Ok(offsets)
}

/// Ends the current log segment with a Link to a newly allocated one.
fn link_new_segment(rt: &DriveRt, layout: &mut Layout) -> Result<(), StoreError> {
    let next = lock(&rt.space)
        .allocate_log()
        .ok_or_else(|| StoreError::DriveFull(rt.path()))?;
    layout.push_record(rt.salt, RecordKind::Link, &encode_link(next));
    let remainder = block_remainder(layout.position());
    if remainder != BLOCK_BYTES {
        layout.push(&vec![0u8; to_usize(remainder)]);
    }
    let start = rt.superblock.segment_offset_bytes(next);
    layout.runs.push((start, Vec::new()));
    layout.segment = next;
    layout.segment_end = start + rt.superblock.segment_bytes;
    layout.linked.push(next);
    Ok(())
}

/// Applies one durable mutation to the segment table and the index. On a drive taken out of
/// service meanwhile (`fail_drive` removed its entries) a missing entry is expected, not a
/// broken invariant, and no entry of the drive is left behind.
pub(crate) fn apply(
    index: &Index,
    rt: &DriveRt,
    space: &mut Space,
    mutation: &Mutation,
    offset_bytes: u64,
) -> Result<(), String> {
    let superblock = &rt.superblock;
    let meta_segment = |offset: u64| {
        superblock
            .segment_of(offset)
            .ok_or_else(|| format!("record offset {offset} outside the segment area"))
    };
    let new_location = location(rt.number, offset_bytes);
    match mutation {
        Mutation::Publish { tag, meta } => {
            for extent in &meta.extents {
                let segment = superblock
                    .segment_of(extent.offset_bytes)
                    .ok_or_else(|| format!("extent at {} outside segments", extent.offset_bytes))?;
                space.mark_data(segment);
                space.add_live(segment, extent.length_bytes);
            }
            space.add_live(meta_segment(offset_bytes)?, 1);
            match &meta.replaced {
                Some(replaced) => {
                    for row in &replaced.segments {
                        space.remove_live(row.segment, row.bytes)?;
                    }
                    space.remove_live(meta_segment(replaced.meta_offset_bytes)?, 1)?;
                    let old = location(rt.number, replaced.meta_offset_bytes);
                    if !index.replace(*tag, old, new_location) {
                        if lock(&rt.quarantined).remove(&replaced.meta_offset_bytes) {
                            // The replaced record rotted and was dropped; the new version
                            // comes back as a file.
                            index
                                .insert(*tag, new_location)
                                .map_err(|_| "index full while applying a publish".to_string())?;
                            space.file_added();
                        } else if !rt.is_failed() {
                            return Err(format!("replaced version of {} not indexed", meta.path));
                        }
                    }
                }
                None => {
                    index
                        .insert(*tag, new_location)
                        .map_err(|_| "index full while applying a publish".to_string())?;
                    space.file_added();
                    // `fail_drive` marks the drive before emptying its entries, so an entry
                    // added after that sweep is seen here and taken out again.
                    if rt.is_failed() {
                        index.remove(*tag, new_location);
                    }
                }
            }
        }
        Mutation::Delete { tag, deletion } => {
            for row in &deletion.retired.segments {
                space.remove_live(row.segment, row.bytes)?;
            }
            space.remove_live(meta_segment(deletion.retired.meta_offset_bytes)?, 1)?;
            let old = location(rt.number, deletion.retired.meta_offset_bytes);
            if index.remove(*tag, old) {
                space.file_removed();
            } else if lock(&rt.quarantined).remove(&deletion.retired.meta_offset_bytes) {
                // Dropped when its record rotted: already uncounted.
            } else if rt.is_failed() {
                space.file_removed();
            } else {
                return Err(format!("deleted file {} not indexed", deletion.path));
            }
        }
    }
    Ok(())
}

/// Bytes of checkpoint body written at a time: the checkpoint streams, so its memory stays
/// bounded whatever the file count.
const CHECKPOINT_CHUNK_BYTES: usize = 1 << 20;

/// Streams bytes to consecutive device offsets in aligned chunks, with a running CRC-32C.
struct ChunkWriter<'a> {
    rt: &'a DriveRt,
    offset_bytes: u64,
    buffer: AlignedBuf,
    filled: usize,
    crc: u32,
    length_bytes: u64,
    error: Option<std::io::Error>,
}

impl ChunkWriter<'_> {
    fn push(&mut self, mut bytes: &[u8]) {
        self.crc = crc32c::crc32c_append(self.crc, bytes);
        self.length_bytes += bytes.len() as u64;
        while !bytes.is_empty() {
            let count = (CHECKPOINT_CHUNK_BYTES - self.filled).min(bytes.len());
            self.buffer[self.filled..self.filled + count].copy_from_slice(&bytes[..count]);
            self.filled += count;
            bytes = &bytes[count..];
            if self.filled == CHECKPOINT_CHUNK_BYTES {
                self.write_out();
            }
        }
    }

    fn write_out(&mut self) {
        let length = self.filled.div_ceil(to_usize(BLOCK_BYTES)) * to_usize(BLOCK_BYTES);
        if length == 0 || self.error.is_some() {
            self.filled = 0;
            return;
        }
        self.buffer[self.filled..length].fill(0);
        let mut buffer = std::mem::replace(&mut self.buffer, AlignedBuf::new(0));
        buffer.set_len(length);
        match write_all_at(&*self.rt.drive, self.offset_bytes, buffer) {
            Ok(mut buffer) => {
                buffer.set_len(buffer.capacity());
                self.buffer = buffer;
            }
            Err(error) => {
                self.error = Some(error);
                self.buffer = AlignedBuf::new(CHECKPOINT_CHUNK_BYTES);
            }
        }
        self.offset_bytes += length as u64;
        self.filled = 0;
    }
}

/// Writes a checkpoint of this drive into the slot not holding the newest one: the body
/// (segment table, then this drive's index entries) streams out first, the header last, then
/// one flush. A torn checkpoint fails its checksums and recovery uses the other slot.
pub(crate) fn write_checkpoint(index: &Index, rt: &DriveRt) -> Result<(), StoreError> {
    let mut log = lock(&rt.log);
    if rt.is_failed() {
        return Err(StoreError::DriveFailed(rt.path()));
    }
    let superblock = &rt.superblock;
    let head = LogPosition {
        offset_bytes: log.cursor_bytes,
        seq: log.next_seq,
    };
    let slot = 1 - log.slot;
    let region = superblock.checkpoint_offset_bytes(slot);
    let mut writer = ChunkWriter {
        rt,
        offset_bytes: region + CHECKPOINT_HEADER_BYTES,
        buffer: AlignedBuf::new(CHECKPOINT_CHUNK_BYTES),
        filled: 0,
        crc: 0,
        length_bytes: 0,
        error: None,
    };
    {
        let space = lock(&rt.space);
        let mut row_bytes = Vec::with_capacity(16);
        for row in space.rows() {
            row_bytes.clear();
            row.encode(&mut row_bytes);
            writer.push(&row_bytes);
        }
    }
    let mut entry_count = 0u64;
    index.for_each(|tag, location| {
        if location_drive(location) == rt.number {
            let mut row = [0u8; 16];
            row[..8].copy_from_slice(&tag.to_le_bytes());
            row[8..].copy_from_slice(&(location & OFFSET_MASK).to_le_bytes());
            writer.push(&row);
            entry_count += 1;
        }
    });
    writer.write_out();
    assert!(
        entry_count <= superblock.files_max,
        "drive holds more files than its checkpoint region fits"
    );
    assert!(CHECKPOINT_HEADER_BYTES + writer.length_bytes <= superblock.checkpoint_region_bytes);
    let fail = |error| crate::store::fail_drive(index, rt, rt.io_error("checkpoint write", error));
    if let Some(error) = writer.error.take() {
        return Err(fail(error));
    }
    let header = CheckpointHeader {
        // The drive's own version, never a newer one: see layout::FORMAT_VERSION.
        format_version: superblock.format_version,
        generation: log.generation + 1,
        epoch: log.epoch,
        log_head: head,
        segment_count: superblock.segment_count,
        entry_count,
        body_bytes: writer.length_bytes,
        body_crc: writer.crc,
        drive_uuid: superblock.drive_uuid,
    };
    let header_block = AlignedBuf::from_slice_padded(&header.encode());
    write_all_at(&*rt.drive, region, header_block).map_err(fail)?;
    rt.drive.flush().map_err(fail)?;
    let older_head = log.newest_head;
    log.generation = header.generation;
    log.slot = slot;
    log.newest_head = head;
    log.bytes_since_checkpoint = 0;
    let keep_from = superblock
        .segment_of(older_head.offset_bytes)
        .expect("log head inside the segment area");
    while log.chain.len() > 1 && log.chain.front() != Some(&keep_from) {
        log.chain.pop_front();
    }
    Ok(())
}
