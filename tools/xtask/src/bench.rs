//! The benchmarks: `store-write` (the store's sustained writes against fio on the same drive
//! file), `index` (RAM per file, lookups per second, and lookups of absent paths after churn
//! of ten times the capacity) and `recovery` (start to ready after
//! SIGKILL and after a clean stop). Each prints a summary and writes target/bench/NAME.json.

use crate::util::{self, output, resident_bytes, workspace_root};
use anyhow::{bail, Context, Result};
use appliance_device::{UringConfig, UringDrive};
use appliance_store::index::{tag_of, Index};
use appliance_store::{format_drive, DriveSource, FormatOptions, Store, StoreConfig};
use serde_json::{json, Map, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: f64 = 1048576.0;

pub fn run(name: &str) -> Result<()> {
    match name {
        "store-write" => report("store-write", store_write()?),
        "index" => report("index", index()?),
        "recovery" => report("recovery", recovery()?),
        "fill" => report("fill", crate::bench_fill::fill()?),
        "serve" => report("serve", crate::bench_serve::serve()?),
        "day" => report("day", crate::bench_day::day()?),
        "tls" => report("tls", crate::bench_tls::tls()?),
        "all" => {
            report("store-write", store_write()?)?;
            report("index", index()?)?;
            report("recovery", recovery()?)
        }
        other => bail!(
            "unknown benchmark {other:?} (store-write, index, recovery, fill, serve, day, tls, all)"
        ),
    }
}

fn bench_dir() -> PathBuf {
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir).expect("create target/bench");
    dir
}

/// A number from the environment, or `default`.
pub(crate) fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(default)
}

fn report(name: &str, figures: Map<String, Value>) -> Result<()> {
    let path = bench_dir().join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(&Value::Object(figures.clone()))?;
    std::fs::write(&path, &text)?;
    println!("== {name} ==");
    for (key, value) in &figures {
        println!("  {key:<28} {value}");
    }
    println!("  written to {}", path.display());
    Ok(())
}

pub(crate) fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// The median of `field` over `runs`; NaN (null in the JSON) when there are none.
pub(crate) fn median_of<T>(runs: &[T], field: impl Fn(&T) -> f64) -> f64 {
    let mut values: Vec<f64> = runs.iter().map(field).collect();
    if values.is_empty() {
        return f64::NAN;
    }
    median(&mut values)
}

fn fresh_file(path: &Path, size_bytes: u64) -> Result<()> {
    let _ = std::fs::remove_file(path);
    std::fs::File::create(path)?.set_len(size_bytes)?;
    Ok(())
}

fn format_file(path: &Path, segment_bytes: u64, files_max: u64) -> Result<()> {
    let drive = UringDrive::open(path, &UringConfig::default())?;
    let options = FormatOptions {
        segment_bytes,
        files_max: Some(files_max),
        force: true,
        drive_uuid: *b"benchmark-drive!",
        now_unix_s: 0,
    };
    format_drive(&drive, &options)?;
    Ok(())
}

fn open_store(path: &Path, config: StoreConfig) -> Result<Store> {
    let drive = UringDrive::open(path, &UringConfig::default())?;
    let store = Store::open(vec![DriveSource::Opened(Arc::new(drive))], config);
    if let Some(drive) = store.stats().drives.first() {
        if let appliance_store::DriveStatus::Failed(reason) = &drive.status {
            bail!("{}: {reason}", path.display());
        }
    }
    Ok(store)
}

/// The store's sustained write rate: 4 writers of 256 MiB files in 1 MiB appends.
fn store_write_once(path: &Path, total_bytes: u64) -> Result<f64> {
    fresh_file(path, total_bytes + (2 << 30))?;
    format_file(path, 256 << 20, 4096)?;
    // Format punched the segment area; preallocate it again, as fio does for its file.
    output(
        "fallocate",
        &[
            "-l",
            &(total_bytes + (2 << 30)).to_string(),
            path.to_str().unwrap(),
        ],
    )?;
    let store = open_store(path, StoreConfig::default())?;
    let chunk: Vec<u8> = (0..1u32 << 20)
        .map(|at| (at.wrapping_mul(2654435761) >> 13).to_le_bytes()[0])
        .collect();
    let file_bytes: u64 = 256 << 20;
    let next = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let mut workers = Vec::new();
        for _ in 0..4 {
            workers.push(scope.spawn(|| -> Result<()> {
                loop {
                    let number = next.fetch_add(1, Ordering::SeqCst);
                    if number * file_bytes >= total_bytes {
                        return Ok(());
                    }
                    let path = format!("/bench/write/{number:06}.mp4");
                    let mut writer = store.create(&path, file_bytes)?;
                    for _ in 0..file_bytes / chunk.len() as u64 {
                        writer.append(&chunk)?;
                    }
                    writer.publish([0; 32])?;
                }
            }));
        }
        for worker in workers {
            worker.join().expect("writer thread")?;
        }
        Ok(())
    })?;
    let seconds = started.elapsed().as_secs_f64();
    drop(store);
    Ok(total_bytes as f64 / seconds / MIB)
}

