//! wrk, the load generator of the serving benchmarks (`bench serve`, `bench fill`): the Lua
//! `done` hook that ends every generated script and prints one `BENCH key=value ...` line,
//! and reading that line back. Each benchmark writes its own `request` function; nothing
//! here starts wrk.

use anyhow::{Context, Result};
use std::collections::BTreeMap;

/// The end of every wrk script: prints the run's summary as one `BENCH` line.
pub const SUMMARY_HOOK: &str = r#"done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%.0f bytes=%.0f duration_us=%.0f connect=%.0f read=%.0f write=%.0f " ..
    "status=%.0f timeout=%.0f p50_us=%.0f p99_us=%.0f\n",
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99)))
end
"#;

/// What one wrk run printed on its `BENCH` line.
#[derive(Clone, Debug)]
pub struct Summary {
    pub requests: f64,
    /// Bytes received, response heads included.
    pub bytes: f64,
    pub duration_s: f64,
    /// Connect, read, write, status and timeout errors together.
    pub errors: f64,
    pub timeouts: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl Summary {
    /// The summary in wrk's output `text`.
    pub fn parse(text: &str) -> Result<Summary> {
        let line = text
            .lines()
            .find(|line| line.starts_with("BENCH "))
            .with_context(|| format!("wrk printed no summary:\n{text}"))?;
        let fields: BTreeMap<&str, f64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|pair| {
                let (name, value) = pair.split_once('=')?;
                Some((name, value.parse().ok()?))
            })
            .collect();
        let field = |name: &str| -> Result<f64> {
            fields
                .get(name)
                .copied()
                .with_context(|| format!("wrk summary without {name}: {line}"))
        };
        Ok(Summary {
            requests: field("requests")?,
            bytes: field("bytes")?,
            duration_s: field("duration_us")? / 1e6,
            errors: field("connect")?
                + field("read")?
                + field("write")?
                + field("status")?
                + field("timeout")?,
            timeouts: field("timeout")?,
            p50_ms: field("p50_us")? / 1000.0,
            p99_ms: field("p99_us")? / 1000.0,
        })
    }

    /// Completed requests per second.
    pub fn requests_per_s(&self) -> f64 {
        self.requests / self.duration_s
    }

    /// Bytes received per completed response (0 without responses): catches wrong lengths.
    pub fn bytes_per_response(&self) -> f64 {
        if self.requests > 0.0 {
            self.bytes / self.requests
        } else {
            0.0
        }
    }
}
