//! The player-like load client of `bench day`, run as the child process `xtask day-load
//! PLAN.json` (pinned to core 0 by the parent): one thread and one keep-alive connection per
//! player; each player watches a title chosen by a Zipf law, asking for consecutive ranges of
//! `chunk_bytes`, until the title ends or its session does (a geometric number of ranges),
//! with a share of random short ranges mixed in (seeks, thumbnails). It prints
//! `window-start` and `window-end` when the measured window opens and closes (after the
//! warm-up), then one `DAYLOAD {json}` line of what completed inside the window.
//!
//! wrk was not used: its Lua `request` and `response` hooks get no handle of the connection
//! they run for, so a player's position in its title cannot be kept per connection.

use anyhow::{bail, Context, Result};
use appliance_testkit::SplitMix64;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One title a player may pick: its URL path and size.
#[derive(Clone, Debug)]
pub(crate) struct Title {
    pub path: String,
    pub size_bytes: u64,
}

/// What the load does: written by the parent as JSON, read by the child.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub port: u16,
    pub connections: u64,
    pub warmup_s: u64,
    pub seconds: u64,
    pub seed: u64,
    /// Titles by popularity rank: the first is the most popular.
    pub titles: Vec<Title>,
    pub zipf_alpha: f64,
    /// The length of a player's consecutive ranges.
    pub chunk_bytes: u64,
    /// The share of requests that are random short ranges.
    pub seek_share: f64,
    pub seek_bytes: u64,
    /// Mean number of consecutive ranges before a player picks another title.
    pub session_ranges_mean: f64,
}

impl Plan {
    pub fn to_json(&self) -> Value {
        let titles: Vec<Value> = self
            .titles
            .iter()
            .map(|title| json!([title.path, title.size_bytes]))
            .collect();
        json!({
            "port": self.port, "connections": self.connections, "warmup_s": self.warmup_s,
            "seconds": self.seconds, "seed": self.seed, "titles": titles,
            "zipf_alpha": self.zipf_alpha, "chunk_bytes": self.chunk_bytes,
            "seek_share": self.seek_share, "seek_bytes": self.seek_bytes,
            "session_ranges_mean": self.session_ranges_mean,
        })
    }

    fn from_json(value: &Value) -> Result<Plan> {
        let number = |name: &str| {
            value[name]
                .as_u64()
                .with_context(|| format!("plan: {name}"))
        };
        let float = |name: &str| {
            value[name]
                .as_f64()
                .with_context(|| format!("plan: {name}"))
        };
        let titles = value["titles"]
            .as_array()
            .context("plan: titles")?
            .iter()
            .map(|title| {
                Some(Title {
                    path: title[0].as_str()?.to_string(),
                    size_bytes: title[1].as_u64()?,
                })
            })
            .collect::<Option<Vec<Title>>>()
            .context("plan: a title is [path, size]")?;
        if titles.is_empty() {
            bail!("plan: no titles");
        }
        Ok(Plan {
            port: u16::try_from(number("port")?)?,
            connections: number("connections")?.max(1),
            warmup_s: number("warmup_s")?,
            seconds: number("seconds")?.max(1),
            seed: number("seed")?,
            titles,
            zipf_alpha: float("zipf_alpha")?,
            chunk_bytes: number("chunk_bytes")?.max(4096),
            seek_share: float("seek_share")?,
            seek_bytes: number("seek_bytes")?.max(1),
            session_ranges_mean: float("session_ranges_mean")?.max(1.0),
        })
    }
}

/// The cumulative Zipf distribution over `count` ranks: rank r (from 1) weighs 1 / r^alpha.
pub(crate) fn zipf_cdf(count: usize, alpha: f64) -> Vec<f64> {
    let mut cdf = Vec::with_capacity(count);
    let mut total = 0.0;
    for rank in 1..=count {
        total += 1.0 / (rank as f64).powf(alpha);
        cdf.push(total);
    }
    for value in &mut cdf {
        *value /= total;
    }
    cdf
}

/// A uniform number in [0, 1).
fn unit(rng: &mut SplitMix64) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// The rank (from 0) whose cumulative share first reaches a uniform draw.
fn sample_zipf(cdf: &[f64], rng: &mut SplitMix64) -> usize {
    let draw = unit(rng);
    cdf.partition_point(|&share| share < draw)
        .min(cdf.len() - 1)
}

/// One player's position: the title it watches, the next offset, the ranges left.
struct Player {
    rng: SplitMix64,
    title: usize,
    offset_bytes: u64,
    ranges_left: u64,
}

