//! The on-disk format version at open and at format. A drive whose superblock (either copy) or
//! checkpoint names a version this build does not read is refused with a reason that says so,
//! and left untouched: no write, flush or discard reaches it, through open, checkpoints,
//! upkeep, reclaim or a format without force, and its bytes stay the same. A drive in the
//! readable range opens. With force, format overwrites such a drive (the operator's choice).

use appliance_device::{
    read_exact_at, AlignedBuf, Drive, DriveInfo, SimConfig, SimDrive, SimFaults, Ticket,
};
use appliance_store::layout::{
    Superblock, FORMAT_VERSION, FORMAT_VERSION_OLDEST_READ, SUPERBLOCK_BYTES,
};
use appliance_store::{
    format_drive, DriveSource, DriveStatus, FormatError, FormatOptions, Store, StoreConfig,
};
use sha2::{Digest, Sha256};
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const DRIVE_BYTES: u64 = 32 << 20;
const FILES: u64 = 12;

/// A simulated drive that counts every operation that could change it.
struct WatchedDrive {
    inner: Arc<SimDrive>,
    mutations: AtomicU64,
}

impl WatchedDrive {
    fn new(inner: &Arc<SimDrive>) -> Arc<WatchedDrive> {
        Arc::new(WatchedDrive {
            inner: Arc::clone(inner),
            mutations: AtomicU64::new(0),
        })
    }

    fn mutations(&self) -> u64 {
        self.mutations.load(Ordering::SeqCst)
    }
}

impl Drive for WatchedDrive {
    fn info(&self) -> &DriveInfo {
        self.inner.info()
    }

    fn write_at(&self, offset_bytes: u64, buf: AlignedBuf) -> Ticket {
        self.mutations.fetch_add(1, Ordering::SeqCst);
        self.inner.write_at(offset_bytes, buf)
    }

    fn read_at(&self, offset_bytes: u64, buf: AlignedBuf) -> Ticket {
        self.inner.read_at(offset_bytes, buf)
    }

    fn flush(&self) -> io::Result<()> {
        self.mutations.fetch_add(1, Ordering::SeqCst);
        self.inner.flush()
    }

    fn discard(&self, offset_bytes: u64, length_bytes: u64) -> io::Result<()> {
        self.mutations.fetch_add(1, Ordering::SeqCst);
        self.inner.discard(offset_bytes, length_bytes)
    }

    fn read_cached(&self, offset_bytes: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_cached(offset_bytes, buf)
    }

    fn drop_cached(&self, offset_bytes: u64, length_bytes: u64) -> io::Result<()> {
        self.inner.drop_cached(offset_bytes, length_bytes)
    }

