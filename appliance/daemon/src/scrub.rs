//! The scrubber thread: passes over every stored version, one at a time, at idle priority and
//! at a pace that checks every drive once per configured period (stored bytes over the period,
//! never above the rate ceiling), and its progress for status and metrics. What a check is and
//! what happens to a rotted file is the store's (`Store::scrub`); this file only paces, counts
//! and reports, and must hold no store logic.

use appliance_proto::{Scrub, ScrubPass};
use appliance_store::{FileVersion, ScrubOutcome, Store};
use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Corrupt paths kept for status.
const CORRUPT_RECENT_MAX: usize = 8;
/// Times a rotted version whose path a writer held is scrubbed again in the same pass.
const BUSY_RETRIES_MAX: u32 = 3;
/// The least time before such a version is scrubbed again.
const BUSY_RETRY_WAIT: Duration = Duration::from_secs(1);

/// `[scrub]` as the thread uses it.
#[derive(Clone, Copy, Debug)]
pub struct ScrubConfig {
    pub enabled: bool,
    /// Every stored byte is checked once per period.
    pub period: Duration,
    /// Ceiling on the pace.
    pub bytes_per_s_max: u64,
}

/// The running scrubber (or a disabled one, which only reports its settings).
pub struct Scrubber {
    stop: Option<Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub progress: ScrubProgress,
}

/// The scrubber's settings, progress and findings, shared with status.
#[derive(Clone)]
pub struct ScrubProgress(Arc<Mutex<Scrub>>);

impl ScrubProgress {
    pub fn view(&self) -> Scrub {
        lock(&self.0).clone()
    }
}

impl Scrubber {
    /// Starts the thread when `config.enabled`.
    pub fn spawn(store: Store, config: ScrubConfig) -> Scrubber {
        let progress = ScrubProgress(Arc::new(Mutex::new(Scrub {
            enabled: config.enabled,
            period_s: config.period.as_secs(),
            bytes_per_s_max: config.bytes_per_s_max,
            ..Scrub::default()
        })));
        if !config.enabled {
            tracing::info!("scrubber disabled ([scrub] enabled = false)");
            return Scrubber {
                stop: None,
                thread: None,
                progress,
            };
        }
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let pass = Pass {
            store,
            config,
            progress: progress.clone(),
            stopped,
        };
        let thread = std::thread::Builder::new()
            .name("scrubber".into())
            .spawn(move || pass.run_forever())
            .expect("spawning the scrubber thread");
        Scrubber {
            stop: Some(stop),
            thread: Some(thread),
            progress,
        }
    }

    /// Stops the thread; returns within one file's check.
    pub fn stop(mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn lock(progress: &Mutex<Scrub>) -> std::sync::MutexGuard<'_, Scrub> {
    progress.lock().unwrap_or_else(|poison| poison.into_inner())
}

fn unix_now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

/// The pace of a pass over `bytes_total` stored bytes: once per period, at most the ceiling,
/// at least one byte a second.
fn pace_bytes_per_s(bytes_total: u64, config: &ScrubConfig) -> u64 {
    let period_s = config.period.as_secs().max(1);
    bytes_total
        .div_ceil(period_s)
        .clamp(1, config.bytes_per_s_max.max(1))
}

/// When a pass at `bytes_per_s` that started at `started` should have read `bytes_done`.
fn due_at(started: Instant, bytes_done: u64, bytes_per_s: u64) -> Instant {
    started + Duration::from_secs_f64(bytes_done as f64 / bytes_per_s as f64)
}

/// The thread's state.
struct Pass {
    store: Store,
    config: ScrubConfig,
    progress: ScrubProgress,
    /// Disconnected when the daemon stops.
    stopped: Receiver<()>,
}

/// The thread ends: the daemon is stopping.
struct Stopping;

impl Pass {
    fn run_forever(self) {
        match appliance_device::priority::lower_current_thread() {
            Ok(lowered) => tracing::info!(?lowered, "scrubber started at idle priority"),
            Err(error) => tracing::warn!(%error, "scrubber: could not lower its priority"),
        }
        loop {
            let started = Instant::now();
            if self.run_pass(started).is_err() {
                return;
            }
            // A pass starts at most once per period, so a small store is not read over and
            // over.
            if self.sleep_until(started + self.config.period).is_err() {
                return;
            }
        }
    }

    /// Waits until `deadline`, or returns `Stopping` at once when the daemon stops.
    fn sleep_until(&self, deadline: Instant) -> Result<(), Stopping> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.stopped.recv_timeout(left) {
            Err(RecvTimeoutError::Timeout) => Ok(()),
            Ok(()) | Err(RecvTimeoutError::Disconnected) => Err(Stopping),
        }
    }

