//! Errors the store returns: each says where it came from and whether a retry can help.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// An operating error of the store (a broken invariant panics instead).
#[derive(Debug)]
pub enum StoreError {
    /// The path is not acceptable as a content path.
    InvalidPath(String),
    /// Another writer or a delete is working on the same path right now (retry later).
    PathBusy(String),
    /// No healthy drive can take the file.
    NoDrive,
    /// The chosen drive has no free segment left (retry after deletes and reclaim).
    DriveFull(PathBuf),
    /// No healthy drive has room for the file (retry after deletes and reclaim).
    AllDrivesFull,
    /// The index holds as many files as it was sized for.
    IndexFull,
    /// A drive failed an operation; it has been taken out of service.
    Io {
        drive: PathBuf,
        operation: &'static str,
        source: io::Error,
    },
    /// The drive was already out of service.
    DriveFailed(PathBuf),
    /// A record read back from a drive did not check out.
    Corrupt { drive: PathBuf, what: String },
    /// The file is longer than one file may be.
    TooLarge(String),
    /// Every write buffer, or every write slot of the drive, stayed in use by other writers
    /// for `write_buffer_wait_ms` (retry later).
    OutOfBuffers,
}

impl StoreError {
    /// True when the same call may succeed later without operator action.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::PathBusy(_)
                | StoreError::DriveFull(_)
                | StoreError::AllDrivesFull
                | StoreError::OutOfBuffers
        )
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::InvalidPath(why) => write!(f, "invalid content path: {why}"),
            StoreError::PathBusy(path) => write!(f, "{path} is being written or deleted"),
            StoreError::NoDrive => write!(f, "no healthy data drive"),
            StoreError::AllDrivesFull => write!(f, "no drive has room for the file"),
            StoreError::DriveFull(drive) => write!(f, "drive {} is full", drive.display()),
            StoreError::IndexFull => write!(f, "the index is full (raise files_max at format)"),
            StoreError::Io {
                drive,
                operation,
                source,
            } => write!(f, "drive {}: {operation} failed: {source}", drive.display()),
            StoreError::DriveFailed(drive) => {
                write!(f, "drive {} is out of service", drive.display())
            }
            StoreError::Corrupt { drive, what } => {
                write!(f, "drive {}: corrupt {what}", drive.display())
            }
            StoreError::TooLarge(path) => write!(f, "{path}: file has too many extents"),
            StoreError::OutOfBuffers => {
                write!(f, "every write buffer or write slot of the drive is in use")
            }
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
