//! Real-drive stress test: the store on a `UringDrive` over a file (io_uring, O_DIRECT), with
//! real threads doing what the daemon's do at once: a writer republishing large files and
//! checking each before replacing it, a churn of small files and deletes, reclaim from the
//! upkeep thread (`maintain`) and from the fill (`reclaim_now`), checkpoints, and readers that
//! check every byte they read against the SHA-256 its writer vouched for.
//!
//! `STRESS_SECONDS` sets the duration (default 8).

// Test data generation truncates on purpose; sizes here are small.
#![allow(clippy::cast_possible_truncation)]

use appliance_device::{SplitMix64, UringConfig, UringDrive};
use appliance_store::{format_drive, DriveSource, FormatOptions, Store, StoreConfig, StoreError};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DRIVE_BYTES: u64 = 96 << 20;
const SEGMENT_BYTES: u64 = 2 << 20;
const BIG_FILES: u64 = 16;
const BIG_FILE_BYTES: usize = 300 << 10;
const SMALL_FILES: u64 = 300;

/// What writers vouched for: SHA-256 -> (path, version), registered before publishing.
type Vouched = Mutex<HashMap<[u8; 32], (String, u64)>>;

struct Shared {
    store: Store,
    vouched: Vouched,
    stop: AtomicBool,
    next_version: AtomicU64,
    reads_checked: AtomicU64,
    reclaim_passes: AtomicU64,
}

