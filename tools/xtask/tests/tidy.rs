//! The tidy test (after rust-analyzer's `xtask/tests/tidy.rs`): checks of the tree that no
//! compiler makes. ARCHITECTURE.md's code map names only folders, crates and files that exist,
//! and has a row for every workspace crate; every `.rs` file opens with a `//!` line; every
//! crate but `appliance-device` forbids `unsafe`; every `cargo xtask` command is in the code
//! map; fuzz/README.md names every fuzz target. Each failure says which entry to add or fix.
//! It reads files only: it builds nothing and runs nothing.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// The one crate allowed to contain `unsafe` (see ARCHITECTURE.md, "Invariants").
const UNSAFE_CRATE: &str = "appliance-device";
const FORBID_UNSAFE: &str = "#![forbid(unsafe_code)]";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tools/xtask sits two levels below the root")
        .to_path_buf()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|error| panic!("reading {}: {error}", path.display()))
}

fn read_toml(path: &Path) -> toml::Table {
    read(path)
        .parse()
        .unwrap_or_else(|error| panic!("parsing {}: {error}", path.display()))
}

/// Fails with every problem found, one a line, or passes when there are none.
fn assert_no_problems(what: &str, problems: &[String]) {
    assert!(problems.is_empty(), "{what}:\n  {}", problems.join("\n  "));
}

/// One crate of the workspace, or the fuzz crate beside it.
struct Crate {
    /// Its folder relative to the root, as in the root Cargo.toml (`appliance/store`).
    folder: String,
    name: String,
    /// Its library and binary roots, relative to the root.
    roots: Vec<String>,
}

/// Reads a crate's name and its library and binary roots from its Cargo.toml.
fn read_crate(root: &Path, folder: &str) -> Crate {
    let manifest = read_toml(&root.join(folder).join("Cargo.toml"));
    let name = manifest["package"]["name"]
        .as_str()
        .unwrap_or_else(|| panic!("{folder}/Cargo.toml: package.name is not a string"))
        .to_string();
    let mut roots = Vec::new();
    for (section, default) in [("lib", "src/lib.rs"), ("bin", "src/main.rs")] {
        if root.join(folder).join(default).is_file() {
            roots.push(format!("{folder}/{default}"));
        }
        let targets = match manifest.get(section) {
            Some(toml::Value::Array(targets)) => targets.clone(),
            Some(toml::Value::Table(target)) => vec![toml::Value::Table(target.clone())],
            _ => Vec::new(),
        };
        for path in targets
            .iter()
            .filter_map(|target| target.get("path")?.as_str())
        {
            let root_path = format!("{folder}/{}", path.trim_start_matches("./"));
            if !roots.contains(&root_path) {
                roots.push(root_path);
            }
        }
    }
    Crate {
        folder: folder.to_string(),
        name,
        roots,
    }
}

/// The workspace's crates, from the root Cargo.toml's `members`.
fn workspace_crates(root: &Path) -> Vec<Crate> {
    let manifest = read_toml(&root.join("Cargo.toml"));
    let members = manifest["workspace"]["members"]
        .as_array()
        .expect("the root Cargo.toml lists workspace.members");
    let crates: Vec<Crate> = members
        .iter()
        .map(|member| member.as_str().expect("a member is a path"))
        .map(|folder| read_crate(root, folder.trim_end_matches('/')))
        .collect();
    assert!(!crates.is_empty(), "the root Cargo.toml lists no members");
    crates
}

/// One row of the code map: | folder | crate | owns | must not |.
struct Row {
    line: usize,
    folder: String,
    /// The crate column's names in backticks (`(test of `applianced`)` names `applianced`).
    crates: Vec<String>,
    /// What the row says its folder owns.
    owns: String,
}

