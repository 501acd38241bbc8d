//! The systemd integration in `systemd/`: `systemd-analyze verify` has nothing to say about
//! the units, `systemd-analyze security` rates them at an exposure of 2.0 or lower, the device
//! classes they allow exist, sysusers.d and tmpfiles.d create the user and its folders, and the
//! example configuration passes `applianced check-config`. A missing systemd tool is reported
//! and the test returns.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The units, as installed under /usr/lib/systemd/system.
const UNITS: [&str; 4] = [
    "applianced.service",
    "applianced.socket",
    "appliance-fill.service",
    "appliance-fill.timer",
];

/// The highest acceptable `systemd-analyze security` exposure, in tenths.
const EXPOSURE_TENTHS_MAX: u32 = 20;

fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../systemd")
}

/// A folder of its own under target/, emptied at start.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("systemd-{name}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs a command; None (after saying why) when the program is not installed.
fn run(test: &str, program: &str, args: &[&str]) -> Option<(bool, String)> {
    match Command::new(program).args(args).output() {
        Ok(out) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            Some((out.status.success(), text))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("{test}: skipped: {program} is not installed (Debian package systemd)");
            None
        }
        Err(error) => panic!("running {program}: {error}"),
    }
}

/// Copies the units into `dir` with the binaries they start replaced by the built daemon:
/// `systemd-analyze` refuses an ExecStart= whose program does not exist, and appliance-ctl
/// (another package) is not built by this test, so the daemon stands in for it too.
fn copy_units(dir: &Path) -> Vec<PathBuf> {
    let daemon = env!("CARGO_BIN_EXE_applianced");
    UNITS
        .iter()
        .map(|unit| {
            let text = fs::read_to_string(systemd_dir().join(unit)).unwrap();
            let rewritten = text
                .replace("/usr/bin/applianced ", &format!("{daemon} "))
                .replace("/usr/bin/appliance-ctl ", &format!("{daemon} "));
            if unit.ends_with(".service") {
                assert_ne!(text, rewritten, "{unit} starts neither binary");
            }
            let path = dir.join(unit);
            fs::write(&path, rewritten).unwrap();
            path
        })
        .collect()
}

#[test]
fn systemd_analyze_verify_has_nothing_to_say_about_the_units() {
    let test = "systemd_analyze_verify";
    let dir = scratch("verify");
    let units = copy_units(&dir);
    let mut args = vec!["verify", "--man=no"];
    args.extend(units.iter().map(|path| path.to_str().unwrap()));
    let Some((success, output)) = run(test, "systemd-analyze", &args) else {
        return;
    };
    println!(
        "systemd-analyze verify said ({} bytes):\n{output}",
        output.len()
    );
    let ours: Vec<&str> = output
        .lines()
        .filter(|line| UNITS.iter().any(|unit| line.contains(unit)))
        .collect();
    assert!(
        ours.is_empty(),
        "errors or warnings about our units: {ours:#?}"
    );
    assert!(success, "systemd-analyze verify failed:\n{output}");
}

/// The overall exposure from `systemd-analyze security`'s last line, in tenths.
fn exposure_tenths(table: &str, unit: &str) -> u32 {
    let prefix = format!("Overall exposure level for {unit}: ");
    let line = table
        .lines()
        .find_map(|line| line.split_once(&prefix).map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("no overall exposure for {unit} in:\n{table}"));
    let score = line.split_whitespace().next().unwrap();
    let (whole, tenth) = score.split_once('.').unwrap();
    whole.parse::<u32>().unwrap() * 10 + tenth.parse::<u32>().unwrap()
}

#[test]
fn systemd_analyze_security_rates_the_services_at_2_or_lower() {
    let test = "systemd_analyze_security";
    let dir = scratch("security");
    let units = copy_units(&dir);
    for path in units
        .iter()
        .filter(|path| path.extension().unwrap() == "service")
    {
        let unit = path.file_name().unwrap().to_str().unwrap();
        // --offline: analyse the unit file itself, not a unit loaded into a running manager.
        let args = [
            "security",
            "--offline=true",
            "--no-pager",
            path.to_str().unwrap(),
        ];
        let Some((_, table)) = run(test, "systemd-analyze", &args) else {
            return;
        };
        println!("systemd-analyze security --offline=true {unit}:\n{table}");
        let tenths = exposure_tenths(&table, unit);
        assert!(
            tenths <= EXPOSURE_TENTHS_MAX,
            "{unit}: exposure {}.{} is above {}.{}",
            tenths / 10,
            tenths % 10,
            EXPOSURE_TENTHS_MAX / 10,
            EXPOSURE_TENTHS_MAX % 10
        );
    }
}

