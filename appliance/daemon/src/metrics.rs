//! The daemon's one metrics registry and the admin listener's view. Serving's counters are
//! registered once at start (atomics the hot path bumps); the store, drive, fill, scrub and
//! state metrics come from a collector that encodes one typed [`Status`] snapshot per scrape, the
//! same snapshot `/health` and `appliance-ctl status` show. Nothing is rebuilt per scrape.

use crate::operations::Operations;
use appliance_proto::{DriveState, State, Status, UpkeepState};
use appliance_serve::AdminView;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::fmt::Error;
use std::sync::Arc;

/// What the admin listener shows: health and metrics, both from [`Operations::status`].
pub struct AdminPlane {
    operations: Arc<Operations>,
    registry: Registry,
}

impl AdminPlane {
    pub fn new(operations: Arc<Operations>, serving: &appliance_serve::Shared) -> AdminPlane {
        let mut registry = Registry::with_prefix("appliance");
        serving.register_metrics(&mut registry);
        registry.register_collector(Box::new(StatusCollector(Arc::clone(&operations))));
        AdminPlane {
            operations,
            registry,
        }
    }
}

impl AdminView for AdminPlane {
    fn health(&self) -> (bool, String) {
        let health = self.operations.status().health();
        let body = serde_json::to_string(&health).expect("health always encodes");
        (health.healthy, body)
    }

    fn metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// Encodes a status snapshot at each scrape.
struct StatusCollector(Arc<Operations>);

impl std::fmt::Debug for StatusCollector {
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        out.write_str("StatusCollector")
    }
}

impl Collector for StatusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), Error> {
        encode_status(&self.0.status(), &mut encoder)
    }
}

/// A metric family with labels, one sample per row.
fn family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: &[(Vec<(&str, String)>, u64)],
) -> Result<(), Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in rows {
        let sample = metric.encode_family(labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(*value).encode(sample)?,
            _ => ConstGauge::new(signed(*value)).encode(sample)?,
        }
    }
    Ok(())
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> Result<(), Error> {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(metric)
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), Error> {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(metric)
}