/// The names in backticks in `text`.
fn backticked(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// Splits a table line at the `|` outside backticks.
fn table_cells(line: &str) -> Vec<String> {
    let mut cells = vec![String::new()];
    let mut in_code = false;
    for character in line.trim().trim_matches('|').chars() {
        match character {
            '`' => in_code = !in_code,
            '|' if !in_code => {
                cells.push(String::new());
                continue;
            }
            _ => {}
        }
        cells.last_mut().expect("one cell at least").push(character);
    }
    cells.iter().map(|cell| cell.trim().to_string()).collect()
}

/// The rows of the table under `## Code map` in ARCHITECTURE.md.
fn code_map(architecture: &str) -> Vec<Row> {
    let mut lines = architecture.lines().enumerate();
    lines
        .by_ref()
        .find(|(_, line)| line.trim() == "## Code map")
        .expect("ARCHITECTURE.md has a `## Code map` section");
    let rows: Vec<Row> = lines
        .skip_while(|(_, line)| !line.starts_with('|'))
        .take_while(|(_, line)| line.starts_with('|'))
        .skip(2) // the header and the |---| line
        .map(|(at, line)| {
            let cells = table_cells(line);
            assert!(
                cells.len() == 4,
                "ARCHITECTURE.md:{}: a code map row has 4 cells (folder, crate, owns, must \
                 not), this one {}",
                at + 1,
                cells.len()
            );
            let folder = backticked(&cells[0]).first().copied().unwrap_or_else(|| {
                panic!(
                    "ARCHITECTURE.md:{}: the folder cell holds no `folder`",
                    at + 1
                )
            });
            Row {
                line: at + 1,
                folder: folder.trim_end_matches('/').to_string(),
                crates: backticked(&cells[1])
                    .into_iter()
                    .map(String::from)
                    .collect(),
                owns: cells[2].clone(),
            }
        })
        .collect();
    assert!(!rows.is_empty(), "ARCHITECTURE.md's code map has no rows");
    rows
}

fn architecture(root: &Path) -> String {
    read(&root.join("ARCHITECTURE.md"))
}

/// Whether a name in backticks is a file or folder path (`layout.rs`, `tests/tidy.rs`,
/// `image/build.sh`) rather than a type, a command or an option.
fn is_path(name: &str) -> bool {
    const EXTENSIONS: [&str; 6] = [".rs", ".sh", ".md", ".toml", ".json", ".service"];
    !name.contains(char::is_whitespace)
        && (name.contains('/') || EXTENSIONS.iter().any(|extension| name.ends_with(extension)))
}

#[test]
fn code_map_names_only_what_exists() {
    let root = workspace_root();
    let crates = workspace_crates(&root);
    let names: BTreeSet<&str> = crates.iter().map(|krate| krate.name.as_str()).collect();
    let mut problems = Vec::new();
    for row in code_map(&architecture(&root)) {
        let at = format!("ARCHITECTURE.md:{} ({})", row.line, row.folder);
        let folder = root.join(&row.folder);
        if !folder.is_dir() {
            problems.push(format!("{at}: folder `{}` does not exist", row.folder));
        }
        for name in &row.crates {
            if !names.contains(name.as_str()) {
                problems.push(format!("{at}: `{name}` is not a workspace crate"));
            }
        }
        if let Some(krate) = crates.iter().find(|krate| krate.folder == row.folder) {
            if !row.crates.contains(&krate.name) {
                problems.push(format!(
                    "{at}: the crate in `{}` is `{}`, the row says {:?}",
                    row.folder, krate.name, row.crates
                ));
            }
        }
        for name in backticked(&row.owns)
            .into_iter()
            .filter(|name| is_path(name))
        {
            let places = [
                folder.join(name),
                folder.join("src").join(name),
                root.join(name),
            ];
            if !places.iter().any(|place| place.exists()) {
                problems.push(format!(
                    "{at}: `{name}` is in none of {}/, {}/src/, the root",
                    row.folder, row.folder
                ));
            }
        }
    }
    assert_no_problems(
        "ARCHITECTURE.md's code map names what does not exist",
        &problems,
    );
}

#[test]
fn every_workspace_crate_has_a_code_map_row() {
    let root = workspace_root();
    let rows = code_map(&architecture(&root));
    let problems: Vec<String> = workspace_crates(&root)
        .iter()
        .filter(|krate| !rows.iter().any(|row| row.folder == krate.folder))
        .map(|krate| {
            format!(
                "workspace member `{}` (crate `{}`) has no row; add \
                 \"| `{}` | `{}` | what it owns | what it must not do |\" to the code map",
                krate.folder, krate.name, krate.folder, krate.name
            )
        })
        .collect();
    assert_no_problems("ARCHITECTURE.md's code map misses crates", &problems);
}

/// Every `.rs` file under `root`, skipping build output, hidden folders and the root
/// entries the root .gitignore lists (demo output, fuzz corpora).
fn rust_files(root: &Path) -> Vec<PathBuf> {
    let ignored: BTreeSet<PathBuf> = read(&root.join(".gitignore"))
        .lines()
        .filter_map(|line| line.trim().strip_prefix('/'))
        .map(|entry| root.join(entry.trim_end_matches('/')))
        .collect();
    let mut files = Vec::new();
    let mut folders = vec![root.to_path_buf()];
    while let Some(folder) = folders.pop() {
        let entries = fs::read_dir(&folder)
            .unwrap_or_else(|error| panic!("listing {}: {error}", folder.display()));
        for entry in entries {
            let path = entry.expect("a folder entry").path();
            let name = path
                .file_name()
                .and_then(|name| name.to_str())
                .unwrap_or("");
            if name.starts_with('.') || name == "target" || ignored.contains(&path) {
                continue;
            }
            if path.is_dir() {
                folders.push(path);
            } else if name.ends_with(".rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_rust_file_opens_with_a_doc_comment() {
    let root = workspace_root();
    let files = rust_files(&root);
    assert!(
        files
            .iter()
            .any(|file| file.ends_with("tools/xtask/tests/tidy.rs")),
        "the walk of {} did not find this file",
        root.display()
    );
    let problems: Vec<String> = files
        .iter()
        .filter(|file| !read(file).starts_with("//!"))
        .map(|file| {
            format!(
                "{}: the first line is not a `//!` line saying what the file owns",
                file.strip_prefix(&root).unwrap_or(file).display()
            )
        })
        .collect();
    assert_no_problems("files without a `//!` opening", &problems);
}

#[test]
fn every_crate_but_the_device_layer_forbids_unsafe() {
    let root = workspace_root();
    let mut crates = workspace_crates(&root);
    crates.push(read_crate(&root, "fuzz"));
    assert!(
        crates.iter().any(|krate| krate.name == UNSAFE_CRATE),
        "{UNSAFE_CRATE} is not in the workspace: update UNSAFE_CRATE and ARCHITECTURE.md"
    );
    let mut problems = Vec::new();
    for krate in crates.iter().filter(|krate| krate.name != UNSAFE_CRATE) {
        if krate.roots.is_empty() {
            problems.push(format!("crate `{}` has no lib or bin root", krate.name));
        }
        for crate_root in &krate.roots {
            let forbids = read(&root.join(crate_root))
                .lines()
                .any(|line| line.trim() == FORBID_UNSAFE);
            if !forbids {
                problems.push(format!(
                    "{crate_root} (crate `{}`): add `{FORBID_UNSAFE}` after the `//!` lines; \
                     unsafe code belongs in {UNSAFE_CRATE} behind a safe function",
                    krate.name
                ));
            }
        }
    }
    assert_no_problems("crate roots that allow `unsafe`", &problems);
}

/// The commands `cargo xtask` dispatches: the first words of the arms of its `match`
/// (`["test"] => ...`, `["bench", name] => ...`).
fn xtask_commands(main_rs: &str) -> Vec<String> {
    main_rs
        .lines()
        .filter_map(|line| line.trim().strip_prefix("[\""))
        .filter(|rest| rest.contains("=>"))
        .filter_map(|rest| rest.split('"').next())
        .map(String::from)
        .collect()
}

#[test]
fn every_xtask_command_is_in_the_code_map() {
    let root = workspace_root();
    let commands = xtask_commands(&read(&root.join("tools/xtask/src/main.rs")));
    assert!(
        commands.iter().any(|command| command == "test"),
        "found no `[\"test\"] =>` arm in tools/xtask/src/main.rs (found {commands:?}); \
         update xtask_commands to the new dispatch"
    );
    let rows = code_map(&architecture(&root));
    let row = rows
        .iter()
        .find(|row| row.folder == "tools/xtask")
        .expect("the code map has a `tools/xtask` row");
    let named: Vec<&str> = backticked(&row.owns)
        .into_iter()
        .map(|name| name.trim_start_matches("cargo xtask "))
        .collect();
    let problems: Vec<String> = commands
        .iter()
        .filter(|command| {
            !named
                .iter()
                .any(|name| name.split_whitespace().next() == Some(command.as_str()))
        })
        .map(|command| {
            format!(
                "`cargo xtask {command}` is not in the `tools/xtask` row \
                 (ARCHITECTURE.md:{}); name it there in backticks",
                row.line
            )
        })
        .collect();
    assert_no_problems("xtask commands missing from the code map", &problems);
}

#[test]
fn fuzz_readme_names_every_target() {
    let root = workspace_root();
    let readme = read(&root.join("fuzz/README.md"));
    let fuzz = read_crate(&root, "fuzz");
    let targets: Vec<&String> = fuzz
        .roots
        .iter()
        .filter(|path| path.starts_with("fuzz/fuzz_targets/"))
        .collect();
    let mut problems = Vec::new();
    let listing = fs::read_dir(root.join("fuzz/fuzz_targets")).expect("fuzz/fuzz_targets");
    for entry in listing {
        let path = entry.expect("a folder entry").path();
        let relative = format!(
            "fuzz/fuzz_targets/{}",
            path.file_name()
                .and_then(|name| name.to_str())
                .unwrap_or("")
        );
        if !targets.contains(&&relative) {
            problems.push(format!("{relative}: no [[bin]] in fuzz/Cargo.toml"));
        }
    }
    for target in &targets {
        let name = Path::new(target.as_str())
            .file_stem()
            .and_then(|stem| stem.to_str())
            .unwrap_or("");
        if !readme.contains(&format!("`{name}`")) {
            problems.push(format!(
                "{target}: fuzz/README.md does not name `{name}` (add a row to its table)"
            ));
        }
    }
    assert!(!targets.is_empty(), "fuzz/Cargo.toml has no targets");
    assert_no_problems("fuzz targets the README or Cargo.toml misses", &problems);
}

/// The parsers above, on made-up input, so a change of format cannot make a check vacuous.
#[test]
fn parsers_read_what_they_should() {
    let architecture = "# A\n\n## Code map\n\nintro\n\n| folder | crate | owns | must not |\n\
        |---|---|---|---|\n| `a/b` | `b` | `x.rs`, `run`, `c {d|e}` | `unsafe` |\n\
        | `tests/` | (test of `b`) | things | reach in |\n\nafter\n";
    let rows = code_map(architecture);
    let summary: Vec<(usize, &str, &[String], &str)> = rows
        .iter()
        .map(|row| {
            (
                row.line,
                row.folder.as_str(),
                row.crates.as_slice(),
                row.owns.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (9, "a/b", &["b".to_string()][..], "`x.rs`, `run`, `c {d|e}`"),
            (10, "tests", &["b".to_string()][..], "things"),
        ]
    );
    let cases = [
        ("layout.rs", true),
        ("tests/tidy.rs", true),
        ("image/build.sh", true),
        ("SimDrive", false),
        ("bench <name>", false),
        ("cargo xtask test", false),
        ("--json", false),
    ];
    for (name, expected) in cases {
        assert_eq!(is_path(name), expected, "is_path({name:?})");
    }
    let main_rs = "match words {\n    [\"test\"] => test(),\n    [\"bench\", name] => x,\n    \
                   _ => bail!(\"[\\\"no\\\"]\"),\n}\n";
    assert_eq!(xtask_commands(main_rs), ["test", "bench"]);
}
