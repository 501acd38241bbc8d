//! Real-drive stress test: the store on a `UringDrive` over a file (io_uring, O_DIRECT), with
//! real threads doing what the daemon's do at once: a writer republishing large files and
//! checking each before replacing it, a churn of small files and deletes, reclaim from the
//! upkeep thread (`maintain`) and from the fill (`reclaim_now`), checkpoints, and readers that
//! check every byte they read against the SHA-256 its writer vouched for.
//!
//! Readers take each of the serving layer's read paths, chosen by their seed per read: a whole
//! file through `read_at`; pieces of random size and place through `read_direct` (direct I/O
//! of the extents' drive bytes); pieces through `serve_fd` (pread at the extents' drive
//! offsets, the bytes sendfile(2) sends). A piece reader holds one handle for the whole file,
//! so its pins must keep reclaim from reusing the segments under it; two readers pause before
//! each piece, as slow clients do, so that their handles outlive reclaim passes.
//!
//! `STRESS_SECONDS` sets the duration (default 8).

// Test data generation truncates on purpose; sizes here are small.
#![allow(clippy::cast_possible_truncation)]

use appliance_device::{SplitMix64, UringConfig, UringDrive};
use appliance_store::{format_drive, DriveSource, FormatOptions, Store, StoreConfig, StoreError};
use appliance_store::{DeviceRange, FileHandle};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DRIVE_BYTES: u64 = 96 << 20;
const SEGMENT_BYTES: u64 = 2 << 20;
const BIG_FILES: u64 = 16;
const BIG_FILE_BYTES: usize = 300 << 10;
const SMALL_FILES: u64 = 300;
/// The largest piece a piece reader asks for at once.
const PIECE_BYTES_MAX: u64 = 256 << 10;
/// The longest pause of a slow reader before each piece (while it holds the handle).
const SLOW_PIECE_PAUSE_US_MAX: u64 = 50_000;

/// What writers vouched for: SHA-256 -> (path, version), registered before publishing.
type Vouched = Mutex<HashMap<[u8; 32], (String, u64)>>;

/// How a piece reader reads a file's bytes from its drive.
#[derive(Clone, Copy, Debug)]
enum ReadPath {
    /// `FileHandle::read_direct` of the extents: direct I/O, past the page cache.
    Direct,
    /// pread of `FileHandle::serve_fd` at the extents' drive offsets: what sendfile sends.
    ServeFd,
}

struct Shared {
    store: Store,
    vouched: Vouched,
    stop: AtomicBool,
    next_version: AtomicU64,
    reads_checked: AtomicU64,
    direct_pieces_checked: AtomicU64,
    serve_fd_pieces_checked: AtomicU64,
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

    /// Reads `path` through `read_path` in pieces of random size, from a random offset to the
    /// end and then from the start, holding one handle throughout and pausing before each
    /// piece for up to `pause_us_max`; checks every piece against the bytes of the version
    /// whose SHA-256 the handle holds. `None` when absent (or, for `ServeFd`, when the drive
    /// has no descriptor to send from).
    fn check_pieces(
        &self,
        path: &str,
        read_path: ReadPath,
        pause_us_max: u64,
        rng: &mut SplitMix64,
    ) -> Option<u64> {
        let handle = self.store.open_file(path).expect("lookup")?;
        let vouched = self.vouched.lock().unwrap().get(&handle.sha256()).cloned();
        let Some((vouched_path, version)) = vouched else {
            panic!("{path}: a record's SHA-256 no writer vouched for ({read_path:?})");
        };
        assert_eq!(vouched_path, path, "{path}: a record of another path");
        let served = match read_path {
            ReadPath::ServeFd => {
                let fd = handle
                    .serve_fd()?
                    .try_clone_to_owned()
                    .expect("dup serve fd");
                Some(std::fs::File::from(fd))
            }
            ReadPath::Direct => None,
        };
        let size_bytes = handle.size_bytes();
        let expected = content(version, size_bytes as usize);
        // The record's size is checked too: the bytes it describes must be the vouched ones.
        let sha256: [u8; 32] = Sha256::digest(&expected).into();
        assert_eq!(
            sha256,
            handle.sha256(),
            "{path}: version {version}: the record's size does not give the vouched bytes"
        );
        let reader = PieceReader {
            path,
            version,
            read_path,
            handle: &handle,
            served,
            expected: &expected,
        };
        let checked = match read_path {
            ReadPath::Direct => &self.direct_pieces_checked,
            ReadPath::ServeFd => &self.serve_fd_pieces_checked,
        };
        let mut file_offset = rng.below(size_bytes);
        let mut done = 0;
        while done < size_bytes {
            std::thread::sleep(Duration::from_micros(rng.below(pause_us_max)));
            let length_bytes = (1 + rng.below(PIECE_BYTES_MAX)).min(size_bytes - file_offset);
            reader.check(file_offset, length_bytes);
            checked.fetch_add(1, Ordering::Relaxed);
            done += length_bytes;
            file_offset = (file_offset + length_bytes) % size_bytes;
        }
        Some(version)
    }
}

