//! The servers under test of the serving benchmarks (`bench serve`, `bench day`): the
//! appliance on a drive file with a catalog imported, and nginx serving the same files from
//! ext4 (`sendfile on`, or `sendfile on; aio threads;`), each pinned to core 1 and, when
//! asked, in a memory cgroup of its own joined before it reads a file; and the checks that a
//! server returns the source files' bytes. A `Server` stops its process, then removes its
//! cgroup, when dropped. Measures nothing.

use crate::cgroup::MemoryCgroup;
use crate::util::output;
use anyhow::{bail, Context, Result};
use appliance_testkit::{
    free_port, get, Config, Fill, Guard, Launch, Nginx, Serve, SplitMix64, Tls, TlsCertificate,
};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// A server under test.
pub(crate) struct Server {
    /// `appliance`, `nginx` or `nginx_aio`: the name in the figures.
    pub name: &'static str,
    pub port: u16,
    /// The HTTPS port, when the server was started with a certificate.
    pub tls_port: Option<u16>,
    /// The process whose CPU time and storage reads are counted (the appliance, nginx's
    /// worker).
    pub cpu_pid: u32,
    /// The appliance's admin port, for /metrics.
    pub admin_port: Option<u16>,
    /// The appliance's configuration and its file (rewritten and reloaded with SIGHUP).
    appliance_config: Option<(Config, PathBuf)>,
    /// Stops the server when dropped: the appliance's `Guard` or the `Nginx`. Declared before
    /// the cgroup, so the process stops before the group is removed.
    _process: Box<dyn std::any::Any>,
    /// The memory cgroup the server runs in, when it runs in one.
    pub cgroup: Option<MemoryCgroup>,
}

/// How a server under test is started: on core 1 when pinning, in `cgroup` when given.
pub(crate) fn launch(pin: bool, cgroup: Option<&MemoryCgroup>) -> Launch {
    Launch {
        stop_with_parent: true,
        core: pin.then_some(1),
        cgroup_procs: cgroup.map(MemoryCgroup::procs_file),
    }
}

/// A memory cgroup named `BENCH-SERVER` without a limit yet, when `wanted`.
fn cgroup_for(bench: &str, server: &str, wanted: bool) -> Result<Option<MemoryCgroup>> {
    if !wanted {
        return Ok(None);
    }
    Ok(Some(MemoryCgroup::create(&format!("{bench}-{server}"))?))
}

impl Server {
    /// The appliance's counters by name (empty for nginx).
    pub fn metrics(&self) -> Result<BTreeMap<String, f64>> {
        let Some(port) = self.admin_port else {
            return Ok(BTreeMap::new());
        };
        let response = get(port, "/metrics", None)?;
        let text = response.text();
        Ok(text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (name, value) = line.rsplit_once(' ')?;
                Some((name.to_string(), value.parse().ok()?))
            })
            .collect())
    }

    /// Limits the page cache of the server's cgroup (None: no limit). Fails without a cgroup.
    pub fn limit_memory(&self, bytes: Option<u64>) -> Result<()> {
        self.cgroup
            .as_ref()
            .with_context(|| format!("{} runs in no cgroup", self.name))?
            .set_limit(bytes)
    }

    /// The appliance: rewrites `[fill] bandwidth_bits_per_s` (0: no cap) in its
    /// configuration and sends SIGHUP, which applies the cap to the next fill.
    pub fn reload_fill_bandwidth(&mut self, bits_per_s: u64) -> Result<()> {
        let (config, path) = self
            .appliance_config
            .as_mut()
            .with_context(|| format!("{} is not the appliance", self.name))?;
        config.fill.bandwidth_bits_per_s = Some(bits_per_s);
        config.write(path)?;
        appliance_testkit::send_signal(self.cpu_pid, "HUP")?;
        Ok(())
    }
}

/// What `start_appliance` needs.
pub(crate) struct ApplianceSetup<'a> {
    /// `applianced` (release build).
    pub binary: &'a Path,
    /// The bench's folder: the drive, state, configuration and log go there.
    pub dir: &'a Path,
    /// Imported into the fresh drive: its files become `/RELATIVE/PATH`.
    pub catalog: &'a Path,
    /// Size of the (sparse) drive file.
    pub drive_bytes: u64,
    /// `[fill]` of the configuration (sources, manifest, concurrency).
    pub fill: Fill,
    pub pin: bool,
    /// Run in a memory cgroup named `BENCH-appliance` (created here).
    pub cgroup: Option<&'a str>,
    /// An HTTPS listener with this certificate, beside plain HTTP.
    pub tls: Option<&'a TlsCertificate>,
}

