//! Running fills: load and validate the manifest, plan, delete what is past its grace period,
//! fetch what is missing (most popular first, a bounded number at once, under the shared
//! bandwidth cap), persist the fill state (dropped files, last result) in the state directory,
//! and run on schedule inside the fill window. An operator can start or cancel a fill at any
//! time; only one fill runs at once.

use crate::bucket::SharedBucket;
use crate::fetch::{fetch_file, FetchConfig, FetchError, Source};
use crate::manifest::{parse_manifest, Manifest};
use crate::plan::{plan, Dropped, HeldFile, PlanInput};
use crate::schedule::{start_delay_s, FillWindow};
use appliance_store::Store;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Largest manifest accepted, in bytes.
const MANIFEST_BYTES_MAX: usize = 1 << 30;
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

/// One file that could not be filled.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Failure {
    pub path: String,
    pub error: String,
}

/// The outcome of one fill.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FillReport {
    pub started_unix_s: u64,
    pub ended_unix_s: u64,
    pub manifest_generated_at: String,
    pub files_in_manifest: u64,
    pub files_held_ok: u64,
    pub files_planned: u64,
    pub files_fetched: u64,
    pub files_failed: u64,
    pub bytes_fetched: u64,
    pub files_deleted: u64,
    pub cannot_fit: Vec<String>,
    pub failures: Vec<Failure>,
    /// A reason the fill did not run at all (bad manifest, unreachable manifest).
    pub error: Option<String>,
    pub cancelled: bool,
}

impl FillReport {
    pub fn succeeded(&self) -> bool {
        self.error.is_none()
            && !self.cancelled
            && self.files_failed == 0
            && self.cannot_fit.is_empty()
    }
}

/// What survives a restart.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FillState {
    pub dropped: Vec<DroppedRow>,
    pub last: Option<FillReport>,
}

/// Live progress of the running fill.
#[derive(Default)]
struct Progress {
    running: AtomicBool,
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
    cancel: watch::Sender<bool>,
    window: Mutex<Option<FillWindow>>,
}

fn now_unix_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

