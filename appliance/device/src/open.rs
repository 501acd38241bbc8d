//! What a drive is, and opening one: kind, geometry, identity, exclusive access.
//!
//! It owns the open-time system calls (open, flock, fstat, the size ioctls, sysfs) and the
//! error messages that name the drive's path; it submits no I/O.

use crate::BLOCK_BYTES;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The kind of thing behind a drive path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriveKind {
    /// A block device such as `/dev/nvme1n1` or a loop device.
    BlockDevice,
    /// A regular file (development and tests).
    RegularFile,
    /// An in-memory simulated drive (simulation tests).
    Simulated,
}

/// Identity and geometry of an opened drive.
#[derive(Clone, Debug)]
pub struct DriveInfo {
    /// The path the drive was opened from.
    pub path: PathBuf,
    /// Block device, regular file or simulated.
    pub kind: DriveKind,
    /// Usable size in bytes (rounded down to whole 4 KiB blocks).
    pub size_bytes: u64,
    /// The device's logical block size in bytes (512 or 4096).
    pub logical_block_bytes: u32,
    /// Model name where the kernel knows it (sysfs), for status displays.
    pub model: Option<String>,
    /// Serial number where the kernel knows it (sysfs).
    pub serial: Option<String>,
}

/// A drive path opened for direct I/O and locked, with its geometry.
pub(crate) struct OpenedDrive {
    /// Path, kind, size and identity.
    pub(crate) info: DriveInfo,
    /// `O_RDWR | O_DIRECT`, holding the exclusive `flock` for as long as it is open.
    pub(crate) direct: File,
    /// `O_RDONLY`, through the page cache: page-cache reads and sendfile(2).
    pub(crate) cached: File,
}

/// `_IO(0x12, 119)`: discard a `[offset, length]` byte range of a block device.
pub(crate) const BLKDISCARD: libc::Ioctl = 0x1277;

/// `_IOR(0x12, 114, u64)`: size of a block device in bytes (the generic ioctl encoding).
#[cfg(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
))]
const BLKGETSIZE64: libc::Ioctl = (2 << 30) | (8 << 16) | (0x12 << 8) | 114;

/// Opens `path` for direct I/O, takes its exclusive lock and reads its geometry.
///
/// Every error names the path. A block device is opened `O_EXCL`, so a mounted device or one
/// held by another exclusive opener is refused with `EBUSY`.
pub(crate) fn open_drive(path: &Path) -> io::Result<OpenedDrive> {
    let metadata = fs::metadata(path).map_err(|error| context(path, "cannot open drive", error))?;
    let kind = kind_of(path, &metadata)?;
    let direct = open_direct(path, kind)?;
    lock_exclusive(path, &direct)?;
    let metadata = direct
        .metadata()
        .map_err(|error| context(path, "cannot stat drive", error))?;
    if kind_of(path, &metadata)? != kind {
        return Err(invalid(path, "changed kind while it was being opened"));
    }
    let (size_bytes, logical_block_bytes) = match kind {
        DriveKind::BlockDevice => (
            block_device_size_bytes(path, &direct)?,
            logical_block_bytes(path, &direct)?,
        ),
        _ => (metadata.len(), file_logical_block_bytes(metadata.blksize())),
    };
    if u64::from(logical_block_bytes) > BLOCK_BYTES {
        let what = format!(
            "logical block size {logical_block_bytes} bytes exceeds {BLOCK_BYTES}; \
             the appliance writes whole {BLOCK_BYTES}-byte blocks and cannot use this drive"
        );
        return Err(invalid(path, &what));
    }
    let size_bytes = size_bytes - size_bytes % BLOCK_BYTES;
    if size_bytes == 0 {
        return Err(invalid(path, "is smaller than one 4096-byte block"));
    }
    let (model, serial) = match kind {
        DriveKind::BlockDevice => sysfs_identity(metadata.rdev()),
        _ => (None, None),
    };
    let cached = OpenOptions::new()
        .read(true)
        .open(path)
        .map_err(|error| context(path, "cannot open drive for cached reads", error))?;
    let info = DriveInfo {
        path: path.to_path_buf(),
        kind,
        size_bytes,
        logical_block_bytes,
        model,
        serial,
    };
    Ok(OpenedDrive {
        info,
        direct,
        cached,
    })
}

