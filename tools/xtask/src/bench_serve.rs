//! `cargo xtask bench serve`: the appliance's serving throughput, server CPU per GB and
//! latency against nginx (sendfile on) on the same catalog in the same run, loaded by wrk with
//! random byte ranges over the whole catalog, page cache hot and cold.
//!
//! wrk runs on core 0 and the server under test on core 1; the two servers alternate, round
//! after round, and the figures are the medians of the rounds. Everything started here is
//! stopped by a guard, on errors too.

use crate::bench::{env_u64, median, round_to};
use crate::util::{self, output, workspace_root};
use anyhow::{bail, Context, Result};
use appliance_testkit::{free_port, get, Config, Guard, Launch, Nginx, Serve, SplitMix64};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const FILE_BYTES: u64 = 16 * MIB;
const GB: f64 = 1e9;

/// One load shape: the range length (0: whole files) and the connections wrk keeps open.
struct Case {
    name: &'static str,
    range_bytes: u64,
    connections: u64,
}

const CASES: [Case; 3] = [
    Case {
        name: "range_1m",
        range_bytes: MIB,
        connections: 64,
    },
    Case {
        name: "range_64k",
        range_bytes: 64 << 10,
        connections: 1000,
    },
    Case {
        name: "whole_16m",
        range_bytes: 0,
        connections: 16,
    },
];

/// What one wrk run measured.
#[derive(Clone, Debug, Default)]
struct Run {
    gbps: f64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: f64,
    timeouts: f64,
    cpu_s_per_gb: f64,
    /// The whole machine's busy CPU per GB (server, wrk, softirq): on loopback the kernel
    /// charges part of the sender's TCP work to the receiver, so this is the fairer total.
    machine_cpu_s_per_gb: f64,
    /// Bytes received per completed response (heads included), to catch wrong lengths.
    bytes_per_response: f64,
    /// CPU used by other processes during the run, in cores (outside wrk, the server and
    /// the kernel's softirq threads).
    other_cores: f64,
}

/// Other processes may use at most this much CPU (in cores) during a run; a run that saw
/// more (a build on the same machine) is done again.
const OTHER_CORES_MAX: f64 = 0.15;
/// Attempts at a run before a disturbed one is kept (and counted).
const ATTEMPTS: u32 = 3;

