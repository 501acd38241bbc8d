//! `cargo xtask bench fill`: the drive is the limit. The fill's download-to-drive rate beside
//! what the drive takes (fio: sequential direct writes on the same disk) and what a plain HTTP
//! client gets from the same origin (curl to files, then sync), measured in the same run; the
//! accuracy of the bandwidth cap; and serving latency (p99) while a fill runs.
//!
//! The origin is nginx on loopback serving a generated catalog (kept in
//! target/bench/fill/origin and reused) from its page cache, so the origin is not the limit:
//! the files are read before each measurement and checked to be still cached after it.
//! Nothing is measured while another benchmark (wrk, fio, another `xtask bench` or `xtask
//! test`) runs or other processes keep a core busy; a disturbed measurement is done again.
//! Everything started here is stopped by a guard, on errors too, and the drive files, fio's
//! file and curl's downloads are removed at the end.

use crate::bench::{env_u64, fio_write_once, round_to};
use crate::bench_host::Leftovers;
use crate::util::{self, output, workspace_root};
use anyhow::{bail, Context, Result};
use appliance_testkit::{
    free_port, get, parent_of, pids, write_seeded_file, Config, Ctl, Fill, Guard, Launch, Manifest,
    ManifestFile, Nginx, Serve, SplitMix64,
};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const MIB_F: f64 = 1_048_576.0;
/// Spare room on the drives beyond what they are filled with.
const SPARE_BYTES: u64 = 2 << 30;
/// The cap the cap run asks for: 800 Mbit/s.
const CAP_BITS_PER_S: u64 = 800_000_000;
/// The range every wrk request asks for.
const RANGE_BYTES: u64 = MIB;
/// Longest wait for other benchmarks to finish before measuring anyway.
const QUIET_WAIT_MAX: Duration = Duration::from_secs(1800);
/// Cores other processes may use while a measurement runs before it counts as disturbed.
const FOREIGN_CORES_MAX: f64 = 0.25;
/// Longest a single fill may take.
const FILL_DEADLINE: Duration = Duration::from_secs(900);

fn text(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// What this run measures, from the environment.
struct Settings {
    files: u64,
    file_bytes: u64,
    cap_files: u64,
    new_files: u64,
    /// Downloads at once: the fill's `concurrency` and the number of parallel curls.
    parallel: u64,
    seconds: u64,
    quiet_s: u64,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let files = env_u64("BENCH_FILL_FILES", 64).max(1);
        let file_mib = env_u64("BENCH_FILL_FILE_MIB", 32).max(2);
        Ok(Settings {
            files,
            file_bytes: file_mib * MIB,
            cap_files: env_u64("BENCH_FILL_CAP_FILES", 16).clamp(1, files),
            // Enough that the fill of new files outlasts the serving run (about 400 MiB/s
            // while serving on one core here).
            new_files: env_u64("BENCH_FILL_NEW_FILES", 160).max(1),
            parallel: env_u64("BENCH_FILL_CONCURRENCY", 4).max(1),
            seconds: env_u64("BENCH_FILL_SECONDS", 8).max(1),
            quiet_s: env_u64("BENCH_FILL_QUIET_S", 15),
        })
    }

    fn catalog_bytes(&self) -> u64 {
        self.files * self.file_bytes
    }
}

