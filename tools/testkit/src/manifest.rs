//! Fill manifests for tests and tools, built as serde structs and written as JSON (format:
//! docs/manifest.md, enforced by `appliance/fill/src/manifest.rs`). Must not validate: a test
//! may build a manifest the appliance refuses.

use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::io;
use std::path::Path;

/// The `generated_at` of manifests that do not say otherwise.
pub const GENERATED_AT: &str = "2026-11-23T02:00:00Z";

/// One row of `files`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestFile {
    /// The decoded content path, `/title/1080p.mp4`.
    pub path: String,
    pub size_bytes: u64,
    /// 64 lowercase hexadecimal digits.
    pub sha256: String,
    /// 1 = most popular.
    pub rank: u64,
}

impl ManifestFile {
    /// The row of a file whose bytes are `bytes`.
    pub fn of(path: &str, bytes: &[u8], rank: u64) -> ManifestFile {
        ManifestFile {
            path: path.to_string(),
            size_bytes: bytes.len() as u64,
            sha256: sha256_hex(bytes),
            rank,
        }
    }
}

/// A whole manifest document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    pub generated_at: String,
    pub files: Vec<ManifestFile>,
}

impl Default for Manifest {
    /// Version 1, generated at `GENERATED_AT`, no files.
    fn default() -> Manifest {
        Manifest {
            version: 1,
            generated_at: GENERATED_AT.to_string(),
            files: Vec::new(),
        }
    }
}

impl Manifest {
    /// The manifest of `files` (path, bytes), ranked in their order from 1.
    pub fn of(files: &[(String, Vec<u8>)]) -> Manifest {
        let mut manifest = Manifest::default();
        for (path, bytes) in files {
            manifest.add(path, bytes);
        }
        manifest
    }

    /// Adds `path` holding `bytes`, ranked after the files already listed.
    pub fn add(&mut self, path: &str, bytes: &[u8]) {
        let rank = self.files.len() as u64 + 1;
        self.files.push(ManifestFile::of(path, bytes, rank));
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a manifest always serialises")
    }

    /// Parses a manifest document (as this kit writes it).
    pub fn from_json(bytes: &[u8]) -> io::Result<Manifest> {
        serde_json::from_slice(bytes).map_err(io::Error::other)
    }

    /// Writes the JSON document to `path`.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, self.to_json())
    }
}

/// The SHA-256 of `bytes` in lowercase hexadecimal, as manifests carry it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&sha2::Sha256::digest(bytes))
}

/// Lowercase hexadecimal digits of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_escaped_as_json_and_read_back_the_same() {
        let paths = [
            "/odd/\"quoted\".mp4",
            "/odd/back\\slash.mp4",
            "/odd/tab\there.mp4",
            "/odd/été/ü ñ.mp4",
            "/odd/\u{7f}\u{1b}[31m.mp4",
            "/odd/\u{202e}4pm.mp4",
        ];
        let files: Vec<(String, Vec<u8>)> = paths
            .iter()
            .map(|path| (path.to_string(), path.as_bytes().to_vec()))
            .collect();
        let manifest = Manifest::of(&files);
        let text = manifest.to_json();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        for (number, path) in paths.iter().enumerate() {
            assert_eq!(value["files"][number]["path"], *path, "{text}");
            assert_eq!(value["files"][number]["rank"], number + 1);
        }
        assert_eq!(value["version"], 1);
        assert_eq!(Manifest::from_json(text.as_bytes()).unwrap(), manifest);
    }

    #[test]
    fn rows_carry_size_and_sha256() {
        let row = ManifestFile::of("/a", b"abc", 7);
        assert_eq!(row.size_bytes, 3);
        assert_eq!(
            row.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(row.rank, 7);
        assert_eq!(hex(&[0, 0xAB, 0x0F]), "00ab0f");
    }
}
