//! The configuration file (TOML, default `/etc/appliance/appliance.toml`): every key has a
//! documented default; an unknown key or a bad value is an error that names the key.

use anyhow::{bail, Context, Result};
use appliance_serve::{AccessLogTarget, ServeConfig};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Data drives (block devices or files), in a fixed order.
    pub drives: Vec<PathBuf>,
    /// State kept on the OS disk (the failed-drive list). Default `/var/lib/appliance`.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The control socket `appliance-ctl` talks to. Default `/run/appliance/control.sock`.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Log level or filter (`error`, `warn`, `info`, `debug`, or a tracing filter such as
    /// `info,appliance_fill=debug`); RUST_LOG wins when set. Default `info`.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    #[serde(default)]
    pub serve: Serve,
    #[serde(default)]
    pub fill: Fill,
    #[serde(default)]
    pub scrub: Scrub,
    /// The HTTPS listener; absent: no HTTPS.
    pub tls: Option<Tls>,
}

/// `[tls]`: the HTTPS listener. TLS 1.3 and 1.2 only (ECDHE with AES-GCM or
/// ChaCha20-Poly1305), ALPN `http/1.1`, session resumption by tickets whose keys rotate.
/// SIGHUP loads the certificate files again; a bad one keeps the certificates in use and the
/// log says why.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// HTTPS listener, for example `0.0.0.0:8443`. Required.
    pub listen: SocketAddr,
    /// Certificate chains and their keys, as PEM files: `[{ cert = "...", key = "..." }]`.
    /// The certificate a client gets is chosen by the name it sends (SNI) among the DNS
    /// names of each certificate (wildcards one level deep); the first is for every other
    /// client. Each must be readable, unexpired, and its key must match. Required.
    pub certificates: Vec<TlsCertificate>,
    /// From accept to the end of the TLS handshake; a client still in its handshake then is
    /// cut. Default 10000.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// `auto`: hand each connection's keys to the kernel (kTLS) when it can take them, so
    /// bodies go out with sendfile encrypted by the kernel; else rustls encrypts in the
    /// process. `off`: always in the process. Default `auto`.
    #[serde(default = "default_kernel_tls")]
    pub kernel_tls: appliance_serve::KernelTls,
}

/// One certificate chain (leaf first) and its private key (PKCS#8, PKCS#1 or SEC1), as PEM.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsCertificate {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn default_handshake_timeout_ms() -> u64 {
    10_000
}

fn default_kernel_tls() -> appliance_serve::KernelTls {
    appliance_serve::KernelTls::Auto
}

impl Tls {
    fn certificate_files(&self) -> Vec<appliance_serve::CertificateFiles> {
        self.certificates
            .iter()
            .map(|certificate| appliance_serve::CertificateFiles {
                cert: certificate.cert.clone(),
                key: certificate.key.clone(),
            })
            .collect()
    }

    /// The listener's settings for serving.
    pub fn tls_config(&self) -> appliance_serve::TlsConfig {
        appliance_serve::TlsConfig {
            listen: self.listen,
            certificates: self.certificate_files(),
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
            kernel_tls: self.kernel_tls,
        }
    }

    /// Loads every certificate and key as serving would (readable, PEM, matching).
    fn check(&self) -> Result<()> {
        if self.certificates.is_empty() {
            bail!("tls.certificates: at least one certificate is needed");
        }
        if self.handshake_timeout_ms == 0 {
            bail!("tls.handshake_timeout_ms: must be greater than 0");
        }
        self.identities()?;
        Ok(())
    }

    fn identities(&self) -> Result<appliance_serve::tls::Identities> {
        appliance_serve::tls::Identities::load(&self.certificate_files())
            .map_err(|error| anyhow::anyhow!("tls.certificates: {error}"))
    }

    /// `check-config`'s stricter look: every certificate must also be valid now. (Start and
    /// SIGHUP only log this: an expired certificate must not take plain HTTP and every other
    /// setting down with it; a reload keeps the certificates in use instead.)
    pub fn check_valid_now(&self) -> Result<()> {
        let problems = self
            .identities()?
            .validity_problems(appliance_serve::tls::now_unix_s());
        if !problems.is_empty() {
            bail!("tls.certificates: {}", problems.join("; "));
        }
        Ok(())
    }
}

