//! `appliance-ctl`: the operator's command line, and the only way to act on a running box. It
//! speaks the control protocol (`appliance-proto`) over the daemon's Unix socket and prints the
//! typed answers as readable tables or, with `--json`, the same types serialised. It holds no
//! appliance logic of its own: what counts as a failed fill is `FillReport::succeeded`.

#![forbid(unsafe_code)]

mod update;

use anyhow::{bail, Context, Result};
use appliance_proto::{
    Command, DriveRow, FillReport, FillStatus, Reply, Request, Response, Scrub, Status, TlsStatus,
    DEFAULT_SOCKET,
};
use clap::{CommandFactory, Parser, Subcommand};
use serde::Serialize;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// Inspect and operate the ISP cache appliance.
#[derive(Parser)]
#[command(name = "appliance-ctl", version, about)]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print the daemon's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Action,
}

#[derive(Subcommand)]
enum Action {
    /// State, drives, catalog, fill, traffic and host.
    Status,
    /// One row per data drive.
    Drives,
    /// Start an out-of-window fill (or cancel the running one).
    Fill {
        /// Fill from this manifest (URL or file on the appliance) instead of the configured one.
        #[arg(long)]
        manifest: Option<String>,
        /// Show progress until the fill ends; exit non-zero if it failed.
        #[arg(long)]
        wait: bool,
        /// Cancel the running fill.
        #[arg(long, conflicts_with_all = ["manifest", "wait"])]
        cancel: bool,
    },
    /// Tell steering to send no new clients (maintenance); `status` reports drained when idle.
    Drain,
    /// Serve normally again.
    Undrain,
    /// Re-read stored files and check them against their checksums.
    Verify {
        /// One stored path; without it, every file.
        path: Option<String>,
        /// Every file (the default when no path is given).
        #[arg(long, conflicts_with = "path")]
        all: bool,
    },
    /// Install a signed image update (RAUC bundle) into the slot not booted.
    Update {
        /// The bundle: a file on the box, or an http(s) URL (downloaded to /var/tmp first).
        source: String,
        /// Reboot into the new slot once it is installed.
        #[arg(long)]
        reboot: bool,
    },
    /// Mark the booted slot good once applianced has been healthy for a while, and notice a
    /// fallback from a failed update (run at every boot by appliance-update-confirm.service).
    ConfirmSlot {
        /// Seconds applianced must be healthy without a break (default 60). A value that is
        /// not a number is reported and the default used: a typo in update.conf must not
        /// keep a good slot from being confirmed.
        #[arg(long, default_value = "60")]
        healthy_for_s: String,
        /// Seconds after which a first boot of new contents that is still not healthy reboots
        /// into the other slot (default 900; same rule).
        #[arg(long, default_value = "900")]
        deadline_s: String,
    },
    /// Writes shell completions and man pages into a folder (the image build runs it).
    #[command(hide = true)]
    GenerateDocs(appliance_clidocs::GenerateDocsArgs),
}

/// The reply's one expected variant, or an error naming what came instead.
macro_rules! reply {
    ($reply:expr, $pattern:pat => $value:expr) => {
        match $reply {
            $pattern => $value,
            other => anyhow::bail!("the daemon answered with an unexpected reply: {other:?}"),
        }
    };
}

fn main() {
    let cli = Cli::parse();
    if let Err(error) = run(&cli) {
        eprintln!("appliance-ctl: {error:#}");
        std::process::exit(1);
    }
}

