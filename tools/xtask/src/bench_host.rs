//! What the serving benchmarks measure on the host, outside the servers: CPU ticks of a
//! process and of the whole machine from /proc, bytes a process read from storage
//! (/proc/PID/io), waiting for other processes to quiet down, dropping the page cache, fio's
//! random reads (the drive's ceiling), and installing the tools a bench needs. Shared by
//! `bench serve` and `bench day`; starts no server.

use crate::bench::round_to;
use crate::util::{self, output, workspace_root};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Other processes may use at most this much CPU (in cores) during a run; a run that saw
/// more (a build on the same machine) is done again.
pub(crate) const OTHER_CORES_MAX: f64 = 0.15;

/// The kernel's clock ticks per second (`getconf CLK_TCK`).
pub(crate) fn ticks_per_s() -> Result<f64> {
    output("getconf", &["CLK_TCK"])?
        .trim()
        .parse()
        .context("getconf CLK_TCK")
}

/// Bytes `pid` (all its threads) caused to be read from storage so far: `read_bytes` of
/// /proc/PID/io, which counts page-cache misses (read-ahead included) and direct reads.
pub(crate) fn storage_read_bytes(pid: u32) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io"))
        .with_context(|| format!("reading /proc/{pid}/io"))?;
    text.lines()
        .find_map(|line| line.strip_prefix("read_bytes:"))
        .and_then(|value| value.trim().parse().ok())
        .with_context(|| format!("/proc/{pid}/io without read_bytes"))
}

/// What fio measured: random reads of one shape.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct FioRead {
    pub iops: f64,
    pub gbps: f64,
}

/// fio's random direct reads of `block` (`64k`, `1m`) at `depth` from `file` (laid out by fio
/// at `size_bytes` when missing) for `seconds`, with io_uring: the drive's ceiling for the
/// same shape. Pinned to `core` when given.
pub(crate) fn fio_randread(
    file: &Path,
    size_bytes: u64,
    block: &str,
    depth: u64,
    seconds: u64,
    core: Option<usize>,
) -> Result<FioRead> {
    let mut command = appliance_testkit::Launch {
        core,
        ..appliance_testkit::Launch::default()
    }
    .command("fio");
    let out = command
        .args([
            "--name=r".to_string(),
            format!("--filename={}", file.display()),
            format!("--size={size_bytes}"),
            "--rw=randread".to_string(),
            format!("--bs={block}"),
            format!("--iodepth={depth}"),
            "--ioengine=io_uring".to_string(),
            "--direct=1".to_string(),
            format!("--runtime={seconds}"),
            "--time_based".to_string(),
            "--output-format=json".to_string(),
        ])
        .output()
        .context("starting fio")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before its JSON.
    let json = &text[text.find('{').context("fio printed no JSON")?..];
    let report: Value = serde_json::from_str(json).context("fio JSON")?;
    let read = &report["jobs"][0]["read"];
    let iops = read["iops"].as_f64().context("fio reported no read IOPS")?;
    let bytes_per_s = read["bw_bytes"]
        .as_f64()
        .context("fio reported no read bandwidth")?;
    Ok(FioRead {
        iops: round_to(iops, 0),
        gbps: bytes_per_s / 1e9,
    })
}

/// Busy ticks of the whole machine (user, nice, system, irq, softirq from /proc/stat).
pub(crate) fn machine_busy_ticks() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/stat")?;
    let line = text.lines().next().context("empty /proc/stat")?;
    let fields: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|field| field.parse().unwrap_or(0.0))
        .collect();
    Ok([0, 1, 2, 5, 6]
        .iter()
        .map(|&at| fields.get(at).copied().unwrap_or(0.0))
        .sum())
}

/// CPU ticks of the kernel's softirq threads (ksoftirqd/N): loopback traffic's own work,
/// not a disturbance.
pub(crate) fn softirq_ticks() -> Result<f64> {
    let mut total = 0.0;
    for pid in appliance_testkit::pids() {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.starts_with("ksoftirqd/") {
            total += cpu_ticks(pid).unwrap_or(0.0);
        }
    }
    Ok(total)
}

/// Busy ticks of the machine outside this process (and wrk, its child, once reaped) and
/// the softirq threads: the servers' and everybody else's.
pub(crate) fn foreign_ticks() -> Result<f64> {
    Ok(machine_busy_ticks()? - own_ticks()? - softirq_ticks()?)
}