    fn serve_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

fn options(uuid_byte: u8, force: bool) -> FormatOptions {
    FormatOptions {
        segment_bytes: 2 << 20,
        files_max: Some(64),
        force,
        drive_uuid: [uuid_byte; 16],
        now_unix_s: 1_700_000_000,
    }
}

fn file_bytes(number: u64) -> Vec<u8> {
    let mut rng = appliance_device::SplitMix64(number + 1);
    (0..(30_000 + number * 1000) / 8)
        .flat_map(|_| rng.next_u64().to_le_bytes())
        .collect()
}

fn file_path(number: u64) -> String {
    format!("/title/{number:02}.mp4")
}

fn open(drives: &[Arc<WatchedDrive>]) -> Store {
    let sources = drives
        .iter()
        .map(|drive| DriveSource::Opened(Arc::clone(drive) as Arc<dyn Drive>))
        .collect();
    Store::open(sources, StoreConfig::default())
}

/// Two formatted drives holding `FILES` files; the files of drive 0 and those of drive 1.
fn two_drives_with_files() -> ([Arc<SimDrive>; 2], [Vec<u64>; 2]) {
    let sims = [0u8, 1].map(|number| {
        let sim = Arc::new(SimDrive::new(&SimConfig {
            name: format!("sim{number}"),
            size_bytes: DRIVE_BYTES,
            seed: u64::from(number),
            faults: SimFaults::default(),
        }));
        format_drive(&*sim, &options(number + 1, false)).expect("format");
        sim
    });
    let store = open(&sims.clone().map(|sim| WatchedDrive::new(&sim)));
    let mut placed = [Vec::new(), Vec::new()];
    for number in 0..FILES {
        let bytes = file_bytes(number);
        let mut writer = store
            .create(&file_path(number), bytes.len() as u64)
            .unwrap();
        writer.append(&bytes).unwrap();
        writer.publish(Sha256::digest(&bytes).into()).unwrap();
        let handle = store.open_file(&file_path(number)).unwrap().unwrap();
        placed[usize::from(handle.drive_number())].push(number);
    }
    assert!(
        placed.iter().all(|files| !files.is_empty()),
        "files on both drives: {placed:?}"
    );
    (sims, placed)
}

fn read_block(sim: &SimDrive, offset_bytes: u64) -> Vec<u8> {
    read_exact_at(sim, offset_bytes, AlignedBuf::new(4096))
        .unwrap()
        .to_vec()
}

/// Rewrites the version of the sealed 4 KiB block at `offset_bytes` and reseals it (a valid
/// checksum), as a build of that version would have written it.
fn set_block_version(sim: &SimDrive, offset_bytes: u64, version: u32) {
    let mut block = read_block(sim, offset_bytes);
    block[8..12].copy_from_slice(&version.to_le_bytes());
    let crc = crc32c::crc32c(&block[..4092]);
    block[4092..4096].copy_from_slice(&crc.to_le_bytes());
    sim.corrupt(offset_bytes, &block);
}

fn digest(sim: &SimDrive) -> [u8; 32] {
    let bytes = read_exact_at(
        sim,
        0,
        AlignedBuf::new(appliance_store::layout::to_usize(DRIVE_BYTES)),
    )
    .unwrap();
    Sha256::digest(&bytes[..]).into()
}

fn newer_reason(version: u32) -> String {
    format!(
        "store format version {version} is newer than this build reads \
         ({FORMAT_VERSION_OLDEST_READ}..={FORMAT_VERSION}): written by a newer appliance image; \
         the drive is left untouched (boot the newer image, or reformat it by hand with \
         applianced format --force)"
    )
}

fn older_reason(version: u32) -> String {
    format!(
        "store format version {version} is older than this build reads \
         ({FORMAT_VERSION_OLDEST_READ}..={FORMAT_VERSION}): written by an appliance image this \
         one no longer opens; the drive is left untouched (boot an image that reads it, or \
         reformat it by hand with applianced format --force)"
    )
}

/// What a case does to drive 0 before it is opened again.
enum Change {
    /// The versions of superblock copies A and B.
    Superblocks([u32; 2]),
    /// The version of the checkpoint header in region 0.
    Checkpoint(u32),
}

struct Case {
    name: &'static str,
    change: Change,
    /// `None`: drive 0 opens; else the exact reason it is refused with.
    refused: Option<String>,
}

fn cases() -> Vec<Case> {
    let newer = FORMAT_VERSION + 1;
    let mut cases = vec![
        Case {
            name: "both superblock copies newer",
            change: Change::Superblocks([newer, newer]),
            refused: Some(newer_reason(newer)),
        },
        Case {
            name: "copy A newer",
            change: Change::Superblocks([newer, FORMAT_VERSION]),
            refused: Some(newer_reason(newer)),
        },
        Case {
            name: "copy B newer",
            change: Change::Superblocks([FORMAT_VERSION, newer]),
            refused: Some(newer_reason(newer)),
        },
        Case {
            name: "far newer",
            change: Change::Superblocks([u32::MAX, u32::MAX]),
            refused: Some(newer_reason(u32::MAX)),
        },
        Case {
            name: "version 0, older than any build reads",
            change: Change::Superblocks([0, 0]),
            refused: Some(older_reason(0)),
        },
        Case {
            name: "checkpoint newer than the build",
            change: Change::Checkpoint(newer),
            refused: Some(format!("checkpoint 0: {}", newer_reason(newer))),
        },
    ];
    for readable in FORMAT_VERSION_OLDEST_READ..=FORMAT_VERSION {
        cases.push(Case {
            name: "a version in the readable range",
            change: Change::Superblocks([readable, readable]),
            refused: None,
        });
    }
    cases
}

fn apply(sim: &SimDrive, change: &Change) {
    match change {
        Change::Superblocks(versions) => {
            for (copy, version) in (0..).zip(versions) {
                set_block_version(sim, copy * SUPERBLOCK_BYTES, *version);
            }
        }
        Change::Checkpoint(version) => {
            let superblock = Superblock::decode(&read_block(sim, 0)).unwrap();
            set_block_version(sim, superblock.checkpoint_offset_bytes(0), *version);
        }
    }
}

fn check(case: &Case) {
    let name = case.name;
    let (sims, placed) = two_drives_with_files();
    apply(&sims[0], &case.change);
    let before = digest(&sims[0]);
    let watched = sims.clone().map(|sim| WatchedDrive::new(&sim));
    let store = open(&watched);
    let stats = store.stats();
    let Some(reason) = &case.refused else {
        assert_eq!(stats.drives[0].status, DriveStatus::Ok, "{name}");
        assert_eq!(store.file_count(), FILES, "{name}");
        return;
    };
    assert_eq!(
        stats.drives[0].status,
        DriveStatus::Failed(reason.clone()),
        "{name}"
    );
    assert_eq!(stats.drives[1].status, DriveStatus::Ok, "{name}");
    for number in &placed[1] {
        let handle = store.open_file(&file_path(*number)).unwrap();
        let handle = handle.unwrap_or_else(|| panic!("{name}: file {number} of drive 1"));
        let mut read = vec![0u8; usize::try_from(handle.size_bytes()).unwrap()];
        handle.read_at(0, &mut read).unwrap();
        assert!(read == file_bytes(*number), "{name}: file {number} bytes");
    }
    for number in &placed[0] {
        assert!(store.open_file(&file_path(*number)).unwrap().is_none());
    }
    // Everything the daemon's upkeep and a clean stop do, on the refused drive's store.
    store.checkpoint().unwrap();
    store.maintain().unwrap();
    store.reclaim_now().unwrap();
    drop(store);
    // Format without force refuses: for a superblock's version, with the same reason.
    match (&case.change, format_drive(&*watched[0], &options(9, false))) {
        (Change::Superblocks(_), Err(error @ FormatError::UnreadableVersion(_))) => {
            let text = error.to_string();
            assert!(text.contains("holds appliance data"), "{name}: {text}");
            assert!(text.ends_with(reason.as_str()), "{name}: {text}");
        }
        (Change::Checkpoint(_), Err(error @ FormatError::Occupied(_))) => {
            let text = error.to_string();
            assert!(text.contains("holds appliance data"), "{name}: {text}");
        }
        (_, other) => panic!("{name}: format without force gave {other:?}"),
    }
    assert_eq!(
        watched[0].mutations(),
        0,
        "{name}: nothing written to drive 0"
    );
    assert_eq!(digest(&sims[0]), before, "{name}: drive 0's bytes");
    format_drive(&*watched[0], &options(9, true)).expect("format --force");
    let store = open(&watched);
    assert_eq!(store.stats().drives[0].status, DriveStatus::Ok, "{name}");
    assert_eq!(store.file_count(), placed[1].len() as u64, "{name}");
}

#[test]
fn drives_in_a_version_this_build_does_not_read_are_refused_and_left_untouched() {
    for case in cases() {
        check(&case);
    }
}
