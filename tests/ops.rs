//! Black-box tests of operations: `appliance-ctl` against the real daemon through the control
//! socket (status, drives, fill --wait, drain, undrain, verify finding a damaged file), the
//! CLI's errors with no daemon, malformed control requests, SIGHUP reload, SIGTERM with a
//! response in flight, /metrics in the Prometheus text format, and cancelled fills (mid-fill
//! and during a stalled manifest download) that leave later fills unaffected.

mod origin;
mod util;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use util::{ctl_binary, formatted_drives, Daemon, Scratch};

fn ctl(socket: &Path, args: &[&str]) -> Output {
    Command::new(ctl_binary())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run appliance-ctl")
}

/// Runs `appliance-ctl` and requires success; returns its standard output.
fn ctl_ok(socket: &Path, args: &[&str]) -> String {
    let out = ctl(socket, args);
    assert!(
        out.status.success(),
        "appliance-ctl {args:?}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A daemon with a control socket, filled from a fault-free origin with `files`.
struct Ops {
    daemon: Daemon,
    socket: PathBuf,
    drives: Vec<PathBuf>,
    files: Vec<(String, Vec<u8>)>,
    _origin: origin::FaultOrigin,
    scratch: Scratch,
}

/// `count` files of about `size_bytes` under `/ops/{folder}/`.
fn ops_files(folder: &str, count: u64, size_bytes: u64) -> Vec<(String, Vec<u8>)> {
    (0..count)
        .map(|number| {
            let bytes = (0..size_bytes + number * 1000)
                .map(|at| (at.wrapping_mul(31).wrapping_add(number)).to_le_bytes()[0])
                .collect();
            (format!("/ops/{folder}title-{number}.mp4"), bytes)
        })
        .collect()
}

fn start(name: &str) -> Ops {
    start_with(
        name,
        ops_files("", 6, 300_000),
        Vec::new(),
        HashMap::new(),
        "",
    )
}

/// A daemon filled from an origin that serves `files` (listed in /manifest.json) and `more`
/// with `faults`; `fill` adds lines to `[fill]`.
fn start_with(
    name: &str,
    files: Vec<(String, Vec<u8>)>,
    more: Vec<(String, Vec<u8>)>,
    faults: HashMap<String, origin::Fault>,
    fill: &str,
) -> Ops {
    let scratch = Scratch::new(&format!("ops-{name}"));
    let mut served: HashMap<String, Vec<u8>> = files.iter().cloned().chain(more).collect();
    served.insert(
        "/manifest.json".into(),
        origin::manifest_json(&files).into_bytes(),
    );
    let origin = origin::FaultOrigin::start(served, faults);
    let drives = formatted_drives(&scratch, 1, 64 << 20, 4);
    let socket = scratch.path("control.sock");
    let extra = format!(
        "[fill]\nmanifest = \"{}/manifest.json\"\nsources = [\"{}\"]\n{fill}\n",
        origin.url(),
        origin.url()
    );
    let daemon = Daemon::start_with(&scratch, &drives, "", "", &extra);
    Ops {
        daemon,
        socket,
        drives,
        files,
        _origin: origin,
        scratch,
    }
}

#[test]
fn the_cli_says_so_in_one_line_when_the_daemon_is_not_there() {
    let out = ctl(Path::new("/nonexistent/control.sock"), &["status"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("not running"), "{stderr}");
}

#[test]
fn status_fill_drain_and_verify_through_the_control_socket() {
    let ops = start("main");
    let out = ctl_ok(&ops.socket, &["fill", "--wait"]);
    assert!(out.contains("6 fetched"), "{out}");
    let out = ctl(&ops.socket, &["status"]);
    let table = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for expected in [
        "state: serving",
        "catalog: 6 files",
        "fill: idle",
        "traffic:",
        "host:",
    ] {
        assert!(
            table.contains(expected),
            "{expected} missing from:\n{table}"
        );
    }
    println!("{table}");
    let out = ctl(&ops.socket, &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(status["catalog"]["files"], 6);
    assert_eq!(status["drives"][0]["state"], "ok");
    assert_eq!(status["fill"]["last"]["files_fetched"], 6);
    let out = ctl(&ops.socket, &["drives", "--json"]);
    let drives: serde_json::Value = serde_json::from_slice(&out.stdout).expect("drives JSON");
    assert_eq!(drives["drives"][0]["files"], 6);
    // Drain and undrain.
    assert!(ctl(&ops.socket, &["drain"]).status.success());
    let status: serde_json::Value =
        serde_json::from_slice(&ctl(&ops.socket, &["status", "--json"]).stdout).unwrap();
    assert!(
        ["draining", "drained"].contains(&status["state"].as_str().unwrap()),
        "{status}"
    );
    assert!(ctl(&ops.socket, &["undrain"]).status.success());
    // Verify: clean, then with a damaged file.
    let out = ctl(&ops.socket, &["verify"]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("verified 6 files, 0 damaged"));
    // The first data segment starts at 1 MiB (segment area) + 4 MiB (segment 0 is the log).
    util::write_at(&ops.drives[0], (5 << 20) + 8192, b"bit rot bit rot bit rot");
    let out = ctl(&ops.socket, &["verify"]);
    assert!(!out.status.success());
    let report = text(&out.stdout);
    assert!(
        report.contains("damaged /ops/") && report.contains("1 damaged"),
        "{report}"
    );
    let _ = &ops.files;
}

#[test]
fn malformed_control_requests_get_an_error_line() {
    let ops = start("protocol");
    let mut stream = UnixStream::connect(&ops.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let cases = [
        ("not json\n", "malformed"),
        (
            "{\"version\":99,\"command\":\"status\"}\n",
            "unsupported protocol version 99",
        ),
        ("{\"version\":1,\"command\":\"rm_rf\"}\n", "malformed"),
        ("{\"command\":\"status\"}\n", "no protocol version"),
    ];
    for (request, expected) in cases {
        stream.write_all(request.as_bytes()).unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let response: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert!(
            response["error"].as_str().unwrap().contains(expected),
            "{request} -> {line}"
        );
    }
    // The same connection still works.
    stream
        .write_all(b"{\"version\":1,\"command\":\"drives\"}\n")
        .unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("\"drives\""), "{line}");
}

#[test]
fn sighup_reloads_and_a_bad_config_changes_nothing() {
    let ops = start("reload");
    let config = std::fs::read_to_string(&ops.daemon.config).unwrap();
    let rotated = ops.scratch.path("access-rotated.log");
    let changed = config
        .replace(
            "[fill]\n",
            "[fill]\nbandwidth_bits_per_s = 8000000\nwindow = \"03:00-04:00\"\n",
        )
        .replace(
            &format!(
                "access_log = {:?}",
                ops.scratch.path("access.log").display().to_string()
            ),
            &format!("access_log = {:?}", rotated.display().to_string()),
        );
    assert_ne!(changed, config);
    std::fs::write(&ops.daemon.config, changed).unwrap();
    let kill = |signal: &str| {
        Command::new("kill")
            .args([signal, &ops.daemon.pid().to_string()])
            .status()
            .unwrap()
    };
    assert!(kill("-HUP").success());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ops.daemon.admin("GET", "/health").0, 200);
    let status: serde_json::Value =
        serde_json::from_slice(&ctl(&ops.socket, &["status", "--json"]).stdout).unwrap();
    assert_eq!(
        status["fill"]["window"], "03:00-04:00 UTC",
        "the window follows SIGHUP"
    );
    let _ = ops.daemon.get("/not/here.mp4");
    std::thread::sleep(Duration::from_millis(1500));
    let log = std::fs::read_to_string(&rotated).unwrap_or_default();
    assert!(
        log.contains("/not/here.mp4"),
        "the access log moved to its new file: {log:?}"
    );
    std::fs::write(&ops.daemon.config, "this is = not [valid").unwrap();
    assert!(kill("-HUP").success());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        ops.daemon.admin("GET", "/health").0,
        200,
        "a bad reload must not stop serving"
    );
    let _ = &ops.scratch;
}

#[test]
fn sigterm_lets_a_response_in_flight_finish() {
    let ops = start("sigterm");
    assert!(ctl(&ops.socket, &["fill", "--wait"]).status.success());
    let (path, bytes) = ops
        .files
        .iter()
        .max_by_key(|(_, bytes)| bytes.len())
        .unwrap()
        .clone();
    // A slow client: 100 KB/s for a 300 KB file.
    let download = Command::new("curl")
        .args(["-s", "--limit-rate", "100k", &ops.daemon.url(&path)])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let pid = ops.daemon.pid();
    assert!(Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let out = download.wait_with_output().unwrap();
    assert!(
        out.stdout == bytes,
        "the response in flight was cut: {} bytes",
        out.stdout.len()
    );
    let started = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() && started.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !ops.socket.exists(),
        "the control socket is removed at a clean stop"
    );
}

#[test]
fn metrics_are_in_the_prometheus_text_format() {
    let ops = start("metrics");
    assert!(ctl(&ops.socket, &["fill", "--wait"]).status.success());
    let _ = ops.daemon.get(&ops.files[0].0);
    let _ = ops.daemon.get("/missing.mp4");
    let (status, metrics) = ops.daemon.admin("GET", "/metrics");
    assert_eq!(status, 200);
    let mut samples = HashMap::new();
    for line in metrics.lines() {
        if line.starts_with('#') || line.is_empty() {
            assert!(
                line.is_empty()
                    || line.starts_with("# HELP ")
                    || line.starts_with("# TYPE ")
                    || line.starts_with("# UNIT ")
                    || line == "# EOF",
                "bad comment line {line:?}"
            );
            continue;
        }
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line:?}"));
        let bare = name.split('{').next().unwrap();
        assert!(
            bare.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name {line:?}"
        );
        if let Some(labels) = name.strip_prefix(bare) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line:?}");
            }
        }
        samples.insert(name.to_string(), value);
    }
    assert!(metrics.trim_end().ends_with("# EOF"));
    assert!(
        samples["appliance_http_requests_total{status=\"200\"}"] >= 1.0,
        "{metrics}"
    );
    assert!(samples["appliance_http_misses_total"] >= 1.0);
    assert!(samples["appliance_http_sent_bytes_total"] > 0.0);
    assert_eq!(samples["appliance_store_files"], 6.0, "{metrics}");
    let drive = ops.drives[0].display().to_string();
    assert_eq!(
        samples[&format!("appliance_drive_up{{drive=\"{drive}\"}}")],
        1.0
    );
    assert!(samples[&format!("appliance_drive_written_bytes_total{{drive=\"{drive}\"}}")] > 0.0);
    let fill_ok = samples
        .iter()
        .find(|(name, _)| {
            name.starts_with("appliance_fill_files_total") && name.contains("result=\"ok\"")
        })
        .map(|(_, value)| *value);
    assert_eq!(fill_ok, Some(6.0), "{metrics}");
    assert_eq!(metrics.matches("# EOF").count(), 1);
}

