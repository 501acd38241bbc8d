//! Black-box tests of the panic policy and the watchdog: a panic on the upkeep thread, on a
//! serving task or on the control task aborts the real daemon (SIGABRT, the panic message on
//! standard error) instead of leaving it half alive; an upkeep thread that stops making
//! progress stops the WATCHDOG=1 keep-alives (read from a NOTIFY_SOCKET the test binds) and
//! turns /health to 503. The faults come from the test-only `APPLIANCED_TEST_*` variables.

mod util;

use appliance_testkit::{free_port, Config, Guard, Serve};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use util::{formatted_drives, Scratch};

/// How long a panicking daemon may take to be gone.
const ABORT_WITHIN: Duration = Duration::from_secs(20);

/// A daemon started with test faults, SIGKILLed when dropped.
struct Faulty {
    guard: Guard,
    stderr: PathBuf,
    admin_port: u16,
}

impl Faulty {
    /// Starts `applianced run` on one fresh drive with `env` set, standard error to a file,
    /// core dumps off, and WATCHDOG_PID set to the daemon's own pid (`exec` keeps the shell's).
    fn start(scratch: &Scratch, env: &[(&str, &str)]) -> Faulty {
        let drives = formatted_drives(scratch, 1, 64 << 20, 4);
        let loopback = || std::net::SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
        let admin_listen = loopback();
        let config_file = Config {
            state_dir: Some(scratch.path("state")),
            control_socket: Some(scratch.path("control.sock")),
            serve: Serve {
                listen: Some(loopback()),
                admin_listen: Some(admin_listen),
                ..Serve::default()
            },
            ..Config::new(&drives)
        };
        let config = scratch.path("appliance.toml");
        config_file.write(&config).unwrap();
        let stderr = scratch.path("stderr.log");
        let child = Command::new("sh")
            .args([
                "-c",
                "ulimit -c 0; WATCHDOG_PID=$$ exec \"$0\" run --config \"$1\"",
                env!("CARGO_BIN_EXE_applianced"),
                config.to_str().unwrap(),
            ])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start applianced");
        Faulty {
            guard: Guard::new("applianced", child).with_grace(Duration::ZERO),
            stderr,
            admin_port: admin_listen.port(),
        }
    }

    fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.guard.wait_exit(within).unwrap()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// GET on the admin listener: its status and body.
    fn admin_get(&self, path: &str) -> (u16, String) {
        let response = appliance_testkit::http(self.admin_port, "GET", path, &[]).unwrap();
        (response.status, response.text())
    }
}

fn check_panic_aborts(place: &str, message: &str) {
    let scratch = Scratch::new(&format!("panic-{place}"));
    let mut daemon = Faulty::start(&scratch, &[("APPLIANCED_TEST_PANIC", place)]);
    let status = daemon.wait_exit(ABORT_WITHIN).unwrap_or_else(|| {
        panic!(
            "{place}: the daemon still runs {ABORT_WITHIN:?} after the panic:\n{}",
            daemon.stderr()
        )
    });
    let stderr = daemon.stderr();
    assert_eq!(
        status.signal(),
        Some(libc::SIGABRT),
        "{place}: expected an abort, got {status}:\n{stderr}"
    );
    assert!(
        stderr.contains("panicked at") && stderr.contains(message),
        "{place}: the panic message is not on standard error:\n{stderr}"
    );
    assert!(stderr.contains("aborting"), "{stderr}");
}

#[test]
fn a_panic_on_any_daemon_thread_aborts_the_process() {
    let cases = [
        ("upkeep", "test fault: the upkeep thread panics"),
        ("serve", "test fault: a task of the serving runtime panics"),
        ("control", "test fault: the control-socket task panics"),
    ];
    for (place, message) in cases {
        check_panic_aborts(place, message);
    }
}

/// Notifications received on the test's NOTIFY_SOCKET, with their arrival times.
struct Notifications {
    socket: UnixDatagram,
    received: Vec<(Instant, String)>,
}

impl Notifications {
    fn bind(path: &Path) -> Notifications {
        let socket = UnixDatagram::bind(path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Notifications {
            socket,
            received: Vec::new(),
        }
    }

    /// Reads whatever arrived (returns after a short timeout when nothing did).
    fn poll(&mut self) {
        let mut buf = [0u8; 4096];
        while let Ok(length) = self.socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..length]).into_owned();
            self.received.push((Instant::now(), text));
        }
    }

    fn pings(&self) -> Vec<Instant> {
        self.received
            .iter()
            .filter(|(_, text)| text.lines().any(|line| line == "WATCHDOG=1"))
            .map(|(at, _)| *at)
            .collect()
    }

    fn ready(&self) -> bool {
        self.received
            .iter()
            .any(|(_, text)| text.lines().any(|line| line == "READY=1"))
    }
}

#[test]
fn a_stuck_upkeep_thread_stops_the_watchdog_keep_alives() {
    let scratch = Scratch::new("panic-stall");
    let notify_path = scratch.path("notify.sock");
    let mut notifications = Notifications::bind(&notify_path);
    // Keep-alives every 0.5 s; the upkeep thread counts as stuck after 1 s + 2 x 1.5 s.
    let interval = Duration::from_millis(1500);
    let daemon = Faulty::start(
        &scratch,
        &[
            ("APPLIANCED_TEST_STALL", "upkeep"),
            ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
            ("WATCHDOG_USEC", &interval.as_micros().to_string()),
        ],
    );
    let started = Instant::now();
    let silence_wanted = interval * 2;
    loop {
        notifications.poll();
        let pings = notifications.pings();
        let silent_since = pings.last().copied().unwrap_or(started);
        let noticed = daemon
            .stderr()
            .contains("the store upkeep thread makes no progress");
        // A slow drive probe on a loaded machine can also skip a keep-alive: wait for the
        // upkeep error as well as the silence.
        if noticed && !pings.is_empty() && silent_since.elapsed() >= silence_wanted {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "keep-alives never stopped ({} received):\n{}",
            pings.len(),
            daemon.stderr()
        );
    }
    assert!(notifications.ready(), "no READY=1");
    assert!(
        notifications.pings().len() >= 2,
        "the keep-alives ran before the stall was noticed"
    );
    let stderr = daemon.stderr();
    assert!(
        stderr.contains("the store upkeep thread makes no progress"),
        "no error logged:\n{stderr}"
    );
    let (status, body) = daemon.admin_get("/health");
    assert_eq!(status, 503, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["upkeep"]["state"], "stalled", "{health}");
}
