//! Owns the hostile tests of the store's concurrency fixes (index, pins, claims, reclaim).
//!
//! Index lookups racing backward-shift removals (wrap-around, tag collisions, `remove_where`, a
//! full table), reclaim under pinned readers, passes from many threads on two drives, path
//! claims waiting on relocation, rotted sources, drives failing and power cuts in the middle of
//! reclaim.
//!
//! Each test is one attack; its comment says what it tries and what must hold. Three of them
//! found defects, fixed since: a drive failing during a commit, relocation counted against
//! `files_max`, and a rotted record under an open writer.

// Test data generation truncates on purpose; sizes here are small.
#![allow(clippy::cast_possible_truncation)]

use appliance_device::{AlignedBuf, Drive, DriveInfo, SimConfig, SimDrive, SimFaults, SplitMix64};
use appliance_store::index::{tag_of, Index, IndexFull, LOAD_PERCENT_MAX};
use appliance_store::{
    format_drive, DriveSource, DriveStatus, FileHandle, FormatOptions, Store, StoreConfig,
    StoreError,
};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

const SEGMENT_BYTES: u64 = 2 << 20;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// A formatted simulated drive.
fn sim_drive(name: &str, bytes: u64, seed: u64, faults: SimFaults) -> Arc<SimDrive> {
    let drive = Arc::new(SimDrive::new(&SimConfig {
        name: name.into(),
        size_bytes: bytes,
        seed,
        faults,
    }));
    let mut uuid = [0u8; 16];
    uuid[..name.len().min(16)].copy_from_slice(&name.as_bytes()[..name.len().min(16)]);
    uuid[15] ^= 0x5a;
    let options = FormatOptions {
        segment_bytes: SEGMENT_BYTES,
        files_max: Some(2048),
        force: false,
        drive_uuid: uuid,
        now_unix_s: 1_700_000_000,
    };
    format_drive(&*drive, &options).expect("format");
    drive
}

fn open(drives: &[Arc<dyn Drive>], config: StoreConfig) -> Store {
    let sources = drives
        .iter()
        .map(|drive| DriveSource::Opened(Arc::clone(drive)))
        .collect();
    Store::open(sources, config)
}

fn as_dyn(drive: &Arc<SimDrive>) -> Arc<dyn Drive> {
    Arc::clone(drive) as Arc<dyn Drive>
}