/// Wraps `error` in a message naming the path, keeping its kind.
pub(crate) fn context(path: &Path, what: &str, error: io::Error) -> io::Error {
    io::Error::new(error.kind(), format!("{}: {what}: {error}", path.display()))
}

/// An `InvalidInput` error naming the path.
pub(crate) fn invalid(path: &Path, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{}: {what}", path.display()),
    )
}

fn kind_of(path: &Path, metadata: &fs::Metadata) -> io::Result<DriveKind> {
    let file_type = metadata.file_type();
    if file_type.is_block_device() {
        Ok(DriveKind::BlockDevice)
    } else if file_type.is_file() {
        Ok(DriveKind::RegularFile)
    } else {
        Err(invalid(
            path,
            "is neither a block device nor a regular file",
        ))
    }
}

fn open_direct(path: &Path, kind: DriveKind) -> io::Result<File> {
    let exclusive = match kind {
        DriveKind::BlockDevice => libc::O_EXCL,
        _ => 0,
    };
    // std adds O_CLOEXEC to every open.
    let opened = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT | exclusive)
        .open(path);
    opened.map_err(|error| match error.raw_os_error() {
        Some(libc::EBUSY) => io::Error::new(
            error.kind(),
            format!(
                "{}: the drive is in use: it is mounted, or held open exclusively by another \
                 process ({error})",
                path.display()
            ),
        ),
        _ => context(path, "cannot open drive for direct I/O", error),
    })
}

/// Takes `flock(LOCK_EX | LOCK_NB)` on the direct descriptor; it is released when that closes.
fn lock_exclusive(path: &Path, file: &File) -> io::Result<()> {
    // SAFETY: flock takes no pointers; the descriptor is open for the duration of the call.
    let status = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if status == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(io::Error::new(
            io::ErrorKind::ResourceBusy,
            format!(
                "{}: the drive is in use by another process (another opener holds its \
                 exclusive lock); stop that process first",
                path.display()
            ),
        ));
    }
    Err(context(path, "cannot lock drive", error))
}

fn block_device_size_bytes(path: &Path, file: &File) -> io::Result<u64> {
    let mut size_bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a live local.
    let status = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size_bytes) };
    if status < 0 {
        let error = io::Error::last_os_error();
        return Err(context(
            path,
            "cannot read block device size (BLKGETSIZE64)",
            error,
        ));
    }
    Ok(size_bytes)
}

fn logical_block_bytes(path: &Path, file: &File) -> io::Result<u32> {
    let mut block_bytes: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at a live local.
    let status = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut block_bytes) };
    if status < 0 {
        let error = io::Error::last_os_error();
        return Err(context(
            path,
            "cannot read logical block size (BLKSSZGET)",
            error,
        ));
    }
    u32::try_from(block_bytes).map_err(|_| invalid(path, "reports a negative logical block size"))
}

/// A file's direct-I/O granularity: 4096, or 512 on a file system with smaller blocks.
fn file_logical_block_bytes(preferred_io_bytes: u64) -> u32 {
    if preferred_io_bytes >= BLOCK_BYTES {
        4096
    } else {
        512
    }
}

/// Model and serial from `/sys/class/block/<name>/device/`, or the parent disk's for a
/// partition; `None` where the kernel does not say (loop devices, for one).
fn sysfs_identity(rdev: u64) -> (Option<String>, Option<String>) {
    let link = format!("/sys/dev/block/{}:{}", libc::major(rdev), libc::minor(rdev));
    let Ok(block_dir) = fs::canonicalize(link) else {
        return (None, None);
    };
    let disk_dir = if block_dir.join("partition").exists() {
        block_dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or(block_dir)
    } else {
        block_dir
    };
    let Some(name) = disk_dir.file_name() else {
        return (None, None);
    };
    let device_dir = Path::new("/sys/class/block").join(name).join("device");
    let read = |file: &str| {
        let text = fs::read_to_string(device_dir.join(file)).ok()?;
        let text = text.trim();
        (!text.is_empty()).then(|| text.to_string())
    };
    (read("model"), read("serial"))
}
