//! Writing one file: aligned appends into data segments of one drive, then a durable publish.
//!
//! Bytes are copied once into an aligned buffer; full buffers go to the drive's ring while the
//! next one fills, up to a bounded number in flight per writer, and each takes one of the
//! drive's write slots first (a bound per drive, shared by all its writers). A writer waits for
//! a slot only with none of its own in flight, so writers never wait on each other in a cycle;
//! commits never take a slot. A buffer never crosses a segment end, so
//! a file is a short list of contiguous extents. Until `publish` returns nothing of the file is
//! visible; a writer dropped without publishing leaves nothing behind but dead space.

use crate::buffers::WriteSlot;
use crate::drive::{lock, DriveRt, OpenSegment};
use crate::error::StoreError;
use crate::index::tag_of;
use crate::layout::to_usize;
use crate::layout::{Extent, FileMeta, Replaced, EXTENTS_PER_FILE_MAX};
use crate::log::{commit, Mutation};
use crate::store::{fail_drive, Inner, PathClaim};
use appliance_device::{AlignedBuf, Completion, Ticket, BLOCK_BYTES};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;

/// A submitted data write and the drive write slot it holds until it is reaped.
struct InFlightWrite {
    ticket: Ticket,
    slot: WriteSlot,
}

/// A file being written; see the module comment.
pub struct FileWriter {
    inner: Arc<Inner>,
    rt: Arc<DriveRt>,
    claim: PathClaim,
    replaced: Option<Replaced>,
    current: Option<OpenSegment>,
    buffer: Option<AlignedBuf>,
    buffer_offset_bytes: u64,
    buffer_target: usize,
    filled: usize,
    in_flight: VecDeque<InFlightWrite>,
    spare: Vec<AlignedBuf>,
    extents: Vec<Extent>,
    size_bytes: u64,
    pinned: Vec<u32>,
    reserve_segments: usize,
    /// A writer of a new file counts in `Space::writers` (see `Store::create`).
    new_file: bool,
    finished: bool,
}

impl FileWriter {
    pub(crate) fn new(
        inner: Arc<Inner>,
        rt: Arc<DriveRt>,
        claim: PathClaim,
        replaced: Option<Replaced>,
        reserve_segments: usize,
    ) -> FileWriter {
        let new_file = replaced.is_none();
        FileWriter {
            inner,
            rt,
            claim,
            replaced,
            current: None,
            buffer: None,
            buffer_offset_bytes: 0,
            buffer_target: 0,
            filled: 0,
            in_flight: VecDeque::new(),
            spare: Vec::new(),
            extents: Vec::new(),
            size_bytes: 0,
            pinned: Vec::new(),
            reserve_segments,
            new_file,
            finished: false,
        }
    }

    /// The drive this file is being written to.
    pub fn drive_path(&self) -> PathBuf {
        self.rt.path()
    }

    /// Bytes appended so far.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Appends bytes to the file.
    pub fn append(&mut self, mut bytes: &[u8]) -> Result<(), StoreError> {
        if self.rt.is_failed() {
            return Err(StoreError::DriveFailed(self.rt.path()));
        }
        while !bytes.is_empty() {
            if self.buffer.is_none() {
                self.start_buffer()?;
            }
            let count = (self.buffer_target - self.filled).min(bytes.len());
            let buffer = self.buffer.as_mut().expect("started above");
            buffer[self.filled..self.filled + count].copy_from_slice(&bytes[..count]);
            let extent = self
                .extents
                .last_mut()
                .expect("start_buffer opens an extent");
            extent.crc = crc32c::crc32c_append(extent.crc, &bytes[..count]);
            extent.length_bytes += count as u64;
            self.filled += count;
            self.size_bytes += count as u64;
            bytes = &bytes[count..];
            if self.filled == self.buffer_target {
                self.submit()?;
            }
        }
        Ok(())
    }

    /// Adds bytes that already lie on this drive (relocation keeps extents that need no move).
    pub(crate) fn append_existing(&mut self, extent: Extent) -> Result<(), StoreError> {
        self.submit()?;
        if self.extents.len() >= EXTENTS_PER_FILE_MAX {
            return Err(StoreError::TooLarge(self.claim.path.clone()));
        }
        self.extents.push(extent);
        self.size_bytes += extent.length_bytes;
        Ok(())
    }

    /// Makes the file durable and visible under its path, replacing any earlier version.
    /// `sha256` is the checksum the caller verified the bytes against.
    pub fn publish(self, sha256: [u8; 32]) -> Result<(), StoreError> {
        let now = (self.inner.config.clock)();
        self.publish_at(sha256, now)
    }