impl Player {
    /// The next request: (title, first byte, length).
    fn next(&mut self, plan: &Plan, cdf: &[f64]) -> (usize, u64, u64) {
        if unit(&mut self.rng) < plan.seek_share {
            let title = sample_zipf(cdf, &mut self.rng);
            let size = plan.titles[title].size_bytes;
            let length = plan.seek_bytes.min(size);
            let first = self.rng.below(size - length + 1) / 4096 * 4096;
            return (title, first, length);
        }
        let size = plan.titles[self.title].size_bytes;
        if self.ranges_left == 0 || self.offset_bytes >= size {
            self.title = sample_zipf(cdf, &mut self.rng);
            let size = plan.titles[self.title].size_bytes;
            // Most sessions start at the beginning; some resume in the middle.
            self.offset_bytes = if unit(&mut self.rng) < 0.7 {
                0
            } else {
                self.rng.below(size.div_ceil(plan.chunk_bytes)) * plan.chunk_bytes
            };
            // Geometric with the configured mean, at least one range.
            let keep = 1.0 - 1.0 / plan.session_ranges_mean;
            let draw = unit(&mut self.rng).max(f64::MIN_POSITIVE);
            let ranges = if keep > 0.0 {
                (draw.ln() / keep.ln()).ceil()
            } else {
                1.0
            };
            self.ranges_left = whole(ranges.clamp(1.0, 1e6));
        }
        let size = plan.titles[self.title].size_bytes;
        let length = plan.chunk_bytes.min(size - self.offset_bytes);
        let first = self.offset_bytes;
        self.offset_bytes += length;
        self.ranges_left -= 1;
        (self.title, first, length)
    }
}

/// What one player saw inside the measured window.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    body_bytes: u64,
    /// Connection failures, cut responses, statuses other than 206, wrong lengths.
    errors: u64,
    first_error: Option<String>,
}

/// A keep-alive connection to the server.
struct Connection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Connection {
    fn open(port: u16) -> Result<Connection> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let writer = stream.try_clone()?;
        Ok(Connection {
            reader: BufReader::with_capacity(256 << 10, stream),
            writer,
        })
    }

    /// GET with a range; reads the whole answer and checks status and length.
    fn range(&mut self, path: &str, first: u64, length: u64, sink: &mut [u8]) -> Result<()> {
        let last = first + length - 1;
        write!(
            self.writer,
            "GET {path} HTTP/1.1\r\nHost: bench\r\nRange: bytes={first}-{last}\r\n\r\n"
        )?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut content_length: Option<u64> = None;
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                bail!("connection closed in a response head");
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    content_length = value.trim().parse().ok();
                }
            }
        }
        let body = content_length.context("a response without Content-Length")?;
        let mut left = body;
        while left > 0 {
            let want = usize::try_from(left.min(sink.len() as u64))?;
            let got = self.reader.read(&mut sink[..want])?;
            if got == 0 {
                bail!("connection closed with {left} bytes of the body missing");
            }
            left -= got as u64;
        }
        if status != "206" || body != length {
            bail!("GET {path} bytes={first}-{last}: status {status}, {body} bytes");
        }
        Ok(())
    }
}

