//! The scrubber thread: passes over every stored version, one at a time, at idle priority and
//! at a pace that checks every drive once per configured period (stored bytes over the period,
//! never above the rate ceiling), and its settings and progress for status and metrics. SIGHUP
//! hands it new settings (`Scrubber::reconfigure`): a new period or ceiling re-paces the pass
//! under way from its next version on, `enabled` stops or starts the thread. What a check is
//! and what happens to a rotted file is the store's (`Store::scrub`); this file only paces,
//! counts and reports, and must hold no store logic.

use appliance_proto::{Scrub, ScrubPass};
use appliance_store::{FileVersion, ScrubOutcome, Store};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Corrupt paths kept for status.
const CORRUPT_RECENT_MAX: usize = 8;
/// Times a rotted version whose path a writer held is scrubbed again in the same pass.
const BUSY_RETRIES_MAX: u32 = 3;
/// The least time before such a version is scrubbed again.
const BUSY_RETRY_WAIT: Duration = Duration::from_secs(1);
/// Longer periods are paced as this one (a century: as good as never), so that a deadline a
/// period away always fits in an `Instant`.
const PERIOD_PACED_MAX: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `[scrub]` as the thread uses it.
#[derive(Clone, Copy, Debug)]
pub struct ScrubConfig {
    pub enabled: bool,
    /// Every stored byte is checked once per period (whole seconds: status shows `period_s`).
    pub period: Duration,
    /// Ceiling on the pace.
    pub bytes_per_s_max: u64,
}

/// The scrubber: its thread while enabled, and its settings and progress either way.
pub struct Scrubber {
    store: Store,
    /// The thread, while enabled.
    running: Option<Running>,
    /// A thread a reload disabled, finishing the version it was checking. The next thread
    /// started joins it before its first pass, so that one thread at most writes the progress.
    finishing: Option<JoinHandle<()>>,
    pub progress: ScrubProgress,
}

/// A scrubber thread and its doorbell.
struct Running {
    /// Rung when the settings change; dropped to stop the thread. One ring at most is pending
    /// (the thread reads the newest settings when it wakes), so it never fills up.
    wake: SyncSender<()>,
    thread: JoinHandle<()>,
}

/// The scrubber's settings, progress and findings, shared with status. The thread paces by
/// the settings held here, so status always shows the ones in force.
#[derive(Clone)]
pub struct ScrubProgress(Arc<Mutex<Scrub>>);

impl ScrubProgress {
    pub fn view(&self) -> Scrub {
        lock(&self.0).clone()
    }

    /// Puts `config` in force. A disabled scrubber has no pass under way; its findings stay.
    fn set_settings(&self, config: ScrubConfig) {
        let mut view = lock(&self.0);
        view.enabled = config.enabled;
        view.period_s = config.period.as_secs();
        view.bytes_per_s_max = config.bytes_per_s_max;
        if !config.enabled {
            view.pass = None;
        }
    }

    /// The settings in force, as the thread paces by them.
    fn settings(&self) -> ScrubConfig {
        let view = lock(&self.0);
        ScrubConfig {
            enabled: view.enabled,
            period: Duration::from_secs(view.period_s).min(PERIOD_PACED_MAX),
            bytes_per_s_max: view.bytes_per_s_max,
        }
    }
}

impl Scrubber {
    /// Starts the thread when `config.enabled`.
    pub fn spawn(store: Store, config: ScrubConfig) -> Scrubber {
        let progress = ScrubProgress(Arc::new(Mutex::new(Scrub::default())));
        progress.set_settings(config);
        let mut scrubber = Scrubber {
            store,
            running: None,
            finishing: None,
            progress,
        };
        if config.enabled {
            scrubber.start();
        } else {
            tracing::info!("scrubber disabled ([scrub] enabled = false)");
        }
        scrubber
    }

