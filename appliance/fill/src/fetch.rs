//! Downloading one manifest file into the store: sources in order, retries with backoff and
//! jitter, resume with `Range` + `If-Range`, a stall timeout, the shared bandwidth cap, and the
//! SHA-256 check before publish. Bytes stream straight into a store writer; nothing touches
//! the OS disk, and a file whose bytes do not match the manifest is never published.
//!
//! Also the fill's HTTP client: redirects are followed only within the origin of the first
//! request (same scheme, host and port), so neither a manifest nor a file can be steered to
//! another host or from https to http. A file's URL is its source's base URL followed by its
//! manifest path with each segment percent-encoded (the manifest path is the decoded path).

use crate::bucket::SharedBucket;
use crate::manifest::ManifestFile;
use appliance_store::{FileWriter, Store, StoreError};
use sha2::{Digest, Sha256};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Redirect hops followed within one origin before the response is taken as it is.
pub const REDIRECTS_MAX: usize = 5;

/// Bytes of a path segment that are sent as they are; every other byte is percent-encoded.
/// Only RFC 3986's unreserved characters: a reserved character in a segment (`?`, `#`, `;`,
/// `+`, ...) means something to some server, its escape means only the character.
const SEGMENT_ENCODE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The URL of a manifest path at a source: each segment percent-encoded, `/` kept.
pub fn file_url(base_url: &str, path: &str) -> String {
    let mut url = String::with_capacity(base_url.len() + path.len() * 3);
    url.push_str(base_url);
    for (index, segment) in path.split('/').enumerate() {
        if index > 0 {
            url.push('/');
        }
        url.extend(percent_encoding::utf8_percent_encode(
            segment,
            SEGMENT_ENCODE,
        ));
    }
    url
}

/// Whether a redirect from a request that started at `first` may go to `next`: only within
/// the same origin (scheme, host and port), so never to another host nor to a weaker scheme.
pub fn redirect_allowed(first: &reqwest::Url, next: &reqwest::Url) -> bool {
    first.scheme() == next.scheme()
        && first.host_str() == next.host_str()
        && first.port_or_known_default() == next.port_or_known_default()
}

/// The fill's HTTP client: rustls, connect timeout, same-origin redirects only.
pub fn http_client(connect_timeout: Duration) -> Result<reqwest::Client, String> {
    let policy = reqwest::redirect::Policy::custom(|attempt| {
        let allowed = attempt.previous().len() <= REDIRECTS_MAX
            && attempt
                .previous()
                .first()
                .is_some_and(|first| redirect_allowed(first, attempt.url()));
        if allowed {
            attempt.follow()
        } else {
            attempt.stop()
        }
    });
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .redirect(policy)
        .user_agent(concat!("applianced-fill/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|error| format!("HTTP client: {error}"))
}

/// Where files come from: sibling appliances first, then the origin.
#[derive(Debug)]
pub struct Source {
    /// Base URL; a file's URL is the base followed by its path.
    pub base_url: String,
    pub files_ok: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
    pub missing: AtomicU64,
    pub bad_bytes: AtomicU64,
}

impl Source {
    pub fn new(base_url: &str) -> Source {
        Source {
            base_url: base_url.trim_end_matches('/').to_string(),
            files_ok: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            missing: AtomicU64::new(0),
            bad_bytes: AtomicU64::new(0),
        }
    }
}

/// Retry and timeout settings of downloads.
#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// Attempts at one source before the next is tried.
    pub attempts_per_source: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// A response that sends nothing for this long is abandoned (and resumed).
    pub stall_timeout: Duration,
    /// Time to connect and receive the response head.
    pub response_timeout: Duration,
}

impl Default for FetchConfig {
    fn default() -> FetchConfig {
        FetchConfig {
            attempts_per_source: 3,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(30),
            response_timeout: Duration::from_secs(30),
        }
    }
}

/// Why a file was not filled.
#[derive(Debug)]
pub enum FetchError {
    /// Every source failed; the last error of each.
    AllSourcesFailed(Vec<String>),
    /// The store cannot take the file (full drive, no drive, index full).
    Store(StoreError),
    /// The fill was cancelled.
    Cancelled,
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::AllSourcesFailed(errors) => {
                write!(f, "every source failed: {}", errors.join("; "))
            }
            FetchError::Store(error) => write!(f, "store: {error}"),
            FetchError::Cancelled => write!(f, "cancelled"),
        }
    }
}

/// Progress of one file across attempts: what is written so far and how to resume it.
struct Partial {
    writer: Option<FileWriter>,
    hasher: Sha256,
    received_bytes: u64,
    validator: Option<String>,
}

impl Partial {
    fn new() -> Partial {
        Partial {
            writer: None,
            hasher: Sha256::new(),
            received_bytes: 0,
            validator: None,
        }
    }

    /// Throws away what was written (the writer is dropped, so nothing becomes visible).
    fn restart(&mut self) {
        *self = Partial::new();
    }

