//! Black-box tests of operations: `appliance-ctl` against the real daemon through the control
//! socket (status, drives, fill --wait, drain, undrain, verify finding a damaged file), the
//! CLI's errors with no daemon, malformed control requests, SIGHUP reload, SIGTERM with a
//! response in flight, /metrics in the Prometheus text format, and cancelled fills (mid-fill
//! and during a stalled manifest download) that leave later fills unaffected. The operator
//! plane under attack: every mutation tried on the admin listener (404/405, nothing changes),
//! `/health`, `/metrics` and status agreeing, two fill starts at once, the admin connection
//! cap and deadline, a secret file given as a manifest, and socket activation. The scrubber: a
//! byte flipped on the drive under a running daemon takes that file out of service within the
//! scrub period (status, metrics), the next fill restores it, the others are served throughout.

mod origin;
mod util;

use appliance_testkit::{seeded_bytes, send_signal, Config, Ctl, Fill, Manifest, Scrub};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use util::{formatted_drives, Daemon, Scratch};

/// A daemon with a control socket, filled from a fault-free origin with `files`.
struct Ops {
    daemon: Daemon,
    socket: PathBuf,
    ctl: Ctl,
    drives: Vec<PathBuf>,
    files: Vec<(String, Vec<u8>)>,
    _origin: origin::FaultOrigin,
    scratch: Scratch,
}

/// `count` files of about `size_bytes` under `/ops/{folder}/`.
fn ops_files(folder: &str, count: u64, size_bytes: u64) -> Vec<(String, Vec<u8>)> {
    (0..count)
        .map(|number| {
            let size = usize::try_from(size_bytes + number * 1000).unwrap();
            let bytes = seeded_bytes(number, size);
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
        Fill::default(),
    )
}

/// A daemon filled from an origin that serves `files` (listed in /manifest.json) and `more`
/// with `faults`; `fill` adds settings to `[fill]`.
fn start_with(
    name: &str,
    files: Vec<(String, Vec<u8>)>,
    more: Vec<(String, Vec<u8>)>,
    faults: HashMap<String, origin::Fault>,
    fill: Fill,
) -> Ops {
    start_scrubbing(name, files, more, faults, fill, Scrub::default())
}

/// `start_with`, and `scrub` as `[scrub]`.
fn start_scrubbing(
    name: &str,
    files: Vec<(String, Vec<u8>)>,
    more: Vec<(String, Vec<u8>)>,
    faults: HashMap<String, origin::Fault>,
    fill: Fill,
    scrub: Scrub,
) -> Ops {
    let scratch = Scratch::new(&format!("ops-{name}"));
    let mut served: HashMap<String, Vec<u8>> = files.iter().cloned().chain(more).collect();
    served.insert(
        "/manifest.json".into(),
        Manifest::of(&files).to_json().into(),
    );
    let origin = origin::FaultOrigin::start(served, faults);
    let drives = formatted_drives(&scratch, 1, 64 << 20, 4);
    let fill = Fill {
        manifest: Some(format!("{}/manifest.json", origin.url())),
        sources: vec![origin.url()],
        ..fill
    };
    let config = Config {
        fill,
        scrub,
        ..Config::new(&drives)
    };
    let daemon = Daemon::start(&scratch, config);
    Ops {
        socket: daemon.socket.clone(),
        ctl: daemon.ctl(),
        daemon,
        drives,
        files,
        _origin: origin,
        scratch,
    }
}

impl Ops {
    /// Runs `appliance-ctl ARGS` on the daemon's socket.
    fn ctl(&self, args: &[&str]) -> appliance_testkit::Output {
        self.ctl.run(args).expect("run appliance-ctl")
    }

    /// Runs `appliance-ctl ARGS` and requires success; returns its standard output.
    fn ctl_ok(&self, args: &[&str]) -> String {
        self.ctl
            .ok(args)
            .unwrap_or_else(|failure| panic!("{failure}"))
    }
}

#[test]
fn the_cli_says_so_in_one_line_when_the_daemon_is_not_there() {
    let out = util::ctl(Path::new("/nonexistent/control.sock"))
        .run(&["status"])
        .unwrap();
    assert!(!out.status.success());
    let stderr = out.stderr;
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("not running"), "{stderr}");
}

