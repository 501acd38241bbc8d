//! Running fills: load and validate the manifest, plan, delete what is past its grace period,
//! fetch what is missing (most popular first, a bounded number at once, under the shared
//! bandwidth cap), persist the fill state (dropped files, last result) in the state directory,
//! and run on schedule inside the fill window. An operator can start or cancel a fill at any
//! time; only one fill runs at once. Each fill gets its own cancellation token when it starts:
//! a cancel reaches only the fill that is running (manifest download, planning, deletes and
//! downloads alike), never a later one.

use crate::bucket::SharedBucket;
use crate::fetch::{fetch_file, http_client, FetchConfig, FetchError, Source};
use crate::load::{load_manifest, LoadConfig};
use crate::manifest::{Manifest, ManifestFile};
use crate::plan::{plan, Dropped, HeldFile, Plan, PlanInput};
use crate::schedule::{start_delay_s, FillWindow};
use appliance_proto::{FillStatus, SourceCounts};
use appliance_store::Store;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Failures remembered in a report.
const FAILURES_KEPT: usize = 100;
/// How often the schedule looks at the clock.
const SCHEDULE_TICK: Duration = Duration::from_secs(15);

/// Where the manifest is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManifestLocation {
    Url(String),
    File(PathBuf),
}

impl ManifestLocation {
    /// `http(s)://...` is a URL; anything else a file path.
    pub fn parse(text: &str) -> ManifestLocation {
        if text.starts_with("http://") || text.starts_with("https://") {
            ManifestLocation::Url(text.to_string())
        } else {
            ManifestLocation::File(PathBuf::from(text))
        }
    }
}

/// Fill settings; every limit is explicit.
#[derive(Clone, Debug)]
pub struct FillConfig {
    pub manifest: Option<ManifestLocation>,
    /// The manifest's size cap and the keys that must have signed it (none: unsigned is fine).
    pub manifest_load: LoadConfig,
    /// Base URLs in order: sibling appliances first, the origin last.
    pub sources: Vec<String>,
    /// Downloads at once.
    pub concurrency: usize,
    /// Cap on the fill's download rate, in bits per second (0: none).
    pub bandwidth_bits_per_s: u64,
    pub fetch: FetchConfig,
    /// How long a file dropped from the manifest stays before it is deleted.
    pub delete_grace_s: u64,
    /// The daily fill window; `None`: fills only when an operator starts one.
    pub window: Option<FillWindow>,
    /// Upper bound of the random delay after the window opens.
    pub start_delay_max_s: u64,
    /// Within the window, how often the manifest is fetched again.
    pub refetch_interval_s: u64,
    /// The fill state file (JSON) in the state directory.
    pub state_path: PathBuf,
}

/// A file held but no longer in the manifest, as the state file keeps it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DroppedRow {
    pub path: String,
    pub since_unix_s: u64,
    pub last_rank: u64,
}

pub use appliance_proto::{FillFailure as Failure, FillReport};

/// A fill `Filler::start` started: when, and its task (which yields the report).
pub struct StartedFill {
    pub started_unix_s: u64,
    pub task: tokio::task::JoinHandle<FillReport>,
}

/// A second start while a fill runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlreadyRunning;

/// What survives a restart.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FillState {
    pub dropped: Vec<DroppedRow>,
    pub last: Option<FillReport>,
}

/// Live progress of the running fill.
#[derive(Default)]
struct Progress {
    files_total: AtomicU64,
    files_done: AtomicU64,
    files_failed: AtomicU64,
    bytes_total: AtomicU64,
    bytes_at_start: AtomicU64,
    started_unix_s: AtomicU64,
}

/// The filler of one appliance.
pub struct Filler {
    store: Store,
    config: FillConfig,
    client: reqwest::Client,
    sources: Vec<Source>,
    bucket: SharedBucket,
    state: Mutex<FillState>,
    progress: Progress,
    /// The cancellation token of the running fill; `None` while no fill runs.
    current: Mutex<Option<CancellationToken>>,
    window: Mutex<Option<FillWindow>>,
    /// The runtime every fill runs on, with its downloads and its blocking work (parsing,
    /// planning, listing, store writes): the daemon gives the fill a runtime of its own, at
    /// low priority, so that none of it runs on a worker of the serving runtime.
    runtime: tokio::runtime::Handle,
}

