//! Seeded bytes for test catalogs and benchmark files: one generator for the whole tree, the
//! simulated drive's SplitMix64 (`appliance_device::SplitMix64`), so a seed names the same
//! bytes everywhere. Must not use a clock or the OS's randomness.

pub use appliance_device::SplitMix64;
use sha2::Digest;
use std::io::{self, Write};
use std::path::Path;

/// Bytes generated and written at a time by `write_seeded_file`.
const CHUNK_BYTES: usize = 1 << 20;

/// Fills `buffer` with the next values of `rng`, eight little-endian bytes each (the last
/// value cut to what fits).
pub fn fill_seeded(rng: &mut SplitMix64, buffer: &mut [u8]) {
    for word in buffer.chunks_mut(8) {
        let value = rng.next_u64().to_le_bytes();
        word.copy_from_slice(&value[..word.len()]);
    }
}

/// `size_bytes` bytes of the generator seeded with `seed`.
pub fn seeded_bytes(seed: u64, size_bytes: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; size_bytes];
    fill_seeded(&mut SplitMix64(seed), &mut bytes);
    bytes
}

/// Writes `size_bytes` bytes of the generator seeded with `seed` to `path` (the same bytes as
/// `seeded_bytes`), a chunk at a time; returns their SHA-256 in hexadecimal.
pub fn write_seeded_file(path: &Path, seed: u64, size_bytes: u64) -> io::Result<String> {
    let mut rng = SplitMix64(seed);
    let mut file = io::BufWriter::new(std::fs::File::create(path)?);
    let mut hasher = sha2::Sha256::new();
    let mut chunk = vec![0u8; CHUNK_BYTES];
    let mut left = size_bytes;
    while left > 0 {
        let length = usize::try_from(left.min(CHUNK_BYTES as u64)).expect("below 1 MiB");
        // Whole chunks are a multiple of 8 bytes, so the sequence runs on unbroken.
        fill_seeded(&mut rng, &mut chunk[..length]);
        file.write_all(&chunk[..length])?;
        hasher.update(&chunk[..length]);
        left -= length as u64;
    }
    file.flush()?;
    Ok(crate::manifest::hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_names_the_same_bytes_in_memory_and_on_disk() {
        let dir = std::env::temp_dir().join(format!("testkit-seeded-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for size in [
            0,
            1,
            7,
            8,
            9,
            CHUNK_BYTES as u64 - 1,
            CHUNK_BYTES as u64 + 13,
        ] {
            let path = dir.join(format!("f{size}"));
            let sha256 = write_seeded_file(&path, 42, size).unwrap();
            let expected = seeded_bytes(42, usize::try_from(size).unwrap());
            assert!(std::fs::read(&path).unwrap() == expected, "{size} bytes");
            assert_eq!(sha256, crate::sha256_hex(&expected), "{size} bytes");
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert_ne!(seeded_bytes(1, 64), seeded_bytes(2, 64));
        let mut rng = SplitMix64(42);
        assert_eq!(seeded_bytes(42, 8), rng.next_u64().to_le_bytes());
    }
}