    /// Publishes a relocated version: same bytes, so the same publish time (Last-Modified and
    /// the date validators must not change when the bytes did not).
    pub(crate) fn publish_relocated(
        self,
        sha256: [u8; 32],
        published_unix_s: u64,
    ) -> Result<(), StoreError> {
        self.publish_at(sha256, published_unix_s)
    }

    fn publish_at(mut self, sha256: [u8; 32], published_unix_s: u64) -> Result<(), StoreError> {
        self.submit()?;
        self.wait_all()?;
        self.release_segment();
        let meta = FileMeta {
            path: self.claim.path.clone(),
            size_bytes: self.size_bytes,
            published_unix_s,
            sha256,
            extents: std::mem::take(&mut self.extents),
            replaced: self.replaced.take(),
        };
        let mutation = Mutation::Publish {
            tag: tag_of(&meta.path),
            meta,
        };
        commit(&self.inner.index, &self.rt, vec![mutation])?;
        Ok(())
    }

    /// Gives up the file: nothing of it becomes visible.
    pub fn abort(self) {}

    /// Waits for the writes in flight, which gives their drive write slots back: a writer that
    /// will sit idle for a while (a download between attempts) holds none meanwhile.
    pub fn settle(&mut self) -> Result<(), StoreError> {
        self.wait_all()
    }

    /// Readies a buffer for the next bytes, opening a segment or an extent where needed.
    fn start_buffer(&mut self) -> Result<(), StoreError> {
        let needs_segment = match &self.current {
            Some(open) => self.segment_end(open.segment) == open.cursor_bytes,
            None => true,
        };
        if needs_segment {
            self.acquire_segment()?;
        }
        let open = self.current.expect("acquired above");
        let remaining = self.segment_end(open.segment) - open.cursor_bytes;
        let capacity = self.inner.config.write_buffer_bytes;
        let buffer = self.take_buffer()?;
        self.buffer_target = capacity.min(usize::try_from(remaining).expect("segment fits"));
        assert!(
            (self.buffer_target as u64).is_multiple_of(BLOCK_BYTES) && self.buffer_target > 0,
            "write buffer of {} bytes is not a positive number of blocks",
            self.buffer_target
        );
        self.buffer = Some(buffer);
        self.buffer_offset_bytes = open.cursor_bytes;
        self.filled = 0;
        let superblock = &self.rt.superblock;
        let contiguous = self.extents.last().is_some_and(|last| {
            last.offset_bytes + last.length_bytes == open.cursor_bytes
                && superblock.segment_of(last.offset_bytes) == Some(open.segment)
        });
        if !contiguous {
            if self.extents.len() >= EXTENTS_PER_FILE_MAX {
                return Err(StoreError::TooLarge(self.claim.path.clone()));
            }
            self.extents.push(Extent {
                offset_bytes: open.cursor_bytes,
                length_bytes: 0,
                crc: 0,
            });
        }
        Ok(())
    }

    fn segment_end(&self, segment: u32) -> u64 {
        self.rt.superblock.segment_offset_bytes(segment) + self.rt.superblock.segment_bytes
    }

    /// Continues a partly written segment, or opens a free one.
    fn acquire_segment(&mut self) -> Result<(), StoreError> {
        if let Some(open) = self.current.take() {
            lock(&self.rt.space).seal(open.segment);
        }
        let mut space = lock(&self.rt.space);
        let pooled = space.take_pooled(|open| self.segment_end(open.segment) - open.cursor_bytes);
        let open = match pooled {
            Some(open) => open,
            None => {
                let segment = space
                    .open_new_data(self.reserve_segments)
                    .ok_or_else(|| StoreError::DriveFull(self.rt.path()))?;
                OpenSegment {
                    segment,
                    cursor_bytes: self.rt.superblock.segment_offset_bytes(segment),
                }
            }
        };
        drop(space);
        if !self.pinned.contains(&open.segment) {
            self.rt.pin(open.segment);
            self.pinned.push(open.segment);
        }
        self.current = Some(open);
        Ok(())
    }

