//! The typed views the daemon answers with: the box's state, drive rows, status, health, fill
//! status and report, the scrubber's progress, verify progress and report. `/health`,
//! `/metrics`, the control socket and `appliance-ctl` all read these types, so they cannot
//! drift apart.

use serde::{Deserialize, Serialize};

/// What steering and operators see.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Taking clients, every drive in service.
    Serving,
    /// Taking clients with a problem (a drive out of service, the upkeep thread stalled).
    Degraded,
    /// Told steering to send no new clients; sessions still open.
    Draining,
    /// Draining and no session left: safe for maintenance.
    Drained,
}

impl State {
    pub const ALL: [State; 4] = [
        State::Serving,
        State::Degraded,
        State::Draining,
        State::Drained,
    ];

    pub fn name(self) -> &'static str {
        match self {
            State::Serving => "serving",
            State::Degraded => "degraded",
            State::Draining => "draining",
            State::Drained => "drained",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        out.write_str(self.name())
    }
}

/// A data drive's service state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriveState {
    Ok,
    /// Out of service after an I/O error; stays out across restarts until replaced.
    Failed,
}

/// One data drive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveRow {
    pub path: String,
    pub model: Option<String>,
    pub serial: Option<String>,
    pub size_bytes: u64,
    /// Bytes of published files.
    pub used_bytes: u64,
    pub free_segments: u64,
    pub segment_count: u64,
    pub files: u64,
    pub state: DriveState,
    /// Why the drive failed.
    pub error: Option<String>,
    pub recovery_ms: u64,
    /// Bytes read and written through the drive's ring since start.
    pub bytes_read: u64,
    pub bytes_written: u64,
}

/// The store upkeep thread (checkpoints and reclaim).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpkeepState {
    /// Making progress.
    Ok,
    /// One pass has run longer than the daemon allows.
    Stalled,
    /// The thread is gone.
    Exited,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upkeep {
    pub state: UpkeepState,
    /// Time since the thread last showed progress.
    pub silent_ms: Option<u64>,
}

/// What `/health` answers (HTTP 200 when `healthy`, else 503). A projection of [`Status`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub state: State,
    /// Should steering send clients here: serving or degraded, with upkeep making progress.
    pub healthy: bool,
    pub version: String,
    pub uptime_s: u64,
    pub connections_active: u64,
    pub files: u64,
    pub problems: Vec<String>,
    pub upkeep: Upkeep,
    pub drives: Vec<DriveRow>,
}

/// What the store holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    pub files: u64,
    pub bytes: u64,
    /// Bytes of all drives in service.
    pub size_bytes: u64,
    /// Bytes new files can still take.
    pub free_bytes: u64,
    /// Files the last fill's manifest listed; `None` before a fill has read one.
    pub manifest_files: Option<u64>,
    /// Files no longer in the manifest, waiting out their grace period.
    pub pending_deletes: u64,
    pub index_memory_bytes: u64,
    pub relocated_files: u64,
    pub corrupt_files_removed: u64,
}

/// Traffic since start and over the last sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Traffic {
    pub connections: u64,
    pub requests_per_s: f64,
    pub gbps: f64,
    pub hits: u64,
    pub misses: u64,
    pub bytes_sent: u64,
}

/// The host, as last sampled; `None` fields are not sampled yet.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Host {
    pub cpu_percent: Option<f64>,
    pub load_1m: Option<f64>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
}

/// Everything `appliance-ctl status` shows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub state: State,
    pub healthy: bool,
    pub version: String,
    pub uptime_s: u64,
    /// One readable line per problem; empty when all is well.
    pub problems: Vec<String>,
    pub upkeep: Upkeep,
    pub drives: Vec<DriveRow>,
    pub catalog: Catalog,
    pub fill: FillStatus,
    pub scrub: Scrub,
    pub traffic: Traffic,
    pub host: Host,
    /// The HTTPS listener; None when there is none.
    #[serde(default)]
    pub tls: Option<TlsStatus>,
}

/// The HTTPS listener: how its connections are encrypted, and its certificates.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TlsStatus {
    pub listen: String,
    /// `kernel` (kTLS: the kernel encrypts what sendfile sends) or `user` (rustls in the
    /// process).
    pub path: String,
    /// Why connections are encrypted in the process; None with kTLS.
    pub why_user: Option<String>,
    /// Open TLS connections by where they are encrypted.
    pub connections_kernel: u64,
    pub connections_user: u64,
    pub certificates: Vec<TlsCertificate>,
}

