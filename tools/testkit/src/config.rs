//! The daemon's configuration file for tests and tools: typed fields serialised to TOML with
//! serde. Keys and meanings are `appliance/daemon/src/config.rs`'s (which refuses unknown
//! keys, so a field here that the daemon lost fails loudly); a field left `None` is not
//! written and takes the daemon's default. Must not hold defaults of its own.

use serde::Serialize;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The whole file. Build it with `Config::new(drives)` and struct update syntax.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Config {
    pub drives: Vec<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_socket: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    pub serve: Serve,
    pub fill: Fill,
    pub scrub: Scrub,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
}

/// `[tls]`.
#[derive(Clone, Debug, Serialize)]
pub struct Tls {
    pub listen: SocketAddr,
    pub certificates: Vec<TlsCertificate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handshake_timeout_ms: Option<u64>,
    /// `auto` or `off`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_tls: Option<String>,
}

/// One entry of `tls.certificates`.
#[derive(Clone, Debug, Serialize)]
pub struct TlsCertificate {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[serve]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Serve {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plain_http: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_line_bytes_max: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_bytes_max: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_read_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_rate_min_bytes_per_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_rate_window_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections_max: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_connection_max: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub miss_redirect_base: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url_signing_key_file: Option<PathBuf>,
    /// `off`, `-` or a file path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_log: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_threads: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_grace_ms: Option<u64>,
    /// How a send whose bytes are not in the page cache is done (`inline` or `pool`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cold_read: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cold_threads_per_drive: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cold_direct_cache_mib: Option<u64>,
}

/// `[fill]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Fill {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest_bytes_max: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub manifest_public_keys: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth_bits_per_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_delay_max_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refetch_interval_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delete_grace_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts_per_source: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff_initial_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff_max_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stall_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_timeout_ms: Option<u64>,
}

/// `[scrub]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Scrub {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_per_s_max: Option<u64>,
}

impl Config {
    /// A configuration with these data drives and nothing else set.
    pub fn new<P: AsRef<Path>>(drives: &[P]) -> Config {
        Config {
            drives: drives
                .iter()
                .map(|drive| drive.as_ref().to_path_buf())
                .collect(),
            ..Config::default()
        }
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a configuration of paths and numbers always serialises")
    }

    /// Writes the TOML file to `path`.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, self.to_toml())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_fields_are_written_and_unset_ones_left_to_the_daemon() {
        let config = Config {
            state_dir: Some("/tmp/a \"quoted\" state".into()),
            serve: Serve {
                listen: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
                requests_per_connection_max: Some(3),
                ..Serve::default()
            },
            fill: Fill {
                sources: vec!["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()],
                manifest_public_keys: vec!["RWQ\\x".into()],
                bandwidth_bits_per_s: Some(8_000_000),
                ..Fill::default()
            },
            scrub: Scrub {
                period_s: Some(3),
                ..Scrub::default()
            },
            ..Config::new(&["/dev/nvme1n1", "/tmp/d 1.img"])
        };
        let text = config.to_toml();
        let parsed: toml::Table = text.parse().unwrap();
        let expected: toml::Table = toml::toml! {
            drives = ["/dev/nvme1n1", "/tmp/d 1.img"]
            state_dir = "/tmp/a \"quoted\" state"
            [serve]
            listen = "127.0.0.1:8080"
            requests_per_connection_max = 3
            [fill]
            manifest_public_keys = ["RWQ\\x"]
            sources = ["http://127.0.0.1:1", "http://127.0.0.1:2"]
            bandwidth_bits_per_s = 8000000
            [scrub]
            period_s = 3
        };
        assert_eq!(parsed, expected, "{text}");
    }

    #[test]
    fn an_empty_configuration_has_empty_sections() {
        let parsed: toml::Table = Config::new(&["/d"]).to_toml().parse().unwrap();
        assert_eq!(parsed["drives"].as_array().map(Vec::len), Some(1));
        assert_eq!(parsed["serve"].as_table().map(toml::Table::len), Some(0));
        assert_eq!(parsed["fill"].as_table().map(toml::Table::len), Some(0));
        assert_eq!(parsed["scrub"].as_table().map(toml::Table::len), Some(0));
        assert_eq!(parsed.len(), 4);
    }
}