    /// Between attempts: waits for the writes in flight, so that the writer holds none of the
    /// drive's write slots while it sits idle through the backoff.
    fn settle(&mut self) -> Result<(), FetchError> {
        let Some(writer) = self.writer.as_mut() else {
            return Ok(());
        };
        let settled = tokio::task::block_in_place(|| writer.settle());
        settled.map_err(|error| {
            self.restart();
            FetchError::Store(error)
        })
    }
}

/// How one attempt ended.
enum Attempt {
    Published,
    /// Try again at the same source (resuming where possible).
    Retry(String),
    /// This source cannot provide the file: go to the next one.
    NextSource(String),
}

/// Fills `file` from the first source that provides it intact; returns that source's index.
pub async fn fetch_file(
    client: &reqwest::Client,
    store: &Store,
    file: &ManifestFile,
    sources: &[Source],
    bucket: &SharedBucket,
    config: &FetchConfig,
    cancel: &CancellationToken,
) -> Result<usize, FetchError> {
    let mut errors = Vec::new();
    for (number, source) in sources.iter().enumerate() {
        let mut partial = Partial::new();
        let mut backoff = config.backoff_initial;
        for attempt in 0..config.attempts_per_source.max(1) {
            if cancel.is_cancelled() {
                return Err(FetchError::Cancelled);
            }
            if attempt > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(jittered(backoff, &file.path, attempt)) => {}
                    _ = cancel.cancelled() => return Err(FetchError::Cancelled),
                }
                backoff = (backoff * 2).min(config.backoff_max);
            }
            match attempt_once(
                client,
                store,
                file,
                source,
                &mut partial,
                bucket,
                config,
                cancel,
            )
            .await
            {
                Ok(Attempt::Published) => {
                    source.files_ok.fetch_add(1, Ordering::Relaxed);
                    return Ok(number);
                }
                Ok(Attempt::Retry(why)) => {
                    partial.settle()?;
                    source.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(path = %file.path, source = %source.base_url, %why, "fill attempt failed");
                    errors.push(format!("{}: {why}", source.base_url));
                }
                Ok(Attempt::NextSource(why)) => {
                    errors.push(format!("{}: {why}", source.base_url));
                    break;
                }
                Err(error) => return Err(error),
            }
        }
    }
    Err(FetchError::AllSourcesFailed(errors))
}

