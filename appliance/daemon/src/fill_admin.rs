//! The daemon's admin routes and metrics beyond serving's: `GET /fill` (progress, last result,
//! per-source counts), `POST /fill[?manifest=URL-or-path]` (start an out-of-window fill),
//! `POST /fill/cancel`, the store, drive and fill metrics on `/metrics`, and `GET /health`
//! with the upkeep thread's state added (503 while the upkeep thread is stalled or gone).

use appliance_fill::{Filler, ManifestLocation};
use appliance_serve::AdminExtension;
use std::sync::Arc;

pub struct FillAdmin {
    pub filler: Arc<Filler>,
    pub store: appliance_store::Store,
    pub upkeep: Arc<crate::upkeep::Heartbeat>,
    /// Serving's shared state, set once the server is bound (health reads it).
    pub shared: std::sync::OnceLock<Arc<appliance_serve::Shared>>,
}

impl AdminExtension for FillAdmin {
    fn handle(
        &self,
        method: &str,
        path: &str,
        query: Option<&str>,
    ) -> Option<(u16, serde_json::Value)> {
        match (method, path) {
            ("GET", "/health") => self.health(),
            ("GET", "/fill") => Some((200, self.filler.status_json())),
            ("POST", "/fill") => Some(self.start(query)),
            ("POST", "/fill/cancel") => {
                self.filler.cancel();
                Some((
                    200,
                    serde_json::json!({ "cancelled": self.filler.is_running() }),
                ))
            }
            (_, "/fill" | "/fill/cancel") => Some((405, serde_json::json!({ "error": "method" }))),
            _ => None,
        }
    }

    fn metrics(&self) -> String {
        encode_store_and_fill(&self.store, &self.filler.status_json())
    }
}

type Labels = Vec<(String, String)>;

