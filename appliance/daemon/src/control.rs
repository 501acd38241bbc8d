//! The control socket: a Unix stream socket (mode 0660, group `appliance` when it exists)
//! speaking `appliance-proto`, one JSON line per request. It answers status, drives, fill,
//! drain and verify for `appliance-ctl`; a malformed request or an unknown protocol version gets
//! an error line, never a crash. It also keeps the traffic rates and host figures that status
//! shows, sampled every two seconds.

use anyhow::{Context, Result};
use appliance_fill::{Filler, ManifestLocation};
use appliance_proto::{parse_request, Command, Response, REQUEST_BYTES_MAX};
use appliance_serve::Shared;
use appliance_store::{DriveStatus, Store, StoreStats};
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// What the control socket reaches.
pub struct Control {
    pub store: Store,
    pub shared: Arc<Shared>,
    pub filler: Arc<Filler>,
    pub started: Instant,
    samples: Mutex<Samples>,
}

/// Rates and host figures from the sampler.
#[derive(Default, Clone)]
struct Samples {
    requests_per_s: f64,
    gbps: f64,
    cpu_percent: f64,
    load_1m: f64,
    memory_used_bytes: u64,
    memory_total_bytes: u64,
}

impl Control {
    pub fn new(store: Store, shared: Arc<Shared>, filler: Arc<Filler>) -> Arc<Control> {
        Arc::new(Control {
            store,
            shared,
            filler,
            started: Instant::now(),
            samples: Mutex::new(Samples::default()),
        })
    }

    fn samples(&self) -> Samples {
        self.samples
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    /// The state steering and operators see: serving, draining, drained, or degraded when a
    /// drive is out of service.
    pub fn state(&self) -> &'static str {
        self.state_of(&self.store.stats())
    }

    fn state_of(&self, stats: &StoreStats) -> &'static str {
        let degraded = stats
            .drives
            .iter()
            .any(|drive| drive.status != DriveStatus::Ok);
        match appliance_serve::admin::state_name(&self.shared) {
            "serving" if degraded => "degraded",
            state => state,
        }
    }

    pub fn drives_json(&self) -> Value {
        drives_json(&self.store.stats())
    }

    pub fn status_json(&self) -> Value {
        let stats = self.store.stats();
        let fill = self.filler.status_json();
        let samples = self.samples();
        let metrics = &self.shared.metrics;
        let bytes: u64 = stats.drives.iter().map(|drive| drive.live_bytes).sum();
        json!({
            "state": self.state_of(&stats),
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started.elapsed().as_secs(),
            "drives": drives_json(&stats),
            "catalog": {
                "files": stats.files,
                "bytes": bytes,
                "manifest_files": fill["last"]["files_in_manifest"],
                "pending_deletes": fill["pending_deletes"],
                "index_memory_bytes": stats.index_memory_bytes,
            },
            "fill": fill,
            "traffic": {
                "connections": self.shared.connections_active(),
                "requests_per_s": samples.requests_per_s,
                "gbps": samples.gbps,
                "hits": metrics.hits.get(),
                "misses": metrics.misses.get(),
                "bytes_sent": metrics.bytes_sent.get(),
            },
            "host": {
                "cpu_percent": samples.cpu_percent,
                "load_1m": samples.load_1m,
                "memory_used_bytes": samples.memory_used_bytes,
                "memory_total_bytes": samples.memory_total_bytes,
            },
        })
    }

    /// Samples traffic rates and host figures every two seconds, forever.
    pub async fn sample(self: Arc<Self>) {
        let mut system = sysinfo::System::new();
        let mut last = (Instant::now(), 0u64, 0u64);
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            system.refresh_cpu_usage();
            system.refresh_memory();
            let metrics = &self.shared.metrics;
            let now = (
                Instant::now(),
                metrics.responses.get(),
                metrics.bytes_sent.get(),
            );
            let seconds = now.0.duration_since(last.0).as_secs_f64().max(1e-3);
            let sample = Samples {
                requests_per_s: now.1.saturating_sub(last.1) as f64 / seconds,
                gbps: now.2.saturating_sub(last.2) as f64 * 8.0 / seconds / 1e9,
                cpu_percent: f64::from(system.global_cpu_usage()),
                load_1m: sysinfo::System::load_average().one,
                memory_used_bytes: system.used_memory(),
                memory_total_bytes: system.total_memory(),
            };
            last = now;
            *self
                .samples
                .lock()
                .unwrap_or_else(|poison| poison.into_inner()) = sample;
        }
    }
}

/// One row per drive, as status and drives show them.
fn drives_json(stats: &StoreStats) -> Value {
    let drives: Vec<Value> = stats
        .drives
        .iter()
        .map(|drive| {
            let (state, error) = match &drive.status {
                DriveStatus::Ok => ("ok", None),
                DriveStatus::Failed(reason) => ("failed", Some(reason.clone())),
            };
            json!({
                "path": drive.path.display().to_string(),
                "model": drive.model,
                "serial": drive.serial,
                "size_bytes": drive.size_bytes,
                "used_bytes": drive.live_bytes,
                "free_segments": drive.free_segments,
                "segment_count": drive.segment_count,
                "files": drive.files,
                "state": state,
                "error": error,
                "recovery_ms": drive.recovery_ms,
            })
        })
        .collect();
    Value::Array(drives)
}

