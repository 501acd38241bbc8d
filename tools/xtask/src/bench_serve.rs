//! `cargo xtask bench serve`: the appliance's serving throughput, server CPU per GB and
//! latency against nginx (`sendfile on`) and nginx with a thread pool (`sendfile on; aio
//! threads;`) on the same catalog in the same run, loaded by wrk with random byte ranges over
//! the whole catalog: page cache hot, cold (dropped before the run, warming during it), and
//! cold under a memory cgroup (each server in a group whose limit bounds its page cache, with
//! fio's random reads of the same shape on the same disk as the drive's ceiling).
//!
//! wrk runs on core 0 and the server under test on core 1; the servers alternate, round
//! after round, and the figures are the medians of the rounds. Everything started here is
//! stopped by a guard, on errors too, and the cgroups are removed.

use crate::bench::{env_u64, median_of, round_to};
use crate::bench_host::{
    cpu_ticks, drop_caches, ensure_tools, fio_randread, foreign_ticks, machine_busy_ticks,
    ticks_per_s, wait_quiet, FioRead, Leftovers, OTHER_CORES_MAX,
};
use crate::bench_servers::{
    start_appliance, start_nginx, verify_ranges, ApplianceSetup, NginxFlavor, Server, SourceFile,
};
use crate::util::{self, workspace_root};
use anyhow::{bail, Context, Result};
use appliance_testkit::{get, Fill, Guard};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
pub(crate) const FILE_BYTES: u64 = 16 * MIB;
const GB: f64 = 1e9;
/// The servers, in the order of the first round.
const SERVERS: [&str; 3] = ["appliance", "nginx", "nginx_aio"];

/// The state of the page cache when a case starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Temperature {
    /// Every file read once through the server first.
    Hot,
    /// Caches dropped first; the working set warms during the run.
    Cold,
    /// Caches dropped first and the server's page cache bounded by its cgroup's limit.
    ColdCgroup,
}

impl Temperature {
    fn suffix(self) -> &'static str {
        match self {
            Temperature::Hot => "hot",
            Temperature::Cold => "cold",
            Temperature::ColdCgroup => "cold_cg",
        }
    }
}

/// One load shape: the range length (0: whole files), the connections wrk keeps open, the
/// page cache's state, and for the cgroup cases fio's block size and queue depth.
struct Case {
    name: &'static str,
    range_bytes: u64,
    connections: u64,
    temperature: Temperature,
    fio: Option<(&'static str, u64)>,
}

impl Case {
    fn key(&self) -> String {
        format!("{}_{}", self.name, self.temperature.suffix())
    }

    const fn new(name: &'static str, range_bytes: u64, connections: u64) -> Case {
        Case {
            name,
            range_bytes,
            connections,
            temperature: Temperature::Hot,
            fio: None,
        }
    }

    const fn at(self, temperature: Temperature) -> Case {
        Case {
            temperature,
            ..self
        }
    }
}

const CASES: [Case; 8] = [
    Case::new("range_1m", MIB, 64),
    Case::new("range_1m", MIB, 64).at(Temperature::Cold),
    Case::new("range_64k", 64 << 10, 1000),
    Case::new("range_64k", 64 << 10, 1000).at(Temperature::Cold),
    Case::new("whole_16m", 0, 16),
    Case::new("whole_16m", 0, 16).at(Temperature::Cold),
    Case {
        fio: Some(("64k", 32)),
        ..Case::new("range_64k", 64 << 10, 256).at(Temperature::ColdCgroup)
    },
    Case {
        fio: Some(("1m", 16)),
        ..Case::new("range_1m", MIB, 64).at(Temperature::ColdCgroup)
    },
];

/// What one wrk run measured.
#[derive(Clone, Debug, Default)]
pub(crate) struct Run {
    pub gbps: f64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: f64,
    pub timeouts: f64,
    pub cpu_s_per_gb: f64,
    /// The whole machine's busy CPU per GB (server, wrk, softirq): on loopback the kernel
    /// charges part of the sender's TCP work to the receiver, so this is the fairer total.
    pub machine_cpu_s_per_gb: f64,
    /// Bytes received per completed response (heads included), to catch wrong lengths.
    pub bytes_per_response: f64,
    /// CPU used by other processes during the run, in cores (outside wrk, the server and
    /// the kernel's softirq threads).
    pub other_cores: f64,
}

/// Attempts at a run before a disturbed one is kept (and counted).
const ATTEMPTS: u32 = 3;

/// What this run measures, from the environment.
struct Settings {
    /// Files of the hot and cold cases.
    files: u64,
    /// Files of the cgroup cases (a larger catalog: 3 GiB by default).
    cg_files: u64,
    cg_limit_bytes: u64,
    rounds: u64,
    seconds: u64,
    /// The case keys to run (BENCH_CASES, comma-separated); all when empty.
    only: Vec<String>,
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            files: env_u64("BENCH_SERVE_FILES", 64).max(1),
            cg_files: env_u64("BENCH_SERVE_CG_FILES", 192).max(1),
            cg_limit_bytes: env_u64("BENCH_SERVE_CG_LIMIT_MIB", 256).max(16) * MIB,
            rounds: env_u64("BENCH_ROUNDS", 3).max(1),
            seconds: env_u64("BENCH_SECONDS", 8).max(1),
            only: std::env::var("BENCH_CASES")
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|key| !key.is_empty())
                .map(String::from)
                .collect(),
        }
    }

    fn files_of(&self, case: &Case) -> u64 {
        if case.temperature == Temperature::ColdCgroup {
            self.cg_files
        } else {
            self.files
        }
    }

    /// The cases to run: not the cold ones without root, only the asked ones when asked.
    fn cases(&self, root: bool) -> Vec<&'static Case> {
        CASES
            .iter()
            .filter(|case| root || case.temperature == Temperature::Hot)
            .filter(|case| self.only.is_empty() || self.only.contains(&case.key()))
            .collect()
    }
}

