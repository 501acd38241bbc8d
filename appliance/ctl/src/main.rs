//! `appliance-ctl`: the operator's command line. It speaks the control protocol
//! (`appliance-proto`) over the daemon's Unix socket and prints readable tables or, with
//! `--json`, the daemon's JSON. It holds no appliance logic of its own.

use anyhow::{bail, Context, Result};
use appliance_proto::{Command, Request, Response, DEFAULT_SOCKET};
use clap::{CommandFactory, Parser, Subcommand};
use serde_json::Value;
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
    /// Writes shell completions and man pages into a folder (the image build runs it).
    #[command(hide = true)]
    GenerateDocs(appliance_clidocs::GenerateDocsArgs),
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
        Action::Status => show(cli, Command::Status, print_status),
        Action::Drives => show(cli, Command::Drives, |body| print_drives(&body["drives"])),
        Action::Fill { cancel: true, .. } => {
            show(cli, Command::FillCancel, |_| println!("fill cancelled"))
        }
        Action::Fill { manifest, wait, .. } => fill(cli, manifest.clone(), *wait),
        Action::Drain => show(cli, Command::Drain, |body| {
            println!("draining: {}", body["state"].as_str().unwrap_or("?"))
        }),
        Action::Undrain => show(cli, Command::Undrain, |body| {
            println!("state: {}", body["state"].as_str().unwrap_or("?"))
        }),
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

    /// The next line from the daemon.
    fn next(&mut self) -> Result<Response> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("the daemon closed the connection");
        }
        serde_json::from_str(&line).context("the daemon's answer is not a protocol line")
    }

    /// Sends a command and returns its final response body (errors become errors).
    fn call(&mut self, command: Command) -> Result<Value> {
        self.send(command)?;
        loop {
            let response = self.next()?;
            if let Some(error) = response.error {
                bail!("{error}");
            }
            if response.done {
                return Ok(response.body);
            }
        }
    }
}

fn show(cli: &Cli, command: Command, print: impl Fn(&Value)) -> Result<()> {
    let body = Connection::open(&cli.socket)?.call(command)?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        print(&body);
    }
    Ok(())
}

fn gib(bytes: &Value) -> String {
    format!(
        "{:.1}",
        bytes.as_f64().unwrap_or(0.0) / f64::from(1u32 << 30)
    )
}

fn print_status(body: &Value) {
    println!(
        "state: {}   version: {}   uptime: {} s",
        body["state"].as_str().unwrap_or("?"),
        body["version"].as_str().unwrap_or("?"),
        body["uptime_s"]
    );
    println!();
    print_drives(&body["drives"]);
    let catalog = &body["catalog"];
    println!();
    println!(
        "catalog: {} files, {} GiB held; manifest lists {} files; {} pending deletes",
        catalog["files"],
        gib(&catalog["bytes"]),
        catalog["manifest_files"],
        catalog["pending_deletes"]
    );
    let fill = &body["fill"];
    let last = &fill["last"];
    println!(
        "fill: {} (window {}); progress {}/{} files, {}/{} GiB",
        if fill["running"] == true {
            "running"
        } else {
            "idle"
        },
        fill["window"].as_str().unwrap_or("none"),
        fill["files_done"],
        fill["files_total"],
        gib(&fill["bytes_done"]),
        gib(&fill["bytes_total"])
    );
    if !last.is_null() {
        println!(
            "      last: {} fetched, {} failed, {} deleted, {} cannot fit{}",
            last["files_fetched"],
            last["files_failed"],
            last["files_deleted"],
            last["cannot_fit"].as_array().map_or(0, Vec::len),
            last["error"]
                .as_str()
                .map(|error| format!(", error: {error}"))
                .unwrap_or_default()
        );
    }
    for source in fill["sources"].as_array().into_iter().flatten() {
        println!(
            "      source {}: {} files, {} GiB, {} errors, {} missing, {} bad",
            source["base_url"].as_str().unwrap_or("?"),
            source["files_ok"],
            gib(&source["bytes"]),
            source["errors"],
            source["missing"],
            source["bad_bytes"]
        );
    }
    let traffic = &body["traffic"];
    println!(
        "traffic: {} connections, {:.0} requests/s, {:.3} Gb/s, {} hits, {} misses",
        traffic["connections"],
        traffic["requests_per_s"].as_f64().unwrap_or(0.0),
        traffic["gbps"].as_f64().unwrap_or(0.0),
        traffic["hits"],
        traffic["misses"]
    );
    let host = &body["host"];
    println!(
        "host: load {:.2}, cpu {:.0}%, memory {} of {} MiB",
        host["load_1m"].as_f64().unwrap_or(0.0),
        host["cpu_percent"].as_f64().unwrap_or(0.0),
        host["memory_used_bytes"].as_u64().unwrap_or(0) >> 20,
        host["memory_total_bytes"].as_u64().unwrap_or(0) >> 20
    );
}

