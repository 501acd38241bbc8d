//! `cargo xtask bench day`: a day of serving. A catalog several times larger than the page
//! cache the server may use (a memory cgroup per server), titles picked by a Zipf law, and
//! player-like clients (`day_load.rs`) asking for consecutive 2 MiB ranges with random 64 KiB
//! ones mixed in, against the appliance and nginx (`sendfile on; aio threads;`) in alternating
//! rounds, in three phases: serving only, serving beside a fill capped at 1.2 Gbit/s, and
//! beside an uncapped fill.
//!
//! The appliance fills from a local origin (nginx on loopback) with `appliance-ctl fill`; the
//! phase's new paths are symlinks to a few real files, unique per phase and round, so every
//! fill has work for the whole window and no fill repeats another's. nginx faces a competing
//! writer of the same shape on the same disk: four `curl | dd oflag=direct` loops from the
//! same origin, capped in total like the fill (curl --limit-rate). Each round starts the
//! appliance on a fresh drive with the catalog imported. Everything started here is stopped by
//! a guard, on errors too; the cgroups, drives and written files are removed.

use crate::bench::{env_u64, median_of, round_to};
use crate::bench_host::{
    cpu_ticks, drop_caches, ensure_tools, storage_read_bytes, ticks_per_s, wait_quiet, Leftovers,
};
use crate::bench_servers::{
    launch, start_appliance, start_nginx, verify_ranges, ApplianceSetup, NginxFlavor, Server,
    SourceFile,
};
use crate::day_load::{Plan, Title};
use crate::util::{self, workspace_root};
use anyhow::{bail, Context, Result};
use appliance_testkit::{
    write_seeded_file, Ctl, Fill, Guard, Launch, Manifest, ManifestFile, Nginx, SplitMix64,
};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// The servers, in the order of the first round.
const SERVERS: [&str; 2] = ["appliance", "nginx_aio"];
/// The phases of a day, in order.
const PHASES: [Phase; 3] = [Phase::Idle, Phase::FillCapped, Phase::FillFull];
/// Downloads at once: the fill's concurrency and the competing writer's loops.
const WRITERS: u64 = 4;
/// Each real new file of the origin is this large.
const NEW_FILE_BYTES: u64 = 32 * MIB;

/// What runs beside serving.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Idle,
    FillCapped,
    FillFull,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::FillCapped => "fill_capped",
            Phase::FillFull => "fill_full",
        }
    }
}

/// What this run measures, from the environment.
struct Settings {
    catalog_bytes: u64,
    limit_bytes: u64,
    rounds: u64,
    warmup_s: u64,
    seconds: u64,
    connections: u64,
    cap_bits_per_s: u64,
    /// New files an uncapped fill may write in one phase: what its manifest lists beyond the
    /// catalog, and the room it gets on the appliance's drive.
    fill_room_bytes: u64,
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            catalog_bytes: env_u64("BENCH_DAY_CATALOG_MIB", 2048).max(64) * MIB,
            limit_bytes: env_u64("BENCH_DAY_LIMIT_MIB", 384).max(64) * MIB,
            rounds: env_u64("BENCH_DAY_ROUNDS", 3).max(1),
            warmup_s: env_u64("BENCH_DAY_WARMUP_S", 5),
            seconds: env_u64("BENCH_DAY_SECONDS", 15).max(1),
            connections: env_u64("BENCH_DAY_CONNECTIONS", 64).max(1),
            cap_bits_per_s: env_u64("BENCH_DAY_CAP_MBIT", 1200).max(1) * 1_000_000,
            fill_room_bytes: env_u64("BENCH_DAY_FILL_ROOM_GIB", 24).max(1) << 30,
        }
    }

    /// The new bytes a phase's manifest lists: what the cap lets through in the phase and
    /// 30 s more, or `fill_room_bytes` without a cap (0).
    fn room_bytes(&self, cap_bits_per_s: u64) -> u64 {
        if cap_bits_per_s == 0 {
            return self.fill_room_bytes;
        }
        cap_bits_per_s / 8 * (self.warmup_s + self.seconds + 30)
    }

    /// The appliance's drive: the catalog, every phase's new files side by side (so that no
    /// fill has to delete the files of the phase before, which the planner would do to make
    /// room), and 2 GiB to spare. Sparse: only what is written takes room on the disk.
    fn drive_bytes(&self) -> u64 {
        self.catalog_bytes + self.room_bytes(self.cap_bits_per_s) + self.room_bytes(0) + (2 << 30)
    }
}

