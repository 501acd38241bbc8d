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

/// The `appliance-ctl` binary next to `applianced` (built if this test runs alone).
pub fn ctl_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_applianced")).with_file_name("appliance-ctl");
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "appliance-ctl"])
            .status()
            .unwrap();
        assert!(status.success());
    }
    path
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

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Formats `count` drive files of `size_bytes` in `scratch` with `segment_mib` segments.
pub fn formatted_drives(
    scratch: &Scratch,
    count: usize,
    size_bytes: u64,
    segment_mib: u64,
) -> Vec<PathBuf> {
    (0..count)
        .map(|number| {
            let drive = scratch.drive(&format!("d{number}"), size_bytes);
            let out = applianced(&[
                "format",
                "--segment-mib",
                &segment_mib.to_string(),
                drive.to_str().unwrap(),
            ]);
            assert!(out.status.success(), "{}", out.stderr);
            drive
        })
        .collect()
}

/// A running `applianced run`, stopped with SIGTERM when dropped.
pub struct Daemon {
    child: std::process::Child,
    pub port: u16,
    pub admin_port: u16,
    pub config: PathBuf,
}

impl Daemon {
    /// Writes a config (drives, state dir, loopback listeners, access log, then `extra` TOML
    /// lines inside `[serve]` and any further sections) and starts the daemon; waits for
    /// /health.
    pub fn start(scratch: &Scratch, drives: &[PathBuf], extra: &str) -> Daemon {
        Daemon::start_with(scratch, drives, extra, "", "")
    }

    /// `start`, with `top` lines before `[serve]` and `after` sections after it.
    pub fn start_with(
        scratch: &Scratch,
        drives: &[PathBuf],
        extra: &str,
        top: &str,
        after: &str,
    ) -> Daemon {
        let port = free_port();
        let admin_port = free_port();
        let config = scratch.path("appliance.toml");
        let list: Vec<String> = drives
            .iter()
            .map(|drive| format!("{:?}", drive.display().to_string()))
            .collect();
        std::fs::write(
            &config,
            format!(
                "drives = [{}]\nstate_dir = {:?}\ncontrol_socket = {:?}\n{top}\n[serve]\n\
                 listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n\
                 access_log = {:?}\n{extra}\n{after}\n",
                list.join(", "),
                scratch.path("state").display().to_string(),
                scratch.path("control.sock").display().to_string(),
                scratch.path("access.log").display().to_string(),
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_applianced"))
            .args(["run", "--config", config.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start applianced");
        let daemon = Daemon {
            child,
            port,
            admin_port,
            config,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if daemon.admin("GET", "/health").0 == 200 {
                return daemon;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("the appliance did not become healthy");
    }

    /// A request on the admin listener: (status, body).
    pub fn admin(&self, method: &str, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.admin_port)) else {
            return (0, String::new());
        };
        let request = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text
            .get(9..12)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
            .unwrap_or_default();
        (status, body)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// GETs `path` from the serving port with curl; returns the body when the status is 200.
    pub fn get(&self, path: &str) -> Option<Vec<u8>> {
        let out = Command::new("curl")
            .args(["-sf", "--max-time", "30", &self.url(path)])
            .output()
            .ok()?;
        out.status.success().then_some(out.stdout)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
