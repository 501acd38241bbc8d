//! Black-box test of the hidden `generate-docs` subcommand of `applianced` and `appliance-ctl`
//! (the image build runs it): every subcommand that `--help` lists, at every depth, has its man
//! page, is named in the zsh and fish completions and is what bash offers after its parent; the
//! hidden subcommand itself is in none of them.

mod util;

use std::path::{Path, PathBuf};
use std::process::Command;
use util::Scratch;

/// One program whose documentation is generated.
struct Program {
    binary: PathBuf,
    name: &'static str,
    section: &'static str,
}

#[test]
fn generated_docs_cover_every_subcommand() {
    let scratch = Scratch::new("clidocs");
    let programs = [
        Program {
            binary: PathBuf::from(util::APPLIANCED),
            name: "applianced",
            section: "8",
        },
        Program {
            binary: util::ctl(Path::new("/nonexistent")).binary().to_path_buf(),
            name: "appliance-ctl",
            section: "1",
        },
    ];
    for program in &programs {
        check(program, &scratch.path(program.name));
    }
}

fn check(program: &Program, out: &Path) {
    let generated = run(
        &program.binary,
        &["generate-docs", "--out", &out.display().to_string()],
    );
    let name = program.name;
    let bash = out.join(format!("bash/{name}"));
    let zsh = read(&out.join(format!("zsh/_{name}")));
    let fish = read(&out.join(format!("fish/{name}.fish")));
    let man = |path: &[String]| {
        let mut page = vec![name.to_string()];
        page.extend(path.iter().cloned());
        out.join(format!("man{0}/{1}.{0}", program.section, page.join("-")))
    };
    let mut pages = vec![man(&[])];
    let subcommands = subcommands(&program.binary, &[]);
    assert!(subcommands.len() >= 5, "{name}: {subcommands:?}");
    for path in &subcommands {
        let leaf = path.last().expect("a subcommand");
        assert!(zsh.contains(&format!("'{leaf}:")), "zsh lacks {path:?}");
        assert!(
            fish.contains(&format!("-a \"{leaf}\"")),
            "fish lacks {path:?}"
        );
        pages.push(man(path));
    }
    for page in &pages {
        let text = read(page);
        let title = page.file_stem().unwrap().to_string_lossy().to_uppercase();
        let heading = format!(".TH {title} {} ", program.section);
        assert!(
            text.contains(&heading),
            "{}: no `{heading}`",
            page.display()
        );
        assert!(
            generated.contains(&page.display().to_string()),
            "{}",
            page.display()
        );
        assert!(
            !text.contains("generate"),
            "{} names generate-docs",
            page.display()
        );
    }
    assert!(!zsh.contains("generate") && !fish.contains("generate"));
    assert!(!read(&bash).contains("generate"));
    let mut parents = vec![Vec::new()];
    parents.extend(
        subcommands
            .iter()
            .filter(|path| has_subcommands(&subcommands, path))
            .cloned(),
    );
    for parent in parents {
        let mut expected: Vec<String> = subcommands
            .iter()
            .filter(|path| path.len() == parent.len() + 1 && path.starts_with(&parent))
            .map(|path| path[parent.len()].clone())
            .collect();
        expected.push("help".into());
        expected.sort();
        let mut words = vec![name.to_string()];
        words.extend(parent.iter().cloned());
        let mut offered = bash_offers(&bash, &words);
        offered.retain(|word| !word.starts_with('-'));
        offered.sort();
        assert_eq!(offered, expected, "bash after {words:?}");
    }
}

fn has_subcommands(all: &[Vec<String>], parent: &[String]) -> bool {
    all.iter()
        .any(|path| path.len() > parent.len() && path.starts_with(parent))
}

/// Every subcommand under `path` that `BINARY path... --help` lists (but `help`), depth first.
fn subcommands(binary: &Path, path: &[String]) -> Vec<Vec<String>> {
    let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
    args.push("--help");
    let help = run(binary, &args);
    let listed: Vec<String> = help
        .lines()
        .skip_while(|line| *line != "Commands:")
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect();
    let mut all = Vec::new();
    for name in listed {
        let mut child = path.to_vec();
        child.push(name);
        let below = subcommands(binary, &child);
        all.push(child);
        all.extend(below);
    }
    all
}

/// The words bash completes after `words` and a space, from the generated script alone.
fn bash_offers(script: &Path, words: &[String]) -> Vec<String> {
    let program = r#"source "$1"; shift
        complete_function=$(complete -p "$1" | sed -E 's/.* -F ([^ ]+) .*/\1/')
        COMP_WORDS=("$@" ""); COMP_CWORD=$#; COMP_LINE="$* "; COMP_POINT=${#COMP_LINE}
        "$complete_function" "$1" "" "${@: -1}"
        printf '%s\n' "${COMPREPLY[@]}""#;
    let mut args = vec!["-c", program, "bash", script.to_str().unwrap()];
    args.extend(words.iter().map(String::as_str));
    run(Path::new("bash"), &args)
        .lines()
        .map(str::to_string)
        .collect()
}

fn run(program: &Path, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{} {args:?}: {}",
        program.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}
