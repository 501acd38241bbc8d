//! The send-side limits of one response, as a pure meter over times passed in: a client that
//! accepts nothing for the send timeout, or fewer bytes than the minimum send rate over a whole
//! window, is cut. Must not do I/O, read a clock, or panic on any configured value.
//!
//! Windows are consecutive: the first starts when the response starts, each later one when
//! the previous one was judged. Only a window that ends while the response is still being
//! sent is judged, so a response that fits in the socket buffers never is, and the time
//! between responses on a keep-alive connection never counts.

use std::time::{Duration, Instant};

/// The least a client must take while a response is sent to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendRateMin {
    /// Bytes per second, averaged over `window`; 0 turns the check off.
    pub bytes_per_s: u64,
    /// Length of a window; a zero window turns the check off.
    pub window: Duration,
}

impl SendRateMin {
    /// Off: only the send timeout applies.
    pub const OFF: SendRateMin = SendRateMin {
        bytes_per_s: 0,
        window: Duration::ZERO,
    };

    fn is_on(&self) -> bool {
        self.bytes_per_s > 0 && !self.window.is_zero()
    }

    /// Bytes a whole window must deliver: the rate times the window, saturating.
    pub fn window_bytes_min(&self) -> u64 {
        let product = u128::from(self.bytes_per_s).saturating_mul(self.window.as_millis()) / 1000;
        u64::try_from(product).unwrap_or(u64::MAX)
    }
}

/// Why sending a response was given up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendCut {
    /// The client accepted nothing for the send timeout.
    NoProgress,
    /// A whole window delivered `window_bytes`, fewer than `window_bytes_min`.
    TooSlow {
        window_bytes: u64,
        window_bytes_min: u64,
    },
}

/// Watches the sending of one response.
#[derive(Clone, Debug)]
pub struct SendMeter {
    send_timeout: Duration,
    rate_min: SendRateMin,
    last_progress: Instant,
    window_start: Instant,
    window_bytes: u64,
}

impl SendMeter {
    /// A meter for a response whose sending starts at `now`.
    pub fn start(send_timeout: Duration, rate_min: SendRateMin, now: Instant) -> SendMeter {
        SendMeter {
            send_timeout,
            rate_min,
            last_progress: now,
            window_start: now,
            window_bytes: 0,
        }
    }

    /// When a sender still waiting for the client must wake up and call `check`; `None` when
    /// that time is beyond what an `Instant` can hold (a timeout configured as "never").
    pub fn deadline(&self) -> Option<Instant> {
        let stalled = self.last_progress.checked_add(self.send_timeout);
        let window_end = if self.rate_min.is_on() {
            self.window_start.checked_add(self.rate_min.window)
        } else {
            None
        };
        match (stalled, window_end) {
            (Some(stalled), Some(window_end)) => Some(stalled.min(window_end)),
            (stalled, window_end) => stalled.or(window_end),
        }
    }

    /// Counts `bytes` the client accepted at `now`, then judges as `check` does.
    pub fn record(&mut self, bytes: u64, now: Instant) -> Result<(), SendCut> {
        if bytes > 0 {
            self.last_progress = now;
            self.window_bytes = self.window_bytes.saturating_add(bytes);
        }
        self.check(now)
    }

    /// Takes `waited` out of the judged time (never moving it past `now`): time the server
    /// spent on its own drive inside a response (a cold piece queued for a drive's thread and
    /// read there) is not the client's, so the send timeout and the current window restart
    /// that much later. At most one send timeout is excused per wait: a drive so slow (or a
    /// queue so long) that one piece takes longer still ends the response as a stall would,
    /// so an overloaded box sheds connections instead of holding every one of them forever.
    pub fn excuse(&mut self, waited: Duration, now: Instant) {
        let waited = waited.min(self.send_timeout);
        let later = |at: Instant| at.checked_add(waited).map_or(now, |moved| moved.min(now));
        self.last_progress = later(self.last_progress);
        self.window_start = later(self.window_start);
    }

    /// The latest a wait on the drive may end before the response is given up as stalled:
    /// the send timeout from the last progress, plus the one send timeout a wait is excused
    /// (`excuse`). `None` when that is beyond what an `Instant` can hold.
    pub fn drive_deadline(&self) -> Option<Instant> {
        self.last_progress
            .checked_add(self.send_timeout)?
            .checked_add(self.send_timeout)
    }