/// `[scrub]`: the background scrubber, which re-reads every stored file with direct I/O and
/// checks it against its checksums, so that a rotted sector is taken out of service instead
/// of being served (serving never checks). Runs at idle CPU priority. SIGHUP applies all three
/// keys: a new period or ceiling paces the pass under way from its next file on (the pass goes
/// on, it does not start over); `enabled = false` stops the scrubber, keeping its findings, and
/// `enabled = true` starts it with a new pass.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scrub {
    /// Whether the scrubber runs. Default true.
    pub enabled: bool,
    /// Every stored file is checked once per period: the pace is the stored bytes over the
    /// period. At least 1. Default 604800 (one week).
    pub period_s: u64,
    /// Ceiling on the pace, in bytes per second; above 0. When the stored bytes need more
    /// than this to be checked within the period, a pass takes longer. Default 52428800
    /// (50 MiB/s).
    pub bytes_per_s_max: u64,
}

impl Default for Scrub {
    fn default() -> Scrub {
        Scrub {
            enabled: true,
            period_s: 604_800,
            bytes_per_s_max: 50 << 20,
        }
    }
}

/// `[fill]`: where the manifest and the files come from, when, and how fast.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Fill {
    /// The manifest: an http(s) URL or a file path. Default: none (fills need one given).
    pub manifest: Option<String>,
    /// Largest manifest accepted, in bytes, for URLs and files alike; reading stops past it
    /// and the fill is refused. Default 1073741824 (1 GiB).
    pub manifest_bytes_max: u64,
    /// minisign public keys (the `RWQ...` line of a `minisign.pub`). When any is set, a
    /// manifest is accepted only with a valid signature by one of them at the manifest's
    /// URL or path plus `.minisig`; otherwise refused as a whole. Default: none (unsigned
    /// manifests are accepted).
    pub manifest_public_keys: Vec<String>,
    /// Base URLs in order: sibling appliances first, then the origin. Default: none.
    pub sources: Vec<String>,
    /// Downloads at once. Default 4.
    pub concurrency: usize,
    /// Cap on the fill's download rate in bits per second; 0 means none. Default 0.
    pub bandwidth_bits_per_s: u64,
    /// Daily fill window in local time, e.g. "02:00-14:00"; empty: only operator fills.
    pub window: String,
    /// IANA time zone of the window. Default "UTC".
    pub time_zone: String,
    /// Upper bound of the random delay after the window opens. Default 600.
    pub start_delay_max_s: u64,
    /// Within the window, how often the manifest is fetched again. Default 3600.
    pub refetch_interval_s: u64,
    /// How long a file dropped from the manifest is kept before deletion. Default 86400.
    pub delete_grace_s: u64,
    /// Attempts at one source before the next. Default 3.
    pub attempts_per_source: u32,
    /// First retry delay (doubling, with jitter). Default 200.
    pub backoff_initial_ms: u64,
    /// Longest retry delay. Default 30000.
    pub backoff_max_ms: u64,
    /// A source that sends nothing for this long is abandoned and resumed. Default 30000.
    pub stall_timeout_ms: u64,
    /// Time to connect and get the response head. Default 30000.
    pub response_timeout_ms: u64,
}

impl Default for Fill {
    fn default() -> Fill {
        Fill {
            manifest: None,
            manifest_bytes_max: 1 << 30,
            manifest_public_keys: Vec::new(),
            sources: Vec::new(),
            concurrency: 4,
            bandwidth_bits_per_s: 0,
            window: String::new(),
            time_zone: "UTC".to_string(),
            start_delay_max_s: 600,
            refetch_interval_s: 3600,
            delete_grace_s: 86_400,
            attempts_per_source: 3,
            backoff_initial_ms: 200,
            backoff_max_ms: 30_000,
            stall_timeout_ms: 30_000,
            response_timeout_ms: 30_000,
        }
    }
}

