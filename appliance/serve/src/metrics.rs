//! Serving counters, kept as Prometheus metrics: requests by status, bytes sent, hits and
//! misses, errors, active connections, the same by listener (http, https), and TLS
//! connections by how they are encrypted (kernel or user space). Handles for the hot path are created up front, so a
//! request only touches atomics; the daemon registers them once in its one registry.

use crate::server::{Listener, TlsPath};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Status codes counted with their own label; any other counts as "other".
const STATUSES: [u16; 17] = [
    200, 206, 302, 304, 400, 403, 404, 405, 408, 412, 414, 416, 431, 500, 503, 505, 0,
];

type StatusFamily = Family<Vec<(String, String)>, Counter>;
type LabelledGauges = Family<Vec<(String, String)>, Gauge<i64, std::sync::atomic::AtomicI64>>;

/// What one listener served.
#[derive(Clone, Default)]
pub struct ListenerCounts {
    pub connections: Counter,
    /// Responses sent whole, and their bytes.
    pub responses: Counter,
    pub bytes_sent: Counter,
}

/// Why TLS handshakes failed: `timeout`, `refused` (bad input, an old version, no common
/// cipher) or `kernel` (kTLS setup).
const HANDSHAKE_FAILURES: [&str; 3] = ["timeout", "refused", "kernel"];

