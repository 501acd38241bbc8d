//! Shell completions (bash, zsh, fish) and man pages of the appliance's command lines,
//! generated from their clap definitions, for the hidden `generate-docs` subcommand that
//! `applianced` and `appliance-ctl` both carry (the image build runs it). It owns the layout
//! of what it writes; it must not know either program's commands: it takes the `clap::Command`.

#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use clap::Command;
use clap_complete::Shell;
use std::path::{Path, PathBuf};

/// Options of the hidden `generate-docs` subcommand.
#[derive(clap::Args, Debug)]
pub struct GenerateDocsArgs {
    /// The folder to write into (created if missing): `bash/NAME`, `zsh/_NAME`,
    /// `fish/NAME.fish` and `manS/NAME[-SUBCOMMAND...].S`.
    #[arg(long)]
    pub out: PathBuf,
}

/// The manual section a program's pages belong to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// 1: user commands (`appliance-ctl`).
    UserCommands,
    /// 8: system administration commands and daemons (`applianced`).
    Administration,
}

impl Section {
    fn number(self) -> &'static str {
        match self {
            Section::UserCommands => "1",
            Section::Administration => "8",
        }
    }
}

/// The name of the manual every page belongs to (the third field of `.TH`).
const MANUAL: &str = "ISP cache appliance";

impl GenerateDocsArgs {
    /// Writes the completions and man pages of `command` (the program's whole clap command,
    /// hidden subcommands included: they are left out) into `self.out` and prints each path.
    /// The pages are dated from SOURCE_DATE_EPOCH when set (reproducible builds), else today.
    pub fn run(&self, command: Command, section: Section) -> Result<()> {
        let date_unix_s = match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(value) => value
                .parse()
                .with_context(|| format!("SOURCE_DATE_EPOCH={value:?}: expected seconds"))?,
            Err(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs(),
        };
        for path in generate(command, section, &date(date_unix_s), &self.out)? {
            println!("{}", path.display());
        }
        Ok(())
    }
}

/// Writes bash, zsh and fish completions and one man page per command and subcommand of
/// `command` under `out`, the pages dated `date` (`YYYY-MM-DD`); returns the paths written,
/// completions first.
pub fn generate(
    command: Command,
    section: Section,
    date: &str,
    out: &Path,
) -> Result<Vec<PathBuf>> {
    let command = visible(&command);
    let name = command.get_name().to_string();
    let mut written = Vec::new();
    for (shell, file) in [
        (Shell::Bash, format!("bash/{name}")),
        (Shell::Zsh, format!("zsh/_{name}")),
        (Shell::Fish, format!("fish/{name}.fish")),
    ] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut command.clone(), &name, &mut script);
        written.push(write(&out.join(file), &script)?);
    }
    let version = command.get_version().unwrap_or_default().to_string();
    let mut command = command.disable_help_subcommand(true);
    command.build();
    let pages = Pages {
        folder: out.join(format!("man{}", section.number())),
        section: section.number(),
        date: date.to_string(),
        source: format!("{name} {version}"),
    };
    pages.write_all(&command, &mut written)?;
    Ok(written)
}

/// Where and how the man pages are written.
struct Pages {
    folder: PathBuf,
    section: &'static str,
    /// The `.TH` date field (clap_mangen leaves it empty, and an empty field shifts the
    /// source and manual fields one place left in the rendered page).
    date: String,
    /// The `.TH` source field of every page: the program and its version.
    source: String,
}

impl Pages {
    /// Writes the page of `command` (built: subcommands carry display names such as
    /// `appliance-ctl-status`) and of each of its visible subcommands, depth first.
    fn write_all(&self, command: &Command, written: &mut Vec<PathBuf>) -> Result<()> {
        let name = command.get_display_name().unwrap_or(command.get_name());
        let man = clap_mangen::Man::new(command.clone())
            .title(name.to_uppercase())
            .section(self.section)
            .date(self.date.clone())
            .source(self.source.clone())
            .manual(MANUAL);
        let mut page = Vec::new();
        man.render(&mut page)?;
        written.push(write(&self.folder.join(man.get_filename()), &page)?);
        for subcommand in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
            self.write_all(subcommand, written)?;
        }
        Ok(())
    }
}