/// What one phase of one server measured.
#[derive(Clone, Debug, Default)]
struct DayRun {
    gbps: f64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    cpu_s_per_gb: f64,
    drive_read_mbps: f64,
    /// 1 - bytes read from the drive / bytes served.
    hit_share: f64,
    /// What the fill (or the competing writer) achieved during the window.
    fill_mbit_per_s: f64,
    errors: f64,
}

impl DayRun {
    /// Every figure: its JSON name, its label in tables, its value, the decimals shown.
    fn fields(&self) -> [(&'static str, &'static str, f64, usize); 10] {
        [
            ("gbps", "GB/s", self.gbps, 3),
            ("rps", "req/s", self.rps, 0),
            ("p50_ms", "p50 ms", self.p50_ms, 2),
            ("p99_ms", "p99 ms", self.p99_ms, 2),
            ("p999_ms", "p99.9 ms", self.p999_ms, 2),
            ("cpu_s_per_gb", "CPU s/GB", self.cpu_s_per_gb, 3),
            ("drive_read_mbps", "drive MB/s", self.drive_read_mbps, 0),
            ("hit_share", "hits", self.hit_share, 3),
            ("fill_mbit_per_s", "fill Mb/s", self.fill_mbit_per_s, 0),
            ("errors", "errors", self.errors, 0),
        ]
    }

    /// The figures as columns of 11 characters.
    fn columns(&self) -> String {
        self.fields()
            .iter()
            .map(|(_, _, value, places)| format!("{value:>11.places$}"))
            .collect()
    }
}

/// The fixed pieces of a run: folders, binaries, catalog, origin.
struct Day<'a> {
    settings: &'a Settings,
    dir: &'a Path,
    applianced: &'a Path,
    titles: &'a [ManifestFile],
    new_files: &'a [ManifestFile],
    origin: &'a Nginx,
    pin: bool,
    ticks_per_s: f64,
}

pub fn day() -> Result<Map<String, Value>> {
    let settings = Settings::from_env();
    ensure_tools(
        "day",
        &[
            ("nginx", "nginx"),
            ("curl", "curl"),
            ("dd", "coreutils"),
            ("setsid", "util-linux"),
            ("taskset", "util-linux"),
        ],
    )?;
    let mut figures = Map::new();
    if !util::is_root() {
        let why = "bench day needs root (memory cgroups, drop_caches); nothing was measured";
        println!("  {why}");
        figures.insert("skipped".into(), json!(why));
        return Ok(figures);
    }
    let pin = std::thread::available_parallelism().map_or(1, usize::from) >= 2;
    let applianced = crate::bench_servers::applianced_under_test()?;
    let dir = workspace_root().join("target/bench/day");
    std::fs::create_dir_all(&dir)?;
    // What a run writes (drive, state, the writer's files, the phases' symlinks and
    // manifests) goes at the end; the catalog and the origin's files stay for the next run.
    let names = ["drive0.img", "state", "incoming", "origin/fill"];
    let _cleanup = Leftovers::new(names.iter().map(|name| dir.join(name)).collect());
    let titles = ensure_catalog(&dir.join("catalog"), &dir.join("catalog.json"), &settings)?;
    let new_files = ensure_new_files(&dir.join("origin"), &dir.join("origin-new.json"))?;
    let origin = Nginx::builder(&dir.join("origin-nginx"), &dir.join("origin"))
        .launch(Launch {
            stop_with_parent: true,
            ..Launch::default()
        })
        .start()
        .context("starting nginx as the origin")?;
    let day = Day {
        settings: &settings,
        dir: &dir,
        applianced: &applianced,
        titles: &titles,
        new_files: &new_files,
        origin: &origin,
        pin,
        ticks_per_s: ticks_per_s()?,
    };
    let runs = run_rounds(&day)?;
    drop(origin);
    let table = summarize(&runs, &mut figures);
    figures.insert("catalog_bytes".into(), json!(settings.catalog_bytes));
    figures.insert("titles".into(), json!(titles.len()));
    figures.insert("cgroup_limit_bytes".into(), json!(settings.limit_bytes));
    figures.insert("rounds".into(), json!(settings.rounds));
    figures.insert("seconds_per_run".into(), json!(settings.seconds));
    figures.insert("warmup_s".into(), json!(settings.warmup_s));
    figures.insert("connections".into(), json!(settings.connections));
    figures.insert("cap_bits_per_s".into(), json!(settings.cap_bits_per_s));
    println!(
        "== day: {} titles ({:.1} GiB, Zipf 0.8), page cache limit {} MiB per server, {} \
         players, medians of {} rounds of {} s after {} s of warm-up ==",
        titles.len(),
        settings.catalog_bytes as f64 / f64::from(1u32 << 30),
        settings.limit_bytes / MIB,
        settings.connections,
        settings.rounds,
        settings.seconds,
        settings.warmup_s
    );
    print!("{table}");
    Ok(figures)
}