/// Binds the socket: replaces a stale one, sets mode 0660 and the `appliance` group.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "{} is in use: another applianced is running",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if let Some(gid) = group_id("appliance") {
        let _ = std::os::unix::fs::lchown(path, None, Some(gid));
    }
    Ok(listener)
}

/// The id of a group, from /etc/group.
fn group_id(name: &str) -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then_some(())?;
        fields.nth(1)?.parse().ok()
    })
}

pub async fn serve(listener: UnixListener, control: Arc<Control>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let control = Arc::clone(&control);
        tokio::spawn(async move {
            if let Err(error) = connection(stream, &control).await {
                tracing::debug!(%error, "control connection ended");
            }
        });
    }
}

async fn connection(stream: UnixStream, control: &Arc<Control>) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(u64::MAX));
    loop {
        let mut line = Vec::new();
        let read = (&mut reader)
            .take(u64::try_from(REQUEST_BYTES_MAX).unwrap_or(u64::MAX) + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if read == 0 {
            return Ok(());
        }
        if line.len() > REQUEST_BYTES_MAX {
            write
                .write_all(Response::error("request too long").to_line().as_bytes())
                .await?;
            return Ok(());
        }
        let request = match parse_request(&line) {
            Ok(request) => request,
            Err(error) => {
                write
                    .write_all(Response::error(error).to_line().as_bytes())
                    .await?;
                continue;
            }
        };
        answer(request.command, control, &mut write).await?;
    }
}

async fn answer(
    command: Command,
    control: &Arc<Control>,
    write: &mut tokio::net::unix::OwnedWriteHalf,
) -> Result<()> {
    let response = match command {
        Command::Status => Response::ok(control.status_json()),
        Command::Drives => Response::ok(json!({ "drives": control.drives_json() })),
        Command::Fill { manifest } => {
            if control.filler.is_running() {
                Response::error("a fill is already running")
            } else {
                let filler = Arc::clone(&control.filler);
                let location = manifest.as_deref().map(ManifestLocation::parse);
                tokio::spawn(async move {
                    filler.run_once(location).await;
                });
                // Let the fill mark itself running before the caller asks for its status.
                for _ in 0..100 {
                    if control.filler.is_running() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Response::ok(json!({ "started": true }))
            }
        }
        Command::FillCancel => {
            control.filler.cancel();
            Response::ok(json!({ "cancelled": true }))
        }
        Command::FillStatus => Response::ok(control.filler.status_json()),
        Command::Drain => {
            control.shared.set_draining(true);
            tracing::info!("drain requested");
            Response::ok(json!({ "state": control.state() }))
        }
        Command::Undrain => {
            control.shared.set_draining(false);
            tracing::info!("undrain requested");
            Response::ok(json!({ "state": control.state() }))
        }
        Command::Verify { path } => return verify(path, control, write).await,
    };
    write.write_all(response.to_line().as_bytes()).await?;
    Ok(())
}

/// Verifies files on a blocking thread, sending a progress line every half second.
async fn verify(
    path: Option<String>,
    control: &Arc<Control>,
    write: &mut tokio::net::unix::OwnedWriteHalf,
) -> Result<()> {
    let store = control.store.clone();
    let (progress_sender, mut progress) = tokio::sync::mpsc::channel::<(u64, u64)>(4);
    let work = tokio::task::spawn_blocking(move || -> Result<Value, String> {
        let paths = match path {
            Some(path) => vec![path],
            None => {
                let mut paths = Vec::new();
                store
                    .for_each_file(|path, _| paths.push(path.to_string()))
                    .map_err(|error| error.to_string())?;
                paths.sort();
                paths
            }
        };
        let total = paths.len() as u64;
        let mut damaged = Vec::new();
        let mut last_report = Instant::now();
        for (done, path) in paths.iter().enumerate() {
            let outcome = match store.open_file(path) {
                Ok(Some(handle)) => handle.verify().map_err(|error| error.to_string()),
                Ok(None) => Err("not stored".to_string()),
                Err(error) => Err(error.to_string()),
            };
            if let Err(error) = outcome {
                damaged.push(json!({ "path": path, "error": error }));
            }
            if last_report.elapsed() > Duration::from_millis(500) {
                let _ = progress_sender.try_send((done as u64 + 1, total));
                last_report = Instant::now();
            }
        }
        Ok(json!({ "files_verified": total, "damaged": damaged }))
    });
    tokio::pin!(work);
    loop {
        tokio::select! {
            result = &mut work => {
                let response = match result {
                    Ok(Ok(body)) => Response::ok(body),
                    Ok(Err(error)) => Response::error(error),
                    Err(error) => Response::error(format!("verify failed: {error}")),
                };
                write.write_all(response.to_line().as_bytes()).await?;
                return Ok(());
            }
            Some((done, total)) = progress.recv() => {
                let line = Response::progress(json!({ "files_done": done, "files_total": total }));
                write.write_all(line.to_line().as_bytes()).await?;
            }
        }
    }
}
