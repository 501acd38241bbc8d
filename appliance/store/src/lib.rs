//! The appliance's segment store: files on raw drives, an in-memory index, durable publish,
//! crash recovery, delete, reclaim and scrubbing.
//!
//! Deterministic and free of async runtimes and sockets: it takes opened [`Drive`]s and plain
//! configuration values, so the simulation tests can run it over simulated drives. Process-level
//! concerns (opening device paths, persisting the failed-drive list, signals) belong to the
//! daemon. See ARCHITECTURE.md for the on-disk format and the invariants.

#![forbid(unsafe_code)]

mod buffers;
mod drive;
mod error;
mod format;
pub mod index;
pub mod layout;
mod log;
mod reader;
mod reclaim;
mod recovery;
mod scrub;
mod store;
mod writer;

pub use appliance_device::{Drive, DriveInfo, DriveKind};
pub use drive::DriveStatus;
pub use error::StoreError;
pub use format::{format_drive, inspect_drive, DriveContents, FormatError, FormatOptions};
pub use reader::{DeviceRange, FileHandle};
pub use scrub::{FileVersion, ScrubOutcome};
pub use store::{DriveSource, Store, StoreConfig, StoreStats, StoredFile};
pub use writer::FileWriter;

/// Told once when a drive is taken out of service: its UUID and the reason.
pub type DriveFailureHook = std::sync::Arc<dyn Fn([u8; 16], &str) + Send + Sync>;
