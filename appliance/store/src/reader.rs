//! Reading a published file: the handle that pins its segments, maps byte ranges to device
//! ranges for sendfile(2), and reads or verifies bytes.
//!
//! Pinning protocol (with `reclaim`): a reader pins a segment, then checks that the index still
//! points at the record it read; reclaim first moves the index entry, then checks pins. Both
//! sides use sequentially consistent atomics, so either the reader sees the move and retries,
//! or reclaim sees the pin and waits. A pinned segment is never reused.

use crate::drive::{DriveRt, OFFSET_MASK};
use crate::error::StoreError;
use crate::layout::to_usize;
use crate::layout::{FileMeta, Replaced};
use crate::store::{fail_drive, Inner, OpenError};
use appliance_device::{read_exact_at, AlignedBuf, BLOCK_BYTES};
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::Arc;

/// Bytes read at a time when verifying.
const VERIFY_CHUNK_BYTES: u64 = 4 << 20;

/// A byte range on a drive: where sendfile(2) reads a part of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceRange {
    pub offset_bytes: u64,
    pub length_bytes: u64,
}

/// An open, pinned, published file.
pub struct FileHandle {
    inner: Arc<Inner>,
    rt: Arc<DriveRt>,
    meta: FileMeta,
    meta_offset_bytes: u64,
    pinned: Vec<u32>,
}

impl FileHandle {
    /// Opens the record at `location` if it is `path`'s (`None`: whatever path it holds);
    /// pins its segments.
    pub(crate) fn open(
        inner: &Arc<Inner>,
        tag: u64,
        location: u64,
        path: Option<&str>,
    ) -> Result<Option<FileHandle>, OpenError> {
        let Some(rt) = inner.drive_rt(crate::drive::location_drive(location)) else {
            return Ok(None);
        };
        if rt.is_failed() {
            return Ok(None);
        }
        let meta_offset_bytes = location & OFFSET_MASK;
        let Some(meta_segment) = rt.superblock.segment_of(meta_offset_bytes) else {
            return Ok(None);
        };
        rt.pin(meta_segment);
        let mut handle = FileHandle {
            inner: Arc::clone(inner),
            rt: Arc::clone(rt),
            meta: FileMeta {
                path: String::new(),
                size_bytes: 0,
                published_unix_s: 0,
                sha256: [0; 32],
                extents: Vec::new(),
                replaced: None,
            },
            meta_offset_bytes,
            pinned: vec![meta_segment],
        };
        if !inner.index.contains(tag, location) {
            return Err(OpenError::Moved);
        }
        handle.meta = match rt.read_meta(meta_offset_bytes) {
            Ok(meta) => meta,
            Err(error @ StoreError::Io { .. }) => {
                return Err(OpenError::Store(fail_drive(&inner.index, rt, error)))
            }
            Err(error) => {
                tracing::error!(%error, "dropping an unreadable file record from the index");
                rt.quarantine(&inner.index, tag, location);
                return Err(OpenError::Store(error));
            }
        };
        if path.is_some_and(|path| handle.meta.path != path) {
            return Ok(None);
        }
        for extent in &handle.meta.extents {
            let segment = rt
                .superblock
                .segment_of(extent.offset_bytes)
                .expect("decoded extents lie in the segment area");
            if !handle.pinned.contains(&segment) {
                rt.pin(segment);
                handle.pinned.push(segment);
            }
        }
        if !inner.index.contains(tag, location) {
            return Err(OpenError::Moved);
        }
        Ok(Some(handle))
    }

    pub fn path(&self) -> &str {
        &self.meta.path
    }

    pub fn size_bytes(&self) -> u64 {
        self.meta.size_bytes
    }

    /// The SHA-256 the file was published with.
    pub fn sha256(&self) -> [u8; 32] {
        self.meta.sha256
    }

    pub fn published_unix_s(&self) -> u64 {
        self.meta.published_unix_s
    }

    /// The drive the file lives on.
    pub fn drive_path(&self) -> PathBuf {
        self.rt.path()
    }

    /// The number of the drive the file lives on (0..=255, stable while the daemon runs).
    pub fn drive_number(&self) -> u8 {
        self.rt.number
    }

