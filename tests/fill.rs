//! Black-box tests of the fill: the real `applianced` filling from nginx (a real origin) and
//! from a fault-injecting origin, from a sibling appliance first, across a SIGKILL, onto a
//! drive that fills up, and with a broken manifest; paths that need percent-encoding, SIGTERM
//! during `applianced fill`, manifest size caps (files, endless bodies), redirects, signed
//! manifests, and the fill's own idle-priority threads (read from /proc). Every byte is checked through serving or the store, and no file that does not
//! match its manifest checksum is ever visible.

// Test data generation truncates on purpose; sizes here are small.
#![allow(clippy::cast_possible_truncation)]

mod origin;
mod signing;
mod util;

use appliance_testkit::{seeded_bytes, send_signal, Config, Fill, Manifest, Nginx, SplitMix64};
use origin::{write_catalog, Fault, FaultOrigin};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use util::{applianced, formatted_drives, Daemon, Scratch, APPLIANCED};

/// `count` files with distinct contents, sizes up to `size_max`.
fn catalog(count: u64, size_max: u64, salt: u64) -> Vec<(String, Vec<u8>)> {
    let mut rng = SplitMix64(0x9E37_79B9_7F4A_7C15 ^ salt);
    (0..count)
        .map(|number| {
            let size = 1 + rng.below(size_max) as usize;
            let bytes = seeded_bytes(rng.next_u64(), size);
            (format!("/video/title-{number:03}/main.mp4"), bytes)
        })
        .collect()
}

/// Fill settings for tests: fast retries and timeouts.
fn fill_section(manifest: &str, sources: &[String]) -> Fill {
    Fill {
        manifest: Some(manifest.to_string()),
        sources: sources.to_vec(),
        concurrency: Some(3),
        attempts_per_source: Some(3),
        backoff_initial_ms: Some(50),
        backoff_max_ms: Some(200),
        stall_timeout_ms: Some(700),
        response_timeout_ms: Some(3000),
        ..Fill::default()
    }
}

/// Fill settings for tests that look at a fill while it runs: a cap of 40 Mbit/s makes it last
/// a few seconds.
fn slow_fill_section(manifest: &str, sources: &[String]) -> Fill {
    Fill {
        bandwidth_bits_per_s: Some(40_000_000),
        ..fill_section(manifest, sources)
    }
}

/// A serving appliance on `drives` with `fill`.
fn daemon(scratch: &Scratch, drives: &[PathBuf], fill: Fill) -> Daemon {
    let config = Config {
        fill,
        ..Config::new(drives)
    };
    Daemon::start(scratch, config)
}

/// Fills with `appliance-ctl fill --wait`; returns the `fill` part of `appliance-ctl status
/// --json` afterwards (the last report, the sources' counts).
fn fill_and_wait(daemon: &Daemon) -> serde_json::Value {
    let ctl = daemon.ctl();
    ctl.fill_wait(None).expect("a fill report");
    ctl.fill_status().expect("appliance-ctl status")
}