pub fn serve() -> Result<Map<String, Value>> {
    let files = env_u64("BENCH_SERVE_FILES", 64).max(1);
    let rounds = env_u64("BENCH_ROUNDS", 3).max(1);
    let seconds = env_u64("BENCH_SECONDS", 8).max(1);
    ensure_tools()?;
    let cold = util::is_root();
    if !cold {
        println!("  not root: the cold cases (drop_caches) are skipped");
    }
    let pin = std::thread::available_parallelism().map_or(1, usize::from) >= 2;
    if !pin {
        println!("  fewer than 2 cores: wrk and the servers are not pinned");
    }
    let applianced = match std::env::var("BENCH_APPLIANCED") {
        Ok(path) => PathBuf::from(path),
        Err(_) => util::applianced()?,
    };
    let dir = workspace_root().join("target/bench/serve");
    std::fs::create_dir_all(&dir)?;
    let catalog = dir.join("catalog");
    generate_catalog(&catalog, files)?;
    let ticks_per_s: f64 = output("getconf", &["CLK_TCK"])?
        .trim()
        .parse()
        .context("getconf CLK_TCK")?;

    let appliance = start_appliance(&applianced, &dir, &catalog, files, pin)?;
    let nginx = start_nginx(&dir, &catalog, pin)?;
    let servers = [&appliance, &nginx];
    for server in servers {
        verify_ranges(server, &catalog, files)?;
    }
    println!("  both servers return byte-exact ranges and whole files");

    let temperatures: &[&str] = if cold { &["hot", "cold"] } else { &["hot"] };
    let mut runs: BTreeMap<(String, &str), Vec<Run>> = BTreeMap::new();
    let mut notes: Vec<String> = Vec::new();
    let mut retried = 0u32;
    let mut waited = Duration::ZERO;
    let mut disturbed = 0u32;
    let mut seed = 1u64;
    for round in 0..rounds {
        for case in &CASES {
            let script = write_script(&dir, case, files, seed)?;
            seed += 1;
            for temperature in temperatures {
                let key = format!("{}_{temperature}", case.name);
                // Alternate which server goes first from round to round.
                let order = if round % 2 == 0 {
                    [servers[0], servers[1]]
                } else {
                    [servers[1], servers[0]]
                };
                for server in order {
                    let mut attempt = 1;
                    let (run, before, after) = loop {
                        wait_quiet(ticks_per_s, &mut waited)?;
                        if *temperature == "hot" {
                            warm(server, files)?;
                        } else {
                            drop_caches()?;
                        }
                        let before = server.metrics()?;
                        let run = wrk(server, case, seconds, &script, pin, ticks_per_s)?;
                        let after = server.metrics()?;
                        if run.other_cores <= OTHER_CORES_MAX {
                            break (run, before, after);
                        }
                        if attempt == ATTEMPTS {
                            disturbed += 1;
                            notes.push(format!(
                                "round {round} {key} {}: other processes used {:.2} cores \
                                 in every attempt; the last one is kept",
                                server.name, run.other_cores
                            ));
                            break (run, before, after);
                        }
                        println!(
                            "  round {round} {key:<15} {:<9} other processes used {:.2} cores; \
                             running it again",
                            server.name, run.other_cores
                        );
                        retried += 1;
                        attempt += 1;
                    };
                    println!(
                        "  round {round} {key:<15} {:<9} {:6.2} GB/s {:8.0} req/s p50 {:7.2} ms \
                         p99 {:7.2} ms cpu {:5.3} s/GB errors {} (others {:.2} cores)",
                        server.name,
                        run.gbps,
                        run.rps,
                        run.p50_ms,
                        run.p99_ms,
                        run.cpu_s_per_gb,
                        run.errors,
                        run.other_cores
                    );
                    check_run(server, case, &key, &run, &before, &after, &mut notes);
                    runs.entry((key.clone(), server.name))
                        .or_default()
                        .push(run);
                }
            }
        }
    }
    // The appliance's own counters, for a look at what it saw.
    if let Some(port) = appliance.admin_port {
        let response = get(port, "/metrics", None)?;
        std::fs::write(dir.join("appliance-metrics.txt"), &response.body)?;
    }
    drop(nginx);
    drop(appliance);
    // The catalog stays for the next run; the drive (re-imported every run) goes.
    let _ = std::fs::remove_file(dir.join("drive0.img"));

    let (mut figures, table) = summarize(&runs, temperatures);
    figures.insert("files".into(), json!(files));
    figures.insert("file_bytes".into(), json!(FILE_BYTES));
    figures.insert("rounds".into(), json!(rounds));
    figures.insert("seconds_per_run".into(), json!(seconds));
    figures.insert("runs_repeated_disturbed".into(), json!(retried));
    figures.insert("runs_kept_disturbed".into(), json!(disturbed));
    println!(
        "== serve: medians of {rounds} rounds of {seconds} s, {files} files of 16 MiB, \
         wrk on core 0, server on core 1 =="
    );
    print!("{table}");
    println!(
        "  CPU s/GB: the server's own CPU (nginx: its worker); box s/GB: the whole machine's \
         (server, wrk, softirq)"
    );
    if retried > 0 {
        println!("  {retried} runs disturbed by other processes were done again");
    }
    if notes.is_empty() {
        println!("  no errors, timeouts or unexpected statuses");
    } else {
        println!("  problems seen:");
        for note in &notes {
            println!("    {note}");
        }
    }
    Ok(figures)
}

