//! `cargo xtask soak --rounds N [--seed S] [--release]`: the crash soak of the real daemon.
//! Each round starts `applianced run` on two small file-backed drives, checks what it serves,
//! starts a fill from nginx on loopback and SIGKILLs the daemon in the middle of it (at a
//! seeded point: early, during the manifest fetch, plan and deletes, or after a seeded share
//! of the fill's bytes). The fills alternate between two manifests that do not fit on the
//! drives together, so deletes and reclaim run under the kills; a shared part stays, and a
//! few paths change content between the two. Every few rounds a fill is let complete.
//!
//! After every restart, every path of both manifests is requested and checked: a 200 carries
//! exactly the bytes of one version the origin published for that path (never a partial
//! file), and a file that a completed fill published for the current manifest is neither lost
//! nor changed. After a completed fill every file of the manifest is served exactly.
//!
//! The seed fixes the catalog, the manifest sequence, the kill points and which fills
//! complete; `--seed S` replays them (the kill lands at the same share of the fill, not at the
//! same instruction). The summary goes to standard output and target/soak/soak.json; the
//! daemon's log to target/soak/daemon.log. Fills are started and watched with
//! `appliance-ctl` on the control socket, as an operator would; the origin is `bench_fill`'s;
//! processes, HTTP, the configuration and the manifests come from `appliance-testkit`.

use crate::bench_fill::{launch, start_origin};
use crate::util::{build_appliance, output, workspace_root};
use anyhow::{bail, Context, Result};
use appliance_testkit::{
    free_port, get, seeded_bytes, sha256_hex, Config, Ctl, Fill, Guard, Manifest, ManifestFile,
    Nginx, Serve, SplitMix64,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// Two drives of this size with 2 MiB segments: about 220 MiB for files.
const DRIVE_BYTES: u64 = 112 * MIB;
const DRIVE_COUNT: usize = 2;
const SEGMENT_MIB: u64 = 2;
/// Bytes of the files both manifests hold (the changed paths among them).
const SHARED_BYTES: u64 = 20 * MIB;
/// Bytes of the files only one manifest holds: each manifest is about 130 MiB, both together
/// about 240 MiB, more than the drives take.
const ONLY_BYTES: u64 = 110 * MIB;
const FILE_BYTES_MIN: u64 = 64 << 10;
const FILE_BYTES_MAX: u64 = 8 * MIB;
/// Shared paths whose content differs between the two manifests.
const CHANGED_PATHS: usize = 2;
/// The fill's cap: a 130 MiB fill lasts over a second, so kills land inside it.
const BANDWIDTH_BITS_PER_S: u64 = 800_000_000;
/// A fill is let complete at least once in this many rounds.
const COMPLETE_EVERY_MAX: u64 = 4;
/// How long a fill, a start or a stop may take before the soak calls it stuck.
const FILL_DEADLINE: Duration = Duration::from_secs(180);
const START_DEADLINE: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(30);

const USAGE: &str = "usage: cargo xtask soak --rounds N [--seed S] [--release]";

/// What the command line asked for.
#[derive(Clone, Copy)]
pub struct Options {
    pub rounds: u64,
    pub seed: u64,
    pub release: bool,
}

impl Options {
    pub fn parse(args: &[&str]) -> Result<Options> {
        let mut options = Options {
            rounds: 20,
            seed: seed_from_clock(),
            release: false,
        };
        let mut words = args.iter();
        while let Some(word) = words.next() {
            let mut value = || -> Result<u64> {
                let text = words
                    .next()
                    .with_context(|| format!("{word} needs a value"))?;
                text.parse()
                    .with_context(|| format!("{word} {text}: not a number"))
            };
            match *word {
                "--rounds" => options.rounds = value()?,
                "--seed" => options.seed = value()?,
                "--release" => options.release = true,
                _ => bail!("{USAGE}"),
            }
        }
        Ok(options)
    }
}

fn seed_from_clock() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(now.as_nanos() % u128::from(u64::MAX)).unwrap_or(1)
        ^ u64::from(std::process::id())
}

pub fn run(args: &[&str]) -> Result<()> {
    soak(Options::parse(args)?)
}