/// The bench's running state: results, notes, and the counts of disturbed runs.
#[derive(Default)]
struct Tally {
    runs: BTreeMap<(String, &'static str), Vec<Run>>,
    fio: BTreeMap<String, Vec<FioRead>>,
    notes: Vec<String>,
    retried: u32,
    disturbed: u32,
    waited: Duration,
}

pub fn serve() -> Result<Map<String, Value>> {
    let settings = Settings::from_env();
    ensure_tools(
        "serve",
        &[
            ("wrk", "wrk"),
            ("nginx", "nginx"),
            ("fio", "fio"),
            ("taskset", "util-linux"),
        ],
    )?;
    let root = util::is_root();
    if !root {
        println!(
            "  not root: the cold cases (drop_caches) and the cgroup cases (memory cgroups) \
             are skipped"
        );
    }
    let cases = settings.cases(root);
    if cases.is_empty() {
        bail!("no case to run (BENCH_CASES={:?})", settings.only.join(","));
    }
    let pin = std::thread::available_parallelism().map_or(1, usize::from) >= 2;
    if !pin {
        println!("  fewer than 2 cores: wrk and the servers are not pinned");
    }
    let applianced = crate::bench_servers::applianced_under_test()?;
    let dir = workspace_root().join("target/bench/serve");
    std::fs::create_dir_all(&dir)?;
    let catalog = dir.join("catalog");
    let catalog_files = cases
        .iter()
        .map(|case| settings.files_of(case))
        .max()
        .unwrap_or(1);
    generate_catalog(&catalog, catalog_files)?;
    let ticks_per_s = ticks_per_s()?;
    let fio_file = dir.join("fio-randread.img");
    let _fio_cleanup = Leftovers::new(vec![fio_file.clone()]);

    // Each server in a memory cgroup of its own (no limit until a cgroup case) when root.
    let cgroups = root.then_some("serve");
    let appliance = start_appliance(&ApplianceSetup {
        binary: &applianced,
        dir: &dir,
        catalog: &catalog,
        // Sparse; room for the writers' open 256 MiB segments beside small catalogs too.
        drive_bytes: catalog_files * FILE_BYTES + (4 << 30),
        fill: Fill::default(),
        pin,
        cgroup: cgroups,
        tls: None,
    })?;
    let nginx = start_nginx(&dir, &catalog, NginxFlavor::Sendfile, pin, cgroups, None)?;
    let nginx_aio = start_nginx(&dir, &catalog, NginxFlavor::AioThreads, pin, cgroups, None)?;
    let servers = [&appliance, &nginx, &nginx_aio];
    let sources: Vec<SourceFile> = (0..catalog_files)
        .map(|number| SourceFile {
            url_path: url_path(number),
            local: catalog.join("bench").join(file_name(number)),
            size_bytes: FILE_BYTES,
        })
        .collect();
    for server in servers {
        verify_ranges(server, &sources)?;
    }
    println!("  every server returns byte-exact ranges and whole files");

    let tally = run_rounds(&Rounds {
        servers: &servers,
        cases: &cases,
        settings: &settings,
        dir: &dir,
        fio_file: &fio_file,
        pin,
        ticks_per_s,
    })?;
    // The appliance's own counters, for a look at what it saw.
    if let Some(port) = appliance.admin_port {
        let response = get(port, "/metrics", None)?;
        std::fs::write(dir.join("appliance-metrics.txt"), &response.body)?;
    }
    drop(nginx_aio);
    drop(nginx);
    drop(appliance);
    // The catalog stays for the next run; the drive (re-imported every run) goes.
    let _ = std::fs::remove_file(dir.join("drive0.img"));

    let (mut figures, table) = summarize(&tally, &cases);
    figures.insert("files".into(), json!(settings.files));
    figures.insert("cg_files".into(), json!(settings.cg_files));
    figures.insert("cg_limit_bytes".into(), json!(settings.cg_limit_bytes));
    figures.insert("file_bytes".into(), json!(FILE_BYTES));
    figures.insert("rounds".into(), json!(settings.rounds));
    figures.insert("seconds_per_run".into(), json!(settings.seconds));
    figures.insert("runs_repeated_disturbed".into(), json!(tally.retried));
    figures.insert("runs_kept_disturbed".into(), json!(tally.disturbed));
    if let Ok(cold_read) = std::env::var("BENCH_COLD_READ") {
        figures.insert("cold_read".into(), json!(cold_read));
    }
    for (variable, key) in [
        ("BENCH_COLD_THREADS", "cold_threads_per_drive"),
        ("BENCH_DIRECT_CACHE_MIB", "cold_direct_cache_mib"),
    ] {
        if let Ok(value) = std::env::var(variable) {
            figures.insert(key.into(), json!(value));
        }
    }
    print_report(&settings, &tally, &table);
    Ok(figures)
}

/// What the rounds of the bench run on.
struct Rounds<'a> {
    servers: &'a [&'a Server],
    cases: &'a [&'static Case],
    settings: &'a Settings,
    dir: &'a Path,
    fio_file: &'a Path,
    pin: bool,
    ticks_per_s: f64,
}