pub fn fill() -> Result<Map<String, Value>> {
    let settings = Settings::from_env()?;
    ensure_tools()?;
    let applianced = crate::bench_servers::applianced_under_test()?;
    let dir = workspace_root().join("target/bench/fill");
    std::fs::create_dir_all(&dir)?;
    let _cleanup = cleanup(&dir);
    let pin = std::thread::available_parallelism().map_or(1, usize::from) >= 2;
    let ticks_per_s: f64 = output("getconf", &["CLK_TCK"])?
        .trim()
        .parse()
        .context("getconf CLK_TCK")?;
    let mut notes: Vec<String> = Vec::new();

    // The origin: the catalog, a manifest for the cap run, new files for the fill during serving.
    let origin_root = dir.join("origin");
    let catalog = ensure_set(
        &origin_root,
        "title",
        1,
        settings.files,
        settings.file_bytes,
    )?;
    let cap_set = &catalog[..usize::try_from(settings.cap_files)?];
    ranked(cap_set).write(&origin_root.join("manifest-cap.json"))?;
    let new_set = ensure_set(
        &origin_root,
        "new",
        2,
        settings.new_files,
        settings.file_bytes,
    )?;
    // The next night's manifest: the catalog and the new files. The catalog stays listed so
    // that the fill deletes nothing that wrk is requesting; only the new files are fetched.
    let next_set: Vec<ManifestFile> = catalog.iter().chain(&new_set).cloned().collect();
    ranked(&next_set).write(&origin_root.join("manifest-next.json"))?;
    let origin = start_origin(&dir, &origin_root)?;
    let hot: Vec<PathBuf> = next_set
        .iter()
        .map(|file| local(&origin_root, file))
        .collect();
    println!(
        "  origin: nginx on 127.0.0.1:{} (worker pid {}); its {:.1} GiB of files are read \
         before each measurement so that it serves them from the page cache",
        origin.port,
        origin.worker_pid(),
        (settings.catalog_bytes() + settings.new_files * settings.file_bytes) as f64
            / f64::from(1u32 << 30)
    );
    let mut quiet = Quiet::new(settings.quiet_s, hot, ticks_per_s);

    // 1. Our fill of the whole catalog into a fresh, preallocated drive, with room for the
    // new files of the fill during serving too (beyond its spare 2 GiB).
    let new_bytes = settings.new_files * settings.file_bytes;
    let drive = dir.join("drive0.img");
    let state = dir.join("state0");
    let fill_config = dir.join("fill.toml");
    let main_manifest = origin.url("/manifest.json");
    let (ours, fill_watch) = quiet.measure("fill", true, &mut notes, || {
        prepare_fill(
            &applianced,
            (&drive, &state, &fill_config),
            settings.catalog_bytes() + new_bytes + SPARE_BYTES,
            fill_settings(&main_manifest, &origin.url(""), settings.parallel, 0),
        )?;
        timed_fill(
            &applianced,
            &fill_config,
            &dir,
            "fill",
            origin.worker_pid(),
            ticks_per_s,
        )
    })?;
    check_fill_report(
        "fill",
        &ours.report,
        settings.files,
        settings.catalog_bytes(),
    )?;
    let fill_mib_per_s = settings.catalog_bytes() as f64 / ours.seconds / MIB_F;
    println!(
        "  fill: {} files, {:.0} MiB in {:.2} s: {fill_mib_per_s:.0} MiB/s",
        settings.files,
        settings.catalog_bytes() as f64 / MIB_F,
        ours.seconds
    );

    // Correctness once: every extent's CRC on the filled drive (the daemon is not running).
    let started = Instant::now();
    let verified = output(
        text(&applianced)?,
        &[
            "store",
            "--drive",
            text(&drive)?,
            "--state-dir",
            text(&state)?,
            "verify",
        ],
    )
    .context("applianced store verify after the fill")?;
    println!(
        "  store verify: {} ({:.1} s)",
        verified.lines().last().unwrap_or("").trim(),
        started.elapsed().as_secs_f64()
    );

    // 2. fio: sequential direct writes of the same amount on the same disk.
    let fio_file = dir.join("fio.img");
    let (fio_mib_per_s, _) = quiet.measure("fio", true, &mut notes, || {
        fio_write_once(&fio_file, settings.catalog_bytes())
    })?;
    let _ = std::fs::remove_file(&fio_file);
    println!("  fio: {fio_mib_per_s:.0} MiB/s");

    // 3. curl: the same files from the same origin into plain files, then sync.
    let curl_dir = dir.join("curl");
    let (curl_seconds, _) = quiet.measure("curl", true, &mut notes, || {
        curl_all(&curl_dir, &origin, &catalog, settings.parallel)
    })?;
    let _ = std::fs::remove_dir_all(&curl_dir);
    let curl_mib_per_s = settings.catalog_bytes() as f64 / curl_seconds / MIB_F;
    println!(
        "  curl ({} in parallel, then sync): {curl_seconds:.2} s: \
         {curl_mib_per_s:.0} MiB/s",
        settings.parallel
    );

    // 4. The cap: the first files into a fresh drive at 800 Mbit/s.
    let cap_bytes = settings.cap_files * settings.file_bytes;
    let cap_drive = dir.join("drive-cap.img");
    let cap_state = dir.join("state-cap");
    let cap_config = dir.join("fill-cap.toml");
    let cap_manifest = origin.url("/manifest-cap.json");
    let (capped, _) = quiet.measure("capped fill", true, &mut notes, || {
        prepare_fill(
            &applianced,
            (&cap_drive, &cap_state, &cap_config),
            cap_bytes + SPARE_BYTES,
            fill_settings(
                &cap_manifest,
                &origin.url(""),
                settings.parallel,
                CAP_BITS_PER_S,
            ),
        )?;
        timed_fill(
            &applianced,
            &cap_config,
            &dir,
            "fill-cap",
            origin.worker_pid(),
            ticks_per_s,
        )
    })?;
    check_fill_report("capped fill", &capped.report, settings.cap_files, cap_bytes)?;
    // The fixed cost of a fill (start, store open, manifest, plan, checkpoint, exit): the
    // same command again, with everything already held.
    let noop = timed_fill(
        &applianced,
        &cap_config,
        &dir,
        "fill-noop",
        origin.worker_pid(),
        ticks_per_s,
    )?;
    if noop.report["files_planned"].as_u64() != Some(0) {
        notes.push(format!(
            "a second fill of the capped set planned fetches: {}",
            noop.report
        ));
    }
    let _ = std::fs::remove_file(&cap_drive);
    let capped_bits_per_s = cap_bytes as f64 * 8.0 / capped.seconds;
    let cap_accuracy = capped_bits_per_s / CAP_BITS_PER_S as f64;
    // Until "fill finished" in the log, less the same for a fill that fetches nothing: the
    // transfer alone (to the poll's 50 ms).
    let transfer_s =
        capped.finished_at_s.unwrap_or(capped.seconds) - noop.finished_at_s.unwrap_or(noop.seconds);
    let transfer_bits_per_s = cap_bytes as f64 * 8.0 / transfer_s;
    println!(
        "  capped fill: {:.0} MiB in {:.2} s: {:.1} Mbit/s of {:.0} (x{cap_accuracy:.3})",
        cap_bytes as f64 / MIB_F,
        capped.seconds,
        capped_bits_per_s / 1e6,
        CAP_BITS_PER_S as f64 / 1e6,
    );
    println!(
        "  a fill with nothing to fetch takes {:.2} s ({:.2} s of it after \"fill finished\"); \
         without that fixed cost the capped transfer ran at {:.1} Mbit/s",
        noop.seconds,
        noop.seconds - noop.finished_at_s.unwrap_or(noop.seconds),
        transfer_bits_per_s / 1e6
    );

    // 5. Serving latency on the filled drive, idle and while a fill of new files runs.
    let serve_config = dir.join("serve.toml");
    let new_manifest = origin.url("/manifest-next.json");
    let mut serve_attempts = 0;
    let ((idle, during, progress), _) = quiet.measure("serving", true, &mut notes, || {
        serve_attempts += 1;
        if serve_attempts > 1 {
            // The last attempt filled the new files: start again from the catalog alone.
            fresh_drive(
                &applianced,
                &drive,
                settings.catalog_bytes() + new_bytes + SPARE_BYTES,
            )?;
            fresh_dir(&state)?;
            output(
                text(&applianced)?,
                &["fill", "--config", text(&fill_config)?],
            )
            .context("refilling the drive for another serving attempt")?;
        }
        serve_phase(&ServePhase {
            applianced: &applianced,
            dir: &dir,
            drive: &drive,
            state: &state,
            config: &serve_config,
            origin: &origin,
            main_manifest: &main_manifest,
            new_manifest: &new_manifest,
            settings: &settings,
            catalog: &catalog,
            pin,
        })
    })?;
    notes.extend(progress.notes.iter().cloned());
    drop(origin);

    let mut figures = Map::new();
    let ratio = fill_mib_per_s / fio_mib_per_s;
    let curl_ratio = fill_mib_per_s / curl_mib_per_s;
    figures.insert("fill_mib_per_s".into(), json!(fill_mib_per_s.round()));
    figures.insert("fio_mib_per_s".into(), json!(fio_mib_per_s.round()));
    figures.insert("curl_mib_per_s".into(), json!(curl_mib_per_s.round()));
    figures.insert("ratio".into(), json!(round_to(ratio, 3)));
    figures.insert("curl_ratio".into(), json!(round_to(curl_ratio, 3)));
    figures.insert("fill_seconds".into(), json!(round_to(ours.seconds, 3)));
    figures.insert(
        "fill_cpu_cores".into(),
        json!(round_to(ours.cpu_s / ours.seconds, 2)),
    );
    figures.insert(
        "origin_cpu_cores".into(),
        json!(round_to(ours.origin_cpu_s / ours.seconds, 2)),
    );
    figures.insert(
        "fill_context_switches_per_mib".into(),
        json!((ours.context_switches as f64 / (settings.catalog_bytes() as f64 / MIB_F)).round()),
    );
    figures.insert("cap_bits_per_s".into(), json!(CAP_BITS_PER_S));
    figures.insert("capped_bits_per_s".into(), json!(capped_bits_per_s.round()));
    figures.insert("cap_accuracy".into(), json!(round_to(cap_accuracy, 3)));
    figures.insert("fill_noop_seconds".into(), json!(round_to(noop.seconds, 3)));
    figures.insert(
        "capped_transfer_bits_per_s".into(),
        json!(transfer_bits_per_s.round()),
    );
    figures.insert("serve_p99_ms_idle".into(), json!(round_to(idle.p99_ms, 2)));
    figures.insert(
        "serve_p99_ms_during_fill".into(),
        json!(round_to(during.p99_ms, 2)),
    );
    figures.insert(
        "serve_p99_ratio".into(),
        json!(round_to(idle.p99_ms / during.p99_ms, 3)),
    );
    figures.insert("serve_p50_ms_idle".into(), json!(round_to(idle.p50_ms, 2)));
    figures.insert(
        "serve_p50_ms_during_fill".into(),
        json!(round_to(during.p50_ms, 2)),
    );
    figures.insert("serve_rps_idle".into(), json!(idle.rps.round()));
    figures.insert("serve_rps_during_fill".into(), json!(during.rps.round()));
    figures.insert(
        "fill_mib_per_s_while_serving".into(),
        json!(progress.mib_per_s.round()),
    );
    figures.insert(
        "fill_share_of_serve_run".into(),
        json!(round_to(progress.covered_share, 3)),
    );
    figures.insert("files".into(), json!(settings.files));
    figures.insert("file_bytes".into(), json!(settings.file_bytes));
    figures.insert("catalog_bytes".into(), json!(settings.catalog_bytes()));
    figures.insert("parallel_downloads".into(), json!(settings.parallel));
    figures.insert("waited_for_others_s".into(), json!(quiet.waited.as_secs()));

    print_summary(&Summary {
        settings: &settings,
        fill_mib_per_s,
        fio_mib_per_s,
        curl_mib_per_s,
        capped_bits_per_s,
        cap_accuracy,
        idle: &idle,
        during: &during,
        progress: &progress,
        ours: &ours,
        fill_watch: &fill_watch,
        quiet: &quiet,
        notes: &notes,
        pin,
    });
    Ok(figures)
}