/// A hook settable after the store is open: `StoreConfig::interleave` calls whatever it holds.
type PointHook = Arc<dyn Fn(&'static str) + Send + Sync>;

#[derive(Default)]
struct Hook(Mutex<Option<PointHook>>);

impl Hook {
    fn set(&self, hook: impl Fn(&'static str) + Send + Sync + 'static) {
        *lock(&self.0) = Some(Arc::new(hook));
    }

    fn clear(&self) {
        *lock(&self.0) = None;
    }

    fn call(&self, point: &'static str) {
        let hook = lock(&self.0).clone();
        if let Some(hook) = hook {
            hook(point);
        }
    }
}

fn config_with(hook: &Arc<Hook>) -> StoreConfig {
    let clock = Arc::new(AtomicU64::new(1_700_000_000));
    let hook = Arc::clone(hook);
    StoreConfig {
        write_buffer_bytes: 64 << 10,
        write_buffer_count: 32,
        clock: Arc::new(move || clock.fetch_add(10, Ordering::SeqCst)),
        interleave: Some(Arc::new(move |point| hook.call(point))),
        ..StoreConfig::default()
    }
}

/// Bytes of `version`: the version first, then seeded filler.
fn content(version: u64, size: usize) -> Vec<u8> {
    let mut rng = SplitMix64(version.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x00A7_7AC4);
    let mut bytes = version.to_le_bytes().to_vec();
    while bytes.len() < size {
        bytes.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    bytes.truncate(size.max(8));
    bytes
}

fn sha(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn put(store: &Store, path: &str, bytes: &[u8]) -> Result<(), StoreError> {
    let mut writer = store.create(path, bytes.len() as u64)?;
    writer.append(bytes)?;
    writer.publish(sha(bytes))
}

fn read_handle(handle: &FileHandle) -> Vec<u8> {
    let mut bytes = vec![0u8; handle.size_bytes() as usize];
    handle
        .read_at(0, &mut bytes)
        .expect("read through a handle");
    bytes
}

/// Reads `path` whole and checks it against the record's SHA-256.
fn read_checked(store: &Store, path: &str) -> Option<Vec<u8>> {
    let handle = store.open_file(path).expect("lookup")?;
    let bytes = read_handle(&handle);
    assert_eq!(
        sha(&bytes),
        handle.sha256(),
        "{path}: bytes fail their SHA-256"
    );
    Some(bytes)
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
        .unwrap_or_default()
}

/// A drive that forwards to a `SimDrive` and lets a test act at the next flush (to land in the
/// middle of a commit) and make reads fail (a bad sector: reads fail, writes still work).
struct HookDrive {
    sim: Arc<SimDrive>,
    on_flush: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    fail_reads: AtomicBool,
}

impl HookDrive {
    fn new(sim: Arc<SimDrive>) -> Arc<HookDrive> {
        Arc::new(HookDrive {
            sim,
            on_flush: Mutex::new(None),
            fail_reads: AtomicBool::new(false),
        })
    }

    fn at_next_flush(&self, action: impl FnOnce() + Send + 'static) {
        *lock(&self.on_flush) = Some(Box::new(action));
    }

    fn eio() -> std::io::Error {
        std::io::Error::from_raw_os_error(5)
    }
}

impl Drive for HookDrive {
    fn info(&self) -> &DriveInfo {
        self.sim.info()
    }

    fn write_at(&self, offset_bytes: u64, buf: AlignedBuf) -> appliance_device::Ticket {
        self.sim.write_at(offset_bytes, buf)
    }

    fn read_at(&self, offset_bytes: u64, buf: AlignedBuf) -> appliance_device::Ticket {
        if self.fail_reads.load(Ordering::SeqCst) {
            return appliance_device::Ticket::ready(Err(HookDrive::eio()), buf);
        }
        self.sim.read_at(offset_bytes, buf)
    }

    fn flush(&self) -> std::io::Result<()> {
        let action = lock(&self.on_flush).take();
        if let Some(action) = action {
            action();
        }
        self.sim.flush()
    }

    fn discard(&self, offset_bytes: u64, length_bytes: u64) -> std::io::Result<()> {
        self.sim.discard(offset_bytes, length_bytes)
    }

    fn read_cached(&self, offset_bytes: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if self.fail_reads.load(Ordering::SeqCst) {
            return Err(HookDrive::eio());
        }
        self.sim.read_cached(offset_bytes, buf)
    }

    fn drop_cached(&self, offset_bytes: u64, length_bytes: u64) -> std::io::Result<()> {
        self.sim.drop_cached(offset_bytes, length_bytes)
    }

    fn serve_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

/// A path whose new file the store places on the drive named `drive` (rendezvous placement).
fn path_on(store: &Store, prefix: &str, drive: &str) -> String {
    for number in 0..10_000 {
        let path = format!("{prefix}/{number}");
        let writer = store.create(&path, 1).expect("create");
        let here = writer.drive_path().to_string_lossy() == drive;
        writer.abort();
        if here {
            return path;
        }
    }
    panic!("no path lands on {drive}");
}

fn status_of(store: &Store, drive: &str) -> DriveStatus {
    store
        .stats()
        .drives
        .iter()
        .find(|stats| stats.path.to_string_lossy() == drive)
        .expect("drive listed")
        .status
        .clone()
}

// ---------------------------------------------------------------------------------------------
// Index
// ---------------------------------------------------------------------------------------------

/// Slots of an index made for `files_max` (the formula `Index::with_capacity` documents).
fn slot_count(files_max: u64) -> u64 {
    (files_max * 100).div_ceil(LOAD_PERCENT_MAX) + 1
}

/// A tag whose home slot is `home` in a table of `slots` slots; `salt` makes tags distinct.
fn tag_at(home: u64, slots: u64, salt: u64) -> u64 {
    let base = ((u128::from(home) << 64).div_ceil(u128::from(slots))) as u64;
    let tag = base + 1 + salt;
    assert_eq!(
        ((u128::from(tag) * u128::from(slots)) >> 64) as u64,
        home,
        "crafted tag lands at its home"
    );
    tag
}

/// Attack: entries whose runs wrap around the end of the table, while another thread removes
/// and re-inserts the entries ahead of them, so every removal shifts the stable entries back
/// across the wrap (slot 0 -> last slot) and forth. A lookup of a present entry must never miss.
#[test]
fn index_lookups_never_miss_while_shifts_cross_the_wrap() {
    let files_max = 100;
    let slots = slot_count(files_max);
    let index = Arc::new(Index::with_capacity(files_max));
    let last = slots - 1;
    // Churned entries live at the end of the table, stable ones start there too and spill over
    // the wrap into slots 0, 1, 2...
    let churned: Vec<(u64, u64)> = (0..6)
        .map(|number| {
            (
                tag_at(last - 3 + number % 4, slots, number),
                1 << 40 | (number + 1),
            )
        })
        .collect();
    let stable: Vec<(u64, u64)> = (0..12)
        .map(|number| {
            (
                tag_at(last - 1 + number % 2, slots, 100 + number),
                4096 * (number + 1),
            )
        })
        .collect();
    for (tag, location) in churned.iter().chain(&stable) {
        index.insert(*tag, *location).unwrap();
    }
    // The run really wraps: an absent tag homed at the last slot walks into the low slots.
    let absent = tag_at(last, slots, 9_999);
    assert!(
        index.probe_length(absent) > 12,
        "the probe run wraps around the end ({} slots)",
        index.probe_length(absent)
    );
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (index, stop, churned) = (Arc::clone(&index), Arc::clone(&stop), churned.clone());
        std::thread::spawn(move || {
            let mut rounds = 0u64;
            let mut rng = SplitMix64(5);
            while !stop.load(Ordering::Relaxed) || rounds < 2_000 {
                let (tag, location) = churned[rng.below(churned.len() as u64) as usize];
                assert!(index.remove(tag, location), "churned entry present");
                index.insert(tag, location).unwrap();
                rounds += 1;
            }
            rounds
        })
    };
    let mut checks = 0u64;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        for (tag, location) in &stable {
            assert!(
                index.contains(*tag, *location),
                "stable entry {tag:#x} missed during a shift across the wrap"
            );
            checks += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = churn.join().expect("churn thread");
    assert!(
        rounds >= 2_000 && checks > 1_000,
        "{rounds} removals, {checks} lookups"
    );
    assert_eq!(index.len(), (churned.len() + stable.len()) as u64);
    for (tag, location) in churned.iter().chain(&stable) {
        assert!(index.contains(*tag, *location));
    }
}

/// Attack: two paths with the same tag (a hash collision) sit in one run with other tags in
/// between; removals of entries ahead of them shift both, and removing one collision partner
/// shifts the other past where it was. Lookups of the survivor must never miss, and `find` must
/// keep offering every location stored under the tag.
#[test]
fn index_tag_collisions_survive_shifts() {
    let files_max = 60;
    let slots = slot_count(files_max);
    let index = Arc::new(Index::with_capacity(files_max));
    let home = slots - 2;
    let shared_tag = tag_at(home, slots, 7);
    let (kept, churned_partner) = (4096 * 7, 4096 * 8);
    let blockers: Vec<(u64, u64)> = (0..5)
        .map(|number| (tag_at(home, slots, 1000 + number), 1 << 41 | (number + 1)))
        .collect();
    index.insert(blockers[0].0, blockers[0].1).unwrap();
    index.insert(shared_tag, churned_partner).unwrap();
    for (tag, location) in &blockers[1..] {
        index.insert(*tag, *location).unwrap();
    }
    index.insert(shared_tag, kept).unwrap();
    let mut seen = Vec::new();
    index.find(shared_tag, |location| {
        seen.push(location);
        None::<()>
    });
    assert_eq!(
        seen,
        vec![churned_partner, kept],
        "both collision partners found"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (index, stop, blockers) = (Arc::clone(&index), Arc::clone(&stop), blockers.clone());
        std::thread::spawn(move || {
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) || rounds < 1_000 {
                assert!(index.remove(shared_tag, churned_partner));
                let (tag, location) = blockers[(rounds % 5) as usize];
                assert!(index.remove(tag, location));
                index.insert(shared_tag, churned_partner).unwrap();
                index.insert(tag, location).unwrap();
                rounds += 1;
            }
            rounds
        })
    };
    let started = Instant::now();
    let mut checks = 0u64;
    while started.elapsed() < Duration::from_millis(1000) {
        assert!(
            index.contains(shared_tag, kept),
            "collision partner missed while the other moved"
        );
        // What a store lookup does: visit locations under the tag until the path matches.
        let found = index.find(shared_tag, |location| {
            (location == kept).then_some(location)
        });
        assert_eq!(found, Some(kept));
        checks += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = churn.join().expect("churn thread");
    assert!(
        rounds >= 1_000 && checks > 100,
        "{rounds} rounds, {checks} checks"
    );
    assert!(index.remove(shared_tag, kept));
    assert!(index.contains(shared_tag, churned_partner));
    assert!(!index.contains(shared_tag, kept));
    assert_eq!(index.len(), 6);
}

/// Attack: a drive fails and `remove_where` empties its entries (shifting the others, across
/// the wrap too) while readers look up the other drive's entries. No lookup of a surviving
/// entry may miss; afterwards no entry of the failed drive is left and the count is right.
#[test]
fn index_remove_where_racing_lookups() {
    let files_max = 4000;
    let slots = slot_count(files_max);
    for round in 0..4u64 {
        let index = Arc::new(Index::with_capacity(files_max));
        let mut rng = SplitMix64(round);
        let mut survivors = Vec::new();
        let mut doomed = 0u64;
        for number in 0..files_max {
            // A third of the entries crowd the end of the table so runs wrap.
            let tag = if number % 3 == 0 {
                tag_at(slots - 1 - rng.below(40), slots, number)
            } else {
                tag_of(&format!("/r{round}/{number}"))
            };
            let drive = rng.below(2);
            let location = (drive << 56) | (4096 * (number + 1));
            index.insert(tag, location).unwrap();
            if drive == 1 {
                survivors.push((tag, location));
            } else {
                doomed += 1;
            }
        }
        let survivors = Arc::new(survivors);
        let done = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|reader| {
                let (index, survivors, done) = (
                    Arc::clone(&index),
                    Arc::clone(&survivors),
                    Arc::clone(&done),
                );
                std::thread::spawn(move || {
                    let mut checks = 0u64;
                    let mut at = reader * 997;
                    while !done.load(Ordering::SeqCst) || checks < survivors.len() as u64 {
                        let (tag, location) = survivors[at % survivors.len()];
                        assert!(
                            index.contains(tag, location),
                            "surviving entry missed during remove_where"
                        );
                        at += 1;
                        checks += 1;
                    }
                    checks
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(5));
        let removed = index.remove_where(|location| location >> 56 == 0);
        done.store(true, Ordering::SeqCst);
        for reader in readers {
            assert!(reader.join().expect("reader") > 0);
        }
        assert_eq!(removed, doomed);
        assert_eq!(index.len(), survivors.len() as u64);
        let mut left_of_failed = 0;
        index.for_each(|_, location| left_of_failed += u64::from(location >> 56 == 0));
        assert_eq!(left_of_failed, 0, "an entry of the failed drive survived");
        for (tag, location) in survivors.iter() {
            assert!(index.contains(*tag, *location));
        }
    }
}

/// Attack: the table filled to its limit, then churned at the limit (remove one, insert one)
/// for many times its capacity while readers look everything up. The limit holds, every
/// present entry is found, absent lookups end, and the table stays usable.
#[test]
fn index_full_table_churned_at_its_limit() {
    let files_max = 500;
    let index = Arc::new(Index::with_capacity(files_max));
    let mut live: Vec<(u64, u64)> = Vec::new();
    let mut number = 0u64;
    loop {
        let entry = (tag_of(&format!("/full/{number}")), 4096 * (number + 1));
        match index.insert(entry.0, entry.1) {
            Ok(()) => live.push(entry),
            Err(IndexFull) => break,
        }
        number += 1;
    }
    assert!(
        live.len() as u64 >= files_max,
        "room for files_max: {}",
        live.len()
    );
    // A quarter stays fixed and is read throughout; the rest churns.
    let fixed: Arc<Vec<(u64, u64)>> = Arc::new(live.drain(..live.len() / 4).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let reader = {
        let (index, fixed, stop, rounds) = (
            Arc::clone(&index),
            Arc::clone(&fixed),
            Arc::clone(&stop),
            Arc::clone(&rounds),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for (tag, location) in fixed.iter() {
                    assert!(
                        index.contains(*tag, *location),
                        "fixed entry missed at the limit"
                    );
                }
                assert!(!index.contains(tag_of("/never"), 1));
                rounds.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut rng = SplitMix64(77);
    let mut churned = 0;
    // Churn ten times the capacity, and on until the reader has looked up everything often.
    while churned < files_max * 10 || rounds.load(Ordering::Relaxed) < 200 {
        churned += 1;
        let at = rng.below(live.len() as u64) as usize;
        let (tag, location) = live.swap_remove(at);
        assert!(index.remove(tag, location));
        number += 1;
        let entry = (tag_of(&format!("/full/{number}")), 4096 * (number + 1));
        index.insert(entry.0, entry.1).unwrap();
        live.push(entry);
        assert_eq!(
            index.insert(tag_of("/one-too-many"), 1 << 50),
            Err(IndexFull),
            "the limit holds while churning"
        );
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("reader");
    assert!(rounds.load(Ordering::Relaxed) >= 200);
    for (tag, location) in fixed.iter().chain(&live) {
        assert!(index.contains(*tag, *location));
    }
    let absent: u64 = (0..1000)
        .map(|n| index.probe_length(tag_of(&format!("/absent/{n}"))))
        .sum();
    assert!(
        absent / 1000 < 40,
        "mean absent probe at the limit after churn: {}",
        absent / 1000
    );
}

// ---------------------------------------------------------------------------------------------
// Reclaim under pinned readers
// ---------------------------------------------------------------------------------------------

/// Attack: readers hold handles to every file for a long time while most files are deleted,
/// reclaim runs again and again and new files fill the drive to the brim. Nothing a handle pins
/// may be freed or rewritten: every handle still reads its original bytes afterwards (deleted
/// files too). Once the handles go, the same reclaim frees the space.
#[test]
fn pinned_readers_keep_their_bytes_through_reclaim_and_refill() {
    let hook = Arc::new(Hook::default());
    let drive = sim_drive("pinned", 48 << 20, 1, SimFaults::default());
    let store = open(&[as_dyn(&drive)], config_with(&hook));
    let size = 96 << 10;
    let count = 120u64;
    for number in 0..count {
        put(&store, &format!("/p/{number}"), &content(number, size)).unwrap();
    }
    let handles: Vec<(u64, FileHandle)> = (0..count)
        .map(|number| {
            (
                number,
                store.open_file(&format!("/p/{number}")).unwrap().unwrap(),
            )
        })
        .collect();
    for number in (0..count).filter(|number| number % 5 != 0) {
        assert!(store.delete(&format!("/p/{number}")).unwrap());
    }
    let free_before = store.stats().drives[0].free_segments;
    let mut freed_while_pinned = 0;
    for _ in 0..3 {
        freed_while_pinned += store.reclaim_now().unwrap();
        freed_while_pinned += store.maintain().unwrap();
    }
    assert_eq!(
        store.stats().relocated_files,
        0,
        "pinned segments are never victims"
    );
    // Fill whatever room is left, so any wrongly freed segment would be rewritten.
    let mut refill = 0u64;
    while put(
        &store,
        &format!("/refill/{refill}"),
        &content(10_000 + refill, size),
    )
    .is_ok()
    {
        refill += 1;
        if refill.is_multiple_of(8) {
            store.reclaim_now().unwrap();
        }
    }
    for (number, handle) in &handles {
        let bytes = read_handle(handle);
        assert_eq!(
            bytes,
            content(*number, size),
            "/p/{number} read through its handle"
        );
        assert_eq!(sha(&bytes), handle.sha256());
        handle.verify().expect("pinned extents still check out");
    }
    drop(handles);
    let freed_after = store.reclaim_now().unwrap() + store.reclaim_now().unwrap();
    assert!(
        freed_after > 0,
        "space pinned by readers comes back once they leave (freed {freed_while_pinned} \
         while pinned, {free_before} free before, {freed_after} after)"
    );
    for number in (0..count).filter(|number| number % 5 == 0) {
        assert_eq!(
            read_checked(&store, &format!("/p/{number}")),
            Some(content(number, size))
        );
    }
    for number in 0..refill {
        assert_eq!(
            read_checked(&store, &format!("/refill/{number}")),
            Some(content(10_000 + number, size))
        );
    }
}

/// Attack: a reader opens a file while reclaim is between claiming it and publishing its copy
/// (from inside the pass), then keeps the handle while the old place is reused. The handle keeps
/// the old version's bytes; a fresh lookup finds the moved version with the same bytes and
/// publish time.
#[test]
fn a_reader_opening_mid_relocation_keeps_its_version() {
    let hook = Arc::new(Hook::default());
    let drive = sim_drive("midmove", 32 << 20, 2, SimFaults::default());
    let store = open(&[as_dyn(&drive)], config_with(&hook));
    let size = 64 << 10;
    for number in 0..48 {
        put(&store, &format!("/m/{number}"), &content(number, size)).unwrap();
    }
    for number in (0..48).filter(|number| *number != 9) {
        store.delete(&format!("/m/{number}")).unwrap();
    }
    let published = store.open_file("/m/9").unwrap().unwrap().published_unix_s();
    let grabbed: Arc<Mutex<Vec<FileHandle>>> = Arc::default();
    {
        let (store, grabbed) = (store.clone(), Arc::clone(&grabbed));
        hook.set(move |point| {
            if point == "relocate:claimed" || point == "relocate:copied" {
                lock(&grabbed).push(store.open_file("/m/9").unwrap().expect("still visible"));
            }
        });
    }
    store.reclaim_now().unwrap();
    hook.clear();
    assert_eq!(store.stats().relocated_files, 1);
    let grabbed = std::mem::take(&mut *lock(&grabbed));
    assert!(grabbed.len() >= 2, "handles taken inside the pass");
    let mut refill = 0;
    while put(
        &store,
        &format!("/refill/{refill}"),
        &content(500 + refill, size),
    )
    .is_ok()
    {
        refill += 1;
    }
    for handle in &grabbed {
        assert_eq!(read_handle(handle), content(9, size));
        assert_eq!(handle.published_unix_s(), published);
    }
    let moved = store.open_file("/m/9").unwrap().unwrap();
    assert_ne!(
        moved.ranges(0, 1),
        grabbed[0].ranges(0, 1),
        "the file moved"
    );
    assert_eq!(moved.published_unix_s(), published);
    assert_eq!(read_handle(&moved), content(9, size));
}

// ---------------------------------------------------------------------------------------------
// Many threads on two drives
// ---------------------------------------------------------------------------------------------

/// What writers vouched for before publishing: SHA-256 -> (path, version).
type Vouched = Mutex<HashMap<[u8; 32], (String, u64)>>;

struct Crowd {
    store: Store,
    vouched: Vouched,
    next_version: AtomicU64,
    stop: AtomicBool,
    reads: AtomicU64,
    held_reads: AtomicU64,
}

impl Crowd {
    fn put(&self, path: &str, size: usize) -> Result<(), StoreError> {
        let version = self.next_version.fetch_add(1, Ordering::SeqCst);
        let bytes = content(version, size);
        let mut writer = self.store.create(path, bytes.len() as u64)?;
        lock(&self.vouched).insert(sha(&bytes), (path.to_string(), version));
        for part in bytes.chunks(40 << 10) {
            writer.append(part)?;
        }
        writer.publish(sha(&bytes))
    }

    /// Checks what a handle reads against what its writer vouched for.
    fn check_handle(&self, path: &str, handle: &FileHandle) {
        let bytes = read_handle(handle);
        let sum = sha(&bytes);
        assert_eq!(
            sum,
            handle.sha256(),
            "{path}: bytes fail the record's SHA-256"
        );
        let version = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        assert_eq!(
            lock(&self.vouched).get(&sum).cloned(),
            Some((path.to_string(), version)),
            "{path}: bytes no writer vouched for"
        );
    }
}

fn crowd_path(number: u64) -> String {
    format!("/crowd/{number:02}.ts")
}

/// Attack: on two drives at once, two threads call `reclaim_now` and one `maintain` in a loop,
/// two writers republish and one deletes the *same* small set of paths, and readers check every
/// read against the SHA-256 the writer vouched for, some holding their handle across many
/// passes before reading. No wrong byte, no panic, and reclaim really moves files.
#[test]
fn reclaim_from_many_threads_on_two_drives() {
    let drives = [
        sim_drive("crowd0", 40 << 20, 3, SimFaults::default()),
        sim_drive("crowd1", 40 << 20, 4, SimFaults::default()),
    ];
    let config = StoreConfig {
        write_buffer_bytes: 64 << 10,
        checkpoint_interval_log_bytes: 256 << 10,
        reclaim_free_segments_min: usize::MAX,
        reclaim_live_percent_max: 70,
        ..StoreConfig::default()
    };
    let crowd = Arc::new(Crowd {
        store: open(&[as_dyn(&drives[0]), as_dyn(&drives[1])], config),
        vouched: Mutex::default(),
        next_version: AtomicU64::new(1),
        stop: AtomicBool::new(false),
        reads: AtomicU64::new(0),
        held_reads: AtomicU64::new(0),
    });
    const PATHS: u64 = 24;
    for number in 0..PATHS {
        crowd.put(&crowd_path(number), 100 << 10).unwrap();
    }
    let mut threads: Vec<std::thread::JoinHandle<()>> = Vec::new();
    for seed in 0..2u64 {
        let crowd = Arc::clone(&crowd);
        threads.push(std::thread::spawn(move || {
            let mut rng = SplitMix64(seed);
            while !crowd.stop.load(Ordering::Relaxed) {
                let path = crowd_path(rng.below(PATHS));
                let size = (4u64 << 10) << rng.below(6);
                match crowd.put(&path, size as usize) {
                    Ok(())
                    | Err(StoreError::PathBusy(_) | StoreError::DriveFull(_))
                    | Err(StoreError::AllDrivesFull | StoreError::OutOfBuffers) => {}
                    Err(error) => panic!("republishing {path}: {error}"),
                }
            }
        }));
    }
    {
        let crowd = Arc::clone(&crowd);
        threads.push(std::thread::spawn(move || {
            let mut rng = SplitMix64(99);
            while !crowd.stop.load(Ordering::Relaxed) {
                let path = crowd_path(rng.below(PATHS));
                match crowd.store.delete(&path) {
                    Ok(_) | Err(StoreError::PathBusy(_)) => {}
                    Err(error) => panic!("deleting {path}: {error}"),
                }
                std::thread::sleep(Duration::from_micros(300));
            }
        }));
    }
    for forced in [true, true, false] {
        let crowd = Arc::clone(&crowd);
        threads.push(std::thread::spawn(move || {
            while !crowd.stop.load(Ordering::Relaxed) {
                let result = if forced {
                    crowd.store.reclaim_now()
                } else {
                    crowd.store.maintain()
                };
                result.expect("reclaim pass");
            }
        }));
    }
    for seed in 0..2u64 {
        let crowd = Arc::clone(&crowd);
        threads.push(std::thread::spawn(move || {
            let mut rng = SplitMix64(1000 + seed);
            let mut held: Vec<(String, FileHandle)> = Vec::new();
            while !crowd.stop.load(Ordering::Relaxed) {
                let path = crowd_path(rng.below(PATHS));
                if let Some(handle) = crowd.store.open_file(&path).expect("lookup") {
                    crowd.check_handle(&path, &handle);
                    crowd.reads.fetch_add(1, Ordering::Relaxed);
                    if rng.below(4) == 0 {
                        held.push((path, handle));
                    }
                }
                if held.len() > 6 || (rng.below(16) == 0 && !held.is_empty()) {
                    let (path, handle) = held.swap_remove(0);
                    crowd.check_handle(&path, &handle);
                    crowd.held_reads.fetch_add(1, Ordering::Relaxed);
                }
            }
            for (path, handle) in held {
                crowd.check_handle(&path, &handle);
            }
        }));
    }
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) && !threads.iter().any(|t| t.is_finished()) {
        std::thread::sleep(Duration::from_millis(50));
    }
    crowd.stop.store(true, Ordering::Relaxed);
    let failures: Vec<String> = threads
        .into_iter()
        .filter_map(|thread| thread.join().err())
        .map(|panic| panic_text(&*panic))
        .collect();
    assert!(failures.is_empty(), "threads failed: {failures:#?}");
    let stats = crowd.store.stats();
    let (reads, held) = (
        crowd.reads.load(Ordering::Relaxed),
        crowd.held_reads.load(Ordering::Relaxed),
    );
    assert!(
        reads > 100 && held > 10 && stats.relocated_files > 10,
        "too little happened: {reads} reads, {held} held reads, {} moves",
        stats.relocated_files
    );
    println!(
        "crowd: {reads} reads checked, {held} after holding, {} moves",
        stats.relocated_files
    );
    for drive in &stats.drives {
        assert_eq!(drive.status, DriveStatus::Ok);
    }
    for number in 0..PATHS {
        let path = crowd_path(number);
        if let Some(handle) = crowd.store.open_file(&path).unwrap() {
            crowd.check_handle(&path, &handle);
            handle.verify().expect("checksums hold");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Path claims and relocation
// ---------------------------------------------------------------------------------------------

/// A store whose only live file `/w/keep` lies in a sealed, mostly dead segment: the next
/// reclaim pass relocates exactly that file.
fn store_with_one_file_to_move(
    name: &str,
    hook: &Arc<Hook>,
    relocation_wait_ms: u64,
) -> (Arc<SimDrive>, Store) {
    let drive = sim_drive(name, 32 << 20, 8, SimFaults::default());
    let config = StoreConfig {
        relocation_wait_ms,
        ..config_with(hook)
    };
    let store = open(&[as_dyn(&drive)], config);
    let size = 64 << 10;
    for number in 0..40 {
        let path = if number == 5 {
            "/w/keep".to_string()
        } else {
            format!("/w/{number}")
        };
        put(&store, &path, &content(number, size)).unwrap();
    }
    for number in (0..40).filter(|number| *number != 5) {
        assert!(store.delete(&format!("/w/{number}")).unwrap());
    }
    (drive, store)
}

/// Runs one reclaim pass on another thread that stops for `hold` right after claiming
/// `/w/keep`; calls `during` on this thread while the claim is held.
fn while_relocation_holds<T>(
    store: &Store,
    hook: &Arc<Hook>,
    hold: Duration,
    during: impl FnOnce() -> T,
) -> T {
    let claimed = Arc::new(Barrier::new(2));
    {
        let claimed = Arc::clone(&claimed);
        let once = AtomicBool::new(false);
        hook.set(move |point| {
            if point == "relocate:claimed" && !once.swap(true, Ordering::SeqCst) {
                claimed.wait();
                std::thread::sleep(hold);
            }
        });
    }
    let pass = {
        let store = store.clone();
        std::thread::spawn(move || store.reclaim_now())
    };
    claimed.wait();
    let result = during();
    pass.join().expect("reclaim thread").expect("reclaim pass");
    hook.clear();
    assert_eq!(store.stats().relocated_files, 1, "the pass moved the file");
    result
}

/// Attack: a delete and a create of a path that relocation holds. They must wait for the move
/// (not fail with `PathBusy`), then act on the moved version: the delete removes it, the create
/// replaces it, and nothing of the old version comes back.
#[test]
fn delete_and_create_wait_for_relocation_of_their_path() {
    let hook = Arc::new(Hook::default());
    let (_drive, store) = store_with_one_file_to_move("waitdel", &hook, 10_000);
    let hold = Duration::from_millis(300);
    let (result, waited) = while_relocation_holds(&store, &hook, hold, || {
        let started = Instant::now();
        (store.delete("/w/keep"), started.elapsed())
    });
    assert!(
        result.expect("delete waits, then succeeds"),
        "the file was there"
    );
    assert!(
        waited >= hold / 2,
        "the delete waited for the move ({waited:?})"
    );
    assert!(store.open_file("/w/keep").unwrap().is_none());

    let (_drive, store) = store_with_one_file_to_move("waitput", &hook, 10_000);
    let (result, waited) = while_relocation_holds(&store, &hook, hold, || {
        let started = Instant::now();
        (
            put(&store, "/w/keep", &content(777, 5000)),
            started.elapsed(),
        )
    });
    result.expect("create waits, then succeeds");
    assert!(
        waited >= hold / 2,
        "the create waited for the move ({waited:?})"
    );
    assert_eq!(read_checked(&store, "/w/keep"), Some(content(777, 5000)));
    // The moved version was replaced, not kept beside the new one.
    assert_eq!(store.file_count(), 1);
    assert_eq!(store.list_files().unwrap().len(), 1);
}

/// Attack: with `relocation_wait_ms = 0`, a delete and a create of a path relocation holds fail
/// with `PathBusy` at once (long before the pass lets go) and change nothing; retried after the
/// pass, they work.
#[test]
fn zero_relocation_wait_fails_promptly_with_path_busy() {
    let hook = Arc::new(Hook::default());
    let (_drive, store) = store_with_one_file_to_move("nowait", &hook, 0);
    let hold = Duration::from_millis(1500);
    let (delete, create, waited) = while_relocation_holds(&store, &hook, hold, || {
        let started = Instant::now();
        let delete = store.delete("/w/keep");
        let create = store.create("/w/keep", 10).map(|writer| writer.abort());
        (delete, create, started.elapsed())
    });
    assert!(matches!(delete, Err(StoreError::PathBusy(_))), "{delete:?}");
    assert!(matches!(create, Err(StoreError::PathBusy(_))), "{create:?}");
    assert!(
        waited < Duration::from_millis(500),
        "PathBusy took {waited:?}"
    );
    assert_eq!(read_checked(&store, "/w/keep"), Some(content(5, 64 << 10)));
    assert!(store.delete("/w/keep").unwrap());
}

/// A delete's result and how long it took.
type Timed = (Result<bool, StoreError>, Duration);

/// Attack: a second caller on the *same thread* as the pass (a callback running inside it)
/// writes the path the pass holds. It must not deadlock: with no wait it gets `PathBusy` at
/// once; with a bounded wait it gets `PathBusy` after that wait.
#[test]
fn a_write_nested_in_the_pass_that_holds_its_path_never_deadlocks() {
    for wait_ms in [0u64, 200] {
        let hook = Arc::new(Hook::default());
        let (_drive, store) = store_with_one_file_to_move("nested", &hook, wait_ms);
        let outcome: Arc<Mutex<Option<Timed>>> = Arc::default();
        {
            let (store, outcome) = (store.clone(), Arc::clone(&outcome));
            hook.set(move |point| {
                if point == "relocate:claimed" && lock(&outcome).is_none() {
                    let started = Instant::now();
                    let result = store.delete("/w/keep");
                    *lock(&outcome) = Some((result, started.elapsed()));
                }
            });
        }
        store.reclaim_now().unwrap();
        hook.clear();
        let (result, took) = lock(&outcome).take().expect("the hook ran");
        assert!(matches!(result, Err(StoreError::PathBusy(_))), "{result:?}");
        assert!(
            took >= Duration::from_millis(wait_ms) && took < Duration::from_millis(wait_ms + 2000),
            "waited {took:?} for a {wait_ms} ms limit"
        );
        assert_eq!(read_checked(&store, "/w/keep"), Some(content(5, 64 << 10)));
    }
}

/// Attack: a writer (not relocation) holds the path; a delete and a second create must fail
/// with `PathBusy` at once even with a long relocation wait: only relocation's claims are
/// waited for.
#[test]
fn a_path_held_by_a_writer_fails_at_once_whatever_the_wait() {
    let hook = Arc::new(Hook::default());
    let (_drive, store) = store_with_one_file_to_move("writerheld", &hook, 10_000);
    let mut writer = store.create("/w/keep", 10).unwrap();
    writer.append(b"partial").unwrap();
    let started = Instant::now();
    assert!(matches!(
        store.delete("/w/keep"),
        Err(StoreError::PathBusy(_))
    ));
    assert!(matches!(
        store.create("/w/keep", 1),
        Err(StoreError::PathBusy(_))
    ));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // Relocation skips the path while the writer holds it, and nothing is lost.
    store.reclaim_now().unwrap();
    assert_eq!(store.stats().relocated_files, 0);
    writer.abort();
    assert_eq!(read_checked(&store, "/w/keep"), Some(content(5, 64 << 10)));
}

/// Attack: a careless operator sets `relocation_wait_ms` to `u64::MAX` ("wait forever"). A
/// create or delete must not panic computing its deadline.
#[test]
fn a_huge_relocation_wait_does_not_panic() {
    let drive = sim_drive("hugewait", 16 << 20, 9, SimFaults::default());
    let config = StoreConfig {
        relocation_wait_ms: u64::MAX,
        ..StoreConfig::default()
    };
    let store = open(&[as_dyn(&drive)], config);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        put(&store, "/huge", b"bytes").and_then(|()| store.delete("/huge"))
    }));
    match outcome {
        Ok(result) => assert!(result.expect("create and delete work"), "deleted"),
        Err(panic) => panic!("create/delete panicked: {}", panic_text(&*panic)),
    }
}

// ---------------------------------------------------------------------------------------------
// Rot found by relocation
// ---------------------------------------------------------------------------------------------

/// Attack: a source extent has rotted and a reader opens the file while the pass runs (after
/// victims were chosen: a handle held from before would pin the segment out of the pass). The
/// file leaves the index (counted), the reader keeps its pinned handle and reads the same bytes
/// as before even after the drive is refilled, nothing panics, and the other files of the
/// segment move intact.
#[test]
fn rotted_source_found_by_relocation_while_a_reader_holds_the_file() {
    let hook = Arc::new(Hook::default());
    let drive = sim_drive("rot", 32 << 20, 11, SimFaults::default());
    let store = open(&[as_dyn(&drive)], config_with(&hook));
    let size = 96 << 10;
    for number in 0..32 {
        put(&store, &format!("/f/{number}"), &content(number, size)).unwrap();
    }
    let before = {
        let handle = store.open_file("/f/5").unwrap().unwrap();
        let spot = handle.ranges(1000, 1)[0];
        let mut byte = [0u8];
        handle.read_at(1000, &mut byte).unwrap();
        drive.corrupt(spot.offset_bytes, &[byte[0] ^ 0x40]);
        read_handle(&handle)
    };
    assert_ne!(sha(&before), sha(&content(5, size)), "the rot is visible");
    for number in (0..32).filter(|number| ![3, 5, 11].contains(number)) {
        assert!(store.delete(&format!("/f/{number}")).unwrap());
    }
    let held: Arc<Mutex<Option<FileHandle>>> = Arc::default();
    {
        let (store, held) = (store.clone(), Arc::clone(&held));
        hook.set(move |point| {
            let mut held = lock(&held);
            if point == "relocate:next" && held.is_none() {
                *held = Some(store.open_file("/f/5").unwrap().expect("visible"));
            }
        });
    }
    store
        .reclaim_now()
        .expect("a rotted source is not a failed pass");
    hook.clear();
    assert!(
        store.open_file("/f/5").unwrap().is_none(),
        "taken out of the index"
    );
    let stats = store.stats();
    assert_eq!(stats.corrupt_files_removed, 1);
    assert_eq!(stats.relocated_files, 2);
    assert_eq!(stats.drives[0].status, DriveStatus::Ok);
    let mut refill = 0;
    while put(
        &store,
        &format!("/refill/{refill}"),
        &content(900 + refill, size),
    )
    .is_ok()
    {
        refill += 1;
        store.maintain().unwrap();
    }
    let held = lock(&held)
        .take()
        .expect("the reader opened the file mid-pass");
    assert_eq!(
        read_handle(&held),
        before,
        "the held handle's bytes stayed put"
    );
    drop(held);
    for number in [3, 11] {
        assert_eq!(
            read_checked(&store, &format!("/f/{number}")),
            Some(content(number, size))
        );
    }
    // The path is free for the next fill to fetch it again.
    assert!(store.delete("/refill/0").unwrap());
    store.reclaim_now().unwrap();
    put(&store, "/f/5", &content(5, 1000)).expect("the path can be written again");
    assert_eq!(read_checked(&store, "/f/5"), Some(content(5, 1000)));
}

// ---------------------------------------------------------------------------------------------
// Drive failure during reclaim and commits
// ---------------------------------------------------------------------------------------------

/// A path and the bytes it must read back.
type LiveFile = (String, Vec<u8>);

/// Two drives, each with mostly dead segments and a few live files; returns the live files.
fn two_drive_store(hook: &Arc<Hook>, seed: u64) -> ([Arc<SimDrive>; 2], Store, Vec<LiveFile>) {
    let drives = [
        sim_drive("twin0", 32 << 20, seed, SimFaults::default()),
        sim_drive("twin1", 32 << 20, seed + 1, SimFaults::default()),
    ];
    let store = open(&[as_dyn(&drives[0]), as_dyn(&drives[1])], config_with(hook));
    let size = 64 << 10;
    let mut live = Vec::new();
    for number in 0..96u64 {
        let path = format!("/t/{number}");
        let bytes = content(seed * 1000 + number, size);
        put(&store, &path, &bytes).unwrap();
        live.push((path, bytes));
    }
    live.retain(|(path, _)| {
        let keep = path.ends_with('0') || path.ends_with('7');
        if !keep {
            assert!(store.delete(path).unwrap());
        }
        keep
    });
    (drives, store, live)
}

/// Attack: drive 0 dies (every operation fails, or only reads fail: a bad area) at each point
/// of a reclaim pass in turn. No panic; the pass reports the failure; the drive is out of
/// service; every file of the other drive still reads byte-exact, and the other drive takes new
/// files; no file reads wrong bytes.
#[test]
fn a_drive_failing_in_the_middle_of_a_reclaim_pass() {
    for reads_only in [false, true] {
        for fail_at in 1..=8u64 {
            let hook = Arc::new(Hook::default());
            let (drives, store, live) = two_drive_store(&hook, 20 + fail_at);
            let calls = Arc::new(AtomicU64::new(0));
            let failed = Arc::new(AtomicBool::new(false));
            {
                let (calls, failed, victim) = (
                    Arc::clone(&calls),
                    Arc::clone(&failed),
                    Arc::clone(&drives[0]),
                );
                hook.set(move |_| {
                    if calls.fetch_add(1, Ordering::SeqCst) + 1 == fail_at {
                        if reads_only {
                            victim.set_faults(SimFaults {
                                read_error_ppm: 1_000_000,
                                ..SimFaults::default()
                            });
                        } else {
                            victim.fail();
                        }
                        failed.store(true, Ordering::SeqCst);
                    }
                });
            }
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let first = store.reclaim_now();
                let second = store.reclaim_now();
                (first, second)
            }));
            hook.clear();
            let (first, second) = match outcome {
                Ok(results) => results,
                Err(panic) => panic!(
                    "fail_at {fail_at} reads_only {reads_only}: panic {}",
                    panic_text(&*panic)
                ),
            };
            assert!(
                failed.load(Ordering::SeqCst),
                "the failure point was reached"
            );
            // Every failure is seen at the next operation; a bad area only at the next read.
            if !reads_only {
                assert!(
                    first.is_err() || matches!(status_of(&store, "twin0"), DriveStatus::Failed(_)),
                    "fail_at {fail_at}: the pass ran into the dead drive: {first:?}"
                );
                assert!(
                    second.is_ok(),
                    "the next pass skips the dead drive: {second:?}"
                );
            }
            for (path, bytes) in &live {
                let found = match store.open_file(path) {
                    Ok(found) => found,
                    // The first read of the bad area reports it and takes the drive out.
                    Err(StoreError::Io { .. }) if reads_only => store.open_file(path).unwrap(),
                    Err(error) => panic!("{path}: {error}"),
                };
                match found {
                    Some(handle) => {
                        assert_eq!(handle.drive_path().to_string_lossy(), "twin1", "{path}");
                        assert_eq!(&read_handle(&handle), bytes, "{path}");
                    }
                    None => assert!(
                        matches!(status_of(&store, "twin0"), DriveStatus::Failed(_)),
                        "{path} vanished from a healthy store"
                    ),
                }
            }
            assert!(
                matches!(status_of(&store, "twin0"), DriveStatus::Failed(_)),
                "fail_at {fail_at}: the dead drive is out of service"
            );
            assert!(store.reclaim_now().is_ok(), "passes skip the dead drive");
            let on_twin1 = live
                .iter()
                .filter(|(path, _)| store.open_file(path).unwrap().is_some())
                .count();
            assert!(on_twin1 > 0, "the other drive keeps serving");
            put(&store, "/after/failure", &content(1, 5000)).expect("the other drive takes files");
            assert_eq!(
                read_checked(&store, "/after/failure"),
                Some(content(1, 5000))
            );
        }
    }
}

/// Attack: a reader hits a bad sector (one read fails, writes still work) on a drive while a
/// commit on that drive is between its flushes: `fail_drive` empties the drive's index entries
/// under the committer's feet. The commit must fail or succeed cleanly -- no panic from the
/// index update that follows ("replaced version not indexed", "deleted file not indexed") --
/// and the other drive keeps serving.
#[test]
fn a_read_error_on_a_drive_while_one_of_its_commits_is_in_flight() {
    for operation in ["replace", "delete", "new file", "relocation"] {
        let hook = Arc::new(Hook::default());
        let sims = [
            sim_drive("hookA", 32 << 20, 31, SimFaults::default()),
            sim_drive("hookB", 32 << 20, 32, SimFaults::default()),
        ];
        let drive_a = HookDrive::new(Arc::clone(&sims[0]));
        let store = open(
            &[Arc::clone(&drive_a) as Arc<dyn Drive>, as_dyn(&sims[1])],
            config_with(&hook),
        );
        let size = 64 << 10;
        let target = path_on(&store, "/target", "hookA");
        let other = path_on(&store, "/other", "hookA");
        let safe = path_on(&store, "/safe", "hookB");
        for (number, path) in [&target, &other, &safe].into_iter().enumerate() {
            put(&store, path, &content(number as u64, size)).unwrap();
        }
        // What the reader on another thread does while the commit is in flight.
        let reader_hits_bad_sector = {
            let (store, drive_a, other) = (store.clone(), Arc::clone(&drive_a), other.clone());
            move || {
                std::thread::spawn(move || {
                    drive_a.fail_reads.store(true, Ordering::SeqCst);
                    let result = store.open_file(&other);
                    assert!(
                        matches!(result, Err(StoreError::Io { .. })),
                        "the read error is reported"
                    );
                })
                .join()
                .expect("reader thread");
            }
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match operation {
            "replace" => {
                let mut writer = store.create(&target, 1000).unwrap();
                writer.append(&content(50, 1000)).unwrap();
                drive_a.at_next_flush(reader_hits_bad_sector);
                writer.publish(sha(&content(50, 1000))).err()
            }
            "delete" => {
                drive_a.at_next_flush(reader_hits_bad_sector);
                store.delete(&target).err()
            }
            "new file" => {
                let fresh = path_on(&store, "/fresh", "hookA");
                let mut writer = store.create(&fresh, 1000).unwrap();
                writer.append(&content(51, 1000)).unwrap();
                drive_a.at_next_flush(reader_hits_bad_sector);
                writer.publish(sha(&content(51, 1000))).err()
            }
            _ => {
                // Fill drive A with dead space around the target so reclaim moves it.
                for number in 0..40 {
                    let path = path_on(&store, &format!("/dead{number}"), "hookA");
                    put(&store, &path, &content(100 + number, size)).unwrap();
                    store.delete(&path).unwrap();
                }
                let armed = Mutex::new(Some(reader_hits_bad_sector));
                let drive_a = Arc::clone(&drive_a);
                hook.set(move |point| {
                    if point == "relocate:claimed" {
                        if let Some(action) = lock(&armed).take() {
                            drive_a.at_next_flush(action);
                        }
                    }
                });
                store.reclaim_now().err()
            }
        }));
        hook.clear();
        let error = match outcome {
            Ok(error) => error,
            Err(panic) => panic!("{operation}: the store panicked: {}", panic_text(&*panic)),
        };
        assert!(
            matches!(status_of(&store, "hookA"), DriveStatus::Failed(_)),
            "{operation}: drive A is out of service"
        );
        if operation == "relocation" {
            assert!(error.is_some(), "relocation: the pass reports the failure");
        }
        assert!(store.open_file(&target).unwrap().is_none(), "{operation}");
        assert_eq!(read_checked(&store, &safe), Some(content(2, size)));
        assert_eq!(
            store.file_count(),
            1,
            "{operation}: only drive B's file is counted (no stale entry of drive A)"
        );
        put(&store, "/after", &content(9, 3000)).expect("drive B takes new files");
        assert_eq!(read_checked(&store, "/after"), Some(content(9, 3000)));
    }
}

/// Attack: the Publish record of a file rots on disk while a writer replacing that file is
/// open. A reader's lookup finds the record corrupt and drops the entry from the index; the
/// writer then publishes. That must not panic ("replaced version not indexed"): the new version
/// is served and the store keeps working.
#[test]
fn a_rotted_record_under_an_open_writer() {
    let drive = sim_drive("rotrec", 16 << 20, 41, SimFaults::default());
    let store = open(&[as_dyn(&drive)], StoreConfig::default());
    let path = "/rot/record-under-writer.mp4";
    put(&store, path, &content(1, 20_000)).unwrap();
    let mut writer = store.create(path, 20_000).unwrap();
    writer.append(&content(2, 20_000)).unwrap();
    // Find the record by its path bytes and flip one of them.
    let image =
        appliance_device::read_exact_at(&*drive, 0, AlignedBuf::new((16 << 20) as usize)).unwrap();
    let at = image
        .windows(path.len())
        .position(|window| window == path.as_bytes())
        .expect("the record holds the path");
    drive.corrupt(at as u64, &[image[at] ^ 1]);
    let lookup = store.open_file(path).map(|found| found.is_some());
    assert!(
        matches!(lookup, Err(StoreError::Corrupt { .. })),
        "{lookup:?}"
    );
    let published = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        writer.publish(sha(&content(2, 20_000)))
    }));
    match published {
        Ok(result) => {
            result.expect("publishing the replacement");
            assert_eq!(read_checked(&store, path), Some(content(2, 20_000)));
        }
        Err(panic) => panic!("publish panicked: {}", panic_text(&*panic)),
    }
}

// ---------------------------------------------------------------------------------------------
// Power cuts during relocation
// ---------------------------------------------------------------------------------------------

/// Attack: the power goes after 0, 1, 2, ... operations of a reclaim pass that relocates files
/// (and a checkpoint after it), with unflushed writes lost, torn and reordered at the crash.
/// After each crash the store reopens with every acknowledged file intact, with its original
/// publish time and nothing else; a reclaim pass on the recovered store works too.
#[test]
fn power_cut_at_every_step_of_relocation() {
    let size = 64 << 10;
    let mut cuts = 0;
    for operations in 0u64.. {
        let faults = SimFaults {
            crash_lose_ppm: 300_000,
            crash_tear_ppm: 300_000,
            ..SimFaults::default()
        };
        let drive = sim_drive("power", 24 << 20, 500 + operations, faults);
        let hook = Arc::new(Hook::default());
        let store = open(&[as_dyn(&drive)], config_with(&hook));
        let mut acknowledged: HashMap<String, (Vec<u8>, u64)> = HashMap::new();
        for number in 0..40u64 {
            let path = format!("/pc/{number}");
            put(&store, &path, &content(number, size)).unwrap();
            if number % 4 == 0 {
                let published = store.open_file(&path).unwrap().unwrap().published_unix_s();
                acknowledged.insert(path, (content(number, size), published));
            }
        }
        for number in (0..40).filter(|number| number % 4 != 0) {
            assert!(store.delete(&format!("/pc/{number}")).unwrap());
        }
        drive.cut_power_after(operations);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let pass = store.reclaim_now();
            let checkpoint = store.checkpoint();
            (pass, checkpoint)
        }));
        if let Err(panic) = outcome {
            panic!(
                "power cut after {operations}: panic {}",
                panic_text(&*panic)
            );
        }
        let moved = store.stats().relocated_files;
        let cut = !matches!(store.stats().drives[0].status, DriveStatus::Ok);
        drop(store);
        drive.crash();
        let store = open(&[as_dyn(&drive)], config_with(&hook));
        let check = |store: &Store, when: &str| {
            assert_eq!(store.stats().drives[0].status, DriveStatus::Ok, "{when}");
            let listed = store.list_files().unwrap();
            assert_eq!(listed.len(), acknowledged.len(), "{when}: files listed");
            for (path, (bytes, published)) in &acknowledged {
                let handle = store
                    .open_file(path)
                    .unwrap()
                    .unwrap_or_else(|| panic!("{when}: {path} lost"));
                assert_eq!(&read_handle(&handle), bytes, "{when}: {path} bytes");
                assert_eq!(handle.published_unix_s(), *published, "{when}: {path} time");
                handle
                    .verify()
                    .unwrap_or_else(|error| panic!("{when}: {path}: {error}"));
            }
        };
        let when = format!("cut after {operations} operations");
        check(&store, &when);
        store.reclaim_now().expect("reclaim after recovery");
        check(&store, &format!("{when}, then reclaim"));
        if !cut {
            assert!(moved > 0, "the uncut pass relocated files");
            break;
        }
        cuts += 1;
        assert!(operations < 500, "the pass never finished");
    }
    println!("power cut at {cuts} points of a relocating pass and checkpoint");
    assert!(cuts > 5, "the pass had only {cuts} cut points");
}

