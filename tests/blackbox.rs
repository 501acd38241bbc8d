//! Black-box tests of the real `applianced` binary: formatting refusals, start-up with broken
//! or missing drives, SIGKILL in the middle of writing many files, the same on a loop device,
//! a drive that starts failing I/O (device-mapper error target) staying out of service, a
//! drive failing under the running daemon turning status, `/health` and `/metrics` degraded,
//! and a drive in a newer on-disk format reported failed and never touched.

mod util;

use appliance_store::layout::{FORMAT_VERSION, FORMAT_VERSION_OLDEST_READ, SUPERBLOCK_BYTES};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use util::{applianced, loop_device, root_or_skip, Catalog, Scratch, APPLIANCED};

#[test]
fn format_refuses_foreign_and_appliance_data_unless_forced() {
    let scratch = Scratch::new("format");
    let drive = scratch.drive("d0", 64 << 20);
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&drive)
        .status();
    if !status.is_ok_and(|status| status.success()) {
        // Without mkfs, plant the ext4 magic by hand.
        util::write_at(&drive, 0x438, &[0x53, 0xEF]);
    }
    let refused = applianced(&["format", "--segment-mib", "4", drive.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(
        refused.stderr.contains("ext2/3/4 filesystem"),
        "{}",
        refused.stderr
    );
    let forced = applianced(&[
        "format",
        "--force",
        "--segment-mib",
        "4",
        drive.to_str().unwrap(),
    ]);
    assert!(forced.status.success(), "{}", forced.stderr);
    let again = applianced(&["format", "--segment-mib", "4", drive.to_str().unwrap()]);
    assert!(
        again.stderr.contains("holds appliance data"),
        "{}",
        again.stderr
    );
    let tiny = scratch.drive("tiny", 1 << 20);
    let small = applianced(&["format", "--segment-mib", "4", tiny.to_str().unwrap()]);
    assert!(small.stderr.contains("too small"), "{}", small.stderr);
}

#[test]
fn broken_or_missing_drives_are_reported_and_the_others_serve() {
    let scratch = Scratch::new("broken");
    let good = scratch.drive("good", 64 << 20);
    let broken = scratch.drive("broken", 64 << 20);
    let blank = scratch.drive("blank", 64 << 20);
    for drive in [&good, &broken] {
        let out = applianced(&["format", "--segment-mib", "4", drive.to_str().unwrap()]);
        assert!(out.status.success(), "{}", out.stderr);
    }
    util::write_at(&broken, 100, b"garbage over superblock A");
    util::write_at(&broken, 4096 + 100, b"garbage over superblock B");
    let catalog = Catalog::generate(&scratch, "src", 6, 300_000);
    let missing = scratch.path("missing");
    let drives = [good.as_path(), &broken, &blank, &missing];
    let out = scratch.store(&drives, &["import", catalog.root.to_str().unwrap()]);
    assert!(out.status.success(), "{}", out.stderr);
    let stats = scratch.store(&drives, &["stats", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&stats.stdout).expect("stats JSON");
    let states: Vec<&str> = report["drives"]
        .as_array()
        .unwrap()
        .iter()
        .map(|drive| drive["state"].as_str().unwrap())
        .collect();
    assert_eq!(states[0], "ok");
    assert!(states[1].contains("no valid superblock"), "{states:?}");
    assert!(states[2].contains("not formatted"), "{states:?}");
    assert!(states[3].starts_with("failed"), "{states:?}");
    assert_eq!(report["files"], 6);
    catalog.check_all(&scratch, &drives);
}

/// Kills `import` with SIGKILL after a random number of files, again and again; after each
/// kill every file the store lists (and every one it reported published) is byte-exact.
fn kill_loop(scratch: &Scratch, drives: &[&std::path::Path], rounds: u64) {
    let catalog = Catalog::generate(scratch, "src", 40, 3_000_000);
    for round in 0..rounds {
        let stop_after = 1 + (round * 7 + 3) % 25;
        let mut child = Command::new(APPLIANCED)
            .args(scratch.store_args(drives))
            .args(["import", "--jobs", "4", catalog.root.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn import");
        let mut published = Vec::new();
        let stdout = child.stdout.take().unwrap();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(rest) = line.strip_prefix("published ") {
                published.push(rest.split(' ').next().unwrap().to_string());
            }
            if published.len() as u64 >= stop_after {
                break;
            }
        }
        appliance_testkit::send_signal(child.id(), "KILL").unwrap();
        let _ = child.wait();
        let listed = catalog.check_listed(scratch, drives);
        for path in &published {
            assert!(
                listed.contains(path),
                "round {round}: published {path} lost after SIGKILL; published {published:?}, listed {listed:?}"
            );
        }
    }
    let out = scratch.store(drives, &["import", catalog.root.to_str().unwrap()]);
    assert!(out.status.success(), "{}", out.stderr);
    catalog.check_all(scratch, drives);
    let verify = scratch.store(drives, &["verify"]);
    assert!(
        verify.status.success(),
        "{}{}",
        verify.stdout,
        verify.stderr
    );
}

#[test]
fn sigkill_during_import_never_loses_a_published_file() {
    let scratch = Scratch::new("kill");
    let d0 = scratch.drive("d0", 96 << 20);
    let d1 = scratch.drive("d1", 96 << 20);
    for drive in [&d0, &d1] {
        let out = applianced(&["format", "--segment-mib", "4", drive.to_str().unwrap()]);
        assert!(out.status.success(), "{}", out.stderr);
    }
    kill_loop(&scratch, &[&d0, &d1], 6);
}

#[test]
fn sigkill_on_a_loop_device() {
    let Some(()) = root_or_skip("sigkill_on_a_loop_device") else {
        return;
    };
    let scratch = Scratch::new("loop");
    let backing = scratch.drive("backing", 160 << 20);
    let Some(device) = loop_device(&backing) else {
        return;
    };
    let out = applianced(&[
        "format",
        "--segment-mib",
        "4",
        device.path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", out.stderr);
    kill_loop(&scratch, &[&device.path], 3);
}

#[test]
fn a_drive_that_fails_io_is_taken_out_of_service_and_stays_out() {
    let Some(()) = root_or_skip("a_drive_that_fails_io") else {
        return;
    };
    let scratch = Scratch::new("dm");
    let backing = scratch.drive("backing", 64 << 20);
    let Some(device) = loop_device(&backing) else {
        return;
    };
    let Some(mapped) = util::DmDevice::create(&scratch.name, &device.path) else {
        return;
    };
    let healthy = scratch.drive("healthy", 64 << 20);
    for drive in [&mapped.path, &healthy] {
        let out = applianced(&["format", "--segment-mib", "4", drive.to_str().unwrap()]);
        assert!(out.status.success(), "{}", out.stderr);
    }
    let catalog = Catalog::generate(&scratch, "src", 12, 400_000);
    let drives = [mapped.path.as_path(), healthy.as_path()];
    let out = scratch.store(&drives, &["import", catalog.root.to_str().unwrap()]);
    assert!(out.status.success(), "{}", out.stderr);
    mapped.fail_all_io();
    let verify = scratch.store(&drives, &["verify"]);
    let stats = scratch.store(&drives, &["stats", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&stats.stdout).expect("stats JSON");
    let state = report["drives"][0]["state"].as_str().unwrap().to_string();
    assert!(state.starts_with("failed"), "{state} / {}", verify.stdout);
    assert_eq!(report["drives"][1]["state"], "ok");
    mapped.restore();
    let after = scratch.store(&drives, &["stats", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&after.stdout).expect("stats JSON");
    assert!(
        report["drives"][0]["state"]
            .as_str()
            .unwrap()
            .contains("marked failed"),
        "a failed drive must stay out of service after a restart: {report}"
    );
    let healthy_files = report["drives"][1]["files"].as_u64().unwrap();
    assert_eq!(report["files"].as_u64().unwrap(), healthy_files);
    assert!(healthy_files > 0);
}

/// A data drive that fails while the daemon runs (its file cut short under it: every read
/// past the cut fails, as on a dying drive) turns the box `degraded` in `appliance-ctl
/// status`, `/health` and `/metrics` at once: all three read one snapshot.
#[test]
fn a_drive_that_fails_under_the_running_daemon_makes_the_box_degraded_everywhere_at_once() {
    let scratch = Scratch::new("degraded");
    let drives = util::formatted_drives(&scratch, 2, 64 << 20, 4);
    let catalog = Catalog::generate(&scratch, "src", 12, 400_000);
    let paths: Vec<&std::path::Path> = drives.iter().map(|drive| drive.as_path()).collect();
    let out = scratch.store(&paths, &["import", catalog.root.to_str().unwrap()]);
    assert!(out.status.success(), "{}", out.stderr);
    let daemon = util::Daemon::start(&scratch, appliance_testkit::Config::new(&drives));
    let ctl = daemon.ctl();
    assert_eq!(ctl.status().unwrap()["state"], "serving");
    let failing = &drives[0];
    std::fs::OpenOptions::new()
        .write(true)
        .open(failing)
        .unwrap()
        .set_len(5 << 20)
        .unwrap();
    // Verify reads every file through the drives' rings: the failing drive is taken out.
    let verify = ctl.run(&["verify"]).unwrap();
    assert!(!verify.status.success(), "{verify:?}");
    let status = ctl.status().unwrap();
    let (code, body) = daemon.admin("GET", "/health");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["state"], "degraded", "{status}");
    assert_eq!(
        status["healthy"], true,
        "one drive of two still serves: {status}"
    );
    assert_eq!(code, 200, "{body}");
    for key in ["state", "healthy", "problems", "drives"] {
        assert_eq!(health[key], status[key], "{key}");
    }
    let problems = status["problems"].to_string();
    assert!(problems.contains(failing.to_str().unwrap()), "{problems}");
    assert_eq!(status["drives"][0]["state"], "failed", "{status}");
    let (_, metrics) = daemon.admin("GET", "/metrics");
    assert!(
        metrics.contains("appliance_state{state=\"degraded\"} 1"),
        "{metrics}"
    );
    let drive_down = format!("appliance_drive_up{{drive=\"{}\"}} 0", failing.display());
    assert!(
        metrics.contains(&drive_down),
        "{drive_down} missing:\n{metrics}"
    );
}

/// Rewrites the format version of both superblock copies of a drive file (bytes 8..12 of each
/// 4 KiB copy) and reseals each with its CRC-32C (bytes 4092..4096), as a build of that version
/// would have written them.
fn set_superblock_version(drive: &Path, version: u32) {
    let bytes = std::fs::read(drive).unwrap();
    for copy in 0..2 {
        let start = usize::try_from(copy * SUPERBLOCK_BYTES).unwrap();
        let mut block = bytes[start..start + 4096].to_vec();
        block[8..12].copy_from_slice(&version.to_le_bytes());
        let crc = crc32c::crc32c(&block[..4092]);
        block[4092..].copy_from_slice(&crc.to_le_bytes());
        util::write_at(drive, copy * SUPERBLOCK_BYTES, &block);
    }
}

fn sha256_of(drive: &Path) -> [u8; 32] {
    Sha256::digest(std::fs::read(drive).unwrap()).into()
}

/// A drive that a newer appliance image wrote (both superblock copies name a newer format
/// version, checksums valid) is reported failed with that reason in status and `/health`, the
/// other drive keeps serving its files, `applianced format` without `--force` refuses it with
/// the same reason, and not one byte of it changes: not at start, not at the clean stop
/// (SIGTERM), not at a restart.
#[test]
fn a_drive_in_a_newer_format_is_reported_failed_and_left_untouched() {
    let scratch = Scratch::new("newer-format");
    let drives = util::formatted_drives(&scratch, 2, 64 << 20, 4);
    let catalog = Catalog::generate(&scratch, "src", 10, 300_000);
    let paths: Vec<&Path> = drives.iter().map(|drive| drive.as_path()).collect();
    let out = scratch.store(&paths, &["import", catalog.root.to_str().unwrap()]);
    assert!(out.status.success(), "{}", out.stderr);
    let config = || appliance_testkit::Config::new(&drives);
    let daemon = util::Daemon::start(&scratch, config());
    assert_eq!(daemon.ctl().status().unwrap()["state"], "serving");
    assert!(daemon.stop().success());
    let newer = &drives[0];
    let version = FORMAT_VERSION + 1;
    set_superblock_version(newer, version);
    let before = sha256_of(newer);
    let reason = format!(
        "store format version {version} is newer than this build reads \
         ({FORMAT_VERSION_OLDEST_READ}..={FORMAT_VERSION}): written by a newer appliance image; \
         the drive is left untouched (boot the newer image, or reformat it by hand with \
         applianced format --force)"
    );
    for run in ["first start", "restart"] {
        let daemon = util::Daemon::start(&scratch, config());
        let status = daemon.ctl().status().unwrap();
        let (code, body) = daemon.admin("GET", "/health");
        assert_eq!(code, 200, "{run}: the other drive serves: {body}");
        let health: serde_json::Value = serde_json::from_str(&body).unwrap();
        for view in [&status, &health] {
            assert_eq!(view["state"], "degraded", "{run}: {view}");
            assert_eq!(view["drives"][0]["state"], "failed", "{run}: {view}");
            assert_eq!(view["drives"][0]["error"], reason.as_str(), "{run}: {view}");
            assert_eq!(view["drives"][1]["state"], "ok", "{run}: {view}");
            let problems = view["problems"].to_string();
            assert!(problems.contains(&reason), "{run}: {problems}");
        }
        let (_, metrics) = daemon.admin("GET", "/metrics");
        let drive_down = format!("appliance_drive_up{{drive=\"{}\"}} 0", newer.display());
        assert!(
            metrics.contains(&drive_down),
            "{run}: {drive_down}:\n{metrics}"
        );
        let mut served = 0;
        for (path, bytes) in &catalog.files {
            if let Some(body) = daemon.get(path) {
                assert!(body == *bytes, "{run}: {path} bytes");
                served += 1;
            }
        }
        assert!(served > 0, "{run}: the other drive serves its files");
        assert_eq!(Some(served), status["drives"][1]["files"].as_u64(), "{run}");
        if run == "first start" {
            let refused = applianced(&["format", "--segment-mib", "4", newer.to_str().unwrap()]);
            assert!(!refused.status.success(), "{run}: {}", refused.stdout);
            assert!(
                refused.stderr.contains(&reason),
                "{run}: {}",
                refused.stderr
            );
            assert!(
                refused.stderr.contains("holds appliance data"),
                "{run}: {}",
                refused.stderr
            );
        }
        assert!(daemon.stop().success(), "{run}: a clean stop");
        assert!(
            sha256_of(newer) == before,
            "{run}: the newer drive's bytes changed"
        );
    }
}