/// Fails with an apt-get hint when a tool is missing.
fn ensure_tools() -> Result<()> {
    let tools = [
        ("nginx", "nginx"),
        ("fio", "fio"),
        ("wrk", "wrk"),
        ("curl", "curl"),
        ("taskset", "util-linux"),
        ("fallocate", "util-linux"),
        ("top", "procps"),
    ];
    let missing: BTreeSet<&str> = tools
        .iter()
        .filter(|(tool, _)| !util::have(tool))
        .map(|(_, package)| *package)
        .collect();
    if !missing.is_empty() {
        let list: Vec<&str> = missing.into_iter().collect();
        bail!(
            "bench fill needs: apt-get install {} (as root)",
            list.join(" ")
        );
    }
    Ok(())
}

/// The big files of the run, removed when dropped (the catalog under origin/ stays).
fn cleanup(dir: &Path) -> Leftovers {
    let names = [
        "drive0.img",
        "drive-cap.img",
        "fio.img",
        "curl",
        "state0",
        "state-cap",
    ];
    Leftovers::new(names.iter().map(|name| dir.join(name)).collect())
}

/// Where the origin keeps the file of a manifest row (`/fill/title-0000.mp4`).
fn local(root: &Path, file: &ManifestFile) -> PathBuf {
    root.join(file.path.trim_start_matches('/'))
}

/// The manifest of `files`, ranked in their order.
fn ranked(files: &[ManifestFile]) -> Manifest {
    let files = files
        .iter()
        .zip(1u64..)
        .map(|(file, rank)| ManifestFile {
            rank,
            ..file.clone()
        })
        .collect();
    Manifest {
        files,
        ..Manifest::default()
    }
}

/// `count` files of `file_bytes` seeded bytes named `/fill/PREFIX-NNNN.mp4` under `root`,
/// with `root/manifest[-PREFIX].json`; reused when the manifest and the sizes match.
fn ensure_set(
    root: &Path,
    prefix: &str,
    salt: u64,
    count: u64,
    file_bytes: u64,
) -> Result<Vec<ManifestFile>> {
    let manifest = if prefix == "title" {
        root.join("manifest.json")
    } else {
        root.join(format!("manifest-{prefix}.json"))
    };
    let wanted: Vec<String> = (0..count)
        .map(|number| format!("/fill/{prefix}-{number:04}.mp4"))
        .collect();
    if let Some(files) = reusable(root, &manifest, &wanted, file_bytes) {
        return Ok(files);
    }
    println!(
        "  generating {count} files of {} MiB under {} (once; kept for later runs)",
        file_bytes / MIB,
        root.join("fill").display()
    );
    std::fs::create_dir_all(root.join("fill"))?;
    let mut set = Manifest::default();
    for (number, path) in (0u64..).zip(&wanted) {
        let local = root.join(path.trim_start_matches('/'));
        let sha256 = write_seeded_file(&local, salt << 32 | (number + 1), file_bytes)?;
        set.files.push(ManifestFile {
            path: path.clone(),
            size_bytes: file_bytes,
            sha256,
            rank: number + 1,
        });
    }
    set.write(&manifest)?;
    Ok(set.files)
}

/// The files of an earlier run's manifest, when they are exactly the wanted ones.
fn reusable(
    root: &Path,
    manifest: &Path,
    wanted: &[String],
    file_bytes: u64,
) -> Option<Vec<ManifestFile>> {
    let files = Manifest::from_json(&std::fs::read(manifest).ok()?)
        .ok()?
        .files;
    let exact = files.len() == wanted.len()
        && files.iter().zip(wanted).all(|(file, path)| {
            let on_disk = std::fs::metadata(local(root, file)).map(|meta| meta.len());
            file.path == *path && file.size_bytes == file_bytes && on_disk.ok() == Some(file_bytes)
        });
    exact.then_some(files)
}

/// Reads every file once so that the origin serves them from the page cache.
fn warm_files(paths: &[PathBuf]) -> Result<()> {
    let mut buffer = vec![0u8; usize::try_from(4 * MIB)?];
    for path in paths {
        let mut handle = std::fs::File::open(path)?;
        while handle.read(&mut buffer)? > 0 {}
    }
    Ok(())
}

/// The share of the files' bytes in the page cache (fincore), when fincore is there.
fn resident_share(paths: &[PathBuf]) -> Option<f64> {
    let mut args = vec!["-b", "-n", "-o", "RES,SIZE"];
    for path in paths {
        args.push(path.to_str()?);
    }
    let text = output("fincore", &args).ok()?;
    let (mut resident, mut size) = (0.0, 0.0);
    for line in text.lines() {
        let mut words = line.split_whitespace();
        resident += words.next()?.parse::<f64>().ok()?;
        size += words.next()?.parse::<f64>().ok()?;
    }
    (size > 0.0).then(|| resident / size)
}

/// GETs every file once through the appliance (its page cache then holds them).
fn warm_served(port: u16, files: &[ManifestFile]) -> Result<()> {
    for file in files {
        let response = get(port, &file.path, None)?;
        if response.status != 200 || response.body.len() as u64 != file.size_bytes {
            bail!(
                "warm-up GET {} answered {} with {} bytes",
                file.path,
                response.status,
                response.body.len()
            );
        }
    }
    Ok(())
}

/// How the benchmarks start their children: stopped if this process dies without running its
/// guards, and on `core` when given.
pub(crate) fn launch(core: Option<usize>) -> Launch {
    Launch {
        stop_with_parent: true,
        core,
        ..Launch::default()
    }
}