/// `command` without its hidden subcommands. clap_complete offers hidden subcommands to the
/// shell (clap_mangen leaves them out), and `clap::Command` cannot remove one, so the root is
/// assembled again from its own arguments, texts, settings and visible subcommands.
fn visible(command: &Command) -> Command {
    let mut root = Command::new(command.get_name().to_string())
        .args(command.get_arguments().cloned())
        .subcommands(
            command
                .get_subcommands()
                .filter(|sub| !sub.is_hide_set())
                .cloned(),
        )
        .subcommand_required(command.is_subcommand_required_set())
        .arg_required_else_help(command.is_arg_required_else_help_set());
    if let Some(version) = command.get_version() {
        root = root.version(version.to_string());
    }
    if let Some(about) = command.get_about() {
        root = root.about(about.clone());
    }
    if let Some(about) = command.get_long_about() {
        root = root.long_about(about.clone());
    }
    if let Some(after) = command.get_after_help() {
        root = root.after_help(after.clone());
    }
    if let Some(after) = command.get_after_long_help() {
        root = root.after_long_help(after.clone());
    }
    root
}

/// The UTC calendar date (`YYYY-MM-DD`) of a Unix time (Howard Hinnant's `civil_from_days`).
fn date(unix_s: u64) -> String {
    let days = unix_s / 86_400 + 719_468;
    let era = days / 146_097;
    let day_of_era = days % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153; // 0 = March
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

fn write(path: &Path, bytes: &[u8]) -> Result<PathBuf> {
    let folder = path.parent().expect("a path under the output folder");
    std::fs::create_dir_all(folder).with_context(|| format!("creating {}", folder.display()))?;
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A program with a visible subcommand tree and a hidden one.
    fn program() -> Command {
        Command::new("prog")
            .version("1.2.3")
            .about("A program.")
            .arg(clap::Arg::new("socket").long("socket").global(true))
            .subcommand_required(true)
            .subcommand(Command::new("status").about("Shows the state."))
            .subcommand(
                Command::new("store")
                    .about("Works with files.")
                    .subcommand(Command::new("ls").about("Lists files.")),
            )
            .subcommand(Command::new("internal").hide(true))
    }

    #[test]
    fn writes_completions_and_one_page_per_visible_command() {
        let out = std::env::temp_dir().join(format!("clidocs-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let written = generate(program(), Section::Administration, "2026-11-23", &out).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|path| path.strip_prefix(&out).unwrap().display().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "bash/prog",
                "zsh/_prog",
                "fish/prog.fish",
                "man8/prog.8",
                "man8/prog-status.8",
                "man8/prog-store.8",
                "man8/prog-store-ls.8",
            ]
        );
        for path in &written {
            let text = std::fs::read_to_string(path).unwrap();
            assert!(
                !text.contains("internal"),
                "{} names the hidden one",
                path.display()
            );
        }
        let page = std::fs::read_to_string(out.join("man8/prog-store-ls.8")).unwrap();
        for line in [
            ".TH PROG-STORE-LS 8 2026-11-23 \"prog 1.2.3\" \"ISP cache appliance\"",
            "prog\\-store\\-ls \\- Lists files.",
            "\\fBprog store ls\\fR [\\fB\\-\\-socket\\fR] [\\fB\\-h\\fR|\\fB\\-\\-help\\fR] ",
        ] {
            assert!(
                page.lines().any(|got| got == line),
                "no {line:?} in\n{page}"
            );
        }
        let parent = std::fs::read_to_string(out.join("man8/prog.8")).unwrap();
        assert!(parent.contains("prog\\-store(8)"), "{parent}");
        let _ = std::fs::remove_dir_all(&out);
    }

    #[test]
    fn dates_of_unix_times() {
        for (unix_s, expected) in [
            (0, "1970-01-01"),
            (86_399, "1970-01-01"),
            (951_782_400, "2000-02-29"),
            (951_868_800, "2000-03-01"),
            (1_709_164_800, "2024-02-29"),
            (1_798_761_599, "2026-12-31"),
            (4_107_542_400, "2100-03-01"),
        ] {
            assert_eq!(date(unix_s), expected, "{unix_s}");
        }
    }
}