/// Attack: after a failed drive's pass, its stats stay consistent: `files` is zero for it and
/// listing the store never reports files of the dead drive.
#[test]
fn listing_after_a_drive_failure_mid_pass_shows_only_live_files() {
    let hook = Arc::new(Hook::default());
    let (drives, store, live) = two_drive_store(&hook, 60);
    let victim = Arc::clone(&drives[0]);
    let fired = Arc::new(AtomicUsize::new(0));
    {
        let fired = Arc::clone(&fired);
        hook.set(move |point| {
            if point == "relocate:copied" && fired.fetch_add(1, Ordering::SeqCst) == 0 {
                victim.fail();
            }
        });
    }
    let _ = store.reclaim_now();
    hook.clear();
    assert!(fired.load(Ordering::SeqCst) > 0);
    let listed = store.list_files().expect("listing skips the dead drive");
    let stats = store.stats();
    let dead = stats
        .drives
        .iter()
        .find(|drive| drive.path.to_string_lossy() == "twin0")
        .unwrap();
    assert!(matches!(dead.status, DriveStatus::Failed(_)));
    assert_eq!(dead.files, 0);
    assert_eq!(listed.len() as u64, store.file_count());
    for file in &listed {
        let expected = &live.iter().find(|(path, _)| *path == file.path).unwrap().1;
        assert_eq!(read_checked(&store, &file.path).as_ref(), Some(expected));
    }
}

