//! Scrubbing: re-reading one published version's extents with direct I/O, checking them
//! against their CRC-32C (`FileHandle::verify`), and taking a version whose bytes fail out of
//! service. Serving sends bytes from the page cache with sendfile(2) and never checks them, so
//! this is what keeps a rotted sector from being served for ever.
//!
//! Rules (the same ones reclaim keeps, see `reclaim.rs`):
//! - the version stays pinned (its `FileHandle`) while it is read and until it is deleted;
//! - a version is deleted only under its path's claim, and only while the index still points
//!   at it: a version republished by a fill (or moved by reclaim) between the check and the
//!   delete is never deleted for bytes it does not have;
//! - an I/O error is not corruption: the read fails the drive (fail in place), no file is
//!   deleted for it.
//!
//! No pacing here: the caller (the daemon's scrubber thread) decides when each version is
//! checked.

use crate::error::StoreError;
use crate::reader::FileHandle;
use crate::store::{OpenError, PathClaim, Store};

/// One published version as a scrub pass lists it: where its record is, and its path's tag.
/// A pass lists versions (16 bytes each), not paths, to keep its memory small.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FileVersion {
    location: u64,
    tag: u64,
}

/// What scrubbing one version found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScrubOutcome {
    /// Every extent matched its checksum.
    Clean { path: String, size_bytes: u64 },
    /// The bytes failed their checksum; the version was deleted (logged and counted in
    /// `StoreStats::corrupt_files_removed`), so it is no longer served and the next fill
    /// fetches the file again.
    Removed {
        path: String,
        size_bytes: u64,
        what: String,
    },
    /// The version is no longer the live one (replaced, deleted, or its drive left service):
    /// nothing to check; a newer version is checked by a later pass.
    Gone,
    /// The bytes failed their checksum but a writer or a delete holds the path: it is not
    /// deleted now; scrub the version again later (a writer that publishes replaces it).
    Busy { path: String },
}

impl Store {
    /// Every published version, ordered by drive and record offset: the list one scrub pass
    /// works through.
    pub fn list_versions(&self) -> Vec<FileVersion> {
        let mut versions = Vec::with_capacity(usize::try_from(self.file_count()).unwrap_or(0));
        self.inner
            .index
            .for_each(|tag, location| versions.push(FileVersion { location, tag }));
        versions.sort_unstable();
        versions
    }

    /// Checks `version`'s bytes against their checksums (direct I/O, every extent) and takes
    /// the version out when they fail, if it is still the live version of its path. An I/O
    /// error fails the drive and is returned; it never deletes a file.
    pub fn scrub(&self, version: FileVersion) -> Result<ScrubOutcome, StoreError> {
        let Some(handle) = self.open_version(version)? else {
            return Ok(ScrubOutcome::Gone);
        };
        let path = handle.path().to_string();
        let size_bytes = handle.size_bytes();
        let what = match handle.verify() {
            Ok(()) => return Ok(ScrubOutcome::Clean { path, size_bytes }),
            Err(StoreError::Corrupt { what, .. }) => what,
            Err(error) => return Err(error),
        };
        self.inner.interleave("scrub:verified");
        let _claim = match PathClaim::take(&self.inner, &path) {
            Ok(claim) => claim,
            Err(StoreError::PathBusy(_)) => return Ok(ScrubOutcome::Busy { path }),
            Err(error) => return Err(error),
        };
        // Under the claim no writer or delete can change the path, and relocation skips it:
        // the index pointing at this record means the checked version is the live one.
        if !self.inner.index.contains(version.tag, version.location) {
            return Ok(ScrubOutcome::Gone);
        }
        self.remove_corrupt_claimed(&handle, &what)?;
        Ok(ScrubOutcome::Removed {
            path,
            size_bytes,
            what,
        })
    }

    /// Opens and pins `version` while it is live; `None` once it is not.
    fn open_version(&self, version: FileVersion) -> Result<Option<FileHandle>, StoreError> {
        match FileHandle::open(&self.inner, version.tag, version.location, None) {
            Ok(handle) => Ok(handle),
            Err(OpenError::Moved) => Ok(None),
            Err(OpenError::Store(error)) => Err(error),
        }
    }
}
