//! Small helpers of the automation: paths, running commands, process memory. What the tools
//! share with the tests (ports, HTTP, nginx, processes, configs, manifests) is in
//! `appliance-testkit`.

use anyhow::{bail, Context, Result};
pub use appliance_testkit::{have, is_root};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tools/xtask sits two levels below the root")
        .to_path_buf()
}

/// Runs a command in `dir`, streaming its output; fails when it fails.
pub fn run_in(dir: &Path, program: &str, args: &[&str]) -> Result<()> {
    println!("$ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .current_dir(dir)
        .status()
        .with_context(|| format!("starting {program}"))?;
    if !status.success() {
        bail!("{program} {} failed: {status}", args.join(" "));
    }
    Ok(())
}

/// Runs a command and returns its standard output; fails with its standard error.
pub fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("starting {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Resident memory of this process in bytes (VmRSS from /proc/self/status).
pub fn resident_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    text.lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// The release binary of `applianced`, built if needed, with the `appliance-ctl` beside it
/// that drives it (`appliance_testkit::Ctl::next_to`).
pub fn applianced() -> Result<PathBuf> {
    build_appliance(true)
}

/// Builds `applianced` and `appliance-ctl` (release or debug); the path of `applianced`.
pub fn build_appliance(release: bool) -> Result<PathBuf> {
    let root = workspace_root();
    let mut args = appliance_testkit::BUILD_APPLIANCE_ARGS.to_vec();
    if release {
        args.push("--release");
    }
    run_in(&root, "cargo", &args)?;
    let profile = if release { "release" } else { "debug" };
    Ok(root.join("target").join(profile).join("applianced"))
}

/// True when `cargo NAME` is an installed subcommand (`cargo-NAME` on the PATH or in
/// ~/.cargo/bin).
pub fn have_cargo_subcommand(name: &str) -> bool {
    let program = format!("cargo-{name}");
    let in_cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .is_some_and(|home| home.join("bin").join(&program).is_file());
    in_cargo_home || have(&program)
}
