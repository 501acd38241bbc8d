//! `appliance-ctl` for tests and tools: the operator's CLI run against one control socket,
//! the way an operator runs it. The binary is the one next to `applianced` in the target
//! folder, built with `cargo build -p appliance-ctl` (same profile) when it is missing or older
//! than that `applianced`, so both speak the same protocol. Must not speak the control
//! protocol itself: every action goes through the CLI.

use crate::error;
use serde_json::Value;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::Mutex;

/// Binaries already checked (and built if needed) by this process.
static CHECKED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// What a finished command printed.
#[derive(Clone, Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl From<std::process::Output> for Output {
    fn from(out: std::process::Output) -> Output {
        Output {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// `appliance-ctl --socket SOCKET`.
#[derive(Clone, Debug)]
pub struct Ctl {
    binary: PathBuf,
    socket: PathBuf,
}

impl Ctl {
    /// The `appliance-ctl` next to `applianced` (built if needed), talking to `socket`.
    pub fn next_to(applianced: &Path, socket: &Path) -> io::Result<Ctl> {
        let binary = applianced.with_file_name("appliance-ctl");
        ensure_built(&binary, applianced)?;
        Ok(Ctl {
            binary,
            socket: socket.to_path_buf(),
        })
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The command line of `args`, as an operator would type it.
    pub fn command_line(&self, args: &[&str]) -> String {
        let mut words = vec![
            self.binary.display().to_string(),
            "--socket".to_string(),
            self.socket.display().to_string(),
        ];
        words.extend(args.iter().map(|arg| arg.to_string()));
        words.join(" ")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        command.arg("--socket").arg(&self.socket).args(args);
        command
    }

    /// Runs `appliance-ctl --socket SOCKET ARGS` and waits for it.
    pub fn run(&self, args: &[&str]) -> io::Result<Output> {
        Ok(self.command(args).output()?.into())
    }

    /// Runs it with standard output and error going where this process's go (for a reader
    /// who watches, as in the demo); fails unless it succeeded.
    pub fn run_shown(&self, args: &[&str]) -> io::Result<()> {
        let status = self.command(args).status()?;
        if !status.success() {
            return Err(error(format!(
                "{} failed: {status}",
                self.command_line(args)
            )));
        }
        Ok(())
    }

    /// Runs it and requires success; its standard output.
    pub fn ok(&self, args: &[&str]) -> io::Result<String> {
        let out = self.run(args)?;
        if !out.status.success() {
            return Err(error(format!(
                "{} failed ({}): {}{}",
                self.command_line(args),
                out.status,
                out.stdout,
                out.stderr.trim()
            )));
        }
        Ok(out.stdout)
    }

    /// `--json ARGS`, required to succeed; its JSON.
    pub fn json(&self, args: &[&str]) -> io::Result<Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let stdout = self.ok(&all)?;
        serde_json::from_str(&stdout)
            .map_err(|failure| error(format!("{}: {failure}: {stdout}", self.command_line(&all))))
    }

    /// `status --json`.
    pub fn status(&self) -> io::Result<Value> {
        self.json(&["status"])
    }

    /// The `fill` part of `status --json`: running, progress, sources, the last report.
    pub fn fill_status(&self) -> io::Result<Value> {
        Ok(self.status()?["fill"].take())
    }

    /// Starts a fill (of `manifest`, or the configured one) without waiting for it.
    pub fn fill(&self, manifest: Option<&str>) -> io::Result<()> {
        let mut args = vec!["fill"];
        args.extend(
            manifest
                .map(|manifest| ["--manifest", manifest])
                .into_iter()
                .flatten(),
        );
        self.ok(&args).map(drop)
    }

    /// `--json fill --wait [--manifest M]`: whether the fill succeeded, and its report. Fails
    /// when no fill report came (the fill could not start, the daemon is gone).
    pub fn fill_wait(&self, manifest: Option<&str>) -> io::Result<(bool, Value)> {
        let mut args = vec!["--json", "fill", "--wait"];
        args.extend(
            manifest
                .map(|manifest| ["--manifest", manifest])
                .into_iter()
                .flatten(),
        );
        let out = self.run(&args)?;
        let report: Value = serde_json::from_str(&out.stdout).map_err(|_| {
            error(format!(
                "{}: no fill report ({}): {}{}",
                self.command_line(&args),
                out.status,
                out.stdout,
                out.stderr.trim()
            ))
        })?;
        Ok((out.status.success(), report))
    }
}

/// `cargo` arguments that build `applianced` and `appliance-ctl` together. Every tool builds
/// them this way, so the two share one feature set and a later build is a no-op instead of a
/// rebuild of shared dependencies.
pub const BUILD_APPLIANCE_ARGS: [&str; 6] = [
    "build",
    "--quiet",
    "-p",
    "applianced",
    "-p",
    "appliance-ctl",
];

/// Builds `binary` (appliance-ctl) when it is missing or older than `applianced`, once per
/// process, in the profile whose folder holds `applianced`.
fn ensure_built(binary: &Path, applianced: &Path) -> io::Result<()> {
    let mut checked = CHECKED.lock().unwrap_or_else(|poison| poison.into_inner());
    if checked.iter().any(|known| known == binary) {
        return Ok(());
    }
    let modified = |path: &Path| std::fs::metadata(path).and_then(|meta| meta.modified());
    let stale = match (modified(binary), modified(applianced)) {
        (Err(_), _) => true,
        (Ok(ctl), Ok(daemon)) => ctl < daemon,
        (Ok(_), Err(_)) => false,
    };
    if stale {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut command = Command::new(cargo);
        // appliance-ctl alone: a test's `applianced` was built with the dev-dependencies'
        // features unified in (sha2's std, ...), so building it here again would rebuild it
        // (and half the tree) with other features, at every test run. A test also inherits
        // its own package's CARGO_MANIFEST_DIR, which build scripts (ring's) watch.
        command
            .env_remove("CARGO_MANIFEST_DIR")
            .args(["build", "--quiet", "-p", "appliance-ctl"])
            .arg("--manifest-path")
            .arg(&workspace);
        let profile = applianced.parent().and_then(Path::file_name);
        if profile.is_some_and(|name| name == "release") {
            command.arg("--release");
        }
        let status = command.status()?;
        if !status.success() {
            return Err(error(format!("cargo build -p appliance-ctl: {status}")));
        }
    }
    if !binary.is_file() {
        return Err(error(format!(
            "no appliance-ctl at {} (next to {})",
            binary.display(),
            applianced.display()
        )));
    }
    checked.push(binary.to_path_buf());
    Ok(())
}