/// nginx serving `root` on loopback from the folder `dir/nginx` (emptied first), as the origin.
pub(crate) fn start_origin(dir: &Path, root: &Path) -> Result<Nginx> {
    let prefix = dir.join("nginx");
    let _ = std::fs::remove_dir_all(&prefix);
    Nginx::builder(&prefix, root)
        .launch(launch(None))
        .start()
        .context("starting nginx as the origin")
}

fn fresh_dir(path: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(path);
    std::fs::create_dir_all(path)?;
    Ok(())
}

/// A sparse drive file, formatted with 256 MiB segments, then preallocated as fio does.
fn fresh_drive(applianced: &Path, path: &Path, size_bytes: u64) -> Result<()> {
    let _ = std::fs::remove_file(path);
    std::fs::File::create(path)?.set_len(size_bytes)?;
    output(
        text(applianced)?,
        &["format", "--segment-mib", "256", text(path)?],
    )?;
    // Format punched the segment area; preallocate it again.
    output("fallocate", &["-l", &size_bytes.to_string(), text(path)?])?;
    Ok(())
}

fn fill_settings(manifest: &str, source: &str, parallel: u64, bandwidth_bits_per_s: u64) -> Fill {
    Fill {
        manifest: Some(manifest.to_string()),
        sources: vec![source.to_string()],
        concurrency: Some(parallel),
        bandwidth_bits_per_s: (bandwidth_bits_per_s > 0).then_some(bandwidth_bits_per_s),
        ..Fill::default()
    }
}

/// Makes `drive` a fresh drive of `size_bytes` and `state` an empty folder, and writes to
/// `config` the configuration of a fill with `fill` into them.
fn prepare_fill(
    applianced: &Path,
    (drive, state, config): (&Path, &Path, &Path),
    size_bytes: u64,
    fill: Fill,
) -> Result<()> {
    fresh_drive(applianced, drive, size_bytes)?;
    fresh_dir(state)?;
    fill_config_of(drive, state, fill).write(config)?;
    Ok(())
}

/// A config with one drive and `fill`, and a control socket of its own in `state` (the
/// default one may belong to another appliance here).
fn fill_config_of(drive: &Path, state: &Path, fill: Fill) -> Config {
    Config {
        state_dir: Some(state.to_path_buf()),
        control_socket: Some(state.join("control.sock")),
        fill,
        ..Config::new(&[drive])
    }
}

/// utime + stime in clock ticks from a /proc/.../stat line, and the name in parentheses.
fn stat_ticks(path: &Path) -> Option<(String, f64)> {
    let line = std::fs::read_to_string(path).ok()?;
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let name = line.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = line.get(close + 1..)?.split_whitespace().collect();
    // After the name, field 3 (state) comes first: utime and stime are at 11 and 12.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((name, utime + stime))
}

fn process_ticks(pid: u32) -> f64 {
    stat_ticks(Path::new(&format!("/proc/{pid}/stat"))).map_or(0.0, |(_, ticks)| ticks)
}

/// Ticks of every thread of `pid`, by thread id (name, ticks).
fn thread_ticks(pid: u32) -> BTreeMap<u64, (String, f64)> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return BTreeMap::new();
    };
    entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let tid: u64 = entry.file_name().to_str()?.parse().ok()?;
            let sample = stat_ticks(&entry.path().join("stat"))?;
            Some((tid, sample))
        })
        .collect()
}

/// Voluntary plus involuntary context switches of one thread so far.
fn context_switches(pid: u32, tid: u64) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
    let count = status
        .lines()
        .filter_map(|line| {
            let rest = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))?;
            rest.trim().parse::<u64>().ok()
        })
        .sum();
    Some(count)
}

/// Bytes the process has written to storage so far (/proc/PID/io write_bytes).
fn written_bytes(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("write_bytes:"))?
        .trim()
        .parse()
        .ok()
}

/// One second of a fill as seen from outside: CPU cores busy and MiB/s written to storage.
struct Tick {
    at_s: f64,
    cpu_cores: f64,
    write_mib_per_s: f64,
}

/// One timed `applianced fill`.
struct FillRun {
    seconds: f64,
    report: Value,
    cpu_s: f64,
    origin_cpu_s: f64,
    /// CPU seconds and thread count by thread name, busiest first.
    threads: Vec<(String, f64, u64)>,
    /// Voluntary and involuntary context switches of its threads (sampled every 250 ms).
    context_switches: u64,
    timeline: Vec<Tick>,
    /// `top -H` of the fill's threads, taken once while it ran.
    top: String,
    /// When the fill logged "fill finished" (seconds from the start), as polled.
    finished_at_s: Option<f64>,
}