/// `value` rounded to `places` decimal places.
pub(crate) fn round_to(value: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (value * scale).round() / scale
}

/// fio's sequential direct write rate in MiB/s into `path` (io_uring, 1 MiB, QD16): the
/// storage peer of the write and fill benchmarks.
pub(crate) fn fio_write_once(path: &Path, total_bytes: u64) -> Result<f64> {
    let _ = std::fs::remove_file(path);
    let text = output(
        "fio",
        &[
            "--name=seqwrite",
            &format!("--filename={}", path.display()),
            "--ioengine=io_uring",
            "--direct=1",
            "--rw=write",
            "--bs=1M",
            "--iodepth=16",
            &format!("--size={total_bytes}"),
            "--output-format=json",
        ],
    )?;
    let report: Value = serde_json::from_str(&text).context("fio JSON")?;
    let bytes_per_s = report["jobs"][0]["write"]["bw_bytes"]
        .as_f64()
        .context("fio reported no write bandwidth")?;
    Ok(bytes_per_s / MIB)
}

fn store_write() -> Result<Map<String, Value>> {
    let total_bytes = env_u64("BENCH_WRITE_GIB", 4) << 30;
    let rounds = env_u64("BENCH_ROUNDS", 3);
    let path = bench_dir().join("store-write.drive");
    let mut ours = Vec::new();
    let mut fio = Vec::new();
    for round in 0..rounds {
        let store = store_write_once(&path, total_bytes)?;
        let peer = fio_write_once(&path, total_bytes)?;
        println!("  round {round}: store {store:.0} MiB/s, fio {peer:.0} MiB/s");
        ours.push(store);
        fio.push(peer);
    }
    let _ = std::fs::remove_file(&path);
    let ours = median(&mut ours);
    let fio = median(&mut fio);
    let mut figures = Map::new();
    figures.insert("store_mib_per_s".into(), json!(ours.round()));
    figures.insert("fio_mib_per_s".into(), json!(fio.round()));
    figures.insert(
        "ratio".into(),
        json!((ours / fio * 1000.0).round() / 1000.0),
    );
    figures.insert("bytes_per_round".into(), json!(total_bytes));
    figures.insert("rounds".into(), json!(rounds));
    Ok(figures)
}

/// A content path of exactly 40 bytes.
pub fn bench_path(number: u64) -> String {
    format!("/catalog/title-{number:08}/encode-1080p.mp4")
}

const POPULATE_FILE_BYTES: usize = 4096;