fn fill_status(ops: &Ops) -> serde_json::Value {
    let out = ctl(&ops.socket, &["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    status["fill"].clone()
}

/// Waits until no fill runs; returns the fill status and how long it took.
fn wait_idle(ops: &Ops, limit: Duration) -> (serde_json::Value, Duration) {
    let started = Instant::now();
    loop {
        let fill = fill_status(ops);
        if fill["running"] == false {
            return (fill, started.elapsed());
        }
        assert!(started.elapsed() < limit, "the fill still runs: {fill}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_cancel_stops_only_its_own_fill() {
    // 12 MB at 8 Mbit/s (after a 4 MiB burst): the first fill lasts about 8 s.
    let files = ops_files("", 12, 1_000_000);
    let later = ops_files("later/", 4, 50_000);
    let mut more = later.clone();
    more.push((
        "/manifest-2.json".into(),
        origin::manifest_json(&later).into_bytes(),
    ));
    let ops = start_with(
        "cancel",
        files.clone(),
        more,
        HashMap::new(),
        "bandwidth_bits_per_s = 8000000",
    );
    let out = ctl(&ops.socket, &["fill"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(fill_status(&ops)["running"], true, "still filling");
    assert!(ctl(&ops.socket, &["fill", "--cancel"]).status.success());
    let (fill, took) = wait_idle(&ops, Duration::from_secs(5));
    let last = &fill["last"];
    assert_eq!(last["cancelled"], true, "{fill}");
    let fetched_first = last["files_fetched"].as_u64().unwrap();
    assert!(fetched_first < 12, "cancelled mid-fill: {fill}");
    assert!(took < Duration::from_secs(3), "the cancel took {took:?}");
    // The next fill is not cancelled by the earlier cancel: it fetches the rest.
    ctl_ok(&ops.socket, &["fill", "--wait"]);
    let last = &fill_status(&ops)["last"];
    assert_eq!(last["cancelled"], false, "{last}");
    assert_eq!(last["files_deleted"], 0, "{last}");
    assert_eq!(last["files_fetched"].as_u64().unwrap(), 12 - fetched_first);
    assert_eq!(last["files_held_ok"].as_u64().unwrap(), fetched_first);
    // And the one after it fetches everything its manifest lists.
    let manifest_2 = format!("{}/manifest-2.json", ops._origin.url());
    let out = ctl_ok(&ops.socket, &["fill", "--wait", "--manifest", &manifest_2]);
    assert!(out.contains("4 fetched, 0 failed, 0 deleted"), "{out}");
    for (path, bytes) in files.iter().chain(&later) {
        assert!(ops.daemon.get(path).as_ref() == Some(bytes), "{path}");
    }
}

#[test]
fn a_cancel_during_the_manifest_download_ends_the_fill_promptly() {
    let faults = [(
        "/manifest.json".to_string(),
        origin::Fault::Stall {
            bytes: 10,
            pause: Duration::from_secs(30),
            times: 1,
        },
    )]
    .into_iter()
    .collect();
    // Timeouts far longer than the test: only the cancel can end the first fill in time.
    let ops = start_with(
        "cancel-manifest",
        ops_files("", 6, 100_000),
        Vec::new(),
        faults,
        "stall_timeout_ms = 60000\nresponse_timeout_ms = 60000",
    );
    assert!(ctl(&ops.socket, &["fill"]).status.success());
    std::thread::sleep(Duration::from_millis(700));
    let fill = fill_status(&ops);
    assert_eq!(fill["running"], true, "waiting for the manifest: {fill}");
    assert!(ctl(&ops.socket, &["fill", "--cancel"]).status.success());
    let (fill, took) = wait_idle(&ops, Duration::from_secs(10));
    assert!(took < Duration::from_secs(2), "the cancel took {took:?}");
    assert_eq!(fill["last"]["cancelled"], true, "{fill}");
    assert_eq!(fill["last"]["files_fetched"], 0, "{fill}");
    let out = ctl_ok(&ops.socket, &["fill", "--wait"]);
    assert!(out.contains("6 fetched"), "{out}");
}