    /// Puts new settings in force (SIGHUP). A running thread wakes at once and paces by them
    /// from its next version on, keeping the pass under way; `enabled = false` stops the
    /// thread (it finishes the version it is checking; findings stay), `enabled = true`
    /// starts one, which begins a new pass once a thread stopped by an earlier reload has
    /// finished its version. Never blocks.
    pub fn reconfigure(&mut self, config: ScrubConfig) {
        self.progress.set_settings(config);
        match (config.enabled, self.running.take()) {
            (true, Some(running)) => match running.wake.try_send(()) {
                // Full: a ring is pending, and the thread will read these settings.
                Ok(()) | Err(TrySendError::Full(())) => self.running = Some(running),
                // The thread is gone (it can only have panicked, in a build that unwinds):
                // a new one takes over.
                Err(TrySendError::Disconnected(())) => {
                    tracing::error!("the scrubber thread had ended; starting a new one");
                    let _ = running.thread.join();
                    self.start();
                }
            },
            (true, None) => self.start(),
            (false, Some(running)) => {
                tracing::info!("scrubber stopping ([scrub] enabled = false); findings kept");
                drop(running.wake);
                self.finishing = Some(running.thread);
            }
            (false, None) => {}
        }
    }

    /// Starts a thread, which begins once a thread stopped by a reload has ended.
    fn start(&mut self) {
        // The new thread, not the caller (the signal loop), waits for a thread stopped by an
        // earlier reload to finish its version: that can take as long as the drive does.
        let finishing = self.finishing.take();
        let (wake, woken) = std::sync::mpsc::sync_channel::<()>(1);
        let pass = Pass {
            store: self.store.clone(),
            progress: self.progress.clone(),
            woken,
        };
        let thread = std::thread::Builder::new()
            .name("scrubber".into())
            .spawn(move || {
                if let Some(thread) = finishing {
                    let _ = thread.join();
                }
                pass.run_forever()
            })
            .expect("spawning the scrubber thread");
        self.running = Some(Running { wake, thread });
    }