/// Every round: a fresh appliance, then each phase against both servers (alternating).
fn run_rounds(day: &Day) -> Result<BTreeMap<(&'static str, &'static str), Vec<DayRun>>> {
    let catalog = day.dir.join("catalog");
    let mut nginx = start_nginx(
        day.dir,
        &catalog,
        NginxFlavor::AioThreads,
        day.pin,
        Some("day"),
        None,
    )?;
    nginx.limit_memory(Some(day.settings.limit_bytes))?;
    let sources: Vec<SourceFile> = day
        .titles
        .iter()
        .map(|title| SourceFile {
            url_path: title.path.clone(),
            local: catalog.join(title.path.trim_start_matches('/')),
            size_bytes: title.size_bytes,
        })
        .collect();
    verify_ranges(&nginx, &sources)?;
    let mut runs: BTreeMap<(&'static str, &'static str), Vec<DayRun>> = BTreeMap::new();
    let mut waited = Duration::ZERO;
    for round in 0..day.settings.rounds {
        let fill = Fill {
            sources: vec![day.origin.url("")],
            concurrency: Some(WRITERS),
            ..Fill::default()
        };
        let mut appliance = start_appliance(&ApplianceSetup {
            binary: day.applianced,
            dir: day.dir,
            catalog: &catalog,
            drive_bytes: day.settings.drive_bytes(),
            fill,
            pin: day.pin,
            cgroup: Some("day"),
            tls: None,
        })?;
        appliance.limit_memory(Some(day.settings.limit_bytes))?;
        verify_ranges(&appliance, &sources)?;
        println!("  round {round}: both servers return byte-exact ranges and whole files");
        for phase in PHASES {
            for at in 0..SERVERS.len() {
                let first = usize::try_from(round)? % SERVERS.len();
                let server: &mut Server = if (first + at).is_multiple_of(SERVERS.len()) {
                    &mut appliance
                } else {
                    &mut nginx
                };
                wait_quiet(day.ticks_per_s, &mut waited)?;
                let run = run_phase(day, server, phase, round)?;
                runs.entry((phase.name(), server.name))
                    .or_default()
                    .push(run);
            }
        }
        drop(appliance);
        let _ = std::fs::remove_file(day.dir.join("drive0.img"));
    }
    Ok(runs)
}

/// One phase against one server: caches dropped, the origin's files read back in, the fill
/// or writer started, the load's warm-up, the measured window, the fill stopped.
fn run_phase(day: &Day, server: &mut Server, phase: Phase, round: u64) -> Result<DayRun> {
    let tag = format!("r{round}-{}-{}", phase.name(), server.name);
    drop_caches()?;
    warm_files(day.dir, day.new_files)?;
    let fill = match phase {
        Phase::Idle => None,
        Phase::FillCapped => Some(day.settings.cap_bits_per_s),
        Phase::FillFull => Some(0),
    };
    let mut beside = match fill {
        None => Beside::Nothing,
        Some(cap) => start_beside(day, server, &tag, cap)?,
    };
    let plan_path = day.dir.join("plan.json");
    let plan = Plan {
        port: server.port,
        connections: day.settings.connections,
        warmup_s: day.settings.warmup_s,
        seconds: day.settings.seconds,
        seed: round * 10 + 1,
        titles: day
            .titles
            .iter()
            .map(|title| Title {
                path: title.path.clone(),
                size_bytes: title.size_bytes,
            })
            .collect(),
        zipf_alpha: 0.8,
        chunk_bytes: 2 * MIB,
        seek_share: 0.1,
        seek_bytes: 64 << 10,
        session_ranges_mean: 12.0,
    };
    std::fs::write(&plan_path, plan.to_json().to_string())?;
    let result = measure_window(day, server, &plan_path, &mut beside);
    let stopped = beside.stop();
    let (run, notes) = result?;
    stopped?;
    let _ = std::fs::remove_dir_all(day.dir.join("incoming"));
    println!(
        "  round {round} {:<11} {:<9}{}",
        phase.name(),
        server.name,
        run.columns()
    );
    for note in notes {
        println!("    {note}");
    }
    Ok(run)
}

