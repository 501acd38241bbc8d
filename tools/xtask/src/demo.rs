//! `cargo xtask demo`: the appliance's main job end to end on an embedded default: two
//! file-backed drives, a generated catalog and manifest served by a local origin (nginx on
//! loopback), the daemon, a fill started and watched with `appliance-ctl` on the control
//! socket (each command line printed, as an operator would type it), ranges fetched with curl
//! and compared with the origin's bytes, a SIGKILL and a restart that serves the same bytes
//! after recovery.

use crate::util::{applianced, have, is_root, output, run_in, workspace_root};
use anyhow::{bail, Context, Result};
use appliance_testkit::{
    seeded_bytes, wait_for_ok, Config, Ctl, Fill, Guard, Manifest, Nginx, Serve, SplitMix64,
};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const ORIGIN_PORT: u16 = 18090;
const SERVE_PORT: u16 = 18080;
const ADMIN_PORT: u16 = 18081;
const FILES: u64 = 24;

pub fn run() -> Result<()> {
    ensure_nginx()?;
    let binary = applianced()?;
    let dir = workspace_root().join("demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("origin"))?;
    step("format two file-backed data drives (1 GiB each, 32 MiB segments)");
    let drives: Vec<PathBuf> = (0..2)
        .map(|number| dir.join(format!("nvme{number}.img")))
        .collect();
    let mut args = vec!["format", "--segment-mib", "32"];
    for drive in &drives {
        std::fs::File::create(drive)?.set_len(1 << 30)?;
        args.push(drive.to_str().context("drive path")?);
    }
    print!(
        "{}",
        output(binary.to_str().context("binary path")?, &args)?
    );
    step("generate a catalog of 24 video files (1 to 20 MiB) and its manifest");
    let catalog = generate(&dir.join("origin"))?;
    println!(
        "{} files, {} MiB",
        catalog.len(),
        catalog.iter().map(|(_, b)| b.len()).sum::<usize>() >> 20
    );
    step("start the origin: nginx on 127.0.0.1:18090");
    let _origin = Nginx::builder(&dir.join("nginx"), &dir.join("origin"))
        .port(ORIGIN_PORT)
        .start()
        .context("starting nginx")?;
    let config = write_config(&dir, &drives)?;
    print!("{}", std::fs::read_to_string(&config)?);
    step("start the appliance and fill it from the origin with appliance-ctl");
    let mut daemon = start_daemon(&binary, &config)?;
    let ctl = Ctl::next_to(&binary, &dir.join("control.sock"))?;
    fill(&ctl, &catalog)?;
    step("fetch byte ranges as a player would, and compare with the origin's bytes");
    fetch_ranges(&catalog)?;
    step("SIGKILL the appliance, restart it: recovery, then the same bytes");
    daemon.kill()?;
    println!("(killed)");
    let started = Instant::now();
    let _daemon = start_daemon(&binary, &config)?;
    println!(
        "healthy again {} ms after the restart",
        started.elapsed().as_millis()
    );
    fetch_ranges(&catalog)?;
    println!(
        "\ndemo finished; drives, catalog and logs are in {}",
        dir.display()
    );
    Ok(())
}

fn step(text: &str) {
    println!("\n== {text}");
    let _ = std::io::stdout().flush();
}

fn ensure_nginx() -> Result<()> {
    if have("nginx") {
        return Ok(());
    }
    if !is_root() {
        bail!("the demo's origin is nginx: install it (apt-get install nginx) and run again");
    }
    let root = workspace_root();
    run_in(&root, "apt-get", &["update", "-qq"])?;
    run_in(&root, "apt-get", &["install", "-y", "-qq", "nginx"])
}

fn generate(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut rng = SplitMix64(0x0005_DEEC_E66D);
    let mut files = Vec::new();
    for number in 0..FILES {
        let size = (1 << 20) + rng.below(19 << 20);
        let bytes = seeded_bytes(rng.next_u64(), usize::try_from(size)?);
        let path = format!("/title-{number:02}/main.mp4");
        std::fs::create_dir_all(dir.join(format!("title-{number:02}")))?;
        std::fs::write(dir.join(&path[1..]), &bytes)?;
        files.push((path, bytes));
    }
    Manifest::of(&files).write(&dir.join("manifest.json"))?;
    Ok(files)
}

fn write_config(dir: &Path, drives: &[PathBuf]) -> Result<PathBuf> {
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let origin = format!("http://127.0.0.1:{ORIGIN_PORT}");
    let config = Config {
        state_dir: Some(dir.join("state")),
        control_socket: Some(dir.join("control.sock")),
        serve: Serve {
            listen: Some(loopback(SERVE_PORT)),
            admin_listen: Some(loopback(ADMIN_PORT)),
            access_log: Some(dir.join("access.log").display().to_string()),
            ..Serve::default()
        },
        fill: Fill {
            manifest: Some(format!("{origin}/manifest.json")),
            sources: vec![origin],
            concurrency: Some(4),
            ..Fill::default()
        },
        ..Config::new(drives)
    };
    let path = dir.join("appliance.toml");
    config.write(&path)?;
    Ok(path)
}

/// `applianced run`, its log on this terminal; waits until /health answers 200.
fn start_daemon(binary: &Path, config: &Path) -> Result<Guard> {
    let child = Command::new(binary)
        .args(["run", "--config", config.to_str().context("path")?])
        .spawn()?;
    let mut daemon = Guard::new("applianced", child).with_grace(Duration::from_secs(5));
    wait_for_ok(ADMIN_PORT, "/health", Duration::from_secs(30), || {
        daemon.alive()
    })?;
    Ok(daemon)
}

/// A fill as an operator starts one: `appliance-ctl fill --wait`, then `appliance-ctl status`.
fn fill(ctl: &Ctl, catalog: &[(String, Vec<u8>)]) -> Result<()> {
    let started = Instant::now();
    for args in [&["fill", "--wait"][..], &["status"]] {
        println!("$ {}", ctl.command_line(args));
        let _ = std::io::stdout().flush();
        ctl.run_shown(args)?;
    }
    let fill = ctl.fill_status()?;
    let last = &fill["last"];
    println!(
        "fill done in {:.1} s: {} files fetched ({} MiB), {} failed",
        started.elapsed().as_secs_f64(),
        last["files_fetched"],
        last["bytes_fetched"].as_u64().unwrap_or(0) >> 20,
        last["files_failed"],
    );
    if last["files_fetched"].as_u64() != Some(catalog.len() as u64) {
        bail!("the fill did not fetch the whole catalog: {fill}");
    }
    Ok(())
}

fn fetch_ranges(catalog: &[(String, Vec<u8>)]) -> Result<()> {
    println!("$ curl -s http://127.0.0.1:{ADMIN_PORT}/health");
    println!(
        "{}",
        output(
            "curl",
            &["-s", &format!("http://127.0.0.1:{ADMIN_PORT}/health")]
        )?
        .trim()
    );
    let (path, source) = &catalog[3];
    let url = format!("http://127.0.0.1:{SERVE_PORT}{path}");
    println!("$ curl -s -D - -o /dev/null -r 1000000-1999999 {url}");
    print!(
        "{}",
        output(
            "curl",
            &[
                "-s",
                "-D",
                "-",
                "-o",
                "/dev/null",
                "-r",
                "1000000-1999999",
                &url
            ]
        )?
    );
    let mut checked = 0;
    for (path, source) in catalog
        .iter()
        .chain(std::iter::once(&(path.clone(), source.clone())))
    {
        let start = source.len() / 3;
        let end = (start + 999_999).min(source.len() - 1);
        let url = format!("http://127.0.0.1:{SERVE_PORT}{path}");
        let body = Command::new("curl")
            .args(["-s", "-r", &format!("{start}-{end}"), &url])
            .output()?
            .stdout;
        if body != source[start..=end] {
            bail!("{path}: the served range differs from the origin's bytes");
        }
        checked += 1;
    }
    println!("{checked} ranges served with sendfile match the origin's bytes");
    let status = output(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://127.0.0.1:{SERVE_PORT}/not/here.mp4"),
        ],
    )?;
    println!("a path the box does not hold: HTTP {status}");
    Ok(())
}
