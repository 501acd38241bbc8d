//! Serving counters, kept as Prometheus metrics: requests by status, bytes sent, hits and
//! misses, errors, active connections. Handles for the hot path are created up front, so a
//! request only touches atomics.

use prometheus_client::encoding::text::encode;
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

/// The serving metrics and their registry.
pub struct Metrics {
    registry: Registry,
    by_status: Vec<Counter>,
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
        let mut registry = Registry::with_prefix("appliance");
        let family = StatusFamily::default();
        let by_status = STATUSES
            .iter()
            .map(|status| {
                let label = if *status == 0 {
                    "other".to_string()
                } else {
                    status.to_string()
                };
                family
                    .get_or_create(&vec![("status".to_string(), label)])
                    .clone()
            })
            .collect();
        registry.register("http_requests", "HTTP responses by status", family);
        let metrics = Metrics {
            by_status,
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
            registry,
        };
        let mut metrics = metrics;
        let registry = &mut metrics.registry;
        registry.register(
            "http_sent_bytes",
            "Body and head bytes sent",
            metrics.bytes_sent.clone(),
        );
        registry.register(
            "http_hits",
            "Requests for stored files",
            metrics.hits.clone(),
        );
        registry.register(
            "http_misses",
            "Requests for files not stored",
            metrics.misses.clone(),
        );
        registry.register(
            "http_errors",
            "Connections ended by a server-side error",
            metrics.errors.clone(),
        );
        registry.register(
            "http_client_aborts",
            "Connections the client closed in the middle of a response",
            metrics.client_aborts.clone(),
        );
        registry.register(
            "http_connections_active",
            "Open client connections",
            metrics.connections_active.clone(),
        );
        registry.register(
            "http_connections",
            "Client connections accepted",
            metrics.connections_total.clone(),
        );
        registry.register(
            "http_connections_refused",
            "Connections refused at the connection limit",
            metrics.connections_refused.clone(),
        );
        registry.register(
            "http_timeouts",
            "Connections closed by a header, idle or send timeout",
            metrics.timeouts.clone(),
        );
        registry.register(
            "http_slow_clients",
            "Connections closed for taking less than the minimum send rate over a window",
            metrics.slow_clients.clone(),
        );
        registry.register(
            "access_log_dropped_lines",
            "Access-log lines dropped because the writer fell behind",
            metrics.access_log_dropped.clone(),
        );
        metrics
    }

    /// Counts one response.
    pub fn count_status(&self, status: u16) {
        let at = STATUSES
            .iter()
            .position(|known| *known == status)
            .unwrap_or(STATUSES.len() - 1);
        self.by_status[at].inc();
        self.responses.inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}