fn content(version: u64, size: usize) -> Vec<u8> {
    let mut rng = SplitMix64(version.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut bytes = version.to_le_bytes().to_vec();
    while bytes.len() < size {
        bytes.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    bytes.truncate(size.max(8));
    bytes
}

impl Shared {
    /// Writes a new version of `path`; returns its version when published.
    fn put(&self, path: &str, size: usize) -> Result<u64, StoreError> {
        let version = self.next_version.fetch_add(1, Ordering::SeqCst);
        let bytes = content(version, size);
        let sha256: [u8; 32] = Sha256::digest(&bytes).into();
        let mut writer = self.store.create(path, bytes.len() as u64)?;
        self.vouched
            .lock()
            .unwrap()
            .insert(sha256, (path.to_string(), version));
        for part in bytes.chunks(100 << 10) {
            writer.append(part)?;
        }
        writer.publish(sha256)?;
        Ok(version)
    }

    /// Reads `path` whole and checks it; returns its version, `None` when absent.
    fn check(&self, path: &str) -> Option<u64> {
        let handle = self.store.open_file(path).expect("lookup")?;
        let mut bytes = vec![0u8; handle.size_bytes() as usize];
        handle.read_at(0, &mut bytes).expect("read");
        let sha256: [u8; 32] = Sha256::digest(&bytes).into();
        assert_eq!(
            sha256,
            handle.sha256(),
            "{path}: bytes read do not match the record's SHA-256"
        );
        let vouched = self.vouched.lock().unwrap().get(&sha256).cloned();
        let version = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        assert_eq!(
            vouched,
            Some((path.to_string(), version)),
            "{path}: bytes no writer vouched for"
        );
        self.reads_checked.fetch_add(1, Ordering::Relaxed);
        Some(version)
    }
}

fn open_store(path: &std::path::Path) -> Store {
    std::fs::File::create(path)
        .and_then(|file| file.set_len(DRIVE_BYTES))
        .expect("drive file");
    let drive = UringDrive::open(path, &UringConfig::default()).expect("open drive");
    let options = FormatOptions {
        segment_bytes: SEGMENT_BYTES,
        files_max: Some(1024),
        force: true,
        drive_uuid: *b"stress-test-drv!",
        now_unix_s: 1_700_000_000,
    };
    format_drive(&drive, &options).expect("format");
    let config = StoreConfig {
        write_buffer_bytes: 128 << 10,
        checkpoint_interval_log_bytes: 1 << 20,
        // Every upkeep pass reclaims, so it overlaps the fill's passes as often as it can.
        reclaim_free_segments_min: usize::MAX,
        reclaim_live_percent_max: 70,
        ..StoreConfig::default()
    };
    Store::open(vec![DriveSource::Opened(Arc::new(drive))], config)
}

fn big_path(number: u64) -> String {
    format!("/big/{number:02}.mp4")
}

fn small_path(number: u64) -> String {
    format!("/small/{number:03}.ts")
}

/// Republishes the big files one after another, checking each before replacing it: it must
/// still be exactly the version this thread published last.
fn republisher(shared: &Shared) {
    let mut latest = HashMap::new();
    let mut number = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        let path = big_path(number % BIG_FILES);
        let seen = shared.check(&path);
        assert_eq!(
            seen,
            latest.get(&path).copied(),
            "{path} is not the version last published (it went back)"
        );
        match shared.put(&path, BIG_FILE_BYTES) {
            Ok(version) => {
                latest.insert(path, version);
            }
            // Relocation holds the path for a moment, or the drive is full: try again later.
            Err(StoreError::PathBusy(_) | StoreError::DriveFull(_) | StoreError::AllDrivesFull) => {
            }
            Err(error) => panic!("republishing {path}: {error}"),
        }
        number += 1;
    }
}

/// Churns small files: replaces and deletes at random, making dead space for reclaim.
fn churn(shared: &Shared, seed: u64) {
    let mut rng = SplitMix64(seed);
    while !shared.stop.load(Ordering::Relaxed) {
        let path = small_path(rng.below(SMALL_FILES));
        let result = if rng.below(4) == 0 {
            shared.store.delete(&path).map(|_| ())
        } else {
            let size = 8 + rng.below(60 << 10) as usize;
            shared.put(&path, size).map(|_| ())
        };
        match result {
            Ok(()) | Err(StoreError::DriveFull(_) | StoreError::AllDrivesFull) => {}
            Err(error) => panic!("churn on {path}: {error}"),
        }
    }
}

fn reader(shared: &Shared, seed: u64) {
    let mut rng = SplitMix64(seed);
    while !shared.stop.load(Ordering::Relaxed) {
        let path = if rng.below(2) == 0 {
            big_path(rng.below(BIG_FILES))
        } else {
            small_path(rng.below(SMALL_FILES))
        };
        shared.check(&path);
        if rng.below(50) == 0 {
            if let Some(handle) = shared.store.open_file(&path).expect("lookup") {
                handle.verify().expect("stored checksums hold");
            }
        }
    }
}

fn reclaimer(shared: &Shared, forced: bool) {
    while !shared.stop.load(Ordering::Relaxed) {
        let result = if forced {
            shared.store.reclaim_now()
        } else {
            shared.store.maintain()
        };
        if result.expect("reclaim pass") == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        shared.reclaim_passes.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn stress_real_drive_with_concurrent_reclaim() {
    let seconds: u64 = std::env::var("STRESS_SECONDS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(8);
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("stress");
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let drive_path = dir.join("drive0.img");
    let shared = Arc::new(Shared {
        store: open_store(&drive_path),
        vouched: Mutex::new(HashMap::new()),
        stop: AtomicBool::new(false),
        next_version: AtomicU64::new(1),
        reads_checked: AtomicU64::new(0),
        reclaim_passes: AtomicU64::new(0),
    });
    for number in 0..SMALL_FILES {
        shared
            .put(&small_path(number), 20 << 10)
            .expect("seed files");
    }
    let mut threads = Vec::new();
    let spawn = |threads: &mut Vec<std::thread::JoinHandle<()>>, work: Box<dyn FnOnce() + Send>| {
        threads.push(std::thread::spawn(work));
    };
    let s = Arc::clone(&shared);
    spawn(&mut threads, Box::new(move || republisher(&s)));
    let s = Arc::clone(&shared);
    spawn(&mut threads, Box::new(move || churn(&s, 1)));
    for forced in [false, true] {
        let s = Arc::clone(&shared);
        spawn(&mut threads, Box::new(move || reclaimer(&s, forced)));
    }
    for seed in [11, 12] {
        let s = Arc::clone(&shared);
        spawn(&mut threads, Box::new(move || reader(&s, seed)));
    }
    let s = Arc::clone(&shared);
    spawn(
        &mut threads,
        Box::new(move || {
            while !s.stop.load(Ordering::Relaxed) {
                s.store.checkpoint().expect("checkpoint");
                std::thread::sleep(Duration::from_millis(50));
            }
        }),
    );
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_millis(100));
        if threads.iter().any(|thread| thread.is_finished()) {
            break;
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for thread in threads {
        if let Err(panic) = thread.join() {
            failures.push(
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
                    .unwrap_or_default(),
            );
        }
    }
    assert!(failures.is_empty(), "stress threads failed: {failures:#?}");
    let reads = shared.reads_checked.load(Ordering::Relaxed);
    let passes = shared.reclaim_passes.load(Ordering::Relaxed);
    let stats = shared.store.stats();
    let moved = stats.relocated_files;
    println!("stress: {seconds} s, {reads} reads checked, {passes} reclaim passes, {moved} moves");
    assert!(
        reads > 100 && moved > 10,
        "too little happened: {reads} reads, {moved} files moved"
    );
    assert_eq!(stats.drives[0].status, appliance_store::DriveStatus::Ok);
    let _ = std::fs::remove_file(&drive_path);
}
