//! `applianced`: the process shell: command line, configuration, drive opening, the
//! failed-drive list on the OS disk, signals and logging. `run` serves; the store commands
//! work on a stopped appliance.

#![forbid(unsafe_code)]

mod config;
mod control;
mod crash;
mod drives;
mod logging;
mod metrics;
mod operations;
mod run;
mod scrub;
mod store_commands;
mod test_faults;
mod upkeep;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};
use std::path::PathBuf;

/// The ISP cache appliance daemon.
#[derive(Parser)]
#[command(name = "applianced", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Formats data drives with the appliance layout.
    Format(FormatArgs),
    /// Works with the files stored on the data drives (the appliance must not be running).
    Store(store_commands::StoreArgs),
    /// Runs the appliance: recovers the store and serves.
    Run {
        /// The configuration file.
        #[arg(long, default_value = "/etc/appliance/appliance.toml")]
        config: PathBuf,
    },
    /// Runs one fill now, without serving, and prints its report.
    Fill {
        /// The configuration file.
        #[arg(long, default_value = "/etc/appliance/appliance.toml")]
        config: PathBuf,
        /// The manifest (URL or file) instead of the configured one.
        #[arg(long)]
        manifest: Option<String>,
    },
    /// Checks a configuration file without starting.
    CheckConfig {
        /// The configuration file.
        #[arg(default_value = "/etc/appliance/appliance.toml")]
        config: PathBuf,
    },
    /// Writes shell completions and man pages into a folder (the image build runs it).
    #[command(hide = true)]
    GenerateDocs(appliance_clidocs::GenerateDocsArgs),
}

/// Options of `applianced format`.
#[derive(clap::Args)]
struct FormatArgs {
    /// Overwrite drives that hold a filesystem signature or another appliance's data.
    #[arg(long)]
    force: bool,
    /// Segment size in MiB (the unit of allocation and reclaim).
    #[arg(long, default_value_t = 256)]
    segment_mib: u64,
    /// Most files each drive will hold (sizes the checkpoint); default one per MiB.
    #[arg(long)]
    files_max: Option<u64>,
    /// Drives to format: block devices or regular files.
    #[arg(required = true)]
    drives: Vec<PathBuf>,
}

fn main() {
    crash::abort_on_panic();
    logging::init();
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Format(args) => format(&args),
        Command::Store(args) => store_commands::run(args),
        Command::Run { config } => run::run(&config),
        Command::Fill { config, manifest } => run::fill_once(&config, manifest.as_deref()),
        Command::CheckConfig { config } => config::Config::load(&config)
            .and_then(|loaded| match &loaded.tls {
                Some(tls) => tls.check_valid_now().map(|()| loaded),
                None => Ok(loaded),
            })
            .and_then(|loaded| loaded.serve_config())
            .map(|_| {
                println!("{}: ok", config.display());
            }),
        Command::GenerateDocs(args) => {
            args.run(Cli::command(), appliance_clidocs::Section::Administration)
        }
    };
    if let Err(error) = result {
        eprintln!("applianced: {error:#}");
        std::process::exit(1);
    }
}

fn format(args: &FormatArgs) -> Result<()> {
    let mut failures = 0;
    for path in &args.drives {
        match drives::format_one(path, args.segment_mib, args.files_max, args.force) {
            Ok(summary) => println!("{}: {summary}", path.display()),
            Err(error) => {
                eprintln!("{}: {error:#}", path.display());
                failures += 1;
            }
        }
    }
    if failures > 0 {
        anyhow::bail!("{failures} of {} drives not formatted", args.drives.len());
    }
    Ok(())
}