/// Runs the soak; fails when any check failed (after writing the summary).
pub fn soak(options: Options) -> Result<()> {
    println!(
        "soak: seed {} ({} rounds; replay with: cargo xtask soak --rounds {} --seed {}{})",
        options.seed,
        options.rounds,
        options.rounds,
        options.seed,
        if options.release { " --release" } else { "" }
    );
    let binary = build_appliance(options.release)?;
    let dir = workspace_root().join("target/soak");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let started = Instant::now();
    let mut soak = Soak::prepare(&binary, &dir, options.seed)?;
    let result = soak.run_rounds(options.rounds);
    let seconds = started.elapsed().as_secs_f64();
    let summary = soak.summary(options, seconds, result.as_ref().err());
    println!("{summary}");
    std::fs::write(dir.join("soak.json"), format!("{summary}\n"))?;
    result?;
    if !soak.counts.failures.is_empty() {
        bail!(
            "soak: {} check(s) failed; seed {}; see {}",
            soak.counts.failures.len(),
            options.seed,
            dir.display()
        );
    }
    Ok(())
}

/// True once in `count` draws of `rng`.
fn one_in(rng: &mut SplitMix64, count: u64) -> bool {
    rng.below(count) == 0
}

/// One published version of a path: what the origin serves while a manifest holding it is
/// current.
struct Version {
    path: String,
    bytes: Vec<u8>,
    sha256_hex: String,
}

/// The two manifests, as indexes into `versions`.
struct Catalog {
    versions: Vec<Version>,
    manifests: [Vec<usize>; 2],
}

impl Catalog {
    fn generate(rng: &mut SplitMix64) -> Catalog {
        let mut catalog = Catalog {
            versions: Vec::new(),
            manifests: [Vec::new(), Vec::new()],
        };
        for (number, size) in fill_budget(rng, SHARED_BYTES).into_iter().enumerate() {
            let first = catalog.add(None, size, rng);
            catalog.manifests[0].push(first);
            let second = if number < CHANGED_PATHS {
                let path = catalog.versions[first].path.clone();
                let size = FILE_BYTES_MIN + rng.below(FILE_BYTES_MAX - FILE_BYTES_MIN);
                catalog.add(Some(path), size, rng)
            } else {
                first
            };
            catalog.manifests[1].push(second);
        }
        for which in 0..2 {
            for size in fill_budget(rng, ONLY_BYTES) {
                let id = catalog.add(None, size, rng);
                catalog.manifests[which].push(id);
            }
        }
        catalog
    }

    /// A new version of `path` (`None`: a new path); returns its id.
    fn add(&mut self, path: Option<String>, size_bytes: u64, rng: &mut SplitMix64) -> usize {
        let path =
            path.unwrap_or_else(|| format!("/soak/title-{:03}/main.mp4", self.versions.len() + 1));
        self.versions
            .push(Version::generate(path, size_bytes, rng.next_u64()));
        self.versions.len() - 1
    }

    /// Every version of `path`.
    fn versions_of<'a>(&'a self, path: &'a str) -> impl Iterator<Item = usize> + 'a {
        (0..self.versions.len()).filter(move |id| self.versions[*id].path == path)
    }

    /// Every path of either manifest, once.
    fn paths(&self) -> Vec<String> {
        let mut paths: Vec<String> = self.versions.iter().map(|v| v.path.clone()).collect();
        paths.sort();
        paths.dedup();
        paths
    }

    fn manifest_bytes(&self, which: usize) -> u64 {
        self.manifests[which]
            .iter()
            .map(|id| self.versions[*id].bytes.len() as u64)
            .sum()
    }

    /// The manifest document: rank by position.
    fn manifest_json(&self, which: usize, generation: u64) -> String {
        let files = self.manifests[which]
            .iter()
            .zip(1u64..)
            .map(|(id, rank)| {
                let version = &self.versions[*id];
                ManifestFile {
                    path: version.path.clone(),
                    size_bytes: version.bytes.len() as u64,
                    sha256: version.sha256_hex.clone(),
                    rank,
                }
            })
            .collect();
        // A distinct time per publication, as a control plane would stamp it.
        let generated_at = format!(
            "2026-11-23T02:{:02}:{:02}Z",
            generation / 60 % 60,
            generation % 60
        );
        let manifest = Manifest {
            generated_at,
            files,
            ..Manifest::default()
        };
        manifest.to_json()
    }
}