/// `DeviceAllow=block-NAME` matches device groups of /proc/devices by name, and a name that
/// matches nothing (such as "block-nvme": NVMe namespaces are "blkext") silently allows
/// nothing, which `systemd-analyze verify` cannot see.
#[test]
fn device_classes_allowed_to_the_daemon_exist_in_proc_devices() {
    let Ok(devices) = fs::read_to_string("/proc/devices") else {
        eprintln!("device_classes: skipped: no /proc/devices");
        return;
    };
    let block_groups: Vec<&str> = devices
        .split_once("Block devices:")
        .expect("/proc/devices lists block devices")
        .1
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .collect();
    let unit = fs::read_to_string(systemd_dir().join("applianced.service")).unwrap();
    let allowed: Vec<&str> = unit
        .lines()
        .filter_map(|line| line.trim().strip_prefix("DeviceAllow="))
        .collect();
    assert!(!allowed.is_empty(), "applianced.service allows no device");
    for entry in allowed {
        let specifier = entry.split_whitespace().next().unwrap();
        let group = specifier
            .strip_prefix("block-")
            .unwrap_or_else(|| panic!("DeviceAllow={entry}: expected a block device group"));
        assert!(
            block_groups.contains(&group),
            "DeviceAllow={entry}: no block device group {group:?} in /proc/devices \
             (block groups: {block_groups:?})"
        );
    }
}

#[test]
fn sysusers_and_tmpfiles_create_the_user_and_its_folders() {
    let test = "sysusers_and_tmpfiles";
    let root = scratch("root");
    fs::create_dir_all(root.join("etc")).unwrap();
    let root_arg = format!("--root={}", root.display());
    let sysusers = systemd_dir().join("sysusers.d/appliance.conf");
    let Some((success, output)) = run(
        test,
        "systemd-sysusers",
        &[&root_arg, sysusers.to_str().unwrap()],
    ) else {
        return;
    };
    println!("systemd-sysusers:\n{output}");
    assert!(success, "systemd-sysusers failed:\n{output}");

    let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap();
    let user: Vec<&str> = passwd
        .lines()
        .find(|line| line.starts_with("appliance:"))
        .unwrap_or_else(|| panic!("no user appliance in:\n{passwd}"))
        .split(':')
        .collect();
    let uid: u32 = user[2].parse().unwrap();
    let gid: u32 = user[3].parse().unwrap();
    assert!(uid < 1000, "appliance is not a system user: uid {uid}");
    assert_eq!(user[5], "/var/lib/appliance");
    assert!(user[6].ends_with("/nologin"), "login shell {:?}", user[6]);
    let group = fs::read_to_string(root.join("etc/group")).unwrap();
    assert!(
        group
            .lines()
            .any(|line| line.starts_with(&format!("appliance:x:{gid}:"))),
        "the user's primary group is not appliance:\n{group}"
    );

    if !appliance_testkit::is_root() {
        eprintln!("{test}: tmpfiles part skipped: giving folders to another user needs root");
        return;
    }
    let tmpfiles = systemd_dir().join("tmpfiles.d/appliance.conf");
    let Some((success, output)) = run(
        test,
        "systemd-tmpfiles",
        &[&root_arg, "--create", tmpfiles.to_str().unwrap()],
    ) else {
        return;
    };
    println!("systemd-tmpfiles:\n{output}");
    assert!(success, "systemd-tmpfiles failed:\n{output}");
    for folder in ["run/appliance", "var/lib/appliance", "var/log/appliance"] {
        let metadata = fs::metadata(root.join(folder)).unwrap();
        assert!(metadata.is_dir(), "/{folder} is not a folder");
        assert_eq!(
            metadata.permissions().mode() & 0o7777,
            0o750,
            "/{folder} mode"
        );
        assert_eq!(
            (metadata.uid(), metadata.gid()),
            (uid, gid),
            "/{folder} owner"
        );
    }
}

#[test]
fn the_example_configuration_passes_check_config() {
    let example = systemd_dir().join("appliance.toml.example");
    let out = Command::new(env!("CARGO_BIN_EXE_applianced"))
        .arg("check-config")
        .arg(&example)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("applianced check-config {}: {text}", example.display());
    assert!(out.status.success(), "{text}");
}
