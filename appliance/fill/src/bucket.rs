//! The fill bandwidth cap: one token bucket shared by every download, in bits per second.
//! `TokenBucket` is pure (the time is passed in) and never sleeps; `SharedBucket` is the thin
//! async wrapper the fetcher awaits. Must not know about HTTP, files or the store.
//!
//! Tokens are bytes. They refill at the rate up to `burst_bytes`; taking more than is there
//! leaves the bucket in debt, and the taker waits until the debt would be repaid. So a chunk of
//! any size may go at once, and over time the bytes sent follow the rate (plus one burst).

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct TokenBucket {
    /// 0: unlimited.
    rate_bytes_per_s: f64,
    burst_bytes: f64,
    /// Negative: debt.
    tokens: f64,
    /// Seconds since the caller's origin of the last refill; `None` before the first take.
    last_refill_s: Option<f64>,
}

impl TokenBucket {
    /// A full bucket; `rate_bits_per_s` 0 means unlimited.
    pub fn new(rate_bits_per_s: u64, burst_bytes: u64) -> TokenBucket {
        let burst_bytes = burst_bytes as f64;
        TokenBucket {
            rate_bytes_per_s: bytes_per_s(rate_bits_per_s),
            burst_bytes,
            tokens: burst_bytes,
            last_refill_s: None,
        }
    }

    /// Changes the rate from now on (0: unlimited). Time since the last take is credited at
    /// the new rate; `SharedBucket::set_rate` refills first so that it is credited at the old.
    pub fn set_rate(&mut self, rate_bits_per_s: u64) {
        self.rate_bytes_per_s = bytes_per_s(rate_bits_per_s);
        if self.is_unlimited() {
            self.tokens = self.burst_bytes;
        }
    }

    /// Credits the tokens earned up to `now_s`. A time earlier than the last refill (or not a
    /// number) earns nothing and does not move the bucket's clock back.
    pub fn refill(&mut self, now_s: f64) {
        if !now_s.is_finite() {
            return;
        }
        let elapsed_s = match self.last_refill_s {
            Some(last_s) if now_s > last_s => now_s - last_s,
            Some(_) => return,
            None => 0.0,
        };
        self.last_refill_s = Some(now_s);
        if self.is_unlimited() {
            self.tokens = self.burst_bytes;
            return;
        }
        let earned = elapsed_s * self.rate_bytes_per_s;
        self.tokens = (self.tokens + earned).min(self.burst_bytes);
    }

    /// Takes `bytes` tokens at time `now_s` (seconds since any fixed origin); returns how long
    /// the caller must wait before sending them (zero when available). Tokens may go negative
    /// (debt) so that large chunks are allowed but paid for.
    pub fn take(&mut self, bytes: u64, now_s: f64) -> Duration {
        self.refill(now_s);
        if self.is_unlimited() {
            return Duration::ZERO;
        }
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            return Duration::ZERO;
        }
        let wait_s = -self.tokens / self.rate_bytes_per_s;
        Duration::try_from_secs_f64(wait_s).unwrap_or(Duration::MAX)
    }

    fn is_unlimited(&self) -> bool {
        self.rate_bytes_per_s <= 0.0
    }
}

fn bytes_per_s(rate_bits_per_s: u64) -> f64 {
    rate_bits_per_s as f64 / 8.0
}

/// The bucket all downloads of a box share, with its own monotonic origin.
#[derive(Debug)]
pub struct SharedBucket {
    bucket: Mutex<TokenBucket>,
    origin: Instant,
}

impl SharedBucket {
    pub fn new(rate_bits_per_s: u64, burst_bytes: u64) -> SharedBucket {
        SharedBucket {
            bucket: Mutex::new(TokenBucket::new(rate_bits_per_s, burst_bytes)),
            origin: Instant::now(),
        }
    }

    /// Changes the cap of running and later downloads; time so far is credited at the old rate.
    pub fn set_rate(&self, rate_bits_per_s: u64) {
        let now_s = self.now_s();
        let mut bucket = self.lock();
        bucket.refill(now_s);
        bucket.set_rate(rate_bits_per_s);
    }