fn now_unix_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

impl Filler {
    /// A filler whose fills run on `runtime`; the state file is loaded (a damaged one is set
    /// aside and reported).
    pub fn new(
        store: Store,
        config: FillConfig,
        runtime: tokio::runtime::Handle,
    ) -> Result<Filler, String> {
        let client = http_client(config.fetch.response_timeout)?;
        let state = load_state(&config.state_path);
        let sources = config
            .sources
            .iter()
            .map(|base| Source::new(base))
            .collect();
        let bucket = SharedBucket::new(config.bandwidth_bits_per_s, 4 << 20);
        Ok(Filler {
            store,
            client,
            sources,
            bucket,
            state: Mutex::new(state),
            progress: Progress::default(),
            current: Mutex::new(None),
            window: Mutex::new(config.window.clone()),
            config,
            runtime,
        })
    }

    /// Asks the running fill to stop, if one runs; files in flight are abandoned (nothing
    /// half-written is ever visible) and no delete starts after it. Later fills are not
    /// affected: each has a token of its own.
    pub fn cancel(&self) {
        if let Some(token) = self.lock_current().as_ref() {
            token.cancel();
        }
    }

    fn lock_current(&self) -> std::sync::MutexGuard<'_, Option<CancellationToken>> {
        self.current
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Marks a fill running with a fresh token and its start time, in one step under the
    /// lock; `None` when one already runs. The fill counts as running until the returned
    /// `Begun` is dropped.
    fn begin(self: &Arc<Self>) -> Option<Begun> {
        let mut current = self.lock_current();
        if current.is_some() {
            return None;
        }
        let cancel = CancellationToken::new();
        *current = Some(cancel.clone());
        let started_unix_s = now_unix_s();
        self.progress
            .started_unix_s
            .store(started_unix_s, Ordering::SeqCst);
        Some(Begun {
            cancel,
            started_unix_s,
            _running: RunningGuard(Arc::clone(self)),
        })
    }

    /// A fill runs while it holds the cancellation token slot.
    pub fn is_running(&self) -> bool {
        self.lock_current().is_some()
    }