fn timed_fill(
    applianced: &Path,
    config: &Path,
    dir: &Path,
    label: &str,
    origin_worker: u32,
    ticks_per_s: f64,
) -> Result<FillRun> {
    let stdout_path = dir.join(format!("{label}.out"));
    let log_path = dir.join(format!("{label}.log"));
    let origin_before = process_ticks(origin_worker);
    let started = Instant::now();
    let child = launch(None)
        .command(applianced)
        .args(["fill", "--config", text(config)?])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path)?)
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()
        .context("starting applianced fill")?;
    let mut process = Guard::new("applianced fill", child);
    let pid = process.pid();
    let mut threads: BTreeMap<u64, (String, f64)> = BTreeMap::new();
    let mut switches: BTreeMap<u64, u64> = BTreeMap::new();
    let mut polls = 0u64;
    let mut timeline = Vec::new();
    let mut top = String::new();
    let mut finished_at_s = None;
    let mut last = (0.0f64, 0.0f64, written_bytes(pid).unwrap_or(0));
    let status = loop {
        if let Some(status) = process.child().try_wait()? {
            break status;
        }
        let now_s = started.elapsed().as_secs_f64();
        if started.elapsed() > FILL_DEADLINE {
            process.stop(Duration::from_secs(15))?;
            bail!(
                "{label}: applianced fill ran past {} s; see {}",
                FILL_DEADLINE.as_secs(),
                log_path.display()
            );
        }
        let sample = thread_ticks(pid);
        polls += 1;
        if polls.is_multiple_of(5) {
            for tid in sample.keys() {
                if let Some(count) = context_switches(pid, *tid) {
                    switches.insert(*tid, count);
                }
            }
        }
        if !sample.is_empty() {
            threads.extend(sample);
            let ticks: f64 = threads.values().map(|(_, ticks)| ticks).sum();
            if now_s - last.0 >= 1.0 {
                let written = written_bytes(pid).unwrap_or(last.2);
                let span = now_s - last.0;
                timeline.push(Tick {
                    at_s: now_s,
                    cpu_cores: (ticks - last.1) / ticks_per_s / span,
                    write_mib_per_s: written.saturating_sub(last.2) as f64 / MIB_F / span,
                });
                last = (now_s, ticks, written);
            }
        }
        if finished_at_s.is_none()
            && std::fs::read_to_string(&log_path).is_ok_and(|log| log.contains("fill finished"))
        {
            finished_at_s = Some(now_s);
        }
        if top.is_empty() && now_s >= 1.5 {
            top = output("top", &["-b", "-n1", "-H", "-p", &pid.to_string()]).unwrap_or_default();
            let whole = output("top", &["-b", "-n1"]).unwrap_or_default();
            std::fs::write(
                dir.join(format!("{label}-top.txt")),
                format!("{top}\n{whole}"),
            )?;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let seconds = started.elapsed().as_secs_f64();
    let origin_cpu_s = (process_ticks(origin_worker) - origin_before) / ticks_per_s;
    let stdout = std::fs::read_to_string(&stdout_path)?;
    let report: Value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    if !status.success() {
        bail!(
            "{label}: applianced fill failed ({status}); report: {report}; see {}",
            log_path.display()
        );
    }
    let mut by_name: BTreeMap<String, (f64, u64)> = BTreeMap::new();
    for (name, ticks) in threads.values() {
        let entry = by_name.entry(name.clone()).or_default();
        entry.0 += ticks / ticks_per_s;
        entry.1 += 1;
    }
    let cpu_s = by_name.values().map(|(seconds, _)| seconds).sum();
    let mut threads: Vec<(String, f64, u64)> = by_name
        .into_iter()
        .map(|(name, (seconds, count))| (name, seconds, count))
        .collect();
    threads.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(FillRun {
        seconds,
        report,
        cpu_s,
        origin_cpu_s,
        threads,
        timeline,
        top,
        finished_at_s,
        context_switches: switches.values().sum(),
    })
}

/// The fill report must say: every file fetched, nothing failed, the right byte count.
fn check_fill_report(label: &str, report: &Value, files: u64, bytes: u64) -> Result<()> {
    let fetched = report["files_fetched"].as_u64();
    let failed = report["files_failed"].as_u64();
    let fetched_bytes = report["bytes_fetched"].as_u64();
    if fetched != Some(files) || failed != Some(0) || fetched_bytes != Some(bytes) {
        bail!(
            "{label}: wanted {files} files and {bytes} bytes fetched, none failed; the report \
             says {report}"
        );
    }
    Ok(())
}

/// Downloads every file with `parallel` curls at once into `into`, then syncs; returns seconds.
fn curl_all(into: &Path, origin: &Nginx, files: &[ManifestFile], parallel: u64) -> Result<f64> {
    fresh_dir(into)?;
    let next = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let mut workers = Vec::new();
        for _ in 0..parallel {
            workers.push(scope.spawn(|| -> Result<()> {
                loop {
                    let number = usize::try_from(next.fetch_add(1, Ordering::SeqCst))?;
                    let Some(file) = files.get(number) else {
                        return Ok(());
                    };
                    let name = file.path.rsplit('/').next().unwrap_or("file");
                    let target = into.join(name);
                    output(
                        "curl",
                        &["-s", "-f", "-o", text(&target)?, &origin.url(&file.path)],
                    )?;
                    let got = std::fs::metadata(&target)?.len();
                    if got != file.size_bytes {
                        bail!(
                            "curl {}: {got} bytes, wanted {}",
                            file.path,
                            file.size_bytes
                        );
                    }
                }
            }));
        }
        for worker in workers {
            worker.join().expect("curl worker")?;
        }
        Ok(())
    })?;
    output("sync", &[])?;
    Ok(started.elapsed().as_secs_f64())
}

/// Waits until no other benchmark runs and other processes leave the cores alone, and watches
/// for both while a phase measures.
struct Quiet {
    /// How long no other benchmark must be seen before measuring.
    quiet_s: u64,
    /// The origin's files: read before each measurement, and checked to be still in the page
    /// cache after it (another benchmark may drop the caches).
    hot: Vec<PathBuf>,
    ticks_per_s: f64,
    waited: Duration,
    /// Phases during which another benchmark was seen, with what was seen.
    disturbed: Vec<String>,
    /// Phases that waited, and how long.
    waits: Vec<String>,
}

impl Quiet {
    fn new(quiet_s: u64, hot: Vec<PathBuf>, ticks_per_s: f64) -> Quiet {
        Quiet {
            quiet_s,
            ticks_per_s,
            hot,
            waited: Duration::ZERO,
            disturbed: Vec::new(),
            waits: Vec::new(),
        }
    }