#[test]
fn status_fill_drain_and_verify_through_the_control_socket() {
    let ops = start("main");
    let out = ops.ctl_ok(&["fill", "--wait"]);
    assert!(out.contains("6 fetched"), "{out}");
    let out = ops.ctl(&["status"]);
    let table = out.stdout;
    assert!(out.status.success(), "{}", out.stderr);
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
    let out = ops.ctl(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&out.stdout).expect("status JSON");
    assert_eq!(status["catalog"]["files"], 6);
    assert_eq!(status["drives"][0]["state"], "ok");
    assert_eq!(status["fill"]["last"]["files_fetched"], 6);
    let out = ops.ctl(&["drives", "--json"]);
    let drives: serde_json::Value = serde_json::from_str(&out.stdout).expect("drives JSON");
    assert_eq!(drives[0]["files"], 6);
    assert_eq!(
        drives, status["drives"],
        "drives and status show the same rows"
    );
    // Drain and undrain.
    assert!(ops.ctl(&["drain"]).status.success());
    let status: serde_json::Value =
        serde_json::from_str(&ops.ctl(&["status", "--json"]).stdout).unwrap();
    assert!(
        ["draining", "drained"].contains(&status["state"].as_str().unwrap()),
        "{status}"
    );
    assert!(ops.ctl(&["undrain"]).status.success());
    // Verify: clean, then with a damaged file.
    let out = ops.ctl(&["verify"]);
    assert!(out.status.success(), "{}", out.stdout);
    assert!(out.stdout.contains("verified 6 files, 0 damaged"));
    // The first data segment starts at 1 MiB (segment area) + 4 MiB (segment 0 is the log).
    util::write_at(&ops.drives[0], (5 << 20) + 8192, b"bit rot bit rot bit rot");
    let out = ops.ctl(&["verify"]);
    assert!(!out.status.success());
    let report = out.stdout;
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
        // A version-1 client (before typed replies) is told which version this daemon speaks.
        (
            "{\"version\":1,\"command\":\"status\"}\n",
            "unsupported protocol version 1 (this daemon speaks 2)",
        ),
        ("{\"version\":2,\"command\":\"rm_rf\"}\n", "malformed"),
        ("{\"command\":\"status\"}\n", "no protocol version"),
        (
            "{\"version\":2,\"command\":\"fill\",\"manifest\":7}\n",
            "malformed",
        ),
    ];
    for (request, expected) in cases {
        stream.write_all(request.as_bytes()).unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let response: serde_json::Value = serde_json::from_str(&line).unwrap();
        let kind = if expected.starts_with("unsupported") {
            "unsupported_version"
        } else {
            "bad_request"
        };
        assert_eq!(response["error"]["kind"], kind, "{request} -> {line}");
        assert!(
            response["error"]["message"]
                .as_str()
                .unwrap()
                .contains(expected),
            "{request} -> {line}"
        );
        assert_eq!(response["done"], true, "{line}");
    }
    // The same connection still works.
    stream
        .write_all(b"{\"version\":2,\"command\":\"drives\"}\n")
        .unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let response: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(response["reply"]["kind"], "drives", "{line}");
    assert_eq!(response["reply"]["value"][0]["state"], "ok", "{line}");
}

