//! Loading the manifest of a fill: reading it from a file or an http(s) URL with the size cap
//! enforced while the bytes arrive (`manifest_bytes_max`: nothing larger is ever held in
//! memory), fetching and checking its detached signature when keys are configured, and
//! parsing it. File reads, signature checks and parsing run on tokio's blocking pool, never on
//! an async worker (the serving runtime's workers run the admin and control routes that start
//! fills). Must not plan, delete or download files.

use crate::fetch::FetchConfig;
use crate::manifest::{excerpt, parse_manifest, Manifest};
use crate::runner::ManifestLocation;
use crate::signature::{verify_manifest, ManifestKey, SIGNATURE_BYTES_MAX, SIGNATURE_SUFFIX};
use std::io::Read;
use std::path::Path;

/// How a manifest is loaded.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Largest manifest accepted, in bytes; reading stops past it.
    pub bytes_max: u64,
    /// When not empty, a manifest is accepted only with a signature one of them made.
    pub public_keys: Vec<ManifestKey>,
}

/// Bytes held while reading, growing at most to the cap (never doubling past it).
struct CappedBuffer {
    bytes: Vec<u8>,
    bytes_max: u64,
}

/// The cap was reached.
struct TooLarge;

impl CappedBuffer {
    fn new(bytes_max: u64) -> CappedBuffer {
        CappedBuffer {
            bytes: Vec::new(),
            bytes_max,
        }
    }

    fn extend(&mut self, chunk: &[u8]) -> Result<(), TooLarge> {
        let length = self.bytes.len() as u64 + chunk.len() as u64;
        if length > self.bytes_max {
            return Err(TooLarge);
        }
        if self.bytes.capacity() < self.bytes.len() + chunk.len() {
            let doubled = (self.bytes.capacity() as u64 * 2).max(length).max(64 << 10);
            let target = usize::try_from(doubled.min(self.bytes_max)).unwrap_or(usize::MAX);
            self.bytes.reserve_exact(target - self.bytes.len());
        }
        self.bytes.extend_from_slice(chunk);
        Ok(())
    }
}

fn too_large(what: &str, bytes_max: u64) -> String {
    format!("{what} is larger than manifest_bytes_max ({bytes_max} bytes): refused")
}

/// Loads, verifies (when keys are configured) and parses the manifest at `location`.
pub async fn load_manifest(
    client: &reqwest::Client,
    location: &ManifestLocation,
    config: &LoadConfig,
    fetch: &FetchConfig,
) -> Result<Manifest, String> {
    let bytes = read(client, location, config.bytes_max, fetch)
        .await
        .map_err(|error| format!("manifest {error}"))?;
    let signature = if config.public_keys.is_empty() {
        None
    } else {
        let signature_location = signature_location(location)?;
        let signature = read(client, &signature_location, SIGNATURE_BYTES_MAX, fetch)
            .await
            .map_err(|error| format!("manifest refused: no signature: {error}"))?;
        Some(signature)
    };
    let keys = config.public_keys.clone();
    let checked = tokio::task::spawn_blocking(move || {
        if let Some(signature) = signature {
            let comment = verify_manifest(&bytes, &signature, &keys)
                .map_err(|error| format!("manifest refused: signature: {error}"))?;
            tracing::info!(trusted_comment = %comment, "fill: manifest signature verified");
        }
        parse_manifest(&bytes).map_err(|error| format!("manifest refused: {error}"))
    });
    checked
        .await
        .map_err(|error| format!("manifest check failed: {error}"))?
}

/// Where the detached signature of `location` is: its URL path or file path plus `.minisig`.
pub fn signature_location(location: &ManifestLocation) -> Result<ManifestLocation, String> {
    match location {
        ManifestLocation::File(path) => {
            let mut signature = path.clone().into_os_string();
            signature.push(SIGNATURE_SUFFIX);
            Ok(ManifestLocation::File(signature.into()))
        }
        ManifestLocation::Url(url) => {
            let mut parsed = reqwest::Url::parse(url)
                .map_err(|error| format!("manifest {}: not a URL: {error}", excerpt(url)))?;
            let path = format!("{}{SIGNATURE_SUFFIX}", parsed.path());
            parsed.set_path(&path);
            Ok(ManifestLocation::Url(parsed.into()))
        }
    }
}