    /// Waits until no other benchmark has been seen for `quiet_s` seconds.
    fn wait(&mut self, phase: &str) {
        let started = Instant::now();
        let mut announced = false;
        let mut quiet_since = Instant::now();
        loop {
            let mut others = other_benchmarks();
            if others.is_empty() {
                // Other work that is no benchmark (a build, a VM) takes cores all the same.
                let before = foreign_ticks();
                std::thread::sleep(Duration::from_secs(2));
                let (cores, busiest) =
                    foreign_load(&before, &foreign_ticks(), 2.0, self.ticks_per_s);
                if cores > FOREIGN_CORES_MAX {
                    others.push(format!(
                        "other processes using {cores:.2} cores ({busiest})"
                    ));
                }
            }
            if others.is_empty() {
                // Nothing seen at all: go at once; after a wait: only once quiet for a while.
                if !announced || quiet_since.elapsed() >= Duration::from_secs(self.quiet_s) {
                    break;
                }
            } else {
                if !announced {
                    println!(
                        "  {phase}: waiting for other benchmarks to finish: {}",
                        others.join(", ")
                    );
                    announced = true;
                }
                quiet_since = Instant::now();
            }
            if started.elapsed() > QUIET_WAIT_MAX {
                println!(
                    "  {phase}: still not quiet after {} s; measuring anyway",
                    QUIET_WAIT_MAX.as_secs()
                );
                self.disturbed.push(format!(
                    "{phase}: measured after waiting {} s without the others finishing",
                    QUIET_WAIT_MAX.as_secs()
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        if announced {
            let waited = started.elapsed();
            self.waited += waited;
            self.waits
                .push(format!("{phase}: {:.0} s", waited.as_secs_f64()));
        }
    }

    /// Runs `measure` once quiet, watching for other benchmarks meanwhile; a disturbed
    /// measurement is done again (twice at most) and noted if it stays disturbed.
    fn measure<T>(
        &mut self,
        phase: &str,
        retry: bool,
        notes: &mut Vec<String>,
        mut measure: impl FnMut() -> Result<T>,
    ) -> Result<(T, Vec<String>)> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.wait(phase);
            warm_files(&self.hot)?;
            let watch = Watch::start();
            let load_before = foreign_ticks();
            let started = Instant::now();
            let result = measure();
            let (cores, busiest) = foreign_load(
                &load_before,
                &foreign_ticks(),
                started.elapsed().as_secs_f64(),
                self.ticks_per_s,
            );
            let mut seen = watch.finish();
            let value = result?;
            if cores > FOREIGN_CORES_MAX {
                seen.push(format!(
                    "other processes used {cores:.2} cores meanwhile ({busiest})"
                ));
            }
            if let Some(share) = resident_share(&self.hot).filter(|share| *share < 0.99) {
                seen.push(format!(
                    "the origin's files left the page cache ({:.0}% resident after)",
                    share * 100.0
                ));
            }
            if seen.is_empty() {
                return Ok((value, seen));
            }
            let line = format!(
                "{phase} (attempt {attempt}): other benchmarks ran meanwhile: {}",
                seen.join(", ")
            );
            println!("  {line}");
            if attempt >= 3 || !retry {
                self.disturbed.push(line.clone());
                notes.push(line);
                return Ok((value, seen));
            }
        }
    }
}

/// A thread that records other benchmarks seen running, once a second.
struct Watch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<BTreeSet<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watch {
    fn start() -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let (flag, record) = (Arc::clone(&stop), Arc::clone(&seen));
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                let others = other_benchmarks();
                if !others.is_empty() {
                    let mut record = record.lock().unwrap_or_else(|poison| poison.into_inner());
                    record.extend(others);
                }
                for _ in 0..10 {
                    if flag.load(Ordering::SeqCst) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        });
        Watch {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let seen = self
            .seen
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        seen.iter().cloned().collect()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `wrk`, `fio`, `xtask bench` and `xtask test` processes that are not this one or its
/// descendants.
fn other_benchmarks() -> Vec<String> {
    let me = std::process::id();
    let mut found = Vec::new();
    for pid in pids().into_iter().filter(|pid| *pid != me) {
        let proc_dir = Path::new("/proc").join(pid.to_string());
        let comm = std::fs::read_to_string(proc_dir.join("comm")).unwrap_or_default();
        let comm = comm.trim();
        let is_benchmark = match comm {
            "wrk" | "fio" => true,
            "xtask" => std::fs::read(proc_dir.join("cmdline"))
                .map(|line| {
                    let words: Vec<&[u8]> = line.split(|byte| *byte == 0).collect();
                    let word = words.get(1).copied().unwrap_or_default();
                    word == b"bench" || word == b"test"
                })
                .unwrap_or(false),
            _ => false,
        };
        if is_benchmark && !descends_from(pid, me) {
            found.push(format!("{comm} (pid {pid})"));
        }
    }
    found
}

/// CPU ticks by pid of every process that is not this one, one of its descendants or a
/// kernel thread (name, ticks).
fn foreign_ticks() -> BTreeMap<u32, (String, f64)> {
    let me = std::process::id();
    // pid 2 is kthreadd, the parent of every kernel thread.
    let foreign = |pid: &u32| {
        *pid != me && *pid != 2 && parent_of(*pid) != Some(2) && !descends_from(*pid, me)
    };
    pids()
        .into_iter()
        .filter(foreign)
        .filter_map(|pid| {
            Some((
                pid,
                stat_ticks(&Path::new("/proc").join(pid.to_string()).join("stat"))?,
            ))
        })
        .collect()
}

/// Cores other processes used between two `foreign_ticks` snapshots `seconds` apart, and the
/// busiest of them. A process seen only at the end counts with all its time.
fn foreign_load(
    before: &BTreeMap<u32, (String, f64)>,
    after: &BTreeMap<u32, (String, f64)>,
    seconds: f64,
    ticks_per_s: f64,
) -> (f64, String) {
    let mut used: Vec<(f64, &str)> = after
        .iter()
        .map(|(pid, (name, ticks))| {
            let earlier = before.get(pid).map_or(0.0, |(_, ticks)| *ticks);
            (
                (ticks - earlier) / ticks_per_s / seconds.max(0.001),
                name.as_str(),
            )
        })
        .filter(|(cores, _)| *cores > 0.0)
        .collect();
    used.sort_by(|a, b| b.0.total_cmp(&a.0));
    let total = used.iter().map(|(cores, _)| cores).sum();
    let busiest: Vec<String> = used
        .iter()
        .take(3)
        .map(|(cores, name)| format!("{name} {cores:.2}"))
        .collect();
    (total, busiest.join(", "))
}

/// True when `me` is `pid`'s parent, grandparent, ...
fn descends_from(pid: u32, me: u32) -> bool {
    let mut current = pid;
    for _ in 0..32 {
        match parent_of(current) {
            Some(parent) if parent == me => return true,
            Some(parent) if parent > 1 => current = parent,
            _ => return false,
        }
    }
    false
}

/// What one wrk run measured.
#[derive(Clone, Debug, Default)]
struct WrkRun {
    p50_ms: f64,
    p99_ms: f64,
    rps: f64,
    requests: f64,
    errors: f64,
    bytes_per_response: f64,
}

/// The wrk script: a random stored file and a random 4 KiB-aligned 1 MiB range per request
/// (LuaJIT: no `//`, so math.floor).
fn write_script(dir: &Path, files: u64, file_bytes: u64) -> Result<PathBuf> {
    let path = dir.join("ranges.lua");
    let script = format!(
        r#"-- Generated by cargo xtask bench fill
local files = {files}
local size = {file_bytes}
local range = {RANGE_BYTES}
local slots = math.floor((size - range) / 4096)
math.randomseed(7)

request = function()
  local path = string.format("/fill/title-%04d.mp4", math.random(0, files - 1))
  local first = math.random(0, slots) * 4096
  local header = string.format("bytes=%d-%d", first, first + range - 1)
  return wrk.format("GET", path, {{ ["Range"] = header }})
end

{hook}"#,
        hook = crate::wrk::SUMMARY_HOOK
    );
    std::fs::write(&path, script)?;
    Ok(path)
}

/// wrk (16 connections, one thread) against `port`, pinned to core 0 when `pin`.
struct WrkChild {
    process: Guard,
    out_path: PathBuf,
    deadline: Instant,
}

fn start_wrk(port: u16, seconds: u64, script: &Path, pin: bool, label: &str) -> Result<WrkChild> {
    let mut command = launch(pin.then_some(0)).command("wrk");
    let out_path = script.with_file_name(format!("wrk-{label}.out"));
    let out = std::fs::File::create(&out_path)?;
    command
        .args([
            "--latency",
            "-t1",
            "-c16",
            "-d",
            &format!("{seconds}s"),
            "--timeout",
            "10s",
            "-s",
            text(script)?,
            &format!("http://127.0.0.1:{port}/"),
        ])
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let child = command.spawn().context("starting wrk")?;
    Ok(WrkChild {
        process: Guard::new("wrk", child),
        out_path,
        deadline: Instant::now() + Duration::from_secs(seconds + 60),
    })
}

impl WrkChild {
    /// None while running; the result once wrk ended.
    fn poll(&mut self) -> Result<Option<WrkRun>> {
        let Some(status) = self.process.child().try_wait()? else {
            if Instant::now() > self.deadline {
                bail!("wrk ran past its deadline");
            }
            return Ok(None);
        };
        let text = std::fs::read_to_string(&self.out_path)?;
        if !status.success() {
            bail!("wrk failed ({status}):\n{text}");
        }
        let summary = crate::wrk::Summary::parse(&text)?;
        Ok(Some(WrkRun {
            p50_ms: summary.p50_ms,
            p99_ms: summary.p99_ms,
            rps: summary.requests_per_s(),
            requests: summary.requests,
            errors: summary.errors,
            bytes_per_response: summary.bytes_per_response(),
        }))
    }

    fn wait(mut self) -> Result<WrkRun> {
        loop {
            if let Some(run) = self.poll()? {
                return Ok(run);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// How the fill of new files went while wrk measured.
#[derive(Default)]
struct FillProgress {
    /// The fill's download rate over the wrk run.
    mib_per_s: f64,
    /// Share of the wrk run during which the fill was running.
    covered_share: f64,
    /// Seconds from the start of the fill to its end.
    total_s: f64,
    notes: Vec<String>,
}

struct ServePhase<'a> {
    applianced: &'a Path,
    dir: &'a Path,
    drive: &'a Path,
    state: &'a Path,
    config: &'a Path,
    origin: &'a Nginx,
    main_manifest: &'a str,
    new_manifest: &'a str,
    settings: &'a Settings,
    catalog: &'a [ManifestFile],
    pin: bool,
}

/// `applianced run` on the filled drive: p99 of 1 MiB ranges idle, then while a fill of new
/// files runs (started with `appliance-ctl fill`).
fn serve_phase(phase: &ServePhase) -> Result<(WrkRun, WrkRun, FillProgress)> {
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let (port, admin) = (free_port()?, free_port()?);
    let fill = fill_settings(
        phase.main_manifest,
        &phase.origin.url(""),
        phase.settings.parallel,
        0,
    );
    let config = Config {
        serve: Serve {
            listen: Some(loopback(port)),
            admin_listen: Some(loopback(admin)),
            worker_threads: Some(1),
            access_log: Some("off".into()),
            ..Serve::default()
        },
        ..fill_config_of(phase.drive, phase.state, fill)
    };
    config.write(phase.config)?;
    let ctl = Ctl::next_to(phase.applianced, &phase.state.join("control.sock"))?;
    let log_path = phase.dir.join("serve.log");
    let log = std::fs::File::create(&log_path)?;
    let child = launch(phase.pin.then_some(1))
        .command(phase.applianced)
        .args(["run", "--config", text(phase.config)?])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting applianced run")?;
    let mut daemon = Guard::new("applianced run", child);
    appliance_testkit::wait_for_ok(admin, "/health", Duration::from_secs(60), || daemon.alive())
        .with_context(|| format!("see {}", log_path.display()))?;
    check_ranges(port, phase)?;
    // Both runs with the stored catalog in the page cache: what differs is the fill.
    warm_served(port, phase.catalog)?;
    let script = write_script(phase.dir, phase.settings.files, phase.settings.file_bytes)?;
    let idle = start_wrk(port, phase.settings.seconds, &script, phase.pin, "idle")?.wait()?;
    println!(
        "  serving idle: p50 {:.2} ms, p99 {:.2} ms, {:.0} req/s",
        idle.p50_ms, idle.p99_ms, idle.rps
    );

    let mut progress = FillProgress::default();
    ctl.fill(Some(phase.new_manifest))?;
    let fill_started = Instant::now();
    // Wait until the fill is downloading before measuring.
    loop {
        let status = ctl.fill_status()?;
        if status["running"] == true && status["bytes_done"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        if status["running"] == false && !status["last"].is_null() {
            bail!("the fill of new files ended before serving was measured: {status}");
        }
        if fill_started.elapsed() > Duration::from_secs(30) {
            bail!("the fill of new files did not start downloading within 30 s: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = ctl.fill_status()?;
    let bytes_before = before["bytes_done"].as_u64().unwrap_or(0);
    let mut wrk = start_wrk(port, phase.settings.seconds, &script, phase.pin, "during")?;
    let wrk_started = Instant::now();
    let mut last_running = wrk_started;
    let mut bytes_last = bytes_before;
    let mut ended_at: Option<f64> = None;
    let during = loop {
        if let Some(run) = wrk.poll()? {
            break run;
        }
        if ended_at.is_none() {
            let status = ctl.fill_status()?;
            if status["running"] == true {
                last_running = Instant::now();
                bytes_last = status["bytes_done"].as_u64().unwrap_or(bytes_last);
            } else {
                ended_at = Some(wrk_started.elapsed().as_secs_f64());
                bytes_last = status["last"]["bytes_fetched"]
                    .as_u64()
                    .unwrap_or(bytes_last);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let wrk_s = wrk_started.elapsed().as_secs_f64();
    if ended_at.is_none() {
        // Still running when wrk stopped: it covered the whole run.
        let status = ctl.fill_status()?;
        if status["running"] == true {
            last_running = Instant::now();
            bytes_last = status["bytes_done"].as_u64().unwrap_or(bytes_last);
        }
    }
    let running_s =
        ended_at.unwrap_or_else(|| last_running.duration_since(wrk_started).as_secs_f64());
    progress.covered_share = (running_s / wrk_s).min(1.0);
    progress.mib_per_s =
        bytes_last.saturating_sub(bytes_before) as f64 / MIB_F / running_s.max(0.001);
    if let Some(at) = ended_at {
        progress.notes.push(format!(
            "the fill of new files ended {at:.1} s into the {wrk_s:.1} s serving run: \
             the rest of the run was idle (more files: BENCH_FILL_NEW_FILES)"
        ));
    }
    println!(
        "  serving during the fill: p50 {:.2} ms, p99 {:.2} ms, {:.0} req/s; the fill ran \
         {:.0}% of the run at {:.0} MiB/s",
        during.p50_ms,
        during.p99_ms,
        during.rps,
        progress.covered_share * 100.0,
        progress.mib_per_s
    );
    for (name, run) in [("idle", &idle), ("during the fill", &during)] {
        if run.errors > 0.0 {
            progress
                .notes
                .push(format!("serving {name}: wrk counted {} errors", run.errors));
        }
        let spread = (run.bytes_per_response - RANGE_BYTES as f64) / RANGE_BYTES as f64;
        if !(-0.02..=0.05).contains(&spread) {
            progress.notes.push(format!(
                "serving {name}: {:.0} bytes per response, wanted about {RANGE_BYTES}",
                run.bytes_per_response
            ));
        }
        if run.requests < 1.0 {
            bail!("serving {name}: wrk completed no request");
        }
    }
    // Let the fill finish and check its report.
    let status = loop {
        let status = ctl.fill_status()?;
        if status["running"] == false && !status["last"].is_null() {
            break status;
        }
        if fill_started.elapsed() > FILL_DEADLINE {
            let _ = ctl.ok(&["fill", "--cancel"]);
            bail!(
                "the fill of new files ran past {} s",
                FILL_DEADLINE.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    progress.total_s = fill_started.elapsed().as_secs_f64();
    let new_bytes = phase.settings.new_files * phase.settings.file_bytes;
    let last = &status["last"];
    check_fill_report(
        "fill during serving",
        last,
        phase.settings.new_files,
        new_bytes,
    )?;
    if last["files_held_ok"].as_u64() != Some(phase.settings.files)
        || last["files_deleted"].as_u64() != Some(0)
    {
        bail!(
            "fill during serving: wanted all {} catalog files held and none deleted: {last}",
            phase.settings.files
        );
    }
    let exit = daemon.stop(Duration::from_secs(30))?;
    if !exit.success() {
        progress.notes.push(format!(
            "applianced run exited with {exit} on SIGTERM; see {}",
            log_path.display()
        ));
    }
    Ok((idle, during, progress))
}

/// A few ranges served from the filled drive must equal the origin's files.
fn check_ranges(port: u16, phase: &ServePhase) -> Result<()> {
    let root = phase.dir.join("origin");
    let size = phase.settings.file_bytes;
    let count = u64::try_from(phase.catalog.len())?;
    let mut rng = SplitMix64(0x2545_F491_4F6C_DD1D);
    for _ in 0..4 {
        let file = &phase.catalog[usize::try_from(rng.below(count))?];
        let first = rng.below(size - RANGE_BYTES) / 4096 * 4096;
        let last = first + RANGE_BYTES - 1;
        let response = get(port, &file.path, Some((first, last)))?;
        let (status, body) = (response.status, response.body);
        let source = std::fs::read(local(&root, file))?;
        let want = &source[usize::try_from(first)?..=usize::try_from(last)?];
        if status != 206 || body != want {
            bail!(
                "GET {} bytes={first}-{last}: status {status}, {} bytes that {} the origin's",
                file.path,
                body.len(),
                if body == want { "match" } else { "differ from" }
            );
        }
    }
    Ok(())
}

struct Summary<'a> {
    settings: &'a Settings,
    fill_mib_per_s: f64,
    fio_mib_per_s: f64,
    curl_mib_per_s: f64,
    capped_bits_per_s: f64,
    cap_accuracy: f64,
    idle: &'a WrkRun,
    during: &'a WrkRun,
    progress: &'a FillProgress,
    ours: &'a FillRun,
    fill_watch: &'a [String],
    quiet: &'a Quiet,
    notes: &'a [String],
    pin: bool,
}

fn print_summary(summary: &Summary) {
    let settings = summary.settings;
    println!(
        "== fill: {} files of {} MiB ({:.2} GiB) from nginx on loopback (files hot in its page \
         cache, so the origin is not the limit) into a preallocated drive file ==",
        settings.files,
        settings.file_bytes / MIB,
        settings.catalog_bytes() as f64 / f64::from(1u32 << 30)
    );
    println!(
        "  {:<34} {:>12}  {:<44} {:>8}",
        "figure", "ours", "peer (same run)", "ratio"
    );
    println!(
        "  {:<34} {:>8.0} MiB/s  {:<44} {:>8.3}",
        format!("fill (applianced fill, {} at once)", settings.parallel),
        summary.fill_mib_per_s,
        format!(
            "fio io_uring direct 1M QD16: {:.0} MiB/s",
            summary.fio_mib_per_s
        ),
        summary.fill_mib_per_s / summary.fio_mib_per_s
    );
    println!(
        "  {:<34} {:>8.0} MiB/s  {:<44} {:>8.3}",
        "",
        summary.fill_mib_per_s,
        format!(
            "curl x{} parallel + sync: {:.0} MiB/s",
            settings.parallel, summary.curl_mib_per_s
        ),
        summary.fill_mib_per_s / summary.curl_mib_per_s
    );
    println!(
        "  {:<34} {:>7.1} Mbit/s  {:<44} {:>8.3}",
        format!("capped fill ({} files)", settings.cap_files),
        summary.capped_bits_per_s / 1e6,
        format!("cap {:.0} Mbit/s", CAP_BITS_PER_S as f64 / 1e6),
        summary.cap_accuracy
    );
    println!(
        "  {:<34} {:>9.2} ms  {:<44} {:>8.3}",
        "serve p99 during a fill",
        summary.during.p99_ms,
        format!("same, no fill: {:.2} ms", summary.idle.p99_ms),
        summary.idle.p99_ms / summary.during.p99_ms
    );
    println!(
        "  (ratios: fill/fio, fill/curl, achieved/cap, p99 idle/during; serving: wrk -t1 -c16 \
         {} s, random 1 MiB ranges, catalog in the page cache, {})",
        settings.seconds,
        if summary.pin {
            "wrk on core 0, appliance on core 1 (worker_threads = 1)"
        } else {
            "not pinned (one core)"
        }
    );
    let ours = summary.ours;
    println!(
        "  the fill used {:.2} cores on average ({:.1} CPU s in {:.2} s); nginx's worker {:.2}",
        ours.cpu_s / ours.seconds,
        ours.cpu_s,
        ours.seconds,
        ours.origin_cpu_s / ours.seconds
    );
    if let Some(finished) = ours.finished_at_s {
        println!(
            "  \"fill finished\" logged at {finished:.2} s; the process exited {:.2} s later \
             (upkeep thread, shutdown checkpoint)",
            ours.seconds - finished
        );
    }
    let busiest: Vec<String> = ours
        .threads
        .iter()
        .take(6)
        .map(|(name, seconds, count)| {
            if *count > 1 {
                format!("{name} x{count} {seconds:.1} s")
            } else {
                format!("{name} {seconds:.1} s")
            }
        })
        .collect();
    println!("  CPU by thread: {}", busiest.join(", "));
    println!(
        "  context switches: {} ({:.0} per MiB filled)",
        ours.context_switches,
        ours.context_switches as f64 / (settings.catalog_bytes() as f64 / MIB_F)
    );
    let timeline: Vec<String> = ours
        .timeline
        .iter()
        .map(|tick| {
            format!(
                "{:.0}s {:.2}c {:.0}MiB/s",
                tick.at_s, tick.cpu_cores, tick.write_mib_per_s
            )
        })
        .collect();
    println!("  per second (cores, written): {}", timeline.join(" | "));
    if !ours.top.is_empty() {
        // top -H shows the whole process on the main thread's row: the figures above are
        // per thread, from /proc.
        println!("  top -b -n1 (-H) at 1.5 s: target/bench/fill/fill-top.txt");
    }
    println!(
        "  fill of {} new files while serving: {:.0} MiB/s over the wrk run, {:.1} s in all",
        settings.new_files, summary.progress.mib_per_s, summary.progress.total_s
    );
    if summary.quiet.waits.is_empty() {
        println!("  no other benchmark was running: no wait");
    } else {
        println!(
            "  waited for other benchmarks (wrk, fio, xtask bench/test) or other CPU load: {}",
            summary.quiet.waits.join(", ")
        );
    }
    if !summary.fill_watch.is_empty() {
        println!(
            "  other benchmarks ran during the fill: {}",
            summary.fill_watch.join(", ")
        );
    }
    if summary.notes.is_empty() {
        println!("  no errors or problems seen");
    } else {
        println!("  problems seen:");
        for note in summary.notes {
            println!("    {note}");
        }
    }
}