#[test]
fn sighup_reloads_and_a_bad_config_changes_nothing() {
    let ops = start("reload");
    let rotated = ops.scratch.path("access-rotated.log");
    let mut changed = ops.daemon.config.clone();
    changed.fill.bandwidth_bits_per_s = Some(8_000_000);
    changed.fill.window = Some("03:00-04:00".into());
    changed.serve.access_log = Some(rotated.display().to_string());
    changed.write(&ops.daemon.config_path).unwrap();
    let hangup = || send_signal(ops.daemon.pid(), "HUP").unwrap();
    hangup();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ops.daemon.admin("GET", "/health").0, 200);
    let status: serde_json::Value =
        serde_json::from_str(&ops.ctl(&["status", "--json"]).stdout).unwrap();
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
    std::fs::write(&ops.daemon.config_path, "this is = not [valid").unwrap();
    hangup();
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
    assert!(ops.ctl(&["fill", "--wait"]).status.success());
    let (path, bytes) = ops
        .files
        .iter()
        .max_by_key(|(_, bytes)| bytes.len())
        .unwrap()
        .clone();
    // A slow client: 100 KB/s for a 300 KB file.
    let download = std::process::Command::new("curl")
        .args(["-s", "--limit-rate", "100k", &ops.daemon.url(&path)])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let pid = ops.daemon.pid();
    send_signal(pid, "TERM").unwrap();
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
    assert!(ops.ctl(&["fill", "--wait"]).status.success());
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
    ops.ctl
        .fill_status()
        .unwrap_or_else(|failure| panic!("{failure}"))
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
        Manifest::of(&later).to_json().into(),
    ));
    let ops = start_with(
        "cancel",
        files.clone(),
        more,
        HashMap::new(),
        Fill {
            bandwidth_bits_per_s: Some(8_000_000),
            ..Fill::default()
        },
    );
    let out = ops.ctl(&["fill"]);
    assert!(out.status.success(), "{}", out.stderr);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(fill_status(&ops)["running"], true, "still filling");
    assert!(ops.ctl(&["fill", "--cancel"]).status.success());
    let (fill, took) = wait_idle(&ops, Duration::from_secs(5));
    let last = &fill["last"];
    assert_eq!(last["cancelled"], true, "{fill}");
    let fetched_first = last["files_fetched"].as_u64().unwrap();
    assert!(fetched_first < 12, "cancelled mid-fill: {fill}");
    assert!(took < Duration::from_secs(3), "the cancel took {took:?}");
    // The next fill is not cancelled by the earlier cancel: it fetches the rest.
    ops.ctl_ok(&["fill", "--wait"]);
    let last = &fill_status(&ops)["last"];
    assert_eq!(last["cancelled"], false, "{last}");
    assert_eq!(last["files_deleted"], 0, "{last}");
    assert_eq!(last["files_fetched"].as_u64().unwrap(), 12 - fetched_first);
    assert_eq!(last["files_held_ok"].as_u64().unwrap(), fetched_first);
    // And the one after it fetches everything its manifest lists.
    let manifest_2 = format!("{}/manifest-2.json", ops._origin.url());
    let out = ops.ctl_ok(&["fill", "--wait", "--manifest", &manifest_2]);
    assert!(out.contains("4 fetched, 0 failed, 0 deleted"), "{out}");
    for (path, bytes) in files.iter().chain(&later) {
        assert!(ops.daemon.get(path).as_ref() == Some(bytes), "{path}");
    }
}

#[test]
fn a_cancel_during_the_manifest_download_ends_the_fill_promptly() {
    // Timeouts far longer than the test: only the cancel can end the first fill in time.
    let ops = start_stalled("cancel-manifest", 1);
    assert!(ops.ctl(&["fill"]).status.success());
    std::thread::sleep(Duration::from_millis(700));
    let fill = fill_status(&ops);
    assert_eq!(fill["running"], true, "waiting for the manifest: {fill}");
    assert!(ops.ctl(&["fill", "--cancel"]).status.success());
    let (fill, took) = wait_idle(&ops, Duration::from_secs(10));
    assert!(took < Duration::from_secs(2), "the cancel took {took:?}");
    assert_eq!(fill["last"]["cancelled"], true, "{fill}");
    assert_eq!(fill["last"]["files_fetched"], 0, "{fill}");
    let out = ops.ctl_ok(&["fill", "--wait"]);
    assert!(out.contains("6 fetched"), "{out}");
}