/// Attack: a drive one file short of its `files_max`, and a new file created while reclaim is
/// moving a file on it. Relocation replaces a file, it never adds one, so the new file fits; a
/// spurious `IndexFull` (not retryable) would make a fill give the file up.
#[test]
fn relocation_does_not_count_against_files_max() {
    let hook = Arc::new(Hook::default());
    let drive = Arc::new(SimDrive::new(&SimConfig {
        name: "filesmax".into(),
        size_bytes: 32 << 20,
        seed: 51,
        faults: SimFaults::default(),
    }));
    let files_max = 48;
    let options = FormatOptions {
        segment_bytes: SEGMENT_BYTES,
        files_max: Some(files_max),
        force: false,
        drive_uuid: [51; 16],
        now_unix_s: 1_700_000_000,
    };
    format_drive(&*drive, &options).expect("format");
    let store = open(&[as_dyn(&drive)], config_with(&hook));
    for number in 0..40 {
        put(&store, &format!("/w/{number}"), &content(number, 64 << 10)).unwrap();
    }
    for number in (0..32).filter(|number| *number != 5) {
        assert!(store.delete(&format!("/w/{number}")).unwrap());
    }
    let mut small = 0;
    while store.file_count() < files_max - 1 {
        put(&store, &format!("/small/{small}"), &content(small, 100)).unwrap();
        small += 1;
    }
    let outcome: Arc<Mutex<Option<Result<(), StoreError>>>> = Arc::default();
    {
        let (store, outcome) = (store.clone(), Arc::clone(&outcome));
        hook.set(move |point| {
            if point == "relocate:claimed" && lock(&outcome).is_none() {
                *lock(&outcome) = Some(put(&store, "/last-one", b"fits"));
            }
        });
    }
    store.reclaim_now().unwrap();
    hook.clear();
    assert!(store.stats().relocated_files > 0, "a file was moved");
    let result = lock(&outcome).take().expect("created during the move");
    assert!(
        result.is_ok(),
        "a new file while relocation runs: {result:?}"
    );
    assert_eq!(store.file_count(), files_max);
    assert!(matches!(
        put(&store, "/one-too-many", b"x"),
        Err(StoreError::IndexFull)
    ));
}