/// The medians of every case for both servers: the JSON figures and a readable table.
fn summarize(
    runs: &BTreeMap<(String, &str), Vec<Run>>,
    temperatures: &[&str],
) -> (Map<String, Value>, String) {
    let mut figures = Map::new();
    let mut table = String::new();
    let _ = writeln!(
        table,
        "  {:<15} {:<9} {:>7} {:>9} {:>8} {:>8} {:>8} {:>9} {:>7} {:>8}",
        "case",
        "server",
        "GB/s",
        "req/s",
        "p50 ms",
        "p99 ms",
        "CPU s/GB",
        "box s/GB",
        "errors",
        "timeouts"
    );
    for case in &CASES {
        for temperature in temperatures {
            let key = format!("{}_{temperature}", case.name);
            let mut medians = BTreeMap::new();
            for server in ["appliance", "nginx"] {
                let list = runs
                    .get(&(key.clone(), server))
                    .cloned()
                    .unwrap_or_default();
                let pick = |field: fn(&Run) -> f64| {
                    let mut values: Vec<f64> = list.iter().map(field).collect();
                    median(&mut values)
                };
                let run = Run {
                    gbps: pick(|run| run.gbps),
                    rps: pick(|run| run.rps),
                    p50_ms: pick(|run| run.p50_ms),
                    p99_ms: pick(|run| run.p99_ms),
                    errors: pick(|run| run.errors),
                    timeouts: pick(|run| run.timeouts),
                    cpu_s_per_gb: pick(|run| run.cpu_s_per_gb),
                    machine_cpu_s_per_gb: pick(|run| run.machine_cpu_s_per_gb),
                    bytes_per_response: pick(|run| run.bytes_per_response),
                    other_cores: pick(|run| run.other_cores),
                };
                let _ = writeln!(
                    table,
                    "  {key:<15} {server:<9} {:>7.3} {:>9.0} {:>8.2} {:>8.2} {:>8.3} {:>9.3} {:>7} \
                     {:>8}",
                    run.gbps,
                    run.rps,
                    run.p50_ms,
                    run.p99_ms,
                    run.cpu_s_per_gb,
                    run.machine_cpu_s_per_gb,
                    run.errors,
                    run.timeouts
                );
                let prefix = format!("{key}_{server}");
                figures.insert(format!("{prefix}_gbps"), json!(round_to(run.gbps, 3)));
                figures.insert(format!("{prefix}_rps"), json!(run.rps.round()));
                figures.insert(format!("{prefix}_p50_ms"), json!(round_to(run.p50_ms, 2)));
                figures.insert(format!("{prefix}_p99_ms"), json!(round_to(run.p99_ms, 2)));
                figures.insert(
                    format!("{prefix}_cpu_s_per_gb"),
                    json!(round_to(run.cpu_s_per_gb, 3)),
                );
                figures.insert(
                    format!("{prefix}_machine_cpu_s_per_gb"),
                    json!(round_to(run.machine_cpu_s_per_gb, 3)),
                );
                figures.insert(format!("{prefix}_errors"), json!(run.errors));
                figures.insert(format!("{prefix}_timeouts"), json!(run.timeouts));
                medians.insert(server, run);
            }
            let ours = &medians["appliance"];
            let peer = &medians["nginx"];
            let ratio = ours.gbps / peer.gbps;
            let cpu_ratio = peer.cpu_s_per_gb / ours.cpu_s_per_gb;
            figures.insert(format!("{key}_ratio"), json!(round_to(ratio, 3)));
            figures.insert(format!("{key}_cpu_ratio"), json!(round_to(cpu_ratio, 3)));
            let _ = writeln!(
                table,
                "  {key:<15} {:<9} throughput x{ratio:.3}, CPU per GB x{cpu_ratio:.3} \
                 (>1: the appliance is better)",
                "ratio"
            );
        }
    }
    (figures, table)
}