    /// Sends the filled part of the buffer (padded to whole blocks) to the drive.
    fn submit(&mut self) -> Result<(), StoreError> {
        let Some(mut buffer) = self.buffer.take() else {
            return Ok(());
        };
        let length = self.filled.div_ceil(to_usize(BLOCK_BYTES)) * to_usize(BLOCK_BYTES);
        if length == 0 {
            self.inner.buffers.give(buffer);
            return Ok(());
        }
        buffer[self.filled..length].fill(0);
        buffer.set_len(length);
        let slot = match self.take_write_slot() {
            Ok(slot) => slot,
            Err(error) => {
                self.inner.buffers.give(buffer);
                return Err(error);
            }
        };
        let ticket = self.rt.drive.write_at(self.buffer_offset_bytes, buffer);
        self.in_flight.push_back(InFlightWrite { ticket, slot });
        let open = self
            .current
            .as_mut()
            .expect("a buffer belongs to a segment");
        open.cursor_bytes += length as u64;
        self.filled = 0;
        while self.in_flight.len() > self.inner.config.writes_in_flight_max {
            self.wait_oldest()?;
        }
        Ok(())
    }

    /// One of the drive's write slots. While none is free the writer first reaps its own
    /// writes (their slots go back to the drive); it waits, bounded by `write_buffer_wait_ms`,
    /// only with nothing of its own in flight. Slots held by other writers come back when they
    /// reap, which never waits on a slot, so no cycle of writers waiting on each other forms.
    fn take_write_slot(&mut self) -> Result<WriteSlot, StoreError> {
        while !self.in_flight.is_empty() {
            if let Some(slot) = self.rt.write_slots.try_take() {
                return Ok(slot);
            }
            self.wait_oldest()?;
        }
        let wait = std::time::Duration::from_millis(self.inner.config.write_buffer_wait_ms);
        self.rt.write_slots.take(wait)
    }

    /// Waits for the oldest write and gives its slot back; the buffer is returned.
    fn reap_oldest(&mut self) -> Option<Completion> {
        let InFlightWrite { ticket, slot } = self.in_flight.pop_front()?;
        let completion = ticket.wait();
        self.rt.write_slots.give(slot);
        Some(completion)
    }

    fn wait_oldest(&mut self) -> Result<(), StoreError> {
        let Some((result, buffer)) = self.reap_oldest() else {
            return Ok(());
        };
        if let Err(error) = result {
            self.inner.buffers.give(buffer);
            let error = self.rt.io_error("data write", error);
            return Err(fail_drive(&self.inner.index, &self.rt, error));
        }
        self.inner.buffers.give(buffer);
        Ok(())
    }

    /// A write buffer: one of ours coming back from the drive first, else one from the pool.
    fn take_buffer(&mut self) -> Result<AlignedBuf, StoreError> {
        if let Some(mut buffer) = self.spare.pop() {
            buffer.set_len(buffer.capacity());
            return Ok(buffer);
        }
        if !self.in_flight.is_empty() {
            self.wait_oldest_keeping()?;
            if let Some(mut buffer) = self.spare.pop() {
                buffer.set_len(buffer.capacity());
                return Ok(buffer);
            }
        }
        let wait = std::time::Duration::from_millis(self.inner.config.write_buffer_wait_ms);
        self.inner.buffers.take(wait)
    }

    /// Waits for the oldest write and keeps its buffer for the next append.
    fn wait_oldest_keeping(&mut self) -> Result<(), StoreError> {
        let Some((result, buffer)) = self.reap_oldest() else {
            return Ok(());
        };
        self.spare.push(buffer);
        if let Err(error) = result {
            let error = self.rt.io_error("data write", error);
            return Err(fail_drive(&self.inner.index, &self.rt, error));
        }
        Ok(())
    }

    fn wait_all(&mut self) -> Result<(), StoreError> {
        while !self.in_flight.is_empty() {
            self.wait_oldest()?;
        }
        Ok(())
    }

    /// Hands the current segment back to the pool, or seals it when it is full.
    fn release_segment(&mut self) {
        let Some(open) = self.current.take() else {
            return;
        };
        let mut space = lock(&self.rt.space);
        if self.segment_end(open.segment) - open.cursor_bytes >= BLOCK_BYTES {
            space.return_to_pool(open);
        } else {
            space.seal(open.segment);
        }
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        if !self.finished {
            self.finished = true;
            while let Some((_, buffer)) = self.reap_oldest() {
                self.inner.buffers.give(buffer);
            }
            if let Some(buffer) = self.buffer.take() {
                self.inner.buffers.give(buffer);
            }
            for buffer in self.spare.drain(..) {
                self.inner.buffers.give(buffer);
            }
            self.release_segment();
            for segment in self.pinned.drain(..) {
                self.rt.unpin(segment);
            }
            if self.new_file {
                lock(&self.rt.space).release_new_file();
            }
        }
    }
}