fn signed(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn encode_status(status: &Status, encoder: &mut DescriptorEncoder) -> Result<(), Error> {
    let states: Vec<_> = State::ALL
        .iter()
        .map(|state| {
            (
                vec![("state", state.name().to_string())],
                u64::from(*state == status.state),
            )
        })
        .collect();
    family(
        encoder,
        "state",
        "1 for the box's current state (serving, degraded, draining, drained)",
        MetricType::Gauge,
        &states,
    )?;
    gauge(
        encoder,
        "healthy",
        "1 while steering should send clients here (what /health answers with 200)",
        i64::from(status.healthy),
    )?;
    gauge(
        encoder,
        "uptime_seconds",
        "Seconds since the daemon started",
        signed(status.uptime_s),
    )?;
    gauge(
        encoder,
        "upkeep_ok",
        "1 while the store upkeep thread makes progress",
        i64::from(status.upkeep.state == UpkeepState::Ok),
    )?;
    let catalog = &status.catalog;
    for (name, help, value) in [
        ("store_files", "Files published", catalog.files),
        (
            "store_live_bytes",
            "Bytes of published files",
            catalog.bytes,
        ),
        (
            "store_size_bytes",
            "Bytes of the drives in service",
            catalog.size_bytes,
        ),
        (
            "store_free_bytes",
            "Bytes new files can still take",
            catalog.free_bytes,
        ),
        (
            "index_memory_bytes",
            "Memory of the index",
            catalog.index_memory_bytes,
        ),
        (
            "fill_pending_deletes",
            "Files dropped from the manifest, waiting out their grace period",
            catalog.pending_deletes,
        ),
    ] {
        gauge(encoder, name, help, signed(value))?;
    }
    counter(
        encoder,
        "store_relocated_files",
        "Files reclaim moved since start",
        catalog.relocated_files,
    )?;
    counter(
        encoder,
        "store_corrupt_files_removed",
        "Files reclaim or the scrubber took out since start: their bytes failed their checksums",
        catalog.corrupt_files_removed,
    )?;
    encode_drives(status, encoder)?;
    encode_fill(status, encoder)?;
    encode_scrub(status, encoder)
}

/// One figure of a drive row.
type DriveFigure<'a> = &'a dyn Fn(&appliance_proto::DriveRow) -> u64;

fn encode_drives(status: &Status, encoder: &mut DescriptorEncoder) -> Result<(), Error> {
    let rows = |value: DriveFigure| -> Vec<_> {
        status
            .drives
            .iter()
            .map(|drive| (vec![("drive", drive.path.clone())], value(drive)))
            .collect()
    };
    let gauges: [(&str, &str, DriveFigure); 6] = [
        (
            "drive_up",
            "1 while the drive is in service, 0 once failed",
            &|drive| u64::from(drive.state == DriveState::Ok),
        ),
        ("drive_size_bytes", "Size of the drive", &|drive| {
            drive.size_bytes
        }),
        ("drive_files", "Files on the drive", &|drive| drive.files),
        (
            "drive_live_bytes",
            "Bytes of published files on the drive",
            &|drive| drive.used_bytes,
        ),
        ("drive_free_segments", "Free segments", &|drive| {
            drive.free_segments
        }),
        (
            "drive_recovery_milliseconds",
            "Recovery time at start",
            &|drive| drive.recovery_ms,
        ),
    ];
    for (name, help, value) in gauges {
        family(encoder, name, help, MetricType::Gauge, &rows(value))?;
    }
    family(
        encoder,
        "drive_read_bytes",
        "Bytes read through the drive's ring",
        MetricType::Counter,
        &rows(&|drive| drive.bytes_read),
    )?;
    family(
        encoder,
        "drive_written_bytes",
        "Bytes written through the drive's ring",
        MetricType::Counter,
        &rows(&|drive| drive.bytes_written),
    )
}

fn encode_fill(status: &Status, encoder: &mut DescriptorEncoder) -> Result<(), Error> {
    let fill = &status.fill;
    let mut files = Vec::new();
    let mut bytes = Vec::new();
    for source in &fill.sources {
        for (result, value) in [
            ("ok", source.files_ok),
            ("errors", source.errors),
            ("missing", source.missing),
            ("bad_bytes", source.bad_bytes),
        ] {
            files.push((
                vec![
                    ("source", source.base_url.clone()),
                    ("result", result.to_string()),
                ],
                value,
            ));
        }
        bytes.push((vec![("source", source.base_url.clone())], source.bytes));
    }
    family(
        encoder,
        "fill_files",
        "Fill downloads since start by source and result",
        MetricType::Counter,
        &files,
    )?;
    family(
        encoder,
        "fill_bytes",
        "Fill bytes received since start by source",
        MetricType::Counter,
        &bytes,
    )?;
    gauge(
        encoder,
        "fill_running",
        "1 while a fill runs",
        i64::from(fill.running),
    )?;
    for (name, help, value) in [
        (
            "fill_files_planned",
            "Files the running (or last) fill set out to fetch",
            fill.files_total,
        ),
        (
            "fill_files_done",
            "Files the running (or last) fill has fetched",
            fill.files_done,
        ),
        (
            "fill_files_failed",
            "Files the running (or last) fill could not fetch",
            fill.files_failed,
        ),
        (
            "fill_bytes_planned",
            "Bytes the running (or last) fill set out to fetch",
            fill.bytes_total,
        ),
        (
            "fill_bytes_done",
            "Bytes the running (or last) fill has received",
            fill.bytes_done,
        ),
    ] {
        gauge(encoder, name, help, signed(value))?;
    }
    let Some(last) = &fill.last else {
        return Ok(());
    };
    gauge(
        encoder,
        "fill_last_success",
        "1 when the last fill completed with every file held",
        i64::from(last.succeeded()),
    )?;
    gauge(
        encoder,
        "fill_last_end_timestamp_seconds",
        "When the last fill ended (Unix time)",
        signed(last.ended_unix_s),
    )?;
    gauge(
        encoder,
        "fill_last_files_fetched",
        "Files the last fill fetched",
        signed(last.files_fetched),
    )?;
    gauge(
        encoder,
        "fill_last_files_failed",
        "Files the last fill could not fetch",
        signed(last.files_failed),
    )
}

fn encode_scrub(status: &Status, encoder: &mut DescriptorEncoder) -> Result<(), Error> {
    let scrub = &status.scrub;
    gauge(
        encoder,
        "scrub_enabled",
        "1 while the background scrubber runs",
        i64::from(scrub.enabled),
    )?;
    for (name, help, value) in [
        (
            "scrub_files_checked",
            "Files the scrubber checked against their checksums since start",
            scrub.files_checked,
        ),
        (
            "scrub_bytes_checked",
            "Bytes the scrubber read back and checked since start",
            scrub.bytes_checked,
        ),
        (
            "scrub_corrupt_files",
            "Files whose bytes failed their checksums in a scrub since start (each taken out)",
            scrub.corrupt_files,
        ),
        (
            "scrub_passes",
            "Scrub passes completed since start",
            scrub.passes_completed,
        ),
    ] {
        counter(encoder, name, help, value)?;
    }
    let ratio = encoder.encode_descriptor(
        "scrub_pass_progress_ratio",
        "Share of the current scrub pass done, 0 to 1 (1 between passes)",
        None,
        MetricType::Gauge,
    )?;
    ConstGauge::new(scrub.pass_progress_ratio()).encode(ratio)?;
    // The family is there before the first pass ends, without a sample.
    let ended = encoder.encode_descriptor(
        "scrub_last_pass_end_timestamp_seconds",
        "When the last complete scrub pass ended (Unix time)",
        None,
        MetricType::Gauge,
    )?;
    match scrub.last_pass_ended_unix_s {
        Some(ended_unix_s) => ConstGauge::new(signed(ended_unix_s)).encode(ended),
        None => Ok(()),
    }
}