/// One certificate in use.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TlsCertificate {
    pub names: Vec<String>,
    pub not_after_unix_s: i64,
    pub file: String,
}

impl Status {
    /// The `/health` document: the same facts, fewer of them.
    pub fn health(&self) -> Health {
        Health {
            state: self.state,
            healthy: self.healthy,
            version: self.version.clone(),
            uptime_s: self.uptime_s,
            connections_active: self.traffic.connections,
            files: self.catalog.files,
            problems: self.problems.clone(),
            upkeep: self.upkeep.clone(),
            drives: self.drives.clone(),
        }
    }
}

/// The background scrubber: passes over every stored file, re-reading its bytes and checking
/// them against their checksums; a file that fails is taken out and fetched again by the next
/// fill. Counts are since start.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Scrub {
    pub enabled: bool,
    /// Every file is checked once per period (unless the rate ceiling is lower).
    pub period_s: u64,
    pub bytes_per_s_max: u64,
    /// The pass under way; `None` between passes and when disabled.
    pub pass: Option<ScrubPass>,
    pub passes_completed: u64,
    /// When the last complete pass ended; `None` before the first.
    pub last_pass_ended_unix_s: Option<u64>,
    pub files_checked: u64,
    pub bytes_checked: u64,
    /// Files whose bytes failed their checksums (each taken out of service).
    pub corrupt_files: u64,
    /// The last few corrupt files found, oldest first.
    pub corrupt_recent: Vec<String>,
}

impl Scrub {
    /// Share of the current pass done, 0 to 1; 1 between passes once one has completed.
    pub fn pass_progress_ratio(&self) -> f64 {
        match &self.pass {
            Some(pass) => pass.progress_ratio(),
            None if self.passes_completed > 0 => 1.0,
            None => 0.0,
        }
    }
}

/// A scrub pass under way.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ScrubPass {
    pub started_unix_s: u64,
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    /// Bytes stored when the pass started.
    pub bytes_total: u64,
    /// The pace: stored bytes over the period, at most the ceiling.
    pub bytes_per_s: u64,
}

impl ScrubPass {
    /// Share of the pass done, 0 to 1, by bytes (by files when nothing is stored).
    pub fn progress_ratio(&self) -> f64 {
        let (done, total) = if self.bytes_total > 0 {
            (self.bytes_done, self.bytes_total)
        } else {
            (self.files_done, self.files_total)
        };
        if total == 0 {
            return 1.0;
        }
        (done as f64 / total as f64).min(1.0)
    }
}

/// One fill source's results since start.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceCounts {
    pub base_url: String,
    pub files_ok: u64,
    pub bytes: u64,
    pub errors: u64,
    pub missing: u64,
    pub bad_bytes: u64,
}

/// The fill: the running one's progress and the last one's report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FillStatus {
    pub running: bool,
    /// The daily window, `HH:MM-HH:MM zone`; `None`: fills only when an operator starts one.
    pub window: Option<String>,
    /// When the running (or last) fill started; `None` before the first.
    pub started_unix_s: Option<u64>,
    pub files_total: u64,
    pub files_done: u64,
    pub files_failed: u64,
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub pending_deletes: u64,
    pub sources: Vec<SourceCounts>,
    pub last: Option<FillReport>,
}

/// One file a fill could not get.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FillFailure {
    pub path: String,
    pub error: String,
}

/// The outcome of one fill (also kept in the fill state file).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    pub failures: Vec<FillFailure>,
    /// A reason the fill did not run at all (bad manifest, unreachable manifest).
    pub error: Option<String>,
    pub cancelled: bool,
}

impl FillReport {
    /// Everything in the manifest is held: no error, no cancel, no failure, nothing left out.
    pub fn succeeded(&self) -> bool {
        self.error.is_none()
            && !self.cancelled
            && self.files_failed == 0
            && self.cannot_fit.is_empty()
    }
}

/// The answer to a fill start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FillStarted {
    pub started_unix_s: u64,
    /// The manifest this fill reads: the one asked for, or the configured one.
    pub manifest: Option<String>,
}

/// The answer to a fill cancel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FillCancelled {
    /// Whether a fill was running to be told to stop.
    pub was_running: bool,
}

/// Verify's progress lines.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyProgress {
    pub files_done: u64,
    pub files_total: u64,
}

/// A file that failed verification.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Damage {
    pub path: String,
    pub error: String,
}

/// Verify's final answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub files_verified: u64,
    pub damaged: Vec<Damage>,
}