/// Every round: each case against every server in turn (the first one rotating), then fio
/// for the cases that have a fio shape.
fn run_rounds(rounds: &Rounds) -> Result<Tally> {
    let mut tally = Tally::default();
    for round in 0..rounds.settings.rounds {
        for (number, case) in rounds.cases.iter().enumerate() {
            let files = rounds.settings.files_of(case);
            let seed = round * 100 + u64::try_from(number)? + 1;
            let script = write_script(rounds.dir, case, files, seed)?;
            // Rotate which server goes first from round to round.
            let first = usize::try_from(round % 3)?;
            for at in 0..rounds.servers.len() {
                let server = rounds.servers[(first + at) % rounds.servers.len()];
                let run = measure(
                    server,
                    case,
                    rounds.settings,
                    &script,
                    rounds.pin,
                    rounds.ticks_per_s,
                    &mut tally,
                )?;
                tally
                    .runs
                    .entry((case.key(), server.name))
                    .or_default()
                    .push(run);
            }
            if let Some((block, depth)) = case.fio {
                wait_quiet(rounds.ticks_per_s, &mut tally.waited)?;
                let size_bytes = rounds.settings.cg_files * FILE_BYTES;
                let fio = fio_randread(
                    rounds.fio_file,
                    size_bytes,
                    block,
                    depth,
                    rounds.settings.seconds,
                    rounds.pin.then_some(1),
                )?;
                println!(
                    "  round {round} {:<17} {:<9} {:6.2} GB/s {:8.0} IOPS (randread {block} \
                     QD{depth}, direct)",
                    case.key(),
                    "fio",
                    fio.gbps,
                    fio.iops
                );
                tally.fio.entry(case.key()).or_default().push(fio);
            }
        }
    }
    Ok(tally)
}

