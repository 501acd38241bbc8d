//! Deterministic simulation of the store with concurrent actors: writers republishing,
//! deleters, readers holding handles across steps, reclaim passes as the upkeep thread and the
//! fill run them, and checkpoints, interleaved by the seed. A reclaim pass offers the other
//! actors a turn at every point where real threads could overtake it (`StoreConfig::interleave`),
//! so passes nest in each other and in writes the way threads do, and any interleaving replays
//! from its seed. Power cuts with torn, lost and reordered unflushed writes end each round.
//!
//! Checked on every read: the bytes match the SHA-256 their writer vouched for before
//! publishing, the version is never older than the last acknowledged one (no file goes back to
//! an older version or comes back after a delete), and the publish time is the one the version
//! was first published with (relocation keeps it). After every recovery: every acknowledged
//! file is intact and nothing unacknowledged is visible.
//!
//! `SIM_SEEDS=N` runs N seeds (default 500, on every core), `SIM_FIRST_SEED=F` starts at F;
//! `SIM_SEED=S` replays one seed exactly. `cargo xtask sim --seeds N` runs both simulations.

// Test data generation truncates on purpose; sizes here are small.
#![allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]

mod common;

use appliance_device::{SimDrive, SplitMix64};
use appliance_store::{DriveSource, FileHandle, FileWriter, Store, StoreConfig};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

const DRIVE_BYTES: u64 = 40 << 20;
const PATHS: u64 = 32;
/// Bytes at the head of every file: its version and its path's tag.
const HEADER_BYTES: usize = 16;
/// How deep actors may run inside other actors' reclaim passes.
const NESTING_MAX: u32 = 2;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

fn path_name(number: u64) -> String {
    format!("/video/title-{number:02}/chunk.mp4")
}

fn path_tag(path: &str) -> u64 {
    appliance_store::index::tag_of(path)
}