/// Busy ticks of the whole machine (user, nice, system, irq, softirq from /proc/stat).
fn machine_busy_ticks() -> Result<f64> {
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
fn softirq_ticks() -> Result<f64> {
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
fn foreign_ticks() -> Result<f64> {
    Ok(machine_busy_ticks()? - own_ticks()? - softirq_ticks()?)
}

/// This process's CPU ticks, its reaped children's (wrk) included.
fn own_ticks() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/self/stat")?;
    let fields = stat_fields(&text)?;
    // utime, stime, cutime, cstime: fields 14 to 17.
    (11..15)
        .map(|at| fields.get(at).and_then(|field| field.parse::<f64>().ok()))
        .sum::<Option<f64>>()
        .context("/proc/self/stat times")
}

/// Waits until other processes leave the machine nearly idle: up to two minutes a run and
/// ten minutes in all (`waited` counts), so the bench stays bounded on a busy machine.
fn wait_quiet(ticks_per_s: f64, waited: &mut Duration) -> Result<()> {
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
        if started.elapsed() > Duration::from_secs(120) || total > Duration::from_secs(600) {
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

/// Installs nginx and wrk with apt-get when they are missing and this is root.
fn ensure_tools() -> Result<()> {
    let mut missing = Vec::new();
    if !util::have("wrk") {
        missing.push("wrk");
    }
    let need_nginx = !util::have("nginx");
    if missing.is_empty() && !need_nginx {
        return Ok(());
    }
    if !util::is_root() {
        bail!("bench serve needs nginx and wrk (apt-get install nginx-light wrk, as root)");
    }
    let root = workspace_root();
    util::run_in(&root, "apt-get", &["update", "-qq"])?;
    if need_nginx {
        // nginx-light is the smallest build with sendfile; newer Debian has only nginx.
        let policy = output("apt-cache", &["policy", "nginx-light"]).unwrap_or_default();
        let light = policy.contains("Candidate:") && !policy.contains("Candidate: (none)");
        missing.push(if light { "nginx-light" } else { "nginx" });
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

fn file_name(number: u64) -> String {
    format!("file-{number:04}.mp4")
}

fn url_path(number: u64) -> String {
    format!("/bench/{}", file_name(number))
}

/// `files` files of 16 MiB of pseudo-random bytes under CATALOG/bench (kept between runs).
fn generate_catalog(catalog: &Path, files: u64) -> Result<()> {
    let bench = catalog.join("bench");
    let wanted: Vec<String> = (0..files).map(file_name).collect();
    let mut present: Vec<String> = match std::fs::read_dir(&bench) {
        Ok(entries) => entries
            .filter_map(|entry| entry.ok())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    present.sort();
    let sizes_right = wanted
        .iter()
        .all(|name| std::fs::metadata(bench.join(name)).is_ok_and(|meta| meta.len() == FILE_BYTES));
    let others = std::fs::read_dir(catalog)
        .map(|entries| entries.count())
        .unwrap_or(0);
    if present == wanted && sizes_right && others == 1 {
        return Ok(());
    }
    println!(
        "  generating {files} files of 16 MiB in {}",
        catalog.display()
    );
    let _ = std::fs::remove_dir_all(catalog);
    std::fs::create_dir_all(&bench)?;
    for number in 0..files {
        appliance_testkit::write_seeded_file(&bench.join(file_name(number)), number, FILE_BYTES)?;
    }
    Ok(())
}

/// A server under test.
struct Server {
    name: &'static str,
    port: u16,
    /// The process whose CPU time is counted (the appliance, nginx's worker).
    cpu_pid: u32,
    /// The appliance's admin port, for /metrics.
    admin_port: Option<u16>,
    /// Stops the server when the bench is done (or fails): the appliance's `Guard` or the
    /// `Nginx`, held only to be dropped.
    _process: Box<dyn std::any::Any>,
}

/// How a server under test is started: on core 1 when pinning.
fn launch(pin: bool) -> Launch {
    Launch {
        stop_with_parent: false,
        core: pin.then_some(1),
    }
}

impl Server {
    /// The appliance's counters by name (empty for nginx).
    fn metrics(&self) -> Result<BTreeMap<String, f64>> {
        let Some(port) = self.admin_port else {
            return Ok(BTreeMap::new());
        };
        let response = get(port, "/metrics", None)?;
        let text = response.text();
        Ok(text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (name, value) = line.rsplit_once(' ')?;
                Some((name.to_string(), value.parse().ok()?))
            })
            .collect())
    }
}

fn start_appliance(
    binary: &Path,
    dir: &Path,
    catalog: &Path,
    files: u64,
    pin: bool,
) -> Result<Server> {
    let drive = dir.join("drive0.img");
    let state = dir.join("state");
    let _ = std::fs::remove_file(&drive);
    let _ = std::fs::remove_dir_all(&state);
    std::fs::create_dir_all(&state)?;
    std::fs::File::create(&drive)?.set_len(files * FILE_BYTES + (2 << 30))?;
    let binary_text = binary.to_str().context("binary path")?;
    let drive_text = drive.to_str().context("drive path")?;
    let state_text = state.to_str().context("state path")?;
    output(binary_text, &["format", "--segment-mib", "256", drive_text])?;
    println!("  importing the catalog into the appliance ({drive_text})");
    let started = Instant::now();
    output(
        binary_text,
        &[
            "store",
            "--drive",
            drive_text,
            "--state-dir",
            state_text,
            "import",
            catalog.to_str().context("catalog path")?,
        ],
    )?;
    println!("  imported in {:.1} s", started.elapsed().as_secs_f64());
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let (port, admin_port) = (free_port()?, free_port()?);
    let config = dir.join("appliance.toml");
    Config {
        state_dir: Some(state.clone()),
        control_socket: Some(state.join("control.sock")),
        serve: Serve {
            listen: Some(loopback(port)),
            admin_listen: Some(loopback(admin_port)),
            worker_threads: Some(1),
            access_log: Some("off".into()),
            connections_max: Some(20000),
            ..Serve::default()
        },
        ..Config::new(&[&drive])
    }
    .write(&config)?;
    let log = std::fs::File::create(dir.join("applianced.log"))?;
    let child = launch(pin)
        .command(binary)
        .args(["run", "--config", config.to_str().context("config path")?])
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting applianced run")?;
    let mut process = Guard::new("applianced", child);
    appliance_testkit::wait_for_ok(admin_port, "/health", Duration::from_secs(60), || {
        process.alive()
    })
    .with_context(|| format!("see {}", dir.join("applianced.log").display()))?;
    println!("  appliance serving on 127.0.0.1:{port} (admin {admin_port})");
    Ok(Server {
        name: "appliance",
        port,
        cpu_pid: process.pid(),
        admin_port: Some(admin_port),
        _process: Box::new(process),
    })
}

/// nginx with sendfile, tuned as a user would tune it for this load, serving the catalog.
fn start_nginx(dir: &Path, catalog: &Path, pin: bool) -> Result<Server> {
    let prefix = dir.join("nginx");
    let _ = std::fs::remove_dir_all(&prefix);
    let nginx = Nginx::builder(&prefix, catalog)
        .worker_connections(20000)
        .main_directive("worker_rlimit_nofile 65536;")
        .http_directive("keepalive_requests 100000;")
        .http_directive("keepalive_timeout 65;")
        .http_directive("open_file_cache max=1000;")
        .http_directive("types { video/mp4 mp4; }")
        .launch(launch(pin))
        .start()
        .context("starting nginx")?;
    let (port, worker) = (nginx.port, nginx.worker_pid());
    println!("  nginx serving on 127.0.0.1:{port} (worker pid {worker})");
    Ok(Server {
        name: "nginx",
        port,
        cpu_pid: worker,
        admin_port: None,
        _process: Box::new(nginx),
    })
}

/// Random ranges and one whole file from `server` must equal the source files.
fn verify_ranges(server: &Server, catalog: &Path, files: u64) -> Result<()> {
    let mut rng = SplitMix64(0x2545_F491_4F6C_DD1D);
    let mut next = |bound: u64| rng.below(bound);
    let mut checks: Vec<(u64, Option<(u64, u64)>)> = Vec::new();
    for length in [1, 4096, 65536, MIB, 3 * MIB + 17] {
        for _ in 0..2 {
            let first = next(FILE_BYTES - length + 1);
            checks.push((next(files), Some((first, first + length - 1))));
        }
    }
    checks.push((0, Some((FILE_BYTES - 4096, FILE_BYTES - 1))));
    checks.push((next(files), None));
    for (number, range) in checks {
        let source = std::fs::read(catalog.join("bench").join(file_name(number)))?;
        let path = url_path(number);
        let response = get(server.port, &path, range)?;
        let (want_status, want) = match range {
            Some((first, last)) => (
                206,
                &source[usize::try_from(first)?..=usize::try_from(last)?],
            ),
            None => (200, &source[..]),
        };
        if response.status != want_status {
            bail!(
                "{}: GET {path} {range:?} answered {} (wanted {want_status}):\n{}",
                server.name,
                response.status,
                response.head
            );
        }
        if response.body != want {
            bail!(
                "{}: GET {path} {range:?}: the body differs from the source file ({} bytes, \
                 wanted {})",
                server.name,
                response.body.len(),
                want.len()
            );
        }
    }
    Ok(())
}

/// Reads every file once through the server, so its page cache holds the catalog.
fn warm(server: &Server, files: u64) -> Result<()> {
    for number in 0..files {
        let response = get(server.port, &url_path(number), None)?;
        if response.status != 200 || response.body.len() as u64 != FILE_BYTES {
            bail!(
                "{}: warm-up GET {} answered {} with {} bytes",
                server.name,
                url_path(number),
                response.status,
                response.body.len()
            );
        }
    }
    Ok(())
}

fn drop_caches() -> Result<()> {
    output("sync", &[])?;
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("writing /proc/sys/vm/drop_caches")
}

/// The wrk script: a random file and a random 4 KiB-aligned range for every request.
fn write_script(dir: &Path, case: &Case, files: u64, seed: u64) -> Result<PathBuf> {
    let path = dir.join(format!("{}.lua", case.name));
    let text = format!(
        r#"-- Generated by cargo xtask bench serve: {name}
local files = {files}
local size = {size}
local range = {range}
local slots = math.floor((size - range) / 4096)
math.randomseed({seed})

request = function()
  local path = string.format("/bench/file-%04d.mp4", math.random(0, files - 1))
  if range == 0 then
    return wrk.format("GET", path)
  end
  local first = math.random(0, slots) * 4096
  return wrk.format("GET", path, {{ ["Range"] = "bytes=" .. first .. "-" .. (first + range - 1) }})
end

{hook}"#,
        hook = crate::wrk::SUMMARY_HOOK,
        name = case.name,
        size = FILE_BYTES,
        range = case.range_bytes,
    );
    std::fs::write(&path, text)?;
    Ok(path)
}

/// The fields of a /proc/PID/stat line after the command name: field 3 (state) first.
fn stat_fields(text: &str) -> Result<Vec<&str>> {
    let after_name = &text[text.rfind(')').context("/proc stat format")? + 1..];
    Ok(after_name.split_whitespace().collect())
}

/// utime + stime of a process, in clock ticks (fields 14 and 15 of /proc/PID/stat).
fn cpu_ticks(pid: u32) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let fields = stat_fields(&text)?;
    let utime: f64 = fields.get(11).context("utime")?.parse()?;
    let stime: f64 = fields.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

/// One wrk run against `server`, bounded in time.
fn wrk(
    server: &Server,
    case: &Case,
    seconds: u64,
    script: &Path,
    pin: bool,
    ticks_per_s: f64,
) -> Result<Run> {
    let mut command = if pin {
        let mut command = Command::new("taskset");
        command.args(["-c", "0", "wrk"]);
        command
    } else {
        Command::new("wrk")
    };
    let out_path = script.with_extension("out");
    let out = std::fs::File::create(&out_path)?;
    command
        .args([
            "--latency",
            "--timeout",
            "10s",
            "-t1",
            "-c",
            &case.connections.to_string(),
            "-d",
            &format!("{seconds}s"),
            "-s",
            script.to_str().context("script path")?,
            &format!("http://127.0.0.1:{}/", server.port),
        ])
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let ticks_before = cpu_ticks(server.cpu_pid)?;
    let foreign_before = foreign_ticks()?;
    let machine_before = machine_busy_ticks()?;
    let mut child = Guard::new("wrk", command.spawn().context("starting wrk")?);
    let deadline = Instant::now() + Duration::from_secs(seconds + 60);
    let status = loop {
        if let Some(status) = child.child().try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            bail!("wrk against {} ran past its deadline", server.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let ticks_after = cpu_ticks(server.cpu_pid)?;
    let foreign = foreign_ticks()? - foreign_before;
    let machine_s = (machine_busy_ticks()? - machine_before) / ticks_per_s;
    let text = std::fs::read_to_string(&out_path)?;
    if !status.success() {
        bail!("wrk against {} failed ({status}):\n{text}", server.name);
    }
    let summary = crate::wrk::Summary::parse(&text)?;
    let (duration_s, bytes) = (summary.duration_s, summary.bytes);
    let cpu_s = (ticks_after - ticks_before) / ticks_per_s;
    let others_s = foreign / ticks_per_s - cpu_s;
    Ok(Run {
        gbps: bytes / duration_s / GB,
        rps: summary.requests_per_s(),
        p50_ms: summary.p50_ms,
        p99_ms: summary.p99_ms,
        errors: summary.errors,
        timeouts: summary.timeouts,
        cpu_s_per_gb: if bytes > 0.0 {
            cpu_s / (bytes / GB)
        } else {
            0.0
        },
        machine_cpu_s_per_gb: if bytes > 0.0 {
            machine_s / (bytes / GB)
        } else {
            0.0
        },
        bytes_per_response: summary.bytes_per_response(),
        other_cores: others_s.max(0.0) / duration_s,
    })
}

/// Notes what looks wrong in a run: errors, wrong response lengths, the appliance's own
/// counters of statuses other than 200/206, errors and timeouts.
fn check_run(
    server: &Server,
    case: &Case,
    key: &str,
    run: &Run,
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    notes: &mut Vec<String>,
) {
    let who = format!("{key} {}", server.name);
    if run.errors > 0.0 {
        notes.push(format!(
            "{who}: wrk counted {} errors ({} timeouts)",
            run.errors, run.timeouts
        ));
    }
    let body = if case.range_bytes == 0 {
        FILE_BYTES
    } else {
        case.range_bytes
    } as f64;
    // Heads are a few hundred bytes; bytes of responses cut off at the end add a little.
    let spread = (run.bytes_per_response - body) / body;
    if !(-0.02..=0.10).contains(&spread) {
        notes.push(format!(
            "{who}: {:.0} bytes per response, wanted about {body:.0}",
            run.bytes_per_response
        ));
    }
    for (name, value) in after {
        let delta = value - before.get(name).copied().unwrap_or(0.0);
        if delta <= 0.0 {
            continue;
        }
        let expected = name.contains("status=\"200\"")
            || name.contains("status=\"206\"")
            || !(name.contains("status=")
                || name.contains("errors")
                || name.contains("timeouts")
                || name.contains("refused")
                || name.contains("misses"));
        if expected {
            continue;
        }
        // wrk stops with responses in flight: a send cut short on each connection at most.
        let cut_at_end = name.contains("errors") && delta <= case.connections as f64;
        if cut_at_end {
            println!(
                "    ({who}: {name} +{delta}: sends cut short when wrk closed its \
                 connections at the end of the run)"
            );
        } else {
            notes.push(format!("{who}: the appliance counted {name} +{delta}"));
        }
    }
}