fn print_report(settings: &Settings, tally: &Tally, table: &str) {
    println!(
        "== serve: medians of {} rounds of {} s, {} files of 16 MiB ({} in the cgroup cases, \
         limit {} MiB), wrk on core 0, server on core 1 ==",
        settings.rounds,
        settings.seconds,
        settings.files,
        settings.cg_files,
        settings.cg_limit_bytes / MIB
    );
    print!("{table}");
    println!(
        "  CPU s/GB: the server's own CPU (nginx: its worker); box s/GB: the whole machine's \
         (server, wrk, softirq)"
    );
    if tally.retried > 0 {
        println!(
            "  {} runs disturbed by other processes were done again",
            tally.retried
        );
    }
    if tally.notes.is_empty() {
        println!("  no errors, timeouts or unexpected statuses");
    } else {
        println!("  problems seen:");
        for note in &tally.notes {
            println!("    {note}");
        }
    }
}

/// Prepares the page cache for `case`, runs wrk against `server` (again when other processes
/// disturbed it), prints the run and notes what looks wrong.
fn measure(
    server: &Server,
    case: &Case,
    settings: &Settings,
    script: &Path,
    pin: bool,
    ticks_per_s: f64,
    tally: &mut Tally,
) -> Result<Run> {
    let key = case.key();
    let mut attempt = 1;
    let (run, before, after) = loop {
        wait_quiet(ticks_per_s, &mut tally.waited)?;
        let limit =
            (case.temperature == Temperature::ColdCgroup).then_some(settings.cg_limit_bytes);
        if server.cgroup.is_some() {
            server.limit_memory(limit)?;
        }
        match case.temperature {
            Temperature::Hot => warm(server, settings.files_of(case))?,
            Temperature::Cold | Temperature::ColdCgroup => drop_caches()?,
        }
        let before = server.metrics()?;
        let run = wrk(server, case, settings.seconds, script, pin, ticks_per_s);
        if server.cgroup.is_some() {
            server.limit_memory(None)?;
        }
        let run = run?;
        let after = server.metrics()?;
        if run.other_cores <= OTHER_CORES_MAX {
            break (run, before, after);
        }
        if attempt == ATTEMPTS {
            tally.disturbed += 1;
            tally.notes.push(format!(
                "{key} {}: other processes used {:.2} cores in every attempt; the last one \
                 is kept",
                server.name, run.other_cores
            ));
            break (run, before, after);
        }
        println!(
            "  {key:<17} {:<9} other processes used {:.2} cores; running it again",
            server.name, run.other_cores
        );
        tally.retried += 1;
        attempt += 1;
    };
    println!(
        "  {key:<17} {:<9} {:6.2} GB/s {:8.0} req/s p50 {:7.2} ms p99 {:7.2} ms cpu {:5.3} s/GB \
         errors {} (others {:.2} cores)",
        server.name,
        run.gbps,
        run.rps,
        run.p50_ms,
        run.p99_ms,
        run.cpu_s_per_gb,
        run.errors,
        run.other_cores
    );
    check_run(server, case, &key, &run, &before, &after, &mut tally.notes);
    Ok(run)
}

/// The median of every field over `list`.
fn median_run(list: &[Run]) -> Run {
    let pick = |field: fn(&Run) -> f64| median_of(list, field);
    Run {
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
    }
}