/// Attack: a panic inside a group commit (here: the drive's flush panics once). Where the
/// daemon does not abort (tests that catch panics), the leader's flag must not stay set: later
/// commits on the drive complete instead of waiting forever.
#[test]
fn a_panic_inside_a_commit_does_not_wedge_later_commits() {
    let sim = sim_drive("panicky", 32 << 20, 61, SimFaults::default());
    let drive = HookDrive::new(Arc::clone(&sim));
    let store = open(
        &[Arc::clone(&drive) as Arc<dyn Drive>],
        StoreConfig::default(),
    );
    put(&store, "/before", &content(1, 4096)).unwrap();
    drive.at_next_flush(|| panic!("injected panic inside a commit"));
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        put(&store, "/during", &content(2, 4096))
    }));
    assert!(
        panicked.is_err(),
        "the injected panic reached the committer"
    );
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let later = store.clone();
    std::thread::spawn(move || {
        let _ = done_tx.send(put(&later, "/after", &content(3, 4096)));
    });
    let result = done_rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("a commit after the panic completes instead of hanging");
    result.expect("the later commit succeeds");
    assert_eq!(read_checked(&store, "/after"), Some(content(3, 4096)));
    assert_eq!(read_checked(&store, "/before"), Some(content(1, 4096)));
}
