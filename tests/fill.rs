//! Black-box tests of the fill: the real `applianced` filling from nginx (a real origin) and
//! from a fault-injecting origin, from a sibling appliance first, across a SIGKILL, onto a
//! drive that fills up, and with a broken manifest. Every byte is checked through serving or
//! the store, and no file that does not match its manifest checksum is ever visible.

// Test data generation truncates on purpose; sizes here are small.
#![allow(clippy::cast_possible_truncation)]

mod origin;
mod util;

use origin::{write_catalog, Fault, FaultOrigin, Nginx};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use util::{applianced, formatted_drives, Daemon, Scratch};

/// `count` files with distinct contents, sizes up to `size_max`.
fn catalog(count: u64, size_max: u64, salt: u64) -> Vec<(String, Vec<u8>)> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ salt;
    (0..count)
        .map(|number| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let size = 1 + (state >> 20) % size_max;
            let bytes = (0..size)
                .map(|at| (at.wrapping_mul(2654435761).wrapping_add(number ^ salt) >> 9) as u8)
                .collect();
            (format!("/video/title-{number:03}/main.mp4"), bytes)
        })
        .collect()
}

/// Fill settings for tests: fast retries and timeouts.
fn fill_section(manifest: &str, sources: &[String], extra: &str) -> String {
    let sources: Vec<String> = sources.iter().map(|source| format!("{source:?}")).collect();
    format!(
        "[fill]\nmanifest = {manifest:?}\nsources = [{}]\nconcurrency = 3\n\
         attempts_per_source = 3\nbackoff_initial_ms = 50\nbackoff_max_ms = 200\n\
         stall_timeout_ms = 700\nresponse_timeout_ms = 3000\n{extra}\n",
        sources.join(", ")
    )
}

/// Starts a fill through the admin listener and waits for its report.
fn fill_and_wait(daemon: &Daemon) -> serde_json::Value {
    assert_eq!(daemon.admin("POST", "/fill").0, 202);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, body) = daemon.admin("GET", "/fill");
        let status: serde_json::Value = serde_json::from_str(&body).expect("fill status JSON");
        if status["running"] == false && !status["last"].is_null() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the fill did not finish: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn check_served(daemon: &Daemon, files: &[(String, Vec<u8>)]) {
    for (path, bytes) in files {
        let served = daemon
            .get(path)
            .unwrap_or_else(|| panic!("{path} not served"));
        assert!(
            served == *bytes,
            "{path}: served bytes differ from the origin's"
        );
    }
}

#[test]
fn fill_from_nginx_then_serve_every_byte() {
    let scratch = Scratch::new("fill-nginx");
    let files = catalog(12, 3 << 20, 1);
    let root = scratch.path("origin");
    write_catalog(&root, &files);
    let nginx = Nginx::start(&scratch.path("nginx"), &root).expect("nginx");
    let drives = formatted_drives(&scratch, 2, 96 << 20, 8);
    let manifest = format!("{}/manifest.json", nginx.url());
    let daemon = Daemon::start(
        &scratch,
        &drives,
        &fill_section(&manifest, &[nginx.url()], ""),
    );
    let status = fill_and_wait(&daemon);
    let last = &status["last"];
    assert_eq!(last["files_fetched"], 12, "{status}");
    assert_eq!(last["files_failed"], 0, "{status}");
    check_served(&daemon, &files);
    // A second fill finds everything held and fetches nothing.
    let status = fill_and_wait(&daemon);
    assert_eq!(status["last"]["files_held_ok"], 12, "{status}");
    assert_eq!(status["last"]["files_planned"], 0, "{status}");
}

/// Runs `applianced fill` with the config of `daemon_config` and returns (success, report).
fn fill_offline(config: &Path) -> (bool, serde_json::Value) {
    let out = applianced(&["fill", "--config", config.to_str().unwrap()]);
    let report = serde_json::from_str(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.success(), report)
}

/// Writes a config for offline fills (the listeners are not used).
fn offline_config(scratch: &Scratch, drives: &[PathBuf], fill: &str) -> PathBuf {
    let config = scratch.path("offline.toml");
    let list: Vec<String> = drives
        .iter()
        .map(|drive| format!("{:?}", drive.display().to_string()))
        .collect();
    std::fs::write(
        &config,
        format!(
            "drives = [{}]\nstate_dir = {:?}\n{fill}",
            list.join(", "),
            scratch.path("state").display().to_string()
        ),
    )
    .unwrap();
    config
}

