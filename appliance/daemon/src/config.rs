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
    #[serde(default)]
    pub serve: Serve,
}

/// `[serve]`: the subscriber listener, its limits, and the admin listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Serve {
    /// Subscriber listener. Default `0.0.0.0:8080`.
    pub listen: SocketAddr,
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
    pub send_timeout_ms: u64,
    /// Connections served at once; more wait in the listen backlog. Default 20000.
    pub connections_max: usize,
    /// Requests on one connection before it is closed. Default 10000.
    pub requests_per_connection_max: u64,
    /// On a miss, 302 to this base URL with the same path and query. Default: 404 instead.
    pub miss_redirect_base: Option<String>,
    /// File holding the key of signed URLs; when set, every request must be signed.
    pub url_signing_key_file: Option<PathBuf>,
    /// `off`, `-` (standard error) or a file path. Default `off`.
    pub access_log: String,
    /// Threads of the serving runtime; 0 means one per core. Default 0.
    pub worker_threads: usize,
    /// How long a stop waits for responses in flight. Default 30000.
    pub shutdown_grace_ms: u64,
}

impl Default for Serve {
    fn default() -> Serve {
        let defaults = ServeConfig::default();
        Serve {
            listen: defaults.listen,
            admin_listen: defaults.admin_listen,
            request_line_bytes_max: defaults.limits.request_line_bytes_max,
            header_bytes_max: defaults.limits.header_bytes_max,
            header_read_timeout_ms: millis(defaults.header_read_timeout),
            idle_timeout_ms: millis(defaults.idle_timeout),
            send_timeout_ms: millis(defaults.send_timeout),
            connections_max: defaults.connections_max,
            requests_per_connection_max: defaults.requests_per_connection_max,
            miss_redirect_base: None,
            url_signing_key_file: None,
            access_log: "off".to_string(),
            worker_threads: 0,
            shutdown_grace_ms: millis(defaults.shutdown_grace),
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
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
        let serve = &self.serve;
        let positive: [(&str, u64); 7] = [
            (
                "serve.request_line_bytes_max",
                serve.request_line_bytes_max as u64,
            ),
            ("serve.header_bytes_max", serve.header_bytes_max as u64),
            ("serve.header_read_timeout_ms", serve.header_read_timeout_ms),
            ("serve.idle_timeout_ms", serve.idle_timeout_ms),
            ("serve.send_timeout_ms", serve.send_timeout_ms),
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
        if let Some(base) = &serve.miss_redirect_base {
            if !(base.starts_with("http://") || base.starts_with("https://")) {
                bail!("serve.miss_redirect_base: {base:?} is not an http(s) URL");
            }
        }
        Ok(())
    }

    /// The serving settings, with the signing key read from its file.
    pub fn serve_config(&self) -> Result<ServeConfig> {
        let serve = &self.serve;
        let url_signing_key = match &serve.url_signing_key_file {
            Some(path) => {
                let key = std::fs::read(path).with_context(|| {
                    format!("serve.url_signing_key_file: reading {}", path.display())
                })?;
                let key = key.trim_ascii().to_vec();
                if key.len() < 16 {
                    bail!("serve.url_signing_key_file: the key must be at least 16 bytes");
                }
                Some(key)
            }
            None => None,
        };
        let access_log = match serve.access_log.as_str() {
            "off" => AccessLogTarget::Off,
            "-" => AccessLogTarget::Stderr,
            path => AccessLogTarget::File(PathBuf::from(path)),
        };
        Ok(ServeConfig {
            listen: serve.listen,
            admin_listen: serve.admin_listen,
            limits: appliance_serve::http::Limits {
                request_line_bytes_max: serve.request_line_bytes_max,
                header_bytes_max: serve.header_bytes_max,
                ..appliance_serve::http::Limits::default()
            },
            header_read_timeout: Duration::from_millis(serve.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(serve.idle_timeout_ms),
            send_timeout: Duration::from_millis(serve.send_timeout_ms),
            connections_max: serve.connections_max,
            requests_per_connection_max: serve.requests_per_connection_max,
            miss_redirect_base: serve.miss_redirect_base.clone(),
            url_signing_key,
            access_log,
            shutdown_grace: Duration::from_millis(serve.shutdown_grace_ms),
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
            "drives = [\"/a\"]\n[serve]\nconnections_max = -1",
            Some("connections_max"),
        );
        check(
            "drives = [\"/a\"]\n[serve]\nmiss_redirect_base = \"ftp://x\"",
            Some("serve.miss_redirect_base"),
        );
        check(
            "drives = [\"/a\"]\n[serve]\nheader_bytes_max = 100\nrequest_line_bytes_max = 200",
            Some("serve.header_bytes_max"),
        );
    }
}