/// File sizes adding up to about `budget` bytes.
fn fill_budget(rng: &mut SplitMix64, budget: u64) -> Vec<u64> {
    let mut sizes = Vec::new();
    let mut left = budget;
    while left >= FILE_BYTES_MIN {
        let size = (FILE_BYTES_MIN + rng.below(FILE_BYTES_MAX - FILE_BYTES_MIN)).min(left);
        sizes.push(size);
        left -= size;
    }
    sizes
}

impl Version {
    fn generate(path: String, size_bytes: u64, seed: u64) -> Version {
        let mut version = Version {
            path,
            bytes: Vec::new(),
            sha256_hex: String::new(),
        };
        version.fill(size_bytes, seed);
        version
    }

    /// Seeded bytes (distinct per version) and their SHA-256.
    fn fill(&mut self, size_bytes: u64, seed: u64) {
        let size = usize::try_from(size_bytes).expect("file sizes fit in memory");
        self.bytes = seeded_bytes(seed, size);
        self.sha256_hex = sha256_hex(&self.bytes);
    }
}

/// What the soak counted.
#[derive(Default)]
struct Counts {
    rounds: u64,
    kills: u64,
    kills_mid_fill: u64,
    fills_completed: u64,
    /// Deletes the completed fills reported (deletes of killed fills are not reported).
    files_deleted: u64,
    files_checked: u64,
    bytes_compared: u64,
    failures: Vec<String>,
    round_seconds: Vec<f64>,
}

/// The soak's world: drives, origin, daemon config, catalog, and what must survive.
struct Soak {
    binary: PathBuf,
    dir: PathBuf,
    config: PathBuf,
    port: u16,
    admin_port: u16,
    /// `appliance-ctl` on the daemon's control socket.
    ctl: Ctl,
    origin: Nginx,
    catalog: Catalog,
    rng: SplitMix64,
    /// The manifest fills use now (0 or 1).
    current: usize,
    /// Manifest publications so far (stamps `generated_at`).
    generation: u64,
    /// Path -> version a completed fill published and the current manifest still names.
    guaranteed: BTreeMap<String, usize>,
    rounds_since_completion: u64,
    counts: Counts,
}

impl Soak {
    fn prepare(binary: &Path, dir: &Path, seed: u64) -> Result<Soak> {
        let mut rng = SplitMix64(seed);
        let catalog = Catalog::generate(&mut rng);
        println!(
            "soak: {} versions of {} paths; manifest A {} MiB, manifest B {} MiB, drives {} x \
             {} MiB with {SEGMENT_MIB} MiB segments",
            catalog.versions.len(),
            catalog.paths().len(),
            catalog.manifest_bytes(0) / MIB,
            catalog.manifest_bytes(1) / MIB,
            DRIVE_COUNT,
            DRIVE_BYTES / MIB
        );
        let drives = format_drives(binary, dir)?;
        let origin_root = dir.join("origin");
        publish_files(&origin_root, &catalog, 0, 1)?;
        let soak = Soak {
            binary: binary.to_path_buf(),
            dir: dir.to_path_buf(),
            config: dir.join("appliance.toml"),
            port: free_port()?,
            admin_port: free_port()?,
            ctl: Ctl::next_to(binary, &dir.join("control.sock"))?,
            origin: start_origin(dir, &origin_root)?,
            catalog,
            rng,
            current: 0,
            generation: 1,
            guaranteed: BTreeMap::new(),
            rounds_since_completion: 0,
            counts: Counts::default(),
        };
        soak.write_config(&drives)?;
        Ok(soak)
    }

    fn write_config(&self, drives: &[PathBuf]) -> Result<()> {
        let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let config = Config {
            state_dir: Some(self.dir.join("state")),
            control_socket: Some(self.ctl.socket().to_path_buf()),
            serve: Serve {
                listen: Some(loopback(self.port)),
                admin_listen: Some(loopback(self.admin_port)),
                access_log: Some("off".into()),
                ..Serve::default()
            },
            fill: Fill {
                manifest: Some(self.origin.url("/manifest.json")),
                sources: vec![self.origin.url("")],
                concurrency: Some(3),
                bandwidth_bits_per_s: Some(BANDWIDTH_BITS_PER_S),
                delete_grace_s: Some(0),
                attempts_per_source: Some(3),
                backoff_initial_ms: Some(50),
                backoff_max_ms: Some(200),
                stall_timeout_ms: Some(2000),
                response_timeout_ms: Some(5000),
                ..Fill::default()
            },
            ..Config::new(drives)
        };
        config.write(&self.config)?;
        Ok(())
    }