/// `[serve]`: the subscriber listener, its limits, and the admin listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Serve {
    /// Plain HTTP subscriber listener. Default `0.0.0.0:8080`.
    pub listen: SocketAddr,
    /// Whether the plain HTTP listener runs; `false` serves HTTPS only (`[tls]` is then
    /// required). Default `true`.
    pub plain_http: bool,
    /// Admin listener (health, metrics, drain); keep it on loopback. Default `127.0.0.1:8081`.
    pub admin_listen: SocketAddr,
    /// Longest request line (414 beyond). Default 8192.
    pub request_line_bytes_max: usize,
    /// Longest request head (431 beyond). Default 16384.
    pub header_bytes_max: usize,
    /// Time from a request's first byte to its complete head. Default 10000.
    pub header_read_timeout_ms: u64,
    /// Time a keep-alive connection may wait for its next request. Default 60000.
    pub idle_timeout_ms: u64,
    /// Time a send may make no progress before the connection is closed. Default 30000.
    /// Time a cold piece spends on the drive is not the client's and is not counted, up to
    /// one send timeout per wait; a wait on the drive longer than that ends the response.
    pub send_timeout_ms: u64,
    /// The least a client must take while a response is sent to it, in bytes per second
    /// averaged over each `send_rate_window_ms`; a client below it is cut (connection reset,
    /// counted in `appliance_http_slow_clients_total`, logged). Progress resets the send
    /// timeout, so without this a client reading a byte a second would hold its slot for
    /// hours. Only a window that ends while a response is still being sent is judged. 0 turns
    /// the check off. Default 4096: far below any video bitrate, so a player on a bad network
    /// stays, and a paused player is cut no sooner than by the send timeout.
    pub send_rate_min_bytes_per_s: u64,
    /// The window of `send_rate_min_bytes_per_s`: a client is judged on what it took over
    /// each whole window, so bursts and short stalls even out. Must be greater than 0.
    /// Default 30000.
    pub send_rate_window_ms: u64,
    /// Connections served at once; more wait in the listen backlog. Default 20000.
    pub connections_max: usize,
    /// Requests on one connection before it is closed. Default 10000.
    pub requests_per_connection_max: u64,
    /// On a miss, 302 to this base URL with the same path and query. Default: 404 instead.
    pub miss_redirect_base: Option<String>,
    /// File holding the key of signed URLs; when set, every request must be signed (the token
    /// format is in `appliance/serve/src/signed.rs`). Default: none, no signing.
    ///
    /// Key file format: the key is the file's bytes, exactly. Nothing is trimmed, decoded or
    /// ended: any byte value may be part of the key (a random binary key often begins or ends
    /// with a whitespace or NUL byte), and a final line break is part of the key too, so write
    /// the file with `head -c 32 /dev/random > FILE` or `printf '%s' "$key" > FILE`, not with
    /// `echo`. The key must be 16 to 4096 bytes long; `check-config` and start refuse anything
    /// else, and warn about a key that reads as one line of text ending in a line break.
    pub url_signing_key_file: Option<PathBuf>,
    /// `off`, `-` (standard error) or a file path. Default `off`.
    pub access_log: String,
    /// Threads of the serving runtime; 0 means one per core. Default 0.
    pub worker_threads: usize,
    /// How long a stop waits for responses in flight. Default 30000.
    pub shutdown_grace_ms: u64,
    /// Where a range that is not in the page cache is read: `pool` (its sendfile runs on a
    /// thread of the drive's cold-read pool, so a serving worker never waits for a drive),
    /// `warm` (the drive's io_uring thread reads it into the page cache first, then the worker
    /// sends it) or `inline` (on the worker; for comparison). Resident ranges always go out
    /// inline with sendfile. Default `pool`.
    pub cold_read: appliance_serve::ColdRead,
    /// Threads per drive for cold sendfiles (`cold_read = "pool"`), 1 to 1024. The reads of
    /// a cold range are queued at once by a read-ahead hint, so the drive's queue depth is not
    /// bounded by this; it bounds the cold ranges being sent at once per drive. Default 16.
    pub cold_threads_per_drive: usize,
    /// With `cold_read = "direct"`: the RAM, in MiB, that keeps recent direct reads to be
    /// sent again without the drive (keyed by content: a file's SHA-256 and offset). 0 turns
    /// it off. Default 64.
    pub cold_direct_cache_mib: u64,
}