/// The store's listing: path -> bytes.
fn stored(scratch: &Scratch, drives: &[PathBuf]) -> HashMap<String, Vec<u8>> {
    let refs: Vec<&Path> = drives.iter().map(PathBuf::as_path).collect();
    let listing = scratch.store(&refs, &["ls"]);
    assert!(listing.status.success(), "{}", listing.stderr);
    let mut out = HashMap::new();
    for line in listing.stdout.lines() {
        let path = line.split_whitespace().nth(1).unwrap().to_string();
        let mut args = scratch.store_args(&refs);
        args.extend(["cat".into(), path.clone()]);
        let bytes = std::process::Command::new(env!("CARGO_BIN_EXE_applianced"))
            .args(&args)
            .output()
            .unwrap()
            .stdout;
        out.insert(path, bytes);
    }
    out
}

#[test]
fn a_faulty_origin_never_gets_a_bad_file_published() {
    let scratch = Scratch::new("fill-faults");
    let files = catalog(8, 2 << 20, 2);
    let paths: Vec<String> = files.iter().map(|(path, _)| path.clone()).collect();
    let faults: HashMap<String, Fault> = [
        (paths[0].clone(), Fault::ServerError { times: 2 }),
        (
            paths[1].clone(),
            Fault::CutAfter {
                bytes: 100_000,
                times: 2,
            },
        ),
        (paths[2].clone(), Fault::WrongBytes),
        (
            paths[3].clone(),
            Fault::Stall {
                bytes: 50_000,
                pause: Duration::from_secs(3),
                times: 1,
            },
        ),
        (
            paths[4].clone(),
            Fault::CutThenIgnoreRange { bytes: 60_000 },
        ),
        (
            paths[5].clone(),
            Fault::CutAfter {
                bytes: 10,
                times: 1,
            },
        ),
        (paths[6].clone(), Fault::Missing),
    ]
    .into_iter()
    .collect();
    let mut served: HashMap<String, Vec<u8>> = files.iter().cloned().collect();
    served.insert(
        "/manifest.json".into(),
        origin::manifest_json(&files).into_bytes(),
    );
    let origin = FaultOrigin::start(served, faults);
    let drives = formatted_drives(&scratch, 2, 64 << 20, 4);
    let manifest = format!("{}/manifest.json", origin.url());
    let config = offline_config(
        &scratch,
        &drives,
        &fill_section(&manifest, &[origin.url()], ""),
    );
    let (succeeded, report) = fill_offline(&config);
    assert!(
        !succeeded,
        "wrong bytes and a missing file must fail the fill: {report}"
    );
    assert_eq!(report["files_fetched"], 6, "{report}");
    assert_eq!(report["files_failed"], 2, "{report}");
    let failed: Vec<&str> = report["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|failure| failure["path"].as_str().unwrap())
        .collect();
    assert!(failed.contains(&paths[2].as_str()) && failed.contains(&paths[6].as_str()));
    let stored = stored(&scratch, &drives);
    assert!(
        !stored.contains_key(&paths[2]),
        "a file with wrong bytes was published"
    );
    assert!(!stored.contains_key(&paths[6]));
    for (path, bytes) in &files {
        if let Some(held) = stored.get(path) {
            assert!(
                held == bytes,
                "{path}: stored bytes differ from the manifest's"
            );
        }
    }
    assert_eq!(stored.len(), 6);
    // The cut and stalled downloads resumed with Range instead of starting over.
    assert_eq!(
        origin.requests_for(&paths[1]),
        3,
        "two cuts, then one resumed request"
    );
    assert_eq!(
        origin.requests_for(&paths[3]),
        2,
        "one stall, then one resumed request"
    );
    assert_eq!(
        origin.requests_for(&paths[4]),
        2,
        "a 200 for a range restarts cleanly"
    );
}

#[test]
fn a_broken_manifest_is_refused_and_the_box_keeps_what_it_has() {
    let scratch = Scratch::new("fill-bad-manifest");
    let files = catalog(3, 200_000, 3);
    let root = scratch.path("origin");
    let manifest = write_catalog(&root, &files);
    let drives = formatted_drives(&scratch, 1, 64 << 20, 4);
    let origin = FaultOrigin::start(files.iter().cloned().collect(), HashMap::new());
    let config = offline_config(
        &scratch,
        &drives,
        &fill_section(manifest.to_str().unwrap(), &[origin.url()], ""),
    );
    assert!(fill_offline(&config).0);
    let broken = [
        "{\"version\": 2, \"generated_at\": \"2026-11-23T02:00:00Z\", \"files\": []}",
        "{\"version\": 1, \"generated_at\": \"2026-11-23T02:00:00Z\", \"files\": [",
        "not json",
    ];
    for text in broken {
        std::fs::write(&manifest, text).unwrap();
        let (succeeded, report) = fill_offline(&config);
        assert!(!succeeded);
        assert!(
            report["error"].as_str().unwrap_or("").contains("manifest"),
            "{report}"
        );
        assert_eq!(
            stored(&scratch, &drives).len(),
            3,
            "the box keeps what it has"
        );
    }
}

#[test]
fn a_sibling_is_tried_first_and_the_origin_fills_the_rest() {
    let scratch = Scratch::new("fill-sibling");
    let files = catalog(10, 1 << 20, 4);
    let root = scratch.path("origin");
    write_catalog(&root, &files);
    std::fs::write(
        root.join("first-half.json"),
        origin::manifest_json(&files[..5]),
    )
    .unwrap();
    let nginx = Nginx::start(&scratch.path("nginx"), &root).expect("nginx");
    // Appliance A holds the first half.
    let scratch_a = Scratch::new("fill-sibling-a");
    let drives_a = formatted_drives(&scratch_a, 1, 96 << 20, 8);
    let manifest_a = format!("{}/first-half.json", nginx.url());
    let sibling = Daemon::start(
        &scratch_a,
        &drives_a,
        &fill_section(&manifest_a, &[nginx.url()], ""),
    );
    assert_eq!(fill_and_wait(&sibling)["last"]["files_fetched"], 5);
    // Appliance B fills everything, from A first.
    let drives_b = formatted_drives(&scratch, 1, 96 << 20, 8);
    let manifest_b = format!("{}/manifest.json", nginx.url());
    let sibling_url = format!("http://127.0.0.1:{}", sibling.port);
    let daemon = Daemon::start(
        &scratch,
        &drives_b,
        &fill_section(&manifest_b, &[sibling_url, nginx.url()], ""),
    );
    let status = fill_and_wait(&daemon);
    assert_eq!(status["last"]["files_fetched"], 10, "{status}");
    let sources = status["sources"].as_array().unwrap();
    assert_eq!(
        sources[0]["files_ok"], 5,
        "the sibling served what it holds: {status}"
    );
    assert_eq!(sources[0]["missing"], 5, "{status}");
    assert_eq!(
        sources[1]["files_ok"], 5,
        "the origin served the rest: {status}"
    );
    check_served(&daemon, &files);
}

#[test]
fn sigkill_during_a_fill_then_the_next_fill_resumes() {
    let scratch = Scratch::new("fill-kill");
    let files = catalog(16, 2 << 20, 5);
    let root = scratch.path("origin");
    write_catalog(&root, &files);
    let nginx = Nginx::start(&scratch.path("nginx"), &root).expect("nginx");
    let drives = formatted_drives(&scratch, 2, 96 << 20, 8);
    let manifest = format!("{}/manifest.json", nginx.url());
    // A cap of 40 Mbit/s makes the fill last a few seconds.
    let config = offline_config(
        &scratch,
        &drives,
        &fill_section(&manifest, &[nginx.url()], "bandwidth_bits_per_s = 40000000"),
    );
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_applianced"))
        .args(["fill", "--config", config.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let before = stored(&scratch, &drives);
    assert!(
        !before.is_empty() && before.len() < files.len(),
        "killed mid-fill: {}",
        before.len()
    );
    for (path, bytes) in &before {
        let expected = &files.iter().find(|(known, _)| known == path).unwrap().1;
        assert!(
            bytes == expected,
            "{path}: a file visible after SIGKILL is not intact"
        );
    }
    let config = offline_config(
        &scratch,
        &drives,
        &fill_section(&manifest, &[nginx.url()], ""),
    );
    let (succeeded, report) = fill_offline(&config);
    assert!(succeeded, "{report}");
    assert_eq!(
        report["files_held_ok"].as_u64().unwrap(),
        before.len() as u64,
        "{report}"
    );
    let after = stored(&scratch, &drives);
    assert_eq!(after.len(), files.len());
    for (path, bytes) in &files {
        assert!(after[path] == *bytes, "{path}");
    }
}

#[test]
fn a_drive_that_fills_up_is_reported_not_a_crash() {
    let scratch = Scratch::new("fill-full");
    let files = catalog(12, 6 << 20, 6);
    let root = scratch.path("origin");
    write_catalog(&root, &files);
    let origin = FaultOrigin::start(files.iter().cloned().collect(), HashMap::new());
    let drives = formatted_drives(&scratch, 1, 40 << 20, 4);
    let config = offline_config(
        &scratch,
        &drives,
        &fill_section(
            root.join("manifest.json").to_str().unwrap(),
            &[origin.url()],
            "",
        ),
    );
    let (succeeded, report) = fill_offline(&config);
    assert!(!succeeded, "{report}");
    let short = report["cannot_fit"].as_array().map_or(0, Vec::len) as u64
        + report["files_failed"].as_u64().unwrap_or(0);
    assert!(short > 0, "space shortage is reported: {report}");
    for (path, bytes) in stored(&scratch, &drives) {
        let expected = &files.iter().find(|(known, _)| *known == path).unwrap().1;
        assert!(bytes == *expected, "{path}");
    }
}