    /// Waits until `bytes` may be sent under the cap.
    pub async fn acquire(&self, bytes: u64) {
        let now_s = self.now_s();
        let wait = self.lock().take(bytes, now_s);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    fn now_s(&self) -> f64 {
        self.origin.elapsed().as_secs_f64()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TokenBucket> {
        // The bucket holds no invariant a panicking holder could break halfway.
        self.bucket.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    enum Step {
        /// Take bytes at a time; the expected wait in seconds.
        Take(u64, f64, f64),
        SetRate(u64),
    }

    /// `input`: rate in bits per second, burst bytes, steps.
    fn check(input: (u64, u64, &[Step]), expected_tokens: f64) {
        let (rate_bits_per_s, burst_bytes, steps) = input;
        let mut bucket = TokenBucket::new(rate_bits_per_s, burst_bytes);
        for (index, step) in steps.iter().enumerate() {
            match step {
                Step::Take(bytes, now_s, expected_wait_s) => {
                    let wait = bucket.take(*bytes, *now_s);
                    assert!(
                        (wait.as_secs_f64() - expected_wait_s).abs() < 1e-6,
                        "step {index}: waited {wait:?}, expected {expected_wait_s} s"
                    );
                }
                Step::SetRate(rate_bits_per_s) => bucket.set_rate(*rate_bits_per_s),
            }
        }
        assert!(
            (bucket.tokens - expected_tokens).abs() < 1e-6,
            "tokens {} expected {expected_tokens}",
            bucket.tokens
        );
    }

    #[test]
    fn bucket_steps() {
        use Step::{SetRate, Take};
        // Unlimited: never waits, whatever the size.
        check(
            (0, 100, &[Take(u64::MAX, 0.0, 0.0), Take(1 << 40, 0.0, 0.0)]),
            100.0,
        );
        // 8000 bits/s = 1000 bytes/s, burst 500: the burst goes at once, then debt is paid.
        check(
            (
                8_000,
                500,
                &[
                    Take(500, 0.0, 0.0),
                    Take(250, 0.0, 0.25),
                    Take(250, 0.0, 0.5),
                ],
            ),
            -500.0,
        );
        // Refill is capped at the burst.
        check(
            (8_000, 500, &[Take(500, 0.0, 0.0), Take(600, 100.0, 0.1)]),
            -100.0,
        );
        // Debt: one huge chunk goes at once and the next taker waits for it.
        check(
            (8_000, 0, &[Take(10_000, 0.0, 10.0), Take(1, 5.0, 5.001)]),
            -5_001.0,
        );
        // Time going backwards or not a number earns nothing.
        check(
            (
                8_000,
                0,
                &[
                    Take(1_000, 10.0, 1.0),
                    Take(0, 5.0, 1.0),
                    Take(0, f64::NAN, 1.0),
                ],
            ),
            -1_000.0,
        );
        // The rate changes mid-way: the debt is repaid at the new rate.
        check(
            (
                8_000,
                0,
                &[
                    Take(1_000, 0.0, 1.0),
                    SetRate(16_000),
                    Take(1_000, 0.0, 1.0),
                ],
            ),
            -2_000.0,
        );
        // Becoming unlimited forgives the debt and refills; limited again starts full.
        check(
            (
                8_000,
                100,
                &[
                    Take(5_000, 0.0, 4.9),
                    SetRate(0),
                    Take(1, 0.0, 0.0),
                    SetRate(8_000),
                ],
            ),
            100.0,
        );
        // A wait too long for a Duration saturates.
        check(
            (1, 0, &[Take(u64::MAX, 0.0, Duration::MAX.as_secs_f64())]),
            -(u64::MAX as f64),
        );
    }

    /// Sends `chunk_bytes` at a time for `duration_s` of simulated time, sleeping as told, and
    /// returns the achieved rate in bits per second.
    fn simulate(bucket: &mut TokenBucket, chunk_bytes: u64, start_s: f64, duration_s: f64) -> f64 {
        let mut now_s = start_s;
        let mut sent_bytes = 0u64;
        while now_s < start_s + duration_s {
            now_s += bucket.take(chunk_bytes, now_s).as_secs_f64();
            sent_bytes += chunk_bytes;
        }
        sent_bytes as f64 * 8.0 / (now_s - start_s)
    }

    fn check_rate(input: (u64, u64, u64), expected_bits_per_s: f64) {
        let (rate_bits_per_s, burst_bytes, chunk_bytes) = input;
        let mut bucket = TokenBucket::new(rate_bits_per_s, burst_bytes);
        let achieved = simulate(&mut bucket, chunk_bytes, 0.0, 600.0);
        let error = (achieved - expected_bits_per_s).abs() / expected_bits_per_s;
        assert!(error < 0.01, "{input:?}: {achieved} bits/s, {error:.4} off");
    }

    #[test]
    fn steady_rates() {
        check_rate((100_000_000, 4 << 20, 64 << 10), 100e6);
        check_rate((1_000_000_000, 4 << 20, 1 << 20), 1e9);
        check_rate((10_000, 1_000, 100), 10e3);
        check_rate((10_000_000, 0, 3 << 20), 10e6);
    }

    #[test]
    fn set_rate_mid_way() {
        let mut bucket = TokenBucket::new(80_000_000, 1 << 20);
        let first = simulate(&mut bucket, 64 << 10, 0.0, 300.0);
        bucket.set_rate(20_000_000);
        let second = simulate(&mut bucket, 64 << 10, 301.0, 300.0);
        assert!((first / 80e6 - 1.0).abs() < 0.01, "{first}");
        assert!((second / 20e6 - 1.0).abs() < 0.01, "{second}");
    }

    #[test]
    fn shared_bucket_waits() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let unlimited = SharedBucket::new(0, 0);
            let started = Instant::now();
            unlimited.acquire(u64::MAX).await;
            assert!(started.elapsed() < Duration::from_millis(50));

            // 80 000 bits/s = 10 000 bytes/s; the burst goes at once, 1 000 more take 0.1 s.
            let capped = SharedBucket::new(80_000, 1_000);
            let started = Instant::now();
            capped.acquire(1_000).await;
            capped.acquire(1_000).await;
            let elapsed = started.elapsed();
            assert!(elapsed >= Duration::from_millis(95), "{elapsed:?}");
            assert!(elapsed < Duration::from_millis(500), "{elapsed:?}");

            capped.set_rate(0);
            let started = Instant::now();
            capped.acquire(1 << 30).await;
            assert!(started.elapsed() < Duration::from_millis(50));
        });
    }
}
