//! Helpers of the black-box tests: scratch folders, drive files, loop and device-mapper
//! devices, generated catalogs, and running the real binaries.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What a finished command printed.
pub struct Output {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `applianced` with `args` and waits for it.
pub fn applianced(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_applianced"))
        .args(args)
        .output()
        .expect("run applianced");
    Output {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Some(()) when running as root; otherwise prints why the test is skipped.
pub fn root_or_skip(test: &str) -> Option<()> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0");
    if root {
        Some(())
    } else {
        eprintln!("{test}: skipped: needs root for loop and device-mapper devices");
        None
    }
}

/// A folder of its own under target/, emptied at start.
pub struct Scratch {
    pub root: PathBuf,
    pub name: String,
}

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("blackbox-{name}"));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        Scratch {
            root,
            name: format!("appliance-test-{name}-{}", std::process::id()),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// A sparse drive file of `size_bytes`.
    pub fn drive(&self, name: &str, size_bytes: u64) -> PathBuf {
        let path = self.path(name);
        fs::File::create(&path)
            .unwrap()
            .set_len(size_bytes)
            .unwrap();
        path
    }

    pub fn store_args(&self, drives: &[&Path]) -> Vec<String> {
        let mut args = vec!["store".to_string()];
        for drive in drives {
            args.push("--drive".into());
            args.push(drive.display().to_string());
        }
        args.push("--state-dir".into());
        args.push(self.path("state").display().to_string());
        args
    }

    /// Runs `applianced store --drive ... ARGS`.
    pub fn store(&self, drives: &[&Path], args: &[&str]) -> Output {
        let mut all = self.store_args(drives);
        all.extend(args.iter().map(|arg| arg.to_string()));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        applianced(&refs)
    }
}

/// Overwrites bytes of a file in place.
pub fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    let file = fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, offset).unwrap();
    file.sync_all().unwrap();
}

/// A folder of generated files with deterministic, distinct contents.
pub struct Catalog {
    pub root: PathBuf,
    pub files: Vec<(String, Vec<u8>)>,
}

impl Catalog {
    pub fn generate(scratch: &Scratch, name: &str, count: u64, size_max: u64) -> Catalog {
        let root = scratch.path(name);
        let mut files = Vec::new();
        let mut state = 0x2545_F491_4F6C_DD1Du64 ^ count;
        for number in 0..count {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let size = match number % 5 {
                0 => 0,
                1 => state % 5000,
                _ => state % size_max,
            };
            let path = format!("/title-{:02}/{number:03}.mp4", number % 7);
            let content: Vec<u8> = (0..size)
                .map(|at| (at.wrapping_mul(31).wrapping_add(number * 131) >> 3).to_le_bytes()[0])
                .collect();
            let target = root.join(&path[1..]);
            fs::create_dir_all(target.parent().unwrap()).unwrap();
            fs::File::create(&target)
                .unwrap()
                .write_all(&content)
                .unwrap();
            files.push((path, content));
        }
        Catalog { root, files }
    }

    /// Lists the store; checks every listed file byte by byte; returns the listed paths.
    pub fn check_listed(&self, scratch: &Scratch, drives: &[&Path]) -> BTreeSet<String> {
        let out = scratch.store(drives, &["ls"]);
        assert!(out.status.success(), "ls: {}", out.stderr);
        let mut listed = BTreeSet::new();
        for line in out.stdout.lines() {
            let path = line
                .split_whitespace()
                .nth(1)
                .expect("size and path")
                .to_string();
            let expected = self
                .files
                .iter()
                .find(|(known, _)| *known == path)
                .unwrap_or_else(|| panic!("{path} was never written"));
            let mut args = scratch.store_args(drives);
            args.extend(["cat".to_string(), path.clone()]);
            let bytes = Command::new(env!("CARGO_BIN_EXE_applianced"))
                .args(&args)
                .output()
                .unwrap()
                .stdout;
            assert!(
                bytes == expected.1,
                "{path}: stored bytes differ from the source"
            );
            listed.insert(path);
        }
        listed
    }

    /// Checks that every file of the catalog is stored byte-exact.
    pub fn check_all(&self, scratch: &Scratch, drives: &[&Path]) {
        let listed = self.check_listed(scratch, drives);
        assert_eq!(listed.len(), self.files.len(), "every file is stored");
    }
}

/// A loop device over a file, detached on drop.
pub struct LoopDevice {
    pub path: PathBuf,
}

impl LoopDevice {
    pub fn attach(backing: &Path) -> Option<LoopDevice> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "skipped: losetup failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Some(LoopDevice { path })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// A device-mapper device over another device, whose table can switch to the error target.
pub struct DmDevice {
    pub name: String,
    pub path: PathBuf,
    sectors: u64,
    under: PathBuf,
}

impl DmDevice {
    pub fn create(name: &str, under: &Path) -> Option<DmDevice> {
        let size = Command::new("blockdev")
            .arg("--getsz")
            .arg(under)
            .output()
            .ok()?;
        let sectors: u64 = String::from_utf8_lossy(&size.stdout).trim().parse().ok()?;
        let table = format!("0 {sectors} linear {} 0", under.display());
        let out = Command::new("dmsetup")
            .args(["create", name, "--table", &table])
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "skipped: dmsetup failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        Some(DmDevice {
            name: name.to_string(),
            path: PathBuf::from(format!("/dev/mapper/{name}")),
            sectors,
            under: under.to_path_buf(),
        })
    }

    fn load(&self, table: &str) {
        for args in [
            vec!["suspend", &self.name],
            vec!["load", &self.name, "--table", table],
            vec!["resume", &self.name],
        ] {
            let status = Command::new("dmsetup").args(&args).status().unwrap();
            assert!(status.success(), "dmsetup {args:?}");
        }
    }

    /// Every later I/O fails, as on a dying drive.
    pub fn fail_all_io(&self) {
        self.load(&format!("0 {} error", self.sectors));
    }

    /// The drive works again.
    pub fn restore(&self) {
        self.load(&format!(
            "0 {} linear {} 0",
            self.sectors,
            self.under.display()
        ));
    }
}

impl Drop for DmDevice {
    fn drop(&mut self) {
        let _ = Command::new("dmsetup")
            .args(["remove", "--retry", &self.name])
            .status();
    }
}