/// A daemon (6 files at the origin) whose manifest download stalls for 30 s the first
/// `stalls` times, with fill timeouts far longer: a fill started then runs until cancelled.
fn start_stalled(name: &str, stalls: u64) -> Ops {
    let faults = [(
        "/manifest.json".to_string(),
        origin::Fault::Stall {
            bytes: 10,
            pause: Duration::from_secs(30),
            times: stalls,
        },
    )]
    .into_iter()
    .collect();
    start_with(
        name,
        ops_files("", 6, 100_000),
        Vec::new(),
        faults,
        Fill {
            stall_timeout_ms: Some(60_000),
            response_timeout_ms: Some(60_000),
            ..Fill::default()
        },
    )
}

/// One request line on a fresh control connection; the final response line, parsed.
fn control_request(socket: &Path, line: &str) -> serde_json::Value {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(line.as_bytes()).unwrap();
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader.read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|error| panic!("{error}: {answer}"))
}

#[test]
fn the_admin_listener_is_read_only() {
    let ops = start("read-only");
    let port = ops.daemon.admin_port;
    let paths = [
        "/health",
        "/metrics",
        "/fill",
        "/fill/cancel",
        "/fill?manifest=%2Fetc%2Fpasswd",
        "/drain",
        "/undrain",
        "/verify",
        "/",
    ];
    for method in ["POST", "PUT", "DELETE", "PATCH", "GET"] {
        for path in paths {
            if method == "GET" && matches!(path, "/health" | "/metrics") {
                continue;
            }
            let response = appliance_testkit::http(port, method, path, &[]).unwrap();
            assert!(
                [404, 405].contains(&response.status),
                "{method} {path} answered {}",
                response.status
            );
        }
    }
    // Nothing changed: still serving, no fill ever started.
    let status = ops.ctl.status().unwrap();
    assert_eq!(status["state"], "serving", "{status}");
    assert_eq!(status["fill"]["running"], false, "{status}");
    assert!(status["fill"]["last"].is_null(), "{status}");
    // HEAD answers like GET without a body.
    let head = appliance_testkit::http(port, "HEAD", "/health", &[]).unwrap();
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty(), "{:?}", head.text());
}

#[test]
fn health_metrics_and_status_come_from_one_snapshot() {
    let ops = start("one-snapshot");
    ops.ctl_ok(&["fill", "--wait"]);
    let check = |expected_state: &[&str], expected_code: u16| {
        let status = ops.ctl.status().unwrap();
        let (code, body) = ops.daemon.admin("GET", "/health");
        let health: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(code, expected_code, "{body}");
        assert!(
            expected_state.contains(&health["state"].as_str().unwrap()),
            "{body}"
        );
        for key in ["state", "healthy", "version", "problems", "drives"] {
            assert_eq!(health[key], status[key], "{key}: {health} vs {status}");
        }
        assert_eq!(health["files"], status["catalog"]["files"]);
        let (_, metrics) = ops.daemon.admin("GET", "/metrics");
        let state = health["state"].as_str().unwrap();
        let line = format!("appliance_state{{state=\"{state}\"}} 1");
        assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
        let healthy = u8::from(health["healthy"] == true);
        assert!(metrics.contains(&format!("\nappliance_healthy {healthy}\n")));
        assert!(metrics.ends_with("# EOF\n"));
        assert_eq!(metrics.matches("# EOF").count(), 1);
    };
    check(&["serving"], 200);
    let out = ops.ctl_ok(&["drain"]);
    assert!(out.contains("state: drain"), "{out}");
    check(&["draining", "drained"], 503);
    ops.ctl_ok(&["undrain"]);
    check(&["serving"], 200);
}

