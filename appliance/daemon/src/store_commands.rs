//! `applianced store ...`: offline work on the stored files (import, list, read, verify,
//! delete, reclaim, statistics). Each command opens the store (recovering it), does its work,
//! and writes a checkpoint on the way out, as a clean stop does.

use crate::drives;
use anyhow::{bail, Context, Result};
use appliance_store::{DriveStatus, Store};
use clap::{Args, Subcommand};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Bytes read from a source file at a time during import.
const IMPORT_CHUNK_BYTES: usize = 1 << 20;

/// Options shared by the store commands.
#[derive(Args)]
pub struct StoreArgs {
    /// A data drive (repeat for each drive, in the same order every time).
    #[arg(long = "drive", required = true)]
    drives: Vec<PathBuf>,
    /// Directory for state kept on the OS disk (the failed-drive list).
    #[arg(long, default_value = "/var/lib/appliance")]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: StoreCommand,
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Recovers the store and prints drives, files and recovery times.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stores every file under DIR, at the path relative to DIR (prints each one published).
    Import {
        dir: PathBuf,
        /// Files written at once.
        #[arg(long, default_value_t = 4)]
        jobs: usize,
    },
    /// Lists stored paths with their sizes.
    Ls,
    /// Writes a stored file (or a byte range of it, START-END inclusive) to standard output.
    Cat {
        path: String,
        #[arg(long)]
        range: Option<String>,
    },
    /// Re-reads stored files and checks them against their checksums.
    Verify { path: Option<String> },
    /// Deletes a stored file.
    Rm { path: String },
    /// Moves live data out of mostly dead segments and frees them now.
    Reclaim,
}

#[derive(Serialize)]
struct StatsReport {
    open_ms: u64,
    files: u64,
    index_memory_bytes: u64,
    drives: Vec<DriveReport>,
}

#[derive(Serialize)]
struct DriveReport {
    path: String,
    uuid: Option<String>,
    state: String,
    size_bytes: u64,
    segment_bytes: u64,
    segment_count: u32,
    free_segments: u64,
    live_bytes: u64,
    files: u64,
    recovery_ms: u64,
}

pub fn run(args: StoreArgs) -> Result<()> {
    let config = drives::store_config(&args.state_dir)?;
    let started = Instant::now();
    let store = Store::open(drives::open_all(&args.drives), config);
    let open_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let result = match args.command {
        StoreCommand::Stats { json } => stats(&store, open_ms, json),
        StoreCommand::Import { dir, jobs } => import(&store, &dir, jobs.max(1)),
        StoreCommand::Ls => list(&store),
        StoreCommand::Cat { path, range } => cat(&store, &path, range.as_deref()),
        StoreCommand::Verify { path } => verify(&store, path.as_deref()),
        StoreCommand::Rm { path } => remove(&store, &path),
        StoreCommand::Reclaim => {
            let freed = store.reclaim_now()?;
            println!("freed {freed} segments");
            Ok(())
        }
    };
    store
        .checkpoint()
        .context("writing the shutdown checkpoint")?;
    result
}

fn stats(store: &Store, open_ms: u64, json: bool) -> Result<()> {
    let stats = store.stats();
    let report = StatsReport {
        open_ms,
        files: stats.files,
        index_memory_bytes: stats.index_memory_bytes,
        drives: stats
            .drives
            .iter()
            .map(|drive| DriveReport {
                path: drive.path.display().to_string(),
                uuid: drive.uuid.as_ref().map(drives::uuid_hex),
                state: match &drive.status {
                    DriveStatus::Ok => "ok".to_string(),
                    DriveStatus::Failed(reason) => format!("failed: {reason}"),
                },
                size_bytes: drive.size_bytes,
                segment_bytes: drive.segment_bytes,
                segment_count: drive.segment_count,
                free_segments: drive.free_segments,
                live_bytes: drive.live_bytes,
                files: drive.files,
                recovery_ms: drive.recovery_ms,
            })
            .collect(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "files: {}  index memory: {} KiB  open: {} ms",
        report.files,
        report.index_memory_bytes >> 10,
        report.open_ms
    );
    println!(
        "{:<28} {:>10} {:>10} {:>12} {:>8} {:>9}  state",
        "drive", "size MiB", "live MiB", "free segs", "files", "recov ms"
    );
    for drive in &report.drives {
        println!(
            "{:<28} {:>10} {:>10} {:>8}/{:<4} {:>7} {:>9}  {}",
            drive.path,
            drive.size_bytes >> 20,
            drive.live_bytes >> 20,
            drive.free_segments,
            drive.segment_count,
            drive.files,
            drive.recovery_ms,
            drive.state
        );
    }
    Ok(())
}

/// Every regular file below `dir`, sorted, with its content path.
fn walk(dir: &Path) -> Result<Vec<(PathBuf, String)>> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        let entries =
            fs::read_dir(&folder).with_context(|| format!("reading {}", folder.display()))?;
        for entry in entries {
            let entry = entry?;
            let kind = entry.file_type()?;
            let path = entry.path();
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() {
                let relative = path.strip_prefix(dir).expect("below dir");
                let Some(text) = relative.to_str() else {
                    bail!("{} is not UTF-8", path.display());
                };
                out.push((path.clone(), format!("/{text}")));
            }
        }
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(out)
}