    /// Makes manifest `which` current at the origin; what completed fills published stays
    /// guaranteed only where the new manifest names the same version.
    fn publish(&mut self, which: usize) -> Result<()> {
        self.generation += 1;
        publish_files(
            &self.dir.join("origin"),
            &self.catalog,
            which,
            self.generation,
        )?;
        self.current = which;
        let manifest = &self.catalog.manifests[which];
        self.guaranteed.retain(|_, id| manifest.contains(id));
        Ok(())
    }

    fn run_rounds(&mut self, rounds: u64) -> Result<()> {
        for round in 0..rounds {
            let started = Instant::now();
            let outcome = self.round(round, rounds)?;
            let seconds = started.elapsed().as_secs_f64();
            self.counts.rounds += 1;
            self.counts.round_seconds.push(seconds);
            println!("round {round:>4}: {outcome} ({seconds:.1} s)");
            if !self.counts.failures.is_empty() {
                break;
            }
        }
        if self.counts.failures.is_empty() {
            self.final_round()?;
        }
        Ok(())
    }

    /// Start, check, fill, kill. Returns a line for the log.
    fn round(&mut self, round: u64, rounds: u64) -> Result<String> {
        let mut daemon = self.start_daemon()?;
        self.check_served(round)?;
        let complete = self.rounds_since_completion + 1 >= COMPLETE_EVERY_MAX
            || one_in(&mut self.rng, COMPLETE_EVERY_MAX)
            || round + 1 == rounds;
        let name = manifest_name(self.current);
        let before = self.fill_status()?["last"].clone();
        self.start_fill()?;
        let outcome = if complete {
            self.wait_fill(&before)?;
            self.after_completed_fill(round)?;
            format!("manifest {name}: fill completed and checked")
        } else {
            match self.kill_point(&before)? {
                KillPoint::Reached(what) => {
                    self.counts.kills_mid_fill += 1;
                    self.rounds_since_completion += 1;
                    format!("manifest {name}: killed {what}")
                }
                KillPoint::FillEnded => {
                    self.after_completed_fill(round)?;
                    format!("manifest {name}: the fill ended before the kill point; checked")
                }
            }
        };
        kill(&mut daemon)?;
        self.counts.kills += 1;
        // Now and then the manifest changes under a fill that did not complete.
        if !complete && one_in(&mut self.rng, 4) {
            self.publish(1 - self.current)?;
            return Ok(format!(
                "{outcome}; next fills use manifest {}",
                manifest_name(self.current)
            ));
        }
        Ok(outcome)
    }

    /// The last round: start, check, fill to the end, check, clean stop.
    fn final_round(&mut self) -> Result<()> {
        let mut daemon = self.start_daemon()?;
        let round = self.counts.rounds;
        self.check_served(round)?;
        let before = self.fill_status()?["last"].clone();
        let name = manifest_name(self.current);
        self.start_fill()?;
        self.wait_fill(&before)?;
        self.after_completed_fill(round)?;
        let status = daemon.stop(STOP_GRACE)?;
        if !status.success() {
            self.fail(round, format!("the final clean stop ended with {status}"));
        }
        println!("final: a completed fill of manifest {name}, checked; stopped");
        Ok(())
    }