/// The serving metrics.
pub struct Metrics {
    by_status: StatusFamily,
    by_status_handles: Vec<Counter>,
    /// Responses of any status (for rates).
    pub responses: Counter,
    pub bytes_sent: Counter,
    pub hits: Counter,
    pub misses: Counter,
    pub errors: Counter,
    /// Clients that went away mid-response (a player seeking, closing): not server errors.
    pub client_aborts: Counter,
    pub connections_active: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub connections_total: Counter,
    pub connections_refused: Counter,
    pub timeouts: Counter,
    /// Connections cut for taking less than the minimum send rate over a window.
    pub slow_clients: Counter,
    pub access_log_dropped: Counter<u64, AtomicU64>,
    /// http, https.
    listeners: [ListenerCounts; 2],
    listener_families: [StatusFamily; 3],
    /// kernel, user.
    tls_connections: [Counter; 2],
    tls_active: [Gauge<i64, std::sync::atomic::AtomicI64>; 2],
    tls_connection_family: StatusFamily,
    tls_active_family: LabelledGauges,
    tls_handshake_failures: [Counter; 3],
    tls_handshake_family: StatusFamily,
    /// 1 when TLS connections hand their keys to the kernel.
    pub tls_kernel: Gauge<i64, std::sync::atomic::AtomicI64>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let by_status = StatusFamily::default();
        let by_status_handles = STATUSES
            .iter()
            .map(|status| {
                let label = if *status == 0 {
                    "other".to_string()
                } else {
                    status.to_string()
                };
                by_status
                    .get_or_create(&vec![("status".to_string(), label)])
                    .clone()
            })
            .collect();
        let label = |name: &str, value: &str| vec![(name.to_string(), value.to_string())];
        let listener_families: [StatusFamily; 3] = Default::default();
        let listeners = [Listener::Http, Listener::Https].map(|listener| {
            let labels = label("listener", listener.label());
            ListenerCounts {
                connections: listener_families[0].get_or_create(&labels).clone(),
                responses: listener_families[1].get_or_create(&labels).clone(),
                bytes_sent: listener_families[2].get_or_create(&labels).clone(),
            }
        });
        let tls_connection_family = StatusFamily::default();
        let tls_active_family = LabelledGauges::default();
        let paths = [TlsPath::Kernel, TlsPath::User];
        let tls_connections = paths.map(|path| {
            tls_connection_family
                .get_or_create(&label("path", path.label()))
                .clone()
        });
        let tls_active = paths.map(|path| {
            tls_active_family
                .get_or_create(&label("path", path.label()))
                .clone()
        });
        let tls_handshake_family = StatusFamily::default();
        let tls_handshake_failures = HANDSHAKE_FAILURES.map(|reason| {
            tls_handshake_family
                .get_or_create(&label("reason", reason))
                .clone()
        });
        Metrics {
            listeners,
            listener_families,
            tls_connections,
            tls_active,
            tls_connection_family,
            tls_active_family,
            tls_handshake_failures,
            tls_handshake_family,
            tls_kernel: Gauge::default(),
            by_status,
            by_status_handles,
            responses: Counter::default(),
            bytes_sent: Counter::default(),
            hits: Counter::default(),
            misses: Counter::default(),
            errors: Counter::default(),
            client_aborts: Counter::default(),
            connections_active: Gauge::default(),
            connections_total: Counter::default(),
            connections_refused: Counter::default(),
            timeouts: Counter::default(),
            slow_clients: Counter::default(),
            access_log_dropped: Counter::default(),
        }
    }

    /// Registers every serving metric (handles to the same atomics) in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "http_requests",
            "HTTP responses by status",
            self.by_status.clone(),
        );
        let counters = [
            (
                "http_sent_bytes",
                "Body and head bytes sent",
                &self.bytes_sent,
            ),
            ("http_hits", "Requests for stored files", &self.hits),
            ("http_misses", "Requests for files not stored", &self.misses),
            (
                "http_errors",
                "Connections ended by a server-side error",
                &self.errors,
            ),
            (
                "http_client_aborts",
                "Connections the client closed in the middle of a response",
                &self.client_aborts,
            ),
            (
                "http_connections",
                "Client connections accepted",
                &self.connections_total,
            ),
            (
                "http_connections_refused",
                "Connections refused at the connection limit",
                &self.connections_refused,
            ),
            (
                "http_timeouts",
                "Connections closed by a header, idle or send timeout",
                &self.timeouts,
            ),
            (
                "http_slow_clients",
                "Connections closed for taking less than the minimum send rate over a window",
                &self.slow_clients,
            ),
            (
                "access_log_dropped_lines",
                "Access-log lines dropped because the writer fell behind",
                &self.access_log_dropped,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "http_connections_active",
            "Open client connections",
            self.connections_active.clone(),
        );
        let by_listener = [
            (
                "http_listener_connections",
                "Client connections accepted, by listener",
            ),
            (
                "http_listener_responses",
                "Responses sent whole, by listener",
            ),
            (
                "http_listener_sent_bytes",
                "Bytes of responses sent whole, by listener",
            ),
        ];
        for ((name, help), family) in by_listener.into_iter().zip(&self.listener_families) {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "tls_connections",
            "TLS connections past their handshake, by where they are encrypted (kernel: kTLS; user: rustls in the process)",
            self.tls_connection_family.clone(),
        );
        registry.register(
            "tls_connections_active",
            "Open TLS connections, by where they are encrypted",
            self.tls_active_family.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed, by reason (timeout, refused, kernel)",
            self.tls_handshake_family.clone(),
        );
        registry.register(
            "tls_kernel",
            "1 when TLS connections hand their keys to the kernel (kTLS), 0 when rustls encrypts in the process",
            self.tls_kernel.clone(),
        );
    }

    pub fn listener(&self, listener: Listener) -> &ListenerCounts {
        &self.listeners[usize::from(listener == Listener::Https)]
    }

    pub fn tls_connections(&self, path: TlsPath) -> &Counter {
        &self.tls_connections[usize::from(path == TlsPath::User)]
    }

    pub fn tls_active(&self, path: TlsPath) -> &Gauge<i64, std::sync::atomic::AtomicI64> {
        &self.tls_active[usize::from(path == TlsPath::User)]
    }

    /// The failure counter of `reason` (one of `HANDSHAKE_FAILURES`).
    pub fn tls_handshake_failures(&self, reason: &str) -> &Counter {
        let at = HANDSHAKE_FAILURES
            .iter()
            .position(|known| *known == reason)
            .expect("a known handshake failure");
        &self.tls_handshake_failures[at]
    }

    /// Counts one response.
    pub fn count_status(&self, status: u16) {
        let at = STATUSES
            .iter()
            .position(|known| *known == status)
            .unwrap_or(STATUSES.len() - 1);
        self.by_status_handles[at].inc();
        self.responses.inc();
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}