/// Store, drive and fill metrics, built fresh at each scrape from the live figures.
fn encode_store_and_fill(store: &appliance_store::Store, fill: &serde_json::Value) -> String {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    let mut registry = prometheus_client::registry::Registry::with_prefix("appliance");
    let stats = store.stats();
    let gauge = |registry: &mut prometheus_client::registry::Registry,
                 name: &str,
                 help: &str,
                 value: u64| {
        let metric: Gauge = Gauge::default();
        metric.set(i64::try_from(value).unwrap_or(i64::MAX));
        registry.register(name, help, metric);
    };
    gauge(&mut registry, "store_files", "Files published", stats.files);
    gauge(
        &mut registry,
        "store_live_bytes",
        "Bytes of published files",
        stats.drives.iter().map(|drive| drive.live_bytes).sum(),
    );
    gauge(
        &mut registry,
        "store_free_bytes",
        "Bytes new files can still take",
        store.free_bytes(),
    );
    gauge(
        &mut registry,
        "index_memory_bytes",
        "Memory of the index",
        stats.index_memory_bytes,
    );
    for (name, help, value) in [
        (
            "store_relocated_files",
            "Files reclaim moved since start",
            stats.relocated_files,
        ),
        (
            "store_corrupt_files_removed",
            "Files reclaim took out since start because their bytes failed their checksums",
            stats.corrupt_files_removed,
        ),
    ] {
        let metric: Counter = Counter::default();
        metric.inc_by(value);
        registry.register(name, help, metric);
    }
    let drive_families: Vec<(&str, &str, Family<Labels, Gauge>)> = vec![
        (
            "drive_up",
            "1 while the drive is in service, 0 once failed",
            Family::default(),
        ),
        ("drive_files", "Files on the drive", Family::default()),
        (
            "drive_live_bytes",
            "Bytes of published files on the drive",
            Family::default(),
        ),
        ("drive_free_segments", "Free segments", Family::default()),
        (
            "drive_recovery_milliseconds",
            "Recovery time at start",
            Family::default(),
        ),
    ];
    let read: Family<Labels, Counter> = Family::default();
    let written: Family<Labels, Counter> = Family::default();
    for drive in &stats.drives {
        let labels = vec![("drive".to_string(), drive.path.display().to_string())];
        let up = u64::from(drive.status == appliance_store::DriveStatus::Ok);
        let values = [
            up,
            drive.files,
            drive.live_bytes,
            drive.free_segments,
            drive.recovery_ms,
        ];
        for ((_, _, family), value) in drive_families.iter().zip(values) {
            family
                .get_or_create(&labels)
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        }
        read.get_or_create(&labels).inc_by(drive.bytes_read);
        written.get_or_create(&labels).inc_by(drive.bytes_written);
    }
    for (name, help, family) in drive_families {
        registry.register(name, help, family);
    }
    registry.register(
        "drive_read_bytes",
        "Bytes read through the drive's ring",
        read,
    );
    registry.register(
        "drive_written_bytes",
        "Bytes written through the drive's ring",
        written,
    );
    let files: Family<Labels, Counter> = Family::default();
    let bytes: Family<Labels, Counter> = Family::default();
    for source in fill["sources"].as_array().into_iter().flatten() {
        let name = source["base_url"].as_str().unwrap_or("?").to_string();
        for result in ["files_ok", "errors", "missing", "bad_bytes"] {
            let labels = vec![
                ("source".to_string(), name.clone()),
                (
                    "result".to_string(),
                    result.trim_start_matches("files_").to_string(),
                ),
            ];
            files
                .get_or_create(&labels)
                .inc_by(source[result].as_u64().unwrap_or(0));
        }
        let labels = vec![("source".to_string(), name)];
        bytes
            .get_or_create(&labels)
            .inc_by(source["bytes"].as_u64().unwrap_or(0));
    }
    registry.register("fill_files", "Fill downloads by source and result", files);
    registry.register("fill_bytes", "Fill bytes received by source", bytes);
    gauge(
        &mut registry,
        "fill_running",
        "1 while a fill runs",
        u64::from(fill["running"] == true),
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .expect("writing to a String cannot fail");
    text.strip_suffix("# EOF\n")
        .map(str::to_string)
        .unwrap_or(text)
}

impl FillAdmin {
    /// Serving's health document plus `upkeep`; 503 unless serving with the upkeep thread
    /// making progress. `None` (serving's own answer) until the server is bound.
    fn health(&self) -> Option<(u16, serde_json::Value)> {
        let shared = self.shared.get()?;
        let mut health = appliance_serve::admin::health_json(shared);
        let upkeep = self.upkeep.health_json();
        let healthy = health["state"] == "serving" && upkeep["state"] == "ok";
        health["upkeep"] = upkeep;
        Some((if healthy { 200 } else { 503 }, health))
    }

    fn start(&self, query: Option<&str>) -> (u16, serde_json::Value) {
        if self.filler.is_running() {
            return (
                409,
                serde_json::json!({ "error": "a fill is already running" }),
            );
        }
        let manifest = query.and_then(|query| {
            query.split('&').find_map(|pair| {
                let value = pair.strip_prefix("manifest=")?;
                let decoded = percent_decode(value)?;
                Some(ManifestLocation::parse(&decoded))
            })
        });
        let filler = Arc::clone(&self.filler);
        tokio::spawn(async move {
            filler.run_once(manifest).await;
        });
        (202, serde_json::json!({ "started": true }))
    }
}

/// Decodes %XX escapes; `None` for a malformed escape or non-UTF-8 result.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(at + 1..at + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                at += 3;
            }
            b'+' => {
                out.push(b' ');
                at += 1;
            }
            byte => {
                out.push(byte);
                at += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn query_values_decode_or_refuse() {
        let cases = [
            ("http%3A%2F%2Fo%2Fm.json", Some("http://o/m.json")),
            ("plain", Some("plain")),
            ("%zz", None),
            ("%4", None),
            ("%ff", None),
        ];
        for (text, expected) in cases {
            assert_eq!(percent_decode(text).as_deref(), expected, "{text}");
        }
    }
}