fn print_drives(drives: &Value) {
    let rows: Vec<&Value> = drives.as_array().into_iter().flatten().collect();
    let width = rows
        .iter()
        .filter_map(|drive| drive["path"].as_str())
        .map(str::len)
        .max()
        .unwrap_or(5)
        .max(5);
    println!(
        "{:<width$} {:<20} {:<16} {:>9} {:>9} {:>8}  state",
        "drive", "model", "serial", "size GiB", "used GiB", "files"
    );
    for drive in rows {
        let state = match drive["error"].as_str() {
            Some(error) => format!("failed: {error}"),
            None => drive["state"].as_str().unwrap_or("?").to_string(),
        };
        println!(
            "{:<width$} {:<20} {:<16} {:>9} {:>9} {:>8}  {}",
            drive["path"].as_str().unwrap_or("?"),
            drive["model"].as_str().unwrap_or("-"),
            drive["serial"].as_str().unwrap_or("-"),
            gib(&drive["size_bytes"]),
            gib(&drive["used_bytes"]),
            drive["files"].to_string(),
            state
        );
    }
}

fn fill(cli: &Cli, manifest: Option<String>, wait: bool) -> Result<()> {
    let mut connection = Connection::open(&cli.socket)?;
    let started = connection.call(Command::Fill { manifest })?;
    if !wait {
        if cli.json {
            println!("{}", serde_json::to_string_pretty(&started)?);
        } else {
            println!("fill started");
        }
        return Ok(());
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
        let status = connection.call(Command::FillStatus)?;
        bar.set_length(status["bytes_total"].as_u64().unwrap_or(0));
        bar.set_position(status["bytes_done"].as_u64().unwrap_or(0));
        bar.set_message(format!(
            "{}/{} files",
            status["files_done"], status["files_total"]
        ));
        if status["running"] == false {
            break status;
        }
    };
    bar.finish_and_clear();
    let last = &status["last"];
    if cli.json {
        println!("{}", serde_json::to_string_pretty(last)?);
    } else {
        println!(
            "fill ended: {} fetched, {} failed, {} deleted, {} cannot fit, {} MiB",
            last["files_fetched"],
            last["files_failed"],
            last["files_deleted"],
            last["cannot_fit"].as_array().map_or(0, Vec::len),
            last["bytes_fetched"].as_u64().unwrap_or(0) >> 20
        );
    }
    let failed = last["error"].is_string()
        || last["cancelled"] == true
        || last["files_failed"].as_u64().unwrap_or(0) > 0
        || last["cannot_fit"]
            .as_array()
            .is_some_and(|list| !list.is_empty());
    if failed {
        bail!(
            "the fill did not complete{}",
            last["error"]
                .as_str()
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
        let response = connection.next()?;
        if let Some(error) = response.error {
            bar.finish_and_clear();
            bail!("{error}");
        }
        let body = response.body;
        if !response.done {
            bar.set_length(body["files_total"].as_u64().unwrap_or(0));
            bar.set_position(body["files_done"].as_u64().unwrap_or(0));
            continue;
        }
        bar.finish_and_clear();
        if cli.json {
            println!("{}", serde_json::to_string_pretty(&body)?);
        } else {
            for damage in body["damaged"].as_array().into_iter().flatten() {
                println!(
                    "damaged {}: {}",
                    damage["path"].as_str().unwrap_or("?"),
                    damage["error"].as_str().unwrap_or("?")
                );
            }
            println!(
                "verified {} files, {} damaged",
                body["files_verified"],
                body["damaged"].as_array().map_or(0, Vec::len)
            );
        }
        if body["damaged"]
            .as_array()
            .is_some_and(|damaged| !damaged.is_empty())
        {
            bail!("damaged files found");
        }
        return Ok(());
    }
}