    /// The fill window in force (SIGHUP may change it).
    pub fn window(&self) -> Option<FillWindow> {
        self.window
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    /// Changes the fill window; the schedule follows it from its next look at the clock.
    pub fn set_window(&self, window: Option<FillWindow>) {
        *self
            .window
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = window;
    }

    /// Changes the bandwidth cap of running and later fills.
    pub fn set_bandwidth(&self, bits_per_s: u64) {
        self.bucket.set_rate(bits_per_s);
    }

    fn bytes_from_sources(&self) -> u64 {
        self.sources
            .iter()
            .map(|source| source.bytes.load(Ordering::Relaxed))
            .sum()
    }

    /// Status for operators: progress of the running fill, the last result, per source.
    pub fn status(&self) -> FillStatus {
        let progress = &self.progress;
        let bytes_done = self
            .bytes_from_sources()
            .saturating_sub(progress.bytes_at_start.load(Ordering::Relaxed));
        let state = self.lock_state();
        let sources = self
            .sources
            .iter()
            .map(|source| SourceCounts {
                base_url: source.base_url.clone(),
                files_ok: source.files_ok.load(Ordering::Relaxed),
                bytes: source.bytes.load(Ordering::Relaxed),
                errors: source.errors.load(Ordering::Relaxed),
                missing: source.missing.load(Ordering::Relaxed),
                bad_bytes: source.bad_bytes.load(Ordering::Relaxed),
            })
            .collect();
        let started = progress.started_unix_s.load(Ordering::Relaxed);
        FillStatus {
            running: self.is_running(),
            window: self.window().as_ref().map(|window| {
                format!(
                    "{:02}:{:02}-{:02}:{:02} {}",
                    window.start_minute / 60,
                    window.start_minute % 60,
                    window.end_minute / 60,
                    window.end_minute % 60,
                    window.time_zone
                )
            }),
            started_unix_s: (started > 0)
                .then_some(started)
                .or_else(|| state.last.as_ref().map(|last| last.started_unix_s)),
            files_total: progress.files_total.load(Ordering::Relaxed),
            files_done: progress.files_done.load(Ordering::Relaxed),
            files_failed: progress.files_failed.load(Ordering::Relaxed),
            bytes_total: progress.bytes_total.load(Ordering::Relaxed),
            bytes_done,
            pending_deletes: state.dropped.len() as u64,
            sources,
            last: state.last.clone(),
        }
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, FillState> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Runs one fill now (from `manifest`, or the configured one) on the caller's task.
    /// Returns its report, which is also kept in the state file.
    async fn run_once(self: &Arc<Self>, manifest: Option<ManifestLocation>) -> FillReport {
        let Some(begun) = self.begin() else {
            return FillReport {
                error: Some("a fill is already running".into()),
                ..FillReport::default()
            };
        };
        self.run_begun(begun, manifest).await
    }

    /// Starts a fill on the fill's runtime unless one runs; callable from any thread or
    /// runtime (the control socket awaits the task from the serving runtime). The check and
    /// the mark are one step under one lock, so of two callers at once exactly one starts and
    /// the other gets [`AlreadyRunning`]. The fill counts as running from the moment this
    /// returns `Ok`.
    pub fn start(
        self: &Arc<Self>,
        manifest: Option<ManifestLocation>,
    ) -> Result<StartedFill, AlreadyRunning> {
        let begun = self.begin().ok_or(AlreadyRunning)?;
        let started_unix_s = begun.started_unix_s;
        let filler = Arc::clone(self);
        let task = self
            .runtime
            .spawn(async move { filler.run_begun(begun, manifest).await });
        Ok(StartedFill {
            started_unix_s,
            task,
        })
    }

    /// The fill itself, once `begin` marked it running; dropping `begun` clears the mark
    /// however the fill ends (even if its task is dropped before it first runs).
    async fn run_begun(
        self: &Arc<Self>,
        begun: Begun,
        manifest: Option<ManifestLocation>,
    ) -> FillReport {
        let started = begun.started_unix_s;
        let cancel = &begun.cancel;
        self.progress
            .bytes_at_start
            .store(self.bytes_from_sources(), Ordering::Relaxed);
        for counter in [
            &self.progress.files_total,
            &self.progress.files_done,
            &self.progress.files_failed,
            &self.progress.bytes_total,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
        let mut report = FillReport {
            started_unix_s: started,
            ..FillReport::default()
        };
        let location = manifest.or_else(|| self.config.manifest.clone());
        let loaded = tokio::select! {
            loaded = self.load_manifest(location) => Some(loaded),
            _ = cancel.cancelled() => None,
        };
        match loaded {
            None => {
                tracing::info!("fill cancelled while loading the manifest");
                report.cancelled = true;
            }
            Some(Ok(manifest)) => self.fill(manifest, &mut report, cancel).await,
            Some(Err(error)) => {
                tracing::error!(%error, "fill: manifest refused; keeping what the box holds");
                report.error = Some(error);
            }
        }
        report.ended_unix_s = now_unix_s();
        report.bytes_fetched = self
            .bytes_from_sources()
            .saturating_sub(self.progress.bytes_at_start.load(Ordering::Relaxed));
        tracing::info!(
            fetched = report.files_fetched,
            failed = report.files_failed,
            deleted = report.files_deleted,
            cannot_fit = report.cannot_fit.len(),
            bytes = report.bytes_fetched,
            cancelled = report.cancelled,
            "fill finished"
        );
        self.lock_state().last = Some(report.clone());
        self.save_state();
        report
    }

    async fn load_manifest(&self, location: Option<ManifestLocation>) -> Result<Manifest, String> {
        let Some(location) = location else {
            return Err("no manifest configured".into());
        };
        load_manifest(
            &self.client,
            &location,
            &self.config.manifest_load,
            &self.config.fetch,
        )
        .await
    }

    async fn fill(
        self: &Arc<Self>,
        manifest: Manifest,
        report: &mut FillReport,
        cancel: &CancellationToken,
    ) {
        report.manifest_generated_at = manifest.generated_at.clone();
        report.files_in_manifest = manifest.files.len() as u64;
        let dropped: Vec<Dropped> = self
            .lock_state()
            .dropped
            .iter()
            .map(|row| Dropped {
                path: row.path.clone(),
                since_unix_s: row.since_unix_s,
                last_rank: row.last_rank,
            })
            .collect();
        let planned = match self.plan_off_workers(manifest, dropped.clone()).await {
            Ok(planned) => planned,
            Err(error) => {
                report.error = Some(error);
                return;
            }
        };
        if cancel.is_cancelled() {
            report.cancelled = true;
            return;
        }
        report.files_held_ok = planned.held_ok;
        report.cannot_fit = planned.cannot_fit.clone();
        let (deleted, attempted) = self.delete(planned.delete.clone(), cancel).await;
        report.files_deleted = deleted;
        if deleted > 0 {
            // The planner counted the deleted bytes as free: reclaim now so they are.
            let store = self.store.clone();
            match tokio::task::block_in_place(|| store.reclaim_now()) {
                Ok(freed) => {
                    tracing::info!(freed_segments = freed, "fill: reclaimed after deletes")
                }
                Err(error) => tracing::warn!(%error, "fill: reclaim after deletes failed"),
            }
        }
        // Deletes a cancel stopped stay pending, with the time they left the manifest.
        let now = now_unix_s();
        let not_attempted = planned.delete.iter().skip(attempted).map(|path| {
            dropped
                .iter()
                .find(|row| row.path == *path)
                .cloned()
                .unwrap_or(Dropped {
                    path: path.clone(),
                    since_unix_s: now,
                    last_rank: u64::MAX,
                })
        });
        self.lock_state().dropped = planned
            .keep_dropped
            .iter()
            .cloned()
            .chain(not_attempted)
            .map(|dropped| DroppedRow {
                path: dropped.path,
                since_unix_s: dropped.since_unix_s,
                last_rank: dropped.last_rank,
            })
            .collect();
        self.save_state();
        if cancel.is_cancelled() {
            report.cancelled = true;
            return;
        }
        report.files_planned = planned.fetch.len() as u64;
        self.progress
            .files_total
            .store(report.files_planned, Ordering::Relaxed);
        let total: u64 = planned.fetch.iter().map(|file| file.size_bytes).sum();
        self.progress.bytes_total.store(total, Ordering::Relaxed);
        self.fetch_all(planned.fetch, report, cancel).await;
    }

    /// Lists the store and plans, on the blocking pool (both are long for a large catalog).
    async fn plan_off_workers(
        &self,
        manifest: Manifest,
        dropped: Vec<Dropped>,
    ) -> Result<Plan, String> {
        let store = self.store.clone();
        let delete_grace_s = self.config.delete_grace_s;
        tokio::task::spawn_blocking(move || {
            let held = held_files(&store)?;
            Ok(plan(&PlanInput {
                manifest: &manifest,
                held: &held,
                dropped: &dropped,
                free_bytes: store.free_bytes(),
                now_unix_s: now_unix_s(),
                delete_grace_s,
            }))
        })
        .await
        .map_err(|error| format!("planning failed: {error}"))?
    }

    /// Deletes `paths` in order on the blocking pool, none once `cancel` is set. Returns how
    /// many were deleted and how many were attempted.
    async fn delete(&self, paths: Vec<String>, cancel: &CancellationToken) -> (u64, usize) {
        let store = self.store.clone();
        let cancel = cancel.clone();
        let deleting = tokio::task::spawn_blocking(move || {
            let mut deleted = 0u64;
            for (attempted, path) in paths.iter().enumerate() {
                if cancel.is_cancelled() {
                    tracing::info!(
                        pending = paths.len() - attempted,
                        "fill cancelled: remaining deletes left for the next fill"
                    );
                    return (deleted, attempted);
                }
                match store.delete(path) {
                    Ok(_) => deleted += 1,
                    Err(error) => tracing::warn!(%path, %error, "fill: delete failed"),
                }
            }
            (deleted, paths.len())
        });
        deleting.await.unwrap_or_else(|error| {
            tracing::error!(%error, "fill: the delete task failed");
            (0, 0)
        })
    }

    async fn fetch_all(
        self: &Arc<Self>,
        files: Vec<ManifestFile>,
        report: &mut FillReport,
        cancel: &CancellationToken,
    ) {
        let mut tasks = tokio::task::JoinSet::new();
        let mut queue = files.into_iter();
        let concurrency = self.config.concurrency.max(1);
        loop {
            while tasks.len() < concurrency && !cancel.is_cancelled() {
                let Some(file) = queue.next() else {
                    break;
                };
                let filler = Arc::clone(self);
                let cancel = cancel.clone();
                tasks.spawn(async move {
                    let result = fetch_file(
                        &filler.client,
                        &filler.store,
                        &file,
                        &filler.sources,
                        &filler.bucket,
                        &filler.config.fetch,
                        &cancel,
                    )
                    .await;
                    (file.path, result)
                });
            }
            let Some(joined) = tasks.join_next().await else {
                break;
            };
            let (path, result) = match joined {
                Ok(done) => done,
                Err(error) => (
                    String::from("?"),
                    Err(FetchError::AllSourcesFailed(vec![error.to_string()])),
                ),
            };
            match result {
                Ok(_) => {
                    report.files_fetched += 1;
                    self.progress.files_done.fetch_add(1, Ordering::Relaxed);
                }
                Err(FetchError::Cancelled) => report.cancelled = true,
                Err(error) => {
                    tracing::warn!(%path, %error, "fill: file not filled");
                    report.files_failed += 1;
                    self.progress.files_failed.fetch_add(1, Ordering::Relaxed);
                    if report.failures.len() < FAILURES_KEPT {
                        report.failures.push(Failure {
                            path,
                            error: error.to_string(),
                        });
                    }
                }
            }
        }
        if cancel.is_cancelled() {
            report.cancelled = true;
        }
    }

    fn save_state(&self) {
        let text = match serde_json::to_vec_pretty(&*self.lock_state()) {
            Ok(text) => text,
            Err(error) => {
                tracing::error!(%error, "fill state not encodable");
                return;
            }
        };
        if let Err(error) = write_atomically(&self.config.state_path, &text) {
            tracing::error!(path = %self.config.state_path.display(), %error, "fill state not saved");
        }
    }

    /// Starts [`Filler::schedule`] on the fill's runtime; the task ends when `stop` turns true.
    pub fn spawn_schedule(
        self: &Arc<Self>,
        seed: u64,
        stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        self.runtime.spawn(Arc::clone(self).schedule(seed, stop))
    }

    /// Fills inside the window: once when it opens (after the box's random delay), then again
    /// every `refetch_interval_s` while it lasts. Returns when `stop` turns true.
    async fn schedule(self: Arc<Self>, seed: u64, mut stop: watch::Receiver<bool>) {
        let delay = start_delay_s(seed, self.config.start_delay_max_s);
        let mut last_run: Option<u64> = None;
        loop {
            let now = now_unix_s();
            let now_signed = i64::try_from(now).unwrap_or(i64::MAX);
            let window = self.window();
            if window.is_some_and(|window| window.contains(now_signed)) {
                let due = match last_run {
                    None => true,
                    Some(last) => now >= last + self.config.refetch_interval_s,
                };
                if due && !self.is_running() {
                    if last_run.is_none() && delay > 0 {
                        tracing::info!(
                            delay_s = delay,
                            "fill window open: starting after the box's delay"
                        );
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(delay)) => {}
                            _ = stop.wait_for(|stop| *stop) => return,
                        }
                    }
                    last_run = Some(now_unix_s());
                    let run = self.run_once(None);
                    tokio::pin!(run);
                    let stopped = tokio::select! {
                        _ = &mut run => false,
                        _ = stop.wait_for(|stop| *stop) => true,
                    };
                    if stopped {
                        // Cancel, then let the fill record its report before returning.
                        self.cancel();
                        run.await;
                        return;
                    }
                }
            } else {
                last_run = None;
            }
            tokio::select! {
                _ = tokio::time::sleep(SCHEDULE_TICK) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    }
}

/// A fill marked running by `Filler::begin`: its token, its start time, and the guard that
/// marks it stopped when the fill ends or its future is dropped mid-way.
struct Begun {
    cancel: CancellationToken,
    started_unix_s: u64,
    _running: RunningGuard,
}

struct RunningGuard(Arc<Filler>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        *self.0.lock_current() = None;
    }
}

fn held_files(store: &Store) -> Result<Vec<HeldFile>, String> {
    let files = store
        .list_files()
        .map_err(|error| format!("listing the store: {error}"))?;
    Ok(files
        .into_iter()
        .map(|file| HeldFile {
            path: file.path,
            size_bytes: file.size_bytes,
            sha256: file.sha256,
        })
        .collect())
}

fn load_state(path: &std::path::Path) -> FillState {
    match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(state) => state,
            Err(error) => {
                let aside = path.with_extension("damaged");
                tracing::error!(path = %path.display(), %error, "fill state damaged; set aside, starting fresh");
                let _ = std::fs::rename(path, aside);
                FillState::default()
            }
        },
        Err(_) => FillState::default(),
    }
}

