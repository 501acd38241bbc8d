//! Opening configured drive paths for the store, formatting them, and the failed-drive list
//! kept on the OS disk so that a failed drive stays out of service across restarts.

use anyhow::{Context, Result};
use appliance_device::{UringConfig, UringDrive};
use appliance_store::{format_drive, DriveSource, FormatOptions, StoreConfig};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// File in the state directory listing failed drives, one `UUID reason` per line.
const FAILED_DRIVES_FILE: &str = "failed-drives";

/// Formats one drive and describes the result.
pub fn format_one(
    path: &Path,
    segment_mib: u64,
    files_max: Option<u64>,
    force: bool,
) -> Result<String> {
    if segment_mib == 0 || segment_mib > 1 << 20 {
        anyhow::bail!("--segment-mib {segment_mib} is outside 2..=1048576");
    }
    let drive = open_waiting(path)?;
    let options = FormatOptions {
        segment_bytes: segment_mib << 20,
        files_max,
        force,
        drive_uuid: random_uuid()?,
        now_unix_s: now_unix_s(),
    };
    let superblock = format_drive(&drive, &options)?;
    Ok(format!(
        "formatted: {} segments of {} MiB, up to {} files, drive {}",
        superblock.segment_count,
        superblock.segment_bytes >> 20,
        superblock.files_max,
        uuid_hex(&superblock.drive_uuid)
    ))
}

/// How long to wait for a drive that another process still holds. After a SIGKILL the
/// kernel tears the dead process's io_uring down asynchronously and keeps its files open for a
/// moment; a restart must not take that for a second appliance on the drive.
const BUSY_WAIT: Duration = Duration::from_secs(10);

/// Opens a drive, waiting up to [`BUSY_WAIT`] while it is busy.
fn open_waiting(path: &Path) -> std::io::Result<UringDrive> {
    let deadline = Instant::now() + BUSY_WAIT;
    loop {
        match UringDrive::open(path, &UringConfig::default()) {
            Err(error)
                if error.kind() == std::io::ErrorKind::ResourceBusy
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            result => return result,
        }
    }
}

/// Opens every configured drive; a drive that cannot be opened becomes an `Unavailable` slot.
pub fn open_all(paths: &[PathBuf]) -> Vec<DriveSource> {
    paths
        .iter()
        .map(|path| match open_waiting(path) {
            Ok(drive) => DriveSource::Opened(Arc::new(drive)),
            Err(error) => {
                tracing::error!(drive = %path.display(), %error, "data drive unavailable");
                DriveSource::Unavailable {
                    path: path.clone(),
                    reason: error.to_string(),
                }
            }
        })
        .collect()
}

/// Store settings with the failed-drive list of `state_dir` loaded and kept up to date.
pub fn store_config(state_dir: &Path) -> Result<StoreConfig> {
    fs::create_dir_all(state_dir)
        .with_context(|| format!("creating state directory {}", state_dir.display()))?;
    let list = state_dir.join(FAILED_DRIVES_FILE);
    let failed_drive_uuids = read_failed(&list)?;
    let on_drive_failed = Arc::new(move |uuid: [u8; 16], reason: &str| {
        tracing::error!(drive = %uuid_hex(&uuid), reason, "data drive taken out of service");
        if let Err(error) = append_failed(&list, &uuid, reason) {
            tracing::error!(%error, "could not record the failed drive");
        }
    });
    Ok(StoreConfig {
        failed_drive_uuids,
        on_drive_failed,
        ..StoreConfig::default()
    })
}

fn read_failed(list: &Path) -> Result<Vec<[u8; 16]>> {
    let text = match fs::read_to_string(list) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error).with_context(|| format!("reading {}", list.display())),
    };
    let mut uuids = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let hex = line.split_whitespace().next().unwrap_or("");
        match parse_uuid_hex(hex) {
            Some(uuid) => uuids.push(uuid),
            None if hex.is_empty() => {}
            None => anyhow::bail!("{}:{}: not a drive UUID", list.display(), number + 1),
        }
    }
    Ok(uuids)
}

fn append_failed(list: &Path, uuid: &[u8; 16], reason: &str) -> std::io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(list)?;
    let reason = reason.replace('\n', " ");
    writeln!(file, "{} {reason}", uuid_hex(uuid))?;
    file.sync_all()
}

/// 32 lowercase hex digits.
pub fn uuid_hex(uuid: &[u8; 16]) -> String {
    uuid.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn parse_uuid_hex(text: &str) -> Option<[u8; 16]> {
    if text.len() != 32 {
        return None;
    }
    let mut uuid = [0u8; 16];
    for (at, byte) in uuid.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * at..2 * at + 2)?, 16).ok()?;
    }
    Some(uuid)
}

fn random_uuid() -> Result<[u8; 16]> {
    let mut uuid = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut uuid))
        .context("reading /dev/urandom")?;
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    Ok(uuid)
}

pub fn now_unix_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_hex_round_trips_and_rejects_junk() {
        let uuid = [0xAB; 16];
        assert_eq!(parse_uuid_hex(&uuid_hex(&uuid)), Some(uuid));
        for junk in ["", "xyz", &"g".repeat(32), &"a".repeat(31)] {
            assert_eq!(parse_uuid_hex(junk), None, "{junk}");
        }
    }
}
