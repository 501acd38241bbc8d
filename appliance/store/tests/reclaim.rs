//! Reclaim's and the scrubber's promises, one scenario each, on simulated drives: a full drive
//! frees space without a restart, a source extent that fails its checksum takes its file out
//! instead of being republished under a fresh CRC, a moved file keeps its bytes and its publish
//! time; a scrub takes out exactly the rotted file, never a version republished between its
//! check and its delete, and never a path a writer holds.

// Test data generation truncates on purpose; sizes here are small.
#![allow(clippy::cast_possible_truncation)]

use appliance_device::{SimConfig, SimDrive, SimFaults};
use appliance_store::{
    format_drive, DriveSource, FormatOptions, ScrubOutcome, Store, StoreConfig, StoreError,
};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const SEGMENT_BYTES: u64 = 2 << 20;

fn sim_store(drive_bytes: u64, config: StoreConfig) -> (Arc<SimDrive>, Store) {
    let drive = Arc::new(SimDrive::new(&SimConfig {
        name: "sim0".into(),
        size_bytes: drive_bytes,
        seed: 7,
        faults: SimFaults::default(),
    }));
    let options = FormatOptions {
        segment_bytes: SEGMENT_BYTES,
        files_max: Some(4096),
        force: false,
        drive_uuid: [9; 16],
        now_unix_s: 1_700_000_000,
    };
    format_drive(&*drive, &options).expect("format");
    let store = reopen(&drive, config);
    (drive, store)
}

fn reopen(drive: &Arc<SimDrive>, config: StoreConfig) -> Store {
    let source = DriveSource::Opened(Arc::clone(drive) as Arc<dyn appliance_device::Drive>);
    Store::open(vec![source], config)
}

fn test_config() -> StoreConfig {
    let clock = Arc::new(AtomicU64::new(1_700_000_000));
    StoreConfig {
        write_buffer_bytes: 64 << 10,
        clock: Arc::new(move || clock.fetch_add(10, Ordering::SeqCst)),
        ..StoreConfig::default()
    }
}

fn bytes_of(number: u64, size: usize) -> Vec<u8> {
    (0..size)
        .map(|at| (number.wrapping_mul(131) ^ (at as u64 / 7)) as u8)
        .collect()
}

fn put(store: &Store, path: &str, bytes: &[u8]) -> Result<(), StoreError> {
    let mut writer = store.create(path, bytes.len() as u64)?;
    writer.append(bytes)?;
    writer.publish(Sha256::digest(bytes).into())
}

fn read_all(store: &Store, path: &str) -> Option<Vec<u8>> {
    let handle = store.open_file(path).expect("lookup")?;
    let mut bytes = vec![0u8; handle.size_bytes() as usize];
    handle.read_at(0, &mut bytes).expect("read");
    assert_eq!(
        <[u8; 32]>::from(Sha256::digest(&bytes)),
        handle.sha256(),
        "{path} matches its checksum"
    );
    Some(bytes)
}

/// Defect: relocation failing with "drive full" returned before freeing, so a nearly full
/// drive stayed full until a restart. Fill to the brim, delete half, keep writing.
#[test]
fn a_full_drive_frees_space_without_a_restart() {
    let (drive, store) = sim_store(64 << 20, test_config());
    let size = 200 << 10;
    let mut written = Vec::new();
    for number in 0.. {
        match put(&store, &format!("/old/{number}"), &bytes_of(number, size)) {
            Ok(()) => written.push(number),
            Err(StoreError::DriveFull(_) | StoreError::AllDrivesFull) => break,
            Err(error) => panic!("filling: {error}"),
        }
    }
    assert!(
        written.len() > 200,
        "the drive took {} files",
        written.len()
    );
    // Every other file goes: every data segment is left half live.
    for number in written.iter().filter(|number| *number % 2 == 0) {
        assert!(store.delete(&format!("/old/{number}")).unwrap());
    }
    let mut new_files = 0u64;
    let mut refused_in_a_row = 0;
    for number in 0..written.len() as u64 {
        store.maintain().expect("upkeep");
        match put(
            &store,
            &format!("/new/{number}"),
            &bytes_of(number + 7, size),
        ) {
            Ok(()) => {
                new_files += 1;
                refused_in_a_row = 0;
            }
            Err(StoreError::DriveFull(_) | StoreError::AllDrivesFull) => refused_in_a_row += 1,
            Err(error) => panic!("writing after deletes: {error}"),
        }
        if refused_in_a_row > 20 {
            break;
        }
    }
    // Half the files were deleted; segments left at most half live come back (the rest stay
    // until more of them dies), and a restart must not find more room than upkeep did.
    let freed_room = written.len() as u64 / 2;
    assert!(
        new_files * 3 >= freed_room,
        "{new_files} new files fit after deleting {freed_room}"
    );
    drop(store);
    let store = reopen(&drive, test_config());
    store.maintain().expect("upkeep after a restart");
    let mut after_restart = 0;
    while put(
        &store,
        &format!("/restart/{after_restart}"),
        &bytes_of(1, size),
    )
    .is_ok()
    {
        after_restart += 1;
    }
    assert!(
        after_restart <= 2,
        "a restart found room for {after_restart} more files that upkeep never freed"
    );
    for number in written.iter().filter(|number| *number % 2 == 1) {
        let path = format!("/old/{number}");
        assert_eq!(
            read_all(&store, &path),
            Some(bytes_of(*number, size)),
            "{path}"
        );
    }
}