fn run(cli: &Cli) -> Result<()> {
    match &cli.command {
        Action::Status => status(cli),
        Action::Update { source, reboot } => update::install(source, *reboot),
        Action::ConfirmSlot {
            healthy_for_s,
            deadline_s,
        } => {
            // A daemon that hangs (its socket held by systemd) must not stall the gate past
            // its deadline: each probe gets 10 s.
            let healthy = || -> Result<bool> {
                let mut connection = Connection::open(&cli.socket)?;
                connection
                    .writer
                    .set_read_timeout(Some(Duration::from_secs(10)))?;
                let reply = connection.call(Command::Status)?;
                let status = reply!(reply, Reply::Status(status) => status);
                Ok(status.healthy)
            };
            update::confirm(
                update::seconds_or("--healthy-for-s", healthy_for_s, 60),
                // At least a minute: a shorter deadline would roll back every update.
                update::seconds_or("--deadline-s", deadline_s, 900).max(Duration::from_secs(60)),
                &healthy,
            )
        }
        Action::Drives => {
            let drives = reply!(call(cli, Command::Drives)?, Reply::Drives(drives) => drives);
            print(cli, &drives, |drives| print_drives(drives))
        }
        Action::Fill { cancel: true, .. } => {
            let cancelled = reply!(
                call(cli, Command::FillCancel)?,
                Reply::FillCancelled(cancelled) => cancelled
            );
            print(cli, &cancelled, |cancelled| {
                if cancelled.was_running {
                    println!("fill cancelled");
                } else {
                    println!("no fill was running");
                }
            })
        }
        Action::Fill { manifest, wait, .. } => fill(cli, manifest.clone(), *wait),
        Action::Drain => {
            let state = reply!(call(cli, Command::Drain)?, Reply::State(state) => state);
            print(cli, &state, |state| println!("state: {state}"))
        }
        Action::Undrain => {
            let state = reply!(call(cli, Command::Undrain)?, Reply::State(state) => state);
            print(cli, &state, |state| println!("state: {state}"))
        }
        Action::Verify { path, .. } => verify(cli, path.clone()),
        Action::GenerateDocs(args) => {
            args.run(Cli::command(), appliance_clidocs::Section::UserCommands)
        }
    }
}

/// A connection to the daemon.
struct Connection {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Connection {
    fn open(socket: &PathBuf) -> Result<Connection> {
        let stream = UnixStream::connect(socket).map_err(|error| match error.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                anyhow::anyhow!(
                    "the daemon is not running (no socket at {})",
                    socket.display()
                )
            }
            std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
                "no permission on {} (join the appliance group or use sudo)",
                socket.display()
            ),
            _ => anyhow::anyhow!("cannot reach the daemon at {}: {error}", socket.display()),
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(3600)))?;
        Ok(Connection {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    fn send(&mut self, command: Command) -> Result<()> {
        self.writer
            .write_all(Request::new(command).to_line().as_bytes())?;
        Ok(())
    }

    /// The next line from the daemon: a progress reply (`Ok(false, ..)`) or the final one.
    fn next(&mut self) -> Result<(bool, Reply)> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("the daemon closed the connection");
        }
        let response: Response = serde_json::from_str(&line).with_context(|| {
            format!(
                "the daemon's answer is not a protocol line this appliance-ctl (protocol {}) reads",
                appliance_proto::PROTOCOL_VERSION
            )
        })?;
        if let Some(error) = response.error {
            bail!("{}", error.message);
        }
        match response.reply {
            Some(reply) => Ok((response.done, reply)),
            None => bail!("the daemon's answer has neither a reply nor an error"),
        }
    }

    /// Sends a command and returns its final reply (errors become errors).
    fn call(&mut self, command: Command) -> Result<Reply> {
        self.send(command)?;
        loop {
            let (done, reply) = self.next()?;
            if done {
                return Ok(reply);
            }
        }
    }
}

fn call(cli: &Cli, command: Command) -> Result<Reply> {
    Connection::open(&cli.socket)?.call(command)
}

/// Prints `value` as JSON with `--json`, else as text.
fn print<T: Serialize>(cli: &Cli, value: &T, text: impl Fn(&T)) -> Result<()> {
    if cli.json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        text(value);
    }
    Ok(())
}

fn gib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / f64::from(1u32 << 30))
}

/// `status`: the daemon's status and, on a box that updates through RAUC, its two root slots.
#[derive(Serialize)]
struct StatusWithSlots {
    #[serde(flatten)]
    status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    slots: Option<update::Slots>,
    /// Why the slots could not be read, when they could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    slots_error: Option<String>,
}

fn status(cli: &Cli) -> Result<()> {
    let (slots, slots_error) = if update::available() {
        match update::slots() {
            Ok(slots) => (Some(slots), None),
            Err(error) => (None, Some(format!("{error:#}"))),
        }
    } else {
        (None, None)
    };
    let status = match call(cli, Command::Status) {
        Ok(reply) => reply!(reply, Reply::Status(status) => *status),
        Err(error) => {
            // The slots matter most when the daemon is down (a broken update): show them.
            if let (Some(slots), false) = (&slots, cli.json) {
                update::print_slots(slots);
            }
            return Err(error);
        }
    };
    let combined = StatusWithSlots {
        status,
        slots,
        slots_error,
    };
    print(cli, &combined, |combined| {
        print_status(&combined.status);
        if let Some(slots) = &combined.slots {
            update::print_slots(slots);
        }
        if let Some(error) = &combined.slots_error {
            println!("slots: unavailable ({error})");
        }
    })
}