fn import(store: &Store, dir: &Path, jobs: usize) -> Result<()> {
    let files = walk(dir)?;
    let next = AtomicUsize::new(0);
    let failures = AtomicUsize::new(0);
    let finished = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        // Upkeep while importing: periodic checkpoints bound the log a crash would replay.
        scope.spawn(|| {
            while !finished.load(Ordering::SeqCst) {
                if let Err(error) = store.maintain() {
                    tracing::warn!(%error, "store upkeep failed");
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        });
        let mut workers = Vec::new();
        for _ in 0..jobs {
            workers.push(scope.spawn(|| loop {
                let at = next.fetch_add(1, Ordering::SeqCst);
                let Some((source, path)) = files.get(at) else {
                    break;
                };
                match import_one(store, source, path) {
                    Ok(line) => {
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "{line}");
                        let _ = out.flush();
                    }
                    Err(error) => {
                        eprintln!("{path}: {error:#}");
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }));
        }
        for worker in workers {
            let _ = worker.join();
        }
        finished.store(true, Ordering::SeqCst);
    });
    let failed = failures.load(Ordering::SeqCst);
    if failed > 0 {
        bail!("{failed} of {} files not imported", files.len());
    }
    Ok(())
}

fn import_one(store: &Store, source: &Path, path: &str) -> Result<String> {
    let mut file = fs::File::open(source)?;
    let size = file.metadata()?.len();
    let mut writer = store.create(path, size)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; IMPORT_CHUNK_BYTES];
    loop {
        let count = file.read(&mut buf)?;
        if count == 0 {
            break;
        }
        hasher.update(&buf[..count]);
        writer.append(&buf[..count])?;
    }
    let sha256: [u8; 32] = hasher.finalize().into();
    writer.publish(sha256)?;
    Ok(format!("published {path} {size} {}", hex(&sha256)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn list(store: &Store) -> Result<()> {
    let mut rows = Vec::new();
    store.for_each_file(|path, size| rows.push((path.to_string(), size)))?;
    rows.sort();
    let mut out = std::io::stdout().lock();
    for (path, size) in rows {
        writeln!(out, "{size:>14} {path}")?;
    }
    Ok(())
}

/// Parses `START-END` (inclusive) against a file size.
fn parse_range(text: &str, size: u64) -> Result<(u64, u64)> {
    let (start, end) = text
        .split_once('-')
        .with_context(|| format!("range {text:?} is not START-END"))?;
    let start: u64 = start
        .parse()
        .with_context(|| format!("bad range start {start:?}"))?;
    let end: u64 = end
        .parse()
        .with_context(|| format!("bad range end {end:?}"))?;
    if start > end || end >= size {
        bail!("range {text} is outside the file's {size} bytes");
    }
    Ok((start, end - start + 1))
}

fn cat(store: &Store, path: &str, range: Option<&str>) -> Result<()> {
    let handle = store
        .open_file(path)?
        .with_context(|| format!("{path}: not stored"))?;
    let (start, length) = match range {
        Some(text) => parse_range(text, handle.size_bytes())?,
        None => (0, handle.size_bytes()),
    };
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; IMPORT_CHUNK_BYTES];
    let mut done = 0u64;
    while done < length {
        let count =
            usize::try_from((length - done).min(buf.len() as u64)).expect("below the buffer size");
        handle.read_at(start + done, &mut buf[..count])?;
        out.write_all(&buf[..count])?;
        done += count as u64;
    }
    Ok(())
}

fn verify(store: &Store, path: Option<&str>) -> Result<()> {
    let paths = match path {
        Some(path) => vec![path.to_string()],
        None => {
            let mut paths = Vec::new();
            store.for_each_file(|path, _| paths.push(path.to_string()))?;
            paths.sort();
            paths
        }
    };
    let mut damaged = 0;
    for path in &paths {
        let outcome = match store.open_file(path)? {
            Some(handle) => handle.verify().map_err(anyhow::Error::from),
            None => Err(anyhow::anyhow!("not stored")),
        };
        if let Err(error) = outcome {
            println!("damaged {path}: {error:#}");
            damaged += 1;
        }
    }
    println!("verified {} files, {damaged} damaged", paths.len());
    if damaged > 0 {
        bail!("{damaged} damaged files");
    }
    Ok(())
}

fn remove(store: &Store, path: &str) -> Result<()> {
    if !store.delete(path)? {
        bail!("{path}: not stored");
    }
    println!("deleted {path}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges_parse_or_refuse() {
        let cases: &[(&str, Option<(u64, u64)>)] = &[
            ("0-9", Some((0, 10))),
            ("5-5", Some((5, 1))),
            ("9-10", None),
            ("3-2", None),
            ("a-b", None),
            ("7", None),
            ("-1", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_range(text, 10).ok(), *expected, "{text}");
        }
    }
}
