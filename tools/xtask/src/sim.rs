//! `cargo xtask sim --seeds N [--first F]`: the store's deterministic simulations (the
//! sequential one with crashes, and the concurrent one with actors interleaved inside reclaim
//! passes) over N seeds each. A failure names the seed; `SIM_SEED=S cargo test -p
//! appliance-store --test concurrent` (or `--test simulation`) replays it.

use anyhow::{bail, Context, Result};
use std::process::Command;

pub fn run(args: &[&str]) -> Result<()> {
    let mut seeds = 500u64;
    let mut first = 0u64;
    let mut rest = args;
    while let [flag, value, tail @ ..] = rest {
        let number: u64 = value
            .parse()
            .with_context(|| format!("{flag} takes a number, not {value:?}"))?;
        match *flag {
            "--seeds" => seeds = number,
            "--first" => first = number,
            other => bail!("unknown option {other:?} (--seeds N, --first F)"),
        }
        rest = tail;
    }
    if !rest.is_empty() {
        bail!("usage: cargo xtask sim [--seeds N] [--first F]");
    }
    let started = std::time::Instant::now();
    let status = Command::new("cargo")
        .current_dir(crate::util::workspace_root())
        .args([
            "test",
            "-p",
            "appliance-store",
            "--test",
            "simulation",
            "--test",
        ])
        .args(["concurrent", "--", "--nocapture"])
        .env("SIM_SEEDS", seeds.to_string())
        .env("SIM_FIRST_SEED", first.to_string())
        .status()
        .context("running cargo test")?;
    if !status.success() {
        bail!("simulation failed (the seed to replay is printed above)");
    }
    println!(
        "xtask sim: {seeds} seeds from {first} passed in both simulations ({} s)",
        started.elapsed().as_secs()
    );
    Ok(())
}
