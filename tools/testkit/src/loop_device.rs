//! Loop devices over files, for tests that need a real block device: attached with
//! `losetup --find --show` (root only), detached when dropped. Must not detach a device it
//! did not attach.

use crate::error;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A loop device over a file, detached on drop.
#[derive(Debug)]
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub path: PathBuf,
}

impl LoopDevice {
    /// Attaches the first free loop device to `backing`.
    pub fn attach(backing: &Path) -> io::Result<LoopDevice> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing)
            .output()?;
        if !out.status.success() {
            return Err(error(format!(
                "losetup --find --show {}: {}",
                backing.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Ok(LoopDevice { path })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}