/// What runs beside serving in a phase.
enum Beside {
    Nothing,
    /// The appliance's own fill, driven through `appliance-ctl`.
    Fill(Ctl),
    /// nginx's competing writer (a shell with four `curl | dd` loops) and its folder.
    Writer(Guard, PathBuf),
}

impl Beside {
    /// Bytes written so far.
    fn bytes(&self) -> Result<u64> {
        match self {
            Beside::Nothing => Ok(0),
            Beside::Fill(ctl) => {
                let status = ctl.fill_status()?;
                Ok(status["bytes_done"].as_u64().unwrap_or(0))
            }
            Beside::Writer(_, folder) => Ok(folder_bytes(folder)),
        }
    }

    /// True while it still writes.
    fn running(&mut self) -> Result<bool> {
        match self {
            Beside::Nothing => Ok(false),
            Beside::Fill(ctl) => Ok(ctl.fill_status()?["running"] == true),
            Beside::Writer(guard, _) => Ok(guard.alive()),
        }
    }

    /// Cancels the fill (and waits until it stopped) or stops the writer.
    fn stop(self) -> Result<()> {
        match self {
            Beside::Nothing => Ok(()),
            Beside::Fill(ctl) => {
                ctl.ok(&["fill", "--cancel"])?;
                let deadline = Instant::now() + Duration::from_secs(60);
                while ctl.fill_status()?["running"] == true {
                    if Instant::now() > deadline {
                        bail!("the fill did not stop within 60 s of its cancel");
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Ok(())
            }
            Beside::Writer(mut guard, _) => {
                guard.stop(Duration::from_secs(5))?;
                Ok(())
            }
        }
    }
}

/// Starts the appliance's fill of the phase's new paths at `cap_bits_per_s` (0: none), or
/// nginx's competing writer at the same cap, and waits until bytes flow.
fn start_beside(day: &Day, server: &mut Server, tag: &str, cap_bits_per_s: u64) -> Result<Beside> {
    let paths = phase_paths(day, tag, day.settings.room_bytes(cap_bits_per_s))?;
    let beside = if server.name == "appliance" {
        let mut manifest = Manifest::default();
        manifest.files.extend(day.titles.iter().cloned());
        manifest.files.extend(paths);
        for (rank, file) in (1u64..).zip(&mut manifest.files) {
            file.rank = rank;
        }
        let name = format!("fill/manifest-{tag}.json");
        manifest.write(&day.dir.join("origin").join(&name))?;
        server.reload_fill_bandwidth(cap_bits_per_s)?;
        // SIGHUP is handled asynchronously: give the daemon a moment to apply the cap.
        std::thread::sleep(Duration::from_millis(300));
        let ctl = Ctl::next_to(day.applianced, &day.dir.join("state/control.sock"))?;
        ctl.fill(Some(&day.origin.url(&format!("/{name}"))))?;
        Beside::Fill(ctl)
    } else {
        let folder = day.dir.join("incoming");
        let _ = std::fs::remove_dir_all(&folder);
        std::fs::create_dir_all(&folder)?;
        // A file, not `sh -c`: an uncapped phase's script is longer than one argument may be
        // (MAX_ARG_STRLEN, 128 KiB).
        let script = day.dir.join(format!("writer-{tag}.sh"));
        std::fs::write(&script, writer_script(day, &paths, &folder, cap_bits_per_s))?;
        let child = launch(day.pin, None)
            .command("setsid")
            .arg("sh")
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting the competing writer")?;
        Beside::Writer(
            Guard::new("writer", child).with_grace(Duration::from_secs(5)),
            folder,
        )
    };
    let mut beside = beside;
    let started = Instant::now();
    loop {
        if beside.bytes()? > 0 {
            return Ok(beside);
        }
        let ended = !beside.running()? && started.elapsed() > Duration::from_secs(2);
        if ended || started.elapsed() > Duration::from_secs(30) {
            let _ = beside.stop();
            bail!(
                "the fill beside {} wrote nothing (ended: {ended}; see {})",
                server.name,
                day.dir.join("applianced.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The phase's new paths, `/fill/TAG/nNNNNN.mp4`: symlinks in the origin's folder to the
/// real new files in turn, as many as `room_bytes` holds.
fn phase_paths(day: &Day, tag: &str, room_bytes: u64) -> Result<Vec<ManifestFile>> {
    let folder = day.dir.join("origin/fill").join(tag);
    let _ = std::fs::remove_dir_all(&folder);
    std::fs::create_dir_all(&folder)?;
    let count = (room_bytes / NEW_FILE_BYTES).max(1);
    let mut paths = Vec::new();
    for number in 0..count {
        let real = &day.new_files[usize::try_from(number)? % day.new_files.len()];
        let name = format!("n{number:05}.mp4");
        // origin/fill/TAG/nNNNNN.mp4 -> ../../new/new-KKKK.mp4
        let target = Path::new("../..").join(real.path.trim_start_matches('/'));
        std::os::unix::fs::symlink(&target, folder.join(&name))?;
        paths.push(ManifestFile {
            path: format!("/fill/{tag}/{name}"),
            ..real.clone()
        });
    }
    Ok(paths)
}

/// The competing writer of nginx's phases: `WRITERS` loops, each downloading its share of
/// `paths` from the origin with curl (capped at its share of `cap_bits_per_s`, 0: no cap)
/// into `dd oflag=direct`, as the fill writes with direct I/O. It runs in a session of its
/// own, so SIGTERM to it ends every curl and dd.
fn writer_script(day: &Day, paths: &[ManifestFile], folder: &Path, cap_bits_per_s: u64) -> String {
    let limit = if cap_bits_per_s > 0 {
        format!("--limit-rate {}", cap_bits_per_s / 8 / WRITERS)
    } else {
        String::new()
    };
    let mut script = String::from("trap 'kill -KILL 0' TERM INT\n");
    for writer in 0..WRITERS {
        script.push('(');
        for (number, file) in (0u64..).zip(paths) {
            if number % WRITERS != writer {
                continue;
            }
            let _ = write!(
                script,
                "curl -sf {limit} '{}' | dd of='{}/{number}.mp4' bs=1M iflag=fullblock \
                 oflag=direct status=none || exit 1; ",
                day.origin.url(&file.path),
                folder.display()
            );
        }
        script.push_str(") &\n");
    }
    script.push_str("wait\n");
    script
}

/// The sum of the sizes of the files in `folder` (0 when it is gone).
fn folder_bytes(folder: &Path) -> u64 {
    std::fs::read_dir(folder)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok()?.metadata().ok())
                .map(|meta| meta.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Samples of the server and what runs beside it at one moment.
struct Sample {
    at: Instant,
    cpu_ticks: f64,
    read_bytes: f64,
    written_bytes: u64,
}

fn sample(server: &Server, beside: &Beside) -> Result<Sample> {
    Ok(Sample {
        at: Instant::now(),
        cpu_ticks: cpu_ticks(server.cpu_pid)?,
        read_bytes: storage_read_bytes(server.cpu_pid)?,
        written_bytes: beside.bytes()?,
    })
}

/// Runs the load client (core 0) with `plan_path`, samples the server when its window opens
/// and closes, and returns the run and notes on what looked wrong.
fn measure_window(
    day: &Day,
    server: &Server,
    plan_path: &Path,
    beside: &mut Beside,
) -> Result<(DayRun, Vec<String>)> {
    let exe = std::env::current_exe()?;
    let child = Launch {
        stop_with_parent: true,
        core: day.pin.then_some(0),
        ..Launch::default()
    }
    .command(exe)
    .args(["day-load", plan_path.to_str().context("plan path")?])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .spawn()
    .context("starting the load client")?;
    let mut client = Guard::new("day-load", child);
    let stdout = client.child().stdout.take().context("load client stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut next_line = |want: &str| -> Result<String> {
        for line in lines.by_ref() {
            let line = line?;
            if line.starts_with(want) {
                return Ok(line);
            }
        }
        bail!("the load client ended before printing {want:?}")
    };
    next_line("window-start")?;
    let start = sample(server, beside)?;
    next_line("window-end")?;
    let end = sample(server, beside)?;
    let mut notes = Vec::new();
    if let Some(cache) = server
        .cgroup
        .as_ref()
        .and_then(|group| group.page_cache_bytes())
    {
        notes.push(format!(
            "{}: {} MiB of page cache charged to its cgroup at the end of the window",
            server.name,
            cache / MIB
        ));
    }
    if !matches!(beside, Beside::Nothing) && !beside.running()? {
        notes.push(format!(
            "{}: the fill or writer ended before the window did (more room: \
             BENCH_DAY_FILL_ROOM_GIB)",
            server.name
        ));
    }
    let result_line = next_line("DAYLOAD ")?;
    let status = client.child().wait()?;
    if !status.success() {
        bail!("the load client failed: {status}");
    }
    let result: Value = serde_json::from_str(&result_line["DAYLOAD ".len()..])?;
    let number = |name: &str| result[name].as_f64().unwrap_or(f64::NAN);
    let window_s = end.at.duration_since(start.at).as_secs_f64();
    let served = number("body_bytes");
    let read = end.read_bytes - start.read_bytes;
    let cpu_s = (end.cpu_ticks - start.cpu_ticks) / day.ticks_per_s;
    let written = end.written_bytes.saturating_sub(start.written_bytes);
    if number("errors") > 0.0 {
        notes.push(format!(
            "{}: {} errors, the first: {}",
            server.name,
            number("errors"),
            result["first_error"]
        ));
    }
    Ok((
        DayRun {
            gbps: number("gbps"),
            rps: number("rps"),
            p50_ms: number("p50_ms"),
            p99_ms: number("p99_ms"),
            p999_ms: number("p999_ms"),
            cpu_s_per_gb: cpu_s / (served / 1e9),
            drive_read_mbps: read / window_s / 1e6,
            hit_share: 1.0 - read / served,
            fill_mbit_per_s: written as f64 * 8.0 / window_s / 1e6,
            errors: number("errors"),
        },
        notes,
    ))
}

/// Reads the origin's real new files so that it serves them from its page cache.
fn warm_files(dir: &Path, files: &[ManifestFile]) -> Result<()> {
    let mut buffer = vec![0u8; usize::try_from(4 * MIB)?];
    for file in files {
        let path = dir.join("origin").join(file.path.trim_start_matches('/'));
        let mut handle = std::fs::File::open(&path)?;
        while handle.read(&mut buffer)? > 0 {}
    }
    Ok(())
}

/// The catalog: titles of 16 to 64 MiB of seeded bytes under `root/day/` until
/// `catalog_bytes`, listed (with SHA-256) in `record`; reused when the record matches.
fn ensure_catalog(root: &Path, record: &Path, settings: &Settings) -> Result<Vec<ManifestFile>> {
    let mut rng = SplitMix64(0x00DA_70F5_E450);
    let mut sizes = Vec::new();
    let mut total = 0;
    while total < settings.catalog_bytes {
        let size = (16 + rng.below(49)) * MIB;
        sizes.push(size);
        total += size;
    }
    let wanted: Vec<(String, u64)> = (0u64..)
        .zip(&sizes)
        .map(|(number, size)| (format!("/day/title-{number:04}.mp4"), *size))
        .collect();
    if let Some(files) = reusable(root, record, &wanted) {
        return Ok(files);
    }
    println!(
        "  generating {} titles ({:.1} GiB) under {} (once; kept for later runs)",
        wanted.len(),
        total as f64 / f64::from(1u32 << 30),
        root.display()
    );
    let _ = std::fs::remove_dir_all(root);
    write_set(root, record, &wanted, 3)
}

/// The origin's real new files (16 of 32 MiB under `root/new/`), listed in `record`.
fn ensure_new_files(root: &Path, record: &Path) -> Result<Vec<ManifestFile>> {
    let wanted: Vec<(String, u64)> = (0..16)
        .map(|number| (format!("/new/new-{number:04}.mp4"), NEW_FILE_BYTES))
        .collect();
    if let Some(files) = reusable(root, record, &wanted) {
        return Ok(files);
    }
    let _ = std::fs::remove_dir_all(root);
    write_set(root, record, &wanted, 4)
}

/// Writes seeded files (path, size) under `root` and their manifest to `record`.
fn write_set(
    root: &Path,
    record: &Path,
    wanted: &[(String, u64)],
    salt: u64,
) -> Result<Vec<ManifestFile>> {
    let mut set = Manifest::default();
    for (number, (path, size)) in (1u64..).zip(wanted) {
        let local = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(local.parent().context("a file has a folder")?)?;
        let sha256 = write_seeded_file(&local, salt << 32 | number, *size)?;
        set.files.push(ManifestFile {
            path: path.clone(),
            size_bytes: *size,
            sha256,
            rank: number,
        });
    }
    set.write(record)?;
    Ok(set.files)
}

/// The files of an earlier run's record, when they are exactly the wanted ones on disk.
fn reusable(root: &Path, record: &Path, wanted: &[(String, u64)]) -> Option<Vec<ManifestFile>> {
    let files = Manifest::from_json(&std::fs::read(record).ok()?)
        .ok()?
        .files;
    let exact = files.len() == wanted.len()
        && files.iter().zip(wanted).all(|(file, (path, size))| {
            let local = root.join(file.path.trim_start_matches('/'));
            let on_disk = std::fs::metadata(local).map(|meta| meta.len()).ok();
            file.path == *path && file.size_bytes == *size && on_disk == Some(*size)
        });
    exact.then_some(files)
}

/// The median of every field over `list` (NaN when empty).
fn median_run(list: &[DayRun]) -> DayRun {
    let pick = |field: fn(&DayRun) -> f64| median_of(list, field);
    DayRun {
        gbps: pick(|run| run.gbps),
        rps: pick(|run| run.rps),
        p50_ms: pick(|run| run.p50_ms),
        p99_ms: pick(|run| run.p99_ms),
        p999_ms: pick(|run| run.p999_ms),
        cpu_s_per_gb: pick(|run| run.cpu_s_per_gb),
        drive_read_mbps: pick(|run| run.drive_read_mbps),
        hit_share: pick(|run| run.hit_share),
        fill_mbit_per_s: pick(|run| run.fill_mbit_per_s),
        errors: pick(|run| run.errors),
    }
}

/// The medians per phase and server into `figures`, the ratios, and a table.
fn summarize(
    runs: &BTreeMap<(&'static str, &'static str), Vec<DayRun>>,
    figures: &mut Map<String, Value>,
) -> String {
    let mut table = String::new();
    let header: String = DayRun::default()
        .fields()
        .iter()
        .map(|(_, label, _, _)| format!("{label:>11}"))
        .collect();
    let _ = writeln!(table, "  {:<11} {:<9}{header}", "phase", "server");
    let mut p99_ours = BTreeMap::new();
    for phase in PHASES {
        let mut medians = BTreeMap::new();
        for server in SERVERS {
            let run = median_run(runs.get(&(phase.name(), server)).map_or(&[], Vec::as_slice));
            let _ = writeln!(table, "  {:<11} {server:<9}{}", phase.name(), run.columns());
            let prefix = format!("{}_{server}", phase.name());
            for (name, _, value, places) in run.fields() {
                let places = i32::try_from(places).unwrap_or(3);
                figures.insert(format!("{prefix}_{name}"), json!(round_to(value, places)));
            }
            medians.insert(server, run);
        }
        let (ours, peer) = (&medians["appliance"], &medians["nginx_aio"]);
        let ratio = ours.gbps / peer.gbps;
        let p99_ratio = peer.p99_ms / ours.p99_ms;
        figures.insert(format!("{}_ratio", phase.name()), json!(round_to(ratio, 3)));
        figures.insert(
            format!("{}_p99_ratio", phase.name()),
            json!(round_to(p99_ratio, 3)),
        );
        let _ = writeln!(
            table,
            "  {:<11} {:<9} throughput x{ratio:.3} of nginx aio, p99 x{p99_ratio:.3} (>1: the \
             appliance is better)",
            phase.name(),
            "ratio"
        );
        p99_ours.insert(phase.name(), ours.p99_ms);
    }
    for phase in ["fill_capped", "fill_full"] {
        let over_idle = p99_ours[phase] / p99_ours["idle"];
        figures.insert(
            format!("p99_{phase}_over_idle"),
            json!(round_to(over_idle, 3)),
        );
        let _ = writeln!(table, "  appliance p99 {phase} over idle: x{over_idle:.3}");
    }
    let _ = writeln!(
        table,
        "  CPU s/GB: the server process only (the appliance's includes its own fill in the \
         fill phases; nginx's writer is curl and dd, outside it). drive MB/s: the server's \
         /proc/PID/io read_bytes; hits: 1 - drive bytes / served bytes"
    );
    table
}