/// The `applianced` a benchmark runs: BENCH_APPLIANCED when set, else the release build.
pub(crate) fn applianced_under_test() -> Result<PathBuf> {
    match std::env::var("BENCH_APPLIANCED") {
        Ok(path) => Ok(PathBuf::from(path)),
        Err(_) => crate::util::applianced(),
    }
}

/// The number in environment variable `name`, if it is set.
fn env_number(name: &str) -> Result<Option<u64>> {
    std::env::var(name)
        .ok()
        .map(|text| text.parse())
        .transpose()
        .with_context(|| format!("{name}: not a number"))
}

/// The appliance on a fresh drive holding `catalog`, one serving worker thread, on core 1.
/// `BENCH_COLD_READ`, when set, becomes `serve.cold_read`; `BENCH_COLD_THREADS`,
/// `serve.cold_threads_per_drive`; `BENCH_DIRECT_CACHE_MIB`, `serve.cold_direct_cache_mib`.
pub(crate) fn start_appliance(setup: &ApplianceSetup) -> Result<Server> {
    let (dir, binary) = (setup.dir, setup.binary);
    let drive = dir.join("drive0.img");
    let state = dir.join("state");
    let _ = std::fs::remove_file(&drive);
    let _ = std::fs::remove_dir_all(&state);
    std::fs::create_dir_all(&state)?;
    std::fs::File::create(&drive)?.set_len(setup.drive_bytes)?;
    let binary_text = binary.to_str().context("binary path")?;
    let drive_text = drive.to_str().context("drive path")?;
    let state_text = state.to_str().context("state path")?;
    output(binary_text, &["format", "--segment-mib", "256", drive_text])?;
    println!("  importing the catalog into the appliance ({drive_text})");
    let started = Instant::now();
    output(
        binary_text,
        &[
            "store",
            "--drive",
            drive_text,
            "--state-dir",
            state_text,
            "import",
            setup.catalog.to_str().context("catalog path")?,
        ],
    )?;
    println!("  imported in {:.1} s", started.elapsed().as_secs_f64());
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let (port, admin_port) = (free_port()?, free_port()?);
    let tls_port = setup.tls.map(|_| free_port()).transpose()?;
    let config_path = dir.join("appliance.toml");
    let config = Config {
        state_dir: Some(state.clone()),
        control_socket: Some(state.join("control.sock")),
        serve: Serve {
            listen: Some(loopback(port)),
            admin_listen: Some(loopback(admin_port)),
            worker_threads: Some(1),
            access_log: Some("off".into()),
            connections_max: Some(20000),
            cold_read: std::env::var("BENCH_COLD_READ").ok(),
            cold_threads_per_drive: env_number("BENCH_COLD_THREADS")?,
            cold_direct_cache_mib: env_number("BENCH_DIRECT_CACHE_MIB")?,
            ..Serve::default()
        },
        fill: setup.fill.clone(),
        tls: setup.tls.zip(tls_port).map(|(certificate, tls_port)| Tls {
            listen: loopback(tls_port),
            certificates: vec![certificate.clone()],
            handshake_timeout_ms: None,
            kernel_tls: None,
        }),
        ..Config::new(&[&drive])
    };
    config.write(&config_path)?;
    let cgroup = match setup.cgroup {
        Some(bench) => cgroup_for(bench, "appliance", true)?,
        None => None,
    };
    let log_path = dir.join("applianced.log");
    let log = std::fs::File::create(&log_path)?;
    let child = launch(setup.pin, cgroup.as_ref())
        .command(binary)
        .args(["run", "--config", config_path.to_str().context("config")?])
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting applianced run")?;
    let mut process = Guard::new("applianced", child);
    appliance_testkit::wait_for_ok(admin_port, "/health", Duration::from_secs(60), || {
        process.alive()
    })
    .with_context(|| format!("see {}", log_path.display()))?;
    println!("  appliance serving on 127.0.0.1:{port} (admin {admin_port})");
    Ok(Server {
        name: "appliance",
        port,
        tls_port,
        cpu_pid: process.pid(),
        admin_port: Some(admin_port),
        appliance_config: Some((config, config_path)),
        _process: Box::new(process),
        cgroup,
    })
}

/// Which nginx peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NginxFlavor {
    /// `sendfile on`: a page-cache miss blocks the worker.
    Sendfile,
    /// `sendfile on; aio threads;`: misses go to the default pool of 32 threads.
    AioThreads,
}

