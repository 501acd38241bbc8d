//! The store's upkeep thread (`Store::maintain` every second: due checkpoints, reclaim, reuse
//! of freed segments) and its heartbeat. The watchdog task and `/health` read the heartbeat:
//! an upkeep thread that stops making progress (stuck in a pass, or gone) stops the systemd
//! keep-alives and turns health to 503. It holds no store logic of its own.

use crate::test_faults::{Place, TestFaults};
use appliance_store::Store;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the store's upkeep runs.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// How long a pass may last before the thread counts as stuck, without a watchdog (under
/// systemd the limit is twice the watchdog interval: 60 s for `WatchdogSec=30s`). A pass is
/// bounded (reclaim takes at most 8 victims a drive), so a minute means something is wrong.
const PASS_DURATION_DEFAULT_MAX: Duration = Duration::from_secs(60);

/// Progress of the upkeep thread, as the watchdog and `/health` see it.
pub struct Heartbeat {
    origin: Instant,
    /// Milliseconds after `origin` of the last sign of progress (a pass started or ended).
    last_beat_ms: AtomicU64,
    /// Cleared when the thread's loop ends, whether stopped or unwound.
    running: AtomicBool,
    /// Silence longer than this is a stall.
    silence_max: Duration,
}

/// What the heartbeat says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpkeepState {
    Ok { silent: Duration },
    Stalled { silent: Duration },
    Exited,
}

impl Heartbeat {
    /// A heartbeat for passes that may last `pass_duration_max` (`None`: the default).
    fn new(pass_duration_max: Option<Duration>) -> Heartbeat {
        Heartbeat {
            origin: Instant::now(),
            last_beat_ms: AtomicU64::new(0),
            running: AtomicBool::new(true),
            silence_max: UPKEEP_INTERVAL + pass_duration_max.unwrap_or(PASS_DURATION_DEFAULT_MAX),
        }
    }

    fn beat(&self) {
        let now_ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_beat_ms.store(now_ms, Ordering::SeqCst);
    }

    pub fn state(&self) -> UpkeepState {
        if !self.running.load(Ordering::SeqCst) {
            return UpkeepState::Exited;
        }
        let last = Duration::from_millis(self.last_beat_ms.load(Ordering::SeqCst));
        let silent = self.origin.elapsed().saturating_sub(last);
        if silent > self.silence_max {
            UpkeepState::Stalled { silent }
        } else {
            UpkeepState::Ok { silent }
        }
    }
}

/// Clears `running` when the thread's loop ends, however it ends.
struct RunningGuard(Arc<Heartbeat>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::SeqCst);
    }
}

/// The running upkeep thread; it stops (within moments) once `stop` is called.
pub struct Upkeep {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
    pub heartbeat: Arc<Heartbeat>,
}

impl Upkeep {
    /// Starts the thread. `pass_duration_max`: how long one pass may take before the thread
    /// counts as stuck (`None`: one minute).
    pub fn spawn(store: Store, pass_duration_max: Option<Duration>, faults: TestFaults) -> Upkeep {
        let heartbeat = Arc::new(Heartbeat::new(pass_duration_max));
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let guard = RunningGuard(Arc::clone(&heartbeat));
        let thread = std::thread::Builder::new()
            .name("store-upkeep".into())
            .spawn(move || {
                let beat = &guard.0;
                loop {
                    beat.beat();
                    test_fault(faults);
                    if let Err(error) = store.maintain() {
                        tracing::warn!(%error, "store upkeep failed");
                    }
                    beat.beat();
                    // Sleeps for the interval, or wakes at once when the sender is dropped.
                    if let Err(std::sync::mpsc::RecvTimeoutError::Disconnected) =
                        stopped.recv_timeout(UPKEEP_INTERVAL)
                    {
                        return;
                    }
                }
            })
            .expect("spawning the upkeep thread");
        Upkeep {
            stop,
            thread,
            heartbeat,
        }
    }

    pub fn stop(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}

/// The test-only faults of the upkeep thread (see `test_faults.rs`).
fn test_fault(faults: TestFaults) {
    if faults.panics_in(Place::Upkeep) {
        panic!("test fault: the upkeep thread panics (APPLIANCED_TEST_PANIC=upkeep)");
    }
    if faults.stalls_in(Place::Upkeep) {
        tracing::warn!("test fault: the upkeep thread stops making progress");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Heartbeat, UpkeepState};
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    #[test]
    fn a_silent_heartbeat_turns_stalled_and_an_ended_loop_exited() {
        let heartbeat = Heartbeat::new(Some(Duration::ZERO));
        heartbeat.beat();
        assert!(matches!(heartbeat.state(), UpkeepState::Ok { .. }));
        std::thread::sleep(super::UPKEEP_INTERVAL + Duration::from_millis(50));
        assert!(matches!(heartbeat.state(), UpkeepState::Stalled { .. }));
        heartbeat.beat();
        assert!(matches!(heartbeat.state(), UpkeepState::Ok { .. }));
        heartbeat.running.store(false, Ordering::SeqCst);
        assert_eq!(heartbeat.state(), UpkeepState::Exited);
    }
}