/// One player until `end`: requests, timed, counted when they complete inside the window.
fn play(plan: &Plan, cdf: &[f64], number: u64, window: (Instant, Instant)) -> Tally {
    let (start, end) = window;
    let mut player = Player {
        rng: SplitMix64(plan.seed ^ (number + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        title: 0,
        offset_bytes: 0,
        ranges_left: 0,
    };
    let mut tally = Tally::default();
    let mut sink = vec![0u8; 256 << 10];
    let mut connection: Option<Connection> = None;
    while Instant::now() < end {
        let (title, first, length) = player.next(plan, cdf);
        let began = Instant::now();
        let result = match connection.as_mut() {
            Some(open) => open.range(&plan.titles[title].path, first, length, &mut sink),
            None => Connection::open(plan.port).and_then(|mut open| {
                let result = open.range(&plan.titles[title].path, first, length, &mut sink);
                connection = Some(open);
                result
            }),
        };
        let done = Instant::now();
        let inside = began >= start && done <= end;
        match result {
            Ok(()) if inside => {
                let micros = done.duration_since(began).as_micros();
                tally
                    .latencies_us
                    .push(u32::try_from(micros).unwrap_or(u32::MAX));
                tally.body_bytes += length;
            }
            Ok(()) => {}
            Err(error) => {
                connection = None;
                if inside {
                    tally.errors += 1;
                    tally
                        .first_error
                        .get_or_insert_with(|| format!("{error:#}"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    tally
}

/// `value` rounded to a whole number; `value` is finite and not negative, and far below
/// 2^53, so nothing is lost.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn whole(value: f64) -> u64 {
    assert!(value.is_finite() && value >= 0.0, "{value}");
    value.round() as u64
}

/// The latency at `percent` of sorted microseconds, in milliseconds (NaN without any).
fn percentile_ms(sorted_us: &[u32], percent: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let at = whole((sorted_us.len() - 1) as f64 * percent / 100.0);
    let at = usize::try_from(at)
        .unwrap_or(usize::MAX)
        .min(sorted_us.len() - 1);
    f64::from(sorted_us[at]) / 1000.0
}

/// `xtask day-load PLAN.json`: runs the plan and prints the window marks and the result.
pub fn run_child(args: &[&str]) -> Result<()> {
    let [plan_path] = args else {
        bail!("usage: xtask day-load PLAN.json");
    };
    let value: Value = serde_json::from_slice(&std::fs::read(plan_path)?)?;
    let plan = Arc::new(Plan::from_json(&value)?);
    let cdf = Arc::new(zipf_cdf(plan.titles.len(), plan.zipf_alpha));
    let start = Instant::now() + Duration::from_secs(plan.warmup_s);
    let end = start + Duration::from_secs(plan.seconds);
    let players: Vec<_> = (0..plan.connections)
        .map(|number| {
            let (plan, cdf) = (Arc::clone(&plan), Arc::clone(&cdf));
            std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn(move || play(&plan, &cdf, number, (start, end)))
        })
        .collect::<std::io::Result<_>>()?;
    std::thread::sleep(start.saturating_duration_since(Instant::now()));
    println!("window-start");
    std::io::stdout().flush()?;
    std::thread::sleep(end.saturating_duration_since(Instant::now()));
    println!("window-end");
    std::io::stdout().flush()?;
    let mut latencies: Vec<u32> = Vec::new();
    let (mut bytes, mut errors, mut first_error) = (0u64, 0u64, None);
    for player in players {
        let tally = player
            .join()
            .map_err(|_| anyhow::anyhow!("a player panicked"))?;
        latencies.extend(tally.latencies_us);
        bytes += tally.body_bytes;
        errors += tally.errors;
        first_error = first_error.or(tally.first_error);
    }
    latencies.sort_unstable();
    let seconds = plan.seconds as f64;
    let result = json!({
        "requests": latencies.len(),
        "body_bytes": bytes,
        "seconds": seconds,
        "gbps": bytes as f64 / seconds / 1e9,
        "rps": latencies.len() as f64 / seconds,
        "p50_ms": percentile_ms(&latencies, 50.0),
        "p99_ms": percentile_ms(&latencies, 99.0),
        "p999_ms": percentile_ms(&latencies, 99.9),
        "errors": errors,
        "first_error": first_error,
    });
    println!("DAYLOAD {result}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_favours_the_first_ranks_as_the_law_says() {
        let cdf = zipf_cdf(100, 0.8);
        assert!((cdf[99] - 1.0).abs() < 1e-12);
        let mut rng = SplitMix64(7);
        let mut counts = [0u64; 100];
        for _ in 0..200_000 {
            counts[sample_zipf(&cdf, &mut rng)] += 1;
        }
        // Rank 1 over rank 10 is 10^0.8 = 6.3 under the law.
        let ratio = counts[0] as f64 / counts[9] as f64;
        assert!((5.5..7.2).contains(&ratio), "{ratio}");
    }

    #[test]
    fn a_player_asks_for_consecutive_chunks_inside_its_title() {
        let plan = Plan {
            port: 0,
            connections: 1,
            warmup_s: 0,
            seconds: 1,
            seed: 1,
            titles: vec![
                Title {
                    path: "/a".into(),
                    size_bytes: 5 << 20,
                },
                Title {
                    path: "/b".into(),
                    size_bytes: 3 << 20,
                },
            ],
            zipf_alpha: 0.8,
            chunk_bytes: 2 << 20,
            seek_share: 0.0,
            seek_bytes: 65536,
            session_ranges_mean: 1000.0,
        };
        let cdf = zipf_cdf(2, 0.8);
        let mut player = Player {
            rng: SplitMix64(3),
            title: 0,
            offset_bytes: 0,
            ranges_left: 0,
        };
        let mut previous: Option<(usize, u64, u64)> = None;
        for _ in 0..1000 {
            let (title, first, length) = player.next(&plan, &cdf);
            assert!(first + length <= plan.titles[title].size_bytes);
            assert!(length > 0 && length <= plan.chunk_bytes);
            if let Some((last_title, last_first, last_length)) = previous {
                let continues = title == last_title && first == last_first + last_length;
                let restarts = first % plan.chunk_bytes == 0;
                assert!(continues || restarts, "{previous:?} then {title} {first}");
            }
            previous = Some((title, first, length));
        }
    }
}