impl Filler {
    /// A filler; the state file is loaded (a damaged one is set aside and reported).
    pub fn new(store: Store, config: FillConfig) -> Result<Filler, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(config.fetch.response_timeout)
            .user_agent(concat!("applianced-fill/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|error| format!("HTTP client: {error}"))?;
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
            cancel: watch::channel(false).0,
            window: Mutex::new(config.window.clone()),
            config,
        })
    }

    /// Asks the running fill to stop; files in flight are abandoned (nothing half-written is
    /// ever visible).
    pub fn cancel(&self) {
        let _ = self.cancel.send(true);
    }

    pub fn is_running(&self) -> bool {
        self.progress.running.load(Ordering::SeqCst)
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
    pub fn status_json(&self) -> serde_json::Value {
        let progress = &self.progress;
        let bytes_done = self
            .bytes_from_sources()
            .saturating_sub(progress.bytes_at_start.load(Ordering::Relaxed));
        let state = self.lock_state();
        let sources: Vec<serde_json::Value> = self
            .sources
            .iter()
            .map(|source| {
                serde_json::json!({
                    "base_url": source.base_url,
                    "files_ok": source.files_ok.load(Ordering::Relaxed),
                    "bytes": source.bytes.load(Ordering::Relaxed),
                    "errors": source.errors.load(Ordering::Relaxed),
                    "missing": source.missing.load(Ordering::Relaxed),
                    "bad_bytes": source.bad_bytes.load(Ordering::Relaxed),
                })
            })
            .collect();
        serde_json::json!({
            "running": self.is_running(),
            "started_unix_s": progress.started_unix_s.load(Ordering::Relaxed),
            "files_total": progress.files_total.load(Ordering::Relaxed),
            "files_done": progress.files_done.load(Ordering::Relaxed),
            "files_failed": progress.files_failed.load(Ordering::Relaxed),
            "bytes_total": progress.bytes_total.load(Ordering::Relaxed),
            "bytes_done": bytes_done,
            "window": self.window().as_ref().map(|window| format!(
                "{:02}:{:02}-{:02}:{:02} {}",
                window.start_minute / 60, window.start_minute % 60,
                window.end_minute / 60, window.end_minute % 60, window.time_zone)),
            "pending_deletes": state.dropped.len(),
            "sources": sources,
            "last": state.last,
        })
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, FillState> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Runs one fill now (from `manifest`, or the configured one). Returns its report, which
    /// is also kept in the state file.
    pub async fn run_once(self: &Arc<Self>, manifest: Option<ManifestLocation>) -> FillReport {
        if self.progress.running.swap(true, Ordering::SeqCst) {
            return FillReport {
                error: Some("a fill is already running".into()),
                ..FillReport::default()
            };
        }
        let _ = self.cancel.send(false);
        let started = now_unix_s();
        self.progress
            .started_unix_s
            .store(started, Ordering::Relaxed);
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
        match self.load_manifest(location).await {
            Ok(manifest) => self.fill(&manifest, &mut report).await,
            Err(error) => {
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
            "fill finished"
        );
        self.lock_state().last = Some(report.clone());
        self.save_state();
        self.progress.running.store(false, Ordering::SeqCst);
        report
    }

    async fn load_manifest(&self, location: Option<ManifestLocation>) -> Result<Manifest, String> {
        let bytes = match location {
            None => return Err("no manifest configured".into()),
            Some(ManifestLocation::File(path)) => std::fs::read(&path)
                .map_err(|error| format!("reading manifest {}: {error}", path.display()))?,
            Some(ManifestLocation::Url(url)) => self.download_manifest(&url).await?,
        };
        if bytes.len() > MANIFEST_BYTES_MAX {
            return Err(format!("manifest of {} bytes is too large", bytes.len()));
        }
        parse_manifest(&bytes).map_err(|error| format!("manifest refused: {error}"))
    }

    async fn download_manifest(&self, url: &str) -> Result<Vec<u8>, String> {
        let request = self.client.get(url).send();
        let response = tokio::time::timeout(self.config.fetch.response_timeout, request)
            .await
            .map_err(|_| format!("manifest {url}: no response in time"))?
            .map_err(|error| format!("manifest {url}: {error}"))?;
        if !response.status().is_success() {
            return Err(format!(
                "manifest {url}: HTTP {}",
                response.status().as_u16()
            ));
        }
        let body = tokio::time::timeout(self.config.fetch.stall_timeout * 4, response.bytes())
            .await
            .map_err(|_| format!("manifest {url}: body too slow"))?
            .map_err(|error| format!("manifest {url}: {error}"))?;
        Ok(body.to_vec())
    }

    async fn fill(self: &Arc<Self>, manifest: &Manifest, report: &mut FillReport) {
        report.manifest_generated_at = manifest.generated_at.clone();
        report.files_in_manifest = manifest.files.len() as u64;
        let held = match self.held_files() {
            Ok(held) => held,
            Err(error) => {
                report.error = Some(error);
                return;
            }
        };
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
        let planned = plan(&PlanInput {
            manifest,
            held: &held,
            dropped: &dropped,
            free_bytes: self.store.free_bytes(),
            now_unix_s: now_unix_s(),
            delete_grace_s: self.config.delete_grace_s,
        });
        report.files_held_ok = planned.held_ok;
        report.cannot_fit = planned.cannot_fit.clone();
        for path in &planned.delete {
            match self.store.delete(path) {
                Ok(_) => report.files_deleted += 1,
                Err(error) => tracing::warn!(%path, %error, "fill: delete failed"),
            }
        }
        if report.files_deleted > 0 {
            // The planner counted the deleted bytes as free: reclaim now so they are.
            let store = self.store.clone();
            match tokio::task::block_in_place(|| store.reclaim_now()) {
                Ok(freed) => {
                    tracing::info!(freed_segments = freed, "fill: reclaimed after deletes")
                }
                Err(error) => tracing::warn!(%error, "fill: reclaim after deletes failed"),
            }
        }
        self.lock_state().dropped = planned
            .keep_dropped
            .iter()
            .map(|dropped| DroppedRow {
                path: dropped.path.clone(),
                since_unix_s: dropped.since_unix_s,
                last_rank: dropped.last_rank,
            })
            .collect();
        self.save_state();
        report.files_planned = planned.fetch.len() as u64;
        self.progress
            .files_total
            .store(report.files_planned, Ordering::Relaxed);
        let total: u64 = planned.fetch.iter().map(|file| file.size_bytes).sum();
        self.progress.bytes_total.store(total, Ordering::Relaxed);
        self.fetch_all(planned.fetch, report).await;
    }

    fn held_files(&self) -> Result<Vec<HeldFile>, String> {
        let files = self
            .store
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

    async fn fetch_all(
        self: &Arc<Self>,
        files: Vec<crate::manifest::ManifestFile>,
        report: &mut FillReport,
    ) {
        let mut tasks = tokio::task::JoinSet::new();
        let mut queue = files.into_iter();
        let concurrency = self.config.concurrency.max(1);
        loop {
            while tasks.len() < concurrency && !*self.cancel.borrow() {
                let Some(file) = queue.next() else {
                    break;
                };
                let filler = Arc::clone(self);
                let cancel = self.cancel.subscribe();
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
        if *self.cancel.borrow() {
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

    /// Fills inside the window: once when it opens (after the box's random delay), then again
    /// every `refetch_interval_s` while it lasts. Returns when `stop` turns true.
    pub async fn schedule(self: Arc<Self>, seed: u64, mut stop: watch::Receiver<bool>) {
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
                    let filler = Arc::clone(&self);
                    tokio::select! {
                        _ = filler.run_once(None) => {}
                        _ = stop.wait_for(|stop| *stop) => {
                            self.cancel();
                            return;
                        }
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