fn print_status(status: &Status) {
    println!(
        "state: {}{}   version: {}   uptime: {} s",
        status.state,
        if status.healthy { "" } else { " (unhealthy)" },
        status.version,
        status.uptime_s
    );
    for problem in &status.problems {
        println!("problem: {problem}");
    }
    println!();
    print_drives(&status.drives);
    let catalog = &status.catalog;
    println!();
    println!(
        "catalog: {} files, {} GiB held, {} of {} GiB free; {}; {} pending deletes",
        catalog.files,
        gib(catalog.bytes),
        gib(catalog.free_bytes),
        gib(catalog.size_bytes),
        match catalog.manifest_files {
            Some(files) => format!("manifest lists {files} files"),
            None => "no fill has read a manifest yet".to_string(),
        },
        catalog.pending_deletes
    );
    print_fill(&status.fill);
    print_scrub(&status.scrub);
    let traffic = &status.traffic;
    println!(
        "traffic: {} connections, {:.0} requests/s, {:.3} Gb/s, {} hits, {} misses",
        traffic.connections, traffic.requests_per_s, traffic.gbps, traffic.hits, traffic.misses
    );
    let host = &status.host;
    let cpu = host
        .cpu_percent
        .map_or("cpu not sampled yet".to_string(), |cpu| {
            format!("cpu {cpu:.0}%")
        });
    let memory = match (host.memory_used_bytes, host.memory_total_bytes) {
        (Some(used), Some(total)) => format!("memory {} of {} MiB", used >> 20, total >> 20),
        _ => "memory not sampled".to_string(),
    };
    let load = host.load_1m.map_or("load not sampled".to_string(), |load| {
        format!("load {load:.2}")
    });
    println!("host: {load}, {cpu}, {memory}");
    if let Some(tls) = &status.tls {
        print_tls(tls);
    }
}

fn print_tls(tls: &TlsStatus) {
    let path = match &tls.why_user {
        None => "keys in the kernel (kTLS), bodies by sendfile".to_string(),
        Some(why) => format!("encrypted in the process ({why})"),
    };
    println!(
        "tls: {} {path}; open: {} kernel, {} user",
        tls.listen, tls.connections_kernel, tls.connections_user
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |elapsed| elapsed.as_secs_f64());
    for certificate in &tls.certificates {
        println!(
            "  certificate {} for {}: valid until {} (Unix time), {:.0} days from now",
            certificate.file,
            certificate.names.join(" "),
            certificate.not_after_unix_s,
            (certificate.not_after_unix_s as f64 - now) / 86_400.0
        );
    }
}

fn print_fill(fill: &FillStatus) {
    if fill.running {
        println!(
            "fill: running (window {}); {}/{} files, {}/{} GiB",
            fill.window.as_deref().unwrap_or("none"),
            fill.files_done,
            fill.files_total,
            gib(fill.bytes_done),
            gib(fill.bytes_total)
        );
    } else {
        println!(
            "fill: idle (window {})",
            fill.window
                .as_deref()
                .unwrap_or("none: operator starts only")
        );
    }
    match &fill.last {
        Some(last) => println!("      last: {}", report_line(last)),
        None => println!("      last: no fill has run"),
    }
    for source in &fill.sources {
        println!(
            "      source {}: {} files, {} GiB, {} errors, {} missing, {} bad",
            source.base_url,
            source.files_ok,
            gib(source.bytes),
            source.errors,
            source.missing,
            source.bad_bytes
        );
    }
}

/// One line, and a second naming the last corrupt files when there are any.
fn print_scrub(scrub: &Scrub) {
    if !scrub.enabled {
        println!("scrub: disabled");
        return;
    }
    let now = match &scrub.pass {
        Some(pass) => format!(
            "pass at {:.0}% ({}/{} files, {} MiB/s)",
            pass.progress_ratio() * 100.0,
            pass.files_done,
            pass.files_total,
            pass.bytes_per_s >> 20
        ),
        None => "between passes".to_string(),
    };
    let last = scrub
        .last_pass_ended_unix_s
        .map_or("no pass completed yet".to_string(), |ended| {
            format!("last pass ended at {ended} (Unix time)")
        });
    println!(
        "scrub: {now}; every {} s; {} passes, {}; {} files, {} GiB checked, {} corrupt",
        scrub.period_s,
        scrub.passes_completed,
        last,
        scrub.files_checked,
        gib(scrub.bytes_checked),
        scrub.corrupt_files
    );
    if !scrub.corrupt_recent.is_empty() {
        println!(
            "       corrupt (taken out, refetched by the next fill): {}",
            scrub.corrupt_recent.join(", ")
        );
    }
}