    fn after_completed_fill(&mut self, round: u64) -> Result<()> {
        self.counts.fills_completed += 1;
        self.rounds_since_completion = 0;
        let last = self.fill_status()?["last"].clone();
        self.counts.files_deleted += last["files_deleted"].as_u64().unwrap_or(0);
        let clean = last["error"].is_null()
            && last["cancelled"] == false
            && last["files_failed"] == 0
            && last["cannot_fit"].as_array().is_some_and(Vec::is_empty);
        if !clean {
            self.fail(
                round,
                format!("a fill of the current manifest did not succeed: {last}"),
            );
        }
        for id in self.catalog.manifests[self.current].clone() {
            let path = self.catalog.versions[id].path.clone();
            self.check_path(round, &path, Some(id))?;
        }
        let manifest = &self.catalog.manifests[self.current];
        self.guaranteed = manifest
            .iter()
            .map(|id| (self.catalog.versions[*id].path.clone(), *id))
            .collect();
        // The next fills use the other manifest: deletes, then fetches, then reclaim.
        self.publish(1 - self.current)
    }

    /// Every path of both manifests: absent, or one exact version; guaranteed ones exact.
    fn check_served(&mut self, round: u64) -> Result<()> {
        for path in self.catalog.paths() {
            let must = self.guaranteed.get(&path).copied();
            self.check_path(round, &path, must)?;
        }
        Ok(())
    }

    /// Checks one path; `must`: the version that has to be served.
    fn check_path(&mut self, round: u64, path: &str, must: Option<usize>) -> Result<()> {
        let response = get(self.port, path, None)?;
        let (status, body) = (response.status, response.body);
        self.counts.files_checked += 1;
        match (status, must) {
            (404, None) => {}
            (404, Some(_)) => self.fail(
                round,
                format!("{path}: lost (404) after a completed fill published it"),
            ),
            (200, _) => {
                self.counts.bytes_compared += body.len() as u64;
                let matching = self
                    .catalog
                    .versions_of(path)
                    .find(|id| self.catalog.versions[*id].bytes == body);
                match (matching, must) {
                    (None, _) => self.fail(round, describe_mismatch(&self.catalog, path, &body)),
                    (Some(served), Some(wanted)) if served != wanted => self.fail(
                        round,
                        format!("{path}: serves another version than the completed fill published"),
                    ),
                    _ => {}
                }
            }
            (other, _) => self.fail(round, format!("{path}: HTTP {other}")),
        }
        Ok(())
    }

    fn fail(&mut self, round: u64, message: String) {
        println!("round {round}: FAILED: {message}");
        self.counts
            .failures
            .push(format!("round {round}: {message}"));
    }

