//! The operations service: the one place that reads the store's, serving's, the fill's and
//! the scrubber's state and performs the operator's actions (start or cancel a fill, drain,
//! undrain, verify).
//! The control socket (`control.rs`) and the read-only admin listener (`admin.rs`) are thin
//! transports over it: `/health`, `/metrics` and `appliance-ctl status` all come from
//! [`Operations::status`], so they cannot disagree.

use appliance_fill::{Filler, ManifestLocation};
use appliance_proto::{
    Catalog, Damage, DriveRow, DriveState, Error, ErrorKind, FillCancelled, FillStarted, Host,
    State, Status, TlsCertificate, TlsStatus, Traffic, Upkeep, UpkeepState, VerifyProgress,
    VerifyReport,
};
use appliance_serve::Shared;
use appliance_store::{DriveStatus, Store, StoreStats};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often traffic rates and host figures are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// How often verify reports progress.
const VERIFY_PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Who asked for an action, for the log: `uid 0` over the control socket.
pub type Actor<'a> = &'a str;

pub struct Operations {
    store: Store,
    serving: Arc<Shared>,
    filler: Arc<Filler>,
    upkeep: Arc<crate::upkeep::Heartbeat>,
    scrub: crate::scrub::ScrubProgress,
    started: Instant,
    samples: Mutex<Samples>,
}

/// Rates and host figures from the sampler.
#[derive(Default, Clone)]
struct Samples {
    requests_per_s: f64,
    gbps: f64,
    host: Host,
}

impl Operations {
    pub fn new(
        store: Store,
        serving: Arc<Shared>,
        filler: Arc<Filler>,
        upkeep: Arc<crate::upkeep::Heartbeat>,
        scrub: crate::scrub::ScrubProgress,
    ) -> Arc<Operations> {
        let mut system = sysinfo::System::new();
        system.refresh_memory();
        let host = Host {
            cpu_percent: None,
            load_1m: Some(sysinfo::System::load_average().one),
            memory_used_bytes: Some(system.used_memory()),
            memory_total_bytes: Some(system.total_memory()),
        };
        Arc::new(Operations {
            store,
            serving,
            filler,
            upkeep,
            scrub,
            started: Instant::now(),
            samples: Mutex::new(Samples {
                host,
                ..Samples::default()
            }),
        })
    }