/// One line about a fill's outcome.
fn report_line(report: &FillReport) -> String {
    let outcome = if report.succeeded() {
        "succeeded".to_string()
    } else if report.cancelled {
        "cancelled".to_string()
    } else if let Some(error) = &report.error {
        format!("failed: {error}")
    } else {
        "incomplete".to_string()
    };
    format!(
        "{outcome}; {} fetched, {} failed, {} deleted, {} cannot fit, {} MiB",
        report.files_fetched,
        report.files_failed,
        report.files_deleted,
        report.cannot_fit.len(),
        report.bytes_fetched >> 20
    )
}

fn print_drives(drives: &[DriveRow]) {
    let width = drives
        .iter()
        .map(|drive| drive.path.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!(
        "{:<width$} {:<20} {:<16} {:>9} {:>9} {:>8}  state",
        "drive", "model", "serial", "size GiB", "used GiB", "files"
    );
    for drive in drives {
        let state = match &drive.error {
            Some(error) => format!("failed: {error}"),
            None => format!("{:?}", drive.state).to_lowercase(),
        };
        println!(
            "{:<width$} {:<20} {:<16} {:>9} {:>9} {:>8}  {}",
            drive.path,
            drive.model.as_deref().unwrap_or("-"),
            drive.serial.as_deref().unwrap_or("-"),
            gib(drive.size_bytes),
            gib(drive.used_bytes),
            drive.files,
            state
        );
    }
}

fn fill(cli: &Cli, manifest: Option<String>, wait: bool) -> Result<()> {
    let mut connection = Connection::open(&cli.socket)?;
    let started = reply!(
        connection.call(Command::Fill { manifest })?,
        Reply::FillStarted(started) => started
    );
    if !wait {
        return print(cli, &started, |_| println!("fill started"));
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
        )
        .expect("valid template"),
    );
    let status = loop {
        std::thread::sleep(Duration::from_millis(500));
        let status = reply!(
            connection.call(Command::FillStatus)?,
            Reply::FillStatus(status) => status
        );
        bar.set_length(status.bytes_total);
        bar.set_position(status.bytes_done);
        bar.set_message(format!(
            "{}/{} files",
            status.files_done, status.files_total
        ));
        // The fill this command started has ended once none runs and the last report is
        // from it (a report from an earlier fill started before it).
        let ended = status
            .last
            .as_ref()
            .is_some_and(|last| last.started_unix_s >= started.started_unix_s);
        if !status.running && ended {
            break status;
        }
    };
    bar.finish_and_clear();
    let Some(last) = status.last else {
        bail!("the daemon reports no result for the fill");
    };
    print(cli, &last, |last| {
        println!("fill ended: {}", report_line(last))
    })?;
    if !last.succeeded() {
        bail!(
            "the fill did not complete{}",
            last.error
                .as_deref()
                .map(|error| format!(": {error}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

fn verify(cli: &Cli, path: Option<String>) -> Result<()> {
    let mut connection = Connection::open(&cli.socket)?;
    connection.send(Command::Verify { path })?;
    let bar = indicatif::ProgressBar::new(0);
    loop {
        let (done, reply) = match connection.next() {
            Ok(line) => line,
            Err(error) => {
                bar.finish_and_clear();
                return Err(error);
            }
        };
        if !done {
            if let Reply::VerifyProgress(progress) = reply {
                bar.set_length(progress.files_total);
                bar.set_position(progress.files_done);
            }
            continue;
        }
        bar.finish_and_clear();
        let report = reply!(reply, Reply::VerifyReport(report) => report);
        print(cli, &report, |report| {
            for damage in &report.damaged {
                println!("damaged {}: {}", damage.path, damage.error);
            }
            println!(
                "verified {} files, {} damaged",
                report.files_verified,
                report.damaged.len()
            );
        })?;
        if !report.damaged.is_empty() {
            bail!("damaged files found");
        }
        return Ok(());
    }
}