    fn start_daemon(&self) -> Result<Guard> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))?;
        let child = launch(None)
            .command(&self.binary)
            .args(["run", "--config", text(&self.config)?])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting applianced")?;
        let mut daemon = Guard::new("applianced", child);
        appliance_testkit::wait_for_ok(self.admin_port, "/health", START_DEADLINE, || {
            daemon.alive()
        })
        .with_context(|| format!("see {}", self.dir.join("daemon.log").display()))?;
        Ok(daemon)
    }

    /// The `fill` part of `appliance-ctl status --json`.
    fn fill_status(&self) -> Result<Value> {
        Ok(self.ctl.fill_status()?)
    }

    /// `appliance-ctl fill`.
    fn start_fill(&self) -> Result<()> {
        Ok(self.ctl.fill(None)?)
    }

    /// Waits until a fill reported after `before` ended.
    fn wait_fill(&self, before: &Value) -> Result<Value> {
        let deadline = Instant::now() + FILL_DEADLINE;
        loop {
            let status = self.fill_status()?;
            if status["running"] == false && status["last"] != *before {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("the fill did not end within {FILL_DEADLINE:?}: {status}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the seeded kill point: one round in five a few milliseconds after the start
    /// (manifest fetch, plan, deletes); otherwise a share of the fill's bytes.
    fn kill_point(&mut self, before: &Value) -> Result<KillPoint> {
        if one_in(&mut self.rng, 5) {
            let delay_ms = self.rng.below(100);
            std::thread::sleep(Duration::from_millis(delay_ms));
            return Ok(KillPoint::Reached(format!(
                "{delay_ms} ms after the fill started"
            )));
        }
        let share_percent = 1 + self.rng.below(99);
        let deadline = Instant::now() + FILL_DEADLINE;
        loop {
            let status = self.fill_status()?;
            if status["running"] == false && status["last"] != *before {
                return Ok(KillPoint::FillEnded);
            }
            let total = status["bytes_total"].as_u64().unwrap_or(0);
            let done = status["bytes_done"].as_u64().unwrap_or(0);
            if status["running"] == true && total > 0 && done * 100 >= total * share_percent {
                return Ok(KillPoint::Reached(format!(
                    "at {share_percent}% of the fill ({} of {} MiB, {} of {} files)",
                    done / MIB,
                    total / MIB,
                    status["files_done"],
                    status["files_total"]
                )));
            }
            if Instant::now() > deadline {
                bail!("the fill made no progress: {status}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn summary(&self, options: Options, seconds: f64, error: Option<&anyhow::Error>) -> Value {
        let counts = &self.counts;
        let mut per_round = counts.round_seconds.clone();
        per_round.sort_by(f64::total_cmp);
        let percentile = |percent: usize| {
            per_round
                .get(per_round.len().saturating_sub(1) * percent / 100)
                .copied()
                .unwrap_or(0.0)
        };
        json!({
            "seed": options.seed,
            "release": options.release,
            "rounds": counts.rounds,
            "kills": counts.kills,
            "kills_mid_fill": counts.kills_mid_fill,
            "fills_completed": counts.fills_completed,
            "files_deleted_by_completed_fills": counts.files_deleted,
            "files_checked": counts.files_checked,
            "bytes_compared": counts.bytes_compared,
            "failures": counts.failures.len() + usize::from(error.is_some()),
            "failure_messages": counts.failures,
            "error": error.map(|error| format!("{error:#}")),
            "seconds": (seconds * 10.0).round() / 10.0,
            "seconds_per_round_mean": if counts.rounds > 0 {
                (counts.round_seconds.iter().sum::<f64>() / counts.rounds as f64 * 100.0).round() / 100.0
            } else { 0.0 },
            "seconds_per_round_p50": (percentile(50) * 100.0).round() / 100.0,
            "seconds_per_round_max": (percentile(100) * 100.0).round() / 100.0,
        })
    }
}

fn manifest_name(which: usize) -> &'static str {
    ["A", "B"][which]
}

/// Where a killed round's kill landed.
enum KillPoint {
    Reached(String),
    FillEnded,
}

/// SIGKILL, then reap.
fn kill(daemon: &mut Guard) -> Result<()> {
    daemon.kill()?;
    Ok(())
}

/// What a served body that matches no version looks like.
fn describe_mismatch(catalog: &Catalog, path: &str, body: &[u8]) -> String {
    let sizes: Vec<usize> = catalog
        .versions_of(path)
        .map(|id| catalog.versions[id].bytes.len())
        .collect();
    let prefix_of = catalog
        .versions_of(path)
        .any(|id| catalog.versions[id].bytes.starts_with(body));
    format!(
        "{path}: served {} bytes matching no version (sizes {sizes:?}){}",
        body.len(),
        if prefix_of {
            "; a prefix of one: a partial file is visible"
        } else {
            ""
        }
    )
}

fn format_drives(binary: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    let drives: Vec<PathBuf> = (0..DRIVE_COUNT)
        .map(|n| dir.join(format!("d{n}.img")))
        .collect();
    let mut args = vec![
        "format".to_string(),
        "--segment-mib".into(),
        SEGMENT_MIB.to_string(),
    ];
    for drive in &drives {
        std::fs::File::create(drive)?.set_len(DRIVE_BYTES)?;
        args.push(text(drive)?.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    output(text(binary)?, &args)?;
    Ok(drives)
}

/// Writes manifest `which`'s versions of its paths under `root`, then the manifest document
/// (each file written aside and renamed into place, as an origin publishes).
fn publish_files(root: &Path, catalog: &Catalog, which: usize, generation: u64) -> Result<()> {
    for id in &catalog.manifests[which] {
        let version = &catalog.versions[*id];
        write_atomically(&root.join(&version.path[1..]), &version.bytes)?;
    }
    let manifest = catalog.manifest_json(which, generation);
    write_atomically(&root.join("manifest.json"), manifest.as_bytes())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let parent = path.parent().context("a file has a folder")?;
    std::fs::create_dir_all(parent)?;
    let aside = parent.join(".publishing");
    std::fs::write(&aside, bytes)?;
    std::fs::rename(&aside, path)?;
    Ok(())
}

fn text(path: &Path) -> Result<&str> {
    path.to_str().context("a path is not UTF-8")
}