/// `files` and their manifest under `scratch/origin`, served by nginx.
fn nginx_origin(scratch: &Scratch, files: &[(String, Vec<u8>)]) -> (PathBuf, Nginx) {
    let root = scratch.path("origin");
    write_catalog(&root, files);
    let nginx = Nginx::start(&scratch.path("nginx"), &root).expect("nginx");
    (root, nginx)
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
    let (_, nginx) = nginx_origin(&scratch, &files);
    let drives = formatted_drives(&scratch, 2, 96 << 20, 8);
    let manifest = nginx.url("/manifest.json");
    let daemon = daemon(&scratch, &drives, fill_section(&manifest, &[nginx.url("")]));
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
fn offline_config(scratch: &Scratch, drives: &[PathBuf], fill: Fill) -> PathBuf {
    let path = scratch.path("offline.toml");
    let config = Config {
        state_dir: Some(scratch.path("state")),
        fill,
        ..Config::new(drives)
    };
    config.write(&path).unwrap();
    path
}

/// The store's listing: path -> bytes.
fn stored(scratch: &Scratch, drives: &[PathBuf]) -> HashMap<String, Vec<u8>> {
    let refs: Vec<&Path> = drives.iter().map(PathBuf::as_path).collect();
    scratch.stored(&refs).into_iter().collect()
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
        Manifest::of(&files).to_json().into(),
    );
    let origin = FaultOrigin::start(served, faults);
    let drives = formatted_drives(&scratch, 2, 64 << 20, 4);
    let manifest = format!("{}/manifest.json", origin.url());
    let config = offline_config(&scratch, &drives, fill_section(&manifest, &[origin.url()]));
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
        fill_section(manifest.to_str().unwrap(), &[origin.url()]),
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
    let (root, nginx) = nginx_origin(&scratch, &files);
    std::fs::write(
        root.join("first-half.json"),
        Manifest::of(&files[..5]).to_json(),
    )
    .unwrap();
    // Appliance A holds the first half.
    let scratch_a = Scratch::new("fill-sibling-a");
    let drives_a = formatted_drives(&scratch_a, 1, 96 << 20, 8);
    let manifest_a = nginx.url("/first-half.json");
    let sibling = daemon(
        &scratch_a,
        &drives_a,
        fill_section(&manifest_a, &[nginx.url("")]),
    );
    assert_eq!(fill_and_wait(&sibling)["last"]["files_fetched"], 5);
    // Appliance B fills everything, from A first.
    let drives_b = formatted_drives(&scratch, 1, 96 << 20, 8);
    let manifest_b = nginx.url("/manifest.json");
    let sibling_url = format!("http://127.0.0.1:{}", sibling.port);
    let daemon = daemon(
        &scratch,
        &drives_b,
        fill_section(&manifest_b, &[sibling_url, nginx.url("")]),
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
    let (_, nginx) = nginx_origin(&scratch, &files);
    let drives = formatted_drives(&scratch, 2, 96 << 20, 8);
    let manifest = nginx.url("/manifest.json");
    let fill = slow_fill_section(&manifest, &[nginx.url("")]);
    let config = offline_config(&scratch, &drives, fill);
    let mut child = std::process::Command::new(APPLIANCED)
        .args(["fill", "--config", config.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let _ = send_signal(child.id(), "KILL");
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
    let config = offline_config(&scratch, &drives, fill_section(&manifest, &[nginx.url("")]));
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
    // About 47 MiB: more than the 40 MiB drive takes.
    let files = catalog(12, 6 << 20, 36);
    let root = scratch.path("origin");
    write_catalog(&root, &files);
    let origin = FaultOrigin::start(files.iter().cloned().collect(), HashMap::new());
    let drives = formatted_drives(&scratch, 1, 40 << 20, 4);
    let config = offline_config(
        &scratch,
        &drives,
        fill_section(
            root.join("manifest.json").to_str().unwrap(),
            &[origin.url()],
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

/// A path as a URL path: every byte but RFC 3986's unreserved characters percent-encoded.
fn encode_path(path: &str) -> String {
    path.split('/')
        .map(|segment| {
            segment
                .bytes()
                .map(|byte| match byte {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                        char::from(byte).to_string()
                    }
                    _ => format!("%{byte:02X}"),
                })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[test]
fn paths_that_need_encoding_come_byte_exact_from_nginx_and_a_sibling() {
    let scratch = Scratch::new("fill-odd-paths");
    let names = [
        "/odd/50% off.mp4",
        "/odd/part#2.mp4",
        "/odd/what?.mp4",
        "/odd/été/ü ñ.mp4",
        "/odd/a+b;c=d&e.mp4",
        "/odd/%41%2F.mp4",
        "/odd/%41/.mp4",
    ];
    // A file named by what a wrong URL would decode to, so a wrong fetch finds other bytes.
    let files: Vec<(String, Vec<u8>)> = catalog(names.len() as u64, 300_000, 11)
        .into_iter()
        .zip(names)
        .map(|((_, bytes), name)| (name.to_string(), bytes))
        .collect();
    let (root, nginx) = nginx_origin(&scratch, &files);
    std::fs::create_dir_all(root.join("odd/A")).unwrap();
    for decoy in ["odd/A/.mp4", "odd/part", "odd/what"] {
        std::fs::write(root.join(decoy), b"decoy").unwrap();
    }
    let manifest = nginx.url("/manifest.json");
    // Appliance A fills from nginx.
    let scratch_a = Scratch::new("fill-odd-paths-a");
    let drives_a = formatted_drives(&scratch_a, 1, 64 << 20, 4);
    let sibling = daemon(
        &scratch_a,
        &drives_a,
        fill_section(&manifest, &[nginx.url("")]),
    );
    let status = fill_and_wait(&sibling);
    assert_eq!(status["last"]["files_fetched"], 7, "{status}");
    // Appliance B fills from A, which serves what it stores at the decoded path.
    let drives_b = formatted_drives(&scratch, 1, 64 << 20, 4);
    let sibling_url = format!("http://127.0.0.1:{}", sibling.port);
    let daemon = daemon(
        &scratch,
        &drives_b,
        fill_section(&manifest, &[sibling_url, nginx.url("")]),
    );
    let status = fill_and_wait(&daemon);
    assert_eq!(status["last"]["files_fetched"], 7, "{status}");
    assert_eq!(
        status["sources"][0]["files_ok"], 7,
        "all from the sibling: {status}"
    );
    for appliance in [&sibling, &daemon] {
        for (path, _) in &files {
            let on_disk = std::fs::read(root.join(&path[1..])).unwrap();
            let served = appliance
                .get(&encode_path(path))
                .unwrap_or_else(|| panic!("{path} not served"));
            assert!(
                served == on_disk,
                "{path}: stored bytes differ from the origin's"
            );
        }
    }
}

/// Starts `applianced fill`, sends SIGTERM after `delay`; returns (success, report, how long
/// it took to end after the signal).
fn fill_then_sigterm(
    config: &Path,
    manifest: &str,
    delay: Duration,
) -> (bool, serde_json::Value, Duration) {
    let child = std::process::Command::new(APPLIANCED)
        .args([
            "fill",
            "--config",
            config.to_str().unwrap(),
            "--manifest",
            manifest,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    let signalled = Instant::now();
    let _ = send_signal(child.id(), "TERM");
    let out = child.wait_with_output().unwrap();
    let took = signalled.elapsed();
    let report = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.success(), report, took)
}

#[test]
fn sigterm_cancels_applianced_fill_promptly_and_leaves_a_clean_store() {
    let scratch = Scratch::new("fill-sigterm");
    let files = catalog(16, 2 << 20, 7);
    let mut served: HashMap<String, Vec<u8>> = files.iter().cloned().collect();
    let manifest_bytes = Manifest::of(&files).to_json().into_bytes();
    served.insert("/manifest.json".into(), manifest_bytes.clone());
    served.insert("/stalled.json".into(), manifest_bytes);
    let stall = Fault::Stall {
        bytes: 10,
        pause: Duration::from_secs(30),
        times: 100,
    };
    let faults = [("/stalled.json".to_string(), stall)].into_iter().collect();
    let origin = FaultOrigin::start(served, faults);
    let drives = formatted_drives(&scratch, 2, 96 << 20, 8);
    // Timeouts longer than the test: only the signal ends these fills in time. 16 Mbit/s
    // after a 4 MiB burst makes the downloads last several seconds.
    let fill = Fill {
        bandwidth_bits_per_s: Some(16_000_000),
        stall_timeout_ms: Some(60_000),
        response_timeout_ms: Some(60_000),
        ..fill_section(&format!("{}/manifest.json", origin.url()), &[origin.url()])
    };
    let config = offline_config(&scratch, &drives, fill);
    // During the manifest download.
    let stalled = format!("{}/stalled.json", origin.url());
    let (succeeded, report, took) = fill_then_sigterm(&config, &stalled, Duration::from_secs(1));
    assert!(!succeeded, "{report}");
    assert_eq!(report["cancelled"], true, "{report}");
    assert!(
        took < Duration::from_secs(3),
        "ended {took:?} after SIGTERM"
    );
    assert!(stored(&scratch, &drives).is_empty());
    // During the downloads.
    let manifest = format!("{}/manifest.json", origin.url());
    let (succeeded, report, took) =
        fill_then_sigterm(&config, &manifest, Duration::from_millis(1500));
    assert!(!succeeded, "{report}");
    assert_eq!(report["cancelled"], true, "{report}");
    assert!(
        took < Duration::from_secs(3),
        "ended {took:?} after SIGTERM"
    );
    let held = stored(&scratch, &drives);
    assert!(
        !held.is_empty() && held.len() < files.len(),
        "cancelled mid-fill: {report}"
    );
    assert_eq!(report["files_fetched"].as_u64(), Some(held.len() as u64));
    for (path, bytes) in &held {
        let expected = &files.iter().find(|(known, _)| known == path).unwrap().1;
        assert!(bytes == expected, "{path}: not intact after SIGTERM");
    }
    let refs: Vec<&Path> = drives.iter().map(PathBuf::as_path).collect();
    let verify = scratch.store(&refs, &["verify"]);
    assert!(
        verify.status.success(),
        "{}{}",
        verify.stdout,
        verify.stderr
    );
    // The next fill completes.
    let (succeeded, report) = fill_offline(&config);
    assert!(succeeded, "{report}");
    assert_eq!(stored(&scratch, &drives).len(), files.len());
}

#[test]
fn manifests_are_capped_while_they_are_read() {
    let scratch = Scratch::new("fill-manifest-cap");
    let files = catalog(3, 100_000, 12);
    let big = catalog(20_000, 10, 13);
    let mut served: HashMap<String, Vec<u8>> = files.iter().cloned().collect();
    served.insert(
        "/manifest.json".into(),
        Manifest::of(&files).to_json().into(),
    );
    served.insert("/big.json".into(), Manifest::of(&big).to_json().into());
    served.insert("/endless.json".into(), Vec::new());
    let faults = [("/endless.json".to_string(), Fault::Endless)]
        .into_iter()
        .collect();
    let origin = FaultOrigin::start(served, faults);
    let drives = formatted_drives(&scratch, 1, 64 << 20, 4);
    let manifest = format!("{}/manifest.json", origin.url());
    let fill = Fill {
        manifest_bytes_max: Some(1_048_576),
        ..fill_section(&manifest, &[origin.url()])
    };
    let config = offline_config(&scratch, &drives, fill.clone());
    let config_text = config.to_str().unwrap();
    for too_large in [
        "/dev/zero".to_string(),
        format!("{}/endless.json", origin.url()),
        format!("{}/big.json", origin.url()),
    ] {
        let started = Instant::now();
        let out = applianced(&["fill", "--config", config_text, "--manifest", &too_large]);
        let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert!(!out.status.success(), "{report}");
        let error = report["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("larger than manifest_bytes_max (1048576 bytes)"),
            "{too_large}: {report}"
        );
        assert!(started.elapsed() < Duration::from_secs(10), "{too_large}");
        assert_eq!(report["files_fetched"], 0);
    }
    assert!(fill_offline(&config).0, "a manifest under the cap is read");
    // Through `appliance-ctl fill` on a serving appliance: refused, memory bounded.
    let daemon = daemon(&scratch, &drives, fill);
    let started = Instant::now();
    let (succeeded, report) = daemon.ctl().fill_wait(Some("/dev/zero")).unwrap();
    assert!(!succeeded, "{report}");
    assert!(started.elapsed() < Duration::from_secs(10), "{report}");
    assert!(
        report["error"]
            .as_str()
            .unwrap_or_default()
            .contains("/dev/zero is larger than manifest_bytes_max"),
        "{report}"
    );
    let process = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap();
    let peak_kib: u64 = process
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(peak_kib < 300 << 10, "peak memory {peak_kib} KiB");
    assert_eq!(daemon.admin("GET", "/health").0, 200);
}

#[test]
fn redirects_are_followed_only_within_the_origin() {
    let scratch = Scratch::new("fill-redirects");
    let files = catalog(3, 100_000, 14);
    let manifest = Manifest::of(&files).to_json().into_bytes();
    let mut elsewhere_files: HashMap<String, Vec<u8>> = files.iter().cloned().collect();
    elsewhere_files.insert("/manifest.json".into(), manifest.clone());
    let elsewhere = FaultOrigin::start(elsewhere_files, HashMap::new());
    let mut served: HashMap<String, Vec<u8>> = files.iter().cloned().collect();
    served.insert("/real.json".into(), manifest);
    let redirect = |location: String| Fault::Redirect { location };
    let faults = [
        (
            "/manifest.json".to_string(),
            redirect(format!("{}/manifest.json", elsewhere.url())),
        ),
        ("/moved.json".to_string(), redirect("/real.json".into())),
        (
            files[2].0.clone(),
            redirect(format!("{}{}", elsewhere.url(), files[2].0)),
        ),
    ]
    .into_iter()
    .collect();
    let origin = FaultOrigin::start(served, faults);
    let drives = formatted_drives(&scratch, 1, 64 << 20, 4);
    let config = offline_config(
        &scratch,
        &drives,
        fill_section(&format!("{}/manifest.json", origin.url()), &[origin.url()]),
    );
    // The manifest redirected to another origin: refused, that origin never asked.
    let (succeeded, report) = fill_offline(&config);
    assert!(!succeeded);
    let error = report["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("HTTP 302") && error.contains("not followed"),
        "{report}"
    );
    assert_eq!(elsewhere.requests_for("/manifest.json"), 0);
    // A redirect within the origin is followed; a file redirected elsewhere is not.
    let moved = format!("{}/moved.json", origin.url());
    let out = applianced(&[
        "fill",
        "--config",
        config.to_str().unwrap(),
        "--manifest",
        &moved,
    ]);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["files_fetched"], 2, "{report}");
    assert_eq!(report["files_failed"], 1, "{report}");
    assert!(
        report["failures"][0]["error"]
            .as_str()
            .unwrap()
            .contains("to another origin, not followed"),
        "{report}"
    );
    assert_eq!(elsewhere.requests_for(&files[2].0), 0);
    assert_eq!(stored(&scratch, &drives).len(), 2);
}

#[test]
fn with_keys_configured_only_a_signed_manifest_is_used() {
    let scratch = Scratch::new("fill-signed");
    let files = catalog(5, 100_000, 15);
    let (old, new) = files.split_at(3);
    let key = signing::TestKey::from_seed(1);
    let other_key = signing::TestKey::from_seed(2);
    // The first manifest is a signed file on the box.
    let root = scratch.path("manifests");
    std::fs::create_dir_all(&root).unwrap();
    let first = Manifest::of(old).to_json();
    std::fs::write(root.join("first.json"), &first).unwrap();
    std::fs::write(root.join("first.json.minisig"), key.sign(first.as_bytes())).unwrap();
    // The second drops the first's files (deleted at once: no grace) and adds two.
    let second = Manifest::of(new).to_json();
    let tampered = second.replacen("\"rank\":1", "\"rank\":9", 1);
    assert_ne!(tampered, second);
    let mut served: HashMap<String, Vec<u8>> = files.iter().cloned().collect();
    for (path, text) in [
        ("/unsigned.json", second.clone()),
        ("/wrong-key.json", second.clone()),
        ("/wrong-key.json.minisig", other_key.sign(second.as_bytes())),
        ("/tampered.json", tampered),
        ("/tampered.json.minisig", key.sign(second.as_bytes())),
        ("/garbage.json", second.clone()),
        (
            "/garbage.json.minisig",
            "untrusted comment: x\nnot base64\n".into(),
        ),
        ("/second.json", second.clone()),
        ("/second.json.minisig", key.sign(second.as_bytes())),
    ] {
        served.insert(path.into(), text.into_bytes());
    }
    let origin = FaultOrigin::start(served, HashMap::new());
    let drives = formatted_drives(&scratch, 1, 64 << 20, 4);
    let fill = Fill {
        delete_grace_s: Some(0),
        manifest_public_keys: vec![key.public()],
        ..fill_section(root.join("first.json").to_str().unwrap(), &[origin.url()])
    };
    let config = offline_config(&scratch, &drives, fill);
    let (succeeded, report) = fill_offline(&config);
    assert!(succeeded, "{report}");
    assert_eq!(report["files_fetched"], 3);
    let old_paths: Vec<&String> = old.iter().map(|(path, _)| path).collect();
    let refusals = [
        ("/unsigned.json", "no signature"),
        (
            "/wrong-key.json",
            "signed with a key that is not configured",
        ),
        ("/tampered.json", "does not match the manifest"),
        ("/garbage.json", "not a minisign signature"),
    ];
    for (path, expected) in refusals {
        let url = format!("{}{path}", origin.url());
        let out = applianced(&[
            "fill",
            "--config",
            config.to_str().unwrap(),
            "--manifest",
            &url,
        ]);
        let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert!(!out.status.success(), "{path}: {report}");
        let error = report["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("manifest refused") && error.contains(expected),
            "{path}: {report}"
        );
        let mut held: Vec<String> = stored(&scratch, &drives).into_keys().collect();
        held.sort();
        assert_eq!(
            held.iter().collect::<Vec<_>>(),
            old_paths,
            "{path}: nothing deleted"
        );
        for (new_path, _) in new {
            assert_eq!(origin.requests_for(new_path), 0, "{path}: nothing fetched");
        }
    }
    let url = format!("{}/second.json", origin.url());
    let out = applianced(&[
        "fill",
        "--config",
        config.to_str().unwrap(),
        "--manifest",
        &url,
    ]);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(out.status.success(), "{report}");
    assert_eq!(report["files_deleted"], 3, "{report}");
    assert_eq!(report["files_fetched"], 2, "{report}");
    let held = stored(&scratch, &drives);
    for (path, bytes) in new {
        assert!(held.get(path) == Some(bytes), "{path}");
    }
    assert_eq!(held.len(), 2);
}

/// One thread of the daemon as /proc shows it: id, name, scheduling policy, nice, CPU time.
#[derive(Debug)]
struct ThreadRow {
    id: String,
    name: String,
    policy: u32,
    nice: i32,
    cpu_ns: u64,
}

/// The threads of `pid` from /proc/PID/task/*/stat (the name sits in parentheses and may hold
/// spaces; the fields after it are counted from field 3, `state`) and `schedstat` (its first
/// field: nanoseconds on a CPU).
fn threads_of(pid: u32) -> Vec<ThreadRow> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let row = |task: PathBuf| {
        let stat = std::fs::read_to_string(task.join("stat")).ok()?;
        let schedstat = std::fs::read_to_string(task.join("schedstat")).ok()?;
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let field = |number: usize| fields[number - 3];
        Some(ThreadRow {
            id: task.file_name()?.to_string_lossy().into_owned(),
            name: stat[open + 1..close].to_string(),
            policy: field(41).parse().unwrap(),
            nice: field(19).parse().unwrap(),
            cpu_ns: schedstat.split_whitespace().next()?.parse().unwrap(),
        })
    };
    tasks.filter_map(|task| row(task.ok()?.path())).collect()
}

/// Requirement 3 of issue 11: the fill runs on threads of its own (named `fill`) at idle
/// priority, SCHED_IDLE (policy 5) or nice 19, while serving's threads (named `serve`) keep
/// the normal class; and the fill threads ran during the fill (they used CPU).
#[test]
fn the_fill_runs_on_its_own_idle_priority_threads_not_servings() {
    const SCHED_OTHER: u32 = 0;
    const SCHED_IDLE: u32 = 5;
    let scratch = Scratch::new("fill-threads");
    let files = catalog(12, 2 << 20, 41);
    let (_, nginx) = nginx_origin(&scratch, &files);
    let drives = formatted_drives(&scratch, 2, 96 << 20, 8);
    let manifest = nginx.url("/manifest.json");
    let fill = slow_fill_section(&manifest, &[nginx.url("")]);
    let daemon = daemon(&scratch, &drives, fill);
    let ctl = daemon.ctl();
    let before: HashMap<String, u64> = threads_of(daemon.pid())
        .into_iter()
        .map(|thread| (thread.id, thread.cpu_ns))
        .collect();
    ctl.fill(None).expect("the fill starts");
    let mut samples = 0;
    let mut fill_cpu_ns_max = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while ctl.fill_status().unwrap()["running"] == true {
        assert!(Instant::now() < deadline, "the fill ends");
        let threads = threads_of(daemon.pid());
        for thread in &threads {
            if thread.name.starts_with("fill") {
                assert!(
                    thread.policy == SCHED_IDLE || thread.nice == 19,
                    "a fill thread at normal priority: {thread:?}"
                );
            } else if thread.name.starts_with("serve") {
                assert!(
                    thread.policy == SCHED_OTHER && thread.nice == 0,
                    "a serving thread was lowered: {thread:?}"
                );
            }
        }
        let named = |prefix: &str| threads.iter().any(|thread| thread.name.starts_with(prefix));
        if named("fill") && named("serve") {
            samples += 1;
        }
        // Blocking threads come and go: the most the live fill threads had used at once.
        let used = threads
            .iter()
            .filter(|thread| thread.name.starts_with("fill"))
            .map(|thread| thread.cpu_ns - before.get(&thread.id).copied().unwrap_or(0))
            .sum();
        fill_cpu_ns_max = fill_cpu_ns_max.max(used);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        samples > 3,
        "fill and serving threads seen during the fill: {samples}"
    );
    assert!(
        fill_cpu_ns_max > 0,
        "the fill's threads ran during the fill"
    );
    let status = ctl.fill_status().unwrap();
    assert_eq!(status["last"]["files_fetched"], 12, "{status}");
    check_served(&daemon, &files);
}