/// The bytes of `version` of `path`: a header naming both, then seeded filler.
fn content(path: &str, version: u64, size_bytes: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(size_bytes.max(HEADER_BYTES));
    bytes.extend_from_slice(&version.to_le_bytes());
    bytes.extend_from_slice(&path_tag(path).to_le_bytes());
    let mut filler = SplitMix64(version.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    while bytes.len() < size_bytes {
        bytes.extend_from_slice(&filler.next_u64().to_le_bytes());
    }
    bytes.truncate(size_bytes.max(HEADER_BYTES));
    bytes
}

/// What one path went through, in the order its operations finished (the store lets one
/// writer or delete at a time hold a path, so they never overlap).
#[derive(Default)]
struct PathHistory {
    /// (sequence number, visible state afterwards, acknowledged?); `None` is "absent".
    events: Vec<(u64, Option<u64>, bool)>,
    /// The operation holding the path now: publishing a version, or deleting (`None`).
    in_flight: Option<Option<u64>>,
}

impl PathHistory {
    /// States a reader may see between `from` and now: the last acknowledged state at `from`,
    /// anything that happened since, and whatever is in flight.
    fn allowed_since(&self, from: u64) -> Vec<Option<u64>> {
        let base = self
            .events
            .iter()
            .rev()
            .find(|(seq, _, acked)| *seq <= from && *acked)
            .and_then(|(_, state, _)| *state);
        let mut allowed = vec![base];
        allowed.extend(
            self.events
                .iter()
                .filter(|(seq, _, _)| *seq > from)
                .map(|(_, state, _)| *state),
        );
        allowed.extend(self.in_flight);
        allowed
    }

    /// States the store may show after a crash: the last acknowledged state, or any failed
    /// or unfinished operation after it.
    fn allowed_after_crash(&self) -> Vec<Option<u64>> {
        let last_acked = self.events.iter().rposition(|(_, _, acked)| *acked);
        let mut allowed = vec![last_acked.and_then(|at| self.events[at].1)];
        let from = last_acked.map_or(0, |at| at + 1);
        allowed.extend(self.events[from..].iter().map(|(_, state, _)| *state));
        allowed.extend(self.in_flight);
        allowed
    }
}

/// The checker's knowledge: what writers vouched for and what the store acknowledged.
#[derive(Default)]
struct Model {
    seq: u64,
    paths: HashMap<String, PathHistory>,
    /// version -> (path, SHA-256 vouched before publishing).
    vouched: HashMap<u64, (String, [u8; 32])>,
    /// version -> publish time seen right after its publish was acknowledged.
    published_at: HashMap<u64, u64>,
    /// version -> the drive it was published on.
    published_on: HashMap<u64, std::path::PathBuf>,
    /// Drives taken out of service since the last recovery: the simulation does not record
    /// failed drives as the daemon does, so they come back at the next open with the versions
    /// they held, and a newer version or a delete made elsewhere meanwhile may lose to them.
    failed_drives: Vec<std::path::PathBuf>,
    next_version: u64,
    reads_checked: u64,
    bytes_checked: u64,
}

impl Model {
    fn tick(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn finish(&mut self, path: &str, state: Option<u64>, acked: bool) {
        let seq = self.tick();
        let history = self.paths.entry(path.to_string()).or_default();
        history.in_flight = None;
        history.events.push((seq, state, acked));
    }
}

/// One actor of the simulation, with the operation it has in progress.
enum Actor {
    Writer(Option<Writing>),
    Reader(Option<Reading>),
    Deleter,
    /// The upkeep thread (`maintain`) and the fill (`reclaim_now`).
    Reclaimer,
    Checkpointer,
}

struct Writing {
    path: String,
    version: u64,
    bytes: Vec<u8>,
    done: usize,
    writer: FileWriter,
}

struct Reading {
    path: String,
    from_seq: u64,
    handle: FileHandle,
    bytes: Vec<u8>,
}

/// Everything the actors share; actors run one at a time, chosen by the seed.
struct World {
    seed: u64,
    rng: Mutex<SplitMix64>,
    model: Mutex<Model>,
    actors: Mutex<Vec<Option<Actor>>>,
    store: Mutex<Option<Store>>,
    drives: Vec<Arc<SimDrive>>,
    depth: AtomicU64,
    clock: Arc<AtomicU64>,
    /// A drive may be out of service (after a power cut): files may then be missing.
    degraded: std::sync::atomic::AtomicBool,
}

impl World {
    fn below(&self, bound: u64) -> u64 {
        lock(&self.rng).below(bound.max(1))
    }

    fn chance(&self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn store(&self) -> Store {
        lock(&self.store).clone().expect("store open")
    }

    fn fail(&self, what: String) -> ! {
        panic!(
            "seed {}: {what}; replay with SIM_SEED={}",
            self.seed, self.seed
        )
    }

    /// Runs one step of a randomly chosen idle actor.
    fn step_any(&self) {
        let count = lock(&self.actors).len() as u64;
        let at = self.below(count) as usize;
        let Some(actor) = lock(&self.actors)[at].take() else {
            return; // busy further up the stack
        };
        let actor = self.step(actor);
        lock(&self.actors)[at] = Some(actor);
    }

    /// The interleave hook: at a point where a reclaim pass could be overtaken, let other
    /// actors run.
    fn interleave(&self, _point: &'static str) {
        if self.depth.load(Ordering::SeqCst) >= u64::from(NESTING_MAX) || !self.chance(35) {
            return;
        }
        self.depth.fetch_add(1, Ordering::SeqCst);
        for _ in 0..1 + self.below(4) {
            self.step_any();
        }
        self.depth.fetch_sub(1, Ordering::SeqCst);
    }

    fn step(&self, actor: Actor) -> Actor {
        match actor {
            Actor::Writer(writing) => Actor::Writer(self.step_writer(writing)),
            Actor::Reader(reading) => Actor::Reader(self.step_reader(reading)),
            Actor::Deleter => {
                self.delete();
                Actor::Deleter
            }
            Actor::Reclaimer => {
                self.reclaim();
                Actor::Reclaimer
            }
            Actor::Checkpointer => {
                let _ = self.store().checkpoint();
                Actor::Checkpointer
            }
        }
    }

    fn random_path(&self) -> String {
        path_name(self.below(PATHS))
    }

    fn step_writer(&self, writing: Option<Writing>) -> Option<Writing> {
        let Some(mut writing) = writing else {
            return self.start_write();
        };
        let chunk = 1 + self.below(200 << 10) as usize;
        let end = (writing.done + chunk).min(writing.bytes.len());
        if writing
            .writer
            .append(&writing.bytes[writing.done..end])
            .is_err()
        {
            // Never published: recorded as a failed attempt, which only a crash may reveal.
            lock(&self.model).finish(&writing.path, Some(writing.version), false);
            return None;
        }
        writing.done = end;
        if writing.done < writing.bytes.len() {
            return Some(writing);
        }
        self.publish(writing);
        None
    }

    fn start_write(&self) -> Option<Writing> {
        let path = self.random_path();
        let size = match self.below(10) {
            0..=5 => HEADER_BYTES + self.below(300 << 10) as usize,
            6..=8 => HEADER_BYTES + self.below(1 << 20) as usize,
            _ => (2 << 20) + self.below(1 << 20) as usize,
        };
        let writer = self.store().create(&path, size as u64).ok()?;
        let mut model = lock(&self.model);
        model.next_version += 1;
        let version = model.next_version;
        let bytes = content(&path, version, size);
        let sha256: [u8; 32] = Sha256::digest(&bytes).into();
        model.vouched.insert(version, (path.clone(), sha256));
        let history = model.paths.entry(path.clone()).or_default();
        assert!(
            history.in_flight.is_none(),
            "the store let two writers hold {path}"
        );
        history.in_flight = Some(Some(version));
        Some(Writing {
            path,
            version,
            bytes,
            done: 0,
            writer,
        })
    }

    fn publish(&self, writing: Writing) {
        let sha256 = lock(&self.model).vouched[&writing.version].1;
        let acked = writing.writer.publish(sha256).is_ok();
        lock(&self.model).finish(&writing.path, Some(writing.version), acked);
        if acked {
            if let Ok(Some(handle)) = self.store().open_file(&writing.path) {
                if version_of(&handle) == Some(writing.version) {
                    lock(&self.model)
                        .published_at
                        .insert(writing.version, handle.published_unix_s());
                    lock(&self.model)
                        .published_on
                        .insert(writing.version, handle.drive_path());
                }
            }
        }
    }

    fn delete(&self) {
        let path = self.random_path();
        {
            let mut model = lock(&self.model);
            let history = model.paths.entry(path.clone()).or_default();
            if history.in_flight.is_some() {
                // A writer holds the path; the store would refuse with PathBusy.
                drop(model);
                let refused = self.store().delete(&path);
                assert!(
                    refused.is_err(),
                    "a delete got past a writer's claim of {path}"
                );
                return;
            }
            history.in_flight = Some(None);
        }
        match self.store().delete(&path) {
            Ok(true) => lock(&self.model).finish(&path, None, true),
            // Absent, or invisible on a drive out of service (it returns after a restart, as
            // the simulation does not record failed drives).
            Ok(false) => {
                let certain = !self.degraded.load(Ordering::SeqCst);
                lock(&self.model).finish(&path, None, certain);
            }
            // Relocation holds the path for a moment: nothing happened.
            Err(appliance_store::StoreError::PathBusy(_)) => {
                let mut model = lock(&self.model);
                model.paths.get_mut(&path).expect("entered above").in_flight = None;
            }
            Err(_) => lock(&self.model).finish(&path, None, false),
        }
    }

    fn reclaim(&self) {
        let store = self.store();
        // The fill's reclaim waits for a pass in progress; nested in one it would wait for
        // itself, so only the upkeep flavour (which skips a busy drive) nests.
        if self.depth.load(Ordering::SeqCst) == 0 && self.chance(50) {
            let _ = store.reclaim_now();
        } else {
            let _ = store.maintain();
        }
    }

    fn step_reader(&self, reading: Option<Reading>) -> Option<Reading> {
        let Some(mut reading) = reading else {
            return self.start_read();
        };
        let size = reading.handle.size_bytes() as usize;
        let chunk = 1 + self.below(256 << 10) as usize;
        let start = reading.bytes.len();
        let end = (start + chunk).min(size);
        let mut part = vec![0u8; end - start];
        if reading.handle.read_at(start as u64, &mut part).is_err() {
            return None; // the drive failed: the handle's bytes are gone, not wrong
        }
        reading.bytes.extend_from_slice(&part);
        if reading.bytes.len() < size {
            return Some(reading);
        }
        self.check_read(&reading);
        None
    }

    fn start_read(&self) -> Option<Reading> {
        let path = self.random_path();
        let from_seq = lock(&self.model).seq;
        match self.store().open_file(&path) {
            Ok(Some(handle)) => Some(Reading {
                path,
                from_seq,
                handle,
                bytes: Vec::new(),
            }),
            Ok(None) => {
                self.check_state(&path, from_seq, None, "open");
                None
            }
            Err(_) => None,
        }
    }

    /// The bytes read are a version its writer vouched for, of this path, new enough, with its
    /// first publish time.
    fn check_read(&self, reading: &Reading) {
        let bytes = &reading.bytes;
        let sha256: [u8; 32] = Sha256::digest(bytes).into();
        if sha256 != reading.handle.sha256() {
            self.fail(format!(
                "{}: {} bytes read do not match the record's SHA-256",
                reading.path,
                bytes.len()
            ));
        }
        let Some(version) = version_of_bytes(bytes) else {
            self.fail(format!("{}: a file of {} bytes", reading.path, bytes.len()));
        };
        let model = lock(&self.model);
        match model.vouched.get(&version) {
            Some((path, vouched)) if *path == reading.path && *vouched == sha256 => {}
            other => self.fail(format!(
                "{}: bytes of version {version} were never vouched for here ({other:?})",
                reading.path
            )),
        }
        if let Some(first) = model.published_at.get(&version) {
            if *first != reading.handle.published_unix_s() {
                self.fail(format!(
                    "{}: version {version} published at {first}, now says {}",
                    reading.path,
                    reading.handle.published_unix_s()
                ));
            }
        }
        drop(model);
        self.check_state(&reading.path, reading.from_seq, Some(version), "read");
        let mut model = lock(&self.model);
        model.reads_checked += 1;
        model.bytes_checked += bytes.len() as u64;
    }

    fn check_state(&self, path: &str, from_seq: u64, seen: Option<u64>, what: &str) {
        if seen.is_none() && self.degraded.load(Ordering::SeqCst) {
            return;
        }
        let model = lock(&self.model);
        let allowed = model
            .paths
            .get(path)
            .map_or(vec![None], |history| history.allowed_since(from_seq));
        if !allowed.contains(&seen) {
            drop(model);
            self.fail(format!(
                "{what} of {path} saw version {seen:?}; allowed {allowed:?} (an older version \
                 came back, or a published file vanished)"
            ));
        }
    }

    /// Ends every operation in progress: writers give up, readers let go.
    fn quiesce(&self) {
        let failed: Vec<std::path::PathBuf> = self
            .store()
            .stats()
            .drives
            .into_iter()
            .filter(|drive| drive.status != appliance_store::DriveStatus::Ok)
            .map(|drive| drive.path)
            .collect();
        lock(&self.model).failed_drives = failed;
        let mut actors = lock(&self.actors);
        for slot in actors.iter_mut() {
            if let Some(Actor::Writer(Some(writing))) = slot {
                let path = writing.path.clone();
                let version = writing.version;
                *slot = Some(Actor::Writer(None));
                let mut model = lock(&self.model);
                model.finish(&path, Some(version), false);
            } else if let Some(Actor::Reader(Some(_))) = slot {
                *slot = Some(Actor::Reader(None));
            }
        }
    }

    /// After a recovery: every path shows a state it may show; then that state is certain.
    fn check_recovered(&self, store: &Store) {
        let mut model = lock(&self.model);
        let paths: Vec<String> = model.paths.keys().cloned().collect();
        for path in paths {
            let seen = match store.open_file(&path) {
                Ok(Some(handle)) => {
                    let mut bytes = vec![0u8; handle.size_bytes() as usize];
                    handle.read_at(0, &mut bytes).expect("read after recovery");
                    handle
                        .verify()
                        .expect("stored checksums match after recovery");
                    let sha256: [u8; 32] = Sha256::digest(&bytes).into();
                    assert_eq!(sha256, handle.sha256(), "seed {}: {path}", self.seed);
                    let version = version_of_bytes(&bytes).expect("a header");
                    assert_eq!(model.vouched[&version], (path.clone(), sha256));
                    Some(version)
                }
                Ok(None) => None,
                Err(error) => self.fail(format!("opening {path} after recovery: {error}")),
            };
            let history = &model.paths[&path];
            let mut allowed = history.allowed_after_crash();
            let failed_drives = &model.failed_drives;
            let published_on = &model.published_on;
            allowed.extend(history.events.iter().filter_map(|(_, state, acked)| {
                let version = (*state)?;
                let drive = published_on.get(&version)?;
                (*acked && failed_drives.contains(drive)).then_some(Some(version))
            }));
            if !allowed.contains(&seen) {
                self.fail(format!(
                    "after recovery {path} shows {seen:?}; allowed {allowed:?}; history {:?}",
                    history.events
                ));
            }
            let seq = model.tick();
            let history = model.paths.get_mut(&path).expect("listed");
            history.events = vec![(seq, seen, true)];
        }
        let mut visible = 0u64;
        store
            .for_each_file(|path, _| {
                if !model.paths.contains_key(path) {
                    self.fail(format!("{path} visible but never written"));
                }
                visible += 1;
            })
            .expect("listing");
        let present = model
            .paths
            .values()
            .filter(|history| history.events[0].1.is_some())
            .count() as u64;
        assert_eq!(visible, present, "seed {}: visible file count", self.seed);
    }
}

fn version_of_bytes(bytes: &[u8]) -> Option<u64> {
    let head: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(head))
}

fn version_of(handle: &FileHandle) -> Option<u64> {
    let mut head = [0u8; 8];
    handle.read_at(0, &mut head).ok()?;
    Some(u64::from_le_bytes(head))
}

fn new_world(seed: u64) -> Arc<World> {
    let fault_seeds: Vec<u64> = (0..2)
        .map(|n| seed.wrapping_mul(131).wrapping_add(n))
        .collect();
    let drives = common::crash_prone_drives(DRIVE_BYTES, &fault_seeds);
    let mut rng = SplitMix64(seed);
    let mut actors = vec![
        Some(Actor::Reclaimer),
        Some(Actor::Reclaimer),
        Some(Actor::Checkpointer),
        Some(Actor::Deleter),
    ];
    for _ in 0..2 + rng.below(3) {
        actors.push(Some(Actor::Writer(None)));
    }
    for _ in 0..2 + rng.below(3) {
        actors.push(Some(Actor::Reader(None)));
    }
    Arc::new(World {
        seed,
        rng: Mutex::new(rng),
        model: Mutex::new(Model::default()),
        actors: Mutex::new(actors),
        store: Mutex::new(None),
        drives,
        depth: AtomicU64::new(0),
        clock: Arc::new(AtomicU64::new(1_700_000_000)),
        degraded: Default::default(),
    })
}

fn open_store(world: &Arc<World>) -> Store {
    let hook_world = Arc::downgrade(world);
    let clock = Arc::clone(&world.clock);
    let config = StoreConfig {
        write_buffer_bytes: 64 << 10,
        writes_in_flight_max: 3,
        checkpoint_interval_log_bytes: 96 << 10,
        // Every upkeep pass reclaims, so passes overlap as often as possible.
        reclaim_free_segments_min: usize::MAX,
        reclaim_live_percent_max: 70,
        // One thread: a write nested in a pass must not wait for that pass's claim.
        relocation_wait_ms: 0,
        clock: Arc::new(move || clock.fetch_add(1, Ordering::SeqCst)),
        interleave: Some(Arc::new(move |point| {
            if let Some(world) = hook_world.upgrade() {
                world.interleave(point);
            }
        })),
        ..StoreConfig::default()
    };
    let sources = world
        .drives
        .iter()
        .map(|drive| DriveSource::Opened(Arc::clone(drive) as Arc<dyn appliance_device::Drive>))
        .collect();
    Store::open(sources, config)
}

/// Statistics of one seed, for the summary line.
#[derive(Default)]
struct Outcome {
    reads_checked: u64,
    bytes_checked: u64,
}

fn run_seed(seed: u64) -> Outcome {
    let world = new_world(seed);
    let rounds = 2 + world.below(3);
    for round in 0..rounds {
        let store = open_store(&world);
        if round > 0 {
            world.check_recovered(&store);
        }
        *lock(&world.store) = Some(store);
        world.degraded.store(false, Ordering::SeqCst);
        for _ in 0..150 + world.below(250) {
            world.step_any();
        }
        // Cut the power somewhere in the next operations and keep working into the dark.
        let victim = world.below(world.drives.len() as u64) as usize;
        let after = world.below(60);
        world.drives[victim].cut_power_after(after);
        if world.chance(30) {
            for drive in &world.drives {
                drive.cut_power_after(after);
            }
        }
        world.degraded.store(true, Ordering::SeqCst);
        for _ in 0..20 {
            world.step_any();
        }
        world.quiesce();
        lock(&world.store).take();
        for drive in &world.drives {
            drive.crash();
        }
    }
    let store = open_store(&world);
    world.check_recovered(&store);
    let model = lock(&world.model);
    Outcome {
        reads_checked: model.reads_checked,
        bytes_checked: model.bytes_checked,
    }
}

#[test]
fn concurrent_simulation_seeds() {
    if let Ok(seed) = std::env::var("SIM_SEED") {
        let outcome = run_seed(seed.parse().expect("SIM_SEED is a number"));
        println!(
            "concurrent simulation: seed {seed} passed, {} reads checked",
            outcome.reads_checked
        );
        return;
    }
    let seeds: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(500);
    let first: u64 = std::env::var("SIM_FIRST_SEED")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(0);
    // Seeds are independent worlds: run them on every core, each replayable alone.
    let next = AtomicU64::new(first);
    let failed = Mutex::new(Vec::new());
    let total = Mutex::new(Outcome::default());
    let workers = std::thread::available_parallelism().map_or(2, |count| count.get());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::SeqCst);
                if seed >= first + seeds {
                    break;
                }
                match std::panic::catch_unwind(|| run_seed(seed)) {
                    Ok(outcome) => {
                        let mut total = lock(&total);
                        total.reads_checked += outcome.reads_checked;
                        total.bytes_checked += outcome.bytes_checked;
                    }
                    Err(_) => lock(&failed).push(seed),
                }
            });
        }
    });
    let mut failed = failed.into_inner().unwrap();
    failed.sort_unstable();
    if let Some(seed) = failed.first() {
        panic!("concurrent simulation failed for seeds {failed:?}; replay with SIM_SEED={seed}");
    }
    let total = total.into_inner().unwrap();
    assert!(total.reads_checked > seeds, "readers checked too little");
    println!(
        "concurrent simulation: {seeds} seeds from {first} passed; {} reads checked, {} MiB",
        total.reads_checked,
        total.bytes_checked >> 20
    );
}
