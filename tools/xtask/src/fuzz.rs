//! `cargo xtask fuzz`: the cargo-fuzz targets in `fuzz/`. `fuzz build` compiles every target
//! (what `cargo xtask test` runs, so the targets cannot rot); `fuzz <target> --seconds N` or
//! `--runs N` runs one target, niced, and prints its executions (log in
//! target/fuzz/<target>.log, corpus in fuzz/corpus/<target>, crashes in fuzz/artifacts/).
//! Stable rustc is enough: `--sanitizer none` keeps cargo-fuzz off nightly-only flags.

use crate::util::{have_cargo_subcommand, is_root, run_in, workspace_root};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

/// The targets, with the longest input each is given (`-max_len`): the decoders need a whole
/// 4096-byte block plus their selector byte.
const TARGETS: &[(&str, u32)] = &[
    ("decoders", 4160),
    ("http_request", 4096),
    ("manifest", 8192),
    ("control", 4096),
    ("tls_first_bytes", 4096),
];

const USAGE: &str = "usage: cargo xtask fuzz <build | TARGET (--seconds N | --runs N)>; \
                     targets: decoders, http_request, manifest, control, tls_first_bytes";

pub fn run(args: &[&str]) -> Result<()> {
    match args {
        ["build"] => build(),
        [target, "--seconds", count] => fuzz(target, Budget::Seconds(parse_count(count)?)),
        [target, "--runs", count] => fuzz(target, Budget::Runs(parse_count(count)?)),
        _ => bail!("{USAGE}"),
    }
}

fn parse_count(text: &str) -> Result<u64> {
    text.parse()
        .with_context(|| format!("{text:?} is not a count"))
}

/// How long one run lasts.
#[derive(Clone, Copy)]
enum Budget {
    Seconds(u64),
    Runs(u64),
}

/// Makes sure `cargo fuzz` exists: installed with `cargo install` when running as root.
fn ensure_cargo_fuzz() -> Result<()> {
    if have_cargo_subcommand("fuzz") {
        return Ok(());
    }
    if !is_root() {
        bail!("cargo-fuzz is missing: cargo install cargo-fuzz --locked");
    }
    run_in(
        &workspace_root(),
        "cargo",
        &["install", "cargo-fuzz", "--locked"],
    )
}

/// Builds every target with the fuzzing instrumentation.
pub fn build() -> Result<()> {
    ensure_cargo_fuzz()?;
    run_in(
        &workspace_root().join("fuzz"),
        "cargo",
        &["fuzz", "build", "--sanitizer", "none"],
    )
}

/// Runs `target` for `budget`; fails on a crash, naming the artifact.
fn fuzz(target: &str, budget: Budget) -> Result<()> {
    let Some((_, max_len)) = TARGETS.iter().find(|(name, _)| *name == target) else {
        bail!("no fuzz target {target:?}; {USAGE}");
    };
    ensure_cargo_fuzz()?;
    let root = workspace_root();
    let log_dir = root.join("target/fuzz");
    std::fs::create_dir_all(&log_dir)?;
    let log_path = log_dir.join(format!("{target}.log"));
    let mut log = std::fs::File::create(&log_path)?;
    let limit = match budget {
        Budget::Seconds(seconds) => format!("-max_total_time={seconds}"),
        Budget::Runs(runs) => format!("-runs={runs}"),
    };
    let max_len = format!("-max_len={max_len}");
    let args = [
        "-n",
        "10",
        "cargo",
        "fuzz",
        "run",
        "--sanitizer",
        "none",
        target,
        "--",
        &limit,
        &max_len,
        "-print_final_stats=1",
    ];
    println!("$ nice {}", args.join(" "));
    let mut child = Command::new("nice")
        .args(args)
        .current_dir(root.join("fuzz"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting cargo fuzz")?;
    let mut executions = None;
    let mut seconds: Option<u64> = None;
    let mut artifact = None;
    for line in BufReader::new(child.stderr.take().context("stderr")?).lines() {
        let line = line?;
        writeln!(log, "{line}")?;
        if let Some(rest) = line.strip_prefix("stat::number_of_executed_units:") {
            executions = rest.trim().parse::<u64>().ok();
        }
        if let Some(rest) = line.strip_prefix("Done ") {
            // "Done 123 runs in 60 second(s)"
            seconds = rest.split_whitespace().nth(3).and_then(|s| s.parse().ok());
        }
        if let Some((_, path)) = line.split_once("Test unit written to ") {
            artifact = Some(path.trim().to_string());
        }
        if is_worth_showing(&line) {
            println!("{line}");
        }
    }
    let status = child.wait()?;
    let summary = serde_json::json!({
        "target": target,
        "executions": executions,
        "seconds": seconds,
        "crash": artifact,
        "log": log_path.display().to_string(),
    });
    println!("{summary}");
    if !status.success() {
        bail!(
            "fuzz target {target} failed ({status}); input: {}; log: {}",
            artifact.as_deref().unwrap_or("none written"),
            log_path.display()
        );
    }
    Ok(())
}

/// libFuzzer prints a line per new coverage point; only the milestones and failures show.
fn is_worth_showing(line: &str) -> bool {
    [
        "pulse", "DONE", "Done ", "ERROR", "panicked", "artifact", "stat::", "error",
    ]
    .iter()
    .any(|marker| line.contains(marker))
}