/// Defect: relocation copied source bytes without checking them, so rotted bytes were
/// republished under a fresh CRC and passed `verify` ever after.
#[test]
fn a_source_extent_that_fails_its_checksum_takes_the_file_out() {
    let (drive, store) = sim_store(64 << 20, test_config());
    let size = 96 << 10;
    // Enough files to seal the first data segment: open segments are never victims.
    for number in 0..32 {
        put(&store, &format!("/f/{number}"), &bytes_of(number, size)).unwrap();
    }
    rot(&drive, &store, "/f/5");
    // Most of the segment dies, so reclaim moves what is left.
    for number in (0..32).filter(|number| ![3, 5, 11].contains(number)) {
        assert!(store.delete(&format!("/f/{number}")).unwrap());
    }
    store.reclaim_now().unwrap();
    assert!(
        store.open_file("/f/5").unwrap().is_none(),
        "a file whose bytes fail their checksum is taken out, never republished"
    );
    assert_eq!(store.stats().corrupt_files_removed, 1);
    for number in [3, 11] {
        let path = format!("/f/{number}");
        assert_eq!(read_all(&store, &path), Some(bytes_of(number, size)));
        store.open_file(&path).unwrap().unwrap().verify().unwrap();
    }
}

/// A moved file keeps its bytes and its publish time (Last-Modified and the date validators
/// must not change when the bytes did not).
#[test]
fn a_relocated_file_keeps_its_publish_time() {
    let (_drive, store) = sim_store(64 << 20, test_config());
    let size = 64 << 10;
    for number in 0..48 {
        put(&store, &format!("/f/{number}"), &bytes_of(number, size)).unwrap();
    }
    let before = store.open_file("/f/7").unwrap().unwrap();
    let (published, where_before) = (before.published_unix_s(), before.ranges(0, 1));
    drop(before);
    for number in (0..48).filter(|number| *number != 7) {
        store.delete(&format!("/f/{number}")).unwrap();
    }
    store.reclaim_now().unwrap();
    let after = store.open_file("/f/7").unwrap().unwrap();
    assert_ne!(after.ranges(0, 1), where_before, "the file was moved");
    assert_eq!(after.published_unix_s(), published);
    drop(after);
    assert_eq!(read_all(&store, "/f/7"), Some(bytes_of(7, size)));
}

/// Defect found by the crash soak: a pass with nothing to relocate queued the segments its
/// scan found dead but returned before freeing them, so the fill's reclaim after its deletes
/// freed nothing and the fill ran out of room.
#[test]
fn a_pass_frees_dead_segments_even_when_nothing_needs_moving() {
    let (_drive, store) = sim_store(64 << 20, test_config());
    let size = 1 << 20;
    let mut count = 0u64;
    while put(&store, &format!("/f/{count}"), &bytes_of(count, size)).is_ok() {
        count += 1;
    }
    let free_before = store.stats().drives[0].free_segments;
    for number in 0..count {
        assert!(store.delete(&format!("/f/{number}")).unwrap());
    }
    let freed = store.reclaim_now().unwrap();
    let free_after = store.stats().drives[0].free_segments;
    assert!(freed > 10, "one pass freed {freed} segments");
    assert_eq!(free_after, free_before + freed);
    for number in 0..count {
        put(&store, &format!("/g/{number}"), &bytes_of(number, size)).expect("room again");
    }
}

/// Flips one byte inside `path`'s data on the drive, under the store (bit rot).
fn rot(drive: &SimDrive, store: &Store, path: &str) {
    let handle = store.open_file(path).unwrap().unwrap();
    let range = handle.ranges(1000, 1)[0];
    let mut byte = [0u8];
    handle.read_at(1000, &mut byte).unwrap();
    drive.corrupt(range.offset_bytes, &[byte[0] ^ 0x40]);
}

/// One scrub pass: every listed version's outcome.
fn scrub_pass(store: &Store) -> Vec<ScrubOutcome> {
    let versions = store.list_versions();
    versions
        .into_iter()
        .map(|version| store.scrub(version).expect("scrub"))
        .collect()
}

fn clean_paths(outcomes: &[ScrubOutcome]) -> Vec<String> {
    let mut paths: Vec<String> = outcomes
        .iter()
        .filter_map(|outcome| match outcome {
            ScrubOutcome::Clean { path, .. } => Some(path.clone()),
            _ => None,
        })
        .collect();
    paths.sort();
    paths
}

fn paths_of(numbers: impl Iterator<Item = u64>) -> Vec<String> {
    let mut paths: Vec<String> = numbers.map(|number| format!("/f/{number}")).collect();
    paths.sort();
    paths
}