impl Default for Serve {
    fn default() -> Serve {
        let defaults = ServeConfig::default();
        Serve {
            listen: defaults.listen.expect("a default listener"),
            plain_http: true,
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            request_line_bytes_max: defaults.limits.request_line_bytes_max,
            header_bytes_max: defaults.limits.header_bytes_max,
            header_read_timeout_ms: millis(defaults.header_read_timeout),
            idle_timeout_ms: millis(defaults.idle_timeout),
            send_timeout_ms: millis(defaults.send_timeout),
            send_rate_min_bytes_per_s: defaults.send_rate_min.bytes_per_s,
            send_rate_window_ms: millis(defaults.send_rate_min.window),
            connections_max: defaults.connections_max,
            requests_per_connection_max: defaults.requests_per_connection_max,
            miss_redirect_base: None,
            url_signing_key_file: None,
            access_log: "off".to_string(),
            worker_threads: 0,
            shutdown_grace_ms: millis(defaults.shutdown_grace),
            cold_read: defaults.cold.mode,
            cold_threads_per_drive: defaults.cold.threads_per_drive,
            cold_direct_cache_mib: defaults.cold.direct_cache_bytes >> 20,
        }
    }
}

/// Shortest URL-signing key accepted: shorter keys are guessable.
const URL_SIGNING_KEY_BYTES_MIN: usize = 16;
/// Longest URL-signing key accepted. HMAC-SHA256 hashes a key longer than its 64-byte block,
/// so length adds nothing past that; a longer file is a wrong path (a log, a device).
const URL_SIGNING_KEY_BYTES_MAX: usize = 4096;

/// Reads a URL-signing key file (format: `Serve::url_signing_key_file`): its bytes, exactly.
pub fn read_url_signing_key(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let context = || format!("serve.url_signing_key_file: reading {}", path.display());
    let file = std::fs::File::open(path).with_context(context)?;
    let mut key = Vec::with_capacity(URL_SIGNING_KEY_BYTES_MAX);
    file.take(u64::try_from(URL_SIGNING_KEY_BYTES_MAX).unwrap_or(u64::MAX) + 1)
        .read_to_end(&mut key)
        .with_context(context)?;
    check_url_signing_key(&key).with_context(|| {
        format!(
            "serve.url_signing_key_file: {} (the key is the file's bytes, exactly)",
            path.display()
        )
    })?;
    if reads_as_a_text_line(&key) {
        tracing::warn!(
            path = %path.display(),
            "serve.url_signing_key_file: the key reads as a line of text; its final line break \
             is part of the key, and steering must sign with it too"
        );
    }
    Ok(key)
}

fn check_url_signing_key(key: &[u8]) -> Result<()> {
    let length = key.len();
    if length == 0 {
        bail!("the key file is empty");
    }
    if length < URL_SIGNING_KEY_BYTES_MIN {
        bail!(
            "the key is too short: {URL_SIGNING_KEY_BYTES_MIN} bytes at least, the file holds \
             {length}"
        );
    }
    if length > URL_SIGNING_KEY_BYTES_MAX {
        bail!("the key is longer than {URL_SIGNING_KEY_BYTES_MAX} bytes");
    }
    Ok(())
}

