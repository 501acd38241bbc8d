//! `cargo xtask demo`: the appliance's main job so far, end to end on file-backed drives:
//! format, import a generated catalog, crash in the middle of a second import, recover,
//! read ranges back and verify everything.

use crate::util::{applianced, output, workspace_root};
use anyhow::{bail, Result};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

pub fn run() -> Result<()> {
    let binary = applianced()?;
    let binary = binary.to_str().unwrap();
    let dir = workspace_root().join("demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("catalog"))?;
    let drives: Vec<String> = (0..2)
        .map(|number| dir.join(format!("nvme{number}.img")).display().to_string())
        .collect();
    for drive in &drives {
        std::fs::File::create(drive)?.set_len(1 << 30)?;
    }
    step("format two file-backed data drives (1 GiB each, 32 MiB segments)");
    print!(
        "{}",
        output(
            binary,
            &["format", "--segment-mib", "32", &drives[0], &drives[1]]
        )?
    );
    step("generate a catalog of 24 video files (1 to 20 MiB)");
    let catalog = dir.join("catalog");
    generate(&catalog)?;
    let mut store = vec!["store".to_string()];
    for drive in &drives {
        store.extend(["--drive".to_string(), drive.clone()]);
    }
    store.extend([
        "--state-dir".to_string(),
        dir.join("state").display().to_string(),
    ]);
    let with = |args: &[&str]| -> Vec<String> {
        let mut all = store.clone();
        all.extend(args.iter().map(|arg| arg.to_string()));
        all
    };
    step("import the first half, then SIGKILL an import of the rest half-way");
    let half = dir.join("half");
    std::fs::create_dir_all(&half)?;
    for entry in std::fs::read_dir(&catalog)?.take(12) {
        let entry = entry?;
        std::fs::copy(entry.path(), half.join(entry.file_name()))?;
    }
    print!(
        "{}",
        run_args(binary, &with(&["import", half.to_str().unwrap()]))?
    );
    let mut child = Command::new(binary)
        .args(with(&["import", "--jobs", "2", catalog.to_str().unwrap()]))
        .stdout(Stdio::null())
        .spawn()?;
    std::thread::sleep(std::time::Duration::from_millis(150));
    child.kill()?;
    child.wait()?;
    println!("(killed)");
    step("restart: recovery replays the log since the last checkpoint");
    print!("{}", run_args(binary, &with(&["stats"]))?);
    step("finish the import and list the catalog");
    run_args(binary, &with(&["import", catalog.to_str().unwrap()]))?;
    print!("{}", run_args(binary, &with(&["ls"]))?);
    step("read a byte range back and compare with the source file");
    let range = run_bytes(
        binary,
        &with(&["cat", "/title-03.mp4", "--range", "1000000-1000015"]),
    )?;
    let source = std::fs::read(catalog.join("title-03.mp4"))?;
    if range != source[1_000_000..1_000_016] {
        bail!("range read back differs from the source");
    }
    println!(
        "bytes 1000000-1000015 of /title-03.mp4: {:02x?} (match)",
        range
    );
    step("verify every stored file against its checksums");
    print!("{}", run_args(binary, &with(&["verify"]))?);
    serve(binary, &dir, &drives, &source)?;
    println!(
        "\ndemo finished; drives and catalog are in {}",
        dir.display()
    );
    Ok(())
}

/// Starts `applianced run`, fetches ranges with curl and compares them, then stops it.
fn serve(binary: &str, dir: &Path, drives: &[String], source: &[u8]) -> Result<()> {
    step("serve: applianced run on 127.0.0.1:18080 (admin on 127.0.0.1:18081)");
    let config = dir.join("appliance.toml");
    let quoted: Vec<String> = drives.iter().map(|drive| format!("{drive:?}")).collect();
    std::fs::write(
        &config,
        format!(
            "drives = [{}]\nstate_dir = {:?}\n[serve]\nlisten = \"127.0.0.1:18080\"\n\
             admin_listen = \"127.0.0.1:18081\"\naccess_log = {:?}\n",
            quoted.join(", "),
            dir.join("state").display().to_string(),
            dir.join("access.log").display().to_string()
        ),
    )?;
    print!("{}", std::fs::read_to_string(&config)?);
    let mut daemon = Command::new(binary)
        .args(["run", "--config", config.to_str().unwrap()])
        .spawn()?;
    let result = fetch_ranges(source);
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    daemon.wait()?;
    result
}

fn fetch_ranges(source: &[u8]) -> Result<()> {
    let started = std::time::Instant::now();
    while output("curl", &["-sf", "http://127.0.0.1:18081/health"]).is_err() {
        if started.elapsed() > std::time::Duration::from_secs(20) {
            bail!("the appliance did not become healthy");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    println!("$ curl -s http://127.0.0.1:18081/health");
    println!(
        "{}",
        output("curl", &["-s", "http://127.0.0.1:18081/health"])?.trim()
    );
    let url = "http://127.0.0.1:18080/title-03.mp4";
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
                url
            ]
        )?
    );
    let body = Command::new("curl")
        .args(["-s", "-r", "1000000-1999999", url])
        .output()?
        .stdout;
    if body != source[1_000_000..2_000_000] {
        bail!("the served range differs from the source file");
    }
    println!("the 1 MB range served with sendfile matches the source file");
    let status = output(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://127.0.0.1:18080/not/here.mp4",
        ],
    )?;
    println!("a path the box does not hold: HTTP {status}");
    Ok(())
}

fn step(text: &str) {
    println!("\n== {text}");
    let _ = std::io::stdout().flush();
}

fn run_args(binary: &str, args: &[String]) -> Result<String> {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    output(binary, &refs)
}

fn run_bytes(binary: &str, args: &[String]) -> Result<Vec<u8>> {
    let out = Command::new(binary).args(args).output()?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

fn generate(dir: &Path) -> Result<()> {
    let mut state = 0x0005_DEEC_E66D_u64;
    for number in 0..24u64 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let size = (1 << 20) + (state >> 20) % (19 << 20);
        let bytes: Vec<u8> = (0..size)
            .map(|at| (at.wrapping_mul(2654435761).wrapping_add(number) >> 11).to_le_bytes()[0])
            .collect();
        std::fs::write(dir.join(format!("title-{number:02}.mp4")), bytes)?;
    }
    Ok(())
}
