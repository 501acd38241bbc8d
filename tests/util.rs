//! Helpers of the black-box tests: scratch folders, drive files, device-mapper devices,
//! generated catalogs, and running the real binaries (`applianced`, and `appliance-ctl`
//! through the daemon's control socket). What the tools share with the tests (ports, HTTP,
//! nginx, configs, manifests, loop devices, seeded bytes) is in `appliance-testkit`.

#![allow(dead_code)]

pub use appliance_testkit::Output;
use appliance_testkit::{Config, Ctl, Guard, LoopDevice, SplitMix64};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The binary under test.
pub const APPLIANCED: &str = env!("CARGO_BIN_EXE_applianced");

/// Runs `applianced` with `args` and waits for it.
pub fn applianced(args: &[&str]) -> Output {
    Command::new(APPLIANCED)
        .args(args)
        .output()
        .expect("run applianced")
        .into()
}

/// `appliance-ctl` (next to the `applianced` under test) talking to `socket`.
pub fn ctl(socket: &Path) -> Ctl {
    Ctl::next_to(Path::new(APPLIANCED), socket).expect("appliance-ctl")
}

/// Some(()) when running as root; otherwise prints why the test is skipped.
pub fn root_or_skip(test: &str) -> Option<()> {
    if appliance_testkit::is_root() {
        Some(())
    } else {
        eprintln!("{test}: skipped: needs root for loop and device-mapper devices");
        None
    }
}

/// A loop device over `backing`; None (after saying why) when losetup fails.
pub fn loop_device(backing: &Path) -> Option<LoopDevice> {
    LoopDevice::attach(backing)
        .inspect_err(|failure| eprintln!("skipped: {failure}"))
        .ok()
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

    /// What the store lists, with each file's bytes (`store ls`, then `store cat`).
    pub fn stored(&self, drives: &[&Path]) -> BTreeMap<String, Vec<u8>> {
        let listing = self.store(drives, &["ls"]);
        assert!(listing.status.success(), "ls: {}", listing.stderr);
        let mut stored = BTreeMap::new();
        for line in listing.stdout.lines() {
            let path = line.split_whitespace().nth(1).expect("size and path");
            let mut args = self.store_args(drives);
            args.extend(["cat".to_string(), path.to_string()]);
            let bytes = Command::new(APPLIANCED)
                .args(&args)
                .output()
                .unwrap()
                .stdout;
            stored.insert(path.to_string(), bytes);
        }
        stored
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
    /// The largest file: (path, bytes).
    pub fn largest(&self) -> (String, Vec<u8>) {
        self.files
            .iter()
            .max_by_key(|(_, bytes)| bytes.len())
            .cloned()
            .expect("a catalog has files")
    }

    pub fn generate(scratch: &Scratch, name: &str, count: u64, size_max: u64) -> Catalog {
        let root = scratch.path(name);
        let mut files = Vec::new();
        let mut rng = SplitMix64(0x2545_F491_4F6C_DD1D ^ count);
        for number in 0..count {
            let size = match number % 5 {
                0 => 0,
                1 => rng.below(5000),
                _ => rng.below(size_max),
            };
            let path = format!("/title-{:02}/{number:03}.mp4", number % 7);
            let size = usize::try_from(size).unwrap();
            let content = appliance_testkit::seeded_bytes(rng.next_u64(), size);
            let target = root.join(&path[1..]);
            fs::create_dir_all(target.parent().unwrap()).unwrap();
            fs::write(&target, &content).unwrap();
            files.push((path, content));
        }
        Catalog { root, files }
    }

    /// Lists the store; checks every listed file byte by byte; returns the listed paths.
    pub fn check_listed(&self, scratch: &Scratch, drives: &[&Path]) -> BTreeSet<String> {
        let mut listed = BTreeSet::new();
        for (path, bytes) in scratch.stored(drives) {
            let expected = self
                .files
                .iter()
                .find(|(known, _)| *known == path)
                .unwrap_or_else(|| panic!("{path} was never written"));
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

/// A running `applianced run`, stopped with SIGTERM when dropped (SIGKILL after 10 s).
pub struct Daemon {
    guard: Guard,
    pub port: u16,
    pub admin_port: u16,
    /// The configuration it was started with, and where it is written.
    pub config: Config,
    pub config_path: PathBuf,
    pub socket: PathBuf,
}

impl Daemon {
    /// Starts `applianced run` with `config`, completed with what every test daemon has
    /// unless `config` says otherwise: its state folder, control socket and access log in
    /// `scratch`, and both listeners on free loopback ports. Waits for /health.
    pub fn start(scratch: &Scratch, mut config: Config) -> Daemon {
        let free = || appliance_testkit::free_port().expect("a free port");
        let loopback = |port| std::net::SocketAddr::from(([127, 0, 0, 1], port));
        config.state_dir.get_or_insert(scratch.path("state"));
        let socket = config
            .control_socket
            .get_or_insert(scratch.path("control.sock"))
            .clone();
        let serve = &mut config.serve;
        let port = serve.listen.get_or_insert(loopback(free())).port();
        let admin_port = serve.admin_listen.get_or_insert(loopback(free())).port();
        serve
            .access_log
            .get_or_insert(scratch.path("access.log").display().to_string());
        let config_path = scratch.path("appliance.toml");
        config.write(&config_path).unwrap();
        let child = Command::new(APPLIANCED)
            .args(["run", "--config", config_path.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start applianced");
        let mut guard = Guard::new("applianced", child).with_grace(Duration::from_secs(10));
        appliance_testkit::wait_for_ok(admin_port, "/health", Duration::from_secs(20), || {
            guard.alive()
        })
        .expect("the appliance becomes healthy");
        Daemon {
            guard,
            port,
            admin_port,
            config,
            config_path,
            socket,
        }
    }

    /// A request on the admin listener: (status, body); (0, "") when nothing answers.
    pub fn admin(&self, method: &str, path: &str) -> (u16, String) {
        match appliance_testkit::http(self.admin_port, method, path, &[]) {
            Ok(response) => (response.status, response.text()),
            Err(_) => (0, String::new()),
        }
    }

    /// `appliance-ctl` on this daemon's control socket.
    pub fn ctl(&self) -> Ctl {
        ctl(&self.socket)
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
        self.guard.pid()
    }

    /// Stops the daemon with SIGTERM (SIGKILL after 10 s); how it ended.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.guard
            .stop(Duration::from_secs(10))
            .expect("stop applianced")
    }
}

/// What curl got: its exit code, the status, the response heads (lowercase) and the body.
pub struct Fetched {
    pub exit_code: i32,
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

/// curl with `args`, silent, for 20 s at most; the response heads come by `-D`.
pub fn curl<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Fetched {
    let out = Command::new("curl")
        .args(["-s", "-D", "/dev/stderr", "--max-time", "20"])
        .args(args)
        .output()
        .expect("run curl");
    let head = String::from_utf8_lossy(&out.stderr).to_ascii_lowercase();
    let status = head
        .get(9..12)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    Fetched {
        exit_code: out.status.code().unwrap_or(-1),
        status,
        head,
        body: out.stdout,
    }
}

/// A counter or gauge from the admin listener's metrics (0 when absent).
pub fn metric(daemon: &Daemon, name: &str) -> f64 {
    let (_, metrics) = daemon.admin("GET", "/metrics");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}