    fn samples(&self) -> Samples {
        self.samples
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    /// Everything an operator or steering sees, from one look at each part.
    pub fn status(&self) -> Status {
        let stats = self.store.stats();
        let drives = drive_rows(&stats);
        let upkeep = upkeep_view(self.upkeep.state());
        let traffic = self.serving.traffic();
        let draining = self.serving.is_draining();
        let mut problems = problems(&drives, &upkeep);
        if let Some(tls) = self.serving.tls() {
            problems.extend(
                tls.identities()
                    .validity_problems(appliance_serve::tls::now_unix_s())
                    .into_iter()
                    .map(|problem| format!("TLS: {problem}")),
            );
        }
        let in_service: Vec<&DriveRow> = drives
            .iter()
            .filter(|drive| drive.state == DriveState::Ok)
            .collect();
        let state = match (draining, traffic.connections_active) {
            (true, 0) => State::Drained,
            (true, _) => State::Draining,
            (false, _) if problems.is_empty() => State::Serving,
            (false, _) => State::Degraded,
        };
        let healthy = matches!(state, State::Serving | State::Degraded)
            && upkeep.state == UpkeepState::Ok
            && !in_service.is_empty();
        let size_bytes = in_service.iter().map(|drive| drive.size_bytes).sum();
        let fill = self.filler.status();
        let samples = self.samples();
        Status {
            state,
            healthy,
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_s: self.started.elapsed().as_secs(),
            problems,
            upkeep,
            catalog: Catalog {
                files: stats.files,
                bytes: drives.iter().map(|drive| drive.used_bytes).sum(),
                size_bytes,
                free_bytes: self.store.free_bytes(),
                manifest_files: fill
                    .last
                    .as_ref()
                    .filter(|last| last.error.is_none())
                    .map(|last| last.files_in_manifest),
                pending_deletes: fill.pending_deletes,
                index_memory_bytes: stats.index_memory_bytes,
                relocated_files: stats.relocated_files,
                corrupt_files_removed: stats.corrupt_files_removed,
            },
            drives,
            fill,
            scrub: self.scrub.view(),
            traffic: Traffic {
                connections: traffic.connections_active,
                requests_per_s: samples.requests_per_s,
                gbps: samples.gbps,
                hits: traffic.hits,
                misses: traffic.misses,
                bytes_sent: traffic.bytes_sent,
            },
            host: samples.host,
            tls: self.tls_status(),
        }
    }

    /// The HTTPS listener as operators see it.
    fn tls_status(&self) -> Option<TlsStatus> {
        let tls = self.serving.tls()?;
        let (connections_kernel, connections_user) = self.serving.tls_connections_active();
        Some(TlsStatus {
            listen: tls.config.listen.to_string(),
            path: if tls.kernel.available() {
                "kernel"
            } else {
                "user"
            }
            .to_string(),
            why_user: tls.kernel.why_not.clone(),
            connections_kernel,
            connections_user,
            certificates: tls
                .identities()
                .list()
                .iter()
                .map(|identity| TlsCertificate {
                    names: identity.names.clone(),
                    not_after_unix_s: identity.not_after_unix_s,
                    file: identity.cert_path.display().to_string(),
                })
                .collect(),
        })
    }

    pub fn drives(&self) -> Vec<DriveRow> {
        drive_rows(&self.store.stats())
    }

    pub fn fill_status(&self) -> appliance_proto::FillStatus {
        self.filler.status()
    }

    /// Starts a fill now, from `manifest` (URL or file) or the configured one. Of two callers
    /// at once exactly one starts it; the other gets `AlreadyRunning`. The fill runs on its
    /// own runtime (`run.rs`), never on the caller's.
    pub fn start_fill(&self, manifest: Option<String>, actor: Actor) -> Result<FillStarted, Error> {
        if manifest.as_deref().is_some_and(str::is_empty) {
            return Err(Error::new(ErrorKind::BadRequest, "the manifest is empty"));
        }
        let location = manifest.as_deref().map(ManifestLocation::parse);
        match self.filler.start(location) {
            Ok(started) => {
                tracing::info!(actor, manifest = ?manifest, "fill started by an operator");
                Ok(FillStarted {
                    started_unix_s: started.started_unix_s,
                    manifest,
                })
            }
            Err(appliance_fill::AlreadyRunning) => Err(Error::new(
                ErrorKind::AlreadyRunning,
                "a fill is already running",
            )),
        }
    }

    /// Asks the running fill, if any, to stop.
    pub fn cancel_fill(&self, actor: Actor) -> FillCancelled {
        let was_running = self.filler.is_running();
        self.filler.cancel();
        tracing::info!(actor, was_running, "fill cancel requested");
        FillCancelled { was_running }
    }

    /// Drains (steering is told to send no new clients) or serves again; returns the state.
    pub fn set_draining(&self, draining: bool, actor: Actor) -> State {
        self.serving.set_draining(draining);
        if draining {
            tracing::info!(actor, "draining: steering is told to send no new clients");
        } else {
            tracing::info!(actor, "serving again");
        }
        self.status().state
    }

    /// Re-reads `path` (or every file) and checks it against its checksums, calling
    /// `progress` every half second. Blocking: run it off the event loop.
    pub fn verify(
        &self,
        path: Option<String>,
        mut progress: impl FnMut(VerifyProgress),
    ) -> Result<VerifyReport, Error> {
        let failed = |error: appliance_store::StoreError| {
            Error::new(ErrorKind::Failed, format!("listing the store: {error}"))
        };
        let paths = match path {
            Some(path) => vec![path],
            None => {
                let mut paths = Vec::new();
                self.store
                    .for_each_file(|path, _| paths.push(path.to_string()))
                    .map_err(failed)?;
                paths.sort();
                paths
            }
        };
        let files_total = paths.len() as u64;
        let mut damaged = Vec::new();
        let mut last_report = Instant::now();
        for (done, path) in paths.iter().enumerate() {
            let outcome = match self.store.open_file(path) {
                Ok(Some(handle)) => handle.verify().map_err(|error| error.to_string()),
                Ok(None) => Err("not stored".to_string()),
                Err(error) => Err(error.to_string()),
            };
            if let Err(error) = outcome {
                damaged.push(Damage {
                    path: path.clone(),
                    error,
                });
            }
            if last_report.elapsed() > VERIFY_PROGRESS_EVERY {
                progress(VerifyProgress {
                    files_done: done as u64 + 1,
                    files_total,
                });
                last_report = Instant::now();
            }
        }
        Ok(VerifyReport {
            files_verified: files_total,
            damaged,
        })
    }

    /// Samples traffic rates and host figures every two seconds, forever.
    pub async fn sample(self: Arc<Self>) {
        let mut system = sysinfo::System::new();
        system.refresh_cpu_usage();
        let mut last = (Instant::now(), self.serving.traffic());
        loop {
            tokio::time::sleep(SAMPLE_EVERY).await;
            system.refresh_cpu_usage();
            system.refresh_memory();
            let now = (Instant::now(), self.serving.traffic());
            let seconds = now.0.duration_since(last.0).as_secs_f64().max(1e-3);
            let sample = Samples {
                requests_per_s: now.1.responses.saturating_sub(last.1.responses) as f64 / seconds,
                gbps: now.1.bytes_sent.saturating_sub(last.1.bytes_sent) as f64 * 8.0
                    / seconds
                    / 1e9,
                host: Host {
                    cpu_percent: Some(f64::from(system.global_cpu_usage())),
                    load_1m: Some(sysinfo::System::load_average().one),
                    memory_used_bytes: Some(system.used_memory()),
                    memory_total_bytes: Some(system.total_memory()),
                },
            };
            last = now;
            *self
                .samples
                .lock()
                .unwrap_or_else(|poison| poison.into_inner()) = sample;
        }
    }
}

/// One row per drive.
fn drive_rows(stats: &StoreStats) -> Vec<DriveRow> {
    stats
        .drives
        .iter()
        .map(|drive| {
            let (state, error) = match &drive.status {
                DriveStatus::Ok => (DriveState::Ok, None),
                DriveStatus::Failed(reason) => (DriveState::Failed, Some(reason.clone())),
            };
            DriveRow {
                path: drive.path.display().to_string(),
                model: drive.model.clone(),
                serial: drive.serial.clone(),
                size_bytes: drive.size_bytes,
                used_bytes: drive.live_bytes,
                free_segments: drive.free_segments,
                segment_count: u64::from(drive.segment_count),
                files: drive.files,
                state,
                error,
                recovery_ms: drive.recovery_ms,
                bytes_read: drive.bytes_read,
                bytes_written: drive.bytes_written,
            }
        })
        .collect()
}

fn upkeep_view(state: crate::upkeep::UpkeepState) -> Upkeep {
    let millis = |silent: Duration| Some(u64::try_from(silent.as_millis()).unwrap_or(u64::MAX));
    match state {
        crate::upkeep::UpkeepState::Ok { silent } => Upkeep {
            state: UpkeepState::Ok,
            silent_ms: millis(silent),
        },
        crate::upkeep::UpkeepState::Stalled { silent } => Upkeep {
            state: UpkeepState::Stalled,
            silent_ms: millis(silent),
        },
        crate::upkeep::UpkeepState::Exited => Upkeep {
            state: UpkeepState::Exited,
            silent_ms: None,
        },
    }
}

/// One line per thing an operator should look at.
fn problems(drives: &[DriveRow], upkeep: &Upkeep) -> Vec<String> {
    let mut problems: Vec<String> = drives
        .iter()
        .filter(|drive| drive.state != DriveState::Ok)
        .map(|drive| {
            format!(
                "drive {} is out of service: {}",
                drive.path,
                drive.error.as_deref().unwrap_or("failed")
            )
        })
        .collect();
    if !drives.is_empty() && problems.len() == drives.len() {
        problems.push("no data drive is in service".to_string());
    }
    match upkeep.state {
        UpkeepState::Ok => {}
        UpkeepState::Stalled => problems.push(format!(
            "store upkeep (checkpoints, reclaim) has made no progress for {} s",
            upkeep.silent_ms.unwrap_or(0) / 1000
        )),
        UpkeepState::Exited => {
            problems.push("store upkeep (checkpoints, reclaim) has stopped".to_string())
        }
    }
    problems
}