impl NginxFlavor {
    pub fn name(self) -> &'static str {
        match self {
            NginxFlavor::Sendfile => "nginx",
            NginxFlavor::AioThreads => "nginx_aio",
        }
    }
}

/// nginx tuned as a user would tune it for this load, serving `root` from the folder
/// `dir/NAME`, on core 1 when `pin`, in a memory cgroup `BENCH-NAME` when `cgroup` names the
/// bench.
pub(crate) fn start_nginx(
    dir: &Path,
    root: &Path,
    flavor: NginxFlavor,
    pin: bool,
    cgroup: Option<&str>,
    tls: Option<&TlsCertificate>,
) -> Result<Server> {
    let name = flavor.name();
    let prefix = dir.join(name);
    let _ = std::fs::remove_dir_all(&prefix);
    let cgroup = match cgroup {
        Some(bench) => cgroup_for(bench, name, true)?,
        None => None,
    };
    let mut builder = Nginx::builder(&prefix, root)
        .worker_connections(20000)
        .main_directive("worker_rlimit_nofile 65536;")
        .http_directive("keepalive_requests 100000;")
        .http_directive("keepalive_timeout 65;")
        .http_directive("open_file_cache max=1000;")
        .http_directive("types { video/mp4 mp4; }");
    if flavor == NginxFlavor::AioThreads {
        builder = builder.http_directive("aio threads;");
    }
    let tls_port = tls.map(|_| free_port()).transpose()?;
    if let Some((certificate, tls_port)) = tls.zip(tls_port) {
        // kTLS when OpenSSL and the kernel have it (nginx 1.21.4+, OpenSSL 3): sendfile stays.
        builder = builder.http_directive(&format!(
            "server {{ listen 127.0.0.1:{tls_port} ssl; root {root}; \
             ssl_certificate {cert}; ssl_certificate_key {key}; \
             ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:SSL:10m; \
             ssl_session_tickets on; ssl_conf_command Options KTLS; }}",
            root = root.display(),
            cert = certificate.cert.display(),
            key = certificate.key.display(),
        ));
    }
    let nginx = builder
        .launch(launch(pin, cgroup.as_ref()))
        .start()
        .with_context(|| format!("starting {name}"))?;
    let (port, worker) = (nginx.port, nginx.worker_pid());
    println!("  {name} serving on 127.0.0.1:{port} (worker pid {worker})");
    Ok(Server {
        name,
        port,
        tls_port,
        cpu_pid: worker,
        admin_port: None,
        appliance_config: None,
        _process: Box::new(nginx),
        cgroup,
    })
}

/// A file both servers serve: its URL path, where its bytes are, its size.
pub(crate) struct SourceFile {
    pub url_path: String,
    pub local: PathBuf,
    pub size_bytes: u64,
}

/// Random ranges of several lengths, the last 4 KiB of the first file and one whole file
/// from `server` must equal the source files, byte for byte.
pub(crate) fn verify_ranges(server: &Server, files: &[SourceFile]) -> Result<()> {
    let mut rng = SplitMix64(0x2545_F491_4F6C_DD1D);
    let count = u64::try_from(files.len())?;
    let mut checks: Vec<(usize, Option<(u64, u64)>)> = Vec::new();
    for length in [1, 4096, 65536, MIB, 3 * MIB + 17] {
        for _ in 0..2 {
            let number = usize::try_from(rng.below(count))?;
            let size = files[number].size_bytes;
            if size < length {
                continue;
            }
            let first = rng.below(size - length + 1);
            checks.push((number, Some((first, first + length - 1))));
        }
    }
    let last = files[0].size_bytes;
    checks.push((0, Some((last.saturating_sub(4096), last - 1))));
    checks.push((usize::try_from(rng.below(count))?, None));
    for (number, range) in checks {
        let file = &files[number];
        let source = std::fs::read(&file.local)?;
        let path = &file.url_path;
        let response = get(server.port, path, range)?;
        let (want_status, want) = match range {
            Some((first, last)) => (
                206,
                &source[usize::try_from(first)?..=usize::try_from(last)?],
            ),
            None => (200, &source[..]),
        };
        if response.status != want_status {
            bail!(
                "{}: GET {path} {range:?} answered {} (wanted {want_status}):\n{}",
                server.name,
                response.status,
                response.head
            );
        }
        if response.body != want {
            bail!(
                "{}: GET {path} {range:?}: the body differs from the source file ({} bytes, \
                 wanted {})",
                server.name,
                response.body.len(),
                want.len()
            );
        }
    }
    Ok(())
}