    /// Stops the thread; returns within one file's check.
    pub fn stop(mut self) {
        if let Some(running) = self.running.take() {
            drop(running.wake);
            let _ = running.thread.join();
        }
        if let Some(thread) = self.finishing.take() {
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

/// A pass's pacing: the bytes done past `bytes_paid` are due at `bytes_per_s` from `since`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Pace {
    since: Instant,
    /// Bytes done whose time had passed at `since`.
    bytes_paid: u64,
    bytes_per_s: u64,
}

impl Pace {
    fn new(started: Instant, bytes_per_s: u64) -> Pace {
        Pace {
            since: started,
            bytes_paid: 0,
            bytes_per_s,
        }
    }

    /// When the pass should have read `bytes_done`: it reads on once that time has come.
    fn due_at(&self, bytes_done: u64) -> Instant {
        let bytes_unpaid = bytes_done.saturating_sub(self.bytes_paid);
        self.since + Duration::from_secs_f64(bytes_unpaid as f64 / self.bytes_per_s as f64)
    }

    /// The pace at `bytes_per_s` from `now` on, with `bytes_done` read: the bytes whose time
    /// had not come at the old pace take their time at the new one, so a long wait computed
    /// from an old low pace is not waited out. A pass behind its old pace does not make up
    /// for it at the new one (no burst after a change).
    fn changed(&self, now: Instant, bytes_done: u64, bytes_per_s: u64) -> Pace {
        let wait_left = self.due_at(bytes_done).saturating_duration_since(now);
        let bytes_unpaid = u128::from(self.bytes_per_s) * wait_left.as_nanos() / 1_000_000_000;
        let bytes_unpaid = u64::try_from(bytes_unpaid)
            .unwrap_or(u64::MAX)
            .min(bytes_done);
        Pace {
            since: now,
            bytes_paid: bytes_done - bytes_unpaid,
            bytes_per_s,
        }
    }
}

/// The thread's state.
struct Pass {
    store: Store,
    progress: ScrubProgress,
    /// A ring: the settings changed. Disconnected: the thread is to stop.
    woken: Receiver<()>,
}

/// Why a wait ended, when the thread is not to stop.
enum Wake {
    /// Its deadline came.
    Due,
    /// The settings changed: the deadline may have moved.
    SettingsChanged,
}

/// The thread ends: the daemon is stopping, or a reload disabled the scrubber.
struct Stopping;

impl Pass {
    fn run_forever(self) {
        match appliance_device::priority::lower_current_thread() {
            Ok(lowered) => tracing::info!(?lowered, "scrubber started at idle priority"),
            Err(error) => tracing::warn!(%error, "scrubber: could not lower its priority"),
        }
        let Err(Stopping) = self.run_passes();
        // A pass left unfinished is not under way any more; status shows the findings.
        lock(&self.progress.0).pass = None;
        tracing::info!("scrubber stopped");
    }

    fn run_passes(&self) -> Result<Infallible, Stopping> {
        loop {
            let started = Instant::now();
            self.run_pass(started)?;
            // A pass starts at most once per period (the one in force), so a small store is
            // not read over and over.
            loop {
                let next_pass_at = started + self.progress.settings().period;
                match self.wait_until(next_pass_at)? {
                    Wake::Due => break,
                    Wake::SettingsChanged => continue,
                }
            }
        }
    }

    /// Waits until `deadline` or until the settings change; returns `Stopping` at once when
    /// the thread is to stop.
    fn wait_until(&self, deadline: Instant) -> Result<Wake, Stopping> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.woken.recv_timeout(left) {
            Ok(()) => Ok(Wake::SettingsChanged),
            Err(RecvTimeoutError::Timeout) => Ok(Wake::Due),
            Err(RecvTimeoutError::Disconnected) => Err(Stopping),
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
        let bytes_per_s = pace_bytes_per_s(bytes_total, &self.progress.settings());
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
        let mut pace = Pace::new(started, bytes_per_s);
        let mut queue: VecDeque<(FileVersion, u32)> =
            versions.into_iter().map(|version| (version, 0)).collect();
        let mut bytes_done = 0u64;
        while let Some((version, retries)) = queue.pop_front() {
            let not_before = match retries {
                0 => Instant::now(),
                _ => Instant::now() + BUSY_RETRY_WAIT,
            };
            self.wait_for_turn(&mut pace, bytes_done, bytes_total, not_before)?;
            match self.store.scrub(version) {
                Ok(ScrubOutcome::Busy { path }) if retries < BUSY_RETRIES_MAX => {
                    tracing::warn!(%path, "rotted file held by a writer: checking it again later");
                    queue.push_back((version, retries + 1));
                }
                Ok(outcome) => bytes_done += self.record(&outcome),
                // The store failed the drive (fail in place); its files are out of the index.
                Err(error) => {
                    tracing::warn!(%error, "scrub: a file could not be checked");
                    done_in_pass(&mut lock(&self.progress.0), 0);
                }
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

    /// Waits until the pace lets the pass read past `bytes_done`, and at least until
    /// `not_before`. New settings re-pace the pass at once, from the bytes done on.
    fn wait_for_turn(
        &self,
        pace: &mut Pace,
        bytes_done: u64,
        bytes_total: u64,
        not_before: Instant,
    ) -> Result<(), Stopping> {
        loop {
            match self.wait_until(pace.due_at(bytes_done).max(not_before))? {
                Wake::Due => return Ok(()),
                Wake::SettingsChanged => {
                    let bytes_per_s = pace_bytes_per_s(bytes_total, &self.progress.settings());
                    if bytes_per_s != pace.bytes_per_s {
                        tracing::info!(bytes_per_s, "scrub pass re-paced");
                    }
                    *pace = pace.changed(Instant::now(), bytes_done, bytes_per_s);
                    if let Some(pass) = lock(&self.progress.0).pass.as_mut() {
                        pass.bytes_per_s = bytes_per_s;
                    }
                }
            }
        }
    }

    /// Counts one outcome and one more file done in the pass (in one step, so that status
    /// never shows a file checked but not done); returns the bytes it read.
    fn record(&self, outcome: &ScrubOutcome) -> u64 {
        let mut progress = lock(&self.progress.0);
        let bytes_read = match outcome {
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
        };
        done_in_pass(&mut progress, bytes_read);
        bytes_read
    }
}

/// One more file done in the pass under way, which read `bytes_read`.
fn done_in_pass(progress: &mut Scrub, bytes_read: u64) {
    if let Some(pass) = progress.pass.as_mut() {
        pass.files_done += 1;
        pass.bytes_done += bytes_read;
    }
}

#[cfg(test)]
mod tests {
    use super::{pace_bytes_per_s, Pace, ScrubConfig, Scrubber};
    use appliance_device::{SimConfig, SimDrive, SimFaults};
    use appliance_proto::Scrub;
    use appliance_store::{format_drive, Drive, DriveSource, FormatOptions, Store, StoreConfig};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    fn config(period_s: u64, bytes_per_s_max: u64) -> ScrubConfig {
        ScrubConfig {
            enabled: true,
            period: Duration::from_secs(period_s),
            bytes_per_s_max,
        }
    }

    #[test]
    fn the_pace_spreads_a_pass_over_the_period_under_the_ceiling() {
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
        assert_eq!(Pace::new(start, 7).due_at(0), start);
        assert_eq!(
            Pace::new(start, 1000).due_at(1500),
            start + Duration::from_millis(1500)
        );
    }

    /// A change of pace (SIGHUP) applies to the bytes whose time has not come yet: the wait
    /// left is not the one computed from the old pace, and a pass behind its old pace gets no
    /// burst at the new one.
    #[test]
    fn a_new_pace_applies_to_the_bytes_not_yet_due() {
        let start = Instant::now();
        let cases = [
            // (old pace, bytes done, change after ms, new pace, wait left after the change ms)
            (1000, 1000, 500, 100, 5000),
            (1000, 1000, 500, 10_000, 50),
            (1000, 1000, 500, 1000, 500),
            (1, 300_000, 0, 3_000_000, 100),
            (1, 300_000, 250_000_000, 1000, 50_000),
            (1000, 1000, 3000, 500, 0),
            (1000, 0, 0, 10, 0),
        ];
        for (old_bytes_per_s, bytes_done, change_ms, new_bytes_per_s, wait_ms) in cases {
            let case = format!(
                "{bytes_done} bytes done at {old_bytes_per_s} B/s, {new_bytes_per_s} B/s \
                 after {change_ms} ms"
            );
            let now = start + Duration::from_millis(change_ms);
            let pace = Pace::new(start, old_bytes_per_s).changed(now, bytes_done, new_bytes_per_s);
            assert_eq!(pace.bytes_per_s, new_bytes_per_s, "{case}");
            let due = pace.due_at(bytes_done);
            let wait = due.saturating_duration_since(now);
            let expected = Duration::from_millis(wait_ms);
            assert!(
                wait.abs_diff(expected) < Duration::from_millis(1),
                "{case}: waits {wait:?}, not {expected:?}"
            );
            let one_second_more = pace.due_at(bytes_done + new_bytes_per_s);
            assert!(
                (one_second_more - due).abs_diff(Duration::from_secs(1)) < Duration::from_millis(1),
                "{case}: the bytes after take their time at the new pace"
            );
        }
    }

    /// A store on a simulated drive holding `count` files of `size_bytes` each.
    fn store_with_files(count: u8, size_bytes: usize) -> Store {
        let drive = Arc::new(SimDrive::new(&SimConfig {
            name: "scrub".into(),
            size_bytes: 32 << 20,
            seed: 1,
            faults: SimFaults::default(),
        }));
        let options = FormatOptions {
            segment_bytes: 2 << 20,
            files_max: Some(64),
            force: false,
            drive_uuid: [7; 16],
            now_unix_s: 1_700_000_000,
        };
        format_drive(&*drive, &options).expect("format");
        let config = StoreConfig {
            write_buffer_bytes: 64 << 10,
            write_buffer_count: 4,
            ..StoreConfig::default()
        };
        let store = Store::open(vec![DriveSource::Opened(drive as Arc<dyn Drive>)], config);
        for number in 0..count {
            let mut writer = store
                .create(&format!("/file-{number}"), size_bytes as u64)
                .expect("create");
            writer.append(&vec![number; size_bytes]).expect("append");
            writer.publish([number; 32]).expect("publish");
        }
        store
    }

    /// Polls the scrubber's view until `done` holds; panics after two seconds.
    fn wait_for(scrubber: &Scrubber, what: &str, done: impl Fn(&Scrub) -> bool) -> Scrub {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let view = scrubber.progress.view();
            if done(&view) {
                return view;
            }
            assert!(Instant::now() < deadline, "{what}: {view:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Files checked once per completed pass plus the pass under way: no version is checked
    /// twice in a pass, so a pass re-paced mid-way went on instead of starting over.
    fn checked_once(view: &Scrub, files: u64) -> bool {
        let done = view.pass.as_ref().map_or(0, |pass| pass.files_done);
        view.files_checked == files * view.passes_completed + done
    }

    /// The sleeps of a running pass wake at once for new settings and at stop: a pass stuck at
    /// one byte a second goes on at the new pace with its progress, stops when disabled
    /// (findings kept), starts again when enabled, and a stop ends a long sleep at once.
    #[test]
    fn new_settings_wake_the_pass_and_disabling_stops_it() {
        let store = store_with_files(4, 64 << 10);
        let mut scrubber = Scrubber::spawn(store, config(3600, 1));
        let crawling = wait_for(&scrubber, "the first file is checked", |view| {
            view.pass.as_ref().is_some_and(|pass| pass.files_done == 1)
        });
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            scrubber.progress.view(),
            crawling,
            "one byte a second holds"
        );

        scrubber.reconfigure(config(1, 50 << 20));
        let view = scrubber.progress.view();
        assert_eq!((view.period_s, view.bytes_per_s_max), (1, 50 << 20));
        let view = wait_for(&scrubber, "the pass ends at the new pace", |view| {
            view.passes_completed == 1
        });
        assert!(checked_once(&view, 4), "{view:?}");
        assert!(view.files_checked >= 4, "{view:?}");

        scrubber.reconfigure(ScrubConfig {
            enabled: false,
            ..config(1, 50 << 20)
        });
        let view = scrubber.progress.view();
        assert!(!view.enabled && view.pass.is_none(), "{view:?}");
        // The thread may finish the file it was checking.
        std::thread::sleep(Duration::from_millis(100));
        let view = scrubber.progress.view();
        std::thread::sleep(Duration::from_millis(1200));
        let stopped = scrubber.progress.view();
        assert!(!stopped.enabled && stopped.pass.is_none(), "{stopped:?}");
        assert_eq!(
            (stopped.files_checked, stopped.passes_completed),
            (view.files_checked, view.passes_completed),
            "a disabled scrubber checks nothing"
        );

        scrubber.reconfigure(config(3600, 1));
        let view = wait_for(&scrubber, "enabled again, a new pass starts", |view| {
            view.files_checked > stopped.files_checked
        });
        assert!(view.enabled, "{view:?}");
        let stopping = Instant::now();
        scrubber.stop();
        assert!(
            stopping.elapsed() < Duration::from_secs(1),
            "a stop waits out a long sleep"
        );
    }
}