/// Serving never checks CRCs, so a rotted byte would be served for ever: a scrub pass finds
/// it, takes exactly that file out (counted), leaves the others, and a refill serves it again.
#[test]
fn a_scrub_takes_out_exactly_the_rotted_file() {
    let (drive, store) = sim_store(64 << 20, test_config());
    let size = 96 << 10;
    for number in 0..8 {
        put(&store, &format!("/f/{number}"), &bytes_of(number, size)).unwrap();
    }
    assert_eq!(clean_paths(&scrub_pass(&store)), paths_of(0..8));
    rot(&drive, &store, "/f/5");
    let outcomes = scrub_pass(&store);
    let removed: Vec<&ScrubOutcome> = outcomes
        .iter()
        .filter(|outcome| matches!(outcome, ScrubOutcome::Removed { .. }))
        .collect();
    assert!(
        matches!(
            removed.as_slice(),
            [ScrubOutcome::Removed { path, size_bytes, what }]
                if path == "/f/5" && *size_bytes == size as u64 && what.contains("checksum")
        ),
        "{outcomes:?}"
    );
    assert_eq!(clean_paths(&outcomes), paths_of((0..8).filter(|n| *n != 5)));
    assert!(
        store.open_file("/f/5").unwrap().is_none(),
        "no longer served"
    );
    assert_eq!(store.stats().corrupt_files_removed, 1);
    for number in (0..8).filter(|number| *number != 5) {
        let path = format!("/f/{number}");
        assert_eq!(
            read_all(&store, &path),
            Some(bytes_of(number, size)),
            "{path}"
        );
    }
    // The next fill sees it missing and fetches it again.
    put(&store, "/f/5", &bytes_of(5, size)).unwrap();
    assert_eq!(read_all(&store, "/f/5"), Some(bytes_of(5, size)));
    assert_eq!(clean_paths(&scrub_pass(&store)), paths_of(0..8));
    assert_eq!(store.stats().corrupt_files_removed, 1);
}

/// A fill republishes a rotted file after the scrub checked it and before the scrub deletes
/// it: the new version is live and good, and must not be deleted for the old one's bytes.
#[test]
fn a_version_republished_between_the_check_and_the_delete_is_kept() {
    let republisher: Arc<Mutex<Option<Store>>> = Arc::new(Mutex::new(None));
    let hook_store = Arc::clone(&republisher);
    let config = StoreConfig {
        interleave: Some(Arc::new(move |point| {
            if point != "scrub:verified" {
                return;
            }
            // Once: taking the store out also breaks the store -> hook -> store cycle.
            let store = hook_store.lock().unwrap().take();
            if let Some(store) = store {
                put(&store, "/f/5", &bytes_of(55, 96 << 10)).expect("republish");
            }
        })),
        ..test_config()
    };
    let (drive, store) = sim_store(64 << 20, config);
    let size = 96 << 10;
    for number in 0..8 {
        put(&store, &format!("/f/{number}"), &bytes_of(number, size)).unwrap();
    }
    rot(&drive, &store, "/f/5");
    *republisher.lock().unwrap() = Some(store.clone());
    let outcomes = scrub_pass(&store);
    assert!(republisher.lock().unwrap().is_none(), "the hook ran");
    assert_eq!(
        outcomes
            .iter()
            .filter(|outcome| **outcome == ScrubOutcome::Gone)
            .count(),
        1,
        "{outcomes:?}"
    );
    assert_eq!(clean_paths(&outcomes), paths_of((0..8).filter(|n| *n != 5)));
    assert_eq!(store.stats().corrupt_files_removed, 0);
    assert_eq!(read_all(&store, "/f/5"), Some(bytes_of(55, size)));
    assert_eq!(clean_paths(&scrub_pass(&store)), paths_of(0..8));
}

/// A writer holds the rotted file's path (a fill fetching it again): the scrub leaves the path
/// to it and says so; once the writer gives up, the next scrub takes the version out.
#[test]
fn a_scrub_leaves_a_path_a_writer_holds() {
    let (drive, store) = sim_store(64 << 20, test_config());
    let size = 96 << 10;
    for number in 0..4 {
        put(&store, &format!("/f/{number}"), &bytes_of(number, size)).unwrap();
    }
    rot(&drive, &store, "/f/2");
    let writer = store.create("/f/2", size as u64).unwrap();
    let outcomes = scrub_pass(&store);
    assert!(
        outcomes.contains(&ScrubOutcome::Busy {
            path: "/f/2".into()
        }),
        "{outcomes:?}"
    );
    assert!(
        store.open_file("/f/2").unwrap().is_some(),
        "not deleted under a writer"
    );
    writer.abort();
    let outcomes = scrub_pass(&store);
    assert!(
        outcomes
            .iter()
            .any(|outcome| matches!(outcome, ScrubOutcome::Removed { path, .. } if path == "/f/2")),
        "{outcomes:?}"
    );
    assert!(store.open_file("/f/2").unwrap().is_none());
    assert_eq!(store.stats().corrupt_files_removed, 1);
}