#[test]
fn of_two_fill_starts_at_once_exactly_one_starts() {
    let ops = start_stalled("start-race", u64::MAX);
    let request = "{\"version\":2,\"command\":\"fill\",\"manifest\":null}\n";
    for round in 0..5 {
        let barrier = std::sync::Barrier::new(2);
        let answers: Vec<serde_json::Value> = std::thread::scope(|scope| {
            let callers: Vec<_> = (0..2)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        control_request(&ops.socket, request)
                    })
                })
                .collect();
            callers
                .into_iter()
                .map(|caller| caller.join().unwrap())
                .collect()
        });
        let started = answers
            .iter()
            .filter(|answer| answer["reply"]["kind"] == "fill_started")
            .count();
        let refused = answers
            .iter()
            .filter(|answer| answer["error"]["kind"] == "already_running")
            .count();
        assert_eq!((started, refused), (1, 1), "round {round}: {answers:?}");
        // The CLI says so too, and exits non-zero.
        let out = ops.ctl(&["fill"]);
        assert!(!out.status.success());
        assert!(out.stderr.contains("a fill is already running"), "{out:?}");
        ops.ctl_ok(&["fill", "--cancel"]);
        wait_idle(&ops, Duration::from_secs(10));
    }
}

#[test]
fn the_admin_listener_caps_connections_and_gives_each_one_deadline() {
    use std::io::Read;
    let ops = start("admin-limits");
    let port = ops.daemon.admin_port;
    let connect = || std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    // 16 idle connections take every slot; the 17th is closed at once.
    let idle: Vec<_> = (0..16).map(|_| connect()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut excess = connect();
    excess
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let _ = excess.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut answer = Vec::new();
    let read = excess.read_to_end(&mut answer);
    assert!(
        matches!(read, Ok(0)) || read.is_err() && answer.is_empty(),
        "the excess connection was served: {:?}",
        String::from_utf8_lossy(&answer)
    );
    // A client that trickles its head one byte at a time is cut by the whole-request
    // deadline (5 s), not kept alive by each byte.
    drop(idle);
    std::thread::sleep(Duration::from_millis(200));
    let mut slow = connect();
    slow.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let started = Instant::now();
    let head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    let mut cut = false;
    for byte in head.iter().cycle().take(60) {
        if slow.write_all(&[*byte]).is_err() {
            cut = true;
            break;
        }
        let mut one = [0u8; 1];
        match slow.read(&mut one) {
            Ok(0) => {
                cut = true;
                break;
            }
            Ok(_) => panic!("the trickling client got an answer"),
            Err(_) => {}
        }
        if started.elapsed() > Duration::from_secs(12) {
            break;
        }
    }
    let took = started.elapsed();
    assert!(cut, "the trickling client was never cut ({took:?})");
    assert!(took < Duration::from_secs(8), "cut after {took:?}");
    // And the listener serves again.
    assert_eq!(ops.daemon.admin("GET", "/health").0, 200);
}

#[test]
fn a_manifest_file_that_is_not_a_manifest_is_not_echoed_back() {
    let ops = start("no-echo");
    let secret = ops.scratch.path("secret.txt");
    std::fs::write(&secret, "root:SECRET-HASH-0123456789:19000:0:99999:7:::\n").unwrap();
    let out = ops.ctl(&["fill", "--wait", "--manifest", secret.to_str().unwrap()]);
    assert!(!out.status.success(), "{out:?}");
    let status = ops.ctl.status().unwrap();
    let error = status["fill"]["last"]["error"]
        .as_str()
        .unwrap()
        .to_string();
    for text in [&out.stdout, &out.stderr, &error] {
        assert!(!text.contains("SECRET-HASH"), "echoed: {text}");
    }
    assert!(error.contains("manifest"), "{error}");
}

#[test]
fn under_socket_activation_the_daemon_takes_the_socket_systemd_passes() {
    if !appliance_testkit::have("systemd-socket-activate") {
        eprintln!("socket activation: skipped: no systemd-socket-activate");
        return;
    }
    let scratch = Scratch::new("ops-socket-activation");
    let drives = formatted_drives(&scratch, 1, 64 << 20, 4);
    let passed = scratch.path("passed.sock");
    let configured = scratch.path("configured.sock");
    let admin_port = appliance_testkit::free_port().unwrap();
    let mut config = Config::new(&drives);
    config.state_dir = Some(scratch.path("state"));
    config.control_socket = Some(configured.clone());
    config.serve.listen = Some(([127, 0, 0, 1], appliance_testkit::free_port().unwrap()).into());
    config.serve.admin_listen = Some(([127, 0, 0, 1], admin_port).into());
    let config_path = scratch.path("appliance.toml");
    config.write(&config_path).unwrap();
    let child = std::process::Command::new("systemd-socket-activate")
        .arg("--listen")
        .arg(&passed)
        .args([
            env!("CARGO_BIN_EXE_applianced"),
            "run",
            "--config",
            config_path.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = appliance_testkit::Guard::new("applianced", child);
    // systemd-socket-activate starts the daemon at the first connection.
    let ctl = Ctl::next_to(Path::new(env!("CARGO_BIN_EXE_applianced")), &passed).unwrap();
    let started = Instant::now();
    let status = loop {
        match ctl.json(&["status"]) {
            Ok(status) => break status,
            Err(error) => {
                assert!(guard.alive(), "the daemon exited: {error}");
                assert!(started.elapsed() < Duration::from_secs(20), "{error}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert_eq!(status["state"], "serving", "{status}");
    assert!(
        !configured.exists(),
        "the daemon bound its configured socket although systemd passed one"
    );
    drop(guard);
}

impl Ops {
    /// Requires every file but `except` to be served byte-exact.
    fn check_served_except(&self, except: &str) {
        for (path, bytes) in self.files.iter().filter(|(path, _)| path != except) {
            assert!(
                self.daemon.get(path).as_ref() == Some(bytes),
                "{path} is served byte-exact"
            );
        }
    }

    /// The status of `GET path` on the serving port.
    fn served_status(&self, path: &str) -> u16 {
        appliance_testkit::get(self.daemon.port, path, None)
            .expect("a response")
            .status
    }
}

/// The device offset of the one place `bytes` occur on `drive`.
fn offset_on_drive(drive: &Path, bytes: &[u8]) -> u64 {
    let image = std::fs::read(drive).unwrap();
    let mut found = image
        .windows(bytes.len())
        .enumerate()
        .filter(|(_, window)| *window == bytes)
        .map(|(offset, _)| offset);
    let offset = found.next().expect("the bytes are on the drive");
    assert!(found.next().is_none(), "the bytes are on the drive once");
    u64::try_from(offset).unwrap()
}

/// Serving sends bytes without checking them: a byte flipped on the drive would be served for
/// ever. The scrubber (3 s period here) finds it, takes the file out (404, counted in status
/// and /metrics), the next fill fetches it again, and the other files never stop being served.
#[test]
fn the_scrubber_takes_a_rotted_file_out_and_the_next_fill_restores_it() {
    let scrub = Scrub {
        period_s: Some(3),
        ..Scrub::default()
    };
    let files = ops_files("scrub/", 6, 300_000);
    let ops = start_scrubbing(
        "scrub",
        files,
        Vec::new(),
        HashMap::new(),
        Fill::default(),
        scrub,
    );
    ops.ctl_ok(&["fill", "--wait"]);
    ops.check_served_except("");
    let (rotted, bytes) = &ops.files[2];
    let offset = offset_on_drive(&ops.drives[0], &bytes[100_000..100_064]) + 32;
    util::write_at(&ops.drives[0], offset, &[bytes[100_032] ^ 0x01]);
    // Two periods: the pass under way may have checked the file just before the flip.
    let deadline = Instant::now() + Duration::from_secs(2 * 3 + 10);
    while ops.served_status(rotted) != 404 {
        assert!(Instant::now() < deadline, "{rotted} is still served");
        ops.check_served_except(rotted);
        std::thread::sleep(Duration::from_millis(200));
    }
    ops.check_served_except(rotted);
    let status = ops.ctl.status().unwrap();
    let scrub = &status["scrub"];
    assert_eq!(scrub["corrupt_files"], 1, "{scrub}");
    assert_eq!(
        scrub["corrupt_recent"],
        serde_json::json!([rotted]),
        "{scrub}"
    );
    assert_eq!(
        status["state"], "serving",
        "a removed file is not a problem: {status}"
    );
    assert!(scrub["files_checked"].as_u64().unwrap() >= 1, "{scrub}");
    let table = ops.ctl_ok(&["status"]);
    assert!(
        table.contains("1 corrupt") && table.contains(rotted.as_str()),
        "{table}"
    );
    let (_, metrics) = ops.daemon.admin("GET", "/metrics");
    assert!(
        metrics
            .lines()
            .any(|line| line == "appliance_scrub_corrupt_files_total 1"),
        "{metrics}"
    );
    let out = ops.ctl_ok(&["fill", "--wait"]);
    assert!(out.contains("1 fetched"), "{out}");
    assert!(
        ops.daemon.get(rotted).as_ref() == Some(bytes),
        "{rotted} is back"
    );
    // The next whole pass finds nothing more.
    let passes = ops.ctl.status().unwrap()["scrub"]["passes_completed"]
        .as_u64()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2 * 3 + 10);
    loop {
        let scrub = ops.ctl.status().unwrap()["scrub"].clone();
        if scrub["passes_completed"].as_u64().unwrap() >= passes + 2 {
            assert_eq!(scrub["corrupt_files"], 1, "{scrub}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no scrub pass completes: {scrub}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    ops.check_served_except("");
}

/// `check-config` refuses bad `[scrub]` values with a message that names the key, and takes
/// good ones.
#[test]
fn check_config_names_the_bad_scrub_key() {
    let scratch = Scratch::new("ops-scrub-config");
    let config = scratch.path("appliance.toml");
    let cases = [
        ("enabled = false\nperiod_s = 1\nbytes_per_s_max = 1", None),
        (
            "period_s = 0",
            Some("scrub.period_s: must be greater than 0"),
        ),
        ("period_s = -3", Some("period_s")),
        ("period_s = 1.5", Some("period_s")),
        (
            "bytes_per_s_max = 0",
            Some("scrub.bytes_per_s_max: must be greater than 0"),
        ),
        ("enabled = \"yes\"", Some("enabled")),
        ("period = 60", Some("unknown field `period`")),
    ];
    for (scrub, expected_error) in cases {
        std::fs::write(
            &config,
            format!("drives = [\"/dev/null\"]\n[scrub]\n{scrub}\n"),
        )
        .unwrap();
        let out = util::applianced(&["check-config", config.to_str().unwrap()]);
        match expected_error {
            None => assert!(out.status.success(), "{scrub:?}: {}", out.stderr),
            Some(expected) => {
                assert!(!out.status.success(), "{scrub:?} accepted");
                assert!(out.stderr.contains(expected), "{scrub:?}: {}", out.stderr);
            }
        }
    }
}

/// `[scrub]` follows SIGHUP. A daemon whose next pass is days away gets a one-second period
/// with a ceiling of one byte a second: its sleep between passes wakes and a pass starts that
/// crawls after its first file. Refused files (junk, a bad `[scrub]` value) leave it as it was.
/// The default ceiling then wakes the crawling pass, which goes on (no file checked twice)
/// and ends at the new pace. `enabled = false` stops it (status and /metrics say disabled,
/// findings kept, nothing more checked) and `enabled = true` starts it again.
#[test]
fn sighup_repaces_stops_and_starts_the_scrubber() {
    let days_away = Scrub {
        period_s: Some(1_000_000),
        ..Scrub::default()
    };
    let files = ops_files("rescrub/", 6, 300_000);
    let ops = start_scrubbing(
        "scrub-reload",
        files,
        Vec::new(),
        HashMap::new(),
        Fill::default(),
        days_away,
    );
    ops.ctl_ok(&["fill", "--wait"]);
    // The pass at start found the store empty; the next one is days away.
    let idle = ops.scrub_status();
    assert!(idle["pass"].is_null(), "{idle}");
    assert_eq!(idle["period_s"], 1_000_000, "{idle}");
    let passes_before = idle["passes_completed"].as_u64().unwrap();
    let checked_before = idle["files_checked"].as_u64().unwrap();

    let crawl = Scrub {
        period_s: Some(1),
        bytes_per_s_max: Some(1),
        ..Scrub::default()
    };
    ops.reload_scrub(&crawl);
    let crawling = ops.wait_scrub("a pass starts at the new period", |scrub| {
        scrub["pass"]["files_done"] == 1
    });
    assert_eq!(
        (&crawling["period_s"], &crawling["bytes_per_s_max"]),
        (&serde_json::json!(1), &serde_json::json!(1)),
        "{crawling}"
    );
    assert_eq!(crawling["pass"]["bytes_per_s"], 1, "{crawling}");
    let files_total = crawling["pass"]["files_total"].as_u64().unwrap();
    assert_eq!(files_total, 6, "{crawling}");

    let bad_scrub = Config {
        scrub: Scrub {
            period_s: Some(0),
            ..Scrub::default()
        },
        ..ops.daemon.config.clone()
    };
    for refused in ["this is = not [valid".to_string(), bad_scrub.to_toml()] {
        std::fs::write(&ops.daemon.config_path, refused).unwrap();
        send_signal(ops.daemon.pid(), "HUP").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            ops.scrub_status(),
            crawling,
            "a refused file leaves the scrubber crawling as it was"
        );
    }

    let brisk = Scrub {
        period_s: Some(1),
        ..Scrub::default()
    };
    ops.reload_scrub(&brisk);
    let brisk_status = ops.wait_scrub("the crawling pass and the next one end", |scrub| {
        let passes = scrub["passes_completed"].as_u64().unwrap() - passes_before;
        let done = scrub["pass"]["files_done"].as_u64().unwrap_or(0);
        let checked = scrub["files_checked"].as_u64().unwrap() - checked_before;
        assert_eq!(
            checked,
            files_total * passes + done,
            "a pass went on at the new pace rather than start over: {scrub}"
        );
        passes >= 2
    });
    assert_eq!(brisk_status["bytes_per_s_max"], 50 << 20, "{brisk_status}");

    ops.reload_scrub(&Scrub {
        enabled: Some(false),
        ..brisk.clone()
    });
    ops.wait_scrub("disabled", |scrub| scrub["enabled"] == false);
    // The thread may finish the file it was checking.
    std::thread::sleep(Duration::from_millis(100));
    let disabled = ops.scrub_status();
    assert!(disabled["pass"].is_null(), "{disabled}");
    assert!(
        disabled["files_checked"].as_u64().unwrap() >= checked_before + 2 * files_total,
        "findings are kept: {disabled}"
    );
    let (_, metrics) = ops.daemon.admin("GET", "/metrics");
    assert!(
        metrics
            .lines()
            .any(|line| line == "appliance_scrub_enabled 0"),
        "{metrics}"
    );
    assert!(ops.ctl_ok(&["status"]).contains("scrub: disabled"));
    // At a one-second period a running scrubber would have started another pass by now.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        ops.scrub_status(),
        disabled,
        "a disabled scrubber checks nothing"
    );

    ops.reload_scrub(&brisk);
    let enabled = ops.wait_scrub("enabled again, a pass checks files", |scrub| {
        scrub["files_checked"].as_u64() > disabled["files_checked"].as_u64()
    });
    assert_eq!(enabled["enabled"], true, "{enabled}");
}

impl Ops {
    /// The `scrub` part of `appliance-ctl status --json`.
    fn scrub_status(&self) -> serde_json::Value {
        self.ctl.status().unwrap()["scrub"].take()
    }

    /// Rewrites the daemon's configuration with `scrub` as `[scrub]` and sends SIGHUP.
    fn reload_scrub(&self, scrub: &Scrub) {
        let changed = Config {
            scrub: scrub.clone(),
            ..self.daemon.config.clone()
        };
        changed.write(&self.daemon.config_path).unwrap();
        send_signal(self.daemon.pid(), "HUP").unwrap();
    }

    /// Polls the scrub status until `done` holds (3 s at most); returns the status that did.
    fn wait_scrub(
        &self,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let scrub = self.scrub_status();
            if done(&scrub) {
                return scrub;
            }
            assert!(Instant::now() < deadline, "{what}: {scrub}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