/// Reads at most `bytes_max` bytes from a file or URL; more is an error.
async fn read(
    client: &reqwest::Client,
    location: &ManifestLocation,
    bytes_max: u64,
    fetch: &FetchConfig,
) -> Result<Vec<u8>, String> {
    match location {
        ManifestLocation::File(path) => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || read_file(&path, bytes_max))
                .await
                .map_err(|error| format!("reading failed: {error}"))?
        }
        ManifestLocation::Url(url) => download(client, url, bytes_max, fetch).await,
    }
}

/// Reads a file (regular or not: `/dev/zero` stops at the cap too).
fn read_file(path: &Path, bytes_max: u64) -> Result<Vec<u8>, String> {
    let name = path.display().to_string();
    let mut file = std::fs::File::open(path).map_err(|error| format!("{name}: {error}"))?;
    if let Ok(metadata) = file.metadata() {
        if metadata.is_file() && metadata.len() > bytes_max {
            return Err(too_large(&name, bytes_max));
        }
    }
    let mut buffer = CappedBuffer::new(bytes_max);
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let length = match file.read(&mut chunk) {
            Ok(0) => return Ok(buffer.bytes),
            Ok(length) => length,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(format!("{name}: {error}")),
        };
        buffer
            .extend(&chunk[..length])
            .map_err(|TooLarge| too_large(&name, bytes_max))?;
    }
}

/// Downloads a URL: a response head within `response_timeout`, the body within four stall
/// timeouts, never more than `bytes_max` bytes.
async fn download(
    client: &reqwest::Client,
    url: &str,
    bytes_max: u64,
    fetch: &FetchConfig,
) -> Result<Vec<u8>, String> {
    let name = excerpt(url);
    let request = client.get(url).send();
    let mut response = tokio::time::timeout(fetch.response_timeout, request)
        .await
        .map_err(|_| format!("{name}: no response in time"))?
        .map_err(|error| format!("{name}: {error}"))?;
    let status = response.status();
    if status.is_redirection() {
        return Err(format!(
            "{name}: HTTP {}: a redirect to another origin is not followed",
            status.as_u16()
        ));
    }
    if !status.is_success() {
        return Err(format!("{name}: HTTP {}", status.as_u16()));
    }
    if response
        .content_length()
        .is_some_and(|length| length > bytes_max)
    {
        return Err(too_large(&name, bytes_max));
    }
    let mut buffer = CappedBuffer::new(bytes_max);
    let body = async {
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|error| format!("{name}: {error}"))?
        {
            buffer
                .extend(&chunk)
                .map_err(|TooLarge| too_large(&name, bytes_max))?;
        }
        Ok::<(), String>(())
    };
    tokio::time::timeout(fetch.stall_timeout * 4, body)
        .await
        .map_err(|_| format!("{name}: body too slow"))??;
    Ok(buffer.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_buffers_stop_at_the_cap_and_never_reserve_past_it() {
        let mut buffer = CappedBuffer::new(100_000);
        for _ in 0..9 {
            assert!(buffer.extend(&[7u8; 10_000]).is_ok());
        }
        assert!(buffer.extend(&[7u8; 10_000]).is_ok());
        assert!(buffer.extend(&[7u8; 1]).is_err());
        assert_eq!(buffer.bytes.len(), 100_000);
        assert!(buffer.bytes.capacity() <= 100_000);
    }

    #[test]
    fn files_are_read_up_to_the_cap() {
        let started = std::time::Instant::now();
        let refused = read_file(Path::new("/dev/zero"), 1 << 20).expect_err("endless");
        assert!(
            refused.contains("larger than manifest_bytes_max"),
            "{refused}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        let missing = read_file(Path::new("/nonexistent/m.json"), 10).expect_err("missing");
        assert!(missing.contains("/nonexistent/m.json"), "{missing}");
        let this_file = Path::new(file!()).file_name().unwrap();
        let source = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src")
            .join(this_file);
        assert!(read_file(&source, 100)
            .expect_err("large")
            .contains("refused"));
        assert!(read_file(&source, 1 << 20).is_ok_and(|bytes| bytes.len() > 100));
    }

    #[test]
    fn signatures_sit_next_to_the_manifest() {
        let cases = [
            ("http://o/m.json", "http://o/m.json.minisig"),
            (
                "https://o:8443/a/m.json?box=42",
                "https://o:8443/a/m.json.minisig?box=42",
            ),
            ("/etc/appliance/m.json", "/etc/appliance/m.json.minisig"),
        ];
        for (manifest, expected) in cases {
            let location = ManifestLocation::parse(manifest);
            assert_eq!(
                signature_location(&location),
                Ok(ManifestLocation::parse(expected)),
                "{manifest}"
            );
        }
    }
}