/// Writes a file so that a crash leaves the old or the new content, never a mix.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use appliance_device::{SimConfig, SimDrive, SimFaults};
    use appliance_store::{format_drive, DriveSource, FormatOptions, StoreConfig};

    /// A filler over a one-drive simulated store whose fills run on `runtime`, reading a
    /// manifest file that is not there (every fill ends at once with an error).
    fn filler(folder: &std::path::Path, runtime: tokio::runtime::Handle) -> Arc<Filler> {
        let drive = Arc::new(SimDrive::new(&SimConfig {
            name: "sim0".into(),
            size_bytes: 64 << 20,
            seed: 1,
            faults: SimFaults::default(),
        }));
        let options = FormatOptions {
            segment_bytes: 2 << 20,
            files_max: Some(64),
            force: false,
            drive_uuid: [1; 16],
            now_unix_s: 1_700_000_000,
        };
        format_drive(&*drive, &options).expect("format");
        let store = Store::open(
            vec![DriveSource::Opened(
                drive as Arc<dyn appliance_device::Drive>,
            )],
            StoreConfig::default(),
        );
        let config = FillConfig {
            manifest: Some(ManifestLocation::File(folder.join("absent.json"))),
            manifest_load: LoadConfig {
                bytes_max: 1 << 20,
                public_keys: Vec::new(),
            },
            sources: vec!["http://127.0.0.1:9".into()],
            concurrency: 1,
            bandwidth_bits_per_s: 0,
            fetch: FetchConfig::default(),
            delete_grace_s: 0,
            window: None,
            start_delay_max_s: 0,
            refetch_interval_s: 3600,
            state_path: folder.join("fill-state.json"),
        };
        Arc::new(Filler::new(store, config, runtime).expect("filler"))
    }

    /// Two starts with no await between them (so the first fill's task has not run yet):
    /// the check and the mark are one step, so the second is refused, and a start after the
    /// first fill ended is accepted again.
    #[test]
    fn a_second_start_before_the_first_fill_runs_is_refused() {
        let folder = std::env::temp_dir().join(format!("fill-start-{}", std::process::id()));
        std::fs::create_dir_all(&folder).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let filler = filler(&folder, runtime.handle().clone());
        runtime.block_on(async {
            let first = filler.start(None).expect("the first start");
            assert!(filler.is_running(), "running from the moment start returns");
            assert_eq!(filler.start(None).err(), Some(AlreadyRunning));
            let report = first.task.await.unwrap();
            assert!(report.error.is_some(), "{report:?}");
            assert!(!filler.is_running());
            let again = filler.start(None).expect("a start after the fill ended");
            again.task.await.unwrap();
        });
        let _ = std::fs::remove_dir_all(&folder);
    }
}