/// This process's CPU ticks, its reaped children's (wrk) included.
pub(crate) fn own_ticks() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/self/stat")?;
    let fields = stat_fields(&text)?;
    // utime, stime, cutime, cstime: fields 14 to 17.
    (11..15)
        .map(|at| fields.get(at).and_then(|field| field.parse::<f64>().ok()))
        .sum::<Option<f64>>()
        .context("/proc/self/stat times")
}

/// Waits until other processes leave the machine nearly idle: up to two minutes a run and
/// ten minutes in all (`waited` counts; BENCH_QUIET_WAIT_S sets the two minutes, the total
/// being five times that), so the bench stays bounded on a busy machine.
pub(crate) fn wait_quiet(ticks_per_s: f64, waited: &mut Duration) -> Result<()> {
    // BENCH_QUIET_WAIT_S shortens (or lengthens) the wait of one run, for short trial runs.
    let run_max = Duration::from_secs(crate::bench::env_u64("BENCH_QUIET_WAIT_S", 120));
    let started = Instant::now();
    let mut said = false;
    let result = loop {
        let before = foreign_ticks()?;
        std::thread::sleep(Duration::from_millis(500));
        let others = (foreign_ticks()? - before) / ticks_per_s / 0.5;
        if others <= OTHER_CORES_MAX {
            break Ok(());
        }
        let total = *waited + started.elapsed();
        if started.elapsed() >= run_max || total >= run_max * 5 {
            println!("  the machine stays busy ({others:.2} cores used by others); going on");
            break Ok(());
        }
        if !said {
            println!("  waiting for other processes to quiet down ({others:.2} cores busy)");
            said = true;
        }
    };
    *waited += started.elapsed();
    result
}

/// Installs the missing `tools` (name, Debian package) with apt-get when this is root; fails
/// with the apt-get line to type otherwise. nginx comes as nginx-light where Debian has it
/// (the smallest build with sendfile and thread pools).
pub(crate) fn ensure_tools(bench: &str, tools: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = Vec::new();
    for (tool, package) in tools {
        if !util::have(tool) && !missing.contains(package) {
            missing.push(package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !util::is_root() {
        bail!(
            "bench {bench} needs: apt-get install {} (as root)",
            missing.join(" ")
        );
    }
    let root = workspace_root();
    util::run_in(&root, "apt-get", &["update", "-qq"])?;
    if let Some(nginx) = missing.iter_mut().find(|package| **package == "nginx") {
        let policy = output("apt-cache", &["policy", "nginx-light"]).unwrap_or_default();
        if policy.contains("Candidate:") && !policy.contains("Candidate: (none)") {
            *nginx = "nginx-light";
        }
    }
    let mut args = vec!["install", "-y", "-qq"];
    args.extend(missing);
    println!("$ apt-get {}", args.join(" "));
    let status = Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("starting apt-get")?;
    if !status.success() {
        bail!("apt-get {} failed: {status}", args.join(" "));
    }
    Ok(())
}

pub(crate) fn drop_caches() -> Result<()> {
    output("sync", &[])?;
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("writing /proc/sys/vm/drop_caches")
}

/// The fields of a /proc/PID/stat line after the command name: field 3 (state) first.
pub(crate) fn stat_fields(text: &str) -> Result<Vec<&str>> {
    let after_name = &text[text.rfind(')').context("/proc stat format")? + 1..];
    Ok(after_name.split_whitespace().collect())
}

/// utime + stime of a process, in clock ticks (fields 14 and 15 of /proc/PID/stat).
pub(crate) fn cpu_ticks(pid: u32) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let fields = stat_fields(&text)?;
    let utime: f64 = fields.get(11).context("utime")?.parse()?;
    let stime: f64 = fields.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

/// Files and folders a bench writes, removed when this is made (leftovers of an interrupted
/// run) and when it is dropped (on errors too).
pub(crate) struct Leftovers {
    paths: Vec<PathBuf>,
}

impl Leftovers {
    pub fn new(paths: Vec<PathBuf>) -> Leftovers {
        let leftovers = Leftovers { paths };
        leftovers.remove_all();
        leftovers
    }

    fn remove_all(&self) {
        for path in &self.paths {
            if path.is_dir() {
                let _ = std::fs::remove_dir_all(path);
            } else {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        self.remove_all();
    }
}