/// A version read in pieces: its pinning handle and the bytes it must hold.
struct PieceReader<'a> {
    path: &'a str,
    version: u64,
    read_path: ReadPath,
    handle: &'a FileHandle,
    /// The drive's serving descriptor, for `ReadPath::ServeFd`.
    served: Option<std::fs::File>,
    expected: &'a [u8],
}

impl PieceReader<'_> {
    /// Reads file bytes `file_offset..+length_bytes` range by range and checks them.
    fn check(&self, file_offset: u64, length_bytes: u64) {
        let mut at = file_offset;
        for range in self.handle.ranges(file_offset, length_bytes) {
            let bytes = self.read(range);
            let want = &self.expected[at as usize..][..bytes.len()];
            if let Some(wrong) = bytes.iter().zip(want).position(|(got, want)| got != want) {
                panic!(
                    "{}: version {}: wrong byte at file offset {} ({:?} read of file bytes \
                     {at}..+{} at drive offset {}): {:#04x}, expected {:#04x}",
                    self.path,
                    self.version,
                    at + wrong as u64,
                    self.read_path,
                    range.length_bytes,
                    range.offset_bytes,
                    bytes[wrong],
                    want[wrong],
                );
            }
            at += range.length_bytes;
        }
        assert_eq!(
            at,
            file_offset + length_bytes,
            "{}: ranges cover the piece",
            self.path
        );
    }

    fn read(&self, range: DeviceRange) -> Vec<u8> {
        let length = range.length_bytes as usize;
        match &self.served {
            Some(served) => {
                let mut bytes = vec![0u8; length];
                served
                    .read_exact_at(&mut bytes, range.offset_bytes)
                    .unwrap_or_else(|error| panic!("{}: pread {range:?}: {error}", self.path));
                bytes
            }
            None => {
                let (buf, start) = self
                    .handle
                    .read_direct(range.offset_bytes, range.length_bytes)
                    .unwrap_or_else(|error| {
                        panic!("{}: read_direct {range:?}: {error}", self.path)
                    });
                buf[start..start + length].to_vec()
            }
        }
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

/// How a reader thread reads.
#[derive(Clone, Copy)]
struct ReaderConfig {
    seed: u64,
    /// The longest pause before each piece of a piece read (0: none).
    piece_pause_us_max: u64,
}

fn reader(shared: &Shared, config: ReaderConfig) {
    let mut rng = SplitMix64(config.seed);
    let pause_us_max = config.piece_pause_us_max;
    while !shared.stop.load(Ordering::Relaxed) {
        let path = if rng.below(2) == 0 {
            big_path(rng.below(BIG_FILES))
        } else {
            small_path(rng.below(SMALL_FILES))
        };
        match rng.below(3) {
            0 => shared.check(&path),
            1 => shared.check_pieces(&path, ReadPath::Direct, pause_us_max, &mut rng),
            _ => shared.check_pieces(&path, ReadPath::ServeFd, pause_us_max, &mut rng),
        };
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
        direct_pieces_checked: AtomicU64::new(0),
        serve_fd_pieces_checked: AtomicU64::new(0),
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
    let slow = SLOW_PIECE_PAUSE_US_MAX;
    let readers = [(11, 0), (12, 0), (13, slow), (14, slow)];
    for (seed, piece_pause_us_max) in readers {
        let config = ReaderConfig {
            seed,
            piece_pause_us_max,
        };
        let s = Arc::clone(&shared);
        spawn(&mut threads, Box::new(move || reader(&s, config)));
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
    let direct = shared.direct_pieces_checked.load(Ordering::Relaxed);
    let served = shared.serve_fd_pieces_checked.load(Ordering::Relaxed);
    let passes = shared.reclaim_passes.load(Ordering::Relaxed);
    let stats = shared.store.stats();
    let moved = stats.relocated_files;
    println!(
        "stress: {seconds} s, {reads} whole reads, {direct} read_direct pieces and {served} \
         serve_fd pieces checked, {passes} reclaim passes, {moved} moves"
    );
    assert!(
        reads > 100 && direct > 100 && served > 100 && moved > 10,
        "too little happened: {reads} reads, {direct} + {served} pieces, {moved} files moved"
    );
    assert_eq!(stats.drives[0].status, appliance_store::DriveStatus::Ok);
    let _ = std::fs::remove_file(&drive_path);
}
