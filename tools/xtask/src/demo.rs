//! `cargo xtask demo`: the appliance's main job end to end on an embedded default: two
//! file-backed drives, a generated catalog and manifest served by a local origin (nginx on
//! loopback), the daemon, a fill, ranges fetched with curl and compared with the origin's
//! bytes, a SIGKILL and a restart that serves the same bytes after recovery.

use crate::util::{applianced, have, is_root, output, run_in, workspace_root};
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ORIGIN_PORT: u16 = 18090;
const SERVE_PORT: u16 = 18080;
const ADMIN_PORT: u16 = 18081;
const FILES: u64 = 24;

/// A child process killed (and reaped) when dropped.
struct Guard(Child);

impl Drop for Guard {
    /// SIGTERM first (nginx's master then stops its worker), SIGKILL after 5 s.
    fn drop(&mut self) {
        let pid = self.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run() -> Result<()> {
    ensure_nginx()?;
    let binary = applianced()?;
    let binary = binary.to_str().context("binary path")?;
    let dir = workspace_root().join("demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("origin"))?;
    step("format two file-backed data drives (1 GiB each, 32 MiB segments)");
    let drives: Vec<String> = (0..2)
        .map(|number| dir.join(format!("nvme{number}.img")).display().to_string())
        .collect();
    for drive in &drives {
        std::fs::File::create(drive)?.set_len(1 << 30)?;
    }
    print!(
        "{}",
        output(
            binary,
            &["format", "--segment-mib", "32", &drives[0], &drives[1]]
        )?
    );
    step("generate a catalog of 24 video files (1 to 20 MiB) and its manifest");
    let catalog = generate(&dir.join("origin"))?;
    println!(
        "{} files, {} MiB",
        catalog.len(),
        catalog.iter().map(|(_, b)| b.len()).sum::<usize>() >> 20
    );
    step("start the origin: nginx on 127.0.0.1:18090");
    let _origin = Guard(start_nginx(&dir)?);
    wait_for(&format!("http://127.0.0.1:{ORIGIN_PORT}/manifest.json"))?;
    let config = write_config(&dir, &drives)?;
    print!("{}", std::fs::read_to_string(&config)?);
    step("start the appliance and fill it from the origin");
    let mut daemon = Guard(start_daemon(binary, &config)?);
    wait_for(&format!("http://127.0.0.1:{ADMIN_PORT}/health"))?;
    fill(&catalog)?;
    step("fetch byte ranges as a player would, and compare with the origin's bytes");
    fetch_ranges(&catalog)?;
    step("SIGKILL the appliance, restart it: recovery, then the same bytes");
    daemon.0.kill()?;
    daemon.0.wait()?;
    println!("(killed)");
    let started = Instant::now();
    let _daemon = Guard(start_daemon(binary, &config)?);
    wait_for(&format!("http://127.0.0.1:{ADMIN_PORT}/health"))?;
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
    use std::fmt::Write as _;
    let mut state = 0x0005_DEEC_E66D_u64;
    let mut files = Vec::new();
    let mut rows = Vec::new();
    for number in 0..FILES {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let size = (1 << 20) + (state >> 20) % (19 << 20);
        let bytes: Vec<u8> = (0..size)
            .map(|at| (at.wrapping_mul(2654435761).wrapping_add(number) >> 11).to_le_bytes()[0])
            .collect();
        let path = format!("/title-{number:02}/main.mp4");
        std::fs::create_dir_all(dir.join(format!("title-{number:02}")))?;
        std::fs::write(dir.join(&path[1..]), &bytes)?;
        let digest = output(
            "sha256sum",
            &[dir.join(&path[1..]).to_str().context("path")?],
        )?;
        let sha = digest
            .split_whitespace()
            .next()
            .context("sha256sum output")?
            .to_string();
        let mut row = String::new();
        write!(
            row,
            "{{\"path\":\"{path}\",\"size_bytes\":{},\"sha256\":\"{sha}\",\"rank\":{}}}",
            bytes.len(),
            number + 1
        )?;
        rows.push(row);
        files.push((path, bytes));
    }
    std::fs::write(
        dir.join("manifest.json"),
        format!(
            "{{\"version\":1,\"generated_at\":\"2026-11-23T02:00:00Z\",\"files\":[\n{}\n]}}\n",
            rows.join(",\n")
        ),
    )?;
    Ok(files)
}

fn start_nginx(dir: &Path) -> Result<Child> {
    let work = dir.join("nginx");
    std::fs::create_dir_all(work.join("logs"))?;
    let config = work.join("nginx.conf");
    let tmp = work.join("logs");
    std::fs::write(
        &config,
        format!(
            "daemon off;\nworker_processes 1;\npid {};\nerror_log {} warn;\n\
             events {{ worker_connections 256; }}\nhttp {{\n  access_log off;\n  sendfile on;\n\
               client_body_temp_path {t};\n  proxy_temp_path {t};\n  fastcgi_temp_path {t};\n\
               uwsgi_temp_path {t};\n  scgi_temp_path {t};\n\
               server {{ listen 127.0.0.1:{ORIGIN_PORT}; root {}; }}\n}}\n",
            work.join("nginx.pid").display(),
            work.join("logs/error.log").display(),
            dir.join("origin").display(),
            t = tmp.display(),
        ),
    )?;
    let nginx = if Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    };
    Ok(Command::new(nginx)
        .args([
            "-c",
            config.to_str().context("path")?,
            "-p",
            work.to_str().context("path")?,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

fn write_config(dir: &Path, drives: &[String]) -> Result<PathBuf> {
    let config = dir.join("appliance.toml");
    let quoted: Vec<String> = drives.iter().map(|drive| format!("{drive:?}")).collect();
    std::fs::write(
        &config,
        format!(
            "drives = [{}]\nstate_dir = {:?}\n\n[serve]\nlisten = \"127.0.0.1:{SERVE_PORT}\"\n\
             admin_listen = \"127.0.0.1:{ADMIN_PORT}\"\naccess_log = {:?}\n\n[fill]\n\
             manifest = \"http://127.0.0.1:{ORIGIN_PORT}/manifest.json\"\n\
             sources = [\"http://127.0.0.1:{ORIGIN_PORT}\"]\nconcurrency = 4\n",
            quoted.join(", "),
            dir.join("state").display().to_string(),
            dir.join("access.log").display().to_string()
        ),
    )?;
    Ok(config)
}

fn start_daemon(binary: &str, config: &Path) -> Result<Child> {
    Ok(Command::new(binary)
        .args(["run", "--config", config.to_str().context("path")?])
        .spawn()?)
}

fn wait_for(url: &str) -> Result<()> {
    let started = Instant::now();
    while output("curl", &["-sf", "-o", "/dev/null", url]).is_err() {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("{url} did not answer");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn fill(catalog: &[(String, Vec<u8>)]) -> Result<()> {
    let admin = format!("http://127.0.0.1:{ADMIN_PORT}");
    println!("$ curl -X POST {admin}/fill");
    println!(
        "{}",
        output("curl", &["-s", "-X", "POST", &format!("{admin}/fill")])?.trim()
    );
    let started = Instant::now();
    loop {
        let status: serde_json::Value =
            serde_json::from_str(&output("curl", &["-s", &format!("{admin}/fill")])?)?;
        if status["running"] == false && !status["last"].is_null() {
            let last = &status["last"];
            println!(
                "fill done in {:.1} s: {} files fetched ({} MiB), {} failed, sources: {}",
                started.elapsed().as_secs_f64(),
                last["files_fetched"],
                last["bytes_fetched"].as_u64().unwrap_or(0) >> 20,
                last["files_failed"],
                status["sources"]
            );
            if last["files_fetched"].as_u64() != Some(catalog.len() as u64) {
                bail!("the fill did not fetch the whole catalog: {status}");
            }
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("the fill did not finish: {status}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
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
