//! `cargo xtask`: the project's automation in Rust: `test` (every test tier, what CI runs),
//! `demo` (the appliance's main job on file-backed drives), `image` (the bootable disk image),
//! `vm-test` (boots it under QEMU), `sim` (the store simulations with more seeds), `bench
//! <name>` (figures beside the peer measured in the same run, written to
//! target/bench/<name>.json), `soak` (the SIGKILL crash soak) and `fuzz` (build or run the
//! cargo-fuzz targets).

#![forbid(unsafe_code)]

mod bench;
mod bench_day;
mod bench_fill;
mod bench_host;
mod bench_serve;
mod bench_servers;
mod bench_tls;
mod bundle;
mod cgroup;
mod day_load;
mod demo;
mod fuzz;
mod guest_agent;
mod image;
mod sim;
mod soak;
mod util;
mod vm;
mod wrk;

use anyhow::{bail, Result};

const USAGE: &str = "usage: cargo xtask <test | demo | image | \
                     bundle [--version V] [--cert PEM --key PEM] [--out FILE] | vm-test | \
                     sim [--seeds N] | \
                     bench <store-write|index|recovery|serve|fill|day|tls|all> | \
                     fuzz <build | TARGET --seconds N | TARGET --runs N> | \
                     soak --rounds N [--seed S] [--release]>";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = run(&args);
    if let Err(error) = result {
        eprintln!("xtask: {error:#}");
        std::process::exit(1);
    }
}

fn run(args: &[String]) -> Result<()> {
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["test"] => test(),
        ["demo"] => demo::run(),
        ["image"] => image::build(),
        ["bundle", rest @ ..] => bundle::run(rest),
        ["vm-test"] => vm::test(),
        ["sim", rest @ ..] => sim::run(rest),
        ["bench", name] => bench::run(name),
        ["populate", rest @ ..] => bench::populate_child(rest),
        ["day-load", rest @ ..] => day_load::run_child(rest),
        ["fuzz", rest @ ..] => fuzz::run(rest),
        ["soak", rest @ ..] => soak::run(rest),
        _ => bail!("{USAGE}"),
    }
}

/// Tools the black-box tests drive, and the Debian packages that carry them.
const TEST_TOOLS: &[(&str, &str)] = &[
    ("mkfs.ext4", "e2fsprogs"),
    ("losetup", "mount"),
    ("blockdev", "util-linux"),
    ("fallocate", "util-linux"),
    ("dmsetup", "dmsetup"),
    ("fio", "fio"),
    ("nginx", "nginx"),
    ("curl", "curl"),
    ("openssl", "openssl"),
];

/// Installs missing test tools with apt-get when running as root (a fresh machine).
fn ensure_test_tools() -> Result<()> {
    let missing: Vec<&str> = TEST_TOOLS
        .iter()
        .filter(|(tool, _)| !util::have(tool))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !util::is_root() {
        println!("xtask test: missing {missing:?}; tests that need them will say they skip");
        return Ok(());
    }
    let root = util::workspace_root();
    util::run_in(&root, "apt-get", &["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq"];
    args.extend(missing);
    util::run_in(&root, "apt-get", &args)
}

/// Every test tier: formatting, lints, unit, simulation and black-box tests.
fn test() -> Result<()> {
    ensure_test_tools()?;
    let root = util::workspace_root();
    util::run_in(&root, "cargo", &["fmt", "--all", "--check"])?;
    util::run_in(
        &root,
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    util::run_in(&root, "cargo", &["build", "--workspace", "--all-targets"])?;
    // Every crate's tests, xtask's tidy test (tools/xtask/tests/tidy.rs) among them.
    util::run_in(&root, "cargo", &["test", "--workspace"])?;
    // A short crash soak of the dev-profile daemon that the black-box tests just used.
    soak::soak(soak::Options {
        rounds: 5,
        ..soak::Options::parse(&[])?
    })?;
    // The fuzz targets are built (not run) so an API change cannot leave them broken.
    fuzz::build()?;
    if util::is_root() {
        println!("$ cargo xtask vm-test");
        vm::test()?;
    } else {
        println!("xtask test: the VM test needs root (mmdebstrap, QEMU); skipped");
    }
    println!("xtask test: every tier passed");
    Ok(())
}