    /// Judges the sending at `now`: cut when nothing was accepted for the send timeout, or
    /// when a window has ended with fewer bytes than the minimum (otherwise the next window
    /// starts at `now`).
    pub fn check(&mut self, now: Instant) -> Result<(), SendCut> {
        if now.saturating_duration_since(self.last_progress) >= self.send_timeout {
            return Err(SendCut::NoProgress);
        }
        if !self.rate_min.is_on()
            || now.saturating_duration_since(self.window_start) < self.rate_min.window
        {
            return Ok(());
        }
        let window_bytes_min = self.rate_min.window_bytes_min();
        if self.window_bytes < window_bytes_min {
            return Err(SendCut::TooSlow {
                window_bytes: self.window_bytes,
                window_bytes_min,
            });
        }
        self.window_start = now;
        self.window_bytes = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One step of a sending: at `at_ms` after the start, `Some(bytes)` accepted or `None` (a
    /// deadline woke the sender); then the expected verdict.
    type Step = (u64, Option<u64>, Result<(), SendCut>);

    fn check(send_timeout_ms: u64, rate_min: SendRateMin, steps: &[Step]) {
        let start = Instant::now();
        let mut meter = SendMeter::start(Duration::from_millis(send_timeout_ms), rate_min, start);
        for (at_ms, accepted, expected) in steps {
            let now = start + Duration::from_millis(*at_ms);
            let verdict = match accepted {
                Some(bytes) => meter.record(*bytes, now),
                None => meter.check(now),
            };
            assert_eq!(verdict, *expected, "at {at_ms} ms, {accepted:?} accepted");
        }
    }

    fn rate(bytes_per_s: u64, window_ms: u64) -> SendRateMin {
        SendRateMin {
            bytes_per_s,
            window: Duration::from_millis(window_ms),
        }
    }

    fn too_slow(window_bytes: u64, window_bytes_min: u64) -> Result<(), SendCut> {
        Err(SendCut::TooSlow {
            window_bytes,
            window_bytes_min,
        })
    }

    #[test]
    fn time_on_the_drive_is_not_the_clients() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        // 900 ms of a 1000 ms send timeout went to a cold read: the client has its full
        // timeout from where the read ended.
        let mut meter = SendMeter::start(Duration::from_millis(1000), SendRateMin::OFF, start);
        assert_eq!(meter.drive_deadline(), Some(at(2000)));
        meter.excuse(Duration::from_millis(900), at(900));
        assert_eq!(meter.drive_deadline(), Some(at(2900)));
        assert_eq!(meter.check(at(1500)), Ok(()));
        assert_eq!(meter.check(at(1900)), Err(SendCut::NoProgress));
        // The same for a window of the minimum rate: 8 KiB in the second that was the
        // client's passes, where it would fail over the two seconds of wall time.
        let mut meter = SendMeter::start(Duration::from_secs(10), rate(8192, 1000), start);
        meter.excuse(Duration::from_millis(1000), at(1000));
        assert_eq!(meter.record(8192, at(2000)), Ok(()));
        // One wait is excused up to the send timeout: a piece that took five is a stall.
        let mut meter = SendMeter::start(Duration::from_millis(1000), SendRateMin::OFF, start);
        meter.excuse(Duration::from_millis(5000), at(5000));
        assert_eq!(meter.check(at(5000)), Err(SendCut::NoProgress));
        // An excuse longer than the time passed never moves the meter into the future.
        let mut meter = SendMeter::start(Duration::from_millis(1000), SendRateMin::OFF, start);
        meter.excuse(Duration::MAX, at(100));
        assert_eq!(meter.check(at(1099)), Ok(()));
        assert_eq!(meter.check(at(1100)), Err(SendCut::NoProgress));
    }

    #[test]
    fn meters_cut_stalled_and_slow_clients_only() {
        let cases: Vec<(u64, SendRateMin, Vec<Step>)> = vec![
            // Nothing accepted for the send timeout.
            (
                1000,
                SendRateMin::OFF,
                vec![(500, None, Ok(())), (1000, None, Err(SendCut::NoProgress))],
            ),
            // Any progress resets the send timeout: alone, it never cuts a trickle.
            (
                1000,
                SendRateMin::OFF,
                vec![
                    (900, Some(1), Ok(())),
                    (1800, Some(1), Ok(())),
                    (2700, Some(1), Ok(())),
                    (3600, None, Ok(())),
                    (3700, None, Err(SendCut::NoProgress)),
                ],
            ),
            // The same trickle under a minimum rate: cut when the first window ends.
            (
                1000,
                rate(4096, 2000),
                vec![
                    (900, Some(1), Ok(())),
                    (1800, Some(1), Ok(())),
                    (2000, None, too_slow(2, 8192)),
                ],
            ),
            // A fast first window passes and a new one starts where it was judged.
            (
                10_000,
                rate(4096, 1000),
                vec![
                    (100, Some(1 << 20), Ok(())),
                    (1000, None, Ok(())),
                    (1500, Some(5000), Ok(())),
                    (2000, None, Ok(())),
                    (2999, Some(4095), Ok(())),
                    (3000, None, too_slow(4095, 4096)),
                ],
            ),
            // A window judged on progress, exactly at the minimum.
            (
                10_000,
                rate(1000, 1000),
                vec![(999, Some(999), Ok(())), (1000, Some(1), Ok(()))],
            ),
            // Rate 0, or a zero window: off.
            (
                5000,
                rate(0, 1000),
                vec![(4000, Some(1), Ok(())), (8000, Some(1), Ok(()))],
            ),
            (
                5000,
                rate(4096, 0),
                vec![(4000, Some(1), Ok(())), (8000, Some(1), Ok(()))],
            ),
            // Huge values saturate instead of overflowing.
            (
                u64::MAX,
                rate(u64::MAX, u64::MAX),
                vec![
                    (1000, Some(u64::MAX), Ok(())),
                    (2000, Some(u64::MAX), Ok(())),
                ],
            ),
        ];
        for (send_timeout_ms, rate_min, steps) in cases {
            check(send_timeout_ms, rate_min, &steps);
        }
    }

    #[test]
    fn deadlines_are_the_earliest_judgement() {
        let start = Instant::now();
        let at = |ms: u64| Some(start + Duration::from_millis(ms));
        let ms = Duration::from_millis;
        let far = ms(u64::MAX);
        let window = |window: Duration| SendRateMin {
            bytes_per_s: 4096,
            window,
        };
        let cases: &[(Duration, SendRateMin, Option<Instant>)] = &[
            (ms(3000), SendRateMin::OFF, at(3000)),
            (ms(3000), rate(4096, 1000), at(1000)),
            (ms(1000), rate(4096, 3000), at(1000)),
            (ms(3000), rate(0, 1000), at(3000)),
            (far, rate(4096, 1000), at(1000)),
            (ms(1000), window(far), at(1000)),
            // Beyond what an Instant holds: no deadline rather than a panic.
            (Duration::MAX, rate(4096, 1000), at(1000)),
            (ms(1000), window(Duration::MAX), at(1000)),
            (Duration::MAX, SendRateMin::OFF, None),
            (Duration::MAX, window(Duration::MAX), None),
        ];
        for (send_timeout, rate_min, expected) in cases {
            let meter = SendMeter::start(*send_timeout, *rate_min, start);
            assert_eq!(meter.deadline(), *expected, "{send_timeout:?} {rate_min:?}");
        }
        let mut meter = SendMeter::start(Duration::from_secs(10), rate(1, 1000), start);
        assert_eq!(meter.record(5, start + Duration::from_millis(1500)), Ok(()));
        assert_eq!(
            meter.deadline(),
            at(2500),
            "the next window starts where one was judged"
        );
    }

    #[test]
    fn window_minimums() {
        let cases: &[(SendRateMin, u64)] = &[
            (rate(4096, 30_000), 122_880),
            (rate(4096, 500), 2048),
            (rate(3, 1), 0),
            (rate(u64::MAX, 2000), u64::MAX),
            (SendRateMin::OFF, 0),
        ];
        for (rate_min, expected) in cases {
            assert_eq!(rate_min.window_bytes_min(), *expected, "{rate_min:?}");
        }
    }
}