/// Printable ASCII ending in one line break: what `echo "$key" > FILE` writes. A random
/// binary key looks like this about once in 10^9 at 16 bytes, once in 10^16 at 32.
fn reads_as_a_text_line(key: &[u8]) -> bool {
    let text = key
        .strip_suffix(b"\r\n")
        .or_else(|| key.strip_suffix(b"\n"));
    text.is_some_and(|text| text.iter().all(|byte| (b' '..=b'~').contains(byte)))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn default_log_level() -> String {
    "info".to_string()
}

fn default_control_socket() -> PathBuf {
    PathBuf::from(appliance_proto::DEFAULT_SOCKET)
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/appliance")
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let config: Config =
            toml::from_str(&text).with_context(|| format!("in {}", path.display()))?;
        config
            .check()
            .with_context(|| format!("in {}", path.display()))?;
        Ok(config)
    }

    fn check(&self) -> Result<()> {
        if self.drives.is_empty() {
            bail!("drives: at least one data drive is needed");
        }
        if let Err(error) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            bail!(
                "log_level: {:?} is not a level or filter: {error}",
                self.log_level
            );
        }
        let serve = &self.serve;
        let positive: [(&str, u64); 8] = [
            (
                "serve.request_line_bytes_max",
                serve.request_line_bytes_max as u64,
            ),
            ("serve.header_bytes_max", serve.header_bytes_max as u64),
            ("serve.header_read_timeout_ms", serve.header_read_timeout_ms),
            ("serve.idle_timeout_ms", serve.idle_timeout_ms),
            ("serve.send_timeout_ms", serve.send_timeout_ms),
            ("serve.send_rate_window_ms", serve.send_rate_window_ms),
            ("serve.connections_max", serve.connections_max as u64),
            (
                "serve.requests_per_connection_max",
                serve.requests_per_connection_max,
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                bail!("{key}: must be greater than 0");
            }
        }
        if serve.header_bytes_max < serve.request_line_bytes_max {
            bail!("serve.header_bytes_max: must be at least serve.request_line_bytes_max");
        }
        if !(1..=1024).contains(&serve.cold_threads_per_drive) {
            bail!("serve.cold_threads_per_drive: must be 1 to 1024");
        }
        if serve.cold_direct_cache_mib > 1 << 20 {
            bail!("serve.cold_direct_cache_mib: must be at most 1048576 (1 TiB)");
        }
        let fill = &self.fill;
        for source in &fill.sources {
            if !(source.starts_with("http://") || source.starts_with("https://")) {
                bail!("fill.sources: {source:?} is not an http(s) URL");
            }
        }
        if fill.concurrency == 0 {
            bail!("fill.concurrency: must be greater than 0");
        }
        if fill.attempts_per_source == 0 {
            bail!("fill.attempts_per_source: must be greater than 0");
        }
        self.manifest_public_keys()?;
        for (key, value) in [
            ("fill.manifest_bytes_max", fill.manifest_bytes_max),
            ("fill.stall_timeout_ms", fill.stall_timeout_ms),
            ("fill.response_timeout_ms", fill.response_timeout_ms),
            ("fill.refetch_interval_s", fill.refetch_interval_s),
            ("scrub.period_s", self.scrub.period_s),
            ("scrub.bytes_per_s_max", self.scrub.bytes_per_s_max),
        ] {
            if value == 0 {
                bail!("{key}: must be greater than 0");
            }
        }
        self.fill_window()?;
        match &self.tls {
            Some(tls) => tls.check()?,
            None if !serve.plain_http => {
                bail!("serve.plain_http: false needs a [tls] listener, else nothing is served")
            }
            None => {}
        }
        if let Some(base) = &serve.miss_redirect_base {
            if !(base.starts_with("http://") || base.starts_with("https://")) {
                bail!("serve.miss_redirect_base: {base:?} is not an http(s) URL");
            }
        }
        Ok(())
    }

    fn fill_window(&self) -> Result<Option<appliance_fill::schedule::FillWindow>> {
        if self.fill.window.is_empty() {
            return Ok(None);
        }
        appliance_fill::schedule::parse_window(&self.fill.window, &self.fill.time_zone)
            .map(Some)
            .map_err(|error| anyhow::anyhow!("fill.window / fill.time_zone: {error}"))
    }

    fn manifest_public_keys(&self) -> Result<Vec<appliance_fill::ManifestKey>> {
        let keys = &self.fill.manifest_public_keys;
        keys.iter()
            .enumerate()
            .map(|(index, text)| {
                appliance_fill::ManifestKey::parse(text)
                    .map_err(|error| anyhow::anyhow!("fill.manifest_public_keys[{index}]: {error}"))
            })
            .collect()
    }

    /// The fill settings.
    pub fn fill_config(&self) -> Result<appliance_fill::FillConfig> {
        let fill = &self.fill;
        Ok(appliance_fill::FillConfig {
            manifest: fill
                .manifest
                .as_deref()
                .map(appliance_fill::ManifestLocation::parse),
            manifest_load: appliance_fill::LoadConfig {
                bytes_max: fill.manifest_bytes_max,
                public_keys: self.manifest_public_keys()?,
            },
            sources: fill.sources.clone(),
            concurrency: fill.concurrency,
            bandwidth_bits_per_s: fill.bandwidth_bits_per_s,
            fetch: appliance_fill::fetch::FetchConfig {
                attempts_per_source: fill.attempts_per_source,
                backoff_initial: Duration::from_millis(fill.backoff_initial_ms),
                backoff_max: Duration::from_millis(fill.backoff_max_ms),
                stall_timeout: Duration::from_millis(fill.stall_timeout_ms),
                response_timeout: Duration::from_millis(fill.response_timeout_ms),
            },
            delete_grace_s: fill.delete_grace_s,
            window: self.fill_window()?,
            start_delay_max_s: fill.start_delay_max_s,
            refetch_interval_s: fill.refetch_interval_s,
            state_path: self.state_dir.join("fill-state.json"),
        })
    }

    /// The scrubber's settings.
    pub fn scrub_config(&self) -> crate::scrub::ScrubConfig {
        crate::scrub::ScrubConfig {
            enabled: self.scrub.enabled,
            period: Duration::from_secs(self.scrub.period_s),
            bytes_per_s_max: self.scrub.bytes_per_s_max,
        }
    }

    /// The serving settings, with the signing key read from its file.
    pub fn serve_config(&self) -> Result<ServeConfig> {
        let serve = &self.serve;
        let url_signing_key = match &serve.url_signing_key_file {
            Some(path) => Some(read_url_signing_key(path)?),
            None => None,
        };
        let access_log = match serve.access_log.as_str() {
            "off" => AccessLogTarget::Off,
            "-" => AccessLogTarget::Stderr,
            path => AccessLogTarget::File(PathBuf::from(path)),
        };
        Ok(ServeConfig {
            listen: serve.plain_http.then_some(serve.listen),
            tls: self.tls.as_ref().map(Tls::tls_config),
            limits: appliance_serve::http::Limits {
                request_line_bytes_max: serve.request_line_bytes_max,
                header_bytes_max: serve.header_bytes_max,
                ..appliance_serve::http::Limits::default()
            },
            header_read_timeout: Duration::from_millis(serve.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(serve.idle_timeout_ms),
            send_timeout: Duration::from_millis(serve.send_timeout_ms),
            send_rate_min: appliance_serve::SendRateMin {
                bytes_per_s: serve.send_rate_min_bytes_per_s,
                window: Duration::from_millis(serve.send_rate_window_ms),
            },
            connections_max: serve.connections_max,
            requests_per_connection_max: serve.requests_per_connection_max,
            miss_redirect_base: serve.miss_redirect_base.clone(),
            url_signing_key,
            access_log,
            shutdown_grace: Duration::from_millis(serve.shutdown_grace_ms),
            cold: appliance_serve::ColdConfig {
                mode: serve.cold_read,
                threads_per_drive: serve.cold_threads_per_drive,
                direct_cache_bytes: serve.cold_direct_cache_mib << 20,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected_error: Option<&str>) {
        let parsed: Result<Config> = toml::from_str::<Config>(text)
            .map_err(anyhow::Error::from)
            .and_then(|config| config.check().map(|()| config));
        match (parsed, expected_error) {
            (Ok(_), None) => {}
            (Err(error), Some(expected)) => {
                let text = format!("{error:#}");
                assert!(text.contains(expected), "{text:?} lacks {expected:?}");
            }
            (Ok(_), Some(expected)) => panic!("accepted, expected an error about {expected}"),
            (Err(error), None) => panic!("refused: {error:#}"),
        }
    }

    #[test]
    fn configs_are_checked_and_errors_name_the_key() {
        check("drives = [\"/dev/nvme1n1\"]", None);
        check(
            "drives = [\"/a\"]\n[serve]\nlisten = \"127.0.0.1:80\"\naccess_log = \"-\"",
            None,
        );
        check("drives = []", Some("drives"));
        check("drives = [\"/a\"]\nbogus = 1", Some("bogus"));
        check(
            "drives = [\"/a\"]\n[serve]\nlisten = \"nowhere\"",
            Some("listen"),
        );
        check(
            "drives = [\"/a\"]\n[serve]\nidle_timeout_ms = 0",
            Some("serve.idle_timeout_ms"),
        );
        check(
            "drives = [\"/a\"]\n[serve]\nsend_rate_window_ms = 0",
            Some("serve.send_rate_window_ms"),
        );
        check(
            "drives = [\"/a\"]\n[serve]\nsend_rate_min_bytes_per_s = 0",
            None,
        );
        check(
            "drives = [\"/a\"]\n[serve]\nsend_rate_min_bytes_per_s = -1",
            Some("send_rate_min_bytes_per_s"),
        );
        check(
            "drives = [\"/a\"]\n[serve]\nconnections_max = -1",
            Some("connections_max"),
        );
        check(
            "drives = [\"/a\"]\n[serve]\ncold_read = \"warm\"\ncold_threads_per_drive = 4",
            None,
        );
        check(
            "drives = [\"/a\"]\n[serve]\ncold_read = \"sometimes\"",
            Some("cold_read"),
        );
        check(
            "drives = [\"/a\"]\n[serve]\ncold_threads_per_drive = 0",
            Some("serve.cold_threads_per_drive"),
        );
        check(
            "drives = [\"/a\"]\n[serve]\ncold_read = \"direct\"\ncold_direct_cache_mib = 0",
            None,
        );
        check(
            "drives = [\"/a\"]\n[serve]\ncold_direct_cache_mib = 2000000",
            Some("serve.cold_direct_cache_mib"),
        );
        check(
            "drives = [\"/a\"]\n[serve]\nmiss_redirect_base = \"ftp://x\"",
            Some("serve.miss_redirect_base"),
        );
        check(
            "drives = [\"/a\"]\n[serve]\nheader_bytes_max = 100\nrequest_line_bytes_max = 200",
            Some("serve.header_bytes_max"),
        );
        check(
            "drives = [\"/a\"]\n[fill]\nsources = [\"http://o/\"]\nwindow = \"02:00-14:00\"\n\
             time_zone = \"Europe/Paris\"\nbandwidth_bits_per_s = 1200000000",
            None,
        );
        check(
            "drives = [\"/a\"]\n[fill]\nsources = [\"ftp://o\"]",
            Some("fill.sources"),
        );
        check(
            "drives = [\"/a\"]\n[fill]\nwindow = \"25:00-14:00\"",
            Some("fill.window"),
        );
        check(
            "drives = [\"/a\"]\n[fill]\nwindow = \"02:00-04:00\"\ntime_zone = \"Mars/Base\"",
            Some("fill.window"),
        );
        check(
            "drives = [\"/a\"]\n[fill]\nconcurrency = 0",
            Some("fill.concurrency"),
        );
        check(
            "drives = [\"/a\"]\n[fill]\nmanifest_bytes_max = 0",
            Some("fill.manifest_bytes_max"),
        );
        check(
            "drives = [\"/a\"]\n[fill]\nmanifest_bytes_max = 4096\nmanifest_public_keys = \
             [\"RWQ8Y0zeLVoz61tyPDjcyhw/O02YKE/3mI8ySn3mv+VHM1mzMUcQNdCt\"]",
            None,
        );
        check(
            "drives = [\"/a\"]\n[fill]\nmanifest_public_keys = \
             [\"RWQ8Y0zeLVoz61tyPDjcyhw/O02YKE/3mI8ySn3mv+VHM1mzMUcQNdCt\", \"RWQnope\"]",
            Some("fill.manifest_public_keys[1]: \"RWQnope\" is not a minisign public key"),
        );
        check(
            "drives = [\"/a\"]\n[scrub]\nenabled = false\nperiod_s = 1\nbytes_per_s_max = 1",
            None,
        );
        check(
            "drives = [\"/a\"]\n[scrub]\nperiod_s = 0",
            Some("scrub.period_s: must be greater than 0"),
        );
        check(
            "drives = [\"/a\"]\n[scrub]\nperiod_s = -5",
            Some("period_s"),
        );
        check(
            "drives = [\"/a\"]\n[scrub]\nbytes_per_s_max = 0",
            Some("scrub.bytes_per_s_max: must be greater than 0"),
        );
        check(
            "drives = [\"/a\"]\n[scrub]\nenabled = \"yes\"",
            Some("enabled"),
        );
        check("drives = [\"/a\"]\n[scrub]\nperiod = 60", Some("period"));
    }

    /// The key file's bytes are the key: whitespace and NUL at either end included.
    #[test]
    fn url_signing_keys_are_the_files_bytes_exactly() {
        let folder = std::env::temp_dir().join(format!("applianced-keys-{}", std::process::id()));
        std::fs::create_dir_all(&folder).unwrap();
        let middle = b"0123456789abcdef0123456789abcd";
        let mut cases: Vec<(Vec<u8>, Option<&str>)> = Vec::new();
        for edge in [b'\n', b' ', b'\t', b'\r', b'\0'] {
            cases.push(([&[edge][..], middle, &[edge]].concat(), None));
            cases.push(([&[edge][..], middle].concat(), None));
            cases.push(([middle, &[edge][..]].concat(), None));
        }
        cases.push((vec![b'\n'; 16], None));
        cases.push((vec![0; 16], None));
        cases.push((vec![0xff; URL_SIGNING_KEY_BYTES_MAX], None));
        cases.push((Vec::new(), Some("the key file is empty")));
        cases.push((
            vec![b'k'; 15],
            Some("the key is too short: 16 bytes at least, the file holds 15"),
        ));
        cases.push((
            vec![b'k'; URL_SIGNING_KEY_BYTES_MAX + 1],
            Some("longer than 4096 bytes"),
        ));
        for (number, (key, expected_error)) in cases.into_iter().enumerate() {
            let path = folder.join(format!("key-{number}"));
            std::fs::write(&path, &key).unwrap();
            match (read_url_signing_key(&path), expected_error) {
                (Ok(read), None) => assert_eq!(read, key, "{key:?}"),
                (Err(error), Some(expected)) => {
                    let text = format!("{error:#}");
                    assert!(text.contains(expected), "{text:?} lacks {expected:?}");
                    assert!(text.contains("serve.url_signing_key_file"), "{text:?}");
                }
                (Ok(_), Some(expected)) => panic!("{key:?} accepted, expected {expected:?}"),
                (Err(error), None) => panic!("{key:?} refused: {error:#}"),
            }
        }
        let missing = read_url_signing_key(&folder.join("missing")).unwrap_err();
        assert!(format!("{missing:#}").contains("missing"), "{missing:#}");
        std::fs::remove_dir_all(&folder).unwrap();
    }

    #[test]
    fn keys_that_read_as_a_text_line_are_recognised() {
        let cases: &[(&[u8], bool)] = &[
            (b"0123456789abcdef\n", true),
            (b"0123456789abcdef\r\n", true),
            (b"0123456789abcdef", false),
            (b"0123456789abcdef\n\n", false),
            (b"\n0123456789abcdef", false),
            (b"0123456789abcde\xff\n", false),
            (b"0123456789abcde\0\n", false),
        ];
        for (key, expected) in cases {
            assert_eq!(reads_as_a_text_line(key), *expected, "{key:?}");
        }
    }
}
