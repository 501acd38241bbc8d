//! `cargo xtask image`: builds `target/image/appliance.img`, the raw disk image written to an
//! appliance's boot drive. The release binaries are built here; `image/build.sh` does the rest
//! (mmdebstrap root, cached; partitions, filesystems, GRUB; skipped when nothing changed).

use crate::util;
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::time::Instant;

/// Tools the image build runs, and the Debian packages that carry them.
const IMAGE_TOOLS: &[(&str, &str)] = &[
    ("mmdebstrap", "mmdebstrap"),
    ("sgdisk", "gdisk"),
    ("mkfs.ext4", "e2fsprogs"),
    ("grub-mkimage", "grub-common"),
    ("grub-editenv", "grub-common"),
    ("zstd", "zstd"),
    ("mkfs.fat", "dosfstools"),
    ("mcopy", "mtools"),
    ("openssl", "openssl"),
];

/// Files the image build reads from packages that put no program on the PATH.
const IMAGE_FILES: &[(&str, &str)] = &[
    ("/usr/lib/grub/i386-pc/boot.img", "grub-pc-bin"),
    ("/usr/lib/grub/x86_64-efi/linux.mod", "grub-efi-amd64-bin"),
];

/// Installs what the image build needs (as root, with apt-get).
pub fn ensure_tools() -> Result<()> {
    ensure_packages(IMAGE_TOOLS, IMAGE_FILES)
}

/// Installs missing Debian packages (as root, with apt-get), or says which are missing.
pub fn ensure_packages(tools: &[(&str, &str)], extra_files: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|(tool, _)| !util::have(tool))
        .map(|(_, package)| *package)
        .collect();
    missing.extend(
        extra_files
            .iter()
            .filter(|(file, _)| !std::path::Path::new(file).exists())
            .map(|(_, package)| *package),
    );
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !util::is_root() {
        bail!(
            "missing Debian packages {missing:?}: apt-get install {}",
            missing.join(" ")
        );
    }
    let root = util::workspace_root();
    util::run_in(&root, "apt-get", &["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(missing);
    util::run_in(&root, "apt-get", &args)
}

/// `cargo xtask image`.
pub fn build() -> Result<()> {
    image().map(|_| ())
}

/// Builds the image (a no-op within seconds when nothing changed) and returns its path.
pub fn image() -> Result<PathBuf> {
    if !util::is_root() {
        bail!("cargo xtask image needs root: mmdebstrap and the image's file owners");
    }
    let started = Instant::now();
    ensure_tools()?;
    let root = util::workspace_root();
    util::applianced()?;
    let keyring = crate::bundle::image_keyring()?;
    util::run_in(
        &root,
        "bash",
        &["image/build.sh", "--keyring", &keyring.to_string_lossy()],
    )?;
    let image = root.join("target/image/appliance.img");
    println!(
        "xtask image: {} ({} MiB) in {:.1} s",
        image.display(),
        std::fs::metadata(&image)?.len() >> 20,
        started.elapsed().as_secs_f64()
    );
    Ok(image)
}