/// The medians of every case for every server (and fio): the JSON figures and a table.
fn summarize(tally: &Tally, cases: &[&Case]) -> (Map<String, Value>, String) {
    let mut figures = Map::new();
    let mut table = String::new();
    let _ = writeln!(
        table,
        "  {:<17} {:<9} {:>7} {:>9} {:>8} {:>8} {:>8} {:>9} {:>7} {:>8}",
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
    for case in cases {
        let key = case.key();
        let mut medians = BTreeMap::new();
        for server in SERVERS {
            let list = tally
                .runs
                .get(&(key.clone(), server))
                .cloned()
                .unwrap_or_default();
            let run = median_run(&list);
            let _ = writeln!(
                table,
                "  {key:<17} {server:<9} {:>7.3} {:>9.0} {:>8.2} {:>8.2} {:>8.3} {:>9.3} {:>7} \
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
            insert_run(&mut figures, &format!("{key}_{server}"), &run);
            medians.insert(server, run);
        }
        let ours = &medians["appliance"];
        let (peer, aio) = (&medians["nginx"], &medians["nginx_aio"]);
        let ratio = ours.gbps / peer.gbps;
        let cpu_ratio = peer.cpu_s_per_gb / ours.cpu_s_per_gb;
        let aio_ratio = ours.gbps / aio.gbps;
        figures.insert(format!("{key}_ratio"), json!(round_to(ratio, 3)));
        figures.insert(format!("{key}_cpu_ratio"), json!(round_to(cpu_ratio, 3)));
        figures.insert(
            format!("{key}_ratio_vs_nginx_aio"),
            json!(round_to(aio_ratio, 3)),
        );
        let mut line = format!(
            "throughput x{ratio:.3} of nginx, x{aio_ratio:.3} of nginx aio; CPU per GB \
             x{cpu_ratio:.3} of nginx"
        );
        if let Some((block, depth)) = case.fio {
            let fio = fio_median(tally.fio.get(&key).map_or(&[], Vec::as_slice));
            let over_fio = ours.rps / fio.iops;
            figures.insert(
                format!("fio_randread_{block}_qd{depth}_iops"),
                json!(fio.iops),
            );
            figures.insert(
                format!("fio_randread_{block}_qd{depth}_gbps"),
                json!(round_to(fio.gbps, 3)),
            );
            figures.insert(format!("{key}_over_fio"), json!(round_to(over_fio, 3)));
            let _ = writeln!(
                table,
                "  {key:<17} {:<9} {:>7.3} {:>9.0} (IOPS; randread {block} QD{depth}, direct)",
                "fio", fio.gbps, fio.iops
            );
            let _ = write!(line, "; req/s x{over_fio:.3} of fio's IOPS");
        }
        let _ = writeln!(
            table,
            "  {key:<17} {:<9} {line} (>1: the appliance is better)",
            "ratio"
        );
    }
    (figures, table)
}

/// One server's medians of one case as JSON figures named `PREFIX_...`.
fn insert_run(figures: &mut Map<String, Value>, prefix: &str, run: &Run) {
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
}

/// The medians of fio's runs (NaN when none ran).
fn fio_median(list: &[FioRead]) -> FioRead {
    FioRead {
        iops: median_of(list, |fio| fio.iops),
        gbps: median_of(list, |fio| fio.gbps),
    }
}

pub(crate) fn file_name(number: u64) -> String {
    format!("file-{number:04}.mp4")
}

pub(crate) fn url_path(number: u64) -> String {
    format!("/bench/{}", file_name(number))
}

/// `files` files of 16 MiB of pseudo-random bytes under CATALOG/bench (kept between runs).
pub(crate) fn generate_catalog(catalog: &Path, files: u64) -> Result<()> {
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
    // Other files beside the wanted ones may stay (`bench tls` adds a small one).
    let complete = wanted.iter().all(|name| present.contains(name));
    if complete && sizes_right && others == 1 {
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

/// The wrk script: a random file and a random 4 KiB-aligned range for every request.
fn write_script(dir: &Path, case: &Case, files: u64, seed: u64) -> Result<PathBuf> {
    let path = dir.join(format!("{}.lua", case.key()));
    range_script(&path, case.name, files, case.range_bytes, seed)?;
    Ok(path)
}

/// Writes a wrk script to `path` that asks for random `range_bytes` ranges (whole files when
/// 0) of the `files` bench files, from `seed`.
pub(crate) fn range_script(
    path: &Path,
    name: &str,
    files: u64,
    range_bytes: u64,
    seed: u64,
) -> Result<()> {
    let text = format!(
        r#"-- Generated by cargo xtask bench: {name}
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
        size = FILE_BYTES,
        range = range_bytes,
    );
    std::fs::write(path, text)?;
    Ok(())
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
    run_wrk(&Load {
        server,
        url: format!("http://127.0.0.1:{}/", server.port),
        connections: case.connections,
        seconds,
        script,
        pin,
        ticks_per_s,
    })
}

/// A wrk run: its server, URL (http or https), connections, length and script.
pub(crate) struct Load<'a> {
    pub server: &'a Server,
    pub url: String,
    pub connections: u64,
    pub seconds: u64,
    pub script: &'a Path,
    pub pin: bool,
    pub ticks_per_s: f64,
}

/// Runs wrk as `load` says (on core 0 when pinned) and measures the server's CPU with it.
pub(crate) fn run_wrk(load: &Load) -> Result<Run> {
    let Load {
        server,
        connections,
        seconds,
        script,
        pin,
        ticks_per_s,
        ..
    } = *load;
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
            &connections.to_string(),
            "-d",
            &format!("{seconds}s"),
            "-s",
            script.to_str().context("script path")?,
            &load.url,
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
