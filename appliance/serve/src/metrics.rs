//! Serving counters, kept as Prometheus metrics: requests by status, bytes sent, hits and
//! misses, errors, active connections. Handles for the hot path are created up front, so a
//! request only touches atomics; the daemon registers them once in its one registry.

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
        Metrics {
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