/// Child process: publishes files `start..start+count`, says "populated", then waits to be
/// killed (no clean stop, so the parent measures recovery after SIGKILL).
pub fn populate_child(args: &[&str]) -> Result<()> {
    let [drive, start, count, jobs] = args else {
        bail!("usage: xtask populate DRIVE START COUNT JOBS");
    };
    let start: u64 = start.parse()?;
    let count: u64 = count.parse()?;
    let jobs: u64 = jobs.parse()?;
    let store = open_store(Path::new(drive), StoreConfig::default())?;
    let next = AtomicU64::new(start);
    let end = start + count;
    std::thread::scope(|scope| -> Result<()> {
        let upkeep = scope.spawn(|| {
            while next.load(Ordering::SeqCst) < end {
                let _ = store.maintain();
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let mut workers = Vec::new();
        for _ in 0..jobs {
            workers.push(scope.spawn(|| -> Result<()> {
                let mut content = vec![0u8; POPULATE_FILE_BYTES];
                loop {
                    let number = next.fetch_add(1, Ordering::SeqCst);
                    if number >= end {
                        return Ok(());
                    }
                    content[..8].copy_from_slice(&number.to_le_bytes());
                    let mut writer = store.create(&bench_path(number), content.len() as u64)?;
                    writer.append(&content)?;
                    writer.publish([0; 32])?;
                }
            }));
        }
        for worker in workers {
            worker.join().expect("populate worker")?;
        }
        upkeep.join().expect("upkeep thread");
        Ok(())
    })?;
    println!("populated");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Runs a populate child and kills it with SIGKILL once it has published everything.
fn populate_and_kill(drive: &Path, start: u64, count: u64) -> Result<f64> {
    let exe = std::env::current_exe()?;
    let started = Instant::now();
    let mut child = Command::new(exe)
        .args([
            "populate",
            drive.to_str().unwrap(),
            &start.to_string(),
            &count.to_string(),
            "128",
        ])
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut said = false;
    for line in BufReader::new(stdout).lines() {
        if line? == "populated" {
            said = true;
            break;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    child.kill()?;
    child.wait()?;
    if !said {
        bail!("populate child ended without publishing everything");
    }
    Ok(seconds)
}

/// A drive file holding `count` published files (made once, reused while the count fits).
fn populated_drive(count: u64) -> Result<PathBuf> {
    let path = bench_dir().join(format!("catalog-{count}.drive"));
    let marker = path.with_extension("ready");
    if marker.exists() && path.exists() {
        return Ok(path);
    }
    let data_bytes = count * (POPULATE_FILE_BYTES as u64) * 2 + (4 << 30);
    fresh_file(&path, data_bytes)?;
    // Sized for the catalog with a tenth to spare, as an operator sizes files_max.
    format_file(&path, 16 << 20, count + count / 10)?;
    println!(
        "  populating {count} files (once; kept in {})",
        path.display()
    );
    let seconds = populate_and_kill(&path, 0, count)?;
    println!(
        "  populated in {seconds:.1} s ({:.0} files/s)",
        count as f64 / seconds
    );
    std::fs::write(&marker, b"")?;
    Ok(path)
}

fn stats_open_ms(applianced: &Path, drive: &Path) -> Result<(u64, u64)> {
    let state = bench_dir().join("state");
    let text = output(
        applianced.to_str().unwrap(),
        &[
            "store",
            "--drive",
            drive.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "stats",
            "--json",
        ],
    )?;
    let report: Value = serde_json::from_str(&text)?;
    let open_ms = report["open_ms"].as_u64().context("open_ms")?;
    let files = report["files"].as_u64().context("files")?;
    Ok((open_ms, files))
}

fn recovery() -> Result<Map<String, Value>> {
    let count = env_u64("BENCH_FILES", 1_000_000);
    let applianced = util::applianced()?;
    let drive = populated_drive(count)?;
    // Publish a further batch and kill the writer: recovery replays the log since the last
    // periodic checkpoint, as after a crash in the middle of a fill.
    let extra = count / 20;
    // The same paths on every run: later runs replace them, so the catalog does not grow.
    populate_and_kill(&drive, count, extra)?;
    let (kill_ms, files_after_kill) = stats_open_ms(&applianced, &drive)?;
    let (clean_ms, files_after_clean) = stats_open_ms(&applianced, &drive)?;
    if files_after_kill != files_after_clean || files_after_kill < count {
        bail!("file count changed across restarts: {files_after_kill} then {files_after_clean}");
    }
    let millions = count as f64 / 1e6;
    let mut figures = Map::new();
    let suffix = if count == 1_000_000 {
        "1m".to_string()
    } else {
        format!("{count}")
    };
    figures.insert(format!("ready_ms_kill_{suffix}"), json!(kill_ms));
    figures.insert(format!("ready_ms_clean_{suffix}"), json!(clean_ms));
    figures.insert("files".into(), json!(files_after_kill));
    figures.insert("files_millions".into(), json!(millions));
    Ok(figures)
}

fn index() -> Result<Map<String, Value>> {
    let count = env_u64("BENCH_FILES", 1_000_000);
    let big = env_u64("BENCH_INDEX_BIG", 10_000_000);
    let drive = populated_drive(count)?;
    let mut figures = Map::new();
    // The whole store with `count` files: every structure it keeps in RAM counts.
    let before = resident_bytes();
    let store = open_store(&drive, StoreConfig::default())?;
    let after = resident_bytes();
    let files = store.file_count();
    let per_file_store = (after.saturating_sub(before)) as f64 / files as f64;
    // Lookups as serving does them: index probe, record read, path check, pins.
    let lookups = env_u64("BENCH_LOOKUPS", 1_000_000);
    let started = Instant::now();
    let mut rng = appliance_testkit::SplitMix64(0x9E37_79B9_7F4A_7C15);
    let mut found = 0u64;
    for _ in 0..lookups {
        let handle = store.open_file(&bench_path(rng.below(count)))?;
        found += u64::from(handle.is_some());
    }
    let lookups_per_s = lookups as f64 / started.elapsed().as_secs_f64();
    if found != lookups {
        bail!("{} of {lookups} lookups missed", lookups - found);
    }
    drop(store);
    // The index alone at `big` files (paths live on disk, so the index is what grows).
    let before = resident_bytes();
    let index = Index::with_capacity(big);
    for number in 0..big {
        index
            .insert(tag_of(&bench_path(number)), (number + 1) * 4096)
            .map_err(|_| anyhow::anyhow!("index full"))?;
    }
    let after = resident_bytes();
    let per_file_big = (after.saturating_sub(before)) as f64 / big as f64;
    let started = Instant::now();
    let mut hits = 0u64;
    for number in 0..lookups {
        let tag = tag_of(&bench_path((number * 7919) % big));
        hits += u64::from(index.find(tag, Some).is_some());
    }
    let index_lookups_per_s = lookups as f64 / started.elapsed().as_secs_f64();
    assert_eq!(hits, lookups);
    let suffix = |n: u64| {
        if n.is_multiple_of(1_000_000) {
            format!("{}m", n / 1_000_000)
        } else {
            n.to_string()
        }
    };
    figures.insert(
        format!("bytes_per_file_{}", suffix(count)),
        json!((per_file_store * 10.0).round() / 10.0),
    );
    figures.insert("files_in_store".into(), json!(files));
    figures.insert(
        format!("bytes_per_file_{}", suffix(big)),
        json!((per_file_big * 10.0).round() / 10.0),
    );
    figures.insert("lookups_per_s".into(), json!(lookups_per_s.round()));
    figures.insert(
        "index_only_lookups_per_s".into(),
        json!(index_lookups_per_s.round()),
    );
    figures.insert("goal_bytes_per_file".into(), json!(32));
    drop(index);
    index_churn(&mut figures, lookups)?;
    Ok(figures)
}

/// Lookups of absent paths on a table at 75% load, fresh and after remove/insert churn of ten
/// times its capacity: removal must not leave probes longer (tombstones once made a miss scan
/// the whole table).
fn index_churn(figures: &mut Map<String, Value>, lookups: u64) -> Result<()> {
    let capacity = env_u64("BENCH_CHURN_CAPACITY", 1_000_000);
    let live = capacity * 3 / 4;
    let index = Index::with_capacity(capacity);
    let full = |_| anyhow::anyhow!("index full");
    for number in 0..live {
        index
            .insert(tag_of(&bench_path(number)), (number + 1) * 4096)
            .map_err(full)?;
    }
    let absent = |index: &Index| {
        let started = Instant::now();
        let mut slots = 0u64;
        let mut found = 0u64;
        for number in 0..lookups {
            let tag = tag_of(&format!("/absent/{number}"));
            found += u64::from(index.find(tag, Some).is_some());
            slots += index.probe_length(tag);
        }
        let per_s = lookups as f64 / started.elapsed().as_secs_f64();
        (per_s, slots as f64 / lookups as f64, found)
    };
    let (fresh_per_s, fresh_probe, _) = absent(&index);
    let started = Instant::now();
    for number in live..live + capacity * 10 {
        let gone = number - live;
        if !index.remove(tag_of(&bench_path(gone)), (gone + 1) * 4096) {
            bail!("churn lost an entry");
        }
        index
            .insert(tag_of(&bench_path(number)), (number + 1) * 4096)
            .map_err(full)?;
    }
    let churn_ops_per_s = (capacity * 10) as f64 / started.elapsed().as_secs_f64();
    let (churned_per_s, churned_probe, found) = absent(&index);
    if found != 0 {
        bail!("{found} absent paths were found");
    }
    let round = |value: f64| (value * 100.0).round() / 100.0;
    figures.insert("churn_capacity".into(), json!(capacity));
    figures.insert("churn_ops_per_s".into(), json!(churn_ops_per_s.round()));
    figures.insert(
        "absent_lookups_per_s_fresh".into(),
        json!(fresh_per_s.round()),
    );
    figures.insert(
        "absent_lookups_per_s_after_churn".into(),
        json!(churned_per_s.round()),
    );
    figures.insert("absent_probe_slots_fresh".into(), json!(round(fresh_probe)));
    figures.insert(
        "absent_probe_slots_after_churn".into(),
        json!(round(churned_probe)),
    );
    figures.insert(
        "absent_after_churn_vs_fresh".into(),
        json!(round(churned_per_s / fresh_per_s)),
    );
    Ok(())
}