    /// The descriptor to sendfile(2) from, when the drive has one.
    pub fn serve_fd(&self) -> Option<BorrowedFd<'_>> {
        self.rt.drive.serve_fd()
    }

    /// The device ranges holding file bytes `start..start + length` (clipped to the file).
    pub fn ranges(&self, start: u64, length: u64) -> Vec<DeviceRange> {
        let end = start.saturating_add(length).min(self.meta.size_bytes);
        let mut out = Vec::new();
        let mut file_offset = 0u64;
        for extent in &self.meta.extents {
            let extent_end = file_offset + extent.length_bytes;
            let from = start.max(file_offset);
            let to = end.min(extent_end);
            if from < to {
                out.push(DeviceRange {
                    offset_bytes: extent.offset_bytes + (from - file_offset),
                    length_bytes: to - from,
                });
            }
            file_offset = extent_end;
            if file_offset >= end {
                break;
            }
        }
        out
    }

    /// Reads file bytes at `offset` through the page cache (the bytes sendfile would send).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        if offset.saturating_add(buf.len() as u64) > self.meta.size_bytes {
            return Err(StoreError::InvalidPath(format!(
                "read past the end of {}",
                self.meta.path
            )));
        }
        let mut done = 0usize;
        for range in self.ranges(offset, buf.len() as u64) {
            let part = &mut buf[done..done + to_usize(range.length_bytes)];
            self.rt
                .drive
                .read_cached(range.offset_bytes, part)
                .map_err(|error| self.failed(self.rt.io_error("read", error)))?;
            done += part.len();
        }
        Ok(())
    }

    /// Reads the device bytes `offset_bytes..+length_bytes` (a piece of one of this file's
    /// `ranges`) straight from the drive, by direct I/O through its ring, bypassing the page
    /// cache: the block-aligned buffer read and where the asked bytes start in it. Blocks the
    /// caller until the read completes. The handle's pins keep the bytes from being reused
    /// while it lives.
    pub fn read_direct(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> Result<(AlignedBuf, usize), StoreError> {
        let inside = self.meta.extents.iter().any(|extent| {
            offset_bytes >= extent.offset_bytes
                && offset_bytes.saturating_add(length_bytes)
                    <= extent.offset_bytes + extent.length_bytes
        });
        if !inside {
            return Err(StoreError::InvalidPath(format!(
                "a direct read outside {}",
                self.meta.path
            )));
        }
        let start = offset_bytes / BLOCK_BYTES * BLOCK_BYTES;
        let end = (offset_bytes + length_bytes).div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
        let buf = AlignedBuf::new(to_usize(end - start));
        let buf = read_exact_at(&*self.rt.drive, start, buf)
            .map_err(|error| self.failed(self.rt.io_error("direct read", error)))?;
        Ok((buf, to_usize(offset_bytes - start)))
    }

    /// Re-reads every extent from the drive (direct I/O) and checks it against its CRC-32C.
    pub fn verify(&self) -> Result<(), StoreError> {
        for (number, extent) in self.meta.extents.iter().enumerate() {
            let mut crc = 0u32;
            let mut done = 0u64;
            while done < extent.length_bytes {
                let want = (extent.length_bytes - done).min(VERIFY_CHUNK_BYTES);
                let aligned = want.div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
                let buf = AlignedBuf::new(to_usize(aligned));
                let buf = read_exact_at(&*self.rt.drive, extent.offset_bytes + done, buf)
                    .map_err(|error| self.failed(self.rt.io_error("verify read", error)))?;
                crc = crc32c::crc32c_append(crc, &buf[..want as usize]);
                done += want;
            }
            if crc != extent.crc {
                return Err(self.rt.corrupt(format!(
                    "{}: extent {number} checksum mismatch ({:?} of {:?})",
                    self.meta.path, extent, self.meta.extents
                )));
            }
        }
        Ok(())
    }

    /// Device offset of this version's Publish record.
    pub(crate) fn meta_offset_bytes(&self) -> u64 {
        self.meta_offset_bytes
    }

    /// The version's metadata as its record says.
    pub(crate) fn meta(&self) -> &FileMeta {
        &self.meta
    }

    pub(crate) fn drive_rt(&self) -> &Arc<DriveRt> {
        &self.rt
    }

    /// This version as the next version (or a delete) retires it.
    pub(crate) fn replaced(&self) -> Replaced {
        Replaced {
            meta_offset_bytes: self.meta_offset_bytes,
            segments: self.meta.segment_bytes(&self.rt.superblock),
        }
    }

    fn failed(&self, error: StoreError) -> StoreError {
        fail_drive(&self.inner.index, &self.rt, error)
    }
}

impl Drop for FileHandle {
    fn drop(&mut self) {
        for segment in &self.pinned {
            self.rt.unpin(*segment);
        }
    }
}