/// Backoff with up to 50% jitter, derived from the path and attempt (no shared RNG needed).
fn jittered(backoff: Duration, path: &str, attempt: u32) -> Duration {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for byte in path.bytes().chain(attempt.to_le_bytes()) {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    let nanos = u64::try_from(backoff.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(nanos / 2 + hash % (nanos / 2 + 1))
}

#[allow(clippy::too_many_arguments)]
async fn attempt_once(
    client: &reqwest::Client,
    store: &Store,
    file: &ManifestFile,
    source: &Source,
    partial: &mut Partial,
    bucket: &SharedBucket,
    config: &FetchConfig,
    cancel: &CancellationToken,
) -> Result<Attempt, FetchError> {
    let url = file_url(&source.base_url, &file.path);
    let mut request = client.get(&url);
    if partial.received_bytes > 0 {
        request = request.header("Range", format!("bytes={}-", partial.received_bytes));
        if let Some(validator) = &partial.validator {
            request = request.header("If-Range", validator.clone());
        }
    }
    let sent = tokio::select! {
        sent = tokio::time::timeout(config.response_timeout, request.send()) => sent,
        _ = cancel.cancelled() => return Err(FetchError::Cancelled),
    };
    let response = match sent {
        Err(_) => return Ok(Attempt::Retry("no response in time".into())),
        Ok(Err(error)) => return Ok(Attempt::Retry(format!("request failed: {error}"))),
        Ok(Ok(response)) => response,
    };
    let status = response.status().as_u16();
    match status {
        200 => {
            if partial.received_bytes > 0 {
                // The source ignored our range (or the file changed): start over cleanly.
                partial.restart();
            }
            if let Some(length) = response.content_length() {
                if length != file.size_bytes {
                    source.bad_bytes.fetch_add(1, Ordering::Relaxed);
                    return Ok(Attempt::NextSource(format!(
                        "length {length} differs from the manifest's {}",
                        file.size_bytes
                    )));
                }
            }
        }
        206 => {
            let expected = format!(
                "bytes {}-{}/{}",
                partial.received_bytes,
                file.size_bytes.saturating_sub(1),
                file.size_bytes
            );
            let content_range = header(&response, "content-range");
            if partial.received_bytes == 0 || content_range.as_deref() != Some(expected.as_str()) {
                partial.restart();
                return Ok(Attempt::Retry(format!(
                    "unexpected partial response {content_range:?}"
                )));
            }
        }
        404 | 410 => {
            source.missing.fetch_add(1, Ordering::Relaxed);
            return Ok(Attempt::NextSource(format!("HTTP {status}")));
        }
        300..=399 => {
            // A redirect the client did not follow: it leaves the source's origin.
            source.errors.fetch_add(1, Ordering::Relaxed);
            let location = header(&response, "location").unwrap_or_default();
            return Ok(Attempt::NextSource(format!(
                "HTTP {status} to another origin, not followed ({})",
                crate::manifest::excerpt(&location)
            )));
        }
        _ => return Ok(Attempt::Retry(format!("HTTP {status}"))),
    }
    if partial.validator.is_none() {
        partial.validator = header(&response, "etag")
            .filter(|etag| !etag.starts_with("W/"))
            .or_else(|| header(&response, "last-modified"));
    }
    if partial.writer.is_none() {
        // Creating may wait for reclaim to give the path back: a blocking call.
        let writer = tokio::task::block_in_place(|| store.create(&file.path, file.size_bytes))
            .map_err(FetchError::Store)?;
        partial.writer = Some(writer);
    }
    stream_body(response, file, source, partial, bucket, config, cancel).await
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string)
}

async fn stream_body(
    mut response: reqwest::Response,
    file: &ManifestFile,
    source: &Source,
    partial: &mut Partial,
    bucket: &SharedBucket,
    config: &FetchConfig,
    cancel: &CancellationToken,
) -> Result<Attempt, FetchError> {
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(config.stall_timeout, response.chunk()) => next,
            _ = cancel.cancelled() => {
                partial.restart();
                return Err(FetchError::Cancelled);
            }
        };
        let chunk = match next {
            Err(_) => return Ok(Attempt::Retry("stalled".into())),
            Ok(Err(error)) => return Ok(Attempt::Retry(format!("body cut: {error}"))),
            Ok(Ok(None)) => break,
            Ok(Ok(Some(chunk))) => chunk,
        };
        let length = chunk.len() as u64;
        if partial.received_bytes + length > file.size_bytes {
            partial.restart();
            source.bad_bytes.fetch_add(1, Ordering::Relaxed);
            return Ok(Attempt::NextSource("longer than the manifest says".into()));
        }
        tokio::select! {
            _ = bucket.acquire(length) => {}
            _ = cancel.cancelled() => {
                partial.restart();
                return Err(FetchError::Cancelled);
            }
        }
        partial.hasher.update(&chunk);
        let writer = partial.writer.as_mut().expect("created before the body");
        let appended = tokio::task::block_in_place(|| writer.append(&chunk));
        if let Err(error) = appended {
            partial.restart();
            return Err(FetchError::Store(error));
        }
        partial.received_bytes += length;
        source.bytes.fetch_add(length, Ordering::Relaxed);
    }
    if partial.received_bytes < file.size_bytes {
        return Ok(Attempt::Retry(format!(
            "short body: {} of {} bytes",
            partial.received_bytes, file.size_bytes
        )));
    }
    let digest: [u8; 32] = partial.hasher.clone().finalize().into();
    if digest != file.sha256 {
        partial.restart();
        source.bad_bytes.fetch_add(1, Ordering::Relaxed);
        return Ok(Attempt::NextSource(
            "bytes do not match the manifest's SHA-256".into(),
        ));
    }
    let writer = partial.writer.take().expect("created before the body");
    let published = tokio::task::block_in_place(|| writer.publish(digest));
    partial.restart();
    published.map_err(FetchError::Store)?;
    Ok(Attempt::Published)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_urls_encode_each_segment() {
        let cases = [
            ("/title/1080p.mp4", "http://o/title/1080p.mp4"),
            ("/a b/c", "http://o/a%20b/c"),
            ("/50%/x#1?.mp4", "http://o/50%25/x%231%3F.mp4"),
            ("/été/ü", "http://o/%C3%A9t%C3%A9/%C3%BC"),
            ("/a+b;c=d&e:f@g", "http://o/a%2Bb%3Bc%3Dd%26e%3Af%40g"),
            ("/-._~", "http://o/-._~"),
            ("/%2e%2e", "http://o/%252e%252e"),
        ];
        for (path, expected) in cases {
            assert_eq!(file_url("http://o", path), expected, "{path}");
            let parsed = reqwest::Url::parse(&file_url("http://o", path)).expect(path);
            assert_eq!(parsed.as_str(), expected, "the URL parser keeps it: {path}");
        }
    }

    #[test]
    fn redirects_stay_within_the_origin() {
        let url = |text: &str| reqwest::Url::parse(text).expect(text);
        let cases = [
            ("http://o/m.json", "http://o/other.json", true),
            ("http://o/m.json", "http://o:80/x", true),
            ("https://o/m.json", "https://o:443/x", true),
            ("https://o/m.json", "http://o/m.json", false),
            ("http://o/m.json", "https://o/m.json", false),
            ("http://o/m.json", "http://evil/m.json", false),
            ("http://o:8080/m.json", "http://o:8081/m.json", false),
            ("http://127.0.0.1/m", "http://localhost/m", false),
        ];
        for (first, next, expected) in cases {
            assert_eq!(
                redirect_allowed(&url(first), &url(next)),
                expected,
                "{first} -> {next}"
            );
        }
    }
}