    /// One pass over the versions stored when it starts, paced.
    fn run_pass(&self, started: Instant) -> Result<(), Stopping> {
        let versions = self.store.list_versions();
        let bytes_total: u64 = self
            .store
            .stats()
            .drives
            .iter()
            .map(|drive| drive.live_bytes)
            .sum();
        let bytes_per_s = pace_bytes_per_s(bytes_total, &self.config);
        let pass = ScrubPass {
            started_unix_s: unix_now_s(),
            files_done: 0,
            files_total: versions.len() as u64,
            bytes_done: 0,
            bytes_total,
            bytes_per_s,
        };
        tracing::info!(
            files = pass.files_total,
            bytes = bytes_total,
            bytes_per_s,
            "scrub pass started"
        );
        lock(&self.progress.0).pass = Some(pass);
        let mut queue: VecDeque<(FileVersion, u32)> =
            versions.into_iter().map(|version| (version, 0)).collect();
        let mut bytes_done = 0u64;
        while let Some((version, retries)) = queue.pop_front() {
            self.sleep_until(due_at(started, bytes_done, bytes_per_s))?;
            if retries > 0 {
                self.sleep_until(Instant::now() + BUSY_RETRY_WAIT)?;
            }
            match self.store.scrub(version) {
                Ok(ScrubOutcome::Busy { path }) if retries < BUSY_RETRIES_MAX => {
                    tracing::warn!(%path, "rotted file held by a writer: checking it again later");
                    queue.push_back((version, retries + 1));
                    continue;
                }
                Ok(outcome) => bytes_done += self.record(&outcome),
                // The store failed the drive (fail in place); its files are out of the index.
                Err(error) => tracing::warn!(%error, "scrub: a file could not be checked"),
            }
            let mut progress = lock(&self.progress.0);
            if let Some(pass) = progress.pass.as_mut() {
                pass.files_done += 1;
                pass.bytes_done = bytes_done;
            }
        }
        let mut progress = lock(&self.progress.0);
        progress.pass = None;
        progress.passes_completed += 1;
        progress.last_pass_ended_unix_s = Some(unix_now_s());
        tracing::info!(
            bytes_done,
            seconds = started.elapsed().as_secs(),
            "scrub pass ended"
        );
        Ok(())
    }

    /// Counts one outcome; returns the bytes it read.
    fn record(&self, outcome: &ScrubOutcome) -> u64 {
        let mut progress = lock(&self.progress.0);
        match outcome {
            ScrubOutcome::Clean { size_bytes, .. } => {
                progress.files_checked += 1;
                progress.bytes_checked += size_bytes;
                *size_bytes
            }
            ScrubOutcome::Removed {
                path, size_bytes, ..
            } => {
                progress.files_checked += 1;
                progress.bytes_checked += size_bytes;
                progress.corrupt_files += 1;
                if progress.corrupt_recent.len() == CORRUPT_RECENT_MAX {
                    progress.corrupt_recent.remove(0);
                }
                progress.corrupt_recent.push(path.clone());
                *size_bytes
            }
            ScrubOutcome::Busy { path } => {
                tracing::warn!(%path, "rotted file still held by a writer: left to the next pass");
                0
            }
            ScrubOutcome::Gone => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{due_at, pace_bytes_per_s, ScrubConfig};
    use std::time::{Duration, Instant};

    #[test]
    fn the_pace_spreads_a_pass_over_the_period_under_the_ceiling() {
        let config = |period_s, bytes_per_s_max| ScrubConfig {
            enabled: true,
            period: Duration::from_secs(period_s),
            bytes_per_s_max,
        };
        let cases = [
            // (stored bytes, period s, ceiling, pace)
            (604_800 * 1000, 604_800, 50 << 20, 1000),
            (1 << 40, 604_800, 50 << 20, 1_817_976),
            (1 << 50, 604_800, 50 << 20, 50 << 20),
            (0, 604_800, 50 << 20, 1),
            (10, 3, 1000, 4),
            (3000, 1, 1000, 1000),
        ];
        for (bytes, period_s, ceiling, expected) in cases {
            assert_eq!(
                pace_bytes_per_s(bytes, &config(period_s, ceiling)),
                expected,
                "{bytes} bytes over {period_s} s under {ceiling}"
            );
        }
        let start = Instant::now();
        assert_eq!(due_at(start, 0, 7), start);
        assert_eq!(
            due_at(start, 1500, 1000),
            start + Duration::from_millis(1500)
        );
    }
}
